"""The launcher's models: built-in architectures (``gpt``, ``llama``) and user factories.

``build_model(model_table)`` turns the ``[model]`` config table into an ``nn.Module``:

* ``factory = "pkg.mod:build"``: ``build(model_table)`` (the whole table as a dict, your
  own settings under ``options``) must return an ``nn.Module``; see docs/llm.md for what
  its forward takes and returns;
* otherwise ``arch`` picks :class:`~launcher.train.models.gpt.GPT` or
  :class:`~launcher.train.models.llama.Llama`, shaped by the table's shape fields (already
  resolved from ``size`` by :class:`launcher.config.ModelConfig`).

Importing this package does not import torch (``launcher.config`` reads
:mod:`launcher.train.models.sizes`).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["build_model"]


def build_model(table: Mapping[str, Any]):
    """An ``nn.Module`` for a resolved ``[model]`` table (``ModelConfig`` as a dict).

    Raises ValueError naming the key at fault (``model.factory``, ``model.vocab_size``).
    """
    import torch.nn as nn

    table = dict(table)
    if table.get("factory"):
        from launcher.factory import load_factory

        spec = table["factory"]
        model = load_factory(spec, "model.factory")(table)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model.factory = {spec!r} returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
        return model
    if table.get("vocab_size") is None:
        raise ValueError("model.vocab_size is unset: it is taken from the data on the driver "
                         "(launcher.run.preflight); set it to build a model on its own")
    arch = table.get("arch", "gpt")
    from launcher.train.models.sizes import ARCH_DEFAULTS

    shape = {k: table[k] for k in ("vocab_size", *ARCH_DEFAULTS[arch]) if table.get(k) is not None}
    if arch == "llama":
        from launcher.train.models.llama import Llama, LlamaConfig

        return Llama(LlamaConfig(**shape))
    from launcher.train.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**shape))
