"""Claims in the docs that the code or a recorded JSON can contradict, checked against them
(the stale ones issue 27 found, kept from coming back)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_checkpoint_table_is_the_json_it_cites():
    doc = (ROOT / "docs" / "checkpoint.md").read_text()
    data = json.loads((ROOT / "benchmarks" / "results" / "bench_checkpoint.json").read_text())
    table = re.findall(r"^\| (\d) \| (sync|async|load) \| (.*) \|$", doc, re.M)
    want = [(str(r["world_size"]), r["mode"],
             f"{r['state_bytes'] / 1e9:.3f} | {r['blocked_s']:.3f} | {r['total_s']:.3f} | "
             f"{r['blocked_s_per_gb']:.2f} | {r['total_s_per_gb']:.2f}") for r in data["rows"]]
    assert table == want
    for field in re.findall(r"`(\w+)` in the JSON|JSON's `env\.(\w+)`", doc):
        name = field[0] or field[1]
        assert name in data["env"] or name in data, name


def test_readme_signatures_and_defaults():
    import torch

    from sharded_ams import AdamW, ShardedAMS

    first = next(iter(inspect.signature(ShardedAMS).parameters))
    assert f"`ShardedAMS({first}, process_group=None, *," in README
    ours = inspect.signature(AdamW).parameters["weight_decay"].default
    theirs = inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    assert (ours, theirs) == (0.0, 0.01)
    assert "`weight_decay` defaults to 0 here, to 0.01 in `torch.optim.AdamW`" in README


def test_readme_lists_every_job_key_and_the_optim_switches():
    from launcher.config import JobConfig

    def bullet(table: str) -> str:
        return README.split(f"- `{table}`: ", 1)[1].split("\n- `[", 1)[0]

    assert [f.name for f in dataclasses.fields(JobConfig) if f.name not in bullet("[job]")] == []
    for key in ("schedule_steps", "grad_reduce_dtype", "bucket_numel", "overlap"):
        assert key in bullet("[optim]"), key


def test_no_sync_is_not_called_a_no_op():
    assert "no-op" not in (ROOT / "docs" / "llm.md").read_text()
