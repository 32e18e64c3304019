"""Which optimizer settings a resume may change (checked on the driver before Ray starts,
and again in each worker before a load).

* ``optim.preset`` / ``optim.lam`` / ``optim.beta3``: refused when they differ from the
  checkpoint's param groups. They define what the saved state means (``exp_avg_s`` exists
  only with beta3 > 0; the sign mask and step scale follow lam), and a load would silently
  keep the checkpoint's values anyway (hyperparameters come from the checkpoint, as with
  torch.optim). The message names both values; start a new run (``--name``) to change them.
* ``optim.lr``, ``betas``, ``eps``, ``weight_decay``: **the checkpoint's values win** on resume
  (the optimizer's groups and the LR scheduler's ``base_lrs`` are restored from it); a
  config that differs gets a note saying so.
* ``parallel.strategy`` / ``tp``: a ``zero1`` run with ``tp = 1`` resumes native
  checkpoints; ``fsdp`` and ``zero1`` with ``tp > 1`` save and resume DCP ones (either of
  them, any mesh: the same keys and global shapes); the other format is refused with the
  ``sharded-ams ckpt convert`` command that fits.
* The schedule's shape (``optim.schedule``, ``warmup_steps``, ``min_lr_ratio``, ``job.steps``)
  **comes from the config** (the schedule is a function, rebuilt from the config, applied to
  the checkpoint's peak lr at the resumed step); raising ``--steps`` is how a run is extended.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

__all__ = ["optimizer_identity", "check_same_optimizer", "check_loaded_groups", "describe_identity",
           "check_same_strategy", "checkpoint_format"]


def optimizer_identity(preset: Optional[str], beta3: Optional[float], lam: Optional[float]) -> tuple[float, float]:
    """(beta3, lam) a config's optim table resolves to (a preset fixes both; unset: Grams)."""
    if preset:
        from sharded_ams.config import preset_hparams

        hp = preset_hparams(preset)
        return float(hp["beta3"]), float(hp["lam"])
    return float(beta3 if beta3 is not None else 0.0), float(lam if lam is not None else -1.0)


def describe_identity(beta3: float, lam: float) -> str:
    """'grams (beta3=0.0, lam=-1.0)' or 'beta3=0.9, lam=0.5' (no preset has these)."""
    from sharded_ams.update import PRESETS

    for name in sorted(PRESETS):
        b3, la = optimizer_identity(name, None, None)
        if _same(b3, beta3) and _same(la, lam):
            return f"preset {name!r} (beta3={beta3}, lam={lam})"
    return f"no preset (beta3={beta3}, lam={lam})"


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def _groups(path: str) -> Optional[list]:
    from sharded_ams.checkpoint import CheckpointError, validate_checkpoint

    try:
        groups = validate_checkpoint(path, checksums=False).param_groups
    except (CheckpointError, OSError, ValueError):
        return None  # the load reports an unreadable checkpoint properly
    return groups if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None


def check_same_optimizer(optim: Any, path: str) -> list[str]:
    """Refuse (ValueError naming both values) a config whose preset/lam/beta3 differ from the
    checkpoint ``path``'s; return notes for the settings where the checkpoint wins."""
    groups = _groups(path)
    if not groups:
        return []
    beta3, lam = optimizer_identity(optim.preset, optim.beta3, optim.lam)
    where = f"{Path(path) / 'manifest.json'}"
    for i, g in enumerate(groups):
        if "beta3" in g and "lam" in g and not (_same(g["beta3"], beta3) and _same(g["lam"], lam)):
            raise ValueError(
                f"{where}: param_groups[{i}] was trained with {describe_identity(g.get('beta3'), g.get('lam'))}; "
                f"the config asks for {describe_identity(beta3, lam)} (optim.preset/optim.lam/optim.beta3). "
                "A resume cannot change the optimizer: restore the setting, or start a new run (--name)")
    notes = []
    saved_lr = _peak_lr(path, groups)
    if saved_lr is not None and not _same(saved_lr, optim.lr):
        notes.append(f"note: optim.lr = {optim.lr} differs from the run's {saved_lr} ({path}): on resume "
                     "the checkpoint's lr wins; the schedule's shape (optim.schedule, warmup_steps, "
                     "min_lr_ratio, job.steps) comes from the config. Start a new run (--name) for another lr")
    g = groups[0]
    for key, want in (("betas", list(optim.betas)), ("eps", optim.eps), ("weight_decay", optim.weight_decay)):
        have = g.get(key)
        same = (isinstance(have, (list, tuple)) and len(have) == len(want) and all(map(_same, have, want))
                if key == "betas" else _same(have, want))
        if have is not None and not same:
            notes.append(f"note: optim.{key} = {want} differs from the run's {have} ({path}): on resume "
                         "the checkpoint's value wins")
    return notes


def check_loaded_groups(path: str, param_groups: list) -> None:
    """The worker's check before a load: the optimizer's groups (built from the config) have
    the checkpoint's beta3 and lam; ValueError naming both otherwise (not a CheckpointError:
    an older checkpoint of the run would not fit either, so there is nothing to fall back to)."""
    saved = _groups(path) or []
    for i, (g, now) in enumerate(zip(saved, param_groups)):
        if "beta3" in g and "lam" in g and not (_same(g["beta3"], now.get("beta3"))
                                                and _same(g["lam"], now.get("lam"))):
            raise ValueError(
                f"{Path(path) / 'manifest.json'}: param_groups[{i}] was trained with "
                f"{describe_identity(g.get('beta3'), g.get('lam'))}; this optimizer has "
                f"{describe_identity(now.get('beta3'), now.get('lam'))} (optim.preset/optim.lam/"
                "optim.beta3). A resume cannot change the optimizer: restore the setting, or start "
                "a new run (--name)")


def _peak_lr(path: str, groups: list) -> Optional[float]:
    """The run's peak lr: the LR scheduler's ``base_lrs`` (trainer.pt), else the groups'
    ``initial_lr``; None if neither is readable."""
    from sharded_ams.checkpoint import TRAINER_NAME

    try:
        import torch

        trainer = torch.load(Path(path) / TRAINER_NAME, map_location="cpu", weights_only=True)
        base = trainer["lr_scheduler"]["base_lrs"][0]
        return float(base)
    except Exception:  # untrusted or absent: fall back to what the manifest says
        lr = groups[0].get("initial_lr")
        return float(lr) if isinstance(lr, (int, float)) else None


def checkpoint_format(strategy: str, tp: int) -> str:
    """The checkpoint format a run saves and resumes: "zero1" (native) for ``zero1`` with
    ``tp = 1``, "dcp" for ``fsdp`` and for ``zero1`` with ``tp > 1``."""
    return "zero1" if strategy == "zero1" and tp == 1 else "dcp"


def check_same_strategy(strategy: str, path: str, tp: int = 1) -> None:
    """ValueError when ``path``'s format is not the one ``[parallel]`` resumes
    (:func:`checkpoint_format`), naming the conversion."""
    from sharded_ams.checkpoint import DCP_FORMAT, manifest_format

    have = "dcp" if manifest_format(path) == DCP_FORMAT else "zero1"
    want = checkpoint_format(strategy, tp)
    if have != want:
        how = f"parallel.strategy is {strategy!r}" + (f" with tp = {tp}" if tp > 1 else "")
        raise ValueError(
            f"{path} is a {have} checkpoint and {how}: convert it "
            f"(sharded-ams ckpt convert {path} OUT --to {want}) and start a new run from it "
            "(job.resume_from = OUT, --name), or keep the strategy")
