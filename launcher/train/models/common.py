"""Pieces the built-in models share: running the block stack (with optional activation
checkpointing) and the model-FLOPs count behind the MFU number."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, *args, checkpointing: bool = False) -> torch.Tensor:
    """``x = block(x, *args)`` for each block. With ``checkpointing`` (training only) each
    block's activations are recomputed in backward instead of stored (per-block activation
    checkpointing, non-reentrant as torchtitan and PyTorch recommend)."""
    for block in blocks:
        if checkpointing:
            x = checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def transformer_flops_per_token(model: nn.Module, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N`` for the weight matmuls plus
    ``12 L d T`` for attention scores and their weighted sum (the PaLM paper's appendix B
    count, also nanoGPT's ``estimate_mfu``). ``N`` counts the weights of the model's
    ``nn.Linear`` layers (the output head included, tied or not); embedding lookups, norms
    and biases are not matmuls."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6.0 * matmul + 12.0 * n_layer * n_embd * seq_len


class ModelStats:
    """``num_params`` and ``flops_per_token`` for a built-in model (``self.cfg`` has
    ``n_layer`` and ``n_embd``); mixed into GPT and Llama."""

    def num_params(self) -> int:
        """Distinct trainable parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at sequence length ``seq_len`` (for MFU; see
        :func:`transformer_flops_per_token`)."""
        return transformer_flops_per_token(self, self.cfg.n_layer, self.cfg.n_embd, seq_len)
