"""``AMS`` as a ``torch.optim.Optimizer``: torch parity, dtypes, groups, schedulers,
closures, checkpoints (state_dict) and argument validation.

* The ``AdamW`` preset equals ``torch.optim.AdamW`` to fp32 rounding over 200 steps, with
  gradients small enough that sqrt(v^) ~ eps, so that e.g. eps added before the bias
  correction (the public Grams code's variant) would fail the tolerance by orders of
  magnitude (checked explicitly).
* bf16/fp16 params keep an fp32 master, m and v; the param is the master cast.
* param groups, params without grads, LR schedulers, a 0-d tensor lr, closures.
* state_dict round trips bitwise; loading keeps state fp32; bad state dicts fail clearly.
* every ``BAD_CONFIGS`` entry raises; sparse grads and complex params raise.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sharded_ams import AMS, AdamW, CAdam, Grams
from sharded_ams.kernels.eager import compile_available

from cases import (BAD_CONFIGS, CONFIGS_BY_NAME, BadCase, assert_matches_reference,
                   compiled_budget_fixture, make_grads, make_param, reference_trajectory,
                   rel_err)

compiled_budget = compiled_budget_fixture()
pytestmark = pytest.mark.usefixtures("compiled_budget")

needs_compile = pytest.mark.skipif(not compile_available(), reason="torch.compile unavailable here")

BACKENDS = {
    "default": dict(),  # small params: the _foreach path (optimizer.default_path)
    "foreach": dict(foreach=True),
    "single": dict(foreach=False),
    "fused_eager": dict(fused="eager"),
    "fused_compiled": dict(fused="compiled"),
}
EAGER_BACKENDS = ["foreach", "single", "fused_eager"]
ALL_BACKENDS = EAGER_BACKENDS + [pytest.param("fused_compiled", marks=needs_compile)]


def _set_grads(params, gss, t):
    for p, gs in zip(params, gss):
        g = gs[t]
        p.grad = g.t().contiguous().t() if (p.dim() == 2 and not p.is_contiguous()) else g.clone()


# --- torch.optim.AdamW parity -----------------------------------------------------------

ADAMW_STEPS = 200
ADAMW_ATOL = 1e-6  # absolute, on params of size ~1 (fp32 ulp(1) = 1.2e-7) ...
ADAMW_RTOL = 1e-6  # ... plus relative to the param's magnitude


def _adamw_problem():
    shapes = [(257,), (17, 31)]
    p0s = [make_param(s, 70 + i) for i, s in enumerate(shapes)]
    # magnitudes 1e-10 .. 1: many elements have sqrt(v^) below or near eps = 1e-8
    gss = [make_grads(s, ADAMW_STEPS, seed=80 + i, zero_frac=0.1, min_log10=-10.0)
           for i, s in enumerate(shapes)]
    return p0s, gss


def _run_torch_adamw(p0s, gss, lr, betas, eps, wd, dtype=torch.float32):
    params = [torch.nn.Parameter(p.to(dtype).clone()) for p in p0s]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for t in range(len(gss[0])):
        for p, gs in zip(params, gss):
            p.grad = gs[t].to(dtype)
        opt.step()
    return [p.detach() for p in params]


def _adam_eps_before_bias_correction(p0, gs, lr, betas, eps, wd):
    """float64 AdamW with eps added to the *uncorrected* sqrt(v) (the public Grams code's
    placement): the bug the parity tolerance must catch."""
    b1, b2 = betas
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), \
        torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(gs, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v.sqrt() + eps) / (1 - b2**t) ** 0.5)
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["default", "foreach", "single", "fused_eager",
                                     pytest.param("fused_compiled", marks=needs_compile)])
def test_adamw_preset_matches_torch_adamw(backend, wd):
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    p0s, gss = _adamw_problem()
    expected = _run_torch_adamw(p0s, gss, lr, betas, eps, wd)
    params = [torch.nn.Parameter(p.clone()) for p in p0s]
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, **BACKENDS[backend])
    for t in range(ADAMW_STEPS):
        _set_grads(params, gss, t)
        opt.step()
    for p, p0, e in zip(params, p0s, expected):
        torch.testing.assert_close(p.detach(), e, rtol=ADAMW_RTOL, atol=ADAMW_ATOL)
        assert (p.detach() - p0).abs().max() > 0.1  # it moved far beyond the tolerance
    # the tolerance has teeth: the eps placement variant is far outside it
    wrong = _adam_eps_before_bias_correction(p0s[0], gss[0], lr, betas, eps, wd)
    assert (wrong - expected[0].double()).abs().max() > 100 * (ADAMW_ATOL + ADAMW_RTOL * 3)
    # for scale: torch's fp32 AdamW itself drifts from float64 by a few 1e-6 over 200 steps
    # (the decay factor 1 - lr wd carries up to 0.5 ulp per step); ours tracks torch's
    # fp32 trajectory far closer than that, so the tolerance above is not loose.
    exact = _run_torch_adamw(p0s, gss, lr, betas, eps, wd, dtype=torch.float64)
    assert (expected[0].double() - exact[0]).abs().max() < 3e-5


# --- low-precision params ---------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", [
    *[pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in EAGER_BACKENDS
      for d in (torch.bfloat16, torch.float16)],
    pytest.param("fused_compiled", torch.bfloat16, marks=needs_compile,
                 id="fused_compiled-bfloat16")])  # compile: bf16 only
def test_low_precision_params_keep_fp32_master(backend, dtype):
    case = CONFIGS_BY_NAME["lam-0.5_beta3-0.5_wd" if backend != "fused_compiled" else "grams"]
    steps = 100
    shapes = [(33,), (8, 9), (1,)]
    min_log10 = -7.0 if dtype == torch.bfloat16 else -4.0  # fp16 flushes below ~6e-8
    p0s = [make_param(s, 90 + i, dtype) for i, s in enumerate(shapes)]
    gss = [make_grads(s, steps, seed=95 + i, zero_frac=0.2, dtype=dtype, min_log10=min_log10)
           for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(p.clone()) for p in p0s]
    # a transposed (non-contiguous) low-precision param as well
    base = make_param((6, 4), 99, dtype)
    params.append(torch.nn.Parameter(base.clone().t()))
    p0s.append(base.t())
    gss.append(make_grads((4, 6), steps, seed=98, zero_frac=0.2, dtype=dtype,
                          min_log10=min_log10))
    opt = case.build(params, **BACKENDS[backend])
    for t in range(steps):
        _set_grads(params, gss, t)
        opt.step()
    for p, p0, gs in zip(params, p0s, gss):
        st = opt.state[p]
        assert p.dtype == dtype
        for k in ("master", "exp_avg", "exp_avg_sq") + (("exp_avg_s",) if case.beta3 else ()):
            assert st[k].dtype == torch.float32, k
            assert st[k].shape == p.shape, k
        assert torch.equal(p.detach(), st["master"].to(dtype)), "param != master cast"
        ref = reference_trajectory(p0, gs, **case.ref_kwargs)[-1]
        assert_matches_reference(opt, p, ref, what=f"{backend}/{dtype}", p0=p0, grads=gs)
        assert rel_err(st["master"], p0) > 1e-4  # it moved


# --- param groups, missing grads, schedulers, tensor lr, closures ----------------------


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_param_groups_with_different_hparams(backend):
    steps = 60
    a, b, c = make_param((40,), 1), make_param((7, 5), 2), make_param((11,), 3)
    ga, gb, gc = (make_grads(x.shape, steps, seed=10 + i, zero_frac=0.2)
                  for i, x in enumerate((a, b, c)))
    pa, pb, pc = (torch.nn.Parameter(x.clone()) for x in (a, b, c))
    opt = AMS([{"params": [pa, pb]},
               {"params": [pc], "lr": 3e-3, "weight_decay": 0.1, "lam": 0.0}],
              lr=1e-2, weight_decay=0.0, **BACKENDS[backend])
    for t in range(steps):
        _set_grads([pa, pb, pc], [ga, gb, gc], t)
        opt.step()
    hp1 = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.0, lam=-1.0, eps=1e-8, weight_decay=0.0)
    hp2 = {**hp1, "lr": 3e-3, "weight_decay": 0.1, "lam": 0.0}
    for p, p0, gs, hp in ((pa, a, ga, hp1), (pb, b, gb, hp1), (pc, c, gc, hp2)):
        assert_matches_reference(opt, p, reference_trajectory(p0, gs, **hp)[-1], what=backend,
                                 p0=p0, grads=gs)
    # each group's settings matter
    wrong = reference_trajectory(c, gc, **hp1)[-1]
    assert rel_err(pc.detach(), wrong.p) > 1e-3


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_params_without_grad_are_skipped(backend):
    case = CONFIGS_BY_NAME["cadam_wd"]
    p0, q0 = make_param((30,), 5), make_param((4, 4), 6)
    gp = make_grads((30,), 8, seed=7)
    gq = make_grads((4, 4), 3, seed=8)
    p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    opt = case.build([p, q], **BACKENDS[backend])
    for t in range(5):
        p.grad = gp[t].clone()
        opt.step()
    assert len(opt.state[q]) == 0, "state created for a param without grad"
    assert torch.equal(q.detach(), q0.float()), "a param without grad moved"
    assert int(opt.state[p]["step"]) == 5
    for t in range(3):
        p.grad = gp[5 + t].clone()
        q.grad = gq[t].clone()
        opt.step()
    assert int(opt.state[p]["step"]) == 8 and int(opt.state[q]["step"]) == 3
    assert_matches_reference(opt, p, reference_trajectory(p0, gp, **case.ref_kwargs)[-1],
                             p0=p0, grads=gp)
    assert_matches_reference(opt, q, reference_trajectory(q0, gq, **case.ref_kwargs)[-1],
                             p0=q0, grads=gq)
    # set_to_none: the next step skips both and changes nothing
    opt.zero_grad(set_to_none=True)
    before = [x.detach().clone() for x in (p, q)]
    opt.step()
    assert all(torch.equal(x.detach(), y) for x, y in zip((p, q), before))
    assert int(opt.state[p]["step"]) == 8


@pytest.mark.parametrize("sched", ["step", "lambda"])
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_lr_scheduler(backend, sched):
    case = CONFIGS_BY_NAME["lam0.5_wd"]
    steps = 40
    p0 = make_param((50,), 12)
    gs = make_grads((50,), steps, seed=13)
    p = torch.nn.Parameter(p0.clone())
    opt = case.build([p], **BACKENDS[backend])
    if sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.3 * t))
    lrs = []
    for g in gs:
        lrs.append(float(opt.param_groups[0]["lr"]))
        p.grad = g.clone()
        opt.step()
        scheduler.step()
    assert len(set(lrs)) > 3
    ref = reference_trajectory(p0, gs, **{**case.ref_kwargs, "lr": lrs})[-1]
    assert_matches_reference(opt, p, ref, what=f"{backend}/{sched}", p0=p0, grads=gs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tensor_lr(backend):
    case = CONFIGS_BY_NAME["grams_wd"]
    p0 = make_param((3, 17), 14)
    gs = make_grads((3, 17), 30, seed=15)
    p = torch.nn.Parameter(p0.clone())
    opt = AMS([p], **{**case.hparams, "lr": torch.tensor(case.hparams["lr"])}, **BACKENDS[backend])
    for g in gs:
        p.grad = g.clone()
        opt.step()
    assert_matches_reference(opt, p, reference_trajectory(p0, gs, **case.ref_kwargs)[-1],
                             p0=p0, grads=gs)
    # a scheduler updates the tensor lr in place; the step follows it
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = gs[-1].clone()
    opt.step()
    sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(case.hparams["lr"] / 2)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_closure_returns_loss(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = Grams(model.parameters(), lr=1e-2, **BACKENDS[backend])
    calls = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    losses = [opt.step(closure) for _ in range(50)]
    assert all(isinstance(lo, torch.Tensor) for lo in losses)
    assert [lo.item() for lo in losses] == calls
    assert losses[-1].item() < 0.8 * losses[0].item()
    assert opt.step() is None  # no closure: returns None


# --- state_dict -------------------------------------------------------------------------


def _ckpt_problem():
    shapes = [(7, 13), (5,), (1,)]
    p0s = [make_param(s, 40 + i) for i, s in enumerate(shapes)]
    p0s.append(make_param((6, 3), 44, torch.bfloat16))  # a bf16 param: its master is saved
    gss = [make_grads(p.shape, 60, seed=50 + i, zero_frac=0.2, dtype=p.dtype)
           for i, p in enumerate(p0s)]
    return p0s, gss


@pytest.mark.parametrize("case_name", ["grams", "lam-0.5_beta3-0.5_wd"])
@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_state_dict_round_trip_is_bitwise(backend, case_name):
    case = CONFIGS_BY_NAME[case_name]
    p0s, gss = _ckpt_problem()

    def fresh(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        return params, case.build(params, **BACKENDS[backend])

    full, opt_full = fresh(p0s)
    for t in range(60):
        _set_grads(full, gss, t)
        opt_full.step()

    first, opt1 = fresh(p0s)
    for t in range(30):
        _set_grads(first, gss, t)
        opt1.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in first], "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second, opt2 = fresh(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    for p in second:
        for k, v in opt2.state[p].items():
            assert v.dtype == torch.float32, (k, v.dtype)  # bf16 params too
    assert "master" in opt2.state[second[-1]]
    for t in range(30, 60):
        _set_grads(second, gss, t)
        opt2.step()
    for a, b in zip(full, second):
        assert torch.equal(a.detach(), b.detach())
        for k in opt_full.state[a]:
            assert torch.equal(opt_full.state[a][k], opt2.state[b][k]), k
    assert opt2.param_groups[0]["lam"] == case.lam


def _one_step_state_dict(shape=(4, 3), dtype=torch.float32, **kw):
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = AMS([p], **kw)
    p.grad = torch.randn(shape).to(dtype)
    opt.step()
    return copy.deepcopy(opt.state_dict())


def test_load_state_dict_wrong_shape_errors():
    sd = _one_step_state_dict((4, 3))
    q = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"State 'exp_avg' of param 0 has shape \(4, 3\).*\(3, 4\)"):
        AMS([q]).load_state_dict(sd)


def test_load_state_dict_unknown_key_errors():
    sd = _one_step_state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(4, 3)
    with pytest.raises(KeyError, match="Unexpected optimizer state 'momentum_buffer'"):
        AMS([torch.nn.Parameter(torch.randn(4, 3))]).load_state_dict(sd)


def test_load_state_dict_wrong_param_count_errors():
    sd = _one_step_state_dict()
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match="doesn't match the size"):
        AMS(params).load_state_dict(sd)


def test_load_state_dict_beta3_mismatch_errors():
    """State saved with beta3 = 0 has no s: stepping with beta3 > 0 must say so."""
    sd = _one_step_state_dict(beta3=0.0)
    q = torch.nn.Parameter(torch.randn(4, 3))
    opt = AMS([q], beta3=0.5)
    sd["param_groups"][0]["beta3"] = 0.5
    opt.load_state_dict(sd)
    q.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="exp_avg_s"):
        opt.step()


def test_load_bf16_state_into_bf16_keeps_fp32():
    sd = _one_step_state_dict(dtype=torch.bfloat16)
    q = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = AMS([q])
    opt.load_state_dict(sd)
    assert {k: v.dtype for k, v in opt.state[q].items()} == {
        "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
        "master": torch.float32}


def test_load_fp32_state_into_bf16_params_creates_master():
    sd = _one_step_state_dict(dtype=torch.float32)
    q = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = AMS([q])
    opt.load_state_dict(sd)
    q.grad = torch.randn(4, 3).bfloat16()
    opt.step()
    assert opt.state[q].get("master") is not None
    assert opt.state[q]["master"].dtype == torch.float32


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=str)
def test_bad_configs_raise(bad: BadCase):
    params = [torch.nn.Parameter(torch.randn(3))]
    if bad.at_step:
        opt = bad.build(params)
        params[0].grad = torch.randn(3)
        with pytest.raises(bad.error, match=bad.match):
            opt.step()
    else:
        with pytest.raises(bad.error, match=bad.match):
            bad.build(params)


@pytest.mark.parametrize("bad", [b for b in BAD_CONFIGS if not b.at_step and
                                 b.name != "foreach_and_fused"], ids=str)
def test_bad_group_hparams_raise(bad: BadCase):
    """The same values given per param group are rejected as well."""
    good = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(bad.error, match=bad.match):
        AMS([{"params": [good]},
             {"params": [torch.nn.Parameter(torch.randn(2))], **bad.kwargs}])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_sparse_grad_raises(backend):
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = Grams([p], **BACKENDS[backend])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, 3), (5, 3),
                                     check_invariants=True)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert len(opt.state[p]) == 0


def test_sparse_embedding_grad_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_param_raises():
    with pytest.raises(ValueError, match="does not support complex parameters"):
        AMS([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_integer_param_raises():
    with pytest.raises(ValueError, match="floating-point"):
        AMS([torch.zeros(3, dtype=torch.int64)])


def test_fused_true_resolves_and_foreach_false_fused_false_run():
    for kw in (dict(fused=True), dict(fused=False), dict(foreach=False, fused=False)):
        if kw.get("fused") is True and not compile_available():
            continue
        p = torch.nn.Parameter(torch.ones(4))
        opt = Grams([p], lr=0.1, **kw)
        p.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.1, 1.0, 0.9]))


@needs_compile
def test_default_cpu_path_compiles_once_per_group(monkeypatch):
    """The CPU default's one compiled call (``kernels/multi.py``) takes Parameters, 2-D
    tensors and views as they come: it must compile on the first step only, not once per
    step (a recompile costs seconds, and dynamo gives up after its recompile limit)."""
    import torch._dynamo.utils as dyn_utils

    import sharded_ams.optimizer as optimizer_mod

    monkeypatch.setattr(optimizer_mod, "COMPILE_MIN_NUMEL", 0)
    base = torch.randn(40)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(11)),
              torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))]
    for opt_cls in (Grams, CAdam):
        opt = opt_cls(params, lr=1e-2)
        for t in range(5):
            for i, p in enumerate(params):
                g = base[i:i + p.numel()].view(p.shape).to(p.dtype) * (t + 1)
                p.grad = g if p.dtype == torch.float32 else g.clone()
            if t == 1:
                before = dyn_utils.counters["stats"]["unique_graphs"]
            opt.step()
        assert dyn_utils.counters["stats"]["unique_graphs"] == before, \
            f"{opt_cls.__name__}: the one-call path recompiled on a later step"


@needs_compile
def test_default_cpu_path_with_view_grads_and_under_a_dispatch_mode(monkeypatch):
    """Two things FSDP2 users hit on the CPU default's one compiled call:

    * gradients that are views while the params and state own their memory (FSDP2's
      gradients are views of its reduce-scatter output): every tensor of a param must go
      in one shape (a 2-D state against a 1-D alias of the gradient crashed dynamo);
    * a dispatch mode around ``step()`` (a FLOP counter, a debugging mode), even on the
      process's first step: dynamo compiles nothing under one, so the passes run as plain
      ops and the mode sees them, and the compiler is not concluded missing for later
      steps (``compile_available`` was cached False).

    Each is checked against the same optimizer on owned gradients outside any mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import sharded_ams.kernels.eager as eager_mod
    import sharded_ams.optimizer as optimizer_mod

    monkeypatch.setattr(optimizer_mod, "COMPILE_MIN_NUMEL", 0)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    shapes = [(40, 33), (33,), (5, 7)]
    for opt_cls in (Grams, CAdam):
        runs = [[torch.nn.Parameter(make_param(s, 3 + i)) for i, s in enumerate(shapes)]
                for _ in range(2)]
        opts = [opt_cls(ps, lr=1e-2) for ps in runs]
        for t in range(3):
            flat = torch.randn(sum(torch.Size(s).numel() for s in shapes))
            for k, ps in enumerate(runs):
                off = 0
                for p in ps:  # run 0: views of one flat gradient; run 1: owned copies
                    g = flat[off:off + p.numel()].view(p.shape)
                    p.grad, off = (g if k == 0 else g.clone()), off + p.numel()
            if t == 0:
                eager_mod.compile_available.cache_clear()  # the process's first step
                with Ops() as mode:
                    opts[0].step()
                assert mode.n > 0  # the mode saw the step's ops
                assert eager_mod.compile_available()
            else:
                opts[0].step()
            opts[1].step()
            for a, b in zip(*runs):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- a clip coefficient inside the step (FSDPAMS's clipping) -------------------------------


@pytest.mark.parametrize("lam,beta3", [(-1.0, 0.0), (0.0, 0.0), (-0.5, 0.5)])
@pytest.mark.parametrize("path", ["foreach", "single",
                                  pytest.param("multi", marks=needs_compile)])
def test_a_coefficient_in_the_step_equals_scaling_the_grads_first(path, lam, beta3,
                                                                  monkeypatch):
    """``_step_scaled(coef)`` reads every gradient as ``g * coef`` on each path (the
    compiled one-call path, ``_foreach``, per tensor): bitwise the step on gradients
    scaled beforehand with ``_foreach_mul_`` (fp32), and ``p.grad`` is left unscaled."""
    import sharded_ams.optimizer as optimizer_mod

    kw = {"foreach": dict(foreach=True), "single": dict(foreach=False), "multi": {}}[path]
    monkeypatch.setattr(optimizer_mod, "COMPILE_MIN_NUMEL", 0 if path == "multi" else 1 << 40)
    shapes = [(300,), (20, 17), (64,)]
    p0s = [make_param(s, 90 + i) for i, s in enumerate(shapes)]
    gss = [make_grads(s, 3, seed=95 + i, zero_frac=0.1) for i, s in enumerate(shapes)]
    coefs = [0.37, 1.0, 0.0123]
    runs = []
    for fold in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in p0s]
        opt = AMS(params, lr=1e-2, lam=lam, beta3=beta3, weight_decay=0.1, **kw)
        for t, c in enumerate(coefs):
            coef = torch.tensor(c, dtype=torch.float32)
            _set_grads(params, gss, t)
            if fold:
                opt._step_scaled(coef)
                assert all(torch.equal(p.grad, gs[t]) for p, gs in zip(params, gss))
            else:
                torch._foreach_mul_([p.grad for p in params], coef)
                opt.step()
        runs.append(([p.detach() for p in params], [dict(opt.state[p]) for p in params]))
    (pf, sf), (pr, sr) = runs
    for i in range(len(shapes)):
        assert torch.equal(pf[i], pr[i]), (path, lam, i)
        for k in sf[i]:
            assert torch.equal(sf[i][k], sr[i][k]), (path, lam, i, k)
