"""The Triton kernel on CPU, under ``TRITON_INTERPRET=1``.

The variable must be set before triton is imported, so the pytest test runs this file
as a script in a subprocess with that environment. The test is skipped only when the
triton package is not installed; with triton installed, any error (an import error in
the project's kernel module included) fails it. The script checks:

* the three kernel modes against the eager primitives: the one-pass step with host
  scalars and with device-tensor scalars (the CUDA-graph path; both must agree bit for
  bit), and a multi-piece run of the two-pass case through the chunk table (unaligned
  pieces, a tensor split in two, a gap that must not move): moments bitwise, params to
  2 ulp, the per-tensor counts exactly; and exactly 1 (one pass) or 2 (count + apply)
  kernel launches per ``flat_step``; with a device step and lr, the scalars in one compiled
  call besides them (for lam not in {1, -1}: the per-tensor step sizes, bias corrections
  included) and no other op but the zeroing of the count vector;
* bf16 moment storage: every stored value is the fp32 result rounded (see ``_is_bf16_cast``);
* the multi-tensor kernel (``kernels/triton_multi.py``) bit for bit the per-tensor one,
  one launch per dtype signature and pass;
* ``AMS`` on the CUDA default (the multi-tensor launch) for every config in
  ``tests/cases.py``, and ``AMS(fused="triton")`` (a launch per tensor) for two of them
  and lam=-0.5/beta3=0.9, against the float64 reference (``update.py``) AND the
  independent numpy oracle (``tests/oracle.py``) (20 steps), on params of 1500 elements (not a multiple of the
  block, 1024), 1 and 0 elements, a transposed 2-D param and a bf16 param with an fp32
  master.

Run by hand: ``TRITON_INTERPRET=1 PYTHONPATH=. python tests/test_triton_interpret.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "TRITON-INTERPRET OK" in proc.stdout, out[-6000:]


# --- the script (runs in the subprocess) ------------------------------------------------


def _is_bf16_cast(out, p) -> bool:
    """``out`` (bf16) is ``p`` (fp32) cast to bf16, element by element. Triton's interpreter
    (3.x, runtime/interpreter.py ``_convert_float``) truncates fp32 -> bf16 instead of
    rounding to nearest even as compiled Triton (and torch) do, so under
    TRITON_INTERPRET=1 each element may also be ``p`` rounded toward zero."""
    import torch

    if out.dtype != torch.bfloat16 or out.shape != p.shape:
        return False
    p = p.float()
    rtne = p.to(torch.bfloat16)
    rtz = (p.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return bool(((out == rtne) | (out == rtz)).all())


class _LaunchCounter:
    """Stands in for the jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


GUARD = 64  # sentinel elements after every range: a kernel must not touch them


def _state(n, seed, with_s, dtype=None):
    """Random state of n elements; each tensor is a view of a buffer GUARD elements longer
    whose tail holds a sentinel (see ``_guards_intact``)."""
    import torch

    from cases import make_grads, make_param

    gen = torch.Generator().manual_seed(seed)
    g = make_grads((n,), 1, seed=seed, zero_frac=0.2)[0]
    st = dict(p=make_param((n,), seed + 1), g=g, m=torch.randn(n, generator=gen) * 0.1,
              v=torch.rand(n, generator=gen) * 0.01,
              s=torch.randn(n, generator=gen) * 0.1 if with_s else None)
    if dtype is not None:
        for k in ("m", "v", "s"):
            if st[k] is not None:
                st[k] = st[k].to(dtype)
    return {k: _guarded(v) for k, v in st.items()}


def _guarded(t):
    import torch

    if t is None:
        return None
    buf = torch.full((t.numel() + GUARD,), 7.0, dtype=t.dtype)
    buf[:t.numel()] = t
    return buf[:t.numel()]


def _guards_intact(st) -> bool:
    """No kernel wrote past the end of its range."""
    import torch

    for t in st.values():
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t._base is not None:
            tail = t._base[t.numel():]
            if not (tail == 7.0).all():
                return False
    return True


def _copy(st):
    return {k: (_guarded(v.clone()) if v is not None else None) for k, v in st.items()}


def _close(a, b, what, ulps=2):
    """Within ``ulps`` units of the largest |b| (an update that cancels to ~0 keeps the
    rounding of its terms, ~|p|)."""
    import torch

    assert a.dtype == b.dtype and a.shape == b.shape, what
    tol = ulps * torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()), msg=what)


def _check_one_pass() -> None:
    import torch

    from sharded_ams.kernels import GroupHParams
    from sharded_ams.kernels.eager import EagerOps
    from sharded_ams.kernels.triton_kernel import TritonOps
    from sharded_ams.update import StepScalars, bias_corrections, step_scalars

    n = 2500  # 3 blocks, the last one partial
    for lam, use_s, wd in ((-1.0, False, 0.0), (1.0, True, 0.1), (-1.0, True, 0.1)):
        hp = GroupHParams(0.9, 0.999, 0.5 if use_s else 0.0, lam, 1e-8, wd)
        sc = step_scalars(1e-2, *bias_corrections(3, 0.9, 0.999), wd)
        dev = StepScalars(*(torch.tensor(x, dtype=torch.float32) for x in
                            (sc.step_size, sc.decay, sc.inv_sqrt_bc2)))
        base = _state(n, 7, use_s)
        runs = {}
        for name, ops, scal in (("eager", EagerOps, sc), ("triton", TritonOps, sc),
                                ("triton-device-scalars", TritonOps, dev)):
            st = _copy(base)
            st["out"] = _guarded(torch.zeros(n, dtype=torch.bfloat16))
            ops.fused_step(st["p"], st["g"], st["m"], st["v"], st["s"], st["out"], scal, hp)
            assert _guards_intact(st), f"{name} wrote past the end of the range"
            runs[name] = st
        e, t, d = runs["eager"], runs["triton"], runs["triton-device-scalars"]
        for k in ("m", "v", "s"):
            if e[k] is not None:
                assert torch.equal(t[k], e[k]), f"one pass {k} lam={lam}"
        _close(t["p"], e["p"], f"one pass p lam={lam}")
        assert not torch.equal(t["p"], base["p"])
        assert _is_bf16_cast(t["out"], t["p"]), "one pass: out != p cast"
        for k in ("p", "m", "v", "s", "out"):  # host floats and device scalars: the same bits
            if t[k] is not None:
                assert torch.equal(t[k], d[k]), f"device scalars differ in {k}"


def _check_device_step_launches() -> None:
    """``flat_step`` with the step count and lr as device tensors (ShardedAMS's path):
    |lam| = 1: the scalars in ONE compiled call (``kernels/scalars.py``), the step in ONE
    kernel launch, and no other op dispatched (issue 21: at most 3 launches); lam = -0.5:
    the count launch, the per-tensor scalars in ONE compiled call (the bias corrections
    included), the apply launch, and only the zeroing of the count vector besides. Either
    way the result is bit for bit the host-number step's."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    import sharded_ams.kernels.scalars as sc_mod
    import sharded_ams.kernels.triton_kernel as tk
    from sharded_ams.kernels import GroupHParams, Piece, flat_step

    class Ops(TorchDispatchMode):  # non-view aten ops dispatched outside the two calls
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("empty", "lift_fresh"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    calls = {"scalars": 0, "kernel": 0}

    def outside_modes(fn, what):
        def call(*args, **kwargs):
            calls[what] += 1
            with _disable_current_modes():
                return fn(*args, **kwargs)
        return call

    class Kernel:
        def __getitem__(self, grid):
            return outside_modes(saved_kernel[grid], "kernel")

    base = _state(3000, 11, False)
    saved_kernel, saved_compiled = tk._ams_kernel, sc_mod._compiled
    saved_mode_test = sc_mod.dispatch_mode_active
    for lam in (-1.0, -0.5):
        hp = GroupHParams(0.9, 0.999, 0.0, lam, 1e-8, 0.1)
        two = dict(pieces=[Piece(0, 2000, 0, 2500), Piece(2000, 3000, 1, 1000)],
                   num_tensors=2) if lam != -1.0 else {}
        runs = {}
        for name, lr, step in (("host", 1e-2, 3),
                               ("device", torch.tensor(1e-2), torch.tensor(3.0))):
            st = _copy(base)
            flat_step(st["p"], st["g"], st["m"], st["v"], None, None, lr=lr, step=step, hp=hp,
                      backend="triton", **two)  # warm: the first call compiles
            st = _copy(base)
            tk._ams_kernel = Kernel()
            sc_mod._compiled = lambda fn: outside_modes(saved_compiled(fn), "scalars")
            sc_mod.dispatch_mode_active = lambda: False  # the counting mode is the only one
            calls.update(scalars=0, kernel=0)
            try:
                with Ops() as counter:
                    flat_step(st["p"], st["g"], st["m"], st["v"], None, None, lr=lr, step=step,
                              hp=hp, backend="triton", **two)
            finally:
                tk._ams_kernel, sc_mod._compiled = saved_kernel, saved_compiled
                sc_mod.dispatch_mode_active = saved_mode_test
            if lam == -1.0:
                want, ops = ((1, 1) if name == "device" else (0, 1)), []
            else:  # the count and the apply; the scalars one call, a host step's too
                want, ops = (1, 2), ["zeros"]
            assert (calls["scalars"], calls["kernel"]) == want, (lam, name, calls)
            assert counter.ops == ops, (lam, name, counter.ops)
            runs[name] = st
        for k in ("p", "m", "v"):
            assert torch.equal(runs["host"][k], runs["device"][k]), (lam, k)


def _check_two_pass_run() -> None:
    import torch

    import sharded_ams.kernels.triton_kernel as tk
    from sharded_ams.kernels import GroupHParams, Piece, flat_step

    n = 3000  # pieces start off 16-element boundaries; tensor 1 is split; [2900, 2950) is a gap
    pieces = (Piece(0, 5, 0, 5), Piece(5, 1105, 1, 2000), Piece(1105, 2001, 1, 2000),
              Piece(2001, 2900, 2, 899), Piece(2950, 3000, 3, 50))
    counter = _LaunchCounter(tk._ams_kernel)
    for lam, use_s, wd in ((-0.5, True, 0.1), (0.0, False, 0.0), (0.5, False, 0.1)):
        hp = GroupHParams(0.9, 0.999, 0.9 if use_s else 0.0, lam, 1e-8, wd)
        base = _state(n, 11, use_s)
        gap = slice(2900, 2950)
        for k in ("p", "g", "m", "v", "s"):  # padding: zeros everywhere
            if base[k] is not None:
                base[k][gap] = 0.0
        runs = {}
        for backend in ("eager", "triton"):
            st = _copy(base)
            st["out"] = _guarded(torch.zeros(n, dtype=torch.bfloat16))
            counts = []
            tk._ams_kernel, saved = counter, tk._ams_kernel
            before = counter.launches
            try:
                flat_step(st["p"], st["g"], st["m"], st["v"], st["s"], st["out"], lr=1e-2,
                          step=3, hp=hp, pieces=pieces, num_tensors=4, backend=backend,
                          count_reduce=lambda c: counts.append(c.clone()))
            finally:
                tk._ams_kernel = saved
            assert _guards_intact(st), f"{backend} wrote past the end of the run"
            st["counts"], st["launches"] = counts[0], counter.launches - before
            runs[backend] = st
        e, t = runs["eager"], runs["triton"]
        assert t["launches"] == 2 and e["launches"] == 0, (t["launches"], e["launches"])
        assert torch.equal(t["counts"], e["counts"]), (lam, t["counts"], e["counts"])
        assert 0 < int(e["counts"].sum()) < n, e["counts"]
        for k in ("m", "v", "s"):
            if e[k] is not None:
                assert torch.equal(t[k], e[k]), f"two pass {k} lam={lam}"
        _close(t["p"], e["p"], f"two pass p lam={lam}")
        assert (t["p"][gap] == 0).all() and (t["m"][gap] == 0).all(), "padding moved"
        assert not torch.equal(t["p"][:5], base["p"][:5])
        assert _is_bf16_cast(t["out"], t["p"]), "two pass: out != p cast"
        # one pass: one launch
        st = _copy(base)
        tk._ams_kernel, saved = counter, tk._ams_kernel
        before = counter.launches
        try:
            flat_step(st["p"], st["g"], st["m"], st["v"], st["s"], None, lr=1e-2, step=3,
                      hp=GroupHParams(0.9, 0.999, hp.beta3, -1.0, 1e-8, wd), backend="triton")
        finally:
            tk._ams_kernel = saved
        assert counter.launches - before == 1


def _check_bf16_moments() -> None:
    """bf16 m, v, s: the kernel computes in fp32 and rounds once on store."""
    import torch

    from sharded_ams.kernels import GroupHParams
    from sharded_ams.kernels.eager import EagerOps
    from sharded_ams.kernels.triton_kernel import TritonOps
    from sharded_ams.update import bias_corrections, step_scalars

    n = 1100
    hp = GroupHParams(0.9, 0.999, 0.5, -1.0, 1e-8, 0.0)
    sc = step_scalars(1e-2, *bias_corrections(2, 0.9, 0.999), 0.0)
    low = _state(n, 21, True, torch.bfloat16)
    exact = {k: (v.float() if v is not None and v.dtype == torch.bfloat16 else v)
             for k, v in _copy(low).items()}
    EagerOps.fused_step(exact["p"], exact["g"], exact["m"], exact["v"], exact["s"], None, sc, hp)
    TritonOps.fused_step(low["p"], low["g"], low["m"], low["v"], low["s"], None, sc, hp)
    for k in ("m", "v", "s"):
        assert low[k].dtype == torch.bfloat16
        assert _is_bf16_cast(low[k], exact[k]), f"bf16 {k} is not the fp32 result rounded"


def _check_sharded_norm_clip_skip() -> None:
    """``ShardedAMS(backend="triton")`` at world size 1, against ``backend="eager"`` (moments
    bitwise where the coefficient agrees, params to 4 ulp) and a float64 run of
    ``update.py`` (norm and coefficient in float64); a NaN step stores nothing. Grams with
    ``max_grad_norm``: the norm from the kernel's block partials, the clip coefficient
    inside the update kernel. C-Adam without clipping: the norm taken with the count pass
    (``step_shards_norm_in_count``), in the count launch itself (no norm kernel of its own:
    no second read of g), the skip decided from it before the apply pass."""
    assert _sharded_case("grams", -1.0, 0.5) > 0  # the clipped norm: its read pass
    assert _sharded_case("cadam", 0.0, None) == 0


def _sharded_case(preset: str, lam: float, max_norm) -> int:
    """Returns how many times the Triton run launched the norm's own kernel."""
    import math

    import torch

    import sharded_ams.kernels.triton_kernel as tk
    from cases import FP32_RTOL, make_grads, make_param
    from sharded_ams import ShardedAMS
    from sharded_ams.update import reference_init, reference_step

    shapes, steps, nan_at = ((1500,), (37, 11)), 6, 3
    p0s = [make_param(s, 400 + i) for i, s in enumerate(shapes)]
    gss = [make_grads(s, steps, seed=410 + i, zero_frac=0.2) for i, s in enumerate(shapes)]
    gss[1][nan_at].view(-1)[5] = float("nan")
    runs, norm_kernel = {}, _LaunchCounter(tk._sq_partials_kernel)
    for backend in ("triton", "eager"):
        if backend == "triton":
            tk._sq_partials_kernel = norm_kernel
        params = [torch.nn.Parameter(p.clone()) for p in p0s]
        opt = ShardedAMS(params, preset=preset, lr=1e-2, weight_decay=0.1,
                         max_grad_norm=max_norm, backend=backend, broadcast_params=False)
        norms = []
        for t in range(steps):
            for p, gs in zip(params, gss):
                p.grad = gs[t].clone()
            before = [p.detach().clone() for p in params] + [
                x.clone() for sh in opt.shards for x in sh.state.values()]
            opt.step()
            norms.append(opt.last_step.grad_norm)
            assert opt.last_step.skipped == (t == nan_at), (backend, t)
            if t == nan_at:  # nothing stored: params and every state tensor as they were
                after = [p.detach() for p in params] + [
                    x for sh in opt.shards for x in sh.state.values()]
                assert all(torch.equal(a, b) for a, b in zip(before, after)), backend
        opt.finish_param_sync()
        tk._sq_partials_kernel = norm_kernel.kernel
        assert int(opt.param_groups[0]["step"]) == steps - 1
        runs[backend] = ([p.detach().clone() for p in params], norms, opt.shards[0].state)
    refs = [reference_init(p, 0.0) for p in p0s]
    for t in range(steps):
        if t == nan_at:
            continue
        g64 = [gs[t].double() for gs in gss]
        norm = math.sqrt(sum(float((g * g).sum()) for g in g64))
        for r, got in ((runs["triton"][1][t], "triton"), (runs["eager"][1][t], "eager")):
            assert abs(r - norm) <= 1e-5 * norm, (preset, got, t, r, norm)
        coef = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
        refs = [reference_step(st, g * coef, lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.0,
                               lam=lam, eps=1e-8, weight_decay=0.1)
                for st, g in zip(refs, g64)]
    assert max_norm is None or any(
        max_norm / (n + 1e-6) < 1.0 for n in runs["eager"][1] if math.isfinite(n)), \
        "no step clipped: the test would not see the coefficient"
    for i, (pt, pe, ref) in enumerate(zip(runs["triton"][0], runs["eager"][0], refs)):
        _close(pt, pe, f"sharded {preset} triton vs eager, param {i}", ulps=4)
        scale = float((ref.p - p0s[i].double()).abs().max())
        err = float((pt.double() - ref.p).abs().max()) / scale
        assert err < FP32_RTOL, f"{preset} param {i} vs float64 reference: rel err {err:.3g}"
    assert not torch.isnan(runs["triton"][2]["exp_avg"]).any()
    return norm_kernel.launches


def _check_multi_tensor() -> None:
    """``triton_multi.py``: a list of tensors in one launch per dtype signature is bit for
    bit the per-tensor kernel on each (one pass; count + apply with per-tensor step sizes),
    for sizes off the block (0, 1, 1023, 2500 elements), fp32 and bf16 params (a bf16 one
    with its fp32 master and model-dtype copy), with and without s, with a clip coefficient
    (``coef``, read in the kernel) and without; no write past a range; and the address
    table is not rebuilt while the addresses stay (only when one moves)."""
    import torch

    import sharded_ams.kernels.triton_multi as tm
    from sharded_ams.kernels import GroupHParams
    from sharded_ams.kernels.tables import Piece, build_run_table
    from sharded_ams.kernels.triton_kernel import TritonOps
    from sharded_ams.update import bias_corrections, step_scalars

    sizes, lowp = (2500, 0, 1, 1023, 700), {3}
    for lam, use_s, wd in ((-1.0, False, 0.1), (0.0, False, 0.0), (-0.5, True, 0.1)):
        hp = GroupHParams(0.9, 0.999, 0.5 if use_s else 0.0, lam, 1e-8, wd)
        coef = None if use_s else torch.tensor(0.37)
        bc1, bc2 = bias_corrections(3, 0.9, 0.999)
        base = [_state(n, 40 + i, use_s) for i, n in enumerate(sizes)]
        for i in lowp:  # a bf16 param: the master is p, the model-dtype copy is out
            base[i]["out"] = _guarded(base[i]["p"].to(torch.bfloat16))
            base[i]["g"] = _guarded(base[i]["g"].to(torch.bfloat16))
        one, multi = [_copy(b) for b in base], [_copy(b) for b in base]
        lists = [[st.get(k) for st in multi] for k in ("p", "g", "m", "v", "s", "out")]
        if not use_s:
            lists[4] = None
        counter = _LaunchCounter(tm._ams_multi_kernel)
        tm._ams_multi_kernel = counter
        try:
            if lam == -1.0:
                sc = step_scalars(1e-2, bc1, bc2, wd)
                tm.triton_multi_fused_step(*lists, sc, hp, coef=coef)
                for st in one:
                    TritonOps.fused_step(st["p"], st["g"], st["m"], st["v"], st["s"],
                                         st.get("out"), sc, hp, coef=coef)
                want_launches = 2  # two dtype signatures
            else:
                counts = tm.triton_multi_count(*lists, hp, coef=coef)
                lrs = torch.tensor([1e-2 * (1 + i) for i in range(len(sizes))],
                                   dtype=torch.float64)
                sc = step_scalars(lrs, bc1, bc2, wd)
                tm.triton_multi_apply(*lists, sc, hp, coef=coef)
                for i, st in enumerate(one):
                    n = sizes[i]
                    if n == 0:
                        assert int(counts[i]) == 0
                        continue
                    table = build_run_table((Piece(0, n, 0, n),), n, 1, torch.device("cpu"))
                    c = torch.zeros(1, dtype=torch.int64)
                    TritonOps.count_run(st["g"], st["m"], st["v"], st["s"], hp, table, c,
                                        coef=coef)
                    assert int(c) == int(counts[i]), f"count of tensor {i}"
                    TritonOps.apply_run(st["p"], st["g"], st["m"], st["v"], st["s"],
                                        st.get("out"), sc.inv_sqrt_bc2, hp, table,
                                        sc.step_size[i:i + 1], sc.decay[i:i + 1], coef=coef)
                want_launches = 4  # count and apply, two dtype signatures each
        finally:
            tm._ams_multi_kernel = counter.kernel
        assert counter.launches == want_launches, (lam, counter.launches)
        for i, (a, b) in enumerate(zip(multi, one)):
            assert _guards_intact(a), f"multi-tensor launch wrote past tensor {i}"
            for k in ("p", "m", "v", "s", "out"):
                if a.get(k) is not None:
                    assert torch.equal(a[k], b[k]), f"tensor {i} {k} lam={lam}"
            if sizes[i] > 1:  # (one element with a zero gradient may rightly stay)
                assert not torch.equal(a["p"], base[i]["p"]), f"tensor {i} did not move"
    # the address table: kept while the addresses stay, rebuilt when one moves
    hp = GroupHParams(0.9, 0.999, 0.0, -1.0, 1e-8, 0.0)
    sts = [_state(n, 60 + i, False) for i, n in enumerate((300, 5000))]
    lists = [[st[k] for st in sts] for k in ("p", "g", "m", "v")] + [None, [None, None]]
    sc = step_scalars(1e-2, *bias_corrections(1, 0.9, 0.999), 0.0)
    tm.triton_multi_fused_step(*lists, sc, hp)
    tables = tm._tables(lists[0], lists[1], lists[5], torch.device("cpu"))
    first = tables.addr
    tm.triton_multi_fused_step(*lists, sc, hp)
    assert tables.addr is first, "address table rebuilt with the same addresses"
    assert tables.aligned  # fresh allocations: 16-byte vectors on a GPU
    lists[1] = [g.clone() for g in lists[1]]  # new gradients (set_to_none, reallocated)
    tm.triton_multi_fused_step(*lists, sc, hp)
    assert tables.addr is not first and int(tables.addr[2]) == lists[1][0].data_ptr()
    # two optimizers over lists of the same sizes, each with its own cache: interleaved
    # steps keep both address tables (a shared one would be rebuilt every call)
    other = [[t.clone() for t in ts] if ts is not None else None for ts in lists[:5]]
    other.append([None, None])
    caches = [{}, {}]
    for ls, cache in ((lists, caches[0]), (other, caches[1])) * 2:
        tm.triton_multi_fused_step(*ls, sc, hp, cache=cache)
        if len(cache.get("seen", ())) == 0:
            cache["seen"] = [next(v for v in cache.values() if isinstance(v, tm._Tables)).addr]
    for cache in caches:
        own = next(v for v in cache.values() if isinstance(v, tm._Tables))
        assert own.addr is cache["seen"][0], "an optimizer's address table was rebuilt"
    # a tensor 4 bytes off a 16-byte boundary: the unaligned variant, the same values
    want = [t.clone() for t in lists[0]]
    ref = [dict(p=want[i], g=lists[1][i].clone(), m=lists[2][i].clone(), v=lists[3][i].clone())
           for i in range(2)]
    odd = torch.empty(lists[0][1].numel() + 1)[1:]
    odd.copy_(lists[0][1])
    lists[0][1] = odd
    tm.triton_multi_fused_step(*lists, sc, hp)
    assert not tables.aligned
    for r in ref:
        TritonOps.fused_step(r["p"], r["g"], r["m"], r["v"], None, None, sc, hp)
    assert all(torch.equal(a, r["p"]) for a, r in zip(lists[0], ref))


def _check_optimizer(case, steps: int = 20, multi: bool = False) -> None:
    """``case`` on the per-tensor kernel (``fused="triton"``), or, with ``multi``, on the
    CUDA default (the group's contiguous tensors in one launch per dtype signature; the
    transposed param on its own), the default path made Triton as on a GPU."""
    import torch

    import sharded_ams.optimizer as optimizer_mod

    from cases import (assert_matches_reference, error_scales, make_grads, make_param,
                       reference_trajectory, rel_err, FP32_RTOL)
    from oracle import AMSOracle

    specs = [((1500,), torch.float32, False), ((1,), torch.float32, False),
             ((0,), torch.float32, False), ((9, 5), torch.float32, True),
             ((40, 30), torch.bfloat16, False)]
    params, p0s, gss = [], [], []
    for i, (shape, dtype, transposed) in enumerate(specs):
        base = make_param(shape, 200 + i, dtype)
        p0 = base.t() if transposed else base
        logical = tuple(p0.shape)
        params.append(torch.nn.Parameter(base.clone().t() if transposed else base.clone()))
        p0s.append(p0)
        gss.append(make_grads(logical, steps, seed=300 + i, zero_frac=0.2, dtype=dtype))
    saved = optimizer_mod.default_path
    if multi:
        optimizer_mod.default_path = lambda device, numel: "triton"
    opt = case.build(params) if multi else case.build(params, fused="triton")
    oracle = AMSOracle.start(p0s, **{k: v for k, v in case.hparams.items()})
    try:
        for t in range(steps):
            for p, gs in zip(params, gss):
                p.grad = gs[t].clone()
            opt.step()
            oracle.step([gs[t] for gs in gss])
    finally:
        optimizer_mod.default_path = saved
    for i, (p, p0, gs) in enumerate(zip(params, p0s, gss)):
        what = f"triton{'-multi' if multi else ''}/{case.name}/{tuple(p.shape)}"
        ref = reference_trajectory(p0, gs, **case.ref_kwargs)[-1]
        assert_matches_reference(opt, p, ref, what=what, p0=p0, grads=gs)
        st, scales = opt.state[p], error_scales(p0, gs)
        for k, want in oracle.state(i).items():
            got = st["master"] if k == "param" and "master" in st else (p if k == "param" else st[k])
            err = rel_err(got, want.reshape(got.shape), scales[k])
            assert err < FP32_RTOL, f"{what}: {k} vs the oracle, rel err {err:.3g}"
        if p.dtype != torch.float32:
            assert st["master"].dtype == torch.float32
            assert _is_bf16_cast(p.detach(), st["master"]), "bf16 param != master cast"


def _main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running this script", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from cases import ORACLE_CASES, CONFIGS

    t0 = time.time()
    for check in (_check_one_pass, _check_device_step_launches, _check_two_pass_run,
                  _check_bf16_moments, _check_multi_tensor,
                  _check_sharded_norm_clip_skip):
        t1 = time.time()
        check()
        print(f"{check.__name__}: OK ({time.time() - t1:.1f}s)", flush=True)
    # every config on the CUDA default (one launch per group), the per-tensor kernel
    # (fused="triton") on one each of |lam| = 1 and not, and on the oracle's extra cases
    names = {c.name for c in CONFIGS}
    runs = [(c, True) for c in CONFIGS] + [(c, False) for c in CONFIGS
                                           if c.name in ("grams", "lam-0.5_beta3-0.5_wd")]
    runs += [(c, False) for c in ORACLE_CASES if c.name not in names]
    for case, multi in runs:
        t1 = time.time()
        _check_optimizer(case, multi=multi)
        print(f"{case.name}{' (one launch per group)' if multi else ''}: OK "
              f"({time.time() - t1:.1f}s)", flush=True)
    print(f"TRITON-INTERPRET OK in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
