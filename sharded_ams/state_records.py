"""The pieces of a ``ShardedAMS`` state dict, checked before ``load_state_dict`` writes any.

A state dict is also what a user ``torch.save``s and ``torch.load``s without the checkpoint
module's file checks, so its records are checked here: a piece's tensors must hold exactly
its ``length`` elements (a 1-element tensor was broadcast over the whole range), lie within
its param, carry no state this optimizer does not keep, and the pieces must cover every
element this rank owns. All of it before the first write: a refused load leaves the state
as it was (a piece found missing half-way used to leave it half overwritten)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

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


def check_compatible(shards: Sequence[Any], sd: dict) -> None:
    """The state dict ``sd`` is for these params (names, shapes) and keeps the same state
    keys (beta3 > 0 keeps s)."""
    mine = {s.name: list(s.shape) for sh in shards for s in sh.layout.slots}
    theirs = {n: list(v["shape"]) for n, v in sd["params"].items()}
    if mine != theirs:
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        shapes = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        raise ValueError(f"Checkpoint is for a different model: missing params {missing[:5]}, "
                         f"unexpected params {extra[:5]}, shape mismatch {shapes[:5]}")
    need = {k for sh in shards for k in sh.state} | {"master"}
    if need != set(sd["state_keys"]):
        raise ValueError(f"Checkpoint state {sorted(sd['state_keys'])} differs from this "
                         f"optimizer's {sorted(need)} (saved with a different beta3 or optimizer?)")


def fill_piece(sh: Any, pc: Any, recs: list[dict]) -> None:
    """This rank's piece ``pc`` of shard ``sh`` from the checked records."""
    lo = pc.param_offset
    for rec in recs:
        hit = overlap(lo, lo + pc.length, rec)
        if hit is None:
            continue
        src, a = hit
        dst = slice(pc.local_start + a - lo, pc.local_start + a - lo + src.stop - src.start)
        for k, t in sh.state.items():
            if k != "master":
                t[dst].copy_(rec[k][src])
        sh.master_piece(dst.start, dst.stop - dst.start).copy_(rec["master"][src])
