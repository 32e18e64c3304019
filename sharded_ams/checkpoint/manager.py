"""Finding checkpoints, keeping the newest ones (retention), and the writer lock.

* ``find_latest_checkpoint(root)``: the valid checkpoint with the highest step among the
  real (not symlinked) subdirectories of ``root`` and ``root`` itself.
* ``CheckpointManager``: saves into ``root/step-XXXXXXXX``; one writer per root (an
  advisory lock file, ``root/.sharded-ams.lock``, holding the owner's host and pid);
  after each commit it prunes down to the newest ``keep_last`` VALID checkpoints. It only
  ever deletes real directories it names itself (``step-N``, and ``step-N.new-*`` /
  ``step-N.old-*`` left by an interrupted re-save); never a symlink, never anything else
  (a user's ``root/best/`` copy stays).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import stat
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from .commit import SaveHandle, fsync_dir, save_checkpoint, uncommit
from .format import (LOCK_NAME, MANIFEST_NAME, RESAVE_DIR_RE, STEP_DIR_RE, CheckpointError,
                     PathLike, step_dir_name)
from .group import Group
from .jsonread import parse_json
from .load import load_checkpoint
from .dcp import _is_sharded, load_dcp, save_dcp, world_group
from .dcp_meta import DCP_FORMAT, manifest_format
from .dcp_meta import validate_any as validate_checkpoint
from .validate import open_regular, read_step

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("sharded_ams.checkpoint")

__all__ = ["find_latest_checkpoint", "CheckpointManager", "WriterLock", "default_format"]


# ---------------------------------------------------------------------------- candidates
def _own_step(name: str) -> Optional[int]:
    """The step of a directory name this package creates (``step-N``, ``step-N.new-*``,
    ``step-N.old-*``); None for any other name."""
    m = STEP_DIR_RE.match(name) or RESAVE_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def _subdirs(root: Path) -> list[Path]:
    """Real subdirectories of ``root`` (symlinks and dot-names skipped)."""
    try:
        with os.scandir(root) as it:
            return sorted(Path(e.path) for e in it
                          if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _list_candidates(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every directory that is or may be a checkpoint, newest first: the
    step from the manifest (read safely; bounded), else from the name; -1 if neither."""
    cands = [root] if os.path.lexists(root / MANIFEST_NAME) else []
    for p in _subdirs(root):
        if _own_step(p.name) is not None or os.path.lexists(p / MANIFEST_NAME):
            cands.append(p)
    out = []
    for p in cands:
        step = read_step(p)
        if step is None:
            own = _own_step(p.name)
            step = own if own is not None else -1
        out.append((step, p))
    out.sort(key=lambda sp: (sp[0], sp[1].name), reverse=True)
    return out


def checkpoint_dirs(root: PathLike) -> list[Path]:
    """``root``'s directories that are or may be checkpoints (``root`` itself if it holds a
    manifest), newest first, unvalidated: for callers that try each in turn."""
    return [p for _, p in _list_candidates(Path(root))]


def default_format(optimizer) -> str:
    """The format ``CheckpointManager.save`` writes for ``optimizer`` by default: native
    for a ShardedAMS on plain params; DCP for one with tensor-parallel params (the native
    files are named by dp rank) and for any other optimizer (an ``AMS`` on FSDP2 params)."""
    if not _is_sharded(optimizer):
        return "dcp"
    mp = getattr(optimizer, "mp", None)
    return "dcp" if mp is not None and mp.active else "native"


def find_latest_checkpoint(root: PathLike, *, checksums: bool = True,
                           on_skip: Optional[Callable[[Path, CheckpointError], None]] = None
                           ) -> Optional[Path]:
    """The valid checkpoint with the highest step among ``root``'s real subdirectories
    that hold a manifest (``step-XXXXXXXX`` or any other name) and ``root`` itself; None
    if there is none.

    Candidates are validated newest first (``validate_checkpoint``: every rule, and the
    sha256 and content of every file unless ``checksums=False``); invalid ones are skipped,
    each passed to ``on_skip`` (default: a logged warning). Symlinked subdirectories are
    not followed.
    """
    for _, p in _list_candidates(Path(root)):
        try:
            validate_checkpoint(p, checksums=checksums)
            return p
        except CheckpointError as exc:
            if on_skip is None:
                log.warning("skipping invalid checkpoint %s: %s", p, exc)
            else:
                on_skip(p, exc)
    return None


# ---------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """One writer per checkpoint root: an advisory lock file holding the owner's host, pid
    and start time.

    Where the file system supports ``flock`` (local disks, NFS through its lock manager)
    the kernel holds the lock and drops it when the owner dies, so a stale lock is taken
    over at once. Where it does not, the file's content decides: a lock of a dead pid on
    this host is taken over; a live one, or one from another host, is refused (delete the
    file by hand once that job is gone).
    """

    def __init__(self, root: Path):
        self.path = root / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> Optional[dict]:
        """The owner recorded in the lock file, or None (no file, empty, unreadable)."""
        try:
            with open_regular(self.path, max_size=4096) as (fd, size):
                data = os.read(fd, size)
            d = parse_json(data, self.path, "lock file")  # planted "[" x 4096: refused
            return d if isinstance(d, dict) else None
        except CheckpointError:
            return None

    def _refuse(self, owner: Optional[dict]) -> CheckpointError:
        who = ("host {host} pid {pid} since {since}".format(
            host=owner.get("host"), pid=owner.get("pid"), since=owner.get("since"))
            if owner else "another process")
        return CheckpointError(
            f"{self.path.parent}: another checkpoint writer holds this directory ({who}; lock "
            f"file {self.path}). Two jobs or managers saving into one root would delete each "
            "other's checkpoints: use another directory, or stop that writer.",
            path=self.path, kind="locked")

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{self.path}: is a symbolic link; refused",
                                      path=self.path, kind="unsafe") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{self.path}: not a regular file; refused",
                                      path=self.path, kind="unsafe")
            kernel_lock = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    kernel_lock = True
                except BlockingIOError:
                    raise self._refuse(self.owner()) from None
                except OSError as exc:  # no flock on this file system: the content decides
                    log.info("%s: flock unavailable (%s); using the owner's pid", self.path, exc)
            if not kernel_lock:
                owner = self.owner()
                if owner and not (owner.get("host") == socket.gethostname()
                                  and isinstance(owner.get("pid"), int)
                                  and not _pid_alive(owner["pid"])):
                    raise self._refuse(owner)
                if owner:
                    log.warning("%s: taking over the stale lock of dead pid %s", self.path,
                                owner.get("pid"))
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._finalizer = weakref.finalize(self, _release, fd)

    def release(self) -> None:
        if self._fd is not None:
            self._finalizer()
            self._fd = None


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # no stale owner left behind; the file itself stays (see flock)
    os.close(fd)


# ---------------------------------------------------------------------------- manager
class CheckpointManager:
    """Checkpoints in ``root/step-{step:08d}``, keeping the newest ``keep_last`` valid ones.

    **One writer per root.** The first ``save`` (or ``prune``) takes the root's writer lock
    on rank 0 (every rank raises ``CheckpointError(kind="locked")`` if another job or
    manager holds it); ``close()`` (or garbage collection, or the process's exit) releases
    it. Loading needs no lock.

    **Retention.** Pruning runs on rank 0 only AFTER the new checkpoint committed (for an
    async save: inside ``handle.wait()``), so at least one complete checkpoint always
    exists. It keeps the ``keep_last`` newest VALID checkpoints (checked with checksums,
    once per file version) plus the one just committed, and deletes the other directories
    it created itself that are not newer than the newest kept one: older valid ones,
    invalid or uncommitted ones (crashed saves), leftovers of an interrupted re-save. A
    deleted checkpoint loses its manifest first, so a crash during the deletion leaves an
    uncommitted directory, never a half-deleted "valid" one. ``keep_last=1`` is allowed
    (torchtitan refuses it because its newest checkpoint may still be in flight when
    pruning runs; here it cannot be). ``keep_last=None`` keeps everything. With
    ``shared_fs=False`` nothing is pruned (retention belongs to whoever collects the
    rank-local directories, e.g. Ray Train's ``num_to_keep``).
    """

    def __init__(self, root: PathLike, keep_last: Optional[int] = 2):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None: keep all), got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self._pending: Optional[SaveHandle] = None
        self._lock = WriterLock(self.root)
        self._valid: dict[Path, tuple] = {}  # dir -> file stats when last found valid
        self._locked = False                 # every rank: the lock question was settled

    def path_for(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def close(self) -> None:
        """Commit a pending save and release the writer lock."""
        try:
            self.wait()
        finally:
            self._lock.release()
            self._locked = False

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_lock(self, ctx: Group) -> None:
        """Rank 0 takes the writer lock; every rank learns whether it could (collective,
        on the first save only: every rank's manager is in the same state)."""
        err = None
        if ctx.rank == 0:
            try:
                self._lock.acquire()
            except CheckpointError as exc:
                err = exc
        ctx.agree(err)
        self._locked = True

    def save(self, step: int, optimizer, *, model: Optional[nn.Module] = None,
             extra: Optional[dict] = None, lr_scheduler=None, async_save: bool = False,
             shared_fs: bool = True, format: Optional[str] = None) -> SaveHandle:
        """Save into ``root/step-{step:08d}``; a pending async save is committed first.
        Collective, as :func:`save_checkpoint`.

        ``format``: ``"native"`` (:func:`save_checkpoint`) or ``"dcp"`` (:func:`save_dcp`,
        synchronous, ``model`` required); None picks what the optimizer needs: native for a
        :class:`~sharded_ams.ShardedAMS` on plain params, DCP for one with tensor-parallel
        params and for an ``AMS`` on FSDP2 (DTensor) params, which only DCP holds."""
        self.wait()
        fmt = format or default_format(optimizer)
        if fmt not in ("native", "dcp"):
            raise ValueError(f"format must be 'native' or 'dcp' (or None), got {format!r}")
        if fmt == "dcp":
            return self._save_dcp(step, optimizer, model, extra, lr_scheduler, async_save,
                                  shared_fs)
        ctx = Group.of(optimizer)
        if not self._locked:
            self._take_lock(ctx)
        handle = save_checkpoint(self.path_for(step), optimizer, model=model, step=step,
                                 extra=extra, lr_scheduler=lr_scheduler, async_save=async_save,
                                 shared_fs=shared_fs)
        if shared_fs:
            handle.add_done_callback(self._after_commit)
        if not handle.done():
            self._pending = handle
        return handle

    def _save_dcp(self, step: int, optimizer, model: Optional[nn.Module], extra, lr_scheduler,
                  async_save: bool, shared_fs: bool) -> SaveHandle:
        if model is None:
            raise ValueError("a DCP checkpoint holds the model's state too: pass model=")
        if async_save:
            raise ValueError("async_save is the native format's (a DCP save is synchronous)")
        ctx = world_group()  # an FSDP2 AMS has no group of its own: every rank of the world
        if not self._locked:
            self._take_lock(ctx)
        path = save_dcp(self.path_for(step), model, optimizer, step=step, extra=extra,
                        lr_scheduler=lr_scheduler, shared_fs=shared_fs)
        handle = SaveHandle.committed(path, ctx, step, shared_fs)
        if shared_fs:
            self._after_commit(handle)
        return handle

    def wait(self) -> Optional[Path]:
        """Commit the pending async save, if any (collective)."""
        h, self._pending = self._pending, None
        return h.wait() if h is not None else None

    def _after_commit(self, handle: SaveHandle) -> None:
        if handle._ctx.rank == 0:
            self._remember_valid(handle.path)  # hashed while written: no need to re-read
            self.prune(keep=handle.path)

    # ------------------------------------------------------------------ retention
    def _stats(self, path: Path) -> Optional[tuple]:
        try:
            with os.scandir(path) as it:
                return tuple(sorted((e.name, e.stat(follow_symlinks=False).st_size,
                                     e.stat(follow_symlinks=False).st_mtime_ns,
                                     e.inode()) for e in it))
        except OSError:
            return None

    def _remember_valid(self, path: Path) -> None:
        st = self._stats(path)
        if st is not None:
            self._valid[path] = st

    def _is_valid(self, path: Path, step: int) -> bool:
        """Valid (every rule, sha256 and content) with the step its name says; cached per
        version of the directory's files."""
        st = self._stats(path)
        if st is not None and self._valid.get(path) == st:
            return True
        try:
            ok = validate_checkpoint(path).step == step
        except CheckpointError as exc:
            log.warning("checkpoint %s is invalid: %s", path, exc)
            ok = False
        if ok and st is not None:
            self._valid[path] = st
        return ok

    def prune(self, keep: Optional[Path] = None) -> list[Path]:
        """Delete what retention does not keep (see the class docstring); returns the
        deleted directories. Takes the writer lock if this manager does not hold it."""
        if self.keep_last is None:
            return []
        self._lock.acquire()
        own = [(step, p) for p in _subdirs(self.root)
               if (step := _own_step(p.name)) is not None]
        own.sort(key=lambda sp: (sp[0], STEP_DIR_RE.match(sp[1].name) is not None),
                 reverse=True)
        kept: dict[int, Path] = {}   # step -> the one directory kept for it
        for step, p in own:
            if len(kept) >= self.keep_last and p != keep:
                continue
            if step not in kept and (p == keep or self._is_valid(p, step)):
                kept[step] = p
        if not kept:
            return []
        newest = max(kept)
        keepers = set(kept.values()) | ({Path(keep)} if keep is not None else set())
        doomed = [p for step, p in own if p not in keepers and step <= newest]
        for p in doomed:
            try:
                uncommit(p)
                shutil.rmtree(p)
                log.info("pruned checkpoint %s", p)
            except OSError as exc:
                log.warning("could not prune %s: %s", p, exc)
            self._valid.pop(p, None)
        if doomed:
            fsync_dir(self.root)
        return doomed

    def latest(self) -> Optional[Path]:
        return find_latest_checkpoint(self.root)

    def load_latest(self, optimizer, *, model: Optional[nn.Module] = None, lr_scheduler=None,
                    restore_rng: bool = True, allow_nonfinite: bool = False) -> Optional[dict]:
        """Load the newest loadable checkpoint (collective); None if there is none.

        Candidates are tried newest first; one that is uncommitted, unsafe, truncated,
        corrupt, inconsistent with its manifest, incomplete or holding NaN/inf or negative
        second moments (unless ``allow_nonfinite``: see ``values.py``) is skipped with a warning
        (every rank agrees), so a crash in the middle of a save resumes from the previous
        checkpoint. A model/optimizer mismatch is raised, not skipped."""
        for _, p in _list_candidates(self.root):
            try:
                if manifest_format(p) != DCP_FORMAT:
                    return load_checkpoint(p, optimizer, model=model, lr_scheduler=lr_scheduler,
                                           restore_rng=restore_rng,
                                           allow_nonfinite=allow_nonfinite)
                if model is None:
                    raise ValueError(f"{p} is a DCP checkpoint: it loads into the model too, "
                                     "pass model=")
                out = load_dcp(p, model, optimizer, lr_scheduler=lr_scheduler,
                               restore_rng=restore_rng, allow_nonfinite=allow_nonfinite)
                return {"step": out["step"], "extra": out["extra"], "path": p}
            except CheckpointError as exc:
                if exc.kind not in CheckpointError.RECOVERABLE:
                    raise
                log.warning("skipping checkpoint %s: %s", p, exc)
        return None
