"""Checkpoints of FSDP2 / tensor-parallel runs in ``torch.distributed.checkpoint`` (DCP)
format, under the rules of the native format (docs/checkpoint.md, "DCP checkpoints"):

    step-00001000/
        __0_0.distcp ...   # DCP: each rank's shards of the model and optimizer state
        .metadata          # DCP: rank 0, the index of every tensor's chunks
        rng-rank00000.pt   # each rank: its RNG states (restored on the same world size)
        trainer.pt         # rank 0: step, lr_scheduler state, ``extra``
        manifest.json      # rank 0, written LAST: the commit record (sizes, sha256)

The state is ``{"model": get_model_state_dict(model), "optim":
get_optimizer_state_dict(model, optimizer)}`` (fully qualified names, DTensor shards), so
DCP reshards it onto any mesh on load and any DCP user can read it
(``dcp.load`` of the same keys). A :class:`~sharded_ams.ShardedAMS` (``zero1``, with or
without ``tp``) saves the same keys and global shapes from its flat shards
(``dcp_sharded.py``): either strategy loads the other's checkpoints, on any mesh. What is
refused before a load is ``dcp_meta.py``'s.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .commit import fsync_dir, write_bytes_durably, write_file
from .dcp_sharded import Chunks, ChunkSavePlanner, lookup_chunk, sharded_dcp_state_dict
from .dcp_meta import (DCP_FORMAT, DCP_VERSION, DATA_RE, METADATA_NAME, RNG_RE, CheckedFiles,
                       DCPManifest, check_dcp_files, check_dcp_items, load_rng, load_trainer,
                       read_dcp_manifest, read_dcp_metadata, refusing, rng_file_name)
from .dcp_reader import reader_of
from .format import HP_KEYS, MANIFEST_NAME, TRAINER_NAME, CheckpointError, PathLike
from .group import Group
from .load import check_scheduler
from .snapshot import rng_state, set_rng_state
from .values import check_dcp_values

__all__ = ["save_dcp", "load_dcp", "write_dcp_state", "SafeLoadPlanner", "reader_of",
           "dcp_state_dict"]

log = logging.getLogger("sharded_ams.checkpoint")


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns "assuming the intent is to load/save in a single process" whenever no
    process group is up; a one-process save, ``ckpt convert`` or ``ckpt export`` means just
    that, so the warning is noise on a user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"torch\.distributed is .*single process")
        yield


def world_group() -> Group:
    """Every rank of the default process group (a DCP save or load is over all of them)."""
    if dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), None, True)
    return Group(0, 1, None, False)


def _is_sharded(optimizer) -> bool:
    return hasattr(optimizer, "shards")  # ShardedAMS: flat shards; AMS on FSDP2: none


def dcp_state_dict(model: nn.Module, optimizer) -> dict:
    """What a DCP checkpoint holds: the model's and the optimizer's state dicts by FQN
    (a ShardedAMS's: ``dcp_sharded.sharded_dcp_state_dict``, the same keys and shapes)."""
    if _is_sharded(optimizer):
        return sharded_dcp_state_dict(model, optimizer)
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer)}


def _sha256(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _groups_of(optimizer, step: int) -> list[dict]:
    """Each group's hyperparameters and step count (its params' AMS step: skipped steps
    are not counted, as ShardedAMS's group step; the training step if it has no state)."""
    keys = HP_KEYS
    out = []
    for g in optimizer.param_groups:
        if "step" in g:  # ShardedAMS: one count per group
            out.append({**{k: (list(g[k]) if k == "betas" else float(g[k])) for k in keys},
                        "step": int(g["step"])})
            continue
        st = next((optimizer.state[p] for p in g["params"] if "step" in optimizer.state.get(p, {})),
                  None)
        out.append({**{k: (list(g[k]) if k == "betas" else float(g[k])) for k in keys},
                    "step": step if st is None else int(st["step"])})
    return out


def tied_keys(model: nn.Module) -> dict[str, str]:
    """State_dict keys that are another key's param (tied weights: ``lm_head.weight`` ->
    ``wte.weight``, the name the optimizer state is under), as state dicts spell them (a
    torch.compile wrapper's ``_orig_mod.`` left out). DCP stores each key as its own
    tensor; the manifest records the tie so that ``ckpt convert --to zero1`` restores it."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name.replace("_orig_mod.", "")
        if first.setdefault(id(p), name) != name:
            tied[name] = first[id(p)]
    return tied


def save_dcp(path: PathLike, model: nn.Module, optimizer, *, step: int,
             extra: Optional[dict] = None, lr_scheduler=None, mesh: Optional[dict] = None,
             shared_fs: bool = True) -> Path:
    """Save a DCP checkpoint of ``model`` and its ``optimizer``; every rank calls it.

    ``path`` is created; it must not hold a checkpoint yet. With ``shared_fs=False`` each
    rank writes into its own ``path`` (a rank-local directory that is uploaded, as Ray
    Train does): data file names are rank-unique, so the union is the checkpoint. Each
    rank hashes its files, rank 0 gathers the hashes and writes ``manifest.json`` last.
    ``mesh``: ``{"strategy", "dp", "tp"}`` recorded in the manifest (default: a
    ShardedAMS's own, else FSDP over the world). Raises
    CheckpointError on every rank if any rank failed (nothing committed)."""
    if mesh is None and _is_sharded(optimizer):  # dp x tp of its own mesh
        tp = optimizer.mp.mesh.size() if optimizer.mp.mesh is not None else 1
        mesh = {"strategy": "zero1", "dp": optimizer.comm.world_size, "tp": tp}
    return write_dcp_state(
        path, dcp_state_dict(model, optimizer), step=step, extra=extra,
        scheduler_state=None if lr_scheduler is None else lr_scheduler.state_dict(), mesh=mesh,
        groups=_groups_of(optimizer, step), skipped_steps=int(getattr(optimizer, "skipped_steps", 0)),
        shared_fs=shared_fs, optimizer_class=type(optimizer).__name__, tied=tied_keys(model))


def write_dcp_state(path: PathLike, sd: dict, *, step: int, extra: Optional[dict],
                    scheduler_state: Any, mesh: Optional[dict], groups: list,
                    skipped_steps: int = 0, shared_fs: bool = True, rng: bool = True,
                    optimizer_class: str = "FSDPAMS", tied: Optional[dict] = None) -> Path:
    """``save_dcp`` of a state dict already made (``{"model", "optim"}`` as
    :func:`dcp_state_dict` makes it; plain tensors in one process: ``ckpt convert``, which
    passes ``rng=False``: its RNG states are not a run's). With ``rng`` each rank also
    writes its RNG states (``rng-rankNNNNN.pt``, listed and hashed like the rest).
    ``tied``: the model's tied keys (:func:`tied_keys`), recorded in the manifest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    path, ctx = Path(path), world_group()
    err: Optional[BaseException] = None
    files: dict = {}
    try:
        if os.path.lexists(path / MANIFEST_NAME) and (ctx.rank == 0 or not shared_fs):
            raise CheckpointError(f"{path}: save aborted, it already holds a checkpoint; save "
                                  "into a new directory", path=path, kind="save_failed")
        path.mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        err = _save_failed(path, ctx.rank, "prepare", exc)
    ctx.agree(err)
    with quiet_single_process():
        dcp.save(sd, storage_writer=FileSystemWriter(str(path), single_file_per_rank=True,
                                                     sync_files=True),
                 # replicated items (the per-param steps, unsharded buffers) in rank 0's
                 # file only: a load then reads its own file and rank 0's, and hashes those
                 # two, not a little of every rank's (DCP's default spreads them over all)
                 planner=ChunkSavePlanner(dedup_save_to_lowest_rank=True),
                 no_dist=not ctx.active)
    try:
        for name in sorted(os.listdir(path)):
            m = DATA_RE.match(name)
            if (m and int(m.group(1)) == ctx.rank) or (name == METADATA_NAME and ctx.rank == 0):
                files[name] = _sha256(path / name)
        if rng:
            files[rng_file_name(ctx.rank)] = write_file(
                path, rng_file_name(ctx.rank),
                {"format": "sharded_ams.rng", "version": 1, "rank": ctx.rank, "rng": rng_state()})
        if ctx.rank == 0:
            trainer = {"format": "sharded_ams.trainer", "version": 1, "step": int(step),
                       "lr_scheduler": scheduler_state, "extra": extra}
            files[TRAINER_NAME] = write_file(path, TRAINER_NAME, trainer)
        fsync_dir(path)
    except Exception as exc:
        err = _save_failed(path, ctx.rank, "write its files", exc)
    ctx.agree(err)
    everyone = ctx.gather0(files)
    if ctx.rank == 0:
        try:
            _commit(path, everyone, step, ctx.world_size, mesh, groups, int(skipped_steps),
                    optimizer_class, tied or {})
        except Exception as exc:
            err = _save_failed(path, ctx.rank, "commit", exc)
    ctx.agree(err)
    return path


def _save_failed(path: Path, rank: int, what: str, exc: Exception) -> CheckpointError:
    """A failed save's error, of the native save's kind (``save_failed``); a
    CheckpointError as it is."""
    if isinstance(exc, CheckpointError):
        return exc
    return CheckpointError(f"{path}: save failed (rank {rank} could not {what}: "
                           f"{type(exc).__name__}: {exc})", path=path, kind="save_failed")


def _commit(path: Path, everyone: list, step: int, world: int, mesh: Optional[dict],
            groups: list, skipped: int, optimizer_class: str, tied: dict) -> None:
    """Rank 0: the manifest, written last (temp name, fsync, rename, fsync dir)."""
    files: dict = {}
    for rank_files in everyone:
        files.update(rank_files)
    now = time.time()
    man = {"format": DCP_FORMAT, "version": DCP_VERSION, "step": int(step), "world_size": world,
           "mesh": mesh or {"strategy": "fsdp", "dp": world, "tp": 1},
           "torch_version": torch.__version__, "sharded_ams_version": _version(),
           "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
           "created_unix": now,
           "optimizer": {"class": optimizer_class, "param_groups": groups, "skipped_steps": skipped},
           "tied": dict(sorted(tied.items())),
           "files": dict(sorted(files.items()))}
    data = json.dumps(man, indent=1).encode("utf-8")
    write_bytes_durably(path / MANIFEST_NAME, lambda f, box: f.write(data))
    fsync_dir(path)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sharded-ams")
    except Exception:  # not installed (a source tree)
        return "unknown"


class _Planner:
    """Built lazily: DefaultLoadPlanner exists only with torch.distributed."""

    cls = None


def SafeLoadPlanner(**kw: Any):  # a class, made on first use
    """DCP's DefaultLoadPlanner, but non-tensor items are read with
    ``torch.load(weights_only=True)`` (DCP's own uses ``weights_only=False``: a pickle)."""
    if _Planner.cls is None:
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint._traverse import set_element

        class _Safe(DefaultLoadPlanner):
            def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
                if not _holds_chunks(state_dict):
                    return super().set_up_planner(state_dict, metadata, is_coordinator)
                # DefaultLoadPlanner's, but its first call (``_init_state_dict``, which
                # materialises meta tensors) replaces values of types it does not know,
                # Chunks among them, by None; nothing loaded here is on the meta device
                from torch.distributed.checkpoint._nested_dict import flatten_state_dict
                from torch.distributed.checkpoint._sharded_tensor_utils import \
                    _flatten_sharded_tensors

                self.original_state_dict = state_dict
                if self.flatten_sharded_tensors:
                    state_dict = _flatten_sharded_tensors(state_dict)
                if self.flatten_state_dict:
                    state_dict, self.mappings = flatten_state_dict(state_dict)
                self.state_dict, self.metadata = state_dict, metadata
                self.is_coordinator = is_coordinator

            def lookup_tensor(self, index):  # a ShardedAMS's flat state: dcp_sharded.Chunks
                t = lookup_chunk(self.state_dict, index)
                return super().lookup_tensor(index) if t is None else t

            def load_bytes(self, read_item, value) -> None:
                obj = torch.load(value, weights_only=True)
                if self.flatten_state_dict:
                    set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
                else:  # into the caller's dict (self.state_dict may be a copy of it)
                    self.state_dict[read_item.dest_index.fqn] = obj
                    self.original_state_dict[read_item.dest_index.fqn] = obj

        _Planner.cls = _Safe
    return _Planner.cls(**kw)


def _holds_chunks(sd: Any) -> bool:
    if isinstance(sd, dict):
        return any(_holds_chunks(v) for v in sd.values())
    return isinstance(sd, Chunks)


def _check_shapes(man: DCPManifest, md, sd: dict) -> None:
    """Every item the load fills exists in the checkpoint (keys as DCP flattens them),
    every tensor with the same global shape: a mismatch is "a different model or
    optimizer", before anything loads, not DCP's bare error halfway through. Its kind is
    the native load's: ``model_mismatch`` if a ``model.`` item differs, else
    ``optimizer_mismatch`` (state keys: e.g. beta3 > 0 vs 0)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat, _ = flatten_state_dict(sd)
    missing, differ, keys = [], [], []
    for key, t in flat.items():
        item = md.state_dict_metadata.get(key)
        if item is None:
            missing.append(key)
        elif not isinstance(t, (torch.Tensor, Chunks)):
            continue  # a non-tensor value: read as bytes, whatever its size
        elif not isinstance(item, TensorStorageMetadata) or tuple(item.size) != tuple(t.size()):
            have = tuple(item.size) if isinstance(item, TensorStorageMetadata) else "bytes"
            differ.append(f"{key} {have} vs {tuple(t.size())}")
            keys.append(key)
    if missing or differ:
        what = "; ".join([f"missing: {', '.join(missing[:6])}"] * bool(missing)
                         + [f"shapes differ: {', '.join(differ[:6])}"] * bool(differ))
        model = any(k.startswith("model.") for k in missing + keys)
        raise CheckpointError(f"{man.path}: a different model or optimizer ({what})",
                              path=man.path, kind="model_mismatch" if model else
                              "optimizer_mismatch")


def _nesting_copy(obj: Any) -> Any:
    """``obj``'s dicts, lists and tuples copied, every other value shared: DCP's planner
    set-up rewrites the nesting it is given in place (meta tensors materialised, values
    of types it does not know, such as Chunks, replaced), so a plan made ahead of the load
    is made on a copy of it."""
    if isinstance(obj, dict):
        return {k: _nesting_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map(_nesting_copy, obj)) if type(obj) in (list, tuple) else obj
    return obj


def files_read(md, sd: dict, rank: int) -> Optional[set[str]]:
    """The data files this rank's ``dcp.load`` of ``sd`` reads from: DCP's own local plan
    (a fresh ``SafeLoadPlanner``, as ``load_dcp`` loads with; its global plan changes no
    rank's reads), each read item's storage file. None if the plan cannot be made."""
    try:
        planner = SafeLoadPlanner()
        planner.set_up_planner({k: _nesting_copy(sd[k]) for k in sorted(sd)}, md, rank == 0)
        return {md.storage_data[item.storage_index].relative_path
                for item in planner.create_local_plan().items}
    except Exception as exc:  # noqa: BLE001 - an unforeseen layout: check every file
        log.warning("load_dcp: cannot plan this rank's reads (%s: %s); checksumming every "
                    "data file", type(exc).__name__, str(exc)[:200])
        return None


def hash_duty(man: DCPManifest, md, sd: dict, ctx: Group) -> set[str]:
    """The files this rank checksums in ``load_dcp`` (``.metadata`` and ``trainer.pt``,
    which every rank reads, aside): every data file it reads (the directory may be a
    per-node copy, e.g. downloaded by Ray Train: a rank checks what it reads; all of them
    if its reads cannot be planned) plus a round-robin share of all data and RNG files,
    the i-th in saved-rank order to rank i mod world size, so that together the ranks
    check every file. A share of all files, not only of those that no rank reads: no
    collective, and the shares add at most one read of the checkpoint to the ranks' own;
    on the world size it was saved on, rank r's share is ``__r_0.distcp``, a file it
    reads anyway."""
    data = sorted((n for n in man.files if DATA_RE.match(n)),
                  key=lambda n: tuple(map(int, DATA_RE.match(n).groups())))
    rngs = sorted((n for n in man.files if RNG_RE.match(n)),
                  key=lambda n: int(RNG_RE.match(n).group(1)))
    reads = files_read(md, sd, ctx.rank)
    share = {n for files in (data, rngs) for i, n in enumerate(files)
             if i % ctx.world_size == ctx.rank}
    return share | (set(data) if reads is None else reads)


def load_dcp(path: PathLike, model: nn.Module, optimizer, *, lr_scheduler=None,
             restore_rng: bool = True, allow_nonfinite: bool = False) -> dict:
    """Load a DCP checkpoint into ``model`` and ``optimizer`` on any mesh (DCP reshards);
    every rank calls it. Every file is checked first: sizes (every rank), the metadata
    through the allowlist, this rank's RNG states, and sha256 and item zip directories of
    the data files (each rank those it reads and a share of the rest: ``hash_duty``);
    a failure on any rank is raised on every rank. With ``restore_rng``, each rank gets
    its RNG states back when the world size is the one saved (as the native format does; on
    another world size there is no rank-for-rank match and they are left as they are).

    A master (an FSDP run's param) or moment holding NaN/inf, or a negative
    ``exp_avg_sq``, is refused as ``load_checkpoint`` refuses it (``kind="values"``,
    ``field`` the DCP key naming the param and state key: ``model.<param>`` or
    ``optim.state.<param>.<key>``) unless ``allow_nonfinite=True``. Each rank checks what
    it loaded (its own shards, no copy) and the ranks agree. DCP loads in place, so this
    check comes after the load: on that refusal (only) what DCP loaded in place holds the
    refused checkpoint's values (an FSDP2 model's params, an FSDP2 AMS's moments and
    per-param ``step`` tensors; a ShardedAMS's fp32 masters and moments, which for fp32
    params are this rank's range of the params themselves), while the groups'
    hyperparameters and step counts, the scheduler and the RNG states are as they were.
    Load another checkpoint (it overwrites every element: the chunks tile each tensor) or
    rebuild them before training on. Every other refusal comes before anything is loaded.

    Returns ``{"step", "extra", "manifest"}``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    ctx = world_group()
    err: Optional[BaseException] = None
    man = md = trainer = rng = None
    sharded = _is_sharded(optimizer)
    sd = dcp_state_dict(model, optimizer)
    # the groups' hyperparameters come from the manifest (whichever strategy wrote the
    # files, whatever else its groups held); a ShardedAMS's step counts too
    groups = sd["optim"].pop("param_groups")
    if sharded:  # the state is read in place
        sd["optim"] = {"state": {n: {k: v for k, v in st.items() if k != "step"}
                                 for n, st in sd["optim"]["state"].items()}}
    files = contextlib.ExitStack()  # the checked files, held open for dcp.load's reads
    try:
        man = read_dcp_manifest(path)
        held = files.enter_context(CheckedFiles(man))
        check_dcp_files(man, held, ())  # sizes of every file (cheap): a truncated one is corrupt
        md = read_dcp_metadata(man)  # every rank reads it: checksummed here
        _check_shapes(man, md, sd)  # first: the plan of this rank's reads needs the keys
        check_dcp_items(man, md, held, check_dcp_files(man, held, hash_duty(man, md, sd, ctx)))
        trainer = load_trainer(man, held)
        check_scheduler(man, lr_scheduler, trainer)  # before anything is applied
        if sharded:
            try:
                optimizer._check_groups(man.param_groups)
            except ValueError as exc:  # as load_checkpoint's
                raise CheckpointError(f"{man.path}: {exc}", path=man.path,
                                      kind="optimizer_mismatch") from None
        elif len(man.param_groups) != len(groups):
            raise CheckpointError(f"{man.path}: {len(man.param_groups)} param groups, the "
                                  f"optimizer has {len(groups)}", path=man.path,
                                  kind="optimizer_mismatch")
        rng = load_rng(man, ctx.rank, held) if restore_rng and man.world_size == ctx.world_size \
            else None
    except Exception as exc:
        err = exc
    try:
        ctx.agree(err)
        if sharded:
            optimizer._begin_state_load()
        with refusing(man.path):  # DCP's errors, and the reader's refusals
            with quiet_single_process():
                dcp.load(sd, storage_reader=reader_of(man, md, held), planner=SafeLoadPlanner())
    finally:
        files.close()
    if not allow_nonfinite:  # this rank's shards as loaded (no copy), before the rest applies
        try:
            check_dcp_values(man.path, sd, [n for g in groups for n in g["params"]])
        except Exception as exc:
            err = exc
        ctx.agree(err)
    if sharded:
        optimizer._end_state_load(man.param_groups,
                                  int(man.raw["optimizer"].get("skipped_steps", 0)))
    else:
        for g, saved in zip(groups, man.param_groups):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                      if k != "step"})
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, optimizer, {**sd["optim"], "param_groups": groups})
    if lr_scheduler is not None and trainer.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if rng is not None:
        set_rng_state(rng)
    return {"step": man.step, "extra": trainer.get("extra"), "manifest": man}
