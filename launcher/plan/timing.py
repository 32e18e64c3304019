"""Bytes each GPU sends per optimizer step, the time they take, how much of it the
project's overlap hides, and the resulting step time and tokens/s.

Overlap model (docs/sharding.md, "Overlap"; the same for FSDP2's prefetching): buckets are
reduced in order as backward completes them and gathered in order as the next forward
needs them, on a communication stream beside the compute. With ``n`` buckets of equal
size, compute time ``C`` and communication time ``T`` for one pass, the pipeline exposes
``max(T / n, T - C (1 - 1 / n))``: the last bucket's reduction (or the first bucket's
gather) can never hide, and communication longer than the compute it runs beside shows
through. ZeRO-1 reduces once per optimizer step, during the last micro-batch's backward
(``no_sync`` before it), and gathers once, during the first micro-batch's forward. FSDP2
gathers every layer in every micro-batch's forward and again in its backward
(``reshard_after_forward=True``), and reduce-scatters once per step, in the last
micro-batch's backward (``parallel.grad_sync = "step"``: gradient sync off before it, the
launcher's default), or every micro-batch's gradients (``"micro_batch"``, torchtitan's way).
Tensor-parallel all-reduces sit on the critical path: not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import GPU, ring_bytes

#: bytes the fused AMS step touches per local element: reads grad, master, m, v; writes
#: master, m, v (4 bytes each in fp32) and the bf16 param; plus the grad-norm pass (4)
STEP_BYTES_PER_ELEMENT = 34


def exposed(total_s: float, compute_s: float, n: int) -> float:
    """Communication not hidden behind ``compute_s`` when split in ``n`` pipelined parts."""
    if total_s <= 0:
        return 0.0
    n = max(n, 1)
    return max(total_s / n, total_s - compute_s * (1 - 1 / n))


@dataclass
class Geometry:
    """One candidate's arithmetic inputs."""

    gpus: int
    tp: int
    gpus_per_node: int
    tokens_per_gpu: int          # per optimizer step, per data-parallel rank
    micro_tokens: int            # one micro-batch
    accum: int                   # micro-batches per step
    checkpointing: bool

    @property
    def dp(self) -> int:
        return self.gpus // self.tp


def compute_seconds(spec, geo: Geometry, card: GPU, mfu: float) -> dict:
    """Forward and backward seconds per micro-batch and per step at ``mfu`` of the card's
    bf16 peak. The GPU does 6 N-equivalent FLOPs per token for forward + backward, 8 with
    activation checkpointing (the forward again); ``mfu`` is the utilisation of the FLOPs
    the GPU does, so with checkpointing the model-FLOPs utilisation shown is 3/4 of it."""
    flops = spec.flops_per_token * geo.micro_tokens / geo.tp
    fwd = flops / 3 / (card.bf16_flops * mfu)
    bwd = 2 * fwd + (fwd if geo.checkpointing else 0.0)
    return {"fwd_micro": fwd, "bwd_micro": bwd, "step": geo.accum * (fwd + bwd)}


def _link(card: GPU, group: int, within_node: bool) -> tuple[float, str]:
    if group <= 1:
        return card.nvlink_bps, "none"
    return (card.nvlink_bps, "nvlink") if within_node else (card.network_bps, "network")


def comm_plan(strategy: str, spec, geo: Geometry, card: GPU, mem: dict, prec, *,
              buckets: int, efficiency: float, grad_sync: str = "step") -> dict:
    """Bytes sent per GPU per step by mesh dimension and collective, and their seconds."""
    dp, tp = geo.dp, geo.tp
    dp_within = dp * tp <= geo.gpus_per_node   # the dp group of a GPU lives in one node
    dp_bw, dp_link = _link(card, dp, dp_within)
    tp_bw, _ = _link(card, tp, True)
    if strategy == "zero1":
        numel = mem["params"] // prec.param
        rs = ring_bytes(numel * prec.grad, dp)
        ag = ring_bytes(numel * prec.param, dp)
        dp_bytes = {"reduce_scatter": rs, "all_gather": ag, "all_reduce": 8.0 * 2}
    else:
        local = spec.num_params / tp
        compute = 2 if prec.act == 2 else 4
        reduces = geo.accum if grad_sync == "micro_batch" else 1
        rs = reduces * ring_bytes(local * prec.grad, dp)
        ag = geo.accum * 2 * ring_bytes(local * compute, dp)
        dp_bytes = {"reduce_scatter": rs, "all_gather": ag, "all_reduce": 8.0 * 2}
    act = prec.act * geo.micro_tokens * spec.shape["n_embd"]
    n_ar = (6 if geo.checkpointing else 4) * spec.shape["n_layer"] * geo.accum
    tp_bytes = {"all_reduce": n_ar * 2 * ring_bytes(act, tp)}
    eff = efficiency
    return {
        "dp": {"group": dp, "link": dp_link, "bytes": dp_bytes,
               "seconds_nvlink": sum(dp_bytes.values()) / (card.nvlink_bps * eff),
               "seconds_network": sum(dp_bytes.values()) / (card.network_bps * eff),
               "seconds": sum(dp_bytes.values()) / (dp_bw * eff),
               "rs_s": dp_bytes["reduce_scatter"] / (dp_bw * eff),
               "ag_s": dp_bytes["all_gather"] / (dp_bw * eff)},
        "tp": {"group": tp, "link": "nvlink" if tp > 1 else "none", "bytes": tp_bytes,
               "seconds": tp_bytes["all_reduce"] / (tp_bw * eff)},
        "buckets": buckets,
    }


def step_time(strategy: str, geo: Geometry, comp: dict, comm: dict, opt_numel: int,
              card: GPU, grad_sync: str = "step") -> dict:
    """Step seconds = compute + exposed communication + the optimizer step (HBM-bound)."""
    dp = comm["dp"]
    if strategy == "zero1":
        ex_rs = exposed(dp["rs_s"], comp["bwd_micro"], comm["buckets"])
        ex_ag = exposed(dp["ag_s"], comp["fwd_micro"], comm["buckets"])
    else:  # per micro-batch, one gather per layer in forward and in backward
        n, a = comm["buckets"], geo.accum
        ex_rs = (a * exposed(dp["rs_s"] / a, comp["bwd_micro"], n) if grad_sync == "micro_batch"
                 else exposed(dp["rs_s"], comp["bwd_micro"], n))
        ex_ag = a * (exposed(dp["ag_s"] / a / 2, comp["fwd_micro"], n)
                     + exposed(dp["ag_s"] / a / 2, comp["bwd_micro"], n))
    optim = opt_numel * STEP_BYTES_PER_ELEMENT / card.hbm_bps
    total = comp["step"] + ex_rs + ex_ag + comm["tp"]["seconds"] + optim
    return {"compute_s": comp["step"], "exposed_reduce_s": ex_rs, "exposed_gather_s": ex_ag,
            "tp_s": comm["tp"]["seconds"], "optimizer_s": optim, "step_time_s": total}
