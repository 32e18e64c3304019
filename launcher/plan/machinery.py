"""``sharded-ams plan --layout-report``: the project's own machinery at N ranks, computed
with its pure functions and without processes: the ZeRO-1 layout and bucket plan
(:class:`sharded_ams.layout.BufferLayout`), the checkpoint manifest its commit writes
(``sharded_ams.checkpoint.commit``), and the reshard plan of a load on 3/4 of the ranks
(``sharded_ams.checkpoint.load.needed_shards``, the function every loading rank runs).

Sizes of shard files are estimated (fp32 m, v and master per element, plus ~400 bytes of
pickle per saved tensor); everything else is what the project's code produces."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .model import ModelSpec

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")
PICKLE_BYTES_PER_TENSOR = 400


def _bucket_numel(n: int) -> Optional[int]:
    """ShardedAMS's default bucket on NCCL at world size ``n`` (one bucket at n = 1)."""
    from sharded_ams.layout import default_bucket_numel

    return default_bucket_numel("nccl", n)


def build_layout(spec: ModelSpec, n: int, bucket_numel: Optional[int] = None):
    """(layout, seconds): what ShardedAMS(model) builds on NCCL at world size ``n``."""
    from sharded_ams.layout import BufferLayout

    fill = [(name, shape, 0) for name, shape in reversed(spec.params)]
    t = time.perf_counter()
    layout = BufferLayout.build(fill, n, bucket_numel or _bucket_numel(n))
    return layout, time.perf_counter() - t


def rank_pieces(layout) -> tuple[list[list], float]:
    """Every rank's pieces as the manifest stores them ([name, offset, length]), and the
    seconds ``layout.pieces`` took for all ranks."""
    t = time.perf_counter()
    out = [[[pc.slot.name, pc.param_offset, pc.length] for pc in layout.pieces(r)]
           for r in range(layout.world_size)]
    return out, time.perf_counter() - t


def _shard_size(pieces: list) -> int:
    numel = sum(p[2] for p in pieces)
    return 4 * len(STATE_KEYS) * numel + PICKLE_BYTES_PER_TENSOR * len(STATE_KEYS) * len(pieces)


def manifest_meta(spec: ModelSpec, n: int) -> dict:
    """What rank 0 puts in the manifest besides the files (``commit._prepare``'s meta)."""
    from sharded_ams import __version__
    from sharded_ams.checkpoint.format import FORMAT, FORMAT_VERSION

    names = [name for name, _ in spec.params]
    group = {"lr": 3e-4, "betas": [0.9, 0.95], "beta3": 0.0, "lam": -1.0, "eps": 1e-8,
             "weight_decay": 0.1, "step": 1000, "params": names}
    return {"format": FORMAT, "version": FORMAT_VERSION, "step": 1000, "world_size": n,
            "torch_version": "", "sharded_ams_version": __version__,
            "optimizer": {"class": "ShardedAMS", "state_format": "sharded_ams",
                          "state_format_version": 1, "param_groups": [group],
                          "state_keys": sorted(STATE_KEYS), "skipped_steps": 0},
            "params": {name: {"shape": list(s), "dtype": "torch.bfloat16", "group": 0,
                              "numel": math.prod(s)} for name, s in spec.params},
            "model": {"keys": {name: {"param": name} for name in names}}}


def write_manifest(spec: ModelSpec, pieces: list[list], directory: Path) -> tuple[dict, int, float]:
    """The manifest the project's commit writes for these pieces, written by its own
    ``_commit_manifest`` into ``directory``: (manifest, bytes, seconds)."""
    from sharded_ams.checkpoint.commit import _commit_manifest
    from sharded_ams.checkpoint.format import (MANIFEST_NAME, MODEL_EXTRA_NAME, TRAINER_NAME,
                                               shard_file_name)

    n = len(pieces)
    infos = []
    for r, pcs in enumerate(pieces):
        files = {shard_file_name(r, n): {"size": _shard_size(pcs), "sha256": "0" * 64}}
        if r == 0:
            files[TRAINER_NAME] = {"size": 2000, "sha256": "0" * 64}
            files[MODEL_EXTRA_NAME] = {"size": 1000, "sha256": "0" * 64}  # save(model=...)
        infos.append({"rank": r, "files": files, "pieces": pcs})
    t = time.perf_counter()
    manifest = _commit_manifest(directory, manifest_meta(spec, n), infos)
    seconds = time.perf_counter() - t
    return manifest, (directory / MANIFEST_NAME).stat().st_size, seconds


def _old_index(pieces: list[list]) -> dict[str, list[tuple[int, int, int]]]:
    """param name -> sorted (offset, end, old rank) of the saved pieces."""
    idx: dict[str, list[tuple[int, int, int]]] = {}
    for r, pcs in enumerate(pieces):
        for name, off, length in pcs:
            idx.setdefault(name, []).append((off, off + length, r))
    for v in idx.values():
        v.sort()
    return idx


def reshard_plan(old_pieces: list[list], new_layout) -> list[dict]:
    """For each new rank: the old shard files it reads (those holding any piece of a range
    it owns, as ``needed_shards`` decides) and the bytes of state it actually needs."""
    import bisect

    idx = _old_index(old_pieces)
    starts = {k: [a for a, _, _ in v] for k, v in idx.items()}
    plan = []
    for r in range(new_layout.world_size):
        files: set[int] = set()
        need = 0
        for pc in new_layout.pieces(r):
            lo, hi = pc.param_offset, pc.param_offset + pc.length
            entries, st = idx[pc.slot.name], starts[pc.slot.name]
            k = max(bisect.bisect_right(st, lo) - 1, 0)
            while k < len(entries) and entries[k][0] < hi:
                if entries[k][1] > lo:
                    files.add(entries[k][2])
                k += 1
            need += pc.length
        plan.append({"files": sorted(files), "state_bytes": 4 * len(STATE_KEYS) * need})
    return plan


def time_needed_shards(manifest: dict, directory: Path, new_layout, ranks: list[int]) -> tuple[float, list]:
    """Seconds per call of the project's ``needed_shards`` (the loader's own reshard
    planning) on a few new ranks, and its answers (to check :func:`reshard_plan`)."""
    from sharded_ams.checkpoint.format import Manifest
    from sharded_ams.checkpoint.load import needed_shards

    man = Manifest(path=directory, step=manifest["step"], world_size=manifest["world_size"],
                   params=manifest["params"], optimizer=manifest["optimizer"],
                   files=manifest["files"], model=manifest["model"])
    opt = SimpleNamespace(shards=[SimpleNamespace(layout=new_layout)])
    t = time.perf_counter()
    answers = [needed_shards(man, opt, r) for r in ranks]
    return (time.perf_counter() - t) / len(ranks), answers


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def layout_report(spec: ModelSpec, n: int, m: Optional[int] = None, sample: int = 3) -> dict:
    """The whole report for ``n`` ranks and a reshard to ``m`` (default 3/4 of ``n``)."""
    from sharded_ams.checkpoint.format import shard_file_name

    m = m or max(1, n * 3 // 4)
    layout, build_s = build_layout(spec, n)
    pieces, pieces_s = rank_pieces(layout)
    real = [sum(p[2] for p in pcs) for pcs in pieces]
    with tempfile.TemporaryDirectory(prefix="plan-manifest-") as tmp:
        manifest, manifest_bytes, manifest_s = write_manifest(spec, pieces, Path(tmp))
        new_layout, new_build_s = build_layout(spec, m)
        t = time.perf_counter()
        plan = reshard_plan(pieces, new_layout)
        plan_s = time.perf_counter() - t
        ranks = sorted({0, m // 2, m - 1})[:sample]
        per_call, answers = time_needed_shards(manifest, Path(tmp), new_layout, ranks)
    agree = all(a == [shard_file_name(f, n) for f in plan[r]["files"]] for r, a in zip(ranks, answers))
    sizes = {f: v["size"] for f, v in manifest["files"].items()}
    read = [sum(sizes[shard_file_name(f, n)] for f in p["files"]) for p in plan]
    return {
        "model": spec.name, "params": spec.num_params, "param_tensors": len(spec.params), "n": n, "m": m,
        "layout": {"build_s": build_s, "buckets": len(layout.buckets), "bucket_numel": _bucket_numel(n),
                   "buffer_numel": layout.numel, "shard_numel": layout.shard_numel,
                   "real_elements_per_rank": _stats(real),
                   "balance_max_over_min": max(real) / max(min(real), 1),
                   "pieces_per_rank": _stats([len(p) for p in pieces]),
                   "pieces_total": sum(len(p) for p in pieces), "pieces_all_ranks_s": pieces_s},
        "checkpoint": {"files": len(manifest["files"]) + 1, "manifest_bytes": manifest_bytes,
                       "manifest_write_s": manifest_s,
                       "shard_file_bytes": _stats([sizes[shard_file_name(r, n)] for r in range(n)])},
        "reshard": {"new_build_s": new_build_s, "plan_all_ranks_s": plan_s,
                    "files_per_new_rank": _stats([len(p["files"]) for p in plan]),
                    "bytes_read_per_new_rank": _stats(read),
                    "bytes_needed_per_new_rank": _stats([p["state_bytes"] for p in plan]),
                    "needed_shards_s_per_call": per_call, "needed_shards_agrees": agree,
                    "files_to_verify_s_per_rank": per_call * m},
    }


def render_layout_report(rep: dict) -> str:
    """The report as text."""
    lay, ck, rs = rep["layout"], rep["checkpoint"], rep["reshard"]
    gb = 1e9
    return "\n".join([
        f"layout report: {rep['model']} ({rep['params'] / 1e9:.2f}B params in {rep['param_tensors']} "
        f"tensors), N = {rep['n']:,} ranks, reshard to M = {rep['m']:,}",
        f"ZeRO-1 layout: built in {lay['build_s'] * 1e3:.1f} ms; {lay['buckets']} buckets of >= "
        f"{lay['bucket_numel']:,} elements; {lay['shard_numel']:,} elements of state per rank "
        f"(equal by construction); real (non-padding) elements per rank "
        f"{lay['real_elements_per_rank']['min']:,.0f}..{lay['real_elements_per_rank']['max']:,.0f} "
        f"(max/min {lay['balance_max_over_min']:.3f})",
        f"pieces per rank {lay['pieces_per_rank']['min']:.0f}..{lay['pieces_per_rank']['max']:.0f} "
        f"(mean {lay['pieces_per_rank']['mean']:.1f}), {lay['pieces_total']:,} in all; "
        f"layout.pieces() for every rank: {lay['pieces_all_ranks_s']:.1f} s",
        f"checkpoint: {ck['files']:,} files; manifest.json {ck['manifest_bytes'] / 1e6:.1f} MB "
        f"(written in {ck['manifest_write_s']:.1f} s); shard files "
        f"{ck['shard_file_bytes']['mean'] / gb:.2f} GB each (estimated)",
        f"reshard {rep['n']:,} -> {rep['m']:,}: each new rank reads "
        f"{rs['files_per_new_rank']['min']:.0f}..{rs['files_per_new_rank']['max']:.0f} old files "
        f"(mean {rs['files_per_new_rank']['mean']:.2f}), "
        f"{rs['bytes_read_per_new_rank']['mean'] / gb:.2f} GB read (whole files, mean; max "
        f"{rs['bytes_read_per_new_rank']['max'] / gb:.2f}) for {rs['bytes_needed_per_new_rank']['mean'] / gb:.2f} "
        f"GB of state it keeps",
        f"planning: needed_shards() {rs['needed_shards_s_per_call']:.3f} s per rank "
        f"(agrees with the sweep here: {rs['needed_shards_agrees']}); files_to_verify() calls it "
        f"for all M ranks on every rank: ~{rs['files_to_verify_s_per_rank']:.0f} s per rank "
        f"(O(M x pieces), super-linear)",
    ])
