"""Does Grams help? A tuned, multi-seed comparison of AdamW, C-Adam, Grams and AMS lam=-0.5.

    python examples/optimizer_study.py                     # the CPU study (tiny Llama), ~25 min on 2 idle cores (est.)
    python examples/optimizer_study.py --preset smoke      # seconds: CI's end-to-end check
    python examples/optimizer_study.py --preset paper-60m --data /data/c4-tokens --address auto   # GPUs

What it does, in one Ray Tune session (``ray.tune.Tuner``; each trial one process with
``--cpus-per-trial`` CPUs or ``--gpus-per-trial`` GPUs, as many at once as the resources
allow):

1. data: the preset's text (CPU presets: the Python standard library's own sources, which
   ship with every Python) tokenized by ``sharded-ams prepare-data`` with a BPE trained on
   it, into ``OUT/data`` (idempotent); or ``--data DIR``, a prepare-data output of yours;
2. sweep: every optimizer at every lr of ``--lrs`` (log-spaced) with the sweep seed 0;
3. seeds: every optimizer at its best lr (lowest final validation loss in the sweep) with
   seeds 1 .. ``--seeds``-1 (seed 0 is the sweep's run): ``--seeds`` seeds per optimizer.

Every trial trains the same model on the same number of tokens with the same schedule (the
preset's config; only ``optim.preset``/``lam``/``beta3``, ``optim.lr`` and ``data.seed``
differ; the seed sets the initial weights and the batch order) and is scored on the same
validation windows (``examples/study_trial.py``). The optimizers (``study_trial.OPTIMIZERS``):
AdamW, C-Adam, Grams (the presets) and AMS with lam = -0.5 and beta3 = 0 (the sign reference
of C-Adam and Grams: the three differ only in lam).

Resuming: everything lives in ``OUT`` (``OUT/tune/sweep``, ``OUT/tune/seeds``: Ray Tune
experiment directories; ``OUT/study.json``: the settings). Rerunning the same command after an
interruption (Ctrl-C, a killed process, a lost machine) restores both experiments with
``Tuner.restore``: finished trials are kept, unfinished ones continue from their last
checkpoint (every ``job.checkpoint_every`` steps). A rerun with other settings is refused
(``--fresh`` starts over). ``OUT/trials.log`` records every start (with its start step) and
finish of a trial.

Written to ``--results`` (default ``OUT/results``): ``table.md`` (final validation loss,
mean ± std over seeds at each optimizer's best lr; the sweep grid), ``summary.json`` (the same
numbers, the Welch t-tests, the verdict, the settings and the environment), ``trials.csv``
(one row per trial), ``curves.csv`` (every reported step of every trial), ``curves.png``
(loss curves at the best lrs, band ± 1 std over seeds) and ``lr_sweep.png`` (final loss vs lr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import study_analysis as sa  # noqa: E402
from study_trial import OPTIMIZERS, arm_name, trial_config  # noqa: E402

from launcher.run.ray_orphans import shutdown as shutdown_ray  # noqa: E402

CONFIGS = ROOT / "launcher" / "configs"
STDLIB = sysconfig.get_paths()["stdlib"]


@dataclass(frozen=True)
class Preset:
    """A study's budget: the launcher config its trials share plus changes to it, the lr
    grid, the seeds, the data and the resources of one trial."""

    config: str
    overrides: dict[str, Any]
    lrs: tuple[float, ...]
    seeds: int
    about: str
    inputs: tuple[str, ...] = ()  # prepare-data inputs (globs); empty: --data is required
    tokenizer: str = "bpe:2048"
    final_eval_iters: int = 32
    cpus_per_trial: int = 1
    gpus_per_trial: int = 0
    checks: dict[str, Any] = field(default_factory=dict)


_SINGLE = {"job.num_workers": 1, "job.fail_at_step": None}
PRESETS: dict[str, Preset] = {
    # The tiny Llama of launcher/configs/llama_tiny.toml (1.0M params with this 2048-token BPE)
    # on the top-level modules of the standard library (~4.9 MB of Python -> ~1.4M tokens),
    # 300 steps x 16 x 128 tokens = 0.61M training tokens (under half an epoch: no repeats).
    "cpu": Preset(
        config=str(CONFIGS / "llama_tiny.toml"),
        overrides={**_SINGLE, "job.name": "study", "job.steps": 300, "job.log_every": 10,
                   "job.eval_every": 50, "job.checkpoint_every": 100, "data.batch_size": 16,
                   "data.micro_batch_size": None, "data.block_size": 128, "data.eval_iters": 4,
                   "data.val_fraction": 0.1, "model.precision": "fp32", "optim.backend": "eager",
                   "optim.warmup_steps": 30},
        lrs=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), seeds=3, final_eval_iters=32,
        inputs=(f"{STDLIB}/*.py",), tokenizer="bpe:2048",
        about="tiny Llama (4 x 128, 1.0M params), BPE-2048 stdlib text, 300 steps x 2,048 tokens, CPU"),
    # CI: the same path end to end in seconds (a 1-layer Llama, 6 steps, 2 lrs, 2 seeds).
    "smoke": Preset(
        config=str(CONFIGS / "llama_tiny.toml"),
        overrides={**_SINGLE, "job.name": "study-smoke", "job.steps": 6, "job.log_every": 2,
                   "job.eval_every": 4, "job.checkpoint_every": 4, "data.batch_size": 4,
                   "data.micro_batch_size": 2, "data.block_size": 32, "data.eval_iters": 1,
                   "data.val_fraction": 0.2, "model.precision": "fp32", "optim.backend": "eager",
                   "optim.warmup_steps": 2, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2,
                   "model.n_kv_head": 1, "model.intermediate_size": 64, "model.block_size": 32},
        lrs=(3e-3, 1e-2), seeds=2, final_eval_iters=2,
        inputs=(f"{STDLIB}/json/*.py",), tokenizer="bpe:300",
        about="smoke test: 1-layer Llama (32 wide), 6 steps x 128 tokens"),
    # The Grams paper's Llama 60M setting (GaLore's C4 recipe, launcher/configs/llama_60m.toml):
    # seq 256, global batch 512 (8 micro-batches of 64 on one GPU), 10k steps, 1k warmup, cosine
    # to 10%, wd 0, bf16 autocast; one GPU per trial; evaluation on ~10M tokens at the end.
    "paper-60m": Preset(
        config=str(CONFIGS / "llama_60m.toml"),
        overrides={**_SINGLE, "job.name": "study-60m", "job.eval_every": 1000, "data.eval_iters": 20},
        lrs=(5e-4, 1e-3, 2e-3, 4e-3), seeds=3, final_eval_iters=80, cpus_per_trial=2, gpus_per_trial=1,
        about="Llama 60M (GaLore/Grams setting), C4 prepared by you, 10k steps x 131k tokens, 1 GPU per trial"),
}


# ----------------------------------------------------------------------------- settings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS), help="the study's budget (default cpu)")
    ap.add_argument("--out", default=None, help="study directory (default out/optimizer_study[-PRESET])")
    ap.add_argument("--results", default=None, help="where the table, CSV/JSON and plots go (default OUT/results)")
    ap.add_argument("--data", default=None, help="a `sharded-ams prepare-data` output to train on instead "
                                                 "of the preset's text (required for paper-60m)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help=f"comma-separated, from {','.join(OPTIMIZERS)} (default all)")
    ap.add_argument("--lrs", default=None, help="comma-separated peak lrs of the sweep (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per optimizer at its best lr (default: the preset's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any launcher config setting for every trial, e.g. --set job.steps=500")
    ap.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto); default: a local Ray")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all of this machine's)")
    ap.add_argument("--cpus-per-trial", type=int, default=None)
    ap.add_argument("--gpus-per-trial", type=float, default=None)
    ap.add_argument("--fresh", action="store_true", help="delete OUT's earlier trials and start over")
    a = ap.parse_args(argv)
    preset = PRESETS[a.preset]
    a.out = Path(a.out or f"out/optimizer_study{'' if a.preset == 'cpu' else '-' + a.preset}").absolute()
    a.results = Path(a.results).absolute() if a.results else a.out / "results"
    a.optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    bad = [o for o in a.optimizers if o not in OPTIMIZERS]
    if bad or not a.optimizers or len(set(a.optimizers)) != len(a.optimizers):
        ap.error(f"--optimizers: {a.optimizers} must be distinct names from {list(OPTIMIZERS)}")
    try:
        a.lrs = sorted(float(x) for x in a.lrs.split(",")) if a.lrs else list(preset.lrs)
    except ValueError:
        ap.error(f"--lrs must be comma-separated numbers, got {a.lrs!r}")
    if not a.lrs or min(a.lrs) <= 0 or len(set(a.lrs)) != len(a.lrs):
        ap.error(f"--lrs must be distinct positive numbers, got {a.lrs}")
    a.seeds = preset.seeds if a.seeds is None else a.seeds
    if a.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.data is None and not preset.inputs:
        ap.error(f"--preset {a.preset} trains on data you prepare: pass --data DIR (a `sharded-ams "
                 "prepare-data` output; docs/optimizer-study.md shows how to make one from C4)")
    a.cpus_per_trial = a.cpus_per_trial or preset.cpus_per_trial
    a.gpus_per_trial = preset.gpus_per_trial if a.gpus_per_trial is None else a.gpus_per_trial
    try:
        from launcher.config import parse_override

        a.extra = dict(map(parse_override, a.overrides))
        study_settings(a, data_path=a.data or "check")  # bad keys/values: an error now, not in a trial
        if a.address:  # a wrong port: ray.init retried for minutes, after the data was prepared
            from launcher.run.preflight import check_ray_address

            check_ray_address(a.address)
    except ValueError as e:
        ap.error(str(e))
    return a


def study_settings(a: argparse.Namespace, data_path: str) -> dict[str, Any]:
    """Everything that defines the study's trials (saved as OUT/study.json; a rerun must match).
    Builds and validates every arm's config."""
    preset = PRESETS[a.preset]
    base = {**preset.overrides, **a.extra, "data.path": str(Path(data_path).absolute())}
    settings = {"preset": a.preset, "config_file": preset.config, "base": base, "optimizers": a.optimizers,
                "lrs": a.lrs, "seeds": a.seeds, "sweep_seed": 0, "final_eval_iters": preset.final_eval_iters,
                "threads": a.cpus_per_trial}
    if data_path != "check":
        for opt in a.optimizers:  # every arm's config must load (the data is checked by the trials)
            trial_config(preset.config, base, opt, a.lrs[0], 0)
    else:
        from launcher.config import load_config

        load_config(preset.config, {k: v for k, v in base.items() if k != "data.path"}, environ={})
    return settings


def check_settings(out: Path, settings: dict[str, Any], fresh: bool) -> None:
    """Write OUT/study.json, or check that it matches (a resumed study must be the same study)."""
    path = out / "study.json"
    if fresh:
        for name in ("tune", "trials.log", "study.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise SystemExit(f"error: {out} holds a study with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} vs now {[settings.get(k) for k in diff]}); "
                             "rerun with the same settings to resume it, pass --fresh to start over, "
                             "or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, path)


def prepare(a: argparse.Namespace) -> str:
    """The data directory: ``--data``, or the preset's text prepared into OUT/data."""
    if a.data:
        return a.data
    from launcher.data.prepare import prepare_data

    preset = PRESETS[a.preset]
    out = a.out / "data"
    prepare_data(list(preset.inputs), out, tokenizer=preset.tokenizer, progress=False,
                 log=lambda m: print(f"[study] data: {m}", flush=True))
    return str(out)


# ----------------------------------------------------------------------------- Ray Tune


def start_ray(a: argparse.Namespace) -> None:
    """A local Ray (its workers import examples/ and the repository through PYTHONPATH), or
    the cluster at ``--address`` (the repository must be at the same path on its nodes)."""
    import logging

    import ray

    paths = [str(HERE), str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    pythonpath = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    if a.address:
        ray.init(address=a.address, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    else:
        os.environ["PYTHONPATH"] = pythonpath
        ray.init(address="local", num_cpus=a.cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING)


#: Ray Tune's state files in an experiment directory (its restore reads the newest of each)
TUNE_STATE_FILES = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
                    "searcher-state-*.pkl", "callback-states-*.pkl")


def drop_torn_tune_state(path: Path) -> list[str]:
    """Remove Ray Tune state files under ``path`` that do not load; return their names.

    Tune writes its state atomically in a staging directory, then copies it into the storage
    path with a plain copy: a process killed during that copy leaves a truncated file there.
    Seen: an empty searcher state, on which Tune gave up restoring and started a new, empty
    experiment (one trial, no config). Without the torn file it resumes from the others: the
    trials are in the experiment state, and the study's grid is created whole at the start,
    so a missing searcher state costs nothing."""
    import ray.cloudpickle as cloudpickle

    dropped = []
    for pattern in TUNE_STATE_FILES:
        for f in path.glob(pattern):
            try:
                with open(f, "rb") as fh:
                    json.load(fh) if f.name.startswith("experiment_state") else cloudpickle.load(fh)
            except Exception:  # noqa: BLE001 - any failure to load is a torn file
                f.unlink()
                dropped.append(f.name)
    return dropped


def run_phase(out: Path, name: str, settings: dict[str, Any], arms: list[dict], resources: dict) -> list[sa.TrialResult]:
    """Run (or resume) one Ray Tune experiment, ``OUT/tune/NAME``, of the given arms; return
    their results. Raises RuntimeError naming the trials that failed."""
    from ray import tune

    import study_trial

    path = out / "tune" / name
    trainable = tune.with_resources(study_trial.tune_trainable, resources)
    for torn in drop_torn_tune_state(path) if path.is_dir() else ():
        print(f"[study] {name}: removed {torn}, which does not load (a kill while Tune copied it)",
              flush=True)
    if tune.Tuner.can_restore(str(path)):
        print(f"[study] {name}: resuming {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    else:
        if path.exists():  # killed before Tune saved any state: nothing to keep
            shutil.rmtree(path)
        shared = {k: settings[k] for k in ("config_file", "base", "final_eval_iters", "threads")}
        tuner = tune.Tuner(
            trainable,
            param_space={**shared, "log_path": str(out / "trials.log"), "trial": tune.grid_search(arms)},
            tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=study_trial.trial_name,
                                        trial_dirname_creator=study_trial.trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=1)))
    print(f"[study] {name}: {len(arms)} trials", flush=True)
    grid = tuner.fit()
    failed = [arm_name(r.config["trial"]) for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{name}: trial(s) {failed} failed (their errors are in {path}); rerun the same "
                           "command to retry them")
    results = [to_result(r.config["trial"], r.metrics_dataframe, name) for r in grid]
    got, want = sorted(map(arm_name, (r.config["trial"] for r in grid))), sorted(map(arm_name, arms))
    if got != want:
        raise RuntimeError(f"{path} holds trials {got}, not the study's {want}: rerun with --fresh")
    return results


def to_result(arm: dict, df, phase: str) -> sa.TrialResult:
    """A trial's reports (Tune's metrics DataFrame; a resumed trial may report a step twice:
    the last report of a step wins) as a :class:`study_analysis.TrialResult`."""
    rows = {int(r["step"]): r for r in df.to_dict("records")}
    steps = sorted(rows)

    def val(r: dict, key: str) -> Optional[float]:
        v = r.get(key)
        return None if v is None or math.isnan(v) else float(v)  # NaN: not reported at that step

    last = rows[steps[-1]]
    return sa.TrialResult(arm["optimizer"], float(arm["lr"]), int(arm["seed"]), phase,
                          final_val_loss=val(last, "final_val_loss"), final_train_loss=val(last, "train_loss"),
                          steps=steps, tokens=[int(rows[s]["tokens"]) for s in steps],
                          train_loss=[val(rows[s], "train_loss") for s in steps],
                          val_loss=[val(rows[s], "val_loss") for s in steps],
                          wall_s=float(last.get("time_total_s") or 0.0))


# ----------------------------------------------------------------------------- outputs


def environment() -> dict[str, Any]:
    from importlib.metadata import version  # not `import torch`: seconds the driver does not need

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except OSError:
        sha = None
    return {"python": platform.python_version(), "torch": version("torch"), "ray": version("ray"),
            "machine": platform.machine(), "cpus": os.cpu_count(), "git": sha,
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def trials_span(log: Path) -> dict[str, Any]:
    """From the trial log: the seconds from the first trial's start to the last one's finish
    (all invocations, interruptions included) and how many trial starts resumed a checkpoint."""
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    times = [e["time"] for e in events]
    return {"first_start_to_last_finish_s": max(times) - min(times) if times else None,
            "resumed_trial_starts": sum(1 for e in events if e["event"] == "start" and e["start_step"] > 0)}


def write_outputs(a: argparse.Namespace, settings: dict, trials: list[sa.TrialResult], wall_s: float) -> dict:
    res = a.results
    summ = sa.summary(trials, settings["sweep_seed"])
    cfg = trial_config(settings["config_file"], settings["base"], a.optimizers[0], a.lrs[0], 0)
    tokens = cfg.job.steps * cfg.data.batch_size * cfg.data.block_size
    summ["budget"] = {"about": PRESETS[a.preset].about, "steps": cfg.job.steps, "batch": cfg.data.batch_size,
                      "seq_len": cfg.data.block_size, "tokens_per_trial": tokens, "trials": len(trials),
                      "trial_seconds": sum(t.wall_s for t in trials), "wall_s_this_invocation": wall_s,
                      **trials_span(a.out / "trials.log")}
    summ["settings"] = settings
    summ["environment"] = environment()
    sa.write_json(res / "summary.json", summ)
    sa.write_trials_csv(res / "trials.csv", trials)
    sa.write_curves_csv(res / "curves.csv", trials)
    heading = (f"{PRESETS[a.preset].about}; warmup {cfg.optim.warmup_steps} + {cfg.optim.schedule}; "
               f"betas {cfg.optim.betas}, wd {cfg.optim.weight_decay:g}, clip {cfg.optim.max_grad_norm}")
    best = {k: v for k, v in summ["best_lr"].items()}
    stats = sa.seed_stats(trials, best)
    sa.plot_curves(res / "curves.png", trials, best, heading)
    sa.plot_lr_sweep(res / "lr_sweep.png", trials, settings["sweep_seed"], stats, heading)
    text = [f"## Optimizer study: {PRESETS[a.preset].about}", "",
            f"Final validation loss at each optimizer's best lr, {a.seeds} seed(s):", "", summ["table"], "",
            f"Sweep (seed {settings['sweep_seed']}), final validation loss per lr:", "", summ["sweep_table"], ""]
    if "verdict" in summ:
        text += [summ["verdict"]["headline"], ""] + [f"- {line}" for line in summ["verdict"]["lines"]] + [""]
    text += [f"- {w}" for w in summ["edge_warnings"]]
    (res / "table.md").write_text("\n".join(text).rstrip() + "\n")
    return summ


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) the study; returns the summary (see ``summary.json``)."""
    a = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user Ray (2.60 defaults to tokens)
    # Tune warns when trials checkpoint often (the smoke preset does, on purpose)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.perf_counter()
    data = prepare(a)
    settings = study_settings(a, data)
    check_settings(a.out, settings, a.fresh)
    resources = {"cpu": a.cpus_per_trial, **({"gpu": a.gpus_per_trial} if a.gpus_per_trial else {})}
    print(f"[study] {PRESETS[a.preset].about}: {len(a.optimizers)} optimizers x {len(a.lrs)} lrs, then "
          f"{a.seeds} seeds at each best lr; {a.out}", flush=True)
    start_ray(a)
    try:
        seed0 = settings["sweep_seed"]
        sweep = run_phase(a.out, "sweep", settings,
                          [{"optimizer": o, "lr": lr, "seed": seed0} for o in a.optimizers for lr in a.lrs], resources)
        best = sa.best_lrs(sweep, seed0)
        arms = [{"optimizer": o, "lr": best[o], "seed": s} for o in a.optimizers for s in range(a.seeds) if s != seed0]
        seeds = run_phase(a.out, "seeds", settings, arms, resources) if arms else []
    finally:
        shutdown_ray(started_here=not a.address)  # and what of a local Ray hung in its exit
    summ = write_outputs(a, settings, sweep + seeds, time.perf_counter() - t0)
    print("\n" + (a.results / "table.md").read_text(), flush=True)
    print(f"[study] wrote {a.results} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return summ


if __name__ == "__main__":
    main()
