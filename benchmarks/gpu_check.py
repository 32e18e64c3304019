"""One command that tests, measures and records the CUDA path on one GPU (issue 14).

    python benchmarks/gpu_check.py --out "$OUT"              # on one H100/H200: < 8 min
    python benchmarks/gpu_check.py --device cpu --out DIR    # the dry run (CI): < 60 s

The dry run runs the same code at tiny sizes on the CPU: the Triton kernel under
``TRITON_INTERPRET=1`` (in a subprocess, as the variable must be set before triton is
imported), gloo in place of NCCL, a host clock in place of CUDA events; only what needs a
GPU (CUDA graphs, the peak-FLOP/s table) is recorded as skipped. So nothing in the GPU
run is run there for the first time.

Sections, in order (``gpu_check_sections.py``, ``gpu_check_correctness.py``; each is timed,
and its error, if any, is recorded without stopping the others):

1. ``env``: device, driver, CUDA, torch, triton, date, git SHA.
2. ``static``: the kernel compiled for the GPU (sm_90 in the dry run) without launching:
   PTX vector loads (``ld.global.v4``) and fma instructions, with and without fp fusion.
3. ``correctness``: the Triton kernel against the float64 reference over 100 steps (5 in
   the dry run) for Grams, C-Adam, AdamW and lam=-0.5/beta3=0.9, each with fp32, bf16 and
   fp16 params, on ~50M elements in pieces of several tensors (a tensor split in two,
   padding between, sizes both multiples of 16 and not): params, m, v and s, element-wise
   AND norm-wise (one element that missed its last update must be caught), the model-dtype copy
   exactly, and bf16 moment storage checked to round to nearest even.
4. ``pytest``: ``pytest -m gpu`` over ``GPU_TEST_FILES`` (they skip without CUDA).
5. ``bandwidth``: ``bench_gpu.bandwidth_rows``: every kernel mode and torch AdamW fused and
   foreach against the copy ceiling at 1M..1B elements, a non-power-of-two size, the GPT
   set as a multi-piece run, and CUDA-graph replays; the targets (>= 90% of copy bandwidth
   at >= 64M elements; not slower than fused AdamW at equal bytes) are evaluated.
6. ``sharded``: ``ShardedAMS`` on NCCL at world size 1: its step time, and its params
   against an unsharded ``AMS`` stepped with the same gradients.
7. ``training``: ~50 bf16 (autocast) steps of ``--model`` (the Llama 60M; or gpt), ShardedAMS
   against DDP + ``torch.optim.AdamW(fused=True)`` at the same batch: tokens/s, MFU, peak
   memory.
8. ``overlap``: ``overlap_rows`` (the hook the ``overlap`` work wires to its benchmark).

Writes ``gpu_check.json`` (every number) and ``gpu_check.md`` (the tables) into ``--out``
and prints the markdown last. Exit status 1 if any correctness check or section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import gpu_check_sections as sections  # noqa: E402
from gpu_check_plan import make_plan  # noqa: E402

#: sections that launch the Triton kernel (under the interpreter in the dry run)
KERNEL_SECTIONS = ("correctness", "bandwidth", "sharded", "training", "overlap")
ALL_SECTIONS = ("env", "static", "correctness", "pytest", "bandwidth", "sharded", "training",
                "overlap")


def _run_sections(names, plan) -> dict:
    results = {}
    for name in names:
        results[name] = sections.run_section(name, plan)
        print(f"[gpu_check] {name}: {results[name]['status']} "
              f"({results[name]['seconds']:.1f} s)", flush=True)
    return results


def _interpreted_child(names, args) -> dict:
    """The dry run's kernel sections, in a subprocess with TRITON_INTERPRET=1."""
    out = Path(args.out) / "kernel_sections.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--out", args.out,
           "--model", args.model, "--sections", *names, "--child-json", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.budget_s)
    if proc.returncode not in (0, 1) or not out.exists():
        return {n: {"status": "error", "seconds": 0.0,
                    "error": f"interpreted subprocess exited {proc.returncode}"} for n in names}
    results = json.loads(out.read_text())
    out.unlink()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (the check) or cpu (the dry run: tiny sizes, same code)")
    ap.add_argument("--dry-run", action="store_true", help="the same as --device cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"),
                    help="where gpu_check.json and gpu_check.md go (default $OUT, else "
                         "benchmarks/results)")
    ap.add_argument("--sections", nargs="*", choices=ALL_SECTIONS, default=list(ALL_SECTIONS))
    ap.add_argument("--model", default="llama-60m",
                    help="model of the training section: llama-60m (default) or gpt "
                         "(GPT-2 small); gpu_check_sections.MODELS")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget; later sections are skipped when it runs out "
                         "(default 420 s on CUDA, 120 s on CPU)")
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    args.budget_s = args.budget_s or (420.0 if args.device == "cuda" else 120.0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.device, args.model, args.budget_s)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    if args.child_json:  # the dry run's interpreted subprocess
        Path(args.child_json).write_text(json.dumps(_run_sections(args.sections, plan),
                                                    default=str))
        return 0
    t0 = time.time()
    if args.device == "cpu" and not interpreted:
        here = [n for n in args.sections if n not in KERNEL_SECTIONS]
        child = [n for n in args.sections if n in KERNEL_SECTIONS]
        results = _run_sections(here, plan)
        if child:
            results.update(_interpreted_child(child, args))
        results = {n: results[n] for n in args.sections}
    else:
        results = _run_sections(args.sections, plan)
    report = {"check": "gpu_check", "device": args.device, "seconds": time.time() - t0,
              "plan": plan.describe(), "sections": results,
              "passed": all(r["status"] in ("ok", "skipped") for r in results.values())}
    md = sections.markdown(report)
    Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    Path(args.out, "gpu_check.md").write_text(md + "\n")
    print(md, flush=True)
    print(f"\n[gpu_check] {'PASSED' if report['passed'] else 'FAILED'} in "
          f"{report['seconds']:.0f} s; wrote {Path(args.out, 'gpu_check.json')}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
