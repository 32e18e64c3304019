"""Bytes per GPU, item by item, for the two strategies the project runs.

**zero1** (``sharded_ams.ShardedAMS``): the full param buffer and the full grad buffer on
every GPU (params are views of the flat param buffer; grads of bf16 params are kept in an
fp32 buffer unless ``grad_reduce_dtype`` is bf16), and 1/N of the optimizer state: fp32
masters (bf16 params only), m, v, and s when beta3 > 0, each in ``state_dtype``. The
sizes come from the layout ``ShardedAMS`` itself builds (:class:`sharded_ams.layout.BufferLayout`,
padding and buckets included), so they are exact, not ``P / N``.

**fsdp** (``torch.distributed.fsdp.fully_shard`` per decoder layer and at the root, with
``sharded_ams.AMS``): each param is cut into dim-0 chunks of ceil(rows / N) rows, so rank r
holds its own rows of params (fp32: FSDP2 keeps the sharded params in the dtype they were
built in and casts to bf16 for compute, so they are the masters), grads (same dtype) and
m, v[, s]. Transient: the gathered bf16 params of the root and two layers (the one running
and the one prefetched) and one layer's unsharded grads before their reduce-scatter. Under
accumulation with ``parallel.grad_sync = "step"`` (the launcher's default), FSDP2's gradient
sync is off for all but the last micro-batch, and every rank holds the whole (tp-local)
model's unsharded gradients in the reduce dtype from the first micro-batch's backward to the
last: ``held_grads`` (``"micro_batch"``: none).

**activations**: what autograd keeps for backward in this project's Llama
(``launcher/train/models/llama.py``), counted tensor by tensor (docs/plan.md derives it;
``tests/test_plan.py`` compares it with the bytes the saved-tensor hooks see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .model import ModelSpec, tp_local_shape


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a precision mode keeps."""

    name: str
    param: int      # the model's params (zero1's param buffer, FSDP's compute copy)
    grad: int       # zero1's grad buffer (the reduction dtype)
    act: int        # activations
    master: bool    # a separate fp32 master copy in the optimizer (zero1, bf16 params)


def precision(name: str, grad_reduce: str = "fp32") -> Precision:
    """``model.precision`` of the launcher: bf16 (bf16 params, fp32 masters), fp32, or
    bf16-autocast (fp32 params, bf16 activations)."""
    if name == "bf16":
        return Precision(name, 2, 4 if grad_reduce == "fp32" else 2, 2, True)
    if name == "fp32":
        return Precision(name, 4, 4, 4, False)
    if name == "bf16-autocast":
        return Precision(name, 4, 4, 2, False)
    raise ValueError(f"unknown --precision {name!r}; known: bf16, fp32, bf16-autocast")


def local_params(spec: ModelSpec, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tp_local_shape(n, s, tp)) for n, s in spec.params]


def zero1_layout(spec: ModelSpec, dp: int, tp: int, bucket_numel: Optional[int]):
    """The layout ShardedAMS(model) builds: params in backward order, one group."""
    from sharded_ams.layout import BufferLayout

    fill = [(n, s, 0) for n, s in reversed(local_params(spec, tp))]
    return BufferLayout.build(fill, dp, bucket_numel)


def zero1_memory(spec: ModelSpec, dp: int, tp: int, prec: Precision, *, state_bytes: int = 4,
                 with_s: bool = False, bucket_numel: Optional[int] = None, layout=None) -> dict:
    """Bytes on every rank of a ZeRO-1 run (the same on all ranks: equal shards)."""
    layout = layout or zero1_layout(spec, dp, tp, bucket_numel)
    shard = layout.shard_numel
    state = {"master": 4 * shard if prec.master else 0, "exp_avg": state_bytes * shard,
             "exp_avg_sq": state_bytes * shard, "exp_avg_s": state_bytes * shard if with_s else 0}
    return {"params": prec.param * layout.numel, "grads": prec.grad * layout.numel,
            "optimizer": sum(state.values()), "optimizer_items": state, "transient": 0,
            "held_grads": 0}


def fsdp_rows(rows: int, dp: int, rank: int) -> int:
    """Rows of a dim-0 chunked tensor rank ``rank`` holds (torch.chunk, as FSDP2 shards)."""
    c = -(-rows // dp)
    return max(0, min(c, rows - rank * c))


def fsdp_local_numel(spec: ModelSpec, dp: int, tp: int, rank: int = 0) -> int:
    return sum(fsdp_rows(s[0], dp, rank) * math.prod(s[1:]) for _, s in local_params(spec, tp))


def fsdp_memory(spec: ModelSpec, dp: int, tp: int, prec: Precision, *, rank: int = 0,
                state_bytes: int = 4, with_s: bool = False, held_grads: bool = False) -> dict:
    """Bytes on rank ``rank`` of an FSDP2 run (rank 0 holds the most: chunks are
    front-loaded). Sharded params and grads are fp32 (the masters); m, v[, s] as asked;
    ``held_grads``: the unsharded gradients accumulation holds with gradient sync off (FSDP2
    keeps them in its reduce dtype, ``prec.grad``)."""
    numel = fsdp_local_numel(spec, dp, tp, rank)
    state = {"master": 0, "exp_avg": state_bytes * numel, "exp_avg_sq": state_bytes * numel,
             "exp_avg_s": state_bytes * numel if with_s else 0}
    compute = 2 if prec.act == 2 else 4
    block, root = spec.block_params() / tp, spec.root_params() / tp
    gathered = compute * (root + 2 * block) + 4 * block
    held = prec.grad * sum(math.prod(sh) for _, sh in local_params(spec, tp)) if held_grads else 0
    return {"params": 4 * numel, "grads": 4 * numel, "optimizer": sum(state.values()),
            "optimizer_items": state, "transient": int(gathered) if dp > 1 else 0,
            "held_grads": held}


def layer_activation_bytes(spec: ModelSpec, act: int, tp: int = 1) -> float:
    """Bytes per token one decoder layer keeps for backward (no checkpointing):

    * each RMSNorm: the fp32 copy of its input (4 d; in fp32 the input itself), the
      normalised value cast back (act d) and the weighted output (act d);
    * attention: q and k after rotation, v, all at full head count (GQA's repeated k, v
      are what scaled_dot_product_attention keeps), the attention output (4 act d), and the
      softmax log-sum-exp (4 bytes per head);
    * SwiGLU: gate, silu(gate), up, and their product (4 act f); the rsqrt per norm.
    Tensor parallelism splits all of it: heads and feed-forward by tp, the norms and the
    residual stream by sequence (sequence parallelism, Megatron's and torchtitan's default
    with TP)."""
    s = spec.shape
    d, f, heads = s["n_embd"], s["intermediate_size"], s["n_head"]
    norms = 2 * (4 * d + 2 * act * d + 4)
    return (norms + 4 * act * d + 4 * heads + 4 * act * f) / tp


def head_activation_bytes(spec: ModelSpec, act: int, tp: int = 1) -> float:
    """Per token outside the layers: the final norm and the fp32 log-softmax of the logits
    (the loss is computed in fp32), split by tp (sequence parallel norm, vocabulary-parallel
    loss)."""
    d, v = spec.shape["n_embd"], spec.shape["vocab_size"]
    return (4 * d + 2 * act * d + 4 + 4 * v) / tp


def activation_memory(spec: ModelSpec, tokens: int, act: int, *, checkpointing: bool,
                      tp: int = 1) -> dict:
    """Activation bytes of one micro-batch of ``tokens`` tokens per GPU.

    ``saved``: what autograd holds at the end of the forward (with checkpointing: each
    layer's input only, plus one layer recomputed in backward). ``transient``: the loss
    head's backward (gradients of the fp32 log-softmax: 8 bytes per vocabulary entry per
    token, split by tp) on top of it. ``total`` = saved + transient."""
    n_layer, d = spec.shape["n_layer"], spec.shape["n_embd"]
    layer = layer_activation_bytes(spec, act, tp)
    head = head_activation_bytes(spec, act, tp)
    if checkpointing:
        saved = tokens * (n_layer * act * d / tp + layer + head)
    else:
        saved = tokens * (n_layer * layer + head)
    transient = tokens * 8 * spec.shape["vocab_size"] / tp
    return {"saved": int(saved), "transient": int(transient), "total": int(saved + transient)}
