"""What a checkpoint's files hold must agree with their manifest entries (section 3 of
``validate.py``'s docstring): a shard's pieces, tensors, param groups and RNG states;
``trainer.pt``'s and ``model-extra.pt``'s format, step and keys. Run on every loaded file
(``validate.load_checked``), so what ``inspect`` shows is what a load applies."""

from __future__ import annotations

import json
import random
from typing import Any

import torch
from torch import Tensor

from .format import MODEL_EXTRA_NAME, TRAINER_NAME, CheckpointError, Manifest
from .rules import Rules, check_hparams
from .snapshot import tuplify

__all__ = ["check_shard", "check_trainer", "check_model_extra"]


def _content_rules(man: Manifest, name: str) -> Rules:
    return Rules(man.path / name, kind="corrupt")


def _jsonable(x: Any) -> Any:
    """As the manifest stores it (tuples become lists; repr for the rest)."""
    return json.loads(json.dumps(x, default=repr))


def check_shard(man: Manifest, name: str, obj: Any) -> None:
    """A loaded shard file agrees with its manifest entry (pieces, tensors, groups, RNG)."""
    r = _content_rules(man, name)
    rank = man.files[name]["rank"]
    r.dict_(obj, "")
    for key, want in (("format", "sharded_ams.shard"), ("rank", rank),
                      ("world_size", man.world_size), ("step", man.step)):
        if obj.get(key) != want:
            raise r.fail(key, f"{obj.get(key)!r:.60}, the manifest says {want!r}")
    osd = r.dict_(r.get(obj, "optimizer", ""), "optimizer")
    if osd.get("format") != "sharded_ams":
        raise r.fail("optimizer.format", f"{osd.get('format')!r:.60}, expected 'sharded_ams'")
    _check_load_fields(r, man, osd, rank)
    groups = r.list_(r.get(osd, "param_groups", "optimizer"), "optimizer.param_groups")
    for i, g in enumerate(groups):
        check_hparams(r, r.dict_(g, f"optimizer.param_groups[{i}]"),
                      f"optimizer.param_groups[{i}]")
    if _jsonable(groups) != man.param_groups:
        raise r.fail("optimizer.param_groups", "differ from the manifest's (the hyperparameters "
                     "a load would apply are not the ones the manifest shows)")
    if _jsonable(r.get(osd, "state_keys", "optimizer")) != man.state_keys:
        raise r.fail("optimizer.state_keys", f"{osd['state_keys']!r:.80}, the manifest says "
                     f"{man.state_keys}")
    sparams = r.dict_(r.get(osd, "params", "optimizer"), "optimizer.params")
    mine = {n: (p.get("shape"), p.get("dtype"), p.get("group"))
            for n, p in sparams.items() if isinstance(p, dict)}
    theirs = {n: (p["shape"], p["dtype"], p["group"]) for n, p in man.params.items()}
    if _jsonable(mine) != _jsonable(theirs):
        raise r.fail("optimizer.params", "differ from the manifest's params")
    pieces = r.list_(r.get(osd, "pieces", "optimizer"), "optimizer.pieces")
    want = man.files[name]["pieces"]
    if len(pieces) != len(want):
        raise r.fail("optimizer.pieces", f"{len(pieces)} pieces, the manifest lists {len(want)}")
    for i, (rec, (pname, off, length)) in enumerate(zip(pieces, want)):
        where = f"optimizer.pieces[{i}]"
        r.dict_(rec, where)
        got = (rec.get("name"), rec.get("offset"), rec.get("length"))
        if got != (pname, off, length):
            raise r.fail(where, f"(name, offset, length) is {got!r:.120}, the manifest says "
                         f"{(pname, off, length)!r:.120}")
        for k in man.state_keys:
            t = r.get(rec, k, where)
            ok_dtypes = (torch.float32,) if k == "master" else (torch.float32, torch.bfloat16)
            if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != length \
                    or t.dtype not in ok_dtypes:
                desc = (f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, Tensor)
                        else type(t).__name__)
                raise r.fail(f"{where}.{k}", f"{desc}, expected a 1-D tensor of {length} "
                             f"elements ({' or '.join(map(str, ok_dtypes))})")
    if "rng" in obj:
        check_rng(r, obj["rng"])


def _check_load_fields(r: Rules, man: Manifest, osd: dict, rank: int) -> None:
    """The fields of the optimizer state that ``ShardedAMS.load_state_dict`` reads besides
    the pieces and groups: its rank and world size, ``skipped_steps`` (what ``inspect``
    shows is the manifest's: a shard may not load another count) and ``model_parallel``.
    The native format never holds tensor-parallel state (``group.Group.of`` refuses to
    save it), so that is None (absent in files of older versions): anything else made the
    load fail after the ranks had agreed the files were good."""
    for key, want in (("world_size", man.world_size), ("rank", rank),
                      ("skipped_steps", man.optimizer.get("skipped_steps", 0))):
        got = osd.get(key, 0) if key == "skipped_steps" else osd.get(key)
        if type(got) is not int or got != want:
            raise r.fail(f"optimizer.{key}", f"{got!r:.60}, the manifest says {want!r}")
    if osd.get("model_parallel") is not None:
        raise r.fail("optimizer.model_parallel", f"{osd['model_parallel']!r:.80}: the native "
                     "format holds no tensor-parallel state (expected None)")


def check_rng(r: Rules, rng: Any) -> None:
    """RNG states that restoring would accept (tried on scratch generators)."""
    r.dict_(rng, "rng")
    try:
        torch.Generator().set_state(r.get(rng, "torch", "rng"))
        random.Random().setstate(tuplify(r.get(rng, "python", "rng")))
        if "numpy" in rng:
            import numpy as np

            ns = rng["numpy"]
            np.random.RandomState().set_state({
                "bit_generator": ns["bit_generator"],
                "state": {"key": ns["key"].numpy().astype("uint32"), "pos": ns["pos"]},
                "has_gauss": ns["has_gauss"], "gauss": ns["gauss"]})
        if "cuda" in rng:
            for t in r.list_(rng["cuda"], "rng.cuda"):
                if not isinstance(t, Tensor) or t.dtype != torch.uint8:
                    raise ValueError("a CUDA RNG state is not a uint8 tensor")
    except CheckpointError:
        raise
    except Exception as exc:
        raise r.fail("rng", f"not a valid RNG state ({type(exc).__name__}: {exc})") from None


def check_trainer(man: Manifest, obj: Any) -> None:
    r = _content_rules(man, TRAINER_NAME)
    r.dict_(obj, "")
    for key, want in (("format", "sharded_ams.trainer"), ("step", man.step)):
        if obj.get(key) != want:
            raise r.fail(key, f"{obj.get(key)!r:.60}, the manifest says {want!r}")
    if obj.get("lr_scheduler") is not None:
        r.dict_(obj["lr_scheduler"], "lr_scheduler")


def check_model_extra(man: Manifest, obj: Any) -> None:
    r = _content_rules(man, MODEL_EXTRA_NAME)
    r.dict_(obj, "")
    if obj.get("format") != "sharded_ams.model_extra":
        raise r.fail("format", f"{obj.get('format')!r:.60}, expected 'sharded_ams.model_extra'")
    tensors = r.dict_(r.get(obj, "tensors", ""), "tensors")
    want = {k: v for k, v in (man.model or {"keys": {}})["keys"].items() if "param" not in v}
    if set(tensors) != set(want):
        raise r.fail("tensors", f"keys differ from the manifest's model.keys: "
                     f"{sorted(set(tensors) ^ set(want))[:5]}")
    for k, info in want.items():
        t = tensors[k]
        if "shape" in info and (not isinstance(t, Tensor) or list(t.shape) != info["shape"]):
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise r.fail(f"tensors[{k!r:.80}]", f"{got}, the manifest says {info['shape']}")
