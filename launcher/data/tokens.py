"""Training data as token streams: prepare-data shards (memmap), the stdlib corpus, or a
user factory's arrays; deterministic, rank-sliced batches and a held-out split.

A prepare-data directory (written by :mod:`launcher.data.prepare`; nanoGPT's flat token
files plus a sidecar index as Megatron's indexed datasets have)::

    DIR/index.json          format, tokenizer, vocab_size, dtype, num_tokens, shards
                            [{file, num_tokens, sha256}], sources; written last
    DIR/shard-00000.bin     flat uint16 (uint32 when the vocabulary needs it) token ids
    DIR/tokenizer.json      the tokenizer (Hugging Face format); its sha256 goes into every
                            checkpoint trained on DIR (``ckpt export`` checks it)
    DIR/.sharded-ams-prepare.json   host and pid of the prepare-data run that made DIR

The shards, concatenated in order, are one token stream; the last ``val_fraction`` of it is
the validation split. The global batch of step ``s`` is ``batch_size`` windows whose starts
are a function of ``(seed, s)`` only (:func:`launcher.data.corpus.batch_starts`, the same
generator as the stdlib corpus); rank ``r`` reads only its rows, from the memmaps.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made: prepare-data and the CLI do without
    import torch

__all__ = ["INDEX_NAME", "FORMAT", "DataError", "TokenStream", "TrainingData", "open_token_dir",
           "describe_token_dir", "check_tokenizer_vocab",
           "load_training_data", "sha256_file", "tokenizer_sha256"]

INDEX_NAME = "index.json"
FORMAT = "sharded-ams.tokens"
FORMAT_VERSION = 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """Bad or damaged training data; the message names the file or key."""


def sha256_file(path: os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_TOKENIZER_BYTES = 256 << 20  # the largest Hugging Face tokenizer.json files are ~20 MB
MAX_INDEX_BYTES = 256 << 20


def tokenizer_sha256(path: Path) -> Optional[str]:
    """sha256 of the tokenizer file ``path`` if it is a regular file (not a symlink, not a
    FIFO) of at most MAX_TOKENIZER_BYTES; None otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKENIZER_BYTES:
        return None
    return sha256_file(path)


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest token dtype holding ids 0 .. vocab_size-1."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def check_vocab_fits(vocab_size: int, dtype: str, where: str) -> None:
    limit = int(np.iinfo(DTYPES[dtype]).max) + 1
    if vocab_size > limit:
        raise DataError(f"{where}: a vocabulary of {vocab_size:,} tokens does not fit in {dtype} "
                        f"(at most {limit:,}); use uint32")


class TokenStream:
    """Consecutive 1-D integer arrays (memmaps or in-memory) read as one stream, or a
    ``[lo, hi)`` window of it."""

    def __init__(self, parts: Sequence[np.ndarray], lo: int = 0, hi: Optional[int] = None, *,
                 vocab_size: Optional[int] = None, names: Optional[Sequence[str]] = None):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts]).tolist()
        total = self.ends[-1] if self.ends else 0
        self.lo, self.hi = lo, total if hi is None else hi
        # ids read are checked against vocab_size (a shard changed after prepare-data would
        # otherwise surface as an index error deep inside the model); names: for the message
        self.vocab_size, self.names = vocab_size, list(names) if names is not None else None

    def __len__(self) -> int:
        return self.hi - self.lo

    def slice(self, lo: int, hi: int) -> "TokenStream":
        return TokenStream(self.parts, self.lo + lo, self.lo + hi, vocab_size=self.vocab_size,
                           names=self.names)

    def _check_ids(self, i: int, piece: np.ndarray, first: int) -> None:
        if self.vocab_size is None or not len(piece):
            return
        top = int(piece.max())
        if top >= self.vocab_size:
            at = first + int(np.argmax(piece >= self.vocab_size))
            name = self.names[i] if self.names else f"part {i}"
            raise DataError(f"shard {name}: token id {top:,} at position {at:,} is not below the "
                            f"index's vocab_size {self.vocab_size:,} (changed after prepare-data); "
                            "rerun prepare-data")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of this stream as int64 (may span parts)."""
        pos, end = self.lo + start, self.lo + start + length
        out = []
        i = bisect.bisect_right(self.ends, pos)
        while pos < end:
            first = self.ends[i - 1] if i else 0
            take = min(end, self.ends[i]) - pos
            out.append(self.parts[i][pos - first:pos - first + take])
            self._check_ids(i, out[-1], pos - first)
            pos += take
            i += 1
        return np.concatenate(out).astype(np.int64) if len(out) > 1 else out[0].astype(np.int64)


def get_stream_batch(stream: TokenStream, step: int, batch_size: int, block_size: int, *,
                     seed: int = 0, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of ``step`` (as :func:`launcher.data.corpus.get_batch`,
    reading only those windows from the stream)."""
    import torch

    from launcher.data.corpus import batch_starts
    if len(stream) <= block_size:
        raise DataError(f"a split of {len(stream):,} tokens is too short for block_size {block_size}")
    starts = batch_starts(len(stream) - block_size, step, batch_size, seed=seed, rank=rank,
                          world_size=world_size)
    rows = torch.from_numpy(np.stack([stream.read(int(s), block_size + 1) for s in starts]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainingData:
    """The train and validation token streams plus the vocabulary size: what the training
    loop draws batches from. ``train``/``val`` are 1-D tensors (the stdlib corpus) or
    :class:`TokenStream` s (shards, a factory's arrays). ``describe`` goes into checkpoints."""

    def __init__(self, train: Union[torch.Tensor, TokenStream], val: Union[torch.Tensor, TokenStream],
                 vocab_size: int, describe: Optional[dict] = None):
        self.train, self.val, self.vocab_size = train, val, int(vocab_size)
        self.describe = describe or {}

    def get_batch(self, split_name: str, step: int, batch_size: int, block_size: int, *,
                  seed: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split_name == "train" else self.val
        if not isinstance(data, TokenStream):  # a 1-D tensor: the stdlib corpus
            from launcher.data.corpus import get_batch

            return get_batch(data, step, batch_size, block_size, seed=seed, rank=rank, world_size=world_size)
        return get_stream_batch(data, step, batch_size, block_size, seed=seed, rank=rank,
                                world_size=world_size)

    def check_block_size(self, block_size: int, where: str) -> None:
        for name, data in (("train", self.train), ("validation", self.val)):
            if len(data) <= block_size:
                raise DataError(f"{where}: the {name} split has {len(data):,} tokens, fewer than "
                                f"data.block_size + 1 = {block_size + 1}; use more data or a "
                                "different data.val_fraction")


def _split(stream: TokenStream, val_fraction: float, where: str) -> tuple[TokenStream, TokenStream]:
    n_val = int(len(stream) * val_fraction)
    if n_val == 0 or n_val == len(stream):
        raise DataError(f"{where}: {len(stream):,} tokens are too few to hold out "
                        f"data.val_fraction={val_fraction}")
    return stream.slice(0, len(stream) - n_val), stream.slice(len(stream) - n_val, len(stream))


# ----------------------------------------------------------------------------- prepare-data dirs


def read_index(path: os.PathLike) -> dict:
    """The validated ``index.json`` of a prepare-data directory (structure only)."""
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"data.path {str(d)!r} does not exist or is not a directory; make it with "
                        f"`sharded-ams prepare-data INPUT... --out {d}` (INPUT: text files, "
                        "directories or globs)")
    ipath = d / INDEX_NAME
    if not ipath.is_file():
        raise DataError(f"{d} is not a prepare-data output: no {INDEX_NAME} (an interrupted "
                        "`sharded-ams prepare-data` never leaves one; rerun it)")
    st = os.lstat(ipath)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:  # a link out, or a huge file
        raise DataError(f"{ipath}: not a regular file of at most {MAX_INDEX_BYTES:,} bytes")
    try:
        with open(ipath) as f:
            index = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: "[" x 100,000
        raise DataError(f"{ipath}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None

    def bad(msg: str) -> DataError:
        return DataError(f"{ipath}: {msg}")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} index (format={index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != FORMAT_VERSION:
        raise bad(f"format version {index.get('version')!r}; this sharded-ams reads {FORMAT_VERSION}")
    if index.get("dtype") not in DTYPES:
        raise bad(f"dtype {index.get('dtype')!r} is not one of {list(DTYPES)}")
    vocab = index.get("vocab_size")
    if type(vocab) is not int or vocab < 1:
        raise bad(f"vocab_size {vocab!r} is not a positive integer")
    check_vocab_fits(vocab, index["dtype"], str(ipath))
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("lists no shards")
    total, seen = 0, set()
    for sh in shards:
        name = sh.get("file") if isinstance(sh, dict) else None
        if not _plain_name(name):
            raise bad(f"shard entry {sh!r} needs a plain file name")
        if name in seen:  # the same tokens twice would be trained on twice, silently
            raise bad(f"shards: {name} is listed more than once")
        seen.add(name)
        if type(sh.get("num_tokens")) is not int or sh["num_tokens"] < 0:
            raise bad(f"shard {name}: num_tokens {sh.get('num_tokens')!r}")
        if not isinstance(sh.get("sha256"), str):
            raise bad(f"shard {name}: no sha256")
        total += sh["num_tokens"]
    if index.get("num_tokens") != total:
        raise bad(f"num_tokens {index.get('num_tokens')!r} is not the sum over shards ({total})")
    tok = index.get("tokenizer")
    if tok is not None and (not isinstance(tok, dict) or
                            (tok.get("file") is not None and not _plain_name(tok.get("file")))):
        raise bad(f"tokenizer.file {tok.get('file') if isinstance(tok, dict) else tok!r} must be "
                  "a plain file name inside the data directory")
    if isinstance(tok, dict) and "vocab_size" in tok and tok["vocab_size"] != vocab:
        raise bad(f"tokenizer.vocab_size {tok['vocab_size']!r} differs from vocab_size {vocab:,} "
                  "(edited after prepare-data); rerun prepare-data")
    return index


def check_tokenizer_vocab(path: os.PathLike, index: dict) -> None:
    """Refuse a directory whose index ``vocab_size`` is not the vocabulary of the tokenizer
    file shipped beside it (tokenizer.json replaced, or index.json edited): the model is
    built for the index's vocabulary, and the run records (and ``ckpt export`` ships) that
    tokenizer. Reads the tokenizer file only, never the shards; one that is absent, not a
    regular file or over MAX_TOKENIZER_BYTES is not the run's tokenizer
    (:func:`tokenizer_sha256`), so there is nothing to check."""
    name = (index.get("tokenizer") or {}).get("file")
    if not name:
        return
    tok_path = Path(path) / name
    try:  # no symlink followed, no FIFO waited on
        fd = os.open(tok_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKENIZER_BYTES:
            return
        blob = f.read(MAX_TOKENIZER_BYTES + 1)
    from launcher.data.tokenizer import tokenizer_json_vocab

    try:
        have = tokenizer_json_vocab(blob.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise DataError(f"{tok_path}: {exc}; rerun prepare-data") from None
    if have != index["vocab_size"]:
        raise DataError(f"{Path(path) / INDEX_NAME}: vocab_size {index['vocab_size']:,} is not the "
                        f"vocabulary of {tok_path} ({have:,} tokens): the tokenizer was replaced or "
                        "the index edited after prepare-data; rerun prepare-data")


def _plain_name(name: Any) -> bool:
    """A file name with no directory part: nothing the index names may lead out of DIR."""
    return (isinstance(name, str) and bool(name) and Path(name).name == name
            and name not in (".", "..") and "\\" not in name and "\0" not in name)


def _check_shard(d: Path, sh: dict, dtype, vocab_size: int, checksum: bool) -> Path:
    """The shard's path after checking it is a regular file of the indexed size and, with
    ``checksum``, its sha256 and that every id is below ``vocab_size``."""
    p = d / sh["file"]
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise DataError(f"shard {p} listed in {d / INDEX_NAME} is missing") from None
    if not stat.S_ISREG(st.st_mode):  # a symlink (could lead out of DIR) or a FIFO (would hang)
        raise DataError(f"shard {p} is not a regular file")
    want = sh["num_tokens"] * np.dtype(dtype).itemsize
    if st.st_size != want:
        raise DataError(f"shard {p} has {st.st_size:,} bytes, {d / INDEX_NAME} says {want:,} "
                        "(truncated or changed after prepare-data); rerun prepare-data")
    if checksum:
        digest, top = _scan_shard(p, dtype)
        if digest != sh["sha256"]:
            raise DataError(f"shard {p}: sha256 differs from {d / INDEX_NAME} (changed after "
                            "prepare-data); rerun prepare-data")
        if top >= vocab_size:
            raise DataError(f"shard {p}: holds token id {top:,}, not below vocab_size "
                            f"{vocab_size:,} of {d / INDEX_NAME}; rerun prepare-data")
    return p


def _scan_shard(p: Path, dtype, block: int = 1 << 22) -> tuple[str, int]:
    """(sha256, largest id) of a shard in one pass over its bytes (-1 if empty)."""
    h, top = hashlib.sha256(), -1
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype)
            if len(ids):
                top = max(top, int(ids.max()))
    return h.hexdigest(), top


def open_token_dir(path: os.PathLike, verify: str = "sha256") -> tuple[dict, TokenStream]:
    """Validate a prepare-data directory and memmap its shards as one stream.

    ``verify``: "sha256" checks every shard's size and checksum against the index, "size"
    sizes only; either way the index's vocabulary against its tokenizer file's
    (:func:`check_tokenizer_vocab`). Raises :class:`DataError` naming the file at fault."""
    d = Path(path)
    index = read_index(d)
    check_tokenizer_vocab(d, index)
    dtype = DTYPES[index["dtype"]]
    parts, names = [], []
    for sh in index["shards"]:
        p = _check_shard(d, sh, dtype, index["vocab_size"], verify == "sha256")
        if sh["num_tokens"]:
            parts.append(np.memmap(p, dtype=dtype, mode="r", shape=(sh["num_tokens"],)))
            names.append(str(p))
    return index, TokenStream(parts, vocab_size=index["vocab_size"], names=names)


# ----------------------------------------------------------------------------- the loop's data


def _factory_data(table: Mapping[str, Any]) -> TrainingData:
    from launcher.factory import load_factory

    spec = table["factory"]
    out = load_factory(spec, "data.factory")(dict(table))
    if not isinstance(out, Mapping) or not {"train", "val", "vocab_size"} <= set(out):
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise DataError(f"data.factory = {spec!r} must return a dict with keys 'train', 'val' "
                        f"(1-D integer arrays) and 'vocab_size'; got {got}")
    streams = []
    for key in ("train", "val"):
        arr = out[key]
        if hasattr(arr, "numpy") and not isinstance(arr, np.ndarray):  # a torch tensor
            arr = arr.numpy()
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"data.factory = {spec!r}: {key!r} must be a 1-D integer numpy array "
                            f"or tensor, got {type(out[key]).__name__} "
                            f"{getattr(arr, 'dtype', '')}{tuple(getattr(arr, 'shape', ()))}")
        streams.append(TokenStream([arr]))
    vocab = out["vocab_size"]
    if type(vocab) is not int or vocab < 1:
        raise DataError(f"data.factory = {spec!r}: vocab_size must be a positive int, got {vocab!r}")
    return TrainingData(streams[0], streams[1], vocab, {"factory": spec, "vocab_size": vocab})


def describe_token_dir(path: os.PathLike, index: Optional[dict] = None) -> dict:
    """What a checkpoint trained on the prepare-data directory ``path`` records of it
    (``TrainingData.describe``): the path, vocabulary, tokenizer and the sha256 of its file
    (what ``ckpt export`` and a resume check the directory against later). Reads the index
    and hashes the tokenizer file, not the shards."""
    index = read_index(path) if index is None else index
    tok = index.get("tokenizer") or {}
    tok_file = Path(path) / tok["file"] if tok.get("file") else None
    sha = tokenizer_sha256(tok_file) if tok_file else None
    return {"path": str(path), "vocab_size": index["vocab_size"], "tokenizer": tok,
            "tokenizer_file": str(tok_file) if sha else None, "tokenizer_sha256": sha}


def load_training_data(table: Mapping[str, Any], verify: Optional[str] = None) -> TrainingData:
    """The train/val data a ``[data]`` table describes: ``factory``, ``path`` (prepare-data
    output, checked with ``verify``, default the table's ``verify``), or the stdlib corpus.

    Raises :class:`DataError` naming the key or file at fault."""
    val_fraction = table.get("val_fraction", 0.1)
    if table.get("factory"):
        return _factory_data(table)
    if table.get("path"):
        path = table["path"]
        index, stream = open_token_dir(path, verify or table.get("verify", "sha256"))
        train, val = _split(stream, val_fraction, f"data.path {path}")
        return TrainingData(train, val, index["vocab_size"], describe_token_dir(path, index))
    from launcher.data.corpus import load_corpus, split

    train, val = split(load_corpus(table.get("max_bytes", 4_000_000)), val_fraction)
    return TrainingData(train, val, 256, {"corpus": "stdlib", "vocab_size": 256})
