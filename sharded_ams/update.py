"""The AMS update as pure functions: the maths every backend runs, in one place.

AMS (Adaptive Momentum Scaling, the Grams paper, Algorithm 1) with the project's
conventions (see ``docs/maths.md``)::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    s = b3 s + (1 - b3) g            (no state when b3 == 0: s = g)
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    w = 1 where u*s > 0,  lam where u*s < 0,  max(lam, 0) where u*s == 0
    eta^ = eta * d / (#(u*s >= 0) + |lam| #(u*s < 0))   per tensor; eta when |lam| == 1
    p = p * (1 - eta^ wd) - eta^ * w * u

It is computed in the form torch.optim.AdamW uses, with the bias corrections folded into
per-step scalars (:class:`StepScalars`, computed once per step in float64)::

    den = sqrt(v) * (1 / sqrt(1 - b2^t)) + eps    (= sqrt(v^) + eps)
    p   = p * decay - step_size * (w * m / den)   step_size = eta^ / (1 - b1^t),
                                                  decay = 1 - eta^ wd
    u*s > 0  <=>  m, s both > 0 or both < 0       (the denominators are > 0)

so each element costs one division and one square root (AdamW's form costs two
divisions), and the sign test is exact (compares of m and s: no product to underflow). Everything here is plain elementwise torch, so the same functions run in
float64 as the precision reference and inside ``torch.compile`` as the fused CPU pass.
``tests/oracle.py`` is an independent float64 implementation written from the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

#: Named presets: (beta3, lam). ``beta3=None`` keeps the user's (or default) value.
PRESETS: dict[str, dict[str, float]] = {
    "grams": {"beta3": 0.0, "lam": -1.0},
    "cadam": {"beta3": 0.0, "lam": 0.0},
    "adamw": {"beta3": 0.0, "lam": 1.0},
}


def lam_is_unit(lam: float) -> bool:
    """|lam| == 1: the scale eta^ is exactly eta and no count is needed."""
    return abs(float(lam)) == 1.0


def bias_corrections(step: Scalar, beta1: float, beta2: float) -> tuple[Scalar, Scalar]:
    """(1 - beta1^t, 1 - beta2^t); ``step`` may be a number or a 0-d tensor (then the
    result is float64 on its device, as the host computes it)."""
    if isinstance(step, Tensor):
        step = step.to(torch.float64)
        return 1 - torch.pow(beta1, step), 1 - torch.pow(beta2, step)
    return 1 - beta1**step, 1 - beta2**step


@dataclass(frozen=True)
class StepScalars:
    """The per-step scalars of the folded form: Python floats (computed in float64 on the
    host: no device copy, no sync) or 0-d / per-tensor device tensors (a device step or lr:
    the path a CUDA graph can capture)."""

    step_size: Scalar   # eta^ / (1 - beta1^t)
    decay: Scalar       # 1 - eta^ * weight_decay
    inv_sqrt_bc2: Scalar  # 1 / sqrt(1 - beta2^t)
    #: the three as one fp32[3] device vector when they were computed together on the
    #: device (``kernels/scalars.py``); the fields are then its 0-d views
    packed: Optional[Tensor] = None


def step_scalars(lr: Scalar, bc1: Scalar, bc2: Scalar, weight_decay: float) -> StepScalars:
    """Fold lr (or per-tensor eta^) and the bias corrections into :class:`StepScalars`.
    Tensors stay tensors (float64 maths, one fp32 rounding); numbers stay numbers."""
    if any(isinstance(x, Tensor) for x in (lr, bc1, bc2)):
        lr, bc1, bc2 = (x.double() if isinstance(x, Tensor) else x for x in (lr, bc1, bc2))
        f32 = (lambda x: x.float() if isinstance(x, Tensor) else float(x))
        inv = 1 / bc2.sqrt() if isinstance(bc2, Tensor) else 1 / math.sqrt(bc2)
        return StepScalars(f32(lr / bc1), f32(1 - lr * weight_decay), f32(inv))
    return StepScalars(lr / bc1, 1 - lr * weight_decay, 1 / math.sqrt(bc2))


def scaled_step_scalars(lr: Scalar, bc1: Scalar, bc2: Scalar, numels: Tensor,
                        neg_counts: Tensor, lam: float, weight_decay: float) -> StepScalars:
    """lam not in {1, -1}: each tensor's eta^ = lr * :func:`step_scale` (from its full
    ``numels`` and its count of u*s < 0, tensors of one entry per tensor) folded with the
    bias corrections: ``step_size`` and ``decay`` fp32 tensors of one entry per tensor."""
    scale = step_scale(numels, neg_counts, lam)
    return step_scalars(lr * scale if isinstance(lr, float) else lr.double() * scale, bc1, bc2,
                        weight_decay)


def update_moments(g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
                   beta1: Scalar, beta2: Scalar, beta3: Scalar):
    """New (m, v, s) from the gradient. ``s`` is None when beta3 == 0 (then s = g)."""
    m, s = sign_moments(g, m, s, beta1, beta3)
    v = v * beta2 + g * g * (1 - beta2)
    return m, v, s


def sign_moments(g: Tensor, m: Tensor, s: Optional[Tensor], beta1: Scalar, beta3: Scalar):
    """The new (m, s) alone: what the sign test u*s reads (v is positive). The count pass
    of lam not in {1, -1} computes them without storing, and the step that follows
    recomputes them here, bit for bit."""
    m = m * beta1 + g * (1 - beta1)
    if s is not None:
        s = s * beta3 + g * (1 - beta3)
    return m, s


def agreement(m: Tensor, sign_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Masks (u*s > 0, u*s < 0), exactly, from the signs of m and s (u = m / positive):
    compares, no product that could underflow (and cheaper than ``torch.sign``)."""
    mp, mn, sp, sn = m > 0, m < 0, sign_ref > 0, sign_ref < 0
    return (mp & sp) | (mn & sn), (mp & sn) | (mn & sp)


def weighted(m: Tensor, sign_ref: Tensor, lam: float) -> Tensor:
    """w * m with w = 1 where u*s > 0, lam where u*s < 0, max(lam, 0) on a tie (u*s == 0),
    selected rather than multiplied. The presets take shorter, equal forms: Adam (lam = 1)
    is m; Grams (lam = -1) is sign(s) |m| (0 on a tie). The update p - step (w m / den) is
    the same bit for bit (a zero may differ in sign only); fewer operations."""
    lam = float(lam)
    if lam == 1.0:
        return m
    if lam == -1.0:  # (copysign was measured slower in the compiled CPU loop)
        a = m.abs()
        return torch.where(sign_ref > 0, a, torch.where(sign_ref < 0, -a, 0.0))
    agree, disagree = agreement(m, sign_ref)
    return torch.where(agree, m, torch.where(disagree, lam * m, max(lam, 0.0) * m))


def denominator(v: Tensor, inv_sqrt_bc2: Scalar, eps: Scalar) -> Tensor:
    """sqrt(v^) + eps. A multiply by the host-rounded 1/sqrt(1 - beta2^t) rather than a
    division: one division fewer per element, and the same rounding on every backend."""
    return v.sqrt() * inv_sqrt_bc2 + eps


def new_param(p: Tensor, wm: Tensor, den: Tensor, step_size: Scalar,
              decay: Optional[Scalar]) -> Tensor:
    """Decoupled weight decay, then the step, in torch.optim.AdamW's order (``decay``
    None: no weight decay, no multiply)."""
    return (p if decay is None else p * decay) - step_size * (wm / den)


def step_scale(numel: Union[int, Tensor], neg_count: Union[int, Tensor],
               lam: float) -> Union[float, Tensor]:
    """eta^/eta = d / (#(u*s>=0) + |lam| #(u*s<0)) for one tensor; 1 if the denominator
    is 0. Counts may be tensors (one entry per tensor); the result is then float64."""
    if lam_is_unit(lam):
        return 1.0
    if isinstance(numel, Tensor) or isinstance(neg_count, Tensor):
        d = torch.as_tensor(numel).to(torch.float64)
        neg = torch.as_tensor(neg_count).to(torch.float64)
        denom = (d - neg) + abs(float(lam)) * neg
        return torch.where(denom > 0, d / denom.clamp_min(1e-300), torch.ones_like(denom))
    denom = (numel - neg_count) + abs(float(lam)) * neg_count
    return numel / denom if denom > 0 else 1.0


@dataclass
class RefState:
    """Float64 state of one tensor for the reference optimizer."""

    p: Tensor
    m: Tensor
    v: Tensor
    s: Optional[Tensor]
    step: int = 0


def reference_step(state: RefState, g: Tensor, *, lr: float, beta1: float, beta2: float,
                   beta3: float, lam: float, eps: float, weight_decay: float) -> RefState:
    """One AMS step of one whole tensor in the state's dtype (float64: the precision
    reference of the backends, which run these same functions in fp32)."""
    g = g.to(state.p.dtype)
    t = state.step + 1
    m, v, s = update_moments(g, state.m, state.v, state.s, beta1, beta2, beta3)
    ref = g if s is None else s
    scale = step_scale(g.numel(), int(agreement(m, ref)[1].sum()), lam)
    sc = step_scalars(lr * scale, *bias_corrections(t, beta1, beta2), weight_decay)
    p = new_param(state.p, weighted(m, ref, lam), denominator(v, sc.inv_sqrt_bc2, eps),
                  sc.step_size, sc.decay)
    return RefState(p, m, v, s, t)


def reference_init(p: Tensor, beta3: float, dtype: torch.dtype = torch.float64) -> RefState:
    """Fresh reference state for a tensor (zeros for m, v and s)."""
    p = p.detach().to(dtype).clone()
    z = torch.zeros_like(p)
    return RefState(p, z.clone(), z.clone(), z.clone() if beta3 > 0 else None, 0)


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
