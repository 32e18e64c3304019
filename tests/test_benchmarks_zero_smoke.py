"""Smoke test of benchmarks/bench_zero.py: a tiny GPT on 2 gloo ranks, eager backend (no
compile time), 2 timed steps; every row present in the JSON with sane memory numbers.
No timing assertions (timings on shared CI machines mean nothing)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    # a real import (not exec from a spec): the spawned ranks unpickle bench_zero._worker
    # by name, and they inherit this sys.path
    bench_dir = str(ROOT / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    return importlib.import_module("bench_zero")


@pytest.mark.slow
def test_bench_zero_smoke(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench_zero.json"
    steps, warmup = 2, 1
    bench.main(["--steps", str(steps), "--warmup", str(warmup), "--backend", "eager",
                "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
                "--batch", "4", "--threads", "1", "--timeout", "240", "--out", str(out)])
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("device", "torch", "git_sha", "date", "world_size", "params", "load_avg_1m",
                "backend", "steps"):
        assert key in meta, key
    assert meta["world_size"] == 2 and meta["backend"] == "eager" and meta["steps"] == steps
    assert 10_000 < meta["params"] < 100_000
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(bench.ROW_NAMES)
    for r in rows.values():
        for key in ("step_ms", "fwd_bwd_ms", "opt_ms", "compute_ms", "opt_comm_ms", "first_step_s"):
            assert isinstance(r[key], float), (r["name"], key)
        assert r["step_ms"] > 0 and len(r["times_ms"]) == steps
        assert len(r["state_bytes_ranks"]) == 2 and min(r["state_bytes_ranks"]) > 0
        assert r["step_ms_x_zero"] is not None and r["state_mb_x_ddp"] is not None
    # every ratio, recomputed from the rows' own numbers (not a row against itself)
    for r in rows.values():
        for ref, tag in (("zero_adamw", "x_zero"), ("ddp_adamw", "x_ddp")):
            for key in ("step_ms", "opt_comm_ms", "state_mb"):
                assert r[f"{key}_{tag}"] == pytest.approx(r[key] / rows[ref][key]), (r["name"], key, tag)
    # ShardedAMS on 2 ranks: each rank holds about half of DDP's optimizer state (+ padding)
    for name in ("sharded_grams", "sharded_adamw"):
        assert 0.45 <= rows[name]["state_mb_x_ddp"] <= 0.6, (name, rows[name]["state_mb_x_ddp"])
    # memory: ShardedAMS splits m and v evenly (plus padding); ZeRO's ranks together hold
    # exactly the unsharded AdamW state (whole params assigned to ranks)
    ddp = rows["ddp_adamw"]["state_bytes_ranks"]
    assert ddp[0] == ddp[1]
    assert sum(rows["zero_adamw"]["state_bytes_ranks"]) == ddp[0]
    for name in ("sharded_grams", "sharded_adamw"):
        sb = rows[name]["state_bytes_ranks"]
        assert sb[0] == sb[1], "even shards"
        assert ddp[0] / 2 - 1024 <= sb[0] <= ddp[0] / 2 + 64 * 4 * 2 * 40  # alignment padding
        # every step: one grad all-reduce, one all-gather, one norm all-reduce (1 bucket)
        n = 1 + warmup + steps
        assert rows[name]["comm_calls"] == {"all_reduce": n, "all_gather": n,
                                             "all_reduce_small": n}
        assert rows[name]["backend"] == "eager"
    printed = capsys.readouterr().out
    assert "| sharded_grams |" in printed and "| zero_adamw |" in printed
