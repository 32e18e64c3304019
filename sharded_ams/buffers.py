"""Contiguous param and grad buffers; the model's params (and, in direct mode, grads) are views.

Two ways a gradient reaches the grad buffer, chosen per dtype:

* **direct** (grad dtype == param dtype): ``p.grad`` is a view into ``grad``, so backward
  accumulates straight into the buffer that is reduced (as DDP's ``gradient_as_bucket_view``).
* **main grad** (e.g. bf16 params reduced in fp32, Megatron's ``grad_reduce_in_fp32``):
  autograd needs ``p.grad`` in p's dtype, so each accumulated ``p.grad`` is added into the
  fp32 buffer by :meth:`collect` (called from the post-accumulate-grad hook) and freed,
  as Megatron's ``main_grad``. The first gradient after a step (or ``zero_grad``) is
  copied rather than added, so the buffer never needs a separate zeroing pass.

DTensor params (tensor parallel, ``model_parallel.py``) take the main-grad way whatever
their dtype: the buffer holds the param's local shard (its local tensor becomes a view),
and the DTensor gradient autograd leaves is laid out as the param and copied in.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .dtensor import grad_as_param, is_dtensor, local
from .layout import BufferLayout, ParamSlot


def offset_free(view: Tensor) -> Tensor:
    """``view``'s memory as a tensor at storage offset 0 of a storage of its own (a slice
    of the buffer's storage: the same memory, which it keeps alive). A DTensor param's
    local tensor is made so: torch.compile's fake-tensor conversion (torch 2.13) fails on a
    tensor subclass whose inner tensor sits at a non-zero storage offset ("Attempted to
    set the storage of a tensor on device cpu to a storage on different device meta"),
    which made ``model.compile`` of a ShardedAMS model with tensor parallelism crash."""
    es = view.element_size()
    start = view.storage_offset() * es
    try:
        storage = view.untyped_storage()[start:start + view.numel() * es]
    except (RuntimeError, NotImplementedError):  # a device without storage slices: as is
        return view
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        storage, 0, view.shape, view.stride())


class FlatParamGradBuffer:
    """One dtype's flat param buffer and grad buffer (Megatron's ``param_and_grad_buffer``).

    Params are relocated into ``param`` (their values kept). Anything that replaces
    ``p.grad`` (``set_to_none``, a user assignment) is folded in by :meth:`collect`
    before the reduction, so results never depend on it.
    """

    def __init__(self, layout: BufferLayout, params: Sequence[Tensor], dtype: torch.dtype,
                 device: torch.device, grad_dtype: Optional[torch.dtype] = None):
        self.layout, self.params, self.dtype = layout, list(params), dtype
        self.grad_dtype = grad_dtype or dtype
        self.main_grad = self.grad_dtype != dtype
        self.param = torch.zeros(layout.numel, dtype=dtype, device=device)
        self.grad = torch.zeros(layout.numel, dtype=self.grad_dtype, device=device)
        # each param's view into ``grad``, made once (the buffer is never reallocated)
        self.grad_views = [self.grad_view(slot) for slot in layout.slots]
        # main-grad mode: True while a param's view holds no gradient of the current step
        self.fresh = [True] * len(self.params)
        # copied in (never a view): main grads, and DTensor params (tensor parallel: the
        # buffer holds the local shard; autograd's gradient is a DTensor, maybe laid out
        # unlike the param, see dtensor.grad_as_param)
        self.copy_in = [self.main_grad or is_dtensor(p) for p in self.params]
        for i, (slot, p) in enumerate(zip(layout.slots, self.params)):
            view = self.param_view(slot)
            view.copy_(local(p).detach().reshape(slot.shape))
            # a DTensor keeps its wrapper; its local tensor moves (at offset 0 of a storage
            # of its own over the buffer's memory: see offset_free)
            local(p).data = offset_free(view) if is_dtensor(p) else view
            if not self.copy_in[i]:
                self.collect(i)

    def param_view(self, slot: ParamSlot) -> Tensor:
        return self.param[slot.start:slot.end].view(slot.shape)

    def grad_view(self, slot: ParamSlot) -> Tensor:
        return self.grad[slot.start:slot.end].view(slot.shape)

    def collect(self, i: int) -> None:
        """Make param ``i``'s current gradient part of the buffer (None counts as zero).

        Direct: ``p.grad`` becomes the buffer view again (a replaced grad is copied in).
        Main grad (and DTensor params): ``p.grad`` is added into the buffer (copied if it
        is the first of the step) and set to None."""
        p, view = self.params[i], self.grad_views[i]
        g = p.grad
        if g is view:  # direct mode, backward accumulated into the buffer: nothing to do
            return
        if self.copy_in[i]:
            if g is not None:
                if is_dtensor(p):
                    g = grad_as_param(p, g, f"the parameter of shape {tuple(p.shape)}")
                if self.fresh[i]:
                    view.copy_(g)
                else:
                    view.add_(g)
                p.grad = None
            elif self.fresh[i]:
                view.zero_()
            self.fresh[i] = False
            return
        if g is None:
            view.zero_()
        elif g.data_ptr() != view.data_ptr() or g.shape != view.shape:
            view.copy_(g)
        p.grad = view

    def zero_grad(self) -> None:
        """Direct: zero the buffer and make every ``p.grad`` its view again (backward then
        accumulates in place). Main grad: mark every param fresh (no pass over memory; the
        next gradient overwrites) and drop any ``p.grad``."""
        if self.main_grad:
            self.consumed()
            return
        self.grad.zero_()
        for p, view, copied in zip(self.params, self.grad_views, self.copy_in):
            p.grad = None if copied else view
        self.fresh = [True] * len(self.params)

    def holds_grad(self, i: int) -> bool:
        """Param ``i``'s ``p.grad`` is its view into the buffer (direct mode, untouched)."""
        return self.params[i].grad is self.grad_views[i]

    def consumed(self) -> None:
        """The step has used the gradients: ``p.grad`` is None and the next ones start
        afresh, in both modes (docs/sharding.md, "p.grad after step()"). Direct mode cannot
        leave the views readable: after a reduce-scatter the buffer holds the average only
        on this rank's shard. No pass over memory: the next backward's gradient is copied
        in by :meth:`collect`, or :meth:`zero_grad` makes the views the grads again."""
        self.fresh = [True] * len(self.params)
        for p in self.params:
            p.grad = None
