"""Parsing the small JSON files of a checkpoint directory (``manifest.json``, the writer
lock) within limits, so that a planted file is a :class:`CheckpointError`, never a crash.

``json.loads`` recurses once per nesting level: ``[`` x 100,000 raises ``RecursionError``
(not ``ValueError``) from deep inside the parser, and a scan over a run directory that
meets such a file would stop there. So the bytes are measured first, without recursion
and at C speed (a running count of brackets outside strings, as torch cumulative sums).
Only a document that cannot nest deeper than ``MAX_JSON_DEPTH`` reaches ``json.loads``.
A manifest nests 5 levels deep (``files -> name -> pieces -> piece``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .format import CheckpointError

__all__ = ["MAX_MANIFEST_BYTES", "MAX_JSON_DEPTH", "max_nesting_depth", "parse_json"]

#: a manifest is a few KB per rank; a larger one is refused unread
MAX_MANIFEST_BYTES = 64 << 20
#: deepest nesting accepted (a manifest has 5 levels; json.loads recurses per level)
MAX_JSON_DEPTH = 32

_CHUNK = 8 << 20
_QUOTE = 2
#: only brackets and quotes matter: "[{" -> +1, "]}" -> -1 (as int8), '"' -> _QUOTE
_DROP = bytes(c for c in range(256) if c not in b'[]{}"')
_SKELETON = bytes.maketrans(b'[{]}"', bytes([1, 1, 255, 255, _QUOTE]))


def max_nesting_depth(data: bytes, stop_above: Optional[int] = None) -> int:
    """How deep ``json.loads(data)`` would recurse: exact for valid JSON, an upper bound
    for the prefix an invalid document's parser reads before its error (returned early,
    once over ``stop_above``). Vectorised (torch cumulative sums over chunks of the bytes
    that matter): no recursion, no Python loop per byte, bounded memory."""
    # escapes removed left to right, as JSON reads them: then every '"' of valid JSON
    # opens or closes a string, and "outside a string" is "an even count of '"' so far"
    if b"\\" in data:  # (a manifest has none: no copies then)
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = data.translate(_SKELETON, _DROP)
    depth = peak = quotes = 0
    for i in range(0, len(text), _CHUNK):
        t = torch.frombuffer(bytearray(text[i:i + _CHUNK]), dtype=torch.int8)
        q = torch.cumsum(t == _QUOTE, 0, dtype=torch.int32).add_(quotes)
        step = t.to(torch.int32).masked_fill_((q % 2).bool() | (t == _QUOTE), 0)
        d = torch.cumsum(step, 0, dtype=torch.int32).add_(depth)
        peak = max(peak, int(d.max()))
        depth, quotes = int(d[-1]), int(q[-1])
        if stop_above is not None and peak > stop_above:
            break
    return peak


def parse_json(data: bytes, fpath: Path, what: str = "manifest") -> Any:
    """``json.loads`` of UTF-8 ``data`` (the bytes of ``fpath``), refused with a
    one-line CheckpointError (``kind="format"``) if it does not decode, parse or nests
    deeper than ``MAX_JSON_DEPTH``: never a RecursionError."""
    if max_nesting_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{fpath}: corrupt {what} (JSON nested deeper than "
                              f"{MAX_JSON_DEPTH} levels); refused unparsed",
                              path=fpath, kind="format")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{fpath}: corrupt {what} ({type(exc).__name__}: {msg})",
                              path=fpath, kind="format") from None
