"""Communication overlap in ShardedAMS: overlap off vs on vs DDP + ZeroRedundancyOptimizer.

Rows (the same model, initial weights and batches; AdamW maths everywhere unless
``--preset`` says otherwise for the ShardedAMS rows, lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01, no clipping):

* ``off``: ``ShardedAMS(model, preset="adamw", overlap=False)``: every reduction and
  gather in ``step()``, one bucket per dtype (the behaviour before overlap existed).
* ``on``: ``ShardedAMS(model, preset="adamw")`` (overlap on, the backend's default
  bucket size): reductions launched during backward, gathers waited for in the next
  forward's module pre-hooks.
* ``on_step_count`` (not run by default): ``on`` with ``count_in_backward=False``: with
  ``--preset cadam`` C-Adam's count pass stays in ``step()``, where ``on`` counts each
  bucket in backward as its reduction lands (``sharded_ams/backward_count.py``).
* ``ddp_zero``: ``DDP(model)`` + ``ZeroRedundancyOptimizer(params, AdamW, foreach=True)``.
* with ``--bucket-sweep``: ``on@N`` rows, overlap on with ``bucket_numel=N``.

``step / off`` and ``exposed / off`` are paired: per round, the ratio of the row's median
to the off row's median of the same round, then the median over rounds.

Measured per step on every rank, the max over ranks taken per step (the slowest rank
sets the pace), the median over steps reported:

* ``step_ms``: forward + backward + ``opt.step()`` + ``zero_grad()``, back to back with
  no barrier in between (a barrier would give pending gathers free time).
* ``exposed_ms``: host time blocked on communication. ShardedAMS rows: its own timers
  (``opt.sync_stats``, ``time.perf_counter`` around every wait): gradient reductions
  waited for (or launched late) in ``step()``, param gathers waited for in ``step()``
  and the forward pre-hooks, the grad-norm all-reduce. ``ddp_zero``: by difference, as
  it has no timers of its own: (forward + backward under DDP) - (forward + backward of a
  plain twin, the median of its own block just before, in the same round) +
  (``ZeRO.step()`` - its local ``AdamW.step()``, i.e. the broadcasts), per step.
* ``compute_ms``: forward + backward of a plain twin (no hooks, no communication).
* ``counted_in_backward``: C-Adam runs whose count ``step()`` took from backward
  (``opt.sync_stats``; the max over ranks per step, the median over steps).

Rows run in ``--rounds`` interleaved blocks of ``--steps`` timed steps (after one untimed
step per block, which would otherwise find its gathers long finished), so every row sees
the same machine load; these 2-core machines are shared, so compare ratios within a run.

The measurement is :func:`measure_overlap`, which runs inside any initialised process
group (or none) on any device, for any model builder: the GPU check calls it with NCCL.

    PYTHONPATH=. python benchmarks/bench_overlap.py                 # 2 gloo ranks, 12.8M GPT
    PYTHONPATH=. python benchmarks/bench_overlap.py --bucket-sweep  # the gloo default bucket
    PYTHONPATH=. python benchmarks/bench_overlap.py --preset cadam --rows on on_step_count ddp_zero
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from dist_bench import (add_gpt_args, check_gpt_args, gpt_batch, gpt_model_info,  # noqa: E402
                        make_gpt, max_over_ranks, run_on_ranks)

ROWS = ("off", "on", "ddp_zero")
#: also selectable: overlap on with C-Adam's count pass kept in step() (--preset cadam)
ROW_CHOICES = ROWS + ("on_step_count",)
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SWEEP = (500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000, None)
STAT_KEYS = ("grad_wait_s", "param_wait_s", "small_wait_s", "late_buckets",
             "counted_in_backward")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(*batch)[1]


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _build_row(name: str, build_model: Callable[[], nn.Module], backend: str,
               preset: str = "adamw"):
    """(module to call, optimizer, local-step timer box or None) for row ``name``."""
    from sharded_ams import ShardedAMS

    model = build_model()
    if name == "ddp_zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                      foreach=True, **HP)
        box = {"s": 0.0}
        local_step = opt.optim.step

        def timed_step(*a, **k):  # ZeRO.step() = local AdamW step + broadcasts
            t0 = time.perf_counter()
            out = local_step(*a, **k)
            box["s"] += time.perf_counter() - t0
            return out

        opt.optim.step = timed_step
        return (DDP(model) if _world()[1] > 1 else model), opt, box
    bucket: Any = "auto"
    if "@" in name:
        size = name.split("@", 1)[1]
        bucket = None if size == "None" else int(size)
    return model, ShardedAMS(model, preset=preset, backend=backend, overlap=name != "off",
                             bucket_numel=bucket, count_in_backward=name != "on_step_count",
                             **HP), None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overlap(build_model: Callable[[], nn.Module], batch_fn: Callable[[int], Any], *,
                    rows: Sequence[str] = ROWS, steps: int = 5, rounds: int = 4,
                    backend: str = "auto", loss_fn: LossFn = _default_loss,
                    device: Optional[torch.device] = None,
                    preset: str = "adamw") -> dict[str, dict]:
    """Time ``rows`` on this rank (see the module docstring); returns per row the lists of
    per-step times in ms on this rank (the caller takes the max over ranks per step).

    ``build_model()`` returns a fresh model on the device (same weights on every call);
    ``batch_fn(step)`` this rank's batch for a step; ``loss_fn(model, batch)`` the loss.
    On CUDA the host timers around waits see launches only (waits are stream waits);
    ``step_ms`` is synchronised per step."""
    device = device or torch.device("cpu")
    built = {name: _build_row(name, build_model, backend, preset) for name in rows}
    twin = build_model()
    out: dict[str, dict] = {name: {k: [] for k in ("step_ms", "fwd_bwd_ms", "opt_ms",
                                                   "exposed_ms", "late_buckets",
                                                   "counted_in_backward",
                                                   "grad_wait_ms", "param_wait_ms",
                                                   "small_wait_ms")}
                            for name in rows}
    out["_compute"] = {"compute_ms": []}
    out["_meta"] = {"rounds": rounds, "steps": steps}
    first: dict[str, float] = {}
    step_no = 0
    for rnd in range(rounds):
        for _ in range(steps + 1):  # compute-only block: the twin's forward + backward
            _sync(device)
            t0 = time.perf_counter()
            loss_fn(twin, batch_fn(step_no)).backward()
            twin.zero_grad(set_to_none=True)
            _sync(device)
            out["_compute"]["compute_ms"].append(1e3 * (time.perf_counter() - t0))
        out["_compute"]["compute_ms"].pop(-steps - 1)  # the block's first step
        compute_now = statistics.median(out["_compute"]["compute_ms"][-steps:])
        for name in rows:
            module, opt, box = built[name]
            for k in range(steps + 1):
                batch = batch_fn(step_no + k)
                stats0 = dict(opt.sync_stats.as_dict()) if box is None else None
                local0 = box["s"] if box is not None else 0.0
                _sync(device)
                t0 = time.perf_counter()
                loss = loss_fn(module, batch)
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                opt.zero_grad()
                _sync(device)
                t2 = time.perf_counter()
                if rnd == 0 and k == 0:
                    first[name] = t2 - t0  # compile time of the step kernel, if any
                if k == 0:
                    continue
                rec = out[name]
                rec["step_ms"].append(1e3 * (t2 - t0))
                rec["fwd_bwd_ms"].append(1e3 * (t1 - t0))
                rec["opt_ms"].append(1e3 * (t2 - t1))
                if box is None:
                    d = {key: opt.sync_stats.as_dict()[key] - stats0[key] for key in STAT_KEYS}
                    rec["grad_wait_ms"].append(1e3 * d["grad_wait_s"])
                    rec["param_wait_ms"].append(1e3 * d["param_wait_s"])
                    rec["small_wait_ms"].append(1e3 * d["small_wait_s"])
                    rec["late_buckets"].append(d["late_buckets"])
                    rec["counted_in_backward"].append(d["counted_in_backward"])
                    rec["exposed_ms"].append(1e3 * (d["grad_wait_s"] + d["param_wait_s"]
                                                    + d["small_wait_s"]))
                else:  # by difference: DDP's blocked all-reduce + ZeRO's broadcasts
                    rec["exposed_ms"].append(max(0.0, 1e3 * (t1 - t0) - compute_now) + max(
                        0.0, 1e3 * (t2 - t1 - (box["s"] - local0))))
        step_no += steps + 1
    for name in rows:
        out[name]["first_step_s"] = first[name]
        opt = built[name][1]
        if hasattr(opt, "sync_stats"):
            out[name]["backend"] = opt.backend
            out[name]["n_buckets"] = sum(len(sh.layout.buckets) for sh in opt.shards)
            out[name]["bucket_numel"] = opt.bucket_numel
    return out


def summarise(per_rank: dict[str, dict]) -> list[dict]:
    """Per-step max over ranks (call on every rank, collectives inside), then medians.

    ``*_x_off`` are paired ratios: per round, the row's median over the off row's median
    of the same round, then the median over rounds (load drifts on a shared machine; the
    rounds of one row interleave with the other rows')."""
    rounds = per_rank["_meta"]["rounds"]
    compute = statistics.median(max_over_ranks(per_rank["_compute"]["compute_ms"]))
    rows, per_round = [], {}
    for name, rec in per_rank.items():
        if name.startswith("_"):
            continue
        series = {k: max_over_ranks(v) for k, v in rec.items() if isinstance(v, list) and v}
        med = {k: statistics.median(v) for k, v in series.items()}
        per_round[name] = {k: [statistics.median(chunk) for chunk in _chunks(series[k], rounds)]
                           for k in ("step_ms", "exposed_ms")}
        rows.append(dict(name=name, compute_ms=compute, **med,
                         **{k: rec[k] for k in ("first_step_s", "backend", "n_buckets",
                                                "bucket_numel") if k in rec}))
    base = per_round.get("off")
    for r in rows:
        for key in ("step_ms", "exposed_ms"):
            ratios = [a / b for a, b in zip(per_round[r["name"]][key], base[key]) if b] \
                if base else []
            r[f"{key}_x_off"] = statistics.median(ratios) if ratios else None
    return rows


def _chunks(values: list, n: int) -> list[list]:
    size = len(values) // n
    return [values[i * size:(i + 1) * size] for i in range(n)]


# --------------------------------------------------------------------------- CLI
#: --model name -> builder of the model from the args (forward(x, y) -> (logits, loss);
#: otherwise pass a loss_fn to measure_overlap). Another built-in model is one line here.
def _llama_tiny(args) -> nn.Module:
    """The launcher's tiny Llama (its own shape; --n-layer etc. do not apply)."""
    from launcher.train.models import build_model
    from launcher.train.models.sizes import resolve_shape

    torch.manual_seed(0)
    return build_model(dict(arch="llama", **resolve_shape("llama", "tiny", {"vocab_size": 256})))


MODELS: dict[str, Callable[[Any], nn.Module]] = {"gpt": make_gpt, "llama_tiny": _llama_tiny}


def _rank_main(rank: int, world: int, args) -> dict:
    sweep = args.bucket_sweep if args.bucket_sweep else SWEEP
    rows = list(args.rows) + ([f"on@{n}" for n in sweep] if args.bucket_sweep is not None else [])
    build = MODELS[args.model]
    per_rank = measure_overlap(lambda: build(args), lambda step: gpt_batch(args, step, rank, world),
                               rows=rows, steps=args.steps, rounds=args.rounds,
                               backend=args.backend, preset=args.preset)
    return {"params": sum(p.numel() for p in build(args).parameters()),
            "rows": summarise(per_rank)}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row and round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved blocks per row")
    ap.add_argument("--backend", default="compiled", choices=("auto", "compiled", "eager"),
                    help="ShardedAMS step kernel (default compiled)")
    add_gpt_args(ap)
    ap.add_argument("--model", default="gpt", choices=sorted(MODELS),
                    help="the model (gpt: sized by --n-layer etc.; llama_tiny: the launcher's)")
    ap.add_argument("--rows", nargs="*", choices=ROW_CHOICES, default=list(ROWS))
    ap.add_argument("--preset", default="adamw", choices=("adamw", "grams", "cadam"),
                    help="ShardedAMS rows' preset (ddp_zero stays AdamW); cadam with the "
                         "on_step_count row shows the count pass moved into backward")
    ap.add_argument("--bucket-sweep", nargs="*", default=None, metavar="NUMEL",
                    type=lambda v: None if v == "None" else int(v),
                    help=f"add overlap-on rows with these bucket_numel values (none given: "
                         f"{SWEEP}; None: one bucket)")
    add_out_args(ap, "bench_overlap.json")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    args = ap.parse_args(argv)
    check_gpt_args(ap, args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    r0 = run_on_ranks(_rank_main, args.world_size, args, timeout=args.timeout,
                      threads=args.threads)[0]
    rows = r0["rows"]
    meta = dict(env_info(), world_size=args.world_size, threads_per_rank=args.threads,
                backend=args.backend, preset=args.preset, steps=args.steps, rounds=args.rounds, params=r0["params"],
                model=dict(gpt_model_info(args), name=args.model) if args.model == "gpt"
                else dict(name=args.model, global_batch=args.batch, block_size=args.block_size),
                hparams={k: list(v) if isinstance(v, tuple) else v for k, v in HP.items()},
                timers="ShardedAMS: opt.sync_stats (time.perf_counter around waits); "
                       "ddp_zero: by difference with a plain twin",
                load_avg_1m=[load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None])
    meta["torch_threads"] = args.threads
    shape = f" (n_layer={args.n_layer}, n_embd={args.n_embd})" if args.model == "gpt" else ""
    print(f"\nOverlap on {args.world_size} gloo ranks, {meta['device']}, torch {meta['torch']}, "
          f"{args.threads} thread(s)/rank; {args.model} {r0['params']:,} params{shape}, global "
          f"batch {args.batch} x {args.block_size}; median of {args.rounds} x {args.steps} steps; "
          f"ShardedAMS preset {args.preset}, backend {args.backend}; 1-min load average before/after "
          f"{meta['load_avg_1m']}\n")
    cols = ["name", "step_ms", "exposed_ms", "grad_wait_ms", "param_wait_ms", "small_wait_ms",
            "fwd_bwd_ms", "opt_ms", "compute_ms", "late_buckets", "counted_in_backward",
            "n_buckets", "step_ms_x_off",
            "exposed_ms_x_off"]
    headers = {"step_ms": "step ms", "exposed_ms": "exposed comm ms",
               "grad_wait_ms": "grad wait ms", "param_wait_ms": "param wait ms",
               "small_wait_ms": "norm wait ms", "fwd_bwd_ms": "fwd+bwd ms",
               "opt_ms": "step()+zero_grad ms", "compute_ms": "compute-only ms",
               "late_buckets": "late buckets", "n_buckets": "buckets",
               "counted_in_backward": "runs counted in bwd",
               "step_ms_x_off": "step / off", "exposed_ms_x_off": "exposed / off"}
    print_table(rows, cols, headers)
    report = dict(meta=meta, rows=rows)
    write_json(resolve_out(args.out, args.update_record, "bench_overlap.json"), report)
    return report


if __name__ == "__main__":
    main()
