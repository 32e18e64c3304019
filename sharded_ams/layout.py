"""Flat-buffer layout: where each parameter lives and which slice each rank owns.

Pure data, no ``torch.distributed``. Index spaces (Megatron-Core's names):

* **buffer**: one flat buffer per dtype, cut into buckets; each param start aligned to
  ``ALIGN`` elements.
* **bucket**: a contiguous span of the buffer, padded so it splits into ``world_size``
  equal shards; one reduction and one gather per bucket. Params fill buckets in the order
  their gradients are expected (the reverse of forward order, as Megatron-Core's
  ``param_and_grad_buffer``): bucket 0 is complete first during backward, so it is reduced
  first, and the last bucket (the first layers) is gathered first for the next forward.
  Inside a bucket params are stored group by group, so each (bucket, param group) is one
  contiguous run for the fused step.
* **local**: rank r's optimizer state, the concatenation of its shard of every bucket.
* **param**: [offset, offset + length) inside one parameter (its unpadded index space,
  the space checkpoints use).

A shard boundary may fall inside a parameter; the AMS step is elementwise apart from
the per-tensor count, which is combined across ranks.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

ALIGN = 64
#: Runs handed to the step kernel end on a multiple of this many elements where the
#: extension covers only padding (the Triton kernel's vector loads need 16-aligned lengths).
KERNEL_MULTIPLE = 16


#: gloo's bucket with overlap: measured on 2 CPU ranks (benchmarks/bench_overlap.py
#: --bucket-sweep); gloo is the CPU test/dev backend, so it is not scaled with N.
GLOO_BUCKET_NUMEL = 1_000_000
#: NCCL floor: PyTorch DDP's bucket_cap_mb=25 (25 MiB of fp32 gradients), the old fixed size.
NCCL_BUCKET_FLOOR = 6_553_600
#: NCCL per-rank term, Megatron-Core's: each rank's slice of a bucket stays >= 1M elements.
NCCL_BUCKET_PER_RANK = 1_000_000


def default_bucket_numel(backend: str, world_size: int) -> Optional[int]:
    """Elements per communication bucket for ``bucket_numel="auto"`` (with overlap).

    A ring reduce-scatter or all-gather costs about N - 1 hop latencies whatever its size,
    and moves bucket / N elements per hop, so a fixed bucket becomes latency-bound as N
    grows (6.55M at N = 1,024: 6.4K elements, 25 KB, per hop). NCCL: max(6.55M, 1M x N),
    Megatron-Core's per-rank term (max(40M, 1M x N)) with DDP's 25 MiB as the floor
    instead of 40M, so models of 60M-1B params keep several buckets (overlap) at small N;
    from N = 7 on it is 1M x N (1.02G elements at N = 1,024). gloo: the measured 1M.
    N = 1 and unknown backends: None (one bucket per dtype)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return None
    if backend == "gloo":
        return GLOO_BUCKET_NUMEL
    if backend == "nccl":
        return max(NCCL_BUCKET_FLOOR, NCCL_BUCKET_PER_RANK * world_size)
    return None


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in its buffer."""

    index: int        # position in the buffer's parameter list (global across ranks)
    name: str
    shape: tuple[int, ...]
    group: int        # param-group index
    bucket: int
    start: int        # buffer index space
    numel: int

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int          # padded: (end - start) % world_size == 0
    world_size: int

    @property
    def shard_size(self) -> int:
        return (self.end - self.start) // self.world_size

    def shard(self, rank: int) -> tuple[int, int]:
        s = self.start + rank * self.shard_size
        return s, s + self.shard_size


@dataclass(frozen=True)
class LocalPiece:
    """The part of parameter ``slot`` that rank owns: ``length`` elements starting at
    ``param_offset`` in the param, ``buffer_start`` in the buffer, ``local_start`` locally."""

    slot: ParamSlot
    param_offset: int
    buffer_start: int
    local_start: int
    length: int


@dataclass(frozen=True)
class Run:
    """A contiguous local range of one (bucket, group) with the pieces in it.

    ``local_end`` is rounded up to a multiple of ``KERNEL_MULTIPLE`` where the elements
    past the last piece are padding (they hold zeros and stay zero: zero gradient, zero
    state), so the kernel sees aligned lengths; it never reaches another param."""

    bucket: int
    group: int
    local_start: int
    local_end: int
    pieces: tuple[LocalPiece, ...]


@dataclass
class BufferLayout:
    """Layout of one dtype's flat buffer for ``world_size`` ranks."""

    slots: list[ParamSlot]
    buckets: list[Bucket]
    world_size: int
    numel: int = field(init=False)
    _offsets: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.numel = self.buckets[-1].end if self.buckets else 0
        # prefix sums of the shard sizes: local_offset is O(1), not O(B) per call
        self._offsets = list(itertools.accumulate((b.shard_size for b in self.buckets),
                                                  initial=0))

    @classmethod
    def build(cls, params: Sequence[tuple[str, tuple[int, ...], int]], world_size: int,
              bucket_numel: Optional[int] = None, align: int = ALIGN) -> "BufferLayout":
        """``params``: (name, shape, group) in fill order (the order gradients are expected
        during backward). A bucket closes once its params hold at least ``bucket_numel``
        elements (None: one bucket); inside it, params are stored by group (stable)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        members: list[list[int]] = [[]]
        filled = 0
        for i, (_, shape, _) in enumerate(params):
            members[-1].append(i)
            filled += math.prod(shape)
            if bucket_numel is not None and filled >= bucket_numel and i < len(params) - 1:
                members.append([])
                filled = 0
        slots, buckets = [], []
        shard_align = world_size * align
        pos = 0
        for idx in (m for m in members if m):
            bstart = pos
            for i in sorted(idx, key=lambda i: params[i][2]):
                name, shape, group = params[i]
                pos = pad_to(pos, align)
                slots.append(ParamSlot(len(slots), name, tuple(shape), group, len(buckets), pos,
                                       math.prod(shape)))
                pos += slots[-1].numel
            pos = bstart + pad_to(max(pos - bstart, 1), shard_align)
            buckets.append(Bucket(bstart, pos, world_size))
        return cls(slots, buckets, world_size)

    @property
    def shard_numel(self) -> int:
        """Elements of local state on every rank (the same on all ranks)."""
        return self._offsets[-1]

    def local_offset(self, bucket: int) -> int:
        """Where bucket ``bucket``'s shard starts in the local index space."""
        if not 0 <= bucket <= len(self.buckets):
            raise IndexError(f"bucket {bucket} out of range (0..{len(self.buckets)})")
        return self._offsets[bucket]

    def pieces(self, rank: int) -> list[LocalPiece]:
        """Every (part of a) parameter that ``rank`` owns, in buffer order."""
        out = []
        for slot in self.slots:
            b = self.buckets[slot.bucket]
            s0, s1 = b.shard(rank)
            lo, hi = max(slot.start, s0), min(slot.end, s1)
            if lo < hi:
                local = self.local_offset(slot.bucket) + lo - s0
                out.append(LocalPiece(slot, lo - slot.start, lo, local, hi - lo))
        return out

    def runs(self, rank: int, groups: Sequence[int]) -> list[Run]:
        """One run per (bucket, group) pair that exists globally, in the same order on
        every rank (collectives inside a run must line up); possibly empty locally."""
        by_key: dict[tuple[int, int], list[LocalPiece]] = {}
        for slot in self.slots:
            by_key.setdefault((slot.bucket, slot.group), [])
        for pc in self.pieces(rank):
            by_key[(pc.slot.bucket, pc.slot.group)].append(pc)
        starts = sorted(s.start for s in self.slots)
        runs = []
        for (bucket, group), pcs in sorted(by_key.items()):
            if group not in groups:
                continue
            if pcs:
                lo, hi = pcs[0].local_start, pcs[-1].local_start + pcs[-1].length
                hi += self._padding_after(pcs[-1], rank, starts, hi)
            else:
                lo = hi = self.local_offset(bucket)
            runs.append(Run(bucket, group, lo, hi, tuple(pcs)))
        return runs

    def _padding_after(self, pc: LocalPiece, rank: int, starts: list[int], local_end: int) -> int:
        """Elements after ``pc`` (up to the next multiple of KERNEL_MULTIPLE) that are
        padding: before the next param's start and inside the rank's shard."""
        end = pc.buffer_start + pc.length
        limit = self.buckets[pc.slot.bucket].shard(rank)[1]
        k = bisect.bisect_left(starts, end)
        if k < len(starts):
            limit = min(limit, starts[k])
        return min(pad_to(local_end, KERNEL_MULTIPLE) - local_end, limit - end)
