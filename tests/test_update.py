"""The AMS maths: every backend against the float64 oracle, and the paper's special cases.

* The oracle itself (``sharded_ams.update``) equals torch.optim.AdamW in float64 for lam=1.
* Every backend (foreach, single-tensor eager, fused eager, fused compiled) equals the
  float64 reference over 100+ steps for every config in ``tests/cases.py`` on a set of
  awkward shapes (0-size, 1 element, odd, a transposed non-contiguous param).
* ``flat_step`` with several tensors in one flat buffer, one of them split in two pieces.
* Element by element: Grams (zero grad: no move; update = -lr sign(g) |u|), C-Adam
  (disagreeing elements hold, the rest move with eta d / #(u g >= 0)), and the Adam
  equivalences (lam = 1 with any beta3; beta3 = beta1 with any lam).

torch.compile is paid once per session: the compiled backend runs a few configs that cover
its code paths (one pass / two passes, with and without s and decay), on the same shapes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch._dynamo.exc

from sharded_ams import AMS, AdamW, CAdam, Grams
from sharded_ams.kernels import GroupHParams, Piece, flat_step, resolve_backend
from sharded_ams.kernels.eager import compile_available
from sharded_ams.update import bias_corrections, reference_init, reference_step, step_scale

from cases import (CONFIGS, CONFIGS_BY_NAME, FP32_RTOL, Case, assert_matches_reference,
                   compiled_budget_fixture, make_grads, make_param, reference_run,
                   reference_trajectory, rel_err)

compiled_budget = compiled_budget_fixture()
pytestmark = pytest.mark.usefixtures("compiled_budget")

STEPS = 100

#: backend name -> extra constructor kwargs
BACKENDS = {
    "foreach": dict(),
    "single": dict(foreach=False),
    "fused_eager": dict(fused="eager"),
    "fused_compiled": dict(fused="compiled"),
}
#: the compiled backend runs these: one pass (|lam| = 1), and two passes (count, apply)
#: with s and decay. (lam = 1 with decay is covered by test_optimizer's AdamW comparison.)
COMPILED_CONFIGS = ("grams", "lam-0.5_beta3-0.5_wd")

#: (shape, transposed): a transposed param is created as (b, a) and viewed as .t()
SHAPES = [((0,), False), ((1,), False), ((7, 13), False), ((13, 9), True), ((3, 5, 11), False),
          ((257,), False)]

needs_compile = pytest.mark.skipif(not compile_available(), reason="torch.compile unavailable here")


def _backend_params():
    out = []
    for b in BACKENDS:
        for c in CONFIGS:
            if b == "fused_compiled" and c.name not in COMPILED_CONFIGS:
                continue
            marks = [needs_compile] if b == "fused_compiled" else []
            out.append(pytest.param(b, c, id=f"{b}-{c.name}", marks=marks))
    return out


def _logical_shape(shape, transposed):
    return tuple(reversed(shape)) if transposed else tuple(shape)


@functools.lru_cache(maxsize=None)
def _problem(seed: int = 0):
    """Initial params (float64, logical shapes) and STEPS gradients per param."""
    p0s, gss = [], []
    for i, (shape, tr) in enumerate(SHAPES):
        p = make_param(shape, seed + i, torch.float64)
        p0s.append(p.t() if tr else p)
        gss.append(make_grads(_logical_shape(shape, tr), STEPS, seed=seed + 100 + i,
                              zero_frac=0.2))
    return p0s, gss


@functools.lru_cache(maxsize=None)
def _reference(case_name: str):
    case = CONFIGS_BY_NAME[case_name]
    p0s, gss = _problem()
    return [reference_trajectory(p0, gs, **case.ref_kwargs)[-1] for p0, gs in zip(p0s, gss)]


def _make_params(dtype=torch.float32):
    p0s, _ = _problem()
    params = []
    for (shape, tr), p0 in zip(SHAPES, p0s):
        if tr:  # a non-contiguous param: the transpose of a contiguous (b, a) tensor
            base = p0.t().contiguous().to(dtype)
            p = torch.nn.Parameter(base.t())
            assert not p.is_contiguous()
        else:
            p = torch.nn.Parameter(p0.to(dtype).clone())
        params.append(p)
    return params


def _run(opt, params, gss, steps, start=0):
    for t in range(start, start + steps):
        for (shape, tr), p, gs in zip(SHAPES, params, gss):
            g = gs[t]
            # a non-contiguous grad for the transposed param, with the same values
            p.grad = g.t().contiguous().t() if tr else g.clone()
        opt.step()


# --- the oracle itself ------------------------------------------------------------------


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_reference_lam1_is_torch_adamw_float64(wd):
    """lam = 1: the oracle equals torch.optim.AdamW, both in float64 (to ~1e-12)."""
    p0 = make_param((40,), 3, torch.float64)
    gs = make_grads((40,), 120, seed=4, zero_frac=0.2)
    ref = reference_run(p0, gs, lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.0, lam=1.0, eps=1e-8,
                        weight_decay=wd)
    w = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd,
                            foreach=False)
    for g in gs:
        w.grad = g.to(torch.float64)
        opt.step()
    torch.testing.assert_close(ref.p, w.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref.m, opt.state[w]["exp_avg"], rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.v, opt.state[w]["exp_avg_sq"], rtol=1e-12, atol=0)


def test_reference_tie_conventions():
    """u*s == 0 (zero grad, beta3 = 0): weight max(lam, 0); a zero count keeps eta."""
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g1 = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    g2 = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)  # element 0: a tie at step 2
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.0, eps=1e-8, weight_decay=0.0)
    for lam, moves in ((1.0, True), (0.5, True), (0.0, False), (-1.0, False)):
        st = reference_step(reference_init(p, 0.0), g1, lam=lam, **kw)
        before = st.p[0].item()
        st = reference_step(st, g2, lam=lam, **kw)
        assert (st.p[0].item() != before) == moves, lam
    # every element disagrees and lam = 0: #(u*s >= 0) = 0 -> eta^ = eta (no division by 0);
    # no element moves, decoupled decay still applies with eta
    kw3 = {**kw, "beta3": 0.5, "weight_decay": 0.1}
    st = reference_step(reference_init(p, 0.5), g1, lam=0.0, **kw3)
    st.s = -st.s  # s now disagrees with u everywhere
    st2 = reference_step(st, torch.zeros(3, dtype=torch.float64), lam=0.0, **kw3)
    assert ((st2.s * st2.m) < 0).all()
    torch.testing.assert_close(st2.p, st.p * (1 - 0.1 * 0.1), rtol=1e-15, atol=0)


# --- every backend against the oracle ---------------------------------------------------


@pytest.mark.parametrize("backend,case", _backend_params())
def test_backend_matches_reference(backend, case: Case):
    params = _make_params()
    _, gss = _problem()
    opt = case.build(params, **BACKENDS[backend])
    _run(opt, params, gss, STEPS)
    p0s, _ = _problem()
    for p, p0, gs, ref in zip(params, p0s, gss, _reference(case.name)):
        assert_matches_reference(opt, p, ref, what=f"{backend}/{case.name}", p0=p0, grads=gs)
    assert not params[3].is_contiguous()  # the step kept the transposed layout


def _flat_params():
    out = [pytest.param("eager", c, id=f"eager-{c.name}") for c in CONFIGS]
    out += [pytest.param("compiled", CONFIGS_BY_NAME[n], id=f"compiled-{n}", marks=[needs_compile])
            for n in COMPILED_CONFIGS]
    return out


@pytest.mark.parametrize("backend,case", _flat_params())
def test_flat_step_pieces_match_reference(backend, case):
    """Several tensors in one flat buffer, tensor 1 split into two pieces (as across ranks):
    the per-tensor count still runs over the whole tensor. fp32 master + bf16 ``out``."""
    numels = [5, 300, 1]
    steps = 30
    p0s = [make_param((n,), 50 + i, torch.float64) for i, n in enumerate(numels)]
    gss = [make_grads((n,), steps, seed=60 + i, zero_frac=0.2) for i, n in enumerate(numels)]
    refs = [reference_trajectory(p0, gs, **case.ref_kwargs)[-1] for p0, gs in zip(p0s, gss)]
    p = torch.cat(p0s).float()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    s = torch.zeros_like(p) if case.beta3 > 0 else None
    out = torch.empty_like(p, dtype=torch.bfloat16)
    starts = [0, 5, 305]
    pieces = (Piece(0, 5, 0, 5), Piece(5, 105, 1, 300), Piece(105, 305, 1, 300),
              Piece(305, 306, 2, 1))
    hp = GroupHParams.from_group(dict(case.hparams))
    reduced = []
    for t in range(steps):
        g = torch.cat([gs[t] for gs in gss])
        with torch.no_grad():  # as inside Optimizer.step
            flat_step(p, g, m, v, s, out, lr=case.hparams["lr"], step=t + 1, hp=hp, pieces=pieces,
                      num_tensors=3, backend=backend, count_reduce=reduced.append)
    assert len(reduced) == (0 if case.lam_is_unit else steps)
    for i, (ref, n) in enumerate(zip(refs, numels)):
        sl = slice(starts[i], starts[i] + n)
        assert rel_err(p[sl], ref.p) < FP32_RTOL, i
        assert rel_err(m[sl], ref.m) < FP32_RTOL, i
        assert rel_err(v[sl], ref.v) < FP32_RTOL, i
        if s is not None:
            assert rel_err(s[sl], ref.s) < FP32_RTOL, i
    assert torch.equal(out, p.to(torch.bfloat16))


@needs_compile
def test_compiled_recompile_limit_regression():
    """One ordinary step over 9 params of usual shapes compiles a handful of graphs, far
    below dynamo's default recompile limit (8), and matches the eager backend:
    ``x.view(-1)`` would guard on the rank of ``x`` and a Parameter vs a plain tensor on
    requires_grad (a graph per shape); ``_alias`` (a plain 1-D tensor) avoids both."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        shapes = [(10,), (4, 5), (2, 3, 4), (2, 3, 4, 5), (1,), (0,), (3, 3, 3, 3, 3)]
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        params.append(torch.nn.Parameter(torch.randn(5, 6).t()))  # non-contiguous
        params.append(torch.nn.Parameter(torch.randn(8, 4).bfloat16()))  # fp32 master
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        Grams(params, fused="compiled").step()
        Grams(twins, fused="eager").step()
        graphs = counters["stats"]["unique_graphs"]
        # fp32 of any length, bf16 in / fp32 master, lengths 0 and 1 specialised: 3 here
        assert 1 <= graphs <= 4, graphs
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()


@needs_compile
def test_auto_backend_on_cpu_is_compiled():
    assert resolve_backend("auto", torch.device("cpu")) == "compiled"


# --- the special cases, element by element ----------------------------------------------

SPECIAL_BACKENDS = ["foreach", "single", "fused_eager",
                    pytest.param("fused_compiled", marks=needs_compile)]


def _u_from_state(opt, p, hp, t):
    """u = m^ / (sqrt(v^) + eps) from the optimizer's fp32 moments, in float64."""
    st = opt.state[p]
    bc1, bc2 = bias_corrections(t, *hp["betas"])
    m = st["exp_avg"].double()
    v = st["exp_avg_sq"].double()
    return (m / bc1) / ((v / bc2).sqrt() + hp["eps"])


@pytest.mark.parametrize("backend", SPECIAL_BACKENDS)
def test_grams_elementwise(backend):
    """Grams (wd = 0): a zero-grad element does not move; otherwise w -= lr sign(g) |u|."""
    case = CONFIGS_BY_NAME["grams"]
    hp = case.hparams
    n = 400
    p = torch.nn.Parameter(make_param((n,), 11))
    opt = case.build([p], **BACKENDS[backend])
    gs = make_grads((n,), 60, seed=12, zero_frac=0.3)
    n_checked_zero = n_checked_flip = 0
    for t, g in enumerate(gs, start=1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        u = _u_from_state(opt, p, hp, t)
        zero = g == 0
        assert torch.equal(p.detach()[zero], before[zero]), t  # bitwise: no move
        expected = before.double() - hp["lr"] * g.double().sign() * u.abs()
        torch.testing.assert_close(p.detach().double()[~zero], expected[~zero], rtol=1e-6,
                                   atol=1e-9)
        n_checked_zero += int(zero.sum())
        n_checked_flip += int(((u * g.double()) < 0).sum())  # where Grams differs from Adam
    assert n_checked_zero > 1000 and n_checked_flip > 1000


@pytest.mark.parametrize("backend", SPECIAL_BACKENDS)
def test_cadam_elementwise(backend):
    """C-Adam (wd = 0): u g < 0 and g == 0 hold still; u g > 0 move by
    eta d / #(u g >= 0) * u, with the count over the whole tensor."""
    case = CONFIGS_BY_NAME["cadam"]
    hp = case.hparams
    n = 300
    p = torch.nn.Parameter(make_param((n,), 21))
    opt = case.build([p], **BACKENDS[backend])
    gs = make_grads((n,), 60, seed=22, zero_frac=0.3)
    scales = []
    for t, g in enumerate(gs, start=1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        u = _u_from_state(opt, p, hp, t)
        prod = u * g.double()
        hold = prod <= 0
        assert torch.equal(p.detach()[hold], before[hold]), t
        scale = n / int((prod >= 0).sum())
        scales.append(scale)
        expected = before.double() - hp["lr"] * scale * u
        torch.testing.assert_close(p.detach().double()[~hold], expected[~hold], rtol=1e-6,
                                   atol=1e-9)
    assert max(scales) > 1.2  # the rescale was exercised


@pytest.mark.parametrize("backend", ["foreach", "single", "fused_eager"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_equivalences(backend, wd):
    """lam = 1 with any beta3 == AdamW; beta3 = beta1 with any lam == AdamW."""
    n, steps = 257, 50
    p0 = make_param((n,), 31)
    gs = make_grads((n,), steps, seed=32, zero_frac=0.2)
    base = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)

    def run(**kw):
        p = torch.nn.Parameter(p0.clone())
        opt = AMS([p], **base, **kw, **BACKENDS[backend])
        for g in gs:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    adam = run(beta3=0.0, lam=1.0)
    preset = torch.nn.Parameter(p0.clone())
    opt = AdamW([preset], **base, **BACKENDS[backend])
    for g in gs:
        preset.grad = g.clone()
        opt.step()
    assert torch.equal(preset.detach(), adam)
    # lam = 1: beta3 only feeds s, which is then unused -> bitwise the same
    assert torch.equal(run(beta3=0.5, lam=1.0), adam)
    # beta3 = beta1: s == m, so u s >= 0 everywhere -> weight 1 and eta^ = eta for any lam
    for lam in (-1.0, 0.0, 0.5, -0.5):
        torch.testing.assert_close(run(beta3=0.9, lam=lam), adam, rtol=1e-6, atol=1e-7,
                                   msg=f"lam={lam}")
    # and a different lam with beta3 = 0 does differ (the comparison has teeth)
    assert (run(beta3=0.0, lam=-1.0) - adam).abs().max() > 1e-4


def test_presets_hparams():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for cls, (b3, lam) in ((Grams, (0.0, -1.0)), (CAdam, (0.0, 0.0)), (AdamW, (0.0, 1.0))):
        g = cls(p).param_groups[0]
        assert (g["beta3"], g["lam"]) == (b3, lam), cls
        assert isinstance(cls(p), AMS)
    assert AMS(p).param_groups[0]["lam"] == -1.0  # the default is Grams


# --- the step scale, by hand -----------------------------------------------------------
#
# Two steps with beta3 = 0 (s = g), wd = 0, from known signs. At step 1 every u*s > 0. At
# step 2, m = 0.09 g1 + 0.1 g2, so an element with g2 = g1 agrees (u*s > 0), one with
# g2 = -g1/2 disagrees (m keeps g1's sign: 0.04 g1) and one with g2 = 0 ties (u*s = 0).
# The scale is then d / (#agree + #tie + |lam| #disagree), written out as numbers below.
HAND = dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-8)


def hand_grads(g1: list, kinds: str) -> tuple[list, list]:
    """(g1, g2) with g2 = g1 where kinds[i] == "a" (agree), -g1/2 for "d", 0 for "t"."""
    g2 = [g if k == "a" else (-0.5 * g if k == "d" else 0.0) for g, k in zip(g1, kinds)]
    return g1, g2


def hand_two_steps(w0: list, g1: list, g2: list, kinds: str, lam: float, scale: float) -> list:
    """The params after two steps, in plain Python floats from the paper's formulas (no
    code shared with sharded_ams.update); ``scale`` is the hand-counted step-2 scale."""
    lr, b1, b2, eps = HAND["lr"], HAND["b1"], HAND["b2"], HAND["eps"]
    out = []
    for w, a, b, k in zip(w0, g1, g2, kinds):
        m1, v1 = (1 - b1) * a, (1 - b2) * a * a
        w -= lr * (m1 / (1 - b1)) / (math.sqrt(v1 / (1 - b2)) + eps)   # step 1: scale 1
        m2, v2 = b1 * m1 + (1 - b1) * b, b2 * v1 + (1 - b2) * b * b
        u = (m2 / (1 - b1 ** 2)) / (math.sqrt(v2 / (1 - b2 ** 2)) + eps)
        weight = {"a": 1.0, "d": lam, "t": max(lam, 0.0)}[k]
        out.append(w - lr * scale * weight * u)
    return out


#: two tensors with known signs: (g1, kinds, {lam: the step-2 scale counted by hand})
HAND_TENSORS = [
    ([1.0, 2.0, -1.0, -3.0, 1.0, -2.0, 4.0, 1.0], "aaadddtt",
     {0.5: 8 / (5 + 0.5 * 3), -0.5: 8 / (5 + 0.5 * 3)}),       # 3 agree, 3 disagree, 2 ties
    ([1.0, -1.0, 2.0, -2.0, 3.0], "dddda",
     {0.5: 5 / (1 + 0.5 * 4), -0.5: 5 / (1 + 0.5 * 4)}),       # 1 agree, 4 disagree
]


def test_step_scale_by_hand():
    assert step_scale(8, 3, 0.5) == 8 / 6.5 and step_scale(8, 3, -0.5) == 8 / 6.5
    assert step_scale(5, 4, -0.5) == 5 / 3
    assert float(step_scale(8, torch.tensor(3), 0.5)) == pytest.approx(8 / 6.5, rel=1e-15)
    assert step_scale(8, 3, -1.0) == step_scale(8, 3, 1.0) == 1.0   # |lam| = 1: no count
    assert step_scale(4, 4, 0.0) == 1.0                              # zero denominator: eta


@pytest.mark.parametrize("backend", SPECIAL_BACKENDS)
@pytest.mark.parametrize("lam", [0.5, -0.5])
def test_step_scale_by_hand_on_every_backend(backend, lam):
    """Known signs, hand-counted scales: each tensor's params after two steps equal the
    plain-float computation, and the measured step-2 scale on agreeing elements is the
    hand-counted one (so dropping the |lam| #disagree term fails)."""
    params, expected, grads = [], [], []
    for i, (g1, kinds, scales) in enumerate(HAND_TENSORS):
        w0 = [0.5 * (j + 1) * (-1) ** (i + j) for j in range(len(g1))]
        grads.append(hand_grads(g1, kinds))
        params.append(torch.nn.Parameter(torch.tensor(w0)))
        expected.append(hand_two_steps(w0, *grads[-1], kinds, lam, scales[lam]))
    opt = AMS(params, lr=HAND["lr"], betas=(HAND["b1"], HAND["b2"]), eps=HAND["eps"],
              beta3=0.0, lam=lam, weight_decay=0.0, **BACKENDS[backend])
    after1 = []
    for step in (0, 1):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[step])
        opt.step()
        after1 = after1 or [p.detach().double().clone() for p in params]
    for p, w1, exp, (g1, kinds, scales), (a, b) in zip(params, after1, expected, HAND_TENSORS, grads):
        torch.testing.assert_close(p.detach().double(), torch.tensor(exp, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
        j = kinds.index("a")  # an agreeing element: moved by lr * scale * u
        m2, v2 = 0.09 * a[j] + 0.1 * b[j], 0.999 * 0.001 * a[j] ** 2 + 0.001 * b[j] ** 2
        u = (m2 / (1 - 0.81)) / (math.sqrt(v2 / (1 - 0.999 ** 2)) + HAND["eps"])
        measured = float(w1[j] - p.detach().double()[j]) / (HAND["lr"] * u)
        assert measured == pytest.approx(scales[lam], rel=1e-5), (measured, scales[lam])


# Sharded: two 150-element tensors on 3 ranks (each is split across ranks), one group with
# lam = 0.5 and one with lam = -0.5; each rank's share of the counts differs, so the scale
# is right only if the per-tensor counts are summed over ranks.
SHARDED_KINDS = ["a" * 70 + "d" * 50 + "t" * 30,                # 50 disagree, 100 agree/tie
                 "".join("aaddd"[i % 5] for i in range(150))]   # 90 disagree, 60 agree
SHARDED_SCALES = [150 / (100 + 0.5 * 50), 150 / (60 + 0.5 * 90)]
SHARDED_LAMS = [0.5, -0.5]


def _sharded_problem() -> list[tuple[list, list, list]]:
    out = []
    for i, kinds in enumerate(SHARDED_KINDS):
        g1 = [(1 + (j % 7)) * (-1.0) ** (i + j) for j in range(150)]
        w0 = [0.01 * ((j * 37) % 101 - 50) for j in range(150)]
        out.append((w0, *hand_grads(g1, kinds)))
    return out


def _job_sharded_scale() -> dict:
    from sharded_ams import ShardedAMS

    params = [torch.nn.Parameter(torch.tensor(w0)) for w0, _, _ in _sharded_problem()]
    opt = ShardedAMS([{"params": [p], "lam": lam} for p, lam in zip(params, SHARDED_LAMS)],
                     lr=HAND["lr"], betas=(HAND["b1"], HAND["b2"]), eps=HAND["eps"], beta3=0.0,
                     weight_decay=0.0, backend="eager")
    owners = [sorted({r for r in range(3) for pc in opt.shards[0].layout.pieces(r)
                      if pc.slot.index == i}) for i in range(2)]
    for step in (1, 2):
        for p, (_, g1, g2) in zip(params, _sharded_problem()):
            p.grad = torch.tensor(g1 if step == 1 else g2)
        opt.step()
    return {"owners": owners, "params": [p.detach().clone() for p in params]}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_step_scale_by_hand_sharded():
    """ShardedAMS on 3 gloo ranks against the hand-counted scales and plain-float params."""
    from dist_utils import run_distributed

    results = run_distributed(_job_sharded_scale, 3, timeout=240)
    for res in results:
        assert res["owners"] == [[0, 1], [1, 2]]  # both tensors are split across ranks
        for p, (w0, g1, g2), kinds, lam, scale in zip(res["params"], _sharded_problem(),
                                                      SHARDED_KINDS, SHARDED_LAMS, SHARDED_SCALES):
            exp = torch.tensor(hand_two_steps(w0, g1, g2, kinds, lam, scale), dtype=torch.float64)
            # the gradient is averaged over 3 ranks (g/3 summed thrice): last-bit differences
            torch.testing.assert_close(p.double(), exp, rtol=1e-5, atol=1e-6)
