"""One torch.compile'd call over every tensor of a param group: ``AMS``'s default on CPU.

A compiled call per tensor costs ~0.1 ms of Python and guard checks, and ``_foreach`` ops
make a pass (and a temporary) per operation; on a 43-tensor GPT set those put ``Grams``
at 0.7-0.8x torch's fused AdamW although each compiled loop runs at the memory floor.
Here a whole list goes through ONE compiled function that loops over it: dynamo unrolls
the loop into one graph (one guard check per call), Inductor emits one C++ loop nest per
tensor (one pass each, nothing materialised). The maths per element is ``eager.py``'s
functions, so each tensor's result is bit for bit ``flat_step``'s on that tensor.

Lists are taken as they are: dynamo specialises on their length and on which entries are
None (``outs``: only low-precision params have a model-dtype copy), so one model compiles
once per distinct group signature (the first step pays it; later processes read the
FX graph cache). Tensors must be contiguous (``optimizer.py`` sends the others down the
per-tensor path).

The call is compiled for the group's shapes (``compiled(..., static=True)``: torch's
automatic dynamic, so a second model of the same signature in one process compiles once
more, with symbolic sizes) and without Inductor's per-input size asserts (dynamo's guards
check the same): on 32 tiny tensors the call costs 60-80 us instead of 160-170, and the
loops of known length were 3-5% faster (Grams, 16 x 512 x 1024, one thread). The per-step
scalars go as 0-d tensors (``_scalar``), so their values are not guarded on.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..update import StepScalars
from .eager import _apply_all, _count_all, _flat, _fused_step, _scalar, compiled, count_wide


def _fused_all(ps, gs, ms, vs, ss, outs, step_size, decay, inv_sqrt_bc2, beta1: float,
               beta2: float, beta3: float, lam: float, eps: float, coef=None) -> None:
    for i in range(len(ps)):
        _fused_step(ps[i], gs[i], ms[i], vs[i], None if ss is None else ss[i], outs[i],
                    step_size, decay, inv_sqrt_bc2, beta1, beta2, beta3, lam, eps, coef=coef)


def _consts(hp) -> dict:
    return dict(beta1=hp.beta1, beta2=hp.beta2, beta3=hp.beta3, lam=hp.lam, eps=hp.eps)


def multi_fused_step(ps: Sequence[Tensor], gs: Sequence[Tensor], ms: Sequence[Tensor],
                     vs: Sequence[Tensor], ss: Optional[Sequence[Tensor]],
                     outs: Sequence[Optional[Tensor]], sc: StepScalars, hp,
                     cache: Optional[dict] = None, coef: Optional[Tensor] = None) -> None:
    """|lam| == 1: one pass over every tensor, in one compiled call (``cache``: unused, the
    Triton twin's table cache). ``coef`` (each function here): an optional 0-d fp32 clip
    coefficient, the gradients read as ``g * coef`` (no pass scales them)."""
    decay = _scalar(sc.decay) if hp.weight_decay else None
    compiled(_fused_all, static=True)(*_flat(ps, gs, ms, vs, ss, outs), _scalar(sc.step_size),
                                      decay, _scalar(sc.inv_sqrt_bc2), **_consts(hp), coef=coef)


def multi_count(ps, gs: Sequence[Tensor], ms: Sequence[Tensor], vs,
                ss: Optional[Sequence[Tensor]], outs, hp, cache: Optional[dict] = None,
                coef: Optional[Tensor] = None) -> Tensor:
    """lam not in {1, -1}, first pass: int64[len(gs)], each tensor's count of u*s < 0 (the
    numbers summed across ranks) from its new m and s, which are NOT stored: this pass
    reads g and m[, s] only (8 B per fp32 element), and the apply pass is the whole
    one-pass step (28 B): 36 B in all instead of 40 for storing the moments here and
    reading them back there. The same bits: the apply pass recomputes m and s by the same
    function, ``update.sign_moments``). ``ps``, ``vs``, ``outs`` and ``cache`` are not
    used (the signature is the Triton pass's)."""
    return compiled(_count_all, static=True)(*_flat(gs, ms, ss), beta1=hp.beta1,
                                             beta3=hp.beta3,
                                             wide=count_wide(g.numel() for g in gs), coef=coef)


def multi_apply(ps: Sequence[Tensor], gs: Sequence[Tensor], ms: Sequence[Tensor],
                vs: Sequence[Tensor], ss: Optional[Sequence[Tensor]],
                outs: Sequence[Optional[Tensor]], sc: StepScalars, hp,
                cache: Optional[dict] = None, coef: Optional[Tensor] = None) -> None:
    """Second pass: the whole step (moments and params), each tensor with its own step
    size and decay (``sc`` holds 1-D tensors, one entry per tensor, from its whole-tensor
    count)."""
    decays = sc.decay if hp.weight_decay else None
    compiled(_apply_all, static=True)(*_flat(ps, gs, ms, vs, ss, outs), sc.step_size, decays,
                                      _scalar(sc.inv_sqrt_bc2), **_consts(hp), coef=coef)


def multi_ops(backend: str) -> tuple:
    """(fused step, count, apply) over a whole list of tensors, one call each: torch.compile'd
    loops on CPU ("compiled"), Triton launches on CUDA ("triton", ``triton_multi.py``).
    Either way ``count`` then ``apply`` is the whole step of lam not in {1, -1}."""
    if backend == "triton":
        from .triton_multi import triton_multi_apply, triton_multi_count, triton_multi_fused_step

        return triton_multi_fused_step, triton_multi_count, triton_multi_apply
    return multi_fused_step, multi_count, multi_apply
