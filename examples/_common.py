"""Shared pieces of the launcher examples (``pretrain_compare.py``, ``lam_sweep.py``,
``resume_demo.py``): build a job config from ``launcher/configs/gpt_tiny.toml``, run it
with :func:`launcher.ray_launcher.run` in one embedded Ray session, collect its loss
history, and write the CSV, the loss-curve plot and the Markdown table.

Where the loss history comes from: ``run()`` returns a :class:`RunResult` with the final
losses only, and Ray Train V2 keeps no history of metrics-only reports
(``ray.train.report(metrics)``): ``Result.metrics_dataframe`` holds the metrics of the
*retained checkpoints* only. So :func:`make_config` checkpoints at every log step
(``job.checkpoint_every = job.log_every``) and keeps them all (``job.keep_last``),
:func:`history_from_result` reads ``result.ray_result.metrics_dataframe``, and
:func:`prune_to_final` then deletes all but the final checkpoint. Evaluation steps must be
log steps (``eval_every`` a multiple of ``log_every``), or their val loss is reported
without a checkpoint and lost.

Each train-loss point is the launcher's ``loss`` metric: the mean over the ``log_every``
steps ending at that step, averaged over the workers.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Read by Ray at import/init time, as launcher.ray_launcher sets them: an embedded
# single-user Ray needs no token auth (Ray 2.60's default), and the launcher uses Train V2.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller collects each worker's ray.train.report() when it polls the
# workers, every 2 s by default, and a worker's next report waits for that (a queue of
# one): logging every 10 steps then costs ~2 s per report (300 steps of the tiny GPT on 2
# CPU workers: 75 s instead of 25 s). Poll every 0.25 s in the Ray these examples start
# (read by the controller actor, so it must be set before ray.init; no effect on a Ray
# that is already running).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

from launcher.config import Config, load_config, parse_override  # noqa: E402  (no torch/ray import)

GPT_TINY = ROOT / "launcher" / "configs" / "gpt_tiny.toml"
# Model shapes of the examples' --model flag, as changes to gpt_tiny.toml's [model]
# (2 layers x 64 wide, 2 heads, 0.12M params). "small" (0.83M params): ~40 s instead of
# ~25 s per 300-step run on 2 CPU workers.
MODELS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4},
}
BACKENDS = ("eager", "compiled", "auto", "triton")


@dataclass
class History:
    """One run's loss history. ``key`` goes into the CSV, ``title`` into legends/tables."""

    key: str
    title: str
    steps: list[int]
    train_loss: list[float]
    val_loss: list[Optional[float]]  # None at the steps without an evaluation
    final_train: Optional[float] = None
    final_val: Optional[float] = None
    wall_time_s: float = 0.0
    result: Any = field(default=None, repr=False)  # launcher.ray_launcher.RunResult

    def val_points(self) -> tuple[list[int], list[float]]:
        pts = [(s, v) for s, v in zip(self.steps, self.val_loss) if v is not None]
        return [s for s, _ in pts], [v for _, v in pts]


# ----------------------------------------------------------------------------- configs


def check_intervals(steps: int, log_every: int, eval_every: int) -> None:
    """argparse-level checks of the shared flags (ValueError with the flag's name)."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {log_every}")
    if eval_every < 0 or (eval_every and eval_every % log_every):
        raise ValueError(f"--eval-every ({eval_every}) must be 0 or a multiple of --log-every "
                         f"({log_every}): only reports with a checkpoint are kept by Ray")


def make_config(storage: os.PathLike | str, name: str, *, steps: int, workers: int = 2,
                backend: str = "eager", log_every: int = 10, eval_every: int = 50,
                model: Optional[Mapping[str, Any]] = None, optim: Optional[Mapping[str, Any]] = None,
                job: Optional[Mapping[str, Any]] = None,
                overrides: Sequence[str] = (), config: os.PathLike | str = GPT_TINY,
                history: bool = True) -> Config:
    """``config`` (default gpt_tiny.toml) with the run's name, length and workers.

    ``history=True`` checkpoints at every log step and keeps them all, so that
    :func:`history_from_result` finds every logged loss. ``model``/``optim``/``job`` are
    extra ``{key: value}`` settings of those sections; ``overrides`` are ``section.key=value``
    strings (as ``sharded-ams train --set``) applied last.
    """
    check_intervals(steps, log_every, eval_every)
    ov: dict[str, Any] = {
        "job.storage_path": str(Path(storage).absolute()), "job.name": name, "job.steps": steps,
        "job.num_workers": workers, "job.log_every": log_every, "job.eval_every": eval_every,
        "job.fail_at_step": None, "optim.backend": backend,
    }
    if history:
        ov.update({"job.checkpoint_every": log_every, "job.keep_last": steps // log_every + 2})
    ov.update({f"model.{k}": v for k, v in (model or {}).items()})
    ov.update({f"optim.{k}": v for k, v in (optim or {}).items()})
    ov.update({f"job.{k}": v for k, v in (job or {}).items()})
    ov.update(dict(map(parse_override, overrides)))
    return load_config(config, ov, environ={})  # environ={}: ignore SHARDED_AMS_FAIL_* here


# ----------------------------------------------------------------------------- running


@contextmanager
def local_ray(num_workers: int = 2) -> Iterator[None]:
    """One embedded Ray for all the runs of an example: ``launcher.ray_launcher.run`` uses
    an already started Ray as it is (and leaves it running). Nothing is started if Ray is
    already up (e.g. a test fixture's)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=max(2, num_workers), include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def history_from_result(res: Any, cfg: Config, key: str, title: str) -> History:
    """The loss history of a finished run from Ray's ``Result.metrics_dataframe``.

    Raises RuntimeError naming the missing steps if it lacks a logged step (a config made
    without ``make_config(history=True)``, or a launcher that reports differently)."""
    df = getattr(res.ray_result, "metrics_dataframe", None)
    if df is None or len(df) == 0 or "step" not in df or "loss" not in df:
        raise RuntimeError(
            f"run {cfg.job.name!r}: Ray's Result.metrics_dataframe has no step/loss rows "
            f"({None if df is None else list(df.columns)}); it only holds the metrics of "
            "retained checkpoints: use make_config(history=True)")
    by_step: dict[int, dict] = {}
    for row in df.to_dict("records"):  # after a restart a step can appear twice: keep the last
        if row.get("loss") is not None and not _isnan(row["loss"]):
            by_step[int(row["step"])] = row
    job = cfg.job
    expected = set(range(job.log_every, job.steps + 1, job.log_every)) | {job.steps}
    missing = sorted(expected - set(by_step))
    if missing:
        raise RuntimeError(
            f"run {job.name!r}: no metrics for step(s) {missing[:10]} in Ray's metrics_dataframe "
            f"(has {sorted(by_step)[:10]}...); it only holds retained checkpoints' metrics: "
            "checkpoint at every log step and keep them all (make_config(history=True))")
    steps = sorted(by_step)
    val = [by_step[s].get("val_loss") for s in steps]
    return History(
        key=key, title=title, steps=steps,
        train_loss=[float(by_step[s]["loss"]) for s in steps],
        val_loss=[None if v is None or _isnan(v) else float(v) for v in val],
        final_train=res.train_loss, final_val=res.val_loss, wall_time_s=res.wall_time_s,
        result=res,
    )


def run_with_history(cfg: Config, key: str, title: str, *, fresh: bool = True,
                     prune: bool = True) -> History:
    """Run ``cfg`` with the launcher (in the current Ray, see :func:`local_ray`) and return
    its loss history.

    ``fresh``: delete ``storage_path/name`` first, so that an earlier run of the example is
    not resumed (the launcher resumes a run dir that exists). ``prune``: then delete the
    intermediate checkpoints (see :func:`prune_to_final`)."""
    from launcher.ray_launcher import run

    if fresh and Path(cfg.job.run_dir).exists():
        shutil.rmtree(cfg.job.run_dir)
    res = run(cfg)
    history = history_from_result(res, cfg, key, title)
    if prune and res.checkpoint:
        prune_to_final(cfg.job.run_dir, res.checkpoint)
    return history


def prune_to_final(run_dir: os.PathLike | str, final_checkpoint: os.PathLike | str) -> None:
    """Delete every ``step-*`` checkpoint of a local run dir but ``final_checkpoint`` (the
    per-log-step ones were only needed for the history: 4 layers x 128 keep ~9 MB each),
    and Ray's ``checkpoint_manager_snapshot.json``, which lists them. The run stays
    resumable: without a snapshot the launcher resumes from the newest committed
    checkpoint in the run dir."""
    final = Path(final_checkpoint).resolve()
    for d in Path(run_dir).glob("step-*"):
        if d.is_dir() and d.resolve() != final:
            shutil.rmtree(d)
    (Path(run_dir) / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)


Runner = Callable[[Config, str, str], History]


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ----------------------------------------------------------------------------- outputs


def write_csv(path: os.PathLike | str, histories: Sequence[History], key_column: str = "optimizer") -> Path:
    """Rows ``key_column, step, train_loss, val_loss`` (val_loss empty where not evaluated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([key_column, "step", "train_loss", "val_loss"])
        for h in histories:
            for s, tl, vl in zip(h.steps, h.train_loss, h.val_loss):
                w.writerow([h.key, s, f"{tl:.6f}", "" if vl is None else f"{vl:.6f}"])
    return path


def read_csv(path: os.PathLike | str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(histories: Sequence[History], first_column: str = "optimizer") -> str:
    """Final train loss (mean of the last log window), final val loss and wall time per run,
    best val loss in bold."""
    vals = [h.final_val for h in histories if h.final_val is not None]
    best = min(vals) if vals else None

    def fmt(x: Optional[float], bold: bool = False) -> str:
        if x is None:
            return "n/a"
        return f"**{x:.4f}**" if bold else f"{x:.4f}"

    lines = [f"| {first_column} | final train loss | final val loss | wall time |",
             "|---|---:|---:|---:|"]
    for h in histories:
        lines.append(f"| {h.title} | {fmt(h.final_train)} | {fmt(h.final_val, h.final_val == best)} "
                     f"| {h.wall_time_s:.0f} s |")
    return "\n".join(lines)


def colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def draw_curves(ax, histories: Sequence[History], *, zoom: bool = False) -> None:
    """Train loss (lines) and val loss (markers) vs step, one colour per run. ``zoom``: the
    second half of the steps, y-limits fitted to it."""
    cs = colors(len(histories))
    lo, hi = math.inf, -math.inf
    for h, c in zip(histories, cs):
        ax.plot(h.steps, h.train_loss, color=c, linewidth=1.4, label=f"{h.title} train")
        vs, vv = h.val_points()
        if vs:
            ax.plot(vs, vv, "o--", color=c, markersize=5, linewidth=0.8, alpha=0.9,
                    label=f"{h.title} val")
        if zoom:
            start = h.steps[-1] / 2
            ys = [y for s, y in zip(h.steps, h.train_loss) if s >= start]
            ys += [y for s, y in zip(vs, vv) if s >= start]
            if ys:
                lo, hi = min(lo, *ys), max(hi, *ys)
    if zoom and math.isfinite(lo):
        pad = 0.08 * max(hi - lo, 1e-3)
        ax.set_xlim(max(h.steps[-1] for h in histories) / 2, None)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set(xlabel="step", ylabel="loss (nats/byte)")
    ax.grid(alpha=0.3)


def plot_curves(path: os.PathLike | str, histories: Sequence[History], title: str) -> Path:
    """Two panels: all steps, and the second half zoomed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5))
    draw_curves(ax0, histories)
    ax0.set_title("train loss (mean of each log window) and val loss (o)")
    ax0.legend(fontsize=8, ncol=2)
    draw_curves(ax1, histories, zoom=True)
    ax1.set_title("second half, zoomed")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: os.PathLike | str) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(cfg: Config) -> str:
    """One line about the task shared by the runs."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    return (f"GPT {m.n_layer}x{m.n_embd} (block {m.block_size}), {d.max_bytes:,} bytes of stdlib "
            f"sources, global batch {d.batch_size}, {cfg.job.steps} steps on {cfg.job.num_workers} "
            f"workers, lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps}), betas {o.betas}, "
            f"wd {o.weight_decay:g}, clip {o.max_grad_norm}, seed {d.seed}, backend {o.backend}")
