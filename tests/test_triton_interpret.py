"""The Triton kernel on CPU, under ``TRITON_INTERPRET=1``.

The variable must be set before triton is imported, so the pytest test runs this file
as a script in a subprocess with that environment. The script checks:

* ``AMS(fused="triton")`` against the float64 reference for every config in
  ``tests/cases.py`` (20 steps), on params of 1500 elements (not a multiple of the block,
  1024), 1 and 0 elements, a transposed 2-D param and a bf16 param with an fp32 master
  (the kernel writes the bf16 copy in the same pass: it must equal the master cast, up to
  the interpreter's truncating fp32 -> bf16 conversion, see ``_is_bf16_cast``);
* the three kernel modes (MODE_FUSED, MODE_COUNT, MODE_APPLY) directly against the eager
  primitives on a 2500-element range.

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
    if proc.returncode == 3:  # the script found no usable triton
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "triton unusable")
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


def _check_optimizer(case, steps: int = 20) -> None:
    import torch

    from cases import assert_matches_reference, make_grads, make_param, reference_trajectory

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
    opt = case.build(params, fused="triton")
    for t in range(steps):
        for p, gs in zip(params, gss):
            p.grad = gs[t].clone()
        opt.step()
    for p, p0, gs in zip(params, p0s, gss):
        ref = reference_trajectory(p0, gs, **case.ref_kwargs)[-1]
        assert_matches_reference(opt, p, ref, what=f"triton/{case.name}/{tuple(p.shape)}",
                                 p0=p0, grads=gs)
        if p.dtype != torch.float32:
            st = opt.state[p]
            assert st["master"].dtype == torch.float32
            assert _is_bf16_cast(p.detach(), st["master"]), "bf16 param != master cast"


def _check_modes() -> None:
    import torch

    from cases import make_grads, make_param
    from sharded_ams.kernels.eager import EagerOps
    from sharded_ams.kernels.triton_kernel import TritonOps

    n = 2500  # 3 blocks, the last one partial
    g = make_grads((n,), 1, seed=7, zero_frac=0.2)[0]
    p0 = make_param((n,), 8)
    gen = torch.Generator().manual_seed(9)
    m0 = torch.randn(n, generator=gen) * 0.1
    v0 = torch.rand(n, generator=gen) * 0.01
    s0 = torch.randn(n, generator=gen) * 0.1
    bc1, bc2 = torch.tensor(1 - 0.9**3), torch.tensor(1 - 0.999**3)
    lr = torch.tensor(1e-2)
    for lam, use_s, wd in ((-1.0, False, 0.0), (1.0, True, 0.1), (0.0, False, 0.1),
                           (-0.5, True, 0.0), (0.5, False, 0.0)):
        hp = dict(beta1=0.9, beta2=0.999, beta3=0.5 if use_s else 0.0)

        def fresh():
            return (p0.clone(), m0.clone(), v0.clone(), s0.clone() if use_s else None,
                    torch.empty(n, dtype=torch.bfloat16))

        # MODE_FUSED: moments and params in one pass (+ the bf16 copy)
        (pa, ma, va, sa, oa), (pb, mb, vb, sb, ob) = fresh(), fresh()
        EagerOps.fused_step(pa, g, ma, va, sa, oa, lr, bc1, bc2, hp["beta1"], hp["beta2"],
                            hp["beta3"], lam, 1e-8, wd)
        TritonOps.fused_step(pb, g, mb, vb, sb, ob, lr, bc1, bc2, hp["beta1"], hp["beta2"],
                             hp["beta3"], lam, 1e-8, wd)
        for x, y, what in ((pa, pb, "p"), (ma, mb, "m"), (va, vb, "v"), (sa, sb, "s")):
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9, msg=f"fused {what} {lam}")
        assert _is_bf16_cast(ob, pb), "fused: out != p cast"
        # MODE_COUNT: moments + count of u*s < 0 (atomic add over blocks)
        (pa, ma, va, sa, _), (pb, mb, vb, sb, _) = fresh(), fresh()
        ca = EagerOps.moments_count(g, ma, va, sa, bc1, bc2, hp["beta1"], hp["beta2"],
                                    hp["beta3"], lam, 1e-8)
        cb = TritonOps.moments_count(g, mb, vb, sb, bc1, bc2, hp["beta1"], hp["beta2"],
                                     hp["beta3"], lam, 1e-8)
        assert int(ca) == int(cb) and 0 < int(ca) < n, (lam, int(ca), int(cb))
        for x, y, what in ((ma, mb, "m"), (va, vb, "v"), (sa, sb, "s")):
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-12, msg=f"count {what} {lam}")
        assert torch.equal(pa, p0) and torch.equal(pb, p0)  # the count pass writes no param
        # MODE_APPLY: params from the updated moments with a scaled lr; moments untouched
        ma2, va2 = ma.clone(), va.clone()
        lr2 = torch.tensor(1e-2 * 1.37)
        oa, ob = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        EagerOps.apply_only(pa, g, ma, va, sa, oa, lr2, bc1, bc2, lam, 1e-8, wd)
        TritonOps.apply_only(pb, g, ma, va, sa, ob, lr2, bc1, bc2, lam, 1e-8, wd)
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-9, msg=f"apply p {lam}")
        assert torch.equal(ma, ma2) and torch.equal(va, va2)
        assert _is_bf16_cast(ob, pb), "apply: out != p cast"
        assert not torch.equal(pa, p0)


def _main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running this script", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    try:
        import triton  # noqa: F401
        from sharded_ams.kernels import triton_kernel  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"triton unusable here: {exc!r}")
        return 3
    from cases import CONFIGS

    t0 = time.time()
    _check_modes()
    print(f"kernel modes OK ({time.time() - t0:.1f}s)", flush=True)
    for case in CONFIGS:
        t1 = time.time()
        _check_optimizer(case)
        print(f"{case.name}: OK ({time.time() - t1:.1f}s)", flush=True)
    print(f"TRITON-INTERPRET OK in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
