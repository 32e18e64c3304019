"""Typed reads of a checkpoint's JSON (the manifest) and loaded objects (shard contents):
every check names the file and the field, so that every refusal is one line a user can act
on. Shared by ``validate.py`` (the manifest) and ``contents.py`` (what the files hold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import validate_hparams
from .format import HP_KEYS, CheckpointError

__all__ = ["Rules", "check_hparams", "MAX_NAME"]

#: longest param / file / state_dict key name accepted
MAX_NAME = 1024


class Rules:
    """Typed reads of one JSON document; every failure names the file and the field."""

    def __init__(self, fpath: Path, kind: str = "format"):
        self.fpath, self.kind = fpath, kind

    def fail(self, where: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.fpath}: field {where}: {msg}", path=self.fpath,
                               kind=self.kind, field=where)

    def get(self, d: dict, key: str, where: str) -> Any:
        if key not in d:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        return d[key]

    def dict_(self, v: Any, where: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def list_(self, v: Any, where: str, length: Optional[int] = None) -> list:
        if not isinstance(v, (list, tuple)):
            raise self.fail(where, f"expected a list, got {type(v).__name__}")
        if length is not None and len(v) != length:
            raise self.fail(where, f"expected {length} items, got {len(v)}")
        return list(v)

    def int_(self, v: Any, where: str, lo: int = 0, hi: Optional[int] = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(where, f"expected an integer, got {v!r:.60}")
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise self.fail(where, f"{v} is not {rng}")
        return v

    def str_(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"expected a string, got {v!r:.60}")
        return v

    def name(self, v: Any, where: str) -> str:
        s = self.str_(v, where)
        if not s or len(s) > MAX_NAME or "\x00" in s:
            raise self.fail(where, f"{s!r:.80} is not a valid name (empty, too long or "
                            "holds a NUL)")
        return s


def check_hparams(r: Rules, g: dict, where: str) -> None:
    """A param group's hyperparameters, exactly as the optimizer constructor checks them."""
    args = [r.get(g, k, where) for k in HP_KEYS]
    try:
        validate_hparams(*args)
    except ValueError as exc:
        raise r.fail(where, str(exc)) from None
    r.int_(r.get(g, "step", where), f"{where}.step")
