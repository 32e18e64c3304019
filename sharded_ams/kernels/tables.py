"""Piece tables: where each logical tensor's elements lie in a flat run, on the device.

With lam not in {1, -1} the step scale is per logical tensor, so a run that holds pieces
of many tensors is counted and applied with one table instead of a loop over pieces (a
loop costs launches and, on CUDA, host syncs). A table is built once per layout and
device (one host-to-device copy each) and cached.

* For Triton: **chunks** of at most ``block`` elements, each inside one piece:
  ``chunk_base`` (a multiple of 16, so loads stay 16-element aligned), ``chunk_lo`` /
  ``chunk_hi`` (the piece's elements in that chunk) and ``chunk_tensor``; one program
  per chunk.
* For eager and compiled: the piece boundaries (counts by prefix sums, see
  :func:`segment_sums`) and ``element_tensor``, each element's tensor index (the gather
  of the per-tensor step size in the apply pass).

Elements in no piece (the padding between params of a flat buffer) belong to an extra
slot ``num_tensors`` that is stepped with scale 1, as the one-pass step steps them: with
a zero gradient (padding) nothing moves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

ALIGN = 16  # elements: a 16-element boundary keeps Triton's loads vectorised
PREFIX_CHUNK = 64  # segment_sums: elements per coarse prefix-sum chunk


@dataclass(frozen=True)
class Piece:
    """A piece [start, end) of the flat range that belongs to logical tensor ``index``
    (``numel`` elements in full); used only for the per-tensor scale."""

    start: int
    end: int
    index: int
    numel: int


@dataclass(frozen=True, eq=False)
class RunTable:
    """Device tables of one run (``n`` elements) and its pieces; see the module docstring."""

    n: int
    num_tensors: int
    pieces: tuple[Piece, ...]
    device: torch.device
    numels: Tensor          # int64[num_tensors + 1]: each tensor's full numel (0: not here)
    seg_start: Tensor       # int64[P]
    seg_end: Tensor         # int64[P]
    seg_tensor: Tensor      # int64[P]
    _lazy: dict = field(default_factory=dict, repr=False)

    @property
    def single(self) -> Optional[Piece]:
        """The piece, when one piece covers the whole run (then no per-element table)."""
        if len(self.pieces) == 1 and self.pieces[0].start == 0 and self.pieces[0].end == self.n:
            return self.pieces[0]
        return None

    def chunks(self, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(chunk_base, chunk_lo, chunk_hi, chunk_tensor) for Triton, ``block`` wide."""
        key = ("chunks", block)
        if key not in self._lazy:
            base, lo, hi, idx = [], [], [], []
            for start, end, index in self.segments():
                a = start - start % ALIGN
                while a < end:
                    base.append(a)
                    lo.append(max(a, start))
                    hi.append(min(a + block, end))
                    idx.append(index)
                    a += block
            mk = functools.partial(torch.tensor, dtype=torch.int64, device=self.device)
            self._lazy[key] = (mk(base), mk(lo), mk(hi), mk(idx))
        return self._lazy[key]

    def segments(self) -> list[tuple[int, int, int]]:
        """(start, end, tensor index) covering [0, n): the pieces and the gaps between
        (computed once per table: the CPU step walks them every step)."""
        if "segments" in self._lazy:
            return self._lazy["segments"]
        out, pos = [], 0
        for pc in self.pieces:
            if pc.start > pos:
                out.append((pos, pc.start, self.num_tensors))
            out.append((pc.start, pc.end, pc.index))
            pos = pc.end
        if pos < self.n:
            out.append((pos, self.n, self.num_tensors))
        self._lazy["segments"] = out
        return out

    def segment_tensor(self) -> Tensor:
        """int64[len(segments())] on the device: each segment's tensor index (the gather
        of the per-segment step sizes of a run stepped as a list of segments)."""
        if "segment_tensor" not in self._lazy:
            self._lazy["segment_tensor"] = torch.tensor([i for _, _, i in self.segments()],
                                                        dtype=torch.int64, device=self.device)
        return self._lazy["segment_tensor"]

    def element_tensor(self) -> Tensor:
        """int32[n]: each element's tensor index; ``num_tensors`` outside every piece."""
        if "element" not in self._lazy:
            idx = torch.full((self.n,), self.num_tensors, dtype=torch.int32)
            for pc in self.pieces:
                idx[pc.start:pc.end] = pc.index
            self._lazy["element"] = idx.to(self.device)
        return self._lazy["element"]


@functools.lru_cache(maxsize=128)
def run_table(pieces: tuple[Piece, ...], n: int, num_tensors: int,
              device: torch.device) -> RunTable:
    """The cached table of a run, for callers that do not keep their tables (``flat_step``
    on one tensor at a time). ``ShardedAMS`` has more than 128 runs at scale: it keeps its
    own tables (:func:`build_run_table`), so a cache miss never rebuilds one per step."""
    return build_run_table(pieces, n, num_tensors, device)


def build_run_table(pieces: tuple[Piece, ...], n: int, num_tensors: int,
                    device: torch.device) -> RunTable:
    """A run's table, built and copied to ``device`` (a host-to-device copy each): build
    it once per layout and keep it."""
    pieces = tuple(pc for pc in pieces if pc.end > pc.start)
    for pc in pieces:
        if not (0 <= pc.start < pc.end <= n and 0 <= pc.index < num_tensors
                and pc.end - pc.start <= pc.numel):
            raise ValueError(f"Invalid piece {pc} for a run of {n} elements and "
                             f"{num_tensors} tensors")
    if any(a.end > b.start for a, b in zip(pieces, pieces[1:])):
        raise ValueError("pieces must be sorted and must not overlap")
    numels = [0] * (num_tensors + 1)
    for pc in pieces:
        numels[pc.index] = pc.numel
    mk = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return RunTable(n, num_tensors, pieces, device, mk(numels),
                    mk([pc.start for pc in pieces]), mk([pc.end for pc in pieces]),
                    mk([pc.index for pc in pieces]))


def segment_sums(flags: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Exact sums of a 0/1 vector over segments [starts[i], ends[i]), without a loop or a
    per-element scatter (both slow: a scatter-add measured ~10x one pass on CPU).

    prefix(b) = #ones in flags[:b] = (coarse prefix over whole 64-element chunks) + (the
    ones in b's own partial chunk); a segment's sum is prefix(end) - prefix(start)."""
    n = flags.numel()
    full = n // PREFIX_CHUNK
    coarse = torch.zeros(full + 1, dtype=torch.int64, device=flags.device)
    if full:
        coarse[1:] = flags[:full * PREFIX_CHUNK].view(full, PREFIX_CHUNK).sum(
            1, dtype=torch.int64).cumsum(0)

    def prefix(b: Tensor) -> Tensor:
        c = torch.div(b, PREFIX_CHUNK, rounding_mode="floor")
        offs = c[:, None] * PREFIX_CHUNK + torch.arange(PREFIX_CHUNK, device=b.device)
        part = flags[offs.clamp(max=max(n - 1, 0))] if n else torch.zeros_like(offs, dtype=flags.dtype)
        return coarse[c] + (part.to(torch.int64) * (offs < b[:, None])).sum(1)

    return prefix(ends) - prefix(starts)


def piece_counts(flags: Tensor, table: RunTable) -> Tensor:
    """int64[num_tensors + 1]: the ones of ``flags`` (a run's per-element u*s < 0) per
    tensor."""
    counts = torch.zeros(table.num_tensors + 1, dtype=torch.int64, device=flags.device)
    if table.pieces:
        counts.index_add_(0, table.seg_tensor, segment_sums(flags, table.seg_start, table.seg_end))
    return counts


def as_pieces(pieces: Sequence[Piece]) -> tuple[Piece, ...]:
    return pieces if isinstance(pieces, tuple) else tuple(pieces)
