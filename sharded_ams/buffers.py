"""Contiguous param and grad buffers; the model's params and grads become views into them."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .layout import BufferLayout, ParamSlot


class FlatParamGradBuffer:
    """One dtype's flat param buffer and grad buffer (Megatron's ``param_and_grad_buffer``).

    Params are relocated into ``param`` (their values kept) and grads are views into
    ``grad``, so backward accumulates straight into the buffer that is reduced.
    Anything that replaces ``p.grad`` (``set_to_none``, a user assignment) is folded
    back in by :meth:`attach_grads` before the reduction, so results never depend on it.
    """

    def __init__(self, layout: BufferLayout, params: Sequence[Tensor], dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.params, self.dtype = layout, list(params), dtype
        self.param = torch.zeros(layout.numel, dtype=dtype, device=device)
        self.grad = torch.zeros(layout.numel, dtype=dtype, device=device)
        for slot, p in zip(layout.slots, self.params):
            view = self.param_view(slot)
            view.copy_(p.detach().reshape(slot.shape))
            p.data = view
            self.attach_grad(slot, p)

    def param_view(self, slot: ParamSlot) -> Tensor:
        return self.param[slot.start:slot.end].view(slot.shape)

    def grad_view(self, slot: ParamSlot) -> Tensor:
        return self.grad[slot.start:slot.end].view(slot.shape)

    def attach_grad(self, slot: ParamSlot, p: Tensor) -> None:
        view = self.grad_view(slot)
        g = p.grad
        if g is None:
            view.zero_()
        elif g.data_ptr() != view.data_ptr() or g.shape != view.shape:
            view.copy_(g)
        p.grad = view

    def attach_grads(self) -> None:
        """Make every param's grad the buffer view again (None counts as zero)."""
        for slot, p in zip(self.layout.slots, self.params):
            self.attach_grad(slot, p)

    def zero_grad(self) -> None:
        self.grad.zero_()
        self.attach_grads()
