"""Measured bytes for tests/test_plan.py: real ShardedAMS (zero1) and FSDP2 + AMS (fsdp) runs
of the launcher's Llamas on CPU gloo ranks, counted from the tensors they allocate, and the
activation bytes autograd keeps for backward, counted with saved-tensor hooks."""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 4093  # free (the data's); small keeps 130m cheap; odd: FSDP2's dim-0 chunks come out uneven
SEQ, BATCH = 16, 2
#: (model.precision, optim.grad_reduce_dtype) whose held accumulation gradients are measured
HELD_CASES = (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))


def build(size: str, dtype: torch.dtype = torch.float32, vocab: int = VOCAB,
          seq: int = SEQ, init: bool = True) -> nn.Module:
    """The launcher's Llama of ``size``; ``init=False``: built on meta and given memory
    without initialising it (a normal_ over 100M elements costs seconds on these cores,
    and only the bytes are measured)."""
    from launcher.plan.model import _shape_of
    from launcher.train.models.llama import Llama, LlamaConfig, rope_tables

    _, shape = _shape_of(size, vocab)
    shape["block_size"] = seq
    torch.manual_seed(0)
    if init:
        return Llama(LlamaConfig(**shape)).to(dtype)
    with torch.device("meta"):
        model = Llama(LlamaConfig(**shape)).to(dtype)
    model = model.to_empty(device="cpu")
    cfg = model.cfg
    if cfg.tie_weights:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rope_cos, model.model.rope_sin = rope_tables(cfg.head_dim, seq, cfg.rope_theta)
    return model


def _zero1(size: str, dtype: torch.dtype) -> dict:
    """ShardedAMS allocates its buffers and every state tensor at construction: count them."""
    from sharded_ams import ShardedAMS

    model = build(size, dtype, init=False)
    opt = ShardedAMS(model, preset="grams", backend="eager", broadcast_params=False)
    out = {"params": sum(sh.buf.param.numel() * sh.buf.param.element_size() for sh in opt.shards),
           "grads": sum(sh.buf.grad.numel() * sh.buf.grad.element_size() for sh in opt.shards),
           "optimizer": opt.state_bytes(), "bucket_numel": opt.bucket_numel}
    opt.close()
    return out


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _fsdp(size: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    from sharded_ams import AMS

    model = build(size, torch.float32, init=False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = AMS(model.parameters(), foreach=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the sharded gradient backward leaves (a DTensor)
        # the state AMS.step() creates first; its DTensor arithmetic after that costs ~15 s
        # of sharding propagation on these cores and allocates nothing persistent
        opt._init_state(p, opt.param_groups[0]["beta3"])
    state = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    return {"params": sum(_local_bytes(p) for p in model.parameters()),
            "grads": sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(_local_bytes(t) for t in state)}


def _unsharded_grad_bytes(model: nn.Module) -> int:
    """Bytes of the unsharded gradients FSDP2 holds between backward passes with gradient
    sync off (its accumulation buffers, in the reduce dtype, or the unsharded params'
    grads). FSDP2's internals (torch 2.11-2.13): there is no public API for it, and CPU has
    no allocator statistics to read the peak from."""
    held = 0
    for mod in model.modules():
        state = getattr(mod, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        for fp in (group.fsdp_params if group is not None else ()):
            acc = getattr(fp, "unsharded_accumulated_grad", None)
            if acc is not None:
                held += acc.numel() * acc.element_size()
            up = getattr(fp, "_unsharded_param", None)
            if up is not None and up.grad is not None:
                held += up.grad.numel() * up.grad.element_size()
    return held


def _fsdp_held(size: str, precision: str, grad_reduce: str, grad_sync: str) -> int:
    """The launcher's fsdp model and optimizer (``parallelize``, ``FSDPAMS``): the bytes of
    unsharded gradients held after the first of two accumulation micro-batches."""
    import torch.distributed as dist

    from launcher.train.fsdp_optim import FSDPAMS
    from launcher.train.parallel.layout import make_layout, parallelize
    from launcher.train.step import loss_of

    model = build(size, torch.float32)
    layout = make_layout("fsdp", 1, dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    model = parallelize(model, layout, precision, grad_reduce)
    opt = FSDPAMS(model, preset="grams", sync_every_micro_batch=grad_sync == "micro_batch")
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with opt.no_sync():  # the first micro-batch, as launcher.train.step.forward_backward runs it
        loss_of(model(x, x), x).backward()
    return _unsharded_grad_bytes(model)


def measure_rank(sizes: tuple[str, ...]) -> dict:
    """On each rank: bytes of params, grads and optimizer state of each (size, strategy,
    precision): zero1 in bf16 (separate fp32 masters, fp32 grad buffer) for every size and
    in fp32 for the first; fsdp in fp32 (FSDP2's sharded params are the masters)."""
    torch.set_num_threads(1)
    out = {}
    for size in sizes:
        if size == sizes[0]:  # fp32 params are their own masters: one model shows it
            out[(size, "zero1", "fp32")] = _zero1(size, torch.float32)
        out[(size, "zero1", "bf16")] = _zero1(size, torch.bfloat16)
        out[(size, "fsdp", "fp32")] = _fsdp(size)
    for precision, reduce in HELD_CASES:  # accumulation's held gradients: the smallest model
        for sync in ("step", "micro_batch"):
            out[(sizes[0], "fsdp-held", precision, reduce, sync)] = _fsdp_held(
                sizes[0], precision, reduce, sync)
    return out


def saved_activation_bytes(model: nn.Module, batch: int, seq: int, vocab: int) -> int:
    """See :func:`saved_storages`: their bytes."""
    return sum(saved_storages(model, batch, seq, vocab).values())


def saved_storages(model: nn.Module, batch: int, seq: int, vocab: int) -> dict[int, int]:
    """Bytes autograd holds for backward after one forward: every tensor the graph saves,
    through ``saved_tensors_hooks``, counted once per storage (views of one tensor and a
    tensor saved by several ops are one allocation) and without the parameters' storages.
    That is the activation memory at the start of backward, the peak of the activations
    (CPU has no allocator statistics to read it from). Returns {storage: bytes}."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return seen
