"""Processes of an embedded Ray left hung after its shutdown are killed
(launcher/run/ray_orphans.py), and nothing else is: the deadlock itself cannot be forced, so
stand-ins carry what identifies one (the raylet's pid in RAY_RAYLET_PID, a log file open in
the session's directory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.run.ray_orphans import reap, session_processes

RAYLET = 4_000_000  # above any pid_max: no live raylet has it


def _stand_in(log_path, raylet: int = RAYLET, seconds: float = 120) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                                stdout=log, env={**os.environ, "RAY_RAYLET_PID": str(raylet)})


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux only (/proc)")
def test_only_the_sessions_own_processes_are_killed(tmp_path):
    session, other = tmp_path / "session_x", tmp_path / "session_y"
    (session / "logs").mkdir(parents=True)
    (other / "logs").mkdir(parents=True)
    hung = _stand_in(session / "logs" / "worker.out")
    exiting = _stand_in(session / "logs" / "slow.out", seconds=0.2)  # exits by itself, late
    elsewhere = _stand_in(other / "logs" / "worker.out")  # the same raylet pid, reused
    other_raylet = _stand_in(session / "logs" / "other.out", raylet=RAYLET + 1)
    try:
        assert sorted(session_processes(RAYLET, str(session))) == sorted([hung.pid, exiting.pid])
        assert reap(RAYLET, str(session), wait_s=4) == [hung.pid]  # the other had time to go
        assert hung.wait(timeout=10) == -9 and exiting.wait(timeout=10) == 0
        assert elsewhere.poll() is None and other_raylet.poll() is None
        assert reap(RAYLET, str(session), wait_s=4) == []
    finally:
        for p in (hung, exiting, elsewhere, other_raylet):
            p.kill()
            p.wait()


def test_the_driver_reaps_after_shutting_down_the_ray_it_started(monkeypatch):
    import ray

    import launcher.run.driver as rl
    import launcher.run.ray_orphans as ro
    from launcher.config import load_config

    cfg = load_config(None, ["job.num_workers=1"], environ={})
    calls = []
    monkeypatch.setattr(ro, "reap", lambda *a: calls.append((a, ray.is_initialized())) or [])
    with rl._ray_session(None, cfg, False) as started:
        assert started
        session = ro.local_session()
        assert session is not None and os.path.isdir(session[1])
    assert calls == [(session, False)]  # after ray.shutdown(), for that session
