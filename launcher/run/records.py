"""The launcher's own records of a run, in ``run_dir/.sharded_ams/``: written by rank 0 of
the workers, read by the driver. No torch, no Ray.

* ``metrics.jsonl``: every metrics dict rank 0 reports, one JSON object a line (plus
  ``launch_id``, ``attempt``, ``time``, ``world_size``). The first record of each start of
  a worker group also carries ``"start": {...}``, the start event: its size, the checkpoint
  step it resumed from and, after a failure, a resize or a relaunch, the restart's cost
  (seconds from the failure to its first trained step, see :class:`Heartbeat`) and the
  steps lost. :func:`read_history` and :func:`read_events` read them back;
  :func:`size_history` turns the events into "which steps ran on how many workers". (A
  group that dies before its first report committed nothing; its start is not recorded.)
* ``heartbeat.json``: rank 0's last sign of life: the wall time and the step after each
  step (at most every ``HEARTBEAT_S``), before and after each checkpoint. The next group
  dates the failure by it, so a restart's cost (failure to first trained step) is an upper
  bound, by at most one step, a checkpoint write and ``HEARTBEAT_S``.
* ``attempts/<attempt>.json``: one file per start of the worker group (the driver counts them).

The run dir may be local, on NFS, or a URI (``s3://``, ``gs://``) where pyarrow writes:
object stores cannot append, so there the history, the events and the heartbeat are not
kept (training is unaffected).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

__all__ = ["STATE_DIR", "METRICS_FILE", "HISTORY_FILE", "HEARTBEAT_FILE", "HEARTBEAT_S",
           "MetricsHistory", "Heartbeat", "read_history", "read_events", "size_history",
           "describe_start", "format_sizes"]

STATE_DIR = ".sharded_ams"
METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = f"{STATE_DIR}/{METRICS_FILE}"
HEARTBEAT_FILE = f"{STATE_DIR}/heartbeat.json"
HEARTBEAT_S = 0.25


# ----------------------------------------------------------------------------- storage


def _fs_and_path(path: str):
    if "://" in path:
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(path)
    return None, path


def exists(path: str) -> bool:
    fs, p = _fs_and_path(path)
    if fs is None:
        return os.path.exists(p)
    import pyarrow.fs

    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def write_text(path: str, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` atomically (a local/NFS temp file renamed over it; fsynced unless
    ``durable=False``: then a process kill keeps it, a power loss may not)."""
    fs, p = _fs_and_path(path)
    if fs is None:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def read_text(path: str) -> Optional[str]:
    """The file's text, None if it does not exist."""
    fs, p = _fs_and_path(path)
    try:
        if fs is None:
            with open(p, errors="replace") as f:
                return f.read()
        import pyarrow.fs

        if fs.get_file_info(p).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(p) as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return None


def _append_text(path: str, text: str) -> None:
    """Append ``text`` to a file, creating it. Object stores cannot append: pyarrow raises."""
    fs, p = _fs_and_path(path)
    if fs is None:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "a") as f:  # no fsync: the reader skips a line cut short by a crash
            f.write(text)
        return
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_append_stream(p) as f:
        f.write(text.encode())


def _ends_without_newline(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- writers


class MetricsHistory:
    """Rank 0's append-only log: ``run_dir/.sharded_ams/metrics.jsonl``.

    One JSON object a line: the reported metrics plus ``launch_id`` (one ``run()``),
    ``attempt`` (one start of the worker group: a restart is a new attempt) and ``time``;
    the start event (:meth:`event`) rides on the attempt's first record. Non-finite
    numbers (a NaN grad norm) are written as null. A restarted attempt re-reports the steps
    after its checkpoint; :func:`read_history` keeps the newest record of each step and
    drops what an abandoned attempt reported past that checkpoint.
    """

    def __init__(self, run_dir: str, launch_id: str, attempt: str, log=None):
        self.path = f"{run_dir}/{HISTORY_FILE}"
        self.ids = {"launch_id": launch_id, "attempt": attempt}
        self.enabled = True
        self._first = True
        self._start: Optional[dict] = None
        self._log = log

    def append(self, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {**metrics, **self.ids, "time": time.time()}
        if self._start is not None:
            rec["start"], self._start = _json_safe(self._start), None
        line = json.dumps(_json_safe(rec), allow_nan=False) + "\n"
        if self._first:  # a line an earlier attempt left unfinished must not swallow ours
            self._first = False
            if "://" not in self.path and _ends_without_newline(self.path):
                line = "\n" + line
        try:
            _append_text(self.path, line)
        except Exception as exc:  # noqa: BLE001 - an object store; history is optional
            self.enabled = False
            if self._log:
                self._log(f"metrics history not kept ({type(exc).__name__}: {exc}); it needs a "
                          "local or NFS run dir")

    def event(self, record: dict) -> None:
        """The start event (:func:`start_event`), written with the next record."""
        self._start = record


class Heartbeat:
    """Rank 0's last sign of life, ``run_dir/.sharded_ams/heartbeat.json``: ``time``
    (wall clock, seconds), ``step`` (optimizer steps completed), ``world_size``,
    ``launch_id``, ``attempt`` and ``done`` (the run reached job.steps).

    :meth:`beat` after every step rewrites it at most every ``HEARTBEAT_S`` (``force``:
    now; around checkpoints, so the heartbeat's step is never behind the last commit).
    Not fsynced: it dates a process failure, which keeps the page cache. Not kept on
    object stores (a write each step would cost too much there).
    """

    def __init__(self, run_dir: str, ids: dict, world_size: int):
        self.path = f"{run_dir}/{HEARTBEAT_FILE}"
        self.enabled = "://" not in run_dir
        self.base = {**ids, "world_size": world_size}
        self._last = -math.inf

    @staticmethod
    def read(run_dir: str) -> Optional[dict]:
        """The last heartbeat of the run (None: none, or unreadable)."""
        if "://" in run_dir:
            return None
        text = read_text(f"{run_dir}/{HEARTBEAT_FILE}")
        try:
            rec = json.loads(text) if text else None
        except ValueError:
            return None
        ok = isinstance(rec, dict) and isinstance(rec.get("time"), (int, float)) \
            and type(rec.get("step")) is int
        return rec if ok else None

    def beat(self, step: int, *, force: bool = False, done: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not (force or done) and now - self._last < HEARTBEAT_S:
            return
        self._last = now
        try:
            write_text(self.path, json.dumps({**self.base, "time": time.time(), "step": step, "done": done}),
                       durable=False)
        except OSError:  # a full or read-only disk: training goes on, restarts are not dated
            pass


def start_event(previous: Optional[dict], *, start_step: int, world_size: int, first_step_time: float,
                launch_id: str, resumed_from: Optional[str]) -> dict:
    """The start event of a worker group that just trained its first step, given the
    heartbeat ``previous`` groups left (None: a new run)."""
    rec: dict[str, Any] = {"start_step": start_step, "world_size": world_size, "resumed_from": resumed_from,
                           "first_step_time": first_step_time, "previous_world_size": None,
                           "previous_step": None, "relaunch": False, "after_finish": False,
                           "restart_s": None, "steps_lost": None}
    if previous:
        rec.update(previous_world_size=previous.get("world_size"), previous_step=previous["step"],
                   relaunch=previous.get("launch_id") != launch_id, after_finish=bool(previous.get("done")))
        if not rec["after_finish"]:
            rec["restart_s"] = round(first_step_time - float(previous["time"]), 3)
            rec["steps_lost"] = max(0, previous["step"] - start_step)
    return rec


# ----------------------------------------------------------------------------- readers


def _records(run_dir: str) -> list[dict]:
    text = read_text(f"{run_dir.rstrip('/')}/{HISTORY_FILE}")
    out = []
    for line in (text or "").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_history(run_dir: str) -> list[dict]:
    """The run's per-step metrics from ``metrics.jsonl``, one dict per step in step order.

    A restarted worker group (or a relaunch) resumes from a checkpoint at ``start_step``
    and reports the steps after it again: its records replace every earlier record of a
    step after ``start_step`` (so a re-trained step keeps only its last record, and steps
    the abandoned attempt reported past the checkpoint do not linger). Lines that are not
    JSON objects with an integer ``step`` (one cut short by a crash) are skipped. [] if there is no history (a new run, or an object-store run dir).
    """
    by_step: dict[int, dict] = {}
    attempt = None
    for rec in _records(run_dir):
        if type(rec.get("step")) is not int:
            continue
        if rec.get("attempt") != attempt:  # a new start of the worker group
            attempt = rec.get("attempt")
            start = rec.get("start_step")
            if isinstance(start, int):
                by_step = {s: r for s, r in by_step.items() if s <= start}
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_events(run_dir: str) -> list[dict]:
    """The run's start events (one per worker group that reported), oldest first, each with
    its group's ``launch_id`` and ``attempt``."""
    out = []
    for rec in _records(run_dir):
        ev = rec.get("start")
        if isinstance(ev, dict) and type(ev.get("start_step")) is int and type(ev.get("world_size")) is int:
            out.append({**ev, "launch_id": rec.get("launch_id"), "attempt": rec.get("attempt")})
    return out


def size_history(events: list[dict], final_step: int) -> list[tuple[int, int, int]]:
    """Which steps of the finished trajectory ran on how many workers:
    ``[(first_step, last_step, workers), ...]``, adjacent equal sizes merged.

    A group that resumed from step s owns steps s+1 up to where the next group resumed;
    steps a group trained past the next group's checkpoint were lost and trained again.
    """
    spans: list[list[int]] = []  # [first, last, workers]; last == -1: open
    for ev in events:
        s, w = ev["start_step"], ev["world_size"]
        spans = [sp for sp in spans if sp[0] <= s]
        if spans:
            spans[-1][1] = s
        spans.append([s + 1, -1, w])
    if spans:
        spans[-1][1] = final_step
    out: list[tuple[int, int, int]] = []
    for first, last, w in spans:
        if last < first:
            continue
        if out and out[-1][2] == w and out[-1][1] == first - 1:
            out[-1] = (out[-1][0], last, w)
        else:
            out.append((first, last, w))
    return out


def format_sizes(spans: list[tuple[int, int, int]]) -> str:
    """``"steps 1-20 on 2 workers, 21-110 on 1 worker, 111-300 on 2 workers"``."""
    parts = [f"{a}-{b} on {w} worker{'s' if w != 1 else ''}" for a, b, w in spans]
    return "steps " + ", ".join(parts) if parts else "no steps trained"


def describe_start(ev: dict) -> str:
    """One line for a start event: a new run, a continued run, or a restart and its cost."""
    w, s = ev["world_size"], ev["start_step"]
    on = f"{w} worker{'s' if w != 1 else ''}"
    if ev.get("previous_step") is None:
        return f"started on {on} at step {s}"
    if ev.get("after_finish"):
        return f"continued a finished run on {on} from step {s}"
    pw = ev.get("previous_world_size")
    how = "relaunched" if ev.get("relaunch") else "restarted"
    size = f"on {on}" if pw in (None, w) else f"on {on} (was {pw})"
    lost = ev.get("steps_lost")
    cost = ev.get("restart_s")
    return (f"{how} {size} after step {ev['previous_step']}: resumed from step {s} "
            f"({lost} step{'s' if lost != 1 else ''} lost); "
            f"{cost:.1f} s from the failure to the next trained step")
