"""C-Adam's count pass during backward: each bucket counted as soon as its reduction lands.

A per-tensor-scaled step (|lam| != 1: C-Adam, lam = -0.5, ...) needs every tensor's count
of sign(m_t) != sign(g) before any element moves, a read of g and m (``shard_step``).
With overlap, a bucket's gradients are final once its reduction has finished, which is
usually during backward, while later buckets are still being reduced and layers still
differentiated. :class:`BackwardCounts` counts each such bucket then (polled from the
post-accumulate-grad hooks, ``BucketSync.poll_reduced``), so the count's read overlaps
the other buckets' communication, and ``step()`` is left with the buckets that finished
after backward, the one small all-reduce and the apply pass.

Exactness does not depend on the user's order of calls: the counts are only used when
they are what ``step()`` would have counted itself (:meth:`BackwardCounts.take`):

* the counted gradients are unchanged (the grad buffers' version counters, taken at the
  end of backward, match; an in-place write to ``p.grad``, a view of the buffer, bumps
  them), and the step does not clip them: without ``max_grad_norm``, or with it on a
  step whose clip coefficient is exactly 1 (:meth:`BackwardCounts.unclipped`; a clipped
  step counts g * coef, so it counts again);
* every group's beta1, beta3 and |lam| == 1 are what they were when counted;
* m and s are what they were: only ``step()`` and state loads write them, and loads and
  ``zero_grad()`` discard the counts (:meth:`BackwardCounts.discard`).

Otherwise ``step()`` counts everything itself, as without this. Counts are integers
summed per piece, so counting by bucket gives the same vector: results are bitwise those
of counting in the step (tests/test_backward_count.py).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .kernels import GroupHParams, get_ops
from .shard_step import _ranges, _runs, _views, norm_in_count, run_table_of
from .update import lam_is_unit


#: devices where reading one number back costs nothing (no device to wait for): there a
#: clipped step reads whether its coefficient is 1 and keeps backward's counts
HOST_READ_FREE = frozenset({"cpu"})


def _key(groups: Sequence[dict]) -> tuple:
    """What the count reads from the groups: beta1, beta3, and which groups are counted."""
    out = []
    for g in groups:
        hp = GroupHParams.from_group(g)
        out.append((hp.beta1, hp.beta3, lam_is_unit(hp.lam)))
    return tuple(out)


class Counted:
    """What backward counted for one step: ``counts`` (int64, the step's count vector,
    every shard's slots and padding slot), ``sq`` (each shard's float64 sum of squared
    gradients, or None when not summed) and ``done`` ((shard, run) pairs counted)."""

    def __init__(self, counts: Tensor, sq: Optional[list[Tensor]], done: set):
        self.counts, self.sq, self.done = counts, sq, done


class BackwardCounts:
    """The count pass of buckets reduced during backward, kept for the next ``step()``.

    ``shards``: the optimizer's dtype shards; ``groups``: its param groups (read when a
    bucket is counted); ``sizes``: each shard's slots in the step's count vector."""

    def __init__(self, shards: Sequence[Any], groups: list[dict], device: torch.device,
                 backend: str, sizes: Sequence[int]):
        self.shards, self.groups, self.device, self.backend = shards, groups, device, backend
        self.sizes = list(sizes)
        self.index = {id(sh): k for k, sh in enumerate(shards)}
        self.with_sq = False      # set_policy: sum the squares too
        self._counts: Optional[Tensor] = None
        self._sq: list[Tensor] = []
        self._done: set = set()
        self._key: Optional[tuple] = None
        self._versions: Optional[list[int]] = None
        self._end_queued = False

    def set_policy(self, max_grad_norm: Optional[float], skip_nonfinite: bool) -> None:
        """What the next backward sums besides the counts: the squares where the step
        folds its norm into the count (``shard_step.norm_in_count``: no clipping)."""
        self.with_sq = bool(skip_nonfinite and max_grad_norm is None
                            and norm_in_count(self.groups))

    # ------------------------------------------------------------------ backward side
    def count_bucket(self, bk: Any) -> None:
        """Count bucket ``bk`` (its reduction has finished): every per-tensor-scaled run
        in it, into the step's count vector (and squared sums)."""
        key = _key(self.groups)
        if all(unit for _, _, unit in key):  # nothing per-tensor scaled: nothing to count
            return
        if key != self._key:  # the first bucket of this step (or the groups changed)
            self._start(key)
        k = self.index[id(bk.shard)]
        sh = bk.shard
        cnt = _views(self._counts, self.sizes)[k]
        ops = get_ops(self.backend)
        with torch.no_grad():
            for i, run in _runs(sh):
                if run.bucket != bk.index or key[run.group][2]:
                    continue
                hp = GroupHParams.from_group(self.groups[run.group])
                _p, gr, m, v, s, _out = _ranges(sh, run)
                ops.count_run(gr, m, v, s, hp, run_table_of(sh, i, run), cnt, None, None,
                              self._sq[k] if self.with_sq else None)
                self._done.add((k, i))
        self._queue_end_of_backward()

    def _start(self, key: tuple) -> None:
        if self._counts is None:
            self._counts = torch.zeros(sum(self.sizes), dtype=torch.int64, device=self.device)
            self._sq = [torch.zeros((), dtype=torch.float64, device=self.device)
                        for _ in self.shards]
        else:
            self._counts.zero_()
            for t in self._sq:
                t.zero_()
        self._key, self._done, self._versions = key, set(), None

    def _queue_end_of_backward(self) -> None:
        """At the end of this backward, note the grad buffers' versions: a write to them
        afterwards (``p.grad.mul_(...)``) makes the counts stale."""
        if self._end_queued:
            return
        self._end_queued = True

        def at_end() -> None:
            self._end_queued = False
            self._versions = self._grad_versions()

        try:
            torch.autograd.Variable._execution_engine.queue_callback(at_end)
        except RuntimeError:  # not inside a backward (a hook fired by hand): note it now
            at_end()

    def _grad_versions(self) -> list[int]:
        return [sh.buf.grad._version for sh in self.shards]

    # ------------------------------------------------------------------ step side
    def discard(self) -> None:
        """Forget what was counted (``zero_grad``, state loads, a step that cannot use it),
        and a callback lost with a backward that raised."""
        self._key, self._done, self._versions = None, set(), None
        self._end_queued = False

    def take(self, need_sq: bool) -> Optional[Counted]:
        """What backward counted, if it is exactly what ``step()`` would count on the
        unclipped gradients now (see the module docstring), else None; either way nothing
        is kept for the next step. Call before anything in the step writes the grad
        buffers (late reductions); with clipping, use it only if :meth:`unclipped`."""
        key, done, versions = self._key, self._done, self._versions
        self.discard()
        if key is None or not done or (need_sq and not self.with_sq):
            return None
        if versions is None or versions != self._grad_versions() or key != _key(self.groups):
            return None
        return Counted(self._counts, self._sq if need_sq else None, done)

    def unclipped(self, coef: Tensor, synced: bool) -> bool:
        """The clip coefficient is exactly 1 (the norm is within ``max_grad_norm``): the
        step then counts g * 1.0 == g, what backward counted. A host read of one number:
        done on CPU, where it costs nothing, and where the step read the ranks' error
        flag already (``synced``: world size > 1); elsewhere (one GPU) the step counts
        again rather than wait for the device."""
        if coef.device.type not in HOST_READ_FREE and not synced:
            return False
        return bool(coef == 1.0)
