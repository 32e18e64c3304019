"""Time one optimizer step on a GPT-like parameter set.

Parameter set (``gpt_shapes``; exact count printed): a 32000 x 512 token embedding,
``--layers`` transformer blocks of 4 attention matrices 512 x 512 (q, k, v, o), an MLP
512 x 2048 and 2048 x 512, and two LayerNorms (weight + bias, 512 each), plus a final
LayerNorm. With the default 4 layers that is 28,976,128 fp32 parameters (~29M, the set
DESIGN.md section 5 measured; 8 layers would be 41.6M). ``--numel-scale s`` multiplies the
first dimension of every tensor by s (rounded up) for quick runs.

Rows (one function each, ``row_*``), all Grams (beta3 = 0, lam = -1) except torch's AdamW;
fp32 params, grads set once, weight decay 0:

* ``adamw_foreach``: ``torch.optim.AdamW(foreach=True)`` (the baseline of the ratios).
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``; "n/a" where the build has no such
  kernel for the device.
* ``ams_foreach``: ``sharded_ams.Grams`` on the ``_foreach`` path (the default).
* ``ams_fused_compiled``: ``Grams(fused="compiled")``: one torch.compile'd pass per tensor
  (``fused="auto"`` on CUDA, i.e. Triton).
* ``flat_compiled``: the compiled kernel over ONE flat buffer holding all parameters,
  ``sharded_ams.kernels.flat_step(...)`` (a ShardedAMS with world size 1 will replace it).
* ``copy_floor``: the memory-traffic floor of the step: ONE torch.compile'd pass that moves
  the same bytes in place, ``p += g; m += g; v += g`` over four flat fp32 buffers of the
  same total size (one fused loop): reads 16 B (p, g, m, v) and writes 12 B (p, m, v) per
  element, like an fp32 AMS/Adam step, with three adds instead of the step's arithmetic. The ratios
  "x copy floor" are against this row.
* ``copy_floor_eager``: the same bytes with eager ops: three fp32 buffers copied from
  three others (``torch._foreach_copy_``: reads 12 B, writes 12 B per element) plus one
  streaming read of a fourth (``torch.sum``: reads 4 B). Four passes, and its writes go to
  buffers it did not read (write-allocate caches add up to 12 B of reads), so it is slower
  than the one-pass floor; shown for reference.

Timing: the first step of each row (torch.compile included) is reported separately as
``first_step_s``; then 2 warm-up steps; then ``--repeats`` timed steps, median (and min)
reported. The foreach rows allocate full-size temporaries every step; where page faults
are expensive (VMs) and glibc returns big blocks to the OS, that dominates their time:
e.g. ``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` (recorded
in the JSON as ``malloc_env``) cut ams_foreach ~4x on the 2-core dev VM.
GB/s = 28 B x numel / median time (the nominal bytes of an fp32 AMS/Adam step).
"speedup" = t(adamw_foreach) / t(row); "x copy" = t(row) / t(copy_floor).

Writes JSON to ``--out`` (default benchmarks/results/bench_step.json) with device, torch
version, git SHA and date, and prints a Markdown table.

    PYTHONPATH=. python benchmarks/bench_step.py --repeats 10
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
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_common import device_name, env_info, loadavg  # noqa: E402
from sharded_ams import Grams  # noqa: E402
from sharded_ams.kernels import GroupHParams, flat_step  # noqa: E402
from sharded_ams.kernels.eager import compile_available  # noqa: E402

BYTES_PER_ELEMENT = 28  # fp32: read p, g, m, v (16 B); write p, m, v (12 B)
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
GRAMS_HP = GroupHParams(beta1=BETAS[0], beta2=BETAS[1], beta3=0.0, lam=-1.0, eps=EPS,
                        weight_decay=0.0)
ROW_NAMES = ("adamw_foreach", "adamw_fused", "ams_foreach", "ams_fused_compiled",
             "flat_compiled", "copy_floor", "copy_floor_eager")


# --- the parameter set ------------------------------------------------------------------


def gpt_shapes(numel_scale: float = 1.0, layers: int = 4, vocab: int = 32000, d: int = 512,
               ffn: int = 2048) -> list[tuple[int, ...]]:
    """Shapes of the GPT-like set; every tensor's first dimension times ``numel_scale``."""

    def sc(n: int) -> int:
        return max(1, math.ceil(n * numel_scale))

    shapes: list[tuple[int, ...]] = [(sc(vocab), d)]
    for _ in range(layers):
        shapes += [(sc(d),), (sc(d),)]  # LayerNorm 1
        shapes += [(sc(d), d)] * 4  # q, k, v, o
        shapes += [(sc(d),), (sc(d),)]  # LayerNorm 2
        shapes += [(sc(ffn), d), (sc(d), ffn)]  # MLP up, down
    shapes += [(sc(d),), (sc(d),)]  # final LayerNorm
    return shapes


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
        p.grad = torch.randn(s, generator=gen).to(device) * 1e-2
        params.append(p)
    return params


# --- rows: each returns (step function, note) or raises NotImplementedError for "n/a" ---


def row_adamw_foreach(shapes, device):
    params = make_params(shapes, device)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)
    return opt.step, "torch.optim.AdamW(foreach=True)"


def row_adamw_fused(shapes, device):
    params = make_params(shapes, device)
    try:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0,
                                fused=True)
        opt.step()  # some builds only fail at the first step
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise NotImplementedError(f"fused AdamW unsupported here: {exc}") from None
    return opt.step, "torch.optim.AdamW(fused=True)"


def row_ams_foreach(shapes, device):
    params = make_params(shapes, device)
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS, foreach=True)
    return opt.step, "sharded_ams.Grams(foreach=True)"


def row_ams_fused_compiled(shapes, device):
    params = make_params(shapes, device)
    backend = "compiled" if device.type == "cpu" else "auto"
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS, fused=backend)
    return opt.step, f"sharded_ams.Grams(fused={backend!r}): one kernel per tensor"


def row_flat_compiled(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = torch.randn(numel, generator=gen).to(device)
    g = (torch.randn(numel, generator=gen) * 1e-2).to(device)
    m = torch.zeros(numel, device=device)
    v = torch.zeros(numel, device=device)
    backend = "compiled" if device.type == "cpu" else "triton"
    state = {"step": 0}

    @torch.no_grad()
    def step():
        state["step"] += 1
        flat_step(p, g, m, v, None, None, lr=LR, step=state["step"], hp=GRAMS_HP,
                  backend=backend)

    return step, f"kernels.flat_step(backend={backend!r}) over one flat buffer"


def _floor_pass(p, g, m, v):
    # one fused loop, in place: reads p, g, m, v (16 B), writes p, m, v (12 B) per element;
    # each output depends only on its own old value and g, so no temporaries are needed
    p.add_(g)
    m.add_(g)
    v.add_(g)


def row_copy_floor(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    p, g, m, v = (torch.randn(numel, device=device) for _ in range(4))
    if device.type == "cpu" and not compile_available():
        raise NotImplementedError("torch.compile unavailable: see copy_floor_eager")
    fn = torch.compile(_floor_pass, dynamic=True, fullgraph=True)

    def step():
        fn(p, g, m, v)

    return step, ("one compiled pass, in place: p += g; m += g; v += g: "
                  "16 B read, 12 B written per element, like the step")


def row_copy_floor_eager(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    src = [torch.randn(numel, device=device) for _ in range(4)]
    dst = [torch.empty(numel, device=device) for _ in range(3)]
    sink = []

    def step():
        torch._foreach_copy_(dst, src[:3])
        sink[:] = [torch.sum(src[3])]

    return step, "3 fp32 copies (foreach_copy_) + 1 fp32 read (sum): 16 B read, 12 B written"


ROWS: dict[str, Callable] = {
    "adamw_foreach": row_adamw_foreach,
    "adamw_fused": row_adamw_fused,
    "ams_foreach": row_ams_foreach,
    "ams_fused_compiled": row_ams_fused_compiled,
    "flat_compiled": row_flat_compiled,
    "copy_floor": row_copy_floor,
    "copy_floor_eager": row_copy_floor_eager,
}


# --- timing -----------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_row(name: str, shapes, device, repeats: int, warmup: int = 2) -> dict:
    numel = sum(math.prod(s) for s in shapes)
    out = {"name": name, "status": "ok", "numel": numel}
    try:
        step, note = ROWS[name](shapes, device)
    except NotImplementedError as exc:
        return {**out, "status": "n/a", "note": str(exc)}
    out["note"] = note
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    out["first_step_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out.update(ms_median=med * 1e3, ms_min=min(times) * 1e3, times_ms=[t * 1e3 for t in times],
               gb_per_s=BYTES_PER_ELEMENT * numel / med / 1e9)
    del step
    gc.collect()
    return out


def add_ratios(rows: list[dict]) -> None:
    by = {r["name"]: r for r in rows if r["status"] == "ok"}
    base = by.get("adamw_foreach", {}).get("ms_median")
    floor = by.get("copy_floor", {}).get("ms_median")
    for r in rows:
        if r["status"] != "ok":
            continue
        r["speedup_vs_adamw_foreach"] = base / r["ms_median"] if base else None
        r["x_copy_floor"] = r["ms_median"] / floor if floor else None


def markdown_table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = ["| row | ms/step (median) | min ms | GB/s (28 B/elem) | speedup vs AdamW foreach "
             "| x copy floor | first step (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {r['name']} | {f(r['ms_median'], '.2f')} | {f(r['ms_min'], '.2f')} "
                     f"| {f(r['gb_per_s'], '.1f')} | {f(r.get('speedup_vs_adamw_foreach'), '.2f')} "
                     f"| {f(r.get('x_copy_floor'), '.2f')} | {f(r['first_step_s'], '.2f')} |")
    return "\n".join(lines)


def run(numel_scale: float = 1.0, repeats: int = 10, layers: int = 4, device: str = "cpu",
        rows: Optional[list[str]] = None, out: Optional[str] = None) -> dict:
    dev = torch.device(device)
    load_before = loadavg()
    shapes = gpt_shapes(numel_scale, layers)
    numel = sum(math.prod(s) for s in shapes)
    print(f"GPT-like set: {len(shapes)} tensors, {numel:,} parameters "
          f"(numel_scale={numel_scale}, layers={layers}), device {device_name(dev)}",
          flush=True)
    results = []
    for name in rows or ROW_NAMES:
        r = time_row(name, shapes, dev, repeats)
        msg = f"{r['ms_median']:.2f} ms" if r["status"] == "ok" else r["status"]
        print(f"  {name}: {msg}", flush=True)
        results.append(r)
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
            "bytes_per_element": BYTES_PER_ELEMENT,
            "optimizer": "Grams (beta3=0, lam=-1), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0",
        },
        "rows": results,
    }
    table = markdown_table(results)
    print()
    print(table)
    report["table_markdown"] = table
    out_path = Path(out) if out else ROOT / "benchmarks" / "results" / "bench_step.json"
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
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per row (median)")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rows", nargs="*", choices=ROW_NAMES, default=None,
                    help="run only these rows (default: all)")
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/bench_step.json)")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.numel_scale <= 0:
        ap.error("--repeats must be >= 1 and --numel-scale > 0")
    return run(a.numel_scale, a.repeats, a.layers, a.device, a.rows, a.out)


if __name__ == "__main__":
    main()
