"""A Llama-family decoder whose parameters are named and shaped as Hugging Face's.

The structure follows torchtitan's ``models/llama3/model`` (an args dataclass, RMSNorm,
rotary tables computed once, attention with grouped-query heads through
``scaled_dot_product_attention``, a SwiGLU feed-forward, pre-norm blocks), with the module
names of ``transformers``' ``LlamaForCausalLM``::

    model.embed_tokens.weight                         (vocab, d)
    model.layers.{i}.input_layernorm.weight           (d,)
    model.layers.{i}.self_attn.{q,o}_proj.weight      (n_head * hd, d), (d, n_head * hd)
    model.layers.{i}.self_attn.{k,v}_proj.weight      (n_kv_head * hd, d)
    model.layers.{i}.post_attention_layernorm.weight  (d,)
    model.layers.{i}.mlp.{gate,up}_proj.weight        (intermediate, d)
    model.layers.{i}.mlp.down_proj.weight             (d, intermediate)
    model.norm.weight                                 (d,)
    lm_head.weight                                    (vocab, d)   (the embedding when tied)

so a state dict moves between the two with ``load_state_dict(strict=True)`` and no name
adapter, and :meth:`Llama.hf_config` is the matching ``config.json``. The numerics follow
Hugging Face's where they differ between implementations: RMSNorm normalises in fp32 and
casts back before the weight; rotary embeddings rotate the two halves of each head
(``rotate_half``), not interleaved pairs; no biases; initialisation N(0, init_std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ModelStats, run_blocks


@dataclass
class LlamaConfig:
    """Shape of a :class:`Llama` (field names shared with the launcher's ``[model]`` table;
    :meth:`Llama.hf_config` maps them to Hugging Face's)."""

    vocab_size: int = 256
    """Token vocabulary (``vocab_size``)."""
    block_size: int = 256
    """Longest sequence: the length of the rotary tables (``max_position_embeddings``)."""
    n_layer: int = 2
    """Decoder blocks (``num_hidden_layers``)."""
    n_head: int = 4
    """Query heads (``num_attention_heads``); must divide n_embd."""
    n_kv_head: Optional[int] = None
    """Key/value heads (``num_key_value_heads``), dividing n_head: grouped-query attention
    when fewer than n_head; unset: n_head (multi-head attention)."""
    n_embd: int = 64
    """Width of the residual stream (``hidden_size``)."""
    intermediate_size: Optional[int] = None
    """Width of the SwiGLU feed-forward; unset: 8/3 * n_embd rounded up to a multiple of 32."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (``rms_norm_eps``; 1e-6 as in the GaLore/Grams Llama configs)."""
    tie_weights: bool = False
    """Share the token embedding with lm_head (``tie_word_embeddings``)."""
    init_std: float = 0.02
    """Std of the normal init of every matrix (``initializer_range``)."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head size n_embd / n_head = {self.head_dim} must be even (rotary pairs)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 and cast back to the input
    dtype before the weight (as Hugging Face's LlamaRMSNorm, so bf16 runs match too)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``, ``sin`` of shape (length, head_dim): frequency j of the first half
    repeated in the second half (the layout ``rotate_half`` expects)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) ``x`` by position: pairs are (i, i + hd/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with ``n_kv_head`` key/value heads shared by groups of query heads."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism (launcher/train/parallel/tp.py) q/k/v are
        # column-sharded and each rank holds n_head / tp query and n_kv_head / tp kv heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_kv_head  # the same ratio on every tp rank
        if rep > 1:  # each key/value head serves `rep` consecutive query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (Hugging Face's ``LlamaModel``)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        # not in the state dict (as Hugging Face's inv_freq): recomputed from the config
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        T = idx.shape[1]
        h = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:T].to(h.dtype), self.rope_sin[:T].to(h.dtype)
        h = run_blocks(self.layers, h, cos, sin, checkpointing=checkpointing)
        return self.norm(h)


class Llama(ModelStats, nn.Module):
    """Causal language model (Hugging Face's ``LlamaForCausalLM`` parameter layout).

    ``forward(idx, targets=None) -> (logits, loss)`` as the launcher's GPT: ``idx`` (B, T)
    int64, T <= block_size; ``loss`` is the mean next-token cross-entropy over every
    position when ``targets`` (B, T) is given, else None.
    """

    def __init__(self, cfg: Optional[LlamaConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else LlamaConfig()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False  # recompute each block in backward (set by the launcher)
        self.init_weights()

    def transformer_blocks(self) -> nn.ModuleList:
        """The decoder layers, in forward order (the launcher waits for each layer's param
        gather once, at its start)."""
        return self.model.layers

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for every matrix, ones for the norms (Hugging Face's init)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.cfg.block_size}")
        h = self.model(idx, checkpointing=self.activation_checkpointing and self.training)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hf_config(self, **extra: Any) -> dict[str, Any]:
        """The ``config.json`` under which ``transformers.LlamaForCausalLM`` builds this exact
        model (``extra``: e.g. ``torch_dtype``, ``bos_token_id``, ``eos_token_id``)."""
        c = self.cfg
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": c.init_std,
            "tie_word_embeddings": c.tie_weights,
            "use_cache": True,
            **extra,
        }
