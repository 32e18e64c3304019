"""``ShardedAMS`` inside the data-parallel group of a (dp, tp) grid: params that are split
(or copied) across model-parallel ranks outside that group.

Megatron-Core's layout: the distributed optimizer lives in the data-parallel group; tensor
parallelism sits outside it. Here a tensor-parallel param is a DTensor on a ``tp`` mesh
(``parallelize_module``); ShardedAMS puts its **local shard** in the flat buffer, so the
local shard is sharded again over dp. Everything elementwise needs nothing more. Three
things are about whole tensors and need the model-parallel (mp) ranks too:

* **grad norm** (clipping, the non-finite skip): each rank's sum of squares over its dp
  slice of the local tensors, summed over the whole dp x mp grid: one all-reduce over the
  world when the grid is the world (the usual case), else one over dp and one per mp mesh
  dimension. A param *replicated* over an mp dimension (a ``Replicate`` placement,
  or a plain tensor in a TP model, e.g. the RMSNorm weights without sequence parallelism)
  has a copy on every rank of that dimension: only the copy at coordinate 0 counts
  (Megatron's ``param_is_not_tensor_parallel_duplicate``); the other copies' squares are
  multiplied by 0, which keeps an inf or NaN (0 * inf = NaN), so a non-finite gradient on
  any rank still skips the step on every rank.
* **per-tensor counts** (lam not in {1, -1}): the same rule per tensor, with d the whole
  tensor's numel; all tensors' counts ride in one vector: one all-reduce per step.
* **error flags** (a rank's failed gradient check) ride with the norm, so every rank of
  the grid raises together.
* **initial copies** (``broadcast_params``): the data-parallel broadcast reaches only the
  ranks of one mp coordinate, so the copies of a replicated param are then broadcast over
  each mp dimension it is replicated over too (:meth:`ModelParallel.broadcast_replicated`):
  every rank starts from global rank 0's values. ``parallelize_module`` scatters its
  ``Shard`` params from tp rank 0, but it leaves plain params, and ``SequenceParallel``
  makes its ``Replicate`` params from each rank's own values (``from_local``), so ranks
  seeded differently held different copies, each tp rank trained its own.

Params are grouped into buffers by which mp dimensions they are replicated over (the same
on every rank), so "counts here" is one flag per buffer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Comm
from .dtensor import dtensor_layout, is_dtensor, local

#: mesh dimension name of the data-parallel dimension in ``ShardedAMS(device_mesh=...)``
DP_DIM = "dp"


def resolve_groups(process_group: Optional[Any], device_mesh: Optional[Any]
                   ) -> tuple[Optional[Any], Optional[Any]]:
    """(the data-parallel process group, the model-parallel sub-mesh or None) from
    ``ShardedAMS``'s ``process_group`` / ``device_mesh`` arguments (at most one given)."""
    if device_mesh is None:
        return process_group, None
    if process_group is not None:
        raise ValueError("pass process_group or device_mesh to ShardedAMS, not both")
    names = tuple(device_mesh.mesh_dim_names or ())
    if DP_DIM not in names:
        raise ValueError(f"ShardedAMS(device_mesh=...) needs a mesh dimension named "
                         f"{DP_DIM!r} (the data-parallel one), got names {names or None}")
    dp = device_mesh[DP_DIM] if device_mesh.ndim > 1 else device_mesh
    others = tuple(n for n in names if n != DP_DIM)
    mp = device_mesh[others] if len(others) > 1 else (device_mesh[others[0]] if others else None)
    return dp.get_group(), mp


def _ranks(mesh: Any) -> list[int]:
    return sorted(mesh.mesh.flatten().tolist())


class ModelParallel:
    """The model-parallel mesh of a ShardedAMS (None: plain data parallelism) and, per
    param, which of its dimensions the param is replicated over."""

    def __init__(self, mesh: Optional[Any], device: torch.device,
                 dp_group: Optional[Any] = None):
        self.mesh = mesh
        self.comms: list[Comm] = []
        self.coord: tuple[int, ...] = ()
        #: the dp x mp grid is the whole world (the usual init_device_mesh((dp, tp))):
        #: a sum over it is one all-reduce over the default group
        self.grid_is_world = False
        if mesh is not None:
            self.comms = [Comm(mesh.get_group(d), device) for d in range(mesh.ndim)]
            self.coord = tuple(mesh.get_coordinate())
            if dist.is_initialized():
                self.grid_is_world = (dist.get_world_size(dp_group) * mesh.size()
                                      == dist.get_world_size())

    @property
    def active(self) -> bool:
        """True when some mp dimension has more than one rank."""
        return any(c.active for c in self.comms)

    @classmethod
    def of(cls, params: Sequence[Tensor], names: dict, dp_group: Optional[Any],
           mp_mesh: Optional[Any], device: torch.device) -> "ModelParallel":
        """Check the DTensor params' layout against the data-parallel group and find the
        mp mesh: ``mp_mesh`` (from ``device_mesh``) or the DTensor params' own mesh.
        Raises ValueError naming the param for a layout ShardedAMS cannot step."""
        meshes = []
        for p in params:
            if is_dtensor(p):
                dtensor_layout(p, f"parameter {names[p]!r}")  # Partial etc.: a clear error
                meshes.append((names[p], p.device_mesh))
        if not meshes:
            return cls(mp_mesh, device, dp_group)
        name0, mesh = meshes[0]
        for name, m in meshes[1:]:
            if m is not mesh and (m.ndim != mesh.ndim or _ranks(m) != _ranks(mesh)
                                  or not torch.equal(m.mesh, mesh.mesh)):
                raise ValueError(f"ShardedAMS needs every DTensor param on one mesh: "
                                 f"{name0!r} is on {mesh}, {name!r} on {m}")
        if mp_mesh is not None and not torch.equal(mp_mesh.mesh, mesh.mesh):
            raise ValueError(f"the DTensor params' mesh {mesh} is not device_mesh's "
                             f"model-parallel part {mp_mesh}")
        if dist.is_initialized():
            me = dist.get_rank()
            dp_ranks = set(dist.get_process_group_ranks(dp_group) if dp_group is not None
                           else range(dist.get_world_size()))
            if set(_ranks(mesh)) & dp_ranks != {me}:
                raise ValueError(
                    f"parameter {name0!r} is a DTensor on {mesh}, which shares ranks with "
                    "ShardedAMS's data-parallel group: a param split over data-parallel "
                    "ranks is FSDP's layout (step it with AMS on fully_shard params, "
                    "docs/parallelism.md); ShardedAMS takes tensor-parallel params on a "
                    "mesh outside its group (e.g. device_mesh with dims ('dp', 'tp'))")
        return cls(mesh, device, dp_group)

    def replicated_dims(self, p: Tensor) -> tuple[int, ...]:
        """The mp dimensions ``p`` has a full copy on (a plain param: all of them)."""
        if self.mesh is None:
            return ()
        if not is_dtensor(p):
            return tuple(range(self.mesh.ndim))
        return tuple(d for d, pl in enumerate(p.placements) if pl.is_replicate())

    def counted(self, replicated: Sequence[int]) -> bool:
        """Whether this rank's copy of a param replicated over ``replicated`` counts in
        the norm and the per-tensor counts (coordinate 0 on each of those dims)."""
        return all(self.coord[d] == 0 for d in replicated)

    @staticmethod
    def local_shape(p: Tensor) -> tuple[int, ...]:
        return tuple(local(p).shape)

    def reduce(self, t: Tensor, dp_reduce: Callable[[Tensor], None]) -> None:
        """Sum ``t`` over the whole dp x mp grid, in place, waited: one all-reduce when
        the grid is the world, else ``dp_reduce`` (the sum over dp) and then one
        all-reduce per mp dimension. Without mp: ``dp_reduce`` alone."""
        if self.active and self.grid_is_world:
            dist.all_reduce(t)
            return
        dp_reduce(t)
        for c in self.comms:
            c.all_reduce(t).wait()

    def broadcast_replicated(self, buffers: Sequence[Tensor],
                             replicated: Sequence[Sequence[int]]) -> None:
        """Each flat param buffer broadcast from coordinate 0 of every mp dimension its
        params are replicated over (``replicated``, per buffer), waited: one dimension at a
        time, after the dp broadcast (one memory must not be in two broadcasts at once)."""
        for d in range(len(self.comms)):
            handles = [self.comms[d].broadcast(buf)
                       for buf, dims in zip(buffers, replicated) if d in dims]
            for h in handles:
                h.wait()

    def check_same(self, what: str, items: list[str], device: torch.device) -> None:
        """Every rank of each mp dimension has the same ``items`` (the count vector's
        slots must line up across tp ranks), else a ValueError on every rank."""
        for c in self.comms:
            c.check_same(what, items, device)

    def describe(self) -> Optional[dict]:
        """What a checkpoint records: the mp mesh's dim names, sizes and this rank's
        coordinate (None without one)."""
        if self.mesh is None:
            return None
        return {"dim_names": list(self.mesh.mesh_dim_names or ()),
                "shape": list(self.mesh.mesh.shape), "coordinate": list(self.coord)}

    def select(self, sds: list[dict]) -> list[dict]:
        """Of every rank's ShardedAMS state dicts, those saved at this rank's mp
        coordinate: state is kept per tensor-parallel shard, and the pieces of other tp
        ranks have the same names and offsets but other elements. A checkpoint of another
        mp layout (or of none, or into none) is refused: resharding across tp is not
        supported (any data-parallel size is)."""
        mine = self.describe()
        want = None if mine is None else {k: v for k, v in mine.items() if k != "coordinate"}
        for sd in sds:
            got = sd.get("model_parallel")
            got = None if got is None else {k: v for k, v in got.items() if k != "coordinate"}
            if got != want:
                raise ValueError(
                    f"Checkpoint was saved with model parallelism {got or 'none'}, this "
                    f"optimizer runs with {want or 'none'}: ShardedAMS state is kept per "
                    "tensor-parallel shard, so it loads only on the same model-parallel mesh "
                    "(any data-parallel size); resharding across tp is not supported")
        if mine is None:
            return sds
        here = [sd for sd in sds if sd["model_parallel"]["coordinate"] == mine["coordinate"]]
        if not here:
            raise ValueError(f"Checkpoint has no state for model-parallel coordinate "
                             f"{mine['coordinate']} (pass every rank's state dict)")
        return here
