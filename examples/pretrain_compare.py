"""Pretraining with Grams vs AdamW vs C-Adam: the launcher's GPT, the same run three times.

    python examples/pretrain_compare.py                       # 300 steps, 2 CPU workers
    python examples/pretrain_compare.py --steps 1000 --workers 4 --backend compiled

What it shows: the same job (``launcher/configs/gpt_tiny.toml``, a byte-level GPT on the
Python standard library's sources, by default widened to 4 layers x 128: ``--model``)
trained with ShardedAMS under each preset, on ``--workers`` Ray Train workers of one
embedded local Ray (the runs one after the other). Everything but the preset is identical:
seed (model init and batch order), data, ``--steps``, the LR schedule (warmup 20 steps,
cosine to 0.1 lr at the last step) and the SAME peak lr for all (3e-3 from the config;
``--lr`` sets another, still shared), betas (0.9, 0.95), weight decay 0.1, gradient
clipping at 1.0. One seed, a few hundred steps and an lr tuned for none of them: the
script says so under its table. ``examples/optimizer_study.py`` is the tuned, multi-seed
comparison (benchmarks/RESULTS.md, "Optimizer study"). The defaults take
~45 s per run on 2 CPU cores.

The per-step losses come from the launcher's ``RunResult.history`` (see
``examples/_common.py``). Written to ``--out`` (default out/pretrain_compare):

* ``losses.csv``: optimizer, step, train_loss, val_loss (val every ``--eval-every`` steps
  and at the end, empty elsewhere); train_loss is the mean over the ``--log-every`` steps
  ending at that step;
* ``losses.png``: train loss vs step per optimizer with the val losses as points;
* ``runs/<optimizer>``: the launcher's run dirs with their final checkpoints (deleted
  at the next start).

It prints a Markdown table of final train/val loss per optimizer. ``--backend eager``
(default) skips the ~25 s torch.compile of ``auto`` in every new worker process; all
backends compute the same update (tested against one reference).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402
from _common import BACKENDS, History, Runner  # noqa: E402

OPTIMIZERS = {"grams": "Grams", "adamw": "AdamW", "cadam": "C-Adam"}  # preset -> title


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, out="out/pretrain_compare")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated presets to run (default {','.join(OPTIMIZERS)})")
    a = ap.parse_args(argv)
    a.optimizers = [o.strip().lower() for o in a.optimizers.split(",") if o.strip()]
    bad = [o for o in a.optimizers if o not in OPTIMIZERS]
    if bad or not a.optimizers:
        ap.error(f"--optimizers: unknown {bad}; choose from {list(OPTIMIZERS)}")
    check_common_args(ap, a)
    return a


def add_common_args(ap: argparse.ArgumentParser, out: str) -> None:
    """Flags shared with lam_sweep.py."""
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    ap.add_argument("--backend", default="eager", choices=BACKENDS,
                    help="ShardedAMS step kernel (default eager: no torch.compile in the workers)")
    ap.add_argument("--model", default="small", choices=list(_common.MODELS),
                    help="GPT size: tiny (gpt_tiny.toml: 2 layers x 64) or small (4 layers x 128, "
                         "4 heads; default)")
    ap.add_argument("--lr", type=float, default=None, help="peak lr for every run (default: the config's, 3e-3)")
    ap.add_argument("--log-every", type=int, default=10, help="steps per train-loss point (default 10)")
    ap.add_argument("--eval-every", type=int, default=50,
                    help="steps between val losses, a multiple of --log-every; 0: only at the end (default 50)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other config setting for every run, e.g. --set model.n_layer=4")
    ap.add_argument("--out", default=out, help=f"output directory (default {out})")


def check_common_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    try:
        _common.check_intervals(a.steps, a.log_every, a.eval_every)
    except ValueError as e:
        ap.error(str(e))
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    try:  # bad --set keys/values, a batch not divisible by --workers, ...
        config_for(a, "check", {})
    except ValueError as e:
        ap.error(str(e))


def config_for(a: argparse.Namespace, name: str, optim: dict):
    """The job config of one run of this example (runs under ``--out``/runs/``name``)."""
    if a.lr is not None:
        optim = {**optim, "lr": a.lr}
    return _common.make_config(Path(a.out) / "runs", name, steps=a.steps, workers=a.workers,
                               backend=a.backend, log_every=a.log_every, eval_every=a.eval_every,
                               model=_common.MODELS[a.model], optim=optim, overrides=a.overrides)


def run_all(a: argparse.Namespace, runs: list[tuple[str, str, str, dict]],
            runner: Optional[Runner] = None) -> list[History]:
    """Run each ``(run name, CSV key, title, optim settings)`` in one local Ray; return their
    histories. The configs are all built (and checked) before the first run starts. A
    custom ``runner`` (tests) is called without starting Ray."""
    configs = [(key, title, config_for(a, name, optim)) for name, key, title, optim in runs]
    print(f"[example] task: {_common.describe(configs[0][2])}", flush=True)
    session = _common.local_ray(a.workers) if runner is None else contextlib.nullcontext()
    runner = runner or _common.run_with_history
    histories = []
    with session:
        for i, (key, title, cfg) in enumerate(configs, 1):
            print(f"\n[example] run {i}/{len(configs)}: {title}", flush=True)
            histories.append(runner(cfg, key, title))
    return histories


def main(argv: Optional[list[str]] = None, runner: Optional[Runner] = None) -> dict:
    """Returns ``{"histories", "csv", "png", "table", "wall_time_s"}``. ``runner`` replaces
    :func:`_common.run_with_history` (tests)."""
    a = parse_args(argv)
    t0 = time.perf_counter()
    runs = [(k, k, OPTIMIZERS[k], {"preset": k}) for k in a.optimizers]
    histories = run_all(a, runs, runner)
    out = Path(a.out)
    csv_path = _common.write_csv(out / "losses.csv", histories, "optimizer")
    cfg = config_for(a, "x", {})
    png = _common.plot_curves(out / "losses.png", histories,
                              f"{' vs '.join(h.title for h in histories)}: GPT {cfg.model.n_layer}x{cfg.model.n_embd}, "
                              f"{a.steps} steps, {a.workers} workers, lr {cfg.optim.lr:g} (same for all, untuned)")
    table = _common.markdown_table(histories, "optimizer")
    wall = time.perf_counter() - t0
    print(f"\n{table}\n\n{_common.untuned_note(cfg.optim.lr)}\nwrote {csv_path} and {png} ({wall:.0f} s in all)",
          flush=True)
    return {"histories": histories, "csv": csv_path, "png": png, "table": table, "wall_time_s": wall}


if __name__ == "__main__":
    main()
