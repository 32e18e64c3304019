"""Columnar inputs of ``prepare-data``: Parquet files (FineWeb's format) and the Arrow files of
a Hugging Face ``datasets`` directory (``Dataset.save_to_disk``), one document per row of the
``--text-field`` column.

They are read with pyarrow a batch of rows at a time (``ParquetFile.iter_batches`` over the
row groups of a block, Arrow IPC record batches through a memory map), only the text column,
so memory is bounded by one batch whatever the file size. The units a plan cuts them into
are a Parquet file's row groups and an Arrow file's record batches (:func:`column_units`).

pyarrow is an optional dependency (the ``data`` extra); it is imported only when such an
input is given. Bad input is a one-line :class:`DataError` naming the file and the column:
a file pyarrow cannot read, a missing column, a column that does not hold strings. Null
values are skipped and counted (a warning per file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from launcher.data.inputs import ReadStats, _valid_utf8, doc_pieces
from launcher.data.tokens import DataError

__all__ = ["column_units", "iter_columnar", "BATCH_ROWS"]

BATCH_ROWS = 1024  # rows decoded at a time (FineWeb's ~3 KB documents: ~3 MB)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Parquet files and Hugging Face datasets directories needs pyarrow: "
                        "pip install 'sharded-ams[data]'") from None
    return pyarrow


def _unreadable(path: Path, what: str, exc: BaseException) -> DataError:
    msg = " ".join(str(exc).split())[:300]
    return DataError(f"{path}: not a readable {what} file ({type(exc).__name__}: {msg})")


def _column_index(schema, path: Path, text_field: str) -> int:
    """Index of the text column in ``schema``; DataError naming file and column otherwise."""
    pa = _pyarrow()
    idx = schema.get_field_index(text_field)
    if idx < 0:
        names = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
        raise DataError(f"{path}: no column {text_field!r} (it has: {names}); choose the text "
                        "column with --text-field")
    typ = schema.field(idx).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or getattr(pa.types, "is_string_view", lambda _: False)(typ)):
        raise DataError(f"{path}: column {text_field!r} holds {typ}, not strings; choose the "
                        "text column with --text-field")
    return idx


def _parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(str(path))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(path, "Parquet", exc) from None


def _arrow_batches(path: Path) -> tuple[Any, Iterator]:
    """(schema, record batches) of an Arrow IPC file, stream format (what ``datasets``
    writes) or file format, memory-mapped: reading a batch copies nothing."""
    pa = _pyarrow()
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            return reader.schema, iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(path, "Arrow", exc) from None


def column_units(path: Path, kind: str, text_field: str) -> list[tuple[int, int]]:
    """``(rows, bytes)`` of each unit of a "parquet" file (its row groups; bytes: the text
    column's compressed size) or an "arrow" file (its record batches; bytes: the column's
    in memory), after checking the text column exists and holds strings."""
    pa = _pyarrow()
    if kind == "parquet":
        with _parquet(path) as pf:
            _column_index(pf.schema_arrow, path, text_field)
            meta, units = pf.metadata, []
            for i in range(meta.num_row_groups):
                rg = meta.row_group(i)
                cols = [rg.column(j) for j in range(rg.num_columns)]
                size = sum(c.total_compressed_size for c in cols if c.path_in_schema == text_field)
                units.append((rg.num_rows, size or rg.total_byte_size))
            return units
    schema, batches = _arrow_batches(path)
    idx = _column_index(schema, path, text_field)
    try:
        return [(b.num_rows, b.column(idx).nbytes) for b in batches]
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, "Arrow", exc) from None


def _row_batches(path: Path, kind: str, start: int, end: int, text_field: str) -> Iterator:
    """Record batches of units ``[start, end)`` holding just the text column."""
    if kind == "parquet":
        with _parquet(path) as pf:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=list(range(start, end)),
                                       columns=[text_field], use_threads=False)
        return
    schema, batches = _arrow_batches(path)
    idx = _column_index(schema, path, text_field)
    for i, batch in enumerate(batches):
        if i >= end:
            return
        if i >= start:
            yield batch.select([idx])


def iter_columnar(path: Path, kind: str, start: int, end: int, text_field: str, chunk_bytes: int,
                  nbytes: int, stats: Optional[ReadStats] = None) -> Iterator[tuple[bytes, bool, int]]:
    """``(utf8_piece, ends_document, bytes_read)`` of the rows of units ``[start, end)``
    (``nbytes``: their size in the plan, counted as read at the end). Invalid UTF-8 is
    replaced and counted, as in text files."""
    pa = _pyarrow()
    seen = 0
    try:
        for batch in _row_batches(path, kind, start, end, text_field):
            col = batch.column(0).cast(pa.large_binary())  # bytes, checked below
            for i, raw in enumerate(col.to_pylist()):
                if raw is None:
                    if stats is not None:
                        stats.nulls[str(path)] = stats.nulls.get(str(path), 0) + 1
                    continue
                text = _valid_utf8(raw, path, stats).decode("utf-8")
                for piece, end_doc in doc_pieces(text, f"{path}: row {seen + i:,} of the block",
                                                 text_field, chunk_bytes):
                    yield piece, end_doc, 0
            seen += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: column {text_field!r} unreadable ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]})") from None
    yield b"", False, nbytes
