"""Checkpoints at scale (issue 26, item 7). Single process, no files but manifests.

* A save's device memory: ``ShardedAMS.state_dict()`` copies the state straight into host
  memory, so nothing it allocates comes from the state (counted op by op), and its copy is
  a point-in-time snapshot.
* Load planning: which shard files a rank reads and which it checksums, computed from the
  manifest alone. The plan must be exactly what the O(N^2 x B) code computed (a
  brute-force oracle, kept here), for saves on N ranks loaded on M ranks, including ranks
  and files that own nothing; and a rank must look only at its own ranges.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_common import ADAM_S, GRAMS, fresh, train
from sharded_ams.checkpoint import load as L
from sharded_ams.checkpoint.group import Group
from sharded_ams.checkpoint.validate import read_manifest
from sharded_ams.layout import BufferLayout


# ---------------------------------------------------------------------------- save memory
class _Allocs(TorchDispatchMode):
    """Bytes of the tensors ops put in new storage: ``derived`` from the optimizer's
    storages (transitively; on a GPU these are GPU memory) or not (``host``: factory
    functions, i.e. the host buffers the state is copied into)."""

    def __init__(self, opt):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for sh in opt.shards
                        for t in (*sh.state.values(), sh.buf.param, sh.buf.grad)
                        if isinstance(t, Tensor)}
        self.derived: list[tuple[str, int]] = []
        self.host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
               if isinstance(t, Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, Tensor) or t.untyped_storage().data_ptr() in ins:
                continue
            st = t.untyped_storage()
            if ins & self.watched:
                self.derived.append((func.overloadpacket.__name__, st.nbytes()))
                self.watched.add(st.data_ptr())
            else:
                self.host += st.nbytes()
        return out


@pytest.mark.parametrize("dtype,hp", [(torch.float32, GRAMS), (torch.bfloat16, ADAM_S)],
                         ids=["fp32-grams", "bf16-with-s"])
def test_state_dict_copies_straight_to_the_host(dtype, hp):
    """state_dict() allocates nothing from the state (a clone first cost 12-16 bytes of
    device memory per local element): one host copy of exactly the state it returns,
    which later steps do not change and which shares no storage with the optimizer."""
    model, opt = fresh(hp, dtype=dtype)
    train(model, opt, range(2))
    with _Allocs(opt) as allocs:
        sd = opt.state_dict()
    assert allocs.derived == []
    tensors = [rec[k] for rec in sd["pieces"] for k in sd["state_keys"]]
    assert {t.dtype for t in tensors} >= {torch.float32}
    assert allocs.host == sum(t.numel() * t.element_size() for t in tensors)
    assert not {t.untyped_storage().data_ptr() for t in tensors} & allocs.watched
    kept = [t.clone() for t in tensors]
    train(model, opt, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(tensors, kept))
    moved = opt.state_dict()  # (the steps did change the state)
    assert not all(torch.equal(a, rec[k]) for a, (rec, k) in zip(
        tensors, ((rec, k) for rec in moved["pieces"] for k in sd["state_keys"])))


# ---------------------------------------------------------------------------- the oracle
def oracle_needed(man, layout: BufferLayout, rank: int) -> list[str]:
    """Every file with a piece overlapping one of ``rank``'s ranges, by scanning all pieces
    (the code before issue 26)."""
    mine: dict[str, list[tuple[int, int]]] = {}
    for pc in layout.pieces(rank):
        mine.setdefault(pc.slot.name, []).append((pc.param_offset, pc.param_offset + pc.length))
    out = []
    for name in man.shard_files():
        for pname, off, length in man.files[name]["pieces"]:
            if any(a < off + length and off < b for a, b in mine.get(pname, ())):
                out.append(name)
                break
    return out


def oracle_plan(man, layout: BufferLayout, rank: int, world: int) -> tuple[list[str], set[str]]:
    """``_read``'s plan before issue 26: every rank's needed files computed on every rank."""
    needed = oracle_needed(man, layout, rank) or [man.shard_files()[0]]
    verify = set(needed) | {n for n in ("trainer.pt", "model-extra.pt") if n in man.files}
    read = set(needed)
    for r in range(world):
        if r != rank:
            read |= set(oracle_needed(man, layout, r))
    others = [n for n in man.files if n not in read and n not in verify]
    verify |= {n for i, n in enumerate(others) if i % world == rank}
    return needed, verify


# ---------------------------------------------------------------------------- manifests
def random_params(rng: random.Random, n: int) -> list[tuple[str, tuple[int, ...], int]]:
    shapes = [(rng.randint(1, 40),) if rng.random() < 0.3 else
              (rng.randint(1, 30), rng.randint(1, 30)) for _ in range(n)]
    return [(f"p{i}", s, rng.randint(0, 1)) for i, s in enumerate(shapes)]


def write_manifest(path: Path, params: list, layout: BufferLayout) -> object:
    """A manifest that passes read_manifest: ``layout``'s pieces (from ``layout.pieces``)."""
    world = layout.world_size
    files = {}
    for r in range(world):
        pieces = [[pc.slot.name, pc.param_offset, pc.length] for pc in layout.pieces(r)]
        files[f"shard-rank{r:05d}-of-{world:05d}.pt"] = {
            "kind": "shard", "rank": r, "pieces": pieces, "sha256": "0" * 64,
            "size": 12 * sum(p[2] for p in pieces) + 100}
    files["trainer.pt"] = {"kind": "trainer", "size": 10, "sha256": "0" * 64}
    groups = [{"lr": 1e-3, "betas": [0.9, 0.99], "beta3": 0.0, "lam": -1.0, "eps": 1e-8,
               "weight_decay": 0.0, "step": 1, "params": [n for n, _, g in params if g == gi]}
              for gi in (0, 1)]
    d = {"format": "sharded_ams.checkpoint", "version": 1, "step": 1, "world_size": world,
         "optimizer": {"class": "ShardedAMS", "param_groups": groups,
                       "state_keys": ["exp_avg", "exp_avg_sq", "master"]},
         "params": {n: {"shape": list(s), "dtype": "torch.float32", "group": g,
                        "numel": math.prod(s)} for n, s, g in params},
         "files": files}
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(d))
    return read_manifest(path)


def as_optimizer(layout: BufferLayout) -> SimpleNamespace:
    return SimpleNamespace(shards=[SimpleNamespace(layout=layout)])


CASES = [(seed, n, m) for seed, (n, m) in enumerate(
    [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (5, 7), (8, 8), (9, 2), (2, 9), (16, 5)])]


@pytest.mark.parametrize("seed,saved,loaded", CASES)
def test_plan_is_the_brute_force_plan(tmp_path, seed, saved, loaded):
    """N -> M on random layouts (small params, so that with many ranks some ranks own
    nothing and some files hold no piece): each rank reads and checksums exactly what the
    all-ranks scan gave, and together the ranks checksum every file."""
    rng = random.Random(seed)
    params = random_params(rng, rng.randint(1, 12))
    bucket = rng.choice([None, 1, 64, 300])
    man = write_manifest(tmp_path, params, BufferLayout.build(params, saved, bucket, align=4))
    now = BufferLayout.build(params, loaded, rng.choice([None, 1, 50]), align=4)
    covered: set[str] = set()
    for r in range(loaded):
        got = L.plan_reads(man, as_optimizer(now), Group(r, loaded, None, False))
        want = oracle_plan(man, now, r, loaded)
        assert got[0] == want[0], (r, got[0], want[0])
        assert got[1] == want[1], (r, got[1] ^ want[1])
        covered |= got[1]
    assert covered == set(man.files)


def test_needed_shards_with_unsorted_and_empty_pieces(tmp_path):
    """Pieces listed out of order inside a file, zero-length pieces, a file holding only a
    param's last element and a file with no piece: the index finds what the scan finds."""
    params = [("a", (10,), 0), ("b", (7,), 0)]
    man = write_manifest(tmp_path, params, BufferLayout.build(params, 4, None, align=1))
    f0, f1, f2, f3 = man.shard_files()
    man.files[f0]["pieces"] = [["b", 0, 3], ["a", 4, 0], ["a", 0, 4]]
    man.files[f1]["pieces"] = [["a", 4, 5], ["b", 3, 4], ["b", 7, 0]]
    man.files[f2]["pieces"] = [["a", 9, 1]]
    man.files[f3]["pieces"] = []
    for loaded in (1, 2, 3, 5, 8):
        now = BufferLayout.build(params, loaded, None, align=1)
        for r in range(loaded):
            assert L.needed_shards(man, as_optimizer(now), r) == oracle_needed(man, now, r)
            assert (L.plan_reads(man, as_optimizer(now), Group(r, loaded, None, False))
                    == oracle_plan(man, now, r, loaded))


def test_a_file_with_only_an_empty_piece_is_not_read(tmp_path):
    """The one deliberate difference from the old scan: an empty piece strictly inside a
    rank's range made its file "needed" (read for nothing). Now no rank reads it, so it
    joins the round-robin checksums and is still checksummed by exactly one rank."""
    params = [("a", (12,), 0)]
    man = write_manifest(tmp_path, params, BufferLayout.build(params, 3, None, align=1))
    f0, f1, f2 = man.shard_files()
    man.files[f0]["pieces"] = [["a", 0, 12]]
    man.files[f1]["pieces"] = [["a", 5, 0]]
    man.files[f2]["pieces"] = []
    now = BufferLayout.build(params, 2, None, align=1)
    verified = []
    for r in range(2):
        needed, verify = L.plan_reads(man, as_optimizer(now), Group(r, 2, None, False))
        assert needed == [f0]
        verified += sorted(verify - {f0, "trainer.pt"})
    assert f1 in oracle_needed(man, now, 0)  # the old scan read it
    assert sorted(verified) == [f1, f2]


def test_overlapping_pieces_are_found_exactly(tmp_path):
    """validate.py refuses overlapping pieces, but the index does not rely on it: a long
    piece and a short one inside it, each file found only where it overlaps."""
    params = [("a", (12,), 0)]
    man = write_manifest(tmp_path, params, BufferLayout.build(params, 2, None, align=1))
    f0, f1 = man.shard_files()
    man.files[f0]["pieces"] = [["a", 0, 12]]
    man.files[f1]["pieces"] = [["a", 2, 1]]
    for loaded in (1, 2, 3, 4, 6):
        now = BufferLayout.build(params, loaded, None, align=1)
        for r in range(loaded):
            assert L.needed_shards(man, as_optimizer(now), r) == oracle_needed(man, now, r)


def test_ranks_that_own_nothing(tmp_path):
    """A param smaller than the world: most ranks own only padding; each still reads one
    shard (for the hyperparameters) and the checksums still cover every file."""
    params = [("a", (3,), 0)]
    man = write_manifest(tmp_path, params, BufferLayout.build(params, 6, None, align=4))
    now = BufferLayout.build(params, 4, None, align=4)
    assert [len(now.pieces(r)) for r in range(4)] == [1, 0, 0, 0]
    covered: set[str] = set()
    for r in range(4):
        got = L.plan_reads(man, as_optimizer(now), Group(r, 4, None, False))
        assert got == oracle_plan(man, now, r, 4)
        assert got[0] == [man.shard_files()[0]]
        covered |= got[1]
    assert covered == set(man.files)


def test_plan_looks_only_at_this_ranks_ranges(tmp_path, monkeypatch):
    """The O(N^2 x B) cost came from computing every rank's ranges on every rank: a rank
    now asks the layout for its own pieces once, whatever the world size."""
    params = random_params(random.Random(0), 10)
    world = 12
    man = write_manifest(tmp_path, params, BufferLayout.build(params, world, 64, align=4))
    now = BufferLayout.build(params, world, 64, align=4)
    asked: list[int] = []
    real = BufferLayout.pieces
    monkeypatch.setattr(BufferLayout, "pieces", lambda self, r: asked.append(r) or real(self, r))
    L.plan_reads(man, as_optimizer(now), Group(5, world, None, False))
    assert asked == [5]


def test_plan_without_a_layout_reads_every_shard(tmp_path):
    """An optimizer without shards (not a ShardedAMS): every shard file is read and
    checksummed, as before."""
    params = [("a", (10,), 0)]
    man = write_manifest(tmp_path, params, BufferLayout.build(params, 3, None, align=1))
    needed, verify = L.plan_reads(man, SimpleNamespace(), Group(1, 2, None, False))
    assert needed == man.shard_files() and verify == set(man.files)
