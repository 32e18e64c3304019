"""Checks on the driver before Ray starts: what would otherwise fail in every worker, on
every restart, up to ``job.max_failures`` times.

* the data: a prepare-data directory's index, every shard's size and sha256
  (``data.verify``), or a data factory's import and return value; each split holds a
  ``data.block_size`` window;
* the vocabulary: ``model.vocab_size`` unset takes the data's; set, it must cover it;
* the model: built on the ``meta`` device (no memory, any size), so a factory that does not
  import or returns the wrong thing fails here; its parameter count and FLOPs per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from launcher.config import Config

__all__ = ["preflight", "Preflight"]


@dataclass
class Preflight:
    """The checked config (``model.vocab_size`` filled in) and what was learned doing it."""

    config: Config
    num_params: int
    flops_per_token: Optional[float]
    data: dict


def preflight(cfg: Config) -> Preflight:
    """Check ``cfg``'s data and model (see the module docstring); raise ValueError naming
    the key or file at fault."""
    import torch

    from launcher.models import build_model
    from launcher.token_data import load_training_data
    from launcher.training import model_flops_per_token

    data = load_training_data(dataclasses.asdict(cfg.data))
    data.check_block_size(cfg.data.block_size, _where(cfg))
    mcfg = cfg.model
    if mcfg.vocab_size is None:
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size)
    elif mcfg.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size ({mcfg.vocab_size}) is smaller than the data's "
                         f"vocabulary ({data.vocab_size}, {_where(cfg)})")
    cfg = dataclasses.replace(cfg, model=mcfg)
    with torch.device("meta"):
        model = build_model(dataclasses.asdict(cfg.model))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"model.factory = {cfg.model.factory!r} returned a model with no trainable parameters")
    return Preflight(cfg, n, model_flops_per_token(model, cfg.data.block_size), data.describe)


def _where(cfg: Config) -> str:
    if cfg.data.factory:
        return f"data.factory {cfg.data.factory!r}"
    if cfg.data.path:
        return f"data.path {cfg.data.path}"
    return "the standard-library corpus"
