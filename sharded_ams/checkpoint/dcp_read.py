"""Reading a DCP checkpoint whole in one process (no process group): for ``ckpt
consolidate`` / ``ckpt export`` (``consolidate_dcp``: the same dict as the native
``consolidate``) and ``ckpt convert --to zero1``. Every file is checked first
(``dcp_meta.validate_dcp``) and nothing is allocated before the metadata's tensors are
known to fit in the data files that hold them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .dcp import SafeLoadPlanner, quiet_single_process
from .dcp_meta import CheckedFiles, check_files, load_trainer, read_dcp_manifest, refusing
from .dcp_reader import reader_of
from .format import HP_KEYS, CheckpointError, PathLike
from .values import check_dcp_values

__all__ = ["read_dcp_full", "consolidate_dcp", "refusing", "saved_groups", "HP_KEYS"]



def read_dcp_full(path: PathLike, *, allow_nonfinite: bool = False) -> dict:
    """Every tensor of a DCP checkpoint, whole, in one process (no group): checked first
    (``validate_dcp``), and allocated only once the metadata's tensors are known to fit in
    the data files that hold them. A master or moment holding NaN/inf, or a negative
    ``exp_avg_sq``, is refused (``kind="values"``, as ``load_dcp``) unless
    ``allow_nonfinite``. Returns ``{"model", "optim", "trainer", "manifest"}``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    man = read_dcp_manifest(path)
    with CheckedFiles(man) as files, refusing(man.path):
        md = check_files(man, files)  # every file checked, and read through the same fds
        trainer = load_trainer(man, files)
        data_bytes = sum(int(f["size"]) for n, f in man.files.items() if n.endswith(".distcp"))
        need = sum(math.prod(m.size) * m.properties.dtype.itemsize
                   for m in md.state_dict_metadata.values()
                   if isinstance(m, TensorStorageMetadata))
        if need > data_bytes:
            raise CheckpointError(f"{man.path}: the metadata claims {need} bytes of tensors, "
                                  f"the data files hold {data_bytes}", path=man.path,
                                  kind="corrupt")
        flat: dict[str, Any] = {}
        for key, m in md.state_dict_metadata.items():
            flat[key] = (torch.empty(tuple(m.size), dtype=m.properties.dtype)
                         if isinstance(m, TensorStorageMetadata) else None)
        with quiet_single_process():
            dcp.load(flat, storage_reader=reader_of(man, md, files),
                     planner=SafeLoadPlanner(flatten_state_dict=False), no_dist=True)
        nested = _nest(flat, md.planner_data, man.path)
        full = {"model": nested.get("model", {}), "optim": nested.get("optim", {}),
                "trainer": trainer, "manifest": man}
        if not allow_nonfinite:
            check_dcp_values(man.path, full, [n for g in saved_groups(full) for n in g["params"]])
    return full


def saved_groups(full: dict) -> list[dict]:
    """The param groups of ``read_dcp_full``'s checkpoint: each one's hyperparameters and
    step from the checked manifest, as ``load_dcp`` takes them (the data files' copies,
    unchecked, are not used: a tensor or an out-of-range ``lr`` there goes nowhere), and
    its params' names from the data files (the manifest has none); as many groups in both,
    else ``corrupt``."""
    man = full["manifest"]
    data = (full["optim"] or {}).get("param_groups") or []
    if not isinstance(data, list) or len(data) != len(man.param_groups):
        raise CheckpointError(f"{man.path}: the data files hold {len(data)} param groups, "
                              f"the manifest {len(man.param_groups)}", path=man.path,
                              kind="corrupt", field="optimizer.param_groups")
    return [{**{k: saved[k] for k in HP_KEYS}, "step": int(saved["step"]),
             "params": list(g["params"])} for g, saved in zip(data, man.param_groups)]


class _Node(dict):
    """An inner node of the nested state dict being built (a loaded value may be a dict)."""


def _nest(flat: dict, paths: dict, where: Path) -> dict:
    """The nested state dict of DCP's flat items, each put at its path (checked by
    ``dcp_meta._check_paths``). Lists are made from the indices present, which must be
    0..n-1: no list is grown to an index the metadata names (10**12 slots), and a path
    running through another item is refused."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: nesting paths of the metadata: {msg}", path=where,
                               kind="corrupt")

    root = _Node()
    for key, value in flat.items():
        path, node = paths[key], root
        for part in path[:-1]:
            node = node.setdefault(part, _Node())
            if not isinstance(node, _Node):
                raise bad(f"{key!r:.80} runs through another item at {part!r:.40}")
        if path[-1] in node:
            raise bad(f"{key!r:.80} and another item are both at {path!r:.120}")
        node[path[-1]] = value
    return _lists(root, bad)


def _lists(node: Any, bad) -> Any:
    if not isinstance(node, _Node):
        return node
    out = {k: _lists(v, bad) for k, v in node.items()}
    ints = [k for k in out if isinstance(k, int)]
    if not ints:
        return out
    if len(ints) != len(out) or sorted(ints) != list(range(len(ints))):
        raise bad(f"list indices {sorted(out, key=repr)[:6]!r:.120} are not 0..n-1")
    return [out[i] for i in range(len(ints))]


def consolidate_dcp(path: PathLike, *, foreach: Optional[bool] = None,
                    fused: Optional[Union[bool, str]] = None,
                    allow_nonfinite: bool = False) -> dict:
    """``consolidate()``'s dict from a DCP checkpoint: the model's state (fp32 params: an
    FSDP run's params are its masters), and an ``AMS`` state_dict (params indexed 0.. in
    the order of the param groups; no ``master``: the params are fp32). A param the
    checkpoint holds no state for (it never had a gradient: torch.optim-style AMS makes its
    state at its first step) has no entry in ``state``, as in ``AMS.state_dict()``. The
    groups' hyperparameters are the manifest's (``saved_groups``); NaN/inf or a negative
    ``exp_avg_sq`` is refused unless ``allow_nonfinite`` (``read_dcp_full``)."""
    full = read_dcp_full(path, allow_nonfinite=allow_nonfinite)
    with refusing(full["manifest"].path):
        return _consolidated(full, foreach, fused)


def _consolidated(full: dict, foreach, fused) -> dict:
    """``consolidate_dcp``'s dict of what ``read_dcp_full`` read."""
    optim, trainer = full["optim"], full["trainer"]
    state, groups, names = {}, [], []
    saved = optim.get("state") or {}
    for g in saved_groups(full):
        ids = []
        for n in g["params"]:
            if n in saved:  # none for a param that never had a gradient: AMS makes it then
                state[len(names)] = {k: (v.float() if k == "step" else v)
                                     for k, v in saved[n].items()}
            ids.append(len(names))
            names.append(n)
        hp = {k: g[k] for k in HP_KEYS}
        hp["betas"] = tuple(hp["betas"])
        groups.append({**hp, "foreach": foreach, "fused": fused, "params": ids,
                       "param_names": list(g["params"])})
    return {"model": full["model"], "optimizer": {"state": state, "param_groups": groups},
            "param_names": names, "step": full["manifest"].step, "extra": trainer.get("extra"),
            "lr_scheduler": trainer.get("lr_scheduler")}
