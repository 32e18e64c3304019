"""The pieces of a ``ShardedAMS`` state dict, checked before ``load_state_dict`` writes any.

A state dict is also what a user ``torch.save``s and ``torch.load``s without the checkpoint
module's file checks, so its records are checked here: a piece's tensors must hold exactly
its ``length`` elements (a 1-element tensor was broadcast over the whole range), lie within
its param, carry no state this optimizer does not keep, and the pieces must cover every
element this rank owns. All of it before the first write: a refused load leaves the state
as it was (a piece found missing half-way used to leave it half overwritten)."""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor

_FIELDS = ("name", "offset", "length")


def records_by_name(sds: Iterable[dict], keys: set[str],
                    numels: dict[str, int]) -> dict[str, list[dict]]:
    """Every piece of ``sds`` (one rank's dicts or all ranks'), checked, by param name.
    ``keys``: the state keys each piece holds ("master" among them); ``numels``: each
    param's whole size."""
    by_name: dict[str, list[dict]] = {}
    for sd in sds:
        for i, rec in enumerate(sd["pieces"]):
            name, off, length = (rec.get(f) for f in _FIELDS)
            where = f"State dict piece {i} ({name!r})"
            if not isinstance(name, str) or name not in numels:
                raise ValueError(f"{where}: no such param in this optimizer")
            if not all(type(x) is int for x in (off, length)) or off < 0 or length < 0 \
                    or off + length > numels[name]:
                raise ValueError(f"{where}: elements [{off}, {off}+{length}) are not within "
                                 f"its {numels[name]} elements")
            extra = set(rec) - keys - set(_FIELDS)
            if extra:
                raise ValueError(f"{where}: unexpected state {sorted(extra)} (saved by another "
                                 "optimizer or with another beta3?)")
            for k in sorted(keys):
                t = rec.get(k)
                if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != length \
                        or not t.is_floating_point():
                    got = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor)
                           else type(t).__name__)
                    raise ValueError(f"{where}: state {k!r} must be a 1-D float tensor of its "
                                     f"{length} elements, got {got}")
            by_name.setdefault(name, []).append(rec)
    return by_name


def overlap(lo: int, hi: int, rec: dict) -> Optional[tuple[slice, int]]:
    """(the slice of ``rec``'s tensors, the param offset it starts at) where the record
    meets the param elements [lo, hi); None if it does not."""
    a, b = max(lo, rec["offset"]), min(hi, rec["offset"] + rec["length"])
    return (slice(a - rec["offset"], b - rec["offset"]), a) if a < b else None


def check_covered(name: str, lo: int, hi: int, recs: list[dict]) -> None:
    """The records hold every element of param ``name``'s [lo, hi), each once."""
    spans = sorted((a, a + src.stop - src.start) for src, a in
                   filter(None, (overlap(lo, hi, rec) for rec in recs)))
    at, twice = lo, False
    for a, b in spans:
        twice |= a < at
        at = max(at, b) if a <= at else at  # a gap stops the run at ``at``
    if at != hi or twice:
        covered = sum(b - a for a, b in spans)
        raise ValueError(f"Checkpoint does not cover param {name!r} elements [{lo}, {hi}) "
                         f"once each (records cover {covered} of {hi - lo}"
                         f"{', some twice' if twice else ''})")
