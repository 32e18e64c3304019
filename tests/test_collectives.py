"""The collective paths (``ShardedAMS(collectives=...)``) and what must hold on both.

Pure functions (no processes): which path ``"auto"`` picks per backend, which reduce op
averages (NCCL's AVG, else a division before a sum), how a backend is resolved from a
mixed config string.

One N = 2 job, its world group made by ``init_process_group()`` without a backend (it
reports "undefined"), runs on both paths:

* the backend resolves to gloo for CPU buffers there and in a "cpu:gloo,cuda:gloo" group,
  so bucketing and overlap stay on;
* the ``p.grad`` contract: None after ``step()``; training that never calls ``zero_grad``
  equals training that does, and both equal AMS on the independently averaged gradients;
* a second optimizer built on the same params while the first one's param all-gather is
  still pending waits for it (gathers are made to land late, in ``wait()``, as on NCCL);
* a check that fails on one rank only (a second backward, a forward that bypassed the
  param gather, a sparse gradient in a hook or in ``step()``'s check) gives a clear error
  on EVERY rank in that ``step()``, nothing is updated, and training can go on.
"""

from __future__ import annotations

import datetime
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_utils import run_distributed
from sharded_ams import ShardedAMS
from sharded_ams.collectives import (Comm, choose_path, parse_backend_config, reduce_plan,
                                     resolve_backend)
from sharded_ams.layout import default_bucket_numel

from sharded_common import (PATHS, GradRecorder, ams_kwargs, compare_params, means_per_step,
                            gather_to_rank0, make_mlp, mlp_batch, replay, snapshot, trainable)

WORLD = 2


# --------------------------------------------------------------------------- no processes
def test_auto_path_per_backend():
    assert choose_path("auto", "gloo") == "all_reduce"
    assert choose_path("auto", "nccl") == "reduce_scatter"
    assert choose_path("reduce_scatter", "gloo") == "reduce_scatter"
    assert choose_path("all_reduce", "nccl") == "all_reduce"
    with pytest.raises(ValueError, match="Invalid collectives"):
        choose_path("ring", "gloo")
    with pytest.raises(ValueError, match="Invalid collectives"):
        ShardedAMS(nn.Linear(2, 2), collectives="nccl")


def test_reduce_op_avg_on_nccl_division_elsewhere(monkeypatch):
    """NCCL averages in the collective (no pass dividing the bucket); gloo, which has no
    AVG for every collective on every torch version, divides by N before a sum."""
    assert reduce_plan("nccl") == (dist.ReduceOp.AVG, False)
    assert reduce_plan("gloo") == (dist.ReduceOp.SUM, True)
    import sharded_ams.collectives as C

    seen = []
    monkeypatch.setattr(C, "_reduce_scatter", lambda out, inp, op, group, async_op:
                        seen.append(("reduce_scatter", op)) or C._Done())
    monkeypatch.setattr(C.dist, "all_reduce", lambda t, op, group, async_op:
                        seen.append(("all_reduce", op)) or C._Done())
    for backend, path in (("nccl", "reduce_scatter"), ("gloo", "reduce_scatter"),
                          ("gloo", "all_reduce"), ("nccl", "all_reduce")):
        comm = _pretend(backend, path, world_size=4)
        bucket = torch.full((8,), 2.0)
        comm.average_grads(bucket, bucket[:2])
        op, divided = seen[-1][1], bool((bucket == 0.5).all())
        assert seen[-1][0] == path
        assert (op, divided) == ((dist.ReduceOp.AVG, False) if backend == "nccl"
                                 else (dist.ReduceOp.SUM, True)), (backend, path)


def _pretend(backend: str, path: str, world_size: int) -> Comm:
    """A Comm set up as on ``backend`` without a process group (its plan, not its I/O)."""
    comm = Comm()
    comm.active, comm.world_size, comm.backend = True, world_size, backend
    comm.path = choose_path(path, backend)
    comm.reduce_op, comm.predivide = reduce_plan(backend)
    return comm


def test_parse_backend_config():
    assert parse_backend_config("cpu:gloo,cuda:nccl", "cuda") == "nccl"
    assert parse_backend_config("cpu:gloo,cuda:nccl", "cpu") == "gloo"
    assert parse_backend_config("cpu:gloo", "cuda") is None
    assert parse_backend_config("nccl", "cuda") == "nccl"
    assert parse_backend_config("undefined", "cpu") is None


# --------------------------------------------------------------------------- the N = 2 job
def _backend_checks() -> dict:
    """The world group ("undefined") and a mixed-string group resolve to gloo for CPU
    buffers: the gloo bucket size and overlap apply, and a step runs."""
    out = {"world_reports": dist.get_backend()}
    mixed = dist.new_group([0, 1], backend="cpu:gloo,cuda:gloo")
    out["mixed_reports"] = dist.get_backend(mixed)
    for name, group in (("world", None), ("mixed", mixed)):
        model = make_mlp()
        opt = ShardedAMS(model, process_group=group, backend="eager")
        F.mse_loss(model(mlp_batch(0)[0]), mlp_batch(0)[1]).backward()
        opt.step()
        opt.finish_param_sync()
        out[name] = dict(backend=opt.comm.backend, resolved=resolve_backend(group, opt.device),
                         path=opt.comm.path, bucket_numel=opt.bucket_numel,
                         overlap=opt.overlap, calls=dict(opt.comm.calls))
    return out


def _grad_contract(path: str) -> dict:
    """p.grad after step() on ``path``: None; never calling zero_grad trains exactly as
    calling it (an extra param is used on even steps only: on odd steps it must count
    as zero); both equal AMS on the independently averaged gradients."""
    finals, none_after_step = [], []
    local = None
    for use_zero_grad in (True, False):
        model = make_mlp()
        extra = nn.Parameter(torch.linspace(-1, 1, 5))
        params = trainable(model) + [extra]
        opt = ShardedAMS(params, module=model, preset="adamw", lr=1e-2, weight_decay=0.1,
                         backend="eager", collectives=path)
        rec = GradRecorder(params)
        init = [p.detach().clone() for p in params]
        grads = []
        for step in range(6):
            x, y = mlp_batch(step)
            loss = F.mse_loss(model(x), y)
            if step % 2 == 0:
                loss = loss + extra.square().sum()
            loss.backward()
            opt.step()
            none_after_step.append(all(p.grad is None for p in params))
            grads.append(rec.pop())
            if use_zero_grad:
                opt.zero_grad()
        opt.finish_param_sync()
        finals.append({**snapshot(model), "extra": extra.detach().clone()})
        local = grads
    out = dict(none_after_step=none_after_step, same=compare_params(finals[0], finals[1]))
    everyone = gather_to_rank0(local)
    if everyone is not None:
        ref = make_mlp(seed=1)
        ref_extra = nn.Parameter(init[-1].clone())
        kw = ams_kwargs(dict(preset="adamw", lr=1e-2, weight_decay=0.1))
        replay(ref, dict(zip(dict(model.named_parameters()), init)), means_per_step(everyone),
               params=trainable(ref) + [ref_extra], **kw)
        out["replay"] = compare_params({**snapshot(ref), "extra": ref_extra.detach()},
                                       finals[1])
    return out


class _LateGather:
    """A gather whose data lands in the bucket only in ``wait()``: what NCCL allows (the
    copy runs on its stream whenever it runs), made deterministic."""

    def __init__(self, handle, tmp: torch.Tensor, bucket: torch.Tensor):
        self.handle, self.tmp, self.bucket = handle, tmp, bucket

    def wait(self) -> bool:
        self.handle.wait()
        self.bucket.copy_(self.tmp)
        return True


def _make_gathers_late(opt: ShardedAMS) -> None:
    real = opt.comm.gather_params

    def late(bucket: torch.Tensor, shard: torch.Tensor):
        tmp = bucket.clone()
        lo = shard.data_ptr() // shard.element_size() - bucket.data_ptr() // bucket.element_size()
        return _LateGather(real(tmp, tmp[lo:lo + shard.numel()]), tmp, bucket)

    opt.comm.gather_params = late


def _second_optimizer(path: str) -> dict:
    """A new ShardedAMS on params whose all-gather (from the old one's step) is pending:
    it must start from the gathered values, as if the gather had been waited for."""
    finals = []
    for wait_first in (True, False):
        model = make_mlp()
        init = snapshot(model)
        first = ShardedAMS(model, backend="eager", lr=0.1, collectives=path)
        _make_gathers_late(first)
        x, y = mlp_batch(0)
        F.mse_loss(model(x), y).backward()
        first.step()
        pending = first._sync._gathers_pending
        if wait_first:
            first.finish_param_sync()
        second = ShardedAMS(model, backend="eager", lr=0.1, collectives=path)
        second.finish_param_sync()
        finals.append(snapshot(model))
    return dict(pending=pending, same=compare_params(finals[0], finals[1]),
                moved=not compare_params(finals[0], init)["equal"],
                everyone=gather_to_rank0(finals[1]))


def _one_rank_fails(path: str) -> dict:
    """Each case: rank 1 alone does something a check refuses; both ranks call step()
    (every rank must raise there, not hang), then train one clean step together."""
    rank = dist.get_rank()
    out = {}
    for case, kw in (("twice", {}), ("stale", {}), ("sparse_hook", {}),
                     ("sparse_step", dict(overlap=False)),
                     ("twice_nonorm", dict(skip_nonfinite=False))):
        model = _Net()
        opt = ShardedAMS(model, backend="eager", lr=0.1, bucket_numel=1, collectives=path, **kw)
        _clean_step(model, opt)  # its gathers stay pending (the "stale" case needs that)
        before = _state(opt)
        _FAULTS[case.replace("_nonorm", "")](model, opt, rank == 1)
        try:
            opt.step()
            err = ""
        except RuntimeError as exc:
            err = str(exc)
        unchanged = compare_params(_state(opt), before)["equal"]
        opt.zero_grad()
        _clean_step(model, opt)
        opt.finish_param_sync()
        out[case] = dict(error=err, unchanged=unchanged, after=gather_to_rank0(snapshot(model)))
    return out


def _state(opt: ShardedAMS) -> dict:
    """The optimizer's state and step count (the params follow from them; reading the
    params themselves would wait for the pending gathers)."""
    out = {f"{i}.{k}": t.clone() for i, sh in enumerate(opt.shards) for k, t in sh.state.items()}
    out["step"] = opt.param_groups[0]["step"].clone()
    return out


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Parameter(torch.randn(6, 4))
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, idx, bypass: bool = False, sparse: bool = False):
        h = F.embedding(idx, self.emb, sparse=sparse)
        h = F.linear(h, self.lin.weight, self.lin.bias) if bypass else self.lin(h)
        return self.head(h).square().mean()


def _batch() -> torch.Tensor:
    return torch.tensor([1, 2, 3]) + dist.get_rank()


def _clean_step(model: _Net, opt: ShardedAMS) -> None:
    model(_batch()).backward()
    opt.step()


def _twice(model, opt, faulty):
    model(_batch()).backward()
    if faulty:  # a second backward without no_sync: its buckets were reduced already
        model(_batch()).backward()


def _stale(model, opt, faulty):
    model(_batch(), bypass=faulty).backward()  # reads lin without its pre-hook's wait


def _sparse_hook(model, opt, faulty):
    model(_batch(), sparse=faulty).backward()  # a sparse gradient reaches the hooks


def _sparse_step(model, opt, faulty):
    model(_batch()).backward()
    if faulty:  # found by step()'s check of the params backward did not hand over
        model.emb.grad = torch.ones(6, 4).to_sparse()


_FAULTS: dict[str, Callable] = {"twice": _twice, "stale": _stale, "sparse_hook": _sparse_hook,
                                "sparse_step": _sparse_step}


def collectives_job() -> dict:
    dist.init_process_group(timeout=datetime.timedelta(seconds=60))  # no backend: "undefined"
    out = {"backend": _backend_checks()}
    for path in PATHS:
        out[path] = dict(grad=_grad_contract(path), second=_second_optimizer(path),
                         fails=_one_rank_fails(path))
    return out


def _job() -> list:
    if "job" not in _JOB:
        _JOB["job"] = run_distributed(collectives_job, WORLD, init_process_group=False,
                                      timeout=240)
    return _JOB["job"]


_JOB: dict = {}


@pytest.mark.slow
def test_backend_resolved_from_the_device():
    for r in _job():
        b = r["backend"]
        assert b["world_reports"] == "undefined" and b["mixed_reports"] == "cpu:gloo,cuda:gloo"
        for name in ("world", "mixed"):
            g = b[name]
            assert g["backend"] == g["resolved"] == "gloo", g
            assert g["path"] == "all_reduce" and g["overlap"]
            assert g["bucket_numel"] == default_bucket_numel("gloo", 2), g
            assert g["calls"].get("all_reduce") == 1, g["calls"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_grad_is_none_after_step_and_accumulation_starts_afresh(path):
    res = [r[path]["grad"] for r in _job()]
    for r in res:
        assert all(r["none_after_step"])
        assert r["same"]["equal"], r["same"]
    assert res[0]["replay"]["equal"], res[0]["replay"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_second_optimizer_waits_for_the_pending_gather(path):
    res = [r[path]["second"] for r in _job()]
    for r in res:
        assert r["pending"] and r["moved"]
        assert r["same"]["equal"], r["same"]
    everyone = res[0]["everyone"]
    assert all(compare_params(e, everyone[0])["equal"] for e in everyone)


EXPECTED = {"twice": "after its bucket's reduction had started",
            "twice_nonorm": "after its bucket's reduction had started",
            "stale": "while its all-gather from the last step was still pending",
            "sparse_hook": "does not support sparse gradients (parameter 'emb')",
            "sparse_step": "does not support sparse gradients (parameter 'emb')"}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_one_rank_failing_raises_on_every_rank(path):
    r0, r1 = (r[path]["fails"] for r in _job())
    for case, what in EXPECTED.items():
        assert what in r1[case]["error"] and "[rank 1; 1 rank(s) failed" in r1[case]["error"], \
            (case, r1[case]["error"])
        assert "1 other rank(s) failed" in r0[case]["error"] and "rank 0 raises" in \
            r0[case]["error"], (case, r0[case]["error"])
        assert r0[case]["unchanged"] and r1[case]["unchanged"], case
        after = r0[case]["after"]  # the next step ran on both ranks and agrees
        assert compare_params(after[0], after[1])["equal"], case
