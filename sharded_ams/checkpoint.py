"""Checkpoints of :class:`~sharded_ams.ShardedAMS` training: a documented on-disk format
that loads on any world size (see ``docs/checkpoint.md``).

A checkpoint is a directory::

    step-00001000/
        shard-rank00000-of-00004.pt   # rank r's optimizer.state_dict() + its RNG states
        ...
        shard-rank00003-of-00004.pt
        model-extra.pt                # rank 0: buffers and frozen params (only with model=)
        trainer.pt                    # rank 0: step, lr_scheduler state, ``extra``
        manifest.json                 # rank 0, written LAST: sizes + sha256 of every file

State is stored in the unpadded per-parameter index space (``(name, offset, length)``
pieces of each param), never in the padded flat-buffer layout, so a checkpoint taken on
N ranks loads on M: each rank reads only the shard files that overlap its own ranges.

Commit protocol: every rank writes its files to a temporary name, flushes, fsyncs,
renames and fsyncs the directory; the file sizes and checksums are gathered to rank 0
(``all_gather_object``, which is also the barrier); rank 0 writes ``manifest.json`` to a
temporary name, fsyncs and renames it. A directory without a manifest is not a
checkpoint. Old checkpoints are deleted only after a newer one committed.

No Ray here: the launcher calls these functions from its training loop.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Manifest", "SaveHandle", "CheckpointManager", "save_checkpoint",
           "load_checkpoint", "validate_checkpoint", "find_latest_checkpoint", "consolidate",
           "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "shard_file_name", "step_dir_name"]

FORMAT = "sharded_ams.checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_EXTRA_NAME = "model-extra.pt"
TRAINER_NAME = "trainer.pt"
TMP_SUFFIX = ".tmp"
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_SHARD_RE = re.compile(r"^shard-rank(\d{5})-of-(\d{5})\.pt$")
_HASH_CHUNK = 16 << 20

PathLike = Union[str, os.PathLike]


def shard_file_name(rank: int, world_size: int) -> str:
    return f"shard-rank{rank:05d}-of-{world_size:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. ``kind`` says why:

    * ``"uncommitted"``: no ``manifest.json`` (a save that never finished);
    * ``"format"``: the manifest does not parse or is not this format/version;
    * ``"missing"``: a file named by the manifest is absent;
    * ``"corrupt"``: a file's size or sha256 differs from the manifest, or it does not load;
    * ``"model_mismatch"``: parameter names/shapes (or buffers) differ from the model's;
    * ``"optimizer_mismatch"``: optimizer class, state keys or param groups differ;
    * ``"save_failed"``: a rank could not write its files (nothing was committed).

    ``path`` is the file (or directory) concerned.
    """

    def __init__(self, message: str, *, path: Optional[PathLike] = None, kind: str = "corrupt"):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.kind = kind

    #: kinds after which an older checkpoint may still be good (used by ``load_latest``)
    RECOVERABLE = frozenset({"uncommitted", "format", "missing", "corrupt"})


# ---------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a committed checkpoint (see docs/checkpoint.md)."""

    path: Path
    step: int
    world_size: int
    params: dict[str, dict]          # name -> {shape, dtype, group, numel}, in optimizer order
    optimizer: dict                  # class, state_format_version, param_groups, state_keys, ...
    files: dict[str, dict]           # file name -> {kind, size, sha256[, rank, pieces]}
    model: Optional[dict] = None     # {"keys": {state_dict key: {...}}} or None (no model=)
    created: str = ""
    created_unix: float = 0.0
    format: str = FORMAT
    version: int = FORMAT_VERSION
    torch_version: str = ""
    sharded_ams_version: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def state_keys(self) -> list[str]:
        return list(self.optimizer["state_keys"])

    @property
    def param_names(self) -> list[str]:
        return list(self.params)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer["param_groups"]

    def shard_files(self) -> list[str]:
        """Shard file names in rank order."""
        return [shard_file_name(r, self.world_size) for r in range(self.world_size)]

    def numel(self) -> int:
        return sum(p["numel"] for p in self.params.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes of each optimizer state (all fp32) over all ranks, unpadded."""
        n = self.numel()
        return {k: 4 * n for k in self.state_keys}

    def files_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> "Manifest":
        return cls(path=path, step=int(d["step"]), world_size=int(d["world_size"]),
                   params=d["params"], optimizer=d["optimizer"], files=d["files"],
                   model=d.get("model"), created=d.get("created", ""),
                   created_unix=float(d.get("created_unix", 0.0)), format=d["format"],
                   version=int(d["version"]), torch_version=d.get("torch_version", ""),
                   sharded_ams_version=d.get("sharded_ams_version", ""), raw=d)


def _read_manifest(path: Path) -> Manifest:
    """Parse and structurally check ``path/manifest.json`` (no file contents are read)."""
    mpath = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory", path=path, kind="missing")
    if not mpath.is_file():
        raise CheckpointError(f"{path}: not a committed checkpoint (no {MANIFEST_NAME}; "
                              "the save did not finish)", path=mpath, kind="uncommitted")
    try:
        with open(mpath, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
        if int(d.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"format version {d.get('version')} is newer than this code "
                             f"reads ({FORMAT_VERSION})")
        man = Manifest.from_dict(d, path)
    except CheckpointError:
        raise
    except Exception as exc:  # JSON errors, missing keys, wrong types
        raise CheckpointError(f"{mpath}: corrupt manifest ({type(exc).__name__}: {exc})",
                              path=mpath, kind="format") from exc
    _check_structure(man, mpath)
    return man


def _check_structure(man: Manifest, mpath: Path) -> None:
    """Every rank's shard is listed and the pieces cover every param exactly once."""
    def bad(msg: str):
        return CheckpointError(f"{mpath}: corrupt manifest ({msg})", path=mpath, kind="format")

    if man.world_size < 1:
        raise bad(f"world_size {man.world_size}")
    spans: dict[str, list[tuple[int, int]]] = {n: [] for n in man.params}
    for name in man.shard_files():
        entry = man.files.get(name)
        if entry is None or entry.get("kind") != "shard":
            raise bad(f"shard file {name} is not listed")
        for pname, off, length in entry["pieces"]:
            if pname not in spans:
                raise bad(f"{name} holds unknown param {pname!r}")
            spans[pname].append((int(off), int(off) + int(length)))
    for pname, iv in spans.items():
        pos = 0
        for a, b in sorted(iv):
            if a != pos:
                raise bad(f"param {pname!r}: pieces do not tile [0, numel) at element {pos}")
            pos = b
        if pos != man.params[pname]["numel"]:
            raise bad(f"param {pname!r}: pieces cover {pos} of {man.params[pname]['numel']} "
                      "elements")
    for name, entry in man.files.items():
        if "/" in name or name.startswith(".") or "size" not in entry or "sha256" not in entry:
            raise bad(f"bad file entry {name!r}")


def _sha256_file(fpath: Path) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _check_file(man: Manifest, name: str, checksum: bool = True) -> Path:
    """Raise CheckpointError unless file ``name`` exists with the manifest's size (and sha256)."""
    entry = man.files[name]
    fpath = man.path / name
    try:
        size = fpath.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{fpath}: missing file (listed in the manifest)", path=fpath,
                              kind="missing") from None
    if size != int(entry["size"]):
        raise CheckpointError(f"{fpath}: size is {size} bytes, the manifest says "
                              f"{entry['size']} (truncated or corrupt)", path=fpath,
                              kind="corrupt")
    if checksum:
        digest = _sha256_file(fpath)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{fpath}: sha256 checksum mismatch (file {digest[:12]}..., "
                                  f"manifest {entry['sha256'][:12]}...): the file is corrupt",
                                  path=fpath, kind="corrupt")
    return fpath


def _torch_load(fpath: Path, mmap: bool = True) -> Any:
    try:
        return torch.load(fpath, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"{fpath}: cannot be loaded ({type(exc).__name__}: {exc})",
                              path=fpath, kind="corrupt") from exc


def validate_checkpoint(path: PathLike, *, checksums: bool = True) -> Manifest:
    """Check that ``path`` is a committed, intact checkpoint and return its manifest.

    Checks: the manifest exists and parses; it lists every rank's shard and the pieces
    tile every param; every listed file exists with the listed size and (``checksums``,
    the default) sha256. Raises :class:`CheckpointError` naming the file otherwise.
    """
    man = _read_manifest(Path(path))
    for name in man.files:
        _check_file(man, name, checksum=checksums)
    return man


# ---------------------------------------------------------------------------- helpers
@dataclass
class _Ctx:
    """Who we are in the optimizer's data-parallel group."""

    rank: int
    world_size: int
    group: Any
    active: bool

    @classmethod
    def of(cls, optimizer) -> "_Ctx":
        comm = getattr(optimizer, "comm", None)
        if comm is not None:
            return cls(comm.rank, comm.world_size, comm.group, bool(comm.active))
        return cls(0, 1, None, False)

    def all_gather(self, obj: Any) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast0(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """File-like object for ``torch.save`` that counts and hashes the bytes it writes."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_file(dirpath: Path, name: str, obj: Any) -> dict:
    """torch.save ``obj`` to ``dirpath/name`` via a temp file: write, flush, fsync, rename.
    Returns {"size", "sha256"} (hashed while writing: the file is not read back)."""
    final = dirpath / name
    tmp = dirpath / (name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"size": w.n, "sha256": w.h.hexdigest()}


def _snapshot(obj: Any) -> Any:
    """Deep copy of the tensors in ``obj`` onto the CPU (a point-in-time snapshot)."""
    if isinstance(obj, Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return type(obj)((k, _snapshot(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_snapshot(v) for v in obj)
    return obj


def _cpu(obj: Any) -> Any:
    """Like _snapshot, but CPU tensors are kept (state_dict() already cloned them)."""
    if isinstance(obj, Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return type(obj)((k, _cpu(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _check_weights_only(obj: Any, what: str) -> None:
    """Fail at save time (not at resume time) if ``obj`` will not load with weights_only."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:
        raise TypeError(f"{what} must hold only tensors and plain Python values (dict, list, "
                        f"tuple, str, int, float, bool, None) so that it loads with "
                        f"torch.load(weights_only=True): {exc}") from exc


def _rng_state() -> dict:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        ns = np.random.get_state(legacy=False)
        st["numpy"] = {"bit_generator": ns["bit_generator"],
                       "key": torch.from_numpy(ns["state"]["key"].astype("int64")),
                       "pos": int(ns["state"]["pos"]), "has_gauss": int(ns["has_gauss"]),
                       "gauss": float(ns["gauss"])}
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_tuplify(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            log.warning("not restoring CUDA RNG: saved for %d devices, %d visible",
                        len(states), torch.cuda.device_count())
    if "numpy" in st:
        import numpy as np

        ns = st["numpy"]
        np.random.set_state({"bit_generator": ns["bit_generator"],
                             "state": {"key": ns["key"].numpy().astype("uint32"),
                                       "pos": ns["pos"]},
                             "has_gauss": ns["has_gauss"], "gauss": ns["gauss"]})


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _sharded_sd_check(osd: dict) -> None:
    if not isinstance(osd, dict) or osd.get("format") != "sharded_ams":
        raise TypeError("save_checkpoint needs a ShardedAMS optimizer (its state_dict() is in "
                        "the sharded_ams format); for a single-process AMS use torch.save")


def _optimizer_params(optimizer) -> list[tuple[Tensor, str]]:
    """(param, name) of the optimizer's trainable params, in optimizer (group) order."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = optimizer.param_names()
    return [(p, n) for p, n in zip(params, names) if p.requires_grad]


def _model_info(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Classify ``model.state_dict()`` keys: optimized params (by optimizer name, aliases
    of tied weights included) and the rest (buffers, frozen params, extra state), which is
    returned as tensors to save in ``model-extra.pt``."""
    by_id = {id(p): n for p, n in _optimizer_params(optimizer)}
    keys: dict[str, dict] = {}
    extra: dict[str, Any] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, Tensor) and id(v) in by_id:
            keys[k] = {"param": by_id[id(v)]}
        elif isinstance(v, Tensor):
            keys[k] = {"extra": True, "shape": list(v.shape), "dtype": str(v.dtype)}
            extra[k] = v
        else:  # get_extra_state() objects
            keys[k] = {"extra": True, "object": True}
            extra[k] = v
    return {"keys": keys}, extra


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


# ---------------------------------------------------------------------------- save
class SaveHandle:
    """Result of :func:`save_checkpoint`.

    ``wait()`` finishes the save and returns the checkpoint path: it joins the background
    write (``async_save=True``), gathers every rank's file sizes and checksums and lets
    rank 0 commit the manifest. With ``async_save=True`` it is a **collective**: every
    rank of the optimizer's process group must call it (in the same order as any other
    collective), and the checkpoint exists only after it returned. A synchronous save
    returns a handle that is already done (``wait()`` is then a no-op).
    """

    def __init__(self, path: Path, ctx: _Ctx, step: int, meta: Optional[dict], shared_fs: bool,
                 jobs: list[tuple[str, Any]], pieces: list):
        self.path, self._ctx, self.step, self._meta = path, ctx, step, meta
        self._pieces = pieces
        self._shared_fs, self._jobs = shared_fs, jobs
        self._files: dict[str, dict] = {}
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._done = False
        self._failure: Optional[CheckpointError] = None
        self._callbacks: list[Callable[["SaveHandle"], None]] = []
        self.manifest: Optional[dict] = None   # rank 0: the committed manifest dict
        self.blocked_s = 0.0                   # time the caller was blocked in save_checkpoint
        self.write_s = 0.0                     # time the file writes took (thread or inline)
        self.commit_s = 0.0                    # time of gather + manifest commit in wait()

    def _write(self) -> None:
        t0 = time.perf_counter()
        try:
            for name, obj in self._jobs:
                self._files[name] = _write_file(self.path, name, obj)
            _fsync_dir(self.path)
            if self._ctx.rank == 0 or not self._shared_fs:
                _fsync_dir(self.path.parent)  # the new directory's entry
        except BaseException as exc:  # reported collectively in wait()
            self._error = exc
        finally:
            self._jobs = []  # drop the snapshot as soon as it is on disk
            self.write_s = time.perf_counter() - t0

    def _start(self, async_save: bool) -> None:
        if async_save:
            self._thread = threading.Thread(target=self._write, name="sharded-ams-ckpt",
                                            daemon=True)
            self._thread.start()
        else:
            self._write()

    def done(self) -> bool:
        """True once the save committed (``wait()`` returned without error)."""
        return self._done

    def writing(self) -> bool:
        """True while the background write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def add_done_callback(self, fn: Callable[["SaveHandle"], None]) -> None:
        """Run ``fn(handle)`` on every rank after the commit (at once if already done)."""
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def wait(self) -> Path:
        if self._failure is not None:
            raise self._failure
        if self._done:
            return self.path
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        ctx = self._ctx
        err = None if self._error is None else f"{type(self._error).__name__}: {self._error}"
        infos = ctx.all_gather({"rank": ctx.rank, "files": self._files, "error": err,
                                "pieces": self._pieces})
        status: Optional[str] = None
        failed = [i for i in infos if i["error"]]
        if failed:
            status = "; ".join(f"rank {i['rank']}: {i['error']}" for i in failed)
        elif ctx.rank == 0:
            try:
                self.manifest = _commit_manifest(self.path, self._meta, infos)
            except Exception as exc:
                status = f"rank 0 could not write the manifest: {type(exc).__name__}: {exc}"
        status = ctx.broadcast0(status)
        self.commit_s = time.perf_counter() - t0
        if status is not None:
            self._failure = CheckpointError(f"{self.path}: save failed, nothing committed "
                                            f"({status})", path=self.path, kind="save_failed")
            raise self._failure
        self._done = True
        if ctx.rank == 0:
            log.info("committed checkpoint %s (step %d)", self.path, self.step)
        for fn in self._callbacks:
            fn(self)
        self._callbacks = []
        return self.path


def _commit_manifest(path: Path, meta: dict, infos: list[dict]) -> dict:
    """Rank 0: write manifest.json (temp name, fsync, atomic rename, fsync dir) LAST."""
    files: dict[str, dict] = {}
    world = meta["world_size"]
    for info in infos:
        files.update(info["files"])
        name = shard_file_name(info["rank"], world)
        if name not in files:
            raise RuntimeError(f"rank {info['rank']} reported no write of {name}")
        files[name].update(kind="shard", rank=info["rank"], pieces=info["pieces"])
    for name in (MODEL_EXTRA_NAME, TRAINER_NAME):
        if name in files:
            files[name]["kind"] = name.split(".")[0]
    now = time.time()
    manifest = {**meta, "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                .isoformat(), "created_unix": now, "files": dict(sorted(files.items()))}
    data = json.dumps(manifest, indent=1, default=repr).encode("utf-8")
    tmp = path / (MANIFEST_NAME + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST_NAME)
    _fsync_dir(path)
    return manifest


def _uncommit(path: Path) -> None:
    """Remove a manifest so the directory stops being a checkpoint (before rewriting or
    deleting it); durable before anything else changes."""
    mpath = path / MANIFEST_NAME
    if mpath.exists():
        mpath.unlink()
        _fsync_dir(path)


def save_checkpoint(path: PathLike, optimizer, *, model: Optional[nn.Module] = None, step: int,
                    extra: Optional[dict] = None, lr_scheduler=None, async_save: bool = False,
                    shared_fs: bool = True) -> SaveHandle:
    """Save a checkpoint of a :class:`~sharded_ams.ShardedAMS` run. Every rank calls it.

    Args:
        path: the checkpoint directory (created). With ``shared_fs=True`` (default) every
            rank sees the same directory. With ``shared_fs=False`` it is a rank-local
            directory: each rank writes only its own files there, rank 0 also writes the
            manifest, ``model-extra.pt`` and ``trainer.pt`` into its own; the union of the
            directories (e.g. as Ray Train uploads them) is the checkpoint.
        optimizer: the ShardedAMS. Model params are not saved separately: they are the
            optimizer's fp32 masters (cast to the param dtype on load).
        model: optional; its non-optimized state (buffers, frozen params) is saved once by
            rank 0 in ``model-extra.pt`` and restored on load.
        step: the training step (recorded in the manifest; returned by the load).
        extra: small user state (dicts of tensors/plain values) saved by rank 0.
        lr_scheduler: its ``state_dict()`` is saved by rank 0.
        async_save: snapshot the state to CPU now, write the files in a background thread
            and return at once; the caller must later call ``handle.wait()`` on EVERY rank
            (a collective) to commit. Until then the checkpoint does not exist.
        shared_fs: see ``path``.

    Returns a :class:`SaveHandle` (already committed unless ``async_save``). Raises
    :class:`CheckpointError` on every rank if any rank failed to write (nothing committed).
    Each rank also saves its RNG states (torch CPU, CUDA if initialised, python, numpy).
    """
    t0 = time.perf_counter()
    path = Path(path)
    step = int(step)
    ctx = _Ctx.of(optimizer)
    err: Optional[BaseException] = None
    try:
        jobs, meta, pieces = _prepare_save(path, optimizer, ctx, model, step, extra,
                                           lr_scheduler)
    except Exception as exc:  # e.g. a bad ``extra`` on rank 0: every rank must learn of it
        err = exc
    # The all-gather is the barrier that orders rank 0's un-commit of an old checkpoint at
    # this path before any rank writes into it, and tells every rank if one failed.
    infos = ctx.all_gather(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, msg) for r, msg in enumerate(infos) if msg]
    if failed:
        raise CheckpointError(f"{path}: save aborted, rank {failed[0][0]} failed to prepare "
                              f"({failed[0][1]})", path=path, kind="save_failed")
    handle = SaveHandle(path, ctx, step, meta, shared_fs, jobs, pieces)
    handle._start(async_save)
    handle.blocked_s = time.perf_counter() - t0
    if not async_save:
        handle.wait()
        handle.blocked_s = time.perf_counter() - t0
    return handle


def _prepare_save(path: Path, optimizer, ctx: _Ctx, model, step: int, extra, lr_scheduler):
    """Snapshot everything this rank writes; rank 0 also builds the manifest metadata."""
    osd = optimizer.state_dict()  # local: this rank's pieces, cloned
    _sharded_sd_check(osd)
    osd = _cpu(osd)  # state_dict() cloned every piece: on the CPU that is a snapshot
    jobs: list[tuple[str, Any]] = [(shard_file_name(ctx.rank, ctx.world_size), {
        "format": "sharded_ams.shard", "version": FORMAT_VERSION, "step": step,
        "rank": ctx.rank, "world_size": ctx.world_size, "optimizer": osd, "rng": _rng_state()})]
    meta = None
    if ctx.rank == 0:
        trainer = {"format": "sharded_ams.trainer", "version": FORMAT_VERSION, "step": step,
                   "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                   "extra": extra}
        _check_weights_only(trainer, "lr_scheduler.state_dict() and extra")
        trainer = _snapshot(trainer)
        model_meta = None
        if model is not None:
            model_meta, tensors = _model_info(model, optimizer)
            if any(not isinstance(v, Tensor) for v in tensors.values()):
                _check_weights_only(tensors, "the model's extra state")
            jobs.append((MODEL_EXTRA_NAME, {"format": "sharded_ams.model_extra",
                                            "version": FORMAT_VERSION,
                                            "tensors": _snapshot(tensors)}))
        jobs.append((TRAINER_NAME, trainer))
        groups = [dict(g) for g in osd["param_groups"]]
        params = {}
        for n in (n for g in groups for n in g["params"]):
            info = osd["params"][n]
            params[n] = {"shape": list(info["shape"]), "dtype": info["dtype"],
                         "group": info["group"], "numel": math.prod(info["shape"])}
        from . import __version__

        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                "world_size": ctx.world_size, "torch_version": torch.__version__,
                "sharded_ams_version": __version__,
                "optimizer": {"class": type(optimizer).__name__,
                              "state_format": osd["format"],
                              "state_format_version": osd["version"],
                              "param_groups": groups, "state_keys": list(osd["state_keys"]),
                              "skipped_steps": osd.get("skipped_steps", 0)},
                "params": params, "model": model_meta}
    pieces = [[pc["name"], int(pc["offset"]), int(pc["length"])] for pc in osd["pieces"]]
    path.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        _uncommit(path)
    return jobs, meta, pieces


# ---------------------------------------------------------------------------- load
def _current_params(optimizer) -> dict[str, tuple[list[int], str]]:
    return {n: (list(p.shape), str(p.dtype)) for p, n in _optimizer_params(optimizer)}


def _current_state_keys(optimizer) -> set[str]:
    shards = getattr(optimizer, "shards", None)
    if shards is not None:
        return {k for sh in shards for k in sh.state} | {"master"}
    keys = {"exp_avg", "exp_avg_sq", "master"}
    if any(g["beta3"] > 0 for g in optimizer.param_groups):
        keys.add("exp_avg_s")
    return keys


def _diff_list(what: str, items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{what}: {', '.join(items[:limit])}{more}"


def _check_against(man: Manifest, optimizer, model: Optional[nn.Module]) -> None:
    mpath = man.path / MANIFEST_NAME
    opt = man.optimizer
    if opt.get("class") != type(optimizer).__name__ or not hasattr(optimizer, "comm"):
        raise CheckpointError(
            f"{mpath}: saved by optimizer {opt.get('class')!r}, loading into "
            f"{type(optimizer).__name__!r} (for a single-process AMS use consolidate())",
            path=mpath, kind="optimizer_mismatch")
    mine = _current_params(optimizer)
    theirs = {n: (list(p["shape"]), p["dtype"]) for n, p in man.params.items()}
    if set(mine) != set(theirs) or any(mine[n][0] != theirs[n][0] for n in mine):
        parts = []
        missing = [n for n in mine if n not in theirs]       # in param order
        unexpected = [n for n in theirs if n not in mine]
        if missing:
            parts.append(_diff_list("params of the model not in the checkpoint", missing))
        if unexpected:
            parts.append(_diff_list("params in the checkpoint not in the model", unexpected))
        shapes = [f"{n} (checkpoint {theirs[n][0]}, model {mine[n][0]})"
                  for n in mine if n in theirs and mine[n][0] != theirs[n][0]]
        if shapes:
            parts.append(_diff_list("shape mismatch", shapes))
        raise CheckpointError(f"{mpath}: checkpoint is for a different model: "
                              + "; ".join(parts), path=mpath, kind="model_mismatch")
    dtypes = [n for n in mine if mine[n][1] != theirs[n][1]]
    if dtypes:
        log.warning("%s: param dtypes differ from the checkpoint for %s (state is fp32; "
                    "params are re-cast from the masters)", mpath, dtypes[:5])
    want, have = set(opt["state_keys"]), _current_state_keys(optimizer)
    if want != have:
        raise CheckpointError(
            f"{mpath}: optimizer state keys differ: checkpoint {sorted(want)}, optimizer "
            f"{sorted(have)} (different optimizer configuration, e.g. beta3 > 0 vs beta3 == 0)",
            path=mpath, kind="optimizer_mismatch")
    groups = opt["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{mpath}: checkpoint has {len(groups)} param groups, the "
                              f"optimizer {len(optimizer.param_groups)}", path=mpath,
                              kind="optimizer_mismatch")
    by_id = {id(p): n for p, n in _optimizer_params(optimizer)}
    for i, (saved, g) in enumerate(zip(groups, optimizer.param_groups)):
        cur = [by_id[id(p)] for p in g["params"] if id(p) in by_id]
        if list(saved["params"]) != cur:
            raise CheckpointError(f"{mpath}: param group {i} holds different params in the "
                                  "checkpoint and the optimizer", path=mpath,
                                  kind="optimizer_mismatch")
    if model is not None and man.model is not None:
        info, _ = _model_info(model, optimizer)

        def strip(d):  # dtypes may differ (load_state_dict casts), the rest may not
            return {k: {f: x for f, x in v.items() if f != "dtype"} for k, v in d.items()}

        a, b = strip(man.model["keys"]), strip(info["keys"])
        if a != b:
            parts = []
            if set(a) - set(b):
                parts.append(_diff_list("state_dict keys in the checkpoint not in the model",
                                        sorted(set(a) - set(b))))
            if set(b) - set(a):
                parts.append(_diff_list("state_dict keys of the model not in the checkpoint",
                                        sorted(set(b) - set(a))))
            diff = [f"{k} (checkpoint {a[k]}, model {b[k]})" for k in sorted(set(a) & set(b))
                    if a[k] != b[k]]
            if diff:
                parts.append(_diff_list("entries differ", diff, 4))
            raise CheckpointError(f"{mpath}: checkpoint is for a different model (buffers / "
                                  "frozen params / tied weights): " + "; ".join(parts),
                                  path=mpath, kind="model_mismatch")


def _needed_shards(man: Manifest, optimizer, rank: int) -> Optional[list[str]]:
    """Shard files holding a piece of any range ``rank`` owns (None if unknown)."""
    shards = getattr(optimizer, "shards", None)
    if shards is None:
        return None
    mine: dict[str, list[tuple[int, int]]] = {}
    for sh in shards:
        for pc in sh.layout.pieces(rank):
            mine.setdefault(pc.slot.name, []).append((pc.param_offset,
                                                      pc.param_offset + pc.length))
    out = []
    for name in man.shard_files():
        for pname, off, length in man.files[name]["pieces"]:
            if any(a < off + length and off < b for a, b in mine.get(pname, ())):
                out.append(name)
                break
    return out


def _files_to_verify(man: Manifest, optimizer, ctx: _Ctx, needed: list[str]) -> set[str]:
    """sha256 duty of this rank: every file it reads itself (the checkpoint directory may be
    a per-node copy, e.g. downloaded by Ray Train), plus a round-robin share of the shard
    files that no rank reads, so that together the ranks checksum every file."""
    verify = set(needed) | {n for n in (TRAINER_NAME, MODEL_EXTRA_NAME) if n in man.files}
    read_by_someone: set[str] = set()
    for r in range(ctx.world_size):
        got = needed if r == ctx.rank else _needed_shards(man, optimizer, r)
        read_by_someone |= set(got if got is not None else ())
    others = [n for n in man.files if n not in read_by_someone and n not in verify]
    verify |= {n for i, n in enumerate(others) if i % ctx.world_size == ctx.rank}
    return verify


def _agree(ctx: _Ctx, err: Optional[BaseException]) -> None:
    """Collective: raise the same CheckpointError on every rank if any rank failed."""
    info = None
    if err is not None:
        kind = getattr(err, "kind", "corrupt")
        p = getattr(err, "path", None)
        info = (ctx.rank, kind, str(err), str(p) if p is not None else None)
    infos = [i for i in ctx.all_gather(info) if i is not None]
    if not infos:
        return
    if err is not None and isinstance(err, CheckpointError) and infos[0][0] == ctx.rank:
        raise err
    rank, kind, msg, p = infos[0]
    if rank != ctx.rank:
        msg = f"(reported by rank {rank}) {msg}"
    raise CheckpointError(msg, path=p, kind=kind) from err


def load_checkpoint(path: PathLike, optimizer, *, model: Optional[nn.Module] = None,
                    lr_scheduler=None, restore_rng: bool = True) -> dict:
    """Load a checkpoint saved on any world size into ``optimizer`` (a ShardedAMS).
    Every rank calls it (collectives inside).

    Validates the manifest; checks the optimizer's params (names, shapes) and state keys
    and, with ``model``, its buffers/frozen params against it; checks size and sha256 of
    every file (each rank checksums the files it reads plus a share of the others, and
    failures are agreed collectively so no rank is left waiting); reads the shard files
    that overlap this rank's ranges and passes them to ``optimizer.load_state_dict``
    (hyperparameters and step come from the checkpoint, as with torch.optim; params are
    re-gathered from the fp32 masters). Restores ``model``'s extra state, the
    ``lr_scheduler`` and, only when the world size is unchanged (each rank then gets its
    own states back), the RNG states.

    Returns ``{"step", "extra", "path"}``. Raises :class:`CheckpointError` (every rank).
    """
    path = Path(path)
    ctx = _Ctx.of(optimizer)
    err: Optional[BaseException] = None
    sds: list[dict] = []
    man = trainer = extra_sd = rng = None
    try:
        man = _read_manifest(path)
        _check_against(man, optimizer, model)
        needed = _needed_shards(man, optimizer, ctx.rank)
        if needed is None:
            needed = man.shard_files()
        same_world = man.world_size == ctx.world_size
        own = man.shard_files()[ctx.rank] if same_world else None
        verify = _files_to_verify(man, optimizer, ctx, needed)
        if restore_rng and own:
            verify.add(own)
        for n in man.files:  # sizes of every file (cheap); sha256 of this rank's share
            _check_file(man, n, checksum=n in verify)
        for n in needed:
            shard = _torch_load(path / n)
            sds.append(shard["optimizer"])
            if n == own:
                rng = shard.get("rng")
        if restore_rng and own and rng is None:
            rng = _torch_load(path / own).get("rng")
        if TRAINER_NAME in man.files:
            trainer = _torch_load(path / TRAINER_NAME, mmap=False)
        if model is not None and MODEL_EXTRA_NAME in man.files:
            extra_sd = _torch_load(path / MODEL_EXTRA_NAME, mmap=False)["tensors"]
        if not sds:  # a rank that owns nothing still needs the hyperparameters
            sds.append(_torch_load(path / man.shard_files()[0])["optimizer"])
    except CheckpointError as exc:
        err = exc
    except Exception as exc:
        err = CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})",
                              path=path, kind="corrupt")
    _agree(ctx, err)
    assert man is not None
    try:
        optimizer.load_state_dict(sds)
    except ValueError as exc:  # pre-checked above; deterministic, so every rank raises
        raise CheckpointError(f"{path}: {exc}", path=path, kind="optimizer_mismatch") from exc
    del sds
    if model is not None:
        if extra_sd:
            res = model.load_state_dict(extra_sd, strict=False)
            if res.unexpected_keys:
                raise CheckpointError(f"{path / MODEL_EXTRA_NAME}: keys not in the model: "
                                      f"{res.unexpected_keys[:8]}", path=path / MODEL_EXTRA_NAME,
                                      kind="model_mismatch")
        elif man.model is None:
            log.info("%s was saved without model=; buffers and frozen params not restored",
                     path)
    if lr_scheduler is not None:
        if trainer is None or trainer.get("lr_scheduler") is None:
            log.warning("%s holds no lr_scheduler state; the scheduler is left as is", path)
        else:
            lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if restore_rng:
        if rng is not None:
            _set_rng_state(rng)
        else:
            log.info("%s: saved on %d ranks, loading on %d: RNG states not restored",
                     path, man.world_size, ctx.world_size)
    return {"step": man.step, "extra": trainer.get("extra") if trainer else None,
            "path": str(path)}


# ---------------------------------------------------------------------------- find / manage
def _list_candidates(root: Path) -> list[tuple[int, Path]]:
    cands = []
    if (root / MANIFEST_NAME).is_file():
        cands.append(root)
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    for p in children:
        if _STEP_DIR_RE.match(p.name) or (p / MANIFEST_NAME).is_file():
            cands.append(p)
    out = []
    for p in cands:
        step = -1
        try:
            with open(p / MANIFEST_NAME, "rb") as f:
                step = int(json.loads(f.read())["step"])
        except Exception:
            m = _STEP_DIR_RE.match(p.name)
            step = int(m.group(1)) if m else -1
        out.append((step, p))
    out.sort(key=lambda sp: (sp[0], sp[1].name), reverse=True)
    return out


def find_latest_checkpoint(root: PathLike, *, checksums: bool = True) -> Optional[Path]:
    """The valid checkpoint with the highest step among ``root/step-XXXXXXXX`` and any
    other direct subdirectory (or ``root`` itself) holding a manifest; None if none.

    Candidates are validated newest first (``validate_checkpoint``: sha256 of every file
    unless ``checksums=False``); invalid ones are skipped with a logged warning.
    """
    for _, p in _list_candidates(Path(root)):
        try:
            validate_checkpoint(p, checksums=checksums)
            return p
        except CheckpointError as exc:
            log.warning("skipping invalid checkpoint %s: %s", p, exc)
    return None


class CheckpointManager:
    """Checkpoints in ``root/step-{step:08d}``, keeping the newest ``keep_last``.

    Pruning runs on rank 0 only AFTER the new checkpoint committed (for an async save:
    inside ``handle.wait()``), so at least one complete checkpoint always exists; the
    just-committed one is never deleted, even if older-numbered leftovers rank higher.
    Hence ``keep_last=1`` is allowed (torchtitan refuses it because its newest checkpoint
    may still be in flight when pruning runs; here it cannot be). ``keep_last=None``
    keeps everything. A deleted checkpoint loses its manifest first, so a crash during the
    deletion leaves an uncommitted directory, never a half-deleted "valid" one.
    Uncommitted leftovers older than the newest commit (crashed saves) are removed too.
    With ``shared_fs=False`` nothing is pruned (retention belongs to whoever collects
    the rank-local directories, e.g. Ray Train's ``num_to_keep``).
    """

    def __init__(self, root: PathLike, keep_last: Optional[int] = 2):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None: keep all), got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self._pending: Optional[SaveHandle] = None

    def path_for(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def save(self, step: int, optimizer, *, model: Optional[nn.Module] = None,
             extra: Optional[dict] = None, lr_scheduler=None, async_save: bool = False,
             shared_fs: bool = True) -> SaveHandle:
        """Save into ``root/step-{step:08d}``; a pending async save is committed first.
        Collective, as :func:`save_checkpoint`."""
        self.wait()
        handle = save_checkpoint(self.path_for(step), optimizer, model=model, step=step,
                                 extra=extra, lr_scheduler=lr_scheduler, async_save=async_save,
                                 shared_fs=shared_fs)
        if shared_fs:
            handle.add_done_callback(self._after_commit)
        if not handle.done():
            self._pending = handle
        return handle

    def wait(self) -> Optional[Path]:
        """Commit the pending async save, if any (collective)."""
        h, self._pending = self._pending, None
        return h.wait() if h is not None else None

    def _after_commit(self, handle: SaveHandle) -> None:
        if handle._ctx.rank == 0:
            self.prune(keep=handle.path)

    def prune(self, keep: Optional[Path] = None) -> list[Path]:
        """Delete committed checkpoints beyond the newest ``keep_last`` (never ``keep``)
        and uncommitted directories older than the newest commit. Returns what it deleted."""
        if self.keep_last is None:
            return []
        cands = _list_candidates(self.root)
        committed = [(s, p) for s, p in cands if (p / MANIFEST_NAME).is_file() and p != self.root]
        if not committed:
            return []
        newest = committed[0][0]
        survivors = {p for _, p in committed[:self.keep_last]}
        if keep is not None:
            survivors.add(Path(keep))
        doomed = [p for _, p in committed if p not in survivors]
        doomed += [p for s, p in cands if not (p / MANIFEST_NAME).is_file() and s < newest
                   and p != self.root and _STEP_DIR_RE.match(p.name)]
        for p in doomed:
            try:
                _uncommit(p)
                shutil.rmtree(p)
                log.info("pruned checkpoint %s", p)
            except OSError as exc:
                log.warning("could not prune %s: %s", p, exc)
        return doomed

    def latest(self) -> Optional[Path]:
        return find_latest_checkpoint(self.root)

    def load_latest(self, optimizer, *, model: Optional[nn.Module] = None, lr_scheduler=None,
                    restore_rng: bool = True) -> Optional[dict]:
        """Load the newest loadable checkpoint (collective); None if there is none.

        Candidates are tried newest first; one that is uncommitted, truncated, corrupt or
        incomplete is skipped with a warning (every rank agrees), so a crash in the middle
        of a save resumes from the previous checkpoint. A model/optimizer mismatch is
        raised, not skipped."""
        for _, p in _list_candidates(self.root):
            try:
                return load_checkpoint(p, optimizer, model=model, lr_scheduler=lr_scheduler,
                                       restore_rng=restore_rng)
            except CheckpointError as exc:
                if exc.kind not in CheckpointError.RECOVERABLE:
                    raise
                log.warning("skipping checkpoint %s: %s", p, exc)
        return None


# ---------------------------------------------------------------------------- consolidate
def consolidate(path: PathLike, *, foreach: Optional[bool] = None,
                fused: Optional[Union[bool, str]] = None) -> dict:
    """One unsharded state from a checkpoint of any world size (one process, no group).

    Returns ``{"model", "optimizer", "param_names", "step", "extra", "lr_scheduler"}``:

    * ``optimizer``: a torch.optim-style state_dict for :class:`sharded_ams.AMS` built
      with the same param groups in the same order (params indexed 0.. across groups, in
      the order of the checkpoint's param groups, i.e. the model's named trainable
      params for a ShardedAMS built from a module). Per param: ``step`` (its group's step,
      0-d fp32 tensor), ``exp_avg``, ``exp_avg_sq``, ``exp_avg_s`` (beta3 > 0) and
      ``master`` (only for non-fp32 params). Group hyperparameters are the saved ones plus
      ``foreach``/``fused`` (arguments here), which torch.optim's load_state_dict copies
      into the AMS groups.
    * ``model``: a model state_dict: params from the fp32 masters cast to the param
      dtype (tied weights under every key), plus buffers/frozen params from
      ``model-extra.pt`` when the checkpoint was saved with ``model=``; otherwise the
      optimized params under their optimizer names only.
    """
    man = validate_checkpoint(path)
    full: dict[str, dict[str, Tensor]] = {}
    for n, p in man.params.items():
        full[n] = {k: torch.empty(p["numel"], dtype=torch.float32) for k in man.state_keys}
    for name in man.shard_files():
        shard = _torch_load(man.path / name)
        for rec in shard["optimizer"]["pieces"]:
            sl = slice(rec["offset"], rec["offset"] + rec["length"])
            for k in man.state_keys:
                full[rec["name"]][k][sl] = rec[k]
        del shard
    state, groups, pidx = {}, [], 0
    model_params: dict[str, Tensor] = {}
    for g in man.param_groups:
        ids = []
        for n in g["params"]:
            info = man.params[n]
            shape = tuple(info["shape"])
            dtype = _dtype(info["dtype"])
            st: dict[str, Tensor] = {"step": torch.tensor(float(g["step"]))}
            for k in man.state_keys:
                if k != "master":
                    st[k] = full[n][k].view(shape)
            if dtype != torch.float32:
                st["master"] = full[n]["master"].view(shape)
            state[pidx] = st
            model_params[n] = full[n]["master"].view(shape).to(dtype)
            ids.append(pidx)
            pidx += 1
        hp = {k: g[k] for k in ("lr", "betas", "beta3", "lam", "eps", "weight_decay")}
        hp["betas"] = tuple(hp["betas"])
        groups.append({**hp, "foreach": foreach, "fused": fused, "params": ids,
                       "param_names": list(g["params"])})
    trainer = (_torch_load(man.path / TRAINER_NAME, mmap=False)
               if TRAINER_NAME in man.files else {})
    if man.model is not None:
        tensors = (_torch_load(man.path / MODEL_EXTRA_NAME, mmap=False)["tensors"]
                   if MODEL_EXTRA_NAME in man.files else {})
        model_sd = {}
        for k, info in man.model["keys"].items():
            model_sd[k] = model_params[info["param"]] if "param" in info else tensors[k]
    else:
        model_sd = model_params
    return {"model": model_sd, "optimizer": {"state": state, "param_groups": groups},
            "param_names": [n for g in man.param_groups for n in g["params"]],
            "step": man.step, "extra": trainer.get("extra"),
            "lr_scheduler": trainer.get("lr_scheduler")}
