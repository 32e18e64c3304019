"""Smoke test of benchmarks/bench_fsdp.py: a tiny FSDP2 model on 2 gloo ranks, 2 rounds;
every row present (those that run a backward, and the launcher's FSDPAMS against
``clip_grad_norm_`` + fused AdamW, too), the ratios recomputed from the rows.
No timing assertions."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    # a real import: the spawned ranks unpickle bench_fsdp._worker by name
    bench_dir = str(ROOT / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    return importlib.import_module("bench_fsdp")


def test_bench_fsdp_smoke(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench_fsdp.json"
    bench.main(["--layers", "2", "--width", "64", "--rounds", "2", "--timeout", "120",
                "--backward", "--launcher", "--out", str(out)])
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("device", "torch", "git_sha", "date", "load_average_1m", "load_avg_1m_end",
                "world_size", "params", "rounds", "backward", "launcher"):
        assert key in meta, key
    assert meta["world_size"] == 2 and meta["params"] == 2 * (64 * 64 + 64)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == (list(bench.STEP_ROWS) + [n for n, _, _ in bench.BACKWARD_ROWS]
                          + list(bench.LAUNCHER_ROWS))
    for name, r in rows.items():
        assert r["ms_median"] > 0 and len(r["times_ms"]) == 2, name
        torch_row, local_row = bench._peers(name)
        launcher = name in bench.LAUNCHER_ROWS
        assert torch_row.startswith("fsdp_torch_clip_adamw_fused_" if launcher else
                                    name.split("_", 1)[0] + "_torch_adamw_fused")
        assert not launcher or torch_row.rsplit("_", 1)[1] == name.rsplit("_", 1)[1], name
        assert r["speed_vs_torch_fused"] == pytest.approx(
            rows[torch_row]["ms_median"] / r["ms_median"])
        assert r["speed_vs_torch_fused_per_round"] == pytest.approx(statistics.median(
            a / b for a, b in zip(rows[torch_row]["times_ms"], r["times_ms"])))
        if name.endswith(("_bwd", "_iter")) or launcher:
            assert local_row == "" and r["x_local"] is None, name
        else:
            local_ms = rows[local_row]["ms_median"]
            assert r["x_local"] == pytest.approx(r["ms_median"] / local_ms)
            assert r["x_local_besides_all_reduce"] == pytest.approx(
                (r["ms_median"] - r["all_reduce_ms"]) / local_ms)
        if name.startswith("fsdp_launcher_"):  # FSDPAMS: the global norm's all-reduce
            assert r["all_reduce_ms"] > 0, name
        elif not name.endswith("_iter") and not launcher:  # C-Adam all-reduces its counts
            assert (r["all_reduce_ms"] > 0) == ("cadam" in name and name.startswith("fsdp")), (
                name, r["all_reduce_ms"])
        # AMS rows report how many counts their last step took from backward (an int; 0
        # at this size, below the compiled path's: test_fsdp_hook_count tests the count)
        assert (r["counted_in_backward"] is None) == ("torch" in name), (name, r)
    assert "| fsdp_grams |" in capsys.readouterr().out
