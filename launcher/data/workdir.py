"""Where a ``prepare-data`` run writes before its output is valid: ``.OUT.partial-PID`` next to
OUT, renamed to OUT once ``index.json`` (written last) is in it.

* Every directory this tool creates holds its marker (``.sharded-ams-prepare.json``: host and
  pid), so leftovers are recognised: only this tool's, from a process on this host that is
  gone, are ever removed or taken over (a user's ``.OUT.old-20240101`` or another host's run
  on a shared filesystem is never touched).
* Resume: a partial directory of a dead run whose ``request.json`` equals this run's (same
  inputs, sizes, modification times and options) is taken over, its committed blocks kept
  (:mod:`launcher.data.encode`); other leftovers are removed.
* Install: the finished directory is renamed to OUT; an older OUT (a prepare-data output,
  checked by the caller) goes aside first and is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Optional

from launcher.data.encode import fsync_dir
from launcher.data.tokens import INDEX_NAME

__all__ = ["MARKER", "open_work_dir", "install", "write_json"]

MARKER = ".sharded-ams-prepare.json"  # in every directory this tool creates: host and pid
REQUEST = "request.json"


def _pid_alive(pid: int) -> bool:
    # the same test as sharded_ams.checkpoint.manager's; not imported: prepare-data stays
    # free of torch (start-up time and memory on data-prep machines)
    if pid == os.getpid():  # an earlier call in this process: over (not re-entrant)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark(d: Path) -> None:
    """Claim ``d`` as this process's (the clean-up of a later run recognises it). Atomic
    (temp file, rename): a run killed while writing it must not leave an empty marker,
    which no later run would recognise as its tool's."""
    tmp = d / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"tool": "sharded-ams prepare-data", "host": socket.gethostname(),
                               "pid": os.getpid()}))
    os.replace(tmp, d / MARKER)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _ours_and_dead(p: Path, pid: str) -> bool:
    """``p`` was created by this tool on this host, by the process ``pid``, now gone. Anything
    else (a user's ``.tok.old-20240101``, another host's run on a shared filesystem) is kept.
    A run killed between taking a dead run's directory over (renamed to its own pid) and
    marking it leaves the dead run's pid in the marker: both must be gone."""
    try:
        if not stat.S_ISDIR(os.lstat(p).st_mode) or not stat.S_ISREG(os.lstat(p / MARKER).st_mode):
            return False
        if os.lstat(p / MARKER).st_size > 4096:
            return False
        mark = json.loads((p / MARKER).read_text())
    except (OSError, ValueError, RecursionError):  # a planted marker: not ours
        return False
    if not (isinstance(mark, dict) and mark.get("tool") == "sharded-ams prepare-data"
            and mark.get("host") == socket.gethostname()
            and isinstance(mark.get("pid"), int) and mark["pid"] > 0):
        return False
    return not _pid_alive(int(pid)) and not _pid_alive(mark["pid"])


def _leftovers(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}.{kind}-"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix)
                  and p.name[len(prefix):].isdigit() and _ours_and_dead(p, p.name[len(prefix):]))


def _request_of(d: Path) -> Optional[dict]:
    try:
        if os.lstat(d / REQUEST).st_size > 64 << 20:
            return None
        return json.loads((d / REQUEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _take_over(out: Path, request: dict) -> Optional[Path]:
    """A dead run's partial directory for the same request, renamed to this process's."""
    mine = out.parent / f".{out.name}.partial-{os.getpid()}"
    for p in _leftovers(out, "partial"):
        if _request_of(p) != request:
            continue
        try:
            if p != mine:
                os.rename(p, mine)  # atomic: of two reruns racing for it, one gets it
        except OSError:
            continue
        _mark(mine)
        return mine
    return None


def open_work_dir(out: Path, request: dict) -> tuple[Path, bool]:
    """``(directory, resumed)``: the partial directory of a dead run of the same request
    (resumed), else a new one holding its marker and ``request.json``; other leftovers of
    dead runs for ``out`` are removed."""
    taken = _take_over(out, request)
    for kind in ("init", "partial", "old"):
        for p in _leftovers(out, kind):
            if p != taken:
                shutil.rmtree(p, ignore_errors=True)
    if taken is not None:
        return taken, True
    init = out.parent / f".{out.name}.init-{os.getpid()}"
    init.mkdir()
    _mark(init)  # made with its marker inside, then renamed: no partial dir is ever without one
    write_json(init / REQUEST, request)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    os.rename(init, tmp)
    return tmp, False


def install(tmp: Path, out: Path, index: dict) -> None:
    """Drop the run's bookkeeping from ``tmp``, write ``index.json`` (last: it makes the
    data valid), rename ``tmp`` to ``out``; an earlier ``out`` goes aside first, marked as
    this process's, and is removed."""
    (tmp / REQUEST).unlink(missing_ok=True)
    write_json(tmp / INDEX_NAME, index)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _mark(out)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
