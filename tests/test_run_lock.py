"""One launch at a time per run (launcher/run/run_lock.py): a second launch of a run that is
training is refused before Ray starts, naming the holder; a dry run is not; the holder
killed from outside (SIGKILL, no clean-up) leaves nothing that blocks the rerun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main as cli_main
from launcher.config import load_config
from launcher.run.driver import LaunchError, run
from launcher.run.run_lock import lock_path, run_lock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "launcher/configs/gpt_tiny.toml"
HOLD = ("import sys, time\nfrom launcher.run.run_lock import run_lock\n"
        "with run_lock(sys.argv[1], 'run'):\n    print('held', flush=True)\n    time.sleep(300)\n")


def _argv(root: Path, *extra: str) -> list[str]:
    return ["train", str(CONFIG), "--storage-path", str(root), "--name", "run",
            "--set", "data.max_bytes=60000", *extra]


@pytest.mark.timeout(120)
def test_a_second_launch_is_refused_until_the_first_is_killed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = cli_main(_argv(tmp_path))
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert (f"run 'run' is being trained by another launch: pid {holder.pid} on host "
                in err and "then rerun this command to resume" in err), err
        assert str(lock_path(str(run_dir))) in err
        # run() itself takes the lock too (the examples call it without the CLI)
        with pytest.raises(LaunchError, match=f"pid {holder.pid} on host"):
            run(load_config(CONFIG, {"job.storage_path": str(tmp_path), "job.name": "run",
                                     "data.max_bytes": 60000}))
        assert not (run_dir / "step-00000000").exists() and not (run_dir / "checkpoint_manager_snapshot.json").exists()
        assert cli_main(_argv(tmp_path, "--dry-run")) == 0  # a dry run only reads
    finally:
        holder.kill()  # SIGKILL: the holder cleans nothing up
        holder.wait()
    with run_lock(str(run_dir), "run"):  # the kernel released it with the process
        held = Path(lock_path(str(run_dir))).read_text()
        assert f'"pid": {os.getpid()}' in held
        with run_lock(str(run_dir), "run"):  # re-entrant: the CLI and run() both enter
            pass
    assert not Path(lock_path(str(run_dir))).exists()  # deleted by its holder, while held


def test_a_lock_file_deleted_as_it_is_locked_is_not_held(tmp_path, monkeypatch):
    """The holder before deletes the file as it lets go; a launch that opened that file just
    before then locks a file no path names, and must lock the one now at the path: two
    launches would hold two locks otherwise."""
    import fcntl

    import launcher.run.run_lock as rl

    path = Path(lock_path(str(tmp_path / "run")))
    real_open, calls = rl._open, []

    def open_then_lose_it(p):
        fd = real_open(p)
        calls.append(p)
        if len(calls) == 1:
            os.unlink(p)  # the previous holder lets go
        return fd

    monkeypatch.setattr(rl, "_open", open_then_lose_it)
    with run_lock(str(tmp_path / "run"), "run"):
        assert len(calls) == 2 and path.exists()
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the file at the path is the one held
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not (tmp_path / "run").exists()  # made for the lock, removed with it


@pytest.mark.timeout(30)  # a FIFO opened for reading without O_NONBLOCK would hang here
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused(tmp_path, kind):
    run_dir = tmp_path / "run"
    path = Path(lock_path(str(run_dir)))
    path.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("keep")
    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(LaunchError, match="symbolic link|not a regular file|driver lock"):
        with run_lock(str(run_dir), "run"):
            pass
    assert outside.read_text() == "keep"
