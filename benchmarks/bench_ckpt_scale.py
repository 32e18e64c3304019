"""Checkpoints at scale (issue 26, item 7): load planning time and the device memory of a save.

**Load planning** (pure functions, no processes, no files but the manifest): a synthetic
manifest of a Llama-7B-like model (291 params, 6.74B elements; buckets of 6,553,600
elements, the NCCL default: 226 buckets) saved on N ranks and loaded on N ranks. For a few
ranks it times what ``load_checkpoint`` does before it opens a shard file: which shard files
the rank reads and which it checksums (``load.plan_reads`` where it exists, else the
``needed_shards`` + ``files_to_verify`` pair that ``_read`` used). ``read_manifest`` (parse
and check every rule of the manifest, the same code before and after) is timed for scale.

**Device memory of a save**: ``ShardedAMS.state_dict()`` on CPU at world size 1 for a
scaled-down Llama-like model, under a ``TorchDispatchMode`` that adds up the bytes of every
new tensor an op derives from the optimizer's tensors (clone, ``_to_copy``, ``contiguous``,
...: on a GPU these land on the GPU) apart from copies to another device, and, separately,
the bytes of the tensors made by factory functions (the host buffers). Reported per element
of local state and for 7B at N = 8. On a CUDA machine the peak-allocated delta of the
device is measured too.

    python benchmarks/bench_ckpt_scale.py --world-sizes 8 64 1024
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from bisect import bisect_right
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from sharded_ams import ShardedAMS  # noqa: E402
from sharded_ams.checkpoint import load as ckpt_load  # noqa: E402
from sharded_ams.checkpoint.group import Group  # noqa: E402
from sharded_ams.checkpoint.validate import read_manifest  # noqa: E402
from sharded_ams.layout import BufferLayout  # noqa: E402

NCCL_BUCKET = 6_553_600
LLAMA_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32)
PLAN_COLS = ["world_size", "buckets", "pieces", "read_manifest_s", "plan_ms_per_rank",
             "needed_files", "verify_files", "ranks_timed"]
SAVE_COLS = ["case", "local_elements", "state_bytes", "device_bytes", "device_per_state_byte",
             "host_bytes", "cuda_peak_delta", "gb_7b_n8"]


# ---------------------------------------------------------------------------- layout
def llama_params(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[str, tuple, int]]:
    """(name, shape, group) of a Llama-like model in gradient order (the reverse of
    forward order, as ShardedAMS fills its buckets)."""
    out = [("lm_head.weight", (vocab, hidden), 0), ("norm.weight", (hidden,), 1)]
    for i in reversed(range(layers)):
        p = f"layers.{i}."
        out += [(p + "mlp.down.weight", (hidden, inter), 0),
                (p + "mlp.up.weight", (inter, hidden), 0),
                (p + "mlp.gate.weight", (inter, hidden), 0),
                (p + "post_norm.weight", (hidden,), 1)]
        out += [(p + f"attn.{w}.weight", (hidden, hidden), 0) for w in "ovkq"]
        out += [(p + "input_norm.weight", (hidden,), 1)]
    return out + [("embed.weight", (vocab, hidden), 0)]


def rank_pieces(layout: BufferLayout, by_bucket: list[list], rank: int) -> list[list]:
    """[name, offset, length] of what ``rank`` owns, in O(pieces) (``layout.pieces`` is
    O(slots x buckets), too slow to build 1,024 ranks' worth)."""
    out = []
    for b, bk in enumerate(layout.buckets):
        s0, s1 = bk.shard(rank)
        starts, slots = by_bucket[b]
        i = max(bisect_right(starts, s0) - 1, 0)
        while i < len(slots) and slots[i].start < s1:
            sl = slots[i]
            lo, hi = max(sl.start, s0), min(sl.end, s1)
            if lo < hi:
                out.append([sl.name, lo - sl.start, hi - lo])
            i += 1
    return out


def synthetic_manifest(params: list, layout: BufferLayout, world: int) -> dict:
    """A manifest that passes every rule of ``read_manifest``, for ``layout`` on ``world``
    ranks (file sizes: the least bytes the pieces need; checksums: placeholders)."""
    by_bucket: list[list] = [[[], []] for _ in layout.buckets]
    for sl in layout.slots:
        by_bucket[sl.bucket][0].append(sl.start)
        by_bucket[sl.bucket][1].append(sl)
    files: dict[str, dict] = {}
    for r in range(world):
        pieces = rank_pieces(layout, by_bucket, r)
        files[f"shard-rank{r:05d}-of-{world:05d}.pt"] = {
            "kind": "shard", "rank": r, "pieces": pieces, "sha256": "0" * 64,
            "size": 12 * sum(p[2] for p in pieces) + 4096}
    files["trainer.pt"] = {"kind": "trainer", "size": 1024, "sha256": "0" * 64}
    groups = [{"lr": 3e-4, "betas": [0.9, 0.95], "beta3": 0.0, "lam": -1.0, "eps": 1e-8,
               "weight_decay": wd, "step": 1000, "params": [n for n, _, g in params if g == gi]}
              for gi, wd in ((0, 0.1), (1, 0.0))]
    return {"format": "sharded_ams.checkpoint", "version": 1, "step": 1000, "world_size": world,
            "torch_version": torch.__version__, "sharded_ams_version": "bench",
            "optimizer": {"class": "ShardedAMS", "state_format": "sharded_ams",
                          "state_format_version": 1, "param_groups": groups,
                          "state_keys": ["exp_avg", "exp_avg_sq", "master"], "skipped_steps": 0},
            "params": {n: {"shape": list(s), "dtype": "torch.bfloat16", "group": g,
                           "numel": math.prod(s)} for n, s, g in params},
            "model": None, "created": "", "created_unix": 0.0, "files": files}


# ---------------------------------------------------------------------------- planning
def plan(man, optimizer, ctx: Group) -> tuple[list[str], set[str]]:
    """What one rank reads and checksums: ``load.plan_reads`` or, in code without it, the
    same steps ``load._read`` took."""
    fn = getattr(ckpt_load, "plan_reads", None)
    if fn is not None:
        return fn(man, optimizer, ctx)
    needed = ckpt_load.needed_shards(man, optimizer, ctx.rank)
    if needed is None:
        needed = man.shard_files()
    if not needed:
        needed = [man.shard_files()[0]]
    return needed, ckpt_load.files_to_verify(man, optimizer, ctx, needed)


def bench_plan(world: int, sample: int, scale: float, bucket: int) -> dict:
    """One row: a manifest saved on ``world`` ranks, loaded on ``world`` ranks."""
    dims = {k: max(1, int(v * scale)) if k != "layers" else v for k, v in LLAMA_7B.items()}
    params = llama_params(**dims)
    layout = BufferLayout.build([(n, s, g) for n, s, g in params], world,
                                int(bucket * scale * scale) or 1)
    d = synthetic_manifest(params, layout, world)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(d))
        t0 = time.perf_counter()
        man = read_manifest(tmp)
        t_read = time.perf_counter() - t0
        opt = SimpleNamespace(shards=[SimpleNamespace(layout=layout)])
        ranks = sorted({0, world - 1, world // 2})[:sample]
        times, needed, verify = [], [], []
        for r in ranks:
            t0 = time.perf_counter()
            nd, vf = plan(man, opt, Group(r, world, None, False))
            times.append(time.perf_counter() - t0)
            needed.append(len(nd))
            verify.append(len(vf))
    return {"world_size": world, "buckets": len(layout.buckets), "params": len(params),
            "numel": layout.slots and sum(s.numel for s in layout.slots),
            "pieces": sum(len(f.get("pieces", ())) for f in d["files"].values()),
            "read_manifest_s": t_read, "plan_ms_per_rank": 1e3 * statistics.median(times),
            "plan_ms": [1e3 * t for t in times], "ranks_timed": len(ranks),
            "needed_files": max(needed), "verify_files": max(verify)}


# ---------------------------------------------------------------------------- save memory
class AllocCounter(TorchDispatchMode):
    """Bytes of new tensors made while active: ``derived`` (an op's output on new storage
    computed from a watched storage, transitively: it lives on the state's device) and
    ``host`` (factory functions, e.g. the pinned host buffers, and copies to another
    device)."""

    def __init__(self, watched: Sequence[Tensor]):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in watched}
        self.derived = self.host = 0
        self.derived_ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
               if isinstance(t, Tensor)}
        to_other_device = "device" in kwargs and kwargs["device"] is not None and any(
            isinstance(t, Tensor) and t.device != torch.device(kwargs["device"])
            for t in pytree.tree_leaves(args))
        from_state = bool(ins & self.watched) and not to_other_device
        for t in pytree.tree_leaves(out):
            if not isinstance(t, Tensor) or t.untyped_storage().data_ptr() in ins:
                continue
            n = t.untyped_storage().nbytes()
            if from_state:
                self.derived += n
                self.watched.add(t.untyped_storage().data_ptr())
                name = func.overloadpacket.__name__
                self.derived_ops[name] = self.derived_ops.get(name, 0) + n
            else:
                self.host += n
        return out


class LlamaBlob(nn.Module):
    """The params of ``llama_params`` (no compute: only the optimizer is measured)."""

    def __init__(self, params: list, dtype: torch.dtype):
        super().__init__()
        for n, s, _ in reversed(params):  # forward order
            self.register_parameter(n.replace(".", "_"), nn.Parameter(
                torch.randn(s, dtype=torch.float32).to(dtype) * 0.02))


def optimizer_tensors(opt: ShardedAMS) -> list[Tensor]:
    """Every tensor whose storage the optimizer owns: state, masters, param/grad buffers."""
    out = []
    for sh in opt.shards:
        out += list(sh.state.values())
        out += [t for t in (getattr(sh.buf, "param", None), getattr(sh.buf, "grad", None))
                if isinstance(t, Tensor)]
    return out


def bench_save(case: str, dtype: torch.dtype, hp: dict, scale: float,
               device: torch.device) -> dict:
    """One row: bytes ``state_dict()`` allocates on the state's device and on the host."""
    dims = {k: max(1, int(v * scale)) if k != "layers" else 2 for k, v in LLAMA_7B.items()}
    torch.manual_seed(0)
    model = LlamaBlob(llama_params(**dims), dtype).to(device)
    opt = ShardedAMS(model, backend="eager", lr=1e-3, bucket_numel=None, **hp)
    opt.finish_param_sync()  # (no step: the values do not change what is allocated)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        opt.state_dict()
        peak = torch.cuda.max_memory_allocated(device) - base
    with AllocCounter(optimizer_tensors(opt)) as counter:
        sd = opt.state_dict()
    assert sd["pieces"], "state_dict() holds no pieces"
    # what a save holds: the pieces' tensors (unpadded), 12 or 16 bytes per element
    elems = sum(rec["length"] for rec in sd["pieces"])
    state_bytes = sum(rec[k].numel() * rec[k].element_size() for rec in sd["pieces"]
                      for k in sd["state_keys"])
    per_elem = state_bytes / elems
    ratio = counter.derived / state_bytes
    return {"case": case, "local_elements": elems, "state_bytes": state_bytes,
            "device_bytes": counter.derived, "device_per_state_byte": ratio,
            "device_ops": counter.derived_ops, "host_bytes": counter.host,
            "cuda_peak_delta": peak, "gb_7b_n8": ratio * per_elem * 6.74e9 / 8 / 1e9}


SAVE_CASES = (("fp32 params, grams (m, v; master = params)", torch.float32, {"preset": "grams"}),
              ("bf16 params, beta3 > 0 (m, v, s, fp32 master)", torch.bfloat16,
               {"beta3": 0.9, "lam": 0.5}))


# ---------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--ranks-timed", type=int, default=3,
                    help="ranks whose planning is timed per world size (rank 0, N/2, N-1)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale the 7B dims (and buckets, by scale^2) for the planning rows")
    ap.add_argument("--save-scale", type=float, default=1 / 16,
                    help="dims of the model whose state_dict() is counted, vs Llama-7B")
    add_out_args(ap, "bench_ckpt_scale.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan_rows = []
    for n in args.world_sizes:
        plan_rows.append(bench_plan(n, args.ranks_timed, args.scale, NCCL_BUCKET))
        print_table(plan_rows[-1:], PLAN_COLS)
    save_rows = [bench_save(c, d, p, args.save_scale, device) for c, d, p in SAVE_CASES]
    print("\nLoad planning per rank (synthetic Llama-7B-like manifest, N -> N):")
    print_table(plan_rows, PLAN_COLS)
    print(f"\nBytes state_dict() allocates ({device.type}; gb_7b_n8: the same ratio for 7B "
          "params on 8 ranks):")
    print_table(save_rows, SAVE_COLS)
    report = {"meta": {**env_info(device), "world_sizes": args.world_sizes,
                       "scale": args.scale, "save_scale": args.save_scale,
                       "bucket_numel": NCCL_BUCKET, "argv": list(argv or sys.argv[1:])},
              "plan": plan_rows, "save": save_rows}
    write_json(resolve_out(args.out, args.update_record, "bench_ckpt_scale.json"), report)
    return report


if __name__ == "__main__":
    main()
