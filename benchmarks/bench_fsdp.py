"""The AMS step on FSDP2 (``fully_shard``) params on 2 gloo ranks, side by side (issue 20).

Rows (the optimizer step only, the same gradients every step, interleaved in rounds so
every row sees the same machine load):

* ``fsdp_grams``: ``Grams(model.parameters())``, default path, on the FSDP2 DTensor params.
* ``fsdp_cadam``: ``CAdam(model.parameters())``, default path (its per-tensor counts summed
  over ranks in one all-reduce per step).
* ``fsdp_torch_adamw_fused``: ``torch.optim.AdamW(fused=True)`` on the same DTensor params.
* ``local_grams`` / ``local_cadam`` / ``local_torch_adamw_fused``: the same optimizers on
  plain tensors shaped like this rank's local shards (no DTensor, no communication): what
  the step costs without FSDP.

Model (default): ``--layers`` x ``nn.Linear(--width, --width)`` (16 x 1024 x 1024 + biases:
16.8M params, the size of the issue's measurement), each layer and the root
``fully_shard``-ed. Each timed step: barrier, step, per-rank time; the step's time is the
max over ranks; a row's time is the median over ``--rounds``. The first step (state
allocation, torch.compile) is excluded and reported as ``first_step_s``.

Ratios: ``speed_vs_torch_fused`` = fsdp_torch_adamw_fused ms / row ms (> 1: faster than
torch's fused AdamW on the same params); ``x_local`` = row ms / the same optimizer's
``local_*`` row ms (the DTensor and communication overhead; 1.0 is none).

``all_reduce_ms``: the time the step spent inside ``dist.all_reduce`` (C-Adam's one count
all-reduce; the max over ranks, median over rounds; 0 for rows without one), and
``x_local_besides_all_reduce`` = (row ms - all_reduce_ms) / local row ms: what the step
costs over its local twin apart from that wait. On a shared 2-core machine the wait is
mostly the peer's wake-up (both ranks enter within ~0.1 ms of each other and one leaves
milliseconds after the other), not the 0.2-0.5 ms the all-reduce itself takes.

    PYTHONPATH=. python benchmarks/bench_fsdp.py --rounds 10
"""

from __future__ import annotations

import argparse
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
from dist_bench import max_over_ranks, run_on_ranks  # noqa: E402

OPTS = ("grams", "cadam", "torch_adamw_fused")
ROW_NAMES = tuple(f"{kind}_{o}" for kind in ("fsdp", "local") for o in OPTS)
LR = 1e-3


def _optimizer(name: str, params):
    from sharded_ams import CAdam, Grams

    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=LR, fused=True)
    return {"grams": Grams, "cadam": CAdam}[name](params, lr=LR)


def _fsdp_model(args):
    """The model, ``fully_shard``-ed, after one backward: its params and gradients as a
    user's step sees them (gradients are views of FSDP2's reduce-scatter output)."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(4, args.width)).square().mean().backward()
    return model


def _setups(args) -> dict:
    """Row name -> (optimizer, params): FSDP2 params with grads (a model of its own for
    each optimizer: the same values), and plain local-shard twins."""
    from torch import nn

    out = {}
    for o in OPTS:
        fsdp_params = list(_fsdp_model(args).parameters())
        out[f"fsdp_{o}"] = (_optimizer(o, fsdp_params), fsdp_params)
        plain = [nn.Parameter(p.to_local().detach().clone()) for p in fsdp_params]
        for p, src in zip(plain, fsdp_params):
            p.grad = src.grad.to_local().detach().clone()
        out[f"local_{o}"] = (_optimizer(o, plain), plain)
    return out


class _AllReduceTimer:
    """Time spent inside ``dist.all_reduce`` while installed (the optimizers call it as
    ``dist.all_reduce``, looked up at call time)."""

    def __init__(self, dist) -> None:
        self.dist, self.orig, self.ms = dist, dist.all_reduce, 0.0

    def __enter__(self):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self.orig(*a, **k)
            finally:
                self.ms += (time.perf_counter() - t0) * 1e3

        self.dist.all_reduce = timed
        return self

    def __exit__(self, *exc) -> None:
        self.dist.all_reduce = self.orig


def _worker(rank: int, world: int, args) -> dict:
    import torch.distributed as dist

    setups = _setups(args)
    first, times = {}, {name: [] for name in ROW_NAMES}
    waits = {name: [] for name in ROW_NAMES}
    for name in ROW_NAMES:
        dist.barrier()
        t0 = time.perf_counter()
        setups[name][0].step()
        first[name] = max_over_ranks([time.perf_counter() - t0])[0]
    for _ in range(args.rounds):
        for name in ROW_NAMES:
            dist.barrier()
            with _AllReduceTimer(dist) as timer:
                t0 = time.perf_counter()
                setups[name][0].step()
                ms = (time.perf_counter() - t0) * 1e3
            step_ms, wait_ms = max_over_ranks([ms, timer.ms])
            times[name].append(step_ms)
            waits[name].append(wait_ms)
    numel = sum(p.numel() for p in setups["fsdp_grams"][1])
    local = sum(p.numel() for p in setups["local_grams"][1])
    return dict(first=first, times=times, waits=waits, numel=numel, local_numel=local)


def rows_from(res: dict) -> list[dict]:
    med = {n: statistics.median(res["times"][n]) for n in ROW_NAMES}
    rows = []
    for name in ROW_NAMES:
        kind, opt = name.split("_", 1)
        wait = statistics.median(res["waits"][name])
        rows.append(dict(name=name, ms_median=med[name], times_ms=res["times"][name],
                         first_step_s=res["first"][name],
                         speed_vs_torch_fused=med[f"{kind}_torch_adamw_fused"] / med[name],
                         x_local=med[name] / med[f"local_{opt}"], all_reduce_ms=wait,
                         x_local_besides_all_reduce=(med[name] - wait) / med[f"local_{opt}"]))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=1200.0)
    add_out_args(ap, "bench_fsdp.json")
    args = ap.parse_args(argv)
    env = env_info()
    res = run_on_ranks(_worker, 2, args, timeout=args.timeout, threads=args.threads)[0]
    rows = rows_from(res)
    meta = dict(env, world_size=2, params=res["numel"], local_numel_rank0=res["local_numel"],
                layers=args.layers, width=args.width, rounds=args.rounds,
                threads_per_rank=args.threads, load_avg_1m_end=env_info()["load_average_1m"])
    print(f"FSDP2 on 2 gloo ranks, {res['numel']:,} params; load average "
          f"{meta['load_average_1m']} -> {meta['load_avg_1m_end']}")
    print_table(rows, ["name", "ms_median", "first_step_s", "speed_vs_torch_fused", "x_local",
                       "all_reduce_ms", "x_local_besides_all_reduce"])
    write_json(resolve_out(args.out, args.update_record, "bench_fsdp.json"),
               dict(meta=meta, rows=rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
