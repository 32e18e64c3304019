"""Every tensor of a param group in one Triton launch: ``AMS``'s default on CUDA.

A launch per tensor costs ~10-20 us of host time each (Python, argument packing, the
launch), which for a model of hundreds of tensors is more than a small model's whole step.
Here one launch steps a list of tensors, as torch's ``_foreach`` / fused AdamW kernels do
(there through kernel-argument structs; Triton takes no arrays by value, so the addresses
go through a device table, as in Triton's grouped-GEMM tutorial): program ``pid`` reads
its tensor's index and block offset from a chunk table, that tensor's p, g, m, v[, s][, out]
addresses from an int64 table, and runs ``triton_kernel._ams_block`` on them: the same
maths, the same rounding, bit for bit the per-tensor kernel's result. With lam not in
{1, -1} the count pass stores nothing and the apply pass is the whole step with per-tensor
step sizes (``MODE_COUNT_ONLY``, ``MODE_FUSED_TABLE``): 36 B per fp32 element against the
per-tensor pair's 40 (count and store the moments, then apply), as the CPU path does.

The tables: chunk tables are built once per list of sizes and cached; the address table
is rebuilt (one small pinned host-to-device copy, no sync) only when an address changed
since the last call with that list of sizes; where every address is a multiple of 16 bytes
(the caching allocator's blocks are), the kernel is told so and whole blocks load and store
16-byte vectors. Tensors of one launch must share dtypes (the
pointer types are compile-time): a list that mixes them is split into one launch per
(p, g, out) dtype signature; counts and per-tensor step sizes stay indexed by the
position in the whole list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..update import StepScalars
from .triton_kernel import (BLOCK, LAUNCH_OPTIONS, MODE_COUNT_ONLY, MODE_FUSED,
                            MODE_FUSED_TABLE, _ams_block, _device_guard, _inv_scalar, _scalars)

#: rows of the address table, in order
ARRAYS = ("p", "g", "m", "v", "s", "out")


@triton.jit
def _array(addr_ptr, row, num_tensors, t, ref, ALIGNED: tl.constexpr):
    """Tensor ``t``'s array ``row`` (``ARRAYS``) as a pointer of ``ref``'s element type;
    ALIGNED: every address of the launch is a multiple of 16 bytes (checked on the host),
    which lets the whole blocks' loads and stores be 16-byte vectors."""
    ptr = tl.load(addr_ptr + row * num_tensors + t).to(tl.pointer_type(ref.dtype.element_ty))
    if ALIGNED:  # (a hint on the loaded integer did not reach the loads; on the pointer it does)
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _ams_multi_kernel(addr_ptr, numel_ptr, ctensor_ptr, cbase_ptr, p0, g0, m0, s0, out0,
                      counts_ptr, ss_ptr, dec_ptr, scal_ptr, coef_ptr, num_tensors, beta1,
                      beta2, beta3,
                      omb1, omb2, omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2,
                      HAS_S: tl.constexpr, HAS_OUT: tl.constexpr, MODE: tl.constexpr,
                      SCALARS_ON_DEVICE: tl.constexpr, HAS_COEF: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(ctensor_ptr + pid)
    base = tl.load(cbase_ptr + pid)
    n = tl.load(numel_ptr + t)
    # the tensor's arrays: int64 addresses cast to pointers of the reference args' types
    p_ptr = _array(addr_ptr, 0, num_tensors, t, p0, ALIGNED)
    g_ptr = _array(addr_ptr, 1, num_tensors, t, g0, ALIGNED)
    m_ptr = _array(addr_ptr, 2, num_tensors, t, m0, ALIGNED)
    v_ptr = _array(addr_ptr, 3, num_tensors, t, m0, ALIGNED)
    s_ptr = m_ptr
    if HAS_S:
        s_ptr = _array(addr_ptr, 4, num_tensors, t, s0, ALIGNED)
    out_ptr = p_ptr
    if HAS_OUT:
        out_ptr = _array(addr_ptr, 5, num_tensors, t, out0, ALIGNED)
    if ALIGNED:  # blocks start at multiples of BLOCK_SIZE: whole blocks load 16-byte vectors
        base = tl.multiple_of(base, BLOCK_SIZE)
    offs = base + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    if base + BLOCK_SIZE <= n:
        _ams_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, offs, mask, t, counts_ptr,
                   ss_ptr, dec_ptr, scal_ptr, coef_ptr, scal_ptr, beta1, beta2, beta3, omb1,
                   omb2, omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2, HAS_S, HAS_OUT,
                   MODE, SCALARS_ON_DEVICE, HAS_COEF, False, False)
    else:
        _ams_block(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, out_ptr, offs, mask, t, counts_ptr,
                   ss_ptr, dec_ptr, scal_ptr, coef_ptr, scal_ptr, beta1, beta2, beta3, omb1,
                   omb2, omb3, lam, tie, eps, step_size, decay, inv_sqrt_bc2, HAS_S, HAS_OUT,
                   MODE, SCALARS_ON_DEVICE, HAS_COEF, False, True)


@dataclass
class _Tables:
    """One list of sizes on one device: per-signature chunk tables (program -> tensor,
    block offset), the sizes, and the last address table with the addresses it holds."""

    numels: Tensor
    launches: list  # [(positions, ctensor, cbase)], one per dtype signature
    addresses: Optional[tuple] = None
    addr: Optional[Tensor] = None
    aligned: bool = False


#: (device, sizes, dtype signatures) -> _Tables, for callers that keep no cache of their
#: own (``AMS`` keeps one per optimizer: two optimizers over lists of the same sizes would
#: otherwise swap address tables every step)
_CACHE: dict[tuple, _Tables] = {}
_CACHE_MAX = 64


def _signature(ps, gs, outs, i: int) -> tuple:
    out = outs[i]
    return ps[i].dtype, gs[i].dtype, None if out is None else out.dtype


def _to_device(values: list, device: torch.device) -> Tensor:
    """int64 values on ``device``: from pinned memory without a sync on CUDA."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _tables(ps, gs, outs, device: torch.device, cache: Optional[dict] = None) -> _Tables:
    numels = tuple(p.numel() for p in ps)
    sigs = tuple(_signature(ps, gs, outs, i) for i in range(len(ps)))
    key = ("triton_multi", device, numels, sigs)
    cache = _CACHE if cache is None else cache
    tables = cache.get(key)
    if tables is not None:
        return tables
    launches = []
    for sig in dict.fromkeys(sigs):
        positions = [i for i, s in enumerate(sigs) if s == sig]
        ct, cb = [], []
        for i in positions:
            blocks = triton.cdiv(numels[i], BLOCK)
            ct += [i] * blocks
            cb += [b * BLOCK for b in range(blocks)]
        if ct:
            launches.append((positions, _to_device(ct, device), _to_device(cb, device)))
    if cache is _CACHE and len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    tables = cache[key] = _Tables(_to_device(list(numels), device), launches)
    return tables


def _addresses(tables: _Tables, arrays: Sequence[Optional[Sequence[Optional[Tensor]]]],
               device: torch.device) -> Tensor:
    """The int64 address table, rows in ``ARRAYS`` order (a missing array or entry: 0)."""
    n = len(arrays[0])
    addresses = tuple(0 if ts is None or ts[i] is None else ts[i].data_ptr()
                      for ts in arrays for i in range(n))
    if addresses != tables.addresses:
        tables.addr, tables.addresses = _to_device(list(addresses), device), addresses
        tables.aligned = all(a % 16 == 0 for a in addresses)  # (0: a missing array)
    return tables.addr


def _launch(mode: int, ps, gs, ms, vs, ss, outs, hp, *, sc: Optional[StepScalars] = None,
            counts: Optional[Tensor] = None, step_sizes: Optional[Tensor] = None,
            decays: Optional[Tensor] = None, cache: Optional[dict] = None,
            coef: Optional[Tensor] = None) -> None:
    device = gs[0].device
    outs = outs if outs is not None else [None] * len(gs)
    tables = _tables(ps, gs, outs, device, cache)
    addr = _addresses(tables, (ps, gs, ms, vs, ss, outs), device)
    if mode == MODE_FUSED_TABLE:  # its one step scalar, read where it lies if a tensor
        scal, step_size, decay, inv_sqrt_bc2 = _inv_scalar(sc.inv_sqrt_bc2, gs[0])
    else:
        scal, step_size, decay, inv_sqrt_bc2 = _scalars(sc, gs[0])
    dummy = ms[0]
    for positions, ctensor, cbase in tables.launches:
        first = positions[0]
        out0 = outs[first]
        with _device_guard(gs[first]):
            _ams_multi_kernel[(ctensor.numel(),)](
                addr, tables.numels, ctensor, cbase, ps[first], gs[first], ms[first],
                ss[first] if ss is not None else dummy, out0 if out0 is not None else dummy,
                counts if counts is not None else dummy,
                step_sizes if step_sizes is not None else dummy,
                decays if decays is not None else dummy, scal if scal is not None else dummy,
                coef if coef is not None else dummy, len(gs), float(hp.beta1), float(hp.beta2), float(hp.beta3), 1.0 - hp.beta1,
                1.0 - hp.beta2, 1.0 - hp.beta3, float(hp.lam), max(float(hp.lam), 0.0),
                float(hp.eps), step_size, decay, inv_sqrt_bc2,
                HAS_S=ss is not None, HAS_OUT=out0 is not None, MODE=mode,
                SCALARS_ON_DEVICE=scal is not None, HAS_COEF=coef is not None,
                ALIGNED=tables.aligned, BLOCK_SIZE=BLOCK,
                **LAUNCH_OPTIONS)


def triton_multi_fused_step(ps, gs, ms, vs, ss, outs, sc: StepScalars, hp,
                            cache: Optional[dict] = None, coef: Optional[Tensor] = None) -> None:
    """|lam| == 1: one pass over every tensor, one launch per dtype signature. ``cache``:
    where the tables are kept (the caller's dict; default: this module's). ``coef`` (each
    function here): an optional 0-d fp32 clip coefficient on the device, multiplied into
    each gradient as it is loaded."""
    _launch(MODE_FUSED, ps, gs, ms, vs, ss, outs, hp, sc=sc, cache=cache, coef=coef)


def triton_multi_count(ps, gs, ms, vs, ss, outs, hp, cache: Optional[dict] = None,
                       coef: Optional[Tensor] = None) -> Tensor:
    """lam not in {1, -1}, first pass: each tensor's count of u*s < 0 from its new m (and
    s), atomically added into its slot: int64[len(gs)] on the device. Nothing is stored:
    the pass reads g and m[, s] only (``ps``, ``vs``, ``outs``: passed so that both passes
    share one address table), and the apply pass recomputes the moments."""
    counts = torch.zeros(len(gs), dtype=torch.int64, device=gs[0].device)
    _launch(MODE_COUNT_ONLY, ps, gs, ms, vs, ss, outs, hp, counts=counts, cache=cache,
            coef=coef)
    return counts


def triton_multi_apply(ps, gs, ms, vs, ss, outs, sc: StepScalars, hp,
                       cache: Optional[dict] = None, coef: Optional[Tensor] = None) -> None:
    """Second pass: the whole step (moments and params), each tensor with its own step
    size and decay (``sc.step_size`` / ``sc.decay``: fp32[len(ps)] device tensors)."""
    _launch(MODE_FUSED_TABLE, ps, gs, ms, vs, ss, outs, hp, sc=sc, step_sizes=sc.step_size,
            decays=sc.decay, cache=cache, coef=coef)
