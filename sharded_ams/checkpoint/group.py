"""Who we are in the optimizer's data-parallel group, and how ranks agree on a failure
(so that an error on one rank is raised on every rank and none is left in a collective)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from .format import CheckpointError


@dataclass
class Group:
    rank: int
    world_size: int
    group: Any
    active: bool

    @classmethod
    def of(cls, optimizer) -> "Group":
        mp = getattr(optimizer, "mp", None)
        if mp is not None and mp.active:  # every rank of the grid raises alike
            raise ValueError(
                "the native checkpoint format cannot hold a ShardedAMS with tensor-parallel "
                "params (its files are named by data-parallel rank, so the tp ranks would "
                "overwrite each other): save it in DCP format with "
                "sharded_ams.checkpoint.save_dcp(path, model, opt, step=...) and load it with "
                "load_dcp (any dp, tp or FSDP2 mesh), see docs/parallelism.md")
        comm = getattr(optimizer, "comm", None)
        if comm is not None:
            return cls(comm.rank, comm.world_size, comm.group, bool(comm.active))
        return cls(0, 1, None, False)

    def all_gather(self, obj: Any) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather0(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` on rank 0, None on the others: for what only the manifest
        writer needs (an all-gather would send N ranks' piece lists to every rank)."""
        if not self.active:
            return [obj]
        out: Optional[list] = [None] * self.world_size if self.rank == 0 else None
        dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out

    def broadcast0(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def agree(self, err: Optional[BaseException]) -> None:
        """Collective: raise the same CheckpointError on every rank if any rank failed
        (the lowest failing rank's error; this rank's own if it is that rank)."""
        info = None
        if err is not None:
            p = getattr(err, "path", None)
            info = (self.rank, getattr(err, "kind", "corrupt"), str(err),
                    str(p) if p is not None else None, getattr(err, "field", None))
        infos = [i for i in self.all_gather(info) if i is not None]
        if not infos:
            return
        rank, kind, msg, p, fld = infos[0]
        if rank == self.rank and isinstance(err, CheckpointError):
            raise err
        if rank != self.rank:
            msg = f"(reported by rank {rank}) {msg}"
        raise CheckpointError(msg, path=p, kind=kind, field=fld) from err
