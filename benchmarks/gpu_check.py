"""One command that tests, measures and records the CUDA path on one GPU (issues 14, 21, 25).

    set -o pipefail; python3 -u benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    python3 -u benchmarks/gpu_check.py --device cpu --out DIR   # the dry run (CI)

On one H100/H200 it ends within ``--time-limit`` (330 s by default: the check and one
rerun fit a 15-minute device lease with the machine's start-up). The dry run runs the same
code at tiny sizes on the CPU: the Triton kernel under ``TRITON_INTERPRET=1``, gloo in
place of NCCL, a host clock in place of CUDA events; only what needs a GPU (CUDA graphs,
the peak-FLOP/s table) is recorded as skipped. So nothing in the GPU run is run there for
the first time.

Sections, in order (``gpu_check_plan.ALL_SECTIONS``; ``gpu_check_sections.py``,
``gpu_check_correctness.py``): ``env``, ``static`` (the kernel's PTX for the GPU),
``correctness`` (Triton against the float64 reference), ``bandwidth`` (against the copy
ceiling and torch's AdamW), ``step`` (``bench_step.py``'s rows: Grams / CAdam / ShardedAMS
defaults against torch's AdamW on a 29M GPT-like set, issue 21's ratios), then what can
hang in a collective: ``sharded`` (ShardedAMS on
NCCL at world size 1), ``training`` (the Llama 60M in bf16: tokens/s, MFU, peak memory),
``overlap``, ``fsdp`` (C-Adam on FSDP2, its count in backward or in the step: the
measurement the CUDA default of ``count_in_backward`` rests on); and last ``pytest -m gpu``.

So that a hang or a crash cannot take the numbers already measured with it:

* the driver runs the sections in child processes (``gpu_check_plan.CUDA_GROUPS``: the
  kernel sections share one, each collective section has its own) and writes
  ``gpu_check.json`` (every number) and then ``gpu_check.md`` (the tables, built from that
  JSON) after every section;
* every section has a time cap (``--cap NAME=S``; pytest at most 120 s): past it, a
  watchdog (``faulthandler``) records the section's stack in the JSON and ends its
  process, and the group's remaining sections go on in a fresh one; a section that
  raises is recorded with its traceback and the rest go on in a fresh process too (a
  CUDA error poisons its context);
* the driver dumps its own stack a minute before ``--time-limit`` and stops what is
  still running at it.

The report's state is PASSED, FAILED (a check or a section failed) or INCOMPLETE (the time
limit or a cap cut something short); the exit status is 0 only for PASSED.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import gpu_check_plan as gplan
import gpu_check_sections as sections
from gpu_check_report import write_report

#: seconds kept back at the end of the time limit to stop a child and write the report
RESERVE_S = 8.0
#: what a section's watchdog adds to its cap (at most half the cap) before it ends the
#: process (a section that checks the time itself stops first)
WATCHDOG_GRACE_S = 5.0
#: what a child may take to import torch and start, before its first section's clock runs
CHILD_START_S = 60.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (the check) or cpu (the dry run: tiny sizes, same code)")
    ap.add_argument("--dry-run", action="store_true", help="the same as --device cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"),
                    help="where gpu_check.json and gpu_check.md go (default $OUT, else "
                         "benchmarks/results)")
    ap.add_argument("--sections", nargs="*", choices=gplan.ALL_SECTIONS,
                    default=list(gplan.ALL_SECTIONS))
    ap.add_argument("--model", default="llama-60m",
                    help="model of the training section: llama-60m (default) or gpt "
                         "(GPT-2 small); gpu_check_sections.MODELS")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="the whole check ends within this many seconds (default "
                         f"{gplan.CUDA_TIME_LIMIT_S:.0f} on CUDA, {gplan.CPU_TIME_LIMIT_S:.0f} "
                         "on CPU); sections it leaves no time for are recorded as skipped")
    ap.add_argument("--cap", action="append", default=[], metavar="NAME=SECONDS",
                    help="a section's time cap (default gpu_check_plan.CUDA_CAPS / CPU_CAPS)")
    ap.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    args.time_limit = args.time_limit or (gplan.CUDA_TIME_LIMIT_S if args.device == "cuda"
                                          else gplan.CPU_TIME_LIMIT_S)
    args.caps = gplan.caps(args.device)
    for item in args.cap:
        name, _, secs = item.partition("=")
        if name not in args.caps or not secs.replace(".", "", 1).isdigit():
            ap.error(f"--cap {item!r}: expected NAME=SECONDS with NAME one of "
                     f"{', '.join(gplan.ALL_SECTIONS)}")
        args.caps[name] = float(secs)
    return args


def _section_deadline(args, name: str, deadline: float) -> float:
    return min(time.time() + args.caps[name], deadline - RESERVE_S)


# --- the child: a group's sections, one after another ----------------------------------


def _child(args) -> int:
    """Run ``args.sections`` in order; after each, rewrite ``--child-json``. A section's
    watchdog ends the process past its cap (its stack in ``<child-json>.stack``); after a
    section that raised, stop: the driver goes on in a fresh process."""
    out, stack = Path(args.child_json), Path(args.child_json + ".stack")
    inject = dict(item.split(":", 1) for item in args.inject)
    results: dict = {}
    with open(stack, "w") as wd:
        faulthandler.register(signal.SIGTERM, file=wd, all_threads=True, chain=True)
        for name in args.sections:
            plan = gplan.make_plan(args.device, args.model, 0.0)
            plan.deadline = _section_deadline(args, name, args.deadline)
            grace = min(WATCHDOG_GRACE_S, 0.5 * args.caps[name])
            faulthandler.dump_traceback_later(max(0.5, plan.time_left() + grace),
                                              exit=True, file=wd)
            print(f"[gpu_check] {name}: started (cap {plan.time_left():.0f} s)", flush=True)
            results[name] = sections.run_section(name, plan, inject.get(name))
            faulthandler.cancel_dump_traceback_later()
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(results, default=str))
            os.replace(tmp, out)
            if results[name]["status"] == "error":
                break
    return 0


# --- the driver ---------------------------------------------------------------------------


def _child_env(args, group) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    if args.device == "cpu" and any(n in gplan.KERNEL_SECTIONS for n in group):
        env["TRITON_INTERPRET"] = "1"  # must be set before triton is imported
    return env


def _run_child(args, names, deadline: float) -> dict:
    """``names`` in one child process; whatever it finished, plus an error for the section it
    was in when it died or was stopped."""
    path = Path(args.out, f".gpu_check_child_{names[0]}.json")
    stack = Path(str(path) + ".stack")
    for p in (path, stack):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--device", args.device,
           "--out", args.out, "--model", args.model, "--sections", *names,
           "--child-json", str(path), "--deadline", str(deadline),
           *[f"--cap={n}={s}" for n, s in args.caps.items()],
           *[f"--inject={i}" for i in args.inject]]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=_child_env(args, names), cwd=ROOT, start_new_session=True)
    _RUNNING.append(proc)
    try:
        rc, stopped = _watch(proc, path, names, args.caps, deadline)
    finally:
        _RUNNING.remove(proc)
    results = _read_json(path)
    dump = stack.read_text()[-3000:] if stack.exists() else ""
    for p in (path, stack):
        p.unlink(missing_ok=True)
    pending = [n for n in names if n not in results]
    if pending and (rc != 0 or stopped):
        cap = args.caps[pending[0]]
        why = (f"ran past its cap of {cap:.0f} s (or the check's time limit): ended by "
               f"{'the driver' if stopped else 'its watchdog'}" if stopped or dump
               else f"its process exited {rc}")
        spent = time.time() - t0 - sum(r.get("seconds", 0.0) for r in results.values())
        results[pending[0]] = {"status": "error", "seconds": spent,
                               "error": f"{pending[0]}: {why}\n{dump}"}
    return results


def _watch(proc: subprocess.Popen, path: Path, names, caps: dict, deadline: float):
    """Wait for the child, stopping it when the section it is in (the first without a
    result in ``path``) has run past its cap and its watchdog's grace, or the time limit
    is near. Returns (exit status, whether the driver stopped it)."""
    done, since = -1, time.time()
    while True:
        try:
            return proc.wait(timeout=0.5), False
        except subprocess.TimeoutExpired:
            pass
        finished = len(_read_json(path))
        if finished != done:  # a section ended: the next one's clock starts
            allowance = CHILD_START_S if done < 0 else 0.0
            done, since = finished, time.time() + allowance
        if finished >= len(names):
            continue
        limit = min(since + caps[names[finished]] + 2 * WATCHDOG_GRACE_S, deadline - 2.0)
        if time.time() > limit:
            return _stop(proc), True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


#: the child running now: its own session (so a stop reaches all it started), hence not
#: in the group that an outer ``timeout`` or Ctrl-C signals; :func:`_on_signal` ends it
_RUNNING: list[subprocess.Popen] = []


def _on_signal(signum, frame) -> None:
    """SIGTERM/SIGINT to the driver: end the running child (a hung one would otherwise hold
    the GPU after the driver is gone), then exit; the JSON already holds every finished
    section."""
    for proc in _RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the child's process group (its faulthandler dumps every thread's stack),
    then SIGKILL if it is still there."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
            return proc.wait(timeout=wait)
        except ProcessLookupError:
            return proc.wait()
        except subprocess.TimeoutExpired:
            continue
    return -9


def _run_pytest(args, deadline: float) -> dict:
    plan = gplan.make_plan(args.device, args.model, 0.0)
    plan.deadline = _section_deadline(args, "pytest", deadline)
    inject = dict(item.split(":", 1) for item in args.inject).get("pytest")
    return sections.run_section("pytest", plan, inject)


def _record(report: dict, args, t0: float) -> None:
    report["seconds"] = time.time() - t0
    write_report(report, args.out)


def _drive(args) -> int:
    t0 = time.time()
    deadline = t0 + args.time_limit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    faulthandler.dump_traceback_later(max(1.0, args.time_limit - 60.0), exit=False)
    names = [n for n in gplan.ALL_SECTIONS if n in args.sections]
    report = {"check": "gpu_check", "device": args.device, "state": "RUNNING",
              "time_limit_s": args.time_limit, "caps": {n: args.caps[n] for n in names},
              "plan": gplan.make_plan(args.device, args.model, 0.0).describe(), "sections": {}}
    _record(report, args, t0)
    for group in gplan.groups(args.device, names):
        todo = list(group)
        while todo:
            if deadline - RESERVE_S - time.time() < 10:
                for n in todo:
                    report["sections"][n] = {"status": "skipped", "seconds": 0.0,
                                             "reason": "the check's time limit"}
                break
            done = _run_child(args, todo, deadline)
            if not done:  # a child that said nothing: never loop on it
                done = {todo[0]: {"status": "error", "seconds": 0.0,
                                  "error": "its process ended without a result"}}
            report["sections"].update(done)
            todo = [n for n in todo if n not in done]
            _record(report, args, t0)
            _progress(done)
    if "pytest" in names:
        if deadline - RESERVE_S - time.time() < 10:
            report["sections"]["pytest"] = {"status": "skipped", "seconds": 0.0,
                                            "reason": "the check's time limit"}
        else:
            report["sections"]["pytest"] = _run_pytest(args, deadline)
        _progress({"pytest": report["sections"]["pytest"]})
    report["state"] = _state(report["sections"])
    report["passed"] = report["state"] == "PASSED"
    faulthandler.cancel_dump_traceback_later()
    report["seconds"] = time.time() - t0
    md = write_report(report, args.out)
    print(md, flush=True)
    print(f"\n[gpu_check] {report['state']} in {report['seconds']:.0f} s "
          f"(limit {args.time_limit:.0f} s); wrote {Path(args.out, 'gpu_check.json')}", flush=True)
    return 0 if report["passed"] else 1


def _state(secs: dict) -> str:
    """FAILED if a section failed or raised; INCOMPLETE if the time limit or a cap cut
    something short (a section, or a correctness case); else PASSED."""
    if any(r["status"] not in ("ok", "skipped") for r in secs.values()):
        return "FAILED"
    if any(r["status"] == "skipped" and "time" in r.get("reason", "") for r in secs.values()) \
            or secs.get("correctness", {}).get("cases_skipped_for_time"):
        return "INCOMPLETE"
    return "PASSED"


def _progress(results: dict) -> None:
    for name, res in results.items():
        print(f"[gpu_check] {name}: {res['status']} ({res.get('seconds', 0):.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    # progress lines reach a log even without ``python3 -u`` (a killed run keeps its output)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    args = _parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child_json:
        return _child(args)
    return _drive(args)


if __name__ == "__main__":
    sys.exit(main())
