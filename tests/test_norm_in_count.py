"""``ShardedAMS`` with the non-finite skip, no clipping and every group per-tensor scaled
(C-Adam, any lam not in {1, -1}) takes the gradient norm with the count pass
(``shard_step.step_shards_norm_in_count``): one all-reduce carries both.

Checked at world size 1 on both CPU backends and on the three ways a run is counted (one
piece; pieces averaging >= ``SEGMENT_LOOP_MIN_AVG``, one call over the list; short
pieces, per-element tables): the reported norm against float64, a NaN in the LAST piece
of a run skips the step and stores nothing, and the params follow the independent
float64 oracle. The collective counts at world size > 1 are in test_sharded_features.py
and test_sharded_tp.py (one small all-reduce for the counts and the norm).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sharded_ams.sharded as sharded_mod
from cases import make_grads, make_param
from oracle import AMSOracle
from sharded_ams import ShardedAMS
from sharded_ams.kernels.eager import SEGMENT_LOOP_MIN_AVG, _by_segment
from sharded_ams.shard_step import run_table_of

STEPS, NAN_AT, LR, WD = 5, 2, 1e-2, 0.1
#: params of one run (one bucket, one group): one piece; pieces long enough for the
#: one-call-per-list path; many short ones (per-element tables)
LAYOUTS = {
    "single": [(256, 384)],  # a multiple of the alignment: no padding after it
    "segments": [(SEGMENT_LOOP_MIN_AVG * 4 + 11,), (512, 260), (SEGMENT_LOOP_MIN_AVG * 3 - 5,)],
    "table": [(37, 11), (1500,), (3,), (64, 9)],
}


def _run(backend: str, shapes, lam: float, **kw) -> dict:
    p0s = [make_param(s, 500 + i) for i, s in enumerate(shapes)]
    gss = [make_grads(s, STEPS, seed=510 + i, zero_frac=0.2) for i, s in enumerate(shapes)]
    gss[-1][NAN_AT].view(-1)[-3] = float("nan")  # the last piece of the run
    params = [torch.nn.Parameter(p.clone()) for p in p0s]
    opt = ShardedAMS(params, lam=lam, beta3=0.0, lr=LR, weight_decay=WD, backend=backend,
                     broadcast_params=False, **kw)
    oracle = AMSOracle.start(p0s, lr=LR, betas=(0.9, 0.999), eps=1e-8, beta3=0.0, lam=lam,
                             weight_decay=WD)
    out = dict(norm_err=[], skipped=[], stored_on_skip=None, param_err=[])
    for t in range(STEPS):
        for p, gs in zip(params, gss):
            p.grad = gs[t].clone()
        before = [p.detach().clone() for p in params] + [
            x.clone() for sh in opt.shards for x in sh.state.values()]
        opt.step()
        opt.finish_param_sync()
        out["skipped"].append(opt.last_step.skipped)
        if t == NAN_AT:
            after = [p.detach() for p in params] + [
                x for sh in opt.shards for x in sh.state.values()]
            out["stored_on_skip"] = not all(torch.equal(a, b) for a, b in zip(before, after))
            out["nan_norm"] = opt.last_step.grad_norm
            continue
        g64 = [gs[t].double() for gs in gss]
        norm = math.sqrt(sum(float((g * g).sum()) for g in g64))
        out["norm_err"].append(abs(opt.last_step.grad_norm - norm) / norm)
        oracle.step(g64)
        out["param_err"].append(max(  # relative to how far the oracle moved
            float(np.abs(p.detach().double().numpy() - o.p).max()
                  / np.abs(o.p - p0.double().numpy()).max())
            for p, p0, o in zip(params, p0s, oracle.tensors)))
    out["steps"] = int(opt.param_groups[0]["step"])
    sh = opt.shards[0]
    tables = [run_table_of(sh, i, run) for i, run in enumerate(sh.runs)]
    out["paths"] = ["single" if t.single is not None else "segments" if _by_segment(t)
                    else "table" for t in tables]
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_norm_from_the_count_pass_skips_and_stays_exact(backend, layout, monkeypatch):
    calls = []
    real = sharded_mod.global_grad_norm
    monkeypatch.setattr(sharded_mod, "global_grad_norm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    lam = 0.0 if layout != "table" else -0.5
    r = _run(backend, LAYOUTS[layout], lam)
    assert calls == [], "the norm pass ran: the norm was not taken with the count"
    assert r["skipped"] == [t == NAN_AT for t in range(STEPS)]
    assert not math.isfinite(r["nan_norm"]) and not r["stored_on_skip"]
    assert r["steps"] == STEPS - 1
    # float64 squares summed in float64: only the order of the sum differs
    assert max(r["norm_err"]) < 1e-12, r["norm_err"]
    # fp32 rounding of p ~ 1 (6e-8 a step) against ~1e-2 of movement: measured <= 2.7e-5;
    # a count off by 1% of a tensor moves it 1e-2 off
    assert max(r["param_err"]) < 1e-4, r["param_err"]
    assert r["paths"] == [layout]  # one run, counted the way the layout is named for


@pytest.mark.parametrize("kw, lams", [(dict(max_grad_norm=1.0), (0.0,)),
                                      (dict(), (0.0, -1.0))])
def test_norm_pass_where_the_count_cannot_take_it(kw, lams, monkeypatch):
    """Clipping needs the norm before the count (the count reads g * coef); a group with
    |lam| = 1 is stepped in one pass, with the skip known before: the norm pass runs."""
    calls = []
    real = sharded_mod.global_grad_norm
    monkeypatch.setattr(sharded_mod, "global_grad_norm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    params = [torch.nn.Parameter(make_param((40, 30), 1)), torch.nn.Parameter(make_param((50,), 2))]
    groups = [dict(params=[p], lam=lam, beta3=0.0) for p, lam in zip(params, lams * 2)]
    opt = ShardedAMS(groups, lr=LR, backend="eager", broadcast_params=False, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [1]


def test_two_dtype_shards_step_as_the_norm_pass_path(monkeypatch):
    """A bf16 param (fp32 master, gradient reduced in fp32) and an fp32 one: two dtype
    shards, one count vector, one all-reduce. Params and every state tensor equal,
    bitwise, those of the same run through the separate norm pass (its exactness is
    tested against the oracles in test_sharded.py), a NaN in the bf16 gradient skips the
    step, and the norm is the float64 one of the gradients as reduced."""
    def run(fold: bool) -> tuple:
        monkeypatch.setattr(sharded_mod, "norm_in_count",
                            sharded_mod.norm_in_count if fold else (lambda groups: False))
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 70).to(torch.bfloat16)),
                  torch.nn.Parameter(torch.randn(513))]
        opt = ShardedAMS(params, preset="cadam", lr=LR, weight_decay=WD, backend="eager",
                         broadcast_params=False)
        norms, skipped = [], []
        for t in range(STEPS):
            gen = torch.Generator().manual_seed(t)
            grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
            if t == NAN_AT:
                grads[0][7, 3] = float("nan")
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            norms.append((opt.last_step.grad_norm,
                          math.sqrt(sum(float(g.double().square().sum()) for g in grads))))
            skipped.append(opt.last_step.skipped)
        opt.finish_param_sync()
        state = [x.clone() for sh in opt.shards for x in sh.state.values()]
        return [p.detach().clone() for p in params], state, norms, skipped, len(opt.shards)

    p1, s1, n1, k1, shards = run(True)
    p0, s0, _, k0, _ = run(False)
    assert shards == 2
    assert k1 == k0 == [t == NAN_AT for t in range(STEPS)]
    assert all(torch.equal(a, b) for a, b in zip(p1 + s1, p0 + s0))
    for t, (got, want) in enumerate(n1):
        if t != NAN_AT:
            assert abs(got - want) <= 1e-12 * want, (t, got, want)
