"""The plan itself: every candidate (strategy x tensor-parallel size x activation
checkpointing) evaluated, the verdict per strategy, the fitting ones ranked by tokens/s
per GPU, each with the command or config that runs it. ``build_plan`` returns plain data
(the ``--json`` output); ``render.py`` prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import hardware, memory, timing
from .model import ModelSpec, check_tp

STRATEGIES = ("zero1", "fsdp")
#: default MFU: torchtitan reports 33-39% for FSDP Llama 3.1 8B on H100 without Float8
#: (benchmarks/llama3_h100_202412_torchtitan.md); the plan takes the low end
DEFAULT_MFU = 0.35


@dataclass
class PlanInputs:
    """The command line, checked."""

    gpus: int
    gpus_per_node: int = 8
    gpu: str = "h100-80gb"
    seq: int = 8192
    global_batch_tokens: int = 4 * 1024 * 1024
    micro_batch: int = 1
    strategies: tuple[str, ...] = STRATEGIES
    tp: Optional[int] = None
    precision: str = "bf16"
    grad_reduce: str = "fp32"
    state_dtype: str = "fp32"
    beta3: float = 0.0
    checkpointing: Optional[bool] = None   # None: try without, then with
    mfu: float = DEFAULT_MFU               # utilisation of the peak, the FLOPs the GPU does
    link_efficiency: float = 0.8
    token_budget: Optional[float] = None   # None: 20 tokens per parameter (Chinchilla)
    bucket_numel: Optional[int] = None     # None: ShardedAMS's NCCL default
    extra: dict = field(default_factory=dict)


def geometry(inp: PlanInputs, tp: int, checkpointing: bool) -> timing.Geometry:
    """Batch arithmetic; ValueError (one line) when the batch does not divide."""
    if inp.gpus % tp:
        raise ValueError(f"--tp {tp} does not divide --gpus {inp.gpus}")
    if tp > inp.gpus_per_node:
        raise ValueError(f"--tp {tp} spans nodes (--gpus-per-node {inp.gpus_per_node}); "
                         "tensor parallelism needs NVLink")
    dp = inp.gpus // tp
    if inp.global_batch_tokens % inp.seq:
        raise ValueError(f"--global-batch-tokens {inp.global_batch_tokens} is not a multiple "
                         f"of --seq {inp.seq}")
    seqs = inp.global_batch_tokens // inp.seq
    unit = dp * inp.micro_batch
    if seqs % unit:
        near = sorted({max(unit, seqs // unit * unit), -(-seqs // unit) * unit})
        raise ValueError(f"the global batch of {seqs} sequences does not split into "
                         f"{dp} data-parallel ranks x micro-batches of {inp.micro_batch} "
                         f"(--global-batch-tokens {' or '.join(f'{n * inp.seq:_}' for n in near)}"
                         " would)")
    per_rank = seqs // dp
    return timing.Geometry(inp.gpus, tp, inp.gpus_per_node, per_rank * inp.seq,
                           inp.micro_batch * inp.seq, per_rank // inp.micro_batch, checkpointing)


def _bucket_numel(inp: PlanInputs, dp: int) -> Optional[int]:
    """``--bucket-numel``, else ShardedAMS's default on NCCL for ``dp`` ranks (it grows with
    the world size; one bucket at dp = 1)."""
    if inp.bucket_numel is not None:
        return inp.bucket_numel
    from sharded_ams.layout import default_bucket_numel

    return default_bucket_numel("nccl", dp)


def evaluate(spec: ModelSpec, inp: PlanInputs, strategy: str, tp: int, ac: bool,
             layouts: dict, grad_sync: str = "step") -> dict:
    """All the numbers of one candidate (``grad_sync``: fsdp's ``parallel.grad_sync``)."""
    card = hardware.gpu(inp.gpu)
    geo = geometry(inp, tp, ac)
    prec = memory.precision(inp.precision, inp.grad_reduce)
    sb = 2 if inp.state_dtype == "bf16" else 4
    if strategy == "zero1":
        key = (geo.dp, tp)
        if key not in layouts:
            layouts[key] = memory.zero1_layout(spec, geo.dp, tp, _bucket_numel(inp, geo.dp))
        layout = layouts[key]
        mem = memory.zero1_memory(spec, geo.dp, tp, prec, state_bytes=sb, with_s=inp.beta3 > 0,
                                  layout=layout)
        buckets, opt_numel = len(layout.buckets), layout.shard_numel
    else:
        mem = memory.fsdp_memory(spec, geo.dp, tp, prec, state_bytes=sb, with_s=inp.beta3 > 0,
                                 held_grads=grad_sync == "step" and geo.accum > 1)
        buckets, opt_numel = spec.shape["n_layer"] + 1, mem["params"] // 4
    acts = {c: memory.activation_memory(spec, geo.micro_tokens, prec.act, checkpointing=c, tp=tp)
            for c in (False, True)}
    act = acts[ac]
    total = (mem["params"] + mem["grads"] + mem["held_grads"] + mem["optimizer"]
             + mem["transient"] + act["total"])
    usable = card.memory_bytes * (1 - hardware.HEADROOM)
    comp = timing.compute_seconds(spec, geo, card, inp.mfu)
    comm = timing.comm_plan(strategy, spec, geo, card, mem, prec, buckets=buckets,
                            efficiency=inp.link_efficiency, grad_sync=grad_sync)
    times = timing.step_time(strategy, geo, comp, comm, opt_numel, card, grad_sync)
    tps = geo.tokens_per_gpu / tp / times["step_time_s"]
    budget = inp.token_budget or 20.0 * spec.num_params
    model_mfu = spec.flops_per_token * tps / card.bf16_flops
    return {
        "strategy": strategy, "tp": tp, "dp": geo.dp, "activation_checkpointing": ac,
        "micro_batch": inp.micro_batch, "accumulation_steps": geo.accum, "grad_sync": grad_sync,
        "memory": {"params": mem["params"], "grads": mem["grads"],
                   "held_grads": mem["held_grads"], "optimizer": mem["optimizer"],
                   **{f"optimizer.{k}": v for k, v in mem["optimizer_items"].items()},
                   "gathered_transient": mem["transient"], "activations": act["total"],
                   "activations_saved": act["saved"],
                   "activations_without_checkpointing": acts[False]["total"],
                   "activations_with_checkpointing": acts[True]["total"],
                   "total": int(total), "usable": int(usable), "card": card.memory_bytes},
        "fits": total <= usable,
        "comm_bytes": {"dp": comm["dp"]["bytes"], "tp": comm["tp"]["bytes"],
                       "total": sum(comm["dp"]["bytes"].values()) + sum(comm["tp"]["bytes"].values())},
        "comm_seconds": {"dp_link": comm["dp"]["link"], "dp": comm["dp"]["seconds"],
                         "dp_at_nvlink": comm["dp"]["seconds_nvlink"],
                         "dp_at_network": comm["dp"]["seconds_network"], "tp": comm["tp"]["seconds"]},
        **times,
        "buckets": buckets,
        "tokens_per_s_per_gpu": tps, "model_mfu": model_mfu,
        "token_budget": budget, "time_to_train_s": budget / (tps * inp.gpus),
    }


def _tp_options(spec: ModelSpec, inp: PlanInputs) -> list[int]:
    if inp.tp is not None:
        check_tp(spec, inp.tp)
        geometry(inp, inp.tp, False)   # refuse a tp that cannot work, with its reason
        return [inp.tp]
    out = []
    for tp in (1, 2, 4, 8):
        try:
            check_tp(spec, tp)
            geometry(inp, tp, False)
        except ValueError:
            continue
        out.append(tp)
    return out


def _grad_syncs(inp: PlanInputs, strategy: str, tp: int) -> tuple[str, ...]:
    """fsdp's two ``parallel.grad_sync`` modes where they differ (accumulation), the
    launcher's default first; zero1 has one."""
    if strategy == "fsdp" and geometry(inp, tp, False).accum > 1:
        return ("step", "micro_batch")
    return ("step",)


def build_plan(spec: ModelSpec, inp: PlanInputs) -> dict:
    """Every candidate, the per-strategy verdict (at --tp, default 1) and the ranking."""
    from .command_lines import run_line

    hardware.gpu(inp.gpu)
    tps = _tp_options(spec, inp)
    if not tps:  # none works: say why tp = 1 does not
        check_tp(spec, 1)
        geometry(inp, 1, False)
        raise ValueError(f"no tensor-parallel size in 1, 2, 4, 8 fits the model, --gpus "
                         f"{inp.gpus} and the batch")
    acs = [inp.checkpointing] if inp.checkpointing is not None else [False, True]
    layouts: dict = {}
    cands = [evaluate(spec, inp, s, tp, ac, layouts, sync) for s in inp.strategies for tp in tps
             for ac in acs for sync in _grad_syncs(inp, s, tp)]
    for c in cands:
        c.update(run_line(spec, inp, c))
    strategies = {}
    base_tp = inp.tp or tps[0]
    for s in inp.strategies:
        mine = [c for c in cands if c["strategy"] == s and c["tp"] == base_tp]
        pick = next((c for c in mine if c["fits"]), mine[-1])
        needs = ([] if not pick["fits"] else
                 (["checkpointing"] if pick["activation_checkpointing"] and inp.checkpointing is None
                  else []) + (["grad sync per micro-batch"] if pick["grad_sync"] == "micro_batch" else []))
        verdict = "does not fit" if not pick["fits"] else " with ".join(["fits", " and ".join(needs)]) \
            if needs else "fits"
        strategies[s] = {**pick, "verdict": verdict}
    ranked = sorted((c for c in cands if c["fits"]),
                    key=lambda c: (-c["tokens_per_s_per_gpu"], c["memory"]["total"]))
    return {"model": {"name": spec.name, "params": spec.num_params,
                      "flops_per_token": spec.flops_per_token, "shape": spec.shape},
            "inputs": {k: v for k, v in vars(inp).items() if k != "extra"},
            "gpu": vars(hardware.gpu(inp.gpu)), "headroom": hardware.HEADROOM,
            "strategies": strategies, "ranked": ranked}
