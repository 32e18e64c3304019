"""The dry run of ``benchmarks/gpu_check.py`` (``--device cpu``): every section of the GPU
check runs on CPU at tiny sizes (the Triton kernel under the interpreter), so nothing in
it runs for the first time on a GPU. The checks must pass and have teeth (a planted
single-element error is caught; bf16 rounding is told apart from truncation; the
compiled kernel has vector loads and no fma); what needs a GPU is recorded as skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton not installed")]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu"
    sec = report["sections"]
    assert list(sec) == ["env", "static", "correctness", "pytest", "bandwidth", "sharded",
                         "training", "overlap"]
    for name, res in sec.items():
        assert res["status"] in ("ok", "skipped"), (name, res)
    assert sec["overlap"]["status"] == "skipped"  # the hook, until it is wired
    # static: the kernel compiled for sm_90 has 16-byte vector loads and, fusion off, no fma
    static = {r["variant"]: r for r in sec["static"]["rows"]}
    assert all(r["v4_loads"] > 0 for r in static.values())
    assert all(r["fma"] == 0 for r in static.values() if not r["fp_fusion"])
    assert static["one pass, fp32, fp fusion ON"]["fma"] > 0
    # correctness: 4 cases x 3 param dtypes + bf16 moments, every check passed with teeth
    rows = sec["correctness"]["rows"]
    assert len(rows) == 13 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["planted_error_caught"] for r in rows[:12])
    assert rows[12]["store_mismatch"] == 0 and rows[12]["rtne_differs_from_truncation"] > 0
    # the same code paths as the GPU run: every bandwidth mode, the multi-piece run
    modes = {(r["n"], r["mode"]) for r in sec["bandwidth"]["rows"] if "ms" in r}
    for n in (2048, 2051):
        assert {(n, m) for m in ("copy", "grams", "grams_s", "bf16", "bf16_state", "two_pass",
                                 "adamw_fused", "adamw_foreach")} <= modes
    assert any("pieces" in r["impl"] for r in sec["bandwidth"]["rows"])
    assert all(r["status"] == "ok" for r in sec["sharded"]["rows"])
    assert [r["optimizer"] for r in sec["training"]["rows"]] == [
        "ShardedAMS (Grams)", "DDP + AdamW(fused=True)"]
    assert "skipped" in sec["pytest"]["summary"] and sec["pytest"]["returncode"] == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| correctness | ok |" in md and "## bandwidth" in md
