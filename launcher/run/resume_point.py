"""Where a launch starts, decided on the driver before Ray starts: the run's Ray Train
snapshot, the newest committed checkpoint in its directory, or ``job.resume_from``
(:func:`find_resume_point`); and what must hold for it (:func:`check_resume`: the same
model, optimizer, strategy, data and precision, each refusal naming both values). The
workers make the same choice again (``launcher.train.resume``)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from launcher.config import Config, is_uri
from launcher.run.console import TAG, say
from launcher.run.preflight import LaunchError
from launcher.run.records import exists

__all__ = ["ResumePoint", "find_resume_point", "check_resume", "RAY_SNAPSHOT"]

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class ResumePoint:
    """Where a launch starts: ``source`` is "ray" (the run's Ray snapshot), "scan" (a
    committed checkpoint found in the run dir), "config" (job.resume_from) or None (fresh)."""

    source: Optional[str] = None
    path: Optional[str] = None
    step: Optional[int] = None


@contextmanager
def _ray_train_logs_at(level: int) -> Iterator[None]:
    lg = logging.getLogger("ray.train")
    old = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(old)


def _ray_latest(run_dir: str) -> ResumePoint:
    """The latest checkpoint in the run's Ray Train snapshot, if any."""
    snapshot = f"{run_dir}/{RAY_SNAPSHOT}"
    if not exists(snapshot):
        return ResumePoint()
    from ray.train import Result

    try:
        with _ray_train_logs_at(logging.WARNING):
            result = Result.from_path(run_dir)
    except Exception as exc:  # corrupt snapshot or deleted checkpoints
        raise LaunchError(
            f"cannot resume run dir {run_dir}: Ray Train's {RAY_SNAPSHOT} there is unusable "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Move or delete "
            "that file to resume from the newest committed checkpoint in the directory, or pick a "
            "new job.name.") from exc
    if result.checkpoint is None:
        return ResumePoint()
    step = (result.metrics or {}).get("step")
    return ResumePoint("ray", result.checkpoint.path, int(step) if step is not None else None)


def find_resume_point(cfg: Config, say: Optional[Callable[[str], None]] = None) -> ResumePoint:
    """Where a launch of ``cfg`` starts: the newest of the run's Ray snapshot's latest
    checkpoint and the newest committed checkpoint in the run dir (Ray's wins a tie); else
    ``job.resume_from``; else nothing (a new run). On local storage a checkpoint with a
    missing or truncated file is passed over, each named once through ``say``, as the
    workers pass it over (``launcher.train.resume``). Raises :class:`LaunchError` for an
    unusable snapshot or ``resume_from``, or a run whose Ray-registered checkpoint is
    unusable with no other to resume from."""
    from sharded_ams.checkpoint import CheckpointError, find_latest_checkpoint, validate_checkpoint

    run_dir = cfg.job.run_dir
    point = _ray_latest(run_dir)
    said: set[str] = set()
    ray_bad: Optional[str] = None

    def skip(path, exc: Exception) -> None:
        if str(path) not in said and say is not None:
            say(f"not resuming from {path}: {str(exc).splitlines()[0]}")
        said.add(str(path))

    if not is_uri(run_dir) and Path(run_dir).is_dir():
        if point.path and not is_uri(point.path):
            try:  # sizes only (every file present, none truncated), as the scan below
                validate_checkpoint(point.path, checksums=False)
            except CheckpointError as exc:
                skip(point.path, exc)
                ray_bad = f"{point.path}: {str(exc).splitlines()[0]}"
                point = ResumePoint()
        # the workers verify checksums on load
        latest = find_latest_checkpoint(run_dir, checksums=False, on_skip=skip)
        if latest is not None:
            step = validate_checkpoint(latest, checksums=False).step
            if point.source is None or (point.step is not None and step > point.step):
                point = ResumePoint("scan", str(latest), step)
    # Ray registers a checkpoint once its upload finished: broken now, it was damaged after,
    # and the workers would not start over on top of it. (A directory the scan passes over
    # may be a save that never finished, rank files missing: a run killed in its first save
    # starts over.)
    if point.source is None and ray_bad:
        raise LaunchError(f"run {cfg.job.name!r}: Ray Train's latest checkpoint is unusable "
                          f"({ray_bad}) and {run_dir} holds no other; move the run directory "
                          "away to start over, or pick a new job.name")
    if point.source or not cfg.job.resume_from:
        return point
    step = None
    if not is_uri(cfg.job.resume_from):
        try:
            step = validate_checkpoint(cfg.job.resume_from, checksums=False).step
        except (CheckpointError, OSError) as exc:
            newest = (find_latest_checkpoint(cfg.job.resume_from, checksums=False,
                                             on_skip=lambda *_: None)
                      if Path(cfg.job.resume_from).is_dir() else None)
            if newest is not None:  # a run directory: its checkpoints are what it holds
                raise LaunchError(f"job.resume_from {cfg.job.resume_from} is a run directory, "
                                  f"not a checkpoint: name one of its checkpoints, e.g. its "
                                  f"newest, {newest}") from None
            raise LaunchError(f"job.resume_from {cfg.job.resume_from} is not a usable checkpoint: "
                              f"{str(exc).splitlines()[0]}") from exc
    return ResumePoint("config", cfg.job.resume_from, step)


def check_resume(cfg: Config) -> ResumePoint:
    """The launch's resume point (:func:`find_resume_point`), its model checked against the
    config, and for the run's own checkpoint its data, seed, precision and factory inputs
    (:func:`launcher.run.resume_checks.check_same_run`; ``job.resume_from`` starts a new
    run, which may change them); :class:`LaunchError` if it cannot be used."""
    point = find_resume_point(cfg, say=say)
    _check_same_model(cfg, point)
    if point.path and not is_uri(point.path):  # a changed preset/lam/beta3 refused; lr: says who wins
        import sys

        from launcher.run.resume_checks import check_same_optimizer, check_same_strategy

        try:
            check_same_strategy(cfg.parallel.strategy, point.path, cfg.parallel.tp)
            notes = check_same_optimizer(cfg.optim, point.path)
            if point.source in ("ray", "scan"):  # the run's own checkpoint: data, precision, model
                notes += _check_same_run(cfg, point.path)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        for note in notes:
            print(f"{TAG} {note}", file=sys.stderr, flush=True)
    return point


def _check_same_run(cfg: Config, path: str) -> list[str]:
    """:func:`launcher.run.resume_checks.check_same_run` for a launch of ``cfg``: the
    precision "auto" resolved as the workers will (bf16 on GPU workers, fp32 on CPU)."""
    from launcher.run.resume_checks import check_same_run, describe_config_data, saved_extra

    extra = saved_extra(path)
    if extra is None:
        return []
    asked = cfg.model.precision
    precision = asked if asked != "auto" else ("bf16" if cfg.job.use_gpu else "fp32")
    how = "" if asked != "auto" else f" (\"auto\" on {'GPU' if cfg.job.use_gpu else 'CPU'} workers)"
    return check_same_run(extra, data=cfg.data, data_describe=describe_config_data(cfg.data),
                          precision=precision, path=path, precision_how=how, model=cfg.model)


def _check_same_model(cfg: Config, point: ResumePoint) -> None:
    """Refuse to resume a checkpoint of a differently shaped model before any worker starts
    (inside the workers the load would fail on every restart, up to job.max_failures)."""
    if not point.path or is_uri(point.path):
        return
    from sharded_ams.checkpoint import TRAINER_NAME

    trainer = Path(point.path) / TRAINER_NAME
    if not trainer.is_file():
        return
    import torch

    try:
        extra = torch.load(trainer, map_location="cpu", weights_only=True).get("extra") or {}
    except Exception:  # unreadable: the workers' load reports it properly
        return
    saved = extra.get("model") if isinstance(extra, dict) else None
    if not isinstance(saved, dict):
        return
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}"
            for k, v in cfg.model.shape().items() if k in saved and saved[k] != v]
    if diff:
        way = ("job.resume_from (--resume-from) starts a run from a checkpoint of the same "
               "model: name one of this model, or start from scratch without it."
               if point.source == "config" else
               "Use a new job.name (--name) for a new model, or restore these settings to "
               "resume this run.")
        raise LaunchError(f"{point.path} holds a different model ({'; '.join(diff)}). {way}")
