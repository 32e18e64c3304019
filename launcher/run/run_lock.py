"""One launch at a time per run: the driver holds a lock on the run directory while it trains.

Two launches of one run (two terminals, a retry while the first still runs, a scheduler that
starts a job twice) would otherwise both train from the same checkpoint and both save into
the same ``step-*`` directories and ``metrics.jsonl``. The second is refused before Ray
starts, naming the holder::

    run 'gpt' is being trained by another launch: pid 4242 on host node1, since
    2026-12-07 23:50:01 UTC (lock runs/gpt/.sharded_ams/driver.lock); wait for it to end
    or stop it (Ctrl-C there, or kill 4242 on node1), then rerun this command to resume

The lock is ``fcntl.flock`` on ``run_dir/.sharded_ams/driver.lock``, held by an open file
descriptor (not inherited by Ray's processes), so the kernel releases it when the driver
exits in any way, SIGKILL included: a rerun after a killed driver is never blocked by a stale
lock, and there is no pid to check. On NFS, Linux takes it as a lock on the server; a client
host that dies loses it when its lease expires (about 90 s). (A mount with
``local_lock=flock`` or ``all`` keeps it on the client: it then stops a second launch on the
same host only.) The file records who holds it,
for the message above. The holder deletes it before letting go (so a launch refused before
it trained leaves no directory behind), and a launch that locked a file checks that the path
still names it (else a file deleted under it would let two launches hold two locks).

Where the filesystem cannot lock (``ENOLCK``, ``EOPNOTSUPP``) or ``job.storage_path`` is an
object-store URI, the launch goes on unlocked and says so.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from launcher.config import is_uri
from launcher.run.console import say
from launcher.run.preflight import LaunchError
from launcher.run.records import STATE_DIR

__all__ = ["run_lock", "LOCK_FILE"]

LOCK_FILE = "driver.lock"

#: runs this process holds: lock file's real path (or URI) -> fd (-1: unlocked)
_HELD: dict[str, int] = {}

#: errnos meaning "this filesystem takes no locks": go on unlocked
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_DIR, LOCK_FILE)


@contextmanager
def run_lock(run_dir: str, name: str) -> Iterator[None]:
    """Hold the run's driver lock for the ``with`` body; :class:`LaunchError` if another
    launch holds it. Re-entrant within one process (the CLI and ``run()`` both enter)."""
    uri = is_uri(run_dir)
    path = lock_path(run_dir)
    key = run_dir if uri else os.path.realpath(path)
    if key in _HELD:
        yield
        return
    if uri:
        say(f"job.storage_path is a URI: this launch takes no lock on run {name!r}, so nothing "
            "stops a second launch of it from training at the same time")
        fd, made = -1, []
    else:
        made = _make_dirs(os.path.dirname(path))
        fd = _acquire(path, name)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        if fd >= 0:
            try:
                os.unlink(path)  # while still held: see the module docstring
            except OSError:
                pass
            os.close(fd)  # releases the lock
        _remove_empty(made)


def _make_dirs(path: str) -> list[str]:
    """Make ``path`` and its missing parents; the ones made, deepest first."""
    made = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        made.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"cannot make {path} for the run's driver lock: "
                          f"{exc.strerror or exc}") from None
    return made


def _remove_empty(dirs: list[str]) -> None:
    for d in dirs:  # deepest first; one that holds anything stays
        try:
            os.rmdir(d)
        except OSError:
            return


def _acquire(path: str, name: str) -> int:
    """The fd holding the lock on the file ``path`` names now, or -1 where the filesystem
    takes no locks."""
    for _ in range(10):
        fd = _open(path)
        if not _try_lock(fd, path, name):  # fd closed: go on unlocked
            return -1
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            _record_holder(fd)
            return fd
        os.close(fd)  # its holder deleted it as we locked it: lock the file there now
    raise LaunchError(f"cannot lock the run's driver lock {path}: it kept being replaced")


def _open(path: str) -> int:
    try:
        # no symlink followed out of the run, no hang on a FIFO put there
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LaunchError(f"{path} is a symbolic link: remove it (the run's driver lock is "
                              "a plain file the launcher makes)") from None
        raise LaunchError(f"cannot open the run's driver lock {path}: "
                          f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LaunchError(f"{path} is not a regular file: remove it (the run's driver lock is "
                          "a plain file the launcher makes)")
    return fd


def _try_lock(fd: int, path: str, name: str) -> bool:
    """True once locked; False (fd closed) where the filesystem takes no locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        os.close(fd)
        say(f"no file locks on this platform: nothing stops a second launch of run {name!r}")
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LaunchError(_busy_message(name, path, holder)) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            say(f"cannot lock {path} ({exc.strerror}): this filesystem takes no locks, so "
                f"nothing stops a second launch of run {name!r} from training at the same time")
            return False
        raise LaunchError(f"cannot lock the run's driver lock {path}: "
                          f"{exc.strerror or exc}") from None


def _record_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv)[:500]}
    data = (json.dumps(info) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # only the message of a refused launch reads it
        pass


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)  # a few hundred bytes; never more than this read
        info = json.loads(raw.decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy_message(name: str, path: str, holder: dict) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    who = (f"pid {pid} on host {host}, since {holder.get('since', '?')}"
           if pid is not None and host is not None else "holder not recorded yet")
    stop = f"Ctrl-C there, or kill {pid} on {host}" if pid is not None else "Ctrl-C there"
    return (f"run {name!r} is being trained by another launch: {who} (lock {path}); wait for it "
            f"to end or stop it ({stop}), then rerun this command to resume")
