"""``load_dcp`` shares the sha256 work (``dcp.hash_duty``): each rank checksums the data
files it reads (DCP's own load plan) plus a round-robin share of all of them, so that
together the ranks check every file, instead of every rank reading the whole checkpoint.

One spawned job of 2 gloo ranks records, inside each rank, the files ``load_dcp`` hashes
(``dcp_meta.open_checked`` with ``checksum``) and the data files ``dcp.load`` reads
(``dcp_reader._read_file``): a ShardedAMS checkpoint loaded on the same layout (each rank reads
its own file only), an FSDP2 one (rank 1 also reads rank 0's file, which holds the
replicated items, ``save_dcp``'s ``dedup_save_to_lowest_rank``), and a data file only rank 1 reads made corrupt: every rank
refuses with the same CheckpointError. A file that no rank reads is hashed by its share
(``hash_duty`` called directly)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from dist_utils import run_distributed

DATA = ["__0_0.distcp", "__1_0.distcp"]


def _pair(kind: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    if kind == "zero1":
        from sharded_ams import ShardedAMS

        return model, ShardedAMS(model, backend="eager", lr=1e-2)
    from torch.distributed.fsdp import fully_shard

    from sharded_ams import AMS

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, AMS(model.parameters(), lr=1e-2, lam=0.0)


def _job(root: str) -> dict:
    import torch.distributed as dist

    from sharded_ams.checkpoint import CheckpointError, dcp, dcp_meta, dcp_reader

    hashed: set = set()
    opened: set = set()
    check, read_file = dcp_meta.open_checked, dcp_reader._read_file

    def checking(man, name, *, checksum=True):
        if checksum:
            hashed.add(name)
        return check(man, name, checksum=checksum)

    def reading(man, md, files, rel, *a):  # hashed before the load, not only as it reads
        opened.add(rel if rel in hashed else f"{rel} (not checked before the load)")
        return read_file(man, md, files, rel, *a)

    dcp_meta.open_checked, dcp_reader._read_file = checking, reading
    warnings.simplefilter("ignore")
    out: dict = {}
    for kind in ("zero1", "fsdp"):
        path = os.path.join(root, kind)
        model, opt = _pair(kind, 0)
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        dcp.save_dcp(path, model, opt, step=1)
        hashed.clear(), opened.clear()
        model, opt = _pair(kind, 1)
        dcp.load_dcp(path, model, opt, restore_rng=False)
        out[kind] = (sorted(hashed), sorted(opened))
    dist.barrier()
    if dist.get_rank() == 0:  # a byte of the file only rank 1 reads (its size unchanged)
        with open(os.path.join(root, "zero1", DATA[1]), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    hashed.clear()
    model, opt = _pair("zero1", 1)
    try:
        dcp.load_dcp(os.path.join(root, "zero1"), model, opt)
        out["corrupt"] = None
    except CheckpointError as exc:
        out["corrupt"] = (exc.kind, str(exc.path), exc.field, str(exc), sorted(hashed))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    return root, run_distributed(_job, 2, str(root), timeout=120)


@pytest.mark.parametrize("kind", ["zero1", "fsdp"])
def test_each_rank_hashes_what_it_reads_and_together_every_file(results, kind):
    _, got = results
    hashed = [set(r[kind][0]) for r in got]
    opened = [set(r[kind][1]) for r in got]
    for rank in range(2):
        assert opened[rank] and opened[rank] <= hashed[rank], (rank, opened, hashed)
        assert {".metadata", "trainer.pt"} <= hashed[rank]  # every rank reads them
    assert set(DATA) | {"rng-rank00000.pt", "rng-rank00001.pt"} <= hashed[0] | hashed[1]
    if kind == "zero1":  # the same layout: each rank reads its own file, hashes only that
        assert opened == [{DATA[0]}, {DATA[1]}]
        assert [h & set(DATA) for h in hashed] == [{DATA[0]}, {DATA[1]}]
    else:  # replicated items (the steps) saved in rank 0's file only: rank 0 reads its own
        assert opened == [{DATA[0]}, set(DATA)]  # file, rank 1 its own and rank 0's


def test_a_corrupt_file_only_rank_1_reads_is_refused_on_every_rank(results):
    _, got = results
    (kind0, path0, field0, msg0, hashed0), (kind1, path1, field1, msg1, hashed1) = \
        [r["corrupt"] for r in got]
    assert DATA[1] not in hashed0 and DATA[1] in hashed1  # rank 0 learns it by agreement
    assert (kind0, path0, field0) == (kind1, path1, field1) == (
        "corrupt", path1, "sha256") and path1.endswith(DATA[1])
    assert msg0 == f"(reported by rank 1) {msg1}" and "sha256" in msg1


def test_a_file_no_rank_reads_is_hashed_by_its_share(results):
    """A state dict of only the keys stored in rank 0's file: both ranks read that file and
    neither reads rank 1's, which its share still gives to rank 1."""
    from sharded_ams.checkpoint.dcp import files_read, hash_duty
    from sharded_ams.checkpoint.dcp_meta import read_dcp_manifest, read_dcp_metadata
    from sharded_ams.checkpoint.group import Group

    root, _ = results
    man = read_dcp_manifest(root / "zero1")
    md = read_dcp_metadata(man)
    where: dict = {}
    for index, info in md.storage_data.items():
        where.setdefault(index.fqn, set()).add(info.relative_path)
    sd = {fqn: torch.empty(tuple(md.state_dict_metadata[fqn].size))
          for fqn, files in where.items() if files == {DATA[0]} and fqn.startswith("model.")}
    assert sd and files_read(md, sd, 0) == {DATA[0]}
    duty = [hash_duty(man, md, sd, Group(r, 2, None, False)) for r in range(2)]
    assert duty == [{DATA[0], "rng-rank00000.pt"}, {DATA[0], DATA[1], "rng-rank00001.pt"}]


def test_planning_leaves_the_state_dict_as_it_is(results):
    """DCP's planner set-up rewrites the nesting in place (lists into new lists, values of
    types it does not know into None): the plan is made on a copy."""
    from sharded_ams.checkpoint.dcp import files_read
    from sharded_ams.checkpoint.dcp_meta import read_dcp_manifest, read_dcp_metadata

    root, _ = results
    md = read_dcp_metadata(read_dcp_manifest(root / "zero1"))
    inner, odd = [torch.zeros(1)], object()
    sd = {"model": {"x": inner, "y": odd}}
    assert files_read(md, sd, 0) is None  # no such keys: unplannable, so check everything
    assert sd == {"model": {"x": inner, "y": odd}} and sd["model"]["x"] is inner
