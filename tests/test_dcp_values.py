"""DCP checkpoints refuse unsound values as the native format does (``values.py``):
``load_dcp`` (FSDP2 AMS and ShardedAMS, 2 gloo ranks), ``consolidate`` and ``ckpt convert
--to zero1`` refuse a master or moment holding NaN/inf and a negative ``exp_avg_sq``
(``kind="values"``, naming the param and state key) unless ``allow_nonfinite=True``;
every rank raises it, and a refused load leaves nothing that a good checkpoint's load does
not overwrite. Consolidation and conversion take the groups' hyperparameters from the
checked manifest, as ``load_dcp`` does, not from the data files' copies. DCP's refusals
use the native format's kinds (``save_failed``, ``model_mismatch``,
``optimizer_mismatch``).

The unsound state is planted in the optimizer before ``save_dcp``, so each checkpoint is
committed and checksummed like any other."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

from dist_utils import run_distributed

PLANT = {"master": float("nan"), "exp_avg_sq": -1.0}


def _pair(kind: str, seed: int, trained: bool = True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    if kind == "zero1":
        from sharded_ams import ShardedAMS

        opt = ShardedAMS(model, backend="eager", lr=1e-2)
    else:
        from torch.distributed.fsdp import fully_shard

        from sharded_ams import AMS

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = AMS(model.parameters(), lr=1e-2, lam=0.0)
    if trained:
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _local(value) -> list:
    """This rank's non-empty tensors of a state-dict value (Chunks boxes, a DTensor's
    local shard, a tensor)."""
    if isinstance(getattr(value, "pieces", None), dict):
        parts = list(value.pieces.values())
    else:
        parts = [value.to_local() if hasattr(value, "to_local") else value]
    return [t for t in parts if t.numel()]


def _plant(model, opt, key: str):
    """PLANT[key] into the first element this rank holds of the first param it holds any
    of (``master``: the fp32 weight): the name of that param."""
    from sharded_ams.checkpoint.dcp import dcp_state_dict

    sd = dcp_state_dict(model, opt)
    for name in (n for g in sd["optim"]["param_groups"] for n in g["params"]):
        parts = _local(sd["model"][name] if key == "master" else sd["optim"]["state"][name][key])
        if parts:
            with torch.no_grad():
                parts[0][(0,) * parts[0].dim()] = PLANT[key]
            return name
    raise AssertionError("this rank holds nothing")


def _snapshot(model, opt) -> dict:
    from sharded_ams.checkpoint.dcp import dcp_state_dict

    sd = dcp_state_dict(model, opt)
    out = {f"model.{k}": [t.clone() for t in _local(v)] for k, v in sd["model"].items()}
    for n, st in sd["optim"]["state"].items():
        out.update({f"{n}.{k}": [t.clone() for t in _local(v)] for k, v in st.items()})
    return out


def _job(root: str) -> dict:
    import torch.distributed as dist

    from sharded_ams.checkpoint import CheckpointError, load_dcp, save_dcp

    warnings.simplefilter("ignore")
    rank, out = dist.get_rank(), {}
    for kind in ("zero1", "fsdp"):
        good = os.path.join(root, kind, "good")
        save_dcp(good, *_pair(kind, 0), step=1)
        for key in PLANT:
            path = os.path.join(root, kind, key)
            model, opt = _pair(kind, 0)
            name = _plant(model, opt, key) if rank == 1 else None  # rank 1's shard only
            save_dcp(path, model, opt, step=1)
            model, opt = _pair(kind, 1)
            try:
                load_dcp(path, model, opt)
                refused = None
            except CheckpointError as exc:
                refused = (exc.kind, exc.field, str(exc))
            # a good checkpoint loaded over the refused one: as into a fresh optimizer
            load_dcp(good, model, opt)
            fresh = _pair(kind, 2)
            load_dcp(good, *fresh)
            a, b = _snapshot(model, opt), _snapshot(*fresh)
            same = a.keys() == b.keys() and all(
                len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                for k in a)
            model, opt = _pair(kind, 1)
            load_dcp(path, model, opt, allow_nonfinite=True)
            planted = None
            if rank == 1:  # the planted element, loaded as it was
                from sharded_ams.checkpoint.dcp import dcp_state_dict

                sd = dcp_state_dict(model, opt)
                v = sd["model"][name] if key == "master" else sd["optim"]["state"][name][key]
                t = _local(v)[0]
                planted = float(t[(0,) * t.dim()])
            out[(kind, key)] = {"name": name, "refused": refused, "same": same,
                                "planted": planted}
    return out


@pytest.fixture(scope="module")
def values_root(tmp_path_factory):
    return tmp_path_factory.mktemp("values")


@pytest.fixture(scope="module")
def results(values_root):
    return run_distributed(_job, 2, str(values_root), timeout=240)


@pytest.mark.parametrize("kind", ["zero1", "fsdp"])
@pytest.mark.parametrize("key", list(PLANT))
def test_load_dcp_refuses_unsound_values_on_every_rank(results, kind, key):
    r0, r1 = results[0][(kind, key)], results[1][(kind, key)]
    name = r1["name"]
    field = f"model.{name}" if key == "master" else f"optim.state.{name}.{key}"
    assert r0["refused"] is not None and r1["refused"] is not None, (r0, r1)
    (k0, f0, m0), (k1, f1, m1) = r0["refused"], r1["refused"]
    assert (k0, f0) == (k1, f1) == ("values", field), (r0, r1)
    what = "non-finite" if key == "master" else "negative values"
    assert repr(name) in m1 and what in m1 and "allow_nonfinite=True" in m1
    assert m0 == f"(reported by rank 1) {m1}"  # rank 0 loaded none of it: agreed
    assert r0["same"] and r1["same"]  # a good checkpoint's load overwrites every element
    got = r1["planted"]  # allow_nonfinite=True loads it as saved
    assert math.isnan(got) if key == "master" else got == -1.0


@pytest.mark.parametrize("kind", ["zero1", "fsdp"])
def test_inspect_lists_what_a_load_refuses(results, values_root, kind, capsys):
    """``ckpt inspect`` of a DCP checkpoint reads every master and moment (one stored chunk
    at a time) and lists each field a load refuses, as it does for the native format: the
    planted one only, counted over its chunks; a sound checkpoint is valid, none listed."""
    from launcher.commands.ckpt import inspect_checkpoint, main

    for key in PLANT:
        name = results[1][(kind, key)]["name"]
        field = f"model.{name}" if key == "master" else f"optim.state.{name}.{key}"
        info = inspect_checkpoint(str(values_root / kind / key))
        assert not info["valid"] and field in info["reason"], info["reason"]
        (p,) = info["unsound_values"]
        assert (p["field"], p["param"], p["nonfinite"], p["negative"]) == (
            field, name, int(key == "master"), int(key == "exp_avg_sq")), p
        assert main(["inspect", str(values_root / kind / key)]) == 1
        assert f"{field}: {int(key == 'master')} NaN/inf" in capsys.readouterr().out
    good = inspect_checkpoint(str(values_root / kind / "good"))
    assert good["valid"] and good["unsound_values"] == [], good


# ---------------------------------------------------------------- one process, plain AMS
def _ams(seed: int = 0, groups: int = 1, beta3: float = 0.0):
    from sharded_ams import AMS

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    params = list(model.parameters())
    pg = [{"params": params}] if groups == 1 else [{"params": params[:2]}, {"params": params[2:]}]
    opt = AMS(pg, lr=1e-2, lam=0.0, beta3=beta3)
    model(torch.randn(3, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        yield


@pytest.mark.parametrize("key", ["master", "exp_avg", "exp_avg_sq"])
def test_consolidate_and_convert_refuse_unsound_values(tmp_path, key):
    from launcher.commands.ckpt import inspect_checkpoint
    from sharded_ams.checkpoint import CheckpointError, consolidate, save_dcp
    from sharded_ams.checkpoint.convert import to_zero1

    model, opt = _ams()
    p = model[2].weight
    with torch.no_grad():
        if key == "master":
            p[0, 1] = float("inf")
        else:
            opt.state[p][key][0, 1] = -1.0 if key == "exp_avg_sq" else float("nan")
    path = save_dcp(tmp_path / "ckpt", model, opt, step=1)
    field = "model.2.weight" if key == "master" else f"optim.state.2.weight.{key}"
    for fn in (consolidate, lambda src: to_zero1(src, tmp_path / "z")):
        with pytest.raises(CheckpointError) as ei:
            fn(path)
        assert (ei.value.kind, ei.value.field) == ("values", field), str(ei.value)
        assert "'2.weight'" in str(ei.value)
    (p,) = inspect_checkpoint(str(path))["unsound_values"]
    assert (p["field"], p["nonfinite"] + p["negative"]) == (field, 1), p
    full = consolidate(path, allow_nonfinite=True)
    bad = full["model"]["2.weight"] if key == "master" else full["optimizer"]["state"][2][key]
    assert not torch.isfinite(bad).all() or bad.min() < 0
    assert to_zero1(path, tmp_path / "z", allow_nonfinite=True)["step"] == 1


def test_a_negative_moment_elsewhere_is_not_refused(tmp_path):
    """Only the second moment is never negative (a first moment often is)."""
    from sharded_ams.checkpoint import consolidate, save_dcp

    model, opt = _ams()
    with torch.no_grad():
        opt.state[model[0].weight]["exp_avg"][0, 0] = -3.0
    path = save_dcp(tmp_path / "ckpt", model, opt, step=1)
    assert consolidate(path)["optimizer"]["state"][0]["exp_avg"][0, 0] == -3.0
    from launcher.commands.ckpt import inspect_checkpoint

    info = inspect_checkpoint(str(path))
    assert info["valid"] and info["unsound_values"] == [], info


def test_consolidate_and_convert_take_hyperparameters_from_the_manifest(tmp_path):
    """Data files whose param groups differ from the manifest's (a tensor lr, another
    weight decay): their values reach neither output, as ``load_dcp`` never reads them."""
    from sharded_ams.checkpoint import consolidate, read_manifest
    from sharded_ams.checkpoint.dcp import _groups_of, dcp_state_dict, tied_keys, write_dcp_state
    from sharded_ams.checkpoint.convert import to_zero1

    model, opt = _ams()
    sd = dcp_state_dict(model, opt)
    for g in sd["optim"]["param_groups"]:
        g.update(lr=torch.tensor(0.5), weight_decay=0.25)
    path = write_dcp_state(tmp_path / "ckpt", sd, step=1, extra=None, scheduler_state=None,
                           mesh=None, groups=_groups_of(opt, 1), tied=tied_keys(model))
    (g,) = consolidate(path)["optimizer"]["param_groups"]
    assert type(g["lr"]) is float and g["lr"] == 1e-2 and g["weight_decay"] == 0.0, g
    to_zero1(path, tmp_path / "z")
    (z,) = read_manifest(tmp_path / "z").param_groups
    assert (z["lr"], z["weight_decay"]) == (1e-2, 0.0), z


def test_param_groups_of_files_and_manifest_must_agree_in_number(tmp_path):
    from sharded_ams.checkpoint import CheckpointError, consolidate
    from sharded_ams.checkpoint.dcp import _groups_of, dcp_state_dict, write_dcp_state

    model, opt = _ams()
    path = write_dcp_state(tmp_path / "ckpt", dcp_state_dict(model, opt), step=1, extra=None,
                           scheduler_state=None, mesh=None, groups=_groups_of(opt, 1) * 2)
    with pytest.raises(CheckpointError) as ei:
        consolidate(path)
    assert ei.value.kind == "corrupt" and "param groups" in str(ei.value)


def test_dcp_refusals_use_the_native_kinds(tmp_path):
    """A save into a checkpoint: ``save_failed`` (nothing committed), as the native save's
    refusals; another model: ``model_mismatch``; other state keys (beta3 > 0) or another
    number of param groups: ``optimizer_mismatch``. Every kind is a documented one."""
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import CheckpointError, load_dcp, save_dcp
    from sharded_ams.checkpoint import format as fmt

    model, opt = _ams()
    path = save_dcp(tmp_path / "ckpt", model, opt, step=1)
    kinds = {}
    with pytest.raises(CheckpointError) as ei:
        save_dcp(path, model, opt, step=2)
    kinds["save"] = ei.value.kind
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    from sharded_ams import AMS

    cases = {"model": (wide, AMS(wide.parameters(), lr=1e-2, lam=0.0)),
             "beta3": _ams(beta3=0.9), "groups": _ams(groups=2)}
    zm = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    zparams = list(zm.named_parameters())
    cases["zero1 groups"] = (zm, ShardedAMS([{"params": [p for _, p in zparams[:2]]},
                                             {"params": [p for _, p in zparams[2:]]}],
                                            module=zm, backend="eager", lr=1e-2))
    for what, (m, o) in cases.items():
        with pytest.raises(CheckpointError) as ei:
            load_dcp(path, m, o)
        kinds[what] = ei.value.kind
    assert kinds == {"save": "save_failed", "model": "model_mismatch",
                     "beta3": "optimizer_mismatch", "groups": "optimizer_mismatch",
                     "zero1 groups": "optimizer_mismatch"}, kinds
    documented = fmt.CheckpointError.__doc__
    assert all(f'``"{k}"``' in documented for k in kinds.values())
