"""What the multi-rank benchmarks share: spawning N local gloo processes (CPU), the GPT
they train, its batches and their command-line arguments.

    rows = run_on_ranks(fn, 2, args)   # [fn(rank, world, args) on rank 0, 1]

``fn`` must be importable by reference (a module-level function of the benchmark script);
it runs with the default process group initialised (gloo) and ``threads`` torch threads
(default: cores // world size, at least 1). A rank's exception comes back as a
RuntimeError with its traceback; the whole job is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from argparse import ArgumentParser, Namespace
from typing import Any, Callable, Optional


def default_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, out_dir: str, args: Any,
            threads: int, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        result = ("ok", fn(rank, world, args))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", traceback.format_exc())
    finally:
        gc.collect()  # drop lingering Work objects before their process group goes
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo aborts at exit otherwise (3+ ranks)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # The result is on disk: skip interpreter teardown, where gloo on torch 2.13 still
    # aborts now and then after a clean destroy ("terminate called without an active
    # exception", SIGABRT; seen with 2 ranks in CI's bench_checkpoint smoke test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable, world_size: int, args: Any, *, timeout: float = 1200.0,
                 threads: Optional[int] = None) -> list:
    ctx = mp.get_context("spawn")
    out_dir = tempfile.mkdtemp(prefix="bench_ranks_")
    port = _free_port()
    threads = threads or default_threads(world_size)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args, threads,
                                               timeout))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        results = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
            try:
                with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                    results.append(pickle.load(f))
            except FileNotFoundError:
                results.append(("error", f"rank {r} exited with code {p.exitcode} and wrote "
                                         "no result (killed or timed out?)"))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(out_dir, ignore_errors=True)
    errors = [f"rank {r}:\n{res[1]}" for r, res in enumerate(results) if res[0] == "error"]
    if errors:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed:\n" + "\n".join(errors))
    return [res[1] for res in results]


def add_gpt_args(ap: ArgumentParser) -> None:
    """World size, threads and the GPT (default 12.8M params: 4 x 512, byte vocabulary,
    blocks of 64 tokens, global batch 4 sequences)."""
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per rank (default: cores // world size, >= 1)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences)")


def check_gpt_args(ap: ArgumentParser, args: Namespace) -> None:
    if args.batch % args.world_size:
        ap.error("--batch must be divisible by --world-size")
    args.threads = args.threads or default_threads(args.world_size)


def gpt_model_info(args: Namespace) -> dict:
    return dict(vocab_size=256, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                block_size=args.block_size, global_batch=args.batch)


def make_gpt(args: Namespace):
    """The launcher's GPT from the args, seeded: the same weights on every call."""
    import torch

    from launcher.train.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd))


def gpt_batch(args: Namespace, step: int, rank: int, world: int):
    """This rank's share of step ``step``'s random token batch (inputs, targets)."""
    import torch

    g = torch.Generator().manual_seed(step)
    x = torch.randint(256, (args.batch, args.block_size + 1), generator=g)
    per = args.batch // world
    x = x[rank * per:(rank + 1) * per]
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over the ranks of the process group (the values as they are without one)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
