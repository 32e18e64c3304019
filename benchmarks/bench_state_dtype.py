"""Accuracy and memory of bf16 moment storage (``ShardedAMS(state_dtype=torch.bfloat16)``).

Trains the launcher's GPT (single process, same seed and data) with m and v stored in
fp32 and in bf16 (masters stay fp32, the maths is fp32), and reports the final train and
validation loss and the optimizer-state bytes. Device-independent: runs on CPU or CUDA.

    python benchmarks/bench_state_dtype.py --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json
from launcher.data.corpus import estimate_loss, get_batch, load_corpus, split
from launcher.train.models.gpt import GPT, GPTConfig
from sharded_ams import ShardedAMS


def train(state_dtype: torch.dtype, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=64)
    model = GPT(cfg).to(device)
    opt = ShardedAMS(model, preset=args.preset, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                     max_grad_norm=1.0, backend=args.backend, state_dtype=state_dtype)
    train_data, val_data = split(load_corpus(1_000_000), 0.1)
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        x, y = get_batch(train_data, step, 16, 64)
        _, loss = model(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    tail = losses[-20:]
    return {"state_dtype": str(state_dtype).replace("torch.", ""), "steps": args.steps,
            "train_loss_last20": sum(tail) / len(tail),
            "val_loss": estimate_loss(model, val_data, 16, 64, iters=16, seed=1),
            "state_MiB": opt.state_bytes() / 2**20, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--preset", default="grams")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backend", default="eager")
    add_out_args(ap, "bench_state_dtype.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [train(dt, args, device) for dt in (torch.float32, torch.bfloat16)]
    rows[1]["val_loss_delta"] = rows[1]["val_loss"] - rows[0]["val_loss"]
    print_table(rows, ["state_dtype", "steps", "train_loss_last20", "val_loss", "val_loss_delta",
                       "state_MiB", "wall_s"])
    write_json(resolve_out(args.out, args.update_record, "bench_state_dtype.json"), {"env": env_info(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
