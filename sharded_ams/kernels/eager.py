"""Flat-range step primitives built from ``update.py``: eager, and compiled by torch.compile.

Each primitive works in place on 1-D contiguous ranges:

* ``fused_step``: moments and parameter update in one pass (reads p, g, m, v[, s];
  writes p, m, v[, s] and optionally a low-precision copy of p).
* ``moments_count``: first pass of the per-tensor-scaled case (lam not in {1, -1}):
  updates the moments and returns how many elements have u*s < 0.
* ``apply_only``: second pass: the parameter update from the already-updated moments.

m, v, s may be stored in a lower precision than fp32; they are read into fp32 and
rounded once on store. The eager versions are the single-tensor path (and what the
compiled ones trace).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from ..update import apply_update, direction, update_moments

log = logging.getLogger(__name__)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """Moments may be stored in bf16 (``state_dtype``); the maths is always fp32."""
    return None if t is None else t.float()


def _keep(skip: Optional[Tensor], old: Tensor, new: Tensor) -> Tensor:
    """``new``, or ``old`` where the step is skipped (``skip``: 0-d bool, on the device)."""
    return new if skip is None else torch.where(skip, old, new)


def _fused_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
                out: Optional[Tensor], lr: Tensor, bc1: Tensor, bc2: Tensor, beta1: float,
                beta2: float, beta3: float, lam: float, eps: float, wd: float,
                skip: Optional[Tensor] = None) -> None:
    gf = g.float()
    m1, v1, s1 = update_moments(gf, m.float(), v.float(), _f32(s), beta1, beta2, beta3)
    wu, _ = direction(gf, m1, v1, s1, bc1, bc2, eps, lam)
    p1 = apply_update(p, wu, lr, wd)
    m.copy_(_keep(skip, m, m1))
    v.copy_(_keep(skip, v, v1))
    if s is not None:
        s.copy_(_keep(skip, s, s1))
    if out is not None:
        out.copy_(_keep(skip, out, p1))
    p.copy_(_keep(skip, p, p1))


def _moments_count(g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor], bc1: Tensor,
                   bc2: Tensor, beta1: float, beta2: float, beta3: float, lam: float,
                   eps: float, skip: Optional[Tensor] = None) -> Tensor:
    gf = g.float()
    m1, v1, s1 = update_moments(gf, m.float(), v.float(), _f32(s), beta1, beta2, beta3)
    _, neg = direction(gf, m1, v1, s1, bc1, bc2, eps, lam)
    m.copy_(_keep(skip, m, m1))
    v.copy_(_keep(skip, v, v1))
    if s is not None:
        s.copy_(_keep(skip, s, s1))
    return neg.sum(dtype=torch.int64)


def _apply_only(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
                out: Optional[Tensor], lr: Tensor, bc1: Tensor, bc2: Tensor, lam: float,
                eps: float, wd: float, skip: Optional[Tensor] = None) -> None:
    wu, _ = direction(g.float(), m.float(), v.float(), _f32(s), bc1, bc2, eps, lam)
    p1 = apply_update(p, wu, lr, wd)
    if out is not None:
        out.copy_(_keep(skip, out, p1))
    p.copy_(_keep(skip, p, p1))


class EagerOps:
    """Plain torch ops: any device, any dtype (float64 included). Several passes."""

    name = "eager"
    fused_step = staticmethod(_fused_step)
    moments_count = staticmethod(_moments_count)
    apply_only = staticmethod(_apply_only)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    # dynamic=True: one compile serves every range length; hyperparameters are
    # Python floats (specialised once per value), lr and bias corrections are tensors.
    # Variants multiply with dtypes, presets and sizes 0/1; allow more than dynamo's 8.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _alias(t: Tensor) -> Tensor:
    """The same memory as a plain 1-D tensor: not a view, not a Parameter.

    A view (a slice of a flat buffer) that the compiled function mutates is written
    back by AOTAutograd after the kernel, a second pass (measured 2x slower on CPU); a
    Parameter or another rank would be a new compiled variant.
    """
    t = t.detach().view(-1)
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _plain(args: tuple) -> tuple:
    return tuple(_alias(a) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)


class CompiledOps:
    """The same functions fused into one loop by torch.compile (Inductor's C++ backend on CPU)."""

    name = "compiled"

    @staticmethod
    def fused_step(*args):
        return _compiled(_fused_step)(*_plain(args))

    @staticmethod
    def moments_count(*args):
        return _compiled(_moments_count)(*_plain(args))

    @staticmethod
    def apply_only(*args):
        return _compiled(_apply_only)(*_plain(args))


@functools.lru_cache(maxsize=None)
def compile_available() -> bool:
    """True when torch.compile works here (it needs a C++ compiler on CPU)."""
    if os.environ.get("SHARDED_AMS_NO_COMPILE"):
        return False
    try:
        x = torch.ones(3)
        _compiled(_probe)(x)
        return True
    except Exception as exc:  # pragma: no cover - depends on the machine
        log.warning("torch.compile unavailable (%s); using eager ops", exc)
        return False


def _probe(x: Tensor) -> Tensor:
    return x * 2 + 1
