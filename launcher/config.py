"""Launcher configuration: four dataclasses read from one TOML or YAML file.

A config file has up to four sections, each mapping onto one dataclass below::

    [model]   # ModelConfig: the GPT's shape
    [data]    # DataConfig: corpus, global batch, seed
    [optim]   # OptimConfig: ShardedAMS hyperparameters and the LR schedule
    [job]     # JobConfig: run name, steps, workers, storage, checkpoints, fault tolerance

Every field has a default, so an empty file is a valid (tiny) job. Unknown sections
and unknown keys are errors, not silently ignored. Values are resolved in this order,
later wins: the dataclass defaults, the file, the environment variables
``SHARDED_AMS_FAIL_AT_STEP`` / ``SHARDED_AMS_FAIL_RANK`` (fault injection), and the
``overrides`` (``--set section.key=value`` and the CLI's named flags).

This module does not import torch or ray, so the CLI can parse and check a config in
milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .model import GPTConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "JobConfig",
    "Config",
    "load_config",
    "parse_override",
    "FAIL_AT_STEP_ENV",
    "FAIL_RANK_ENV",
]

FAIL_AT_STEP_ENV = "SHARDED_AMS_FAIL_AT_STEP"
FAIL_RANK_ENV = "SHARDED_AMS_FAIL_RANK"

_PRESETS = ("grams", "cadam", "adamw")
_BACKENDS = ("auto", "triton", "compiled", "eager")  # as sharded_ams.kernels.BACKENDS
_SCHEDULES = ("constant", "cosine")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- helpers


def _fail(section: str, name: str, message: str, value: Any) -> None:
    raise ValueError(f"{section}.{name} {message}, got {value!r}")


def _check_int(section: str, name: str, value: Any, minimum: Optional[int] = None,
               allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(section, name, "must be an integer", value)
    if minimum is not None and value < minimum:
        _fail(section, name, f"must be >= {minimum}", value)


def _check_float(section: str, name: str, value: Any, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(section, name, "must be a finite number", value)
    if low is not None and (value <= low if low_open else value < low):
        _fail(section, name, f"must be {'>' if low_open else '>='} {low}", value)
    if high is not None and (value >= high if high_open else value > high):
        _fail(section, name, f"must be {'<' if high_open else '<='} {high}", value)


def _check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(section, name, "must be true or false", value)


def _check_choice(section: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(section, name, f"must be one of {list(choices)}", value)


def is_uri(path: str) -> bool:
    """True for ``s3://bucket/x``, ``gs://...``, ``file://...``: storage that is not a plain path."""
    return "://" in path


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig(GPTConfig):
    """Shape of the launcher's GPT: the fields of ``launcher.model.GPTConfig``, validated
    with config-style errors ("model.n_head ...")."""

    def __post_init__(self) -> None:
        s = "model"
        _check_int(s, "vocab_size", self.vocab_size, 256)
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            _check_int(s, name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        _check_float(s, "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_bool(s, "tie_weights", self.tie_weights)

    def to_gpt_config(self) -> GPTConfig:
        """The plain ``GPTConfig`` for these fields."""
        return GPTConfig(**dataclasses.asdict(self))


@dataclass
class DataConfig:
    """The byte-level standard-library corpus and how batches are drawn from it."""

    max_bytes: int = 4_000_000
    """Bytes of corpus to load (train + validation)."""
    batch_size: int = 16
    """GLOBAL batch size in sequences per step, split evenly over the workers; must be
    divisible by the number of workers (also by the worker count you may resume on)."""
    block_size: Optional[int] = None
    """Training sequence length; default (unset): model.block_size. At most model.block_size."""
    seed: int = 0
    """Seed of the model init and of the batch order (batches are a function of (seed, step))."""
    val_fraction: float = 0.1
    """Fraction of the corpus held out (from its end) for validation."""
    eval_iters: int = 8
    """Global batches averaged for each validation loss."""

    def __post_init__(self) -> None:
        s = "data"
        _check_int(s, "max_bytes", self.max_bytes, 1)
        _check_int(s, "batch_size", self.batch_size, 1)
        _check_int(s, "block_size", self.block_size, 1, allow_none=True)
        _check_int(s, "seed", self.seed, 0)
        _check_float(s, "val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_int(s, "eval_iters", self.eval_iters, 1)


@dataclass
class OptimConfig:
    """ShardedAMS hyperparameters and the learning-rate schedule."""

    preset: Optional[str] = "grams"
    """"grams", "cadam" or "adamw" (fixes beta3 and lam); empty or unset: use beta3 and lam."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """(beta1, beta2): decay of the first and second moment estimates."""
    eps: float = 1e-8
    """Added to the bias-corrected sqrt(v) in the denominator."""
    weight_decay: float = 0.0
    """Decoupled weight decay (as AdamW)."""
    beta3: Optional[float] = None
    """Decay of the sign-reference momentum s (only without a preset); unset: 0."""
    lam: Optional[float] = None
    """Weight of elements whose update disagrees with s (only without a preset); unset: -1 (Grams)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this; unset: no clipping."""
    backend: str = "auto"
    """Step kernel: "auto" (Triton on CUDA, torch.compile on CPU), "triton", "compiled" or
    "eager". "compiled" costs ~25 s of compilation in each new worker process on CPU."""
    schedule: str = "constant"
    """LR schedule after warmup: "constant" or "cosine" (decays to min_lr_ratio * lr at job.steps)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine schedule, as a fraction of lr."""

    def __post_init__(self) -> None:
        s = "optim"
        if self.preset == "":
            self.preset = None
        if self.preset is not None:
            if isinstance(self.preset, str):
                self.preset = self.preset.lower()
            _check_choice(s, "preset", self.preset, _PRESETS)
            if self.beta3 is not None or self.lam is not None:
                raise ValueError(
                    f"optim.preset={self.preset!r} fixes beta3 and lam; set optim.preset = \"\" "
                    f"to use optim.beta3={self.beta3!r} and optim.lam={self.lam!r}"
                )
        _check_float(s, "lr", self.lr, low=0.0)
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            _fail(s, "betas", "must be a pair [beta1, beta2]", self.betas)
        for i, b in enumerate(self.betas):
            _check_float(s, f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _check_float(s, "eps", self.eps, low=0.0, low_open=True)
        _check_float(s, "weight_decay", self.weight_decay, low=0.0)
        _check_float(s, "beta3", self.beta3, low=0.0, high=1.0, high_open=True, allow_none=True)
        _check_float(s, "lam", self.lam, allow_none=True)
        _check_float(s, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_none=True)
        _check_choice(s, "backend", self.backend, _BACKENDS)
        _check_choice(s, "schedule", self.schedule, _SCHEDULES)
        _check_int(s, "warmup_steps", self.warmup_steps, 0)
        _check_float(s, "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sharded_ams.ShardedAMS`` (everything but the schedule)."""
        kw: dict[str, Any] = dict(lr=self.lr, betas=self.betas, eps=self.eps,
                                  weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                                  backend=self.backend)
        if self.preset is not None:
            kw["preset"] = self.preset
        else:
            kw.update(beta3=self.beta3, lam=self.lam)
        return kw


@dataclass
class JobConfig:
    """One training run: its name and length, where it runs, and how it survives failures."""

    name: str = "gpt-tiny"
    """Run name; the run lives in storage_path/name. Rerunning with the same name resumes it."""
    steps: int = 200
    """Total optimizer steps. Raise it and rerun to train a finished run further."""
    num_workers: int = 2
    """Ray Train workers (ranks); with use_gpu, one GPU each."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; otherwise CPU workers and gloo."""
    storage_path: str = "./runs"
    """Where runs and checkpoints go: a local directory (made absolute), a shared
    filesystem (NFS; needed for multi-node runs) or an object-store URI (s3://, gs://)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and always at the last step)."""
    keep_last: int = 2
    """Checkpoints kept on storage; older ones are deleted after a newer one is committed."""
    max_failures: int = 3
    """Worker-group restarts allowed (from the last checkpoint) before the run fails;
    -1: unlimited, 0: fail on the first error."""
    log_every: int = 10
    """Report metrics (and print a progress line) every this many steps."""
    eval_every: int = 0
    """Validation loss every this many steps; 0: only at the end."""
    resume_from: Optional[str] = None
    """A checkpoint directory to start from when the run has no checkpoint of its own
    (e.g. to fine-tune or to copy a run under a new name)."""
    fail_at_step: Optional[int] = None
    """Fault injection: worker fail_rank exits (os._exit(1)) right after optimizer step
    fail_at_step, once per run (a marker file in the run directory stops the restarted
    worker from failing again). Env override: SHARDED_AMS_FAIL_AT_STEP."""
    fail_rank: int = 0
    """Fault injection: the rank that fails. Env override: SHARDED_AMS_FAIL_RANK."""

    def __post_init__(self) -> None:
        s = "job"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            _fail(s, "name", "must be letters, digits, '.', '_' or '-' (a directory name)", self.name)
        _check_int(s, "steps", self.steps, 1)
        _check_int(s, "num_workers", self.num_workers, 1)
        _check_bool(s, "use_gpu", self.use_gpu)
        if not isinstance(self.storage_path, str) or not self.storage_path:
            _fail(s, "storage_path", "must be a non-empty path or URI", self.storage_path)
        if not is_uri(self.storage_path):
            self.storage_path = str(Path(self.storage_path).expanduser().absolute())
        _check_int(s, "checkpoint_every", self.checkpoint_every, 1)
        _check_int(s, "keep_last", self.keep_last, 1)
        _check_int(s, "max_failures", self.max_failures, -1)
        _check_int(s, "log_every", self.log_every, 1)
        _check_int(s, "eval_every", self.eval_every, 0)
        if self.resume_from is not None and (not isinstance(self.resume_from, str) or not self.resume_from):
            _fail(s, "resume_from", "must be a checkpoint directory", self.resume_from)
        if self.resume_from is not None and not is_uri(self.resume_from):
            self.resume_from = str(Path(self.resume_from).expanduser().absolute())
        _check_int(s, "fail_at_step", self.fail_at_step, 1, allow_none=True)
        if self.fail_at_step is not None and self.fail_at_step > self.steps:
            _fail(s, "fail_at_step", f"must be <= job.steps ({self.steps})", self.fail_at_step)
        _check_int(s, "fail_rank", self.fail_rank, 0)
        if self.fail_at_step is not None and self.fail_rank >= self.num_workers:
            _fail(s, "fail_rank", f"must be < job.num_workers ({self.num_workers})", self.fail_rank)

    @property
    def run_dir(self) -> str:
        """storage_path/name: where Ray Train keeps this run's checkpoints and state."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "job": JobConfig}


@dataclass
class Config:
    """A whole launcher job: the four sections, checked against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The GPT's shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, global batch and seed."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    job: JobConfig = field(default_factory=JobConfig)
    """Run name, length, workers, storage, checkpoints and fault tolerance."""

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build_section(name, value))
            elif not isinstance(value, cls):
                raise ValueError(f"[{name}] must be a table of settings, got {value!r}")
        if self.data.block_size is None:
            self.data.block_size = self.model.block_size
        if self.data.block_size > self.model.block_size:
            raise ValueError(f"data.block_size ({self.data.block_size}) must be <= "
                             f"model.block_size ({self.model.block_size})")
        if self.data.batch_size % self.job.num_workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) is the global batch and must be "
                             f"divisible by job.num_workers ({self.job.num_workers})")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (picklable, JSON-able): what the Ray workers receive."""
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown sections or keys raise ValueError."""
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected {sorted(_SECTIONS)}")
        return cls(**{k: _build_section(k, v) for k, v in d.items()})


def _build_section(name: str, values: Any):
    cls = _SECTIONS[name]
    if not isinstance(values, Mapping):
        raise ValueError(f"[{name}] must be a table of settings, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{name}]: {unknown}; known keys: {sorted(known)}")
    return cls(**values)


# ----------------------------------------------------------------------------- loading


def _read_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        with open(p, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        with open(p) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{p}: invalid YAML: {e}") from None
        data = {} if data is None else data
    else:
        raise ValueError(f"{p}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a table of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``. The value is read as a TOML value
    (numbers, true/false, [lists], "quoted strings"); anything else is a bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    section, dot, name = key.partition(".")
    if not dot or not name or "." in name:
        raise ValueError(f"override key {key!r} must be section.key (e.g. optim.lr)")
    if section not in _SECTIONS:
        raise ValueError(f"override {key!r}: unknown section {section!r}; expected {sorted(_SECTIONS)}")
    known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
    if name not in known:
        raise ValueError(f"override {key!r}: unknown key {name!r} in [{section}]; known keys: {sorted(known)}")
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ValueError(f"[{section}] must be a table of settings, got {table!r}")
    table[name] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, key in ((FAIL_AT_STEP_ENV, "job.fail_at_step"), (FAIL_RANK_ENV, "job.fail_rank")):
        raw = environ.get(var, "").strip()
        if raw:
            try:
                out[key] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {var} must be an integer, got {raw!r}") from None
    return out


def load_config(
    path: Optional[Union[str, os.PathLike]] = None,
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
) -> Config:
    """Read a TOML or YAML job config, apply overrides, validate, return a :class:`Config`.

    Args:
        path: ``.toml``, ``.yaml`` or ``.yml`` file; None: all defaults.
        overrides: ``{"job.steps": 50}`` or ``["job.steps=50", ...]`` (as ``--set``); applied last.
        environ: where to read ``SHARDED_AMS_FAIL_AT_STEP`` / ``SHARDED_AMS_FAIL_RANK``
            (default ``os.environ``).

    Raises:
        ValueError naming the section and key of any unknown or invalid setting.
    """
    data = _read_file(path) if path is not None else {}
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown config section(s) {unknown}; expected {sorted(_SECTIONS)}")
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for key, value in _env_overrides(os.environ if environ is None else environ).items():
        _apply(data, key, value)
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
        for key, value in items:
            _apply(data, key, value)
    return Config.from_dict(data)
