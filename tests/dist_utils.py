"""Run a function on N local gloo processes (CPU) and collect every rank's return value.

    from dist_utils import run_distributed
    results = run_distributed(fn, 3, arg1, arg2, timeout=120)   # [fn(*args) on rank 0, 1, 2]

* ``fn`` must be picklable by reference (a module-level function of an importable module:
  a test module works, because spawned children inherit ``sys.path``). It runs with the
  default process group already initialised (gloo, ``world_size`` ranks) unless
  ``init_process_group=False``; then only ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
  ``WORLD_SIZE``/``LOCAL_RANK`` are set and ``fn`` initialises the group itself (env://).
* Each rank's return value comes back pickled through a file in a temporary directory
  (so it may be large); the list is in rank order.
* An exception on any rank is raised here as :class:`DistributedError` with every failed
  rank's traceback, the likely root cause first: ranks' own errors (earliest first), then
  ranks that died (e.g. gloo's abort), then the echoes (peers that lost a connection). Once a rank fails, the others get ``grace`` seconds to
  finish and are then killed, so a rank stuck in a collective does not hang the test.
* The whole job is killed after ``timeout`` seconds (:class:`DistributedTimeout`).
* ``dist.destroy_process_group()`` is always called in the child (gloo with 3+ ranks
  otherwise aborts at exit: "terminate called without an active exception"); a child that
  returned a result but then exited with a non-zero code is reported as a failure too.
* Ranks are forked from a server process that imported torch and sharded_ams once
  (:func:`_context`); each gets the caller's environment and working directory.
* Children call ``torch.set_num_threads(threads)`` (default 1: N processes share this
  box's cores, and the same thread count everywhere keeps results reproducible).
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

__all__ = ["run_distributed", "free_port", "DistributedError", "DistributedTimeout"]


class DistributedError(RuntimeError):
    """A rank raised (or died); the message holds the tracebacks."""


class DistributedTimeout(DistributedError):
    """The job did not finish within its timeout."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple,
            kwargs: dict, init: bool, backend: str, threads: Optional[int],
            timeout: float, env: dict, cwd: str) -> None:
    # a fork of the server: its environment and directory are the server's, from when it
    # started; a rank gets the caller's, as a spawned process would
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    record: tuple
    try:
        if init:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=max(timeout, 1)))
        record = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        record = ("error", time.time(), f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        try:
            gc.collect()  # drop lingering Work objects before their process group goes
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # pragma: no cover - teardown of a broken group
            pass
    try:
        _write(os.path.join(out_dir, f"rank{rank}.pkl"), record)
    except Exception as exc:  # e.g. an unpicklable return value
        _write(os.path.join(out_dir, f"rank{rank}.pkl"),
               ("error", time.time(), f"could not pickle rank {rank}'s result: {exc!r}",
                traceback.format_exc()))
    # The result is on disk and the group destroyed: skip interpreter teardown, where gloo
    # on torch 2.13 still aborts now and then with 3+ ranks ("terminate called without an
    # active exception", seen ~1 in 50 jobs under load in CI) after the work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_ECHOES = ("connection reset by peer", "connection closed by peer", "broken pipe",
           "connection refused")


def _is_echo(text: str) -> bool:
    """An error that only says a peer went away (the symptom, not the cause)."""
    first = text.split("\n", 1)[0].lower()
    return any(e in first for e in _ECHOES)


def _read(path: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None


#: imported once by this process's fork server: a rank forked from it starts with them
PRELOAD = ["torch", "torch.distributed", "sharded_ams", "dist_utils"]


def _context():
    """Ranks are forked from a server process that imported :data:`PRELOAD` once (its
    own interpreter: no threads or state of this process), not spawned: a spawned rank
    imports torch itself, ~2-3 s of CPU, hundreds of times a suite. Nothing preloaded
    reads the environment at import (``_worker`` gives each rank the caller's)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return ctx


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120,
                    backend: str = "gloo", init_process_group: bool = True,
                    threads: Optional[int] = 1, grace: float = 10.0,
                    kwargs: Optional[dict] = None) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return their results.

    The port is picked just before the launch, so another process may take it first:
    a launch that fails with "address already in use" is retried with a new port."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(3):
        try:
            return _launch(fn, world_size, args, kwargs or {}, timeout, backend,
                           init_process_group, threads, grace)
        except DistributedError as exc:
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def _launch(fn: Callable, world_size: int, args: tuple, kwargs: dict, timeout: float,
            backend: str, init_process_group: bool, threads: Optional[int],
            grace: float) -> list:
    ctx = _context()
    out_dir = tempfile.mkdtemp(prefix="dist_utils_")
    port = free_port()
    procs = [ctx.Process(target=_worker, name=f"rank{r}",
                         args=(fn, r, world_size, port, out_dir, args, kwargs,
                               init_process_group, backend, threads, timeout,
                               dict(os.environ), os.getcwd()))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        kill_at: Optional[float] = None
        timed_out = False
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now > deadline or (kill_at is not None and now > kill_at):
                timed_out = now > deadline
                break
            if kill_at is None:
                failed = any(not p.is_alive() and p.exitcode != 0 for p in procs) or any(
                    (rec := _read(os.path.join(out_dir, f"rank{r}.pkl"))) is not None
                    and rec[0] == "error" for r in range(world_size)
                    if not procs[r].is_alive())
                if failed:
                    kill_at = now + grace
            time.sleep(0.05)
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in alive:
            procs[r].kill()
        for p in procs:
            p.join(5)

        records = [_read(os.path.join(out_dir, f"rank{r}.pkl")) for r in range(world_size)]
        errors = []  # (time, rank, text)
        for r, (p, rec) in enumerate(zip(procs, records)):
            if rec is not None and rec[0] == "error":
                _, t, msg, tb = rec
                errors.append((t, r, f"rank {r} raised {msg}\n{tb}"))
            elif r in alive:
                errors.append((float("inf"), r, f"rank {r} was killed (still running)"))
            elif rec is None:
                errors.append((float("inf"), r,
                               f"rank {r} exited with code {p.exitcode} and returned nothing"))
            elif p.exitcode != 0:
                errors.append((float("inf"), r, f"rank {r} returned but exited with code "
                                                f"{p.exitcode}"))
        if errors:
            # root cause first: a rank's own error (earliest first), then ranks that died
            # or were killed, then peers that only lost their connection to those
            errors.sort(key=lambda e: (_is_echo(e[2]), e[0], e[1]))
            body = "\n".join(e[2] for e in errors)
            name = getattr(fn, "__qualname__", repr(fn))
            if timed_out:
                raise DistributedTimeout(f"{name} on {world_size} ranks timed out after "
                                         f"{timeout:g} s:\n{body}")
            raise DistributedError(f"{name} failed on {world_size} ranks:\n{body}")
        return [rec[1] for rec in records]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(out_dir, ignore_errors=True)
