"""The optimizer study's analysis: best lr per optimizer, mean ± std over seeds, the gaps
against seed noise (Welch's t-test), the verdict sentence, the table, the plots and the
CSV/JSON behind them. Pure functions of the trials' results (no torch, no Ray), so they are
tested on synthetic data (``tests/test_optimizer_study.py``).

Conventions:

* a trial's score is its final validation loss (lower is better); a non-finite or missing
  one means the trial diverged;
* the best lr of an optimizer is the lr whose sweep trial (the sweep seed) has the lowest
  final validation loss; diverged trials never win;
* the spread over seeds is the sample standard deviation (ddof = 1);
* two optimizers are "distinguishable" when Welch's two-sided t-test on their seeds' final
  losses gives p < ``alpha`` (0.05); with 3 seeds a gap must be several seed-stds wide for
  that, which is the honest bar at this sample size.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ALPHA = 0.05
TITLES = {"adamw": "AdamW", "cadam": "C-Adam", "grams": "Grams", "ams_lam-0.5": "AMS lam=-0.5"}


def title(key: str) -> str:
    return TITLES.get(key, key)


@dataclass
class TrialResult:
    """One finished trial: its arm (optimizer, lr, seed), its phase ("sweep" or "seeds"),
    its loss curve and final losses."""

    optimizer: str
    lr: float
    seed: int
    phase: str
    final_val_loss: Optional[float]
    final_train_loss: Optional[float] = None
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    train_loss: list[Optional[float]] = field(default_factory=list)
    val_loss: list[Optional[float]] = field(default_factory=list)  # None where not evaluated
    wall_s: float = 0.0

    @property
    def diverged(self) -> bool:
        return not _finite(self.final_val_loss)


@dataclass
class SeedStats:
    """Final validation loss of one optimizer at its best lr, over seeds."""

    optimizer: str
    lr: float
    values: list[float]  # finite final losses, in seed order
    seeds: list[int]
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.inf

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


@dataclass
class Comparison:
    """``focus`` against ``other``: gap = mean(other) - mean(focus) (positive: focus lower)."""

    focus: str
    other: str
    gap: float
    pooled_std: float
    gap_in_stds: float
    welch_t: float
    welch_df: float
    p_value: float

    @property
    def distinguishable(self) -> bool:
        return self.p_value < ALPHA


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


# ----------------------------------------------------------------------------- statistics


def sweep_grid(trials: Sequence[TrialResult], sweep_seed: int) -> dict[str, dict[float, Optional[float]]]:
    """``{optimizer: {lr: final val loss of the sweep seed}}`` (None: diverged), lrs ascending."""
    grid: dict[str, dict[float, Optional[float]]] = {}
    for t in sorted(trials, key=lambda t: (t.optimizer, t.lr)):
        if t.seed == sweep_seed and t.phase == "sweep":
            grid.setdefault(t.optimizer, {})[t.lr] = t.final_val_loss if _finite(t.final_val_loss) else None
    return grid


def best_lrs(trials: Sequence[TrialResult], sweep_seed: int) -> dict[str, float]:
    """The lr with the lowest final val loss in each optimizer's sweep (ties: the smaller lr).
    Raises ValueError naming an optimizer whose every sweep trial diverged."""
    best = {}
    for opt, by_lr in sweep_grid(trials, sweep_seed).items():
        ok = [(loss, lr) for lr, loss in by_lr.items() if loss is not None]
        if not ok:
            raise ValueError(f"{opt}: every lr of the sweep diverged ({sorted(by_lr)}); lower the lrs")
        best[opt] = min(ok)[1]
    return best


def edge_warnings(trials: Sequence[TrialResult], sweep_seed: int) -> list[str]:
    """Optimizers whose best lr is the smallest or largest of their grid: the optimum may lie
    outside it."""
    out = []
    grid = sweep_grid(trials, sweep_seed)
    for opt, lr in best_lrs(trials, sweep_seed).items():
        lrs = sorted(grid[opt])
        if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
            out.append(f"{title(opt)}: the best lr {lr:g} is at the {'low' if lr == lrs[0] else 'high'} "
                       f"edge of the grid {[f'{x:g}' for x in lrs]}; the optimum may lie outside it")
    return out


def seed_stats(trials: Sequence[TrialResult], best: Mapping[str, float]) -> dict[str, SeedStats]:
    """Every seed's final val loss at each optimizer's best lr (a seed run twice, e.g. in both
    phases, counts once)."""
    out = {}
    for opt, lr in best.items():
        by_seed: dict[int, TrialResult] = {}
        for t in trials:
            if t.optimizer == opt and t.lr == lr:
                by_seed.setdefault(t.seed, t)
        runs = [by_seed[s] for s in sorted(by_seed)]
        out[opt] = SeedStats(opt, lr, [t.final_val_loss for t in runs if not t.diverged],
                             [t.seed for t in runs if not t.diverged], sum(t.diverged for t in runs))
    return out


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) vs mean(b): ``(t, df, two-sided p)``
    (scipy.stats.ttest_ind(equal_var=False)); NaN when a sample has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    from scipy import stats

    res = stats.ttest_ind(a, b, equal_var=False)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else math.nan
    return float(res.statistic), df, float(res.pvalue)


def compare(stats: Mapping[str, SeedStats], focus: str, other: str) -> Comparison:
    f, o = stats[focus], stats[other]
    pooled = math.sqrt((f.std ** 2 + o.std ** 2) / 2) if f.n > 1 and o.n > 1 else math.nan
    gap = o.mean - f.mean
    t, df, p = welch(o.values, f.values)
    return Comparison(focus, other, gap, pooled, gap / pooled if pooled and math.isfinite(pooled) else math.nan,
                      t, df, p)


def ranking(stats: Mapping[str, SeedStats]) -> list[str]:
    """Optimizers by mean final val loss, lowest first."""
    return sorted(stats, key=lambda k: stats[k].mean)


def verdict(stats: Mapping[str, SeedStats], focus: str = "grams") -> dict[str, Any]:
    """What the data say about ``focus`` (Grams): ``{"headline", "lines", "comparisons",
    "ranking", "spread"}``. The headline is one of:

    * "<focus> wins": lowest mean, and every other optimizer is distinguishable (p < 0.05);
    * "<focus> has the lowest mean, but ...": lowest mean, some gap within seed noise;
    * "<focus> does not win": another optimizer has a lower mean (distinguishable or not, said).
    """
    order = ranking(stats)
    comps = [compare(stats, focus, o) for o in order if o != focus]
    name = title(focus)
    noisy = [c for c in comps if not c.distinguishable]
    if order[0] == focus:
        if not noisy:
            headline = f"{name} wins: its mean final val loss is the lowest and every gap is beyond seed noise (Welch p < {ALPHA})."
        else:
            headline = (f"{name} has the lowest mean final val loss, but its lead over "
                        f"{', '.join(title(c.other) for c in noisy)} is within seed noise (Welch p >= {ALPHA}).")
    else:
        lead = next(c for c in comps if c.other == order[0])
        how = ("a difference beyond seed noise" if lead.distinguishable
               else "but the gap is within seed noise")
        headline = (f"{name} does not win: {title(order[0])} has a lower mean final val loss by "
                    f"{-lead.gap:.4f} ({abs(lead.gap_in_stds):.1f} pooled seed-stds, Welch p = {lead.p_value:.2g}), {how}.")
    lines = []
    for c in comps:
        side = "lower" if c.gap > 0 else "higher"
        lines.append(f"{name} vs {title(c.other)}: {name} {side} by {abs(c.gap):.4f} = {abs(c.gap_in_stds):.1f} "
                     f"pooled seed-stds (Welch t = {c.welch_t:.2f}, df = {c.welch_df:.1f}, p = {c.p_value:.2g}): "
                     + ("distinguishable" if c.distinguishable else "within seed noise"))
    stds = [s.std for s in stats.values() if math.isfinite(s.std)]
    spread = {"median_seed_std": statistics.median(stds) if stds else math.nan,
              "range_of_means": stats[order[-1]].mean - stats[order[0]].mean}
    return {"headline": headline, "lines": lines, "comparisons": [asdict(c) for c in comps],
            "ranking": order, "spread": spread}


# ----------------------------------------------------------------------------- tables


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def results_table(stats: Mapping[str, SeedStats], reference: str = "adamw") -> str:
    """Markdown: optimizer, best lr, final val loss mean ± std (n seeds), gap to the reference
    in seed-stds; the lowest mean in bold."""
    order = ranking(stats)
    lines = ["| optimizer | best lr | final val loss, mean ± std | seeds | vs " + title(reference) + " |",
             "|---|---:|---:|---:|---:|"]
    for k in order:
        s = stats[k]
        cell = f"{s.mean:.4f} ± {s.std:.4f}"
        if k == order[0]:
            cell = f"**{cell}**"
        seeds = f"{s.n}" + (f" (+{s.diverged} diverged)" if s.diverged else "")
        if k == reference or reference not in stats:
            vs = "-"
        else:
            c = compare(stats, k, reference)
            vs = f"{-c.gap:+.4f} ({-c.gap_in_stds:+.1f} σ, p = {c.p_value:.2g})"
        lines.append(f"| {title(k)} | {fmt_lr(s.lr)} | {cell} | {seeds} | {vs} |")
    return "\n".join(lines)


def sweep_table(trials: Sequence[TrialResult], sweep_seed: int) -> str:
    """Markdown: final val loss of the sweep seed per optimizer (rows) and lr (columns); each
    row's best in bold, diverged runs as "diverged"."""
    grid = sweep_grid(trials, sweep_seed)
    best = best_lrs(trials, sweep_seed)
    lrs = sorted({lr for by in grid.values() for lr in by})
    lines = ["| optimizer | " + " | ".join(f"lr {fmt_lr(x)}" for x in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]
    for opt in sorted(grid, key=lambda o: list(TITLES).index(o) if o in TITLES else len(TITLES)):
        cells = []
        for lr in lrs:
            if lr not in grid[opt]:
                cells.append("")
            elif grid[opt][lr] is None:
                cells.append("diverged")
            else:
                v = f"{grid[opt][lr]:.4f}"
                cells.append(f"**{v}**" if lr == best[opt] else v)
        lines.append(f"| {title(opt)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def write_trials_csv(path: os.PathLike, trials: Sequence[TrialResult]) -> Path:
    """One row per trial: optimizer, lr, seed, phase, final losses, wall seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "seed", "phase", "final_val_loss", "final_train_loss", "wall_s"])
        for t in sorted(trials, key=lambda t: (t.phase, t.optimizer, t.lr, t.seed)):
            w.writerow([t.optimizer, repr(t.lr), t.seed, t.phase, _num(t.final_val_loss),
                        _num(t.final_train_loss), f"{t.wall_s:.1f}"])
    return path


def write_curves_csv(path: os.PathLike, trials: Sequence[TrialResult]) -> Path:
    """One row per reported step of every trial (val_loss empty where not evaluated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "seed", "phase", "step", "tokens", "train_loss", "val_loss"])
        for t in sorted(trials, key=lambda t: (t.phase, t.optimizer, t.lr, t.seed)):
            for i, s in enumerate(t.steps):
                w.writerow([t.optimizer, repr(t.lr), t.seed, t.phase, s, t.tokens[i] if t.tokens else "",
                            _num(t.train_loss[i]), _num(t.val_loss[i])])
    return path


def _num(x: Optional[float]) -> str:
    return "" if x is None else (f"{x:.6f}" if math.isfinite(x) else str(x))


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def summary(trials: Sequence[TrialResult], sweep_seed: int, focus: str = "grams",
            reference: str = "adamw") -> dict[str, Any]:
    """Everything the table, the plots and the verdict say, as one JSON-able dict."""
    best = best_lrs(trials, sweep_seed)
    stats = seed_stats(trials, best)
    out: dict[str, Any] = {
        "best_lr": best,
        "sweep": {o: {repr(lr): v for lr, v in by.items()} for o, by in sweep_grid(trials, sweep_seed).items()},
        "seeds": {k: {"lr": s.lr, "mean": s.mean, "std": s.std, "n": s.n, "values": s.values,
                      "seeds": s.seeds, "diverged": s.diverged} for k, s in stats.items()},
        "edge_warnings": edge_warnings(trials, sweep_seed),
        "table": results_table(stats, reference),
        "sweep_table": sweep_table(trials, sweep_seed),
    }
    if focus in stats and len(stats) > 1:
        out["verdict"] = verdict(stats, focus)
    return _json_safe(out)


def write_json(path: os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")
    return path


# ----------------------------------------------------------------------------- plots


def _band(trials: Sequence[TrialResult], attr: str) -> tuple[list[int], list[float], list[float]]:
    """Steps where every seed has a value, and the mean and std over seeds there."""
    per_step: dict[int, list[float]] = {}
    for t in trials:
        for s, v in zip(t.steps, getattr(t, attr)):
            if _finite(v):
                per_step.setdefault(s, []).append(v)
    steps = sorted(s for s, vs in per_step.items() if len(vs) == len(trials))
    means = [statistics.fmean(per_step[s]) for s in steps]
    stds = [statistics.stdev(per_step[s]) if len(per_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds


def plot_curves(path: os.PathLike, trials: Sequence[TrialResult], best: Mapping[str, float],
                heading: str) -> Path:
    """Train and val loss vs step at each optimizer's best lr: mean over seeds, band ± 1 std;
    the right panel zooms into the second half of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    cmap = matplotlib.colormaps["tab10"]
    for i, (opt, lr) in enumerate(sorted(best.items(), key=lambda kv: list(TITLES).index(kv[0]) if kv[0] in TITLES else 9)):
        runs = [t for t in trials if t.optimizer == opt and t.lr == lr]
        runs = list({t.seed: t for t in runs}.values())
        label = f"{title(opt)} lr {fmt_lr(lr)} ({len(runs)} seeds)"
        for ax, attr in ((axes[0], "train_loss"), (axes[1], "val_loss"), (axes[2], "val_loss")):
            steps, mean, std = _band(runs, attr)
            if not steps:
                continue
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            style = "-" if attr == "train_loss" else "o-"
            ax.plot(steps, mean, style, color=cmap(i), label=label, markersize=3, linewidth=1.3)
            ax.fill_between(steps, lo, hi, color=cmap(i), alpha=0.25, linewidth=0)
    axes[0].set_title("train loss (mean of each log window), mean ± std over seeds")
    axes[1].set_title("validation loss, mean ± std over seeds")
    axes[2].set_title("validation loss, second half")
    last = max((t.steps[-1] for t in trials if t.steps), default=1)
    axes[2].set_xlim(last / 2, last * 1.02)
    ys = [m + k * s for opt, lr in best.items()
          for st, ms, ss in [_band([t for t in trials if t.optimizer == opt and t.lr == lr], "val_loss")]
          for x, m, s in zip(st, ms, ss) if x >= last / 2 for k in (-1, 1)]
    if ys:
        pad = 0.1 * max(max(ys) - min(ys), 1e-3)
        axes[2].set_ylim(min(ys) - pad, max(ys) + pad)
    for ax in axes:
        ax.set(xlabel="step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(heading)
    fig.tight_layout()
    return _save(fig, path)


def plot_lr_sweep(path: os.PathLike, trials: Sequence[TrialResult], sweep_seed: int,
                  stats: Mapping[str, SeedStats], heading: str) -> Path:
    """Final val loss vs lr per optimizer (the sweep seed), the mean ± std over seeds at the
    best lr as an error bar; diverged runs as x at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = matplotlib.colormaps["tab10"]
    grid = sweep_grid(trials, sweep_seed)
    finite = [v for by in grid.values() for v in by.values() if v is not None]
    top = max(finite) if finite else 1.0
    for i, opt in enumerate(sorted(grid, key=lambda o: list(TITLES).index(o) if o in TITLES else 9)):
        lrs = sorted(grid[opt])
        ok = [(lr, grid[opt][lr]) for lr in lrs if grid[opt][lr] is not None]
        ax.plot([p[0] for p in ok], [p[1] for p in ok], "o-", color=cmap(i), label=f"{title(opt)} (seed {sweep_seed})")
        bad = [lr for lr in lrs if grid[opt][lr] is None]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=cmap(i), markersize=10)
        if opt in stats and stats[opt].n:
            s = stats[opt]
            ax.errorbar([s.lr * (1 + 0.04 * (i - 1.5))], [s.mean], yerr=[0 if math.isnan(s.std) else s.std],
                        fmt="s", color=cmap(i), capsize=4, markersize=6,
                        label=f"{title(opt)} best lr: mean ± std, {s.n} seeds")
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(heading, 90), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
