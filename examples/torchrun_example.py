"""ShardedAMS under plain ``torchrun``: data-parallel GPT training with no Ray and no DDP.

    torchrun --nproc-per-node 2 examples/torchrun_example.py                 # CPU: gloo
    torchrun --nproc-per-node 8 examples/torchrun_example.py --steps 2000    # GPUs: nccl
    torchrun --nproc-per-node 2 examples/torchrun_example.py --steps 300     # again: resumes

What it shows:

* ``ShardedAMS`` replaces both DDP and the optimizer: ``loss.backward(); opt.step();
  opt.zero_grad()`` reduces the gradients, clips them by the global norm, runs the Grams
  step on this rank's shard of the fp32 state and gathers the params;
* each rank trains on its slice of a global batch that depends only on (seed, step), so a
  resumed run sees the same data as an uninterrupted one, on any number of ranks;
* ``CheckpointManager`` writes ``--ckpt-dir/step-XXXXXXXX`` every ``--checkpoint-every``
  steps (asynchronously: the files are written in a background thread while training
  goes on, and committed with a manifest at the next save or at the end), keeps the
  newest ``--keep-last``, and ``load_latest`` resumes from the newest complete one: run
  the same command again, with as many ranks as you like (the state is resharded).

The launcher's Ray version of this loop is ``launcher/train/loop.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launcher.data.corpus import estimate_loss, get_batch, load_corpus, split  # noqa: E402
from launcher.train.models.gpt import GPT, GPTConfig  # noqa: E402
from sharded_ams import ShardedAMS  # noqa: E402
from sharded_ams.checkpoint import CheckpointManager  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="GLOBAL batch in sequences, split over the ranks (default 16)")
    p.add_argument("--block-size", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear LR warmup (default 20)")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "compiled", "triton"],
                   help="ShardedAMS step kernel (default auto)")
    p.add_argument("--ckpt-dir", default="out/torchrun_example", help="checkpoint directory")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="corpus size in bytes")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order seed")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT: init from the environment
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        # Same seed on every rank; ShardedAMS also broadcasts rank 0's params, as DDP does.
        torch.manual_seed(args.seed)
        model = GPT(GPTConfig(block_size=args.block_size)).to(device)
        opt = ShardedAMS(model, preset="grams", lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                         max_grad_norm=1.0, backend=args.backend)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))

        # Resume from the newest complete checkpoint, if any (all ranks call it).
        ckpts = CheckpointManager(args.ckpt_dir, keep_last=args.keep_last)
        state = ckpts.load_latest(opt, model=model, lr_scheduler=sched)
        step = state["step"] if state else 0
        if rank == 0:
            where = f"resumed from {state['path']} (step {step})" if state else "starting from scratch"
            print(f"{world_size} rank(s), {device.type}, {dist.get_backend()}, "
                  f"backend {opt.backend}: {where}", flush=True)

        train, val = split(load_corpus(args.max_bytes), 0.1)
        t0, done_before = time.perf_counter(), step
        while step < args.steps:
            x, y = get_batch(train, step, args.batch_size, args.block_size, seed=args.seed,
                             rank=rank, world_size=world_size)  # this rank's slice of step's batch
            _, loss = model(x.to(device), y.to(device))
            loss.backward()
            opt.step()          # reduce grads, clip, Grams step on this rank's shard, gather params
            opt.zero_grad()
            sched.step()
            step += 1
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                rate = (step - done_before) * args.batch_size * args.block_size / (time.perf_counter() - t0)
                print(f"step {step}/{args.steps} | loss {loss.item():.4f} (rank 0) | "
                      f"grad norm {opt.last_step.grad_norm:.3f} | {rate:,.0f} tok/s", flush=True)
            if step % args.checkpoint_every == 0 or step == args.steps:
                # async: snapshot now, write in the background, commit at the next save/wait
                ckpts.save(step, opt, model=model, lr_scheduler=sched, async_save=True,
                           extra={"world_size": world_size})
        ckpts.wait()  # commit the last checkpoint (a collective: every rank calls it)

        val_loss = estimate_loss(model, val, args.batch_size, args.block_size, iters=8, seed=args.seed)
        if rank == 0:
            latest = ckpts.latest()
            print(f"done: step {step}/{args.steps}, val loss {val_loss:.4f}, checkpoint {latest}",
                  flush=True)
    finally:
        dist.destroy_process_group()  # gloo processes that skip this can abort at exit


if __name__ == "__main__":
    main()
