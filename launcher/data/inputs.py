"""What ``prepare-data`` reads: the input files its INPUT arguments name, and the documents
in them, as UTF-8 pieces of bounded size.

Inputs are untrusted: a FIFO or device is refused (it would block or never end), symlinks
met in a directory walk are skipped, a damaged ``.gz`` is a one-line error naming the file,
a file that looks binary (a NUL byte in its first 8 KiB, git's test) is skipped with a
warning, and invalid UTF-8 is replaced by U+FFFD with the count per file reported (the
byte tokenizer takes bytes as they are). A document of any length (one 50 MB JSONL line)
is handed on in pieces of about ``chunk_bytes``, so memory does not grow with it.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence

from launcher.data.tokens import DataError

__all__ = ["collect_inputs", "iter_documents", "ReadStats", "CHUNK_BYTES", "DEFAULT_EXTS",
           "check_out_apart"]

CHUNK_BYTES = 1 << 18
DEFAULT_EXTS = (".txt", ".jsonl")
MAX_LINE_BYTES = 1 << 30  # one JSONL document; memory peaks at ~3x its line
SNIFF_BYTES = 8000  # as git: a NUL byte in the first 8000 bytes means binary
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


@dataclass
class ReadStats:
    """What reading the inputs found, per file: replaced invalid UTF-8 bytes, skipped files."""

    replaced: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    def warnings(self, limit: int = 10) -> list[str]:
        out = [f"warning: {p}: looks binary (a NUL byte in its first {SNIFF_BYTES:,} bytes); "
               "skipped" for p in self.skipped[:limit]]
        out += [f"warning: {p}: {n:,} invalid UTF-8 byte(s) replaced by U+FFFD"
                for p, n in list(self.replaced.items())[:limit]]
        more = max(0, len(self.skipped) - limit) + max(0, len(self.replaced) - limit)
        return out + ([f"warning: ... and {more} more file(s)"] if more else [])


# ----------------------------------------------------------------------------- which files


def _regular(path: Path, given: str) -> Path:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"input {given!r} does not exist") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise DataError(f"input {given!r} is not a regular file")
    return path


def collect_inputs(inputs: Sequence[str], exts: Sequence[str] = DEFAULT_EXTS) -> list[Path]:
    """The files ``inputs`` name, absolute, in order (each directory's files sorted), once
    each. A named file or a glob match is taken whatever its extension; directories
    contribute their ``exts`` files. Raises DataError for a path that does not exist, a
    glob that matches nothing, or no files at all."""
    if not inputs:
        raise DataError("no INPUT given")
    exts = tuple(e.lower() for e in exts)
    files: list[Path] = []
    for given in inputs:
        path = Path(given).expanduser()
        if glob.has_magic(given) and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"input glob {given!r} matches nothing")
            files += [_regular(Path(m).absolute(), m) for m in matches if not Path(m).is_dir()]
        elif path.is_dir():
            found = []
            for root, dirs, names in os.walk(path):  # does not descend into symlinked dirs
                dirs.sort()
                for name in sorted(names):
                    p = Path(root) / name
                    if name.lower().endswith(exts) and p.is_file() and not p.is_symlink():
                        found.append(p.absolute())
            if not found:
                raise DataError(f"input directory {given!r} holds no {'/'.join(exts)} files "
                                "(choose others with --ext)")
            files += found
        else:
            files.append(_regular(path.absolute(), given))
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def check_out_apart(out: Path, inputs: Sequence[str], files: Sequence[Path]) -> None:
    """Refuse an ``--out`` that holds an input or lies inside an input directory: replacing
    OUT (``--force``) would delete the inputs, and a rerun would read its own output."""
    real_out = Path(os.path.realpath(out))
    named = [Path(os.path.realpath(Path(g).expanduser())) for g in inputs if not glob.has_magic(g)]
    for src in [*named, *(Path(os.path.realpath(f)) for f in files)]:
        if src == real_out or real_out in src.parents:
            raise DataError(f"--out {out} holds the input {src}; replacing it would delete "
                            "the input: choose an --out outside every INPUT")
        if src in real_out.parents:
            raise DataError(f"--out {out} is inside the input {src}; choose an --out outside "
                            "every INPUT")


# ----------------------------------------------------------------------------- reading


def _utf8_cut(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` that ends on a whole UTF-8 character."""
    i = len(buf) - 1
    while i >= 0 and len(buf) - i <= 4 and (buf[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0:
        return len(buf)
    lead = buf[i]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    return len(buf) if i + need <= len(buf) else i


def _text_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """Pieces of about ``size`` bytes cut after a newline (inside a longer line: on a UTF-8
    character boundary), so memory stays bounded and no character is split."""
    carry = b""
    while True:
        block = f.read(size)
        if not block:
            if carry:
                yield carry
            return
        buf = carry + block
        cut = buf.rfind(b"\n") + 1 or _utf8_cut(buf)
        carry = buf[cut:]
        if cut:
            yield buf[:cut]


def _str_chunks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, cut after a newline where one is."""
    pos = 0
    while len(text) - pos > size:
        cut = text.rfind("\n", pos, pos + size) + 1 or pos + size
        yield text[pos:cut]
        pos = cut
    yield text[pos:]


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".json"))  # .json(.gz): JSON lines, as C4's files


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as raw:
        f: Any = gzip.GzipFile(fileobj=raw) if _is_gz(path) else raw
        return b"\0" in f.read(SNIFF_BYTES)


_replaced = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("sharded-ams-count", _count_and_replace)


def _valid_utf8(piece: bytes, path: Path, stats: Optional[ReadStats]) -> bytes:
    """``piece`` if it is valid UTF-8, else with invalid bytes replaced by U+FFFD (counted)."""
    try:
        piece.decode("utf-8")
        return piece
    except UnicodeDecodeError:
        _replaced[0] = 0
        fixed = piece.decode("utf-8", errors="sharded-ams-count").encode("utf-8")
        if stats is not None:
            stats.replaced[str(path)] = stats.replaced.get(str(path), 0) + _replaced[0]
        return fixed


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """``(lineno, line)``; a line over MAX_LINE_BYTES is refused before it is all in memory."""
    lineno = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{lineno}: a JSON line over {MAX_LINE_BYTES:,} bytes; split the "
                            "document into several lines")
        yield lineno, line


def _jsonl_pieces(f: BinaryIO, path: Path, text_field: str, chunk_bytes: int
                  ) -> Iterator[tuple[bytes, bool]]:
    for lineno, line in _lines(f, path):
        if not line.strip():
            yield b"", False
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not a JSON line ({exc})") from None
        del line
        text = rec.get(text_field) if isinstance(rec, dict) else None
        del rec
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: no string field {text_field!r} "
                            "(choose the field with --text-field)")
        parts = _str_chunks(text, chunk_bytes)  # a long line: bounded pieces for the tokenizer
        last = next(parts)
        for part in parts:
            yield _encode(last, path, lineno, text_field), False
            last = part
        yield _encode(last, path, lineno, text_field), True


def _encode(text: str, path: Path, lineno: int, text_field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in the JSON)
        raise DataError(f"{path}:{lineno}: field {text_field!r} holds {text[exc.start]!r}, a lone "
                        "surrogate (not valid Unicode); fix or drop that line") from None


def _file_pieces(path: Path, text_field: str, chunk_bytes: int, repair_utf8: bool,
                 stats: Optional[ReadStats]) -> Iterator[tuple[bytes, bool, int]]:
    with open(path, "rb") as raw:
        f: Any = gzip.GzipFile(fileobj=raw) if _is_gz(path) else raw
        pos = 0
        if _is_jsonl(path):
            pieces = _jsonl_pieces(f, path, text_field, chunk_bytes)
        else:
            pieces = ((c, False) for c in _text_chunks(f, chunk_bytes))
        for piece, end in pieces:
            if repair_utf8:
                piece = _valid_utf8(piece, path, stats)
            delta, pos = raw.tell() - pos, raw.tell()
            yield piece, end, delta


def iter_documents(files: Sequence[Path], text_field: str = "text", chunk_bytes: int = CHUNK_BYTES,
                   *, repair_utf8: bool = True, stats: Optional[ReadStats] = None
                   ) -> Iterator[tuple[bytes, bool, int]]:
    """``(utf8_piece, ends_document, bytes_read_from_disk_since_last)`` over every document
    of ``files`` (``.gz`` decompressed as read; binary-looking files skipped). ``repair_utf8``:
    replace invalid UTF-8 (counted in ``stats``); off for the byte tokenizer, which takes
    any bytes. Raises DataError naming the file (and line) for unreadable input."""
    for path in files:
        try:
            if _looks_binary(path):
                if stats is not None:
                    stats.skipped.append(str(path))
                yield b"", False, os.stat(path).st_size
                continue
            if _is_jsonl(path):
                yield from _file_pieces(path, text_field, chunk_bytes, repair_utf8, stats)
                continue
            last = None
            for piece, _, nbytes in _file_pieces(path, text_field, chunk_bytes, repair_utf8, stats):
                if last is not None:
                    yield last[0], False, last[1]
                last = (piece, nbytes)
            if last is not None:
                yield last[0], True, last[1]
        except _GZIP_ERRORS as exc:
            raise DataError(f"{path}: not a complete gzip file ({type(exc).__name__}: {exc})") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
