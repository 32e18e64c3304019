"""The ``[parallel]`` table: how the model and its optimizer state are split over the
workers (``strategy``: ZeRO-1 or FSDP2; ``tp``: tensor-parallel degree), and the checks of
what composes with what, run on the driver before Ray starts (no torch here).

The ``tp`` ranks of one model replica see the same data, so the data-parallel size is
``workers / tp``: the global batch must split over that at every worker count the job may
run on, and every such count must be a multiple of ``tp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.config_checks import check_choice, check_int, fail
from launcher.run.scaling import accumulation_steps, worker_range
from launcher.train.parallel.tp import tp_refusals

__all__ = ["ParallelConfig", "STRATEGIES", "GRAD_SYNCS", "check_parallel", "data_parallel_sizes",
           "held_grads_note"]

#: held accumulation gradients worth a note at launch (per worker)
HELD_NOTE_BYTES = 256 << 20

STRATEGIES = ("zero1", "fsdp")
GRAD_SYNCS = ("step", "micro_batch")


@dataclass
class ParallelConfig:
    """How the model, gradients and optimizer state are split over the workers
    (docs/parallelism.md, "The launcher")."""

    strategy: str = "zero1"
    """"zero1": every worker holds the whole model and gradients, ShardedAMS splits the
    optimizer state (2 + 4 + 12/N bytes per param in bf16); "fsdp": torch FSDP2
    fully_shard on each transformer block and the root (params, gradients and state all
    split: (2 + 4 + 12)/N bytes per param), AMS stepping the local shards, checkpoints in
    torch.distributed.checkpoint (DCP) format."""
    tp: int = 1
    """Tensor-parallel degree: the built-in llama's q/k/v and gate/up projections split by
    output columns, o and down by input rows, the embedding by vocabulary rows and the head
    by output columns over tp workers, with sequence parallelism (torchtitan's plan); the
    rest of the workers (workers / tp) form the data-parallel dimension of a 2-D mesh,
    over which "zero1" shards the optimizer state of each tp shard again (Megatron's
    layout) or "fsdp" shards everything. Checkpoints are then in DCP format (either
    strategy resumes them, on any mesh). Needs model.tie_weights = false; tp must divide model.n_head,
    model.n_kv_head, model.intermediate_size, data.block_size and every worker count."""

    grad_sync: str = "step"
    """When "fsdp" reduce-scatters gradients under accumulation (data.micro_batch_size below
    a rank's share of the batch): "step": once, in the last micro-batch's backward (less
    traffic; every rank holds the whole model's unsharded gradients, in the reduce dtype,
    from the first micro-batch to the last); "micro_batch": after every micro-batch (the
    gradients stay sharded, as torchtitan does; the reduce-scatter traffic times the
    micro-batches). ``sharded-ams plan`` shows both. "zero1" always reduces once per step
    (its whole gradient buffer is there anyway)."""

    def __post_init__(self) -> None:
        s = "parallel"
        check_choice(s, "strategy", self.strategy, STRATEGIES)
        check_int(s, "tp", self.tp, 1)
        check_choice(s, "grad_sync", self.grad_sync, GRAD_SYNCS)
        if self.grad_sync != "step" and self.strategy != "fsdp":
            fail(s, "grad_sync", f"is for strategy 'fsdp' (strategy {self.strategy!r} reduces "
                 "once per step into the gradient buffer it holds whole)", self.grad_sync)


def data_parallel_sizes(num_workers: Any, tp: int) -> list[int]:
    """The data-parallel size at every worker count ``num_workers`` allows."""
    lo, hi = worker_range(num_workers)
    return [w // tp for w in range(lo, hi + 1)]


def check_parallel(par: ParallelConfig, model: Any, data: Any, job: Any) -> None:
    """What ``[parallel]`` needs of the other sections; ValueError naming what does not
    compose. ``model``/``data``/``job``: the ModelConfig, DataConfig and JobConfig."""
    tp = par.tp
    if tp == 1:
        return
    if model.factory is not None or model.arch != "llama":
        what = f"model.factory {model.factory!r}" if model.factory else f"model.arch {model.arch!r}"
        fail("parallel", "tp", f"has a plan for the built-in llama only, not {what}", tp)
    problems = tp_refusals(model, tp, seq_len=data.block_size)  # tp.py's, as apply_tp checks
    if problems:
        raise ValueError(f"parallel.tp = {tp} does not fit the model: " + "; ".join(problems))
    lo, hi = worker_range(job.num_workers)
    bad = [w for w in range(lo, hi + 1) if w % tp]
    if bad:
        fail("parallel", "tp", f"must divide every worker count job.num_workers allows "
             f"({', '.join(map(str, bad))} do not)", tp)
    for dp in sorted(set(data_parallel_sizes(job.num_workers, tp))):
        try:
            accumulation_steps(data.batch_size, dp, data.micro_batch_size)
        except ValueError as exc:
            raise ValueError(f"with parallel.tp = {tp}, {dp * tp} workers are {dp} data-parallel "
                             f"replicas: {exc}") from None


def held_grads_note(par: ParallelConfig, model: Any, data: Any, optim: Any, job: Any,
                    num_params: int) -> Optional[str]:
    """A note for an ``fsdp`` run that accumulates with ``grad_sync = "step"``: what every
    worker holds between micro-batches (the tp-local model's unsharded gradients in the
    reduce dtype, as ``sharded-ams plan`` counts them), when that is HELD_NOTE_BYTES or more."""
    if par.strategy != "fsdp" or par.grad_sync != "step":
        return None
    accum = max(accumulation_steps(data.batch_size, dp, data.micro_batch_size)
                for dp in data_parallel_sizes(job.num_workers, par.tp))
    two = model.precision == "bf16" and optim.grad_reduce_dtype == "bf16"
    held = (2 if two else 4) * num_params // par.tp
    if accum == 1 or held < HELD_NOTE_BYTES:
        return None
    return (f"parallel.grad_sync = 'step' with {accum} micro-batches: every worker holds the "
            f"model's unsharded gradients between them ({held / (1 << 30):.1f} GiB in "
            f"{'bf16' if two else 'fp32'}); parallel.grad_sync = 'micro_batch' keeps them sharded, "
            "for more reduce traffic (sharded-ams plan weighs both)")
