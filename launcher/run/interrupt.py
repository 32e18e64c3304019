"""Ctrl-C or SIGTERM on the driver while Ray Train runs: stop the run's workers, say where a
rerun resumes.

Ray Train (2.60, Train V2) registers its own SIGINT handler in ``fit()``. The handler
blocks until the controller's ``abort()`` returns, then calls ``sys.exit(0)``. This had two
consequences for the launcher, both measured:

* A Ctrl-C during training ended the driver with exit status 1 and printed nothing.
  The launcher never saw a KeyboardInterrupt, so it never said where a rerun resumes.
* While an elastic run waits for its minimum workers, the controller's loop never yields
  to its event loop: each iteration has nothing to await. So ``abort()`` is never served,
  and the driver hung after Ctrl-C until the workers' resources appeared. It was still
  hung 10 minutes later. The same loop keeps one core of the driver's node busy.

:func:`own_ctrl_c` replaces Ray's handler on a trainer: Python's own handler (which raises
KeyboardInterrupt) stays, and the controller's handle is kept. After that interrupt,
:func:`stop` asks the controller to abort. Ray then stops the workers and withdraws the
run's resource request. :func:`stop` waits up to ``ABORT_WAIT_S`` for the abort, or
``NOT_STARTED_WAIT_S`` when no worker group of the launch has started (the waiting case
above, where no answer comes). If the controller does not answer, or a second Ctrl-C
comes, it kills the controller, and the workers die with their owner.
:func:`sigterm_as_interrupt` makes a SIGTERM take the same path.

Either way no committed checkpoint is harmed. A worker killed mid-save leaves an
uncommitted directory that a resume skips (``tests/test_faults.py`` kills workers there).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

__all__ = ["ABORT_WAIT_S", "NOT_STARTED_WAIT_S", "ControllerHandle", "RunInterrupted", "Signals",
           "Terminated", "own_ctrl_c", "sigterm_as_interrupt", "stop"]

#: how long the first Ctrl-C waits for Ray Train's controller to abort the run gracefully
ABORT_WAIT_S = 15.0
#: the same before any worker group of this launch has started (the controller is waiting
#: for resources or placing the group, and serves no abort() until that ends)
NOT_STARTED_WAIT_S = 2.0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) on the driver, after :func:`stop` ended the run. The message
    says where a rerun of the same command resumes; ``checkpoint`` is that checkpoint
    (None: a rerun starts from scratch)."""

    def __init__(self, message: str, *, checkpoint: Optional[str] = None,
                 signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = int(signum)  #: SIGINT (Ctrl-C) or SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM during ``fit()`` (a SLURM time limit, ``timeout``, a pod's end): stopped
    like a Ctrl-C."""

    signum = signal.SIGTERM


class ControllerHandle:
    """The Ray Train controller actor of one ``fit()`` (None until it has started)."""

    def __init__(self) -> None:
        self.actor: Optional[Any] = None


def own_ctrl_c(trainer: Any) -> ControllerHandle:
    """Keep Python's SIGINT handler for ``trainer.fit()`` and record its controller.

    Ray calls ``trainer._register_sigint_handler(controller)`` just before it waits on the
    controller; here that call only records the actor. A Ray without that method installs
    no handler of its own, and its KeyboardInterrupt reaches the caller as usual."""
    handle = ControllerHandle()
    if callable(getattr(trainer, "_register_sigint_handler", None)):
        def keep(controller: Any) -> None:
            handle.actor = controller

        trainer._register_sigint_handler = keep
    return handle


def stop(handle: ControllerHandle, wait_s: float = ABORT_WAIT_S) -> str:
    """End the run of ``handle`` after a Ctrl-C. Returns how: ``"aborted"`` (Ray's
    graceful abort finished), ``"killed"`` (no answer in ``wait_s``, or a second Ctrl-C),
    or ``"not started"`` (the interrupt came before the controller existed)."""
    import ray

    actor = handle.actor
    if actor is None:
        return "not started"
    try:
        pending = actor.abort.remote()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            done, _ = ray.wait([pending], timeout=0.25)
            if done:  # abort() returned, or the controller exited inside it (its way)
                return "aborted"
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: now
    ray.kill(actor, no_restart=True)
    return "killed"


class Signals:
    """The signal that ended the block of :func:`sigterm_as_interrupt` (None: none there).

    Ray's ``ray.get`` turns an exception raised by a signal handler while it waits into a
    plain KeyboardInterrupt, so the exception's type does not tell SIGTERM from Ctrl-C."""

    def __init__(self) -> None:
        self.received: Optional[int] = None


@contextmanager
def sigterm_as_interrupt() -> Iterator[Signals]:
    """SIGTERM raises :class:`Terminated` in the block (on the main thread only) and is
    recorded in the :class:`Signals` it yields.

    Ray's driver would otherwise exit at once: its C++ failure handler prints a stack dump
    and the process ends with status 1, without a word on where the run resumes. The
    process also skips Ray's graceful abort, so an elastic run's resource request stays
    booked for up to 180 s. Schedulers send SIGTERM before SIGKILL (SLURM at a time limit,
    ``KillWait`` = 30 s before by default; Kubernetes, a 30 s grace period), so the run has
    time to stop as it does on Ctrl-C. The block must start after ``ray.init``, whose
    handlers this one replaces."""
    seen = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def terminate(signum: int, frame: Any) -> None:
        seen.received = signum
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield seen
    finally:  # None: a handler not set from Python (then the default, as at exec)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
