"""A byte-level text corpus that needs no download, and rank-aware deterministic batching.

The corpus is the Python standard library's own ``*.py`` sources: present on every
machine that can run this code, identical for a given Python version, and real text.

Batching contract (what sharded-vs-unsharded and resume-after-failure tests rely on):
the *global* batch for a step is a pure function of ``(seed, step)``; each rank takes a
contiguous slice of it. So the concatenation of all ranks' batches, in rank order, equals
the ``world_size=1`` batch exactly, whatever the world size and whatever happened before.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch
import torch.nn as nn

# Directory names pruned from the walk: third-party code, test suites (huge, odd content),
# and bytecode caches.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}
)
# File-name prefixes whose content depends on the build machine, not on the Python version.
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)


def _stdlib_sources() -> list[tuple[str, str]]:
    """Sorted (relative POSIX path, absolute path) of the stdlib's ``*.py`` files."""
    root = os.path.dirname(os.__file__)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # `config-3.x-<platform>` holds build-machine specific files (e.g. python-config.py).
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_EXCLUDED_FILE_PREFIXES):
                full = os.path.join(dirpath, name)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()  # os.walk order is filesystem-dependent; sorting makes the corpus reproducible
    return found


@functools.lru_cache(maxsize=None)
def load_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of exactly ``min(max_bytes, total)`` bytes.

    Files are concatenated in sorted path order, each preceded by a ``# ---- <path> ----``
    header line, and reading stops once ``max_bytes`` is reached (so the default is fast).
    Cached per process: the same tensor object is returned on every call, so do not
    modify it in place.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    buf = bytearray()
    for rel, full in _stdlib_sources():
        if len(buf) >= max_bytes:
            break
        with open(full, "rb") as f:
            buf += b"# ---- " + rel.encode() + b" ----\n" + f.read() + b"\n"
    if not buf:
        raise RuntimeError(f"no standard-library sources found under {os.path.dirname(os.__file__)}")
    del buf[max_bytes:]
    # clone: own the storage rather than alias the bytearray (share_memory_, pinning, pickling).
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def split(corpus: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (train, val) views of ``corpus``, val taken from the end.

    Contiguous rather than interleaved so no training window overlaps validation text
    (except across the single boundary).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(corpus) * val_fraction)
    if n_val == 0 or n_val == len(corpus):
        raise ValueError(f"corpus of {len(corpus)} bytes is too small for val_fraction={val_fraction}")
    return corpus[:-n_val], corpus[-n_val:]


def _step_generator(seed: int, step: int) -> torch.Generator:
    # Hash (seed, step) into a 64-bit seed: unlike e.g. seed * K + step, distinct pairs
    # cannot collide in practice, and neighbouring steps get unrelated streams.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def batch_starts(num_starts: int, step: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> torch.Tensor:
    """Window starts in ``[0, num_starts)`` of this rank's rows of the global batch of ``step``.

    The global batch's ``batch_size`` starts depend only on ``(seed, step)`` (a local
    generator; the global RNG is never touched); rank ``r`` gets rows
    ``[r * B/W, (r + 1) * B/W)``. Shared by every data source, so batches (and resumes) do
    not depend on where the tokens are stored.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"global batch_size ({batch_size}) must be divisible by world_size ({world_size}) "
            "so every rank gets an equal slice of the same global batch"
        )
    # Draw the whole global batch (cheap: B ints) so every rank sees the same offsets.
    starts = torch.randint(num_starts, (batch_size,), generator=_step_generator(seed, step))
    per_rank = batch_size // world_size
    return starts[rank * per_rank : (rank + 1) * per_rank]


def get_batch(
    data: torch.Tensor,
    step: int,
    batch_size: int,
    block_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch for ``step``.

    Returns int64 ``(x, y)``, each of shape ``(batch_size // world_size, block_size)``.

    ``batch_size`` is the GLOBAL batch size; the rows are :func:`batch_starts`'s windows.
    ``y`` is ``x`` shifted left by one token (next-token targets).
    """
    if block_size <= 0:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
    if data.dim() != 1 or len(data) <= block_size:
        raise ValueError(
            f"data must be 1-D and longer than block_size ({block_size}), got shape {tuple(data.shape)}"
        )
    starts = batch_starts(len(data) - block_size, step, batch_size, seed=seed, rank=rank,
                          world_size=world_size)
    windows = data[starts[:, None] + torch.arange(block_size + 1)].long()  # (b, block_size + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@torch.no_grad()
def estimate_loss(
    model: nn.Module, data: torch.Tensor, batch_size: int, block_size: int, iters: int, seed: int
) -> float:
    """Mean loss over ``iters`` fixed batches (steps 0..iters-1 under ``seed``).

    Fixed batches make the number comparable across evaluations and runs. The model is put
    in eval mode for the duration and its previous mode restored afterwards.
    """
    if iters <= 0:
        raise ValueError(f"iters must be positive, got {iters}")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        total = 0.0
        for i in range(iters):
            x, y = get_batch(data, i, batch_size, block_size, seed=seed)
            _, loss = model(x.to(device), y.to(device))
            total += loss.item()
    finally:
        model.train(was_training)
    return total / iters
