"""Run a training job with Ray Train: locally (an embedded Ray) or on a Ray cluster.

``run(config)`` starts an embedded single-machine Ray, or connects to a cluster
(``address="auto"``, ``"ray://head:10001"``, or ``RAY_ADDRESS``), and runs
:func:`launcher.train_fn.train_loop` on ``job.num_workers`` workers with a
``TorchTrainer`` (gloo on CPU; NCCL and one GPU per worker with ``job.use_gpu``).

Fault tolerance, in layers:

* a worker that dies is restarted with the whole worker group, from the run's latest
  committed checkpoint, up to ``job.max_failures`` times (Ray Train's ``FailureConfig``);
* launching the same run again (same ``job.name`` and ``job.storage_path``; e.g. after the
  driver died, or with a larger ``job.steps``) resumes it: Ray Train 2.60 (Train V2) finds
  ``checkpoint_manager_snapshot.json`` in ``storage_path/name`` and hands the latest
  checkpoint it lists to the workers (``ray.train.get_checkpoint()``). When there is no
  snapshot (written by an older Ray, deleted, or the checkpoints were copied in by hand)
  the driver scans the run directory with ``sharded_ams.checkpoint.find_latest_checkpoint``
  (committed = has a valid manifest) and passes that checkpoint to the workers instead;
* resuming on another number of workers reshards the optimizer state (the checkpoint
  format is world-size independent).

Per-step metrics: rank 0 appends every report to ``run_dir/.sharded_ams/metrics.jsonl``
(local or NFS run dirs); :func:`read_history` reads it into ``RunResult.history``.

Ray's own log lines are filtered on the driver so that progress lines stay readable
(``verbose=True`` shows everything).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from launcher.config import Config, is_uri

__all__ = ["run", "RunResult", "TrainingFailed", "ResumePoint", "find_resume_point", "read_history"]

TAG = "[sharded-ams]"  # same as launcher.train_fn.PROGRESS_TAG (not imported: it imports ray)
HISTORY_FILE = ".sharded_ams/metrics.jsonl"  # train_fn's STATE_DIR/METRICS_FILE
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

# Ray lines that say nothing a user of this launcher needs; hidden unless verbose.
_NOISE = re.compile("|".join(re.escape(s) for s in (
    "Failed to query Ray Train Controller actor state",      # no dashboard -> no state API
    "has constructor arguments in the object store",
    "Reporting training result",
    "Checkpoint successfully created at",
    "Requesting resources:",
    "Attempting to start training worker group",
    "Setting up process group for",
    "A run snapshot was found in storage folder",            # we print our own resume line
    "This snapshot contains a list of checkpoints",
    "If you meant to start a brand new training job",
    "Ray deduplicates logs by default",
    "- (ip=",                                                 # per-worker placement lines
    # a worker failure: Ray prints the same error 2-3 times with every traceback frame and
    # actor detail; the short form (policy, error count, exception lines) stays visible
    "Traceback (most recent call last)",
    "Worker info: Worker(",
    "Error Snippet]:",
    "Graceful shutdown of backend failed",
    "The actor died unexpectedly before finishing this task",
    "ray.exceptions.ActorDiedError",
    "ray.train.WorkerGroupError: Training failed due to worker errors",
)) + r"|committed checkpoint \S*sharded-ams-ckpt-"  # a rank's temp dir, before Ray's upload
   + r"|^\s*[)^~]*\s*$")                               # traceback carets, closing brackets
_KEEP_INDENTED = re.compile(r"^\s+(Source:|Error count:)")
_CUT = " Some common causes include"  # Ray's long OOM/SIGSEGV advice after "actor is dead"


def _filter_line(line: str) -> Optional[str]:
    """The line to show in place of one of Ray's (None: hide it)."""
    if _NOISE.search(line):
        return None
    if line[:1] in (" ", "\t") and not _KEEP_INDENTED.match(line):
        return None  # traceback frames, dumped object fields
    if _CUT in line:
        line = line[: line.index(_CUT)]
    return line


def _say(msg: str) -> None:
    print(f"{TAG} {msg}", flush=True)


class TrainingFailed(RuntimeError):
    """The run failed for good (worker errors beyond ``job.max_failures``, or a controller
    error). ``checkpoint`` is the run's last committed checkpoint (a rerun resumes there)."""

    def __init__(self, message: str, *, checkpoint: Optional[str] = None,
                 cause: Optional[BaseException] = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.cause = cause


@dataclass
class ResumePoint:
    """Where a launch starts: ``source`` is "ray" (the run's Ray snapshot), "scan" (a
    committed checkpoint found in the run dir), "config" (job.resume_from) or None (fresh)."""

    source: Optional[str] = None
    path: Optional[str] = None
    step: Optional[int] = None


@dataclass
class RunResult:
    """What one ``run()`` did. ``ray_result`` is Ray Train's ``Result``.

    ``history``: the run's metrics reports, one dict per reported step in step order (see
    :func:`read_history`; empty where the run dir is on an object store)."""

    name: str
    run_dir: str
    start_step: int
    step: int
    steps: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    restarts: int
    wall_time_s: float
    checkpoint: Optional[str]
    num_workers: int
    use_gpu: bool
    resumed_from: ResumePoint = field(default_factory=ResumePoint)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    ray_result: Any = None

    def summary(self) -> str:
        def f(x: Optional[float]) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        trained = (f"this launch trained steps {self.start_step} -> {self.step}" if self.step > self.start_step
                   else "nothing left to train: raise job.steps (--steps) to train further")
        lines = [
            f"run {self.name!r} finished",
            f"  steps       {self.step}/{self.steps} ({trained})",
            f"  train loss  {f(self.train_loss)}",
            f"  val loss    {f(self.val_loss)}",
            f"  wall time   {self.wall_time_s:.1f} s",
            f"  restarts    {self.restarts} (worker-group restarts from the last checkpoint)",
            f"  workers     {self.num_workers} x {'GPU (nccl)' if self.use_gpu else 'CPU (gloo)'}",
            f"  checkpoint  {self.checkpoint or 'none'}",
        ]
        return "\n".join(f"{TAG} {ln}" for ln in lines)


# ----------------------------------------------------------------------------- Ray session


def _prepare_env(address: Optional[str]) -> None:
    """Environment Ray reads at import/init time (and Ray Train at each ``fit()``)."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Ray 2.60 turns on token auth by default; an embedded single-user cluster needs none.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray Train's controller collects the workers' ray.train.report()s when it polls
        # them, every 2 s by default, and a worker's next report waits for that poll (a
        # queue of one): each report then costs up to 2 s (300 steps of the tiny GPT with
        # log_every=10 on 2 CPU workers: 79 s instead of 25 s at 0.25 s). Poll faster in a
        # local Ray only; a cluster keeps Ray's default unless the user sets it. Ray Train
        # copies this variable from the driver's environment into the controller actor at
        # each fit() (ENV_VARS_TO_PROPAGATE), so it also applies to a local Ray started
        # before run() (e.g. by the examples).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # A local Ray's workers inherit this environment: what the driver imports (model and
        # data factories from the current directory or sys.path) they import too.
        paths = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # this launcher uses the Train V2 API


@contextmanager
def _ray_session(address: Optional[str], cfg: Config, verbose: bool) -> Iterator[bool]:
    """Start (no address) or connect to Ray, with Ray's log lines filtered on this driver
    (see :func:`_quiet_ray_logs`); yields whether this call started Ray."""
    _prepare_env(address)
    import ray

    if ray.is_initialized():  # e.g. a test or notebook that already started Ray
        with _quiet_ray_logs(enabled=not verbose):
            yield False
        return
    log_level = logging.INFO if verbose else logging.WARNING
    if address is None and not os.environ.get("RAY_ADDRESS"):
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(2, cfg.job.num_workers), include_dashboard=False,
                 logging_level=log_level, runtime_env=cfg.job.runtime_env() or None)
        _say(f"started a local Ray ({max(2, cfg.job.num_workers)} CPUs) in {time.perf_counter() - t0:.1f} s")
    else:
        target = address or os.environ["RAY_ADDRESS"]
        ray.init(address=target, logging_level=log_level, runtime_env=cfg.job.runtime_env() or None)
        _say(f"connected to the Ray cluster at {target}")
    with ExitStack() as stack:
        # entered first, so exited last: the filter stays on while Ray shuts down
        stack.enter_context(_quiet_ray_logs(enabled=not verbose))
        stack.callback(ray.shutdown)
        yield True


@contextmanager
def _quiet_ray_logs(enabled: bool) -> Iterator[None]:
    """Hide Ray's routine log lines and show progress lines without Ray's prefix.

    Hooks the driver's worker-log dispatcher (a private Ray API): if it is not there, all
    lines are shown as Ray prints them.
    """
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        original = dict(dispatcher.handlers).get("ray_print_logs")
    except Exception:  # private API moved: leave Ray's printing alone
        original = None
    if original is None:  # or log_to_driver=False: nothing is printed anyway
        yield
        return
    seen: dict[str, float] = {}  # line -> when last shown

    def fresh(text: str) -> bool:
        # Ray repeats a failure's error text (and a line may come both from stdout and
        # from Ray's logger); show each line once per 30 s.
        now = time.monotonic()
        if now - seen.get(text, -1e9) < 30.0:
            return False
        seen[text] = now
        if len(seen) > 512:
            for k in sorted(seen, key=seen.get)[:256]:
                del seen[k]
        return True

    def handler(data: dict) -> None:
        keep = []
        for line in data.get("lines", []):
            if TAG in line:
                text = line[line.index(TAG):]
                if fresh(text):
                    print(text, file=sys.stdout, flush=True)
            elif not enabled:
                keep.append(line)
            else:
                shown = _filter_line(line)
                if shown is not None and fresh(shown):
                    keep.append(shown)
        if keep:
            original({**data, "lines": keep})

    try:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", handler)
    except Exception:
        yield
        return
    try:
        yield
    finally:
        # Put Ray's printer back, unless ray.shutdown() already removed ours (then a later
        # ray.init adds its own: adding it here too would print every line twice).
        try:
            if any(h is handler for _, h in dispatcher.handlers):
                dispatcher.remove_handler("ray_print_logs")
                dispatcher.add_handler("ray_print_logs", original)
        except Exception:
            pass


# ----------------------------------------------------------------------------- resume


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
    from launcher.train_fn import _exists

    if not _exists(snapshot):
        return ResumePoint()
    from ray.train import Result

    try:
        with _ray_train_logs_at(logging.WARNING):
            result = Result.from_path(run_dir)
    except Exception as exc:  # corrupt snapshot or deleted checkpoints
        raise TrainingFailed(
            f"cannot resume run dir {run_dir}: Ray Train's {RAY_SNAPSHOT} there is unusable "
            f"({type(exc).__name__}: {exc}). Move or delete that file to resume from the newest "
            "committed checkpoint in the directory, or pick a new job.name.", cause=exc) from exc
    if result.checkpoint is None:
        return ResumePoint()
    step = (result.metrics or {}).get("step")
    return ResumePoint("ray", result.checkpoint.path, int(step) if step is not None else None)


def find_resume_point(cfg: Config) -> ResumePoint:
    """Where a launch of ``cfg`` will start (see the module docstring for the order)."""
    run_dir = cfg.job.run_dir
    point = _ray_latest(run_dir)
    if point.source:
        return point
    if not is_uri(run_dir) and Path(run_dir).is_dir():
        from sharded_ams.checkpoint import find_latest_checkpoint, validate_checkpoint

        # sizes only (every file present, none truncated): the workers verify checksums on load
        latest = find_latest_checkpoint(run_dir, checksums=False)
        if latest is not None:
            return ResumePoint("scan", str(latest), validate_checkpoint(latest, checksums=False).step)
    if cfg.job.resume_from:
        step = None
        if not is_uri(cfg.job.resume_from):
            from sharded_ams.checkpoint import validate_checkpoint

            step = validate_checkpoint(cfg.job.resume_from, checksums=False).step
        return ResumePoint("config", cfg.job.resume_from, step)
    return ResumePoint()


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
        raise TrainingFailed(
            f"{point.path} holds a different model ({'; '.join(diff)}). Use a new job.name "
            "(--name) for a new model, or restore these settings to resume this run.")


def _count_attempts(run_dir: str, launch_id: str) -> int:
    path = f"{run_dir}/.sharded_ams/attempts"
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, p = pyarrow.fs.FileSystem.from_uri(path)
            names = [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(p, allow_not_found=True))]
        else:
            names = os.listdir(path)
    except OSError:
        return 0
    return sum(1 for n in names if n.startswith(launch_id + "-") and n.endswith(".json"))


def read_history(run_dir: str) -> list[dict]:
    """The run's per-step metrics, from ``run_dir/.sharded_ams/metrics.jsonl`` (rank 0's
    reports, appended by ``launcher.train_fn``), one dict per step in step order.

    A restarted worker group (or a relaunch) resumes from a checkpoint at ``start_step``
    and reports the steps after it again: its records replace every earlier record of a
    step after ``start_step`` (so a re-trained step keeps only its last record, and steps
    the abandoned attempt reported past the checkpoint do not linger). Lines that are not
    JSON objects with an integer ``step`` (one cut short by a crash) are skipped. [] if
    there is no history (a new run, or an object-store run dir: those cannot append).
    """
    path = f"{run_dir.rstrip('/')}/{HISTORY_FILE}"
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, p = pyarrow.fs.FileSystem.from_uri(path)
            if fs.get_file_info(p).type == pyarrow.fs.FileType.NotFound:
                return []
            with fs.open_input_stream(p) as f:
                text = f.read().decode(errors="replace")
        else:
            with open(path, errors="replace") as f:
                text = f.read()
    except FileNotFoundError:
        return []
    by_step: dict[int, dict] = {}
    attempt = None
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or type(rec.get("step")) is not int:
            continue
        if rec.get("attempt") != attempt:  # a new start of the worker group
            attempt = rec.get("attempt")
            start = rec.get("start_step")
            if isinstance(start, int):
                by_step = {s: r for s, r in by_step.items() if s <= start}
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _short_error(exc: BaseException, verbose: bool = False) -> str:
    """Ray's (long) error text without traceback frames and object dumps."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if verbose:
        return "\n".join(lines)
    keep = [ln for ln in (_filter_line(ln) for ln in lines) if ln is not None]
    return "\n".join("  " + ln for ln in (keep or lines)[:12])


# ----------------------------------------------------------------------------- run


def run(config: Config, address: Optional[str] = None, *, verbose: bool = False,
        checked: bool = False) -> RunResult:
    """Run (or resume) the job described by ``config``; see the module docstring.

    Args:
        config: a validated :class:`launcher.config.Config` (``load_config``). Its data and
            model are checked on this driver before Ray starts (:mod:`launcher.preflight`;
            ValueError names the key or file at fault) unless ``checked``.
        address: None: an embedded local Ray (or ``RAY_ADDRESS`` if set, as inside
            ``ray job submit``); ``"auto"`` / ``"host:6379"`` / ``"ray://host:10001"``: a cluster.
        verbose: show all of Ray's log lines.

    Returns a :class:`RunResult` and prints a summary. Raises :class:`TrainingFailed` if
    the run failed beyond ``job.max_failures`` (its ``checkpoint`` says where a rerun resumes).
    """
    t_start = time.perf_counter()
    if not checked:
        from launcher.preflight import preflight

        config = preflight(config).config
    job = config.job
    run_dir = job.run_dir
    if not is_uri(job.storage_path):
        os.makedirs(job.storage_path, exist_ok=True)

    _prepare_env(address)
    resume = find_resume_point(config)
    _check_same_model(config, resume)
    if resume.source == "ray":
        _say(f"resuming run {job.name!r} from its checkpoint at step {resume.step}: {resume.path}")
    elif resume.source == "scan":
        _say(f"resuming run {job.name!r} from the newest committed checkpoint in {run_dir} "
             f"(no Ray run snapshot there): step {resume.step}: {resume.path}")
    elif resume.source == "config":
        _say(f"starting run {job.name!r} from job.resume_from (step {resume.step}): {resume.path}")
    else:
        _say(f"starting new run {job.name!r} in {run_dir}")
    if job.fail_at_step is not None:
        _say(f"fault injection: rank {job.fail_rank} will exit after step {job.fail_at_step} "
             f"(once per run), max_failures={job.max_failures}")

    with _ray_session(address, config, verbose) as started:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from launcher.train_fn import train_loop

        if job.use_gpu:
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < job.num_workers:
                msg = (f"job.use_gpu with {job.num_workers} workers needs {job.num_workers} GPUs; "
                       f"the Ray cluster has {gpus:g}")
                if started and address is None:
                    raise TrainingFailed(msg)
                _say(f"warning: {msg} now (waiting for more nodes to join)")

        launch_id = uuid.uuid4().hex[:12]
        loop_config = config.to_dict()
        loop_config.update(run_dir=run_dir, launch_id=launch_id,
                           resume_from=resume.path if resume.source in ("scan", "config") else None)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu),
            run_config=RunConfig(
                name=job.name,
                storage_path=job.storage_path,
                failure_config=FailureConfig(max_failures=job.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=job.keep_last),
            ),
        )
        _say(f"training {job.steps} steps on {job.num_workers} {'GPU' if job.use_gpu else 'CPU'} worker(s); "
             f"checkpoints every {job.checkpoint_every} steps in {run_dir}")
        from ray.train.v2.api.exceptions import TrainingFailedError

        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            restarts = max(0, _count_attempts(run_dir, launch_id) - 1)
            try:
                last = find_resume_point(config)  # where a rerun of this command would start
            except Exception:  # noqa: BLE001 - only for the message
                last = ResumePoint()
            where = (f"the last committed checkpoint is step {last.step}: {last.path}; rerun the "
                     "same command to resume from it" if last.path else
                     "no checkpoint was committed; a rerun starts from scratch")
            raise TrainingFailed(
                f"run {job.name!r} failed after {restarts} restart(s) "
                f"(job.max_failures={job.max_failures}):\n{_short_error(exc, verbose)}\n{where}",
                checkpoint=last.path, cause=exc) from exc

    rv = result.return_value or {}
    metrics = dict(result.metrics or {})
    out = RunResult(
        name=job.name,
        run_dir=run_dir,
        start_step=int(rv.get("start_step", metrics.get("start_step", 0))),
        step=int(rv.get("step", metrics.get("step", 0))),
        steps=job.steps,
        train_loss=rv.get("train_loss") if rv.get("train_loss") is not None else metrics.get("loss"),
        val_loss=rv.get("val_loss") if rv.get("val_loss") is not None else metrics.get("val_loss"),
        restarts=max(0, _count_attempts(run_dir, launch_id) - 1),
        wall_time_s=time.perf_counter() - t_start,
        checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
        num_workers=job.num_workers,
        use_gpu=job.use_gpu,
        resumed_from=resume,
        metrics=metrics,
        history=read_history(run_dir),
        ray_result=result,
    )
    print(out.summary(), flush=True)
    return out
