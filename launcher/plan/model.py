"""The model a plan is for: a named Llama size or a job config, built on the ``meta`` device
so that an 8B or 70B parameter list costs no memory, with the FLOP count the launcher's
MFU uses (:func:`launcher.train.step.model_flops_per_token`), not a second derivation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

#: vocabulary of a named size that carries none: the T5 tokenizer's (the Grams paper's
#: GaLore/C4 setting) for the GaLore sizes, bytes for "tiny"
DEFAULT_VOCAB = {"tiny": 256}
GALORE_VOCAB = 32000


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs of a model: its shape, its parameters (name, shape) in module
    order, and its training FLOPs per token at the planned sequence length."""

    name: str
    shape: dict
    params: tuple[tuple[str, tuple[int, ...]], ...]
    flops_per_token: float

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.params)

    def block_params(self) -> int:
        """Parameters of one decoder layer (FSDP's unit of gathering)."""
        return sum(math.prod(s) for n, s in self.params if n.startswith("model.layers.0."))

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, output head."""
        return sum(math.prod(s) for n, s in self.params if not n.startswith("model.layers."))


def known_models() -> list[str]:
    from launcher.train.models.sizes import SIZES

    return list(SIZES["llama"])


def is_config(model: str) -> bool:
    """``--model`` names a job config file (else a size)."""
    return model.endswith((".toml", ".yaml", ".yml")) or os.path.sep in model


def config_file(model: str) -> str:
    """``model`` if it is a file; else a one-line ValueError."""
    if not os.path.isfile(model):
        raise ValueError(f"--model {model}: no such config file")
    return model


def _shape_of(model: str, vocab: Optional[int]) -> tuple[str, dict[str, Any]]:
    """(display name, resolved llama shape) of a size name or a config file."""
    from launcher.config import ModelConfig, load_config

    if is_config(model):
        cfg = load_config(config_file(model)).model
        if cfg.factory is not None or cfg.arch != "llama":
            raise ValueError(f"--model {model}: the plan knows the built-in llama only "
                             f"(this config has {'a factory' if cfg.factory else 'arch=' + cfg.arch})")
        size = cfg.size
        name = os.path.basename(model)
    else:
        if model not in known_models():
            raise ValueError(f"unknown model {model!r}; known: {', '.join(known_models())} "
                             "or a config file (.toml)")
        cfg = ModelConfig(arch="llama", size=model)
        size = name = model
    shape = {k: v for k, v in cfg.shape().items() if k != "arch"}
    if vocab is not None:
        shape["vocab_size"] = vocab
    elif shape.get("vocab_size") is None:
        shape["vocab_size"] = DEFAULT_VOCAB.get(size or "tiny", GALORE_VOCAB)
    return name, shape


def load_model(model: str, seq: int, vocab: Optional[int] = None) -> ModelSpec:
    """Build ``model`` (a size name from ``launcher/train/models/sizes.py`` or a job config
    file) on the meta device with rotary tables of length ``seq``.

    Raises ValueError with a one-line message for an unknown model or a bad shape."""
    import torch

    from launcher.train.models.llama import Llama, LlamaConfig
    from launcher.train.step import model_flops_per_token

    name, shape = _shape_of(model, vocab)
    shape["block_size"] = seq
    with torch.device("meta"):
        module = Llama(LlamaConfig(**shape))
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad)
    return ModelSpec(name, shape, params, model_flops_per_token(module, seq))


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Tensor parallelism splits heads, kv heads and the feed-forward across ``tp`` GPUs."""
    s = spec.shape
    for field in ("n_head", "n_kv_head", "intermediate_size"):
        if s[field] % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {field} ({s[field]})")


_ROWWISE = ("o_proj.weight", "down_proj.weight")


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one GPU of a ``tp`` group holds (Megatron's / torchtitan's plan: q, k, v,
    gate, up and the output head column-wise, o and down row-wise, the embedding by vocabulary
    rows; norms replicated)."""
    if tp == 1 or len(shape) == 1:
        return shape
    if name.endswith(_ROWWISE):
        return (shape[0], -(-shape[1] // tp))
    return (-(-shape[0] // tp), *shape[1:])
