"""ZeRO-1 training step on 2 gloo processes: ShardedAMS vs DDP + ZeroRedundancyOptimizer
vs DDP + unsharded AdamW.

The script spawns ``--world-size`` (default 2) CPU processes itself (gloo, one torch
thread each by default: 2 ranks on this 2-core box). Every row trains the SAME model from
the same initial weights on the same random token batches:

* ``sharded_grams``: ``ShardedAMS(model, preset="grams")`` (no DDP wrapper: it reduces the
  flat grad buffer itself, all-reduce on gloo, and all-gathers the params).
* ``sharded_adamw``: ``ShardedAMS(model, preset="adamw")``.
* ``zero_adamw``: ``DDP(model)`` + ``ZeroRedundancyOptimizer(params,
  optimizer_class=torch.optim.AdamW, foreach=True)`` (whole params assigned to ranks,
  broadcast after the local step).
* ``ddp_adamw``: ``DDP(model)`` + ``torch.optim.AdamW(foreach=True)`` (unsharded).

All with lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01. ShardedAMS uses
``--backend`` (default "compiled": torch.compile of the flat step; its compile time is in
the first step, reported as ``first_step_s`` and excluded from the timings).

Model (default): the project's GPT (``launcher/train/models/gpt.py``), byte vocabulary 256,
``n_layer=4, n_embd=512, n_head=8, block_size=64``: 12.7M params (printed), tied
embedding; global batch 4 x 64 tokens (2 sequences per rank). Chosen so one training
step takes a few hundred ms per rank on this 2-core CPU box, with the optimizer step and
communication a sizeable part of it (as in real data-parallel training, where the
compute per rank shrinks with N).

Timing: after ``--warmup`` steps, ``--steps`` timed steps; each step starts after a
barrier, every phase is timed on every rank and the per-step value is the max over
ranks (the slowest rank sets the pace); the median over steps is reported.

* ``step_ms``: forward + backward + optimizer step (+ zero_grad): the whole iteration.
* ``fwd_bwd_ms``: forward + backward. For DDP rows this includes DDP's gradient
  all-reduce (overlapped with backward); ShardedAMS (overlap on, its default) launches
  its reductions during backward and waits for its param gathers in the next forward.
* ``opt_ms``: ``optimizer.step()`` (+ ``zero_grad``). ShardedAMS: waiting for the grad
  reductions + norm + update + launching the all-gather (see bench_overlap.py for
  overlap on/off side by side); ZeRO: local AdamW + broadcasts; DDP + AdamW: the local update.
* ``compute_ms``: forward + backward of a plain twin of the model (no DDP, no hooks, no
  communication) on the same batch, timed in the same iteration just before the real
  step, so both see the same machine load (this box may be shared).
* ``opt_comm_ms``: median over steps of (step - compute) of the same iteration:
  everything that is not model compute, i.e. optimizer step + all communication,
  comparable across rows.

Memory: ``state_mb`` is each rank's optimizer state (ShardedAMS.state_bytes(): m, v and
fp32 masters where needed; ZeRO: the tensors in its local ``optim.state``; AdamW: every
tensor in its state), max over ranks, and ``state_mb_ranks`` lists every rank (ZeRO's
whole-parameter assignment is uneven).

Ratios: ``x_zero`` = row / zero_adamw and ``x_ddp`` = row / ddp_adamw, for ``step_ms``,
``opt_comm_ms`` and ``state_mb``.

Writes JSON to ``--out`` (default: a new benchmarks/results/runs/<UTC time>/ directory;
``--update-record``: benchmarks/results/bench_zero.json, the record) with device, torch
version, git SHA and date, and prints a Markdown table.

    PYTHONPATH=. python benchmarks/bench_zero.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from dist_bench import (add_gpt_args, check_gpt_args, gpt_batch, gpt_model_info,  # noqa: E402
                        make_gpt, max_over_ranks, run_on_ranks)

ROW_NAMES = ("sharded_grams", "sharded_adamw", "zero_adamw", "ddp_adamw")
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


# --------------------------------------------------------------------------- worker side
def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) optimizer state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _build(name: str, args):
    """(module to call, optimizer, state-bytes function) for row ``name``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sharded_ams import ShardedAMS

    model = make_gpt(args)
    if name.startswith("sharded_"):
        opt = ShardedAMS(model, preset=name.split("_", 1)[1], backend=args.backend, **HP)
        return model, opt, opt.state_bytes
    ddp = DDP(model)
    if name == "zero_adamw":
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                      foreach=True, **HP)
        return ddp, opt, lambda: _tensor_bytes(opt.optim.state)
    opt = torch.optim.AdamW(model.parameters(), foreach=True, **HP)
    return ddp, opt, lambda: _tensor_bytes(opt.state)


def _time_loop(args, step_fn: Callable[[int], tuple[float, float]], n_phases: int = 2):
    """Run warm-up then timed steps; per-step phase times maxed over ranks (ms)."""
    import torch.distributed as dist

    for s in range(args.warmup):
        dist.barrier()
        step_fn(1 + s)
    per_phase = [[] for _ in range(n_phases)]
    for s in range(args.steps):
        dist.barrier()
        times = step_fn(1 + args.warmup + s)
        for k, t in enumerate(times):
            per_phase[k].append(t * 1e3)
    flat = max_over_ranks([t for ph in per_phase for t in ph])
    n = args.steps
    return [flat[k * n:(k + 1) * n] for k in range(n_phases)]


def _run_row(name: str, args, rank: int, world: int) -> dict:
    import torch.distributed as dist

    module, opt, state_bytes = _build(name, args)
    plain = make_gpt(args)  # compute-only twin: no DDP, no optimizer, no communication

    def one_step(step: int):
        x, y = gpt_batch(args, step, rank, world)
        t0 = time.perf_counter()
        _, loss = plain(x, y)
        loss.backward()
        t1 = time.perf_counter()
        plain.zero_grad(set_to_none=True)
        dist.barrier()
        t2 = time.perf_counter()
        _, loss = module(x, y)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t4 = time.perf_counter()
        return t1 - t0, t3 - t2, t4 - t3

    dist.barrier()
    t0 = time.perf_counter()
    one_step(0)  # the first step: torch.compile (sharded rows) and lazy state allocation
    first = max_over_ranks([time.perf_counter() - t0])[0]
    compute, fwd_bwd, opt_t = _time_loop(args, one_step, n_phases=3)
    step_ms = [a + b for a, b in zip(fwd_bwd, opt_t)]
    sb = torch.tensor([float(state_bytes())], dtype=torch.float64)
    gathered = [torch.zeros_like(sb) for _ in range(world)]
    dist.all_gather(gathered, sb)
    row = dict(name=name, first_step_s=first,
               step_ms=statistics.median(step_ms), step_ms_min=min(step_ms),
               fwd_bwd_ms=statistics.median(fwd_bwd), opt_ms=statistics.median(opt_t),
               compute_ms=statistics.median(compute),
               opt_comm_ms=statistics.median([s - c for s, c in zip(step_ms, compute)]),
               state_bytes_ranks=[int(g.item()) for g in gathered],
               times_ms=step_ms, compute_times_ms=compute)
    row["state_mb_ranks"] = [b / 2**20 for b in row["state_bytes_ranks"]]
    row["state_mb"] = max(row["state_mb_ranks"])
    if name.startswith("sharded_"):
        row["backend"] = opt.backend
        row["comm_calls"] = dict(opt.comm.calls)
    return row


def _rank_main(rank: int, world: int, args) -> dict:
    return {"params": sum(p.numel() for p in make_gpt(args).parameters()),
            "rows": [_run_row(name, args, rank, world) for name in args.rows]}


# --------------------------------------------------------------------------- driver
def _ratios(rows: list[dict]) -> None:
    by = {r["name"]: r for r in rows}
    for r in rows:
        for ref, tag in (("zero_adamw", "x_zero"), ("ddp_adamw", "x_ddp")):
            for key in ("step_ms", "opt_comm_ms", "state_mb"):
                base = by.get(ref, {}).get(key)
                r[f"{key}_{tag}"] = r[key] / base if base else None


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    ap.add_argument("--backend", default="compiled",
                    choices=("auto", "compiled", "eager", "triton"),
                    help="ShardedAMS step kernel (default compiled)")
    add_gpt_args(ap)
    ap.add_argument("--rows", nargs="*", choices=ROW_NAMES, default=list(ROW_NAMES))
    add_out_args(ap, "bench_zero.json")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run")
    args = ap.parse_args(argv)
    check_gpt_args(ap, args)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = run_on_ranks(_rank_main, args.world_size, args, timeout=args.timeout,
                           threads=args.threads)

    r0 = results[0]
    rows = r0["rows"]
    _ratios(rows)
    meta = dict(env_info(), world_size=args.world_size, threads_per_rank=args.threads,
                backend=args.backend, steps=args.steps, warmup=args.warmup,
                params=r0["params"],
                model=gpt_model_info(args),
                hparams={k: list(v) if isinstance(v, tuple) else v for k, v in HP.items()},
                # the box may be shared: the 1-minute load average before and after the run
                load_avg_1m=[load_before[0] if load_before else None,
                             os.getloadavg()[0] if hasattr(os, "getloadavg") else None])
    meta["torch_threads"] = args.threads
    print(f"\nZeRO step on {args.world_size} gloo ranks, {meta['device']}, torch "
          f"{meta['torch']}, {args.threads} thread(s)/rank; GPT {r0['params']:,} params "
          f"(n_layer={args.n_layer}, n_embd={args.n_embd}), global batch {args.batch} x "
          f"{args.block_size}; median of {args.steps} steps after {args.warmup} warm-up; "
          f"ShardedAMS backend {args.backend}; 1-min load average before/after "
          f"{meta['load_avg_1m']}\n")
    cols = ["name", "step_ms", "fwd_bwd_ms", "opt_ms", "compute_ms", "opt_comm_ms", "state_mb",
            "step_ms_x_zero", "step_ms_x_ddp", "opt_comm_ms_x_zero", "opt_comm_ms_x_ddp",
            "state_mb_x_zero", "state_mb_x_ddp", "first_step_s"]
    headers = {"step_ms": "step ms", "fwd_bwd_ms": "fwd+bwd ms", "opt_ms": "opt.step ms",
               "compute_ms": "compute-only ms",
               "opt_comm_ms": "step+comm ms", "state_mb": "state MiB/rank",
               "step_ms_x_zero": "step / ZeRO", "step_ms_x_ddp": "step / DDP",
               "opt_comm_ms_x_zero": "step+comm / ZeRO", "opt_comm_ms_x_ddp": "step+comm / DDP",
               "state_mb_x_zero": "state / ZeRO", "state_mb_x_ddp": "state / DDP",
               "first_step_s": "first step s"}
    print_table(rows, cols, headers)
    print("\nstate MiB per rank: " + "; ".join(
        f"{r['name']} " + ", ".join(f"{m:.1f}" for m in r["state_mb_ranks"]) for r in rows))
    report = dict(meta=meta, rows=rows)
    write_json(resolve_out(args.out, args.update_record, "bench_zero.json"), report)
    return report


if __name__ == "__main__":
    main()
