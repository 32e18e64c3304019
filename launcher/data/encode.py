"""One block of the plan -> its token shards, committed exactly once: what every worker of
``prepare-data`` runs, in the driver's process, a local process pool or a Ray Data task on
any node of a cluster.

The commit rule (a checkpoint's, per block): a worker writes the block's shards and its
``done.json`` (token count, documents, each shard's sha256) into an attempt directory of its
own, fsyncs them, then renames that directory to ``blocks/NNNNNN``. A rename onto a directory
that exists fails, so when two attempts race (a task retried after its node was lost while
the first still ran) one commits and the other discards its copy: nothing is written twice.
A block whose directory exists is done; a rerun skips it. A killed attempt leaves only its
attempt directory, which the assembly removes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.data.blocks import Block, iter_block
from launcher.data.inputs import ReadStats
from launcher.data.tokens import DTYPES, DataError
from launcher.data.tokenizer import Tokenizer, byte_tokenizer

__all__ = ["ShardWriter", "EncodeJob", "encode_block", "read_done", "block_dir", "BLOCKS", "fsync_dir",
           "peak_rss_kib"]

BLOCKS = "blocks"
DONE = "done.json"
MAX_DONE_BYTES = 1 << 20


class ShardWriter:
    """Appends token ids to ``name.format(n)`` files of at most ``shard_tokens`` tokens each,
    hashing as it writes."""

    def __init__(self, directory: Path, dtype: str, shard_tokens: int, vocab_size: Optional[int] = None,
                 name: str = "shard-{:05d}.bin", where: str = ""):
        self.dir, self.dtype, self.shard_tokens = directory, DTYPES[dtype], shard_tokens
        self.vocab_size, self.name, self.where = vocab_size, name, where
        self.shards: list[dict] = []
        self._f = None
        self.total = 0

    def _open(self) -> None:
        name = self.name.format(len(self.shards))
        self._f = open(self.dir / name, "wb")
        self._hash, self._count = hashlib.sha256(), 0
        self.shards.append({"file": name, "num_tokens": 0, "sha256": None})

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1].update(num_tokens=self._count, sha256=self._hash.hexdigest())
            self._f = None

    def write(self, ids: np.ndarray, source: str = "") -> None:
        if self.vocab_size is not None and len(ids):  # checked before the cast could wrap it
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DataError(f"{source or 'input'}: the tokenizer gave id {hi if lo >= 0 else lo:,}, "
                                f"outside its vocabulary [0, {self.vocab_size:,}) (writing {self.where})")
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._f is None or self._count == self.shard_tokens:
                self._close()
                self._open()
            take = ids[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._f.write(data)
            self._hash.update(data)
            self._count += len(take)
            self.total += len(take)
            ids = ids[len(take):]

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class EncodeJob:
    """What a worker needs besides the block: small and picklable (sent to every task)."""

    work_dir: str  # the run's partial directory (shared storage on a cluster)
    tokenizer_kind: str  # "byte", "bpe" or "file"
    tokenizer_sha256: str  # of work_dir/tokenizer.json: a worker never encodes with another
    eos_id: Optional[int]
    vocab_size: int
    dtype: str
    shard_tokens: int
    text_field: str

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.work_dir) / "tokenizer.json"


_TOKENIZERS: dict = {}  # per worker process: a task reuses the tokenizer its process loaded


def _tokenizer(job: EncodeJob) -> Tokenizer:
    key = (job.tokenizer_sha256, job.tokenizer_kind, job.eos_id)
    if key not in _TOKENIZERS:
        if job.tokenizer_kind == "byte":
            tok = byte_tokenizer()
        else:
            from tokenizers import Tokenizer as HFTokenizer

            text = job.tokenizer_file.read_bytes()
            if hashlib.sha256(text).hexdigest() != job.tokenizer_sha256:
                raise DataError(f"{job.tokenizer_file} changed during the run (sha256 differs)")
            tok = Tokenizer(job.tokenizer_kind, HFTokenizer.from_str(text.decode()), job.eos_id)
        tok.vocab_size = job.vocab_size
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def block_dir(work: Path, block_id: int) -> Path:
    return Path(work) / BLOCKS / f"{block_id:06d}"


def read_done(work: Path, block_id: int, dtype: str) -> Optional[dict]:
    """The record of a committed block, None if it is not committed (or its files do not
    have the sizes its record gives: then it is done again)."""
    d = block_dir(work, block_id)
    try:
        if os.path.getsize(d / DONE) > MAX_DONE_BYTES:
            return None
        record = json.loads((d / DONE).read_text())
        item = np.dtype(DTYPES[dtype]).itemsize
        for sh in record["shards"]:
            if os.path.getsize(d / sh["file"]) != sh["num_tokens"] * item:
                return None
        return record if record["block"] == block_id else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _encode(tok: Tokenizer, block: Block, job: EncodeJob, writer: ShardWriter, stats: ReadStats,
            batch_bytes: int = 2 << 20) -> int:
    """Encode the block's documents into ``writer`` (in batches, for the tokenizer's own
    threads); returns the number of documents."""
    pieces: list[bytes] = []
    ends: list[bool] = []
    docs, pending = 0, 0
    eos = None if tok.eos_id is None else np.array([tok.eos_id], dtype=np.int64)

    def flush() -> None:
        for ids, end in zip(tok.encode_bytes(pieces), ends, strict=True):
            writer.write(ids)
            if end and eos is not None:
                writer.write(eos)
        pieces.clear()
        ends.clear()

    for piece, end, _ in iter_block(block, job.text_field, repair_utf8=tok.kind != "byte", stats=stats):
        if piece or end:
            pieces.append(piece)
            ends.append(end)
            pending += len(piece)
            docs += end
        if pending >= batch_bytes or len(pieces) >= 4096:
            flush()
            pending = 0
    flush()
    return docs


def encode_block(job: EncodeJob, block: Block) -> dict:
    """Tokenize ``block`` into ``blocks/NNNNNN`` of the work directory unless it is committed
    already (see the module docstring); returns its record plus this attempt's worker,
    seconds and peak RSS (``fresh``: False when it was done before)."""
    t0 = time.perf_counter()
    work = Path(job.work_dir)
    if not (work / BLOCKS).is_dir():
        raise DataError(f"{work / BLOCKS} is not visible on {socket.gethostname()}: on a cluster, "
                        "--out must be on storage every node shares")
    done, fresh = read_done(work, block.id, job.dtype), False
    if done is None:
        done, fresh = _attempt(job, block)
    return {**done, "fresh": fresh, "seconds": time.perf_counter() - t0,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "peak_rss_kib": peak_rss_kib()}


def peak_rss_kib() -> int:
    """This process's peak resident memory (KiB): ``VmHWM``, which starts afresh with the
    process (``ru_maxrss`` carries the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _attempt(job: EncodeJob, block: Block) -> tuple[dict, bool]:
    """(the block's record, whether this attempt committed it)."""
    work = Path(job.work_dir)
    attempt = work / BLOCKS / f".{block.id:06d}.attempt-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    attempt.mkdir()
    try:
        stats = ReadStats()
        writer = ShardWriter(attempt, job.dtype, job.shard_tokens, job.vocab_size, name="{:05d}.bin",
                             where=f"block {block.id}")
        docs = _encode(_tokenizer(job), block, job, writer, stats)
        record = {"block": block.id, "num_tokens": writer.total, "documents": docs,
                  "shards": writer.close(), "replaced": stats.replaced, "nulls": stats.nulls,
                  "writer": f"{socket.gethostname()}:{os.getpid()}"}
        with open(attempt / DONE, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(attempt)
        try:
            os.rename(attempt, block_dir(work, block.id))
            committed = True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(attempt, ignore_errors=True)  # another attempt committed first: keep its
            record, committed = read_done(work, block.id, job.dtype), False
            if record is None:
                raise DataError(f"{block_dir(work, block.id)}: committed by another attempt but "
                                "unreadable") from None
        fsync_dir(work / BLOCKS)
        return record, committed
    except BaseException:
        shutil.rmtree(attempt, ignore_errors=True)
        raise
