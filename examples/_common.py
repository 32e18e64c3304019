"""Shared pieces of the launcher examples (``pretrain_compare.py``, ``lam_sweep.py``,
``resume_demo.py``): build a job config from ``launcher/configs/gpt_tiny.toml``, run it
with :func:`launcher.run.driver.run` in one embedded Ray session, collect its loss
history, and write the CSV, the loss-curve plot and the Markdown table.

The loss history is the launcher's ``RunResult.history``: rank 0's metrics reports, one per
reported step (every ``log_every`` steps, every evaluation and the last step), read from
the run dir's ``.sharded_ams/metrics.jsonl``. Evaluation steps are log steps
(``eval_every`` a multiple of ``log_every``), so that the train-loss points stay evenly
spaced windows of ``log_every`` steps.

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

# Read by Ray at import/init time, as launcher.run.driver sets them: an embedded
# single-user Ray needs no token auth (Ray 2.60's default), and the launcher uses Train V2.
# (The launcher's run() also sets Ray Train's faster report polling for a local Ray.)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

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
    result: Any = field(default=None, repr=False)  # launcher.run.driver.RunResult

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
                         f"({log_every}), so that every val loss has a train-loss point")


def make_config(storage: os.PathLike | str, name: str, *, steps: int, workers: int = 2,
                backend: str = "eager", log_every: int = 10, eval_every: int = 50,
                model: Optional[Mapping[str, Any]] = None, optim: Optional[Mapping[str, Any]] = None,
                job: Optional[Mapping[str, Any]] = None,
                overrides: Sequence[str] = (), config: os.PathLike | str = GPT_TINY) -> Config:
    """``config`` (default gpt_tiny.toml) with the run's name, length and workers; the run
    dir keeps only its newest checkpoint (``job.keep_last = 1``: the final one, once done),
    and the config file's ``checkpoint_every`` is rounded up to a multiple of ``log_every``.

    ``model``/``optim``/``job`` are extra ``{key: value}`` settings of those sections;
    ``overrides`` are ``section.key=value`` strings (as ``sharded-ams train --set``) applied
    last.
    """
    check_intervals(steps, log_every, eval_every)
    ov: dict[str, Any] = {
        "job.storage_path": str(Path(storage).absolute()), "job.name": name, "job.steps": steps,
        "job.num_workers": workers, "job.log_every": log_every, "job.eval_every": eval_every,
        "job.keep_last": 1, "job.fail_at_step": None, "optim.backend": backend,
    }
    ov.update({f"model.{k}": v for k, v in (model or {}).items()})
    ov.update({f"optim.{k}": v for k, v in (optim or {}).items()})
    ov.update({f"job.{k}": v for k, v in (job or {}).items()})
    ov.update(dict(map(parse_override, overrides)))
    cfg = load_config(config, ov, environ={})  # environ={}: ignore SHARDED_AMS_FAIL_* here
    j = cfg.job
    if j.checkpoint_every % j.log_every and "job.checkpoint_every" not in ov:
        # A checkpoint step reports too, and every report starts a new train-loss window:
        # checkpoint at log steps only (the config file's interval, rounded up to a multiple).
        ov["job.checkpoint_every"] = -(-j.checkpoint_every // j.log_every) * j.log_every
        cfg = load_config(config, ov, environ={})
    return cfg


# ----------------------------------------------------------------------------- running


@contextmanager
def local_ray(num_workers: int = 2) -> Iterator[None]:
    """One embedded Ray for all the runs of an example: ``launcher.run.driver.run`` uses
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
        from launcher.run.ray_orphans import shutdown

        shutdown()  # and kill what of this Ray hung in its exit (Ray 2.60)


def history_from_result(res: Any, cfg: Config, key: str, title: str) -> History:
    """The loss history of a finished run from the launcher's ``RunResult.history``.

    Raises RuntimeError naming the missing steps if it lacks a logged step (e.g. a run dir
    on an object store, where the launcher keeps no history)."""
    by_step = {int(r["step"]): r for r in res.history if r.get("loss") is not None}
    job = cfg.job
    expected = set(range(job.log_every, job.steps + 1, job.log_every)) | {job.steps}
    missing = sorted(expected - set(by_step))
    if missing:
        raise RuntimeError(
            f"run {job.name!r}: no train loss for step(s) {missing[:10]} in its metrics history "
            f"(has {sorted(by_step)[:10]}...; the launcher keeps it in local/NFS run dirs only)")
    steps = sorted(by_step)
    return History(
        key=key, title=title, steps=steps,
        train_loss=[float(by_step[s]["loss"]) for s in steps],
        val_loss=[None if by_step[s].get("val_loss") is None else float(by_step[s]["val_loss"])
                  for s in steps],
        final_train=res.train_loss, final_val=res.val_loss, wall_time_s=res.wall_time_s,
        result=res,
    )


def run_with_history(cfg: Config, key: str, title: str, *, fresh: bool = True) -> History:
    """Run ``cfg`` with the launcher (in the current Ray, see :func:`local_ray`) and return
    its loss history.

    ``fresh``: delete ``storage_path/name`` first, so that an earlier run of the example is
    not resumed (the launcher resumes a run dir that exists)."""
    from launcher.run.driver import run

    if fresh and Path(cfg.job.run_dir).exists():
        shutil.rmtree(cfg.job.run_dir)
    return history_from_result(run(cfg), cfg, key, title)


Runner = Callable[[Config, str, str], History]


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


def untuned_note(lr: float) -> str:
    """What the examples print under their tables: the lr is shared, not tuned, one seed."""
    return (f"note: every run uses the same peak lr ({lr:g}), not tuned per optimizer, and one seed: a "
            "difference here is not evidence for one optimizer. examples/optimizer_study.py tunes the lr "
            "per optimizer and runs several seeds (benchmarks/RESULTS.md, \"Optimizer study\").")


def describe(cfg: Config) -> str:
    """One line about the task shared by the runs."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    return (f"GPT {m.n_layer}x{m.n_embd} (block {m.block_size}), {d.max_bytes:,} bytes of stdlib "
            f"sources, global batch {d.batch_size}, {cfg.job.steps} steps on {cfg.job.num_workers} "
            f"workers, lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps}), betas {o.betas}, "
            f"wd {o.weight_decay:g}, clip {o.max_grad_norm}, seed {d.seed}, backend {o.backend}")
