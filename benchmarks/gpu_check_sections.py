"""The sections of ``gpu_check.py``: what each one checks or measures, at its plan's sizes
(the correctness section is in ``gpu_check_correctness.py``, the FSDP2 one in
``gpu_check_fsdp.py``).

Every section takes the :class:`Plan` and returns a dict with ``status`` ("ok", "fail",
"skipped") and its rows or checks; :func:`run_section` adds the time and turns an
exception into status "error" with its traceback.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from bench_common import env_info
from bench_gpu import bandwidth_rows
from gpu_check_correctness import FP32_RTOL, norm_err, section_correctness
from gpu_check_fsdp import fsdp_section
from gpu_check_plan import Plan
from launcher.train.models.gpt import GPT, GPTConfig
from sharded_ams import AMS, ShardedAMS

ROOT = Path(__file__).resolve().parent.parent
#: CUDA-only tests that the check runs (each skips without CUDA)
GPU_TEST_FILES = ("tests/test_gpu.py",)
#: the most ``pytest -m gpu`` may take (issue 21): a hang there must not cost the run
PYTEST_CAP_S = 120.0
GRAPH_NOTE = ("Every row is the median of calls timed between CUDA events with the L2 cache "
              "flushed before each (triton.testing.do_bench), the CUDA-graph replays too. "
              "'the kernel alone' captures one launch (host lr/step); 'whole step' captures "
              "the kernel and the small kernels that compute its scalars from a device step "
              "count (ShardedAMS's path).")
#: the dry run's model (~14K params: the interpreter runs ~1.5 s per million elements)
TINY_GPT = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)


def run_section(name: str, plan: Plan, inject: str | None = None) -> dict:
    """``SECTIONS[name](plan)``, timed; an exception becomes status "error" with its
    traceback. ``inject`` ("raise" or "hang") is the tests' way to make a section fail."""
    t0 = time.time()
    try:
        if inject == "raise":
            raise RuntimeError(f"injected failure in section {name}")
        if inject == "hang":
            time.sleep(1e6)  # until the section's watchdog ends the process
        res = SECTIONS[name](plan)
    except Exception:  # noqa: BLE001 - recorded, and the other sections still run
        res = {"status": "error", "error": traceback.format_exc()[-4000:]}
    res["seconds"] = time.time() - t0
    return res


# --- env --------------------------------------------------------------------------------


def section_env(plan: Plan) -> dict:
    info = env_info(plan.device)
    # the device machine gets a copy of the tree without .git: the caller may pass the SHA
    info["git_sha"] = info.get("git_sha") or os.environ.get("GIT_SHA")
    info.update(python=platform.python_version(), cuda=torch.version.cuda,
                triton=_version("triton"), machine=platform.machine())
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2 ** 30,
                    l2_mib=getattr(props, "L2_cache_size", 0) / 2 ** 20)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
    return {"status": "ok", "info": info}


def _version(pkg: str) -> Optional[str]:
    try:
        return __import__(pkg).__version__
    except ImportError:
        return None


# --- static: the compiled kernel, without launching it ----------------------------------


def section_static(plan: Plan) -> dict:
    """PTX of the production variants (fp fusion off) and one with fusion on, for contrast."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"status": "skipped", "reason": "the interpreter compiles nothing"}
    import triton
    from triton.backends.compiler import GPUTarget

    import sharded_ams.kernels.triton_kernel as tk
    import sharded_ams.kernels.triton_multi as tm

    if plan.device.type == "cuda":
        target = triton.runtime.driver.active.get_current_target()
    else:
        target = GPUTarget("cuda", 90, 32)
    variants = [("one pass, fp32", tk.MODE_FUSED, False, False, "fp32", False, True),
                ("one pass, fp32, n % 16 != 0", tk.MODE_FUSED, False, False, "fp32", False, False),
                ("one pass, fp32, fp fusion ON", tk.MODE_FUSED, False, False, "fp32", True, True),
                ("one pass, bf16 params + fp32 master", tk.MODE_FUSED, False, True, "bf16", False,
                 True),
                ("count pass, chunk table, s", tk.MODE_COUNT_ONLY, True, False, "fp32", False,
                 True),
                ("count pass + the norm's partials, chunk table, s", tk.MODE_COUNT_ONLY, True,
                 False, "fp32", False, True, True),
                ("apply pass (the whole step), chunk table, s", tk.MODE_FUSED_TABLE, True, False,
                 "fp32", False, True)]
    multi = [("multi-tensor one pass, fp32", tk.MODE_FUSED, False, "fp32"),
             ("multi-tensor one pass, fp32, clip coefficient", tk.MODE_FUSED, False, "fp32",
              True),
             ("multi-tensor one pass, bf16 params + fp32 master", tk.MODE_FUSED, True, "bf16"),
             ("multi-tensor count pass (stores nothing), s", tk.MODE_COUNT_ONLY, False,
              "fp32"),
             ("multi-tensor apply pass (the whole step), s", tk.MODE_FUSED_TABLE, False,
              "fp32")]
    ptxs = [(v[0], v[5], _compile_ptx(tk, target, *v[1:])) for v in variants]
    ptxs += [(v[0], False, _compile_multi_ptx(tm, target, *v[1:4], False, *v[4:]))
             for v in multi]
    rows, ok = [], True
    for name, fusion, ptx in ptxs:
        row = dict(variant=name, target=f"{target.backend} sm_{target.arch}", fp_fusion=fusion,
                   v4_loads=ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                   scalar_loads=sum(ptx.count(f"ld.global{q}.b32") for q in ("", ".nc")),
                   v4_stores=ptx.count("st.global.v4"), fma=ptx.count("fma.rn.f32"))
        rows.append(row)
        if (not fusion and row["fma"] != 0) or row["v4_loads"] < 4:
            ok = False
    return {"status": "ok" if ok else "fail", "rows": rows,
            "expect": "fma = 0 wherever fp fusion is off; 16-byte vector loads (the whole-block "
                      "path) in every variant"}


def _compile_ptx(tk, target, mode, table, has_out, gdtype, fusion, n16, sq=False) -> str:
    ptr = {"p_ptr": "fp32", "g_ptr": gdtype, "m_ptr": "fp32", "v_ptr": "fp32", "s_ptr": "fp32",
           "out_ptr": "bf16" if has_out else "fp32", "cbase_ptr": "i64", "clo_ptr": "i64",
           "chi_ptr": "i64", "cidx_ptr": "i64", "counts_ptr": "i64", "ss_ptr": "fp32",
           "dec_ptr": "fp32", "scal_ptr": "fp32", "skip_ptr": "u8", "coef_ptr": "fp32",
           "sq_ptr": "fp32"}
    consts = dict(HAS_S=table, HAS_OUT=has_out, MODE=mode, USE_TABLE=table,
                  SCALARS_ON_DEVICE=False, HAS_SKIP=False, HAS_COEF=False, HAS_SQ=sq,
                  BLOCK_SIZE=tk.BLOCK, ALIGN_TO=tk.ALIGN)
    ints = {"n": n16, "piece_index": False}
    return _ptx(tk._ams_kernel, ptr, consts, ints, target, fusion)


def _compile_multi_ptx(tm, target, mode, has_out, gdtype, fusion, coef=False) -> str:
    """The multi-tensor kernel (``triton_multi.py``), its addresses 16-byte aligned."""
    ptr = {"addr_ptr": "i64", "numel_ptr": "i64", "ctensor_ptr": "i64", "cbase_ptr": "i64",
           "p0": "fp32", "g0": gdtype, "m0": "fp32", "s0": "fp32",
           "out0": "bf16" if has_out else "fp32", "counts_ptr": "i64", "ss_ptr": "fp32",
           "dec_ptr": "fp32", "scal_ptr": "fp32", "coef_ptr": "fp32"}
    consts = dict(HAS_S=mode != tm.MODE_FUSED, HAS_OUT=has_out, MODE=mode,
                  SCALARS_ON_DEVICE=False, HAS_COEF=coef, ALIGNED=True, BLOCK_SIZE=tm.BLOCK)
    return _ptx(tm._ams_multi_kernel, ptr, consts, {"num_tensors": False}, target, fusion)


def _ptx(kernel, ptr: dict, consts: dict, ints: dict, target, fusion: bool) -> str:
    """PTX of ``kernel`` for ``target``: pointer args of the given dtypes (16-byte aligned),
    integer args (``ints``: name -> divisible by 16), every other arg an fp32 scalar."""
    import triton
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name.isupper():  # a constexpr this list does not set would compile as a runtime value
            if name not in consts:
                raise ValueError(f"the static check does not set the kernel's constexpr {name}")
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = "*" + ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            raise ValueError(f"the static check does not know the dtype of the kernel's {name}")
        elif name in ints:
            sig[name] = "i32"
            if ints[name]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options={"enable_fp_fusion": fusion}).asm["ptx"]


# --- pytest -----------------------------------------------------------------------------


def pytest_command(timeout: float) -> list[str]:
    """The GPU tests' pytest command. addopts replaced: the suite's xdist options (-n 2 ...)
    need pytest-xdist, which the GPU machine (no package installs) may lack; the GPU tests
    run in one process anyway."""
    return [sys.executable, "-u", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
            "-o", "addopts=-ra", "-o", f"faulthandler_timeout={max(1, int(timeout - 10))}",
            *GPU_TEST_FILES]


def section_pytest(plan: Plan) -> dict:
    """``pytest -m gpu`` over ``GPU_TEST_FILES`` in a subprocess, stopped at the section's
    cap (at most ``PYTEST_CAP_S``); pytest's faulthandler dumps a test's stack 10 s before."""
    timeout = max(5.0, min(PYTEST_CAP_S, plan.time_left()))
    cmd = pytest_command(timeout)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return {"status": "fail", "reason": f"timed out after {timeout:.0f} s",
                "output": out[-3000:]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"status": "ok" if proc.returncode == 0 else "fail", "returncode": proc.returncode,
            "summary": lines[-1] if lines else "", "command": " ".join(cmd[3:]),
            "output": (proc.stdout + proc.stderr)[-3000:]}


# --- bandwidth ----------------------------------------------------------------------------


def section_bandwidth(plan: Plan) -> dict:
    rows = bandwidth_rows(plan.bandwidth_sizes, plan.device, backend=plan.backend,
                          quick=plan.quick, multi_piece_scale=plan.multi_piece_scale,
                          graph_sizes=plan.graph_sizes,
                          log=lambda *a, **k: print(*a, **k) if not plan.quick else None)
    by = {(r["n"], r["mode"], r["impl"]): r for r in rows if "ms" in r}
    targets = []
    for n in plan.bandwidth_sizes:
        grams = by.get((n, "grams", f"sharded-ams {plan.backend}"))
        fused = by.get((n, "adamw_fused", "torch AdamW(fused=True)"))
        if grams and n >= 2 ** 26:
            targets.append(dict(n=n, target=">= 90% of copy bandwidth",
                                value=grams["frac_copy"], met=grams["frac_copy"] >= 0.9))
        if grams and fused:
            targets.append(dict(n=n, target="not slower than AdamW(fused) at equal bytes",
                                value=fused["ms"] / grams["ms"], met=grams["ms"] <= fused["ms"]))
    return {"status": "ok", "rows": rows, "targets": targets,
            "note": (GRAPH_NOTE if plan.device.type == "cuda" else
                     "The dry run: a host clock, the kernel interpreted; no CUDA graphs.")}


# --- one optimizer step (issue 21) --------------------------------------------------------

#: (rows that play the part: the CUDA run's, the dry run's), the peer row, the ratio the
#: issue asks (peer time / row time), what it means
STEP_TARGETS = (
    (("ams_default", "ams_triton"), "adamw_fused", 1.0,
     "Grams(params) default >= 1.0x AdamW(fused=True)"),
    (("cadam_default", "cadam_triton"), "adamw_fused", 1.0,
     "CAdam(params) default >= 1.0x AdamW(fused=True)"),
    (("sharded_ams",), "adamw_fused", 0.85,
     "ShardedAMS default (non-finite skip) >= 0.85x AdamW(fused=True)"),
    (("sharded_ams_clip",), "adamw_fused_clip", 1.2,
     "ShardedAMS(max_grad_norm=1.0) >= 1.2x clip_grad_norm_ + AdamW(fused=True)"),
)


def step_targets(rows: list[dict]) -> list[dict]:
    """Each target whose rows ran: the median of per-round ratios (peer / row)."""
    by = {r["name"]: r for r in rows if r.get("status") == "ok"}
    out = []
    for names, peer, want, what in STEP_TARGETS:
        row = next((by[n] for n in names if n in by), None)
        if row is None or peer not in by:
            continue
        value = statistics.median(a / b for a, b in zip(by[peer]["times_ms"], row["times_ms"]))
        out.append(dict(row=row["name"], target=what, value=value, met=value >= want))
    return out


def section_step(plan: Plan) -> dict:
    """``bench_step.py``'s rows: what a user runs against the torch optimizer they would
    pick instead, the same GPT-like set, interleaved rounds."""
    import bench_step

    shapes = bench_step.gpt_shapes(plan.step_scale, plan.step_layers)
    rows = bench_step.time_rows(plan.step_rows, shapes, plan.device, plan.step_repeats,
                                warmup=1)
    bench_step.add_ratios(rows)
    return {"status": "ok", "rows": rows, "targets": step_targets(rows),
            "table": bench_step.markdown_table(rows),
            "note": ("CUDA events are not used: each step is synchronised and timed on the "
                     "host (one step of a 29M set is ~1 ms; launch gaps count, as they do "
                     "for a user)" if plan.device.type == "cuda" else
                     "The dry run: tiny tensors, the Triton kernel interpreted.")}


# --- the whole path on one GPU --------------------------------------------------------------


@contextlib.contextmanager
def _process_group(plan: Plan):
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(plan.dist_backend, init_method=f"file://{tmp}/store",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def build_gpt(plan: Plan) -> torch.nn.Module:
    """A GPT-2-small-sized GPT (124M) on CUDA; a tiny one in the dry run."""
    if plan.device.type == "cuda":
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    else:
        cfg = TINY_GPT
    return GPT(cfg)


def build_llama_60m(plan: Plan) -> torch.nn.Module:
    """The launcher's Llama 60M (GaLore's shape, 32000-token vocabulary) on CUDA; a tiny
    Llama in the dry run."""
    from launcher.train.models import build_model
    from launcher.train.models.sizes import resolve_shape

    if plan.device.type == "cuda":
        shape = resolve_shape("llama", "60m", {"vocab_size": 32000})
    else:
        shape = resolve_shape("llama", None, dict(vocab_size=64, block_size=32, n_layer=1,
                                                  n_head=2, n_kv_head=1, n_embd=32,
                                                  intermediate_size=64))
    return build_model({**shape, "arch": "llama"})


#: training-section model builders (``--model``); the default is the Llama 60M
MODELS: dict[str, Callable[[Plan], torch.nn.Module]] = {"llama-60m": build_llama_60m,
                                                          "gpt": build_gpt}


def _batch(model, plan, gen, batch=None):
    cfg = model.cfg
    b = batch or (16 if plan.device.type == "cuda" else 4)
    x = torch.randint(cfg.vocab_size, (b, cfg.block_size), device=plan.device, generator=gen)
    return x, torch.roll(x, -1, dims=1)


def section_sharded(plan: Plan) -> dict:
    """ShardedAMS at world size 1 on the device's collective backend, against an unsharded
    AMS stepped with the same gradients, for Grams (one pass) and lam=-0.5 (count pass and
    the count all-reduce)."""
    rows = []
    with _process_group(plan):
        for preset, extra in (("grams", {}), (None, dict(lam=-0.5, beta3=0.9, betas=(0.95, 0.999)))):
            torch.manual_seed(0)
            small = (GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256)
                     if plan.device.type == "cuda" else TINY_GPT)
            model = GPT(small).to(plan.device)
            ref = copy.deepcopy(model)
            hp = dict(lr=1e-3, weight_decay=0.1, **extra)
            opt = ShardedAMS(model, preset=preset, backend=plan.backend, **hp)
            ref_opt = AMS(ref.parameters(), fused="eager",
                          **({"lam": -1.0, "beta3": 0.0} if preset else {}), **hp)
            gen = torch.Generator(device=plan.device).manual_seed(1)
            times = []
            for _ in range(plan.sharded_steps):
                x, y = _batch(model, plan, gen, batch=8 if plan.device.type == "cuda" else 2)
                model(x, y)[1].backward()
                for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                    q.grad = p.grad.detach().clone()
                _sync(plan)
                t0 = time.perf_counter()
                opt.step()
                _sync(plan)
                times.append((time.perf_counter() - t0) * 1e3)
                ref_opt.step()
                opt.zero_grad()
                ref.zero_grad()
            opt.finish_param_sync()
            err = max(norm_err(p.detach(), q.detach().double())
                      for p, q in zip(model.parameters(), ref.parameters()))
            rows.append(dict(optimizer=f"ShardedAMS({preset or 'lam=-0.5, beta3=0.9'})",
                             collectives=plan.dist_backend, params=sum(p.numel() for p in model.parameters()),
                             steps=plan.sharded_steps, step_ms=sorted(times)[len(times) // 2],
                             max_rel_err_vs_unsharded=err, status="ok" if err < FP32_RTOL else "fail"))
    return {"status": "fail" if any(r["status"] == "fail" for r in rows) else "ok", "rows": rows}


def _sync(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)


def section_training(plan: Plan) -> dict:
    """~50 bf16-autocast steps through the launcher's training pieces
    (``launcher.train.step.forward_backward``: 2 micro-batches, all but the last under
    ``no_sync()``; its FLOP count and bf16 peak table): ShardedAMS vs DDP + AdamW(fused)
    at one batch."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP

    from launcher.train.step import autocast, forward_backward, model_flops_per_token, throughput

    builder = MODELS[plan.model]
    amp = (lambda: autocast("bf16-autocast", plan.device)) if plan.device.type == "cuda" \
        else contextlib.nullcontext
    rows = []
    with _process_group(plan):
        for name in ("ShardedAMS (Grams)", "DDP + AdamW(fused=True)"):
            torch.manual_seed(0)
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(plan.device)
            model = builder(plan).to(plan.device)
            nparams = sum(p.numel() for p in model.parameters())
            if name.startswith("ShardedAMS"):
                fwd, opt = model, ShardedAMS(model, preset="grams", lr=3e-4, weight_decay=0.1,
                                             backend=plan.backend)
            else:
                fwd = DDP(model, device_ids=[plan.device.index or 0]
                          if plan.device.type == "cuda" else None)
                opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
                opt.no_sync = fwd.no_sync  # forward_backward's accumulation contract
            gen = torch.Generator(device=plan.device).manual_seed(2)
            losses, t0 = [], None
            for step in range(plan.train_steps):
                if step == plan.train_warmup:
                    _sync(plan)
                    t0 = time.perf_counter()
                x, y = _batch(model, plan, gen)
                loss = forward_backward(fwd, opt, list(zip(x.chunk(2), y.chunk(2))), amp=amp)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step in (0, plan.train_steps - 1):
                    losses.append(float(loss))
            _sync(plan)
            seconds = time.perf_counter() - t0
            tokens = x.numel() * (plan.train_steps - plan.train_warmup)
            rate = throughput(tokens, seconds, model_flops_per_token(model, x.shape[1]), 1,
                              _peak_flops(plan))
            rows.append(dict(optimizer=name, model=plan.model, params=nparams,
                             batch=f"{x.shape[0]}x{x.shape[1]} (2 micro-batches)",
                             steps_timed=plan.train_steps - plan.train_warmup,
                             tokens_per_s=rate["tokens_per_s"], tflops=rate.get("tflops"),
                             mfu=rate.get("mfu"),
                             peak_mem_gib=(torch.cuda.max_memory_allocated(plan.device) / 2 ** 30
                                           if plan.device.type == "cuda" else None),
                             loss_first=losses[0], loss_last=losses[-1]))
            if hasattr(opt, "close"):
                opt.close()
            del fwd, opt, model
    if len(rows) == 2:
        rows[0]["tokens_per_s_vs_ddp_adamw"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return {"status": "ok", "rows": rows, "peak_flops": _peak_flops(plan)}


def _peak_flops(plan: Plan) -> Optional[float]:
    from launcher.train.step import peak_bf16_flops

    return peak_bf16_flops(plan.device)


# --- overlap: the hook ----------------------------------------------------------------------


def overlap_rows(plan: Plan) -> list[dict]:
    """benchmarks/bench_overlap.py's rows (overlap off / on, DDP + ZeroRedundancyOptimizer)
    on ``plan.dist_backend`` at world size 1, for the check's model. One GPU moves no bytes
    between ranks: these rows measure what the hooks and bucket bookkeeping cost, not hidden
    communication (that needs 2+ GPUs: ``bench_overlap.py`` under torchrun)."""
    from bench_overlap import measure_overlap, summarise

    builder = MODELS[plan.model]
    with _process_group(plan):
        def build():
            torch.manual_seed(0)
            return builder(plan).to(plan.device)

        probe = build()
        gen = torch.Generator(device=plan.device).manual_seed(3)
        batches = {}

        def batch_fn(step: int):
            if step not in batches:
                batches[step] = _batch(probe, plan, gen)
            return batches[step]

        def loss_fn(model, batch):
            with torch.autocast(plan.device.type, dtype=torch.bfloat16,
                                enabled=plan.device.type == "cuda"):
                return model(*batch)[1]

        per_rank = measure_overlap(build, batch_fn, steps=plan.overlap_steps,
                                   rounds=plan.overlap_rounds, backend=plan.backend,
                                   loss_fn=loss_fn, device=plan.device)
        rows = summarise(per_rank)
    for r in rows:
        r["world_size"] = 1
    return rows


def section_overlap(plan: Plan) -> dict:
    return {"status": "ok", "rows": overlap_rows(plan),
            "note": "world size 1: hook overhead only, no communication to hide"}


def section_fsdp(plan: Plan) -> dict:
    """C-Adam on FSDP2 at world size 1, its count in backward or in the step
    (``gpu_check_fsdp.py``)."""
    return fsdp_section(plan, MODELS[plan.model], _process_group, _batch, _sync)


SECTIONS: dict[str, Callable[[Plan], dict]] = {
    "env": section_env, "static": section_static, "correctness": section_correctness,
    "pytest": section_pytest, "bandwidth": section_bandwidth, "step": section_step,
    "sharded": section_sharded,
    "training": section_training, "overlap": section_overlap, "fsdp": section_fsdp,
}
