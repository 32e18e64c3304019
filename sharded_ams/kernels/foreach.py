"""Multi-tensor AMS step with torch ``_foreach_*`` ops (CPU and GPU, any list of tensors).

The weight w(u*s) in {1, lam, max(lam, 0)} is written as a quadratic in
sg = sign(u*s): w = a + b sg + c sg^2 with a = max(lam, 0), b = (1 - lam)/2,
c = (1 + lam)/2 - a, which needs no per-tensor ``where`` and is exact for the presets.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..update import lam_is_unit, step_scale


def foreach_step(params: Sequence[Tensor], grads: Sequence[Tensor], ms: Sequence[Tensor],
                 vs: Sequence[Tensor], ss: Optional[Sequence[Tensor]],
                 outs: Optional[Sequence[Tensor]], *, lr: Tensor, bc1: Tensor, bc2: Tensor,
                 beta1: float, beta2: float, beta3: float, lam: float, eps: float,
                 wd: float) -> None:
    """One step over lists; ``params`` are fp32 masters, ``outs`` model-dtype copies."""
    if not params:
        return
    grads = [g.float() for g in grads]
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    if ss is not None:
        torch._foreach_mul_(ss, beta3)
        torch._foreach_add_(ss, grads, alpha=1 - beta3)
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(ms, bc1)
    torch._foreach_div_(u, denom)
    if lam == 1.0:
        wu = u
    else:
        sg = torch._foreach_mul(u, ss if ss is not None else grads)
        torch._foreach_sign_(sg)
        tie = max(lam, 0.0)
        b, c = (1 - lam) / 2, (1 + lam) / 2 - tie
        w = torch._foreach_mul(sg, b)
        if c != 0.0:
            torch._foreach_addcmul_(w, sg, sg, value=c)
        if tie != 0.0:
            torch._foreach_add_(w, tie)
        wu = torch._foreach_mul(w, u)
    if lam_is_unit(lam):
        if wd != 0.0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(wu, lr)
        torch._foreach_sub_(params, wu)
    else:
        for p, x, sgn in zip(params, wu, sg):
            lr_i = lr * step_scale(p.numel(), (sgn < 0).sum(), lam)
            if wd != 0.0:
                p.mul_(1 - lr_i * wd)
            p.sub_(x * lr_i)
    if outs is not None:
        torch._foreach_copy_(outs, params)
