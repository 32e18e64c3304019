"""Point-in-time CPU copies of what a checkpoint holds, and the RNG states.

``cpu_snapshot`` copies every device tensor of several nested objects into one pinned
CPU buffer per dtype with ``non_blocking=True`` copies and then synchronizes each device
once, so a save (async or not) blocks only for the transfer itself, not for a round trip
per tensor. CPU tensors get at most one copy (none when the caller's tensors are fresh
copies already, as ``ShardedAMS.state_dict()``'s are: it copies its state straight into
host memory with ``copy_to_host``, no device clone first).
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any, Sequence

import torch
from torch import Tensor

log = logging.getLogger("sharded_ams.checkpoint")

__all__ = ["cpu_snapshot", "copy_to_host", "rng_state", "set_rng_state", "check_weights_only"]


def _walk(obj: Any, fn) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _walk(v, fn)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, fn) for v in obj)
    return obj


def copy_to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """CPU copies of ``tensors``: one host buffer per dtype (pinned when CUDA is there),
    filled by ``copy_(non_blocking=True)``, then one synchronize per CUDA device."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    pin = torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors)
    for dtype, idx in by_dtype.items():
        buf = torch.empty(sum(tensors[i].numel() for i in idx), dtype=dtype, pin_memory=pin)
        pos = 0
        for i in idx:
            t = tensors[i]
            dst = buf[pos:pos + t.numel()].view(t.shape)
            dst.copy_(t.detach(), non_blocking=True)
            out[i] = dst
            pos += t.numel()
    for dev in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(dev)
    return out


def cpu_snapshot(objs: Sequence[Any], clone_cpu: Sequence[bool]) -> list[Any]:
    """Copies of ``objs`` (nested dicts/lists/tuples of tensors and plain values) whose
    tensors are all on the CPU and no longer alias anything that training will change:
    device tensors via :func:`copy_to_host`; CPU tensors cloned where ``clone_cpu``."""
    device: dict[int, Tensor] = {}
    for obj in objs:
        _walk(obj, lambda t: device.setdefault(id(t), t) if t.device.type != "cpu" else t)
    copies = dict(zip(device, copy_to_host(list(device.values())))) if device else {}

    def one(obj, clone):
        return _walk(obj, lambda t: copies[id(t)] if id(t) in copies
                     else (t.detach().clone() if clone else t))

    return [one(o, c) for o, c in zip(objs, clone_cpu)]


def check_weights_only(obj: Any, what: str) -> None:
    """Fail at save time (not at resume time) if ``obj`` will not load with weights_only."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:
        raise TypeError(f"{what} must hold only tensors and plain Python values (dict, list, "
                        f"tuple, str, int, float, bool, None) so that it loads with "
                        f"torch.load(weights_only=True): {exc}") from exc


def rng_state() -> dict:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        ns = np.random.get_state(legacy=False)
        st["numpy"] = {"bit_generator": ns["bit_generator"],
                       "key": torch.from_numpy(ns["state"]["key"].astype("int64")),
                       "pos": int(ns["state"]["pos"]), "has_gauss": int(ns["has_gauss"]),
                       "gauss": float(ns["gauss"])}
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` saved (validated beforehand by validate.check_shard)."""
    torch.set_rng_state(st["torch"])
    random.setstate(tuplify(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            log.warning("not restoring CUDA RNG: saved for %d devices, %d visible",
                        len(states), torch.cuda.device_count())
    if "numpy" in st:
        import numpy as np

        ns = st["numpy"]
        np.random.set_state({"bit_generator": ns["bit_generator"],
                             "state": {"key": ns["key"].numpy().astype("uint32"),
                                       "pos": ns["pos"]},
                             "has_gauss": ns["has_gauss"], "gauss": ns["gauss"]})


def tuplify(x):
    """Lists back to tuples (python's RNG state after a round trip through torch.save)."""
    return tuple(tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
