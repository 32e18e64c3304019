"""A worker dies mid-run and the run goes on from its last checkpoint (Ray Train restart).

    python examples/resume_demo.py                 # 60 steps, rank 1 exits after step 50
    python examples/resume_demo.py --no-compare    # skip the uninterrupted reference run

What it shows: the launcher's fault injection (``job.fail_at_step`` / ``job.fail_rank``)
makes one worker ``os._exit(1)`` right after an optimizer step, once per run. Ray Train
restarts the whole worker group (``job.max_failures`` allows it) and every rank loads the
last committed checkpoint (``--checkpoint-every``, default 20: step 40), redoes the steps
after it and finishes. It prints the step the run resumed at and the number of restarts,
then trains the same job uninterrupted and compares the final losses and every parameter
and optimizer-state tensor: the batches are a function of (seed, step) and the sharded
state is checkpointed exactly, so they are bitwise equal. Run dirs: ``--out`` (default
out/resume_demo)/runs/{killed,uninterrupted}, deleted at the next start.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (default 20)")
    ap.add_argument("--fail-at-step", type=int, default=50,
                    help="the worker exits right after this step (default 50)")
    ap.add_argument("--fail-rank", type=int, default=1, help="rank that exits (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    ap.add_argument("--backend", default="eager", choices=_common.BACKENDS,
                    help="ShardedAMS step kernel (default eager: no torch.compile in the workers)")
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="skip the uninterrupted run and the comparison")
    ap.add_argument("--out", default="out/resume_demo", help="output directory (default out/resume_demo)")
    a = ap.parse_args(argv)
    if not 1 <= a.fail_at_step <= a.steps:
        ap.error(f"--fail-at-step must be in [1, --steps={a.steps}], got {a.fail_at_step}")
    if not 0 <= a.fail_rank < a.workers:
        ap.error(f"--fail-rank must be in [0, --workers={a.workers}), got {a.fail_rank}")
    return a


def config(a: argparse.Namespace, name: str, fail: bool):
    job = {"checkpoint_every": a.checkpoint_every, "keep_last": 2, "max_failures": 1,
           "log_every": min(10, a.checkpoint_every), "eval_every": 0}
    if fail:
        job.update(fail_at_step=a.fail_at_step, fail_rank=a.fail_rank)
    return _common.make_config(Path(a.out) / "runs", name, steps=a.steps, workers=a.workers,
                               backend=a.backend, log_every=job["log_every"], eval_every=0,
                               job=job)


def _run(cfg):
    from launcher.run.driver import run

    shutil.rmtree(cfg.job.run_dir, ignore_errors=True)  # a fresh run, not a resume of the last demo
    return run(cfg)


def compare(a_ckpt: str, b_ckpt: str) -> tuple[int, int]:
    """(tensors compared, tensors not bitwise equal) over params and optimizer state."""
    import torch

    from sharded_ams.checkpoint import consolidate

    a, b = consolidate(a_ckpt), consolidate(b_ckpt)
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    pairs += [(sa[i][k], sb[i][k]) for i in sa for k in sa[i]]
    return len(pairs), sum(not torch.equal(x, y) for x, y in pairs)


def main(argv: Optional[list[str]] = None) -> dict:
    """Returns ``{"restarts", "resumed_at", "step", "killed", "uninterrupted", "differing"}``
    (the last two None with ``--no-compare``)."""
    a = parse_args(argv)
    killed_cfg = config(a, "killed", fail=True)
    # the worker exits before that step's checkpoint is saved: the last one is strictly before it
    expected = (a.fail_at_step - 1) // a.checkpoint_every * a.checkpoint_every
    print(f"[example] rank {a.fail_rank} of {a.workers} exits after step {a.fail_at_step}; "
          f"checkpoints every {a.checkpoint_every} steps, so the run should resume at step {expected}",
          flush=True)
    ref = differing = None
    with _common.local_ray(a.workers):
        killed = _run(killed_cfg)
        if a.compare:
            print("\n[example] the same job, uninterrupted:", flush=True)
            ref = _run(config(a, "uninterrupted", fail=False))
    print(f"\nworker killed after step {a.fail_at_step}: {killed.restarts} restart(s); "
          f"the restarted workers resumed at step {killed.start_step} (the last checkpoint) and "
          f"finished at step {killed.step}/{a.steps}", flush=True)
    if ref is not None:
        n, differing = compare(killed.checkpoint, ref.checkpoint)
        print(f"\n| run | restarts | resumed at | final train loss | final val loss |\n|---|---:|---:|---:|---:|\n"
              f"| killed at step {a.fail_at_step} | {killed.restarts} | {killed.start_step} | "
              f"{killed.train_loss:.6f} | {killed.val_loss:.6f} |\n"
              f"| uninterrupted | {ref.restarts} | {ref.start_step} | {ref.train_loss:.6f} | {ref.val_loss:.6f} |")
        print(f"\nfinal params + optimizer state: {n - differing}/{n} tensors bitwise equal"
              + ("" if differing else " (identical runs)"), flush=True)
    return {"restarts": killed.restarts, "resumed_at": killed.start_step, "step": killed.step,
            "killed": killed, "uninterrupted": ref, "differing": differing}


if __name__ == "__main__":
    main()
