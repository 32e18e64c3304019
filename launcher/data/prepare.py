"""``sharded-ams prepare-data INPUT... --out DIR``: text -> token shards for training.

Inputs are files, directories (walked for ``--ext`` files, default ``.txt``, ``.jsonl`` and
``.parquet``; symlinks and special files inside are skipped), globs, and Hugging Face
``datasets`` directories (``save_to_disk``). ``.jsonl`` (and ``.json``, as C4's files) hold
one JSON object per line whose ``--text-field`` (default ``text``) is a document; Parquet and
Arrow files one document per row of that column; any other file is one document; ``.gz``
files are decompressed on the fly (reading them, and what is refused or skipped:
:mod:`launcher.data.inputs`, :mod:`launcher.data.columnar`). The output directory's format is
described in :mod:`launcher.data.tokens`.

How it behaves:

* blocks: the inputs are cut into blocks of about ``--block-bytes`` in document order
  (:mod:`launcher.data.blocks`); each is tokenized on its own into its own shards, by
  ``--workers`` local processes or by Ray Data tasks on a cluster (``--address``;
  :mod:`launcher.data.executors`). The shards are numbered in block order at the end, so the
  output is the same bytes whatever ran it;
* streaming: files are read in ~256 KiB pieces (Parquet and Arrow: batches of rows),
  tokenized in batches and appended to the block's shard, so memory stays bounded whatever
  the corpus size (a BPE trainer keeps word counts, not text);
* a progress bar (bytes read, tokens and tokens/s over all workers) on stderr;
* idempotent: rerunning the same command on unchanged inputs (same files, sizes and
  modification times, same options) finds the finished directory and does nothing;
  different inputs need ``--force`` to replace it;
* resumable: a run killed or interrupted keeps the blocks it committed; the same command run
  again takes its directory over and does only the rest (:mod:`launcher.data.workdir`);
* atomic: everything is written into a hidden ``.DIR.partial-PID`` directory next to DIR,
  ``index.json`` last, then renamed to DIR. An unfinished run never leaves a DIR (nor
  anything else with an index) behind; bad input (a :class:`DataError`) removes its partial
  directory at once;
* OUT never holds an input nor lies inside one (``--force`` would delete the input).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from launcher.data.blocks import Block, auto_block_bytes, iter_block, plan_blocks, plan_digest
from launcher.data.encode import BLOCKS, EncodeJob, block_dir, read_done
from launcher.data.executors import default_workers, run_blocks
from launcher.data.inputs import (CHUNK_BYTES, DEFAULT_EXTS, ReadStats, _text_chunks,  # noqa: F401
                                  check_out_apart, collect_inputs)
from launcher.data.tokens import (DTYPES, FORMAT, FORMAT_VERSION, DataError, check_vocab_fits, dtype_for_vocab,
                                  read_index, sha256_file)
from launcher.data.tokenizer import (EOS_TOKEN, Tokenizer, byte_tokenizer, load_tokenizer_file,
                                     parse_tokenizer_spec, train_bpe)
from launcher.data.workdir import MARKER, install, open_work_dir, write_json  # noqa: F401

__all__ = ["prepare_data", "collect_inputs", "add_prepare_parser"]

DEFAULT_SHARD_TOKENS = 100_000_000
PLAN = "plan.json"


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _make_tokenizer(spec: str, work: Path, blocks: Sequence[Block], text_field: str, total_bytes: int,
                    progress: bool) -> Tokenizer:
    """The run's tokenizer, saved as ``work/tokenizer.json``; a resumed run's saved one is
    reused (a BPE is not trained twice)."""
    kind, vocab, path = parse_tokenizer_spec(spec)
    saved = work / "tokenizer.json"
    if kind == "byte":
        tok = byte_tokenizer()
    elif kind == "file":
        tok = load_tokenizer_file(path)
    elif saved.is_file():
        hf = load_tokenizer_file(saved).hf
        tok = Tokenizer("bpe", hf, hf.token_to_id(EOS_TOKEN))
    else:
        tok = _train(vocab, blocks, text_field, total_bytes, progress)
    if not saved.is_file():
        tok.save(work / "tokenizer.json.tmp")
        os.replace(work / "tokenizer.json.tmp", saved)
    return tok


def _train(vocab: int, blocks: Sequence[Block], text_field: str, total_bytes: int, progress: bool) -> Tokenizer:
    bar = _progress(total_bytes, f"training BPE ({vocab})", progress)

    def texts() -> Iterator[str]:
        for block in blocks:
            for piece, _, nbytes in iter_block(block, text_field):
                bar.update(nbytes)
                if piece:
                    yield piece.decode("utf-8", errors="replace")

    try:
        return train_bpe(texts(), vocab)
    finally:
        bar.close()


def _request(files: list[Path], spec: str, exts, text_field: str, shard_tokens: int, dtype: str,
             block_bytes: Optional[int]) -> dict:
    kind, _, tok_path = parse_tokenizer_spec(spec)
    tok = {"spec": spec if kind != "file" else "file",
           "sha256": sha256_file(tok_path) if kind == "file" else None}
    sources = []
    for f in files:
        st = os.stat(f)
        sources.append({"path": str(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"tokenizer": tok, "ext": sorted(exts), "text_field": text_field,
            "shard_tokens": shard_tokens, "dtype": dtype, "block_bytes": block_bytes or "auto",
            "sources": sources}


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


def _check_options(shard_tokens: int, dtype: str, block_bytes: Optional[int], workers: Optional[int]) -> None:
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, uint16 or uint32, got {dtype!r}")
    if block_bytes is not None and block_bytes < 1:
        raise ValueError(f"--block-bytes must be >= 1, got {block_bytes}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")


def prepare_data(inputs: Sequence[str], out: os.PathLike, *, tokenizer: str = "byte",
                 ext: Sequence[str] = DEFAULT_EXTS, text_field: str = "text",
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: str = "auto", force: bool = False,
                 block_bytes: Optional[int] = None, workers: Optional[int] = None,
                 address: Optional[str] = None, progress: bool = True, log=print, warn=_stderr,
                 run_info: Optional[dict] = None) -> dict:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); returns the index.
    ``warn`` gets skipped binary files, replaced invalid UTF-8 and skipped nulls, per file.
    ``block_bytes``: None for :func:`~launcher.data.blocks.auto_block_bytes`. ``workers``:
    local processes (None: the cores available) or, with ``address``, the most Ray tasks at
    once (None: as many as the cluster's CPUs). ``run_info``, if given, is filled with what
    this run did: blocks done before (resumed) and committed now (``fresh_blocks``; and
    ``committed_twice``, which the commit rule keeps at 0), seconds, tokens, each worker's
    peak RSS (KiB).

    Raises DataError (bad input, nothing written) or ValueError (bad option). Any other
    error or an interrupt keeps the blocks done so far for a rerun of the same command."""
    t0 = time.perf_counter()
    _check_options(shard_tokens, dtype, block_bytes, workers)
    if address:  # before a BPE is trained: a wrong port made ray.init retry for minutes there
        from launcher.run.preflight import check_ray_address

        check_ray_address(address)
    out = Path(out).expanduser().absolute()
    files = collect_inputs(inputs, ext)
    tok_file = parse_tokenizer_spec(tokenizer)[2]  # an input too: --force would replace it
    check_out_apart(out, inputs, [*files, *([Path(tok_file)] if tok_file else [])])
    request = _request(files, tokenizer, ext, text_field, shard_tokens, dtype, block_bytes)
    done = _existing(out, request, force, len(files), log)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, resumed = open_work_dir(out, request)
    info = run_info if run_info is not None else {}
    info.update(resumed=resumed, work_dir=str(tmp))
    try:
        info["inputs"] = ", ".join(map(str, inputs))
        index = _build(tmp, files, request, tokenizer, progress, warn, info,
                       workers=workers if workers is not None or address else default_workers(),
                       address=address)
        install(tmp, out, index)
    except (DataError, ValueError):  # bad input or option: nothing of this run is worth keeping
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    info.update(seconds=secs)
    log(f"wrote {index['num_tokens']:,} tokens ({index['dtype']}, {len(index['shards'])} shard(s), "
        f"{index['documents']:,} documents, vocabulary {index['vocab_size']:,}) from {len(files)} "
        f"file(s), {sum(s['bytes'] for s in request['sources']) / 2**20:.1f} MiB, to {out} in "
        f"{secs:.1f} s ({index['num_tokens'] / max(secs, 1e-9):,.0f} tokens/s)"
        + (f"; {info['blocks_before']} of {info['blocks']} blocks were done before (resumed)"
           if info.get("blocks_before") else ""))
    return index


def _build(tmp: Path, files: list[Path], request: dict, spec: str, progress: bool, warn, info: dict, *,
           workers: Optional[int], address: Optional[str]) -> dict:
    """Plan, tokenizer, every block not yet done, then the index (not yet written)."""
    stats = ReadStats()
    total_bytes = sum(s["bytes"] for s in request["sources"])
    block_bytes = request["block_bytes"]
    blocks = plan_blocks(files, request["text_field"],
                         auto_block_bytes(total_bytes) if block_bytes == "auto" else block_bytes, stats)
    tok = _make_tokenizer(spec, tmp, blocks, request["text_field"], total_bytes, progress)
    dtype = request["dtype"]
    token_dtype = dtype_for_vocab(tok.vocab_size) if dtype == "auto" else dtype
    check_vocab_fits(tok.vocab_size, token_dtype, f"--tokenizer {spec} with --dtype {dtype}")
    records = _done_blocks(tmp, blocks, token_dtype)
    job = EncodeJob(str(tmp), tok.kind, sha256_file(tmp / "tokenizer.json"), tok.eos_id, tok.vocab_size,
                    token_dtype, request["shard_tokens"], request["text_field"])
    todo = [b for b in blocks if b.id not in records]
    info.update(blocks=len(blocks), blocks_before=len(records), workers={})
    _encode_all(job, todo, records, progress, info, workers=workers, address=address,
                done_bytes=sum(b.nbytes for b in blocks if b.id in records), total_bytes=total_bytes)
    shards, abandoned = _assemble(tmp, blocks, records, stats)
    info.update(abandoned_attempts=abandoned)
    for msg in stats.warnings():
        warn(msg)
    ntok = sum(s["num_tokens"] for s in shards)
    if ntok == 0:
        skipped = f"; {len(stats.skipped)} skipped as binary" if stats.skipped else ""
        raise DataError(f"empty corpus: no text in {len(files)} input file(s) ({info['inputs']}){skipped}")
    info.update(tokens=ntok)
    # no time or host in the index: the same inputs give the same bytes, however they were run
    return {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": tok.describe(),
            "vocab_size": tok.vocab_size, "dtype": token_dtype, "num_tokens": ntok,
            "documents": sum(r["documents"] for r in records.values()), "shards": shards,
            "sources": request["sources"], "request": request}


def _done_blocks(tmp: Path, blocks: Sequence[Block], dtype: str) -> dict:
    """Records of the blocks a resumed run committed (if its plan is this one); a block
    directory that does not check out is removed, to be done again."""
    plan = {"plan_sha256": plan_digest(blocks), "blocks": len(blocks), "dtype": dtype}
    (tmp / BLOCKS).mkdir(exist_ok=True)
    try:
        same = (tmp / PLAN).is_file() and (tmp / PLAN).stat().st_size < 4096 and \
            json.loads((tmp / PLAN).read_text()) == plan
    except (OSError, ValueError):
        same = False
    if not same:  # a new run, or another plan: start from nothing
        shutil.rmtree(tmp / BLOCKS, ignore_errors=True)
        (tmp / BLOCKS).mkdir()
        write_json(tmp / PLAN, plan)
    records = {}
    for b in blocks:
        rec = read_done(tmp, b.id, dtype)
        if rec is not None:
            records[b.id] = rec
        elif block_dir(tmp, b.id).exists():
            shutil.rmtree(block_dir(tmp, b.id))
    return records


def _encode_all(job: EncodeJob, todo: Sequence[Block], records: dict, progress: bool, info: dict, *,
                workers: Optional[int], address: Optional[str], done_bytes: int, total_bytes: int) -> None:
    """Run the blocks not yet done, a progress bar counting tokens over all workers."""
    sizes = {b.id: b.nbytes for b in todo}
    bar = _progress(total_bytes, "tokenizing", progress, initial=done_bytes)
    t0, tokens, committed = time.perf_counter(), 0, {}

    def on_done(rec: dict) -> None:
        nonlocal tokens
        records[rec["block"]] = rec
        tokens += rec["num_tokens"]
        peak = info["workers"].get(rec["worker"], 0)
        info["workers"][rec["worker"]] = max(peak, rec["peak_rss_kib"])
        info["fresh_blocks"] = info.get("fresh_blocks", 0) + rec["fresh"]
        committed[rec["block"]] = committed.get(rec["block"], 0) + rec["fresh"]
        bar.update(sizes.get(rec["block"], 0))
        bar.set_postfix_str(f"{tokens:,} tokens, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s, "
                            f"{len(records)}/{info['blocks']} blocks", refresh=False)

    try:
        run_blocks(job, todo, on_done, workers=workers, address=address)
    finally:
        bar.close()
    info.update(encode_seconds=time.perf_counter() - t0, new_tokens=tokens,
                committed_twice=sum(n > 1 for n in committed.values()))


def _assemble(tmp: Path, blocks: Sequence[Block], records: dict, stats: ReadStats) -> tuple[list[dict], int]:
    """Move every block's shards to ``shard-NNNNN.bin`` in block order (renames: the shards
    are not copied) and drop the block directories; returns the index's shard list and the
    number of abandoned attempts removed (a worker killed while writing a block)."""
    shards: list[dict] = []
    for b in blocks:
        rec = records[b.id]
        for sh in rec["shards"]:
            name = f"shard-{len(shards):05d}.bin"
            os.replace(block_dir(tmp, b.id) / sh["file"], tmp / name)
            shards.append({"file": name, "num_tokens": sh["num_tokens"], "sha256": sh["sha256"]})
        stats.merge(ReadStats(replaced=rec.get("replaced", {}), nulls=rec.get("nulls", {})))
    abandoned = sum(p.name.startswith(".") for p in (tmp / BLOCKS).iterdir())
    shutil.rmtree(tmp / BLOCKS)
    (tmp / PLAN).unlink()
    return shards, abandoned


# ----------------------------------------------------------------------------- CLI


def add_prepare_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data", help="tokenize text files into token shards for training",
        description="Tokenize text (files, directories, globs; .txt, .jsonl, .json.gz, .parquet, "
                    "Hugging Face datasets directories) into flat token shards plus index.json, "
                    "for [data] path = OUT, on every core or a Ray cluster. Rerunning on unchanged "
                    "inputs does nothing; an interrupted run leaves no OUT behind, and the same "
                    "command run again resumes it.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text, JSONL or Parquet files, directories, globs, or a datasets save_to_disk directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="byte", metavar="SPEC",
                   help="'byte' (default, vocabulary 256), 'bpe:VOCAB' (a byte-level BPE trained "
                        "on the inputs) or a tokenizer.json (or a directory holding one)")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTS), metavar="EXTS",
                   help="extensions taken from directories, comma-separated (default "
                        f"{','.join(DEFAULT_EXTS)}); "
                        "e.g. --ext .py,.md. Named files and glob matches are always taken")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text field of .jsonl lines, the text column of Parquet/Arrow files")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="token dtype; auto: uint16, or uint32 for a vocabulary over 65,536")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local tokenizer processes (default: the cores available); with --address, "
                        "the most Ray tasks at once (default: the cluster's CPUs). The output is "
                        "the same for any N")
    p.add_argument("--address", default=None, metavar="ADDRESS",
                   help="run on this Ray cluster with Ray Data ('auto': the one this machine "
                        "belongs to); OUT must be on storage every node shares")
    p.add_argument("--block-bytes", type=_size, default=None, metavar="SIZE",
                   help="input bytes per block, the unit of work and of resuming (e.g. 64M; "
                        "default: 1/64 of the input, within 1M..256M)")
    p.add_argument("--force", action="store_true", help="replace an OUT prepared from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _size(text: str) -> int:
    """``65536``, ``64K``, ``64M``, ``1G`` -> bytes (argparse type)."""
    import argparse

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 64M)") from None


def _cmd_prepare(args) -> int:
    exts = [e.strip() if e.strip().startswith(".") else "." + e.strip()
            for e in args.ext.split(",") if e.strip()]
    try:
        prepare_data(args.inputs, args.out, tokenizer=args.tokenizer, ext=exts,
                     text_field=args.text_field, shard_tokens=args.shard_tokens, dtype=args.dtype,
                     force=args.force, progress=not args.no_progress, block_bytes=args.block_bytes,
                     workers=args.workers, address=args.address)
    except (DataError, ValueError) as exc:  # refused: nothing written (exit status as every command's)
        print(f"sharded-ams prepare-data: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # ran and failed (a full disk, a permission): no OUT; blocks kept
        print(f"sharded-ams prepare-data: failed: {exc}; the blocks done are kept: run the "
              "same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sharded-ams prepare-data: interrupted; no OUT was written, the blocks done are "
              "kept: run the same command again to resume", file=sys.stderr)
        return 130
    return 0
