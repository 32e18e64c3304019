"""The plan of a ``prepare-data`` run: the inputs cut into blocks of about ``block_bytes``, in
document order, each tokenized on its own (by any worker, in any order) into its own shards.

Why blocks: the output must not depend on how many workers made it. A block's tokens depend
only on its bytes, and its shards only on its tokens, so a run on 1 process, 16 processes or a
Ray cluster writes the same files; and a rerun after a kill finds which blocks are done (as
Megatron's and datatrove's tasks). The plan is a function of the input files' contents and
``block_bytes`` only.

Units a block is made of (:func:`plan_blocks`): consecutive pieces of files. An uncompressed
text or JSONL file larger than ``block_bytes`` is cut after the first newline past every
``block_bytes`` (a line is never split; a file without newlines stays whole); a ``.gz`` file
is one unit (it cannot be read from the middle); a Parquet file's row groups and an Arrow
file's record batches are its units. Small files share a block. Files that look binary are
left out of the plan (and reported).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

from launcher.data.inputs import CHUNK_BYTES, ReadStats, file_kind, iter_segment, looks_binary

__all__ = ["Segment", "Block", "plan_blocks", "iter_block", "auto_block_bytes", "plan_digest"]

MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 1 << 20, 256 << 20
TARGET_BLOCKS = 64  # enough blocks to keep 64 workers busy (and balance them) for a mid-size corpus
_SCAN = 1 << 16


class Segment(NamedTuple):
    """Part of one input file. ``start``/``end``: bytes (text, jsonl) or units (a Parquet
    file's row groups, an Arrow file's record batches), end exclusive. ``ends_doc``: a text
    segment that ends its file, so its document ends here."""

    path: str
    kind: str
    start: int
    end: int
    ends_doc: bool
    nbytes: int


class Block(NamedTuple):
    """Block ``id`` of the plan: its segments, about ``nbytes`` of input."""

    id: int
    nbytes: int
    segments: tuple

    def to_json(self) -> str:
        return json.dumps([self.id, self.nbytes, [list(s) for s in self.segments]])

    @staticmethod
    def from_json(text: str) -> "Block":
        bid, nbytes, segs = json.loads(text)
        return Block(bid, nbytes, tuple(Segment(*s) for s in segs))


def auto_block_bytes(total_bytes: int) -> int:
    """The default block size: ~TARGET_BLOCKS blocks, within [1 MiB, 256 MiB]."""
    return min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, total_bytes // TARGET_BLOCKS))


def _newline_cuts(path: Path, size: int, step: int) -> list[int]:
    """Offsets just after the first newline at or past every ``step`` bytes from the last cut."""
    cuts, pos = [], step
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos - 1)
            cut = None
            while cut is None:
                buf = f.read(_SCAN)
                if not buf:
                    break
                i = buf.find(b"\n")
                if i >= 0:
                    cut = f.tell() - len(buf) + i + 1
            if cut is None or cut >= size:
                break
            cuts.append(cut)
            pos = cut + step
    return cuts


def _file_units(path: Path, kind: str, text_field: str, block_bytes: int) -> Iterator[Segment]:
    if kind in ("parquet", "arrow"):
        from launcher.data.columnar import column_units

        for i, (_, nbytes) in enumerate(column_units(path, kind, text_field)):
            yield Segment(str(path), kind, i, i + 1, False, nbytes)
        return
    size = os.path.getsize(path)
    cuts = [] if path.name.lower().endswith(".gz") else _newline_cuts(path, size, block_bytes)
    for a, b in zip([0, *cuts], [*cuts, size], strict=True):
        yield Segment(str(path), kind, a, b, b == size, b - a)


def plan_blocks(files: Sequence[Path], text_field: str, block_bytes: int,
                stats: Optional[ReadStats] = None) -> list[Block]:
    """The blocks of ``files`` (see the module docstring); binary-looking text files go into
    ``stats.skipped`` instead. Raises DataError for unreadable input (naming file and column)."""
    blocks: list[Block] = []
    segs: list[Segment] = []
    size = 0

    def close() -> None:
        nonlocal size
        if segs:
            blocks.append(Block(len(blocks), size, tuple(segs)))
            segs.clear()
            size = 0

    for path in files:
        kind = file_kind(path)
        if kind in ("text", "jsonl") and looks_binary(path):
            if stats is not None:
                stats.skipped.append(str(path))
            continue
        for unit in _file_units(path, kind, text_field, block_bytes):
            if segs and size + unit.nbytes > block_bytes:
                close()
            last = segs[-1] if segs else None
            if last is not None and kind in ("parquet", "arrow") and last.path == unit.path:
                segs[-1] = last._replace(end=unit.end, nbytes=last.nbytes + unit.nbytes)
            else:
                segs.append(unit)
            size += unit.nbytes
    close()
    return blocks


def plan_digest(blocks: Sequence[Block]) -> str:
    """sha256 of the plan: a resumed run's blocks are kept only if its plan is this one."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(b.to_json().encode() + b"\n")
    return h.hexdigest()


def iter_block(block: Block, text_field: str, chunk_bytes: int = CHUNK_BYTES, *, repair_utf8: bool = True,
               stats: Optional[ReadStats] = None) -> Iterator[tuple[bytes, bool, int]]:
    """``(utf8_piece, ends_document, bytes_read)`` over the documents of ``block``, in order."""
    for seg in block.segments:
        path = Path(seg.path)
        if seg.kind in ("parquet", "arrow"):
            from launcher.data.columnar import iter_columnar

            yield from iter_columnar(path, seg.kind, seg.start, seg.end, text_field, chunk_bytes,
                                     seg.nbytes, stats)
        else:
            yield from iter_segment(path, seg.kind == "jsonl", seg.start, seg.end, seg.ends_doc,
                                    text_field, chunk_bytes, repair_utf8=repair_utf8, stats=stats)
