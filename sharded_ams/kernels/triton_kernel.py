"""The AMS step as one Triton kernel over a flat range.

One launch reads p, g, m, v[, s] once and writes p, m, v[, s] (and the model-dtype copy
of p) once. ``MODE`` selects the full step (|lam| == 1), or one of the two passes of the
per-tensor-scaled case, each ONE launch over a whole run: the count pass computes this
step's m[, s] without storing them (reads g, m[, s]) and atomically adds each program's
count of u*s < 0 to its tensor's slot; the apply pass is the whole step, with its
tensor's step size and decay from per-tensor tables. A run of many
pieces is addressed through a chunk table (``tables.RunTable.chunks``: one program per
chunk, each inside one piece, starting on a 16-element boundary). A whole block (every
block but a range's or a piece's edges) takes an unmasked path, so its loads and stores
are 16-byte vectors whatever the range length; edge blocks are masked.

Scalars: Python floats (rounded once to fp32 from float64 on the host; nothing is copied
to the device, so the launch never synchronises) or, when the step or lr lives on the
device, an fp32[3] device tensor (step size, decay, 1/sqrt(1 - beta2^t)) read in the kernel:
that path can be captured in a CUDA graph and replayed as the step tensor advances.
1 - beta is computed on the host in float64 (1 - fp32(0.999) in fp32 would be off by
1e-5 relative).

Rounding: launched with ``enable_fp_fusion=False``, so every multiply and add rounds as
eager torch rounds them (no fma contraction); with the same order of operations as
``update.py`` the kernel then matches the eager ops bit for bit in fp32 (see
``docs/maths.md``). The launch is guarded by the tensors' device, not the current one.

Fused around the step (issue 21): the clip coefficient (a 0-d fp32 device tensor,
``HAS_COEF``) multiplies each gradient as it is loaded, so clipping costs no pass over the
gradients and no host sync; ``sq_norm`` is the gradient norm's one read pass (per-block fp32
partials, summed in float64), whose value is also the non-finite test; without clipping, the
count pass of lam not in {1, -1} writes those partials itself (``HAS_SQ``) from the g it
loads, so that norm costs no read of its own; p is cast to fp32 on load like g, m, v and s.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..update import StepScalars
from .tables import ALIGN, RunTable

MODE_FUSED = 0
#: the pair of lam not in {1, -1} (per range and ``triton_multi.py``): a count that stores
#: nothing (reads g, m[, s]: 8 B per fp32 element), then the whole one-pass step with
#: per-tensor step sizes (28 B): 36 B in all against 40 for a count that stores the moments
#: and an apply that reads them back (modes 1 and 2 until 2026-12), the same bits for fp32
#: moments (bf16 moments: the step now uses the fp32 values it rounds for storage, as the
#: one-pass step always did)
MODE_COUNT_ONLY, MODE_FUSED_TABLE = 3, 4
BLOCK = 1024
#: compile options of every launch: no fma contraction (see the module docstring)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _st(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _ams_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, offs, mask, idx, counts_ptr,
               ss_ptr, dec_ptr, scal_ptr, coef_ptr, sq_ptr, beta1, beta2, beta3, omb1, omb2,
               omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2, HAS_S: tl.constexpr,
               HAS_OUT: tl.constexpr, MODE: tl.constexpr, SCALARS_ON_DEVICE: tl.constexpr,
               HAS_COEF: tl.constexpr, HAS_SQ: tl.constexpr, MASKED: tl.constexpr):
    """One block of the step; MASKED=False for whole blocks (unpredicated vector loads).
    ``HAS_SQ`` (the count pass, unclipped): this block's fp32 sum of g^2 goes to
    ``sq_ptr`` (this program's slot), the norm read with the count's."""
    g = _ld(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_SQ:  # masked-off lanes loaded as 0
        tl.store(sq_ptr, tl.sum(g * g, axis=0))
    if HAS_COEF:  # the clip coefficient, folded in: no pass scales the gradients
        g = g * tl.load(coef_ptr)
    m = _ld(m_ptr, offs, mask, MASKED).to(tl.float32)
    if MODE != 3:  # (a sign needs no v)
        v = _ld(v_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_S:
        s = _ld(s_ptr, offs, mask, MASKED).to(tl.float32)
    m = m * beta1 + g * omb1
    if MODE != 3:  # the count stores nothing
        v = v * beta2 + g * g * omb2
        _st(m_ptr, offs, m, mask, MASKED)
        _st(v_ptr, offs, v, mask, MASKED)
    if HAS_S:
        s = s * beta3 + g * omb3
        if MODE != 3:
            _st(s_ptr, offs, s, mask, MASKED)
    if HAS_S:
        ref = s
    else:
        ref = g
    # sign(u * s) = sign(m) * sign(s): u = m / (positive), and no product can underflow
    agree = ((m > 0.0) & (ref > 0.0)) | ((m < 0.0) & (ref < 0.0))
    disagree = ((m > 0.0) & (ref < 0.0)) | ((m < 0.0) & (ref > 0.0))
    if MODE == 3:
        neg = tl.sum((disagree & mask).to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + idx, neg.to(tl.int64))
    else:
        if SCALARS_ON_DEVICE:
            if MODE == 4:  # the apply pass's one step scalar, read where it lies
                inv_sqrt_bc2 = tl.load(scal_ptr)
            else:
                inv_sqrt_bc2 = tl.load(scal_ptr + 2)
                step_size = tl.load(scal_ptr)
                decay = tl.load(scal_ptr + 1)
        if MODE == 4:
            step_size = tl.load(ss_ptr + idx)
            decay = tl.load(dec_ptr + idx)
        w = tl.where(agree, 1.0, tl.where(disagree, lam, tie))
        den = tl.math.sqrt_rn(v) * inv_sqrt_bc2 + eps
        upd = tl.math.div_rn(w * m, den)
        p = _ld(p_ptr, offs, mask, MASKED).to(tl.float32)
        p = p * decay - step_size * upd
        _st(p_ptr, offs, p, mask, MASKED)
        if HAS_OUT:
            _st(out_ptr, offs, p, mask, MASKED)


@triton.jit
def _ams_kernel(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr,
                cbase_ptr, clo_ptr, chi_ptr, cidx_ptr, counts_ptr, ss_ptr, dec_ptr, scal_ptr,
                skip_ptr, coef_ptr, sq_ptr, n, piece_index, beta1, beta2, beta3, omb1, omb2, omb3, lam,
                tie, eps,
                step_size, decay, inv_sqrt_bc2,
                HAS_S: tl.constexpr, HAS_OUT: tl.constexpr, MODE: tl.constexpr,
                USE_TABLE: tl.constexpr, SCALARS_ON_DEVICE: tl.constexpr,
                HAS_SKIP: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SQ: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, ALIGN_TO: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_SIZE)
    if USE_TABLE:  # one chunk of one piece per program
        base = tl.multiple_of(tl.load(cbase_ptr + pid), ALIGN_TO)
        lo = tl.load(clo_ptr + pid)
        hi = tl.load(chi_ptr + pid)
        idx = tl.load(cidx_ptr + pid)
        offs = base + lanes
        whole = (lo == base) & (hi == base + BLOCK_SIZE)
        mask = (offs >= lo) & (offs < hi)
    else:  # a contiguous range of one piece (or of |lam| == 1: no pieces)
        base = pid.to(tl.int64) * BLOCK_SIZE
        offs = base + lanes
        whole = base + BLOCK_SIZE <= n
        mask = offs < n
        idx = piece_index
    if HAS_SKIP:  # a skipped step (decided on the device) loads and stores nothing
        skip = tl.load(skip_ptr).to(tl.int32)
        whole = whole & (skip == 0)
        mask = mask & ((tl.full([BLOCK_SIZE], 0, tl.int32) + skip) == 0)
    if whole:
        _ams_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, offs, mask, idx, counts_ptr,
                   ss_ptr, dec_ptr, scal_ptr, coef_ptr, sq_ptr + pid, beta1, beta2, beta3,
                   omb1, omb2, omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2, HAS_S,
                   HAS_OUT, MODE, SCALARS_ON_DEVICE, HAS_COEF, HAS_SQ, False)
    else:
        _ams_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, offs, mask, idx, counts_ptr,
                   ss_ptr, dec_ptr, scal_ptr, coef_ptr, sq_ptr + pid, beta1, beta2, beta3,
                   omb1, omb2, omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2, HAS_S,
                   HAS_OUT, MODE, SCALARS_ON_DEVICE, HAS_COEF, HAS_SQ, True)


#: elements per program of the squared-norm kernel (one fp32 partial each)
NORM_BLOCK = 4096


@triton.jit
def _sq_partials_kernel(g_ptr, out_ptr, n, BLOCK_SIZE: tl.constexpr):
    """Each program's sum of g^2 over its block, in fp32: the squared-norm partials."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g, axis=0))


def sq_norm(ranges: Sequence[Tensor]) -> Tensor:
    """Sum of squares of every element of ``ranges`` (1-D, contiguous, one device), a 0-d
    float64 tensor: one launch per range writes per-block fp32 partials into one buffer,
    one float64 sum adds them (2 launches at world size 1: its ranges merge into one).
    The result is NaN/inf iff some element is NaN/inf, or an element's square or a
    block's partial overflows fp32 (|g| > ~1.8e19): the non-finite test rides on it."""
    sizes = [triton.cdiv(r.numel(), NORM_BLOCK) for r in ranges]
    parts = torch.empty(sum(sizes), dtype=torch.float32, device=ranges[0].device)
    pos = 0
    for r, k in zip(ranges, sizes):
        if k:
            with _device_guard(r):
                _sq_partials_kernel[(k,)](r, parts[pos:pos + k], r.numel(),
                                          BLOCK_SIZE=NORM_BLOCK, **LAUNCH_OPTIONS)
        pos += k
    return parts.sum(dtype=torch.float64)


def _device_guard(t: Tensor):
    """Launch on the tensors' GPU, not the current one (a bare optimizer on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _scalars(sc: Optional[StepScalars], ref: Tensor):
    """(fp32[3] device tensor or None, step_size, decay, inv_sqrt_bc2): floats go to the
    kernel as arguments; if any scalar is a tensor, all three go through device memory
    (``torch.full`` for the floats: a fill kernel, not a host-to-device copy)."""
    if sc is None:
        return None, 0.0, 1.0, 1.0
    if sc.packed is not None and sc.packed.device == ref.device:  # ``scalars.py``: no op
        return sc.packed, 0.0, 1.0, 1.0
    vals = (sc.step_size, sc.decay, sc.inv_sqrt_bc2)
    if not any(isinstance(x, Tensor) for x in vals):
        return None, float(vals[0]), float(vals[1]), float(vals[2])
    scal = torch.stack([x.to(device=ref.device, dtype=torch.float32).reshape(())
                        if isinstance(x, Tensor) else
                        torch.full((), float(x), dtype=torch.float32, device=ref.device)
                        for x in vals])
    return scal, 0.0, 1.0, 1.0


def _inv_scalar(inv, ref: Tensor):
    """``_scalars`` of the apply pass (MODE 4), whose one step scalar is 1 / sqrt(1 -
    beta2^t): a device tensor is read where it lies (no vector of three is built: the
    per-tensor scalars of ``scalars.device_scaled_scalars`` are one launch in all), a
    number goes as a kernel argument."""
    if isinstance(inv, Tensor):
        return inv.to(device=ref.device, dtype=torch.float32).reshape(()), 0.0, 1.0, 1.0
    return None, 0.0, 1.0, float(inv)


def _launch(mode: int, g: Tensor, m: Tensor, v: Tensor, s: Optional[Tensor], hp, *,
            p: Optional[Tensor] = None, out: Optional[Tensor] = None,
            sc: Optional[StepScalars] = None, inv_sqrt_bc2=None, table: Optional[RunTable] = None,
            counts: Optional[Tensor] = None, step_sizes: Optional[Tensor] = None,
            decays: Optional[Tensor] = None, skip: Optional[Tensor] = None,
            coef: Optional[Tensor] = None, sq_acc: Optional[Tensor] = None) -> None:
    """One launch; ``sq_acc`` (the count pass): the float64 accumulator the launch's g^2 adds
    to, from one fp32 partial per program (a block or a table chunk: a run's padding is
    not read)."""
    n = g.numel()
    if n == 0:
        return
    if inv_sqrt_bc2 is not None:  # the apply pass: only 1/sqrt(1 - beta2^t) is a step scalar
        scal, step_size, decay, sq = _inv_scalar(inv_sqrt_bc2, g)
    else:
        scal, step_size, decay, sq = _scalars(sc, g)
    on_device = scal is not None
    one = table.single if table is not None else None
    use_table = table is not None and one is None
    if use_table:
        cbase, clo, chi, cidx = table.chunks(BLOCK)
        grid = (cbase.numel(),)
    else:
        cbase = clo = chi = cidx = g
        grid = (triton.cdiv(n, BLOCK),)
    dummy = m
    parts = (torch.empty(grid[0], dtype=torch.float32, device=g.device)
             if sq_acc is not None else None)
    with _device_guard(g):
        _ams_kernel[grid](
            p if p is not None else dummy, g, m, v, s if s is not None else dummy,
            out if out is not None else dummy, cbase, clo, chi, cidx,
            counts if counts is not None else dummy, step_sizes if step_sizes is not None else dummy,
            decays if decays is not None else dummy, scal if on_device else dummy,
            skip.view(torch.uint8) if skip is not None else dummy,
            coef if coef is not None else dummy, parts if parts is not None else dummy, n,
            one.index if one is not None else 0,
            float(hp.beta1), float(hp.beta2), float(hp.beta3), 1.0 - hp.beta1, 1.0 - hp.beta2,
            1.0 - hp.beta3, float(hp.lam), max(float(hp.lam), 0.0), float(hp.eps),
            step_size, decay, sq,
            HAS_S=s is not None, HAS_OUT=out is not None, MODE=mode, USE_TABLE=use_table,
            SCALARS_ON_DEVICE=on_device, HAS_SKIP=skip is not None,
            HAS_COEF=coef is not None, HAS_SQ=parts is not None, BLOCK_SIZE=BLOCK,
            ALIGN_TO=ALIGN, **LAUNCH_OPTIONS)
    if parts is not None:
        sq_acc.add_(parts.sum(dtype=torch.float64))


class TritonOps:
    """Triton implementation of the flat-range primitives (see ``eager.py``): one launch
    per call; ``sq_norm``: the gradient norm's read pass."""

    name = "triton"
    sq_norm = staticmethod(sq_norm)

    @staticmethod
    def fused_step(p, g, m, v, s, out, sc: StepScalars, hp, skip=None, coef=None) -> None:
        _launch(MODE_FUSED, g, m, v, s, hp, p=p, out=out, sc=sc, skip=skip, coef=coef)

    @staticmethod
    def count_run(g, m, v, s, hp, table: RunTable, counts: Tensor, skip=None,
                  coef=None, sq=None) -> None:
        # stores nothing, reads g, m[, s]; the apply pass is the whole step (36 B in all).
        # ``sq`` (the unclipped norm's float64 accumulator): g^2 summed in the same launch,
        # from the g it loads for the count (no read of its own)
        if sq is not None and coef is not None:
            raise ValueError("count_run: sq is of the unclipped gradient; no coef with it")
        _launch(MODE_COUNT_ONLY, g, m, v, s, hp, table=table, counts=counts, skip=skip,
                coef=coef, sq_acc=sq)

    @staticmethod
    def apply_run(p, g, m, v, s, out, inv_sqrt_bc2, hp, table: RunTable, step_sizes: Tensor,
                  decays: Tensor, skip=None, coef=None) -> None:
        _launch(MODE_FUSED_TABLE, g, m, v, s, hp, p=p, out=out, inv_sqrt_bc2=inv_sqrt_bc2,
                table=table, step_sizes=step_sizes, decays=decays, skip=skip, coef=coef)
