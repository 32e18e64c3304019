"""Where a worker's run starts and how it saves: the checkpoints a start may resume from,
loading one (any world size: the format reshards), and the save that goes with a report.
A ``zero1`` run saves the native format, an ``fsdp`` run and a ``zero1`` run with ``tp > 1``
DCP (``sharded_ams.checkpoint.dcp``); a checkpoint of the other format is refused with the
``ckpt convert`` command that fits.

The Ray calls are the lines marked ``# [Ray]``: ``ray.train.get_checkpoint()`` (the run's
latest registered checkpoint, after a failure, a resize or a relaunch) and
``ray.train.report(metrics, checkpoint=...)`` (a barrier; every rank's directory is uploaded
into one checkpoint folder of the run).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch.distributed as dist

import ray.train  # [Ray]

from launcher.run.resume_checks import (check_loaded_groups, check_same_run, check_same_strategy,
                                        checkpoint_format, saved_extra)
from launcher.train.step import log_progress
from sharded_ams.checkpoint import (DCP_FORMAT, CheckpointError, load_checkpoint, load_dcp,
                                    manifest_format, save_checkpoint, save_dcp, step_dir_name,
                                    validate_checkpoint)
from sharded_ams.checkpoint.manager import checkpoint_dirs

__all__ = ["resume", "save_and_report"]


def _load(path: str, optimizer, model, scheduler, layout) -> int:
    check_loaded_groups(path, optimizer.param_groups)  # a changed preset/lam/beta3: refused
    check_same_strategy(layout.strategy, path, layout.tp)
    dcp = manifest_format(path) == DCP_FORMAT
    if dcp:
        return int(load_dcp(path, model, optimizer, lr_scheduler=scheduler)["step"])
    return int(load_checkpoint(path, optimizer, model=model, lr_scheduler=scheduler)["step"])


def _resume_candidates(config: dict, run_dir: str, checkpoint) -> list[tuple[int, str, str]]:
    """``(step, path, source)`` of the checkpoints a start may resume from, newest first.

    Ray's latest registered checkpoint (``ray.train.get_checkpoint()``) can be older than
    the newest committed one in the run dir: a worker killed within one controller poll of
    reporting loses that report, checkpoint included (see launcher.train.loop.REPORT_SETTLE_S). So on a
    local/NFS run dir every committed checkpoint there is a candidate too (committed: a
    valid manifest, every file present with its size), and :func:`resume` tries them
    newest first; the driver's ``resume_from`` is used only when the run has none of its
    own."""
    found: dict[str, tuple[int, str, str]] = {}
    said: set[str] = set()

    def skip(path, exc: CheckpointError) -> None:  # each unusable checkpoint named once
        if str(path) not in said:
            said.add(str(path))
            log_progress(f"not resuming from {path}: {exc}")

    def add(path, source: str, step=None) -> None:
        path = str(path)
        if step is None:
            try:
                step = validate_checkpoint(path, checksums=False).step
            except CheckpointError as exc:
                skip(path, exc)
                return
        found.setdefault(path, (int(step), path, source))

    if checkpoint is not None:
        if "://" in checkpoint.path:  # an object store: downloaded when loaded
            found[checkpoint.path] = (-1, checkpoint.path, "ray")
        else:
            add(checkpoint.path, "ray")
    if "://" not in run_dir and os.path.isdir(run_dir):
        # every committed one, newest first: one whose contents fail to load (a checksum,
        # a NaN master) gives way to the next older one (this took the newest only, so a
        # flipped bit in it failed every restart and every rerun, older ones untried)
        seen_valid = False
        for path in checkpoint_dirs(run_dir):
            try:
                step = validate_checkpoint(path, checksums=False).step
            except CheckpointError as exc:
                if not seen_valid:  # an older broken one is never the resume point: quiet
                    skip(path, exc)
                continue
            seen_valid = True
            add(path, "scan", step)
    if not found and checkpoint is not None:  # never restart from scratch over a checkpoint
        raise CheckpointError(f"Ray Train's latest checkpoint {checkpoint.path} is not a valid "
                              f"checkpoint and the run dir holds no other")
    if not found and config.get("resume_from"):
        add(config["resume_from"], "config")
    return sorted(found.values(), key=lambda c: (c[0], c[2] == "ray"), reverse=True)


def resume(config: dict, run_dir: str, rank: int, world_size: int, optimizer, model, scheduler,
           layout, same_run: Optional[dict] = None):
    """Load the newest committed checkpoint (rank 0 picks, every rank loads; any world size:
    the format reshards); on a checkpoint that fails to load (checksums: the loader agrees
    the error over all ranks) fall back to the next. Returns ``(step, path)``; ``(0, None)``
    for a new run. ``same_run``: ``{"data": TrainingData.describe, "precision": resolved}``
    of this worker; the run's own checkpoints are checked against it first (the driver's
    check, again: a checkpoint on an object store, a direct call), ``job.resume_from`` not."""
    checkpoint = ray.train.get_checkpoint()  # [Ray] the latest registered one; None for a new run
    candidates: Any = None
    if rank == 0:
        try:
            candidates = _resume_candidates(config, run_dir, checkpoint)
        except CheckpointError as exc:
            candidates = str(exc)
    if world_size > 1:  # one choice for all ranks (and every rank learns of an error)
        box = [candidates]
        dist.broadcast_object_list(box, src=0)
        candidates = box[0]
    if isinstance(candidates, str):
        raise CheckpointError(candidates)
    def check(local: str, source: str) -> None:
        if same_run is None or source == "config":  # resume_from: a new run, which may change them
            return
        notes = check_same_run(saved_extra(local), data=config.get("data") or {},
                               data_describe=same_run["data"], precision=same_run["precision"],
                               path=local, model=config.get("model") or {})
        if rank == 0:
            for note in notes:
                log_progress(note)

    errors = []
    for _, path, source in candidates:
        try:
            if source == "ray" and "://" in path:
                with checkpoint.as_directory() as local:  # [Ray] a download
                    check(local, source)
                    return _load(local, optimizer, model, scheduler, layout), path
            check(path, source)
            return _load(path, optimizer, model, scheduler, layout), path
        except CheckpointError as exc:
            errors.append(f"{path}: {exc}")
            if rank == 0:
                log_progress(f"cannot resume from {path} ({exc}); trying the next newest checkpoint")
    if errors:  # never restart from scratch over checkpoints that exist
        raise CheckpointError("no checkpoint of the run could be loaded:\n" + "\n".join(errors))
    return 0, None


def save_and_report(metrics: dict, optimizer, model, scheduler, step: int, extra: dict,
                    layout) -> None:
    """Every rank writes its shard into its own temp dir (rank 0 also the manifest, which
    lists every rank's file); Ray uploads them all into the run's ``step-XXXXXXXX`` folder."""
    optimizer.finish_param_sync()  # the model's params must hold their gathered values
    with tempfile.TemporaryDirectory(prefix="sharded-ams-ckpt-") as tmp:
        if checkpoint_format(layout.strategy, layout.tp) == "dcp":  # sharded_ams.checkpoint.dcp
            save_dcp(tmp, model, optimizer, step=step, extra=extra, lr_scheduler=scheduler,
                     mesh=extra.get("mesh"), shared_fs=False)
        else:
            save_checkpoint(tmp, optimizer, model=model, step=step, extra=extra,
                            lr_scheduler=scheduler, shared_fs=False).wait()
        ray.train.report(  # [Ray] barrier; uploads tmp into the run's checkpoint folder
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),  # [Ray]
            checkpoint_dir_name=step_dir_name(step),
        )
