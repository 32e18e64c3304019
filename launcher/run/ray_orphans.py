"""Processes of an embedded Ray that outlive its ``ray.shutdown()``, found and killed.

Ray 2.60's worker processes can hang in their own exit handler after the raylet is gone:
gdb on such a ``ray::TrainController`` shows ``CoreWorkerProcess::HandleAtExit`` ->
``~CoreWorkerProcessImpl`` -> the io context's shutdown -> ``~Publisher`` ->
``PublishIfPossible`` waiting forever on a futex (a self-deadlock; the core worker had
logged "Shutdown complete"). About 2 of the ~100 embedded Ray sessions of a test-suite run
left one behind, 400 MB of memory each, for good. ``ray.shutdown()`` of a Ray this driver
started returns once the raylet and every healthy worker have exited, so whatever still
carries that raylet's pid in ``RAY_RAYLET_PID`` and writes into that session's directory
is such an orphan. Only a Ray the driver started is looked at (never a cluster's
processes), and only on Linux (``/proc``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

__all__ = ["shutdown", "local_session", "session_processes", "reap"]


def local_session() -> Optional[tuple[int, str]]:
    """(raylet pid, session directory) of the Ray this process started, or None (Ray's
    internals moved, or nothing started here)."""
    try:
        from ray._private import ray_constants
        from ray._private import worker

        node = worker._global_node
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        return int(raylet), str(node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a private API: without it nothing is reaped
        return None


def _writes_into(pid: int, directory: str) -> bool:
    prefix = directory.rstrip("/") + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def session_processes(raylet_pid: int, session_dir: str) -> list[int]:
    """Live processes that belong to that Ray session: ``RAY_RAYLET_PID`` is its raylet's
    and a file of theirs is open in its directory (a reused pid alone does not match)."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    me, found = os.getpid(), []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:  # no /proc: not Linux
        return []
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker in env and _writes_into(pid, session_dir):
            found.append(pid)
    return found


def reap(raylet_pid: int, session_dir: str, wait_s: float = 2.0) -> list[int]:
    """After ``ray.shutdown()``: give the session's processes ``wait_s`` to exit, then
    SIGKILL the ones left; returns their pids."""
    deadline = time.monotonic() + wait_s
    left = session_processes(raylet_pid, session_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_processes(raylet_pid, session_dir)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def shutdown(started_here: bool = True) -> list[int]:
    """``ray.shutdown()``; then, for a Ray this process started (``started_here``), the
    :func:`reap` of its processes left hung. Returns the pids killed."""
    import ray

    session = local_session() if started_here else None
    ray.shutdown()
    return reap(*session) if session is not None else []
