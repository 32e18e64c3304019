"""The Grams paper's Figure 1 setting: optimizers on an ill-conditioned convex quadratic.

    f(w) = (0.5 w1)^2 + (0.1 w2)^2        (minimum 0 at w = (0, 0))

Each optimizer starts from the same point (default w0 = (0.5, 1.5); the paper's exact
start and lr are not given, pass ``--start`` / ``--lrs`` to change them) and runs ``--steps``
full-batch steps, once per learning rate in ``--lrs`` (default 0.01 and 0.1):

* Grams (``sharded_ams.Grams``), Adam (``sharded_ams.AdamW`` with weight decay 0) and
  C-Adam (``sharded_ams.CAdam``) at the lr, default betas (0.9, 0.999), eps 1e-8;
* Lion and C-Lion (Cautious Lion) at a tenth of it, betas (0.9, 0.99), as baselines
  implemented here as small ``torch.optim.Optimizer`` classes.

Grams differs from Adam only where the momentum m points against the current gradient
g: it takes sign(g)|u| where Adam takes u = sign(m)|u|. At lr 0.01 only w1 overshoots,
late, when its term is a negligible part of f, and f (w2's term) goes down the same way
under both: the two curves lie on each other. At lr 0.1 Adam's momentum carries both
coordinates past the minimum within tens of steps; Grams follows the gradient there and
reaches a given f in about half the steps: the paper's effect. The script measures and
prints this (when m first turns against g, how far apart the curves get), a Markdown
table per lr, and a PNG (one row per lr: trajectories on the contours of f, and f over
the steps on a log scale cut at the fp32 rounding floor of w, not at 1e-30) to ``--out``
(default out/toy_convex.png).

    PYTHONPATH=. python examples/toy_convex.py --out out/toy_convex.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sharded_ams import AdamW, CAdam, Grams  # noqa: E402

DEFAULT_START = (0.5, 1.5)
# 0.01: the two curves coincide (see explain()); 0.1: Adam overshoots early, the paper's effect.
DEFAULT_LRS = (0.01, 0.1)


def objective(w: torch.Tensor) -> torch.Tensor:
    """f(w) = (0.5 w1)^2 + (0.1 w2)^2."""
    return (0.5 * w[..., 0]) ** 2 + (0.1 * w[..., 1]) ** 2


class Lion(Optimizer):
    """Lion (Chen et al. 2023): c = b1 m + (1 - b1) g; w -= lr sign(c) (decoupled decay
    first); m = b2 m + (1 - b2) g.

    ``cautious=True`` is C-Lion (Liang et al. 2024, "Cautious Optimizers"): the update
    sign(c) is zeroed where sign(c) * g <= 0 and the rest rescaled by d / #kept (per
    tensor, d = its numel; no rescale if nothing is kept), the same convention as C-Adam
    here."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, cautious: bool = False):
        if lr < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid lr {lr} or betas {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      cautious=cautious))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * b1 + g * (1 - b1)).sign_()
                if group["cautious"]:
                    keep = (update * g > 0).to(update.dtype)
                    kept = keep.sum()
                    scale = torch.where(kept > 0, keep.numel() / kept.clamp_min(1), 1.0)
                    update = update * keep * scale
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(g, alpha=1 - b2)
        return loss


def optimizers(adam_lr: float) -> dict[str, tuple[Callable, dict]]:
    """name -> (constructor, kwargs): the AMS family at ``adam_lr``, the Lions at a tenth
    of it (sign updates take full-size steps; the paper pairs them the same way)."""
    return {
        "Grams": (Grams, dict(lr=adam_lr)),
        "Adam": (AdamW, dict(lr=adam_lr, weight_decay=0.0)),
        "C-Adam": (CAdam, dict(lr=adam_lr)),
        "Lion": (Lion, dict(lr=adam_lr / 10, betas=(0.9, 0.99))),
        "C-Lion": (Lion, dict(lr=adam_lr / 10, betas=(0.9, 0.99), cautious=True)),
    }


def run_one(ctor: Callable, kwargs: dict, start, steps: int):
    """Trajectory (steps + 1, 2), objective values (steps + 1,) and, per step, which
    coordinates have momentum that disagrees with the gradient (m * g < 0 after the
    step: the optimizer is still pushed past the point where the slope turned)."""
    w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = ctor([w], **kwargs)
    path, losses, against = [w.detach().clone()], [objective(w.detach()).item()], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = objective(w)
        loss.backward()
        g = w.grad.detach().clone()
        opt.step()
        m = opt.state[w].get("exp_avg")
        against.append((m * g < 0).tolist() if m is not None else [False, False])
        path.append(w.detach().clone())
        losses.append(objective(w.detach()).item())
    return torch.stack(path), losses, against


def rounding_floor(start) -> float:
    """f at one fp32 rounding step of the start point: below it the curves show float
    rounding of w (fp32 params), not optimization."""
    eps = torch.finfo(torch.float32).eps
    return objective(torch.tensor(start, dtype=torch.float64) * eps).item()


def overshoot(against: list) -> dict:
    """When Adam's momentum first points against the gradient on each coordinate, and
    how much of f that coordinate held then: where it is tiny, Grams' different step
    on it cannot show in f."""
    out = {}
    for k, name in enumerate(("w1", "w2")):
        step = next((t for t, a in enumerate(against) if a[k]), None)
        out[name] = {"first_step": None if step is None else step + 1,
                     "steps": sum(1 for a in against if a[k])}
    return out


def summarize(results: dict, floor: float) -> dict:
    """Per optimizer: final f and the first step where f < 1e3 x the rounding floor."""
    target = 1e3 * floor
    out = {}
    for name, (_, losses, _) in results.items():
        reach = next((t for t, f in enumerate(losses) if f < target), None)
        out[name] = {"final": losses[-1], "steps_to_target": reach}
    return out


def plot(runs: dict, start, floor: float, out: Path) -> None:
    """One row per learning rate: trajectories on the contours of f, and f over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 5 * len(runs)), squeeze=False)
    for (ax0, ax1), (lr, results) in zip(axes, runs.items()):
        lim = 1.25 * max(abs(start[0]), abs(start[1]), 0.5)
        for path, _, _ in results.values():
            lim = max(lim, 1.05 * float(path.abs().max()))
        xs = torch.linspace(-lim, lim, 301)
        gx, gy = torch.meshgrid(xs, xs, indexing="xy")
        fz = objective(torch.stack([gx, gy], dim=-1))
        ax0.contour(gx.numpy(), gy.numpy(), fz.numpy(), levels=25, cmap="Greys", linewidths=0.6)
        for name, (path, losses, _) in results.items():
            p = path.numpy()
            style = "--" if name == "Adam" else "-"
            ax0.plot(p[:, 0], p[:, 1], style, label=name, linewidth=1.2)
            ax1.plot(range(len(losses)), [max(x, floor) for x in losses], style, label=name)
        ax0.plot([start[0]], [start[1]], "ko", label="start")
        ax0.plot([0], [0], "k*", markersize=10, label="minimum")
        ax0.set(xlabel="w1", ylabel="w2", aspect="equal",
                title=f"lr {lr:g} (Lions {lr / 10:g}): f(w) = (0.5 w1)^2 + (0.1 w2)^2")
        ax0.legend(fontsize=8)
        ax1.axhline(floor, color="grey", linewidth=0.6, linestyle=":")
        ax1.set(yscale="log", ylim=(floor / 2, None), xlabel="step", ylabel="f(w)",
                title=f"objective, lr {lr:g} (floor: fp32 rounding of w, {floor:.1e})")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def explain(lr: float, results: dict) -> str:
    """Why Grams and Adam coincide or part at this lr, from the measured run."""
    adam_path, adam_losses, adam_against = results["Adam"]
    _, grams_losses, _ = results["Grams"]
    rel = [abs(a - g) / max(a, g, 1e-300) for a, g in zip(adam_losses, grams_losses)]
    parted = next((t for t, r in enumerate(rel) if r > 0.01), None)
    ov = overshoot(adam_against)
    lines = [f"lr {lr:g}: Adam's momentum first points against the gradient on "
             + ", ".join(f"{k} at step {v['first_step']}" if v["first_step"] else f"{k} never"
                         for k, v in ov.items()) + "."]
    t1 = ov["w1"]["first_step"]
    share = None
    if t1 is not None:
        w = adam_path[t1]
        share = (0.5 * float(w[0])) ** 2 / max(objective(w).item(), 1e-300)
    if max(rel) == 0.0:
        lines.append("  Grams and Adam are the same run to the bit: sign(g) = sign(m) at every "
                     "step, so sign(g)|u| = u.")
    elif parted is None:
        lines.append(f"  The Grams and Adam curves lie on each other (at most {100 * max(rel):.2g}% "
                     "apart): only w1 overshoots"
                     + (f", from step {t1}, when it holds {share:.1e} of f" if share is not None else "")
                     + (". f is w2's term, and w2's momentum never turns against its gradient, "
                        "so Grams takes Adam's w2 steps" if ov["w2"]["first_step"] is None else
                        ". f is w2's term, and w2 overshoots only once f is small")
                     + ": sign(g)|u| = u wherever m and g agree. Raise the lr to see the "
                     "paper's effect.")
    else:
        lines.append(f"  Grams leaves Adam's curve at step {parted} (1% apart): it steps along the "
                     "current gradient where Adam's momentum still carries it past the minimum"
                     + (f" (w1 overshoots from step {t1}, holding {share:.1e} of f)" if share is not None else "")
                     + ".")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description="Grams paper Figure 1: a toy convex problem")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                    help="learning rates of Grams/Adam/C-Adam (Lions use a tenth); "
                         "one row of the figure each")
    ap.add_argument("--start", type=float, nargs=2, default=DEFAULT_START, metavar=("W1", "W2"))
    ap.add_argument("--out", default="out/toy_convex.png")
    a = ap.parse_args(argv)
    start = tuple(a.start)
    floor = rounding_floor(start)
    runs = {lr: {name: run_one(ctor, kw, start, a.steps)
                 for name, (ctor, kw) in optimizers(lr).items()} for lr in a.lrs}
    f0 = objective(torch.tensor(start)).item()
    print(f"f(w0) = {f0:.6g} at w0 = {start}, {a.steps} steps; fp32 rounding floor of f "
          f"{floor:.1e} (curves are cut there)\n")
    summary = {}
    for lr, results in runs.items():
        summary[lr] = summarize(results, floor)
        print(f"| optimizer (lr {lr:g}) | lr | final f(w) | steps to f < {1e3 * floor:.0e} |")
        print("|---|---:|---:|---:|")
        for name, row in summary[lr].items():
            reach = row["steps_to_target"]
            print(f"| {name} | {optimizers(lr)[name][1]['lr']:g} | {row['final']:.3e} | "
                  f"{'-' if reach is None else reach} |")
        print()
        print(explain(lr, results))
        print()
    out = Path(a.out)
    plot(runs, start, floor, out)
    print(f"saved {out}")
    return {"f0": f0, "floor": floor, "out": str(out), "summary": summary,
            "losses": {lr: {n: r[1] for n, r in res.items()} for lr, res in runs.items()},
            "overshoot": {lr: overshoot(res["Adam"][2])
                          for lr, res in runs.items()}}


if __name__ == "__main__":
    main()
