"""AMS on DTensor params (FSDP2 ``fully_shard``, tensor parallel ``parallelize_module``).

The AMS step is elementwise except for one number per tensor: with lam not in {1, -1} the
scale eta^ = eta d / (#(u*s >= 0) + |lam| #(u*s < 0)) is counted over the WHOLE logical
tensor (d its full numel). So a sharded param is stepped on its local shard (plain tensors,
the same memory as the DTensor's: no DTensor dispatch per op in the hot loop), and each
shard's count is summed over the ranks that hold the other shards. :class:`CountBatch`
gathers the counts of every tensor of a step and sums them in one all-reduce per set of
process groups (one for a 1-D FSDP mesh), before any tensor is applied; nothing is read on
the host.

Which ranks to sum over comes from the placements: a ``Shard`` (or FSDP2+TP's strided
shard) mesh dimension splits the tensor, so its group is summed over; a ``Replicate``
dimension holds copies (no sum). A ``Partial`` param or a gradient laid out unlike its param
cannot be stepped shard by shard: :func:`dtensor_layout` raises a ValueError naming it.
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

#: DTensor's class once ``torch.distributed.tensor`` is imported (see :func:`is_dtensor`)
_DTensor: Optional[type] = None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor. Nothing here imports ``torch.distributed.tensor``
    (~1.3 s of CPU per process here: it pulls in sympy): no tensor can be a DTensor
    before that module is imported (by FSDP2, a TP plan, DCP or the user), so until then
    the answer is False, and a run on plain tensors never pays for it."""
    global _DTensor
    if _DTensor is None:
        _DTensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if _DTensor is None:
            return False
    return isinstance(t, _DTensor)


@functools.lru_cache(maxsize=None)
def _placement_types() -> tuple:
    """(Shard or strided-shard types, Replicate): imported when a DTensor is first laid
    out, i.e. once its module is loaded anyway."""
    from torch.distributed.tensor.placement_types import Replicate, Shard
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        return (Shard,), Replicate
    return (Shard, _StridedShard), Replicate


#: process groups whose sum makes a shard's count the whole tensor's (ranks as the key)
Groups = tuple


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor as a plain tensor sharing its memory (``to_local()``
    without the autograd wrapper: ~2 us a call under no_grad, ~0.02 us this way); any
    other tensor as it is."""
    if t is None or not is_dtensor(t):
        return t
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t.to_local()


class ParamName:
    """How an error names a parameter (its name when the group has ``param_names``, else
    its position and shape); built for every param every step, so formatted only when an
    error prints it."""

    __slots__ = ("name", "index", "group_index", "shape")

    def __init__(self, name: Optional[str], index: int, group_index: int, shape) -> None:
        self.name, self.index, self.group_index, self.shape = name, index, group_index, shape

    def __str__(self) -> str:
        if self.name:
            return f"parameter {self.name!r}"
        return (f"the parameter at position {self.index} of param group {self.group_index} "
                f"(shape {tuple(self.shape)})")


def describe(name: Optional[str], index: int, group_index: int, p: Tensor) -> ParamName:
    return ParamName(name, index, group_index, p.shape)


#: id(param) -> (weakref to it, mesh, placements, count groups): looked up every step
#: (tensors cannot be dict keys by value: == is elementwise)
_LAYOUTS: dict[int, tuple] = {}


def dtensor_layout(p: Tensor, what: Union[str, ParamName]) -> Groups:
    """The process groups over which ``p``'s per-tensor counts must be summed (empty for
    a plain tensor or a replicated DTensor). ValueError for a placement the local-shard
    step cannot handle (``Partial``: the local values are not the param's values)."""
    if not is_dtensor(p):
        return ()
    mesh, placements = p.device_mesh, tuple(p.placements)
    cached = _LAYOUTS.get(id(p))
    if cached is None or cached[0]() is not p or cached[1] is not mesh or cached[2] != placements:
        key = id(p)
        ref = weakref.ref(p, lambda _: _LAYOUTS.pop(key, None))
        cached = ref, mesh, placements, _groups(p, what)
        _LAYOUTS[key] = cached
    return cached[3]


def _groups(p: Tensor, what: Union[str, ParamName]) -> Groups:
    groups = []
    shard, replicate = _placement_types()
    for dim, pl in enumerate(p.placements):
        if isinstance(pl, shard):
            if p.device_mesh.size(dim) > 1:  # one rank holds the whole extent: no sum
                groups.append(p.device_mesh.get_group(dim))
        elif not isinstance(pl, replicate):
            raise ValueError(
                f"AMS cannot step {what}: it is a DTensor with placement {pl} on mesh "
                f"dimension {dim} (placements {tuple(p.placements)}); only Shard and "
                "Replicate placements can be stepped shard by shard. Redistribute it to "
                "Shard/Replicate (e.g. FSDP2 fully_shard or a Colwise/Rowwise plan)")
    return tuple(groups)


def check_grad_layout(p: Tensor, what: Union[str, ParamName]) -> None:
    """A DTensor param's gradient must be laid out as the param (same mesh, same
    placements), so that its local shard lines up element by element with the param's."""
    if not is_dtensor(p):
        if is_dtensor(p.grad):
            raise ValueError(f"AMS cannot step {what}: a plain tensor with a DTensor gradient")
        return
    g = p.grad
    if not is_dtensor(g):
        raise ValueError(f"AMS cannot step {what}: a DTensor param with a plain-tensor "
                         "gradient (the gradient must be a DTensor laid out as the param)")
    same_mesh = g.device_mesh is p.device_mesh or g.device_mesh == p.device_mesh  # == ~30 us
    if not same_mesh or tuple(g.placements) != tuple(p.placements):
        raise ValueError(
            f"AMS cannot step {what}: its gradient has placements {tuple(g.placements)} "
            f"on {g.device_mesh}, the param {tuple(p.placements)} on {p.device_mesh}; "
            "redistribute the gradient to the param's layout before step()")


def check_state_layout(p: Tensor, state: dict, what: Union[str, ParamName]) -> None:
    """Loaded state of a DTensor param must be DTensors laid out as the param (a plain
    full tensor would be stepped as if it were the local shard)."""
    if not is_dtensor(p):
        return
    for k, v in state.items():
        if k != "step" and (not is_dtensor(v) or tuple(v.placements) != tuple(p.placements)):
            raise ValueError(f"AMS cannot step {what}: its state {k!r} is not a DTensor laid "
                             f"out as the param {tuple(p.placements)}; load DTensor state "
                             "(e.g. torch.distributed.checkpoint.state_dict."
                             "set_optimizer_state_dict)")


@dataclass(slots=True)
class LocalParam:
    """What one step reads and writes for one param: plain tensors (the local shard of a
    DTensor, the same memory), the full logical numel, the count's process groups and
    a key that orders the param the same way on every rank."""

    p: Tensor
    grad: Tensor
    state: dict
    numel: int
    groups: Groups
    key: tuple


def is_flat(lp: LocalParam) -> bool:
    """Param, master, gradient and state all contiguous: steppable as flat ranges (the
    one-call path of ``AMS``)."""
    master = lp.state.get("master", lp.p)
    return (master.is_contiguous() and lp.grad.is_contiguous()
            and ("master" not in lp.state or lp.p.is_contiguous()))


@dataclass(slots=True)
class _Checked:
    """A DTensor param's layout and state as last checked: while the param keeps its spec
    object, its state dict keeps the same tensors and the gradient's spec is the param's
    (FSDP2 gives every gradient its param's spec object; an equal spec is the same mesh,
    placements and shape), nothing needs checking again and the local state views can be
    reused: ~1 us a param a step instead of ~5."""

    ref: weakref.ref
    spec: object
    state: dict
    values: tuple
    local_state: dict
    numel: int
    groups: Groups


def local_param(p: Tensor, state: dict, key: tuple, what: Union[str, ParamName],
                checked: Optional[dict] = None) -> LocalParam:
    """Plain views of ``p``, its gradient and its state (state tensors of a DTensor param
    are DTensors laid out as the param: DCP saves and reshards them). ``checked``: the
    caller's dict of :class:`_Checked` by param id, kept by the optimizer (it holds the
    state's views: a module-level one would keep a deleted optimizer's state alive)."""
    g = p.grad
    if not is_dtensor(p):
        if is_dtensor(g):
            check_grad_layout(p, what)  # raises: a plain param with a DTensor gradient
        return LocalParam(p, g, state, p.numel(), (), key)
    spec = p._spec
    c = checked.get(id(p)) if checked is not None else None
    if (c is not None and c.spec is spec and c.state is state and is_dtensor(g)
            and (g._spec is spec or g._spec == spec) and c.ref() is p
            and len(state) == len(c.values) and all(state.get(k) is v for k, v in c.values)):
        return LocalParam(p._local_tensor, g._local_tensor, c.local_state, c.numel, c.groups,
                          key)
    groups = dtensor_layout(p, what)
    check_grad_layout(p, what)
    check_state_layout(p, state, what)
    local_state = {k: (v if k == "step" else local(v)) for k, v in state.items()}
    if checked is not None:
        pid = id(p)
        checked[pid] = _Checked(weakref.ref(p, lambda _: checked.pop(pid, None)), spec, state,
                                tuple(state.items()), local_state, p.numel(), groups)
    return LocalParam(local(p), local(g), local_state, p.numel(), groups, key)


@functools.lru_cache(maxsize=None)
def _signature(groups: Groups) -> tuple:
    """The ranks of each group: two meshes over the same ranks sum their counts together."""
    return tuple(tuple(dist.get_process_group_ranks(g)) for g in groups)


class CountBatch:
    """The per-tensor counts of one step, summed across ranks in one all-reduce per set
    of process groups, before any deferred apply runs.

    ``add`` registers a vector of counts (int64, one per param; only the params split
    across ranks are summed); ``finish`` orders every registered count by its param's key
    (the same order on every rank, whatever path each rank took for its shard: uneven
    shards can put a tensor on different paths), all-reduces them, and writes the sums
    back; then the ``defer``-ed applies run. One vector already in key order (a group's
    one compiled or Triton count call) is all-reduced in place: no gather, no copy back.
    Groups are keyed by their ranks, so two meshes over the same ranks share a sum."""

    def __init__(self) -> None:
        #: signature -> [(counts, positions in it or None for all, the params' keys)]
        self._parts: dict[tuple, list[tuple[Tensor, Optional[list[int]], list[tuple]]]] = {}
        self._groups: dict[tuple, Groups] = {}
        self._deferred: list[Callable[[], None]] = []

    def add(self, params: Sequence[LocalParam], counts: Tensor) -> None:
        """``counts[i]`` (a 1-D int64 tensor) is ``params[i]``'s count of this rank."""
        by_sig: dict[tuple, list[int]] = {}
        for i, lp in enumerate(params):
            if lp.groups:
                sig = _signature(lp.groups)
                by_sig.setdefault(sig, []).append(i)
                self._groups.setdefault(sig, lp.groups)
        for sig, idx in by_sig.items():
            every = len(idx) == len(params)
            self._parts.setdefault(sig, []).append(
                (counts, None if every else idx, [params[i].key for i in idx]))

    def defer(self, fn: Callable[[], None]) -> None:
        self._deferred.append(fn)

    def finish(self) -> None:
        """All-reduce the counts, then run the deferred applies (in registration order)."""
        for sig in sorted(self._parts):
            parts, groups = self._parts[sig], self._groups[sig]
            keys = [k for _, _, ks in parts for k in ks]
            order = sorted(range(len(keys)), key=keys.__getitem__)
            if len(parts) == 1 and parts[0][1] is None and order == sorted(order):
                for g in groups:  # one vector in key order: summed where it is
                    dist.all_reduce(parts[0][0], group=g)
                continue
            flat = torch.cat([c if idx is None else c[idx] for c, idx, _ in parts])
            perm = torch.tensor(order, device=flat.device)
            vec = flat[perm]
            for g in groups:
                dist.all_reduce(vec, group=g)
            flat[perm] = vec
            offset = 0
            for c, idx, ks in parts:
                part = flat[offset:offset + len(ks)]
                if idx is None:
                    c.copy_(part)
                else:
                    c[idx] = part
                offset += len(ks)
        for fn in self._deferred:
            fn()
        self._parts.clear()
        self._deferred.clear()


def needs_batch(params: Sequence[LocalParam], lam: float) -> bool:
    """True when some tensor's scale needs counts from other ranks."""
    return abs(float(lam)) != 1.0 and any(lp.groups for lp in params)


def grad_as_param(p: Tensor, g: Tensor, what: Union[str, ParamName]) -> Tensor:
    """The local shard of ``g``, the gradient of DTensor param ``p``, laid out as ``p``.

    Tensor parallelism hands back gradients laid out unlike their param: a replicated
    param used on sequence-split activations (``SequenceParallel`` norms) gets a
    ``Partial`` gradient (each tp rank holds a partial sum), a row-parallel embedding a
    ``Replicate`` one. ``redistribute`` makes them the param's layout (Partial ->
    Replicate is an all-reduce over that mesh dimension, Replicate -> Shard a local
    slice), so the local shard lines up element by element with the param's."""
    if not is_dtensor(g):
        raise ValueError(f"ShardedAMS cannot step {what}: a DTensor param with a plain-tensor "
                         "gradient (the gradient must be a DTensor on the param's mesh)")
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return local(g)
