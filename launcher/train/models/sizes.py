"""Built-in architectures, their shape fields and named sizes (no torch: the config reads it).

The Llama sizes 60m, 130m, 350m and 1b are the shapes of GaLore's public model configs
(github.com/jiaweizzhao/GaLore, ``configs/llama_{60m,130m,350m,1b}.json``), the Llama
setting the Grams paper trains in: hidden / intermediate / heads / layers, RMSNorm eps
1e-6, ``max_sequence_length`` 1024, untied embeddings (Hugging Face's default; those
configs do not tie). Their vocabulary (32000, the T5 tokenizer's) is not part of the size
here: ``model.vocab_size`` comes from the data unless set. The Llama 3 sizes carry their
vocabulary (128256): the embedding is 7% of the 8B model. See docs/llm.md.
"""

from __future__ import annotations

from typing import Any, Mapping

ARCHES = ("gpt", "llama")

# Every shape field an architecture uses, with its default (= its "tiny" size).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": dict(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0, tie_weights=True),
    "llama": dict(block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352,
                  rope_theta=10000.0, norm_eps=1e-6, tie_weights=True),
}

_GALORE = dict(block_size=1024, norm_eps=1e-6, rope_theta=10000.0, tie_weights=False, n_kv_head=None)

_LLAMA3 = dict(block_size=8192, norm_eps=1e-5, rope_theta=500000.0, tie_weights=False, n_kv_head=8,
               vocab_size=128256)

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {"tiny": {}},
    "llama": {
        "tiny": {},
        # configs/llama_60m.json: hidden 512, intermediate 1376, 8 heads, 8 layers
        "60m": dict(_GALORE, n_embd=512, intermediate_size=1376, n_head=8, n_layer=8),
        # configs/llama_130m.json: hidden 768, intermediate 2048, 12 heads, 12 layers
        "130m": dict(_GALORE, n_embd=768, intermediate_size=2048, n_head=12, n_layer=12),
        # configs/llama_350m.json: hidden 1024, intermediate 2736, 16 heads, 24 layers
        "350m": dict(_GALORE, n_embd=1024, intermediate_size=2736, n_head=16, n_layer=24),
        # configs/llama_1b.json: hidden 2048, intermediate 5461, 32 heads, 24 layers
        "1b": dict(_GALORE, n_embd=2048, intermediate_size=5461, n_head=32, n_layer=24),
        # Meta's Llama 3 (and 3.1) 8B and 70B (github.com/meta-llama/llama3 params.json, the
        # Hugging Face config.json): vocabulary 128256, untied, GQA with 8 kv heads, rope_theta
        # 500000, RMSNorm eps 1e-5; 8.03B and 70.6B parameters (tests/test_plan.py counts them)
        "llama3-8b": dict(_LLAMA3, n_embd=4096, intermediate_size=14336, n_head=32, n_layer=32),
        "llama3-70b": dict(_LLAMA3, n_embd=8192, intermediate_size=28672, n_head=64, n_layer=80),
    },
}

SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                "intermediate_size", "rope_theta", "norm_eps", "dropout", "tie_weights")
"""Every shape field of the ``[model]`` table (an architecture uses a subset)."""


def resolve_shape(arch: str, size: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The full shape of ``arch``: its defaults, then the named ``size``, then the fields set
    in ``given`` (None = unset). Fields ``arch`` does not use must be unset.

    Raises ValueError naming the ``model.*`` key at fault.
    """
    if arch not in ARCHES:
        raise ValueError(f"model.arch must be one of {list(ARCHES)}, got {arch!r}")
    sizes = SIZES[arch]
    if size is not None and size not in sizes:
        raise ValueError(f"model.size {size!r} is not a size of model.arch={arch!r}; known: {list(sizes)}")
    defaults = ARCH_DEFAULTS[arch]
    shape = {**defaults, **(sizes[size] if size else {})}
    for name in SHAPE_FIELDS:
        value = given.get(name)
        if value is None:
            continue
        if name != "vocab_size" and name not in defaults:
            raise ValueError(f"model.{name} does not apply to model.arch={arch!r} "
                             f"(its fields: vocab_size, {', '.join(defaults)})")
        shape[name] = value
    shape.setdefault("vocab_size", given.get("vocab_size"))
    return shape
