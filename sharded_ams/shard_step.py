"""The per-step work of ``ShardedAMS`` on its local shards, with host cost independent of
the number of buckets B where it can be (issue 26, items 5 and 6).

* Global grad norm: ONE read of the gradients, one ``_foreach_norm`` per dtype shard over
  its local gradient ranges (bucket shards that touch, as every bucket at world size 1,
  read as one range), then one small all-reduce of the squared norm. The squared norm
  also carries the non-finite test: it is NaN/inf iff some gradient is (or the fp32 norm
  overflows), so no second reduction checks the values.
* The norm with the counts: with the non-finite skip, no clipping and every group
  per-tensor scaled (C-Adam, lam not in {1, -1}), each run's count call also sums its
  gradients' squares (float64), and ONE all-reduce carries the counts and the squared
  norm (:func:`step_shards_norm_in_count`): one small all-reduce a step instead of two
  (one wait, one sync point across the ranks, fewer). The skip is then decided after the
  count pass, which stores nothing, and before the apply pass. On the compiled CPU
  backend each tensor's count and sum of squares share one loop (``eager.PAIR_FUSED``):
  no read of the gradients for the norm (measured: the step costs what C-Adam without
  any norm does). Triton still launches its norm kernel beside the count (a read).
* Clipping: the coefficient min(1, max_norm / (norm + 1e-6)) stays a 0-d device tensor
  that the step kernels multiply each gradient by as they load it: no pass scales the
  gradients, nothing is read on the host (issue 21).
* Per-step scalars (bias corrections, step size, decay) once per param group, not once
  per (bucket, group) run.
* lam not in {1, -1} (per-tensor scale): every run's count pass adds into ONE count vector
  (all dtype shards, one slot per tensor), ONE all-reduce per step combines it, then the
  per-tensor step sizes are computed once per (shard, group) and every run is applied.
  Before, each run had its own count -> all-reduce -> apply chain: hundreds of small
  all-reduces per step, each between two kernels.
* Run tables (where each tensor's pieces lie in a run) are built once per run and kept on
  the shard (``shard.tables``), instead of an LRU cache of 128 that missed on every call
  past 128 runs (each rebuild a host-to-device copy).

The maths is that of :func:`sharded_ams.kernels.flat_step` element for element: the same
primitives with the same scalars, computed by the same functions (``update.py``) in the
same float64 -> fp32 order, so results are bitwise unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .kernels import GroupHParams, Piece, get_ops, host_scalar, scaled_scalars, unit_step_scalars
from .kernels.tables import RunTable, build_run_table
from .layout import Run
from .update import Scalar, StepScalars, lam_is_unit


class StepInfo:
    """What the last ``step()`` did: the global grad norm (before clipping) and whether the
    step was skipped because a gradient was not finite on some rank.

    Both live on the device (``step()`` never waits for them); reading ``grad_norm`` or
    ``skipped`` is the host sync, paid only by whoever reads them."""

    def __init__(self, norm: Optional[Tensor] = None, skip: Optional[Tensor] = None):
        self.grad_norm_tensor, self.skipped_tensor = norm, skip

    @property
    def grad_norm(self) -> Optional[float]:
        return None if self.grad_norm_tensor is None else float(self.grad_norm_tensor)

    @property
    def skipped(self) -> bool:
        return False if self.skipped_tensor is None else bool(self.skipped_tensor)

    def __repr__(self) -> str:
        return f"StepInfo(grad_norm={self.grad_norm}, skipped={self.skipped})"


@dataclass(frozen=True)
class GroupStep:
    """One param group's per-step values, computed once per step (not once per run)."""

    hp: GroupHParams
    lr: Scalar
    step: Scalar                    # a number, or a tensor on the device
    unit: bool                      # |lam| == 1: one pass, no counts
    sc: Optional[StepScalars]       # the one-pass scalars (unit groups only)
    backend: str = "eager"

    @classmethod
    def of(cls, group: dict, device: torch.device, backend: str = "eager") -> "GroupStep":
        hp = GroupHParams.from_group(group)
        lr, step = host_scalar(group["lr"], device), host_scalar(group["step"], device)
        if lam_is_unit(hp.lam):  # one launch for the scalars of a device step on Triton
            return cls(hp, lr, step, True, unit_step_scalars(lr, step, hp, backend), backend)
        return cls(hp, lr, step, False, None, backend)

    def scaled(self, numels: Tensor, counts: Tensor) -> StepScalars:
        """Per-tensor scalars from every tensor's full numel and global count of u*s < 0
        (a tensor with numel 0, the padding slot, gets scale 1)."""
        return scaled_scalars(self.lr, self.step, numels, counts, self.hp, self.backend)


def grad_ranges(sh: Any) -> list[Tensor]:
    """The shard's local gradients as few ranges as possible: bucket shards adjacent in
    the buffer (all of them at world size 1) merge into one view."""
    spans: list[list[int]] = []
    for bk in sh.layout.buckets:
        s0, s1 = bk.shard(sh.rank)
        if spans and spans[-1][1] == s0:
            spans[-1][1] = s1
        elif s1 > s0:
            spans.append([s0, s1])
    return [sh.buf.grad[a:b] for a, b in spans]


def counted_sq(sh: Any, sq: Tensor) -> Tensor:
    """A shard's sum of squares as the global norm counts it: times 0 where the shard
    holds copies another rank counts (``counted`` False), which keeps an inf or NaN
    (0 * inf = NaN): every rank still skips on it."""
    return sq if getattr(sh, "counted", True) else sq * 0.0


def global_grad_norm(shards: Sequence[Any], device: torch.device,
                     reduce: Callable[[Tensor], None], backend: str = "eager") -> Tensor:
    """sqrt of the sum over ranks of every local grad element squared, then ``reduce``
    (the all-reduce, waited). Triton: the kernel's fp32 block partials summed in float64
    (``triton_kernel.sq_norm``); elsewhere fp32 norms per local range (as
    ``clip_grad_norm_``), squared and summed in float64. Either way an fp32 overflow is
    inf and skips the step.

    A shard with ``counted`` False holds copies another rank counts (params replicated
    over tensor-parallel ranks, ``model_parallel.py``): its sum is multiplied by 0, which
    keeps an inf or NaN (0 * inf = NaN), so every rank still skips on it."""
    parts = []
    for sh in shards:
        r = grad_ranges(sh)
        if not r:
            continue
        if backend == "triton":
            sq = get_ops("triton").sq_norm(r)
        else:
            sq = torch.stack(torch._foreach_norm(r, 2, dtype=torch.float32)).double().square().sum()
        parts.append(counted_sq(sh, sq))
    if parts:
        sq = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    else:
        sq = torch.zeros((), dtype=torch.float64, device=device)
    reduce(sq)
    return sq.sqrt()


def clip_coef(norm: Tensor, max_norm: float) -> Tensor:
    """The 0-d fp32 factor the step multiplies every gradient by: max_norm / (norm + 1e-6)
    (computed in float64) where that is below 1, else exactly 1.0 (an exact no-op); a NaN
    norm gives 1.0 too (a step that is not skipped keeps its gradients as they are), an
    inf norm 0.0, as ``clip_grad_norm_``. Rounded to fp32 once, as an in-place ``mul_``
    of fp32 gradients would round it."""
    coef = max_norm / (norm + 1e-6)
    return torch.where(coef < 1.0, coef, torch.ones_like(coef)).float()


def run_table_of(sh: Any, i: int, run: Run) -> RunTable:
    """Run ``i``'s table, built on first use and kept on the shard."""
    table = sh.tables.get(i)
    if table is None:
        lo = run.local_start
        pieces = tuple(Piece(pc.local_start - lo, pc.local_start - lo + pc.length,
                             pc.slot.index, pc.slot.numel) for pc in run.pieces)
        table = build_run_table(pieces, run.local_end - lo, len(sh.layout.slots), sh.device)
        sh.tables[i] = table
    return table


def _ranges(sh: Any, run: Run) -> tuple:
    """(p, g, m, v, s, out) of a run: slices of the bucket's local shard."""
    b = run.bucket
    off = sh.layout.local_offset(b)
    r = slice(run.local_start - off, run.local_end - off)
    s = sh.local("exp_avg_s", b)[r] if "exp_avg_s" in sh.state else None
    out = sh.param_shard(b)[r] if sh.own_master else None
    return (sh.master_view(b)[r], sh.grad_shard(b)[r], sh.local("exp_avg", b)[r],
            sh.local("exp_avg_sq", b)[r], s, out)


def numels_of(sh: Any) -> Tensor:
    """int64[slots + 1] on the shard's device: each tensor's full numel, 0 for the
    padding slot (built once, kept)."""
    if sh.numels is None:
        sh.numels = torch.tensor([s.numel for s in sh.layout.slots] + [0], dtype=torch.int64,
                                 device=sh.device)
    return sh.numels


def _slot_sizes(shards: Sequence[Any]) -> list[int]:
    """Each shard's slots in the step's count vector: one per tensor, one for padding."""
    return [len(sh.layout.slots) + 1 for sh in shards]


def _views(counts: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    out, pos = [], 0
    for size in sizes:
        out.append(counts[pos:pos + size])
        pos += size
    return out


def _count_vector(shards: Sequence[Any], gs: Sequence[GroupStep],
                  device: torch.device) -> tuple[Optional[Tensor], list[Optional[Tensor]]]:
    """ONE int64 count vector for every shard and each shard's view of it; (None, Nones)
    when no group is per-tensor scaled."""
    if all(gs[run.group].unit for sh in shards for run in sh.runs):
        return None, [None] * len(shards)
    sizes = _slot_sizes(shards)
    counts = torch.zeros(sum(sizes), dtype=torch.int64, device=device)
    return counts, _views(counts, sizes)


def _runs(sh: Any) -> list[tuple[int, Run]]:
    return [(i, run) for i, run in enumerate(sh.runs) if run.local_end > run.local_start]


def _apply_scaled(shards: Sequence[Any], gs: Sequence[GroupStep], views: Sequence[Tensor],
                  ops: Any, skip: Optional[Tensor], coef: Optional[Tensor]) -> None:
    """The apply pass of every per-tensor-scaled run, from the reduced counts; the
    scalars once per (shard, group)."""
    for sh, cnt in zip(shards, views):
        per_group: dict[int, StepScalars] = {}
        for i, run in _runs(sh):
            g = gs[run.group]
            if g.unit:
                continue
            if run.group not in per_group:
                per_group[run.group] = g.scaled(numels_of(sh), cnt)
            sc = per_group[run.group]
            p, gr, m, v, s, out = _ranges(sh, run)
            ops.apply_run(p, gr, m, v, s, out, sc.inv_sqrt_bc2, g.hp, run_table_of(sh, i, run),
                          sc.step_size, sc.decay, skip, coef)


def step_shards(shards: Sequence[Any], groups: Sequence[dict], device: torch.device,
                backend: str, skip: Optional[Tensor],
                reduce: Callable[[Tensor], None], coef: Optional[Tensor] = None,
                pre: Optional[Any] = None) -> None:
    """One AMS step on every run of every shard (see the module docstring); ``reduce``
    all-reduces the count vector and waits (called once, only when some group has
    |lam| != 1, on every rank alike: the runs are the same on every rank). ``coef``: the
    clip coefficient (:func:`clip_coef`), applied to each gradient as the kernels load it.
    ``pre``: the counts of the runs backward counted already (``backward_count.Counted``;
    never with ``coef``)."""
    ops = get_ops(backend)
    gs = [GroupStep.of(g, device, backend) for g in groups]
    counts, views = _count_vector(shards, gs, device)
    done: set = set()
    if pre is not None and counts is not None:
        counts, views, done = pre.counts, _views(pre.counts, _slot_sizes(shards)), pre.done
    for k, (sh, cnt) in enumerate(zip(shards, views)):  # one-pass runs, the others' counts
        for i, run in _runs(sh):
            g = gs[run.group]
            p, gr, m, v, s, out = _ranges(sh, run)
            if g.unit:
                ops.fused_step(p, gr, m, v, s, out, g.sc, g.hp, skip, coef)
            elif (k, i) not in done:
                ops.count_run(gr, m, v, s, g.hp, run_table_of(sh, i, run), cnt, skip, coef)
    if counts is None:
        return
    reduce(counts)
    _apply_scaled(shards, gs, views, ops, skip, coef)


def norm_in_count(groups: Sequence[dict]) -> bool:
    """Every group is per-tensor scaled (|lam| != 1): a step with the non-finite skip and
    no clipping can take the norm from the count pass (:func:`step_shards_norm_in_count`)."""
    return bool(groups) and not any(lam_is_unit(float(g["lam"])) for g in groups)


def step_shards_norm_in_count(shards: Sequence[Any], groups: Sequence[dict],
                              device: torch.device, backend: str,
                              reduce: Callable[[Tensor], None],
                              count_mask: Optional[Tensor] = None,
                              pre: Optional[Any] = None) -> Tensor:
    """The step of every run when every group is per-tensor scaled (:func:`norm_in_count`)
    and nothing is clipped: the count pass reads every gradient anyway, so it also sums
    their squares, and ONE all-reduce (``reduce``, of a float64 vector: the counts, then
    the squared norm; counts are exact in float64 up to 2**53) carries both, where the
    norm pass had an all-reduce (and, on CPU, a read of g) of its own before. Each run's
    pieces are read, not its alignment padding, which is zero. Returns the global norm; a
    non-finite one skips: the group steps are bumped by ``~skip`` before the apply pass
    reads them.
    ``count_mask``: 0 for the slots of tensors another rank counts (model parallelism).
    ``pre``: the counts and squared sums of the runs backward counted already
    (``backward_count.Counted``).

    Nothing is stored before the skip is known: the count pass stores nothing."""
    ops = get_ops(backend)
    hps = [GroupHParams.from_group(g) for g in groups]
    sizes = _slot_sizes(shards)
    if pre is None:
        counts, done = torch.zeros(sum(sizes), dtype=torch.int64, device=device), set()
    else:
        counts, done = pre.counts, pre.done
    views, parts = _views(counts, sizes), []
    for k, (sh, cnt) in enumerate(zip(shards, views)):
        sq = torch.zeros((), dtype=torch.float64, device=device) if pre is None else pre.sq[k]
        for i, run in _runs(sh):
            if (k, i) in done:
                continue
            p, gr, m, v, s, out = _ranges(sh, run)
            ops.count_run(gr, m, v, s, hps[run.group], run_table_of(sh, i, run), cnt, None,
                          None, sq)
        parts.append(counted_sq(sh, sq))
    if count_mask is not None:
        counts.mul_(count_mask)
    both = torch.cat([counts.double(), torch.stack(parts).sum().reshape(1)])
    reduce(both)
    counts.copy_(both[:-1])
    norm = both[-1].sqrt()
    skip = ~torch.isfinite(norm)
    for group in groups:
        group["step"] += (~skip).float()
    _apply_scaled(shards, [GroupStep.of(g, device, backend) for g in groups], views, ops,
                  skip, None)
    return norm
