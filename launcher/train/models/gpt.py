"""A small GPT-style decoder-only language model: the launcher's default built-in model.

Deliberately plain (nanoGPT-like) so optimizer behaviour, not model cleverness, is
what the launcher's runs measure. ``model.arch = "llama"`` selects the Llama decoder
(:mod:`launcher.train.models.llama`) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ModelStats, run_blocks


@dataclass
class GPTConfig:
    vocab_size: int = 256
    """Token vocabulary size; 256 covers every byte of the byte-level corpus."""
    block_size: int = 64
    """Maximum context length; sizes the learned position embedding table."""
    n_layer: int = 2
    """Number of transformer blocks; small so CPU tests and demos stay fast."""
    n_head: int = 2
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 64
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability; 0 makes training bit-deterministic (no RNG draws at all)."""
    tie_weights: bool = True
    """Share the token embedding with lm_head (fewer parameters, standard for GPT-2)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def _dropout(p: float) -> nn.Module:
    # Identity rather than Dropout(0.0) so that dropout=0 provably touches no RNG state.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention via fused scaled_dot_product_attention."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = _dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: 4x expansion with GELU, as in GPT-2."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = _dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: residual stream stays un-normalised, which trains stably."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(ModelStats, nn.Module):
    """Decoder-only transformer language model over `cfg.vocab_size` tokens."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else GPTConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = _dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one Parameter, registered (and counted) once
        self.activation_checkpointing = False  # recompute each block in backward (set by the launcher)
        self.apply(self._init_weights)

    def transformer_blocks(self) -> nn.ModuleList:
        """The repeated blocks, in forward order (the launcher waits for each block's param
        gather once, at its start)."""
        return self.blocks

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # GPT-2 style N(0, 0.02): keeps initial logits small, so the loss starts near ln(vocab).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size. Returns (logits (B, T, V), mean CE loss or None)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = run_blocks(self.blocks, x, checkpointing=self.activation_checkpointing and self.training)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
