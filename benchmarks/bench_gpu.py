"""GPU benchmark of the fused AMS step against the memory-bandwidth ceiling and torch's AdamW.

In one run, for each size (1M to 1B elements, fp32 params): a device-to-device copy (the
practical bandwidth ceiling, bytes read + written), the project's Triton kernel (Grams,
one pass; and lam=-0.5, two passes), torch.optim.AdamW(fused=True) and
AdamW(foreach=True) on the same tensor. Reports ms, GB/s and the fraction of the copy
bandwidth; writes JSON. Needs CUDA and triton.

    python benchmarks/bench_gpu.py --max-log2 30 --out benchmarks/results/bench_gpu.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_common import env_info, print_table, write_json
from sharded_ams.kernels import GroupHParams, Piece, flat_step

FP32_STEP_BYTES = 16 + 12  # read p, g, m, v; write p, m, v


def cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_size(n: int, repeats: int) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(n)
    p = torch.randn(n, device=dev, generator=gen)
    g = torch.randn(n, device=dev, generator=gen)
    m = torch.randn(n, device=dev, generator=gen) * 0.1
    v = torch.rand(n, device=dev, generator=gen) * 0.01
    rows = []
    step_bytes = FP32_STEP_BYTES * n

    src = torch.empty(step_bytes // 8, dtype=torch.float32, device=dev).normal_(generator=gen)
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src), repeats)
    copy_gbs = 2 * src.numel() * 4 / t_copy / 1e6
    rows.append(dict(n=n, impl="d2d copy (same bytes)", ms=t_copy, gbs=copy_gbs, frac=1.0))
    del src, dst

    def add(impl, fn):
        t = cuda_time(fn, repeats)
        gbs = step_bytes / t / 1e6
        rows.append(dict(n=n, impl=impl, ms=t, gbs=gbs, frac=gbs / copy_gbs))

    for lam, label in ((-1.0, "sharded-ams triton (Grams)"), (-0.5, "sharded-ams triton (lam=-0.5, 2 passes)")):
        hp = GroupHParams(0.9, 0.999, 0.0, lam, 1e-8, 0.01)
        lr = torch.tensor(1e-4, device=dev)
        step = torch.tensor(10.0, device=dev)
        add(label, lambda hp=hp: flat_step(p, g, m, v, None, None, lr=lr, step=step, hp=hp,
                                           pieces=(Piece(0, n, 0, n),), num_tensors=1,
                                           backend="triton"))
    for flag in ("fused", "foreach"):
        q = torch.nn.Parameter(p.clone())
        q.grad = g.clone()
        opt = torch.optim.AdamW([q], lr=1e-4, weight_decay=0.01, **{flag: True})
        add(f"torch AdamW({flag}=True)", opt.step)
        del opt, q
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-log2", type=int, default=20)
    ap.add_argument("--max-log2", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/bench_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    rows = []
    for k in range(args.min_log2, args.max_log2 + 1, 2):
        rows += run_size(2 ** k, args.repeats)
    print_table(rows, ["n", "impl", "ms", "gbs", "frac"],
                {"n": "elements", "ms": "ms/step", "gbs": "GB/s", "frac": "of copy bw"})
    write_json(args.out, {"env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
