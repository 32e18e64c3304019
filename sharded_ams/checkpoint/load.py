"""Loading a checkpoint on any world size (resharding N -> M).

State is stored per parameter as ``(name, offset, length)`` pieces, so a rank reads only
the shard files whose pieces overlap the ranges it owns under the *current* layout and
``ShardedAMS.load_state_dict`` copies the overlaps. Everything a rank reads passes the
rules of ``validate.py`` first, and the ranks agree on any failure before the optimizer
is touched: every rank raises the same :class:`CheckpointError`, none is left waiting.
"""

from __future__ import annotations

import bisect
import collections
import copy
import itertools
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from torch import nn

from .commit import model_info, optimizer_params
from .format import (MANIFEST_NAME, MODEL_EXTRA_NAME, TRAINER_NAME, CheckpointError, Manifest,
                     PathLike)
from .group import Group
from .snapshot import set_rng_state
from .validate import load_checked, open_checked, read_manifest
from .values import check_values

log = logging.getLogger("sharded_ams.checkpoint")

__all__ = ["load_checkpoint"]


def _current_state_keys(optimizer) -> set[str]:
    shards = getattr(optimizer, "shards", None)
    if shards is not None:
        return {k for sh in shards for k in sh.state} | {"master"}
    keys = {"exp_avg", "exp_avg_sq", "master"}
    if any(g["beta3"] > 0 for g in optimizer.param_groups):
        keys.add("exp_avg_s")
    return keys


def _diff_list(what: str, items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{what}: {', '.join(items[:limit])}{more}"


def check_against(man: Manifest, optimizer, model: Optional[nn.Module]) -> None:
    """The checkpoint fits this optimizer (and model): names, shapes, state keys, groups."""
    mpath = man.path / MANIFEST_NAME
    opt = man.optimizer
    if opt.get("class") != type(optimizer).__name__ or not hasattr(optimizer, "comm"):
        raise CheckpointError(
            f"{mpath}: saved by optimizer {opt.get('class')!r}, loading into "
            f"{type(optimizer).__name__!r} (for a single-process AMS use consolidate())",
            path=mpath, kind="optimizer_mismatch")
    mine = {n: (list(p.shape), str(p.dtype)) for p, n in optimizer_params(optimizer)}
    theirs = {n: (list(p["shape"]), p["dtype"]) for n, p in man.params.items()}
    if set(mine) != set(theirs) or any(mine[n][0] != theirs[n][0] for n in mine):
        parts = []
        missing = [n for n in mine if n not in theirs]       # in param order
        unexpected = [n for n in theirs if n not in mine]
        if missing:
            parts.append(_diff_list("params of the model not in the checkpoint", missing))
        if unexpected:
            parts.append(_diff_list("params in the checkpoint not in the model", unexpected))
        shapes = [f"{n} (checkpoint {theirs[n][0]}, model {mine[n][0]})"
                  for n in mine if n in theirs and mine[n][0] != theirs[n][0]]
        if shapes:
            parts.append(_diff_list("shape mismatch", shapes))
        raise CheckpointError(f"{mpath}: checkpoint is for a different model: "
                              + "; ".join(parts), path=mpath, kind="model_mismatch")
    dtypes = [n for n in mine if mine[n][1] != theirs[n][1]]
    if dtypes:
        log.warning("%s: param dtypes differ from the checkpoint for %s (state is fp32; "
                    "params are re-cast from the masters)", mpath, dtypes[:5])
    want, have = set(opt["state_keys"]), _current_state_keys(optimizer)
    if want != have:
        raise CheckpointError(
            f"{mpath}: optimizer state keys differ: checkpoint {sorted(want)}, optimizer "
            f"{sorted(have)} (different optimizer configuration, e.g. beta3 > 0 vs beta3 == 0)",
            path=mpath, kind="optimizer_mismatch")
    groups = opt["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{mpath}: checkpoint has {len(groups)} param groups, the "
                              f"optimizer {len(optimizer.param_groups)}", path=mpath,
                              kind="optimizer_mismatch")
    by_id = {id(p): n for p, n in optimizer_params(optimizer)}
    for i, (saved, g) in enumerate(zip(groups, optimizer.param_groups)):
        cur = [by_id[id(p)] for p in g["params"] if id(p) in by_id]
        if list(saved["params"]) != cur:
            raise CheckpointError(f"{mpath}: param group {i} holds different params in the "
                                  "checkpoint and the optimizer", path=mpath,
                                  kind="optimizer_mismatch")
    if model is not None and man.model is not None:
        _check_model(man, mpath, model_info(model, optimizer)[0])


def _check_model(man: Manifest, mpath: Path, info: dict) -> None:
    def strip(d):  # dtypes may differ (load_state_dict casts), the rest may not
        return {k: {f: x for f, x in v.items() if f != "dtype"} for k, v in d.items()}

    a, b = strip(man.model["keys"]), strip(info["keys"])
    if a == b:
        return
    parts = []
    if set(a) - set(b):
        parts.append(_diff_list("state_dict keys in the checkpoint not in the model",
                                sorted(set(a) - set(b))))
    if set(b) - set(a):
        parts.append(_diff_list("state_dict keys of the model not in the checkpoint",
                                sorted(set(b) - set(a))))
    diff = [f"{k} (checkpoint {a[k]}, model {b[k]})" for k in sorted(set(a) & set(b))
            if a[k] != b[k]]
    if diff:
        parts.append(_diff_list("entries differ", diff, 4))
    raise CheckpointError(f"{mpath}: checkpoint is for a different model (buffers / "
                          "frozen params / tied weights): " + "; ".join(parts),
                          path=mpath, kind="model_mismatch")


class PieceIndex:
    """The manifest's shard pieces per param, sorted by offset, so that a rank finds the
    files overlapping one of its ranges by bisection: O(log P + hits) per range instead of
    a scan of every piece of every file (O(N x B) per rank, O(N^2 x B) for all ranks).
    Empty pieces are left out: a file holding only those has nothing to read."""

    def __init__(self, man: Manifest):
        files = man.shard_files()
        self.order = {n: i for i, n in enumerate(files)}
        spans: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
        for name in files:
            for pname, off, length in man.files[name]["pieces"]:
                if length > 0:
                    spans[pname].append((off, off + length, name))
        self._spans: dict[str, tuple[list[int], list[int], list[tuple[int, int, str]]]] = {}
        for pname, iv in spans.items():
            iv.sort()
            # running max of the ends: correct even for pieces that overlap (validate.py
            # refuses those, but nothing here relies on it)
            reach = list(itertools.accumulate((b for _, b, _ in iv), max))
            self._spans[pname] = ([a for a, _, _ in iv], reach, iv)

    def files_overlapping(self, pname: str, lo: int, hi: int) -> Iterator[str]:
        """Shard files holding a piece of ``pname`` that overlaps [lo, hi)."""
        if pname not in self._spans or lo >= hi:
            return
        starts, reach, iv = self._spans[pname]
        i = bisect.bisect_right(reach, lo)  # first piece that may end after lo
        while i < len(iv) and starts[i] < hi:
            if iv[i][1] > lo:
                yield iv[i][2]
            i += 1

    def sorted_files(self, names: Iterable[str]) -> list[str]:
        """``names`` without repeats, in rank order."""
        return sorted(set(names), key=self.order.__getitem__)


def needed_shards(man: Manifest, optimizer, rank: int,
                  index: Optional[PieceIndex] = None) -> Optional[list[str]]:
    """Shard files holding a (non-empty) piece of any range ``rank`` owns, in rank order
    (None if unknown). ``rank``'s own ranges only: O(its pieces x log) past the index."""
    shards = getattr(optimizer, "shards", None)
    if shards is None:
        return None
    index = index or PieceIndex(man)
    return index.sorted_files(f for sh in shards for pc in sh.layout.pieces(rank)
                              for f in index.files_overlapping(
                                  pc.slot.name, pc.param_offset, pc.param_offset + pc.length))


def files_read_by_some_rank(man: Manifest, optimizer) -> set[str]:
    """Shard files that some rank of the current layout reads. The ranks' ranges together
    are every element of every param of the layout, so these are the files with a
    (non-empty) piece inside [0, numel) of a param the layout has: one pass that stops at
    each file's first such piece, instead of ``needed_shards`` for every rank
    (O(N^2 x B))."""
    shards = getattr(optimizer, "shards", None)
    if shards is None:
        return set()
    numel = {slot.name: slot.numel for sh in shards for slot in sh.layout.slots}
    return {name for name in man.shard_files()
            if any(length > 0 and off < numel.get(pname, 0) and off + length > 0
                   for pname, off, length in man.files[name]["pieces"])}


def files_to_verify(man: Manifest, optimizer, ctx: Group, needed: list[str]) -> set[str]:
    """sha256 duty of this rank: every file it reads itself (the checkpoint directory may be
    a per-node copy, e.g. downloaded by Ray Train), plus a round-robin share of the shard
    files that no rank reads, so that together the ranks checksum every file."""
    verify = set(needed) | {n for n in (TRAINER_NAME, MODEL_EXTRA_NAME) if n in man.files}
    read_by_someone = set(needed) | files_read_by_some_rank(man, optimizer)
    others = [n for n in man.files if n not in read_by_someone and n not in verify]
    verify |= {n for i, n in enumerate(others) if i % ctx.world_size == ctx.rank}
    return verify


def plan_reads(man: Manifest, optimizer, ctx: Group) -> tuple[list[str], set[str]]:
    """(the shard files this rank loads, in rank order; the files it checksums). A rank
    that owns nothing still reads one shard (for the hyperparameters)."""
    needed = needed_shards(man, optimizer, ctx.rank)
    if needed is None:
        needed = man.shard_files()
    if not needed:
        needed = [man.shard_files()[0]]
    return needed, files_to_verify(man, optimizer, ctx, needed)


def _read(man: Manifest, optimizer, ctx: Group, model, restore_rng: bool,
          allow_nonfinite: bool = False) -> dict[str, Any]:
    """Everything this rank needs from disk, every file checked (size, sha256, content and,
    unless ``allow_nonfinite``, the values of every shard it loaded: ``values.py``)."""
    needed, verify = plan_reads(man, optimizer, ctx)
    own = man.shard_files()[ctx.rank] if man.world_size == ctx.world_size else None
    read = set(needed) | {n for n in (TRAINER_NAME, MODEL_EXTRA_NAME) if n in man.files}
    if restore_rng and own:
        read.add(own)
    loaded: dict[str, Any] = {}
    for n in man.files:  # sizes of every file (cheap); sha256 and content of this rank's share
        if n in read or n in verify:
            loaded[n] = load_checked(man, n, checksum=n in verify or n in read,
                                     mmap=n not in (TRAINER_NAME, MODEL_EXTRA_NAME))
        else:
            with open_checked(man, n, checksum=False):
                pass
    if not allow_nonfinite:
        for n, obj in loaded.items():
            if n not in (TRAINER_NAME, MODEL_EXTRA_NAME):
                check_values(man, n, obj)
    return {"sds": [loaded[n]["optimizer"] for n in needed],
            "rng": loaded[own].get("rng") if restore_rng and own else None,
            "trainer": loaded.get(TRAINER_NAME),
            "model_extra": loaded[MODEL_EXTRA_NAME]["tensors"]
            if model is not None and MODEL_EXTRA_NAME in loaded else None}


def load_checkpoint(path: PathLike, optimizer, *, model: Optional[nn.Module] = None,
                    lr_scheduler=None, restore_rng: bool = True,
                    allow_nonfinite: bool = False) -> dict:
    """Load a checkpoint saved on any world size into ``optimizer`` (a ShardedAMS).
    Every rank calls it (collectives inside).

    Checks the manifest (``validate.py``); the optimizer's params (names, shapes), state
    keys and groups and, with ``model``, its buffers/frozen params against it; the size of
    every file, and the sha256 and content of every file this rank reads plus a share of
    the others (so that together the ranks check every file). Failures are agreed
    collectively: every rank raises the same :class:`CheckpointError`. Then the shard
    files that overlap this rank's ranges go to ``optimizer.load_state_dict``
    (hyperparameters and step come from the checkpoint, as with torch.optim), and
    ``optimizer.finish_param_sync()`` makes sure the params hold the loaded masters.
    Restores ``model``'s extra state, the ``lr_scheduler`` and, only when the world size
    is unchanged (each rank then gets its own states back), the RNG states.

    A shard holding NaN/inf (masters or moments) or a negative ``exp_avg_sq`` is refused
    (``kind="values"``, naming the param and state key): resuming it would train on
    garbage. ``allow_nonfinite=True`` loads it anyway (e.g. to debug a diverged run).

    Returns ``{"step", "extra", "path"}``.
    """
    path = Path(path)
    ctx = Group.of(optimizer)
    err: Optional[BaseException] = None
    man = got = None
    try:
        man = read_manifest(path)
        check_against(man, optimizer, model)
        got = _read(man, optimizer, ctx, model, restore_rng, allow_nonfinite)
        check_scheduler(man, lr_scheduler, got["trainer"])
    except CheckpointError as exc:
        err = exc
    except Exception as exc:
        err = CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})",
                              path=path, kind="corrupt")
    ctx.agree(err)
    assert man is not None and got is not None
    try:
        return _apply(path, man, got, optimizer, model, lr_scheduler, restore_rng, ctx)
    except CheckpointError:
        raise
    except ValueError as exc:  # checked above; deterministic, so every rank raises
        raise CheckpointError(f"{path}: {exc}", path=path, kind="optimizer_mismatch") from exc
    except Exception as exc:  # a rule missed above: still one clear refusal, not a traceback
        raise CheckpointError(f"{path}: the load failed after every check passed "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                              path=path, kind="corrupt") from exc


def check_scheduler(man: Manifest, lr_scheduler, trainer: Optional[dict]) -> None:
    """The saved scheduler state loads into ``lr_scheduler``: tried on a copy of it (that
    shares the optimizer, which is not copied) before anything is applied, so a state it
    rejects (``{}``: LambdaLR's KeyError) is refused on every rank, not a load that fails
    after the optimizer state was overwritten. Not recoverable (``scheduler_mismatch``):
    the scheduler may be the one that differs, and load_latest must not then skip every
    checkpoint and start from scratch. A scheduler that cannot be copied is not tried."""
    if lr_scheduler is None or trainer is None or trainer.get("lr_scheduler") is None:
        return
    opt = getattr(lr_scheduler, "optimizer", None)
    try:
        trial = copy.deepcopy(lr_scheduler, {id(opt): opt} if opt is not None else None)
        state = copy.deepcopy(trainer["lr_scheduler"])  # LambdaLR pops from what it gets
    except Exception as exc:  # noqa: BLE001 - an uncopyable scheduler: loaded untried
        log.debug("lr_scheduler not tried before the load (%s: %s)", type(exc).__name__, exc)
        return
    try:
        trial.load_state_dict(state)
    except Exception as exc:
        fpath = man.path / TRAINER_NAME
        raise CheckpointError(
            f"{fpath}: field lr_scheduler: does not load into {type(lr_scheduler).__name__} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): a different "
            "scheduler, or a damaged trainer.pt", path=fpath, kind="scheduler_mismatch",
            field="lr_scheduler") from None


def _apply(path: Path, man: Manifest, got: dict, optimizer, model, lr_scheduler,
           restore_rng: bool, ctx: Group) -> dict:
    """Everything read and checked, into the optimizer, model, scheduler and RNGs."""
    optimizer.load_state_dict(got["sds"])
    sync = getattr(optimizer, "finish_param_sync", None)
    if sync is not None:
        sync()  # the load's re-gather of the params is complete before anyone reads them
    trainer = got["trainer"]
    if model is not None:
        if got["model_extra"]:
            res = model.load_state_dict(got["model_extra"], strict=False)
            if res.unexpected_keys:
                raise CheckpointError(f"{path / MODEL_EXTRA_NAME}: keys not in the model: "
                                      f"{res.unexpected_keys[:8]}", path=path / MODEL_EXTRA_NAME,
                                      kind="model_mismatch")
        elif man.model is None:
            log.info("%s was saved without model=; buffers and frozen params not restored",
                     path)
    if lr_scheduler is not None:
        if trainer is None or trainer.get("lr_scheduler") is None:
            log.warning("%s holds no lr_scheduler state; the scheduler is left as is", path)
        else:
            lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if restore_rng:
        if got["rng"] is not None:
            set_rng_state(got["rng"])
        else:
            log.info("%s: saved on %d ranks, loading on %d: RNG states not restored",
                     path, man.world_size, ctx.world_size)
    return {"step": man.step, "extra": trainer.get("extra") if trainer else None,
            "path": str(path)}
