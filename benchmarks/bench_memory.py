"""Memory per rank, measured: bytes of params, gradients and optimizer state counted from
the tensors each rank actually holds, for the same Llama under each parallel strategy, at
N = 2 and 4 gloo ranks (issue 20, part 5), next to the formula each strategy follows.

Strategies (bf16 training as the launcher runs it):

* ``zero1``: ``ShardedAMS`` (Grams) on bf16 params: the full bf16 params and the full fp32
  gradient buffer on every rank, fp32 m, v and masters sharded: 2P + 4P + 12P/N.
* ``zero1+tp2``: the same on the dp dimension of a (N/2, 2) mesh, the Llama tensor-parallel
  (``launcher/train/parallel/tp.py``): each rank holds L = P_tp/2 + P_rep (its TP shard of
  the split matrices and the replicated norm weights): 2L + 4L + 12L/(N/2).
* ``fsdp``: FSDP2 ``fully_shard`` on each block and the root, fp32 sharded params computed
  in bf16 and reduced in fp32 (``MixedPrecisionPolicy``), ``Grams`` on the DTensor params:
  params, grads, m and v sharded: (4 + 4 + 8)P/N. While a block runs, its bf16 params are
  all-gathered: ``gathered_peak`` (max over blocks, measured in a forward pre-hook), 2 bytes
  x the largest FSDP unit; not in the persistent total.
* ``fsdp+tp2``: FSDP2 over dp of a (N/2, 2) mesh after the TP plan: L' = P_tp/N + P_rep/(N/2)
  per rank: 16L'; the gathered block is half as large.

Counted after one forward, backward and step (state allocated), before ``zero_grad``:
params = the param storage (ShardedAMS: its flat buffers, padding included; FSDP: each
DTensor's local shard), grads = the gradient storage (ShardedAMS: its flat fp32 buffers;
FSDP: each ``p.grad``'s local shard, counted after backward), state = every state tensor
(local shards). The max over ranks is reported.

    PYTHONPATH=. python benchmarks/bench_memory.py --update-record
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from dist_bench import run_on_ranks  # noqa: E402

STRATEGIES = ("zero1", "zero1+tp2", "fsdp", "fsdp+tp2")
WORLDS = (2, 4)
TP = 2


def _cfg(args):
    from launcher.train.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers,
                       n_head=args.heads, n_kv_head=args.kv_heads, n_embd=args.width,
                       intermediate_size=args.ffn)


def _local_bytes(t) -> int:
    from sharded_ams.dtensor import local

    t = local(t)
    return 0 if t is None or t.dim() == 0 else t.numel() * t.element_size()


def _step(model, opt, args) -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    model(idx, idx)[1].backward()


def _zero1(args, mesh=None) -> dict:
    from launcher.train.models.llama import Llama
    from launcher.train.parallel.tp import apply_tp
    from sharded_ams import ShardedAMS

    torch.manual_seed(0)
    model = Llama(_cfg(args)).to(torch.bfloat16)
    if mesh is not None:
        apply_tp(model, mesh["tp"])
    opt = ShardedAMS(model, preset="grams", backend="eager", device_mesh=mesh)
    _step(model, opt, args)
    opt.step()
    opt.finish_param_sync()
    return dict(params=sum(_local_bytes(sh.buf.param) for sh in opt.shards),
                grads=sum(_local_bytes(sh.buf.grad) for sh in opt.shards),
                state=opt.state_bytes(), gathered_peak=0)


def _fsdp(args, mesh=None) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from launcher.train.models.llama import Llama
    from launcher.train.parallel.tp import apply_tp
    from sharded_ams import Grams

    torch.manual_seed(0)
    model = Llama(_cfg(args))
    if mesh is not None:
        apply_tp(model, mesh["tp"])
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    dp = None if mesh is None else mesh["dp"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp, mp_policy=mp)
    fully_shard(model, mesh=dp, mp_policy=mp)
    peak = [0]

    def gathered(module, _args) -> None:  # runs after FSDP's own pre-forward (the unshard)
        peak[0] = max(peak[0], sum(_local_bytes(p) for p in module.parameters()))
    for layer in model.model.layers:
        layer.register_forward_pre_hook(gathered)
    opt = Grams(model.parameters(), lr=1e-3)
    _step(model, opt, args)
    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters())
    opt.step()
    state = sum(_local_bytes(t) for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    return dict(params=params, grads=grads, state=state, gathered_peak=peak[0])


def _worker(rank: int, world: int, args) -> dict:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world // TP, TP), mesh_dim_names=("dp", "tp"))
    return {"zero1": _zero1(args), "zero1+tp2": _zero1(args, mesh), "fsdp": _fsdp(args),
            "fsdp+tp2": _fsdp(args, mesh)}


def param_counts(args) -> dict:
    """P (all params), P_rep (RMSNorm weights: replicated under TP), P_tp (the split
    matrices), one decoder layer's params (the FSDP unit a forward gathers) and its TP
    shard."""
    from launcher.train.models.llama import Llama

    with torch.device("meta"):
        model = Llama(_cfg(args))
    total = sum(p.numel() for p in model.parameters())
    rep = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    block = dict(model.model.layers[0].named_parameters())
    layer = sum(p.numel() for p in block.values())
    layer_rep = sum(p.numel() for n, p in block.items() if "norm" in n)
    return dict(P=total, P_rep=rep, P_tp=total - rep, layer=layer,
                layer_tp=(layer - layer_rep) / TP + layer_rep)


def formulas(c: dict, n: int) -> dict:
    """Bytes per rank each strategy should hold (padding aside): strategy -> (params,
    grads, state, gathered block)."""
    p, rep, split = c["P"], c["P_rep"], c["P_tp"]
    dp = n // TP
    local_tp = split / TP + rep              # a rank's TP shard of the model (zero1+tp)
    local_ftp = split / n + rep / dp         # ... sharded again over dp (fsdp+tp)
    return {
        "zero1": (2 * p, 4 * p, 12 * p / n, 0),
        "zero1+tp2": (2 * local_tp, 4 * local_tp, 12 * local_tp / dp, 0),
        "fsdp": (4 * p / n, 4 * p / n, 8 * p / n, 2 * c["layer"]),
        "fsdp+tp2": (4 * local_ftp, 4 * local_ftp, 8 * local_ftp, 2 * c["layer_tp"]),
    }


def rows_from(per_n: dict, counts: dict) -> list[dict]:
    rows = []
    for n, ranks in per_n.items():
        want = formulas(counts, n)
        for s in STRATEGIES:
            got = {k: max(r[s][k] for r in ranks) for k in ("params", "grads", "state",
                                                           "gathered_peak")}
            f = dict(zip(("params", "grads", "state", "gathered_peak"), want[s]))
            total = got["params"] + got["grads"] + got["state"]
            f_total = f["params"] + f["grads"] + f["state"]
            rows.append(dict(strategy=s, N=n, params_MB=got["params"] / 1e6,
                             grads_MB=got["grads"] / 1e6, state_MB=got["state"] / 1e6,
                             total_MB=total / 1e6, formula_total_MB=f_total / 1e6,
                             measured_over_formula=total / f_total,
                             gathered_peak_MB=got["gathered_peak"] / 1e6,
                             formula_gathered_MB=f["gathered_peak"] / 1e6,
                             bytes=got, formula_bytes=f))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    ap.add_argument("--timeout", type=float, default=1200.0)
    add_out_args(ap, "bench_memory.json")
    args = ap.parse_args(argv)
    if any(n % TP or n < TP for n in args.worlds):
        ap.error(f"--worlds must be multiples of tp = {TP}")
    env = env_info()
    counts = param_counts(args)
    per_n = {n: run_on_ranks(_worker, n, args, timeout=args.timeout, threads=1)
             for n in args.worlds}
    rows = rows_from(per_n, counts)
    meta = dict(env, **{k: vars(args)[k] for k in ("layers", "width", "heads", "kv_heads",
                                                   "ffn", "vocab", "seq", "worlds")},
                tp=TP, **counts)
    print(f"Llama {counts['P']:,} params ({counts['P_rep']:,} in RMSNorm weights); bytes "
          "per rank, max over ranks (MB = 1e6 bytes)")
    print_table(rows, ["strategy", "N", "params_MB", "grads_MB", "state_MB", "total_MB",
                       "formula_total_MB", "measured_over_formula", "gathered_peak_MB",
                       "formula_gathered_MB"])
    write_json(resolve_out(args.out, args.update_record, "bench_memory.json"),
               dict(meta=meta, rows=rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
