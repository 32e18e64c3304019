"""DCP checkpoints converted to and from the native (ZeRO-1) format, bitwise both ways
(``sharded-ams ckpt convert``, ``consolidate``), tied weights kept tied, a param without
optimizer state, and each rank's RNG states saved beside its DCP shard."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from dcp_common import rehash, trained
from sharded_ams import AMS
from sharded_ams.checkpoint import CheckpointError, load_dcp, save_dcp


def _native(path):
    """A ZeRO-1 checkpoint of one process: bf16 params (fp32 masters), a buffer, beta3 > 0
    (exp_avg_s), a skipped step, an LR scheduler."""
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)).to(torch.bfloat16)
    opt = ShardedAMS(model, lr=1e-2, beta3=0.9, lam=-0.5, weight_decay=0.1, overlap=False,
                     backend="eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for i in range(3):
        loss = model(torch.randn(5, 4, dtype=torch.bfloat16)).float().square().mean()
        (loss * (float("inf") if i == 1 else 1.0)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.skipped_steps == 1
    save_checkpoint(path, opt, model=model, step=3, extra={"precision": "bf16", "run": "r"},
                    lr_scheduler=sched)
    opt.close()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_convert_zero1_to_dcp_and_back_is_bitwise(tmp_path):
    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate, read_manifest

    src, mid, back = tmp_path / "src", tmp_path / "mid", tmp_path / "back"
    _native(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", str(src), str(mid), "--to", "dcp"]) == 0
        assert main(["convert", str(mid), str(back), "--to", "zero1"]) == 0
        assert main(["convert", str(mid), str(tmp_path / "x"), "--to", "dcp"]) == 2  # already dcp
        a, b, m = consolidate(src), consolidate(back), consolidate(mid)
    assert _same(a, b)
    assert read_manifest(back).optimizer["skipped_steps"] == 1
    assert read_manifest(back).params == read_manifest(src).params  # bf16 params again
    for i, n in enumerate(a["param_names"]):  # the DCP params are the fp32 masters
        assert torch.equal(m["model"][n], a["optimizer"]["state"][i]["master"])
        assert torch.equal(m["optimizer"]["state"][i]["exp_avg_s"],
                           a["optimizer"]["state"][i]["exp_avg_s"])


def test_convert_keeps_tied_weights_tied(tmp_path):
    """zero1 -> dcp -> zero1 of the GPT (lm_head.weight tied to wte.weight): the tie is
    recorded on the DCP side and the converted checkpoint loads into the same model with
    ``model=`` (lm_head.weight came back as an fp32 buffer in model-extra.pt, and the load
    said model_mismatch)."""
    from ckpt_common import fresh, make_checkpoint

    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate, load_checkpoint, read_manifest

    src, mid, back = tmp_path / "src", tmp_path / "mid", tmp_path / "back"
    make_checkpoint(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", str(src), str(mid), "--to", "dcp"]) == 0
        assert main(["convert", str(mid), str(back), "--to", "zero1"]) == 0
    tied = json.loads((mid / "manifest.json").read_text())["tied"]
    assert tied == {"lm_head.weight": "wte.weight"}
    from launcher.commands.ckpt import inspect_checkpoint

    # `ckpt inspect` counts the tied weight once on both sides (DCP stores it under each key)
    a, b = inspect_checkpoint(str(src)), inspect_checkpoint(str(mid))
    assert (b["num_params"], b["numel"]) == (a["num_params"], a["numel"]), (a, b)
    assert read_manifest(back).model == read_manifest(src).model
    assert "lm_head.weight" not in torch.load(back / "model-extra.pt")["tensors"]
    assert _same(consolidate(src), consolidate(back))
    model, opt = fresh()
    load_checkpoint(back, opt, model=model)
    assert model.lm_head.weight is model.wte.weight
    from sharded_ams.checkpoint.dcp import tied_keys  # what save_dcp records of a live model

    head = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    head[1].weight = head[0].weight
    assert tied_keys(head) == {"1.weight": "0.weight"} and tied_keys(model) == tied


def test_a_one_process_convert_does_not_warn(tmp_path):
    """DCP's "assuming the intent is to load in a single process" UserWarning, printed by
    every ``ckpt convert``/``export``/``consolidate`` of a DCP checkpoint, is not shown."""
    from ckpt_common import make_checkpoint

    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate

    make_checkpoint(tmp_path / "src")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / "mid"), "--to", "dcp"]) == 0
        assert main(["convert", str(tmp_path / "mid"), str(tmp_path / "z"), "--to", "zero1"]) == 0
        consolidate(tmp_path / "mid")
    assert not [w for w in got if "single process" in str(w.message)], [str(w.message) for w in got]


def test_a_param_without_state_consolidates_and_converts(tmp_path):
    """A param that never had a gradient has no AMS state, so the DCP checkpoint holds
    none for it (a KeyError traceback in ``ckpt consolidate``/``convert`` before):
    consolidate leaves it out of ``state`` (as AMS.state_dict does), and --to zero1 gives
    it zero moments (what ShardedAMS holds for a param whose gradients were all zero)."""
    from sharded_ams.checkpoint import consolidate
    from sharded_ams.checkpoint.convert import to_zero1

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    opt = AMS(model.parameters(), lr=1e-2, lam=0.0)
    model["a"](torch.randn(3, 4)).square().mean().backward()
    opt.step()
    src = tmp_path / "step-00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_dcp(src, model, opt, step=1)
        cons = consolidate(src)
        names = cons["param_names"]
        assert [names[i] for i in cons["optimizer"]["state"]] == ["a.weight", "a.bias"]
        fresh = nn.ModuleDict({"a": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
        fopt = AMS(fresh.parameters(), lr=1e-2, lam=0.0)
        fopt.load_state_dict(cons["optimizer"])  # torch.optim's rules: no entry, no state
        to_zero1(src, tmp_path / "z1")
        back = consolidate(tmp_path / "z1")
    for i, n in enumerate(back["param_names"]):
        st, want = back["optimizer"]["state"][i], cons["optimizer"]["state"]
        j = names.index(n)
        for k in ("exp_avg", "exp_avg_sq"):
            expect = want[j][k] if j in want else torch.zeros_like(cons["model"][n])
            assert torch.equal(st[k], expect), (n, k)
        assert torch.equal(back["model"][n], cons["model"][n]), n


def _draws():
    import random

    import numpy as np

    return torch.rand(3), random.random(), float(np.random.rand())


def test_rng_states_come_back_on_the_same_world_size(tmp_path):
    """Each rank's RNG states (torch, python, numpy) are saved beside its DCP shard and
    restored on the same world size, so a resumed run draws what the uninterrupted one
    would have; a broken RNG file is refused by name before anything is loaded."""
    model, opt = trained(seed=3)
    torch.manual_seed(11)
    import random

    import numpy as np

    random.seed(12)
    np.random.seed(13)
    path = tmp_path / "step-00000002"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_dcp(path, model, opt, step=2)
        want = _draws()  # what the run draws next
        for restore, same in ((True, True), (False, False)):
            torch.manual_seed(99)
            random.seed(99)
            np.random.seed(99)
            fresh, fopt = trained(seed=1)
            load_dcp(path, fresh, fopt, restore_rng=restore)
            got = _draws()
            assert (torch.equal(got[0], want[0]) and got[1:] == want[1:]) == same, restore
    assert "rng-rank00000.pt" in json.loads((path / "manifest.json").read_text())["files"]
    torch.save({"format": "sharded_ams.rng", "version": 1, "rank": 0,
                "rng": {"torch": torch.zeros(3, dtype=torch.uint8), "python": (3, (), None)}},
               path / "rng-rank00000.pt")
    rehash(path, "rng-rank00000.pt")
    fresh, fopt = trained(seed=1)
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(CheckpointError, match=r"rng-rank00000\.pt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(path, fresh, fopt)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters())), "loaded anyway"
