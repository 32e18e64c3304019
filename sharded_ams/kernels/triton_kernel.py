"""The AMS step as one Triton kernel over a flat range.

One launch reads p, g, m, v[, s] once and writes p, m, v[, s] (and the model-dtype
copy of p) once. lr and the bias corrections are read from device memory, so no
host sync is needed and the step can be captured in a CUDA graph. ``MODE`` selects
the full step, or the two passes of the per-tensor-scaled case (lam not in {1, -1}).
1 - beta is computed on the host in float64 (1 - fp32(0.999) in fp32 would be off by
1e-5 relative). Runs on CPU tensors under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

MODE_FUSED, MODE_COUNT, MODE_APPLY = 0, 1, 2
BLOCK = 1024


@triton.jit
def _ams_kernel(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, neg_ptr, lr_ptr, bc_ptr, skip_ptr,
                n, beta1, beta2, beta3, omb1, omb2, omb3, lam, tie, eps, wd,
                HAS_S: tl.constexpr, HAS_OUT: tl.constexpr, MODE: tl.constexpr,
                HAS_SKIP: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    if HAS_SKIP:  # a skipped step (decided on the device) loads and stores nothing
        skip = tl.full([BLOCK_SIZE], 0, tl.int32) + tl.load(skip_ptr).to(tl.int32)
        mask = mask & (skip == 0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_S:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE != 2:
        m = m * beta1 + g * omb1
        v = v * beta2 + g * g * omb2
        if HAS_S:
            s = s * beta3 + g * omb3
    bc1 = tl.load(bc_ptr)
    bc2 = tl.load(bc_ptr + 1)
    u = tl.math.div_rn(tl.math.div_rn(m, bc1), tl.math.sqrt_rn(tl.math.div_rn(v, bc2)) + eps)
    if HAS_S:
        prod = u * s
    else:
        prod = u * g
    if MODE != 2:
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        if HAS_S:
            tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:
        neg = tl.sum(((prod < 0.0) & mask).to(tl.int32), axis=0)
        tl.atomic_add(neg_ptr, neg.to(tl.int64))
    else:
        w = tl.where(prod > 0.0, 1.0, tl.where(prod < 0.0, lam, tie))
        lr = tl.load(lr_ptr)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        p = p * (1.0 - lr * wd) - lr * (w * u)
        tl.store(p_ptr + offs, p, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(mode: int, p: Optional[Tensor], g: Tensor, m: Tensor, v: Tensor,
            s: Optional[Tensor], out: Optional[Tensor], neg: Optional[Tensor],
            lr: Optional[Tensor], bc1: Tensor, bc2: Tensor, beta1: float, beta2: float,
            beta3: float, lam: float, eps: float, wd: float, skip: Optional[Tensor] = None) -> None:
    n = g.numel()
    if n == 0:
        return
    bc = torch.stack([bc1.float().reshape(()), bc2.float().reshape(())])
    lr = lr.float().reshape(()) if lr is not None else bc  # unused in MODE_COUNT
    grid = (triton.cdiv(n, BLOCK),)
    _ams_kernel[grid](p if p is not None else m, g, m, v, s if s is not None else m,
                      out if out is not None else m, neg if neg is not None else bc, lr, bc,
                      skip.view(torch.uint8) if skip is not None else bc, n,
                      float(beta1), float(beta2), float(beta3), 1.0 - beta1, 1.0 - beta2,
                      1.0 - beta3, float(lam), max(float(lam), 0.0),
                      float(eps), float(wd), HAS_S=s is not None, HAS_OUT=out is not None,
                      MODE=mode, HAS_SKIP=skip is not None, BLOCK_SIZE=BLOCK)


class TritonOps:
    """Triton implementation of the flat-range primitives (see ``eager.py``)."""

    name = "triton"

    @staticmethod
    def fused_step(p, g, m, v, s, out, lr, bc1, bc2, beta1, beta2, beta3, lam, eps, wd,
                   skip=None):
        _launch(MODE_FUSED, p, g, m, v, s, out, None, lr, bc1, bc2, beta1, beta2, beta3, lam,
                eps, wd, skip)

    @staticmethod
    def moments_count(g, m, v, s, bc1, bc2, beta1, beta2, beta3, lam, eps, skip=None):
        neg = torch.zeros((), dtype=torch.int64, device=g.device)
        _launch(MODE_COUNT, None, g, m, v, s, None, neg, None, bc1, bc2, beta1, beta2, beta3,
                lam, eps, 0.0, skip)
        return neg

    @staticmethod
    def apply_only(p, g, m, v, s, out, lr, bc1, bc2, lam, eps, wd, skip=None):
        _launch(MODE_APPLY, p, g, m, v, s, out, None, lr, bc1, bc2, 0.0, 0.0, 0.0, lam, eps, wd,
                skip)
