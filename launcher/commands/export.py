"""``sharded-ams ckpt export CKPT OUT --format hf|safetensors``: a checkpoint's model weights
as files other tools load.

* ``hf`` (Llama models): ``OUT/model.safetensors`` + ``config.json`` that
  ``transformers.LlamaForCausalLM.from_pretrained(OUT)`` loads, plus the training data's
  ``tokenizer.json`` and a ``tokenizer_config.json`` when the run used prepare-data output
  (``AutoTokenizer.from_pretrained(OUT)``). A tied lm_head is stored once, as Hugging Face
  does (``tie_word_embeddings``).
* ``safetensors`` (any model): ``OUT/model.safetensors``, the plain ``state_dict`` (every
  key, tied weights included), loadable with ``safetensors.torch.load_file`` and
  ``model.load_state_dict(..., strict=True)``; the run's ``[model]`` table is in its metadata.

CKPT is a checkpoint directory or a run directory (its newest valid checkpoint: a corrupt
newest one is passed over, as a training resume does, with a note). The weights are read
through the public checkpoint API (``sharded_ams.checkpoint.consolidate``: the fp32 masters
cast to the params' dtype); ``--dtype`` casts them. OUT is written into a temporary directory
and renamed into place, so it is either complete or absent; where OUT may be and when it is
replaced (``--force``, an earlier export only): :mod:`launcher.commands.outputs`.

The tokenizer is copied only if it is the one the run trained with: the data directory's
``index.json`` names it (a plain file name inside that directory; no link is followed), its
sha256 must equal the one the checkpoint's trainer ``extra`` recorded at training time
(``data.tokenizer_sha256``) and it must parse as a tokenizer. A re-prepared data directory is
refused (``--no-tokenizer`` exports without it); a checkpoint without that record, or whose
data directory is gone, is exported without a tokenizer, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Optional

from launcher.commands.outputs import (EXIT_FAILED, EXIT_REFUSED, Refused, check_output, is_export_dir,
                                       newest_usable)

__all__ = ["export_checkpoint", "resolve_checkpoint", "add_export_command", "ExportError"]

WEIGHTS = "model.safetensors"
_OUR_FILES = {WEIGHTS, "config.json", "tokenizer.json", "tokenizer_config.json"}
_DTYPES = ("float32", "bfloat16", "float16")
#: the config's spelling (``model.precision = "bf16"``) means the same dtype here
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


def resolve_checkpoint(path: os.PathLike) -> Path:
    """``path`` if it is a checkpoint (has a manifest), else the newest committed checkpoint
    of the run directory ``path`` (sizes checked; :func:`export_checkpoint` also falls back
    past one whose checksums fail)."""
    from launcher.commands.outputs import Refused, newest_usable

    try:
        return newest_usable(path, lambda p: None, lambda _: None)[0]
    except Refused as exc:
        raise ExportError(str(exc)) from None


def _unshare(state: dict) -> dict:
    """Contiguous tensors, each with its own storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _hf_files(state: dict, extra: dict, dtype_name: str) -> tuple[dict, dict]:
    """(tensors, config.json) for ``transformers.LlamaForCausalLM``."""
    import torch

    from launcher.train.models import build_model

    table = extra.get("model")
    if not isinstance(table, dict) or table.get("factory") or table.get("arch") != "llama":
        what = (f"model.factory {table.get('factory')!r}" if isinstance(table, dict) and table.get("factory")
                else f"model.arch {table.get('arch')!r}" if isinstance(table, dict) else "an unknown model")
        raise ExportError(f"--format hf needs a built-in Llama (model.arch = 'llama'); this checkpoint "
                          f"holds {what}. Use --format safetensors for any model's state dict.")
    with torch.device("meta"):
        model = build_model(table)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise ExportError(f"checkpoint weights do not match model {table.get('arch')!r} of its own "
                          f"config (first differences: {diff[:5]})")
    if model.cfg.tie_weights:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    data = extra.get("data") if isinstance(extra.get("data"), dict) else {}
    tok = data.get("tokenizer") if isinstance(data.get("tokenizer"), dict) else {}
    ids = {} if tok.get("eos_id") is None else {"bos_token_id": tok["eos_id"], "eos_token_id": tok["eos_id"]}
    return state, model.hf_config(torch_dtype=dtype_name, **ids)


def _is_export(path: Path) -> bool:
    return is_export_dir(path, _OUR_FILES, WEIGHTS)


def export_checkpoint(ckpt: os.PathLike, out: os.PathLike, fmt: str = "hf", *,
                      dtype: Optional[str] = None, force: bool = False, tokenizer: bool = True,
                      log=print) -> Path:
    """Export ``ckpt`` (a checkpoint or run directory) to the directory ``out``; see the
    module docstring. Returns ``out``. Raises ExportError (or CheckpointError) with the reason."""
    import torch

    from sharded_ams.checkpoint import consolidate

    if fmt not in ("hf", "safetensors"):
        raise ExportError(f"--format must be hf or safetensors, got {fmt!r}")
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    try:
        check_output(out, [Path(ckpt)], force=force, ours=_is_export, what="an earlier export")
        path, full = newest_usable(ckpt, consolidate, log)
    except Refused as exc:
        raise ExportError(str(exc)) from None
    extra = full.get("extra") or {}
    extra = extra if isinstance(extra, dict) else {}
    state = {k: v for k, v in full["model"].items() if isinstance(v, torch.Tensor)}
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32"
    config, tok = None, None
    if fmt == "hf":
        state, config = _hf_files(state, extra, dtype_name)
        tok = _checked_tokenizer(extra, log) if tokenizer else None
    meta = {"format": "pt", "step": str(full["step"]), "source": str(path)}
    if fmt == "safetensors" and isinstance(extra.get("model"), dict):
        meta["model"] = json.dumps(extra["model"])
    _write(out, state, meta, config, tok)
    n = sum(t.numel() for t in state.values())
    log(f"exported {path} (step {full['step']}) as {fmt} to {out}: {len(state)} tensors, "
        f"{n:,} elements, {dtype_name}")
    return out


def _write(out: Path, state: dict, meta: dict, config: Optional[dict],
           tok: Optional[tuple[bytes, dict]]) -> None:
    """Write everything into ``.OUT.partial-PID``, then rename it to OUT (an earlier export
    there, checked again now, is moved aside first and removed)."""
    from safetensors.torch import save_file

    from launcher.data.tokenizer import tokenizer_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(_unshare(state), str(tmp / WEIGHTS), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors creates it 0600
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tok is not None:
            (tmp / "tokenizer.json").write_bytes(tok[0])
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok[1]), indent=2) + "\n")
        if os.path.lexists(out):
            if not _is_export(out):
                raise ExportError(f"OUT {out} changed while exporting and is not an earlier export "
                                  "now; refusing to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checked_tokenizer(extra: dict, log) -> Optional[tuple[bytes, dict]]:
    """(bytes, index tokenizer entry) of the run's tokenizer, checked (module docstring);
    None, with a note, when there is nothing to check it against."""
    from launcher.data.tokens import MAX_TOKENIZER_BYTES, DataError, read_index

    data = extra.get("data") if isinstance(extra.get("data"), dict) else {}
    if not isinstance(data.get("path"), str):
        log("note: no tokenizer copied (the run did not train on prepare-data output); load one separately")
        return None
    want = data.get("tokenizer_sha256")
    if not isinstance(want, str):
        log("note: no tokenizer copied: this checkpoint did not record its tokenizer's sha256 "
            "(data.tokenizer_sha256, written since issue 23), so it cannot be checked; load one separately")
        return None
    d = Path(data["path"])
    if not d.is_dir():
        log(f"note: no tokenizer copied: the run's data directory {d} is gone; load one separately")
        return None
    try:
        name = (read_index(d).get("tokenizer") or {}).get("file")
    except DataError as exc:
        raise ExportError(f"{exc} (pass --no-tokenizer to export without a tokenizer)") from None
    if not name:
        raise ExportError(f"{d / 'index.json'}: names no tokenizer.file (pass --no-tokenizer)")
    blob = _read_regular(d / name, MAX_TOKENIZER_BYTES)
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise ExportError(f"{d / name}: sha256 {got[:16]}... is not the tokenizer the run trained with "
                          f"(checkpoint trainer extra data.tokenizer_sha256 {want[:16]}...): the data "
                          "directory was re-prepared after training; pass --no-tokenizer to export without it")
    try:
        from tokenizers import Tokenizer as HFTokenizer

        HFTokenizer.from_str(blob.decode("utf-8"))
    except Exception as exc:  # any parse failure of untrusted bytes: refused, no traceback
        raise ExportError(f"{d / name}: not a Hugging Face tokenizer.json ({type(exc).__name__}); "
                          "pass --no-tokenizer to export without it") from None
    entry = data.get("tokenizer") if isinstance(data.get("tokenizer"), dict) else {}
    return blob, entry


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (no symlink followed, no FIFO opened
    for long: O_NONBLOCK) of at most ``limit`` bytes; ExportError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ExportError(f"{path}: cannot open the tokenizer ({exc.strerror or exc}; a symbolic "
                          "link is not followed); pass --no-tokenizer") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ExportError(f"{path}: not a regular file of at most {limit:,} bytes; pass --no-tokenizer")
        return f.read(limit + 1)[:limit]


def add_export_command(sub) -> None:
    """Register ``export`` under the ``ckpt`` subcommands."""
    p = sub.add_parser("export", help="write a checkpoint's model for Hugging Face or as safetensors",
                       description="Export a checkpoint's model weights: --format hf (Llama models: "
                                   "model.safetensors + config.json [+ tokenizer] for "
                                   "transformers' from_pretrained) or --format safetensors (any "
                                   "model's plain state_dict).")
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", dest="fmt", choices=("hf", "safetensors"), default="hf")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   type=lambda x: _DTYPE_ALIASES.get(x, x),
                   help="cast the weights (default: the dtype they were trained in; bf16, fp16 "
                        "and fp32 name the same three)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier export")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                   help="--format hf: do not copy the run's tokenizer")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: Any) -> int:
    """Exit status as every command's (:mod:`launcher.commands.outputs`): 2 refused, 1 failed."""
    from sharded_ams.checkpoint import CheckpointError

    try:
        export_checkpoint(args.ckpt, args.out, args.fmt, dtype=args.dtype, force=args.force,
                          tokenizer=args.tokenizer, log=_note)
    except (ExportError, CheckpointError) as exc:
        print(f"sharded-ams ckpt export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"sharded-ams ckpt export: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _note(msg: str) -> None:
    print(msg, file=sys.stderr if msg.startswith("note:") else sys.stdout, flush=True)
