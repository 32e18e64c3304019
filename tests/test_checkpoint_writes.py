"""What the checkpoint code writes and deletes, under faults: pruning deletes only its
own real directories, ``keep_last`` counts valid checkpoints, the writer lock (two
managers, another job's lock and its takeover after a kill), a full disk (errno named, no
temp file left; also on a real tmpfs), re-saving a committed step killed at any point
loses nothing, and ``ckpt consolidate``'s output path refusals. Single process, fast."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from launcher.commands import ckpt as ckpt_cli
from sharded_ams import ShardedAMS
from sharded_ams import checkpoint as C
from sharded_ams.checkpoint import (CheckpointError, CheckpointManager, commit,
                                    find_latest_checkpoint, load_checkpoint, save_checkpoint,
                                    validate_checkpoint)

from ckpt_common import (GRAMS, NEW, OLD, REPO, SHARD, flip_bit, fresh, make_model,
                         manifest_json, sha256_of, train)


def test_prune_deletes_only_its_own_real_directories(root, tmp_path):
    """A symlinked step dir is never followed (the checkpoint it points to keeps its
    manifest), a user's ``best/`` copy and other names stay; leftovers are removed."""
    outside = tmp_path / "elsewhere" / "ck"
    shutil.copytree(root / OLD, outside)
    os.symlink(outside, root / "step-00000000")                    # planted: older step name
    shutil.copytree(root / OLD, root / "best")                     # the user's copy
    (root / "step-00000001.new-0123abcd").mkdir()                  # an interrupted re-save
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    os.symlink(outside, root / "step-00000004")                    # planted where a save goes
    with CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(3, opt, model=model)
        with pytest.raises(CheckpointError, match="symbolic link") as ei:
            mgr.save(4, opt, model=model)                          # never written through
        assert ei.value.kind == "unsafe"
    os.unlink(root / "step-00000004")
    assert (outside / C.MANIFEST_NAME).is_file() and validate_checkpoint(outside).step == 1
    assert os.path.islink(root / "step-00000000")
    assert validate_checkpoint(root / "best").step == 1
    assert sorted(p.name for p in root.iterdir()) == [C.LOCK_NAME, "best", "step-00000000",
                                                      "step-00000003"]


def test_keep_last_counts_valid_checkpoints(tmp_path):
    """keep_last=2 with the newest checkpoint corrupt: the last valid one is kept, the
    corrupt one is not counted (and is removed once a newer valid one exists)."""
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        for s in (1, 2, 3):
            train(model, opt, range(s - 1, s))
            mgr.save(s, opt, model=model)
        flip_bit(tmp_path / "step-00000003" / SHARD)
        assert mgr.prune() == []                  # 2 valid (1, 2) kept; the corrupt 3 is newer
        mgr.save(4, opt, model=model)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert validate_checkpoint(tmp_path / "step-00000002").step == 2


# ----------------------------------------------------------------------------- lock
def test_two_managers_on_one_root(tmp_path, monkeypatch):
    """The second writer gets a clear error naming the owner; it may write once the first
    closed. Without flock (some file systems) the lock file's content decides: a dead pid
    on this host is taken over, a live one is refused."""
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    first, second = CheckpointManager(tmp_path), CheckpointManager(tmp_path)
    first.save(1, opt)
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}") as ei:
        second.save(2, opt)
    assert ei.value.kind == "locked" and socket.gethostname() in str(ei.value)
    assert not (tmp_path / "step-00000002").exists()
    first.save(3, opt)                            # the owner goes on
    first.close()
    second.save(4, opt)
    second.close()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]

    import sharded_ams.checkpoint.manager as M

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(M.fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock = tmp_path / C.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "since": "x"}))
    with CheckpointManager(tmp_path) as mgr:      # stale: taken over
        mgr.save(5, opt)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "x"}))
    with pytest.raises(CheckpointError, match=f"pid {os.getppid()}"):
        CheckpointManager(tmp_path).save(6, opt)


_LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sharded_ams.checkpoint.manager import WriterLock
    lock = WriterLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_lock_of_another_job_and_its_takeover_after_a_kill(tmp_path):
    """Another process (job) holds the root: refused, naming its pid; once it is killed
    (SIGKILL: no cleanup), its lock is stale and taken over."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = make_model(0)
        opt = ShardedAMS(model, backend="eager", **GRAMS)
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            CheckpointManager(tmp_path).save(1, opt)
    finally:
        holder.kill()
        holder.wait()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, opt)
    assert validate_checkpoint(tmp_path / "step-00000001").step == 1


# ----------------------------------------------------------------------------- full disk
def test_full_disk_names_errno_and_leaves_no_temp_file(root, monkeypatch):
    """ENOSPC in the middle of a shard write (injected): the error names the errno and
    the file, no temporary file or partial checkpoint is left, the previous one is intact."""
    class FullDisk:  # the file under torch.save's writer: the disk fills after 2000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    real = commit._HashingWriter.__init__
    monkeypatch.setattr(commit._HashingWriter, "__init__", lambda self, f: real(self, FullDisk(f)))
    model, opt = fresh()
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(root / "step-00000003", opt, model=model, step=3)
    msg = str(ei.value)
    assert ei.value.kind == "save_failed" and "ENOSPC" in msg and "No space left" in msg
    assert SHARD in msg
    assert not (root / "step-00000003").exists()
    assert not list(root.rglob("*.tmp"))
    assert find_latest_checkpoint(root) == root / NEW


_TMPFS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import CheckpointError, save_checkpoint, validate_checkpoint
    root = Path(sys.argv[1])
    small = torch.nn.Linear(8, 8)
    save_checkpoint(root / "small", ShardedAMS(small, backend="eager"), step=1)
    big = torch.nn.Linear(512, 512)
    out = {}
    try:
        save_checkpoint(root / "big", ShardedAMS(big, backend="eager"), step=1)
    except CheckpointError as exc:
        out["error"] = str(exc)
    out["left"] = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out["small_step"] = validate_checkpoint(root / "small").step
    print(json.dumps(out))
""")


def test_full_disk_on_a_real_tmpfs(tmp_path):
    """The same on a real full file system: a 1 MiB tmpfs mounted in a private mount
    namespace (``unshare``); skipped where unprivileged namespaces are not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {mnt}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = (f"mount -t tmpfs -o size=1m none {mnt} && "
           f"{sys.executable} -c '{_TMPFS_SCRIPT}' {mnt}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "ENOSPC" in out["error"] and "No space left on device" in out["error"], out
    assert not [p for p in out["left"] if p.endswith(".tmp") or p.startswith("big/")], out
    assert out["small_step"] == 1


# ----------------------------------------------------------------------------- re-save
class _Killed(BaseException):
    """Stands for SIGKILL at one point of a save: nothing after it runs, no cleanup."""


def _kill(*a, **k):
    raise _Killed


@pytest.mark.parametrize("point", ["before-manifest", "before-swap", "between-renames"])
def test_resave_killed_loses_nothing(root, monkeypatch, point):
    """Re-saving committed step 2 and dying at any point leaves a valid checkpoint of
    step 2 that the scans and the manager find; the next save cleans up."""
    model, opt = fresh()
    load_checkpoint(root / NEW, opt, model=model)
    train(model, opt, range(2, 3))
    if point == "before-manifest":
        monkeypatch.setattr(commit, "_commit_manifest", _kill)
    elif point == "before-swap":
        monkeypatch.setattr(commit, "_swap_in", _kill)
    else:
        monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
        real = os.rename
        calls = []

        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                raise _Killed
            return real(a, b)

        monkeypatch.setattr(commit.os, "rename", rename)
    with pytest.raises(_Killed):
        save_checkpoint(root / NEW, opt, model=model, step=2)
    monkeypatch.undo()
    found = find_latest_checkpoint(root)
    assert found is not None and validate_checkpoint(found).step == 2
    model2, opt2 = fresh()
    assert CheckpointManager(root).load_latest(opt2, model=model2)["step"] == 2
    names = sorted(p.name for p in root.iterdir())
    assert (NEW in names) == (point != "between-renames"), names
    with CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(3, opt, model=model)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000003"]


def test_resave_swaps_in_the_new_copy(root):
    """A completed re-save replaces the committed copy: the new state, nothing left over."""
    model, opt = fresh()
    load_checkpoint(root / NEW, opt, model=model)
    train(model, opt, range(2, 3))
    save_checkpoint(root / NEW, opt, model=model, step=2, extra={"again": True})
    assert load_checkpoint(root / NEW, fresh()[1])["extra"] == {"again": True}
    assert sorted(p.name for p in root.iterdir()) == [OLD, NEW]
    assert not list(root.rglob("*.tmp"))


# ----------------------------------------------------------------------------- consolidate
def test_consolidate_output_path_refusals(root, tmp_path, capsys):
    """OUT an existing directory: a clear error, nothing left behind; OUT inside the
    checkpoint (its manifest.json, or any new file there): refused, the checkpoint intact."""
    before = sha256_of(root / NEW / C.MANIFEST_NAME)
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert ckpt_cli.main(["consolidate", str(root / NEW), str(outdir)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert list(outdir.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))
    for inside in (root / NEW / C.MANIFEST_NAME, root / NEW / "full.pt", root / NEW):
        assert ckpt_cli.main(["consolidate", str(root / NEW), str(inside)]) == 2
        assert "inside the checkpoint" in capsys.readouterr().err
    assert sha256_of(root / NEW / C.MANIFEST_NAME) == before
    assert sorted(os.listdir(root / NEW)) == sorted([*manifest_json(root / NEW)["files"],
                                                     C.MANIFEST_NAME])
    assert validate_checkpoint(root / NEW).step == 2
