"""Every backend against the independent numpy oracle (``tests/oracle.py``), over many steps.

``update.py`` is the maths the backends run, so comparing them with its float64 run
(``test_update.py``) checks precision only; the oracle is written separately from the
paper and checks meaning. Cases: the three presets with decay and general AMS with
lam=-0.5, beta3=0.9 (``cases.ORACLE_CASES``); backends: ``AMS`` with foreach, per-tensor
eager, fused eager, fused compiled and the CPU default's one compiled call over all
tensors, and ``flat_step`` over one flat run holding every
tensor (one split in two pieces, padding between) for eager and compiled (the compiled
backend on its two code paths, ``COMPILED_CASES``). The Triton kernel is checked against
the same oracle, every case, in ``test_triton_interpret.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sharded_ams import optimizer as optimizer_mod
from sharded_ams.kernels import GroupHParams, Piece, flat_step
from sharded_ams.kernels.eager import compile_available

from cases import (FP32_RTOL, ORACLE_CASES, Case, compiled_budget_fixture, error_scales,
                   make_grads, make_param, rel_err)
from oracle import AMSOracle

compiled_budget = compiled_budget_fixture()
pytestmark = pytest.mark.usefixtures("compiled_budget")
needs_compile = pytest.mark.skipif(not compile_available(), reason="torch.compile unavailable here")

STEPS = 150
#: (shape, dtype, transposed): a 0-size, a 1-element, an odd 2-D, a transposed and a bf16 param
SPECS = [((0,), torch.float32, False), ((1,), torch.float32, False),
         ((7, 13), torch.float32, False), ((13, 9), torch.float32, True),
         ((300,), torch.float32, False), ((6, 11), torch.bfloat16, False)]
AMS_BACKENDS = {"foreach": dict(foreach=True), "single": dict(foreach=False),
                "fused_eager": dict(fused="eager"), "fused_compiled": dict(fused="compiled"),
                # the CPU default on a big group: ONE compiled call over every contiguous
                # tensor (kernels/multi.py; the transposed one goes per tensor)
                "default_compiled": dict()}


@functools.lru_cache(maxsize=None)
def _problem():
    p0s, gss = [], []
    for i, (shape, dtype, tr) in enumerate(SPECS):
        base = make_param(shape, 500 + i, dtype)
        p0s.append(base.t() if tr else base)
        logical = tuple(reversed(shape)) if tr else shape
        gss.append(make_grads(logical, STEPS, seed=600 + i, zero_frac=0.2, dtype=dtype))
    return p0s, gss


@functools.lru_cache(maxsize=None)
def _oracle(case_name: str) -> AMSOracle:
    case = {c.name: c for c in ORACLE_CASES}[case_name]
    p0s, gss = _problem()
    oracle = AMSOracle.start(p0s, **case.hparams)
    for t in range(STEPS):
        oracle.step([gs[t] for gs in gss])
    return oracle


def _params():
    p0s, _ = _problem()
    out = []
    for (shape, dtype, tr), p0 in zip(SPECS, p0s):
        out.append(torch.nn.Parameter(p0.t().clone().t() if tr else p0.clone()))
    return out


#: the compiled backend runs its two code paths (one pass; two passes with s), which the
#: other presets share with a different lam constant: each case is a compile (seconds)
COMPILED_CASES = ("grams_wd", "lam-0.5_beta3-0.9_wd")


def _cases(backends):
    out = []
    for b in backends:
        compiled = "compiled" in b  # default_compiled too
        out += [pytest.param(b, c, id=f"{b}-{c.name}", marks=[needs_compile] if compiled else [])
                for c in ORACLE_CASES if not compiled or c.name in COMPILED_CASES]
    return out


def _assert_matches_oracle(states: list[dict], case: Case, what: str) -> None:
    """``states[i]``: tensor i's fp32 param (master), exp_avg, exp_avg_sq[, exp_avg_s]."""
    p0s, gss = _problem()
    oracle = _oracle(case.name)
    moved = 0.0
    for i, (st, p0, gs) in enumerate(zip(states, p0s, gss)):
        scales = error_scales(p0, gs)
        want = oracle.state(i)
        assert set(want) <= set(st), (what, sorted(st))
        for k, w in want.items():
            err = rel_err(st[k], w.reshape(st[k].shape), scales[k])
            assert err < FP32_RTOL, f"{what}: tensor {i} {k} vs the oracle: rel err {err:.3g}"
        if p0.numel():
            moved = max(moved, rel_err(want["param"], p0.double().reshape(-1).reshape(want["param"].shape)))
    assert moved > 1e-2, "the oracle barely moved: the comparison would have no teeth"


@pytest.mark.parametrize("backend,case", _cases(AMS_BACKENDS))
def test_ams_matches_oracle(backend, case: Case, monkeypatch):
    if backend == "default_compiled":
        monkeypatch.setattr(optimizer_mod, "COMPILE_MIN_NUMEL", 0)
    params = _params()
    _, gss = _problem()
    opt = case.build(params, **AMS_BACKENDS[backend])
    for t in range(STEPS):
        for p, gs in zip(params, gss):
            g = gs[t]
            p.grad = g.t().contiguous().t() if not p.is_contiguous() else g.clone()
        opt.step()
    states = []
    for p in params:
        st = opt.state[p]
        states.append({"param": st.get("master", p.detach()),
                       **{k: st[k] for k in ("exp_avg", "exp_avg_sq", "exp_avg_s") if k in st}})
    _assert_matches_oracle(states, case, f"AMS {backend}")


@pytest.mark.parametrize("backend,case", _cases(["eager", "compiled"]))
def test_flat_step_matches_oracle(backend, case: Case):
    """All tensors in one flat run, 16-element padding between them, tensor 4 split in
    two pieces: the scale counts over each whole tensor."""
    p0s, gss = _problem()
    numels = [p.numel() for p in p0s]
    starts, pos = [], 0
    for n in numels:
        starts.append(pos)
        pos += -(-n // 16) * 16 if n else 16
    total = pos
    pieces = []
    for i, (s0, n) in enumerate(zip(starts, numels)):
        if i == 4:
            pieces += [Piece(s0, s0 + 100, i, n), Piece(s0 + 100, s0 + n, i, n)]
        elif n:
            pieces.append(Piece(s0, s0 + n, i, n))
    p = torch.zeros(total)
    for s0, p0 in zip(starts, p0s):
        p[s0:s0 + p0.numel()] = p0.reshape(-1).float()
    m, v = torch.zeros(total), torch.zeros(total)
    s = torch.zeros(total) if case.beta3 > 0 else None
    hp = GroupHParams.from_group(dict(case.hparams))
    for t in range(STEPS):
        g = torch.zeros(total)
        for s0, gs in zip(starts, gss):
            g[s0:s0 + gs[t].numel()] = gs[t].reshape(-1).float()
        with torch.no_grad():
            flat_step(p, g, m, v, s, None, lr=case.hparams["lr"], step=t + 1, hp=hp,
                      pieces=tuple(pieces), num_tensors=len(numels), backend=backend)
    states = []
    for s0, p0 in zip(starts, p0s):
        sl = slice(s0, s0 + p0.numel())
        st = {"param": p[sl], "exp_avg": m[sl], "exp_avg_sq": v[sl]}
        if s is not None:
            st["exp_avg_s"] = s[sl]
        states.append(st)
    _assert_matches_oracle(states, case, f"flat_step {backend}")
    pad = torch.ones(total, dtype=torch.bool)
    for s0, n in zip(starts, numels):
        pad[s0:s0 + n] = False
    assert (p[pad] == 0).all() and (m[pad] == 0).all(), "padding moved"
