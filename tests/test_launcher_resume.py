"""The launcher around a run, without Ray runs: ``examples/torchrun_example.py`` under
torchrun (trains, checkpoints, resumes resharded), the lr schedule across a resume, and
the Ray Train settings for an embedded Ray. Split from tests/test_launcher.py (config and
CLI), by job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

from launcher.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ROOT / "launcher" / "configs" / "gpt_tiny.toml"


# =============================================================================== torchrun


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_example_trains_checkpoints_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(nproc: int, steps: int) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               str(ROOT / "examples" / "torchrun_example.py"), "--steps", str(steps),
               "--checkpoint-every", "5", "--log-every", "5", "--backend", "eager",
               "--max-bytes", "200000", "--ckpt-dir", str(ckpt)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    first = torchrun(2, 10)
    assert "2 rank(s), cpu, gloo" in first and "starting from scratch" in first
    assert f"checkpoint {ckpt / 'step-00000010'}" in first
    second = torchrun(1, 15)  # resumes, resharded 2 -> 1
    assert f"resumed from {ckpt / 'step-00000010'} (step 10)" in second
    assert "done: step 15/15" in second
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-00000010", "step-00000015"]


# =============================================================================== schedule on resume


def _worker_at(steps: int, monkeypatch, **overrides):
    """The worker that ``launcher.train.loop._build`` makes for gpt_tiny with ``job.steps =
    steps`` (outside Ray: this process's CPU as the worker's device)."""
    import ray.train.torch

    from launcher.train.loop import _build

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: __import__("torch").device("cpu"))
    cfg = load_config(GPT_TINY, {"job.steps": steps, "optim.backend": "eager", "data.max_bytes": 100_000,
                                 **overrides}, environ={})
    return _build({**cfg.to_dict(), "run_dir": "unused"})


@pytest.mark.parametrize("schedule_steps", [None, 300])
def test_raising_steps_on_resume_keeps_the_schedule_unless_asked(tmp_path, monkeypatch, schedule_steps):
    """gpt_tiny's cosine run of 200 steps, resumed with job.steps = 300: the schedule it
    started with stays in force (lr stays at min_lr_ratio), and one line says so with the lr
    the other length would give; optim.schedule_steps = 300 re-plans the decay (~0.35x)."""
    pytest.importorskip("ray.train")
    from launcher.train.loop import lr_factor, settle_schedule
    from sharded_ams.checkpoint import load_checkpoint, save_checkpoint

    import warnings

    first = _worker_at(200, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for _ in range(200):
            first.scheduler.step()
    save_checkpoint(tmp_path / "ck", first.optimizer, step=200, lr_scheduler=first.scheduler)
    rerun = _worker_at(300, monkeypatch, **{"optim.schedule_steps": schedule_steps})
    opt2, sched2, optim = rerun.optimizer, rerun.scheduler, rerun.cfg.optim
    load_checkpoint(tmp_path / "ck", opt2, lr_scheduler=sched2)
    line = settle_schedule(sched2, optim, 300, 200)
    kept, replanned = (lr_factor(200, total_steps=n, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1)
                       for n in (200, 300))
    assert kept == pytest.approx(0.1) and replanned == pytest.approx(0.35, abs=0.02)
    want, other = (kept, replanned) if schedule_steps is None else (replanned, kept)
    assert sched2.lr_lambdas[0].total_steps == (schedule_steps or 200)
    assert opt2.param_groups[0]["lr"] == pytest.approx(optim.lr * want)
    sched2.step()  # the scheduler goes on from there
    assert opt2.param_groups[0]["lr"] == pytest.approx(
        optim.lr * lr_factor(201, total_steps=schedule_steps or 200, warmup_steps=20, schedule="cosine",
                             min_lr_ratio=0.1))
    assert len(line.splitlines()) == 1 and f"cosine over {schedule_steps or 200} steps" in line
    assert f"is {optim.lr * want:.3g} (over {300 if schedule_steps is None else 200} steps it would be " \
           f"{optim.lr * other:.3g})" in line
    assert ("set optim.schedule_steps=300" in line) == (schedule_steps is None)
    if schedule_steps is None:
        assert settle_schedule(sched2, optim, 200, 200) == ""  # the same length: nothing to say


@pytest.mark.parametrize("change", [{}, {"optim.schedule": "constant"}, {"optim.min_lr_ratio": 0.5},
                                    {"optim.warmup_steps": 80}])
def test_the_first_step_after_a_resume_uses_the_configs_schedule(tmp_path, monkeypatch, change):
    """A resume at step 60 of gpt_tiny's 200-step cosine run: the step after it trains at
    the lr a run started with the rerun's config has there (the schedule comes from the
    config), not at the lr the checkpoint's groups were saved with; unchanged, at that very
    lr, bit for bit (an uninterrupted run's)."""
    pytest.importorskip("ray.train")
    import warnings

    from launcher.train.loop import settle_schedule
    from sharded_ams.checkpoint import load_checkpoint, save_checkpoint

    def stepped(w, n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
            for _ in range(n):
                w.scheduler.step()
        return w

    first = stepped(_worker_at(200, monkeypatch), 60)
    save_checkpoint(tmp_path / "ck", first.optimizer, step=60, lr_scheduler=first.scheduler)
    rerun = _worker_at(200, monkeypatch, **change)
    load_checkpoint(tmp_path / "ck", rerun.optimizer, lr_scheduler=rerun.scheduler)
    settle_schedule(rerun.scheduler, rerun.cfg.optim, 200, 60)
    fresh = stepped(_worker_at(200, monkeypatch, **change), 60)  # never interrupted
    for _ in range(3):
        assert [g["lr"] for g in rerun.optimizer.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]
        assert rerun.scheduler.get_last_lr() == fresh.scheduler.get_last_lr()
        stepped(rerun, 1), stepped(fresh, 1)
    if not change:
        assert rerun.optimizer.param_groups[0]["lr"] == stepped(first, 3).optimizer.param_groups[0]["lr"]



@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_ray_train_settings_for_an_embedded_ray(address, monkeypatch):
    """A Ray embedded on this machine polls reports every 0.25 s and starts no
    PreemptionWatcher actor per group start (no cloud preemption reaches it); a cluster
    keeps Ray's defaults; a value the user set is kept either way."""
    from launcher.run.driver import _prepare_env

    names = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
             "RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH", "RAY_TRAIN_V2_ENABLED")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    _prepare_env(address)
    got = {n: os.environ.get(n) for n in names[:2]}
    assert got == ({names[0]: "0.25", names[1]: "0"} if address is None else
                   dict.fromkeys(names[:2]))
    monkeypatch.setenv(names[1], "1")
    _prepare_env(address)
    assert os.environ[names[1]] == "1"
