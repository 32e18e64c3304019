"""How a worker splits its model over the workers (``[parallel]``, docs/parallelism.md):

* ``zero1``: every rank holds the whole model; :class:`sharded_ams.ShardedAMS` splits the
  optimizer state over the world (nothing here but the layout);
* ``fsdp``: torch FSDP2 ``fully_shard`` on each transformer block (``transformer_blocks()``)
  and then the root, each resharded after its forward; params, gradients and optimizer
  state all split over the data-parallel ranks, and :class:`launcher.train.fsdp_optim.FSDPAMS`
  steps the local shards;
* ``tp > 1``: a 2-D mesh ``(dp, tp)``, tp-major inside each replica (the ``tp`` ranks of
  one replica are consecutive, on one node as torchtitan lays them out); the built-in
  Llama split by :func:`launcher.train.parallel.tp.apply_tp` (torchtitan's plan, with
  sequence parallelism), then FSDP2 over ``dp`` (``fsdp``) or ShardedAMS over ``dp``
  (``zero1``: each rank's tp shard sharded again over dp, Megatron's layout).

The ``tp`` ranks of one replica train on the same rows: the data is split over
``dp_size`` replicas, not over the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from launcher.train.parallel.tp import apply_tp

__all__ = ["Layout", "make_layout", "parallelize", "mixed_precision"]


@dataclass
class Layout:
    """Where this rank sits: the strategy, its data-parallel rank and size, the mesh."""

    strategy: str
    tp: int
    dp_rank: int
    dp_size: int
    mesh: Any = None  # a DeviceMesh ("dp",) or ("dp", "tp"); None for zero1 without tp

    @property
    def dp_group(self) -> Optional[Any]:
        """The process group over which data-parallel values are averaged (None: the world)."""
        return None if self.tp == 1 or self.mesh is None else self.mesh["dp"].get_group()

    def describe(self) -> str:
        tp = f" x tp {self.tp}" if self.tp > 1 else ""
        if self.strategy == "zero1":
            return "zero1" + (f" over {self.dp_size} replica(s){tp}" if tp else "")
        return f"fsdp over {self.dp_size} replica(s)" + tp


def make_layout(strategy: str, tp: int, rank: int, world_size: int,
                device: torch.device) -> Layout:
    """The layout of ``[parallel]`` on this world; ValueError when it does not fit it."""
    if world_size % tp:
        raise ValueError(f"parallel.tp ({tp}) must divide the number of workers ({world_size})")
    if strategy == "zero1" and tp == 1:
        return Layout(strategy, 1, rank, world_size)
    if not dist.is_initialized():
        raise RuntimeError(f"parallel.strategy = {strategy!r} with tp = {tp} needs "
                           "torch.distributed initialised (Ray Train does it for every "
                           "worker group)")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world_size // tp
    if tp == 1:
        mesh = init_device_mesh(device.type, (dp,), mesh_dim_names=("dp",))
    else:
        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(strategy, tp, mesh.get_local_rank("dp"), dp, mesh)


def mixed_precision(precision: str, grad_reduce_dtype: str):
    """FSDP2's MixedPrecisionPolicy for ``model.precision``: for "bf16" the sharded params
    stay fp32 (they are the masters, as torchtitan keeps them) and are gathered and computed
    in bf16; gradients are reduced in fp32 (``optim.grad_reduce_dtype`` "bf16": in bf16)
    and kept in fp32 shards. None for fp32 and bf16-autocast (autocast does the casting):
    fp32 params always reduce in fp32, whatever ``grad_reduce_dtype`` says (docs/config.md;
    as ShardedAMS, which applies it to 16-bit params only)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return None
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.bfloat16 if grad_reduce_dtype == "bf16" else torch.float32)


def parallelize(model: nn.Module, layout: Layout, precision: str,
                grad_reduce_dtype: str = "fp32") -> nn.Module:
    """``model`` (built the same on every rank) split as ``layout`` says, in place: the
    tp plan first, then for ``fsdp`` ``fully_shard`` on each transformer block and the
    root over the ``dp`` mesh (a model without ``transformer_blocks()``: the root only)."""
    if layout.tp > 1:  # torchtitan's plan, with sequence parallelism (tp.py)
        apply_tp(model, layout.mesh["tp"])
    if layout.strategy != "fsdp":
        return model
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision, grad_reduce_dtype)
    kw = {"mesh": layout.mesh["dp"], "reshard_after_forward": True}
    if policy is not None:
        kw["mp_policy"] = policy
    get = getattr(model, "transformer_blocks", None)
    for block in (get() if callable(get) else ()):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model
