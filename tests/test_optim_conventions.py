"""torch.optim conventions a user relies on, for ``AMS`` and ``ShardedAMS`` (one process, no
process group, eager kernels): weights written after construction are the ones stepped,
copies step, group changes and frozen params are refused where they would be ignored,
checkpoints go to the groups that hold the same params, dtypes the fp32 maths would round
are refused, state-dict hooks run as torch runs them, GradScaler works with AMS and is
refused by ShardedAMS. Each test fails with the defect it names put back."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from sharded_ams import AMS, CAdam, ShardedAMS


def _model(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(dtype)


def _backward(model, seed=1):
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model(torch.randn(3, 4, dtype=dtype)).float().square().sum().backward()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sharded_masters_follow_weights_loaded_after_construction():
    """bf16 params keep fp32 masters: weights loaded (or initialised in place) between
    construction and the first step, or loaded into the model after steps, are the ones an
    lr = 0 step leaves in place, not the masters' old values."""
    model = _model()
    opt = ShardedAMS(model, preset="adamw", lr=0.0, backend="eager")
    loaded = _weights(_model(seed=5))
    model.load_state_dict(loaded)
    _backward(model)
    opt.step()
    opt.finish_param_sync()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.items())
    with torch.no_grad():  # an in-place write before the first step of a fresh optimizer
        model2 = _model()
        opt2 = ShardedAMS(model2, preset="adamw", lr=0.0, backend="eager")
        model2[0].weight.fill_(0.25)
    _backward(model2)
    opt2.step()
    opt2.finish_param_sync()
    assert bool((model2[0].weight == 0.25).all())
    for group in opt.param_groups:  # later: a load into one submodule, then lr = 0 again
        group["lr"] = 1e-2
    _backward(model)
    opt.step()
    opt.finish_param_sync()
    sub = _weights(_model(seed=7)[1])
    model[1].load_state_dict(sub)
    for group in opt.param_groups:
        group["lr"] = 0.0
    _backward(model)
    opt.step()
    opt.finish_param_sync()
    assert all(torch.equal(model[1].state_dict()[k], v) for k, v in sub.items())
    assert opt.state_dict()["pieces"][0]["master"].dtype == torch.float32


def test_sharded_dcp_save_holds_weights_loaded_before_it():
    """The DCP layout of a ShardedAMS run (``sharded_dcp_state_dict``) saves the masters of
    weights loaded into the model after construction, as ``state_dict()`` does."""
    from sharded_ams.checkpoint.dcp_sharded import sharded_dcp_state_dict

    model = _model()
    opt = ShardedAMS(model, preset="adamw", lr=1e-2, backend="eager")
    loaded = _weights(_model(seed=5))
    model.load_state_dict(loaded)
    saved = sharded_dcp_state_dict(model, opt)["model"]
    for k, v in loaded.items():
        whole = torch.full(tuple(saved[k].size()), float("nan"))
        for off, box in saved[k].pieces.items():
            whole[tuple(slice(o, o + n) for o, n in zip(off, box.shape))] = box
        assert torch.equal(whole.bfloat16(), v), k


def test_sharded_masters_keep_their_bits_when_the_model_is_loaded_after_them():
    """Optimizer state, then the model, from one checkpoint: the params are the masters'
    rounding, so the masters keep their fp32 bits (a plain re-read would round them)."""
    model = _model()
    opt = ShardedAMS(model, preset="adamw", lr=1e-2, backend="eager")
    for _ in range(2):
        _backward(model)
        opt.step()
    sd, weights = opt.state_dict(), _weights(model)
    assert not torch.equal(sd["pieces"][0]["master"], sd["pieces"][0]["master"].bfloat16().float())
    model2 = _model(seed=3)
    opt2 = ShardedAMS(model2, preset="adamw", lr=1e-2, backend="eager")
    opt2.load_state_dict(sd)
    model2.load_state_dict(weights)
    got = opt2.state_dict()["pieces"]
    assert all(torch.equal(a["master"], b["master"]) for a, b in zip(got, sd["pieces"]))


def test_ams_masters_follow_weights_written_after_steps():
    """AMS creates a 16-bit param's master at its first step; a load into the model after
    that is stepped from, not overwritten by the old master. A loaded optimizer state's
    masters are stepped from as they are."""
    model = _model()
    opt = AMS(model.parameters(), lr=1e-2, fused="eager")
    _backward(model)
    opt.step()
    loaded = _weights(_model(seed=5))
    model.load_state_dict(loaded)
    for group in opt.param_groups:
        group["lr"] = 0.0
    _backward(model)
    opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.items())
    sd = copy.deepcopy(opt.state_dict())  # masters of the loaded weights
    # both loaded into the same optimizer after steps: the checkpoint's fp32 masters win
    # over the model's bf16 rounding of them
    for group in opt.param_groups:
        group["lr"] = 1e-2
    opt.step()  # masters no longer bf16 values
    ckpt = copy.deepcopy(opt.state_dict()), _weights(model)
    opt.step()
    model.load_state_dict(ckpt[1])
    opt.load_state_dict(ckpt[0])
    for group in opt.param_groups:
        group["lr"] = 0.0
    _backward(model)
    opt.step()
    master = opt.state[next(iter(model.parameters()))]["master"]
    assert torch.equal(master, ckpt[0]["state"][0]["master"])
    assert not torch.equal(master, master.bfloat16().float())
    fresh = _model(seed=9)
    opt2 = AMS(fresh.parameters(), lr=0.0, fused="eager")
    opt2.load_state_dict(sd)
    _backward(fresh)
    opt2.step()  # lr 0: the params become the loaded masters, rounded to bf16
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.values()))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_ams_copies_step(how):
    """torch.optim pickles only defaults, state and param_groups: the copy rebuilds its
    caches and steps like the original."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64))
    p.grad = torch.randn(64)
    opt = CAdam([p], lr=1e-2, fused="eager")
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = clone.param_groups[0]["params"][0]
    assert q is not p and torch.equal(q, p)
    q.grad = p.grad.clone()  # a pickled tensor carries no .grad
    clone.step()
    opt.step()
    assert torch.equal(p, q)


def test_sharded_refuses_copies_and_late_groups():
    model = _model(torch.float32)
    opt = ShardedAMS(model, backend="eager")
    with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
        copy.deepcopy(opt)
    head = nn.Linear(2, 1)
    with pytest.raises(NotImplementedError, match="add_param_group"):
        opt.add_param_group({"params": head.parameters(), "lr": 0.5})
    assert len(opt.param_groups) == 1
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias], "lr": 0.1}]
    assert len(ShardedAMS(groups, backend="eager").param_groups) == 2  # at construction: fine


@pytest.mark.parametrize("given", ["module", "params"])
def test_sharded_refuses_a_param_unfrozen_after_construction(given):
    model = _model(torch.float32)
    model[0].weight.requires_grad_(False)
    opt = ShardedAMS(model if given == "module" else list(model.parameters()),
                     backend="eager")
    model[0].weight.requires_grad_(True)
    _backward(model)
    before = _weights(model)
    with pytest.raises(RuntimeError, match=r"'0.weight' has a gradient, but it was frozen"
                       if given == "module" else "has a gradient, but it was frozen"):
        opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model[0].weight.grad = None  # frozen again for this optimizer: steps the rest
    opt.step()
    # params merely left out (another optimizer's, trainable) are not this one's business
    part = ShardedAMS(list(model[1].parameters()), module=model, backend="eager")
    model.zero_grad()
    _backward(model)
    part.step()


def test_sharded_load_refuses_groups_that_hold_other_params():
    """The saved groups' lr and weight decay go to the groups holding the same params:
    groups listed in another order or split differently are refused, nothing loaded."""
    def groups(m, order):
        w = [p for n, p in m.named_parameters() if n.endswith("weight")]
        b = [p for n, p in m.named_parameters() if n.endswith("bias")]
        if order == "saved":
            return [{"params": w, "lr": 0.01, "weight_decay": 0.5},
                    {"params": b, "lr": 0.2, "weight_decay": 0.0}]
        return [{"params": b + w[:1], "lr": 0.2, "weight_decay": 0.0},
                {"params": w[1:], "lr": 0.01, "weight_decay": 0.5}]

    m = _model(torch.float32)
    opt = ShardedAMS(groups(m, "saved"), module=m, preset="adamw", backend="eager")
    _backward(m)
    opt.step()
    sd = opt.state_dict()
    m2 = _model(torch.float32)
    other = ShardedAMS(groups(m2, "other"), module=m2, preset="adamw", backend="eager")
    with pytest.raises(ValueError, match="param group 0 holds other params"):
        other.load_state_dict(sd)
    assert [g["lr"] for g in other.param_groups] == [0.2, 0.01]
    same = ShardedAMS(groups(m2, "saved"), module=m2, preset="adamw", backend="eager")
    same.load_state_dict(sd)
    assert [g["weight_decay"] for g in same.param_groups] == [0.5, 0.0]


def test_a_refused_load_keeps_the_state():
    """AMS checks every saved state before anything changes: a state_dict with a wrong
    shape (or a key of another optimizer) is refused and the optimizer steps on as if the
    load had not been tried (before: its state was wiped first, then the error raised)."""
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = AMS(model.parameters(), lr=1e-2), AMS(twin.parameters(), lr=1e-2)
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m)
        o.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][3]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"State 'exp_avg' of param 3 has shape \(3,\)"):
        opt.load_state_dict(bad)
    other = copy.deepcopy(opt.state_dict())
    other["state"][0]["momentum_buffer"] = torch.zeros(8, 4)
    with pytest.raises(KeyError, match="momentum_buffer"):
        opt.load_state_dict(other)
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m, seed=2)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("bad, match", [
    (lambda r: r.update(exp_avg=torch.zeros(1)), r"state 'exp_avg' must be a 1-D float tensor of "
                                                  r"its 32 elements, got torch.float32 of shape \(1,\)"),
    (lambda r: r.update(bogus=torch.zeros(32)), r"unexpected state \['bogus'\]"),
    (lambda r: r.update(length=40, **{k: torch.zeros(40) for k in ("exp_avg", "exp_avg_sq", "master")}),
     r"elements \[0, 0\+40\) are not within its 32 elements"),
    (lambda r: r.update(name="2.weight"), r"no such param"),
    (lambda r: r.update(offset=16, length=16, **{k: r[k][16:] for k in ("exp_avg", "exp_avg_sq", "master")}),
     r"does not cover param '0.weight' elements \[0, 32\) once each \(records cover 16 of 32"),
])
def test_sharded_load_checks_every_piece_before_writing(bad, match):
    """A ShardedAMS state dict a user torch.load()s gets no file checks: each piece is
    checked (a 1-element tensor was broadcast over its range; a missing range raised after
    the pieces before it were written), and a refused load leaves the state as it was."""
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = (ShardedAMS(m, lr=1e-2, backend="eager") for m in (model, twin))
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m)
        o.step()
    sd = copy.deepcopy(opt.state_dict())
    for other in sd["pieces"]:  # other values: a piece written before the refusal shows
        other["exp_avg"] = other["exp_avg"] * 2 + 1
    rec = next(r for r in sd["pieces"] if r["name"] == "0.weight")
    bad(rec)
    fresh = _model(torch.float32, seed=3)
    fresh_opt = ShardedAMS(fresh, lr=1e-2, backend="eager")
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        fresh_opt.load_state_dict([sd])
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m, seed=2)
        o.step()
        o.finish_param_sync()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert torch.equal(opt.state_dict()["pieces"][0]["exp_avg"], twin_opt.state_dict()["pieces"][0]["exp_avg"])


@pytest.mark.parametrize("cls", ["AMS", "ShardedAMS"])
def test_float64_params_refused(cls):
    """The maths is fp32: a float64 param would be rounded to fp32 at every step."""
    p = nn.Parameter(torch.tensor([1.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not torch.float64"):
        AMS([p]) if cls == "AMS" else ShardedAMS([p], backend="eager")
    opt = AMS([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="not torch.float64"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def _opt(cls, model, **kw):
    if cls == "AMS":
        return AMS(model.parameters(), fused="eager", **kw)
    return ShardedAMS(model, backend="eager", **kw)


def _masters(opt):
    """The fp32 masters of the 16-bit params, as the optimizer holds them (not copies)."""
    if isinstance(opt, ShardedAMS):
        return [sh.state["master"] for sh in opt.shards if "master" in sh.state]
    return [st["master"] for st in opt.state.values() if "master" in st]


def _moments(opt):
    if isinstance(opt, ShardedAMS):
        return [sh.state["exp_avg"] for sh in opt.shards]
    return [st["exp_avg"] for st in opt.state.values()]


@pytest.mark.parametrize("cls", ["AMS", "ShardedAMS"])
def test_state_dict_hooks_run_as_torch_runs_them(cls):
    """Pre-hooks run once each, in order (``prepend`` first), before the dict is built, and
    see the state the save holds: masters already following weights loaded into the model
    since the last step. Post-hooks run in order; a returned dict replaces the state dict
    for the hooks after it and the caller. (AMS ran its hooks but saved stale masters;
    ShardedAMS, overriding state_dict, ran none.)"""
    model = _model()
    opt = _opt(cls, model, lr=1e-2)
    _backward(model)
    opt.step()
    model.load_state_dict(_weights(_model(seed=5)))
    stale = [m.clone() for m in _masters(opt)]
    log, seen = [], []

    def pre(o):
        log.append("pre")
        seen.extend(m.clone() for m in _masters(o))
        o.param_groups[0]["lr"] = 0.125  # pre-processing lands in the saved dict

    def post_a(o, sd):
        log.append(("a", "by" in sd))
        return {**sd, "by": ["a"]}

    def post_b(o, sd):
        log.append(("b", list(sd["by"])))
        sd["by"].append("b")

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_pre_hook(lambda o: log.append("first"), prepend=True)
    gone = opt.register_state_dict_pre_hook(lambda o: log.append("removed"))
    opt.register_state_dict_post_hook(post_a)
    opt.register_state_dict_post_hook(post_b)
    opt.register_state_dict_post_hook(lambda o, sd: log.append(("c", "by" in sd)), prepend=True)
    gone.remove()
    sd = opt.state_dict()
    assert log == ["first", "pre", ("c", False), ("a", False), ("b", ["a"])]
    assert sd["by"] == ["a", "b"] and sd["param_groups"][0]["lr"] == 0.125
    assert seen and all(torch.equal(a, b) for a, b in zip(seen, _masters(opt)))
    assert not all(torch.equal(a, b) for a, b in zip(stale, seen))


def _zero_moments(sd: dict) -> dict:
    """A replacement state dict with every exp_avg zeroed (either optimizer's format)."""
    if "pieces" in sd:
        return {**sd, "pieces": [{**r, "exp_avg": torch.zeros_like(r["exp_avg"])}
                                 for r in sd["pieces"]]}
    return {**sd, "state": {k: {**v, "exp_avg": torch.zeros_like(v["exp_avg"])}
                            for k, v in sd["state"].items()}}


@pytest.mark.parametrize("cls", ["AMS", "ShardedAMS"])
def test_load_state_dict_hooks_run_as_torch_runs_them(cls):
    """Pre-hooks get a shallow copy of the whole dict (AMS passed them one with no state),
    in order; a returned dict is what the hooks after it see and what is loaded, state
    included (AMS loaded the caller's state). Post-hooks run after the state is in (AMS ran
    them before; ShardedAMS, overriding load_state_dict, ran no hooks)."""
    model = _model()
    opt = _opt(cls, model, lr=1e-2)
    _backward(model)
    opt.step()
    sd = opt.state_dict()
    model2 = _model(seed=3)
    opt2 = _opt(cls, model2, lr=1e-2)
    log = []

    def replace(o, got):
        log.append(("replace", bool(got.get("state") or got.get("pieces"))))
        got["mine"] = True  # the caller's dict is not touched
        return _zero_moments({**got, "param_groups": [{**g, "lr": 0.5}
                                                      for g in got["param_groups"]]})

    def after(o):
        log.append(("after", o.param_groups[0]["lr"], bool(_moments(o)),
                    all(not m.any() for m in _moments(o))))

    opt2.register_load_state_dict_pre_hook(replace)
    opt2.register_load_state_dict_pre_hook(
        lambda o, got: log.append(("next", got["param_groups"][0]["lr"])))
    opt2.register_load_state_dict_pre_hook(lambda o, got: log.append(("first", "mine" in got)),
                                           prepend=True)
    opt2.register_load_state_dict_post_hook(after)
    opt2.load_state_dict(sd)
    assert log == [("first", False), ("replace", True), ("next", 0.5), ("after", 0.5, True, True)]
    assert "mine" not in sd and any(m.any() for m in _moments(opt))


def test_ams_works_with_grad_scaler():
    """AMS steps from p.grad, so torch.amp.GradScaler unscales and checks it as for any
    torch optimizer: scaled steps equal unscaled ones, an inf step is skipped (params and
    step count unchanged) and the scale backs off."""
    def run(scaler):
        model = _model(torch.float32)
        opt = AMS(model.parameters(), lr=1e-2, fused="eager")
        for seed in range(3):
            torch.manual_seed(seed)
            loss = model(torch.randn(3, 4)).square().sum()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        return model, opt

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    model, opt = run(scaler)
    ref, _ = run(None)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before, steps = _weights(model), [float(st["step"]) for st in opt.state.values()]
    x = torch.randn(3, 4)
    x[0, 0] = float("inf")
    scaler.scale(model(x).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [float(st["step"]) for st in opt.state.values()] == steps == [3.0] * 4
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_refuses_grad_scaler(dtype):
    """ShardedAMS's gradients are in its flat buffers, not p.grad: GradScaler.step is
    refused, naming the alternatives, before anything moves (16-bit params failed with
    GradScaler's own "No inf checks were recorded"; fp32 ones stepped at world size 1 but
    decide the skip per rank on more). A disabled scaler just steps."""
    model = _model(dtype)
    opt = ShardedAMS(model, lr=1e-2, backend="eager")
    scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(1)
    scaler.scale(model(torch.randn(3, 4, dtype=dtype)).float().square().sum()).backward()
    before = _weights(model)
    assert hasattr(opt, "_step_supports_amp_scaling")  # introspection does not raise
    with pytest.raises(RuntimeError, match="GradScaler cannot drive ShardedAMS.*bf16.*"
                       "single-process AMS"):
        scaler.step(opt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    scaler.unscale_(opt)  # unscale_ first (clipping's order): refused too
    with pytest.raises(RuntimeError, match="GradScaler cannot drive ShardedAMS"):
        scaler.step(opt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.amp.GradScaler("cpu", enabled=False).step(opt)
    opt.finish_param_sync()
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
