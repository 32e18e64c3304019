"""Ctrl-C on the driver while Ray Train runs: stop the run's workers, say where a rerun resumes.

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

Either way no committed checkpoint is harmed. A worker killed mid-save leaves an
uncommitted directory that a resume skips (``tests/test_faults.py`` kills workers there).
"""

from __future__ import annotations

import time
from typing import Any, Optional

__all__ = ["ABORT_WAIT_S", "NOT_STARTED_WAIT_S", "ControllerHandle", "own_ctrl_c", "stop"]

#: how long the first Ctrl-C waits for Ray Train's controller to abort the run gracefully
ABORT_WAIT_S = 15.0
#: the same before any worker group of this launch has started (the controller is waiting
#: for resources or placing the group, and serves no abort() until that ends)
NOT_STARTED_WAIT_S = 2.0


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
