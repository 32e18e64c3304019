"""Smoke test of benchmarks/bench_ams_host.py: a few repeats, every row present and the
ratios recomputed from the rows. No timing assertions."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_ams_host_smoke(tmp_path, capsys, monkeypatch):
    from sharded_ams.kernels.eager import compile_available

    # the structure only: no compile (seconds on a cold cache), the _foreach path instead
    monkeypatch.setenv("SHARDED_AMS_NO_COMPILE", "1")
    compile_available.cache_clear()
    try:
        _run(tmp_path, capsys)
    finally:
        compile_available.cache_clear()  # probed again, without the variable, when next asked


def _run(tmp_path, capsys) -> None:
    bench_dir = str(ROOT / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    bench = importlib.import_module("bench_ams_host")
    import sharded_ams.optimizer as optimizer_mod

    threshold = optimizer_mod.COMPILE_MIN_NUMEL
    out = tmp_path / "bench_ams_host.json"
    bench.main(["--tensors", "4", "--warmup", "1", "--repeats", "3", "--out", str(out)])
    assert optimizer_mod.COMPILE_MIN_NUMEL == threshold  # put back for the other tests
    report = json.loads(out.read_text())
    assert report["meta"]["tensors"] == 4 and "load_avg_1m_end" in report["meta"]
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(bench.ROW_NAMES)
    for name, r in rows.items():
        assert r["us_median"] > 0 and len(r["times_us"]) == 3, name
        kind = name.split("_", 1)[0]
        assert r["x_torch_fused"] == pytest.approx(
            r["us_median"] / rows[f"{kind}_torch_adamw_fused"]["us_median"])
    assert "| fsdp_cadam |" in capsys.readouterr().out
