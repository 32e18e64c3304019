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
  the checkpoint's peak lr at the resumed step, from the first step after the resume);
  raising ``--steps`` is how a run is extended.
* The data, precision and model factory (:func:`check_same_run`; a resume of the run's own
  checkpoint only: ``job.resume_from`` starts a NEW run from a checkpoint, which may change
  all of them but the factory, e.g. to fine-tune). A resumed run sees the data an
  uninterrupted run sees (the batch of step s is a function of the corpus, ``data.seed``
  and s), so these are **refused**, naming the saved and the new value: another corpus or
  tokenizer (``data.path``: another directory, or the same one re-prepared with another
  tokenizer, by its sha256; ``data.factory``; the standard-library corpus), another train
  split (``data.val_fraction``; ``data.max_bytes`` of the standard-library corpus), another
  ``data.seed`` (another batch order), another ``model.precision`` (resolved: "auto" is
  bf16 on GPU workers, fp32 on CPU), another ``model.factory`` or, for a factory's model,
  another input to it: ``model.options`` and the other ``[model]`` settings it is given
  (``dropout``, ``rope_theta``, ...; a change that keeps every tensor's shape would load,
  and train another model from the checkpoint's weights). Changed deliberately, as a
  ramp, ``data.batch_size`` (the global batch) and ``data.block_size`` (the sequence
  length) are **allowed with a note**: the steps after the resume train on batches of the
  new shape. ``job.num_workers`` and ``data.micro_batch_size`` change nothing of the data
  (a resize reshards; the global batch is the same).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["optimizer_identity", "check_same_optimizer", "check_loaded_groups", "describe_identity",
           "check_same_strategy", "checkpoint_format", "saved_extra", "describe_config_data",
           "check_same_run"]


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


# ----------------------------------------------------------------------------- data, precision


def saved_extra(path: str) -> Optional[dict]:
    """The ``extra`` dict of checkpoint ``path``'s trainer state (what the training loop
    records of the run: model table, data, seed, precision, ...); None if there is none or
    it is unreadable (the load reports an unreadable checkpoint properly)."""
    from sharded_ams.checkpoint import TRAINER_NAME

    trainer = Path(path) / TRAINER_NAME
    if not trainer.is_file():
        return None
    try:
        import torch

        extra = torch.load(trainer, map_location="cpu", weights_only=True).get("extra")
    except Exception:  # untrusted or damaged: the load says what is wrong
        return None
    return extra if isinstance(extra, dict) else None


def describe_config_data(data: Any) -> dict:
    """What a checkpoint trained on ``data`` (a DataConfig) would record of its corpus
    (``TrainingData.describe``), without loading it: a prepare-data directory's index and
    tokenizer sha256, a factory's spec, or the standard-library corpus."""
    if data.factory:
        return {"factory": data.factory}
    if data.path:
        from launcher.data.tokens import describe_token_dir

        return describe_token_dir(data.path)
    return {"corpus": "stdlib"}


def _corpus(desc: Any) -> Optional[tuple[str, Any]]:
    if not isinstance(desc, Mapping):
        return None
    if desc.get("factory"):
        return "data.factory", desc["factory"]
    if desc.get("path"):
        return "data.path", desc["path"]
    if desc.get("corpus") == "stdlib":
        return "stdlib", None
    return None


def _say_corpus(desc: Mapping) -> str:
    kind, value = _corpus(desc)
    if kind == "stdlib":
        return "the standard-library corpus (data.path and data.factory unset)"
    if kind == "data.factory":
        return f"data.factory {value!r}"
    sha = desc.get("tokenizer_sha256")
    return f"data.path {value}" + (f" (tokenizer sha256 {sha[:16]}...)" if isinstance(sha, str) else "")


def _same_dir(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _new_run(path: str) -> str:
    return ("A resume continues the run on its data, model and precision: restore the setting, or "
            f"start a new run (--name NEW; with --resume-from {path} it starts from this checkpoint: "
            "a new run may change the data, seed, precision and model.options, e.g. to fine-tune)")


# what a factory's model is built from besides its shape (vocab_size, block_size: the load's
# and the driver's shape checks): the factory is called with the whole [model] table
_FACTORY_INPUTS = ("options", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                   "rope_theta", "norm_eps", "dropout", "tie_weights")
_UNSET = object()


def _say(value: Any) -> str:
    return "unset" if value is _UNSET else repr(value)


def _model_change(saved: Any, model: Any) -> Optional[str]:
    """What differs between the run's recorded ``[model]`` table (the checkpoint's
    ``extra["model"]``) and the config's ``model`` (a ModelConfig or its dict) that a
    resume must not change: the factory, and what a factory is given. None if nothing
    (or nothing recorded: older checkpoints)."""
    if not isinstance(saved, Mapping) or model is None or "factory" not in saved:
        return None

    def get(key: str) -> Any:
        return model.get(key) if isinstance(model, Mapping) else getattr(model, key, None)

    spec = saved["factory"]
    if spec != get("factory"):
        return (f"model.factory = {get('factory')!r} differs from the run's {spec!r}: another model "
                "would train from the checkpoint's weights")
    if not spec:
        return None  # a built-in model: its shape is checked with the checkpoint's, options unused
    for key in _FACTORY_INPUTS:
        if key not in saved:
            continue
        was, now = saved[key], get(key)
        if key == "options" and isinstance(was, Mapping) and isinstance(now, Mapping):
            keys = [k for k in sorted({*was, *now}, key=str) if was.get(k, _UNSET) != now.get(k, _UNSET)]
            if keys:
                diff = "; ".join(f"{k}: the run's {_say(was.get(k, _UNSET))}, now "
                                 f"{_say(now.get(k, _UNSET))}" for k in keys)
                return (f"model.options differ from the run's ({diff}): model.factory {spec!r} "
                        "builds the model from them, so the steps after the resume would train "
                        "another model from the checkpoint's weights")
        elif was != now:
            return (f"model.{key} = {now!r} differs from the run's {was!r}: model.factory {spec!r} "
                    "is given the [model] table, so the steps after the resume would train "
                    "another model from the checkpoint's weights")
    return None


def check_same_run(extra: Optional[Mapping], *, data: Any, data_describe: Mapping, precision: str,
                   path: str, precision_how: str = "", model: Any = None) -> list[str]:
    """A resume of a run's own checkpoint ``path`` (its trainer ``extra``) with this config
    (the module docstring's rule): ValueError naming the key, the saved and the new value
    for another corpus, tokenizer, train split, seed, precision, model factory or factory
    input; notes for another global batch or sequence length. ``data``: the DataConfig (or
    its dict); ``data_describe``: the config's corpus as a checkpoint records it
    (:func:`describe_config_data`, or the worker's ``TrainingData.describe``);
    ``precision``: resolved (no "auto"), described by ``precision_how`` in the message;
    ``model``: the ModelConfig (or its dict; None: not checked). Keys the checkpoint does
    not record (older checkpoints) are not checked."""
    if not isinstance(extra, Mapping):
        return []

    def get(key: str) -> Any:
        return data.get(key) if isinstance(data, Mapping) else getattr(data, key)

    def refuse(what: str) -> None:
        raise ValueError(f"{path}: {what}. {_new_run(path)}")

    saved_d, now_d = extra.get("data"), data_describe
    saved_c, now_c = _corpus(saved_d), _corpus(now_d)
    if saved_c and now_c:
        same = saved_c[0] == now_c[0] and (
            saved_c[1] == now_c[1] if saved_c[0] != "data.path" else _same_dir(saved_c[1], now_c[1]))
        sha_saved, sha_now = saved_d.get("tokenizer_sha256"), now_d.get("tokenizer_sha256")
        retokenized = (same and saved_c[0] == "data.path" and isinstance(sha_saved, str)
                       and isinstance(sha_now, str) and sha_saved != sha_now)
        if not same or retokenized:
            refuse(f"the run trained on {_say_corpus(saved_d)}; the config gives {_say_corpus(now_d)}: "
                   + ("the directory was prepared again, with another tokenizer" if retokenized
                      else "another corpus"))
    order = extra.get("data_order") if isinstance(extra.get("data_order"), Mapping) else {}
    if "val_fraction" in order and not _same(order["val_fraction"], get("val_fraction")):
        refuse(f"data.val_fraction = {get('val_fraction')!r} differs from the run's "
               f"{order['val_fraction']!r}: another train split, so every batch after the resume "
               "would be drawn from another token stream")
    if ("max_bytes" in order and saved_c == ("stdlib", None) and now_c == ("stdlib", None)
            and order["max_bytes"] != get("max_bytes")):
        refuse(f"data.max_bytes = {get('max_bytes')!r} differs from the run's {order['max_bytes']!r}: "
               "another standard-library corpus (and train split)")
    seed = extra.get("data_seed")
    if isinstance(seed, int) and seed != get("seed"):
        refuse(f"data.seed = {get('seed')!r} differs from the run's {seed!r}: the batch of each step "
               "is drawn from (data.seed, step), so the steps after the resume would train on "
               "another run's batches, not the ones an uninterrupted run sees")
    saved_p = extra.get("precision")
    if isinstance(saved_p, str) and saved_p != precision:
        refuse(f"model.precision{precision_how} is {precision!r}; the run trained in {saved_p!r} "
               "(its params, gradients and masters are in that precision)")
    changed = _model_change(extra.get("model"), model)
    if changed:
        refuse(changed)
    notes = []
    for key, what in (("batch_size", "global batches of {} sequences"),
                      ("block_size", "sequences of {} tokens")):
        if key in order and order[key] != get(key):
            notes.append(f"note: data.{key} = {get(key)} differs from the run's {order[key]} ({path}): "
                         f"the steps after the resume train on {what.format(get(key))} (the run's "
                         f"steps so far: {what.format(order[key])}); restore it to continue as before, "
                         "or start a new run (--name)")
    return notes

