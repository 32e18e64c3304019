"""Host cost of one ``AMS.step()`` (the single-process optimizer's default path) against
torch's fused AdamW, on tensors so small that the kernels cost next to nothing: what is
left is the Python, the checks and the call of the compiled pass around them.

On a GPU a step of a mid-sized model takes a fraction of a millisecond of kernel time,
so this cost decides whether the default step keeps up with ``AdamW(fused=True)``; on a
CPU it is a few percent of a real step (``bench_step.py``, ``bench_fsdp.py`` measure
those).

Rows, each on ``--tensors`` params (half ``--width`` x 8 matrices, half ``--width``
vectors), CPU, one thread:

* ``plain_grams`` / ``plain_cadam``: ``Grams`` / ``CAdam`` on plain params, the CPU
  default's one compiled call per group forced at this size (``COMPILE_MIN_NUMEL`` = 0:
  the path a real model takes);
* ``plain_torch_adamw_fused``: ``torch.optim.AdamW(fused=True)`` on the same params;
* ``fsdp_*``: the same three on FSDP2 (``fully_shard``) params of an ``nn.Linear`` stack
  on a one-rank gloo group: DTensor params, gradients that are views.

``us_median``: ``step()`` wall time, median of ``--repeats`` after ``--warmup`` steps
(the first compiles). ``x_torch_fused``: row us / the same kind's torch row us (1.0: the
same host cost as torch's fused AdamW; < 1 is cheaper).

    PYTHONPATH=. python benchmarks/bench_ams_host.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from dist_bench import _free_port  # noqa: E402

OPTS = ("grams", "cadam", "torch_adamw_fused")
KINDS = ("plain", "fsdp")
ROW_NAMES = tuple(f"{k}_{o}" for k in KINDS for o in OPTS)


def _optimizer(name: str, params):
    from sharded_ams import CAdam, Grams

    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return {"grams": Grams, "cadam": CAdam}[name](params, lr=1e-3)


def _plain_params(args) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = [(args.width, 8) if i % 2 == 0 else (args.width,) for i in range(args.tensors)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _fsdp_params(args) -> list[torch.nn.Parameter]:
    """``--tensors`` / 2 ``nn.Linear(8, --width)`` layers, each ``fully_shard``-ed (one
    rank), after one backward: DTensor params whose gradients are views."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, args.width) if i % 2 == 0 else nn.Linear(args.width, 8)
                            for i in range(args.tensors // 2)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(2, 8)).square().mean().backward()
    return list(model.parameters())


def _time(step, args) -> list[float]:
    for _ in range(args.warmup):
        step()
    out = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def measure(args) -> list[dict]:
    import torch.distributed as dist

    import sharded_ams.optimizer as optimizer_mod

    torch.set_num_threads(1)
    saved = optimizer_mod.COMPILE_MIN_NUMEL
    optimizer_mod.COMPILE_MIN_NUMEL = 0  # the one-call compiled path, as a real model gets
    own_group = not dist.is_initialized()
    if own_group:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        times = {}
        for kind in KINDS:
            for o in OPTS:
                params = (_plain_params if kind == "plain" else _fsdp_params)(args)
                opt = _optimizer(o, params)
                with torch.no_grad():
                    times[f"{kind}_{o}"] = _time(opt.step, args)
    finally:
        optimizer_mod.COMPILE_MIN_NUMEL = saved
        if own_group:
            dist.destroy_process_group()
    med = {n: statistics.median(t) for n, t in times.items()}
    return [dict(name=n, us_median=med[n], times_us=times[n],
                 x_torch_fused=med[n] / med[f"{n.split('_', 1)[0]}_torch_adamw_fused"])
            for n in ROW_NAMES]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, default=32, help="params per optimizer (even)")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=500)
    add_out_args(ap, "bench_ams_host.json")
    args = ap.parse_args(argv)
    if args.tensors < 2 or args.tensors % 2:
        ap.error("--tensors must be an even number >= 2")
    meta = dict(env_info(), tensors=args.tensors, width=args.width, repeats=args.repeats)
    rows = measure(args)
    meta["load_avg_1m_end"] = env_info()["load_average_1m"]
    print(f"AMS.step() host cost, {args.tensors} tensors of <= {args.width * 8} elements, "
          f"one thread; load average {meta['load_average_1m']} -> {meta['load_avg_1m_end']}")
    print_table(rows, ["name", "us_median", "x_torch_fused"])
    write_json(resolve_out(args.out, args.update_record, "bench_ams_host.json"),
               dict(meta=meta, rows=rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
