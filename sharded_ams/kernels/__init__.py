"""Backends for the AMS step on flat ranges, and the driver that runs one step.

Backends (all tested against ``sharded_ams.update`` and the independent oracle in
``tests/oracle.py``):

* ``"triton"``: one Triton kernel launch per pass (CUDA; CPU only under ``TRITON_INTERPRET=1``).
* ``"compiled"``: ``torch.compile`` of the ``update.py`` functions, one fused loop per pass.
* ``"eager"``: plain torch ops (any device and dtype; the fallback).

``"auto"`` picks triton on CUDA when importable, compiled on CPU when a compiler works,
else eager. Every backend's ops class has three primitives, called on 1-D contiguous
ranges: ``fused_step`` (|lam| == 1: one pass), ``count_run`` and ``apply_run`` (the two
passes of the per-tensor-scaled case, each once per run, through a :class:`RunTable`).

No primitive copies anything from the host to the device or waits for the device: lr and
the step as Python numbers travel as kernel arguments; as tensors on the range's device
the scalars are computed there (the path a CUDA graph can capture, and the one
``ShardedAMS`` takes, its step count living on the device): on the Triton backend in one
compiled launch (``scalars.py``), elsewhere with eager tensor ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..update import (StepScalars, bias_corrections, lam_is_unit, scaled_step_scalars,
                      step_scalars)
from .eager import CompiledOps, EagerOps, compile_available
from .scalars import device_scaled_scalars, device_step_scalars
from .tables import Piece, RunTable, as_pieces, run_table

Scalar = Union[float, Tensor]
BACKENDS = ("auto", "triton", "compiled", "eager")

__all__ = ["BACKENDS", "GroupHParams", "Piece", "RunTable", "flat_apply", "flat_count",
           "flat_step", "get_ops", "scaled_scalars",
           "resolve_backend", "triton_available", "compile_available", "host_scalar",
           "unit_step_scalars"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """The triton package is installed (an error in the project's kernel then raises)."""
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


def host_scalar(x: Scalar, device: torch.device) -> Scalar:
    """A tensor on ``device`` stays a tensor (its value is used where it lives: no read);
    a CPU tensor for another device is read on the host (no device sync, and no
    host-to-device copy); numbers stay numbers."""
    if isinstance(x, Tensor):
        return x if x.device == device or x.device.type != "cpu" else float(x)
    return float(x)


def flat_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
              out: Optional[Tensor], *, lr: Scalar, step: Scalar, hp: GroupHParams,
              pieces: Sequence[Piece] = (), num_tensors: int = 0, backend: str = "eager",
              count_reduce: Optional[Callable[[Tensor], None]] = None,
              skip: Optional[Tensor] = None, coef: Optional[Tensor] = None,
              table: Optional[RunTable] = None) -> None:
    """One AMS step on a flat range, in place.

    ``p`` is the fp32 master range, ``g`` the gradient range (any float dtype), ``out``
    an optional model-dtype range that receives the new p in the same pass. ``lr`` and
    ``step`` are numbers (kernel arguments: nothing is copied to the device), tensors on
    p's device (the scalars are computed there: no read, and capturable in a CUDA graph),
    or CPU tensors for a GPU range (read on the host).

    With |lam| == 1 this is one pass. Otherwise the step scale is per logical tensor:
    one count pass over the whole run adds each tensor's count of u*s < 0 into a device
    vector of length ``num_tensors`` (through the cached piece table of ``pieces``),
    ``count_reduce`` (an all-reduce when tensors are split across ranks) combines it,
    and one apply pass steps every piece with its tensor's scale. Elements in no piece
    (padding) are stepped with scale 1, as the one-pass step steps them. ``skip``: an
    optional 0-d bool tensor on p's device; where true nothing is written (a step skipped
    without a host sync). ``coef``: an optional 0-d fp32 tensor on p's device, the clip
    coefficient: the step reads the gradient as ``g * coef`` (no pass scales g).
    ``table``: the run's table (:func:`tables.build_run_table` of ``pieces``) when the
    caller keeps one per layout; without it a cache keyed by the pieces serves.
    """
    lr, step = host_scalar(lr, p.device), host_scalar(step, p.device)
    if p.numel() == 0 and count_reduce is None:
        return
    if lam_is_unit(hp.lam):
        if p.numel():
            get_ops(backend).fused_step(p, g, m, v, s, out,
                                        unit_step_scalars(lr, step, hp, backend), hp, skip,
                                        coef)
        return
    table, counts = flat_count(g, m, v, s, hp=hp, pieces=pieces, num_tensors=num_tensors,
                               backend=backend, skip=skip, coef=coef, table=table)
    if count_reduce is not None:
        count_reduce(counts[:num_tensors])
    flat_apply(p, g, m, v, s, out, lr=lr, step=step, hp=hp, table=table, counts=counts,
               backend=backend, skip=skip, coef=coef)


def unit_step_scalars(lr: Scalar, step: Scalar, hp: GroupHParams, backend: str) -> StepScalars:
    """The one-pass step's scalars: floats from numbers; from a device step on the Triton
    backend, one compiled launch (``scalars.py``: a one-pass ``flat_step`` is then two
    launches in all); from a device step elsewhere, eager tensor ops."""
    if backend == "triton" and isinstance(step, Tensor):
        return device_step_scalars(lr, step, hp.beta1, hp.beta2, hp.weight_decay)
    bc1, bc2 = bias_corrections(step, hp.beta1, hp.beta2)
    return step_scalars(lr, bc1, bc2, hp.weight_decay)


def scaled_scalars(lr: Scalar, step: Scalar, numels: Tensor, counts: Tensor,
                   hp: GroupHParams, backend: str) -> StepScalars:
    """The apply pass's per-tensor scalars (lam not in {1, -1}) from every tensor's full
    numel and count of u*s < 0 (``update.scaled_step_scalars``): on the Triton backend one
    compiled launch, a device step's bias corrections included (``scalars.py``),
    elsewhere eager tensor ops."""
    if backend == "triton":
        return device_scaled_scalars(lr, step, numels, counts, hp.beta1, hp.beta2, hp.lam,
                                     hp.weight_decay)
    bc1, bc2 = bias_corrections(step, hp.beta1, hp.beta2)
    return scaled_step_scalars(lr, bc1, bc2, numels, counts, hp.lam, hp.weight_decay)


def flat_count(g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor], *, hp: GroupHParams,
               pieces: Sequence[Piece] = (), num_tensors: int = 0, backend: str = "eager",
               skip: Optional[Tensor] = None, coef: Optional[Tensor] = None,
               table: Optional[RunTable] = None) -> tuple[RunTable, Tensor]:
    """First half of the per-tensor-scaled step (lam not in {1, -1}): update the moments
    of the run and count each tensor's u*s < 0. Returns the run's table and the int64
    counts (``num_tensors + 1`` slots). Split from :func:`flat_apply` so that a caller can
    sum the counts of many runs across ranks in one collective before any apply."""
    if table is None:
        table = run_table(as_pieces(pieces), m.numel(), num_tensors, m.device)
    counts = torch.zeros(num_tensors + 1, dtype=torch.int64, device=m.device)
    if m.numel():
        get_ops(backend).count_run(g, m, v, s, hp, table, counts, skip, coef)
    return table, counts


def flat_apply(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor],
               out: Optional[Tensor], *, lr: Scalar, step: Scalar, hp: GroupHParams,
               table: RunTable, counts: Tensor, backend: str = "eager",
               skip: Optional[Tensor] = None, coef: Optional[Tensor] = None) -> None:
    """Second half: step every piece with its tensor's scale d / (count term), d the
    piece's full ``numel`` (the whole logical tensor, also when only a shard is here)."""
    lr, step = host_scalar(lr, p.device), host_scalar(step, p.device)
    # per-tensor eta^ (slot num_tensors, elements in no piece: numel 0, so scale 1)
    sc = scaled_scalars(lr, step, table.numels, counts, hp, backend)
    if p.numel():
        get_ops(backend).apply_run(p, g, m, v, s, out, sc.inv_sqrt_bc2, hp, table,
                                   sc.step_size, sc.decay, skip, coef)
