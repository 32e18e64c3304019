"""The Triton kernel on a real GPU against the float64 reference, on large fresh random inputs.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from sharded_ams.kernels import GroupHParams, Piece, flat_step, triton_available
from sharded_ams.update import bias_corrections, direction, step_scale, update_moments

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                                 reason="needs CUDA and triton")]

CASES = [(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0), (-0.5, 0.9)]


def _reference(p, g, m, v, s, step, lr, hp, pieces):
    g64 = g.double()
    m1, v1, s1 = update_moments(g64, m.double(), v.double(), None if s is None else s.double(),
                                hp.beta1, hp.beta2, hp.beta3)
    bc1, bc2 = bias_corrections(step, hp.beta1, hp.beta2)
    wu, neg = direction(g64, m1, v1, s1, bc1, bc2, hp.eps, hp.lam)
    out = p.double().clone()
    for pc in pieces:
        sl = slice(pc.start, pc.end)
        scale = step_scale(pc.numel, int(neg[sl].sum()), hp.lam)
        lr_i = lr * scale
        out[sl] = out[sl] * (1 - lr_i * hp.weight_decay) - lr_i * wu[sl]
    return out, m1, v1, s1


@pytest.mark.parametrize("lam,beta3", CASES)
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_triton_matches_float64_reference_large(lam, beta3, pdtype):
    seed = torch.seed()  # fresh data every run; printed on failure
    n = 50_000_017
    dev = torch.device("cuda")
    g = torch.randn(n, device=dev)
    g[torch.rand(n, device=dev) < 0.05] = 0.0  # exact zeros: the tie convention
    master = torch.randn(n, device=dev)
    m = torch.randn(n, device=dev) * 0.1
    v = torch.rand(n, device=dev) * 0.01
    s = torch.randn(n, device=dev) * 0.1 if beta3 > 0 else None
    pieces = (Piece(0, 1000, 0, 1000), Piece(1000, n, 1, n - 1000))
    hp = GroupHParams(0.9, 0.999, beta3, lam, 1e-8, 0.1)
    step, lr = 7, 1e-3
    ref = _reference(master, g.to(pdtype), m, v, s, step, lr, hp, pieces)
    out = torch.full((n,), float("nan"), device=dev, dtype=pdtype) if pdtype != torch.float32 else None
    flat_step(master, g.to(pdtype), m, v, s, out, lr=torch.tensor(lr, device=dev),
              step=torch.tensor(float(step), device=dev), hp=hp, pieces=pieces, num_tensors=2,
              backend="triton")
    torch.cuda.synchronize()
    for got, want, name in ((master, ref[0], "p"), (m, ref[1], "m"), (v, ref[2], "v")):
        assert torch.isfinite(got).all(), (name, seed)
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 1e-6, (name, rel, seed)
    if out is not None:
        assert torch.equal(out, master.to(pdtype)), seed
