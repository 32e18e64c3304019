"""Compatibility re-export: the GPT now lives in :mod:`launcher.models.gpt`."""

from launcher.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
