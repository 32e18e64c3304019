"""What a worker does around its training loop, without Ray (so tests run it in-process):
build the model for a precision, run one optimizer step's micro-batches, evaluate, count
throughput and MFU, write TensorBoard events.

The loss is the mean over the global batch whatever the split: every micro-batch holds the
same number of tokens, each contributes ``loss / accumulation_steps`` to the gradient, and
:class:`sharded_ams.ShardedAMS` averages the gradients over workers.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PROGRESS_TAG", "log_progress", "resolve_precision", "build_model_for_training", "autocast", "loss_of",
           "device_batch", "forward_backward", "split_micro", "evaluate", "model_flops_per_token", "peak_bf16_flops", "peak_bf16_tflops", "throughput", "TensorBoardLog"]

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# in order, as whole words and ignoring case, against torch.cuda.get_device_name(); the first
# match wins, so the PCIe and NVL cards come before the plain name (the SXM part, whose
# name is "NVIDIA H100 80GB HBM3"). Unknown devices get TFLOP/s but no MFU.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),       # Grace Hopper: the H100 SXM's tensor cores
    ("H200 NVL", 835.0),    # H200 NVL (PCIe card): 1,671 with sparsity
    ("H200", 989.0),        # H200 SXM
    ("H100 NVL", 835.0),    # 1,671 with sparsity (per GPU)
    ("H100 PCIe", 756.0),   # 1,513 with sparsity
    ("H100", 989.0),        # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0), ("H800", 989.0), ("H20", 148.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
)


# Lines that start with this tag are progress lines; the driver shows them without
# Ray's "(RayTrainWorker pid=...)" prefix (see launcher.run.console).
PROGRESS_TAG = "[sharded-ams]"


def log_progress(msg: str) -> None:
    """A worker's progress line. sys.stdout rather than print(): Ray Train patches print()
    into its logger, which can show a line twice on the driver."""
    sys.stdout.write(f"{PROGRESS_TAG} {msg}\n")
    sys.stdout.flush()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``model.precision`` with "auto" decided: bf16 params (fp32 masters in ShardedAMS) on
    CUDA, fp32 elsewhere. bf16 rather than bf16-autocast: 6 + 12/N bytes per param instead of
    8 + 8/N plus autocast's bf16 weight copies, and half the bytes in every param gather."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_model_for_training(table: Mapping[str, Any], device: torch.device, precision: str) -> nn.Module:
    """The ``[model]`` table's model on ``device``, in bf16 for precision "bf16" (ShardedAMS
    then keeps fp32 masters), with activation checkpointing if asked. Seed the RNG first:
    every rank must build the same initial weights."""
    from launcher.train.models import build_model

    model = build_model(table)
    if table.get("activation_checkpointing"):
        model.activation_checkpointing = True
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device)


def autocast(precision: str, device: torch.device):
    """The forward/backward context: bf16 autocast for "bf16-autocast", nothing otherwise."""
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_of(output: Any, targets: torch.Tensor, where: str = "the model") -> torch.Tensor:
    """The scalar loss from ``model(x, y)``'s output: a 0-d loss, ``(logits, loss)`` as the
    built-ins return, or logits (B, T, vocab) (then the mean next-token cross-entropy)."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], torch.Tensor):
        output = output[1]
    if isinstance(output, torch.Tensor):
        if output.dim() == 0:
            return output
        if output.dim() == 3 and output.shape[:2] == targets.shape:
            return F.cross_entropy(output.float().flatten(0, 1), targets.flatten())
    desc = (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
            else type(output).__name__)
    raise ValueError(f"{where}: forward(x, y) returned {desc}; expected a scalar loss, "
                     f"(logits, loss), or logits of shape (B, T, vocab) for x of shape {tuple(targets.shape)}")


def split_micro(x: torch.Tensor, y: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows cut into ``steps`` equal micro-batches, in order."""
    if x.shape[0] % steps:
        raise ValueError(f"{x.shape[0]} rows do not split into {steps} equal micro-batches")
    return list(zip(x.chunk(steps), y.chunk(steps)))


def device_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's ``(x, y)`` on ``device``. On CUDA both go through one pinned host buffer in
    one non-blocking copy: a copy from pageable memory blocks the host until it is done,
    which stops the CPU from queueing the step's kernels ahead of the GPU (the caching host
    allocator keeps the buffer until the copy has finished). Elsewhere they are moved (on
    the CPU: returned) as they are."""
    if device.type != "cuda":
        return x.to(device), y.to(device)
    if x.shape != y.shape or x.dtype != y.dtype:
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    staged = torch.empty((2, *x.shape), dtype=x.dtype, pin_memory=True)
    staged[0].copy_(x)
    staged[1].copy_(y)
    both = staged.to(device, non_blocking=True)
    return both[0], both[1]


def forward_backward(model: nn.Module, optimizer, micro_batches: list, *, amp=contextlib.nullcontext,
                     where: str = "the model") -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches (the step itself is the
    caller's): each adds ``loss / n`` to the gradients; all but the last run under
    ``optimizer.no_sync()``, so gradients are reduced once per optimizer step. Returns the
    mean loss of the micro-batches (detached)."""
    n = len(micro_batches)
    total = torch.zeros((), dtype=torch.float32, device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 else optimizer.no_sync()
        with sync:
            with amp():
                loss = loss_of(model(x, y), y, where)
            (loss / n).backward()
        total += loss.detach().float()
    return total / n


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int, micro_batch_size: Optional[int],
             block_size: int, iters: int, seed: int, rank: int, world_size: int,
             device: torch.device, amp=contextlib.nullcontext, where: str = "the model",
             group=None) -> float:
    """Mean validation loss over ``iters`` fixed global batches (batches 0..iters-1 of the
    validation split), each rank taking its slice in micro-batches; the same number on any
    world size, up to float rounding. ``rank``/``world_size`` are the data-parallel ones and
    ``group`` their process group (None: the world), under tensor parallelism."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(iters):
        x, y = data.get_batch("val", i, batch_size, block_size, seed=seed, rank=rank, world_size=world_size)
        x, y = device_batch(x, y, device)
        chunks = split_micro(x, y, x.shape[0] // (micro_batch_size or x.shape[0]))
        for cx, cy in chunks:
            with amp():
                total += loss_of(model(cx, cy), cy, where).double() / len(chunks)
    if world_size > 1:
        dist.all_reduce(total, group=group)
    model.train(was_training)
    return total.item() / (iters * world_size)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: the model's own count (the built-ins add attention), else
    6 x its trainable parameters."""
    fn = getattr(model, "flops_per_token", None)
    if callable(fn):
        return float(fn(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a device named ``name`` (as
    ``torch.cuda.get_device_name`` spells it), from :data:`PEAK_BF16_TFLOPS`; None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key).replace(r"\ ", r"[\s_-]+")
                     + r"(?![A-Za-z0-9])", name, re.IGNORECASE):
            return tflops
    return None


def peak_bf16_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s (:func:`peak_bf16_tflops` of its name)."""
    if device.type != "cuda":
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def throughput(tokens: int, seconds: float, flops_per_token: Optional[float], world_size: int,
               peak: Optional[float]) -> dict[str, float]:
    """``tokens_per_s`` (all workers), ``tflops`` (achieved model TFLOP/s per worker) and,
    with a known peak, ``mfu`` (fraction of it)."""
    out = {"tokens_per_s": tokens / max(seconds, 1e-9)}
    if flops_per_token:
        per_worker = flops_per_token * out["tokens_per_s"] / world_size
        out["tflops"] = per_worker / 1e12
        if peak:
            out["mfu"] = per_worker / peak
    return out


class TensorBoardLog:
    """Rank 0's TensorBoard event files in ``run_dir/tensorboard`` (local or NFS run dirs).

    A restarted or resumed run purges the events after its start step (``purge_step``), so
    re-trained steps are not drawn twice. Without the ``tensorboard`` package (or on an
    object store) it says so once and does nothing."""

    def __init__(self, run_dir: str, start_step: int, log=print):
        self.writer = None
        if "://" in run_dir:
            log("TensorBoard events not written: they need a local or NFS run dir")
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log(f"TensorBoard events not written ({exc}); pip install tensorboard")
            return
        self.writer = SummaryWriter(log_dir=f"{run_dir}/tensorboard", purge_step=start_step + 1)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if key not in ("step", "start_step", "world_size") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(_TB_NAMES.get(key, f"train/{key}"), value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


_TB_NAMES = {"loss": "loss/train", "val_loss": "loss/val"}

