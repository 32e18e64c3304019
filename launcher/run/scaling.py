"""How a job scales: its worker count (fixed, or an elastic range) and how the global batch
splits over the workers.

The training maths does not depend on the worker count: ``data.batch_size`` is the global
batch of every optimizer step; each of W workers takes ``batch_size / W`` of its rows, in
``accumulation_steps`` micro-batches of ``micro_batch_size`` rows; the loss is the mean
over the global batch (each micro-batch adds ``loss / accumulation_steps``, ShardedAMS
averages over workers). That needs every worker to hold the same number of rows.

**The rule for a global batch the workers cannot split evenly:** it is refused. Every
worker count the job may run on (each W in an elastic range ``[min, max]``) must divide
``batch_size``, and ``micro_batch_size`` (when set) must divide ``batch_size / W``. Uneven
shares would need a weighted mean over workers (ShardedAMS averages uniformly) and
unequal micro-batches; padding or dropping rows would change the global batch with the
worker count. The check runs when the config is built, on the driver, for every W, so a
resize can never meet a size it cannot train on; the error names the counts that fail
and the smallest global batches that fit them all.

No torch or ray here: the CLI checks a config in milliseconds.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Union

__all__ = ["parse_num_workers", "worker_range", "accumulation_steps", "check_batch_split",
           "nearest_batches", "oversubscription_warning"]

NumWorkers = Union[int, list]
_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_num_workers(value: Any) -> NumWorkers:
    """``job.num_workers`` as given (``4``, ``[2, 4]``, ``"2-4"``, ``"4"``) -> an int (a fixed
    size) or ``[min, max]`` with ``1 <= min < max`` (an elastic range; ``[n, n]`` is ``n``).
    Raises ValueError naming ``job.num_workers``."""
    raw = value
    if isinstance(value, str):
        m = _RANGE_RE.match(value)
        if m:
            value = [int(m.group(1)), int(m.group(2))]
        elif value.strip().isdigit():
            value = int(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        lo, hi = value
        if lo < 1 or lo > hi:
            raise ValueError(f"job.num_workers must be [min, max] with 1 <= min <= max, got {raw!r}")
        return lo if lo == hi else [lo, hi]
    if type(value) is int:
        if value < 1:
            raise ValueError(f"job.num_workers must be >= 1, got {raw!r}")
        return value
    raise ValueError(f"job.num_workers must be a worker count (4) or an elastic range [min, max] "
                     f"([2, 4]; \"2-4\" on the command line), got {raw!r}")


def worker_range(num_workers: NumWorkers) -> tuple[int, int]:
    """(min, max) of a parsed ``job.num_workers`` (min == max for a fixed size)."""
    if isinstance(num_workers, int):
        return num_workers, num_workers
    return num_workers[0], num_workers[1]


def accumulation_steps(global_batch: int, num_workers: int, micro_batch_size: Optional[int]) -> int:
    """Micro-batches each worker runs per optimizer step, so that
    ``global_batch = micro_batch_size * accumulation_steps * num_workers``.

    ``micro_batch_size`` None: one micro-batch of ``global_batch / num_workers`` sequences.
    The one place this is computed (config checks for every size of an elastic range, the
    training loop at whatever size it starts). Raises ValueError naming ``data.batch_size``
    / ``data.micro_batch_size`` / ``job.num_workers`` when they do not divide.
    """
    if global_batch % num_workers:
        raise ValueError(f"data.batch_size ({global_batch}) is the global batch and must be "
                         f"divisible by job.num_workers ({num_workers}); "
                         f"{nearest_batches(global_batch, num_workers * (micro_batch_size or 1))}")
    per_worker = global_batch // num_workers
    if micro_batch_size is None:
        return 1
    if per_worker % micro_batch_size:
        raise ValueError(
            f"data.micro_batch_size ({micro_batch_size}) must divide the per-worker batch "
            f"data.batch_size / job.num_workers = {global_batch} / {num_workers} = {per_worker} "
            "(global batch = micro_batch_size x accumulation steps x workers); "
            f"{nearest_batches(global_batch, num_workers * micro_batch_size)}, or a "
            f"data.micro_batch_size that divides {per_worker}")
    return per_worker // micro_batch_size


def nearest_batches(global_batch: int, unit: int) -> str:
    """'the nearest data.batch_size values that work: 15 or 18' (the multiples of ``unit`` around it)."""
    below, above = (global_batch // unit) * unit, (global_batch // unit + 1) * unit
    sizes = f"{below} or {above}" if below > 0 else f"{above}"
    return f"the nearest data.batch_size values that work: {sizes}"


def check_batch_split(global_batch: int, num_workers: NumWorkers, micro_batch_size: Optional[int]) -> None:
    """Apply the module's rule: the global batch splits evenly at every worker count of
    ``num_workers`` (see the module docstring). ValueError otherwise."""
    lo, hi = worker_range(num_workers)
    if lo == hi:
        accumulation_steps(global_batch, lo, micro_batch_size)
        return
    bad = []
    for w in range(lo, hi + 1):
        try:
            accumulation_steps(global_batch, w, micro_batch_size)
        except ValueError:
            bad.append(w)
    if bad:
        unit = math.lcm(*range(lo, hi + 1)) * (micro_batch_size or 1)
        micro = f" x data.micro_batch_size ({micro_batch_size})" if micro_batch_size else ""
        raise ValueError(
            f"data.batch_size ({global_batch}) does not split evenly over {_counts(bad)} "
            f"worker(s), which the elastic job.num_workers [{lo}, {hi}] allows: the global batch "
            f"must be a multiple of every worker count in the range{micro}. Use a multiple of "
            f"{unit} ({nearest_batches(global_batch, unit)}) or a narrower range")


def _counts(ws: list[int]) -> str:
    return ", ".join(map(str, ws[:-1])) + (" or " if len(ws) > 1 else "") + str(ws[-1])


def oversubscription_warning(num_workers: NumWorkers, have: Optional[float], kind: str = "CPU", *,
                             local: bool) -> Optional[str]:
    """A warning when the workers do not fit the ``have`` CPUs (or GPUs, ``kind``) that Ray
    sees; None when they fit or ``have`` is unknown.

    ``local``: an embedded Ray on this machine, started with one logical CPU per worker:
    more workers than cores share them (gloo busy-waits; measured ~20x slower with 8
    workers on 2 cores). On a cluster Ray never oversubscribes: a fixed size, or the
    minimum of a range, larger than the cluster waits until enough nodes join.
    """
    lo, hi = worker_range(num_workers)
    if have is None:
        return None
    if local and hi > have:
        asked = f"{hi} workers" if lo == hi else f"up to {hi} workers (job.num_workers [{lo}, {hi}])"
        return (f"warning: {asked} on a machine with {have:g} {kind}s: workers beyond {have:g} "
                f"share {kind}s, so training is slower, not faster; lower job.num_workers "
                "(--num-workers)")
    if not local and lo > have:
        return (f"warning: {lo} workers needed to start, the Ray cluster has {have:g} {kind}s now: "
                "training waits until enough nodes join" +
                ("" if lo == hi else f" (job.num_workers [{lo}, {hi}]: lower the minimum to start sooner)"))
    return None
