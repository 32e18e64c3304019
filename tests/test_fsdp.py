"""AMS / Grams on torch FSDP2 (``fully_shard``) DTensor params, against one process.

Every rank runs the same cases on N = 2 and 3 gloo ranks (one spawn per world size; N = 3
runs the cases whose counts cross ranks). Each case trains a small MLP whose tensors cover
what broke before (issue 20): dimensions not divisible by N (uneven shards, and a
(1, 2501) weight whose shard is empty on all ranks but one), and at N = 2 a (1365, 48)
weight whose shard is 683 x 48 = 32,784 elements on rank 0 and 32,736 on rank 1, either
side of the 32,768 at which the compiled per-tensor kernel (``fused=True``) goes parallel.
The cases marked ``compiled`` run torch.compile'd passes at N = 2 (the default's one call
over the group, which takes FSDP2's gradients, views of its reduce-scatter output; the
fused kernel on the local shards); the others, and N = 3, run the ``_foreach`` and eager
paths (``SHARDED_AMS_NO_COMPILE``: a cold compile costs seconds a graph).

The reference shares no code with ``sharded_ams``: each step the test computes every
rank's micro-batch gradients on a plain full copy of the model and averages them itself
(the FSDP-reduced gradient must match that within fp32 summation error), and replays the
reduced gradient through the float64 numpy oracle of ``tests/oracle.py`` (the whole
tensor's counts, by construction). The FSDP params (the fp32 masters for bf16 params)
must stay within fp32 rounding of the oracle every step. A count over the local shard
only, a missing all-reduce, or counts summed in a rank-dependent order put C-Adam and
lam = -0.5 off by ~1e-3 or more after one step.

A third spawn (4 ranks) steps DTensor params on a (2, 2) mesh (Shard on both dims, Shard x
Replicate either way, all Replicate) against the oracle: counts summed over each sharded
dim's group and never over a replicated one.

Also checked on every step: one all-reduce per step for lam not in {1, -1} (none for
|lam| = 1), and no op with a DTensor argument inside ``step()`` after the first (which
creates the state), seen by a dispatch mode: the kernels step the local shards.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_utils import run_distributed
from oracle import AMSOracle

STEPS = 4
LR = 3e-2
GLOBAL_BATCH = 12  # 2 micro-batches per step; divisible by 2 x 2 and 2 x 3
TOL = 1e-6         # measured max 6.3e-8 over all cases; a local-shard count gives >1e-3


@dataclass(frozen=True)
class Case:
    name: str
    kw: dict = field(default_factory=dict)
    precision: str = "fp32"   # "fp32", "mp" (fp32 params, bf16 compute), "bf16" (bf16 params)
    no_sync: bool = False     # accumulate without gradient sync on the first micro-batch
    dcp: bool = False         # save with DCP after step 2, resume in a fresh model/optimizer
    compiled: bool = False    # at N = 2 with torch.compile (else SHARDED_AMS_NO_COMPILE: the
                              # _foreach / eager paths; a cold compile costs seconds a graph)


CASES = (
    Case("grams", dict(lam=-1.0, beta3=0.0)),
    Case("cadam", dict(lam=0.0, beta3=0.0), no_sync=True, compiled=True),
    Case("adamw", dict(lam=1.0, weight_decay=0.1)),
    Case("lam-0.5_beta3-0.5", dict(lam=-0.5, beta3=0.5, weight_decay=0.05)),
    Case("lam0.3_beta3-0.9_fused", dict(lam=0.3, beta3=0.9, fused=True)),
    Case("cadam_fused", dict(lam=0.0, fused=True), compiled=True),
    Case("cadam_foreach", dict(lam=0.0, foreach=True), no_sync=True),
    Case("grams_fused", dict(lam=-1.0, fused=True)),
    Case("cadam_mp", dict(lam=0.0), precision="mp"),
    Case("lam-0.5_bf16", dict(lam=-0.5, beta3=0.5), precision="bf16", no_sync=True),
    Case("cadam_dcp", dict(lam=0.0, weight_decay=0.1), dcp=True),
    Case("lam-0.5_beta3-0.5_dcp_fused", dict(lam=-0.5, beta3=0.5, fused=True), dcp=True),
)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 1365), nn.Tanh(), nn.Linear(1365, 40), nn.Tanh(),
                         nn.Linear(40, 2501), nn.Tanh(), nn.Linear(2501, 1))


def _batch(step: int, rank: int, n: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 48, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    per = GLOBAL_BATCH // (2 * n)
    rows = slice((2 * rank + micro) * per, (2 * rank + micro + 1) * per)
    return x[rows], y[rows]


def _shard(model: nn.Module, precision: str) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if precision == "mp":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif precision == "bf16":
        model.to(torch.bfloat16)
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def _new(case: Case, seed: int):
    from sharded_ams import AMS

    model = _shard(_model(seed), case.precision)
    return model, AMS(model.parameters(), lr=LR, **case.kw)


def _independent_mean(ref: nn.Module, model: nn.Module, step: int, n: int) -> list:
    """Every rank's micro-batch gradients on a plain full copy, averaged here."""
    with torch.no_grad():
        for rp, p in zip(ref.parameters(), model.parameters()):
            rp.copy_(p.full_tensor().float())
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for r in range(n):
        for micro in range(2):
            ref.zero_grad()
            x, y = _batch(step, r, n, micro)
            (F.mse_loss(ref(x), y) / 2).backward()
            for t, p in zip(total, ref.parameters()):
                t += p.grad
    return [t / n for t in total]


class Counters:
    """All-reduces, and ops with a DTensor argument (a dispatch mode sees every op before
    DTensor's own dispatch does), while a step runs."""

    def __init__(self) -> None:
        self.active, self.all_reduce = False, 0
        orig_ar = self.orig_all_reduce = dist.all_reduce

        def all_reduce(*a, **k):
            self.all_reduce += self.active
            return orig_ar(*a, **k)

        dist.all_reduce = all_reduce

    def step(self, opt, watch: bool) -> tuple[int, Optional[int]]:
        """One step; with ``watch`` under the dispatch mode (the compiled passes then run as
        plain ops, which the mode sees: dynamo compiles nothing under a mode), else as a
        user runs it (None for the ops)."""
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        if not watch:
            self.active, self.all_reduce = True, 0
            try:
                opt.step()
            finally:
                self.active = False
            return self.all_reduce, None
        seen = []

        class DTensorOps(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(isinstance(x, DTensor) for x in tree_leaves((args, kwargs))):
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.active, self.all_reduce = True, 0
        try:
            with DTensorOps():
                opt.step()
        finally:
            self.active = False
        return self.all_reduce, len(seen)


def _dcp_roundtrip(model, opt, case: Case, path: str):
    """Save model and optimizer with DCP, then load them into a fresh (other seed) pair."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    model, opt = _new(case, seed=7)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return model, opt


def _run_case(case: Case, counters: Counters, ckpt_dir: str) -> dict:
    from sharded_ams.kernels.eager import compile_available

    rank, n = dist.get_rank(), dist.get_world_size()
    if case.compiled and n == 2:
        os.environ.pop("SHARDED_AMS_NO_COMPILE", None)
    else:
        os.environ["SHARDED_AMS_NO_COMPILE"] = "1"
    compile_available.cache_clear()
    full = _model(0)
    ref = copy.deepcopy(full)
    init = [p.detach().clone() for p in full.parameters()]
    if case.precision == "bf16":  # the masters start from the bf16 params
        init = [p.to(torch.bfloat16).float() for p in init]
    model, opt = _new(case, seed=0)
    kw = {"beta3": 0.0, "lam": -1.0, "weight_decay": 0.0, **case.kw}
    oracle = AMSOracle.start(init, lr=LR, betas=(0.9, 0.999), beta3=kw["beta3"], lam=kw["lam"],
                             eps=1e-8, weight_decay=kw["weight_decay"])
    out = dict(param_err=[], grad_err=[], all_reduce=[], dispatch=[], bf16_round=True)
    for step in range(STEPS):
        for micro in range(2):
            if case.no_sync:
                model.set_requires_gradient_sync(micro == 1)
            x, y = _batch(step, rank, n, micro)
            (F.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y) / 2).backward()
        reduced = [p.grad.full_tensor().double() for p in model.parameters()]
        if case.precision == "fp32":
            mean = _independent_mean(ref, model, step, n)
            out["grad_err"].append(max(float((a - b).abs().max() / (b.abs().max() + 1e-12))
                                       for a, b in zip(reduced, mean)))
        ar, dispatched = counters.step(opt, watch=step == STEPS - 1)
        out["all_reduce"].append(ar)
        out["dispatch"].append(dispatched)
        oracle.step(reduced)
        params = list(model.parameters())
        got = [opt.state[p]["master"] if case.precision == "bf16" else p for p in params]
        got = [t.detach().full_tensor().double() for t in got]
        if case.precision == "bf16":
            out["bf16_round"] &= all(torch.equal(p.full_tensor(), g.to(torch.bfloat16))
                                     for p, g in zip(params, got))
        out["param_err"].append(max(float((g - torch.from_numpy(o.p)).abs().max())
                                    for g, o in zip(got, oracle.tensors)))
        opt.zero_grad()
        if case.dcp and step == 1:
            model, opt = _dcp_roundtrip(model, opt, case, os.path.join(ckpt_dir, case.name))
    return out


def _layout_errors() -> dict:
    """The messages of a Partial param and of a gradient laid out unlike its param."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor import init_device_mesh

    from sharded_ams import AMS

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    partial = nn.Parameter(DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]))
    try:
        AMS([("blocks.0.attn.weight", partial)], lam=0.0)
    except ValueError as exc:
        out["partial"] = str(exc)
    p = nn.Parameter(distribute_tensor(torch.randn(6, 5), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(6, 5), mesh, [Replicate()])
    ok = nn.Parameter(distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)]))
    ok.grad = distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)])
    before = ok.detach().full_tensor().clone()
    opt = AMS([{"params": [("ok.weight", ok)]}, {"params": [("head.weight", p)]}], lam=0.0)
    try:
        opt.step()
    except ValueError as exc:
        out["grad"] = str(exc)
    # nothing moved: the error came before any group was stepped
    out["untouched"] = (torch.equal(ok.detach().full_tensor(), before)
                        and all(float(st["step"]) == 0 for st in opt.state.values()))
    plain = nn.Parameter(torch.randn(6, 5))  # a plain param handed a DTensor gradient
    plain.grad = distribute_tensor(torch.randn(6, 5), mesh, [Shard(0)])
    try:
        AMS([("plain.weight", plain)], lam=0.0).step()
    except ValueError as exc:
        out["plain_dtensor_grad"] = str(exc)
    out.update(_after_a_checked_step(mesh))
    return out


def _after_a_checked_step(mesh) -> dict:
    """What ``local_param`` keeps from one step to the next (the checked layout and the
    local state views) must not outlive a change: a gradient laid out unlike its param
    after good steps is refused, and state loaded into the same optimizer is what the
    next step reads (not the old state's views)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sharded_ams import AMS

    def param(seed: int) -> nn.Parameter:
        torch.manual_seed(seed)
        return nn.Parameter(distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)]))

    def step(opt, p, seed: int) -> None:
        torch.manual_seed(seed)
        p.grad = distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)])
        opt.step()

    out = {}
    p = param(0)
    opt = AMS([("late.weight", p)], lr=LR, lam=0.0)
    step(opt, p, 1)
    saved, p1 = copy.deepcopy(opt.state_dict()), p.detach().full_tensor().clone()
    step(opt, p, 2)
    step(opt, p, 3)
    opt.load_state_dict(saved)  # back to the state after step 1, in the same optimizer
    with torch.no_grad():
        p.copy_(distribute_tensor(p1, mesh, [Shard(0)]))
    step(opt, p, 4)
    fresh = param(0)
    with torch.no_grad():
        fresh.copy_(distribute_tensor(p1, mesh, [Shard(0)]))
    ref = AMS([("late.weight", fresh)], lr=LR, lam=0.0)
    ref.load_state_dict(copy.deepcopy(saved))
    step(ref, fresh, 4)
    out["reload_same"] = torch.equal(p.detach().full_tensor(), fresh.detach().full_tensor())
    torch.manual_seed(5)
    p.grad = distribute_tensor(torch.randn(7, 3), mesh, [Replicate()])
    try:
        opt.step()
    except ValueError as exc:
        out["late_grad"] = str(exc)
    # what is kept between steps goes with the optimizer: a deleted one's state is freed
    q = param(6)
    other = AMS([q], lr=LR, lam=0.0)
    step(other, q, 7)
    state_ref = weakref.ref(other.state[q]["exp_avg"])
    del other
    gc.collect()
    out["state_freed"] = state_ref() is None
    return out


def _size_one_dims(counters: Counters) -> dict:
    """A mesh dimension of one rank splits nothing, so nothing is summed over it: on a
    (2, 1) mesh a param sharded on both dims is all-reduced once (over dim 0), one
    sharded on dim 1 only not at all; both end equal to the oracle (C-Adam, 3 steps)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from sharded_ams import CAdam

    mesh = init_device_mesh("cpu", (2, 1))
    out = {}
    for name, pls in (("both", [Shard(0), Shard(1)]), ("dim1", [Replicate(), Shard(1)])):
        torch.manual_seed(0)
        full = torch.randn(9, 5)
        p = nn.Parameter(distribute_tensor(full, mesh, pls))
        opt = CAdam([p], lr=LR)
        oracle = AMSOracle.start([full], lr=LR, betas=(0.9, 0.999), beta3=0.0, lam=0.0,
                                 eps=1e-8, weight_decay=0.0)
        calls = []
        for _ in range(3):
            g = torch.randn(9, 5)  # the same on every rank (seeded)
            p.grad = distribute_tensor(g, mesh, pls)
            calls.append(counters.step(opt, watch=False)[0])
            oracle.step([g])
        err = float((p.detach().full_tensor().double()
                     - torch.from_numpy(oracle.tensors[0].p)).abs().max())
        out[name] = dict(calls=calls, err=err)
    return out


def _count_batch_orders() -> dict:
    """``CountBatch`` sums each tensor's count with the same tensor's count on the other
    rank however each rank registered them: rank 0 as one vector in key order (summed in
    place), rank 1 in three parts out of order with a param that is not split (no groups:
    its count must stay its own) between two of them."""
    from sharded_ams.dtensor import CountBatch, LocalParam

    rank, world = dist.get_rank(), (dist.group.WORLD,)
    keys = [(0, 0), (0, 1), (0, 2), (1, 0)]

    def lp(key, groups=world):
        return LocalParam(None, None, {}, 0, groups, key)

    value = {k: (i + 1) * 10 ** rank for i, k in enumerate(keys)}  # rank 0: 1..4, 1: 10..40
    batch = CountBatch()
    if rank == 0:
        vec = torch.tensor([value[k] for k in keys])
        batch.add([lp(k) for k in keys], vec)
        views = {k: vec[i:i + 1] for i, k in enumerate(keys)}
    else:
        last, mixed, mid = (torch.tensor([value[(1, 0)]]),
                            torch.tensor([value[(0, 2)], 99, value[(0, 0)]]),
                            torch.tensor([value[(0, 1)]]))
        batch.add([lp((1, 0))], last)
        batch.add([lp((0, 2)), lp((0, 5), groups=()), lp((0, 0))], mixed)
        batch.add([lp((0, 1))], mid)
        views = {(1, 0): last, (0, 2): mixed[0:1], "unsplit": mixed[1:2], (0, 0): mixed[2:3],
                 (0, 1): mid}
    batch.finish()
    return {str(k): int(v) for k, v in views.items()}


#: at N = 3 the cases whose counts cross ranks (and one of each path and precision)
CASES_N3 = ("cadam", "lam-0.5_beta3-0.5", "lam0.3_beta3-0.9_fused", "cadam_foreach",
            "lam-0.5_bf16", "lam-0.5_beta3-0.5_dcp_fused", "grams")


def _cases(n: int) -> tuple[Case, ...]:
    return CASES if n == 2 else tuple(c for c in CASES if c.name in CASES_N3)


def _job(ckpt_dir: str) -> dict:
    import sharded_ams.optimizer as optimizer

    optimizer.COMPILE_MIN_NUMEL = 0  # the default path then compiles tensors >= 32,768
    counters = Counters()
    res = {}
    for c in _cases(dist.get_world_size()):
        t0 = time.perf_counter()
        res[c.name] = _run_case(c, counters, ckpt_dir)
        res[c.name]["seconds"] = time.perf_counter() - t0
    res["errors"] = _layout_errors()
    if dist.get_world_size() == 2:
        res["size_one_dims"] = _size_one_dims(counters)
        res["count_batch"] = _count_batch_orders()
    from torch._dynamo.utils import counters as dynamo_counters

    res["compiled_graphs"] = dynamo_counters["stats"]["unique_graphs"]
    return res


@functools.lru_cache(maxsize=None)
def _results(n: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fsdp_dcp_") as d:
        return run_distributed(_job, n, d, timeout=300)


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp_equals_one_process(n):
    """Every preset, lam and path, uneven shards, both sides of the compile threshold,
    accumulation (with and without sync), bf16, DCP resume: within fp32 rounding of the
    float64 oracle fed the reduced gradient, which equals the independent mean."""
    res = _results(n)
    assert (res[0]["compiled_graphs"] > 0) == (n == 2)  # the compiled cases ran compiled
    for case in _cases(n):
        r = res[0][case.name]
        assert max(r["param_err"]) < TOL, (case.name, r["param_err"])
        assert all(e < 1e-5 for e in r["grad_err"]), (case.name, r["grad_err"])
        assert r["bf16_round"], case.name


@pytest.mark.parametrize("n", [2, 3])
def test_one_count_all_reduce_per_step_and_no_dtensor_dispatch(n):
    """lam not in {1, -1}: exactly one all-reduce per step (the counts of every tensor
    batched); |lam| = 1: none. No DTensor op inside step() once the state exists (the
    kernels step the local shards)."""
    for rank_res in _results(n):
        for case in _cases(n):
            r = rank_res[case.name]
            unit = abs(case.kw.get("lam", -1.0)) == 1.0
            assert r["all_reduce"] == [0 if unit else 1] * STEPS, (case.name, r["all_reduce"])
            # watched on the last step (the first creates the state: DTensors, as DCP
            # needs; the others run compiled, which a dispatch mode would turn off)
            assert r["dispatch"] == [None] * (STEPS - 1) + [0], (case.name, r["dispatch"])


def test_layouts_it_cannot_step_are_named():
    errors = _results(2)[0]["errors"]
    assert "blocks.0.attn.weight" in errors["partial"] and "Partial" in errors["partial"]
    assert "head.weight" in errors["grad"] and "Replicate" in errors["grad"]
    assert errors["untouched"]
    assert "plain.weight" in errors["plain_dtensor_grad"] \
        and "DTensor gradient" in errors["plain_dtensor_grad"]
    # the same after steps that passed the checks (``dtensor.local_param`` keeps them)
    assert "late.weight" in errors["late_grad"] and "Replicate" in errors["late_grad"]


def test_counts_are_summed_tensor_by_tensor_whatever_order_each_rank_registered():
    want = {str(k): 11 * (i + 1) for i, k in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)])}
    r0, r1 = (r["count_batch"] for r in _results(2))
    assert r0 == want
    assert r1 == {**want, "unsplit": 99}


def test_a_mesh_dim_of_one_rank_is_not_summed_over():
    res = _results(2)[0]["size_one_dims"]
    assert res["both"]["calls"] == [1] * 3 and res["dim1"]["calls"] == [0] * 3, res
    assert max(r["err"] for r in res.values()) < TOL, res


def test_state_loaded_into_the_same_optimizer_is_what_the_next_step_reads():
    assert _results(2)[0]["errors"]["reload_same"]


def test_a_deleted_optimizers_state_is_freed():
    assert _results(2)[0]["errors"]["state_freed"]



# ------------------------------------------------------------------ 2-D mesh, 4 ranks
MESH_CASES = {"cadam": dict(lam=0.0),
              "lam-0.5_beta3-0.5_fused": dict(lam=-0.5, beta3=0.5, fused=True),
              "lam0.3_foreach": dict(lam=0.3, foreach=True), "grams": dict(lam=-1.0)}
#: (shape, placements on the (2, 2) mesh): sharded on both dims (uneven), HSDP-like
#: (replicated over dim 0), sharded over dim 0 only, and fully replicated
MESH_PARAMS = (((37, 1030), ("S0", "S1")), ((301, 117), ("R", "S0")), ((9, 4001), ("S1", "R")),
               ((5, 7), ("R", "R")))


def _mesh_job() -> dict:
    """DTensor params on a 2-D mesh: counts summed over each sharded dim's group only."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from sharded_ams import AMS

    mesh = init_device_mesh("cpu", (2, 2))
    place = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    out = {}
    for name, kw in MESH_CASES.items():
        torch.manual_seed(0)
        full = [torch.randn(shape) for shape, _ in MESH_PARAMS]
        pls = [[place[x] for x in pl] for _, pl in MESH_PARAMS]
        params = [nn.Parameter(distribute_tensor(t, mesh, pl)) for t, pl in zip(full, pls)]
        opt = AMS(params, lr=LR, **kw)
        kw = {"beta3": 0.0, **kw}
        oracle = AMSOracle.start(full, lr=LR, betas=(0.9, 0.999), beta3=kw["beta3"],
                                 lam=kw["lam"], eps=1e-8, weight_decay=0.0)
        errs, calls = [], []
        counters = Counters()
        for step in range(3):
            grads = [torch.randn(t.shape) for t in full]  # the same on every rank (seeded)
            for p, g, pl in zip(params, grads, pls):
                p.grad = distribute_tensor(g, mesh, pl)
            calls.append(counters.step(opt, watch=False)[0])
            oracle.step(grads)
            errs.append(max(float((p.detach().full_tensor().double() - torch.from_numpy(o.p))
                                  .abs().max()) for p, o in zip(params, oracle.tensors)))
        dist.all_reduce = counters.orig_all_reduce
        out[name] = dict(err=max(errs), calls=calls)
    return out


def test_dtensor_2d_mesh_counts_over_each_sharded_dim():
    """(2, 2) mesh: Shard on both dims, Shard x Replicate either way, all Replicate; the
    counts are summed over the sharded dims' groups only (a replicated dim summed would
    double them) and equal the float64 oracle on the whole tensors."""
    res = run_distributed(_mesh_job, 4, timeout=240)
    for rank_res in res:
        for name, r in rank_res.items():
            assert r["err"] < TOL, (name, r)
            # one per set of groups: (dim 0, dim 1) -> 2 calls, (dim 1,), (dim 0,)
            assert r["calls"] == [0 if name == "grams" else 4] * 3, (name, r["calls"])
