"""``sharded-ams prepare-data INPUT... --out DIR``: text -> token shards for training.

Inputs are files, directories (walked for ``--ext`` files, default ``.txt`` and ``.jsonl``;
symlinks and special files inside are skipped) and globs. ``.jsonl`` (and ``.json``, as
C4's files) hold one JSON object per line whose ``--text-field`` (default ``text``) is a
document; any other file is one document; ``.gz`` files are decompressed on the fly
(reading them, and what is refused or skipped: :mod:`launcher.data.inputs`). The output
directory's format is described in :mod:`launcher.data.tokens`.

How it behaves:

* streaming: files are read in ~256 KiB pieces cut after a newline, tokenized in batches and
  appended to the current shard, so memory stays bounded whatever the corpus size (a BPE
  trainer keeps word counts, not text);
* a progress bar (bytes read, throughput, tokens so far) on stderr;
* idempotent: rerunning the same command on unchanged inputs (same files, sizes and
  modification times, same options) finds the finished directory and does nothing;
  different inputs need ``--force`` to replace it;
* atomic: everything is written into a hidden ``.DIR.partial-PID`` directory next to DIR,
  ``index.json`` last, then renamed to DIR. An interrupted run never leaves a DIR (nor
  anything else with an index) behind; its leftovers are removed by the next run, but only
  directories holding this tool's marker (``.sharded-ams-prepare.json``: host and pid) from a
  process on this host that is gone: a user's ``.DIR.old-20240101`` or another host's run on
  a shared filesystem is never touched;
* OUT never holds an input nor lies inside one (``--force`` would delete the input).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from launcher.data.inputs import (CHUNK_BYTES, DEFAULT_EXTS, ReadStats, _text_chunks,  # noqa: F401
                                  check_out_apart, collect_inputs, iter_documents)
from launcher.data.tokens import (DTYPES, FORMAT, FORMAT_VERSION, INDEX_NAME, DataError,
                                 check_vocab_fits, dtype_for_vocab, read_index)
from launcher.data.tokenizer import (Tokenizer, byte_tokenizer, load_tokenizer_file, parse_tokenizer_spec,
                                train_bpe)

__all__ = ["prepare_data", "collect_inputs", "add_prepare_parser"]

DEFAULT_SHARD_TOKENS = 100_000_000
MARKER = ".sharded-ams-prepare.json"  # in every directory this tool creates: host and pid


# ----------------------------------------------------------------------------- output


class ShardWriter:
    """Appends token ids to ``shard-NNNNN.bin`` files of at most ``shard_tokens`` tokens each,
    hashing as it writes."""

    def __init__(self, directory: Path, dtype: str, shard_tokens: int, vocab_size: Optional[int] = None):
        self.dir, self.dtype, self.shard_tokens = directory, DTYPES[dtype], shard_tokens
        self.vocab_size = vocab_size
        self.shards: list[dict] = []
        self._f = None
        self.total = 0

    def _open(self) -> None:
        import hashlib

        name = f"shard-{len(self.shards):05d}.bin"
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
                shard = self.shards[-1]["file"] if self.shards else "shard-00000.bin"
                raise DataError(f"{source or 'input'}: the tokenizer gave id {hi if lo >= 0 else lo:,}, "
                                f"outside its vocabulary [0, {self.vocab_size:,}) (writing {shard})")
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    # the same test as sharded_ams.checkpoint.manager's; not imported: prepare-data stays
    # free of torch (start-up time and memory on data-prep machines)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark(d: Path) -> None:
    """Claim ``d`` as this process's (the clean-up of a later run recognises it)."""
    (d / MARKER).write_text(json.dumps({"tool": "sharded-ams prepare-data", "host": socket.gethostname(),
                                        "pid": os.getpid()}))


def _make_partial(out: Path) -> Path:
    """``.OUT.partial-PID``, created with its marker already inside (made as ``.OUT.init-PID``
    and renamed), so that no partial directory of this tool is ever without one."""
    init = out.parent / f".{out.name}.init-{os.getpid()}"
    init.mkdir()
    _mark(init)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    os.rename(init, tmp)
    return tmp


def _ours_and_dead(p: Path, pid: str) -> bool:
    """``p`` was created by this tool on this host, by the process ``pid``, now gone. Anything
    else (a user's ``.tok.old-20240101``, another host's run on a shared filesystem) is kept."""
    try:
        if not stat.S_ISDIR(os.lstat(p).st_mode) or not stat.S_ISREG(os.lstat(p / MARKER).st_mode):
            return False
        if os.lstat(p / MARKER).st_size > 4096:
            return False
        mark = json.loads((p / MARKER).read_text())
    except (OSError, ValueError, RecursionError):  # a planted marker: not ours
        return False
    return (isinstance(mark, dict) and mark.get("tool") == "sharded-ams prepare-data"
            and mark.get("host") == socket.gethostname() and str(mark.get("pid")) == pid
            and not _pid_alive(int(pid)))


def _remove_stale(out: Path) -> None:
    """Delete what interrupted earlier runs for ``out`` left: only directories with this
    tool's marker, written on this host by a process that is gone."""
    for kind in ("init", "partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for p in out.parent.iterdir():
            pid = p.name[len(prefix):]
            if p.name.startswith(prefix) and pid.isdigit() and _ours_and_dead(p, pid):
                shutil.rmtree(p, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _make_tokenizer(spec: str, files: list[Path], text_field: str, total_bytes: int,
                    progress: bool) -> Tokenizer:
    kind, vocab, path = parse_tokenizer_spec(spec)
    if kind == "byte":
        return byte_tokenizer()
    if kind == "file":
        return load_tokenizer_file(path)
    bar = _progress(total_bytes, f"training BPE ({vocab})", progress)

    def texts() -> Iterator[str]:
        for piece, _, nbytes in iter_documents(files, text_field):
            bar.update(nbytes)
            if piece:
                yield piece.decode("utf-8", errors="replace")

    try:
        return train_bpe(texts(), vocab)
    finally:
        bar.close()


def _request(files: list[Path], spec: str, exts, text_field: str, shard_tokens: int, dtype: str) -> dict:
    kind, _, tok_path = parse_tokenizer_spec(spec)
    from launcher.data.tokens import sha256_file

    tok = {"spec": spec if kind != "file" else "file",
           "sha256": sha256_file(tok_path) if kind == "file" else None}
    sources = []
    for f in files:
        st = os.stat(f)
        sources.append({"path": str(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"tokenizer": tok, "ext": sorted(exts), "text_field": text_field,
            "shard_tokens": shard_tokens, "dtype": dtype, "sources": sources}


def _existing(out: Path, request: dict, force: bool, nfiles: int, log) -> Optional[dict]:
    """The index of an up-to-date ``out`` (nothing to do), None if ``out`` may be written;
    DataError if it must not be replaced."""
    if out.is_symlink():
        raise DataError(f"--out {out} is a symbolic link; refusing to replace it (give the real "
                        "directory, or another --out)")
    if not out.exists():
        return None
    try:
        index = read_index(out)
    except DataError:
        index = None
    if index is not None and index.get("request") == request:
        log(f"{out} is up to date ({index['num_tokens']:,} tokens from {nfiles} file(s)); "
            "nothing to do")
        return index
    if index is None and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not a prepare-data output; refusing to "
                        "replace it (choose another --out)")
    if index is not None and not force:
        raise DataError(f"--out {out} holds data prepared from other inputs or options; "
                        "pass --force to replace it, or choose another --out")
    return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(inputs: Sequence[str], out: os.PathLike, *, tokenizer: str = "byte",
                 ext: Sequence[str] = DEFAULT_EXTS, text_field: str = "text",
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: str = "auto", force: bool = False,
                 progress: bool = True, log=print, warn=_stderr) -> dict:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); returns the index.
    ``warn`` gets skipped binary files and replaced invalid UTF-8, per file.

    Raises DataError (bad input, nothing written) or ValueError (bad option)."""
    t0 = time.perf_counter()
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, uint16 or uint32, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    files = collect_inputs(inputs, ext)
    tok_file = parse_tokenizer_spec(tokenizer)[2]  # an input too: --force would replace it
    check_out_apart(out, inputs, [*files, *([Path(tok_file)] if tok_file else [])])
    request = _request(files, tokenizer, ext, text_field, shard_tokens, dtype)
    done = _existing(out, request, force, len(files), log)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    total_bytes = sum(s["bytes"] for s in request["sources"])
    tmp = _make_partial(out)
    stats = ReadStats()
    try:
        tok = _make_tokenizer(tokenizer, files, text_field, total_bytes, progress)
        token_dtype = dtype_for_vocab(tok.vocab_size) if dtype == "auto" else dtype
        check_vocab_fits(tok.vocab_size, token_dtype, f"--tokenizer {tokenizer} with --dtype {dtype}")
        tok.save(tmp / "tokenizer.json")
        writer = ShardWriter(tmp, token_dtype, shard_tokens, tok.vocab_size)
        docs = _tokenize(tok, files, text_field, writer, total_bytes, progress, stats)
        shards = writer.close()
        for msg in stats.warnings():
            warn(msg)
        if writer.total == 0:
            skipped = f"; {len(stats.skipped)} skipped as binary" if stats.skipped else ""
            raise DataError(f"empty corpus: no text in {len(files)} input file(s) "
                            f"({', '.join(inputs)}){skipped}")
        index = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": tok.describe(),
                 "vocab_size": tok.vocab_size, "dtype": token_dtype, "num_tokens": writer.total,
                 "documents": docs, "shards": shards, "sources": request["sources"],
                 "request": request, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_index(tmp, index)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    log(f"wrote {index['num_tokens']:,} tokens ({token_dtype}, {len(shards)} shard(s), {docs:,} "
        f"documents, vocabulary {tok.vocab_size:,}) from {len(files)} file(s), "
        f"{total_bytes / 2**20:.1f} MiB, to {out} in {secs:.1f} s "
        f"({index['num_tokens'] / max(secs, 1e-9):,.0f} tokens/s)")
    return index


def _write_index(tmp: Path, index: dict) -> None:
    ipath = tmp / INDEX_NAME
    with open(ipath.with_suffix(".tmp"), "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ipath.with_suffix(".tmp"), ipath)  # the index last: it makes the data valid
    _fsync_dir(tmp)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an earlier ``out`` (a prepare-data output:
    checked) goes aside first, marked as this process's, and is removed."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _mark(out)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def _tokenize(tok: Tokenizer, files: list[Path], text_field: str, writer: ShardWriter,
              total_bytes: int, progress: bool, stats: Optional[ReadStats] = None,
              batch_bytes: int = 2 << 20) -> int:
    """Encode every document into ``writer`` (in batches, for the tokenizer's threads);
    returns the number of documents."""
    bar = _progress(total_bytes, "tokenizing", progress)
    pieces: list[bytes] = []
    ends: list[bool] = []
    docs, pending, t0 = 0, 0, time.perf_counter()
    eos = None if tok.eos_id is None else np.array([tok.eos_id], dtype=np.int64)

    def flush() -> None:
        for ids, end in zip(tok.encode_bytes(pieces), ends):
            writer.write(ids)
            if end and eos is not None:
                writer.write(eos)
        pieces.clear()
        ends.clear()
        bar.set_postfix_str(f"{writer.total:,} tokens, "
                            f"{writer.total / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    try:
        for piece, end, nbytes in iter_documents(files, text_field, repair_utf8=tok.kind != "byte",
                                                 stats=stats):
            if piece or end:
                pieces.append(piece)
                ends.append(end)
                pending += len(piece)
                docs += end
            bar.update(nbytes)
            if pending >= batch_bytes or len(pieces) >= 4096:
                flush()
                pending = 0
        flush()
    finally:
        bar.close()
    return docs


# ----------------------------------------------------------------------------- CLI


def add_prepare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data", help="tokenize text files into token shards for training",
        description="Tokenize text (files, directories, globs; .txt and .jsonl) into flat token "
                    "shards plus index.json, for [data] path = OUT. Rerunning on unchanged "
                    "inputs does nothing; an interrupted run leaves no OUT behind.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="byte", metavar="SPEC",
                   help="'byte' (default, vocabulary 256), 'bpe:VOCAB' (a byte-level BPE trained "
                        "on the inputs) or a tokenizer.json (or a directory holding one)")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTS), metavar="EXTS",
                   help="extensions taken from directories, comma-separated (default .txt,.jsonl); "
                        "e.g. --ext .py,.md. Named files and glob matches are always taken")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of .jsonl lines")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="token dtype; auto: uint16, or uint32 for a vocabulary over 65,536")
    p.add_argument("--force", action="store_true", help="replace an OUT prepared from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    exts = [e.strip() if e.strip().startswith(".") else "." + e.strip()
            for e in args.ext.split(",") if e.strip()]
    try:
        prepare_data(args.inputs, args.out, tokenizer=args.tokenizer, ext=exts,
                     text_field=args.text_field, shard_tokens=args.shard_tokens, dtype=args.dtype,
                     force=args.force, progress=not args.no_progress)
    except (DataError, ValueError) as exc:  # refused: nothing written (exit status as every command's)
        print(f"sharded-ams prepare-data: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # ran and failed (a full disk, a permission): nothing left behind
        print(f"sharded-ams prepare-data: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sharded-ams prepare-data: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
