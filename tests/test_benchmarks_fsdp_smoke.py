"""Smoke test of benchmarks/bench_fsdp.py: a tiny FSDP2 model on 2 gloo ranks, 2 rounds;
every row present, the ratios recomputed from the rows. No timing assertions."""

from __future__ import annotations

import importlib
import json
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
                "--out", str(out)])
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("device", "torch", "git_sha", "date", "load_average_1m", "load_avg_1m_end",
                "world_size", "params", "rounds"):
        assert key in meta, key
    assert meta["world_size"] == 2 and meta["params"] == 2 * (64 * 64 + 64)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(bench.ROW_NAMES)
    for name, r in rows.items():
        assert r["ms_median"] > 0 and len(r["times_ms"]) == 2, name
        kind, opt = name.split("_", 1)
        assert r["speed_vs_torch_fused"] == pytest.approx(
            rows[f"{kind}_torch_adamw_fused"]["ms_median"] / r["ms_median"])
        assert r["x_local"] == pytest.approx(r["ms_median"] / rows[f"local_{opt}"]["ms_median"])
        # C-Adam on FSDP2 all-reduces its counts; nothing else all-reduces in the step
        assert (r["all_reduce_ms"] > 0) == (name == "fsdp_cadam"), (name, r["all_reduce_ms"])
        assert r["x_local_besides_all_reduce"] == pytest.approx(
            (r["ms_median"] - r["all_reduce_ms"]) / rows[f"local_{opt}"]["ms_median"])
    assert "| fsdp_grams |" in capsys.readouterr().out
