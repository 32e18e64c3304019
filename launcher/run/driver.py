"""Run a training job with Ray Train: locally (an embedded Ray) or on a Ray cluster.

``run(config)`` starts an embedded single-machine Ray, or connects to a cluster
(``address="auto"``, ``"ray://head:10001"``, or ``RAY_ADDRESS``), and runs
:func:`launcher.train.loop.train_loop` on ``job.num_workers`` workers with a
``TorchTrainer`` (gloo on CPU; NCCL and one GPU per worker with ``job.use_gpu``).
``job.num_workers`` is a fixed size or an elastic range ``[min, max]`` (Ray Train's
elastic ``ScalingConfig``): the group starts on as many workers as the cluster has room
for (at least min), shrinks when a node is lost, and grows back at the next resize check
(``job.resize_interval_s``) after nodes join.

Fault tolerance, in layers (docs/fault-tolerance.md):

* a worker that dies (or a node that is lost) restarts the whole worker group, from the
  run's newest committed checkpoint, resharded to the new size, up to
  ``job.max_failures`` times (Ray Train's ``FailureConfig``; resizes do not count);
* launching the same run again (same ``job.name`` and ``job.storage_path``; e.g. after the
  driver died, or with a larger ``job.steps``) resumes it: Ray Train 2.60 (Train V2) finds
  ``checkpoint_manager_snapshot.json`` in ``storage_path/name`` and hands the latest
  checkpoint it lists to the workers (``ray.train.get_checkpoint()``);
* the workers resume from the newest of that checkpoint and the newest committed one in
  the run directory (``sharded_ams.checkpoint.find_latest_checkpoint``: Ray's can lag
  behind, and may be missing: deleted snapshot, checkpoints copied in by hand), else from
  ``job.resume_from`` (see :func:`launcher.run.resume_point.find_resume_point`, and
  ``launcher.train.loop``).

A second launch of a run that is training is refused (:mod:`launcher.run.run_lock`).

Before Ray starts, the driver checks what it can (:mod:`launcher.run.preflight`; the resume
point and its model, :mod:`launcher.run.resume_point`): errors raise :class:`LaunchError` (exit status 2 in the CLI).

Records: rank 0 appends every report and one event per start of the worker group to
``run_dir/.sharded_ams/metrics.jsonl`` (:mod:`launcher.run.records`), read back into
``RunResult.history``, ``RunResult.size_history`` (which steps ran on how many workers)
and ``RunResult.restart_events`` (each restart's cost and steps lost).

Ray's own console output is filtered on the driver (:mod:`launcher.run.console`;
``verbose=True`` shows everything).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from launcher.config import Config, is_uri
from launcher.run.preflight import LaunchError, check_ray_address
from launcher.run.console import TAG, quiet_ray_logs, say, short_error
from launcher.run.interrupt import (ABORT_WAIT_S, NOT_STARTED_WAIT_S, RunInterrupted,
                                    own_ctrl_c, sigterm_as_interrupt, stop)
from launcher.run.records import (HISTORY_FILE, STATE_DIR, describe_start, exists,  # noqa: F401
                              format_sizes, read_events, read_history, size_history)
from launcher.run.resume_point import (RAY_SNAPSHOT, ResumePoint, check_resume,  # noqa: F401
                                       find_resume_point)
from launcher.run import ray_orphans
from launcher.run.run_lock import run_lock
from launcher.run.scaling import oversubscription_warning

__all__ = ["run", "RunResult", "TrainingFailed", "RunInterrupted", "LaunchError", "ResumePoint",
           "find_resume_point", "check_resume", "read_history"]

# Elastic runs: how long Ray Train waits to place a worker group before it decides the size
# again (Ray's default is 60 s). After a node is lost, Ray's view of the cluster lags (the
# GCS marks the node dead after missed heartbeats; the elastic policy's resource view
# refreshes every ~20 s), so the first restart may ask for workers on the dead node: with
# 60 s it waits that long, here 10 s, then retries with the nodes left. Unlimited retries
# (a controller error, not a worker failure). The environment variable wins if set.
ELASTIC_START_TIMEOUT_S = "10"
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"




class TrainingFailed(RuntimeError):
    """The run failed for good (worker errors beyond ``job.max_failures``, or a controller
    error). ``checkpoint`` is the run's last committed checkpoint (a rerun resumes there)."""

    def __init__(self, message: str, *, checkpoint: Optional[str] = None,
                 cause: Optional[BaseException] = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.cause = cause


@dataclass
class RunResult:
    """What one ``run()`` did. ``ray_result`` is Ray Train's ``Result``.

    ``history``: the run's metrics reports, one dict per reported step in step order.
    ``size_history``: ``(first_step, last_step, workers)`` spans of the whole run.
    ``restart_events``: this launch's start events that followed a failure, a resize or a
    relaunch (``restart_s``: seconds from the failure to the first trained step after it;
    ``steps_lost``; ``previous_world_size``, ``world_size``; see :mod:`launcher.run.records`).
    All three are empty where the run dir is on an object store.
    ``restarts``: worker-group starts in this launch beyond the first (failures and resizes).
    """

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
    num_workers: Any
    use_gpu: bool
    resumed_from: ResumePoint = field(default_factory=ResumePoint)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    size_history: list = field(default_factory=list)
    restart_events: list = field(default_factory=list)
    ray_result: Any = None

    def summary(self) -> str:
        def f(x: Optional[float]) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        first = self.resumed_from.step or 0  # this launch's start (start_step: its last group's)
        trained = (f"this launch trained steps {first} -> {self.step}" if self.step > first
                   else "nothing left to train: raise job.steps (--steps) to train further")
        asked = (f"{self.num_workers[0]}-{self.num_workers[1]}" if isinstance(self.num_workers, (list, tuple))
                 else str(self.num_workers))
        lines = [
            f"run {self.name!r} finished",
            f"  steps       {self.step}/{self.steps} ({trained})",
            f"  train loss  {f(self.train_loss)}",
            f"  val loss    {f(self.val_loss)}",
            f"  wall time   {self.wall_time_s:.1f} s",
            f"  workers     {asked} x {'GPU (nccl)' if self.use_gpu else 'CPU (gloo)'}"
            + (f": {format_sizes(self.size_history)}" if self.size_history else ""),
            f"  restarts    {self.restarts} in this launch (failures and resizes restart the "
            "worker group from the last checkpoint)",
            *(f"    {describe_start(ev)}" for ev in self.restart_events),
            f"  checkpoint  {self.checkpoint or 'none'}",
        ]
        skipped = self.metrics.get("skipped_steps") or 0
        if skipped:  # the run's, not only this launch's (the count is checkpointed)
            lines.insert(4, f"  skipped     {skipped} step(s) of the run: a gradient was NaN/inf "
                            "on some rank, so the params did not move (a diverged run?)")
        return "\n".join(f"{TAG} {ln}" for ln in lines)


# ----------------------------------------------------------------------------- Ray session


def _is_local(address: Optional[str]) -> bool:
    return address is None and not os.environ.get("RAY_ADDRESS")


def _prepare_env(address: Optional[str]) -> None:
    """Environment Ray reads at import/init time (and Ray Train at each ``fit()``)."""
    if _is_local(address):
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
        # Each worker-group start also starts a PreemptionWatcher actor (a process that
        # imports Ray Train: ~3.5 s of CPU here) polling for cloud preemption notices,
        # which a Ray embedded on this machine never gets; Ray Train copies the switch to
        # the controller like the interval above.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # A local Ray's workers inherit this environment: what the driver imports (model and
        # data factories from the current directory or sys.path) they import too.
        paths = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # this launcher uses the Train V2 API


@contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (unless already set; None: nothing)."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def _ray_session(address: Optional[str], cfg: Config, verbose: bool) -> Iterator[bool]:
    """Start (no address) or connect to Ray, with Ray's log lines filtered on this driver
    (see :mod:`launcher.run.console`); yields whether this call started Ray."""
    _prepare_env(address)
    import ray

    if ray.is_initialized():  # e.g. a test or notebook that already started Ray
        with quiet_ray_logs(enabled=not verbose):
            yield False
        return
    log_level = logging.INFO if verbose else logging.WARNING
    if _is_local(address):
        t0 = time.perf_counter()
        cpus = max(2, cfg.job.max_workers)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=log_level, runtime_env=cfg.job.runtime_env() or None)
        say(f"started a local Ray ({cpus} CPUs) in {time.perf_counter() - t0:.1f} s")
    else:
        target = address or os.environ["RAY_ADDRESS"]
        check_ray_address(target)
        try:
            ray.init(address=target, logging_level=log_level,
                     runtime_env=cfg.job.runtime_env() or None)
        except ConnectionError as exc:  # "auto" with no cluster on this machine, and the like
            raise LaunchError(f"--address {target}: {exc}") from None
        say(f"connected to the Ray cluster at {target}")
    with ExitStack() as stack:
        # entered first, so exited last: the filter stays on while Ray shuts down
        stack.enter_context(quiet_ray_logs(enabled=not verbose))
        stack.callback(_shutdown, _is_local(address))
        yield True


def _shutdown(started_here: bool) -> None:
    """``ray.shutdown()``, and what of an embedded Ray hung in its own exit killed
    (:mod:`launcher.run.ray_orphans`)."""
    killed = ray_orphans.shutdown(started_here)
    if killed:
        say(f"killed {len(killed)} process(es) of the local Ray that hung in their exit after "
            f"its shutdown (pids {', '.join(map(str, killed))}; a Ray 2.60 exit deadlock)")


def _check_cluster_resources(cfg: Config, started_locally: bool) -> None:
    """Warn (or, for an embedded Ray without the GPUs, fail) when the workers do not fit
    the resources Ray sees."""
    import ray

    job = cfg.job
    resources = ray.cluster_resources()
    kind = "GPU" if job.use_gpu else "CPU"
    have = resources.get(kind, 0)
    if started_locally and job.use_gpu and have < job.min_workers:
        raise LaunchError(f"job.use_gpu with {job.min_workers} workers needs {job.min_workers} GPUs; "
                          f"this machine has {have:g}")
    if not started_locally or job.use_gpu:  # an embedded CPU Ray: checked against the cores by preflight
        msg = oversubscription_warning(job.num_workers, have, kind, local=False)
        if msg:
            say(msg)


def _scaling_config(job):
    """Ray Train's ScalingConfig: a fixed size, or an elastic (min, max) range."""
    from ray.train import ScalingConfig

    if job.elastic:
        return ScalingConfig(num_workers=(job.min_workers, job.max_workers), use_gpu=job.use_gpu,
                             elastic_resize_monitor_interval_s=job.resize_interval_s)
    return ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu)


def _count_attempts(run_dir: str, launch_id: str) -> int:
    path = f"{run_dir}/{STATE_DIR}/attempts"
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


# ----------------------------------------------------------------------------- run


def run(config: Config, address: Optional[str] = None, *, verbose: bool = False,
        checked: bool = False, resume: Optional[ResumePoint] = None) -> RunResult:
    """Run (or resume) the job described by ``config``; see the module docstring.

    Args:
        config: a validated :class:`launcher.config.Config` (``load_config``). It is checked
            on this driver before Ray starts (:func:`launcher.run.preflight.preflight`: data,
            model, storage, resources) unless ``checked`` (the caller did it).
        address: None: an embedded local Ray (or ``RAY_ADDRESS`` if set, as inside
            ``ray job submit``); ``"auto"`` / ``"host:6379"`` / ``"ray://host:10001"``: a cluster.
        verbose: show all of Ray's log lines.
        resume: with ``checked``, the caller's :func:`check_resume` of this config (its
            notes said once); else it is found here.

    Returns a :class:`RunResult` and prints a summary. Raises :class:`LaunchError` (a
    ValueError) for what is wrong before training starts (bad data, storage, resume point),
    :class:`TrainingFailed` if the run failed beyond ``job.max_failures``, and
    :class:`RunInterrupted` (a KeyboardInterrupt) after a Ctrl-C or SIGTERM stopped the
    workers; the ``checkpoint`` of either says where a rerun resumes.
    """
    t_start = time.perf_counter()
    config = _checked(config, address, checked)
    _prepare_env(address)
    with ExitStack() as stack:
        # held from before the resume point is read until Ray is shut down
        stack.enter_context(run_lock(config.job.run_dir, config.job.name))
        if resume is None or not checked:
            resume = check_resume(config)
        if resume.step is not None and resume.step >= config.job.steps:
            out = _nothing_to_train(config, resume, time.perf_counter() - t_start)
            print(out.summary(), flush=True)
            return out
        _announce(config.job, resume)
        launch_id = uuid.uuid4().hex[:12]
        started = stack.enter_context(_ray_session(address, config, verbose))
        stack.enter_context(_env(_START_TIMEOUT_ENV,
                                 ELASTIC_START_TIMEOUT_S if config.job.elastic else None))
        _check_cluster_resources(config, started and _is_local(address))
        result = _fit(_trainer(config, resume, launch_id), config, launch_id, verbose)
    out = _run_result(config, resume, result, launch_id, time.perf_counter() - t_start)
    print(out.summary(), flush=True)
    return out


def _checked(config: Config, address: Optional[str], checked: bool) -> Config:
    """The driver's checks before Ray starts (unless the caller made them), and the runs
    directory made on local storage."""
    if not checked:
        from launcher.run.preflight import preflight

        pf = preflight(config, local=_is_local(address))
        config = pf.config
        for msg in pf.warnings:
            say(msg)
    storage = config.job.storage_path
    if not is_uri(storage):
        try:
            os.makedirs(storage, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"job.storage_path {storage}: {exc.strerror or exc}") from None
    return config


def _announce(job, resume: ResumePoint) -> None:
    """Say where the run starts from (and any fault injection) before Ray's start-up."""
    if resume.source == "ray":
        say(f"resuming run {job.name!r} from its checkpoint at step {resume.step}: {resume.path}")
    elif resume.source == "scan":
        say(f"resuming run {job.name!r} from the newest committed checkpoint in {job.run_dir}: "
             f"step {resume.step}: {resume.path}")
    elif resume.source == "config":
        say(f"starting run {job.name!r} from job.resume_from (step {resume.step}): {resume.path}")
    else:
        say(f"starting new run {job.name!r} in {job.run_dir}")
    if job.fail_at_step is not None:
        say(f"fault injection: rank {job.fail_rank} will exit after step {job.fail_at_step} "
             f"(once per run), max_failures={job.max_failures}")


def _trainer(config: Config, resume: ResumePoint, launch_id: str):
    """Ray Train's TorchTrainer for the worker loop (inside a Ray session)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.train.loop import train_loop

    job = config.job
    loop_config = config.to_dict()
    loop_config.update(run_dir=job.run_dir, launch_id=launch_id,
                       resume_from=resume.path if resume.source == "config" else None)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=_scaling_config(job),
        run_config=RunConfig(
            name=job.name,
            storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep_last),
            # job.env for every worker, also in a Ray this driver did not start (where
            # ray.init's runtime_env does not apply): Ray merges it into the workers' env_vars
            worker_runtime_env={"env_vars": dict(job.env)} if job.env else None,
        ),
    )
    kind = "GPU" if job.use_gpu else "CPU"
    size = (f"{job.min_workers} to {job.max_workers} {kind} workers (elastic: resize checks every "
            f"{job.resize_interval_s:g} s)" if job.elastic else f"{job.num_workers} {kind} worker(s)")
    say(f"training {job.steps} steps on {size}; checkpoints every {job.checkpoint_every} steps "
         f"in {job.run_dir}")
    return trainer


def _fit(trainer, config: Config, launch_id: str, verbose: bool):
    """``trainer.fit()``. A run that failed beyond ``job.max_failures`` becomes
    :class:`TrainingFailed`; a Ctrl-C or SIGTERM becomes :class:`RunInterrupted` once the
    workers are stopped. Both say where a rerun of the same command resumes."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    job = config.job
    controller = own_ctrl_c(trainer)
    with sigterm_as_interrupt() as signals:  # also while stopping: a second one stops at once
        try:
            return trainer.fit()
        except TrainingFailedError as exc:
            restarts = max(0, _count_attempts(job.run_dir, launch_id) - 1)
            last, where = _where_a_rerun_resumes(config)
            raise TrainingFailed(
                f"run {job.name!r} failed after {restarts} restart(s) "
                f"(job.max_failures={job.max_failures}):\n{short_error(exc, verbose)}\n{where}",
                checkpoint=last.path, cause=exc) from exc
        except KeyboardInterrupt as exc:
            signum = signals.received or getattr(exc, "signum", signal.SIGINT)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            say(f"{name}: stopping the workers (a second {name} stops them at once)")
            # no group started in this launch: the controller is placing one or waiting for
            # its workers, and serves no abort() until that ends (see launcher.run.interrupt)
            started = _count_attempts(job.run_dir, launch_id) > 0
            how = stop(controller, ABORT_WAIT_S if started else NOT_STARTED_WAIT_S)
            last, where = _where_a_rerun_resumes(config)
            raise RunInterrupted(f"run {job.name!r} stopped ({how}); {where}",
                                 checkpoint=last.path, signum=signum) from None


def _where_a_rerun_resumes(config: Config) -> tuple["ResumePoint", str]:
    """The checkpoint a rerun of this command would start from, and a sentence saying so."""
    try:
        last = find_resume_point(config)
    except Exception:  # noqa: BLE001 - only for the message
        last = ResumePoint()
    if last.path:
        return last, (f"the last committed checkpoint is step {last.step}: {last.path}; rerun "
                      "the same command to resume from it")
    return last, "no checkpoint was committed; a rerun starts from scratch"


def _nothing_to_train(config: Config, resume: ResumePoint, wall_time_s: float) -> RunResult:
    """A launch whose checkpoint is already at ``job.steps`` (a rerun of a finished run):
    said before Ray starts, and the run's last reported losses read from its records."""
    job = config.job
    say(f"run {job.name!r} is already at step {resume.step} (job.steps={job.steps}), "
        f"checkpoint {resume.path}: nothing to train; raise job.steps (--steps N) to train further")
    history = read_history(job.run_dir)

    def last(key: str) -> Optional[float]:
        return next((r[key] for r in reversed(history) if r.get(key) is not None
                     and r["step"] <= resume.step), None)

    return RunResult(
        name=job.name, run_dir=job.run_dir, start_step=resume.step, step=resume.step,
        steps=job.steps, train_loss=last("loss"), val_loss=last("val_loss"), restarts=0,
        wall_time_s=wall_time_s, checkpoint=resume.path, num_workers=job.num_workers,
        use_gpu=job.use_gpu, resumed_from=resume,
        metrics=next((r for r in reversed(history) if r["step"] <= resume.step), {}),
        history=history, size_history=size_history(read_events(job.run_dir), resume.step))


def _run_result(config: Config, resume: ResumePoint, result, launch_id: str,
                wall_time_s: float) -> RunResult:
    """The :class:`RunResult` of a finished fit: rank 0's return value and last metrics,
    and the run's records read back from the run dir."""
    job, run_dir = config.job, config.job.run_dir
    rv = result.return_value or {}
    metrics = dict(result.metrics or {})
    step = int(rv.get("step", metrics.get("step", 0)))
    events = read_events(run_dir)
    return RunResult(
        name=job.name,
        run_dir=run_dir,
        start_step=int(rv.get("start_step", metrics.get("start_step", 0))),
        step=step,
        steps=job.steps,
        train_loss=rv.get("train_loss") if rv.get("train_loss") is not None else metrics.get("loss"),
        val_loss=rv.get("val_loss") if rv.get("val_loss") is not None else metrics.get("val_loss"),
        restarts=max(0, _count_attempts(run_dir, launch_id) - 1),
        wall_time_s=wall_time_s,
        checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
        num_workers=job.num_workers,
        use_gpu=job.use_gpu,
        resumed_from=resume,
        metrics=metrics,
        history=read_history(run_dir),
        size_history=size_history(events, step),
        restart_events=[ev for ev in events if ev.get("restart_s") is not None and ev.get("launch_id") == launch_id],
        ray_result=result,
    )
