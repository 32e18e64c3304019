"""Checks on the driver before Ray starts: what would otherwise fail in every worker, on
every restart, up to ``job.max_failures`` times (or fail later, after minutes of Ray start-up).

* the storage: ``job.storage_path`` (local or NFS) exists or can be made, and is writable;
* the code Ray ships: ``job.working_dir`` and local ``job.py_modules`` exist;
* the optimizer backend fits the device (``"triton"`` needs GPU workers);
* on an embedded Ray (``local=True``): the workers fit this machine's cores (a warning:
  more workers than cores share them) and GPUs (an error);
* the data: a prepare-data directory's index, every shard's size and sha256
  (``data.verify``), or a data factory's import and return value; each split holds a
  ``data.block_size`` window;
* the vocabulary: ``model.vocab_size`` unset takes the data's; set, it must cover it;
* the model: built on the ``meta`` device (no memory, any size), so a factory that does not
  import or returns the wrong thing fails here; its parameter count and FLOPs per token;
* a cluster's address (``--address HOST:PORT``): something answers there
  (:func:`check_ray_address`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.config import Config, is_uri
from launcher.run.scaling import oversubscription_warning

__all__ = ["preflight", "Preflight", "LaunchError", "check_ray_address"]


class LaunchError(ValueError):
    """Something found wrong on the driver before training starts (storage, resources,
    the checkpoint to resume): the CLI prints the message and exits with status 2."""


@dataclass
class Preflight:
    """The checked config (``model.vocab_size`` filled in) and what was learned doing it."""

    config: Config
    num_params: int
    flops_per_token: Optional[float]
    data: dict
    warnings: list = field(default_factory=list)
    """Messages to show the user (e.g. more workers than cores)."""


def preflight(cfg: Config, *, local: Optional[bool] = None) -> Preflight:
    """Check ``cfg`` (see the module docstring); raise ValueError (:class:`LaunchError` for
    storage and resources) naming the key or file at fault. ``local``: the job runs on an
    embedded Ray on this machine (None: unknown, its resources are not checked)."""
    import torch

    check_storage(cfg)
    check_runtime_env(cfg)
    check_backend(cfg)
    warnings = check_local_resources(cfg) if local else []

    from launcher.train.models import build_model
    from launcher.data.tokens import load_training_data
    from launcher.train.step import model_flops_per_token

    data = load_training_data(dataclasses.asdict(cfg.data))
    data.check_block_size(cfg.data.block_size, _where(cfg))
    mcfg = cfg.model
    if mcfg.vocab_size is None:
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size)
    elif mcfg.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size ({mcfg.vocab_size}) is smaller than the data's "
                         f"vocabulary ({data.vocab_size}, {_where(cfg)})")
    cfg = dataclasses.replace(cfg, model=mcfg)
    with torch.device("meta"):
        model = build_model(dataclasses.asdict(cfg.model))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"model.factory = {cfg.model.factory!r} returned a model with no trainable parameters")
    from launcher.run.parallel_config import held_grads_note

    note = held_grads_note(cfg.parallel, cfg.model, cfg.data, cfg.optim, cfg.job, n)
    return Preflight(cfg, n, model_flops_per_token(model, cfg.data.block_size), data.describe,
                     warnings + ([note] if note else []))


def check_storage(cfg: Config) -> None:
    """``job.storage_path`` (local or NFS; object-store URIs are left to Ray) can hold the
    run: a file can be written in it or, if it does not exist yet, in its nearest existing
    parent (which ``run`` then creates it in). Nothing is left behind."""
    path = Path(cfg.job.storage_path)
    if is_uri(str(path)):
        return
    run_dir = Path(cfg.job.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LaunchError(f"job.storage_path/job.name {run_dir} exists and is not a directory")
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=where, prefix=".sharded-ams-write-test-"):
            pass
    except OSError as exc:
        raise LaunchError(f"job.storage_path {path} is not writable ({where}: {exc.strerror or exc}); "
                          "pick another --storage-path") from None


def check_runtime_env(cfg: Config) -> None:
    """What Ray would fail to upload, after starting: a missing working_dir or py_module."""
    job = cfg.job
    if job.working_dir and not is_uri(job.working_dir) and not os.path.isdir(job.working_dir):
        raise LaunchError(f"job.working_dir {job.working_dir} is not a directory")
    for m in job.py_modules:
        if not is_uri(m) and not os.path.exists(m):
            raise LaunchError(f"job.py_modules: {m} does not exist (a local package directory or a "
                              "remote .zip URI)")


def check_backend(cfg: Config) -> None:
    """``optim.backend = "triton"`` runs on CUDA tensors only (or under TRITON_INTERPRET=1)."""
    if cfg.optim.backend == "triton" and not cfg.job.use_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise LaunchError('optim.backend = "triton" needs GPU workers (job.use_gpu = true, --gpus); '
                          'CPU workers use "compiled" or "eager" ("auto" picks)')


def check_local_resources(cfg: Config) -> list[str]:
    """An embedded Ray runs every worker on this machine: more workers than cores is a
    warning (they share the cores); more than its GPUs with ``job.use_gpu`` an error."""
    job = cfg.job
    if job.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < job.min_workers:  # Ray would wait for them forever
            raise LaunchError(f"job.use_gpu with {job.min_workers} workers needs {job.min_workers} GPUs; "
                              f"this machine has {gpus}")
        return []  # one GPU per worker: Ray never places more (an elastic range stops at gpus)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    msg = oversubscription_warning(job.num_workers, cores, "CPU", local=True)
    return [msg] if msg else []


def _where(cfg: Config) -> str:
    if cfg.data.factory:
        return f"data.factory {cfg.data.factory!r}"
    if cfg.data.path:
        return f"data.path {cfg.data.path}"
    return "the standard-library corpus"


#: how long a cluster's head may take to accept a TCP connection
CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """LaunchError when nothing accepts a TCP connection at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``auto`` and other forms are Ray's to resolve). Without it a
    mistyped port made ``ray.init`` retry for minutes, printing GCS timeouts (Ray 2.60:
    still retrying after 200 s), instead of saying what is wrong."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise LaunchError(f"--address {address}: no Ray cluster answers there ({why}); start "
                          f"its head with `ray start --head --port={port}` or check the "
                          "address (docs/cluster.md)") from None
