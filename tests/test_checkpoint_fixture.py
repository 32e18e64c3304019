"""A checkpoint written by an earlier version of the code still loads.

``tests/fixtures/ckpt-gpt-2ranks-step4`` is the step-4 checkpoint of a real launcher run
made before the launcher was regrouped into packages (``sharded-ams train
launcher/configs/gpt_tiny.toml`` with 2 CPU workers, ``model.n_layer=1 n_embd=16``,
``job.steps=4``, ``optim.backend=eager``). It is never rewritten: if a change of the code
or the format stops it loading, that change breaks users' runs on disk too.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from launcher.commands.ckpt import inspect_checkpoint
from launcher.train.loop import lr_factor
from launcher.train.step import build_model_for_training
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import consolidate, load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt-gpt-2ranks-step4"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    dst = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, dst)  # the loader must not need to write, but keep the original safe
    return dst


def _build(extra: dict):
    torch.manual_seed(123)  # weights differ from the checkpoint's until it is loaded
    model = build_model_for_training(extra["model"], torch.device("cpu"), extra["precision"])
    opt = ShardedAMS(model, preset="grams", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                     max_grad_norm=1.0, backend="eager")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=200, warmup_steps=20, schedule="cosine",
                                 min_lr_ratio=0.1))
    return model, opt, sched


def test_old_checkpoint_inspects_as_valid(ckpt):
    info = inspect_checkpoint(str(ckpt))
    assert info["valid"], info["reason"]
    assert (info["step"], info["world_size"], info["format_version"]) == (4, 2, 1)


def test_old_checkpoint_loads_resharded_and_trains_on(ckpt):
    """Saved on 2 ranks, loaded on 1: the params are the checkpoint's (as consolidated by
    a separate reader), the schedule and step counts resume, and training goes on."""
    full = consolidate(ckpt)
    model, opt, sched = _build(full["extra"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = load_checkpoint(ckpt, opt, model=model, lr_scheduler=sched)
    assert out["step"] == 4 and out["extra"]["world_size"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), full["model"][name]), name
        assert not torch.equal(p.detach(), before[name]), f"{name} was not loaded"
    assert sched.last_epoch == 4
    assert math.isclose(opt.param_groups[0]["lr"], 3e-3 * lr_factor(
        4, total_steps=200, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1))
    assert int(opt.param_groups[0]["step"]) == 4
    x = torch.randint(0, 256, (2, 64))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.finish_param_sync()
    assert int(opt.param_groups[0]["step"]) == 5
    assert any(not torch.equal(p.detach(), full["model"][n]) for n, p in model.named_parameters())
