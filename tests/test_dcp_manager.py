"""``CheckpointManager`` with DCP checkpoints: an optimizer only DCP holds (an ``AMS`` on
FSDP2 params, a plain ``AMS``, a ShardedAMS with tensor-parallel params) is saved in DCP
format by default, under the same retention and writer lock as the native format, and
``load_latest`` loads the newest loadable one of either format, falling back past a
corrupt one. Two gloo ranks with FSDP2 (one job), and one process."""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch
from torch import nn

from dist_utils import run_distributed


def _fsdp_pair(seed: int):
    from torch.distributed.fsdp import fully_shard

    from sharded_ams import AMS

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, AMS(model.parameters(), lr=1e-2, lam=0.0)


def _local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _state(model, opt) -> dict:
    """This rank's shards of the params and of every optimizer state tensor."""
    out = {n: _local(p) for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        out.update({f"{names[p]}.{k}": _local(v) for k, v in st.items()})
    return out


def _step(model, opt, seed: int) -> None:
    torch.manual_seed(100 + seed)
    model(torch.randn(4, model[0].in_features)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _job(root: str) -> dict:
    import torch.distributed as dist

    from sharded_ams.checkpoint import DCP_FORMAT, CheckpointManager, manifest_format

    warnings.simplefilter("ignore")
    rank = dist.get_rank()
    model, opt = _fsdp_pair(0)
    saved = {}
    with CheckpointManager(root, keep_last=2) as mgr:  # one writer lock: rank 0's
        for step in (1, 2, 3):
            _step(model, opt, step)
            handle = mgr.save(step, opt, model=model)
            saved[step] = _state(model, opt)
            assert handle.done() and handle.wait() == mgr.path_for(step)
    dist.barrier()
    dirs = sorted(os.listdir(root))
    formats = {d: manifest_format(os.path.join(root, d)) == DCP_FORMAT for d in dirs
               if d.startswith("step-")}
    dist.barrier()
    if rank == 0:  # a byte of the newest checkpoint's rank-1 file (its size unchanged)
        with open(os.path.join(root, "step-00000003", "__1_0.distcp"), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    fresh, fopt = _fsdp_pair(1)
    res = CheckpointManager(root).load_latest(fopt, model=fresh)
    got = _state(fresh, fopt)
    same = got.keys() == saved[2].keys() and all(torch.equal(got[k], saved[2][k]) for k in got)
    _step(fresh, fopt, 9)  # and it trains on
    return {"dirs": dirs, "formats": formats, "step": res["step"], "path": str(res["path"]),
            "same": same}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_job, 2, str(tmp_path_factory.mktemp("mgr")), timeout=180)


def test_fsdp_runs_save_dcp_keep_the_newest_and_resume_past_a_corrupt_one(results):
    for r in results:
        assert [d for d in r["dirs"] if d.startswith("step-")] == ["step-00000002",
                                                                   "step-00000003"], r["dirs"]
        assert all(r["formats"].values()), r["formats"]
        assert r["step"] == 2 and r["path"].endswith("step-00000002")
        assert r["same"]  # bitwise: params, moments, steps, on each rank's shards


def test_one_process_ams_and_the_refusals(tmp_path):
    from sharded_ams import AMS
    from sharded_ams.checkpoint import DCP_FORMAT, CheckpointManager, manifest_format
    from sharded_ams.checkpoint.manager import default_format

    def pair(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
        return model, AMS(model.parameters(), lr=1e-2, lam=0.0)

    model, opt = pair(0)
    with warnings.catch_warnings(), CheckpointManager(tmp_path, keep_last=1) as mgr:
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        with pytest.raises(ValueError, match="pass model="):
            mgr.save(1, opt)
        with pytest.raises(ValueError, match="async_save"):
            mgr.save(1, opt, model=model, async_save=True)
        with pytest.raises(ValueError, match="format must be"):
            mgr.save(1, opt, model=model, format="torch")
        for step in (1, 2):
            _step(model, opt, step)
            mgr.save(step, opt, model=model)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000002"]
        assert manifest_format(tmp_path / "step-00000002") == DCP_FORMAT
        fresh, fopt = pair(1)
        with pytest.raises(ValueError, match="DCP checkpoint: it loads into the model too"):
            mgr.load_latest(fopt)
        assert mgr.load_latest(fopt, model=fresh)["step"] == 2
    want, got = _state(model, opt), _state(fresh, fopt)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    tp = types.SimpleNamespace(shards=[], mp=types.SimpleNamespace(active=True))
    plain = types.SimpleNamespace(shards=[], mp=types.SimpleNamespace(active=False))
    assert [default_format(o) for o in (opt, tp, plain)] == ["dcp", "dcp", "native"]
