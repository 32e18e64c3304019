"""Tensor parallelism for the built-in Llama: torchtitan's plan (``parallelize_llama``'s
``apply_tp``), on a 1-D ``tp`` mesh.

Per decoder layer, Megatron's split: q, k, v and gate, up are column-parallel (each rank
holds n_head / tp query heads, n_kv_head / tp key/value heads and intermediate / tp
feed-forward rows), o and down are row-parallel (one all-reduce, or with sequence
parallelism one reduce-scatter, after each). The embedding is row-parallel over the
vocabulary and lm_head column-parallel over it with a replicated (gathered) output, so
the loss is the ordinary one. With ``sequence_parallel`` (torchtitan's default) the
residual stream between the parallel regions is split by sequence and the RMSNorms run
on their slice (``SequenceParallel``: their weights become replicated DTensors);
without it the norms stay plain tensors, replicated by construction.

After :func:`apply_tp` every ``Linear``/``Embedding`` weight is a DTensor sharded on the
``tp`` mesh; an optimizer steps each rank's local shard (``sharded_ams.ShardedAMS`` on
the data-parallel group of a 2-D mesh, or ``AMS`` under FSDP2), see docs/parallelism.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch at import: the config checks call tp_refusals on the driver
    from torch import nn

__all__ = ["apply_tp", "tp_refusals"]


def tp_refusals(cfg: Any, tp: int, seq_len: int | None = None,
                sequence_parallel: bool = True) -> list[str]:
    """Why a Llama of config ``cfg`` cannot run at tensor-parallel degree ``tp`` (empty:
    it can). Heads are never split, so tp must divide n_head and n_kv_head; the
    feed-forward width must divide too (even shards); with sequence parallelism the
    sequence length must divide by tp. Tied embeddings are refused (the embedding is
    row-parallel, lm_head column-parallel: one tensor cannot be both)."""
    if tp < 1:
        return [f"tp must be >= 1, got {tp}"]
    out = []
    for name in ("n_head", "n_kv_head", "intermediate_size"):
        value = getattr(cfg, name)
        if value % tp:
            out.append(f"tp = {tp} does not divide model.{name} = {value}")
    if getattr(cfg, "tie_weights", False) and tp > 1:
        out.append("tp > 1 needs untied embeddings (the embedding is split by vocabulary "
                   "rows for lookup, lm_head by vocabulary columns), and this model ties "
                   "them: set model.tie_weights = false")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        out.append(f"tp = {tp} does not divide the sequence length {seq_len} "
                   "(sequence parallelism splits it)")
    return out


def apply_tp(model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool = True) -> nn.Module:
    """Parallelize the built-in ``Llama`` in place over ``tp_mesh`` (a 1-D DeviceMesh) and
    return it. Raises ValueError, naming each problem, when :func:`tp_refusals` finds any
    or the model is not the built-in Llama (its module names are the plan's keys)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    from launcher.train.models.llama import Llama

    if not isinstance(model, Llama):
        raise ValueError(f"tensor parallelism has a plan for the built-in Llama only, not "
                         f"{type(model).__name__}")
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D tp mesh, got {tp_mesh.ndim} dimensions")
    problems = tp_refusals(model.cfg, tp_mesh.size(), sequence_parallel=sequence_parallel)
    if problems:
        raise ValueError("; ".join(problems))
    sp = sequence_parallel
    # residual stream between parallel regions: split by sequence (dim 1) or replicated
    stream = Shard(1) if sp else Replicate()
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "lm_head": ColwiseParallel(input_layouts=stream, output_layouts=Replicate()),
        **({"model.norm": SequenceParallel()} if sp else {}),
    })
    for layer in model.model.layers:
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=stream),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        if sp:
            plan.update({
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                # (x, cos, sin): gather x's sequence before q/k/v; the rotary tables pass
                "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                          desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(layer, tp_mesh, plan)
    return model
