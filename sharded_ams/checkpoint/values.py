"""The values a shard holds: finite, and no negative second moment.

A checkpoint can pass every rule of ``validate.py`` (its sha256 recorded after the fact)
and still hold state that no sound training step produces: NaN/inf in the fp32 masters or
moments (a diverged run that saved anyway, a bad kernel, a tampered file), or a negative
``exp_avg_sq`` (an average of squares; its square root would be NaN at the next step).
Loading that silently resumes a dead run. So ``load_checkpoint`` and ``consolidate``
refuse it (``kind="values"``, naming the file, piece, param and state key) unless the
caller opts in (``allow_nonfinite=True``), and ``ckpt inspect`` lists every such piece.

The cost is one pass over tensors that are already loaded (``isfinite().all()`` per
piece and state key; the counts only for a piece that fails).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .format import CheckpointError, Manifest

__all__ = ["NONNEGATIVE_KEYS", "shard_value_problems", "describe_problem", "check_values"]

#: state keys that are averages of squares: never negative
NONNEGATIVE_KEYS = frozenset({"exp_avg_sq"})


def _problem(t: Tensor, key: str) -> tuple[int, int]:
    """(non-finite count, negative count) of one state tensor; (0, 0) on the fast path."""
    finite = torch.isfinite(t)
    nonfinite = 0 if bool(finite.all()) else int((~finite).sum())
    negative = int((t < 0).sum()) if key in NONNEGATIVE_KEYS and bool((t < 0).any()) else 0
    return nonfinite, negative


def shard_value_problems(man: Manifest, name: str, obj: Any) -> list[dict]:
    """Every (piece, state key) of the loaded, checked shard ``name`` holding non-finite
    values or (``exp_avg_sq``) negative ones: ``{"file", "piece", "param", "offset",
    "length", "key", "nonfinite", "negative"}`` (counts of elements)."""
    out = []
    for i, rec in enumerate(obj["optimizer"]["pieces"]):
        for key in man.state_keys:
            nonfinite, negative = _problem(rec[key], key)
            if nonfinite or negative:
                out.append({"file": name, "piece": i, "param": rec["name"],
                            "offset": rec["offset"], "length": rec["length"], "key": key,
                            "nonfinite": nonfinite, "negative": negative})
    return out


def describe_problem(p: dict) -> str:
    """One line: the field, the param and what is wrong (the caller names the file)."""
    what = []
    if p["nonfinite"]:
        what.append(f"{p['nonfinite']} non-finite values (NaN/inf)")
    if p["negative"]:
        what.append(f"{p['negative']} negative values (a second moment is never negative)")
    end = p["offset"] + p["length"]
    return (f"field optimizer.pieces[{p['piece']}].{p['key']} (param "
            f"{p['param']!r:.80}, elements [{p['offset']}, {end})): {' and '.join(what)}")


def check_values(man: Manifest, name: str, obj: Any) -> None:
    """Refuse the loaded shard ``name`` if any piece holds non-finite values or a
    negative second moment (CheckpointError ``kind="values"`` naming the first)."""
    problems = shard_value_problems(man, name, obj)
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more pieces)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{man.path / name}: {describe_problem(p)}{more}; refused: a sound training step "
            "never saves these (pass allow_nonfinite=True to load it anyway)",
            path=man.path / name, kind="values",
            field=f"optimizer.pieces[{p['piece']}].{p['key']}")
