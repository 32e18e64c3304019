"""What ``prepare-data`` reads: the input files its INPUT arguments name, and the documents
in them, as UTF-8 pieces of bounded size.

Kinds of file (:func:`file_kind`): text (one document per file), JSON lines (``.jsonl``,
``.json``: one document per line), each possibly ``.gz``; Parquet and Arrow (a Hugging
Face ``datasets`` directory) are read by :mod:`launcher.data.columnar`. A file is read as a
whole or, for the plan's blocks, as a byte range of an uncompressed text or JSONL file that
starts and ends after a newline (:func:`iter_segment`).

Inputs are untrusted: a FIFO or device is refused (it would block or never end), symlinks
met in a directory walk are skipped, a damaged ``.gz`` is a one-line error naming the file,
a file that looks binary (a NUL byte in its first 8 KiB, git's test) is skipped with a
warning, and invalid UTF-8 is replaced by U+FFFD with the count per file reported (the
byte tokenizer takes a text file's bytes as they are; a JSON line is always decoded, so
it is repaired for every tokenizer). A null text field (``{"text": null}``) is skipped and
counted, as a null Parquet value is. A document of any length (one 50 MB JSONL line)
is handed on in pieces of about ``chunk_bytes``, so memory does not grow with it.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence

from launcher.data.tokens import DataError

__all__ = ["collect_inputs", "iter_segment", "doc_pieces", "file_kind", "ReadStats",
           "CHUNK_BYTES", "DEFAULT_EXTS", "check_out_apart", "looks_binary"]

CHUNK_BYTES = 1 << 18
DEFAULT_EXTS = (".txt", ".jsonl", ".parquet")
MAX_LINE_BYTES = 1 << 30  # one JSONL document; memory peaks at ~3x its line
SNIFF_BYTES = 8000  # as git: a NUL byte in the first 8000 bytes means binary
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


@dataclass
class ReadStats:
    """What reading the inputs found, per file: replaced invalid UTF-8 bytes, skipped files."""

    replaced: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    nulls: dict = field(default_factory=dict)  # file -> null values in its text column (skipped)

    def merge(self, other: "ReadStats") -> None:
        """Add ``other``'s counts (a block's, read by another worker) to these."""
        for mine, theirs in ((self.replaced, other.replaced), (self.nulls, other.nulls)):
            for path, n in theirs.items():
                mine[path] = mine.get(path, 0) + n
        self.skipped += [p for p in other.skipped if p not in self.skipped]

    def warnings(self, limit: int = 10) -> list[str]:
        out = [f"warning: {p}: looks binary (a NUL byte in its first {SNIFF_BYTES:,} bytes); "
               "skipped" for p in self.skipped[:limit]]
        out += [f"warning: {p}: {n:,} invalid UTF-8 byte(s) replaced by U+FFFD"
                for p, n in list(self.replaced.items())[:limit]]
        out += [f"warning: {p}: {n:,} null text value(s) skipped" for p, n in list(self.nulls.items())[:limit]]
        more = sum(max(0, len(x) - limit) for x in (self.skipped, self.replaced, self.nulls))
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


def _datasets_files(d: Path, given: str) -> Optional[list[Path]]:
    """The Arrow files of a Hugging Face ``datasets`` directory (``save_to_disk``), in the
    order its ``state.json`` lists them; None if ``d`` is not one. A ``DatasetDict`` (one
    directory per split) is refused: which split to train on is the user's choice."""
    if (d / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in d.iterdir() if (p / "state.json").is_file())
        raise DataError(f"input {given!r} is a Hugging Face DatasetDict with splits {splits}; give "
                        f"one split's directory (e.g. {d / (splits[0] if splits else 'train')})")
    state_path = d / "state.json"
    if not (state_path.is_file() and (d / "dataset_info.json").is_file()):
        return None
    try:
        if os.path.getsize(state_path) > 16 << 20:
            raise ValueError("over 16 MiB")
        state = json.loads(state_path.read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise DataError(f"{state_path}: not a Hugging Face datasets state.json ({exc})") from None
    if not names:
        raise DataError(f"input {given!r}: a Hugging Face datasets directory with no data files")
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{state_path}: data file {name!r} is not a plain file name")
        files.append(_regular((d / name).absolute(), str(d / name)))
    return files


def _walk(path: Path, given: str, exts: tuple, required: bool = True) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(path):  # does not descend into symlinked dirs
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            if name.lower().endswith(exts) and p.is_file() and not p.is_symlink():
                found.append(p.absolute())
    if not found and required:
        raise DataError(f"input directory {given!r} holds no {'/'.join(exts)} files "
                        "(choose others with --ext)")
    return found


def _glob_files(given: str, pattern: str, exts: tuple) -> list[Path]:
    """The files a glob names: each matched file, whatever its extension, and the files of
    each matched directory as if it were named (the shell's expansion of the same glob gives
    the same files). A matched directory without ``exts`` files adds nothing, but a glob
    that yields no file at all is a DataError naming it."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DataError(f"input glob {given!r} matches nothing")
    found: list[Path] = []
    for m in matches:
        if os.path.isdir(m):
            found += _datasets_files(Path(m), m) or _walk(Path(m), m, exts, required=False)
        else:
            found.append(_regular(Path(m).absolute(), m))
    if not found:
        raise DataError(f"input glob {given!r} matches only directories that hold no "
                        f"{'/'.join(exts)} files (choose others with --ext)")
    return found


def _once(files: list[Path]) -> list[Path]:
    """``files`` with each file on disk once (the same device and inode: ``d/a.txt`` and
    ``d/../d/a.txt``, a path through a symlinked directory, a hard link), the first
    spelling kept."""
    seen: set[tuple[int, int]] = set()
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DataError(f"input {str(f)!r}: cannot read ({exc.strerror or exc})") from None
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(f)
    return out


def collect_inputs(inputs: Sequence[str], exts: Sequence[str] = DEFAULT_EXTS) -> list[Path]:
    """The files ``inputs`` name, absolute, in order (each directory's files sorted), once
    each (one file reached by two paths is read once, under the first). A named file or a
    glob match is taken whatever its extension; directories, named or matched by a glob,
    contribute their ``exts`` files, a Hugging Face ``datasets`` directory its Arrow files.
    Raises DataError for a path that does not exist, a glob that matches nothing or no
    file, or a named directory without files."""
    if not inputs:
        raise DataError("no INPUT given")
    exts = tuple(e.lower() for e in exts)
    files: list[Path] = []
    for given in inputs:
        path = Path(given).expanduser()
        if glob.has_magic(given) and not path.exists():
            files += _glob_files(given, str(path), exts)
        elif path.is_dir():
            files += _datasets_files(path, given) or _walk(path, given, exts)
        else:
            files.append(_regular(path.absolute(), given))
    if not files:  # every branch above gives a file or raises; kept as the last word
        raise DataError(f"no input file found in {', '.join(map(repr, inputs))}")
    return _once(files)


def file_kind(path: Path) -> str:
    """How a file is read: "parquet", "arrow" (Arrow IPC, as ``datasets`` writes), "jsonl"
    (one JSON document per line, also ``.json`` and ``.gz``), or "text" (one document)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl" if _is_jsonl(path) else "text"


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


def looks_binary(path: Path) -> bool:
    """A NUL byte in the first SNIFF_BYTES (decompressed) bytes: git's test for binary."""
    try:
        with open(path, "rb") as raw:
            f: Any = gzip.GzipFile(fileobj=raw) if _is_gz(path) else raw
            return b"\0" in f.read(SNIFF_BYTES)
    except _GZIP_ERRORS as exc:
        raise DataError(f"{path}: not a complete gzip file ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


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
        return _decode_utf8(piece, path, stats).encode("utf-8")


def _decode_utf8(piece: bytes, path: Path, stats: Optional[ReadStats]) -> str:
    """``piece`` decoded, invalid UTF-8 bytes replaced by U+FFFD and counted in ``stats``."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        _replaced[0] = 0
        text = piece.decode("utf-8", errors="sharded-ams-count")
        if stats is not None:
            stats.replaced[str(path)] = stats.replaced.get(str(path), 0) + _replaced[0]
        return text


def _lines(f: BinaryIO, where) -> Iterator[tuple[str, bytes]]:
    """``(location, line)``; a line over MAX_LINE_BYTES is refused before it is all in memory.
    ``where(lineno, offset)`` names a line for messages."""
    lineno, offset = 0, 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{where(lineno, offset)}: a JSON line over {MAX_LINE_BYTES:,} bytes; split the "
                            "document into several lines")
        yield where(lineno, offset), line
        offset += len(line)


def _jsonl_pieces(f: BinaryIO, where, text_field: str, chunk_bytes: int, path: Path,
                  stats: Optional[ReadStats]) -> Iterator[tuple[bytes, bool]]:
    """The documents of JSON lines. A line is decoded as UTF-8 (invalid bytes replaced by
    U+FFFD and counted, as in text files; a leading BOM dropped) before it is parsed; a
    null text field is skipped and counted, as a null Parquet value."""
    for loc, line in _lines(f, where):
        if not line.strip():
            yield b"", False
            continue
        text: Any = _decode_utf8(line[3:] if line.startswith(codecs.BOM_UTF8) else line, path, stats)
        del line
        try:
            rec = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{loc}: not a JSON line ({exc})") from None
        except RecursionError:  # "[[[[..." deeper than the interpreter's stack
            raise DataError(f"{loc}: not a JSON line (nested too deeply)") from None
        del text
        if isinstance(rec, dict) and text_field in rec and rec[text_field] is None:
            if stats is not None:
                stats.nulls[str(path)] = stats.nulls.get(str(path), 0) + 1
            yield b"", False
            continue
        text = rec.get(text_field) if isinstance(rec, dict) else None
        del rec
        if not isinstance(text, str):
            raise DataError(f"{loc}: no string field {text_field!r} "
                            "(choose the field with --text-field)")
        yield from doc_pieces(text, loc, text_field, chunk_bytes)


def doc_pieces(text: str, loc: str, text_field: str, chunk_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """One document as UTF-8 pieces of at most ``chunk_bytes`` characters (bounded memory
    for the tokenizer), the last marked as its end; ``loc`` names it in errors."""
    parts = _str_chunks(text, chunk_bytes)
    last = next(parts)
    for part in parts:
        yield _encode(last, loc, text_field), False
        last = part
    yield _encode(last, loc, text_field), True


def _encode(text: str, loc: str, text_field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in the JSON)
        raise DataError(f"{loc}: field {text_field!r} holds {text[exc.start]!r}, a lone "
                        "surrogate (not valid Unicode); fix or drop that line") from None


class _ByteRange(io.RawIOBase):
    """Bytes ``[start, end)`` of an open file as a stream of their own."""

    def __init__(self, f: BinaryIO, start: int, end: int):
        f.seek(start)
        self._f, self._left = f, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(min(len(b), self._left)) if self._left > 0 else b""
        b[:len(data)] = data
        self._left -= len(data)
        return len(data)


def iter_segment(path: Path, jsonl: bool, start: int, end: Optional[int], ends_doc: bool,
                 text_field: str = "text", chunk_bytes: int = CHUNK_BYTES, *, repair_utf8: bool = True,
                 stats: Optional[ReadStats] = None) -> Iterator[tuple[bytes, bool, int]]:
    """``(utf8_piece, ends_document, bytes_read_from_disk_since_last)`` of bytes
    ``[start, end)`` of a text or JSONL file (``end`` None: to its end; a ``.gz`` file is
    always read whole). A text segment ends its document when ``ends_doc``. Raises
    DataError naming the file (and line) for unreadable input."""
    try:
        with open(path, "rb") as raw:
            if _is_gz(path):
                f: Any = gzip.GzipFile(fileobj=raw)
            else:
                f = io.BufferedReader(_ByteRange(raw, start, os.fstat(raw.fileno()).st_size if end is None else end))
            pos = raw.tell()
            if jsonl:
                where = ((lambda n, off: f"{path}:{n}") if start == 0 else
                         (lambda n, off: f"{path}: the line at byte {start + off:,}"))
                pieces: Iterator = _jsonl_pieces(f, where, text_field, chunk_bytes, path, stats)
            else:
                pieces = _ends_last(_text_chunks(f, chunk_bytes), ends_doc)
            for piece, end_doc in pieces:
                if repair_utf8:
                    piece = _valid_utf8(piece, path, stats)
                delta, pos = raw.tell() - pos, raw.tell()
                yield piece, end_doc, delta
    except _GZIP_ERRORS as exc:
        raise DataError(f"{path}: not a complete gzip file ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _ends_last(chunks: Iterator[bytes], ends_doc: bool) -> Iterator[tuple[bytes, bool]]:
    """The chunks, the last one marked ``ends_doc``."""
    last = None
    for chunk in chunks:
        if last is not None:
            yield last, False
        last = chunk
    if last is not None:
        yield last, ends_doc
