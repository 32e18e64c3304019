"""Kernel bandwidth of the fused AMS step against the copy ceiling and torch's AdamW.

For each size, in one run: a device-to-device copy of the same bytes (the practical
ceiling, bytes read + written), the project's Triton kernel in each mode, and
``torch.optim.AdamW(fused=True)`` / ``(foreach=True)`` on the same fp32 tensor. Each time
is the median of back-to-back calls through ``triton.testing.do_bench`` (which flushes
the L2 cache before every call, so a working set smaller than the 50-60 MB L2 is not
timed from cache); the CUDA-graph rows replay a captured step, timed the same way (L2
flushed before each replay), which removes the launch and Python cost that dominates below
~4M elements: one row captures the kernel alone (host lr/step), one the whole step with
lr and step on the device (the kernel plus the small kernels that compute its scalars). On CPU (the
dry run of ``gpu_check.py``) the same rows are timed with a host clock.

Bytes per element, per mode (``STEP_BYTES``; GB/s = bytes x n / time):

* ``grams``: one pass, fp32: reads p, g, m, v (16 B), writes p, m, v (12 B) = 28 B;
* ``grams_s``: with an EMA sign reference s (beta3 > 0): + read and write s = 36 B;
* ``bf16``: bf16 params with fp32 masters: reads master 4, g 2, m 4, v 4; writes master 4,
  m 4, v 4 and the bf16 param 2 = 28 B;
* ``bf16_state``: fp32 params, m and v stored in bf16: 12 B read + 8 B written = 20 B;
* ``two_pass``: lam = -0.5 (per-tensor scale): count pass reads g, m, v (12) writes m, v (8);
  apply pass reads p, g, m, v (16) writes p (4) = 40 B;
* ``torch AdamW``: fp32, 28 B (foreach moves more in several passes; shown at 28 B).

Rows also cover a non-power-of-two size and a multi-piece run (the GPT-like set of
``bench_step.gpt_shapes`` as pieces of one flat run, two-pass: the chunk table path).

    python benchmarks/bench_gpu.py --update-record   # benchmarks/results/bench_gpu.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Optional

import torch

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json
from sharded_ams.kernels import GroupHParams, Piece, flat_step

STEP_BYTES = {"copy": None, "grams": 28, "grams_s": 36, "bf16": 28, "bf16_state": 20,
              "two_pass": 40, "adamw_fused": 28, "adamw_foreach": 28}
MODES = ("grams", "grams_s", "bf16", "bf16_state", "two_pass", "adamw_fused", "adamw_foreach")


def make_timer(device: torch.device, quick: bool = False) -> Callable[[Callable], float]:
    """Median milliseconds of back-to-back calls: do_bench (L2 flushed) on CUDA, a host
    clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (25, 100)
        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def host(fn: Callable) -> float:
        fn()
        times = []
        for _ in range(3 if quick else 10):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return host


def graph_timer(device: torch.device, quick: bool = False) -> Optional[Callable[[Callable], float]]:
    """Median ms of a CUDA-graph replay of ``fn``, timed as the other rows are: each replay
    between CUDA events, after do_bench has flushed the L2 cache (None where graphs do not
    exist). ``fn`` is warmed up eagerly on a side stream first (compilation stays out of
    the capture, as torch.cuda.graphs' docs ask)."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 100)

    def timed(fn: Callable) -> float:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return float(do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median"))

    return timed


def _state(n: int, device: torch.device, gen: torch.Generator, with_s=False,
           state_dtype=torch.float32, grad_dtype=torch.float32):
    p = torch.randn(n, device=device, generator=gen)
    g = torch.randn(n, device=device, generator=gen).to(grad_dtype)
    m = (torch.randn(n, device=device, generator=gen) * 0.1).to(state_dtype)
    v = (torch.rand(n, device=device, generator=gen) * 0.01).to(state_dtype)
    s = (torch.randn(n, device=device, generator=gen) * 0.1).to(state_dtype) if with_s else None
    return p, g, m, v, s


def kernel_step(mode: str, n: int, device: torch.device, backend: str,
                pieces: tuple = (), device_scalars: bool = False) -> Callable[[], None]:
    """One Triton-kernel (or ``backend``) step of ``mode`` on fresh random state of n elements."""
    gen = torch.Generator(device=device).manual_seed(n)
    with_s = mode == "grams_s"
    p, g, m, v, s = _state(n, device, gen, with_s=with_s,
                           state_dtype=torch.bfloat16 if mode == "bf16_state" else torch.float32,
                           grad_dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    out = torch.empty(n, device=device, dtype=torch.bfloat16) if mode == "bf16" else None
    lam = -0.5 if mode == "two_pass" else -1.0
    hp = GroupHParams(0.9, 0.999, 0.9 if with_s else 0.0, lam, 1e-8, 0.01)
    if mode == "two_pass" and not pieces:
        pieces = (Piece(0, n, 0, n),)
    num = max((pc.index for pc in pieces), default=0) + 1
    if device_scalars:  # the capturable path: lr and the step live on the device
        lr = torch.full((), 1e-4, device=device)
        step = torch.full((), 10.0, device=device)
    else:
        lr, step = 1e-4, 10

    def fn():
        flat_step(p, g, m, v, s, out, lr=lr, step=step, hp=hp, pieces=pieces, num_tensors=num,
                  backend=backend)

    return fn


def adamw_step(flag: str, n: int, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator(device=device).manual_seed(n)
    q = torch.nn.Parameter(torch.randn(n, device=device, generator=gen))
    q.grad = torch.randn(n, device=device, generator=gen)
    opt = torch.optim.AdamW([q], lr=1e-4, weight_decay=0.01, **{flag: True})
    return opt.step


def gpt_pieces(scale: float) -> tuple[int, tuple[Piece, ...]]:
    """The GPT-like parameter set as pieces of one flat run, 64-element aligned."""
    from bench_step import gpt_shapes

    pieces, pos = [], 0
    for i, shape in enumerate(gpt_shapes(scale)):
        n = math.prod(shape)
        pieces.append(Piece(pos, pos + n, i, n))
        pos = -(-(pos + n) // 64) * 64
    return pos, tuple(pieces)


def bandwidth_rows(sizes, device: torch.device, *, backend: str = "triton", quick: bool = False,
                   modes=MODES, multi_piece_scale: Optional[float] = 1.0,
                   graph_sizes=(), log=print) -> list[dict]:
    """Every mode at every size, plus the copy ceiling; GB/s and the fraction of the copy."""
    timer = make_timer(device, quick)
    rows: list[dict] = []
    for n in sizes:
        t_copy = _copy_ms(n, device, timer)
        rows.append(dict(n=n, mode="copy", impl="d2d copy (28 B/elem)", ms=t_copy,
                         gbs=28 * n / t_copy / 1e6, frac_copy=1.0))
        copy_gbs = rows[-1]["gbs"]
        for mode in modes:
            if mode.startswith("adamw"):
                flag = mode.split("_")[1]
                fn, impl = adamw_step(flag, n, device), f"torch AdamW({flag}=True)"
            else:
                fn, impl = kernel_step(mode, n, device, backend), f"sharded-ams {backend}"
            rows.append(_row(n, mode, impl, timer(fn), copy_gbs))
            del fn
        log(f"  bandwidth n={n:,}: {rows[-len(modes) - 1]['ms']:.3f} ms copy", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if multi_piece_scale:
        n, pieces = gpt_pieces(multi_piece_scale)
        copy_gbs = 28 * n / _copy_ms(n, device, timer) / 1e6
        fn = kernel_step("two_pass", n, device, backend, pieces=pieces)
        rows.append(_row(n, "two_pass", f"sharded-ams {backend}, {len(pieces)} pieces (GPT set)",
                         timer(fn), copy_gbs))
    rows += _graph_rows(graph_sizes, device, backend, timer, graph_timer(device, quick))
    return rows


#: the CUDA-graph rows: (label, lr and step on the device?). Host scalars: the graph holds
#: the Triton kernel alone; device scalars (ShardedAMS's path, what a captured training
#: step replays): the kernel plus the small kernels that compute its scalars from the step
GRAPH_ROWS = (("CUDA graph replay: the kernel alone (host lr/step)", False),
              ("CUDA graph replay: whole step, device lr/step (kernel + its scalar kernels)",
               True))


def _graph_rows(sizes, device, backend, timer, gtimer) -> list[dict]:
    rows: list[dict] = []
    for n in sizes:
        if gtimer is None:
            rows += [dict(n=n, mode="grams", impl=label, status="n/a (no CUDA)")
                     for label, _ in GRAPH_ROWS]
            continue
        copy_gbs = 28 * n / _copy_ms(n, device, timer) / 1e6
        for label, on_device in GRAPH_ROWS:
            fn = kernel_step("grams", n, device, backend, device_scalars=on_device)
            rows.append(_row(n, "grams", f"sharded-ams {backend}, {label}", gtimer(fn), copy_gbs))
            del fn
    return rows


def _copy_ms(n: int, device: torch.device, timer) -> float:
    src = torch.randn(28 * n // 8, device=device)  # 14 B read + 14 B written per element
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def _row(n: int, mode: str, impl: str, ms: float, copy_gbs: float) -> dict:
    gbs = STEP_BYTES[mode] * n / ms / 1e6
    return dict(n=n, mode=mode, impl=impl, bytes_per_elem=STEP_BYTES[mode], ms=ms, gbs=gbs,
                frac_copy=gbs / copy_gbs)


COLUMNS = ["n", "mode", "impl", "bytes_per_elem", "ms", "gbs", "frac_copy"]
HEADERS = {"n": "elements", "bytes_per_elem": "B/elem", "ms": "ms/step", "gbs": "GB/s",
           "frac_copy": "of copy bw"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*",
                    default=[2 ** 20, 50_000_017, 2 ** 26, 2 ** 28, 2 ** 30])
    ap.add_argument("--graph-sizes", type=int, nargs="*", default=[2 ** 20, 2 ** 24])
    add_out_args(ap, "bench_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (gpu_check.py --device cpu runs "
                         "the same rows at tiny sizes on CPU)")
    rows = bandwidth_rows(args.sizes, torch.device("cuda"), graph_sizes=args.graph_sizes)
    print_table(rows, COLUMNS, HEADERS)
    write_json(resolve_out(args.out, args.update_record, "bench_gpu.json"), {"env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
