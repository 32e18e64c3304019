"""``AMS`` on FSDP2 / tensor-parallel params: C-Adam's count pass during backward.

A per-tensor-scaled step (|lam| != 1: C-Adam, lam = -0.5, ...) counts sign(u) != sign(s)
over every tensor (a read of g and m, ``kernels/multi.py``) before its apply pass reads
them again. On FSDP2, each sharded param's post-accumulate-grad hooks run right after its
group's reduce-scatter has landed (``foreach_reduce``), while earlier layers are still
being differentiated: :class:`HookCounts` counts each such group of shards there, with the
step's own count call (the same compiled or Triton pass, so the same integers), and
``step()`` is left with the counts' all-reduce and the apply pass. On a GPU that read runs
beside backward's matmuls instead of after them; on CPU it moves, it does not vanish.

Which hooks make one call: FSDP2's gradients of one group are views of one
reduce-scatter output, so consecutive hooks whose gradients share a storage are counted
together when the next storage begins (one call per ``fully_shard`` module; the last at the
end of backward). A gradient with a storage of its own (a tensor-parallel param that
autograd accumulates, not FSDP2) is left to the step: counted in its own hook it would be
a call per tensor (a compile per shape), batched it would wait for the end of backward and
overlap nothing, and either way its hook fires on every micro-batch of an accumulation.

Exactness does not depend on the user's calls: a count is used only if it is what the
step would count now (:meth:`HookCounts.take`): the same gradient tensor at the same
version (local shard and DTensor wrapper), the same m and s at the same versions, the same
beta1, beta3 and kernel backend; and every ``step()`` forgets all counts, so a second step
on the same gradients counts again. Otherwise the step counts every tensor of the group
itself, as without this. Every rank all-reduces the count vector in ``step()`` whichever
way it got its counts, so a rank that counts again cannot desynchronize the collectives.

Only DTensor params are hooked: a plain param's hook would fire on every micro-batch of
an accumulation (there is no ``no_sync`` to tell the last one) and its count needs no
all-reduce to hide.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .dtensor import LocalParam, describe, is_dtensor, is_flat, local, local_param
from .kernels import GroupHParams
from .kernels.multi import multi_ops
from .update import lam_is_unit


class _Entry:
    """One tensor's count from backward and what it was counted from."""

    __slots__ = ("counts", "index", "grad", "grad_versions", "m", "m_version", "s",
                 "s_version", "beta1", "beta3", "backend")

    def __init__(self, counts: Tensor, index: int, p: Tensor, lp: LocalParam,
                 hp: GroupHParams, backend: str) -> None:
        self.counts, self.index, self.backend = counts, index, backend
        self.grad, self.grad_versions = weakref.ref(lp.grad), _grad_versions(p, lp.grad)
        m, s = lp.state["exp_avg"], lp.state.get("exp_avg_s")
        self.m, self.m_version = weakref.ref(m), m._version
        self.s = None if s is None else weakref.ref(s)
        self.s_version = None if s is None else s._version
        self.beta1, self.beta3 = hp.beta1, hp.beta3

    def holds(self, p: Tensor, lp: LocalParam, hp: GroupHParams, backend: str) -> bool:
        m, s = lp.state["exp_avg"], lp.state.get("exp_avg_s")
        return (self.grad() is lp.grad and self.grad_versions == _grad_versions(p, lp.grad)
                and self.m() is m and self.m_version == m._version
                and (s is None) == (self.s is None)
                and (s is None or (self.s() is s and self.s_version == s._version))
                and self.beta1 == hp.beta1 and self.beta3 == hp.beta3
                and self.backend == backend)


def _grad_versions(p: Tensor, g: Tensor) -> tuple[int, int]:
    """An in-place DTensor op bumps the wrapper's version, a write to the local shard (FSDP2's
    accumulation, ``_foreach_mul_`` on local grads) the shard's: both are compared."""
    return (p.grad._version if p.grad is not None else -1), g._version


class HookCounts:
    """The counts of DTensor params' gradients taken in their post-accumulate-grad hooks,
    kept for the next ``step()`` of ``opt`` (held weakly: a dropped optimizer's hooks do
    nothing)."""

    def __init__(self, opt: Any, cuda_only: bool = False) -> None:
        self._opt = weakref.ref(opt)
        self._cuda_only = cuda_only
        self._index: dict[int, tuple[int, int]] = {}
        #: (group index, device) -> the group's local elements there (the step's path
        #: choice), recomputed when the index is (the groups changed)
        self._numels: dict[tuple, int] = {}
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._burst: list[Tensor] = []
        self._burst_key: Optional[int] = None
        self._end_queued = False
        self.handles: list[Any] = []
        # the hooks go with the optimizer (they would only find it gone; this list does not
        # refer to it, so the finalizer does not keep it alive)
        weakref.finalize(opt, _remove_all, self.handles)
        #: tensors whose counts the last step took from backward (tests, benchmarks)
        self.used = 0

    def register(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if (is_dtensor(p) and p.requires_grad
                    and not (self._cuda_only and p.device.type != "cuda")):
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # ------------------------------------------------------------------ backward side
    def _hook(self, p: Tensor) -> None:
        opt = self._opt()
        if opt is None or p.grad is None:
            return
        key = self._key(opt, p)
        if key is None or lam_is_unit(float(opt.param_groups[key[0]]["lam"])):
            return  # |lam| = 1 (Grams, AdamW) counts nothing
        g = local(p.grad)
        storage = g.untyped_storage()
        if storage.nbytes() <= g.numel() * g.element_size():
            return  # a gradient of its own: the step counts it (see the module docstring)
        ptr = storage.data_ptr()  # a view of a group's reduce-scatter output
        if self._burst and ptr != self._burst_key:
            self._flush_burst()
        self._burst.append(p)
        self._burst_key = ptr
        self._queue_end_of_backward()

    def _flush_burst(self) -> None:
        burst, self._burst, self._burst_key = self._burst, [], None
        self._count(burst)

    def _queue_end_of_backward(self) -> None:
        if self._end_queued:
            return
        self._end_queued = True

        def at_end() -> None:
            self._end_queued = False
            self._flush_burst()

        try:
            torch.autograd.Variable._execution_engine.queue_callback(at_end)
        except RuntimeError:  # a hook run by hand, outside backward: count now
            at_end()

    def _count(self, params: list[Tensor]) -> None:
        """Count ``params`` (one count call per param group), as ``step()`` would."""
        opt = self._opt()
        if opt is None or not params:
            return
        by_group: dict[int, list[tuple[Tensor, LocalParam]]] = {}
        for p in params:
            key = self._key(opt, p)
            if key is None:
                continue
            gi, i = key
            group = opt.param_groups[gi]
            state = opt.state.get(p)
            if not state or "exp_avg" not in state or lam_is_unit(float(group["lam"])):
                continue  # the first step creates the state; |lam| = 1 counts nothing
            names = group.get("param_names")
            try:  # a layout the step cannot take: the step raises, naming it
                lp = local_param(p, state, key, describe(names[i] if names else None, i, gi, p),
                                 opt._checked)
            except (ValueError, RuntimeError):
                continue
            by_group.setdefault(gi, []).append((p, lp))
        with torch.no_grad():
            for gi, pairs in by_group.items():
                self._count_group(opt, gi, pairs)

    def _count_group(self, opt: Any, gi: int, pairs: list[tuple[Tensor, LocalParam]]) -> None:
        group = opt.param_groups[gi]
        if not opt._is_default(group):
            return
        device = pairs[0][1].p.device
        numel = self._numels.get((gi, device))
        if numel is None:  # once, not per group of hooks: ~3 us a param
            numel = self._numels[(gi, device)] = sum(
                local(p).numel() for p in group["params"] if local(p).device == device)
        backend = opt._path(group, device, numel)
        if not ((backend == "compiled" and device.type == "cpu") or backend == "triton"):
            return
        pairs = [(p, lp) for p, lp in pairs if lp.p.device == device and is_flat(lp)]
        if not pairs:
            return
        hp = GroupHParams.from_group(group)
        lps = [lp for _, lp in pairs]
        states = [lp.state for lp in lps]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        ss = [st["exp_avg_s"] for st in states] if hp.beta3 > 0 else None
        ps = [st.get("master", lp.p) for lp, st in zip(lps, states)]
        outs = [lp.p if "master" in st else None for lp, st in zip(lps, states)]
        count = multi_ops(backend)[1]
        counts = count(ps, [lp.grad for lp in lps], ms, vs, ss, outs, hp, cache=opt._tables)
        for j, (p, lp) in enumerate(pairs):
            self._entries[lp.key] = _Entry(counts, j, p, lp, hp, backend)

    def _key(self, opt: Any, p: Tensor) -> Optional[tuple[int, int]]:
        key = self._index.get(id(p))
        if key is None or _param_at(opt, key) is not p:
            self._index = {id(q): (gi, i) for gi, g in enumerate(opt.param_groups)
                           for i, q in enumerate(g["params"])}
            self._numels.clear()
            key = self._index.get(id(p))
        return key

    # ------------------------------------------------------------------ step side
    def take(self, group: dict, params: Sequence[LocalParam], hp: GroupHParams,
             backend: str) -> Optional[Tensor]:
        """The int64 count vector of ``params`` (this rank's, not yet summed) if backward
        counted every one of them exactly as the step would now, else None."""
        entries = []
        for lp in params:
            e = self._entries.get(lp.key)
            if e is None or not e.holds(group["params"][lp.key[1]], lp, hp, backend):
                return None
            entries.append(e)
        if not entries:
            return None
        vectors = {id(e.counts): e.counts for e in entries}
        first = entries[0].counts
        if (len(vectors) == 1 and first.numel() == len(entries)
                and [e.index for e in entries] == list(range(len(entries)))):
            out = first.clone()  # one count call, in the step's order: no gather
        else:
            out = torch.stack([e.counts[e.index] for e in entries])
        if out.is_cuda:  # counted on FSDP2's reduce-scatter stream, read on this one
            for v in vectors.values():
                v.record_stream(torch.cuda.current_stream(out.device))
        self.used += len(entries)
        return out

    def start_step(self) -> None:
        self.used = 0

    def clear(self) -> None:
        """Forget every count (each step ends with this: its apply moved m), and what a
        backward that raised left behind (its end-of-backward callback never ran)."""
        self._entries.clear()
        self._burst, self._burst_key, self._end_queued = [], None, False


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _param_at(opt: Any, key: tuple[int, int]) -> Optional[Tensor]:
    gi, i = key
    groups = opt.param_groups
    if gi < len(groups) and i < len(groups[gi]["params"]):
        return groups[gi]["params"][i]
    return None
