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
    """One step over lists; ``params`` are fp32 masters, ``outs`` model-dtype copies.

    Few passes: m by lerp, the direction's sign from m (sqrt(v^) + eps > 0, so
    sign(u) = sign(m)), and the bias correction of m folded into the step size.
    """
    if not params:
        return
    grads = [g.float() for g in grads]
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    if ss is not None:
        torch._foreach_lerp_(ss, grads, 1 - beta3)
    ref = ss if ss is not None else grads
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    step_size = lr / bc1  # u = m / bc1 / denom
    if lam == 1.0:  # Adam: w = 1
        wm = ms
    elif lam == -1.0:  # Grams: w u = sign(s) |u|
        wm = torch._foreach_abs(ms)
        torch._foreach_mul_(wm, torch._foreach_sign(ref))
    else:
        sg = torch._foreach_mul(ms, ref)
        torch._foreach_sign_(sg)
        tie = max(lam, 0.0)
        b, c = (1 - lam) / 2, (1 + lam) / 2 - tie
        wm = torch._foreach_mul(sg, b)
        if c != 0.0:
            torch._foreach_addcmul_(wm, sg, sg, value=c)
        if tie != 0.0:
            torch._foreach_add_(wm, tie)
        torch._foreach_mul_(wm, ms)
    if lam_is_unit(lam):
        if wd != 0.0:
            torch._foreach_mul_(params, 1 - lr * wd)
        if step_size.device.type == "cpu":  # a host number costs no sync: one fused pass
            torch._foreach_addcdiv_(params, wm, denom, value=-float(step_size))
        else:
            wu = torch._foreach_div(wm, denom)
            torch._foreach_mul_(wu, step_size)
            torch._foreach_sub_(params, wu)
    else:
        for p, x, d, sgn in zip(params, wm, denom, sg):
            scale = step_scale(p.numel(), (sgn < 0).sum(), lam)
            if wd != 0.0:
                p.mul_(1 - lr * scale * wd)
            p.sub_(x.div_(d).mul_(step_size * scale))
    if outs is not None:
        torch._foreach_copy_(outs, params)
