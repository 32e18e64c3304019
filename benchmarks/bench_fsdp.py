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

Rows with a backward (``--backward``; FSDP2 only): ``*_bwd`` time the step after an untimed
``zero_grad`` + forward + backward; ``*_iter`` time the whole iteration (zero_grad, forward,
backward, step), where the count costs what it costs wherever it runs. ``fsdp_cadam_hook_*``
is ``CAdam(..., count_in_backward=True)``: its counts come from FSDP2's post-reduce-scatter
hooks (the default, ``fsdp_cadam_*``, does that on CUDA only: on CPU it counts in the step).
``speed_vs_torch_fused`` of these rows is against ``fsdp_torch_adamw_fused`` of the same
kind (``_bwd`` or ``_iter``); ``counted_in_backward`` is the tensors whose counts the last
timed step took from backward.

Rows of the launcher (``--launcher``): ``fsdp_launcher_grams_{clip,noclip}`` is the
launcher's FSDP optimizer (``FSDPAMS``: Grams, clipping by the global norm, the
non-finite skip; its clip coefficient read inside the step), against
``fsdp_torch_clip_adamw_fused_{clip,noclip}``, ``clip_grad_norm_`` + torch's fused AdamW on
the same model; "clip" rows clip every step, "noclip" rows never do.

Model (default): ``--layers`` x ``nn.Linear(--width, --width)`` (16 x 1024 x 1024 + biases:
16.8M params, the size of the issue's measurement), each layer and the root
``fully_shard``-ed. Each timed step: barrier, step, per-rank time; the step's time is the
max over ranks; a row's time is the median over ``--rounds``. The first step (state
allocation, torch.compile) is excluded and reported as ``first_step_s``.

Ratios: ``speed_vs_torch_fused`` = fsdp_torch_adamw_fused ms / row ms (> 1: faster than
torch's fused AdamW on the same params; ``_per_round``: the median of that ratio taken
within each round); ``x_local`` = row ms / the same optimizer's
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
STEP_ROWS = tuple(f"{kind}_{o}" for kind in ("fsdp", "local") for o in OPTS)
#: with --backward: (row, optimizer, what is timed)
BACKWARD_ROWS = tuple((f"fsdp_{o}_{mode}", o, mode) for mode in ("bwd", "iter")
                      for o in ("cadam", "cadam_hook", "torch_adamw_fused"))
#: with --launcher: the launcher's FSDP optimizer (``FSDPAMS``: Grams, global-norm clipping,
#: the non-finite skip) against what a user would write instead, ``clip_grad_norm_`` + torch's
#: fused AdamW; "clip" rows clip every step (max norm below the gradients'), "noclip" rows
#: never do (the norm is still taken: the skip test, ``clip_grad_norm_``'s own norm)
LAUNCHER_ROWS = ("fsdp_launcher_grams_clip", "fsdp_torch_clip_adamw_fused_clip",
                 "fsdp_launcher_grams_noclip", "fsdp_torch_clip_adamw_fused_noclip")
CLIP = {"clip": 1e-4, "noclip": 1e9}
LR = 1e-3


class _ClipThenStep:
    """``clip_grad_norm_`` (DTensor grads: the global norm) then the optimizer's step."""

    def __init__(self, params: list, max_norm: float) -> None:
        self.params, self.max_norm = params, max_norm
        self.opt = torch.optim.AdamW(params, lr=LR, fused=True)

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()


def _launcher_optimizer(name: str, model):
    from launcher.train.fsdp_optim import FSDPAMS

    max_norm = CLIP[name.rsplit("_", 1)[1]]
    if "_launcher_" in name:
        return FSDPAMS(model, preset="grams", lr=LR, max_grad_norm=max_norm)
    return _ClipThenStep(list(model.parameters()), max_norm)


def _optimizer(name: str, params):
    from sharded_ams import CAdam, Grams

    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=LR, fused=True)
    if name == "cadam_hook":
        return CAdam(params, lr=LR, count_in_backward=True)
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
    """Row name -> (optimizer, params, model, mode): FSDP2 params with grads (a model of its
    own for each optimizer: the same values), plain local-shard twins ("step": the step
    alone, on the gradients set once), and with ``--backward`` the rows that run one."""
    from torch import nn

    out = {}
    for o in OPTS:
        model = _fsdp_model(args)
        fsdp_params = list(model.parameters())
        out[f"fsdp_{o}"] = (_optimizer(o, fsdp_params), fsdp_params, model, "step")
        plain = [nn.Parameter(p.to_local().detach().clone()) for p in fsdp_params]
        for p, src in zip(plain, fsdp_params):
            p.grad = src.grad.to_local().detach().clone()
        out[f"local_{o}"] = (_optimizer(o, plain), plain, None, "step")
    for name, o, mode in BACKWARD_ROWS if args.backward else ():
        model = _fsdp_model(args)
        params = list(model.parameters())
        out[name] = (_optimizer(o, params), params, model, mode)
    for name in LAUNCHER_ROWS if args.launcher else ():
        model = _fsdp_model(args)
        out[name] = (_launcher_optimizer(name, model), list(model.parameters()), model, "step")
    order = STEP_ROWS + tuple(n for n, _, _ in BACKWARD_ROWS) + LAUNCHER_ROWS
    return {n: out[n] for n in order if n in out}


def _backward(opt, model, width: int) -> None:
    opt.zero_grad()
    model(torch.randn(4, width)).square().mean().backward()


def _timed_step(row: tuple, width: int) -> float:
    """One timed step (ms) of a row, after its untimed backward where it has one."""
    import torch.distributed as dist

    opt, _, model, mode = row
    if mode == "bwd":
        _backward(opt, model, width)
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "iter":
        _backward(opt, model, width)
    opt.step()
    return (time.perf_counter() - t0) * 1e3


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
    names = list(setups)
    first, times = {}, {name: [] for name in names}
    waits = {name: [] for name in names}
    for name in names:
        first[name] = max_over_ranks([_timed_step(setups[name], args.width) / 1e3])[0]
    for _ in range(args.rounds):
        for name in names:
            with _AllReduceTimer(dist) as timer:
                ms = _timed_step(setups[name], args.width)
            step_ms, wait_ms = max_over_ranks([ms, timer.ms])
            times[name].append(step_ms)
            waits[name].append(wait_ms)
    counted = {name: getattr(getattr(row[0], "_hook_counts", None), "used", None)
               for name, row in setups.items()}
    numel = sum(p.numel() for p in setups["fsdp_grams"][1])
    local = sum(p.numel() for p in setups["local_grams"][1])
    return dict(first=first, times=times, waits=waits, numel=numel, local_numel=local,
                counted=counted)


def _peers(name: str) -> tuple[str, str]:
    """(the torch fused AdamW row, the local row) a row is compared with."""
    if name.startswith("fsdp_launcher_"):
        return f"fsdp_torch_clip_adamw_fused_{name.rsplit('_', 1)[1]}", ""
    if name.startswith("fsdp_torch_clip_"):
        return name, ""
    if name.endswith(("_bwd", "_iter")):
        mode = name.rsplit("_", 1)[1]
        return f"fsdp_torch_adamw_fused_{mode}", ""
    kind, opt = name.split("_", 1)
    return f"{kind}_torch_adamw_fused", f"local_{opt}"


def per_round(peer_ms: list, row_ms: list) -> float:
    """The median over rounds of peer / row within each round: steadier than the ratio of
    medians when the load swings between rounds (the _iter rows: 350-950 ms here)."""
    return statistics.median(a / b for a, b in zip(peer_ms, row_ms))


def rows_from(res: dict) -> list[dict]:
    med = {n: statistics.median(t) for n, t in res["times"].items()}
    rows = []
    for name in res["times"]:
        torch_row, local_row = _peers(name)
        wait = statistics.median(res["waits"][name])
        local_ms = med.get(local_row)
        rows.append(dict(name=name, ms_median=med[name], times_ms=res["times"][name],
                         first_step_s=res["first"][name],
                         speed_vs_torch_fused=med[torch_row] / med[name],
                         speed_vs_torch_fused_per_round=per_round(res["times"][torch_row],
                                                                  res["times"][name]),
                         x_local=med[name] / local_ms if local_ms else None,
                         all_reduce_ms=wait,
                         x_local_besides_all_reduce=(med[name] - wait) / local_ms
                         if local_ms else None,
                         counted_in_backward=res["counted"].get(name)))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--backward", action="store_true",
                    help="add the rows that run a backward (_bwd: step after it; _iter: both)")
    ap.add_argument("--launcher", action="store_true",
                    help="add the launcher's FSDPAMS (Grams, clipping) against clip_grad_norm_ "
                         "+ torch's fused AdamW")
    ap.add_argument("--timeout", type=float, default=1200.0)
    add_out_args(ap, "bench_fsdp.json")
    args = ap.parse_args(argv)
    env = env_info()
    res = run_on_ranks(_worker, 2, args, timeout=args.timeout, threads=args.threads)[0]
    rows = rows_from(res)
    meta = dict(env, world_size=2, params=res["numel"], local_numel_rank0=res["local_numel"],
                layers=args.layers, width=args.width, rounds=args.rounds,
                backward=args.backward, launcher=args.launcher,
                threads_per_rank=args.threads, load_avg_1m_end=env_info()["load_average_1m"])
    print(f"FSDP2 on 2 gloo ranks, {res['numel']:,} params; load average "
          f"{meta['load_average_1m']} -> {meta['load_avg_1m_end']}")
    print_table(rows, ["name", "ms_median", "first_step_s", "speed_vs_torch_fused",
                       "speed_vs_torch_fused_per_round", "x_local",
                       "all_reduce_ms", "x_local_besides_all_reduce", "counted_in_backward"])
    write_json(resolve_out(args.out, args.update_record, "bench_fsdp.json"),
               dict(meta=meta, rows=rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
