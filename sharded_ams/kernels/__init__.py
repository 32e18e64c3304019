"""Backends for the AMS step on flat ranges, and the driver that runs one step.

Backends (all tested against ``sharded_ams.update``):

* ``"triton"``: one Triton kernel launch (CUDA; CPU only under ``TRITON_INTERPRET=1``).
* ``"compiled"``: ``torch.compile`` of the reference functions, one fused loop (CPU default).
* ``"eager"``: plain torch ops (any device and dtype; the fallback).

``"auto"`` picks triton on CUDA when importable, compiled on CPU when a compiler works,
else eager.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..update import lam_is_unit, step_scale
from .eager import CompiledOps, EagerOps, compile_available

Scalar = Union[float, Tensor]
BACKENDS = ("auto", "triton", "compiled", "eager")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_ops():
    from .triton_kernel import TritonOps  # imported lazily: triton is an optional extra

    return TritonOps


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend name for ``device``; check explicit ones."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and compile_available():
            return "compiled"
        return "eager"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install sharded-ams[triton])")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def get_ops(backend: str):
    return {"eager": EagerOps, "compiled": CompiledOps}.get(backend) or triton_ops()


@dataclass(frozen=True)
class Piece:
    """A piece [start, end) of the flat range that belongs to logical tensor ``index``
    (``numel`` elements in full); used only for the per-tensor scale."""

    start: int
    end: int
    index: int
    numel: int


@dataclass(frozen=True)
class GroupHParams:
    beta1: float
    beta2: float
    beta3: float
    lam: float
    eps: float
    weight_decay: float

    @classmethod
    def from_group(cls, group: dict) -> "GroupHParams":
        b1, b2 = group["betas"]
        return cls(float(b1), float(b2), float(group["beta3"]), float(group["lam"]),
                   float(group["eps"]), float(group["weight_decay"]))


def step_scalars(lr: Scalar, step: Scalar, hp: GroupHParams, device: torch.device):
    """lr and the bias corrections as 0-d fp32 tensors on ``device`` (no host sync)."""
    if isinstance(step, Tensor):
        t = step.to(device=device, dtype=torch.float64)
        bc1, bc2 = 1 - torch.pow(hp.beta1, t), 1 - torch.pow(hp.beta2, t)
    else:
        bc1 = torch.tensor(1 - hp.beta1 ** step, dtype=torch.float64, device=device)
        bc2 = torch.tensor(1 - hp.beta2 ** step, dtype=torch.float64, device=device)
    lr_t = lr.to(device=device, dtype=torch.float64) if isinstance(lr, Tensor) else \
        torch.tensor(float(lr), dtype=torch.float64, device=device)
    return lr_t.float(), bc1.float(), bc2.float()


def flat_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
              out: Optional[Tensor], *, lr: Scalar, step: Scalar, hp: GroupHParams,
              pieces: Sequence[Piece] = (), num_tensors: int = 0, backend: str = "eager",
              count_reduce: Optional[Callable[[Tensor], None]] = None,
              skip: Optional[Tensor] = None) -> None:
    """One AMS step on a flat range, in place.

    ``p`` is the fp32 master range, ``g`` the gradient range (any float dtype), ``out``
    an optional model-dtype range that receives the new p in the same pass. With
    |lam| == 1 this is one pass. Otherwise the step scale is per logical tensor: the
    first pass counts u*s < 0 per piece, ``count_reduce`` (an all-reduce when tensors
    are split across ranks) combines the counts of length ``num_tensors``, and the second
    pass applies the step with each tensor's scale. ``skip``: an optional 0-d bool tensor
    on p's device; where true nothing is written (a step skipped without a host sync).
    """
    ops = get_ops(backend)
    lr_t, bc1, bc2 = step_scalars(lr, step, hp, p.device)
    if lam_is_unit(hp.lam):
        if p.numel() == 0:
            return
        ops.fused_step(p, g, m, v, s, out, lr_t, bc1, bc2, hp.beta1, hp.beta2, hp.beta3,
                       hp.lam, hp.eps, hp.weight_decay, skip)
        return
    counts = torch.zeros(num_tensors, dtype=torch.int64, device=p.device)
    numels = torch.zeros(num_tensors, dtype=torch.int64, device=p.device)
    pieces = [pc for pc in pieces if pc.end > pc.start]
    for pc in pieces:
        sl = slice(pc.start, pc.end)
        neg = ops.moments_count(g[sl], m[sl], v[sl], s[sl] if s is not None else None, bc1,
                                bc2, hp.beta1, hp.beta2, hp.beta3, hp.lam, hp.eps, skip)
        counts[pc.index] += neg
        numels[pc.index] = pc.numel
    if count_reduce is not None:
        count_reduce(counts)
    scales = step_scale(numels, counts, hp.lam)  # numels is only read where pieces exist
    lrs = (lr_t.double() * scales).float()
    for pc in pieces:
        sl = slice(pc.start, pc.end)
        ops.apply_only(p[sl], g[sl], m[sl], v[sl], s[sl] if s is not None else None,
                       out[sl] if out is not None else None, lrs[pc.index], bc1, bc2, hp.lam,
                       hp.eps, hp.weight_decay, skip)
