"""One unsharded state from a checkpoint of any world size (one process, no group), and
its export to a single file (``sharded-ams ckpt consolidate DIR OUT``). A DCP checkpoint
(an ``fsdp`` run's) is read by ``dcp_read.consolidate_dcp`` into the same dict."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .commit import fsync_dir, write_bytes_durably
from .dcp_meta import DCP_FORMAT, manifest_format
from .dcp_read import consolidate_dcp
from .format import HP_KEYS, MODEL_EXTRA_NAME, TRAINER_NAME, CheckpointError, PathLike, param_dtype
from .validate import load_checked, read_manifest
from .values import check_values

__all__ = ["consolidate", "export_consolidated"]


def consolidate(path: PathLike, *, foreach: Optional[bool] = None,
                fused: Optional[Union[bool, str]] = None, allow_nonfinite: bool = False) -> dict:
    """One unsharded state from a checkpoint of any world size (one process, no group).

    Every file is checked as ``validate_checkpoint`` does (rules, sha256, content) before
    its data is used; nothing is allocated from a number the checks did not bound. A shard
    holding NaN/inf or a negative ``exp_avg_sq`` is refused as ``load_checkpoint`` does,
    unless ``allow_nonfinite``.

    Returns ``{"model", "optimizer", "param_names", "step", "extra", "lr_scheduler"}``:

    * ``optimizer``: a torch.optim-style state_dict for :class:`sharded_ams.AMS` built
      with the same param groups in the same order (params indexed 0.. across groups, in
      the order of the checkpoint's param groups, i.e. the model's named trainable
      params for a ShardedAMS built from a module). Per param: ``step`` (its group's step,
      0-d fp32 tensor), ``exp_avg``, ``exp_avg_sq``, ``exp_avg_s`` (beta3 > 0) and
      ``master`` (only for non-fp32 params). Group hyperparameters are the saved ones plus
      ``foreach``/``fused`` (arguments here), which torch.optim's load_state_dict copies
      into the AMS groups.
    A DCP checkpoint gives the same keys: its fp32 params (no ``master``), its state,
    the manifest's hyperparameters (``dcp_read.consolidate_dcp``; values refused alike).

    * ``model``: a model state_dict: params from the fp32 masters cast to the param
      dtype (tied weights under every key), plus buffers/frozen params from
      ``model-extra.pt`` when the checkpoint was saved with ``model=``; otherwise the
      optimized params under their optimizer names only.
    """
    if manifest_format(path) == DCP_FORMAT:
        return consolidate_dcp(path, foreach=foreach, fused=fused,
                               allow_nonfinite=allow_nonfinite)
    man = read_manifest(path)
    loaded = {n: load_checked(man, n, checksum=True, mmap=True) for n in man.files}
    if not allow_nonfinite:
        for name in man.shard_files():
            check_values(man, name, loaded[name])
    full: dict[str, dict[str, Tensor]] = {}
    for n, p in man.params.items():
        full[n] = {k: torch.empty(p["numel"], dtype=torch.float32) for k in man.state_keys}
    for name in man.shard_files():
        for rec in loaded.pop(name)["optimizer"]["pieces"]:
            sl = slice(rec["offset"], rec["offset"] + rec["length"])
            for k in man.state_keys:
                full[rec["name"]][k][sl] = rec[k]
    state, groups, pidx = {}, [], 0
    model_params: dict[str, Tensor] = {}
    for g in man.param_groups:
        ids = []
        for n in g["params"]:
            info = man.params[n]
            shape = tuple(info["shape"])
            dtype = param_dtype(info["dtype"])
            st: dict[str, Tensor] = {"step": torch.tensor(float(g["step"]))}
            for k in man.state_keys:
                if k != "master":
                    st[k] = full[n][k].view(shape)
            if dtype != torch.float32:
                st["master"] = full[n]["master"].view(shape)
            state[pidx] = st
            model_params[n] = full[n]["master"].view(shape).to(dtype)
            ids.append(pidx)
            pidx += 1
        hp = {k: g[k] for k in HP_KEYS}
        hp["betas"] = tuple(hp["betas"])
        groups.append({**hp, "foreach": foreach, "fused": fused, "params": ids,
                       "param_names": list(g["params"])})
    trainer = loaded.get(TRAINER_NAME, {})
    if man.model is not None:
        tensors = loaded[MODEL_EXTRA_NAME]["tensors"] if MODEL_EXTRA_NAME in loaded else {}
        model_sd = {k: model_params[info["param"]] if "param" in info else tensors[k]
                    for k, info in man.model["keys"].items()}
    else:
        model_sd = model_params
    return {"model": model_sd, "optimizer": {"state": state, "param_groups": groups},
            "param_names": [n for g in man.param_groups for n in g["params"]],
            "step": man.step, "extra": trainer.get("extra"),
            "lr_scheduler": trainer.get("lr_scheduler")}


def export_consolidated(path: PathLike, out: PathLike, *, allow_nonfinite: bool = False) -> dict:
    """``torch.save(consolidate(path))`` to the file ``out``, durably (temp file, fsync,
    rename; the temp file is removed on any failure). Refuses an ``out`` that is a
    directory or lies inside the checkpoint (it would overwrite or pollute it). Returns
    the consolidated dict. ``allow_nonfinite``: as :func:`consolidate`'s."""
    src, out = Path(path), Path(out)
    inside = src.resolve()
    target = out.parent.resolve() / out.name
    if target == inside or inside in target.parents:
        raise CheckpointError(f"{out}: inside the checkpoint {src}; write the consolidated "
                              "file somewhere else", path=out, kind="unsafe")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give a file name, e.g. {out / 'full.pt'}")
    full = consolidate(src, allow_nonfinite=allow_nonfinite)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably(out, lambda f, box: torch.save(full, f))
    fsync_dir(out.parent)
    return full
