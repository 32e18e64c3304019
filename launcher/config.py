"""Launcher configuration: five dataclasses read from one TOML or YAML file.

A config file has up to five sections, each mapping onto one dataclass below::

    [model]   # ModelConfig: architecture (gpt, llama or your factory), size, precision
    [data]    # DataConfig: corpus (stdlib, prepare-data shards or your factory), batches
    [optim]   # OptimConfig: ShardedAMS hyperparameters and the LR schedule
    [job]     # JobConfig: run name, steps, workers, storage, checkpoints, fault tolerance
    [parallel]  # ParallelConfig (launcher/run/parallel_config.py): zero1 or fsdp, tp

Every field has a default, so an empty file is a valid (tiny) job. Unknown sections
and unknown keys are errors, not silently ignored. Values are resolved in this order,
later wins: the dataclass defaults, the file, the environment variables
``SHARDED_AMS_FAIL_AT_STEP`` / ``SHARDED_AMS_FAIL_RANK`` (fault injection), and the
``overrides`` (``--set section.key=value`` and the CLI's named flags).

This module does not import torch or ray, so the CLI can parse and check a config in
milliseconds. What needs the data or user code (the vocabulary, shard checksums, that a
factory imports) is checked by :mod:`launcher.run.preflight`, still before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config_checks import (check_bool, check_choice, check_env, check_factory, check_float,
                            check_int, check_table, did_you_mean, fail, parse_override,
                            read_config_file)
from .train.models.sizes import ARCH_DEFAULTS, ARCHES, SHAPE_FIELDS, resolve_shape
from .run.parallel_config import ParallelConfig, check_parallel
from .run.scaling import accumulation_steps, check_batch_split, parse_num_workers, worker_range

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "JobConfig",
    "ParallelConfig",
    "Config",
    "load_config",
    "parse_override",
    "accumulation_steps",
    "FAIL_AT_STEP_ENV",
    "FAIL_RANK_ENV",
]

FAIL_AT_STEP_ENV = "SHARDED_AMS_FAIL_AT_STEP"
FAIL_RANK_ENV = "SHARDED_AMS_FAIL_RANK"

_PRESETS = ("grams", "cadam", "adamw")
_BACKENDS = ("auto", "triton", "compiled", "eager")  # as sharded_ams.kernels.BACKENDS
_SCHEDULES = ("constant", "cosine")
_PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")
_REDUCE_DTYPES = ("fp32", "bf16")
_VERIFY = ("sha256", "size")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: "$" would allow a trailing newline


def _absolute(path: Optional[str]) -> Optional[str]:
    return path if path is None or is_uri(path) else str(Path(path).expanduser().absolute())


def is_uri(path: str) -> bool:
    """True for ``s3://bucket/x``, ``gs://...``, ``file://...``: storage that is not a plain path."""
    return "://" in path


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """What to train: a built-in architecture and its shape, or your own factory; and how
    it runs (precision, activation checkpointing, torch.compile).

    Shape fields left unset take the value of ``size`` (or the architecture's default
    shape); fields an architecture does not use must stay unset."""

    arch: str = "gpt"
    """Built-in architecture: "gpt" (launcher/train/models/gpt.py) or "llama" (launcher/train/models/llama.py,
    parameter names and shapes of Hugging Face's LlamaForCausalLM). Ignored with factory."""
    size: Optional[str] = None
    """Named shape of arch: llama "tiny", "60m", "130m", "350m", "1b" (GaLore's configs, see
    docs/llm.md), "llama3-8b", "llama3-70b" (Meta's Llama 3 shapes, with their vocabulary
    of 128256); gpt "tiny". Unset: the arch's default shape (its tiny one)."""
    factory: Optional[str] = None
    """Your own model: "package.module:function", called with this table as a dict, returning
    an nn.Module (contract in docs/llm.md). Unset: the built-in arch. A rerun of the run must keep it."""
    options: dict = field(default_factory=dict)
    """Settings for your factory ([model.options]; built-ins ignore them). A rerun of the run must keep them."""
    vocab_size: Optional[int] = None
    """Token vocabulary; unset: the size's (llama3-*), else the data's (256 for the byte-level
    corpora). Must be >= the data's."""
    block_size: Optional[int] = None
    """Longest sequence the model takes (GPT: position table; Llama: rotary tables)."""
    n_layer: Optional[int] = None
    """Transformer blocks."""
    n_head: Optional[int] = None
    """Attention (query) heads; must divide n_embd."""
    n_kv_head: Optional[int] = None
    """llama: key/value heads (grouped-query attention); must divide n_head. Unset: n_head."""
    n_embd: Optional[int] = None
    """Width of the residual stream (hidden size)."""
    intermediate_size: Optional[int] = None
    """llama: width of the SwiGLU feed-forward."""
    rope_theta: Optional[float] = None
    """llama: base of the rotary frequencies (10000)."""
    norm_eps: Optional[float] = None
    """llama: RMSNorm epsilon (1e-6)."""
    dropout: Optional[float] = None
    """gpt: dropout probability (0)."""
    tie_weights: Optional[bool] = None
    """Share the token embedding with the output head."""
    precision: str = "auto"
    """"fp32"; "bf16-autocast" (fp32 params, bf16 autocast of forward/backward); "bf16"
    (bf16 params and grads, fp32 master weights in ShardedAMS); "auto": bf16 on GPU (6 + 12/N
    bytes per param and 2-byte param gathers, against 8 + 8/N and 4-byte gathers with
    bf16-autocast), fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (built-in
    models only)."""
    compile: bool = False
    """torch.compile the model (in place: parameter names do not change)."""

    def __post_init__(self) -> None:
        s = "model"
        if self.size is not None and not isinstance(self.size, str):
            fail(s, "size", "must be a size name (a string such as \"60m\")", self.size)
        check_factory(s, self.factory)
        check_table(s, "options", self.options)
        check_choice(s, "precision", self.precision, _PRECISIONS)
        check_bool(s, "activation_checkpointing", self.activation_checkpointing)
        check_bool(s, "compile", self.compile)
        if self.factory is None:
            check_choice(s, "arch", self.arch, ARCHES)
            for name, value in resolve_shape(self.arch, self.size,
                                             {k: getattr(self, k) for k in SHAPE_FIELDS}).items():
                setattr(self, name, value)
            if self.arch == "llama" and self.n_kv_head is None:
                self.n_kv_head = self.n_head
        elif self.activation_checkpointing:
            raise ValueError("model.activation_checkpointing applies to the built-in models only; "
                             "checkpoint blocks inside your model.factory's model instead")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "intermediate_size"):
            check_int(s, name, getattr(self, name), 1, allow_none=True)
        for name in ("rope_theta", "norm_eps"):
            check_float(s, name, getattr(self, name), low=0.0, low_open=True, allow_none=True)
        check_float(s, "dropout", self.dropout, low=0.0, high=1.0, high_open=True, allow_none=True)
        if self.tie_weights is not None:
            check_bool(s, "tie_weights", self.tie_weights)
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.factory is None and self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.n_embd / model.n_head = {self.n_embd // self.n_head} must be even "
                             "(rotary embeddings rotate pairs)")

    def shape(self) -> dict[str, Any]:
        """The shape fields the architecture uses (what must match to resume a checkpoint)."""
        keys = ("arch", "vocab_size", *ARCH_DEFAULTS.get(self.arch, {})) if self.factory is None \
            else ("factory", "vocab_size", "block_size")
        return {k: getattr(self, k) for k in keys}


@dataclass
class DataConfig:
    """The corpus (by default the Python standard library's sources, byte-level; or a
    ``sharded-ams prepare-data`` directory; or your factory) and how batches are drawn."""

    path: Optional[str] = None
    """A `sharded-ams prepare-data` output directory (token shards + index.json). Unset (and
    no factory): the standard library's sources, byte-level."""
    factory: Optional[str] = None
    """Your own data: "package.module:function", called with this table as a dict, returning
    {"train": 1-D ints, "val": 1-D ints, "vocab_size": int} (docs/llm.md)."""
    options: dict = field(default_factory=dict)
    """Free-form settings for your factory ([data.options])."""
    verify: str = "sha256"
    """How the driver checks a prepare-data directory before training: "sha256" (every
    shard's checksum) or "size" (sizes only: faster on a huge corpus)."""
    max_bytes: int = 4_000_000
    """Standard-library corpus only: bytes to load (train + validation)."""
    batch_size: int = 16
    """GLOBAL batch size in sequences per optimizer step = micro_batch_size x gradient
    accumulation steps x workers, whatever the worker count; must be divisible by every
    worker count job.num_workers allows (also by the worker count you may resume on)."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward on one worker; must divide batch_size / workers, the
    quotient being the gradient accumulation steps. Unset: batch_size / workers (no accumulation)."""
    block_size: Optional[int] = None
    """Training sequence length; default (unset): model.block_size. At most model.block_size."""
    seed: int = 0
    """Seed of the model init and of the batch order (batches are a function of (seed, step));
    0 <= seed < 2**64. A rerun of the run must keep it (and its corpus and model.precision):
    docs/fault-tolerance.md, "What a rerun may change"."""
    val_fraction: float = 0.1
    """Fraction of the corpus held out (from its end) for validation."""
    eval_iters: int = 8
    """Global batches averaged for each validation loss."""

    def __post_init__(self) -> None:
        s = "data"
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            fail(s, "path", "must be a prepare-data output directory", self.path)
        if is_uri(self.path or ""):
            fail(s, "path", "must be a local or shared (NFS) directory, not a URI", self.path)
        self.path = _absolute(self.path)
        check_factory(s, self.factory)
        if self.path and self.factory:
            raise ValueError("set data.path or data.factory, not both")
        check_table(s, "options", self.options)
        check_choice(s, "verify", self.verify, _VERIFY)
        check_int(s, "max_bytes", self.max_bytes, 1)
        check_int(s, "batch_size", self.batch_size, 1)
        check_int(s, "micro_batch_size", self.micro_batch_size, 1, allow_none=True)
        check_int(s, "block_size", self.block_size, 1, allow_none=True)
        check_int(s, "seed", self.seed, 0)
        if self.seed >= 2**64:  # torch.manual_seed (every worker's first call) takes 64 bits
            fail(s, "seed", "must be < 2**64 (18446744073709551616, torch.manual_seed's limit)", self.seed)
        check_float(s, "val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int(s, "eval_iters", self.eval_iters, 1)


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
    """Decoupled weight decay, as in AdamW (0 here; torch.optim.AdamW's default is 0.01)."""
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
    schedule_steps: Optional[int] = None
    """Steps the cosine decay ends at (lr = min_lr_ratio * lr from there on). Unset: job.steps
    of the run's first launch, kept when a rerun raises job.steps (set it to re-plan the decay)."""
    grad_reduce_dtype: str = "fp32"
    """Dtype gradients are reduced in across workers when params are bf16 (model.precision =
    "bf16"): "fp32" (default, as Megatron's grad_reduce_in_fp32 and FSDP's reduce_dtype) or
    "bf16" (half the bytes, less precise as workers grow). fp32 params always reduce in fp32."""
    bucket_numel: Optional[int] = None
    """Elements per communication bucket (gradient reduce and param gather are issued per
    bucket, overlapped with backward and forward). Unset: ShardedAMS's default for the
    backend, which on NCCL grows with the number of workers (each rank's slice of a bucket
    must stay large enough that per-collective latency does not dominate). See
    docs/sharding.md, "Overlap"."""
    overlap: bool = True
    """Reduce gradients during backward and gather params during the next forward (hooks on
    every module that owns params: graph breaks under model.compile). false: both in step()."""

    def __post_init__(self) -> None:
        s = "optim"
        if self.preset == "":
            self.preset = None
        if self.preset is not None:
            if isinstance(self.preset, str):
                self.preset = self.preset.lower()
            check_choice(s, "preset", self.preset, _PRESETS)
            if self.beta3 is not None or self.lam is not None:
                raise ValueError(
                    f"optim.preset={self.preset!r} fixes beta3 and lam; set optim.preset = \"\" "
                    f"to use optim.beta3={self.beta3!r} and optim.lam={self.lam!r}"
                )
        check_float(s, "lr", self.lr, low=0.0)
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            fail(s, "betas", "must be a pair [beta1, beta2]", self.betas)
        for i, b in enumerate(self.betas):
            check_float(s, f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_float(s, "eps", self.eps, low=0.0, low_open=True)
        check_float(s, "weight_decay", self.weight_decay, low=0.0)
        check_float(s, "beta3", self.beta3, low=0.0, high=1.0, high_open=True, allow_none=True)
        check_float(s, "lam", self.lam, allow_none=True)
        check_float(s, "max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_none=True)
        check_choice(s, "backend", self.backend, _BACKENDS)
        check_choice(s, "schedule", self.schedule, _SCHEDULES)
        check_int(s, "warmup_steps", self.warmup_steps, 0)
        check_float(s, "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_choice(s, "grad_reduce_dtype", self.grad_reduce_dtype, _REDUCE_DTYPES)
        check_int(s, "bucket_numel", self.bucket_numel, 1, allow_none=True)
        check_int(s, "schedule_steps", self.schedule_steps, 1, allow_none=True)
        check_bool(s, "overlap", self.overlap)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sharded_ams.ShardedAMS`` (everything but the schedule): the
        one place the launcher builds them."""
        kw: dict[str, Any] = dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                  weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                                  backend=self.backend)
        if self.preset is not None:
            kw["preset"] = self.preset
        else:
            kw.update(beta3=self.beta3, lam=self.lam)
        if self.bucket_numel is not None:
            kw["bucket_numel"] = self.bucket_numel
        if not self.overlap:  # only when off: callers may pass their own overlap=
            kw["overlap"] = False
        if self.grad_reduce_dtype == "bf16":
            import torch  # the driver imports this module without needing torch for it

            kw["grad_reduce_dtype"] = torch.bfloat16
        return kw


@dataclass
class JobConfig:
    """One training run: its name and length, where it runs, and how it survives failures."""

    name: str = "gpt-tiny"
    """Run name; the run lives in storage_path/name. Rerunning with the same name resumes it."""
    steps: int = 200
    """Total optimizer steps. Raise it and rerun to train a finished run further (the cosine
    schedule keeps the length the run started with unless optim.schedule_steps is set)."""
    num_workers: Union[int, list] = 2
    """Ray Train workers (ranks); with use_gpu, one GPU each. A fixed count (4), or an
    elastic range [min, max] ("2-4" on the command line): Ray Train starts as many as the
    cluster has room for, at least min, shrinks when a node is lost and grows back when one
    joins, each time restarting the group from the last checkpoint, resharded
    (docs/fault-tolerance.md). data.batch_size must split evenly at every size in the range."""
    resize_interval_s: float = 15.0
    """Elastic ranges only: seconds between Ray Train's checks whether the running group can
    grow to use workers that joined (Ray's elastic_resize_monitor_interval_s; Ray's default
    is 60). Each resize restarts the group from the last checkpoint: a shorter interval uses
    a returned node sooner; Ray also sees node changes only every ~20 s."""
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
    working_dir: Optional[str] = None
    """A directory Ray ships to every worker and makes their working directory (Ray
    runtime_env "working_dir"): how your factories' code reaches the workers of a cluster."""
    py_modules: list = field(default_factory=list)
    """Local package directories (or remote .zip URIs) Ray ships to every worker and puts on
    their import path (Ray runtime_env "py_modules")."""
    env: dict = field(default_factory=dict)
    """Environment variables set in every worker (Ray runtime_env "env_vars"), e.g.
    {NCCL_SOCKET_IFNAME = "eth0", NCCL_DEBUG = "WARN"}: names and values are strings."""

    def __post_init__(self) -> None:
        s = "job"
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            fail(s, "name", "must be letters, digits, '.', '_' or '-' (a directory name)", self.name)
        check_int(s, "steps", self.steps, 1)
        self.num_workers = parse_num_workers(self.num_workers)
        check_float(s, "resize_interval_s", self.resize_interval_s, low=0.0, low_open=True)
        check_bool(s, "use_gpu", self.use_gpu)
        if not isinstance(self.storage_path, str) or not self.storage_path:
            fail(s, "storage_path", "must be a non-empty path or URI", self.storage_path)
        if not is_uri(self.storage_path):
            self.storage_path = str(Path(self.storage_path).expanduser().absolute())
        check_int(s, "checkpoint_every", self.checkpoint_every, 1)
        check_int(s, "keep_last", self.keep_last, 1)
        check_int(s, "max_failures", self.max_failures, -1)
        check_int(s, "log_every", self.log_every, 1)
        check_int(s, "eval_every", self.eval_every, 0)
        if self.resume_from is not None and (not isinstance(self.resume_from, str) or not self.resume_from):
            fail(s, "resume_from", "must be a checkpoint directory", self.resume_from)
        if self.resume_from is not None and not is_uri(self.resume_from):
            self.resume_from = str(Path(self.resume_from).expanduser().absolute())
        check_int(s, "fail_at_step", self.fail_at_step, 1, allow_none=True)
        if self.fail_at_step is not None and self.fail_at_step > self.steps:
            fail(s, "fail_at_step", f"must be <= job.steps ({self.steps})", self.fail_at_step)
        check_int(s, "fail_rank", self.fail_rank, 0)
        if self.fail_at_step is not None and self.fail_rank >= self.min_workers:
            fail(s, "fail_rank", f"must be < job.num_workers ({self.min_workers}: a rank every size has)",
                 self.fail_rank)
        if self.working_dir is not None:
            if not isinstance(self.working_dir, str) or not self.working_dir:
                fail(s, "working_dir", "must be a directory", self.working_dir)
            self.working_dir = _absolute(self.working_dir)
        if not isinstance(self.py_modules, list) or not all(isinstance(m, str) and m for m in self.py_modules):
            fail(s, "py_modules", "must be a list of package directories or URIs", self.py_modules)
        self.py_modules = [m if is_uri(m) or not Path(m).exists() else str(Path(m).absolute())
                           for m in self.py_modules]
        check_env(s, "env", self.env)

    def runtime_env(self) -> dict[str, Any]:
        """Ray runtime_env for working_dir / py_modules / env ({} when none is set)."""
        env: dict[str, Any] = {}
        if self.working_dir:
            env["working_dir"] = self.working_dir
        if self.py_modules:
            env["py_modules"] = list(self.py_modules)
        if self.env:
            env["env_vars"] = dict(self.env)
        return env

    @property
    def min_workers(self) -> int:
        """The smallest worker count (num_workers itself when fixed)."""
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        """The largest worker count (num_workers itself when fixed)."""
        return worker_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        """num_workers is a range: Ray Train resizes the group within it."""
        return self.min_workers != self.max_workers

    @property
    def run_dir(self) -> str:
        """storage_path/name: where Ray Train keeps this run's checkpoints and state."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "job": JobConfig,
             "parallel": ParallelConfig}


@dataclass
class Config:
    """A whole launcher job: the five sections, checked against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture, shape and precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, global and micro batch, seed."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    job: JobConfig = field(default_factory=JobConfig)
    """Run name, length, workers, storage, checkpoints and fault tolerance."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """ZeRO-1 or FSDP2, and the tensor-parallel degree."""

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build_section(name, value))
            elif not isinstance(value, cls):
                raise ValueError(f"[{name}] must be a table of settings, got {value!r}")
        if self.data.block_size is None:
            if self.model.block_size is None:
                raise ValueError("data.block_size (the training sequence length) must be set: "
                                 "model.factory models have no model.block_size to take it from")
            self.data.block_size = self.model.block_size
        if self.model.block_size is not None and self.data.block_size > self.model.block_size:
            raise ValueError(f"data.block_size ({self.data.block_size}) must be <= "
                             f"model.block_size ({self.model.block_size})")
        if self.parallel.tp == 1:
            check_batch_split(self.data.batch_size, self.job.num_workers, self.data.micro_batch_size)
        check_parallel(self.parallel, self.model, self.data, self.job)
        if self.model.vocab_size is None and self.data.path is None and self.data.factory is None:
            self.model.vocab_size = 256  # the byte-level standard-library corpus

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
    _check_keys(name, values)
    return cls(**values)


def _check_keys(name: str, values: Mapping, where: str = "") -> None:
    """ValueError for keys ``[name]`` does not have (``where``: "FILE: ", the file they
    came from), naming a near miss."""
    known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}unknown key(s) in [{name}]: {unknown}"
                         f"{did_you_mean(unknown, known)}; known keys: {sorted(known)}")


# ----------------------------------------------------------------------------- loading


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    section, dot, name = key.partition(".")
    if not dot or not name or "." in name:
        raise ValueError(f"override key {key!r} must be section.key (e.g. optim.lr)")
    if section not in _SECTIONS:
        raise ValueError(f"override {key!r}: unknown section {section!r}; expected {sorted(_SECTIONS)}")
    known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
    if name not in known:
        raise ValueError(f"override {key!r}: unknown key {name!r} in [{section}]"
                         f"{did_you_mean([name], known)}; known keys: {sorted(known)}")
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
    data = read_config_file(path) if path is not None else {}
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown config section(s) {unknown}; expected {sorted(_SECTIONS)}")
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for name, values in data.items():
        if isinstance(values, Mapping):
            _check_keys(name, values, f"{path}: ")
    for key, value in _env_overrides(os.environ if environ is None else environ).items():
        _apply(data, key, value)
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
        for key, value in items:
            _apply(data, key, value)
    return Config.from_dict(data)
