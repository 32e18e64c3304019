"""A :class:`~sharded_ams.ShardedAMS`'s state as a DCP state dict: the same keys and
global shapes an FSDP2 run saves (``model.<fqn>``: the fp32 weights, ``optim.state.<fqn>.
exp_avg`` ..., ``optim.param_groups``), so a ``zero1`` (+ ``tp``) checkpoint is read by any
DCP user, by ``ckpt consolidate``/``export``, and loads on any mesh: another dp, another
tp, or an ``fsdp`` run (DCP reshards by chunk overlap).

What makes it fit DCP: a rank's piece of a param is a contiguous range of the param's
local (tensor-parallel shard's) row-major index. Such a range is a union of at most
``2 * ndim - 1`` boxes (a partial row, whole rows, a partial row, recursively), and a box
of the local shard is a box of the global tensor, moved by the shard's global offset.
Each box is one DCP chunk, written straight from the flat state and read straight back
into it (views, no copy). A param replicated over tp has the same chunks on every tp
rank: DCP's save keeps one copy of identical chunks (``dedup_save_plans``), and every
rank reads its own.

This speaks DCP's duck-typed checkpointable protocol (``__create_write_items__``,
``__create_chunk_list__``, the one DTensor implements) and resolves chunks in the two
planners below; DCP checks at save time that each tensor's chunks cover it exactly once.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..dtensor import is_dtensor, local
from .format import HP_KEYS

__all__ = ["Chunks", "flat_range_boxes", "sharded_dcp_state_dict", "ChunkSavePlanner",
           "lookup_chunk", "dcp_param_groups"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The boxes whose union is the row-major flat range ``[start, stop)`` of a tensor of
    ``shape``, in flat order (each box is contiguous in that order)."""
    shape = tuple(int(s) for s in shape)
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if start % inner == 0 and stop % inner == 0:  # whole rows
        return [((first,) + (0,) * (len(shape) - 1), (last - first + 1,) + shape[1:])]
    if first == last:  # inside one row
        return [((first,) + o, (1,) + s)
                for o, s in flat_range_boxes(shape[1:], start - first * inner,
                                             stop - first * inner)]
    head_end, tail_start = (first + 1) * inner, last * inner
    out = flat_range_boxes(shape, start, head_end) if start % inner else []
    a = head_end if start % inner else start
    b = tail_start if stop % inner else stop
    out += flat_range_boxes(shape, a, b)
    if stop % inner:
        out += flat_range_boxes(shape, tail_start, stop)
    return out


class Chunks:
    """A tensor of global ``size`` of which this rank holds the boxes in ``pieces``
    (global offsets -> a view of that box's shape); what DCP asks of a sharded value."""

    def __init__(self, size: Sequence[int], pieces: list[tuple[tuple[int, ...], Tensor]]):
        self._size = torch.Size(size)
        self.pieces = {tuple(off): t for off, t in pieces}

    def size(self) -> torch.Size:
        return self._size

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata,
                                                           MetadataIndex, TensorProperties)
        from torch.distributed.checkpoint.planner import (TensorWriteData, WriteItem,
                                                          WriteItemType)

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(off)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape),
                              properties=TensorProperties.create_from_tensor(t),
                              size=self._size))
                for off, t in self.pieces.items()]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape)
                for off, t in self.pieces.items()]

    def get(self, offset: Optional[Sequence[int]]) -> Tensor:
        t = self.pieces.get(tuple(offset or ()))
        if t is None:
            raise ValueError(f"no chunk at offset {tuple(offset or ())} here")
        return t


def lookup_chunk(state_dict: dict, index) -> Optional[Tensor]:
    """The view DCP addresses by ``index`` when its value is :class:`Chunks`, else None."""
    obj = state_dict.get(index.fqn)
    return obj.get(index.offset) if isinstance(obj, Chunks) else None


class _SavePlanner:
    cls = None


def ChunkSavePlanner(**kw: Any):  # a class, made on first use (needs torch.distributed)
    """DCP's DefaultSavePlanner that also finds the views of :class:`Chunks` values."""
    if _SavePlanner.cls is None:
        from torch.distributed.checkpoint import DefaultSavePlanner

        class _Planner(DefaultSavePlanner):
            def lookup_object(self, index):
                t = lookup_chunk(self.state_dict, index)
                return super().lookup_object(index) if t is None else t

        _SavePlanner.cls = _Planner
    return _SavePlanner.cls(**kw)


def _global_place(p: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, global offset of this rank's local shard) of a param."""
    if not is_dtensor(p):
        return tuple(p.shape), (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(local(p).shape):  # an unexpected layout: never guess
        raise ValueError(f"local shard {tuple(local(p).shape)} is not the DTensor layout's "
                         f"{tuple(shape)}")
    return tuple(p.shape), tuple(offset)


def _param_chunks(opt) -> dict[str, dict[str, Chunks]]:
    """Per param name: per state key ("master" = the fp32 weights), this rank's chunks."""
    out: dict[str, dict[str, list]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for sh in opt.shards:
        places = {}
        for slot, p in zip(sh.layout.slots, sh.buf.params):
            shapes[slot.name], off = _global_place(p)
            places[slot.name] = off
            out.setdefault(slot.name, {})
        keys = [k for k in sh.state if k != "master"] + ["master"]
        for pc in sh.layout.pieces(opt.comm.rank):
            shift, pos = places[pc.slot.name], pc.local_start
            for offs, sizes in flat_range_boxes(pc.slot.shape, pc.param_offset,
                                                pc.param_offset + pc.length):
                n = math.prod(sizes)
                goff = tuple(o + s for o, s in zip(offs, shift))
                for k in keys:
                    flat = sh.master_piece(pos, n) if k == "master" else sh.state[k][pos:pos + n]
                    out[pc.slot.name].setdefault(k, []).append((goff, flat.view(sizes)))
                pos += n
    return {name: {k: Chunks(shapes[name], v) for k, v in per.items()}
            for name, per in out.items()}


def dcp_param_groups(groups: list[dict], hp_keys: Sequence[str]) -> list[dict]:
    """``optim.param_groups`` as ``get_optimizer_state_dict`` of an ``AMS`` built on named
    params (the launcher's ``FSDPAMS``) writes them: the hyperparameters,
    ``foreach``/``fused``, and the params' names twice (``params``, ``param_names``), so a
    DCP user's own ``dcp.load`` of such an optimizer's state dict finds every key it asks
    for (``load_dcp`` itself takes the groups from the manifest)."""
    return [{**{k: g[k] for k in hp_keys}, "foreach": None, "fused": None,
             "params": list(g["params"]), "param_names": list(g["params"])} for g in groups]


def sharded_dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """``{"model", "optim"}`` of a ShardedAMS run in the layout of an FSDP run's
    (``sharded_ams.checkpoint.dcp``): the optimized params' fp32 masters and state as
    :class:`Chunks` views, the model's other entries as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    opt._refresh_masters()  # as state_dict(): gathers done, masters follow loaded weights
    chunks = _param_chunks(opt)
    # every name of an optimized param (tied weights: each of them), as state dicts spell
    # it (a torch.compile wrapper's "_orig_mod." left out, as get_model_state_dict does)
    by_key = {n.replace("_orig_mod.", ""): opt._names[p]
              for n, p in model.named_parameters(remove_duplicate=False) if p in opt._names}
    model_sd: dict[str, Any] = {}
    for key, value in get_model_state_dict(model).items():
        name = by_key.get(key)
        model_sd[key] = value if name is None else chunks[name].get("master")
    model_sd = {k: v for k, v in model_sd.items() if v is not None}
    state: dict[str, dict] = {}
    for g in opt.param_groups:
        step = torch.tensor(float(g["step"]), dtype=torch.float32)
        for p in g["params"]:
            name = opt._names[p]
            per = {k: c for k, c in chunks.get(name, {}).items() if k != "master"}
            state[name] = {**per, "step": step.clone()}
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "param_names", "step")},
               "params": [opt._names[p] for p in g["params"]]} for g in opt.param_groups]
    for g in groups:
        g["lr"] = float(g["lr"]) if isinstance(g["lr"], Tensor) else g["lr"]
    keys = HP_KEYS
    return {"model": model_sd, "optim": {"state": state,
                                         "param_groups": dcp_param_groups(groups, keys)}}
