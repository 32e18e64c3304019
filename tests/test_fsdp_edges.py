"""AMS on FSDP2 params: what a user does to the model between steps, against one process.

16-bit FSDP2 params keep an fp32 master in the optimizer state. A write to the weights
after a step (``model.load_state_dict``, an in-place init or rescale) must be what the
next step starts from, as it is for plain params (``test_optim_conventions``): before, a
DTensor param's master ignored it, so the next step put the old weights back (off by the
whole write) and ``state_dict()`` saved the stale masters. Two kinds of write are checked,
because they bump different version counters: an in-place DTensor op (a model's
``load_state_dict``) bumps only the DTensor's, a write to ``to_local()`` only the local
shard's.

One spawn of 2 gloo ranks, each case a bf16 model sharded by ``fully_shard`` (a (1, 7)
weight and a (1,) bias: empty shards on rank 1) and the same model unsharded, both stepped
by AMS on the same gradients (set directly, so the comparison is exact, not bf16 forward
noise), lam = -0.5 and C-Adam (counts summed across ranks) and Grams, each path.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from torch import nn

from dist_utils import run_distributed

LR = 3e-2
CASES = {"lam-0.5_beta3-0.5": dict(lam=-0.5, beta3=0.5, weight_decay=0.1),
         "cadam_fused": dict(lam=0.0, fused=True),
         "grams_foreach": dict(lam=-1.0, foreach=True)}


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 1)).to(torch.bfloat16)


def _written_weights(kw: dict) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from sharded_ams import AMS

    ref = _model(0)
    model = copy.deepcopy(ref)
    fully_shard(model[0])
    fully_shard(model)
    opt, ropt = AMS(model.parameters(), lr=LR, **kw), AMS(ref.parameters(), lr=LR, **kw)
    params, rparams = list(model.parameters()), list(ref.parameters())

    def step(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p, q in zip(params, rparams):
            q.grad = torch.randn(q.shape, generator=gen).to(torch.bfloat16)
            p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements)
        opt.step()
        ropt.step()

    def err(a: list, b: list) -> float:
        return max(float((x.detach().full_tensor().float() - y.detach().float()).abs().max())
                   for x, y in zip(a, b))

    def masters(o) -> list:
        st = o.state_dict()["state"]
        return [st[i]["master"] for i in range(len(params))]

    out = {}
    step(1)
    step(2)
    # a model load (DTensor copy_: the DTensor's version) of other weights
    loaded = _model(5).state_dict()
    ref.load_state_dict(loaded)
    model.load_state_dict({k: distribute_tensor(v, p.device_mesh, p.placements)
                           for (k, v), p in zip(loaded.items(), params)})
    step(3)
    out["after_load"] = err(params, rparams)
    # a write to the local shards (their version only), then a save before any step
    with torch.no_grad():
        for p, q in zip(params, rparams):
            p.to_local().mul_(0.5)
            q.mul_(0.5)
    saved = masters(opt)
    out["saved_masters"] = err(saved, masters(ropt))
    out["saved_masters_are_the_weights"] = err(saved, [p.to(torch.float32) for p in rparams])
    step(4)
    step(5)
    out["after_local_write"] = err(params, rparams)
    out["masters"] = err(masters(opt), masters(ropt))
    return out


def _cross_loads() -> list:
    """An FSDP2 optimizer's state_dict (DTensor state) into AMS over plain params, and the
    reverse: refused at load, naming the param (before: an unclear error at step)."""
    from torch.distributed.fsdp import fully_shard

    from sharded_ams import AMS

    ref = _model(0)
    model = copy.deepcopy(ref)
    fully_shard(model)
    opts = [AMS(m.parameters(), lr=LR) for m in (model, ref)]
    for m, o in zip((model, ref), opts):
        m(torch.randn(2, 5, dtype=torch.bfloat16)).float().sum().backward()
        o.step()
    msgs = []
    for src, dst in ((opts[0], opts[1]), (opts[1], opts[0])):
        try:
            dst.load_state_dict(src.state_dict())
            msgs.append(None)
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def _job() -> dict:
    os.environ["SHARDED_AMS_NO_COMPILE"] = "1"  # the eager / _foreach paths: no cold compile
    return {**{name: _written_weights(kw) for name, kw in CASES.items()},
            "cross_loads": _cross_loads()}


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_distributed(_job, 2, timeout=240)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_fsdp_masters_follow_weights_written_between_steps(case):
    """The sharded run equals the unsharded one after a model load and after a write to
    the local shards (its fp32 masters too, in a save taken before the next step); the old
    masters put back would be off by the whole write (~0.2 to 3)."""
    for rank_res in _results():
        r = rank_res[case]
        assert max(r.values()) < 1e-6, r


def test_state_of_another_sharding_is_refused_at_load():
    for rank_res in _results():
        into_plain, into_fsdp = rank_res["cross_loads"]
        assert into_plain and "is a DTensor, the param is a plain tensor" in into_plain
        assert into_fsdp and "is a plain tensor, the param is a DTensor" in into_fsdp
        assert "State 'exp_avg' of param 0" in into_plain and "get/set_optimizer_state_dict" in into_fsdp


_IMPORT_CHECK = """
import sys, tempfile
import torch
import sharded_ams, launcher.run.driver, launcher.train.loop
from sharded_ams.dtensor import is_dtensor
assert not is_dtensor(torch.zeros(2))
late = sorted(m for m in ("torch.distributed.tensor", "sympy") if m in sys.modules)
assert not late, f"imported by sharded_ams and the launcher's worker and driver: {late}"
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor, init_device_mesh
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
d = distribute_tensor(torch.zeros(4), init_device_mesh("cpu", (1,)))
assert is_dtensor(d) and not is_dtensor(d.to_local())
dist.destroy_process_group()
"""


def test_plain_runs_do_not_import_dtensor_and_late_dtensors_are_seen():
    """Importing sharded_ams (and the launcher's driver and worker loop) does not import
    torch.distributed.tensor, which costs every process ~1.3 s of CPU (it pulls in sympy);
    ``is_dtensor`` still recognises a DTensor made after it answered False for plain
    tensors (FSDP2 imported later)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
