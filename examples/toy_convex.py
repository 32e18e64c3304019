"""The Grams paper's Figure 1 setting: optimizers on an ill-conditioned convex quadratic.

    f(w) = (0.5 w1)^2 + (0.1 w2)^2        (minimum 0 at w = (0, 0))

Each optimizer starts from the same point (default w0 = (0.5, 1.5); the paper's exact
start is not reproduced here, pass ``--start`` to change it) and runs ``--steps`` full-batch
steps (default 2000):

* Grams (``sharded_ams.Grams``), Adam (``sharded_ams.AdamW`` with weight decay 0) and
  C-Adam (``sharded_ams.CAdam``) at lr 0.01, default betas (0.9, 0.999), eps 1e-8;
* Lion and C-Lion (Cautious Lion) at lr 0.001, betas (0.9, 0.99), as baselines implemented
  here as small ``torch.optim.Optimizer`` classes.

What it shows: the curvatures differ by 25x, so w1 converges long before w2 and momentum
keeps pushing w1 past 0 after its gradient changed sign. Adam follows m; Grams takes each
coordinate's direction from the current gradient (sign(g) |u|), C-Adam and C-Lion drop the
coordinates where the update disagrees with the gradient, so they stop overshooting there.
The script prints the final objective of each optimizer as a Markdown table and saves a
PNG with the trajectories on the contours of f (left) and f over the steps on a log scale
(right, floored at 1e-30) to ``--out`` (default out/toy_convex.png).

    PYTHONPATH=. python examples/toy_convex.py --steps 2000 --out out/toy_convex.png
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


def optimizers() -> dict[str, tuple[Callable, dict]]:
    """name -> (constructor, kwargs) of the compared optimizers."""
    return {
        "Grams": (Grams, dict(lr=0.01)),
        "Adam": (AdamW, dict(lr=0.01, weight_decay=0.0)),
        "C-Adam": (CAdam, dict(lr=0.01)),
        "Lion": (Lion, dict(lr=0.001, betas=(0.9, 0.99))),
        "C-Lion": (Lion, dict(lr=0.001, betas=(0.9, 0.99), cautious=True)),
    }


def run_one(ctor: Callable, kwargs: dict, start, steps: int):
    """Trajectory (steps + 1, 2) and objective values (steps + 1,) of one optimizer."""
    w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = ctor([w], **kwargs)
    path, losses = [w.detach().clone()], [objective(w.detach()).item()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = objective(w)
        loss.backward()
        opt.step()
        path.append(w.detach().clone())
        losses.append(objective(w.detach()).item())
    return torch.stack(path), losses


def plot(results: dict, start, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5))
    lim = 1.25 * max(abs(start[0]), abs(start[1]), 0.5)
    for path, _ in results.values():
        lim = max(lim, 1.05 * float(path.abs().max()))
    xs = torch.linspace(-lim, lim, 301)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    fz = objective(torch.stack([gx, gy], dim=-1))
    ax0.contour(gx.numpy(), gy.numpy(), fz.numpy(), levels=25, cmap="Greys", linewidths=0.6)
    for name, (path, losses) in results.items():
        p = path.numpy()
        ax0.plot(p[:, 0], p[:, 1], label=name, linewidth=1.2)
        ax1.plot(range(len(losses)), [max(x, 1e-30) for x in losses], label=name)
    ax0.plot([start[0]], [start[1]], "ko", label="start")
    ax0.plot([0], [0], "k*", markersize=10, label="minimum")
    ax0.set(xlabel="w1", ylabel="w2", title="f(w) = (0.5 w1)^2 + (0.1 w2)^2",
            aspect="equal")
    ax0.legend(fontsize=8)
    ax1.set(yscale="log", xlabel="step", ylabel="f(w)", title="objective")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description="Grams paper Figure 1: a toy convex problem")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--start", type=float, nargs=2, default=DEFAULT_START, metavar=("W1", "W2"))
    ap.add_argument("--out", default="out/toy_convex.png")
    a = ap.parse_args(argv)
    start = tuple(a.start)
    results = {name: run_one(ctor, kw, start, a.steps)
               for name, (ctor, kw) in optimizers().items()}
    f0 = objective(torch.tensor(start)).item()
    print(f"f(w0) = {f0:.6g} at w0 = {start}, {a.steps} steps\n")
    print("| optimizer | lr | final f(w) | final w |")
    print("|---|---:|---:|---|")
    for name, (path, losses) in results.items():
        lr = optimizers()[name][1]["lr"]
        w = path[-1]
        print(f"| {name} | {lr:g} | {losses[-1]:.3e} | ({w[0]:.4g}, {w[1]:.4g}) |")
    out = Path(a.out)
    plot(results, start, out)
    print(f"\nsaved {out}")
    return {"f0": f0, "final": {n: r[1][-1] for n, r in results.items()},
            "losses": {n: r[1] for n, r in results.items()}, "out": str(out)}


if __name__ == "__main__":
    main()
