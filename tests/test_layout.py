"""BufferLayout, the pure part of ZeRO-1: which rank owns which element (no process group).

For world sizes 1..5 and awkward parameter lists (0-size and 1-element params, more ranks
than a tensor has elements, several param groups, several buckets):

* every element of every param is owned by exactly one rank, and the three index spaces
  (param offset, buffer index, local index) of each owned piece agree;
* every rank's shard of every bucket has the same size; buckets are padded to a multiple
  of world_size * ALIGN and params start on ALIGN boundaries, without overlaps;
* ``runs()`` lists the same (bucket, group) sequence on every rank (collectives inside
  a run must line up), including runs that are empty on some ranks;
* ``bucket_numel`` closes a bucket as soon as it holds that many elements; params fill
  buckets in the order given (the order gradients are expected) and are stored group by
  group inside a bucket;
* every run handed to the kernel ends on a multiple of KERNEL_MULTIPLE, and the elements
  added for that are padding only.
"""

from __future__ import annotations

import math
import random

import pytest

from sharded_ams.layout import ALIGN, KERNEL_MULTIPLE, BufferLayout, pad_to

WORLD_SIZES = [1, 2, 3, 4, 5]

#: (name, shape, group) in fill order; groups may interleave (the layout sorts each bucket
#: by group, so every (bucket, group) run is contiguous)
SPECS = {
    "gpt_like": [("wte", (256, 32), 0), ("qkv.w", (96, 32), 0), ("ln.w", (32,), 1),
                 ("ln.b", (32,), 1), ("qkv.b", (96,), 1)],
    "tiny": [("one", (1,), 0), ("empty", (0,), 0), ("three", (3,), 0), ("scalar", (), 0),
             ("empty2", (4, 0), 0), ("two", (2,), 0)],
    "only_empty": [("e0", (0,), 0), ("e1", (0, 5), 0)],
    "single_element": [("x", (1,), 0)],
    "groups": [("a", (70,), 0), ("b", (1,), 0), ("c", (130,), 1), ("d", (0,), 1),
               ("e", (5, 13), 2)],
    "interleaved": [("l2.w", (40, 3), 0), ("l2.b", (3,), 1), ("l1.w", (3, 40), 0),
                    ("l1.b", (3,), 1), ("emb", (23, 5), 0), ("norm", (5,), 2)],
    "big_and_small": [("big", (1000, 3), 0), ("small", (7,), 0), ("mid", (200,), 1)],
}

BUCKETS = [None, 1, 64, 100, 500]


def _build(spec_name, world_size, bucket_numel=None):
    return BufferLayout.build(SPECS[spec_name], world_size, bucket_numel)


def _ownership(layout):
    """{param index: [owner rank per element]} from every rank's pieces (-1: unowned)."""
    owner = {s.index: [-1] * s.numel for s in layout.slots}
    dup = []
    for rank in range(layout.world_size):
        for pc in layout.pieces(rank):
            for k in range(pc.param_offset, pc.param_offset + pc.length):
                if owner[pc.slot.index][k] != -1:
                    dup.append((pc.slot.name, k, owner[pc.slot.index][k], rank))
                owner[pc.slot.index][k] = rank
    return owner, dup


@pytest.mark.parametrize("bucket_numel", BUCKETS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_every_element_owned_exactly_once(spec, world_size, bucket_numel):
    layout = _build(spec, world_size, bucket_numel)
    owner, dup = _ownership(layout)
    assert not dup, f"elements owned twice: {dup[:5]}"
    for slot in layout.slots:
        assert -1 not in owner[slot.index], f"{slot.name}: unowned elements"
    # index spaces agree: buffer index = slot start + param offset; local index maps back
    # to the buffer through the rank's shard of the piece's bucket
    for rank in range(world_size):
        for pc in layout.pieces(rank):
            assert pc.length > 0
            assert pc.buffer_start == pc.slot.start + pc.param_offset
            assert 0 <= pc.param_offset and pc.param_offset + pc.length <= pc.slot.numel
            bucket = layout.buckets[pc.slot.bucket]
            s0, s1 = bucket.shard(rank)
            assert s0 <= pc.buffer_start and pc.buffer_start + pc.length <= s1
            assert pc.local_start == layout.local_offset(pc.slot.bucket) + pc.buffer_start - s0
            assert 0 <= pc.local_start and pc.local_start + pc.length <= layout.shard_numel


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_more_ranks_than_elements(world_size):
    """A 1-element param (and a 3-element one) with up to 5 ranks: one owner per element,
    the other ranks own nothing of it and still have equal-size (padding) shards."""
    layout = _build("tiny", world_size)
    owner, _ = _ownership(layout)
    by_name = {s.name: s for s in layout.slots}
    assert len(owner[by_name["one"].index]) == 1 and owner[by_name["one"].index][0] >= 0
    assert owner[by_name["empty"].index] == [] and owner[by_name["empty2"].index] == []
    assert by_name["scalar"].numel == 1 and by_name["scalar"].shape == ()
    for rank in range(world_size):
        names = [pc.slot.name for pc in layout.pieces(rank)]
        assert "empty" not in names and "empty2" not in names
    assert layout.shard_numel * world_size == layout.numel


@pytest.mark.parametrize("bucket_numel", BUCKETS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_equal_shards_padding_and_alignment(spec, world_size, bucket_numel):
    layout = _build(spec, world_size, bucket_numel)
    assert layout.buckets, "every non-empty param list has at least one bucket"
    assert layout.numel == layout.buckets[-1].end
    prev_end = 0
    for b, bucket in enumerate(layout.buckets):
        assert bucket.start == prev_end, "buckets are contiguous"
        size = bucket.end - bucket.start
        assert size > 0 and size % (world_size * ALIGN) == 0, (b, size)
        assert bucket.world_size == world_size
        assert bucket.shard_size * world_size == size
        shards = [bucket.shard(r) for r in range(world_size)]
        assert shards[0][0] == bucket.start and shards[-1][1] == bucket.end
        for (a0, a1), (b0, b1) in zip(shards, shards[1:]):
            assert a1 == b0 and a1 - a0 == b1 - b0 == bucket.shard_size
        assert layout.local_offset(b) == sum(x.shard_size for x in layout.buckets[:b])
        prev_end = bucket.end
    assert layout.shard_numel == layout.numel // world_size
    # params: aligned, inside their bucket, in order, no overlap
    end = 0
    for slot in layout.slots:
        bucket = layout.buckets[slot.bucket]
        assert slot.start % ALIGN == 0
        assert slot.start >= end
        assert bucket.start <= slot.start and slot.end <= bucket.end
        assert slot.numel == math.prod(slot.shape)
        end = slot.end
    # the padding is bounded: per-param alignment plus per-bucket rounding
    used = sum(s.numel for s in layout.slots)
    assert layout.numel - used < ALIGN * len(layout.slots) + world_size * ALIGN * len(layout.buckets)
    # an unbucketed layout is exactly the aligned params padded to world_size * ALIGN
    if bucket_numel is None:
        assert len(layout.buckets) == 1
        assert layout.numel == pad_to(max(end, 1), world_size * ALIGN)


def test_bucket_padding_exact_values():
    layout = BufferLayout.build([("a", (10,), 0), ("b", (3,), 0)], 3)
    # a at 0, b aligned to 64; 67 elements padded to a multiple of 3 * 64 = 192
    assert [(s.start, s.end) for s in layout.slots] == [(0, 10), (64, 67)]
    assert [(b.start, b.end) for b in layout.buckets] == [(0, 192)]
    assert layout.shard_numel == 64
    assert [(pc.slot.name, pc.param_offset, pc.length) for pc in layout.pieces(0)] == [("a", 0, 10)]
    assert [(pc.slot.name, pc.param_offset, pc.length) for pc in layout.pieces(1)] == [("b", 0, 3)]
    assert layout.pieces(2) == []
    # a param cut by a shard boundary: 130 elements over 2 ranks of 128
    layout = BufferLayout.build([("w", (130,), 0)], 2)
    assert layout.numel == 256
    assert [(pc.param_offset, pc.length, pc.local_start) for pc in layout.pieces(0)] == [(0, 128, 0)]
    assert [(pc.param_offset, pc.length, pc.local_start) for pc in layout.pieces(1)] == [(128, 2, 0)]


@pytest.mark.parametrize("bucket_numel", BUCKETS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_runs_identical_order_across_ranks(spec, world_size, bucket_numel):
    layout = _build(spec, world_size, bucket_numel)
    groups = sorted({s.group for s in layout.slots})
    expected = sorted({(s.bucket, s.group) for s in layout.slots})
    for subset in (groups, groups[:1], groups[1:]):
        keys = None
        for rank in range(world_size):
            runs = layout.runs(rank, subset)
            k = [(r.bucket, r.group) for r in runs]
            assert k == [key for key in expected if key[1] in subset]
            if keys is not None:
                assert k == keys, f"rank {rank} has a different run order"
            keys = k
            local_end = 0
            owned = []
            for run in runs:
                assert run.local_start <= run.local_end
                if run.pieces:  # an empty run is a zero-length range anywhere in its bucket
                    assert run.local_start >= local_end, "runs do not overlap locally"
                    local_end = run.local_end
                off = layout.local_offset(run.bucket)
                assert off <= run.local_start and run.local_end <= off + layout.buckets[run.bucket].shard_size
                if not run.pieces:
                    assert run.local_start == run.local_end
                for pc in run.pieces:
                    assert pc.slot.bucket == run.bucket and pc.slot.group == run.group
                    assert run.local_start <= pc.local_start
                    assert pc.local_start + pc.length <= run.local_end
                    owned.append(pc)
            # the runs over all groups hold exactly the rank's pieces, in buffer order
            if subset == groups:
                assert owned == layout.pieces(rank)


def test_runs_can_be_empty_on_a_rank():
    """Every (bucket, group) pair has a run on every rank, zero-length where the rank owns
    none of it: a (group 0) lies on rank 0, b (group 1, aligned to 64) on rank 1, and
    ranks 2 and 3 own only padding."""
    layout = BufferLayout.build([("a", (10,), 0), ("b", (3,), 1)], 4)
    runs = [layout.runs(r, [0, 1]) for r in range(4)]
    assert all([(r.bucket, r.group) for r in rr] == [(0, 0), (0, 1)] for rr in runs)
    assert [[len(r.pieces) for r in rr] for rr in runs] == [[1, 0], [0, 1], [0, 0], [0, 0]]
    assert all(r.local_start == r.local_end for rr in runs for r in rr if not r.pieces)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bucket_numel_splits(world_size):
    spec = [(f"p{i}", (n,), 0) for i, n in enumerate([100, 30, 30, 30, 500, 1, 1, 64])]
    for bucket_numel in (1, 50, 150, 10_000):
        layout = BufferLayout.build(spec, world_size, bucket_numel)
        assert [s.name for s in layout.slots] == [n for n, _, _ in spec], "fill order kept"
        for b, bucket in enumerate(layout.buckets):
            slots = [s for s in layout.slots if s.bucket == b]
            assert slots, "no empty buckets"
            filled = sum(s.numel for s in slots)
            if b < len(layout.buckets) - 1:
                assert filled >= bucket_numel, "a bucket closes only once it is full"
            # ... and as soon as it is: without its last param it was not yet full
            assert filled - slots[-1].numel < bucket_numel
        if bucket_numel == 1:
            assert len(layout.buckets) == len(spec)
            assert [s.bucket for s in layout.slots] == list(range(len(spec)))
        if bucket_numel == 10_000:
            assert len(layout.buckets) == 1


def test_fill_order_and_groups_inside_a_bucket():
    """Buckets follow the fill order (here: one layer each, as backward produces them);
    inside a bucket params are stored by group, so each (bucket, group) is one run."""
    layout = BufferLayout.build(SPECS["interleaved"], 2, bucket_numel=121)
    by_bucket = [[(s.name, s.group) for s in layout.slots if s.bucket == b]
                 for b in range(len(layout.buckets))]
    assert by_bucket == [[("l2.w", 0), ("l2.b", 1)], [("l1.w", 0), ("l1.b", 1)],
                         [("emb", 0), ("norm", 2)]]
    # groups interleaved in the fill order: still sorted by group inside each bucket
    layout = BufferLayout.build([("b1", (5,), 1), ("w1", (7,), 0), ("b2", (5,), 1)], 3)
    assert [s.name for s in layout.slots] == ["w1", "b1", "b2"]
    for rank in range(3):
        assert [(r.bucket, r.group) for r in layout.runs(rank, [0, 1])] == [(0, 0), (0, 1)]


@pytest.mark.parametrize("bucket_numel", BUCKETS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_runs_padded_to_kernel_multiple(spec, world_size, bucket_numel):
    """Every non-empty run has a length that is a multiple of KERNEL_MULTIPLE and starts on
    one; the elements between its last piece and its end belong to no param and lie in
    the rank's shard of the run's bucket."""
    layout = _build(spec, world_size, bucket_numel)
    groups = sorted({s.group for s in layout.slots})
    occupied = set()
    for s in layout.slots:
        occupied.update(range(s.start, s.end))
    for rank in range(world_size):
        for run in layout.runs(rank, groups):
            if not run.pieces:
                continue
            assert run.local_start % KERNEL_MULTIPLE == 0
            assert (run.local_end - run.local_start) % KERNEL_MULTIPLE == 0, run
            last = run.pieces[-1]
            s0, s1 = layout.buckets[run.bucket].shard(rank)
            buf = lambda local: s0 + local - layout.local_offset(run.bucket)  # noqa: E731
            tail = range(buf(last.local_start + last.length), buf(run.local_end))
            assert len(tail) < KERNEL_MULTIPLE
            assert tail.stop <= s1 and not occupied.intersection(tail), (run, tail)


def test_run_padding_stops_at_the_next_param():
    """With a small alignment the tail may not reach a multiple of 16: it stops where the
    next param (of any group) starts, never covering it."""
    layout = BufferLayout.build([("a", (5,), 0), ("b", (6,), 1)], 1, align=8)
    runs = layout.runs(0, [0, 1])
    assert [(r.local_start, r.local_end) for r in runs] == [(0, 8), (8, 16)]


def test_random_layouts():
    """Random shapes, groups, world sizes and bucket sizes: ownership and run order."""
    rng = random.Random(1234)
    for _ in range(60):
        n = rng.randint(1, 8)
        group = 0
        spec = []
        for i in range(n):
            group += rng.random() < 0.3
            shape = tuple(rng.choice([0, 1, 2, 3, 7, 64, 65, 129]) for _ in range(rng.randint(0, 2)))
            spec.append((f"p{i}", shape, group))
        ws = rng.randint(1, 6)
        bn = rng.choice([None, 1, 10, 100, 1000])
        layout = BufferLayout.build(spec, ws, bn)
        owner, dup = _ownership(layout)
        assert not dup
        assert all(-1 not in o for o in owner.values())
        assert all((b.end - b.start) % ws == 0 for b in layout.buckets)
        groups = sorted({g for _, _, g in spec})
        orders = {tuple((r.bucket, r.group) for r in layout.runs(rk, groups)) for rk in range(ws)}
        assert len(orders) == 1


def test_empty_param_list_and_bad_world_size():
    layout = BufferLayout.build([], 3)
    assert layout.buckets == [] and layout.numel == 0 and layout.shard_numel == 0
    assert layout.pieces(0) == [] and layout.runs(0, [0]) == []
    with pytest.raises(ValueError, match="world_size"):
        BufferLayout.build([("a", (3,), 0)], 0)
