"""The training loop every Ray Train worker runs: plain PyTorch plus a few marked Ray calls.

``train_loop(config)`` builds the model (a built-in GPT or Llama, or your factory's; the
same seed on every rank), a :class:`sharded_ams.ShardedAMS` over the process group that
Ray Train's ``TorchTrainer`` set up (gloo on CPU, NCCL on GPU; no DDP wrapper: the
optimizer reduces the gradients itself), and an LR schedule; resumes from the run's newest
committed checkpoint, at whatever world size it was saved (the format reshards); trains on
this rank's slice of each global batch, in ``accumulation_steps`` micro-batches
(:func:`launcher.scaling.accumulation_steps` for the world size this start has; all but
the last under ``optimizer.no_sync()``); reports metrics every ``log_every`` steps and
checkpoints every ``checkpoint_every`` steps and at the end. The pieces without Ray
(precision, the micro-batch step, evaluation, throughput/MFU, TensorBoard) are in
:mod:`launcher.training`. The Ray calls are the lines marked ``# [Ray]``:

* ``ray.train.torch.get_device()``: this worker's GPU (or the CPU);
* ``ray.train.get_checkpoint()``: the run's latest registered checkpoint, after a worker
  failure, a resize of an elastic group, or when the same run is launched again (Ray
  Train V2 restores it by run name). It can lag the newest committed checkpoint in the run
  dir, which is used then (:func:`_resume_candidates`);
* ``ray.train.report(metrics, checkpoint=...)``: a barrier across ranks. Each rank writes
  its own shard file (rank-unique names) into its own temporary directory, and Ray Train
  uploads every rank's directory into one checkpoint folder of the run.

Rank 0 also keeps the run's records in ``run_dir/.sharded_ams`` (:mod:`launcher.run_log`):
every metrics dict it reports and, once each start of the group trained its first step, a
start event (size, resumed step, and after a restart its cost and the steps lost; also
printed as a progress line); a heartbeat that dates the next failure; and TensorBoard
events in ``run_dir/tensorboard``.

``config`` is ``launcher.config.Config.to_dict()`` (sections model, data, optim, job) plus
``run_dir`` (where the run lives), ``launch_id`` and ``resume_from`` (``job.resume_from``
when the run has no checkpoint of its own).

Steps are counted as completed optimizer steps: the checkpoint "at step s" holds the
state after s steps, and the global batch that step s+1 trains on is a function of
(seed, s) only. So a run restarted from any checkpoint, on any number of workers, with any
micro-batch size, sees exactly the data an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

import ray.train  # [Ray]
import ray.train.torch  # [Ray]

from launcher.config import Config, accumulation_steps
from launcher.token_data import load_training_data
from launcher.training import (TensorBoardLog, autocast, build_model_for_training, evaluate,
                               forward_backward, model_flops_per_token, peak_bf16_flops,
                               resolve_precision, split_micro, throughput)
from launcher.run_log import (METRICS_FILE, STATE_DIR, Heartbeat, MetricsHistory, describe_start,  # noqa: F401
                              exists, start_event, write_text)
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,
                                    save_checkpoint, step_dir_name, validate_checkpoint)

# Lines that start with this tag are progress lines; the driver shows them without
# Ray's "(RayTrainWorker pid=...)" prefix (see launcher.ray_launcher).
PROGRESS_TAG = "[sharded-ams]"
# Ray's controller collects reports by polling workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s by default); a worker that dies sooner than that after ray.train.report can lose the
# report, checkpoint included.
REPORT_SETTLE_S = 5.0


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              min_lr_ratio: float) -> float:
    """LR multiplier for the update that produces step ``step + 1``: linear warmup, then
    constant or cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _log(msg: str) -> None:
    # sys.stdout rather than print(): Ray Train patches print() into its logger, which can
    # show a line twice on the driver.
    sys.stdout.write(f"{PROGRESS_TAG} {msg}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- pieces


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    value = value.double()
    if world_size > 1:
        dist.all_reduce(value)  # SUM: gloo has no AVG
    return value.item() / world_size


def _maybe_fail(fail_at_step, fail_rank: int, step: int, rank: int, run_dir: str,
                last_report: float) -> None:
    """Fault injection: rank ``fail_rank`` exits after step ``fail_at_step``, once per run."""
    if fail_at_step != step or rank != fail_rank:
        return
    marker = f"{run_dir}/{STATE_DIR}/failed-at-step{step}-rank{rank}"
    if exists(marker):
        return  # this run already failed here once: the restarted worker carries on
    write_text(marker, f"{time.time()}\n")
    _log(f"fault injection: rank {rank} exits (os._exit(1)) after step {step}")
    # Do not die right after a report: Ray could lose it (see REPORT_SETTLE_S).
    time.sleep(max(0.0, REPORT_SETTLE_S - (time.monotonic() - last_report)))
    os._exit(1)


def _load(path: str, optimizer, model, scheduler) -> int:
    return int(load_checkpoint(path, optimizer, model=model, lr_scheduler=scheduler)["step"])


def _resume_candidates(config: dict, run_dir: str, checkpoint) -> list[tuple[int, str, str]]:
    """``(step, path, source)`` of the checkpoints a start may resume from, newest first.

    Ray's latest registered checkpoint (``ray.train.get_checkpoint()``) can be older than
    the newest committed one in the run dir: a worker killed within one controller poll of
    reporting loses that report, checkpoint included (see REPORT_SETTLE_S). So on a
    local/NFS run dir the newest committed checkpoint there is a candidate too (committed:
    a valid manifest, every file present with its size); the driver's ``resume_from`` is
    used only when the run has none of its own."""
    found: dict[str, tuple[int, str, str]] = {}

    def add(path, source: str, step=None) -> None:
        path = str(path)
        if step is None:
            try:
                step = validate_checkpoint(path, checksums=False).step
            except CheckpointError as exc:
                _log(f"not resuming from {path}: {exc}")
                return
        found.setdefault(path, (int(step), path, source))

    if checkpoint is not None:
        if "://" in checkpoint.path:  # an object store: downloaded when loaded
            found[checkpoint.path] = (-1, checkpoint.path, "ray")
        else:
            add(checkpoint.path, "ray")
    if "://" not in run_dir and os.path.isdir(run_dir):
        latest = find_latest_checkpoint(run_dir, checksums=False)
        if latest is not None:
            add(latest, "scan")
    if not found and checkpoint is not None:  # never restart from scratch over a checkpoint
        raise CheckpointError(f"Ray Train's latest checkpoint {checkpoint.path} is not a valid "
                              f"checkpoint and the run dir holds no other")
    if not found and config.get("resume_from"):
        add(config["resume_from"], "config")
    return sorted(found.values(), key=lambda c: (c[0], c[2] == "ray"), reverse=True)


def _resume(config: dict, run_dir: str, rank: int, world_size: int, optimizer, model, scheduler):
    """Load the newest committed checkpoint (rank 0 picks, every rank loads; any world size:
    the format reshards); on a checkpoint that fails to load (checksums: the loader agrees
    the error over all ranks) fall back to the next. Returns ``(step, path)``; ``(0, None)``
    for a new run."""
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
    errors = []
    for _, path, source in candidates:
        try:
            if source == "ray" and "://" in path:
                with checkpoint.as_directory() as local:  # [Ray] a download
                    return _load(local, optimizer, model, scheduler), path
            return _load(path, optimizer, model, scheduler), path
        except CheckpointError as exc:
            errors.append(f"{path}: {exc}")
            if rank == 0:
                _log(f"cannot resume from {path} ({exc}); trying the next newest checkpoint")
    if errors:  # never restart from scratch over checkpoints that exist
        raise CheckpointError("no checkpoint of the run could be loaded:\n" + "\n".join(errors))
    return 0, None


def _save_and_report(metrics: dict, optimizer, model, scheduler, step: int, extra: dict) -> None:
    """Every rank writes its shard into its own temp dir (rank 0 also the manifest, which
    lists every rank's file); Ray uploads them all into the run's ``step-XXXXXXXX`` folder."""
    optimizer.finish_param_sync()  # the model's params must hold their gathered values
    with tempfile.TemporaryDirectory(prefix="sharded-ams-ckpt-") as tmp:
        save_checkpoint(tmp, optimizer, model=model, step=step, extra=extra,
                        lr_scheduler=scheduler, shared_fs=False).wait()
        ray.train.report(  # [Ray] barrier; uploads tmp into the run's checkpoint folder
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),  # [Ray]
            checkpoint_dir_name=step_dir_name(step),
        )


# ----------------------------------------------------------------------------- the loop


def _progress_line(m: dict, total_steps: int) -> str:
    val = f" | val {m['val_loss']:.4f}" if "val_loss" in m else ""
    workers = f"{m['world_size']} worker{'s' if m['world_size'] != 1 else ''}"
    speed = f"{m['tokens_per_s']:,.0f} tok/s"
    if "mfu" in m:
        speed += f" | MFU {100 * m['mfu']:.1f}%"
    elif "tflops" in m:
        speed += f" | {m['tflops']:.3g} TFLOP/s"
    return (f"step {m['step']:>{len(str(total_steps))}}/{total_steps} | loss {m['loss']:.4f}{val} | "
            f"{speed} | {m['step_time_ms']:.1f} ms/step | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | {workers}")


def train_loop(config: dict) -> dict[str, Any]:
    """Train the configured model with ShardedAMS on this worker; see the module docstring.

    Returns (on every rank; Ray keeps rank 0's) a summary dict: start_step, step,
    train_loss, val_loss, world_size.
    """
    cfg = Config.from_dict({k: v for k, v in config.items() if k in ("model", "data", "optim", "job")})
    mcfg, dcfg, ocfg, job = cfg.model, cfg.data, cfg.optim, cfg.job
    run_dir: str = config.get("run_dir") or job.run_dir
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = ray.train.torch.get_device()  # [Ray] this worker's GPU, or the CPU
    accum = accumulation_steps(dcfg.batch_size, world_size, dcfg.micro_batch_size)
    precision = resolve_precision(mcfg.precision, device)
    amp = functools.partial(autocast, precision, device)
    where = f"model.factory {mcfg.factory!r}" if mcfg.factory else f"model.arch {mcfg.arch!r}"

    # ---- data (the driver checked checksums before Ray started; sizes again here)
    data = load_training_data(dataclasses.asdict(dcfg), verify="size")
    model_table = dataclasses.asdict(mcfg)
    if model_table["vocab_size"] is None:
        model_table["vocab_size"] = data.vocab_size

    # ---- model, optimizer, schedule: identical on every rank
    torch.manual_seed(dcfg.seed)
    model = build_model_for_training(model_table, device, precision)
    optimizer = ShardedAMS(model, **ocfg.optimizer_kwargs())
    if mcfg.compile:
        model.compile()  # in place: parameter names (and checkpoints) are unchanged
    total_steps = job.steps

    def schedule(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=ocfg.warmup_steps,
                         schedule=ocfg.schedule, min_lr_ratio=ocfg.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ---- resume: the newest committed checkpoint of the run, at whatever size it was saved
    step, resumed_from = _resume(config, run_dir, rank, world_size, optimizer, model, scheduler)
    start_step = step

    launch_id = config.get("launch_id", "x")
    attempt = f"{launch_id}-{time.time_ns()}"  # this start of the worker group
    history = MetricsHistory(run_dir, launch_id, attempt, log=_log) if rank == 0 else None
    tb = TensorBoardLog(run_dir, start_step, log=_log) if rank == 0 else None
    # the last sign of life of the group before this one (dates a failure), then ours
    previous = Heartbeat.read(run_dir) if rank == 0 else None
    heartbeat = Heartbeat(run_dir, {"launch_id": launch_id, "attempt": attempt}, world_size) if rank == 0 else None
    batch_size, block_size, seed = dcfg.batch_size, dcfg.block_size, dcfg.seed
    if rank == 0:
        write_text(f"{run_dir}/{STATE_DIR}/attempts/{attempt}.json",
                    json.dumps({"start_step": start_step, "world_size": world_size,
                                "resumed_from": resumed_from, "time": time.time()}))
        how = f"resuming from {resumed_from} (step {start_step})" if resumed_from else "starting from scratch"
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _log(f"{world_size} worker(s) on {device.type}, backend {optimizer.backend}, {precision}: "
             f"{where} with {n_params:,} params; global batch {batch_size} x {block_size} tokens = "
             f"{batch_size // world_size // accum} x {accum} micro-batch(es) x {world_size} worker(s); {how}")

    flops_per_token = model_flops_per_token(model, block_size)
    peak = peak_bf16_flops(device)
    tokens_per_step = batch_size * block_size
    eval_kw = dict(batch_size=batch_size, micro_batch_size=dcfg.micro_batch_size, block_size=block_size,
                   iters=dcfg.eval_iters, seed=seed, rank=rank, world_size=world_size, device=device,
                   amp=amp, where=where)
    extra = {"run": job.name, "model": model_table, "data": data.describe, "data_seed": seed,
             "world_size": world_size, "precision": precision}

    loss_sum = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    last_report = time.monotonic()
    metrics: dict[str, Any] = {}
    model.train()
    while step < total_steps:
        x, y = data.get_batch("train", step, batch_size, block_size, seed=seed, rank=rank,
                              world_size=world_size)
        loss = forward_backward(model, optimizer, split_micro(x.to(device), y.to(device), accum),
                                amp=amp, where=where)
        optimizer.step()  # reduce grads (once per step), AMS step on this rank's shard, gather params
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        loss_sum += loss
        window_steps += 1
        # no per-step host sync: the CPU queues ahead; the device is waited for only where
        # a time is taken (this start's first step, and each report below)
        if rank == 0:
            heartbeat.beat(step)
            if step == start_step + 1:  # this group's first step: what its start cost
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                event = start_event(previous, start_step=start_step, world_size=world_size,
                                    first_step_time=time.time(), launch_id=launch_id,
                                    resumed_from=resumed_from)
                history.event(event)
                _log(describe_start(event))

        _maybe_fail(job.fail_at_step, job.fail_rank, step, rank, run_dir, last_report)

        final = step == total_steps
        save = final or step % job.checkpoint_every == 0
        do_eval = final or (job.eval_every and step % job.eval_every == 0)
        if not (save or do_eval or step % job.log_every == 0):
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        window_time = time.perf_counter() - window_start  # steps since the last report
        if save and rank == 0:  # before the collectives that lead every rank into the save
            heartbeat.beat(step, force=True)
        info = optimizer.last_step
        metrics = {
            "step": step,
            "start_step": start_step,
            "loss": _mean_over_ranks(loss_sum / window_steps, world_size),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "grad_norm": float("nan") if info.grad_norm is None else float(info.grad_norm),
            "skipped_steps": optimizer.skipped_steps,
            "step_time_ms": 1000.0 * window_time / window_steps,
            **throughput(tokens_per_step * window_steps, window_time, flops_per_token, world_size, peak),
            "world_size": world_size,
        }
        if do_eval:
            optimizer.finish_param_sync()
            metrics["val_loss"] = evaluate(model, data, **eval_kw)
        if rank == 0:
            # before the report: a record whose checkpoint never commits is re-trained (and
            # re-recorded) after a restart; one written after the report could be lost for good
            history.append(metrics)
            tb.log(metrics, step)
            _log(_progress_line(metrics, total_steps))
        if save:
            _save_and_report(metrics, optimizer, model, scheduler, step, extra)
            if rank == 0:  # done: the final checkpoint is committed
                heartbeat.beat(step, force=True, done=final)
        else:
            ray.train.report(metrics)  # [Ray] barrier; metrics only
        last_report = time.monotonic()
        loss_sum.zero_()
        window_steps, window_start = 0, time.perf_counter()

    if start_step >= total_steps:  # nothing to train: the run was already complete
        # (not added to the metrics history: no step was trained, the record of this step is there)
        optimizer.finish_param_sync()
        metrics = {"step": step, "start_step": start_step, "world_size": world_size,
                   "val_loss": evaluate(model, data, **eval_kw)}
        if rank == 0:
            _log(f"run already at step {step} (job.steps={total_steps}): nothing to train "
                 f"(val loss {metrics['val_loss']:.4f}); raise job.steps to train further")
        ray.train.report(metrics)  # [Ray]
    if tb is not None:
        tb.close()
    return {"start_step": start_step, "step": step, "train_loss": metrics.get("loss"),
            "val_loss": metrics.get("val_loss"), "world_size": world_size,
            "resumed_from": resumed_from}
