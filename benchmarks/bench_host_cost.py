"""Host cost of one ``ShardedAMS.step()`` against the number of buckets B (issue 26, items 5-6).

Per B (one param of ``--numel`` fp32 elements per bucket, one param group, world size 1,
CPU, ``max_grad_norm=1`` so the norm and the clip run) and per lam (-1: Grams, one pass;
0: C-Adam, count + apply with per-tensor scales), measured with the project's own code:

* ``launches``: device work dispatched per ``step()``: every non-view aten op dispatched
  from Python (a ``TorchDispatchMode`` sees each top-level op once: a ``_foreach`` op is
  one, as it is roughly one launch on a GPU), with each call of a step primitive
  (``fused_step``, ``count_run``, ``apply_run``: one Triton launch each on a GPU) counted
  as one launch and the ops inside it not counted. ``syncs``: ``_local_scalar_dense``
  calls (host reads of a device value).
* ``step_ms``: wall time of ``step()`` with the eager backend on these tiny tensors
  (median of ``--repeats``); ``host_ms``: the same with the three step primitives
  replaced by no-ops, i.e. the host work around the kernels, which is what grows with B.
* ``fwd_ms`` (lam = -1 only): a forward through B modules, one param each, with every
  bucket's param gather pending (the gathers are stand-ins that are already done): the
  forward pre-hooks' cost (before issue 26 each hook scanned the buckets for a pending
  gather; the scan stops at the first one, so in forward order it was cheap already).

Graph breaks (item 10): compiled graphs run per forward of ``torch.compile(GPT)`` (the
launcher's GPT, ``--layers`` deep; a counting backend, no Inductor), with the forward
pre-hooks on every module that owns params (the default) and with
``param_sync_modules=model.blocks`` (one hook per block; n/a on code without it).

With ``--ranks 2`` (default) also the collectives issued per step on 2 gloo ranks
(``Comm.calls``), for lam = -1 and 0 and the B in ``--dist-buckets``.

    PYTHONPATH=. python benchmarks/bench_host_cost.py                  # B = 10, 100, 1000
    PYTHONPATH=. python benchmarks/bench_host_cost.py --label before \
        --out benchmarks/results/bench_host_cost_before.json          # on the old code

The script uses only what the code before issue 26 already had, so the same file measures
both sides.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import (add_out_args, env_info, print_table, resolve_out,  # noqa: E402
                          step_keeping_grads, write_json)
from dist_bench import run_on_ranks  # noqa: E402
from sharded_ams import ShardedAMS  # noqa: E402
from sharded_ams.kernels.eager import EagerOps  # noqa: E402

BUCKETS = (10, 100, 1000)
DIST_BUCKETS = (10, 100)
LAMS = (-1.0, 0.0)
NUMEL = 256
PRIMITIVES = ("fused_step", "count_run", "apply_run")
NO_KERNEL = {"empty", "empty_strided", "lift_fresh", "_local_scalar_dense"}


class LaunchCounter(TorchDispatchMode):
    """Counts non-view aten ops dispatched (a launch each on a GPU) and host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused:
            if name == "_local_scalar_dense":
                self.syncs += 1
            elif not func.is_view and name not in NO_KERNEL:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class Primitives:
    """Patch the step primitives: count each call as one launch (not the ops inside it),
    or replace them by no-ops (``stub``) to time only the host work around them."""

    def __init__(self, counter: Optional[LaunchCounter] = None, stub: bool = False):
        self.counter, self.stub = counter, stub
        self.saved = {n: EagerOps.__dict__[n] for n in PRIMITIVES}

    def __enter__(self) -> "Primitives":
        for name, orig in self.saved.items():
            setattr(EagerOps, name, classmethod(self._wrap(name, orig.__func__)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self.saved.items():
            setattr(EagerOps, name, orig)

    def _wrap(self, name: str, fn):
        def call(cls, *args, **kwargs):
            c = self.counter
            if c is not None and not c.paused:
                c.ops[name] += 1
            if self.stub:
                return None
            if c is not None:
                c.paused += 1
            try:
                return fn(cls, *args, **kwargs)
            finally:
                if c is not None:
                    c.paused -= 1
        return call


class Leaf(nn.Module):
    """One param per module: B modules, B forward pre-hooks, B buckets."""

    def __init__(self, numel: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(numel) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


def build(buckets: int, lam: float, numel: int = NUMEL):
    """B leaves in a Sequential, ShardedAMS with one bucket per param, grads set."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Leaf(numel) for _ in range(buckets)])
    opt = ShardedAMS(model, lam=lam, beta3=0.0, lr=1e-3, max_grad_norm=1.0,
                     bucket_numel=numel, backend="eager")
    for p in model.parameters():
        p.grad.normal_()  # direct mode: p.grad is the param's view into the grad buffer
    return model, opt


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_hook_ms(model: nn.Module, opt: ShardedAMS, numel: int, repeats: int) -> float:
    """A forward with every bucket's gather pending (stand-in handles, already done)."""
    comm, done = opt.comm, type("Done", (), {"wait": lambda self: True})()
    saved = comm.active, comm.gather_params
    comm.active, comm.gather_params = True, (lambda bucket, shard: done)
    x = torch.zeros(numel)
    try:
        def fwd() -> None:
            opt._sync.start_param_sync()
            model(x)
        fwd()
        return _median_ms(fwd, repeats)
    finally:
        comm.active, comm.gather_params = saved


def measure(buckets: int, lam: float, numel: int, repeats: int) -> dict[str, Any]:
    """One row: launches, syncs and times of ``step()`` for B buckets and lam."""
    model, opt = build(buckets, lam, numel)
    step = step_keeping_grads(opt)  # the same gradients every step (step() consumes them)
    for _ in range(2):  # warm up (tables, caches)
        step()
    counter = LaunchCounter()
    with Primitives(counter), counter:
        step()
    row = dict(buckets=buckets, lam=lam, runs=sum(len(sh.layout.buckets) for sh in opt.shards),
               launches=sum(counter.ops.values()), syncs=counter.syncs,
               ops=dict(counter.ops.most_common()))
    row["launches_per_bucket"] = row["launches"] / buckets
    row["step_ms"] = _median_ms(step, repeats)
    with Primitives(stub=True):
        row["host_ms"] = _median_ms(step, repeats)
    row["fwd_ms"] = forward_hook_ms(model, opt, numel, repeats) if lam == -1.0 else None
    return row


def comm_calls_job(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """On each rank: the collectives one step issues, per (B, lam)."""
    rows = []
    for buckets in args.dist_buckets:
        for lam in LAMS:
            model, opt = build(buckets, lam, args.numel)
            opt.step()
            before = dict(opt.comm.calls)
            opt.step()
            calls = {k: v - before.get(k, 0) for k, v in opt.comm.calls.items()
                     if v - before.get(k, 0)}
            rows.append(dict(buckets=buckets, lam=lam, world_size=world,
                             n_buckets=len(opt.shards[0].layout.buckets), calls=calls,
                             small_all_reduces=calls.get("all_reduce_small", 0),
                             total=sum(calls.values())))
            opt.close()
            del model, opt
    gc.collect()  # drop finished Work handles before the process group goes
    return rows


def graphs_per_forward(model: nn.Module, x: torch.Tensor) -> int:
    """Compiled graphs run by one forward of ``torch.compile(model)`` (a backend that only
    counts; each graph break splits a graph): after a first forward that compiles."""
    calls = [0]

    def backend(gm, example_inputs):
        def run(*args):
            calls[0] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x, x)
    calls[0] = 0
    compiled(x, x)
    torch._dynamo.reset()
    return calls[0]


def graph_breaks(n_layer: int) -> dict[str, Any]:
    """Graphs per forward of the whole compiled GPT: default hooks vs one per block."""
    from launcher.train.models.gpt import GPT, GPTConfig

    row: dict[str, Any] = dict(n_layer=n_layer)
    for name in ("default", "blocks"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=n_layer, n_embd=64))
        kw = dict(param_sync_modules=list(model.blocks)) if name == "blocks" else {}
        try:
            opt = ShardedAMS(model, preset="grams", backend="eager", **kw)
        except TypeError:  # code before issue 26
            row[name] = None
            continue
        row[name] = graphs_per_forward(model, torch.randint(0, 256, (2, 16)))
        opt.close()
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buckets", type=int, nargs="+", default=list(BUCKETS))
    ap.add_argument("--dist-buckets", type=int, nargs="*", default=list(DIST_BUCKETS))
    ap.add_argument("--numel", type=int, default=NUMEL)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2, help="0: skip the collective counts")
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 8],
                    help="GPT depths for the graph-break count (none: skip it)")
    ap.add_argument("--label", default="after", help="a tag stored in the JSON (before/after)")
    add_out_args(ap, "bench_host_cost.json")
    args = ap.parse_args(argv)
    rows = [measure(b, lam, args.numel, args.repeats) for b in args.buckets for lam in LAMS]
    print_table(rows, ["buckets", "lam", "runs", "launches", "launches_per_bucket", "syncs",
                       "step_ms", "host_ms", "fwd_ms"])
    break_rows = [graph_breaks(n) for n in args.layers]
    if break_rows:
        print_table(break_rows, ["n_layer", "default", "blocks"])
    comm_rows: list[dict] = []
    if args.ranks > 1 and args.dist_buckets:
        comm_rows = run_on_ranks(comm_calls_job, args.ranks, args, timeout=600, threads=1)[0]
        print_table(comm_rows, ["world_size", "buckets", "lam", "n_buckets", "calls",
                                "small_all_reduces", "total"])
    report = dict(meta={**env_info(), "label": args.label, "numel": args.numel,
                        "repeats": args.repeats, "backend": "eager", "argv": list(argv or sys.argv[1:])},
                  rows=rows, comm_rows=comm_rows, graph_break_rows=break_rows)
    write_json(resolve_out(args.out, args.update_record, "bench_host_cost.json"), report)
    return report


if __name__ == "__main__":
    main()
