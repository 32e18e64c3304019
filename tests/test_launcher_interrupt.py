"""Ctrl-C on the launcher's driver (``launcher.run.interrupt``), without Ray runs: the
trainer's SIGINT hook, how the controller is stopped, what the CLI says and returns.

A real Ctrl-C of a training run, and of an elastic run still waiting for its workers, is
sent from outside in ``tests/test_faults.py``.
"""

from __future__ import annotations

import inspect
import os
import signal
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

import ray  # noqa: E402
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: E402

import launcher.run.driver as rd  # noqa: E402
from launcher.cli import main as cli_main  # noqa: E402
from launcher.config import load_config  # noqa: E402
from launcher.run.interrupt import (ABORT_WAIT_S, NOT_STARTED_WAIT_S,  # noqa: E402
                                    ControllerHandle, Terminated, own_ctrl_c,
                                    sigterm_as_interrupt, stop)

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ROOT / "launcher" / "configs" / "gpt_tiny.toml"


def test_ray_hands_its_controller_to_the_hook_the_launcher_replaces():
    """The installed Ray Train registers its SIGINT handler through this method, with the
    controller: replacing it on the trainer is what keeps Python's KeyboardInterrupt."""
    src = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert "self._register_sigint_handler(controller)" in src


class _Trainer:
    def __init__(self):
        self.registered = None

    def _register_sigint_handler(self, controller):  # Ray's: installs its own handler
        self.registered = controller
        signal.signal(signal.SIGINT, lambda *a: None)


def test_own_ctrl_c_records_the_controller_and_leaves_the_sigint_handler():
    before = signal.getsignal(signal.SIGINT)
    trainer = _Trainer()
    handle = own_ctrl_c(trainer)
    trainer._register_sigint_handler("the controller")
    assert handle.actor == "the controller" and trainer.registered is None
    assert signal.getsignal(signal.SIGINT) is before
    assert own_ctrl_c(object()).actor is None  # a Ray without the hook: nothing to replace


def test_sigterm_in_the_block_is_an_interrupt_and_the_handler_comes_back():
    """A scheduler's SIGTERM stops the run as a Ctrl-C does (Ray's driver would end at once,
    status 1, with a C++ stack dump)."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode: never gets here
    assert isinstance(info.value, KeyboardInterrupt) and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


class _Actor:
    def __init__(self):
        self.abort = self
        self.calls = 0

    def remote(self):
        self.calls += 1
        return "abort-ref"


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.wait answers as told (True: the abort finished; an exception: raised); ray.kill
    is recorded."""
    seen = {"kill": [], "answer": False}

    def wait(refs, timeout):
        if isinstance(seen["answer"], BaseException):
            raise seen["answer"]
        if not seen["answer"]:
            time.sleep(timeout)
        return (refs, []) if seen["answer"] else ([], refs)

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: seen["kill"].append((actor, no_restart)))
    return seen


def test_stop_waits_for_the_abort(fake_ray):
    handle = ControllerHandle()
    handle.actor = actor = _Actor()
    fake_ray["answer"] = True
    assert stop(handle, wait_s=5) == "aborted"
    assert actor.calls == 1 and fake_ray["kill"] == []


def test_stop_kills_a_controller_that_does_not_answer(fake_ray):
    handle = ControllerHandle()
    handle.actor = actor = _Actor()
    t0 = time.monotonic()
    assert stop(handle, wait_s=0.5) == "killed"
    assert 0.5 <= time.monotonic() - t0 < 5
    assert fake_ray["kill"] == [(actor, True)]


def test_a_second_ctrl_c_kills_at_once(fake_ray):
    handle = ControllerHandle()
    handle.actor = actor = _Actor()
    fake_ray["answer"] = KeyboardInterrupt()
    t0 = time.monotonic()
    assert stop(handle, wait_s=60) == "killed"
    assert time.monotonic() - t0 < 5 and fake_ray["kill"] == [(actor, True)]


def test_stop_before_the_controller_exists(fake_ray):
    assert stop(ControllerHandle()) == "not started" and fake_ray["kill"] == []


class _InterruptedTrainer:
    """fit() as Ray's: the controller handed to the hook, then a signal while waiting on it."""

    def __init__(self, signum=signal.SIGINT):
        self.signum = signum

    def _register_sigint_handler(self, controller):
        raise AssertionError("Ray's handler must not be installed")

    def fit(self):
        self._register_sigint_handler("controller")
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        try:
            os.kill(os.getpid(), self.signum)
            time.sleep(5)
        except KeyboardInterrupt:  # as ray.get: a plain one, whatever the handler raised
            raise KeyboardInterrupt from None


@pytest.mark.parametrize("group_started", [False, True])
def test_fit_stops_the_run_and_says_where_a_rerun_resumes(tmp_path, monkeypatch, group_started):
    """Before any worker group of this launch started, the controller serves no abort():
    a short wait, then the kill; after, the graceful abort's full wait."""
    config = load_config(GPT_TINY, {"job.storage_path": str(tmp_path), "job.name": "r"}, environ={})
    if group_started:  # rank 0's record of a group start in this launch
        attempts = Path(config.job.run_dir) / rd.STATE_DIR / "attempts"
        attempts.mkdir(parents=True)
        (attempts / "L-1.json").write_text("{}")
    calls = []
    monkeypatch.setattr(rd, "stop", lambda handle, wait_s: calls.append((handle.actor, wait_s)) or "killed")
    with pytest.raises(rd.RunInterrupted) as info:
        rd._fit(_InterruptedTrainer(), config, "L", verbose=False)
    assert calls == [("controller", ABORT_WAIT_S if group_started else NOT_STARTED_WAIT_S)]
    assert str(info.value) == "run 'r' stopped (killed); no checkpoint was committed; a rerun starts from scratch"
    assert info.value.checkpoint is None and isinstance(info.value, KeyboardInterrupt)
    assert info.value.signum == signal.SIGINT


def test_fit_stops_the_run_on_sigterm(tmp_path, monkeypatch):
    config = load_config(GPT_TINY, {"job.storage_path": str(tmp_path), "job.name": "r"}, environ={})
    monkeypatch.setattr(rd, "stop", lambda handle, wait_s: "aborted")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(rd.RunInterrupted) as info:
        rd._fit(_InterruptedTrainer(signal.SIGTERM), config, "L", verbose=False)
    assert info.value.signum == signal.SIGTERM and str(info.value).startswith("run 'r' stopped (aborted); ")
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("exc, said", [
    (rd.RunInterrupted("run 'r' stopped (aborted); the last committed checkpoint is step 20: "
                       "runs/r/step-00000020; rerun the same command to resume from it"),
     "[sharded-ams] INTERRUPTED: run 'r' stopped (aborted); the last committed checkpoint is "
     "step 20: runs/r/step-00000020; rerun the same command to resume from it\n"),
    (KeyboardInterrupt(),  # before training started (ray.init, the checks)
     "[sharded-ams] INTERRUPTED: rerun the same command to resume from the last checkpoint\n"),
    (rd.RunInterrupted("run 'r' stopped (killed); no checkpoint was committed; a rerun starts from "
                       "scratch", signum=signal.SIGTERM),
     "[sharded-ams] STOPPED by SIGTERM: run 'r' stopped (killed); no checkpoint was committed; a "
     "rerun starts from scratch\n"),
])
def test_cli_exits_128_plus_the_signal_and_says_where_a_rerun_resumes(monkeypatch, capsys, exc, said):
    """The shell's status for a process ended by the signal: 130 for Ctrl-C, 143 for SIGTERM."""
    def run(*a, **k):
        raise exc

    monkeypatch.setattr(rd, "run", run)
    assert cli_main(["train", str(GPT_TINY)]) == 128 + getattr(exc, "signum", signal.SIGINT)
    assert capsys.readouterr().err.endswith(said)
