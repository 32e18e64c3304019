"""The values a shard holds: finite, and no negative second moment.

A checkpoint can pass every rule of ``validate.py`` (its sha256 recorded after the fact)
and still hold state that no sound training step produces: NaN/inf in the fp32 masters or
moments (a diverged run that saved anyway, a bad kernel, a tampered file), or a negative
``exp_avg_sq`` (an average of squares; its square root would be NaN at the next step).
Loading that silently resumes a dead run. So ``load_checkpoint`` and ``consolidate``
refuse it (``kind="values"``, naming the file, piece, param and state key) unless the
caller opts in (``allow_nonfinite=True``), and ``ckpt inspect`` lists every such piece.
A DCP checkpoint's the same (``check_dcp_values``: ``load_dcp`` on what each rank loaded,
``consolidate``/``ckpt convert`` on the whole state), naming the param and the DCP key
(``model.<param>`` for its fp32 master, ``optim.state.<param>.<key>`` for a moment).

The cost is one pass over tensors that are already loaded (``isfinite().all()`` per
piece and state key; the counts only for a piece that fails).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .format import CheckpointError, Manifest

__all__ = ["NONNEGATIVE_KEYS", "shard_value_problems", "describe_problem", "check_values",
           "dcp_value_problems", "check_dcp_values", "describe_dcp_problem", "problem_counts"]

#: state keys that are averages of squares: never negative
NONNEGATIVE_KEYS = frozenset({"exp_avg_sq"})


def problem_counts(t: Tensor, key: str) -> tuple[int, int]:
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
            nonfinite, negative = problem_counts(rec[key], key)
            if nonfinite or negative:
                out.append({"file": name, "piece": i, "param": rec["name"],
                            "offset": rec["offset"], "length": rec["length"], "key": key,
                            "nonfinite": nonfinite, "negative": negative})
    return out


def _what(p: dict) -> str:
    what = []
    if p["nonfinite"]:
        what.append(f"{p['nonfinite']} non-finite values (NaN/inf)")
    if p["negative"]:
        what.append(f"{p['negative']} negative values (a second moment is never negative)")
    return " and ".join(what)


def describe_problem(p: dict) -> str:
    """One line: the field, the param and what is wrong (the caller names the file)."""
    end = p["offset"] + p["length"]
    return (f"field optimizer.pieces[{p['piece']}].{p['key']} (param "
            f"{p['param']!r:.80}, elements [{p['offset']}, {end})): {_what(p)}")


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


def _local_parts(value: Any) -> list[Tensor]:
    """The tensors of a loaded DCP value held here: a DTensor's local shard (no
    collective), a ShardedAMS's ``dcp_sharded.Chunks`` boxes, a tensor itself."""
    pieces = getattr(value, "pieces", None)
    if isinstance(pieces, dict):  # Chunks: views of the flat state
        return list(pieces.values())
    if not isinstance(value, Tensor):
        return []
    to_local = getattr(value, "to_local", None)
    return [to_local() if to_local is not None else value]


def dcp_value_problems(sd: dict, names: list[str]) -> list[dict]:
    """Every (param, state key) of the DCP state dict ``sd`` (``{"model", "optim":
    {"state"}}``, as loaded: on a rank, its own shards) holding non-finite values or
    (``exp_avg_sq``) negative ones, for the optimized params ``names``: their fp32
    masters (``model.<name>``, key ``master``) and optimizer state but ``step``.
    ``{"param", "key", "field", "nonfinite", "negative"}`` (counts of elements here)."""
    out = []
    model, state = sd.get("model") or {}, (sd.get("optim") or {}).get("state") or {}
    # a ShardedAMS's masters (Chunks) under a model key that is not its optimizer name
    # too; tied keys (one Chunks under each) once
    seen = {id(model[n]) for n in names if n in model}
    chunked = [k for k, v in model.items() if isinstance(getattr(v, "pieces", None), dict)
               and id(v) not in seen and not seen.add(id(v))]
    for name in list(names) + chunked:
        fields = [(f"model.{name}", "master", model.get(name))]
        fields += [(f"optim.state.{name}.{k}", k, v) for k, v in (state.get(name) or {}).items()
                   if k != "step"]
        for fld, key, value in fields:
            nonfinite = negative = 0
            for t in _local_parts(value):
                a, b = problem_counts(t, key)
                nonfinite, negative = nonfinite + a, negative + b
            if nonfinite or negative:
                out.append({"param": name, "key": key, "field": fld,
                            "nonfinite": nonfinite, "negative": negative})
    return out


def check_dcp_values(path: Any, sd: dict, names: list[str]) -> None:
    """Refuse the DCP state ``sd`` (see :func:`dcp_value_problems`) if a master or moment
    holds non-finite values or a second moment negative ones (CheckpointError
    ``kind="values"``, ``field`` the DCP key of the first, e.g.
    ``optim.state.<param>.exp_avg_sq``)."""
    problems = dcp_value_problems(sd, names)
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{path}: {describe_dcp_problem(p)}{more}; refused: a sound training step never "
            "saves these (pass allow_nonfinite=True to load it anyway)", path=path,
            kind="values", field=p["field"])


def describe_dcp_problem(p: dict) -> str:
    """One line of a DCP problem (``dcp_value_problems``'s): the field, param and what."""
    return f"field {p['field']} (param {p['param']!r:.80}, state {p['key']}): {_what(p)}"

