"""One trial of the optimizer study: train one (optimizer, lr, seed) arm in this process.

A trial is the launcher's job at world size 1, built from the same pieces as the Ray Train
worker (``launcher/train/loop.py``): the ``[model]``/``[data]``/``[optim]``/``[job]`` config
(:func:`launcher.config.load_config`, so every setting is validated as for
``sharded-ams train``), the data (:func:`launcher.data.tokens.load_training_data`), the
model (:func:`launcher.train.step.build_model_for_training`), :class:`sharded_ams.ShardedAMS`
with no process group, the micro-batch step (:func:`launcher.train.step.forward_backward`),
the warmup + cosine schedule (:func:`launcher.train.loop.lr_factor`), the evaluation
(:func:`launcher.train.step.evaluate`) and checkpoints (:mod:`sharded_ams.checkpoint`). Step
``s`` trains on the global batch of ``(seed, s)``, exactly the batch the launcher's loop
would draw, so a trial restarted from its checkpoint continues bit for bit.

What differs from a launcher run, on purpose: every trial evaluates on the same validation
windows (``EVAL_SEED``, whatever its training seed), so the optimizers are compared on the
same held-out tokens; and the last evaluation averages ``final_eval_iters`` batches (more
than the ``data.eval_iters`` of the intermediate ones).

The Ray Tune side (``tune.report``, ``tune.get_checkpoint``) is behind :class:`TuneSession`;
tests drive :func:`train_trial` with a fake session, without Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol

EVAL_SEED = 0  # the validation windows every trial is scored on
CKPT_DIR = "trial-checkpoint"

# The study's optimizers: name -> [optim] settings. The AMS member between C-Adam (lam = 0)
# and Grams (lam = -1) uses the same sign reference as they do (beta3 = 0: the current
# gradient), so the three differ only in lam.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"optim.preset": "adamw"},
    "cadam": {"optim.preset": "cadam"},
    "grams": {"optim.preset": "grams"},
    "ams_lam-0.5": {"optim.preset": "", "optim.beta3": 0.0, "optim.lam": -0.5},
}


def trial_overrides(base: Mapping[str, Any], optimizer: str, lr: float, seed: int) -> dict[str, Any]:
    """The config overrides of one arm: the study's shared ``base`` plus the optimizer's
    settings, ``optim.lr`` and ``data.seed`` (model init and batch order). Nothing else
    differs between arms: same tokens, same schedule."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    return {**base, **OPTIMIZERS[optimizer], "optim.lr": float(lr), "data.seed": int(seed)}


def trial_config(config_file: str, base: Mapping[str, Any], optimizer: str, lr: float, seed: int):
    """The validated :class:`launcher.config.Config` of one arm."""
    from launcher.config import load_config

    return load_config(config_file, trial_overrides(base, optimizer, lr, seed), environ={})


class Session(Protocol):
    """Where a trial reports and finds its checkpoint (Ray Tune, or a test's fake)."""

    def restore_dir(self) -> contextlib.AbstractContextManager[Optional[str]]: ...

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None: ...


class TuneSession:
    """:class:`Session` on Ray Tune: ``tune.get_checkpoint`` / ``tune.report``."""

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[Optional[str]]:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


def _log_event(path: Optional[str], **event: Any) -> None:
    """Append one JSON line to the study's trial log (start/finish of each attempt)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**event, "pid": os.getpid(), "time": time.time()}) + "\n")


def train_trial(spec: Mapping[str, Any], session: Session) -> dict[str, Any]:
    """Train one arm to the end, reporting metrics every ``job.log_every`` steps (validation
    loss every ``job.eval_every`` and at the last step) and saving a checkpoint every
    ``job.checkpoint_every`` steps; resume from the session's checkpoint if it has one.

    ``spec``: ``config_file``, ``base`` (overrides shared by all arms), ``optimizer``,
    ``lr``, ``seed``, ``final_eval_iters``, ``threads`` (torch CPU threads) and ``log_path``
    (the study's trial log, optional). Returns the last metrics reported.
    """
    import torch

    from launcher.config import accumulation_steps
    from launcher.data.tokens import load_training_data
    from launcher.train.loop import lr_factor
    from launcher.train.step import (autocast, build_model_for_training, evaluate, forward_backward,
                                   resolve_precision, split_micro)
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import load_checkpoint, save_checkpoint

    t_start = time.perf_counter()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" lines
    opt_name, lr, seed = spec["optimizer"], float(spec["lr"]), int(spec["seed"])
    key = arm_name({"optimizer": opt_name, "lr": lr, "seed": seed})
    cfg = trial_config(spec["config_file"], spec["base"], opt_name, lr, seed)
    mcfg, dcfg, ocfg, job = cfg.model, cfg.data, cfg.optim, cfg.job
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda") if job.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_precision(mcfg.precision, device)
    amp = functools.partial(autocast, precision, device)

    data = load_training_data(dataclasses.asdict(dcfg), verify="size")
    table = dataclasses.asdict(mcfg)
    if table["vocab_size"] is None:
        table["vocab_size"] = data.vocab_size
    torch.manual_seed(seed)
    model = build_model_for_training(table, device, precision)
    optimizer = ShardedAMS(model, **ocfg.optimizer_kwargs())
    if mcfg.compile:
        model.compile()
    schedule = functools.partial(lr_factor, total_steps=job.steps, warmup_steps=ocfg.warmup_steps,
                                 schedule=ocfg.schedule, min_lr_ratio=ocfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step = 0
    with session.restore_dir() as d:
        if d is not None:
            step = int(load_checkpoint(Path(d) / CKPT_DIR, optimizer, model=model,
                                       lr_scheduler=scheduler)["step"])
    start = step
    _log_event(spec.get("log_path"), event="start", key=key, start_step=step)

    B, T = dcfg.batch_size, dcfg.block_size
    accum = accumulation_steps(B, 1, dcfg.micro_batch_size)
    eval_kw = dict(batch_size=B, micro_batch_size=dcfg.micro_batch_size, block_size=T, seed=EVAL_SEED,
                   rank=0, world_size=1, device=device, amp=amp)
    window, window_steps = 0.0, 0
    metrics: dict[str, Any] = {}
    model.train()
    while step < job.steps:
        x, y = data.get_batch("train", step, B, T, seed=seed, rank=0, world_size=1)
        loss = forward_backward(model, optimizer, split_micro(x.to(device), y.to(device), accum), amp=amp)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        window += loss.item()
        window_steps += 1
        final = step == job.steps
        do_eval = final or (job.eval_every and step % job.eval_every == 0)
        save = not final and step % job.checkpoint_every == 0
        if not (final or do_eval or save or step % job.log_every == 0):
            continue
        metrics = {"step": step, "tokens": step * B * T, "train_loss": window / window_steps,
                   "lr_now": float(optimizer.param_groups[0]["lr"]), "skipped_steps": optimizer.skipped_steps}
        window, window_steps = 0.0, 0
        if do_eval:
            optimizer.finish_param_sync()
            iters = int(spec.get("final_eval_iters") or dcfg.eval_iters) if final else dcfg.eval_iters
            metrics["val_loss"] = evaluate(model, data, iters=iters, **eval_kw)
        if final:
            metrics["final_val_loss"] = metrics["val_loss"]
            metrics["trial_wall_s"] = time.perf_counter() - t_start
        if save:
            optimizer.finish_param_sync()
            with tempfile.TemporaryDirectory(prefix="study-ckpt-") as tmp:
                save_checkpoint(Path(tmp) / CKPT_DIR, optimizer, model=model, step=step,
                                lr_scheduler=scheduler, extra={"trial": key}).wait()
                session.report(metrics, checkpoint_dir=tmp)
        else:
            session.report(metrics)
    _log_event(spec.get("log_path"), event="finish", key=key, final_val_loss=metrics.get("final_val_loss"))
    print(f"[study] {key}: final val loss {metrics['final_val_loss']:.4f} after {job.steps} steps "
          f"({metrics['trial_wall_s']:.0f} s{f', resumed at step {start}' if start else ''})", flush=True)
    return metrics


def tune_trainable(config: dict) -> None:
    """The Ray Tune function trainable: ``config["trial"]`` is the arm, the rest is shared."""
    spec = {k: v for k, v in config.items() if k != "trial"}
    train_trial({**spec, **config["trial"]}, TuneSession())


def arm_name(arm: Mapping[str, Any]) -> str:
    """A short, file-name-safe name of an arm: ``grams_lr0.004_seed1``."""
    return f"{arm['optimizer']}_lr{float(arm['lr']):g}_seed{int(arm['seed'])}"


def trial_name(trial) -> str:
    """Ray Tune's ``trial_name_creator`` / ``trial_dirname_creator``: the arm's name."""
    return arm_name(trial.config["trial"])
