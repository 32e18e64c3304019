"""Multi-tensor AMS step with torch ``_foreach_*`` ops (CPU and GPU, any list of tensors).

The same folded form as ``update.py`` (den = sqrt(v) / sqrt(1 - beta2^t) + eps as a multiply, step size
lr / (1 - beta1^t)). The weight w(u*s) in {1, lam, max(lam, 0)} is written as a quadratic
in sg = sign(m) sign(s): w = a + b sg + c sg^2 with a = max(lam, 0), b = (1 - lam)/2,
c = (1 + lam)/2 - a, which needs no per-tensor ``where`` and is exact for the presets.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..update import Scalar, lam_is_unit, step_scalars, step_scale


def foreach_step(params: Sequence[Tensor], grads: Sequence[Tensor], ms: Sequence[Tensor],
                 vs: Sequence[Tensor], ss: Optional[Sequence[Tensor]],
                 outs: Optional[Sequence[Tensor]], *, lr: Scalar, bc1: Scalar, bc2: Scalar,
                 beta1: float, beta2: float, beta3: float, lam: float, eps: float,
                 wd: float) -> None:
    """One step over lists; ``params`` are fp32 masters, ``outs`` model-dtype copies.
    ``lr``, ``bc1``, ``bc2`` are numbers (no device copy) or device tensors."""
    if not params:
        return
    grads = foreach_moments(grads, ms, vs, ss, beta1=beta1, beta2=beta2, beta3=beta3)
    foreach_apply(params, grads, ms, vs, ss, outs, lr=lr, bc1=bc1, bc2=bc2, lam=lam, eps=eps,
                  wd=wd)


def foreach_moments(grads: Sequence[Tensor], ms: Sequence[Tensor], vs: Sequence[Tensor],
                    ss: Optional[Sequence[Tensor]], *, beta1: float, beta2: float,
                    beta3: float, coef: Optional[Tensor] = None) -> list[Tensor]:
    """Update m, v[, s] in place; returns the gradients as fp32 (the sign reference when
    beta3 == 0), times ``coef`` (a 0-d clip coefficient) if given: new tensors, the
    gradients themselves are not scaled."""
    grads = [g.float() for g in grads]
    if coef is not None:
        grads = torch._foreach_mul(grads, coef)
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    if ss is not None:
        torch._foreach_lerp_(ss, grads, 1 - beta3)
    return grads


def foreach_count(ms: Sequence[Tensor], refs: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's count of u*s < 0 (0-d int64 each) from the updated m and the sign
    reference (s, or g when beta3 == 0): the numbers a sharded tensor sums across ranks."""
    sg = torch._foreach_sign(ms)
    torch._foreach_mul_(sg, torch._foreach_sign(refs))
    return [(x < 0).sum() for x in sg]


def foreach_apply(params: Sequence[Tensor], grads: Sequence[Tensor], ms: Sequence[Tensor],
                  vs: Sequence[Tensor], ss: Optional[Sequence[Tensor]],
                  outs: Optional[Sequence[Tensor]], *, lr: Scalar, bc1: Scalar, bc2: Scalar,
                  lam: float, eps: float, wd: float,
                  counts: Optional[Sequence[Tensor]] = None,
                  numels: Optional[Sequence[int]] = None) -> None:
    """The parameter update from already-updated moments (``grads`` fp32). With lam not
    in {1, -1} each tensor's scale takes ``counts`` and ``numels`` when given (a shard's
    counts summed over the whole tensor; its full size), else counts its own elements."""
    ref = ss if ss is not None else grads
    sc = step_scalars(lr, bc1, bc2, wd)
    den = torch._foreach_sqrt(vs)
    torch._foreach_mul_(den, sc.inv_sqrt_bc2)
    torch._foreach_add_(den, eps)
    sg = None
    if lam == 1.0:  # Adam: w = 1
        wm = ms
    elif lam == -1.0:  # Grams: w m = sign(s) |m|
        wm = torch._foreach_abs(ms)
        torch._foreach_mul_(wm, torch._foreach_sign(ref))
    else:
        sg = torch._foreach_sign(ms)
        torch._foreach_mul_(sg, torch._foreach_sign(ref))
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
            torch._foreach_mul_(params, sc.decay)
        if not isinstance(sc.step_size, Tensor):  # a host number: one fused pass
            torch._foreach_addcdiv_(params, wm, den, value=-sc.step_size)
        else:
            wu = torch._foreach_div(wm, den)
            torch._foreach_mul_(wu, sc.step_size)
            torch._foreach_sub_(params, wu)
    else:  # per-tensor eta^ from each tensor's count (device tensors: no sync)
        for i, (p, x, d, sgn) in enumerate(zip(params, wm, den, sg)):
            neg = (sgn < 0).sum() if counts is None else counts[i]
            numel = p.numel() if numels is None else numels[i]
            sct = step_scalars(lr * step_scale(numel, neg, lam), bc1, bc2, wd)
            if wd != 0.0:
                p.mul_(sct.decay)
            p.sub_(x.div_(d).mul_(sct.step_size))
    if outs is not None:
        torch._foreach_copy_(outs, params)
