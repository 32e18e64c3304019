"""The correctness section of ``gpu_check.py``: the Triton kernel against the float64
reference, element-wise and norm-wise, over many steps (see ``section_correctness``)."""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING

import torch

from sharded_ams.kernels import GroupHParams, Piece, flat_step
from sharded_ams.update import reference_init, reference_step, step_scale

if TYPE_CHECKING:
    from gpu_check_plan import Plan

#: correctness cases: name -> (beta1, beta3, lam). beta3 = 0.9 with beta1 = 0.95: at
#: beta1 = beta3 the reference s equals m (u*s >= 0 everywhere) and the step is AdamW's
CASES = {"grams": (0.9, 0.0, -1.0), "cadam": (0.9, 0.0, 0.0), "adamw": (0.9, 0.0, 1.0),
         "lam-0.5_beta3-0.9": (0.95, 0.9, -0.5)}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_RTOL = 1e-5  # norm-wise, as tests/cases.py
MOMENT_RTOL = 5e-5  # element-wise, relative to the moment's scale (its EMA of |g| or g^2)
TIE_MARGIN = 1e-5  # |m| or |s| below this fraction of its scale: the sign may flip in fp32


def correctness_layout(n: int) -> tuple[int, tuple[Piece, ...], list[tuple[int, int]]]:
    """~n elements in 5 tensors: sizes that are and are not multiples of 16, one tensor
    split in two adjacent pieces (as across ranks), one starting off a 16-element boundary,
    64-element padding elsewhere. Returns (total, pieces, [(start, end) of each tensor])."""
    sizes = [1000, (int(n * 0.3) // 16) * 16, int(n * 0.25) + 7, int(n * 0.45) - 1000, 17]
    pieces, spans, pos = [], [], 0
    for i, size in enumerate(sizes):
        pos = -(-pos // 64) * 64 + (5 if i == 2 else 0)
        if i == 3:  # split: two pieces of one tensor
            half = size // 2 + 3
            pieces += [Piece(pos, pos + half, i, size), Piece(pos + half, pos + size, i, size)]
        else:
            pieces.append(Piece(pos, pos + size, i, size))
        spans.append((pos, pos + size))
        pos += size
    return -(-pos // 64) * 64, tuple(pieces), spans


def section_correctness(plan: Plan) -> dict:
    total, pieces, spans = correctness_layout(plan.correctness_n)
    rows, longest = [], 0.0
    for case, (beta1, beta3, lam) in CASES.items():
        for pdtype in PARAM_DTYPES:
            # a case starts only if one as long as the longest so far still fits the cap
            if plan.time_left() < 1.5 * longest + 2:
                rows.append(dict(case=case, param_dtype=str(pdtype)[6:], status="skipped (time)"))
                continue
            t0 = time.time()
            rows.append(_correctness_run(plan, case, beta1, beta3, lam, pdtype, total, pieces,
                                         spans))
            longest = max(longest, time.time() - t0)
    rows.append(_bf16_moments_run(plan, total, pieces))
    failed = [r for r in rows if r.get("status") == "fail"]
    return {"status": "fail" if failed else "ok", "rows": rows, "n": total,
            "steps": plan.correctness_steps, "pieces": len(pieces),
            "cases_skipped_for_time": sum(r["status"] == "skipped (time)" for r in rows)}


def _grads(plan, total, spans, step, seed, dtype, scale):
    gen = torch.Generator(device=plan.device).manual_seed(seed * 100_003 + step)
    g = torch.randn(total, device=plan.device, generator=gen) * scale
    g[torch.rand(total, device=plan.device, generator=gen) < 0.05] = 0.0  # ties
    return g.to(dtype)


def _correctness_run(plan, case, beta1, beta3, lam, pdtype, total, pieces, spans) -> dict:
    dev, steps = plan.device, plan.correctness_steps
    hp = GroupHParams(beta1, 0.999, beta3, lam, 1e-8, 0.1)
    lr = 1e-3
    gen = torch.Generator(device=dev).manual_seed(7)
    pad = torch.ones(total, dtype=torch.bool, device=dev)
    for a, b in spans:
        pad[a:b] = False
    master = torch.randn(total, device=dev, generator=gen).masked_fill_(pad, 0.0)
    # magnitudes spread over six decades, fixed per element: sqrt(v^) meets eps somewhere
    scale = (10.0 ** (torch.rand(total, device=dev, generator=gen) * 6 - 6)).masked_fill_(pad, 0.0)
    p0 = master.clone()
    m, v = torch.zeros(total, device=dev), torch.zeros(total, device=dev)
    s = torch.zeros(total, device=dev) if beta3 > 0 else None
    out = torch.empty(total, device=dev, dtype=pdtype) if pdtype != torch.float32 else None
    refs = [reference_init(p0[a:b], beta3) for a, b in spans]
    z = torch.zeros(total, device=dev, dtype=torch.float64)
    path, mabs, sabs, vabs, last = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
    scale_drift = z.clone()  # |dp| the kernel may owe to a count that differs at a tie
    tie = torch.zeros(total, device=dev, dtype=torch.bool)
    count_steps_differing = unexplained = 0
    kw = dict(lr=lr, beta1=beta1, beta2=0.999, beta3=beta3, lam=lam, eps=1e-8, weight_decay=0.1)
    for t in range(1, steps + 1):
        g = _grads(plan, total, spans, t, zlib.crc32(case.encode()), pdtype, scale)
        counts: list = []
        flat_step(master, g, m, v, s, out, lr=lr, step=t, hp=hp, pieces=pieces,
                  num_tensors=len(spans), backend=plan.backend,
                  count_reduce=lambda c: counts.append(c.tolist()))
        g64 = g.double()
        mabs.mul_(beta1).add_(g64.abs() * (1 - beta1))
        vabs.mul_(0.999).add_(g64 * g64 * 0.001)
        if s is not None:
            sabs.mul_(beta3).add_(g64.abs() * (1 - beta3))
        for i, (a, b) in enumerate(spans):
            old = refs[i].p
            refs[i] = reference_step(refs[i], g64[a:b], **kw)
            last[a:b] = (refs[i].p - old).abs()
            path[a:b] += last[a:b]
            near = refs[i].m.abs() <= TIE_MARGIN * mabs[a:b]
            sref = refs[i].s if s is not None else g64[a:b]
            if s is not None:
                near |= refs[i].s.abs() <= TIE_MARGIN * sabs[a:b]
            tie[a:b] |= near
            if counts:  # the per-tensor count may differ only by elements at a tie
                want = int(((torch.sign(refs[i].m) * torch.sign(sref)) < 0).sum())
                got = counts[0][i]
                if got != want:
                    count_steps_differing += 1
                    unexplained += abs(got - want) > int(near.sum())
                    d = b - a
                    drift = abs(step_scale(d, got, lam) / step_scale(d, want, lam) - 1.0)
                    scale_drift[a:b] += drift * last[a:b]
    ref = {k: _assemble(refs, spans, k, total, dev) for k in ("p", "m", "v", "s")
           if k != "s" or s is not None}
    # element-wise bounds: fp32 rounding of the update (relative to the path travelled) and
    # of p itself, per step; near a tie the weight may flip (1 <-> lam): then the element
    # may be off by up to (1 + |lam|) times its path
    eps32 = 2.0 ** -24
    tol = (2e-6 * path + 2 * steps * eps32 * (p0.double().abs() + ref["p"].abs() + path)
           + 2 * scale_drift)
    loose = tol + (1 + abs(lam)) * path

    def bad_p(x):
        d = (x.double() - ref["p"]).abs()
        return int((((d > tol) & ~tie) | (d > loose)).sum())

    row = dict(case=case, param_dtype=str(pdtype)[6:], n=total, steps=steps,
               tie_elements=int(tie.sum()), count_steps_differing=count_steps_differing,
               count_bad=unexplained)
    row["p_bad"] = bad_p(master)
    row["p_norm_err"] = norm_err(master, ref["p"])
    for k, state, sc in (("m", m, mabs), ("v", v, vabs), ("s", s, sabs)):
        if state is None:
            continue
        d = (state.double() - ref[k]).abs()
        row[f"{k}_bad"] = int((d > MOMENT_RTOL * sc).sum())
        row[f"{k}_norm_err"] = norm_err(state, ref[k])
    row["padding_moved"] = int((master[pad] != 0).sum() + (m[pad] != 0).sum())
    if out is not None:
        row["out_mismatch"] = int((out != _round(master, pdtype, plan)).sum())
    keep = ~tie & ~pad
    row["p_err_over_tol_max"] = float(((master.double() - ref["p"]).abs()[keep] / tol[keep]).max())
    # teeth: would one element that missed its last update be caught? (the share of the
    # elements where it would, and such an error planted at the median element)
    live = torch.nonzero((last > 0) & ~tie).flatten()
    ratio = last[live] / tol[live]
    row["missed_step_detectable"] = float((ratio > 1).double().mean())
    idx = int(live[ratio.argsort()[len(live) // 2]])
    planted = master.clone()
    planted[idx] += float(last[idx])
    row["planted_error_caught"] = bad_p(planted) == row["p_bad"] + 1
    fails = [k for k in row if k.endswith("_bad") and row[k]]
    fails += [k for k in row if k.endswith("_norm_err") and row[k] >= FP32_RTOL]
    fails += [k for k in ("padding_moved", "out_mismatch") if row.get(k)]
    if not row["planted_error_caught"] or row["missed_step_detectable"] < 0.5:
        fails.append("planted_error_caught")
    row["status"] = "fail" if fails else "ok"
    row["failed"] = ",".join(fails)
    return row


def _assemble(refs, spans, key, total, dev) -> torch.Tensor:
    out = torch.zeros(total, device=dev, dtype=torch.float64)
    for r, (a, b) in zip(refs, spans):
        out[a:b] = getattr(r, key)
    return out


def norm_err(x, ref) -> float:
    denom = float(ref.abs().max())
    return float((x.double() - ref).abs().max()) / denom if denom else 0.0


def _round(x: torch.Tensor, dtype: torch.dtype, plan: Plan) -> torch.Tensor:
    """x rounded to ``dtype`` as the kernel rounds: to nearest even on a GPU; under the
    interpreter bf16 truncates (triton/runtime/interpreter.py), so allow that there."""
    rtne = x.to(dtype)
    if plan.device.type == "cuda" or dtype != torch.bfloat16:
        return rtne
    return x.contiguous().view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32).to(dtype)


def _bf16_moments_run(plan, total, pieces) -> dict:
    """m, v, s stored in bf16: each stored value is the fp32 result rounded to nearest even
    (the GPU) exactly; in the dry run the interpreter truncates, which is accepted there."""
    dev = plan.device
    hp = GroupHParams(0.95, 0.999, 0.9, -0.5, 1e-8, 0.0)
    gen = torch.Generator(device=dev).manual_seed(11)
    p = torch.randn(total, device=dev, generator=gen)
    st = {k: (torch.randn(total, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
          for k in ("m", "s")}
    st["v"] = (torch.rand(total, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
    mism = differ_from_rtz = 0
    for t in range(1, 4):
        g = torch.randn(total, device=dev, generator=gen)
        prev = {k: x.float() for k, x in st.items()}
        exact = {"m": prev["m"] * 0.95 + g * (1 - 0.95), "v": prev["v"] * 0.999 + g * g * (1 - 0.999),
                 "s": prev["s"] * 0.9 + g * (1 - 0.9)}
        flat_step(p, g, st["m"], st["v"], st["s"], None, lr=1e-3, step=t, hp=hp, pieces=pieces,
                  num_tensors=5, backend=plan.backend)
        for k in ("m", "v", "s"):
            want = exact[k].to(torch.bfloat16)
            ok = st[k] == want
            if plan.device.type != "cuda":
                ok |= st[k] == _round(exact[k], torch.bfloat16, plan)
            mism += int((~ok).sum())
            differ_from_rtz += int((want != _rtz_bf16(exact[k])).sum())
    return dict(case="bf16 moments (lam=-0.5, beta3=0.9)", param_dtype="float32", n=total,
                steps=3, store_mismatch=mism, rtne_differs_from_truncation=differ_from_rtz,
                status="ok" if mism == 0 and differ_from_rtz > 0 else "fail")


def _rtz_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32).to(torch.bfloat16)
