"""Smoke test of benchmarks/bench_step.py: a tiny parameter set, one repeat, every row
present in the JSON. No timing assertions (timings on shared CI machines mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts import load_script

def _load_bench():
    return load_script("benchmarks/bench_step.py")


def test_bench_step_smoke(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench_step.json"
    # in-process, so torch.compile's work is shared with the rest of the session
    bench.main(["--numel-scale", "0.001", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == list(bench.ROW_NAMES)
    for r in report["rows"]:
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            assert r["ms_median"] > 0 and r["gb_per_s"] > 0 and r["first_step_s"] > 0
            assert len(r["times_ms"]) == 1
    by = {r["name"]: r for r in report["rows"]}
    for must in ("adamw_foreach", "ams_foreach", "flat_compiled", "copy_floor",
                 "copy_floor_eager"):
        if must == "flat_compiled" and by[must]["status"] == "n/a":
            pytest.fail("flat_compiled must run on CPU")
        assert by[must]["status"] == "ok", by[must]
    # every ratio, recomputed from the rows' own timings (not a row against itself)
    base, floor = by["adamw_foreach"]["ms_median"], by["copy_floor"]["ms_median"]
    for r in report["rows"]:
        if r["status"] == "ok":
            assert r["ms_median"] == pytest.approx(r["times_ms"][0])  # one repeat: its time
            assert r["speedup_vs_adamw_foreach"] == pytest.approx(base / r["ms_median"]), r["name"]
            assert r["x_copy_floor"] == pytest.approx(r["ms_median"] / floor), r["name"]
            assert r["gb_per_s"] == pytest.approx(
                bench.BYTES_PER_ELEMENT * r["numel"] / (r["ms_median"] / 1e3) / 1e9), r["name"]
    meta = report["meta"]
    for key in ("device", "torch", "git_sha", "date", "numel", "repeats"):
        assert key in meta
    assert meta["numel"] == report["rows"][0]["numel"]
    assert meta["numel"] < 100_000
    assert "| adamw_foreach |" in capsys.readouterr().out


def test_gpt_shapes_count():
    bench = _load_bench()
    shapes = bench.gpt_shapes()
    import math

    assert sum(math.prod(s) for s in shapes) == 28_976_128
    assert sum(math.prod(s) for s in bench.gpt_shapes(layers=8)) == 41_567_232


def _host_cost_bench():
    import importlib
    import sys

    # a real import (not exec from a spec): the spawned ranks unpickle its job by name
    bench_dir = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    return importlib.import_module("bench_host_cost")


def test_bench_host_cost_smoke(tmp_path, capsys):
    """benchmarks/bench_host_cost.py: tiny B, one repeat, no ranks, no compile trace.
    Launch counts are deterministic: the step kernels once per run (twice with per-tensor
    scaling), and the same number of other launches for 3 and 6 buckets."""
    bench = _host_cost_bench()
    out = tmp_path / "bench_host_cost.json"
    bench.main(["--buckets", "3", "6", "--ranks", "0", "--repeats", "1", "--layers",
                "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {(r["buckets"], r["lam"]): r for r in report["rows"]}
    assert set(rows) == {(b, lam) for b in (3, 6) for lam in bench.LAMS}
    rest = {}
    for (b, lam), r in rows.items():
        assert r["runs"] == b and r["syncs"] == 0
        assert r["step_ms"] > 0 and r["host_ms"] > 0
        prims = sum(r["ops"].get(k, 0) for k in bench.PRIMITIVES)
        assert prims == (b if lam == -1.0 else 2 * b)
        rest.setdefault(lam, set()).add(r["launches"] - prims)
    assert all(len(v) == 1 for v in rest.values()), rest
    assert report["comm_rows"] == [] and report["graph_break_rows"] == []
    for key in ("device", "torch", "git_sha", "date", "label"):
        assert key in report["meta"]
    assert "| buckets |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_host_cost_collectives(tmp_path):
    """The 2-rank part: collectives per step, one count all-reduce with lam = 0."""
    bench = _host_cost_bench()
    out = tmp_path / "bench_host_cost.json"
    bench.main(["--buckets", "2", "--dist-buckets", "3", "--repeats", "1", "--layers",
                "--out", str(out)])
    calls = {r["lam"]: r["calls"] for r in json.loads(out.read_text())["comm_rows"]}
    assert calls[-1.0] == {"all_reduce": 3, "all_gather": 3, "all_reduce_small": 1}
    assert calls[0.0] == {"all_reduce": 3, "all_gather": 3, "all_reduce_small": 2}


def test_bench_fusion_smoke(tmp_path, capsys):
    """benchmarks/bench_fusion.py: both fusion sizes time the tiny set once; and the two
    compiles give the same bits (the docstring's claim, and what makes the choice free)."""
    bench = load_script("benchmarks/bench_fusion.py")
    out = tmp_path / "bench_fusion.json"
    bench.main(["--sets", "tiny", "--rounds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["set"], r["mode"]) for r in rows] == [("tiny", m) for m in bench.MODES]
    assert all(len(r["times_ms"]) == 2 and r["ms_median"] > 0 for r in rows)
    results = []
    for size in bench.MODES.values():
        args = bench._buffers(bench.SETS["tiny"], 0)
        bench._compiled(size)(*args, **bench.HP)
        results.append(torch.cat([t for ts in args[:4] for t in ts]))
    assert torch.equal(results[0], results[1])
    assert "| set |" in capsys.readouterr().out


def test_two_pass_floor_ratio_is_the_per_round_sum_over_cadam():
    """``of_two_pass_floor``: per round, (count pass + one-pass step) / CAdam step, then the
    median; printed under the table. Synthetic timings, so the arithmetic is checked."""
    bench = _load_bench()
    times = {"cadam_default": [10.0, 20.0, 30.0], "cadam_count_pass": [3.0, 4.0, 9.0],
             "ams_default": [6.0, 12.0, 12.0], "adamw_fused": [5.0, 5.0, 5.0]}
    rows = [{"name": n, "status": "ok", "times_ms": t, "ms_median": sorted(t)[1],
             "ms_min": min(t), "gb_per_s": 1.0, "first_step_s": 0.1} for n, t in times.items()]
    bench.add_ratios(rows)
    by = {r["name"]: r for r in rows}
    assert by["cadam_default"]["of_two_pass_floor"] == pytest.approx(0.8)  # 0.9, 0.8, 0.7
    assert all("of_two_pass_floor" not in r for n, r in by.items() if n != "cadam_default")
    assert "cadam_default: 0.80 of its two-pass floor" in bench.markdown_table(rows)
    rows = [r for r in rows if r["name"] != "cadam_count_pass"]  # a part missing: no ratio
    for r in rows:
        r.pop("of_two_pass_floor", None)
    bench.add_ratios(rows)
    assert "two-pass floor" not in bench.markdown_table(rows)
