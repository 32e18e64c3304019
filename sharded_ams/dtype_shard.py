"""One dtype's share of a ``ShardedAMS``: its flat param/grad buffers, their layout, and
this rank's optimizer state (m, v[, s], and fp32 masters for low-precision params)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .buffers import FlatParamGradBuffer
from .kernels.tables import RunTable
from .layout import BufferLayout, Run

__all__ = ["DtypeShard", "follow_params"]


#: elements per piece of ``follow_params``: its temporaries stay ~7 B x this (112 MiB)
FOLLOW_CHUNK = 1 << 24


def follow_params(master: Tensor, param: Tensor) -> None:
    """fp32 ``master`` := the 16-bit ``param`` wherever the param is not the master
    rounded to its dtype, i.e. where something other than the optimizer wrote it (loaded
    or initialised weights); elsewhere the master keeps its extra bits, so loading the
    model and the optimizer state of one checkpoint, in either order, loses nothing.
    In pieces of ``FOLLOW_CHUNK`` elements: a 7B shard's masters must not need a second
    copy of themselves in device memory."""
    if not (master.is_contiguous() and param.is_contiguous()):
        master.copy_(torch.where(param != master.to(param.dtype), param.float(), master))
        return
    m, p = master.view(-1), param.view(-1)
    for a in range(0, m.numel(), FOLLOW_CHUNK):
        mc, pc = m[a:a + FOLLOW_CHUNK], p[a:a + FOLLOW_CHUNK]
        mc.copy_(torch.where(pc != mc.to(pc.dtype), pc.float(), mc))


class DtypeShard:
    """Everything about one dtype: buffers, layout and this rank's optimizer state."""

    def __init__(self, layout: BufferLayout, params: list[Tensor], dtype: torch.dtype,
                 device: torch.device, rank: int, with_s: bool,
                 state_dtype: torch.dtype = torch.float32,
                 grad_dtype: Optional[torch.dtype] = None):
        self.layout, self.rank, self.device = layout, rank, device
        self.buf = FlatParamGradBuffer(layout, params, dtype, device, grad_dtype)
        n = layout.shard_numel
        f32 = dict(dtype=torch.float32, device=device)
        moments = dict(dtype=state_dtype, device=device)
        self.state: dict[str, Tensor] = {"exp_avg": torch.zeros(n, **moments),
                                         "exp_avg_sq": torch.zeros(n, **moments)}
        if with_s:
            self.state["exp_avg_s"] = torch.zeros(n, **moments)
        # fp32 params are their own masters (the shard of the param buffer); others keep one.
        self.own_master = dtype != torch.float32
        if self.own_master:
            self.state["master"] = torch.zeros(n, **f32)
            for b in range(len(layout.buckets)):
                self.master_view(b).copy_(self.param_shard(b))
        self.runs: list[Run] = []
        self.tables: dict[int, RunTable] = {}  # run index -> its table (shard_step.py)
        # each slot's numel (+ 0: padding), on device: the WHOLE tensor's for a tensor-
        # parallel DTensor (the scale's d), set by ShardedAMS; None: built from the layout
        self.numels: Optional[Tensor] = None
        # False: these params are copies another model-parallel rank counts in the grad
        # norm and the per-tensor counts (model_parallel.py)
        self.counted = True

    def param_shard(self, b: int) -> Tensor:
        s0, s1 = self.layout.buckets[b].shard(self.rank)
        return self.buf.param[s0:s1]

    def grad_shard(self, b: int) -> Tensor:
        s0, s1 = self.layout.buckets[b].shard(self.rank)
        return self.buf.grad[s0:s1]

    def local(self, key: str, b: int) -> Tensor:
        off = self.layout.local_offset(b)
        return self.state[key][off:off + self.layout.buckets[b].shard_size]

    def master_view(self, b: int) -> Tensor:
        return self.local("master", b) if self.own_master else self.param_shard(b)

    def master_piece(self, local_start: int, length: int) -> Tensor:
        """fp32 master values of a local range (it may not cross a bucket)."""
        if self.own_master:
            return self.state["master"][local_start:local_start + length]
        for b, bk in enumerate(self.layout.buckets):
            off = self.layout.local_offset(b)
            if off <= local_start < off + bk.shard_size:
                s0 = bk.shard(self.rank)[0] + local_start - off
                return self.buf.param[s0:s0 + length]
        raise IndexError(local_start)
