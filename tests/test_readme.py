"""The README's code runs as written.

* Python snippets: in order, one namespace, one process.
* ``bash`` blocks: every block is either run by a named test or excluded with a reason
  (:data:`BASH_BLOCKS`); a new block that is neither fails
  :func:`test_every_bash_block_is_run_or_excluded`. The launcher block runs here with the
  compile backend on, as a user gets it, on step numbers scaled down 10x (see
  :func:`scaled`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# (section heading, index of the bash block in that section) -> who runs it, or why not
BASH_BLOCKS = {
    ("Set-up: two commands", 0): "the install is the test command's (run by .ci/run); the job, "
                                 "`sharded-ams train launcher/configs/gpt_tiny.toml`, is the "
                                 "launcher block's first line: test_readme_launcher_commands",
    ("Set-up: two commands", 1): "excluded: it is the test command; .ci/run runs it verbatim "
                                 "(test_ci_runs_the_readme_test_command)",
    ("The launcher: `sharded-ams train`", 0): "test_readme_launcher_commands",
    ("The launcher: `sharded-ams train`", 1): "not run: needs a Ray cluster with GPUs and a "
                                              "shared file system; its config passes the driver's "
                                              "checks: test_readme_cluster_line_is_a_valid_config",
    ("Pre-train an LLM", 0): "tests/test_llm_e2e.py::test_readme_pretrain_an_llm",
    ("Tests", 0): "excluded: a subset of the test command that .ci/run runs; the marker it "
                  "selects on is declared: test_the_fast_part_of_the_suite_is_selectable",
    ("Plan a run: `sharded-ams plan`", 0): "tests/test_plan.py::test_readme_plan_block",
    ("Checkpoints", 0): "excluded: an fsdp run of llama_tiny takes minutes; its path (the "
                        "launcher with parallel.strategy=fsdp, DCP checkpoints) runs in "
                        "tests/test_faults.py::test_e_fsdp_sigkill_a_worker_then_lose_a_node "
                        "and the convert line's in tests/test_dcp_convert.py::"
                        "test_convert_zero1_to_dcp_and_back_is_bitwise",
    ("Does Grams help?", 0): "excluded: the full CPU study takes ~25-60 min and the paper "
                             "preset needs GPUs and C4; the smoke line's path runs in "
                             "tests/test_optimizer_study.py::test_smoke_study_killed_and_resumed "
                             "(two of the four optimizers)",
}


def bash_blocks(doc: Path = README, lang: str = "bash") -> dict[tuple[str, int], str]:
    """Every ```bash (or ```lang) block of the README (or another Markdown file), keyed by
    (section heading, index in section)."""
    out: dict[tuple[str, int], str] = {}
    for section in re.split(r"\n## ", doc.read_text())[1:]:
        heading = section.split("\n", 1)[0].strip()
        for i, block in enumerate(re.findall(rf"```{lang}\n(.*?)```", section, re.S)):
            out[(heading, i)] = block
    return out


def test_every_bash_block_is_run_or_excluded():
    assert set(bash_blocks()) == set(BASH_BLOCKS)


def test_the_fast_part_of_the_suite_is_selectable():
    """The README's `-m "not slow"` selects on a marker pytest knows (an unknown one would only
    warn, and select everything)."""
    assert bash_blocks()[("Tests", 0)].strip() == 'python -m pytest -q -m "not slow"'
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_ci_runs_the_readme_test_command():
    test_cmd = bash_blocks()[("Set-up: two commands", 1)].strip()
    assert test_cmd.splitlines()[-1] in (ROOT / ".ci/run").read_text().splitlines()


def test_the_main_job_is_the_launcher_blocks_first_line():
    setup = bash_blocks()[("Set-up: two commands", 0)].strip()
    job = setup.rsplit("&&", 1)[1].strip()
    first = bash_blocks()[("The launcher: `sharded-ams train`", 0)].splitlines()[0]
    assert job == first.split("#")[0].strip() == "sharded-ams train launcher/configs/gpt_tiny.toml"


def test_readme_python_snippets_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    script = "\n".join(blocks) + "\nimport torch.distributed as dist\ndist.destroy_process_group()\n"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0",
           "WORLD_SIZE": "1", "SHARDED_AMS_NO_COMPILE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "99"  # the checkpoint saved at the last step
    assert (tmp_path / "ckpts").is_dir()


def local_nfs(line: str, tmp_path: Path) -> str:
    """A GPU cluster line with its /nfs/runs and /nfs/data/c4 pointed into tmp_path, where a
    small prepared corpus is made (once)."""
    from launcher.data.prepare import prepare_data

    assert "/nfs/runs" in line and "/nfs/data/c4" in line
    if not (tmp_path / "c4").is_dir():
        (tmp_path / "txt").mkdir()
        (tmp_path / "txt" / "a.txt").write_text(README.read_text() * 20)  # > the 60m's sequences
        prepare_data([str(tmp_path / "txt")], tmp_path / "c4", progress=False, log=lambda *_: None)
    return line.replace("/nfs/runs", str(tmp_path / "runs")).replace("/nfs/data/c4", str(tmp_path / "c4"))


def dry_run_cluster_line(line: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A GPU cluster line (:func:`local_nfs`) run with ``--dry-run`` in a shell: every
    driver-side check, no Ray."""
    cmd = local_nfs(line, tmp_path)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", cmd + " --dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_readme_cluster_line_is_a_valid_config(tmp_path):
    """The cluster line cannot run here (no cluster, no GPUs), but a user must not meet a
    config error on it: ``--dry-run`` with its /nfs paths pointed into tmp_path passes every
    driver-side check (batch split, data, storage)."""
    line = bash_blocks()[("The launcher: `sharded-ams train`", 1)].strip()
    proc = dry_run_cluster_line(line, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"size": "60m"' in proc.stdout and '"use_gpu": true' in proc.stdout


# Prepended to every `sharded-ams train` line (the line's own flags come after and win):
# the config's step-valued keys scaled down 10x, and a smaller corpus.
SHORT = ("--steps 20 --set job.checkpoint_every=5 --set job.log_every=5 --set job.eval_every=10 "
         "--set optim.warmup_steps=2 --set data.max_bytes=200000")


def scaled(line: str) -> str:
    """A README launcher line at a tenth of its steps: SHORT after the config, and every
    ``--steps N`` / ``--fail-at-step K`` divided by 10."""
    cmd = line.split("#")[0].strip()
    if cmd.startswith("sharded-ams train "):
        head, rest = cmd.split(".toml", 1)
        rest = re.sub(r"(--steps|--fail-at-step) (\d+)", lambda m: f"{m[1]} {int(m[2]) // 10}", rest)
        cmd = f"{head}.toml {SHORT}{rest}"
    return cmd


def test_scaled():
    assert scaled("sharded-ams train c.toml --steps 300 --fail-at-step 120  # x") == \
        f"sharded-ams train c.toml {SHORT} --steps 30 --fail-at-step 12"
    assert scaled("sharded-ams ckpt inspect runs/x  # y") == "sharded-ams ckpt inspect runs/x"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_launcher_commands(tmp_path):
    """The launcher block, line by line, in a fresh directory: train 2 workers, rerun on 1
    (resumes and reshards), a run whose rank 1 dies once, an elastic run, a dry run, then
    inspect and consolidate the first run. One line at a time: the suite keeps both cores
    busy (CI: ~1.75 of 2 on average), so running the independent lines side by side
    (tried: this test 170 -> 147 s) cannot shorten the suite, only move CPU between the
    two xdist workers; the suite read 926 s with it, 891 and 916 s without, all within
    this machine's noise."""
    lines = [ln for ln in bash_blocks()[("The launcher: `sharded-ams train`", 0)].splitlines() if ln.strip()]
    (tmp_path / "launcher").symlink_to(ROOT / "launcher")  # the README runs from the repo root
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("SHARDED_AMS_NO_COMPILE", None)  # the compile backend, as a user gets it
    outs = []
    for line in lines:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", scaled(line)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        outs.append(proc.stdout + proc.stderr)
        (tmp_path / f"line{len(outs)}.log").write_text(outs[-1])
        assert proc.returncode == 0, f"{scaled(line)}\n{outs[-1][-5000:]}"
    first, rerun, fault, elastic, dry, inspect, consolidate = outs

    def final_loss(out: str) -> str:
        return re.search(r"train loss +(\S+)", out)[1]

    assert "backend compiled" in first and "8 x 1 micro-batch(es) x 2 worker(s)" in first, first[-3000:]
    assert re.search(r"step 20/20 \| loss \d", first), first[-3000:]
    assert "resuming run 'gpt-tiny' from its checkpoint at step 20" in rerun, rerun[-3000:]
    assert "steps 1-20 on 2 workers, 21-30 on 1 worker" in rerun, rerun[-3000:]
    assert "lr schedule: cosine over 20 steps (the schedule the run started with" in rerun, rerun[-3000:]
    # rank 1 exits in step 12; the restart line dates the failure by the last heartbeat,
    # written after each step at most every 0.25 s: step 10 (the checkpoint's forced beat)
    # when steps are fast, step 11 when a loaded machine makes a step take longer than that
    assert "rank 1 exits" in fault and re.search(r"restarted on 2 workers after step 1[01]: "
                                                 r"resumed from step 10", fault), fault[-3000:]
    assert "1 to 2 CPU workers (elastic" in elastic, elastic[-3000:]
    # the same seed, data and steps: a rank killed and resumed, and an elastic group that
    # stayed at 2, end where the first run did at step 20
    assert final_loss(fault) == final_loss(elastic) == final_loss(first)
    assert '"preset": "adamw"' in dry and '"lr": 0.001' in dry, dry[-3000:]
    assert "status:     valid" in inspect and "step:       30" in inspect, inspect
    import torch

    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert full["step"] == 30 and "wrote full.pt from runs/gpt-tiny/step-00000030: step 30" in consolidate
    assert {k: v.shape for k, v in full["model"].items()}["lm_head.weight"] == (256, 64)
