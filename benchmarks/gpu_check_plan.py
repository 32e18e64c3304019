"""The plan of one GPU check run: sizes and settings for the real run on CUDA and for the
CPU dry run (CI). Its own module so the sections and the correctness section share it
without importing each other."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


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
                    overlap_rounds=2)
    return Plan(torch.device("cpu"), "triton", "gloo", 3000, 5, (2048, 2051), (2 ** 12,),
                0.0003, model, 3, 1, 2, True, now + budget_s)
