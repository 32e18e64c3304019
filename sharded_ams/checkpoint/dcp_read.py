"""Reading a DCP checkpoint whole in one process (no process group): for ``ckpt
consolidate`` / ``ckpt export`` (``consolidate_dcp``: the same dict as the native
``consolidate``) and ``ckpt convert --to zero1``. Every file is checked first
(``dcp_meta.validate_dcp``) and nothing is allocated before the metadata's tensors are
known to fit in the data files that hold them."""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Union

import torch

from .dcp import SafeLoadPlanner, reader_of
from .dcp_meta import load_trainer, read_dcp_metadata, validate_dcp
from .format import CheckpointError, PathLike

__all__ = ["read_dcp_full", "consolidate_dcp"]


def read_dcp_full(path: PathLike) -> dict:
    """Every tensor of a DCP checkpoint, whole, in one process (no group): checked first
    (``validate_dcp``), and allocated only once the metadata's tensors are known to fit in
    the data files that hold them. Returns ``{"model", "optim", "trainer", "manifest"}``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    man = validate_dcp(path, checksums=True)
    md = read_dcp_metadata(man, checksum=False)
    trainer = load_trainer(man)
    data_bytes = sum(int(f["size"]) for n, f in man.files.items() if n.endswith(".distcp"))
    need = sum(math.prod(m.size) * m.properties.dtype.itemsize
               for m in md.state_dict_metadata.values() if isinstance(m, TensorStorageMetadata))
    if need > data_bytes:
        raise CheckpointError(f"{man.path}: the metadata claims {need} bytes of tensors, the data "
                              f"files hold {data_bytes}", path=man.path, kind="corrupt")
    flat: dict[str, Any] = {}
    for key, m in md.state_dict_metadata.items():
        flat[key] = (torch.empty(tuple(m.size), dtype=m.properties.dtype)
                     if isinstance(m, TensorStorageMetadata) else None)
    dcp.load(flat, storage_reader=reader_of(man.path, md),
             planner=SafeLoadPlanner(flatten_state_dict=False), no_dist=True)
    nested: dict = {}
    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    for key, value in flat.items():
        where = paths.get(key)
        if not (isinstance(where, tuple) and where and all(isinstance(p, (str, int)) for p in where)):
            raise CheckpointError(f"{man.path}: no path for {key!r:.80} in the metadata",
                                  path=man.path, kind="corrupt")
        node = nested
        for part, nxt in itertools.pairwise(where):
            node = node.setdefault(part, [] if isinstance(nxt, int) else {}) \
                if isinstance(node, dict) else _at(node, part, nxt)
        if isinstance(node, list):
            while len(node) <= where[-1]:
                node.append({})
            node[where[-1]] = value
        else:
            node[where[-1]] = value
    return {"model": nested.get("model", {}), "optim": nested.get("optim", {}),
            "trainer": trainer, "manifest": man}


def _at(node: list, i: int, nxt) -> Any:
    while len(node) <= i:
        node.append([] if isinstance(nxt, int) else {})
    return node[i]


def consolidate_dcp(path: PathLike, *, foreach: Optional[bool] = None,
                    fused: Optional[Union[bool, str]] = None) -> dict:
    """``consolidate()``'s dict from a DCP checkpoint: the model's state (fp32 params: an
    FSDP run's params are its masters), and an ``AMS`` state_dict (params indexed 0.. in
    the order of the param groups; no ``master``: the params are fp32)."""
    full = read_dcp_full(path)
    optim, trainer = full["optim"], full["trainer"]
    state, groups, names = {}, [], []
    for g in optim.get("param_groups") or []:
        ids = []
        for n in g["params"]:
            state[len(names)] = {k: (v.float() if k == "step" else v)
                                 for k, v in optim["state"][n].items()}
            ids.append(len(names))
            names.append(n)
        hp = {k: g[k] for k in ("lr", "betas", "beta3", "lam", "eps", "weight_decay")}
        hp["betas"] = tuple(hp["betas"])
        groups.append({**hp, "foreach": foreach, "fused": fused, "params": ids,
                       "param_names": list(g["params"])})
    return {"model": full["model"], "optimizer": {"state": state, "param_groups": groups},
            "param_names": names, "step": full["manifest"].step, "extra": trainer.get("extra"),
            "lr_scheduler": trainer.get("lr_scheduler")}
