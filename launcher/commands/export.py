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

CKPT is a checkpoint directory or a run directory (its newest committed checkpoint). The
weights are read through the public checkpoint API (``sharded_ams.checkpoint.consolidate``:
the fp32 masters cast to the params' dtype); ``--dtype`` casts them. OUT is written into a
temporary directory and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["export_checkpoint", "resolve_checkpoint", "add_export_command", "ExportError"]

WEIGHTS = "model.safetensors"
_OUR_FILES = {WEIGHTS, "config.json", "tokenizer.json", "tokenizer_config.json"}
_DTYPES = ("float32", "bfloat16", "float16")


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


def resolve_checkpoint(path: os.PathLike) -> Path:
    """``path`` if it is a checkpoint (has a manifest), else the newest committed checkpoint
    of the run directory ``path``."""
    from sharded_ams.checkpoint import find_latest_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p} does not exist or is not a directory")
    if (p / "manifest.json").is_file():
        return p
    latest = find_latest_checkpoint(p, checksums=False)
    if latest is None:
        raise ExportError(f"{p} is neither a checkpoint (no manifest.json) nor a run directory "
                          "holding a committed one")
    return Path(latest)


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
    tok = (extra.get("data") or {}).get("tokenizer") or {}
    ids = {} if tok.get("eos_id") is None else {"bos_token_id": tok["eos_id"], "eos_token_id": tok["eos_id"]}
    return state, model.hf_config(torch_dtype=dtype_name, **ids)


def export_checkpoint(ckpt: os.PathLike, out: os.PathLike, fmt: str = "hf", *,
                      dtype: Optional[str] = None, log=print) -> Path:
    """Export ``ckpt`` (a checkpoint or run directory) to the directory ``out``; see the
    module docstring. Returns ``out``. Raises ExportError (or CheckpointError) with the reason."""
    import torch
    from safetensors.torch import save_file

    from sharded_ams.checkpoint import consolidate

    if fmt not in ("hf", "safetensors"):
        raise ExportError(f"--format must be hf or safetensors, got {fmt!r}")
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= _OUR_FILES):
        raise ExportError(f"{out} exists and is not an earlier export; refusing to replace it")
    path = resolve_checkpoint(ckpt)
    full = consolidate(path)
    extra = full.get("extra") or {}
    state = {k: v for k, v in full["model"].items() if isinstance(v, torch.Tensor)}
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32"
    config = None
    if fmt == "hf":
        state, config = _hf_files(state, extra, dtype_name)
    meta = {"format": "pt", "step": str(full["step"]), "source": str(path)}
    if fmt == "safetensors" and isinstance(extra.get("model"), dict):
        meta["model"] = json.dumps(extra["model"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_unshare(state), str(tmp / WEIGHTS), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors creates it 0600
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _copy_tokenizer(extra, tmp, log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(t.numel() for t in state.values())
    log(f"exported {path} (step {full['step']}) as {fmt} to {out}: {len(state)} tensors, "
        f"{n:,} elements, {dtype_name}")
    return out


def _copy_tokenizer(extra: dict, dest: Path, log) -> None:
    from launcher.data.tokenizer import tokenizer_config

    data = extra.get("data") or {}
    src = data.get("tokenizer_file")
    if not src or not Path(src).is_file():
        log("note: no tokenizer copied (the run's data had no tokenizer.json, or it moved); "
            "load one separately")
        return
    shutil.copyfile(src, dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(data.get("tokenizer") or {}),
                                                           indent=2) + "\n")


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
                   help="cast the weights (default: the dtype they were trained in)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: Any) -> int:
    from sharded_ams.checkpoint import CheckpointError

    try:
        export_checkpoint(args.ckpt, args.out, args.fmt, dtype=args.dtype)
    except (ExportError, CheckpointError) as exc:
        print(f"sharded-ams ckpt export: error: {exc}", file=sys.stderr)
        return 1
    return 0
