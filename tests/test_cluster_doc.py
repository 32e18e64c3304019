"""docs/cluster.md's commands, run as the README's are (``test_readme.bash_blocks``): every
```bash block is run here or excluded with a reason (:data:`BLOCKS`).

What runs: the version check and the one-machine cluster (``ray start --head`` on 127.0.0.1,
a node joining it, the GPT job on them with ``--address`` and ``job.env``), in one shell.
Ray's files go to a private ``RAY_TMPDIR`` (its sockets, logs and the address file that
``--address auto`` reads: never another Ray's on this machine), and the block's last line,
``ray stop``, is replaced by stopping the processes that carry that ``RAY_TMPDIR`` in their
environment, by process id: ``ray stop`` would end every Ray of this user on the machine.
The GPU lines run with ``--dry-run``; the SLURM and torchrun lines have their flags parsed
by ``ray start``'s and ``torchrun``'s own parsers.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_readme import bash_blocks, local_nfs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cluster.md"
VERSIONS = ("1. What every node needs", 0)
ONE_MACHINE = ("2. Try it on one machine first", 0)
BARE_RAY, BARE_TRAIN = ("3. Bare nodes", 0), ("3. Bare nodes", 1)
SLURM_RAY, SLURM_TORCHRUN = ("4. SLURM", 0), ("4. SLURM", 1)

# (section heading, index of the bash block in that section) -> who runs it, or why not
BLOCKS = {
    VERSIONS: "test_one_machine_cluster (first line of its shell)",
    ONE_MACHINE: "test_one_machine_cluster; its `ray stop` is replaced by stopping this "
                 "cluster's processes by id",
    BARE_RAY: "test_bare_node_commands_are_the_one_machine_ones: the same `ray start` lines "
              "with HEAD_IP=127.0.0.1; their flags parse (test_ray_start_flags_parse)",
    BARE_TRAIN: "needs GPU nodes: test_gpu_lines_pass_the_driver_checks (--dry-run)",
    SLURM_RAY: "needs SLURM: its `ray start` flags parse (test_ray_start_flags_parse), its "
               "driver line passes --dry-run (test_gpu_lines_pass_the_driver_checks)",
    SLURM_TORCHRUN: "needs SLURM and GPUs: torchrun's and the script's flags parse "
                    "(test_torchrun_recipe_parses)",
}
SLURM_ENV = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "32",
             "head_ip": "127.0.0.1", "HEAD_IP": "127.0.0.1"}


def blocks() -> dict[tuple[str, int], str]:
    return bash_blocks(DOC)


def _expand(text: str) -> str:
    """Shell variables of the recipes replaced by the values of a 2-node allocation."""
    text = text.replace("$((SLURM_JOB_NUM_NODES * 8))", "16")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: SLURM_ENV.get(m[1], m[0]), text)


def test_every_bash_block_is_run_or_excluded():
    assert set(blocks()) == set(BLOCKS)


# =============================================================================== one machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_env(marker: bytes) -> list[int]:
    """Processes of this user whose environment holds ``marker`` (ours: children inherit it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def stop_ray_started_with(ray_tmp: Path) -> None:
    """``ray stop`` for one cluster only: SIGTERM, then SIGKILL, every process whose
    environment carries this cluster's RAY_TMPDIR."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _pids_with_env(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _pids_with_env(marker)
    assert not _pids_with_env(marker), "processes of the test's Ray cluster outlived it"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_machine_cluster(tmp_path):
    """Two Ray nodes on 127.0.0.1 started by ``ray start`` (a head without CPUs, a node that
    joins it), the GPT job on the joined node's two workers through ``--address``; ``job.env`` is what the workers' own environment holds (the
    raylets that start them do not have it: only Ray's runtime_env can bring it)."""
    lines = [ln for ln in blocks()[ONE_MACHINE].splitlines() if ln.strip()]
    assert lines[-1] == "ray stop" and all("127.0.0.1" in ln for ln in lines if ln.startswith("ray start"))
    port = str(_free_port())
    script = "\n".join([blocks()[VERSIONS].strip(), *lines[:-1]])
    script = script.replace("6390", port).replace("/tmp/shared/runs", str(tmp_path / "runs"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="sams-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    for var in ("RAY_ADDRESS", "NCCL_DEBUG"):
        env.pop(var, None)
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=360)
    finally:
        stop_ray_started_with(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    (tmp_path / "out.log").write_text(out)
    assert proc.returncode == 0, out[-5000:]
    import ray
    import torch

    assert re.match(rf"\d+\.\d+\.\d+ {re.escape(ray.__version__)} {re.escape(torch.__version__)} ", proc.stdout)
    assert "job.env in the workers: NCCL_DEBUG=WARN" in out, out[-5000:]
    assert f"connected to the Ray cluster at 127.0.0.1:{port}" in out
    assert re.search(r"step 20/20 \| loss \d", out) and "2 worker(s) on cpu" in out, out[-5000:]
    assert (tmp_path / "runs" / "try-cluster" / "step-00000020" / "manifest.json").is_file()


def test_bare_node_commands_are_the_one_machine_ones():
    """The bare-node `ray start` lines, with HEAD_IP=127.0.0.1 and the trial's port, begin
    lines that test_one_machine_cluster runs."""
    ran = [ln.strip() for ln in blocks()[ONE_MACHINE].splitlines()]
    for line in filter(None, (ln.strip() for ln in blocks()[BARE_RAY].splitlines())):
        local = _expand(line).replace("6379", "6390")
        assert any(r.startswith(local) for r in ran), local


# =============================================================================== checked statically


def _ray_start_lines() -> list[str]:
    """Every `ray start ...` command of the bare-node and SLURM blocks, variables expanded."""
    found = []
    for key in (BARE_RAY, SLURM_RAY):
        for m in re.finditer(r"ray start [^&\n]*", blocks()[key]):
            found.append(_expand(m[0]).strip())
    return found


def test_ray_start_flags_parse():
    """`ray start`'s own (click) parser accepts every flag of the recipes."""
    from ray.scripts.scripts import start

    lines = _ray_start_lines()
    assert len(lines) == 4 and sum("--head" in ln for ln in lines) == 2
    for line in lines:
        ctx = start.make_context("start", shlex.split(line)[2:])
        assert ctx.params["head"] == ("--head" in line)
        assert ctx.params["block"] == ("--block" in line)


def test_gpu_lines_pass_the_driver_checks(tmp_path, capsys, monkeypatch):
    """The bare-node and SLURM driver lines pass every driver-side check (batch split, data,
    storage) with --dry-run, on 16 GPU workers (in this process: the CLI's main, the line's
    environment assignments set first)."""
    from launcher.cli import main as cli_main

    monkeypatch.chdir(ROOT)
    slurm = [ln for ln in blocks()[SLURM_RAY].splitlines() if "sharded-ams train" in ln]
    for line in (blocks()[BARE_TRAIN].strip(), *slurm):
        words = shlex.split(local_nfs(_expand(line), tmp_path))
        while "=" in words[0]:
            monkeypatch.setenv(*words.pop(0).split("=", 1))
        assert words[:2] == ["sharded-ams", "train"]
        assert cli_main([*words[1:], "--dry-run"]) == 0, capsys.readouterr().err
        out, err = capsys.readouterr()
        assert '"num_workers": 16' in out and '"use_gpu": true' in out
        assert "= 16 workers x " in err, err


def test_torchrun_recipe_parses():
    """torchrun's parser takes the multi-node flags; the example script takes its own."""
    from torch.distributed.run import get_args_parser

    from scripts import load_script

    line = next(ln for ln in blocks()[SLURM_TORCHRUN].splitlines() if "torchrun " in ln)
    args = shlex.split(_expand(line.split("torchrun ", 1)[1]))
    ns = get_args_parser().parse_args(args)
    assert (ns.nnodes, ns.nproc_per_node, ns.rdzv_backend) == ("2", "8", "c10d")
    assert ns.rdzv_endpoint == "127.0.0.1:29500" and ns.max_restarts == 3
    assert ns.training_script == "examples/torchrun_example.py" and (ROOT / ns.training_script).is_file()
    ex = load_script(ns.training_script).parse_args(ns.training_script_args)
    assert ex.ckpt_dir == "/nfs/ckpt/torchrun-example" and ex.steps == 2000


def test_nccl_table_is_a_valid_config(tmp_path):
    from launcher.config import load_config

    (toml,) = bash_blocks(DOC, "toml").values()
    (tmp_path / "job.toml").write_text(toml)
    env = load_config(tmp_path / "job.toml", environ={}).job.runtime_env()["env_vars"]
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] == "WARN"


def test_troubleshooting_quotes_the_real_messages(capsys, monkeypatch):
    """The messages the Troubleshooting section quotes are the ones the launcher prints."""
    import torch

    from launcher.cli import main as cli_main
    from launcher.run.scaling import accumulation_steps, check_batch_split, oversubscription_warning

    doc = " ".join(DOC.read_text().split("## 7. Troubleshooting", 1)[1].split())
    with pytest.raises(ValueError) as e:
        accumulation_steps(16, 3, None)
    assert str(e.value) in doc
    with pytest.raises(ValueError) as e:
        check_batch_split(16, [2, 4], None)
    assert str(e.value).split(":")[0] in doc and "Use a multiple of 12" in doc
    assert oversubscription_warning(16, 8, "GPU", local=False) in doc
    gpt = str(ROOT / "launcher" / "configs" / "gpt_tiny.toml")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli_main(["train", gpt, "--dry-run", "--num-workers", "8", "--gpus"]) == 2
    assert capsys.readouterr().err.split("error: ")[1].strip() in doc
    assert cli_main(["train", gpt, "--dry-run", "--set", "data.path=/nfs/data/c4"]) == 2
    assert capsys.readouterr().err.split("error: ")[1].strip() in doc
    refusal = "Use a new job.name (--name) for a new model, or restore these settings to resume this run."
    assert refusal in " ".join((ROOT / "launcher" / "run" / "resume_point.py").read_text().split()).replace('" "', "")
    assert refusal in doc
    import socket

    from launcher.run.preflight import LaunchError, check_ray_address

    with socket.socket() as s:  # a port nothing listens at any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LaunchError) as e:
        check_ray_address(f"127.0.0.1:{port}")
    said = str(e.value).replace(f"127.0.0.1:{port}", "10.0.0.5:6380").replace(f"={port}", "=6380")
    assert said.split("start its head")[0] + "start its head with" in doc, said
    from launcher.run.run_lock import _busy_message

    assert _busy_message("gpt", "/shared/runs/gpt/.sharded_ams/driver.lock",
                         {"pid": 4242, "host": "node1", "since": "2026-12-07 23:50:01 UTC"}) in doc
