"""The training loop every Ray Train worker runs: plain PyTorch plus a few marked Ray calls.

``train_loop(config)`` builds the model (a built-in GPT or Llama, or your factory's; the
same seed on every rank), a :class:`sharded_ams.ShardedAMS` over the process group that
Ray Train's ``TorchTrainer`` set up (gloo on CPU, NCCL on GPU; no DDP wrapper: the
optimizer reduces the gradients itself), and an LR schedule; resumes from the run's newest
committed checkpoint, at whatever world size it was saved (the format reshards); trains on
this rank's slice of each global batch, in ``accumulation_steps`` micro-batches
(:func:`launcher.run.scaling.accumulation_steps` for the world size this start has; all but
the last under ``optimizer.no_sync()``); reports metrics every ``log_every`` steps and
checkpoints every ``checkpoint_every`` steps and at the end. The pieces without Ray
(precision, the micro-batch step, evaluation, throughput/MFU, TensorBoard) are in
:mod:`launcher.train.step`; resuming and saving in :mod:`launcher.train.resume`.
The Ray calls are the lines marked ``# [Ray]``:

* ``ray.train.torch.get_device()``: this worker's GPU (or the CPU);
* ``ray.train.get_checkpoint()``: the run's latest registered checkpoint, after a worker
  failure, a resize of an elastic group, or when the same run is launched again (Ray
  Train V2 restores it by run name). It can lag the newest committed checkpoint in the run
  dir, which is used then (:func:`launcher.train.resume.resume`);
* ``ray.train.report(metrics, checkpoint=...)``: a barrier across ranks. Each rank writes
  its own shard file (rank-unique names) into its own temporary directory, and Ray Train
  uploads every rank's directory into one checkpoint folder of the run.

Rank 0 also keeps the run's records in ``run_dir/.sharded_ams`` (:mod:`launcher.run.records`):
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
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import ray.train  # [Ray]
import ray.train.torch  # [Ray]

from launcher.config import Config, accumulation_steps
from launcher.data.tokens import load_training_data
from launcher.run.records import (METRICS_FILE, STATE_DIR, Heartbeat, MetricsHistory, describe_start,  # noqa: F401
                                  exists, start_event, write_text)
from launcher.train.fsdp_optim import FSDPAMS
from launcher.train.parallel.layout import Layout, make_layout, parallelize
from launcher.train.resume import resume, save_and_report
from launcher.train.step import (PROGRESS_TAG, TensorBoardLog, autocast,  # noqa: F401
                                 build_model_for_training, device_batch, evaluate,
                                 forward_backward,
                                 log_progress, model_flops_per_token, peak_bf16_flops,
                                 resolve_precision, split_micro, throughput)
from sharded_ams import ShardedAMS
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
    span = total_steps - warmup_steps  # <= 0: the warmup ran to (or past) the end
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

_log = log_progress


class Schedule:
    """The LR multiplier as a callable object, so that ``LambdaLR.state_dict()`` saves its
    attributes (torch saves a callable object's ``__dict__``, not a function's): a checkpoint
    then records ``total_steps``, the length of the schedule the run started with, in the
    trainer state (no change to the checkpoint format)."""

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
        self.total_steps = total_steps
        self.warmup_steps, self.schedule, self.min_lr_ratio = warmup_steps, schedule, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                         schedule=self.schedule, min_lr_ratio=self.min_lr_ratio)


def settle_schedule(scheduler, optim_cfg, job_steps: int, start_step: int) -> str:
    """After a resume: which schedule length is in force, and the line that says so.

    The checkpoint restored ``total_steps`` of the schedule the run started with (a
    checkpoint from before this record keeps the config's). The config's other schedule
    keys (warmup, shape, min_lr_ratio) apply as set. Kept unless ``optim.schedule_steps``
    asks for another length: a rerun that raises ``job.steps`` continues the old decay
    (at min_lr_ratio past its end) instead of jumping back up the cosine. Sets every group's
    lr for step ``start_step + 1`` from the schedule in force (not the checkpoint's saved lr).
    Returns '' when the length did not change."""
    fn = scheduler.lr_lambdas[0]
    started = fn.total_steps
    fn.__init__(optim_cfg.schedule_steps or started, optim_cfg.warmup_steps, optim_cfg.schedule,
                optim_cfg.min_lr_ratio)
    # The step after the resume uses the schedule in force, not the lr the checkpoint's
    # groups were saved with (another schedule's, if the config changed it): LambdaLR's own
    # value at step start_step (base_lr * lambda(last_epoch)), what an uninterrupted run of
    # this schedule uses there; unchanged, it is the saved lr, bit for bit.
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * fn(start_step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    if optim_cfg.schedule != "cosine" or started == job_steps == fn.total_steps:
        return ""
    other = job_steps if fn.total_steps == started else started
    lr = scheduler.base_lrs[0]
    now, alt = lr * fn(start_step), lr * Schedule(other, fn.warmup_steps, fn.schedule, fn.min_lr_ratio)(start_step)
    why = ("optim.schedule_steps" if optim_cfg.schedule_steps else "the schedule the run started with;"
           f" set optim.schedule_steps={job_steps} to decay over the new total")
    return (f"lr schedule: cosine over {fn.total_steps} steps ({why}): lr at step {start_step + 1} "
            f"is {now:.3g} (over {other} steps it would be {alt:.3g})")


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


# ----------------------------------------------------------------------------- the loop


def _progress_line(m: dict, total_steps: int) -> str:
    val = f" | val {m['val_loss']:.4f}" if "val_loss" in m else ""
    workers = f"{m['world_size']} worker{'s' if m['world_size'] != 1 else ''}"
    speed = f"{m['tokens_per_s']:,.0f} tok/s"
    if "mfu" in m:
        speed += f" | MFU {100 * m['mfu']:.1f}%"
    elif "tflops" in m:
        speed += f" | {m['tflops']:.3g} TFLOP/s"
    # a non-finite gradient skips the step (the params do not move): say so, or a run whose
    # every step is skipped reads like one that trains (loss flat, "grad norm nan")
    skipped = m.get("skipped_steps") or 0
    skips = f" | {skipped} step{'s' if skipped != 1 else ''} skipped (non-finite grads)" if skipped else ""
    return (f"step {m['step']:>{len(str(total_steps))}}/{total_steps} | loss {m['loss']:.4f}{val} | "
            f"{speed} | {m['step_time_ms']:.1f} ms/step | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f}"
            f"{skips} | {workers}")


@dataclasses.dataclass
class _Worker:
    """What this worker trains, built once per start of the worker group: the same model,
    optimizer and schedule on every rank."""

    config: dict
    cfg: Config
    run_dir: str
    rank: int
    world_size: int
    device: torch.device
    layout: Layout
    accum: int
    precision: str
    amp: Callable
    where: str
    data: Any
    model_table: dict
    model: torch.nn.Module
    optimizer: Any  # ShardedAMS (zero1) or FSDPAMS (fsdp)
    scheduler: Any
    flops_per_token: float = 0.0  # set when training starts (throughput and MFU)
    peak: Any = None              # the device's bf16 peak FLOP/s, None if unknown
    step_lr: float = float("nan")  # the lr the last step used (the scheduler then moves on)

    @property
    def total_steps(self) -> int:
        return self.cfg.job.steps

    def eval_kw(self) -> dict:
        d = self.cfg.data
        return dict(batch_size=d.batch_size, micro_batch_size=d.micro_batch_size,
                    block_size=d.block_size, iters=d.eval_iters, seed=d.seed,
                    rank=self.layout.dp_rank, world_size=self.layout.dp_size,
                    group=self.layout.dp_group, device=self.device, amp=self.amp,
                    where=self.where)


def _build(config: dict, device: Optional[torch.device] = None) -> _Worker:
    """Data (the driver checked checksums before Ray started; sizes again here), model,
    optimizer and LR schedule, from the loop config. ``device``: Ray's for this worker
    unless given (tests build workers on gloo processes without Ray)."""
    cfg = Config.from_dict({k: v for k, v in config.items() if k in ("model", "data", "optim", "job", "parallel")})
    mcfg, dcfg, ocfg = cfg.model, cfg.data, cfg.optim
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if device is None:
        device = ray.train.torch.get_device()  # [Ray] this worker's GPU, or the CPU
    precision = resolve_precision(mcfg.precision, device)
    data = load_training_data(dataclasses.asdict(dcfg), verify="size")
    model_table = dataclasses.asdict(mcfg)
    if model_table["vocab_size"] is None:
        model_table["vocab_size"] = data.vocab_size
    par = cfg.parallel
    layout = make_layout(par.strategy, par.tp, rank, world_size, device)
    torch.manual_seed(dcfg.seed)  # identical initial weights on every rank
    if layout.strategy == "fsdp":  # fp32 shards (the masters); bf16 compute: FSDP2's policy
        model = build_model_for_training(model_table, device, "fp32")
        model = parallelize(model, layout, precision, ocfg.grad_reduce_dtype)
        optimizer = FSDPAMS(model, **_fsdp_kwargs(ocfg.optimizer_kwargs()),
                            sync_every_micro_batch=par.grad_sync == "micro_batch")
    else:  # zero1: ShardedAMS over dp; with tp > 1 the model split first (Megatron's layout)
        model = build_model_for_training(model_table, device, precision)
        model = parallelize(model, layout, precision)
        mesh = dict(device_mesh=layout.mesh) if layout.tp > 1 else {}
        # compiled with tp: ONE wait for the param gathers, at the model's start. Each wait
        # hook is a graph break, and a break among the tensor-parallel layers' DTensor ops
        # crashed the compile (torch 2.13: DTensor's cached vocab-parallel embedding mask
        # reused across fake modes, "Mixing fake modes NYI"); the gathers then overlap the
        # rest of the step, not the forward's blocks.
        sync = [model] if layout.tp > 1 and mcfg.compile else _blocks(model)
        optimizer = ShardedAMS(model, **ocfg.optimizer_kwargs(), param_sync_modules=sync,
                               **mesh)
    if mcfg.compile:
        if layout.tp > 1:
            _per_rank_compile_cache(rank)
        model.compile()  # in place: parameter names (and checkpoints) are unchanged
    schedule = Schedule(ocfg.schedule_steps or cfg.job.steps, ocfg.warmup_steps, ocfg.schedule,
                        ocfg.min_lr_ratio)
    return _Worker(
        config=config, cfg=cfg, run_dir=config.get("run_dir") or cfg.job.run_dir, rank=rank,
        world_size=world_size, device=device,
        layout=layout, accum=accumulation_steps(dcfg.batch_size, layout.dp_size, dcfg.micro_batch_size),
        precision=precision, amp=functools.partial(autocast, precision, device),
        where=f"model.factory {mcfg.factory!r}" if mcfg.factory else f"model.arch {mcfg.arch!r}",
        data=data, model_table=model_table, model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))


def _per_rank_compile_cache(rank: int) -> None:
    """Give this rank its own Inductor cache directory (a subdirectory of the current one).

    Under tensor parallelism the compiled forward holds functional collectives on the tp
    process group, by its name, and the names differ between tp groups (ranks {0, 1} got
    "3", ranks {2, 3} "4" on a 2 x 2 mesh). The FX graph cache does not tell those graphs
    apart, so with a warm shared cache (a restart, a resume) ranks 0 and 1 loaded the graph
    compiled on rank 2 and failed with "Could not resolve the process group registered
    under the name 4" (torch 2.13, ``tests/check_compile_parallel.py`` run twice). A cache
    per rank costs a compile per rank on a cold start, which each rank pays anyway."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    base = cache_dir()
    if os.path.basename(base) != f"rank{rank}":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"rank{rank}")


def _reduced(w: "_Worker") -> str:
    """How fsdp reduces under accumulation (parallel.grad_sync), for the start line."""
    if w.accum == 1 or w.layout.strategy != "fsdp":
        return ""
    if getattr(w.optimizer, "sync_every_micro_batch", False):
        return ", grads reduce-scattered each micro-batch"
    return ", grads reduced once per step (unsharded grads held between micro-batches)"


def _fsdp_kwargs(kw: dict) -> dict:
    """ShardedAMS's keyword arguments less what FSDP2 does itself (buckets, overlap, the
    reduce dtype: its MixedPrecisionPolicy)."""
    return {k: v for k, v in kw.items() if k not in ("bucket_numel", "overlap", "grad_reduce_dtype")}


def _blocks(model: torch.nn.Module):
    """A model's ``transformer_blocks()`` (the built-in GPT and Llama have it; a factory's
    model may): the optimizer then waits for the param gather once per block, one graph
    break per block under torch.compile instead of one per module that owns params. Params
    under a block must be read only inside its forward. None: one wait per module."""
    get = getattr(model, "transformer_blocks", None)
    return list(get()) if callable(get) else None


class _Records:
    """Rank 0's records of this start (metrics history, TensorBoard, heartbeat, start event
    and progress lines, :mod:`launcher.run.records`); every method does nothing elsewhere."""

    def __init__(self, w: _Worker, start_step: int, resumed_from):
        self.w, self.start_step, self.resumed_from = w, start_step, resumed_from
        self.on = w.rank == 0
        self.launch_id = w.config.get("launch_id", "x")
        attempt = f"{self.launch_id}-{time.time_ns()}"  # this start of the worker group
        if not self.on:
            return
        run_dir = w.run_dir
        self.history = MetricsHistory(run_dir, self.launch_id, attempt, log=_log)
        self.tb = TensorBoardLog(run_dir, start_step, log=_log)
        # the last sign of life of the group before this one (dates a failure), then ours
        self.previous = Heartbeat.read(run_dir)
        self.heartbeat = Heartbeat(run_dir, {"launch_id": self.launch_id, "attempt": attempt},
                                   w.world_size)
        write_text(f"{run_dir}/{STATE_DIR}/attempts/{attempt}.json",
                   json.dumps({"start_step": start_step, "world_size": w.world_size,
                               "resumed_from": resumed_from, "time": time.time()}))
        _log(self._start_line())

    def _start_line(self) -> str:
        w, d = self.w, self.w.cfg.data
        how = (f"resuming from {self.resumed_from} (step {self.start_step})" if self.resumed_from
               else "starting from scratch")
        n_params = sum(p.numel() for p in w.model.parameters() if p.requires_grad)
        dp = w.layout.dp_size
        ways = f"{dp} worker(s)" if dp == w.world_size else f"{dp} data-parallel replica(s)"
        return (f"{w.world_size} worker(s) on {w.device.type}, {w.layout.describe()}, backend "
                f"{w.optimizer.backend}, {w.precision}: {w.where} with {n_params:,} params; "
                f"global batch {d.batch_size} x {d.block_size} tokens = {d.batch_size // dp // w.accum}"
                f" x {w.accum} micro-batch(es) x {ways}{_reduced(w)}; {how}")

    def stepped(self, step: int) -> None:
        """After each step: the heartbeat; after this group's first, what its start cost."""
        if not self.on:
            return
        self.heartbeat.beat(step)
        if step == self.start_step + 1:
            if self.w.device.type == "cuda":
                torch.cuda.synchronize(self.w.device)
            event = start_event(self.previous, start_step=self.start_step,
                                world_size=self.w.world_size, first_step_time=time.time(),
                                launch_id=self.launch_id, resumed_from=self.resumed_from)
            self.history.event(event)
            _log(describe_start(event))

    def beat(self, step: int, **kw) -> None:
        if self.on:
            self.heartbeat.beat(step, force=True, **kw)

    def metrics(self, metrics: dict, step: int) -> None:
        """Before the report: a record whose checkpoint never commits is re-trained (and
        re-recorded) after a restart; one written after the report could be lost for good."""
        if self.on:
            self.history.append(metrics)
            self.tb.log(metrics, step)
            _log(_progress_line(metrics, self.w.total_steps))

    def close(self) -> None:
        if self.on:
            self.tb.close()


class _Window:
    """Loss and wall time since the last report (no per-step host sync: the CPU queues ahead)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1


def _train_step(w: _Worker, step: int) -> torch.Tensor:
    """One optimizer step on this rank's slice of global batch ``step`` (micro-batches:
    :func:`launcher.train.step.forward_backward`). Returns the loss, on the device."""
    d = w.cfg.data
    x, y = w.data.get_batch("train", step, d.batch_size, d.block_size, seed=d.seed,
                            rank=w.layout.dp_rank, world_size=w.layout.dp_size)
    x, y = device_batch(x, y, w.device)  # CUDA: pinned, non-blocking
    loss = forward_backward(w.model, w.optimizer, split_micro(x, y, w.accum), amp=w.amp, where=w.where)
    w.optimizer.step()  # reduce grads (once per step), AMS step on this rank's shard, gather params
    w.optimizer.zero_grad()
    w.step_lr = float(w.optimizer.param_groups[0]["lr"])
    w.scheduler.step()
    return loss


def _step_metrics(w: _Worker, step: int, start_step: int, window: _Window) -> dict:
    """The report's metrics over the window (the device is waited for here, where a time is
    taken); with the validation loss when an evaluation is due."""
    if w.device.type == "cuda":
        torch.cuda.synchronize(w.device)
    window_time = time.perf_counter() - window.start
    info = w.optimizer.last_step
    tokens = w.cfg.data.batch_size * w.cfg.data.block_size * window.steps
    return {
        "step": step,
        "start_step": start_step,
        "loss": _mean_over_ranks(window.loss_sum / window.steps, w.world_size),
        "lr": w.step_lr,  # the step's own, as its loss and grad norm (not the next one's)
        "grad_norm": float("nan") if info.grad_norm is None else float(info.grad_norm),
        "skipped_steps": w.optimizer.skipped_steps,
        "step_time_ms": 1000.0 * window_time / window.steps,
        **throughput(tokens, window_time, w.flops_per_token, w.world_size, w.peak),
        "world_size": w.world_size,
    }


def _report(w: _Worker, rec: _Records, step: int, start_step: int, window: _Window,
            *, save: bool, do_eval: bool) -> dict:
    """Metrics (and evaluation), rank 0's records, then the report: with a checkpoint when
    one is due (every rank writes its shard), else metrics only."""
    if save:  # before the collectives that lead every rank into the save
        rec.beat(step)
    metrics = _step_metrics(w, step, start_step, window)
    if do_eval:
        w.optimizer.finish_param_sync()
        metrics["val_loss"] = evaluate(w.model, w.data, **w.eval_kw())
    rec.metrics(metrics, step)
    if save:
        save_and_report(metrics, w.optimizer, w.model, w.scheduler, step, _extra(w), w.layout)
        rec.beat(step, done=step == w.total_steps)  # done: the final checkpoint is committed
    else:
        ray.train.report(metrics)  # [Ray] barrier; metrics only
    return metrics


def _extra(w: _Worker) -> dict:
    """What a checkpoint records of the run (read by ``ckpt export`` and the resume checks)."""
    d = w.cfg.data
    return {"run": w.cfg.job.name, "model": w.model_table, "data": w.data.describe,
            "data_seed": d.seed, "world_size": w.world_size, "precision": w.precision,
            "mesh": {"strategy": w.layout.strategy, "dp": w.layout.dp_size, "tp": w.layout.tp},
            # what each step's batch depends on besides the corpus and the seed (resume checks)
            "data_order": {"batch_size": d.batch_size, "block_size": d.block_size,
                           "val_fraction": d.val_fraction, "max_bytes": d.max_bytes}}


def _train(w: _Worker, rec: _Records, start_step: int) -> dict:
    """The step loop from ``start_step`` to ``job.steps``; reports every ``log_every`` steps,
    evaluates every ``eval_every`` and checkpoints every ``checkpoint_every`` and at the end.
    Returns the last report's metrics ({} if none)."""
    job = w.cfg.job
    w.flops_per_token = model_flops_per_token(w.model, w.cfg.data.block_size)
    w.peak = peak_bf16_flops(w.device)
    window = _Window(w.device)
    last_report = time.monotonic()
    metrics: dict[str, Any] = {}
    step = start_step
    w.model.train()
    while step < w.total_steps:
        window.add(_train_step(w, step))
        step += 1
        rec.stepped(step)
        _maybe_fail(job.fail_at_step, job.fail_rank, step, w.rank, w.run_dir, last_report)
        final = step == w.total_steps
        save = final or step % job.checkpoint_every == 0
        do_eval = final or bool(job.eval_every and step % job.eval_every == 0)
        if save or do_eval or step % job.log_every == 0:
            metrics = _report(w, rec, step, start_step, window, save=save, do_eval=do_eval)
            last_report = time.monotonic()
            window.reset()
    return metrics


def _already_complete(w: _Worker, step: int) -> dict:
    """Nothing to train: the run was already at ``job.steps``; evaluate and report (not added
    to the metrics history: no step was trained, the record of this step is there)."""
    w.optimizer.finish_param_sync()
    metrics = {"step": step, "start_step": step, "world_size": w.world_size,
               "val_loss": evaluate(w.model, w.data, **w.eval_kw())}
    if w.rank == 0:
        _log(f"run already at step {step} (job.steps={w.total_steps}): nothing to train "
             f"(val loss {metrics['val_loss']:.4f}); raise job.steps to train further")
    ray.train.report(metrics)  # [Ray]
    return metrics


def train_loop(config: dict) -> dict[str, Any]:
    """Train the configured model with ShardedAMS on this worker; see the module docstring.

    Returns (on every rank; Ray keeps rank 0's) a summary dict: start_step, step,
    train_loss, val_loss, world_size, resumed_from.
    """
    w = _build(config)
    # the newest committed checkpoint of the run, at whatever size it was saved
    start_step, resumed_from = resume(config, w.run_dir, w.rank, w.world_size, w.optimizer,
                                      w.model, w.scheduler, w.layout,
                                      same_run={"data": w.data.describe, "precision": w.precision})
    if w.rank == 0 and w.cfg.job.env:  # what this worker really has, not what was asked
        _log("job.env in the workers: " + ", ".join(f"{k}={os.environ.get(k, '<unset>')}"
                                                    for k in sorted(w.cfg.job.env)))
    if resumed_from is not None:
        line = settle_schedule(w.scheduler, w.cfg.optim, w.total_steps, start_step)
        if line and w.rank == 0:
            _log(line)
    rec = _Records(w, start_step, resumed_from)
    if start_step < w.total_steps:
        metrics, step = _train(w, rec, start_step), w.total_steps
    else:
        metrics, step = _already_complete(w, start_step), start_step
    rec.close()
    return {"start_step": start_step, "step": step, "train_loss": metrics.get("loss"),
            "val_loss": metrics.get("val_loss"), "world_size": w.world_size,
            "resumed_from": resumed_from}
