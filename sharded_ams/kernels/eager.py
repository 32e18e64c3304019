"""Flat-range step primitives built from ``update.py``: eager, and compiled by torch.compile.

Each primitive works in place on 1-D contiguous ranges (``kernels/__init__.py`` states
the contract every backend follows):

* ``fused_step``: moments and parameter update in one pass (reads p, g, m, v[, s];
  writes p, m, v[, s] and optionally a low-precision copy of p).
* ``count_run``: first pass of the per-tensor-scaled case (lam not in {1, -1}) over a
  whole run: adds each tensor's count of u*s < 0 (from this step's m and s, computed and
  not stored: reads g, m[, s]) to ``counts``; given ``sq`` (a 0-d float64 accumulator,
  no clip coefficient), the same call also adds the sum of the run's pieces' g squared
  (the gradient norm and non-finite test of ``ShardedAMS``, reduced with the counts).
* ``apply_run``: second pass: the whole one-pass step (moments and parameters), each
  element with its tensor's step size and decay (gathered from per-tensor tables).

m, v, s may be stored in a lower precision than fp32; they are read into fp32 and
rounded once on store. Scalars are Python floats (no tensor is created per step) or
0-d tensors (a device step or lr). ``coef`` (optional, a 0-d fp32 tensor on the range's
device) is the clip coefficient: every primitive reads the gradient as ``g * coef`` in
fp32, so clipping costs no pass of its own and no host sync (ShardedAMS's
``max_grad_norm``); None reads g as it is.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..update import (agreement, denominator, new_param, sign_moments, update_moments,
                      weighted)
from .tables import RunTable, piece_counts

log = logging.getLogger(__name__)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """Moments may be stored in bf16 (``state_dtype``); the maths is always fp32."""
    return None if t is None else t.float()


def _grad(g: Tensor, coef: Optional[Tensor]) -> Tensor:
    """The gradient in fp32, times the clip coefficient when there is one (the product
    an in-place ``g.mul_(coef)`` of an fp32 gradient would store, bit for bit)."""
    gf = g.float()
    return gf if coef is None else gf * coef


def _store(dst: Optional[Tensor], value: Optional[Tensor], skip: Optional[Tensor]) -> None:
    """dst = value, or dst kept where ``skip`` (a 0-d bool on the device) is true."""
    if dst is not None:
        dst.copy_(value if skip is None else torch.where(skip, dst, value))


def _fused_step(p, g, m, v, s, out, step_size, decay, inv_sqrt_bc2, beta1: float,
                beta2: float, beta3: float, lam: float, eps: float, skip=None,
                coef=None) -> None:
    gf = _grad(g, coef)
    m1, v1, s1 = update_moments(gf, m.float(), v.float(), _f32(s), beta1, beta2, beta3)
    wm = weighted(m1, gf if s1 is None else s1, lam)
    p1 = new_param(p, wm, denominator(v1, inv_sqrt_bc2, eps), step_size, decay)
    for dst, value in ((m, m1), (v, v1), (s, s1), (out, p1), (p, p1)):
        _store(dst, value, skip)


def _disagree(g, m, s, beta1: float, beta3: float, coef=None) -> Tensor:
    """Where u*s < 0 after this step's moments, which are computed and NOT stored: the
    count pass of lam not in {1, -1} reads g and m[, s] only (8 B per fp32 element), the
    apply pass that follows is the whole one-pass step (``_fused_step``) and recomputes
    them bit for bit (``update.sign_moments``): 36 B per element, not 40 for storing the
    moments here and reading them back there."""
    gf = _grad(g, coef)
    m1, s1 = sign_moments(gf, m.float(), _f32(s), beta1, beta3)
    return agreement(m1, gf if s1 is None else s1)[1]


def _count(g, m, s, beta1: float, beta3: float, coef=None) -> Tensor:
    return _disagree(g, m, s, beta1, beta3, coef).sum(dtype=torch.int64)


def _sumsq(g) -> Tensor:
    """Sum of g squared, each square and the sum in float64: inf or NaN iff some element
    is (no fp32 overflow of a finite gradient). Compiled beside the count of the same g,
    with horizontal fusion of two nodes allowed (``PAIR_FUSED``), the two reductions share
    one loop: the norm costs no read of its own."""
    return g.double().square().sum()


def _count_sq(g, m, s, beta1: float, beta3: float) -> tuple[Tensor, Tensor]:
    return _count(g, m, s, beta1, beta3), _sumsq(g)


def _disagree_sq(g, m, s, beta1: float, beta3: float) -> tuple[Tensor, Tensor]:
    return _disagree(g, m, s, beta1, beta3), _sumsq(g)


def _fused_indexed(p, g, m, v, s, out, step_sizes, decays, index, inv_sqrt_bc2, beta1: float,
                   beta2: float, beta3: float, lam: float, eps: float, skip=None,
                   coef=None) -> None:
    """The one-pass step, each element with its tensor's step size and decay."""
    idx = index.long()
    _fused_step(p, g, m, v, s, out, step_sizes[idx], decays[idx], inv_sqrt_bc2, beta1, beta2,
                beta3, lam, eps, skip, coef)


#: the largest count an int32 accumulator holds; a longer tensor is counted in int64
COUNT_INT32_MAX = torch.iinfo(torch.int32).max


def count_wide(numels) -> bool:
    """A list's count pass sums in int64 only where a tensor could overflow int32."""
    return any(n > COUNT_INT32_MAX for n in numels)


def _count_all(gs, ms, ss, beta1: float, beta3: float, wide: bool, coef=None) -> Tensor:
    """int64[len(gs)]: each listed tensor's count of u*s < 0 (``_disagree``: reads g,
    m[, s], stores nothing), the count pass of a whole list in one call. Summed in int32
    unless ``wide``: 9-13% faster than int64 accumulators (twice the lanes per vector),
    the same numbers."""
    out = []
    for i in range(len(gs)):
        flags = _disagree(gs[i], ms[i], None if ss is None else ss[i], beta1, beta3, coef)
        out.append(flags.sum(dtype=torch.int64 if wide else torch.int32))
    return torch.stack(out).to(torch.int64)


def _count_all_sq(gs, ms, ss, beta1: float, beta3: float, wide: bool) -> tuple[list, list]:
    """Each listed tensor's count (``_count_all``) and float64 sum of g squared, as two
    lists of 0-d tensors, stacked by the caller: a ``torch.stack`` of more than 8
    reductions inside the graph makes them write into slices of one buffer, which Inductor
    then never fuses with a sibling, so the sum of squares got a loop (a read of g) of its
    own (measured: 12.5 vs 8.4 ms on the 43 tensors of ``bench_step``'s set, one thread;
    returned as lists, 9.6 vs 10.0: one loop per tensor)."""
    counts, sqs = [], []
    for i in range(len(gs)):
        flags = _disagree(gs[i], ms[i], None if ss is None else ss[i], beta1, beta3)
        counts.append(flags.sum(dtype=torch.int64 if wide else torch.int32))
        sqs.append(_sumsq(gs[i]))
    return counts, sqs


def _apply_all(ps, gs, ms, vs, ss, outs, step_sizes, decays, inv_sqrt_bc2, beta1: float,
               beta2: float, beta3: float, lam: float, eps: float, skip=None,
               coef=None) -> None:
    """The one-pass step on each listed tensor, with its own step size and decay
    (``step_sizes[i]``, ``decays[i]``; ``decays`` None: no decay)."""
    for i in range(len(ps)):
        _fused_step(ps[i], gs[i], ms[i], vs[i], None if ss is None else ss[i], outs[i],
                    step_sizes[i], None if decays is None else decays[i], inv_sqrt_bc2,
                    beta1, beta2, beta3, lam, eps, skip, coef)


def _scalar(x):
    """A per-step scalar as a 0-d fp32 tensor: a call compiled for its shapes
    (``compiled(..., static=True)``) would be a new graph for a Python float that changes
    every step; a tensor's value is not guarded. fp32 is the rounding the eager ops apply
    to a Python scalar, so the bits are the same."""
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float32)


def _flat(*lists: Optional[Sequence[Optional[Tensor]]]) -> tuple:
    """The lists as the compiled call takes them: a view (FSDP2's gradients are views of
    its reduce-scatter output, its params' local shards may be) goes as a base-less alias
    of the same shape (``detach``, ~0.4 us: a mutated view input can cost AOTAutograd a
    write-back pass, and a view's base is guarded on); tensors that own their memory go as
    they are (the shapes are fixed per group, so a 2-D shape or a Parameter costs one
    compile, not one per step)."""
    return tuple(None if ts is None else
                 [t if t is None or t._base is None else t.detach() for t in ts]
                 for ts in lists)


#: a run whose pieces and gaps average at least this many elements is counted and applied
#: as a list of its segments, in one call per pass (``_count_all``, ``_apply_all``: on the
#: compiled backend one graph per run layout, compiled for its shapes: a call per segment
#: cost ~0.1 ms of host each, 9 of ShardedAMS C-Adam's 41 ms a step on a 29M-parameter
#: set of 43 pieces); shorter ones through per-element tables (a flags vector and prefix
#: sums for the counts, each element's step size gathered in the apply pass: ~10 ns an
#: element in all on this CPU, ~9x the two passes themselves, but no graph that unrolls a
#: loop over hundreds of small pieces)
SEGMENT_LOOP_MIN_AVG = 32768


def _by_segment(table: RunTable) -> bool:
    return table.n >= SEGMENT_LOOP_MIN_AVG * len(table.segments())


def _cut(t: Optional[Tensor], ranges: Sequence[tuple[int, int]]) -> Optional[list]:
    return None if t is None else [t[a:b] for a, b in ranges]


class EagerOps:
    """Plain torch ops: any device, any dtype (float64 included). Several passes each."""

    name = "eager"

    @classmethod
    def fused_step(cls, p, g, m, v, s, out, sc, hp, skip: Optional[Tensor] = None,
                   coef: Optional[Tensor] = None) -> None:
        decay = sc.decay if hp.weight_decay else None  # no decay: no multiply (p * 1 == p)
        cls._call(_fused_step, (p, g, m, v, s, out, sc.step_size, decay, sc.inv_sqrt_bc2),
                  dict(beta1=hp.beta1, beta2=hp.beta2, beta3=hp.beta3, lam=hp.lam, eps=hp.eps,
                       skip=skip, coef=coef))

    @classmethod
    def count_run(cls, g, m, v, s, hp, table: RunTable, counts: Tensor,
                  skip: Optional[Tensor] = None, coef: Optional[Tensor] = None,
                  sq: Optional[Tensor] = None) -> None:
        # stores nothing (``_disagree``), so a skipped step needs nothing here
        if sq is not None and coef is not None:
            raise ValueError("count_run: sq (the norm folded into the count) is of the "
                             "unclipped gradient; a clip coefficient needs the norm first")
        consts = dict(beta1=hp.beta1, beta3=hp.beta3) if sq is not None else \
            dict(beta1=hp.beta1, beta3=hp.beta3, coef=coef)
        one = table.single
        if one is not None:  # one piece: a plain sum
            got = cls._call(_count if sq is None else _count_sq, (g, m, s), consts)
            counts[one.index:one.index + 1].add_(got if sq is None else got[0])
        elif _by_segment(table):  # the pieces, one call (the gaps' slot has scale 1 anyway)
            r = [(pc.start, pc.end) for pc in table.pieces]
            got = cls._call_list(_count_all if sq is None else _count_all_sq,
                                 (_cut(g, r), _cut(m, r), _cut(s, r)),
                                 dict(consts, wide=count_wide(b - a for a, b in r)))
            if sq is not None:
                got = torch.stack(got[0]).to(torch.int64), torch.stack(got[1]).sum()
            counts.index_add_(0, table.seg_tensor, got if sq is None else got[0])
        else:
            got = cls._call(_disagree if sq is None else _disagree_sq, (g, m, s), consts)
            counts.add_(piece_counts(got if sq is None else got[0], table))
        if sq is not None:
            sq.add_(got[1])

    @classmethod
    def apply_run(cls, p, g, m, v, s, out, inv_sqrt_bc2, hp, table: RunTable,
                  step_sizes: Tensor, decays: Tensor, skip: Optional[Tensor] = None,
                  coef: Optional[Tensor] = None) -> None:
        consts = dict(beta1=hp.beta1, beta2=hp.beta2, beta3=hp.beta3, lam=hp.lam, eps=hp.eps,
                      skip=skip, coef=coef)
        one = table.single
        if one is not None:
            cls._call(_fused_step, (p, g, m, v, s, out, step_sizes[one.index],
                                    decays[one.index], inv_sqrt_bc2), consts)
        elif _by_segment(table):  # the pieces and the gaps between (scale 1), one call
            r = [(a, b) for a, b, _ in table.segments()]
            idx = table.segment_tensor()
            cls._call_list(_apply_all, (_cut(p, r), _cut(g, r), _cut(m, r), _cut(v, r),
                                        _cut(s, r), _cut(out, r) or [None] * len(r),
                                        step_sizes[idx], decays[idx], inv_sqrt_bc2), consts)
        else:
            cls._call(_fused_indexed, (p, g, m, v, s, out, step_sizes, decays,
                                       table.element_tensor(), inv_sqrt_bc2), consts)

    @staticmethod
    def _call_list(fn, args: tuple, consts: dict):
        """``fn`` over lists of ranges (``_count_all``, ``_apply_all``) in one call."""
        return fn(*args, **consts)

    @staticmethod
    def _call(fn, args: tuple, consts: dict):
        return fn(*args, **consts)


#: ranges shorter than this run a single-threaded kernel (ATen's grain size): a parallel
#: region per small tensor costs more than its work, and far more when cores are shared
SERIAL_NUMEL = 32768


#: functions whose two reductions of the same input must share a loop: Inductor's C++
#: backend calls that horizontal fusion, and 1 node (``_compiled``) forbids it; 2 lets
#: each tensor's count and sum of squares pair up
PAIR_FUSED = (_count_sq, _disagree_sq, _count_all_sq)


@functools.lru_cache(maxsize=None)
def _compiled(fn, serial: bool = False, static: bool = False):
    # dynamic=True: one compile serves every range length; the per-step scalars and the
    # hyperparameters are Python floats, which dynamo keeps as dynamic inputs (no
    # recompile when lr or the step changes; lam is specialised where it branches;
    # constants folded into the code were measured no faster). Variants multiply with
    # dtypes, None-ness of s/out/decay and sizes 0/1; allow more than dynamo's 8.
    # ``serial``: the same kernel without OpenMP. No horizontal fusion: Inductor's C++
    # backend otherwise fuses same-sized tensors of a multi-tensor call into one loop,
    # which streams twice the arrays at once and was measured 8% slower (Grams on 16
    # tensors of 512 x 1024, one thread: 0.80-0.84x torch's fused AdamW fused, 0.87-0.92x
    # not); each tensor's loop is the same either way, so are the results.
    # ``static``: shapes specialised (dynamo's automatic dynamic: symbolic only after a
    # second shape set), for ``multi.py``'s one call per group (see its docstring); the
    # caller passes per-step scalars as tensors. No Inductor size asserts on the inputs
    # (dynamo's guards check the same): ~50 us less per call.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    options = {"cpp.max_horizontal_fusion_size": 2 if fn in PAIR_FUSED else 1,
               "size_asserts": False,
               **({"cpp.threads": 1} if serial else {})}
    return torch.compile(fn, dynamic=None if static else True, fullgraph=True, options=options)


def _alias(t: Tensor) -> Tensor:
    """The same memory as a plain 1-D tensor: not a view, not a Parameter.

    A view of a 2-D param, or a Parameter, would be a new compiled variant (dynamo guards
    on the base's rank and on requires_grad); a mutated view input was also measured to
    cost AOTAutograd a second write-back pass on earlier torch versions. ``detach`` after
    ``view`` gives a tensor with no base, for ~1 us (``set_`` on a new tensor: ~7 us).
    """
    return t.view(-1).detach()


class CompiledOps(EagerOps):
    """The same functions fused into one loop each by torch.compile (Inductor's C++
    backend on CPU)."""

    name = "compiled"

    @staticmethod
    def _call(fn, args: tuple, consts: dict):
        args = tuple(_alias(a) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)
        serial = args[0].device.type == "cpu" and args[0].numel() < SERIAL_NUMEL
        return compiled(fn, serial)(*args, **consts)

    @staticmethod
    def _call_list(fn, args: tuple, consts: dict):
        # compiled for the run's shapes (as ``multi.py``'s one call per group): ranges as
        # base-less aliases, per-step scalars as 0-d tensors (no recompile per step)
        args = tuple(a if a is None or isinstance(a, Tensor) else _scalar(a)
                     if isinstance(a, float) else _flat(a)[0] for a in args)
        return compiled(fn, static=True)(*args, **consts)


def dispatch_mode_active() -> bool:
    """A torch dispatch mode is on the stack (a user's ``FlopCounterMode``, a debugging or
    counting mode): dynamo skips every frame run under one, and ``fullgraph`` then raises."""
    return torch._C._len_torch_dispatch_stack() > 0


def compiled(fn, serial: bool = False, static: bool = False):
    """``fn`` compiled; ``fn`` itself (the same maths as plain torch ops, which the mode
    then sees) while a dispatch mode is active, rather than an error."""
    return fn if dispatch_mode_active() else _compiled(fn, serial, static)


@functools.lru_cache(maxsize=None)
def compile_available() -> bool:
    """True when torch.compile works here (it needs a C++ compiler on CPU). Probed with
    any dispatch mode set aside: a first step run under one must not conclude, for the
    rest of the process, that there is no compiler."""
    if os.environ.get("SHARDED_AMS_NO_COMPILE"):
        return False
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes():
            _compiled(_probe)(torch.ones(3))
        return True
    except Exception as exc:  # pragma: no cover - depends on the machine
        log.warning("torch.compile unavailable (%s); using eager ops", exc)
        return False


def _probe(x: Tensor) -> Tensor:
    return x * 2 + 1
