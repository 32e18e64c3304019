"""Hyperparameter defaults and validation, shared by every AMS optimizer class."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .update import PRESETS

#: the param dtypes AMS steps (fp32 maths; the 16-bit ones keep fp32 masters)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "beta3": 0.0,
    "lam": -1.0,
    "eps": 1e-8,
    "weight_decay": 0.0,
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"Invalid {name} value: {value}")
    return float(value)


def validate_hparams(lr: Any, betas: Any, beta3: Any, lam: Any, eps: Any,
                     weight_decay: Any) -> None:
    """Raise ValueError naming the first bad hyperparameter, like torch.optim does."""
    if _number("learning rate", lr) < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    try:
        b = tuple(betas)
    except TypeError:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}") from None
    if len(b) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(b):
        if not 0.0 <= _number(f"beta parameter at index {i}", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= _number("beta3", beta3) < 1.0:
        raise ValueError(f"Invalid beta3 value: {beta3}")
    _number("lam", lam)
    if not _number("epsilon value", eps) > 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if _number("weight_decay value", weight_decay) < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def validate_group(group: dict) -> None:
    validate_hparams(group["lr"], group["betas"], group["beta3"], group["lam"], group["eps"],
                     group["weight_decay"])


def preset_hparams(preset: str) -> dict[str, float]:
    """The (beta3, lam) pair of a named preset: 'grams', 'cadam' or 'adamw'."""
    try:
        return dict(PRESETS[preset.lower()])
    except KeyError:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def check_grad(p: Tensor, name: Optional[str] = None) -> None:
    """Sparse and complex gradients are not supported: say so instead of computing nonsense."""
    g = p.grad
    if g is None or (g.is_floating_point() and not g.is_sparse and not p.is_complex()):
        return  # the every-step case: no message formatted
    what = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
    if g.is_sparse:
        raise RuntimeError(f"AMS does not support sparse gradients ({what}); use dense gradients")
    if torch.is_complex(g) or torch.is_complex(p):
        raise RuntimeError(f"AMS does not support complex parameters or gradients ({what}); "
                           "view them as real with torch.view_as_real")
    if not g.is_floating_point():
        raise RuntimeError(f"AMS needs floating-point gradients ({what} has {g.dtype})")


def check_params(params: Iterable[Tensor], names: Optional[Sequence[str]] = None) -> None:
    """Params of one group must be real floating-point tensors, each listed once (a
    duplicate would be stepped twice per step, and its state saved twice)."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        what = repr(names[i]) if names else f"at position {i} (shape {tuple(p.shape)})"
        if torch.is_complex(p):
            raise ValueError(f"AMS does not support complex parameters (parameter {what}); "
                             "view them as real with torch.view_as_real")
        if not p.is_floating_point():
            raise ValueError(f"AMS needs floating-point parameters, got {p.dtype} "
                             f"(parameter {what})")
        if p.dtype not in PARAM_DTYPES:
            # the maths is fp32 (16-bit params keep fp32 masters): a float64 param would be
            # rounded to fp32 every step, silently
            raise ValueError(f"AMS steps float32, bfloat16 and float16 parameters (its maths "
                             f"is fp32), not {p.dtype} (parameter {what}); cast the model to "
                             "float32, or use torch.optim.AdamW for float64")
        if id(p) in seen:
            raise ValueError(f"Parameter {what} appears twice in one param group (also at "
                             f"position {seen[id(p)]}); list each parameter once")
        seen[id(p)] = i
