"""The AMS update as pure functions: the one oracle every backend is tested against.

AMS (Adaptive Momentum Scaling, the Grams paper, Algorithm 1) with the project's
conventions (see ``docs/maths.md``)::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    s = b3 s + (1 - b3) g            (no state when b3 == 0: s = g)
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    w = 1 where u*s > 0,  lam where u*s < 0,  max(lam, 0) where u*s == 0
    eta^ = eta * d / (#(u*s >= 0) + |lam| #(u*s < 0))   per tensor; eta when |lam| == 1
    p = p * (1 - eta^ wd) - eta^ * w * u

Everything here is plain elementwise torch, so the same functions run in float64
as the reference and inside ``torch.compile`` as the fused CPU pass.
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
    """(1 - beta1^t, 1 - beta2^t); ``step`` may be a number or a 0-d tensor."""
    if isinstance(step, Tensor):
        return 1 - torch.pow(beta1, step), 1 - torch.pow(beta2, step)
    return 1 - beta1**step, 1 - beta2**step


def update_moments(g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
                   beta1: Scalar, beta2: Scalar, beta3: Scalar):
    """New (m, v, s) from the gradient. ``s`` is None when beta3 == 0 (then s = g)."""
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + g * g * (1 - beta2)
    if s is not None:
        s = s * beta3 + g * (1 - beta3)
    return m, v, s


def direction(g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor], bc1: Scalar,
              bc2: Scalar, eps: Scalar, lam: float):
    """Weighted direction w*u and the mask of elements with u*s < 0 (for the count)."""
    u = (m / bc1) / ((v / bc2).sqrt() + eps)
    sign_ref = g if s is None else s
    prod = u * sign_ref
    tie_weight = max(float(lam), 0.0)
    w = torch.where(prod > 0, 1.0, torch.where(prod < 0, float(lam), tie_weight))
    return w * u, prod < 0


def step_scale(numel: int, neg_count: Union[int, Tensor], lam: float) -> Union[float, Tensor]:
    """eta^/eta = d / (#(u*s>=0) + |lam| #(u*s<0)) for one tensor; 1 if the denominator is 0."""
    if lam_is_unit(lam):
        return 1.0
    denom = (numel - neg_count) + abs(float(lam)) * neg_count
    if isinstance(denom, Tensor):
        denom = denom.to(torch.float64)
        return torch.where(denom > 0, numel / denom.clamp_min(1e-300), torch.ones_like(denom))
    return numel / denom if denom > 0 else 1.0


def apply_update(p: Tensor, wu: Tensor, lr: Scalar, weight_decay: Scalar) -> Tensor:
    """Decoupled weight decay then the step, in torch.optim.AdamW's order."""
    return p * (1 - lr * weight_decay) - lr * wu


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
    """One AMS step of one whole tensor in the state's dtype (use float64 as the oracle)."""
    g = g.to(state.p.dtype)
    t = state.step + 1
    m, v, s = update_moments(g, state.m, state.v, state.s, beta1, beta2, beta3)
    bc1, bc2 = bias_corrections(t, beta1, beta2)
    wu, neg = direction(g, m, v, s, bc1, bc2, eps, lam)
    scale = step_scale(g.numel(), int(neg.sum()), lam)
    p = apply_update(state.p, wu, lr * scale, weight_decay)
    return RefState(p, m, v, s, t)


def reference_init(p: Tensor, beta3: float, dtype: torch.dtype = torch.float64) -> RefState:
    """Fresh reference state for a tensor (zeros for m, v and s)."""
    p = p.detach().to(dtype).clone()
    z = torch.zeros_like(p)
    return RefState(p, z.clone(), z.clone(), z.clone() if beta3 > 0 else None, 0)


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
