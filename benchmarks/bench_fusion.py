"""Inductor's horizontal fusion in the CPU multi-tensor step, on and off, side by side.

``AMS``'s default CPU path is one compiled call over a param group's tensors
(``sharded_ams/kernels/multi.py``). Inductor's C++ backend fuses independent loops of the
same size into one (``cpp.max_horizontal_fusion_size``, 16 by default), so a group of
same-shaped matrices streams two or more tensors' p, g, m, v at once. The project compiles
with it off (1, ``kernels/eager.py``'s ``_compiled``). This times the same Grams step
compiled both ways, in one process, on two copies of the tensors that the rows swap every
round (a buffer's page placement alone moved a row by 10% here), one thread, thread CPU
time. Each tensor's loop computes the same values either way.

    PYTHONPATH=. python benchmarks/bench_fusion.py --sets 16x512x1024 1x8192x1024 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402

SETS = {"16x512x1024": [(512, 1024)] * 16 + [(512,)] * 16,
        "1x8192x1024": [(8192, 1024)],
        "tiny": [(64, 32)] * 4 + [(32,)] * 4}
MODES = {"fused": 16, "unfused": 1}  # cpp.max_horizontal_fusion_size
HP = dict(beta1=0.9, beta2=0.999, beta3=0.0, lam=-1.0, eps=1e-8)


def _compiled(size: int):
    """The multi-tensor step compiled with this fusion size: a fresh code object each, so
    the two compiles do not share dynamo's cache."""
    from sharded_ams.kernels import multi

    f = multi._fused_all
    fn = types.FunctionType(f.__code__, f.__globals__, f"fused_all_h{size}", f.__defaults__,
                            f.__closure__)
    return torch.compile(fn, dynamic=True, fullgraph=True,
                         options={"cpp.max_horizontal_fusion_size": size})


def _buffers(shapes: list, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    p, grad, m, v = ([torch.randn(s, generator=g).view(-1) for s in shapes] for _ in range(4))
    v = [x.abs() for x in v]
    return (p, grad, m, v, None, [None] * len(shapes), torch.tensor(1e-3), None,
            torch.tensor(1.0))


def run_set(name: str, rounds: int) -> list[dict]:
    fns = {mode: _compiled(size) for mode, size in MODES.items()}
    bufs = [_buffers(SETS[name], 0), _buffers(SETS[name], 1)]
    first = {}
    for mode, fn in fns.items():
        t0 = time.perf_counter()
        fn(*bufs[0], **HP)
        first[mode] = time.perf_counter() - t0
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = [(mode, b) for b in (0, 1) for mode in MODES]
        for mode, b in (order[::-1] if r % 2 else order):
            t0 = time.thread_time()
            fns[mode](*bufs[(b + r) % 2], **HP)
            times[mode].append((time.thread_time() - t0) * 1e3)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    return [dict(set=name, mode=mode, fusion_size=MODES[mode], ms_median=med[mode],
                 times_ms=times[mode], first_call_s=first[mode],
                 x_unfused=med[mode] / med["unfused"]) for mode in MODES]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["16x512x1024", "1x8192x1024"], choices=SETS)
    ap.add_argument("--rounds", type=int, default=30)
    add_out_args(ap, "bench_fusion.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for name in args.sets for row in run_set(name, args.rounds)]
    print_table(rows, ["set", "mode", "fusion_size", "ms_median", "x_unfused", "first_call_s"])
    payload = {"env": env_info(), "rounds": args.rounds, "rows": rows}
    write_json(resolve_out(args.out, args.update_record, "bench_fusion.json"), payload)
    return payload


if __name__ == "__main__":
    main()
