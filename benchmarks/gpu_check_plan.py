"""The plan of one GPU check run: sizes, time caps and process groups for the real run on
CUDA and for the CPU dry run (CI). Its own module so the sections, the correctness section
and the driver share it without importing each other."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

#: every section, in the order the check runs them: the kernel and bandwidth numbers first,
#: then what can hang in a collective (NCCL), then ``pytest -m gpu`` (issue 21)
ALL_SECTIONS = ("env", "static", "correctness", "bandwidth", "step", "sharded", "training",
                "overlap", "fsdp", "pytest")
#: sections that launch the Triton kernel (under the interpreter in the dry run)
KERNEL_SECTIONS = ("correctness", "bandwidth", "step", "sharded", "training", "overlap",
                   "fsdp")

#: each section's time cap in seconds on one H100/H200 (what it needs, with room to spare;
#: the whole check's ``--time-limit`` trims the later ones). A section that runs past its
#: cap is stopped: cooperatively where it checks the time (correctness skips cases), else
#: its process is killed with its stack recorded.
CUDA_CAPS = {"env": 20, "static": 45, "correctness": 75, "bandwidth": 90, "step": 45,
             "sharded": 40, "training": 60, "overlap": 40, "fsdp": 30, "pytest": 120}
#: the dry run's caps: 2 shared cores, the kernel interpreted; only a hang should reach them
CPU_CAPS = {name: 240 for name in ALL_SECTIONS}
#: sections that share one child process (one start-up); a group is killed as a whole when
#: it overruns, after every section it finished has been written. On CUDA every section
#: that can hang in a collective has a process to itself; ``pytest`` runs in its own
#: subprocess from the driver.
CUDA_GROUPS = (("env", "static", "correctness", "bandwidth", "step"), ("sharded",),
               ("training",), ("overlap",), ("fsdp",))
#: the dry run: the static section cannot run under the interpreter; the rest share one
#: child to keep CI's time down (the kill path is tested with an injected hang)
CPU_GROUPS = (("env", "static"),
              ("correctness", "bandwidth", "step", "sharded", "training", "overlap", "fsdp"))
#: the default ``--time-limit`` on CUDA: the check and one rerun fit a 15-minute device
#: lease with the machine's start-up (docs: benchmarks/RESULTS.md "GPU")
CUDA_TIME_LIMIT_S = 330.0
#: the ``step`` section's rows (``benchmarks/bench_step.py``): on CUDA what a user runs
#: and its torch peers (no torch.compile'd row: a cold compile costs the lease seconds);
#: in the dry run the same kernels by name (on CPU the default would be the compiled pass)
CUDA_STEP_ROWS = ("adamw_foreach", "adamw_fused", "adamw_fused_norm", "adamw_fused_clip",
                  "ams_default", "cadam_default", "flat_compiled", "sharded_ams",
                  "sharded_ams_no_check", "sharded_ams_clip", "grad_norm_pass", "grad_sum")
CPU_STEP_ROWS = ("adamw_foreach", "adamw_fused", "ams_triton", "cadam_triton")
CPU_TIME_LIMIT_S = 900.0


@dataclass
class Plan:
    """Sizes and settings of one run of the check (CUDA: the real one; CPU: the dry run)."""

    device: torch.device
    backend: str
    dist_backend: str
    correctness_n: int
    correctness_steps: int
    bandwidth_sizes: tuple
    graph_sizes: tuple
    multi_piece_scale: float
    model: str
    train_steps: int
    train_warmup: int
    sharded_steps: int
    quick: bool
    deadline: float = field(default=0.0)
    overlap_steps: int = 1
    overlap_rounds: int = 1
    #: the ``step`` section: ``bench_step.py``'s rows on its GPT-like set (scale, layers)
    step_rows: tuple = ()
    step_scale: float = 1.0
    step_layers: int = 4
    step_repeats: int = 10

    def time_left(self) -> float:
        return self.deadline - time.time()

    def describe(self) -> dict:
        d = asdict(self)
        d["device"] = str(self.device)
        return d


def make_plan(device: str, model: str, budget_s: float) -> Plan:
    now = time.time()
    if device == "cuda":
        return Plan(torch.device("cuda"), "triton", "nccl", 50_000_000, 100,
                    (2 ** 20, 50_000_017, 2 ** 26, 2 ** 28, 2 ** 30), (2 ** 20, 2 ** 24), 1.0,
                    model, 50, 10, 20, False, now + budget_s, overlap_steps=5,
                    overlap_rounds=2, step_rows=CUDA_STEP_ROWS, step_repeats=20)
    return Plan(torch.device("cpu"), "triton", "gloo", 3000, 5, (2048, 2051), (2 ** 12,),
                0.0003, model, 3, 1, 2, True, now + budget_s, step_rows=CPU_STEP_ROWS,
                step_scale=0.0005, step_layers=1, step_repeats=2)


def caps(device: str) -> dict[str, float]:
    return dict(CUDA_CAPS if device == "cuda" else CPU_CAPS)


def groups(device: str, names) -> list[tuple[str, ...]]:
    """The child-process groups of ``names`` (in check order); ``pytest`` is not in any."""
    table = CUDA_GROUPS if device == "cuda" else CPU_GROUPS
    out = [tuple(n for n in grp if n in names) for grp in table]
    return [g for g in out if g]
