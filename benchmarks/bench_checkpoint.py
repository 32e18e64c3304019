"""Checkpoint save/load throughput of ShardedAMS (``sharded_ams/checkpoint/``).

For world size 1 (no process group) and 2+ (gloo, spawned processes) it times, per repeat:

* ``sync``  : ``save_checkpoint`` (write + fsync + sha256 + manifest commit): blocked = total;
* ``async`` : ``save_checkpoint(async_save=True)`` returns after the CPU snapshot ("blocked",
  the time the training loop stops), ``handle.wait()`` right after gives the total;
* ``load``  : ``load_checkpoint`` into a fresh optimizer (sha256 of every file, read, copy
  into the state, re-gather of the params), same world size;
* ``dcp_sync`` / ``dcp_load``: the same state in DCP format (``save_dcp`` / ``load_dcp``,
  the format of ``fsdp`` and ``tp`` runs and of ``ckpt convert --to dcp``), for the
  cost of that format against the native one on the same optimizer.

Each rank's time is taken between barriers; the slowest rank counts. "state" is the
optimizer state of all ranks (fp32 m, v and master = the fp32 params), the bytes a
checkpoint must hold. Reads come from the page cache (the files were just written and
fsynced), so load numbers are CPU/memory bound, not disk bound. Sync and async alternate
which goes first. ``--dir /dev/shm/...`` (tmpfs) measures the CPU cost alone
(serialisation + sha256, no disk).

    python benchmarks/bench_checkpoint.py --numel 25000000 --world-sizes 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_common import add_out_args, env_info, resolve_out  # noqa: E402
from dist_bench import run_on_ranks  # noqa: E402
from sharded_ams import ShardedAMS  # noqa: E402
from sharded_ams.checkpoint import (load_checkpoint, load_dcp, save_checkpoint,  # noqa: E402
                                    save_dcp)


class Blob(nn.Module):
    """``numel`` fp32 parameters in 4 tensors (a model's worth of state, no compute)."""

    def __init__(self, numel: int):
        super().__init__()
        sizes = [numel // 4] * 3 + [numel - 3 * (numel // 4)]
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(n)) for n in sizes)


def _build(numel: int, seed: int = 0) -> tuple[Blob, ShardedAMS]:
    torch.manual_seed(seed)
    model = Blob(numel)
    opt = ShardedAMS(model, backend="eager", preset="grams", lr=1e-3)
    for p in model.parameters():  # one step with random grads: non-trivial m, v
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    return model, opt


def _timed(fn, active: bool) -> tuple[float, object]:
    if active:
        dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _bench(numel: int, repeats: int, root: str) -> list[dict]:
    """Run on every rank; returns this rank's raw timings."""
    active = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if active else 0
    model, opt = _build(numel)
    sd = opt.state_dict()  # the bytes a checkpoint holds: m, v and the fp32 masters
    state_bytes = sum(4 * pc["length"] * len(sd["state_keys"]) for pc in sd["pieces"])
    del sd
    rows = []
    for i in range(repeats):
        d_sync = Path(root) / f"sync-{i}"
        d_async = Path(root) / f"async-{i}"

        def run_sync():
            return _timed(lambda: save_checkpoint(d_sync, opt, model=model, step=i), active)[0]

        def run_async():
            if active:
                dist.barrier()
            t0 = time.perf_counter()
            h = save_checkpoint(d_async, opt, model=model, step=i, async_save=True)
            t_block = time.perf_counter() - t0
            h.wait()
            return t_block, time.perf_counter() - t0, h.write_s

        # alternate the order: a write right after another one is slower on some disks
        if i % 2 == 0:
            t_sync = run_sync()
            t_block, t_async, write_s = run_async()
        else:
            t_block, t_async, write_s = run_async()
            t_sync = run_sync()
        fresh = _build(numel, seed=1)
        t_load, _ = _timed(lambda: load_checkpoint(d_sync, fresh[1], model=fresh[0]), active)
        d_dcp = Path(root) / f"dcp-{i}"
        t_dcp, _ = _timed(lambda: save_dcp(d_dcp, model, opt, step=i), active)
        t_dcp_load, _ = _timed(lambda: load_dcp(d_dcp, fresh[0], fresh[1]), active)
        fresh = None  # free it before the next repeat
        rows.append({"repeat": i, "rank": rank, "state_bytes": state_bytes, "sync": t_sync,
                     "async_blocked": t_block, "async_total": t_async,
                     "async_write": write_s, "load": t_load, "dcp_sync": t_dcp,
                     "dcp_load": t_dcp_load})
        if active:
            dist.barrier()
        if rank == 0:
            for d in (d_sync, d_async, d_dcp):
                shutil.rmtree(d, ignore_errors=True)
    return rows


def _bench_rank(rank: int, world: int, args: tuple) -> list[dict]:
    return _bench(*args)


def run_world(world: int, numel: int, repeats: int, root: str) -> list[dict]:
    if world == 1:
        return _bench(numel, repeats, root)
    return [row for rows in run_on_ranks(_bench_rank, world, (numel, repeats, root))
            for row in rows]


def summarise(world: int, raw: list[dict]) -> list[dict]:
    """Median over repeats of the slowest rank; state bytes summed over ranks."""
    repeats = sorted({r["repeat"] for r in raw})
    ranks = {r["rank"] for r in raw}
    state = sum(r["state_bytes"] for r in raw if r["repeat"] == repeats[0])
    gb = state / 1e9

    def med(key):
        return statistics.median(max(r[key] for r in raw if r["repeat"] == i) for i in repeats)

    out = []
    for mode, blocked, total in (("sync", "sync", "sync"), ("async", "async_blocked", "async_total"),
                                 ("load", "load", "load"), ("dcp_sync", "dcp_sync", "dcp_sync"),
                                 ("dcp_load", "dcp_load", "dcp_load")):
        b, t = med(blocked), med(total)
        out.append({"world_size": world, "ranks": len(ranks), "mode": mode, "state_bytes": state,
                    "blocked_s": b, "total_s": t, "blocked_s_per_gb": b / gb,
                    "total_s_per_gb": t / gb, "gb_per_s": gb / t,
                    **({"write_s": med("async_write")} if mode == "async" else {})})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| world | mode | state (GB) | blocked (s) | total (s) | blocked s/GB | total s/GB | GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['mode']} | {r['state_bytes'] / 1e9:.3f} | "
                     f"{r['blocked_s']:.3f} | {r['total_s']:.3f} | {r['blocked_s_per_gb']:.3f} | "
                     f"{r['total_s_per_gb']:.3f} | {r['gb_per_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=25_000_000,
                    help="trainable fp32 elements (state = 12 bytes each: m, v, master)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    add_out_args(ap, "bench_checkpoint.json")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_dir_")
    Path(root).mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for w in args.world_sizes:
            rows += summarise(w, run_world(w, args.numel, args.repeats, root))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    env = env_info()
    print(f"# checkpoint save/load, {args.numel:,} params, median of {args.repeats}, "
          f"{env['device']}, torch {env['torch']}, dir {root}")
    print(table(rows))
    out = resolve_out(args.out, args.update_record, "bench_checkpoint.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": {**vars(args), "dir": root}, "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
