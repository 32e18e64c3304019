"""Saving a checkpoint, and THE COMMIT RULE.

**A directory is a checkpoint once, and only once, its ``manifest.json`` exists.** Rank 0
writes the manifest last, after every rank's files are on disk; nothing reads a directory
without one. So a save killed at any moment leaves the previous checkpoints as they were.

The protocol, step by step (``save_checkpoint`` and ``SaveHandle.wait``):

1. Every rank takes a point-in-time CPU snapshot of what it writes
   (``optimizer.finish_param_sync()``, ``state_dict()``, ``snapshot.cpu_snapshot``).
2. Rank 0 picks the directory to write: ``path`` itself, or, when ``path`` already holds
   a committed checkpoint, a new one beside it (``NAME.new-XXXXXXXX``), so the committed
   copy stays whole until the new one is committed. One all-gather tells every rank where,
   and whether any rank failed to prepare (then every rank raises).
3. Every rank writes its files: ``NAME.tmp`` (created exclusively, never through a
   symlink), hashed while written, flushed, fsynced, renamed to ``NAME``; then the
   directory is fsynced. A failed write removes its temp file and names the errno.
4. Every rank's file sizes, checksums, pieces and errors are gathered to rank 0 (the
   only rank that needs them). If any rank failed, rank 0 says so (step 7), every rank
   removes what it wrote and raises ``CheckpointError("save_failed")``.
5. **The commit**: rank 0 writes ``manifest.json.tmp``, fsyncs it, renames it to
   ``manifest.json`` and fsyncs the directory.
6. A re-save then swaps the new directory into ``path`` (one atomic ``renameat2(
   RENAME_EXCHANGE)`` where the OS has it, else two renames through ``NAME.old-XXXXXXXX``)
   and deletes the old copy, manifest first. At every moment a committed copy of the step
   exists under a name that ``find_latest_checkpoint`` looks at.
7. Rank 0 broadcasts the outcome; every rank returns (or raises) together.

Old checkpoints are deleted only after a newer one committed (``manager.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .format import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, MODEL_EXTRA_NAME, TMP_SUFFIX,
                     TRAINER_NAME, CheckpointError, PathLike, shard_file_name)
from .group import Group
from .snapshot import check_weights_only, cpu_snapshot, rng_state

log = logging.getLogger("sharded_ams.checkpoint")

__all__ = ["save_checkpoint", "SaveHandle", "optimizer_params", "model_info", "fsync_dir",
           "uncommit"]

_WRITE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_CLOEXEC", 0))


# ---------------------------------------------------------------------------- files
def fsync_dir(path: Path) -> None:
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


def _oserror(exc: OSError, what: Path) -> OSError:
    """The same error, with the errno's name and the file in the message."""
    code = errno.errorcode.get(exc.errno, "?")
    return OSError(exc.errno, f"{os.strerror(exc.errno)} ({code}) writing {what}")


class _HashingWriter:
    """File-like object for ``torch.save`` that counts and hashes the bytes it writes, and
    keeps the OSError of a failed write (torch's zip writer replaces it with its own
    "unexpected pos" error)."""

    def __init__(self, f):
        self.f, self.h, self.n, self.error = f, hashlib.sha256(), 0, None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as exc:
            self.error = exc
            raise
        self.h.update(b)
        self.n += len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _unlink_quietly(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def write_bytes_durably(final: Path, write: Callable[[Any], None]) -> None:
    """``write(f)`` into ``final.tmp`` (created exclusively, no symlink followed), flush,
    fsync, rename to ``final``. On any failure the temp file is removed and an OSError
    names the errno."""
    tmp = final.with_name(final.name + TMP_SUFFIX)
    _unlink_quietly(tmp)  # a leftover of a killed save (or a planted symlink): not followed
    box: dict = {}
    try:
        fd = os.open(tmp, _WRITE_FLAGS, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f, box)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        _unlink_quietly(tmp)
        cause = exc if isinstance(exc, OSError) else box.get("error")
        if isinstance(cause, OSError) and cause.errno:
            raise _oserror(cause, final) from exc
        raise


def write_file(dirpath: Path, name: str, obj: Any) -> dict:
    """torch.save ``obj`` to ``dirpath/name`` durably (see ``write_bytes_durably``).
    Returns {"size", "sha256"} (hashed while writing: the file is not read back)."""
    out: dict = {}

    def write(f, box):
        w = _HashingWriter(f)
        try:
            torch.save(obj, w)
        finally:
            box["error"] = w.error
        out.update(size=w.n, sha256=w.h.hexdigest())

    write_bytes_durably(dirpath / name, write)
    return out


def uncommit(path: Path) -> None:
    """Remove a manifest so the directory stops being a checkpoint (before deleting it);
    durable before anything else changes. ``path`` itself must be a real directory (a
    symlink is refused: never delete through one)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        try:
            os.unlink(MANIFEST_NAME, dir_fd=fd)
        except FileNotFoundError:
            return
        os.fsync(fd)
    finally:
        os.close(fd)


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
    write_bytes_durably(path / MANIFEST_NAME, lambda f, box: f.write(data))
    fsync_dir(path)
    return manifest


# ---------------------------------------------------------------------------- re-save swap
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the OS or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(e, f"{os.strerror(e)} swapping {a} and {b}")


def _swap_in(new: Path, path: Path) -> None:
    """Make the committed directory ``new`` the one at ``path``; delete the old copy."""
    if not os.path.lexists(path):
        os.rename(new, path)
        fsync_dir(path.parent)
        return
    if _exchange(new, path):
        old = new                       # now holds the previous copy, still committed
    else:
        old = path.with_name(path.name + ".old-" + new.name.rsplit(".new-", 1)[1])
        os.rename(path, old)            # a kill here: old and new are both committed
        os.rename(new, path)
    fsync_dir(path.parent)
    uncommit(old)
    shutil.rmtree(old, ignore_errors=True)


def _resave_dir(path: Path) -> Path:
    return path.with_name(f"{path.name}.new-{secrets.token_hex(4)}")


def _target_of(path: Path) -> tuple[Optional[str], bool]:
    """(name of the directory to write beside ``path`` or None for ``path`` itself, whether
    ``path`` existed). Refuses a symlink or a non-directory at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, False
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise CheckpointError(f"{path}: is {what}; refusing to write a checkpoint there",
                              path=path, kind="unsafe")
    if os.path.lexists(path / MANIFEST_NAME):
        return _resave_dir(path).name, True
    return None, True


# ---------------------------------------------------------------------------- what is saved
def optimizer_params(optimizer) -> list[tuple[Tensor, str]]:
    """(param, name) of the optimizer's trainable params, in optimizer (group) order."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = optimizer.param_names()
    return [(p, n) for p, n in zip(params, names) if p.requires_grad]


def model_info(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Classify ``model.state_dict()`` keys: optimized params (by optimizer name, aliases
    of tied weights included) and the rest (buffers, frozen params, extra state), which is
    returned as tensors to save in ``model-extra.pt``."""
    by_id = {id(p): n for p, n in optimizer_params(optimizer)}
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


def _prepare(optimizer, ctx: Group, model, step: int, extra, lr_scheduler):
    """Snapshot everything this rank writes; rank 0 also builds the manifest metadata."""
    sync = getattr(optimizer, "finish_param_sync", None)
    if sync is not None:
        sync()  # params and state hold their final values before anything reads them
    osd = optimizer.state_dict()  # local: this rank's pieces, copied to the host
    if not isinstance(osd, dict) or osd.get("format") != "sharded_ams":
        raise TypeError("save_checkpoint needs a ShardedAMS optimizer (its state_dict() is in "
                        "the sharded_ams format); for a single-process AMS use torch.save")
    trainer = tensors = model_meta = meta = None
    if ctx.rank == 0:
        trainer = {"format": "sharded_ams.trainer", "version": FORMAT_VERSION, "step": step,
                   "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                   "extra": extra}
        check_weights_only(trainer, "lr_scheduler.state_dict() and extra")
        if model is not None:
            model_meta, tensors = model_info(model, optimizer)
            if any(not isinstance(v, Tensor) for v in tensors.values()):
                check_weights_only(tensors, "the model's extra state")
    # the model's extra state and the trainer: one batch of copies, one synchronize
    osd, trainer, tensors = cpu_snapshot([osd, trainer, tensors], [False, True, True])
    jobs: list[tuple[str, Any]] = [(shard_file_name(ctx.rank, ctx.world_size), {
        "format": "sharded_ams.shard", "version": FORMAT_VERSION, "step": step,
        "rank": ctx.rank, "world_size": ctx.world_size, "optimizer": osd, "rng": rng_state()})]
    if ctx.rank == 0:
        if model is not None:
            jobs.append((MODEL_EXTRA_NAME, {"format": "sharded_ams.model_extra",
                                            "version": FORMAT_VERSION, "tensors": tensors}))
        jobs.append((TRAINER_NAME, trainer))
        groups = [dict(g) for g in osd["param_groups"]]
        params = {}
        for n in (n for g in groups for n in g["params"]):
            info = osd["params"][n]
            params[n] = {"shape": list(info["shape"]), "dtype": info["dtype"],
                         "group": info["group"], "numel": math.prod(info["shape"])}
        from .. import __version__

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
    return jobs, meta, pieces


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

    def __init__(self, path: Path, write_dir: Path, ctx: Group, step: int, meta: Optional[dict],
                 shared_fs: bool, jobs: list[tuple[str, Any]], pieces: list, fresh_dir: bool):
        self.path, self._dir, self._ctx, self.step, self._meta = path, write_dir, ctx, step, meta
        self._pieces, self._fresh_dir = pieces, fresh_dir
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

    @classmethod
    def committed(cls, path: Path, ctx: Group, step: int, shared_fs: bool = True) -> "SaveHandle":
        """A handle of a save that already committed (a DCP save: synchronous)."""
        handle = cls(path, path, ctx, step, None, shared_fs, [], [], False)
        handle._done = True
        return handle

    def _write(self) -> None:
        t0 = time.perf_counter()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            for name, obj in self._jobs:
                self._files[name] = write_file(self._dir, name, obj)
            fsync_dir(self._dir)
            if self._ctx.rank == 0 or not self._shared_fs:
                fsync_dir(self._dir.parent)  # the new directory's entry
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

    def _commit(self, infos: list[dict]) -> None:
        """Rank 0: the commit (step 5) and, for a re-save, the swap (step 6)."""
        self.manifest = _commit_manifest(self._dir, self._meta, infos)
        if self._dir != self.path:
            _swap_in(self._dir, self.path)

    def _decide(self, infos: list[dict]) -> Optional[tuple[str, bool]]:
        """Rank 0: (why the save failed, whether it committed) or None: commit if no rank
        reported an error."""
        failed = [i for i in infos if i["error"]]
        if failed:
            return "; ".join(f"rank {i['rank']}: {i['error']}" for i in failed), False
        try:
            self._commit(infos)
        except Exception as exc:
            committed = os.path.lexists(self._dir / MANIFEST_NAME)
            return (f"rank 0 could not {'swap in' if committed else 'commit'} the "
                    f"checkpoint: {type(exc).__name__}: {exc}", committed)
        return None

    def _discard(self) -> None:
        """After a failed save: remove what this rank wrote (collective)."""
        for name in self._files:
            with contextlib.suppress(OSError):
                os.unlink(self._dir / name)
        self._ctx.all_gather(None)  # every rank removed its files
        if self._fresh_dir and (self._ctx.rank == 0 or not self._shared_fs):
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)

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
        # only rank 0 decides and writes the manifest: only it receives the ranks' reports
        infos = ctx.gather0({"rank": ctx.rank, "files": self._files, "error": err,
                             "pieces": self._pieces})
        status: Optional[tuple[str, bool]] = None
        if infos is not None:
            status = self._decide(infos)
        status = ctx.broadcast0(status)
        if status is None and ctx.rank != 0 and not self._shared_fs and self._dir != self.path:
            try:  # rank-local directories: each rank swaps its own
                _swap_in(self._dir, self.path)
            except OSError as exc:
                status = (f"rank {ctx.rank} could not swap in its directory: {exc}", True)
        self.commit_s = time.perf_counter() - t0
        if status is not None:
            msg, committed = status
            if not committed:
                self._discard()
                msg = f"save failed, nothing committed ({msg})"
            else:
                msg = f"save committed in {self._dir}, but not moved into place ({msg})"
            self._failure = CheckpointError(f"{self.path}: {msg}", path=self.path,
                                            kind="save_failed")
            raise self._failure
        self._done = True
        if ctx.rank == 0:
            log.info("committed checkpoint %s (step %d)", self.path, self.step)
        for fn in self._callbacks:
            fn(self)
        self._callbacks = []
        return self.path


def save_checkpoint(path: PathLike, optimizer, *, model: Optional[nn.Module] = None, step: int,
                    extra: Optional[dict] = None, lr_scheduler=None, async_save: bool = False,
                    shared_fs: bool = True) -> SaveHandle:
    """Save a checkpoint of a :class:`~sharded_ams.ShardedAMS` run. Every rank calls it.

    Args:
        path: the checkpoint directory (created). With ``shared_fs=True`` (default) every
            rank sees the same directory. With ``shared_fs=False`` it is a rank-local
            directory: each rank writes only its own files there, rank 0 also writes the
            manifest, ``model-extra.pt`` and ``trainer.pt`` into its own; the union of the
            directories (e.g. as Ray Train uploads them) is the checkpoint. If ``path``
            holds a committed checkpoint, the new one is written beside it and swapped in
            after its commit (a kill meanwhile loses neither).
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
    ctx = Group.of(optimizer)
    err: Optional[BaseException] = None
    jobs = meta = pieces = None
    beside, existed = None, False
    try:
        jobs, meta, pieces = _prepare(optimizer, ctx, model, step, extra, lr_scheduler)
        if ctx.rank == 0 or not shared_fs:
            beside, existed = _target_of(path)
    except Exception as exc:  # e.g. a bad ``extra`` on rank 0: every rank must learn of it
        err = exc
    infos = ctx.all_gather((None if err is None else f"{type(err).__name__}: {err}",
                            beside, existed))
    if err is not None:
        raise err
    failed = [(r, i[0]) for r, i in enumerate(infos) if i[0]]
    if failed:
        raise CheckpointError(f"{path}: save aborted, rank {failed[0][0]} failed to prepare "
                              f"({failed[0][1]})", path=path, kind="save_failed")
    if shared_fs:  # rank 0 decided for everyone; rank-local directories decide for themselves
        beside, existed = infos[0][1], infos[0][2]
    write_dir = path.with_name(beside) if beside else path
    fresh = bool(beside) or not existed
    handle = SaveHandle(path, write_dir, ctx, step, meta, shared_fs, jobs, pieces, fresh)
    handle._start(async_save)
    handle.blocked_s = time.perf_counter() - t0
    if not async_save:
        handle.wait()
        handle.blocked_s = time.perf_counter() - t0
    return handle
