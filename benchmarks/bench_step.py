"""Time one optimizer step on a GPT-like parameter set, every row side by side.

Parameter set (``gpt_shapes``; exact count printed): a 32000 x 512 token embedding,
``--layers`` transformer blocks of 4 attention matrices 512 x 512 (q, k, v, o), an MLP
512 x 2048 and 2048 x 512, and two LayerNorms (weight + bias, 512 each), plus a final
LayerNorm. With the default 4 layers that is 28,976,128 fp32 parameters (~29M, the set
DESIGN.md section 5 measured; 8 layers would be 41.6M). ``--numel-scale s`` multiplies the
first dimension of every tensor by s (rounded up) for quick runs.

Rows: ``step_rows.py`` (one function each, named and documented there).

Timing: every row is built first; the first step of each row (torch.compile included) is
reported as ``first_step_s``; then 2 warm-up steps each; then ``--repeats`` ROUNDS, each
timing one step of every row in turn (rows interleaved, so load from other processes
hits all rows alike; ``--threads 1 --clock thread`` times the calling thread's CPU time
instead, which a shared machine disturbs far less). Reported: median and min per row, and the ratios to AdamW fused
and to the copy floor as the median of the per-round ratios (robust to load drift
between rounds). The foreach rows allocate full-size temporaries every step; where
page faults are expensive (VMs) and glibc returns big blocks to the OS, that dominates
their time: e.g. ``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184``
(recorded in the JSON as ``malloc_env``) cut ams_foreach ~4x on the 2-core dev VM.
GB/s = 28 B x numel / median time (the nominal bytes of an fp32 AMS/Adam step).
"speedup" = t(adamw_foreach) / t(row); "vs fused" = t(adamw_fused) / t(row) (>= 1: at
least as fast as torch's fused AdamW); "vs peer" = t(peer) / t(row), the peer being the
torch row that does the same work (``PEERS``);
"x copy" = t(row) / t(copy_floor).

Writes JSON to ``--out`` (default: a new benchmarks/results/runs/<UTC time>/ directory;
``--update-record``: benchmarks/results/bench_step.json, the record) with device, torch
version, git SHA and date, and prints a Markdown table.

    PYTHONPATH=. python benchmarks/bench_step.py --repeats 20
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_common import add_out_args, device_name, env_info, loadavg, resolve_out  # noqa: E402
from step_rows import (BYTES_PER_ELEMENT, PEERS, ROW_NAMES, ROWS,  # noqa: E402
                       TWO_PASS_FLOOR, gpt_shapes)


# --- timing -----------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter


def _timed(step, device) -> float:
    """One call of ``step``, timed; its ``before`` (if any: the row's backward) untimed."""
    before = getattr(step, "before", None)
    if before is not None:
        before()
        _sync(device)
    t0 = _clock()
    step()
    _sync(device)
    return _clock() - t0


def time_rows(names, shapes, device, repeats: int, warmup: int = 2) -> list[dict]:
    """Build every row, then time them interleaved: ``repeats`` rounds of one step each."""
    numel = sum(math.prod(s) for s in shapes)
    out, steps = [], {}
    for name in names:
        r = {"name": name, "status": "ok", "numel": numel}
        try:
            step, r["note"] = ROWS[name](shapes, device)
        except NotImplementedError as exc:
            r.update(status="n/a", note=str(exc))
            out.append(r)
            continue
        _sync(device)
        r["first_step_s"] = _timed(step, device)
        for _ in range(warmup):
            _timed(step, device)
        steps[name] = step
        r["times_ms"] = []
        out.append(r)
        print(f"  {name}: built, first step {r['first_step_s']:.2f} s", flush=True)
    by = {r["name"]: r for r in out}
    for k in range(repeats):
        order = list(steps)
        order = order[k % len(order):] + order[:k % len(order)]  # rotate who goes first
        for name in order:
            by[name]["times_ms"].append(_timed(steps[name], device) * 1e3)
    for r in out:
        if r["status"] == "ok":
            med = statistics.median(r["times_ms"])
            r.update(ms_median=med, ms_min=min(r["times_ms"]),
                     gb_per_s=BYTES_PER_ELEMENT * numel / med / 1e6)
    steps.clear()
    gc.collect()
    return out


def add_ratios(rows: list[dict]) -> None:
    """Ratios as medians of per-round ratios (rounds share the load of the moment)."""
    by = {r["name"]: r for r in rows if r["status"] == "ok"}

    def ratio(num: Optional[dict], den: Optional[dict]) -> Optional[float]:
        if not num or not den:
            return None
        return statistics.median(a / b for a, b in zip(num["times_ms"], den["times_ms"]))

    for r in rows:
        if r["status"] != "ok":
            continue
        r["speedup_vs_adamw_foreach"] = ratio(by.get("adamw_foreach"), r)
        r["vs_adamw_fused"] = ratio(by.get("adamw_fused"), r)
        if r["name"] in PEERS:
            r["peer"] = PEERS[r["name"]]
            r["vs_peer"] = ratio(by.get(PEERS[r["name"]]), r)
        r["vs_adamw_default"] = ratio(by.get("adamw_default"), r)
        r["x_copy_floor"] = ratio(r, by.get("copy_floor"))
    parts = [by.get(n) for n in TWO_PASS_FLOOR]
    if "cadam_default" in by and all(parts):
        by["cadam_default"]["of_two_pass_floor"] = statistics.median(
            (a + b) / c for a, b, c in zip(parts[0]["times_ms"], parts[1]["times_ms"],
                                           by["cadam_default"]["times_ms"]))


def _vs_peer(r: dict) -> str:
    if r.get("vs_peer") is None:
        return "" if "peer" not in r else f"n/a ({r['peer']})"
    return f"{r['vs_peer']:.2f} ({r['peer']})"


def markdown_table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = ["| row | ms/step (median) | min ms | GB/s (28 B/elem) | speedup vs AdamW foreach "
             "| vs AdamW default | vs AdamW fused | vs peer (row) | x copy floor | first step (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} |" + " n/a |" * 9)
            continue
        lines.append(f"| {r['name']} | {f(r['ms_median'], '.2f')} | {f(r['ms_min'], '.2f')} "
                     f"| {f(r['gb_per_s'], '.1f')} | {f(r.get('speedup_vs_adamw_foreach'), '.2f')} "
                     f"| {f(r.get('vs_adamw_default'), '.2f')} | {f(r.get('vs_adamw_fused'), '.2f')} "
                     f"| {_vs_peer(r)} "
                     f"| {f(r.get('x_copy_floor'), '.2f')} | {f(r['first_step_s'], '.2f')} |")
    floor = [r for r in rows if r.get("of_two_pass_floor") is not None]
    if floor:
        lines.append(f"\ncadam_default: {floor[0]['of_two_pass_floor']:.2f} of its two-pass floor "
                     f"({' + '.join(TWO_PASS_FLOOR)}, per round; 1.0 = at the floor)")
    return "\n".join(lines)


def run(numel_scale: float = 1.0, repeats: int = 10, layers: int = 4, device: str = "cpu",
        rows: Optional[list[str]] = None, out: Optional[str] = None,
        clock: str = "wall", update_record: bool = False) -> dict:
    global _clock
    _clock = CLOCKS[clock]
    dev = torch.device(device)
    load_before = loadavg()
    shapes = gpt_shapes(numel_scale, layers)
    numel = sum(math.prod(s) for s in shapes)
    print(f"GPT-like set: {len(shapes)} tensors, {numel:,} parameters "
          f"(numel_scale={numel_scale}, layers={layers}), device {device_name(dev)}",
          flush=True)
    results = time_rows(rows or ROW_NAMES, shapes, dev, repeats)
    add_ratios(results)
    report = {
        "benchmark": "bench_step",
        "meta": {
            **env_info(dev),
            "numel": numel,
            "num_tensors": len(shapes),
            "numel_scale": numel_scale,
            "layers": layers,
            "repeats": repeats,
            "load_average_1m_before": load_before,
            "load_average_1m_after": loadavg(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "clock": clock,
            "bytes_per_element": BYTES_PER_ELEMENT,
            "optimizer": "Grams (beta3=0, lam=-1), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0",
        },
        "rows": results,
    }
    table = markdown_table(results)
    print()
    print(table)
    report["table_markdown"] = table
    out_path = resolve_out(out, update_record, "bench_step.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(f"\nwrote {out_path}")
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel-scale", type=float, default=1.0,
                    help="multiply every tensor's first dimension (default 1: ~29M params)")
    ap.add_argument("--repeats", type=int, default=10,
                    help="timed rounds (one step of every row each; median)")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rows", nargs="*", choices=ROW_NAMES, default=None,
                    help="run only these rows (default: all)")
    add_out_args(ap, "bench_step.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's); 1 measures "
                         "per-core efficiency, unaffected by parallel regions waiting for a "
                         "core that another process holds")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (default) or thread: the calling thread's CPU time, which "
                         "leaves out time the scheduler gave to other processes (only "
                         "meaningful with --threads 1, where all work runs in that thread)")
    a = ap.parse_args(argv)
    if a.clock == "thread" and a.threads != 1:
        ap.error("--clock thread needs --threads 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.repeats < 1 or a.numel_scale <= 0:
        ap.error("--repeats must be >= 1 and --numel-scale > 0")
    return run(a.numel_scale, a.repeats, a.layers, a.device, a.rows, a.out, a.clock, a.update_record)


if __name__ == "__main__":
    main()
