"""The dry run of ``benchmarks/gpu_check.py`` (``--device cpu``): every section of the GPU
check runs on CPU at tiny sizes (the Triton kernel under the interpreter), so nothing in
it runs for the first time on a GPU. The checks must pass and have teeth (a planted
single-element error is caught; bf16 rounding is told apart from truncation; the
compiled kernel has vector loads and no fma); what needs a GPU is recorded as skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton not installed")]


def _dry_run(out, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-u", "benchmarks/gpu_check.py", "--device", "cpu",
                           "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_check_dry_run(tmp_path):
    proc = _dry_run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and report["state"] == "PASSED"
    sec = report["sections"]
    # the kernel and bandwidth numbers first, then what can hang (collectives), pytest last
    assert list(sec) == ["env", "static", "correctness", "bandwidth", "step", "sharded",
                         "training", "overlap", "fsdp", "pytest"]
    for name, res in sec.items():
        assert res["status"] in ("ok", "skipped"), (name, res)
    # overlap: bench_overlap's rows at world size 1 (hook overhead; no bytes to hide)
    assert [r["name"] for r in sec["overlap"]["rows"]] == ["off", "on", "ddp_zero"]
    assert all(r["step_ms"] > 0 and r["world_size"] == 1 for r in sec["overlap"]["rows"])
    # fsdp: both rows ran on FSDP2 and stayed bitwise equal on the same gradients
    fsdp = sec["fsdp"]
    assert fsdp["params_bitwise_equal"] and [r["optimizer"] for r in fsdp["rows"]] == [
        "CAdam(count_in_backward=True)", "CAdam(count_in_backward=False)"]
    assert all(r["iter_ms"] > 0 for r in fsdp["rows"])
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
    graph = [r["impl"] for r in sec["bandwidth"]["rows"] if "CUDA graph" in r["impl"]]
    assert len(graph) == 2 and any("alone" in g for g in graph)
    # step: bench_step's rows, the CUDA default's kernels by name, the ratios
    steps = {r["name"]: r for r in sec["step"]["rows"]}
    assert list(steps) == ["adamw_foreach", "adamw_fused", "ams_triton", "cadam_triton"]
    assert all(r["status"] == "ok" and r["ms_median"] > 0 for r in steps.values())
    targets = {t["row"]: t for t in sec["step"]["targets"]}
    assert set(targets) == {"ams_triton", "cadam_triton"}
    assert all(t["value"] > 0 and t["met"] == (t["value"] >= 1.0) for t in targets.values())
    assert all(r["status"] == "ok" for r in sec["sharded"]["rows"])
    assert [r["optimizer"] for r in sec["training"]["rows"]] == [
        "ShardedAMS (Grams)", "DDP + AdamW(fused=True)"]
    assert "skipped" in sec["pytest"]["summary"] and sec["pytest"]["returncode"] == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| correctness | ok |" in md and "## bandwidth" in md and "## step" in md
    assert "Grams(params) default >= 1.0x AdamW(fused=True)" in md


def test_gpu_check_keeps_numbers_through_a_failure_and_a_hang(tmp_path):
    """A section that hangs is ended by its watchdog with its stack recorded, one that raises
    is recorded with its traceback, and the numbers measured before either stay in the JSON;
    the sections after them run in fresh processes."""
    proc = _dry_run(tmp_path, "--sections", "bandwidth", "sharded", "training",
                    "--inject", "sharded:hang", "--inject", "training:raise",
                    "--cap", "sharded=1")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sec = report["sections"]
    assert list(sec) == ["bandwidth", "sharded", "training"] and report["state"] == "FAILED"
    assert sec["bandwidth"]["status"] == "ok"
    assert all(r["ms"] > 0 for r in sec["bandwidth"]["rows"] if "ms" in r)
    hung = sec["sharded"]
    assert hung["status"] == "error" and "ran past its cap of 1 s" in hung["error"]
    assert "ended by its watchdog" in hung["error"]
    assert "run_section" in hung["error"]  # the watchdog's stack of the hung section
    assert sec["training"]["status"] == "error"
    assert "injected failure in section training" in sec["training"]["error"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## bandwidth" in md and "## sharded: error" in md


def test_report_survives_a_broken_formatter(tmp_path, monkeypatch):
    """gpu_check.json is written before the markdown, and the markdown is built one section
    at a time: a formatter that raises loses its own table, not the numbers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check_report as rep

    def broken(*args):
        raise KeyError("a formatter bug")

    monkeypatch.setitem(rep.FORMATTERS, "bandwidth", broken)
    report = {"device": "cuda", "state": "RUNNING", "seconds": 1.0, "sections": {
        "env": {"status": "ok", "seconds": 0.1, "info": {"device": "NVIDIA H100 80GB HBM3"}},
        "bandwidth": {"status": "ok", "seconds": 2.0, "rows": [
            {"n": 1024, "mode": "grams", "ms": 0.125, "gbs": 229.4}]},
        "training": {"status": "ok", "seconds": 3.0, "rows": [{"optimizer": "x", "mfu": 0.375}]}}}
    md = rep.write_report(report, str(tmp_path))
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"]["bandwidth"]["rows"][0]["ms"] == 0.125
    assert "bandwidth: the report could not format this section" in md
    assert "| x | 0.375 |" in md and md == (tmp_path / "gpu_check.md").read_text().rstrip("\n")
    # a bug outside the per-section formatters: the JSON is on disk before the markdown
    monkeypatch.setattr(rep, "_header", broken)
    report["sections"]["training"]["rows"][0]["mfu"] = 0.5
    with pytest.raises(KeyError):
        rep.write_report(report, str(tmp_path))
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"]["training"]["rows"][0]["mfu"] == 0.5


def test_a_stopped_driver_ends_its_running_child():
    """SIGTERM/SIGINT to the driver (an outer ``timeout``, Ctrl-C) ends the child running a
    section: it has a session of its own, so nothing else would, and a hung one would hold
    the GPU through the rerun."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    gpu_check._RUNNING.append(child)
    try:
        with pytest.raises(SystemExit) as exc:
            gpu_check._on_signal(signal.SIGTERM, None)
        assert exc.value.code == 128 + signal.SIGTERM
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        gpu_check._RUNNING.remove(child)
        if child.poll() is None:
            child.kill()
            child.wait()


def test_gpu_tests_run_without_pytest_xdist():
    """The GPU machine cannot install packages, so pytest-xdist may be missing there: the
    check's pytest command must not need it (pyproject's addopts say ``-n 2``, and
    conftest.py implements an xdist hook). Run here with the plugin disabled."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check_sections import pytest_command

    cmd = pytest_command(60.0)
    cmd[4:4] = ["-p", "no:xdist"]  # after "python -u -m pytest"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: all skipped
    assert "unknown hook" not in proc.stdout + proc.stderr
