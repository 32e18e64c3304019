"""The AMS lam sweep: lam in {1, 0.5, 0, -0.5, -1} with beta3 = 0 on the launcher's GPT.

    python examples/lam_sweep.py                              # 5 runs x 300 steps, 2 CPU workers
    python examples/lam_sweep.py --lams 1,0,-1 --steps 1000

What it shows (the ablation of the Grams paper's Table 1): with beta3 = 0 the sign
reference is the current gradient g, and lam is the weight of the coordinates where the
Adam update u disagrees with g: lam = 1 is AdamW, lam = 0 is C-Adam (those coordinates are
dropped), lam = -1 is Grams (they are flipped: sign(g) |u|); 0.5 and -0.5 lie between.
For |lam| != 1 the step is rescaled per tensor by d / (#agree + |lam| #disagree).

Each lam trains the same job as ``examples/pretrain_compare.py`` (same config, seed,
data, lr schedule and the same lr for every lam, untuned, as the script says under its
table; same flags) with ``optim.preset = ""`` (no preset),
``optim.beta3 = 0`` and ``optim.lam = lam``. Written to ``--out`` (default out/lam_sweep):

* ``losses.csv``: lam, step, train_loss, val_loss (as pretrain_compare's CSV);
* ``lam_sweep.png``: the loss curves, and final val (and train) loss vs lam;
* ``runs/lam_<lam>``: the launcher's run dirs with their final checkpoints (deleted at the
  next start).

It prints a Markdown table of final train/val loss per lam.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import pretrain_compare  # noqa: E402
from _common import History, Runner  # noqa: E402

LAMS = (1.0, 0.5, 0.0, -0.5, -1.0)
SPECIAL = {1.0: "AdamW", 0.0: "C-Adam", -1.0: "Grams"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pretrain_compare.add_common_args(ap, out="out/lam_sweep")
    ap.add_argument("--lams", default=",".join(f"{x:g}" for x in LAMS),
                    help="comma-separated lam values (default 1,0.5,0,-0.5,-1)")
    a = ap.parse_args(argv)
    try:
        a.lams = [float(x) for x in a.lams.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lams must be comma-separated numbers, got {a.lams!r}")
    if not a.lams or len(set(a.lams)) != len(a.lams):
        ap.error(f"--lams must be distinct numbers, got {a.lams}")
    pretrain_compare.check_common_args(ap, a)
    return a


def title(lam: float) -> str:
    return f"lam={lam:g}" + (f" ({SPECIAL[lam]})" if lam in SPECIAL else "")


def plot(path: Path, histories: list[History], lams: list[float], heading: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(18, 5))
    _common.draw_curves(ax0, histories)
    ax0.set_title("train loss (mean of each log window) and val loss (o)")
    ax0.legend(fontsize=7, ncol=2)
    _common.draw_curves(ax1, histories, zoom=True)
    ax1.set_title("second half, zoomed")
    order = sorted(range(len(lams)), key=lambda i: lams[i])
    xs = [lams[i] for i in order]
    for attr, label, style in (("final_val", "final val loss", "o-"), ("final_train", "final train loss", "s--")):
        ys = [getattr(histories[i], attr) for i in order]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for x in xs:
        if x in SPECIAL:
            ax2.annotate(SPECIAL[x], (x, histories[lams.index(x)].final_val or 0.0),
                         textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax2.set(xlabel="lam (beta3 = 0)", ylabel="loss (nats/byte)", title="final loss vs lam")
    ax2.margins(x=0.08, y=0.15)  # room for the labels
    ax2.invert_xaxis()  # AdamW (1) on the left, Grams (-1) on the right, as the table
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(heading)
    fig.tight_layout()
    return _common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None, runner: Optional[Runner] = None) -> dict:
    """Returns ``{"histories", "csv", "png", "table", "wall_time_s"}``. ``runner`` replaces
    :func:`_common.run_with_history` (tests)."""
    a = parse_args(argv)
    t0 = time.perf_counter()
    runs = [(f"lam_{lam:g}", f"{lam:g}", title(lam), {"preset": "", "beta3": 0.0, "lam": lam})
            for lam in a.lams]
    histories = pretrain_compare.run_all(a, runs, runner)
    out = Path(a.out)
    csv_path = _common.write_csv(out / "losses.csv", histories, "lam")
    cfg = pretrain_compare.config_for(a, "x", {})
    png = plot(out / "lam_sweep.png", histories, a.lams,
               f"AMS lam sweep (beta3 = 0): GPT {cfg.model.n_layer}x{cfg.model.n_embd}, {a.steps} steps, "
               f"{a.workers} workers, lr {cfg.optim.lr:g} (same for all, untuned)")
    table = _common.markdown_table(histories, "lam")
    wall = time.perf_counter() - t0
    print(f"\n{table}\n\n{_common.untuned_note(cfg.optim.lr)}\nwrote {csv_path} and {png} ({wall:.0f} s in all)",
          flush=True)
    return {"histories": histories, "csv": csv_path, "png": png, "table": table, "wall_time_s": wall}


if __name__ == "__main__":
    main()
