"""Gradient reduction of bf16 params in fp32 (the default) vs in bf16: error and bytes.

On N gloo ranks (default 2 and 4), a bf16 GPT gets different batches per rank; every
rank's local bf16 gradients are recorded by tensor hooks and their mean is computed in
float64 on rank 0: the reference. ``ShardedAMS(grad_reduce_dtype=None)`` (fp32
accumulation and reduction) and ``grad_reduce_dtype=torch.bfloat16`` (the 16-bit
reduction) each reduce the same gradients; their averaged gradients (on gloo the whole
buffer is all-reduced, so every element is available) are compared with the reference:

* ``rel_l2``: ||reduced - mean64|| / ||mean64|| over all elements;
* ``max_ulp``: the largest error in units of the bf16 ulp of the largest term summed for
  that element (max over ranks of |g_r| / N): the scale a 16-bit sum's rounding lives on
  (one rounding costs at most 0.5; measured relative to the result itself instead, an
  element whose ranks' gradients cancel would show a meaningless huge ratio);
* ``reduce_bytes``: bytes each rank sends into the gradient reduction per step (the
  buffer, padding included; an all-reduce on gloo, a reduce-scatter on NCCL);
* ``grad_buffer_bytes``: memory of the gradient buffer (fp32: 4 B per param; bf16: 2).

    PYTHONPATH=. python benchmarks/bench_grad_dtype.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_common import add_out_args, env_info, print_table, resolve_out, write_json  # noqa: E402
from dist_bench import run_on_ranks  # noqa: E402



def _rank_main(rank: int, world: int, args) -> Optional[list[dict]]:
    import torch.distributed as dist

    from launcher.train.models.gpt import GPT, GPTConfig
    from sharded_ams import ShardedAMS

    def model():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=args.n_layer,
                             n_embd=args.n_embd, n_head=4)).to(torch.bfloat16)

    results = []
    for reduce_dtype in (None, torch.bfloat16):
        m = model()
        opt = ShardedAMS(m, preset="adamw", lr=0.0, backend="eager",
                         grad_reduce_dtype=reduce_dtype, skip_nonfinite=False)
        params = [p for p in m.parameters() if p.requires_grad]
        errs = []
        for step in range(args.batches):
            local = [None] * len(params)
            hooks = [p.register_hook(lambda g, i=i, local=local: local.__setitem__(i, g.detach().clone()))
                     for i, p in enumerate(params)]
            g = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randint(256, (args.batch, 65), generator=g)
            m(x[:, :-1], x[:, 1:])[1].float().backward()
            opt.step()  # lr 0: only the reduction matters
            for h in hooks:
                h.remove()
            sh = opt.shards[0]
            reduced = [sh.buf.grad_view(s).detach().clone() for s in sh.layout.slots]
            order = {id(p): i for i, p in enumerate(params)}
            local = [local[order[id(p)]] for p in sh.buf.params]
            everyone = [None] * world if rank == 0 else None
            dist.gather_object(local, everyone, dst=0)
            if rank == 0:
                ref = [sum(r[i].double() for r in everyone) / world for i in range(len(local))]
                diff = torch.cat([(a.double() - b).reshape(-1) for a, b in zip(reduced, ref)])
                refv = torch.cat([b.reshape(-1) for b in ref])
                terms = torch.cat([torch.stack([r[i].double().abs() for r in everyone]).amax(0)
                                   .reshape(-1) for i in range(len(local))]) / world
                ulp = _bf16_ulp(terms)
                errs.append((diff.norm() / refv.norm()).item())
                errs.append((diff.abs() / ulp).max().item())
            opt.zero_grad()
        sh = opt.shards[0]
        if rank == 0:
            results.append(dict(world_size=world, reduce=str(sh.buf.grad.dtype).replace("torch.", ""),
                                rel_l2=max(errs[0::2]), max_ulp=max(errs[1::2]),
                                reduce_bytes=sh.buf.grad.numel() * sh.buf.grad.element_size(),
                                grad_buffer_bytes=sh.buf.grad.numel() * sh.buf.grad.element_size(),
                                params=sum(p.numel() for p in params)))
    return results if rank == 0 else None


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (8 significand bits), at least the smallest normal's."""
    a = x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - 7)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--batches", type=int, default=3, help="batches (worst case reported)")
    add_out_args(ap, "bench_grad_dtype.json")
    args = ap.parse_args(argv)
    rows = []
    for n in args.world_sizes:
        rows += run_on_ranks(_rank_main, n, args, threads=1)[0]
    print_table(rows, ["world_size", "reduce", "rel_l2", "max_ulp", "reduce_bytes",
                       "grad_buffer_bytes", "params"],
                {"rel_l2": "rel. L2 error vs float64 mean", "max_ulp": "max error (bf16 ulps)",
                 "reduce_bytes": "bytes reduced / rank / step",
                 "grad_buffer_bytes": "grad buffer bytes"})
    report = dict(meta=dict(env_info(), n_layer=args.n_layer, n_embd=args.n_embd,
                            batch_per_rank=args.batch, batches=args.batches), rows=rows)
    write_json(resolve_out(args.out, args.update_record, "bench_grad_dtype.json"), report)
    return report


if __name__ == "__main__":
    main()
