"""Where ``prepare-data``'s blocks are tokenized: in this process (``--workers 1``), in a pool
of local processes (``--workers N``), or on a Ray cluster through Ray Data (``--address``).

All three call :func:`launcher.data.encode.encode_block` on the same blocks, so they write the
same files; they differ only in who runs it. Each hands every block's record to ``on_done``
as it completes (progress, and the records the index is built from), in completion order.

Worker processes pin the tokenizer's own thread pool to one thread (``RAYON_NUM_THREADS``,
unless set): N processes on N cores, not N x N threads. ``--workers 1`` in this process keeps
the tokenizer's threads (``encode_batch`` then uses every core on its own).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Callable, Optional, Sequence

from launcher.data.blocks import Block
from launcher.data.encode import EncodeJob, encode_block
from launcher.data.tokens import DataError

__all__ = ["run_blocks", "default_workers"]


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pin_threads() -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # read when the tokenizer's pool starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # threads pinned above: no fork warning


def _exit_with(parent: int) -> None:
    """Exit once ``parent`` is gone (this process re-parented). A pool worker outlives a
    SIGKILLed prepare-data otherwise: the pool's queues keep both ends of their pipes open
    in every worker, so it would wait for work forever, holding its memory."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(parent: int) -> None:
    """``parent``: the pid of the process that made the pool, passed from there (a worker
    that starts after it died would read its new parent, 1, from ``os.getppid()``)."""
    _pin_threads()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                     name="exit-with-parent").start()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the pool now: queued blocks are dropped, running ones killed (their attempt
    directories are left for the assembly or the next run to remove)."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.join(5)


def _run_local(job: EncodeJob, blocks: Sequence[Block], workers: int, on_done: Callable[[dict], None]) -> None:
    if workers <= 1 or len(blocks) <= 1:
        for block in blocks:
            on_done(encode_block(job, block))
        return
    import multiprocessing as mp

    # spawn: a fresh interpreter per worker (no inherited tokenizer threads, locks or Ray state)
    pool = ProcessPoolExecutor(min(workers, len(blocks)), mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(encode_block, job, b) for b in blocks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                on_done(fut.result())  # a worker's DataError is raised here, as in one process
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def _ray_encode(batch: dict, job: EncodeJob) -> dict:
    """A Ray Data map_batches function: the batch's blocks (JSON) -> their records (JSON).
    Bad input comes back as a record ``{"error": message}``: Ray would hand the driver only
    the exception's traceback text, and retrying bad input cannot help."""
    _pin_threads()
    try:
        return {"record": [json.dumps(encode_block(job, Block.from_json(b))) for b in batch["block"]]}
    except DataError as exc:
        return {"record": [json.dumps({"error": str(exc)})]}


def _run_ray(job: EncodeJob, blocks: Sequence[Block], address: str, workers: Optional[int],
             on_done: Callable[[dict], None]) -> None:
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts tokens over all workers
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        items = [{"block": b.to_json()} for b in blocks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ray_encode, fn_kwargs={"job": job}, batch_size=1, num_cpus=1,
            concurrency=workers or None)  # a task lost with its node is retried elsewhere (Ray: 3 times)
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:  # then ray.shutdown (below, or the caller's) stops the other tasks
                raise DataError(record["error"])
            on_done(record)
    finally:
        if started:
            ray.shutdown()


def run_blocks(job: EncodeJob, blocks: Sequence[Block], on_done: Callable[[dict], None], *,
               workers: int = 1, address: Optional[str] = None) -> None:
    """Tokenize ``blocks`` (see the module docstring); ``address``: a Ray cluster's
    (``auto``: the running one), else local processes."""
    if not blocks:
        return
    if address:
        _run_ray(job, blocks, address, workers, on_done)
    else:
        _run_local(job, blocks, workers, on_done)
