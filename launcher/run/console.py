"""What of Ray's console output the driver shows: progress lines as they are, Ray's routine
lines hidden, failures in a short form (``verbose`` shows everything).

Ray prints on the driver through two paths, both hooked here (private Ray APIs; when they
are missing, every line is shown as Ray prints it):

* the log dispatcher (``ray_print_logs``): what workers, the Train controller and the
  GCS write to stdout/stderr;
* ``print_to_stdstream`` called by the error-message listener: a dead raylet's message,
  with the last 20 lines of its log (the ``[state-dump]`` blocks), a node marked dead.

Progress lines (``[sharded-ams] ...``) lose Ray's ``(RayTrainWorker pid=...)`` prefix.
Each shown line is shown once per 30 s (Ray repeats a failure's text 2-3 times, and two
raylets of one machine can duplicate lines).
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["TAG", "say", "filter_line", "filter_text", "quiet_ray_logs", "short_error"]

TAG = "[sharded-ams]"  # launcher.train.step.PROGRESS_TAG (not imported: it imports torch)


def say(msg: str) -> None:
    """One tagged line of the launcher's own on the driver's stdout."""
    print(f"{TAG} {msg}", flush=True)

# Ray lines that say nothing a user of this launcher needs; hidden unless verbose.
_NOISE = re.compile("|".join(re.escape(s) for s in (
    "Failed to query Ray Train Controller actor state",      # no dashboard -> no state API
    "has constructor arguments in the object store",
    "Reporting training result",
    "Checkpoint successfully created at",
    "Requesting resources:",
    "Attempting to start training worker group",
    "Setting up process group for",
    "A run snapshot was found in storage folder",            # we print our own resume line
    "This snapshot contains a list of checkpoints",
    "If you meant to start a brand new training job",
    "Ray deduplicates logs by default",
    "- (ip=",                                                 # per-worker placement lines
    # the elastic controller's routine decisions: our own line says what each group trains on
    "Did not detect any changes in the cluster resources",
    "Detected ready resources for",
    "Started training worker group of size",
    # a worker failure: Ray prints the same error 2-3 times with every traceback frame and
    # actor detail; the short form (policy, error count, exception lines) stays visible
    "Traceback (most recent call last)",
    "Worker info: Worker(",
    "Error Snippet]:",
    "Graceful shutdown of backend failed",
    "The actor died unexpectedly before finishing this task",
    "ray.exceptions.ActorDiedError",
    "ray.train.WorkerGroupError: Training failed due to worker errors",
    # a group that cannot be placed (a node is gone): "startup timed out" stays visible once
    "Error in control loop iteration",
    "Training failed due to controller error",
    "WorkerGroupStartupTimeoutError",
    # a dead raylet's message: its last log lines, the state dumps
    "[state-dump]",
)) + r"|committed checkpoint \S*sharded-ams-ckpt-"  # a rank's temp dir, before Ray's upload
   + r"|^\s*\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"  # Ray's C++ log lines
   + r"|^\s*[)^~]*\s*$")                               # traceback carets, closing brackets
_KEEP_INDENTED = re.compile(r"^\s+(Source:|Error count:)")
# Long advice after the fact Ray reports: the line is cut at the first of these.
_CUTS = (" Some common causes include", " Possible reasons include", " Last 20 lines of the Raylet logs",
         " This can happen when", " Potential causes include")
_QUIET_PIDS = ("gcs_server", "autoscaler", "dashboard")  # pids of Ray's own daemons' log lines
# Ray Train's housekeeping actor: on a machine running several Ray instances it prints
# "Found multiple active Ray instances" exceptions that do not affect training.
_QUIET_ACTORS = ("PlacementGroupCleaner",)


# The elastic controller's wait for its minimum (every 30 s; ``ray.train.v2`` elastic policy)
_WAITING = re.compile(r"Detected ready resources for (\d+) workers in the cluster\. Deciding NOT "
                      r"to start/restart training .*\(min_workers=(\d+)\)")


def filter_line(line: str) -> Optional[str]:
    """The line to show in place of one of Ray's (None: hide it; a line starting with
    :data:`TAG` is the launcher's own, shown without Ray's prefix)."""
    waiting = _WAITING.search(line)
    if waiting:  # otherwise the user sees nothing at all while the run waits
        return (f"{TAG} waiting for workers: Ray has room for {waiting[1]} of the "
                f"{waiting[2]} this elastic run needs to start (a busy or still-joining "
                "cluster, or a killed driver's request, booked for up to 3 minutes: "
                "docs/fault-tolerance.md)")
    if _NOISE.search(line):
        return None
    if line[:1] in (" ", "\t") and not _KEEP_INDENTED.match(line):
        return None  # traceback frames, dumped object fields, continuation lines
    for cut in _CUTS:
        if cut in line:
            line = line[: line.index(cut)]
    return line if line.strip() else None


def filter_text(text: str) -> Optional[str]:
    """:func:`filter_line` applied to each line of a multi-line message."""
    kept = [ln for ln in map(filter_line, text.splitlines()) if ln is not None]
    return "\n".join(kept) if kept else None


def short_error(exc: BaseException, verbose: bool = False) -> str:
    """Ray's (long) error text without traceback frames and object dumps."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if verbose:
        return "\n".join(lines)
    keep = [ln for ln in (filter_line(ln) for ln in lines) if ln is not None]
    return "\n".join("  " + ln for ln in (keep or lines)[:12])


class _Dedup:
    """Show a line once per ``window_s``."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self.seen: dict[str, float] = {}

    def __call__(self, text: str) -> bool:
        now = time.monotonic()
        if now - self.seen.get(text, -1e9) < self.window_s:
            return False
        self.seen[text] = now
        if len(self.seen) > 512:
            for k in sorted(self.seen, key=self.seen.get)[:256]:
                del self.seen[k]
        return True


@contextmanager
def quiet_ray_logs(enabled: bool) -> Iterator[None]:
    """Hide Ray's routine log lines and show progress lines without Ray's prefix
    (``enabled=False``: only the prefix goes; every Ray line is shown)."""
    fresh = _Dedup()
    with _hook_dispatcher(enabled, fresh), _hook_error_messages(enabled, fresh):
        yield


@contextmanager
def _hook_dispatcher(enabled: bool, fresh: _Dedup) -> Iterator[None]:
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        original = dict(dispatcher.handlers).get("ray_print_logs")
    except Exception:  # private API moved: leave Ray's printing alone
        original = None
    if original is None:  # or log_to_driver=False: nothing is printed anyway
        yield
        return

    def handler(data: dict) -> None:
        keep = []
        quiet = enabled and (str(data.get("pid")) in _QUIET_PIDS or data.get("actor_name") in _QUIET_ACTORS)
        for line in data.get("lines", []):
            if TAG in line:
                text = line[line.index(TAG):]
                if fresh(text):
                    print(text, file=sys.stdout, flush=True)
            elif not enabled:
                keep.append(line)
            elif not quiet:
                shown = filter_line(line)
                if shown is not None and shown.startswith(TAG):  # Ray's period, not the dedup's
                    print(shown, file=sys.stdout, flush=True)
                elif shown is not None and fresh(shown):
                    keep.append(shown)
        if keep:
            original({**data, "lines": keep})

    try:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", handler)
    except Exception:
        yield
        return
    try:
        yield
    finally:
        # Put Ray's printer back, unless ray.shutdown() already removed ours (then a later
        # ray.init adds its own: adding it here too would print every line twice).
        try:
            if any(h is handler for _, h in dispatcher.handlers):
                dispatcher.remove_handler("ray_print_logs")
                dispatcher.add_handler("ray_print_logs", original)
        except Exception:
            pass


@contextmanager
def _hook_error_messages(enabled: bool, fresh: _Dedup) -> Iterator[None]:
    """Filter the error messages Ray's listener thread prints (``print_to_stdstream``, looked
    up as a module global at each call)."""
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except Exception:
        yield
        return
    if not enabled:
        yield
        return

    def printer(data, ignore_prefix: bool):
        lines = []
        for line in data.get("lines", []):
            shown = filter_text(str(line))
            if shown is not None and fresh(shown):
                lines.append(shown)
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    ray_worker.print_to_stdstream = printer
    try:
        yield
    finally:
        if ray_worker.print_to_stdstream is printer:
            ray_worker.print_to_stdstream = original
