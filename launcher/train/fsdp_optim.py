"""The optimizer of an FSDP2 (and tensor-parallel) model in the launcher: the project's
:class:`sharded_ams.AMS` on the DTensor params, plus what ShardedAMS does around its step
and the training loop relies on: clipping by the global gradient norm, skipping a step
whose gradients are not finite (on every rank together), ``no_sync`` for accumulation,
``last_step`` and ``skipped_steps``.

The global norm is over the whole logical gradients whatever the mesh: each rank sums the
squares of its local shards, weighting each tensor by 1 / (the number of ranks that hold
the same shard: the ranks outside its mesh and along its Replicate dimensions), and one
all-reduce over the world adds them (a tensor-parallel norm weight held whole by every tp
rank counts once, not tp times).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sharded_ams import AMS
from sharded_ams.backward_count import HOST_READ_FREE
from sharded_ams.config import preset_hparams
from sharded_ams.dtensor import is_dtensor, local
from sharded_ams.shard_step import StepInfo

__all__ = ["FSDPAMS", "replicas", "global_grad_norm"]


def replicas(p: Tensor, world_size: int) -> int:
    """How many ranks hold the same shard of ``p`` (a plain tensor: every rank)."""
    if not is_dtensor(p):
        return world_size
    split = 1
    for dim, pl in enumerate(p.placements):
        if pl.is_shard() or type(pl).__name__ == "_StridedShard":
            split *= p.device_mesh.size(dim)
    return world_size // split


def global_grad_norm(params: list[Tensor], world_size: int, device: torch.device) -> Tensor:
    """The 2-norm of the whole gradients of ``params`` (fp32 per-shard norms as
    ``clip_grad_norm_``, squared and summed in float64, one all-reduce); on the device."""
    by_weight: dict[int, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_weight.setdefault(replicas(p, world_size), []).append(local(p.grad))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for n, grads in by_weight.items():
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        total += norms.double().square().sum() / n
    if world_size > 1:
        dist.all_reduce(total)
    return total.sqrt()


class FSDPAMS(AMS):
    """AMS on an FSDP2 / tensor-parallel model, with ShardedAMS's clipping and skipping.

    Args:
        model: the ``fully_shard``-ed model (its trainable params are optimized, by name).
        preset, lr, betas, beta3, lam, eps, weight_decay: as :class:`sharded_ams.ShardedAMS`.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        skip_nonfinite: skip the step on every rank when the norm is not finite (read on
            the host: one device sync per step, unlike ShardedAMS's device-side skip).
        backend: "auto" (AMS's default path) or a fused kernel backend name.
        sync_every_micro_batch: ``no_sync()`` leaves FSDP2's gradient sync on, so each
            micro-batch's gradients are reduce-scattered and stay sharded
            (``parallel.grad_sync = "micro_batch"``); else (default) they are reduced once,
            in the last micro-batch, and held unsharded until then.
        count_in_backward (in ``hparams``): as :class:`sharded_ams.AMS` (default None:
            on CUDA, C-Adam's counts taken in FSDP2's post-reduce-scatter hooks; kept on a
            step whose clip coefficient is exactly 1).
    """

    def __init__(self, model: nn.Module, *, preset: Optional[str] = None,
                 beta3: Optional[float] = None, lam: Optional[float] = None,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = True,
                 backend: str = "auto", sync_every_micro_batch: bool = False,
                 **hparams: Any):
        fixed = preset_hparams(preset) if preset else {}
        if fixed and (beta3 is not None or lam is not None):
            raise ValueError(f"preset={preset!r} fixes beta3 and lam; do not pass them too")
        kw = {k: v for k, v in (("beta3", beta3), ("lam", lam)) if v is not None}
        kw.update(fixed)
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__(named, **hparams, **kw, fused=None if backend == "auto" else backend)
        self.model, self.max_grad_norm, self.skip_nonfinite = model, max_grad_norm, skip_nonfinite
        self.sync_every_micro_batch = sync_every_micro_batch
        self.backend = "fsdp/" + backend
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.last_step = StepInfo()
        self._skipped = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (FSDP2's gradient sync off), unless
        ``sync_every_micro_batch``: then each micro-batch is reduced, as outside it."""
        if self.sync_every_micro_batch:
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def finish_param_sync(self) -> None:
        """Nothing to wait for: FSDP2 gathers params inside each forward."""

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):  # type: ignore[override]
        """Clip by the global norm (inside the step: ``p.grad`` keeps the unclipped
        gradient), skip if it is not finite, then the AMS step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        device = local(params[0]).device if params else torch.device("cpu")
        norm = skip = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm = global_grad_norm(params, self.world_size, device)
            if self.skip_nonfinite:
                skip = ~torch.isfinite(norm)
        self.last_step = StepInfo(norm, skip)
        if skip is not None and bool(skip):  # the host sync: every rank read the same norm
            self._skipped += 1
            return loss
        coef = None
        if self.max_grad_norm is not None:
            coef = self._clip_coef(norm, synced=skip is not None)
        self._step_scaled(coef)
        return loss

    def _clip_coef(self, norm: Tensor, synced: bool) -> Optional[Tensor]:
        """min(1, max_grad_norm / norm) as a 0-d fp32 device tensor, which the step's
        kernels multiply each gradient by as they load it (the gradients are not scaled in
        place: no pass over them). None where it is exactly 1 and the host may read that
        for free (CPU, or after the skip test's sync): then the counts backward took of
        the gradients (``count_in_backward``) still hold."""
        coef = self.max_grad_norm / (norm + 1e-6)
        coef = torch.where(coef < 1.0, coef, torch.ones_like(coef)).float()
        if (synced or coef.device.type in HOST_READ_FREE) and bool(coef == 1.0):
            return None
        return coef
