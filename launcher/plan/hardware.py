"""The GPUs a plan can be for, every number with its source, and ring-collective times.

Bandwidths are per GPU and per direction (what one GPU can send while it receives as
much). NCCL's ring reduce-scatter and all-gather of S bytes over n GPUs send
S (n - 1) / n bytes per GPU (NCCL's "bus bandwidth" convention, nccl-tests
doc/PERFORMANCE.md), so time = S (n - 1) / n / bandwidth, where the bandwidth is NVLink's
when the group fits in one node and the network's per-GPU share when it spans nodes (the
ring then crosses the slowest link). These are peaks: achieved bus bandwidth is typically
70-90% of them; the plan's ``--link-efficiency`` (default 0.8) says how much.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int          #: HBM capacity
    bf16_flops: float          #: dense bf16 tensor-core peak, FLOP/s
    nvlink_bps: float          #: NVLink bytes/s per GPU per direction
    network_bps: float         #: inter-node bytes/s per GPU per direction
    hbm_bps: float             #: HBM bytes/s
    source: str


def _peak(key: str) -> float:
    """The launcher's own peak table (the one its MFU divides by)."""
    from launcher.train.step import PEAK_BF16_TFLOPS

    return dict(PEAK_BF16_TFLOPS)[key] * 1e12


# One table, one source per row.
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("h100-80gb", 80 * GIB, _peak("H100"), 450e9, 50e9, 3.35e12,
                     "NVIDIA H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s dense bf16, "
                     "NVLink 4 900 GB/s bidirectional (450 GB/s each way); DGX H100: one 400 Gb/s "
                     "ConnectX-7 (InfiniBand NDR) per GPU = 50 GB/s"),
    "h200-141gb": GPU("h200-141gb", 141 * GIB, _peak("H200"), 450e9, 50e9, 4.8e12,
                      "NVIDIA H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s, 989 TFLOP/s dense bf16, "
                      "NVLink 4 900 GB/s bidirectional; DGX H200: 400 Gb/s NDR per GPU = 50 GB/s"),
    "a100-80gb": GPU("a100-80gb", 80 * GIB, _peak("A100"), 300e9, 25e9, 2.039e12,
                     "NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s dense bf16, "
                     "NVLink 3 600 GB/s bidirectional (300 each way); DGX A100: one 200 Gb/s "
                     "HDR InfiniBand per GPU = 25 GB/s"),
}

# Memory: the datasheets' "80 GB" / "141 GB" are taken as GiB (torch shows roughly 78-79 and
# 139-140 GiB of them after the driver's reserve, which the headroom below covers).

#: fraction of the card kept free for the CUDA context, NCCL buffers and allocator
#: fragmentation (PyTorch's caching allocator typically reserves 5-10% above allocated)
HEADROOM = 0.10


def gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown --gpu {name!r}; known: {', '.join(GPUS)}") from None


def link_bps(card: GPU, group: int, gpus_per_node: int, spans_nodes: bool) -> float:
    """Bandwidth a ring over ``group`` GPUs runs at: NVLink inside one node, else the
    network's per-GPU share."""
    return card.network_bps if spans_nodes and group > 1 else card.nvlink_bps


def ring_bytes(size: float, n: int) -> float:
    """Bytes each GPU sends in a ring reduce-scatter or all-gather of ``size`` bytes over
    ``n`` GPUs (an all-reduce sends twice this)."""
    return size * (n - 1) / n if n > 1 else 0.0
