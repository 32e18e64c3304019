"""The step's scalars from a step count (and lr) that live on the device, in ONE launch.

``ShardedAMS`` keeps its step count on the device (a skipped step is decided there, so the
host never reads it). The folded scalars (``update.step_scalars``: eta / (1 - beta1^t),
1 - eta wd, 1 / sqrt(1 - beta2^t)) are then float64 maths on 0-d device tensors: a dozen
tiny kernels per step and group in eager torch (the cast, two powers, two subtractions, a
division, a square root, a reciprocal, three casts and the stack the Triton kernel reads),
each a launch of a few microseconds on a GPU for a handful of flops. Here the same
functions of ``update.py`` are compiled into one kernel that writes the fp32[3] vector the
Triton step kernel reads (``SCALARS_ON_DEVICE``), so a one-pass ``flat_step`` with a device
step is two launches: this one and the step.

The per-tensor scalars of lam not in {1, -1} (each tensor's step size and decay from
its count, ``update.scaled_step_scalars``) are likewise one launch (``scaled_vector``):
one fp32 vector whose views the apply kernel reads, instead of ~20 tiny kernels.

Used for the Triton backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``). On the CPU
backends an eager op costs about what a compiled call's guards cost, so they keep the eager
ops. Values: the maths and its float64 order are ``update.py``'s, rounded once to fp32; a
compile error falls back to the eager ops with one warning (the values are the same). A
Python float lr is added to a float64 zero inside the graph (exact, fused into the launch),
which dynamo keeps as an input: ``update.step_scalars`` on a float lr computes 1 - lr wd with
Python floats and ``float()``, which under dynamo kept the first call's value when the lr
changed, and a ``torch.full`` of it recompiled for every lr (measured, torch 2.13).
"""

from __future__ import annotations

import logging
from typing import Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..update import StepScalars, bias_corrections, scaled_step_scalars, step_scalars
from .eager import _compiled

log = logging.getLogger(__name__)
Scalar = Union[float, Tensor]
_compile_failed = False


def _f32(x: Scalar, ref: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(()).to(torch.float32)
    return torch.full((), x, dtype=torch.float32, device=ref.device)


def dispatch_mode_active() -> bool:
    """A ``TorchDispatchMode`` (a profiler or debug tool) is on: torch.compile refuses to
    run under one, so the eager ops serve (without marking the compiler broken)."""
    return _get_current_dispatch_mode() is not None


def scalar_vector(lr: Scalar, step: Tensor, beta1: float, beta2: float,
                  weight_decay: float) -> Tensor:
    """fp32[3] on step's device: (step size, decay, 1 / sqrt(1 - beta2^t)), computed by
    ``update.bias_corrections`` and ``update.step_scalars`` (float64, one fp32 rounding)."""
    if not isinstance(lr, Tensor) and torch.compiler.is_compiling():  # an input, not a
        lr = torch.zeros((), dtype=torch.float64, device=step.device) + lr  # constant
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    sc = step_scalars(lr, bc1, bc2, weight_decay)
    a, b, c = (_f32(x, step) for x in (sc.step_size, sc.decay, sc.inv_sqrt_bc2))
    # one pointwise node over 3 elements (compiled: one kernel); a stack would be a concat
    # that Inductor may split into a kernel per slice
    i = torch.arange(3, device=step.device)
    return torch.where(i == 0, a, torch.where(i == 1, b, c))


def device_step_scalars(lr: Scalar, step: Tensor, beta1: float, beta2: float,
                        weight_decay: float, compiled: bool = True) -> StepScalars:
    """:class:`StepScalars` whose fields are views of one fp32[3] device vector (``packed``,
    what the Triton kernel reads): one compiled launch, or the eager ops when ``compiled``
    is False, the device is ``meta``, or compiling failed once."""
    global _compile_failed
    vec = None
    if compiled and not _compile_failed and step.device.type != "meta" \
            and not dispatch_mode_active():
        try:
            vec = _compiled(scalar_vector)(lr, step, beta1, beta2, weight_decay)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager ops
            _compile_failed = True
            log.warning("compiling the step scalars failed (%s: %s); using eager ops",
                        type(exc).__name__, exc)
    if vec is None:
        vec = scalar_vector(lr, step, beta1, beta2, weight_decay)
    return StepScalars(vec[0], vec[1], vec[2], packed=vec)


def scaled_vector(lr: Scalar, bc1: Scalar, bc2: Scalar, numels: Tensor, counts: Tensor,
                  lam: float, weight_decay: float) -> Tensor:
    """fp32[1 + 2K] on the counts' device (K tensors): 1 / sqrt(1 - beta2^t), then each
    tensor's step size, then each tensor's decay, computed by
    ``update.scaled_step_scalars`` (float64, one fp32 rounding). Numbers (a host step's
    bias corrections, a float lr) enter the graph as inputs, not constants (see
    :func:`scalar_vector`)."""
    dev = counts.device
    if torch.compiler.is_compiling():
        lr, bc1, bc2 = (x if isinstance(x, Tensor) else
                        torch.zeros((), dtype=torch.float64, device=dev) + x
                        for x in (lr, bc1, bc2))
    sc = scaled_step_scalars(lr, bc1, bc2, numels, counts, lam, weight_decay)
    k = counts.numel()
    i = torch.arange(1 + 2 * k, device=dev)
    sizes = sc.step_size[(i - 1).clamp(0, k - 1)]
    decays = sc.decay[(i - 1 - k).clamp(0, k - 1)]
    # one pointwise node (compiled: one kernel, the per-tensor maths inlined into it)
    return torch.where(i == 0, _f32(sc.inv_sqrt_bc2, counts), torch.where(i <= k, sizes, decays))


def _scaled_from_step(lr: Scalar, step: Tensor, numels: Tensor, counts: Tensor,
                      beta1: float, beta2: float, lam: float, weight_decay: float) -> Tensor:
    """:func:`scaled_vector` of a device step: its bias corrections in the same launch."""
    return scaled_vector(lr, *bias_corrections(step, beta1, beta2), numels, counts, lam,
                         weight_decay)


def device_scaled_scalars(lr: Scalar, step: Scalar, numels: Tensor, counts: Tensor,
                          beta1: float, beta2: float, lam: float, weight_decay: float,
                          compiled: bool = True) -> StepScalars:
    """lam not in {1, -1}: the per-tensor :class:`StepScalars` of the apply pass as views
    of one fp32 device vector (:func:`scaled_vector`) written by ONE compiled launch,
    instead of ~20 tiny eager kernels (the bias corrections of a device step, the scale,
    the fold, the casts). A host step's bias corrections are computed on the host, as
    every other path computes them. Falls back to the eager ops as
    :func:`device_step_scalars` does."""
    global _compile_failed
    if isinstance(step, Tensor):
        fn, args = _scaled_from_step, (lr, step, numels, counts, beta1, beta2, lam,
                                        weight_decay)
    else:
        fn, args = scaled_vector, (lr, *bias_corrections(step, beta1, beta2), numels, counts,
                                   lam, weight_decay)
    vec = None
    if compiled and not _compile_failed and counts.device.type != "meta" \
            and not dispatch_mode_active():
        try:
            vec = _compiled(fn)(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager ops
            _compile_failed = True
            log.warning("compiling the step scalars failed (%s: %s); using eager ops",
                        type(exc).__name__, exc)
    if vec is None:
        vec = fn(*args)
    k = counts.numel()
    return StepScalars(vec[1:1 + k], vec[1 + k:], vec[0])
