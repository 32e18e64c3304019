"""Benchmarks write a new run directory by default; the recorded results that RESULTS.md
cites change only with ``--update-record`` (or an explicit ``--out``)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_resolve_out_keeps_the_record():
    common = load_script("benchmarks/bench_common.py")
    now = dt.datetime(2026, 12, 6, 9, 30, 5, tzinfo=dt.timezone.utc)
    assert common.resolve_out(None, False, "bench_x.json", now) == RESULTS / "runs" / "20261206T093005Z" / "bench_x.json"
    assert common.resolve_out(None, True, "bench_x.json", now) == RESULTS / "bench_x.json"
    assert common.resolve_out("elsewhere/y.json", True, "bench_x.json", now) == Path("elsewhere/y.json")
    assert "benchmarks/results/runs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "benchmarks").glob("bench_*.py") if p.name != "bench_common.py"), ids=lambda p: p.name)
def test_every_benchmark_defaults_to_a_run_directory(path):
    """Every benchmark that writes JSON takes --out / --update-record from bench_common and
    resolves its path there; none names a recorded file as its default."""
    text = path.read_text()
    if "write_json(" not in text and ".write_text(json.dumps" not in text:
        pytest.skip("writes no JSON")
    assert "add_out_args(ap, " in text and "resolve_out(" in text
    assert not re.search(r'"--out",\s*default=(?!None)', text)
    assert not re.search(r'results" / "bench_\w+\.json"', text)
