"""The GPU check's ``fsdp`` section (issue 20): C-Adam on FSDP2 at world size 1, its count
pass in FSDP2's post-reduce-scatter hooks against every count in the step.

``AMS(count_in_backward=None)``, the default, hooks CUDA params only: FSDP2 runs the hooks
on its reduce-scatter stream, so the count's read of g and m can run beside the next
layer's backward matmuls. That is a prediction, not a measurement: on CPU (2 cores, gloo)
the count in backward competed with gloo's transfers for the cores and made a whole
iteration 2-5% slower (benchmarks/RESULTS.md). This section measures it where the default
applies: two copies of the check's model, ``fully_shard``-ed per block and at the root,
``CAdam(count_in_backward=True)`` and ``CAdam(count_in_backward=False)``, interleaved step
by step; per row the medians of forward + backward and of the step (each synchronised),
and their sum.

Exactness: after each backward the second copy's gradients are overwritten with the
first's (outside the timing), so both steps see the same gradients and the params must
stay bitwise equal (a backward's atomics cannot make them differ); and on CUDA the first
copy's steps must have taken every count from backward (else the hooks did not engage).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from gpu_check_plan import Plan


def _shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (1,))
    for block in model.transformer_blocks():
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp_section(plan: Plan, builder: Callable, process_group: Callable, make_batch: Callable,
                 sync: Callable) -> dict:
    """The section, given ``gpu_check_sections``'s model builder, process-group context,
    batch maker and device sync (passed in: that module imports this one)."""
    from sharded_ams import CAdam

    steps, warmup = (20, 3) if plan.device.type == "cuda" else (3, 1)
    rows, times = [], {}
    with process_group(plan):
        pairs = []
        for hooked in (True, False):
            torch.manual_seed(0)
            model = _shard(builder(plan).to(plan.device), plan.device)
            pairs.append((model, CAdam(model.parameters(), lr=1e-3, weight_decay=0.1,
                                       count_in_backward=hooked)))
            times[hooked] = ([], [])
        gen = torch.Generator(device=plan.device).manual_seed(4)
        used = []
        for step in range(steps):
            batch = make_batch(pairs[0][0], plan, gen,
                               batch=8 if plan.device.type == "cuda" else 2)
            for k, (model, opt) in enumerate(pairs):
                hooked = k == 0
                opt.zero_grad()
                sync(plan)
                t0 = time.perf_counter()
                with torch.autocast(plan.device.type, dtype=torch.bfloat16,
                                    enabled=plan.device.type == "cuda"):
                    loss = model(*batch)[1]
                loss.backward()
                sync(plan)
                t1 = time.perf_counter()
                if not hooked:  # the same gradients as the hooked copy (outside the timing)
                    with torch.no_grad():
                        for p, q in zip(model.parameters(), pairs[0][0].parameters()):
                            p.grad.to_local().copy_(q.grad.to_local())
                sync(plan)
                t2 = time.perf_counter()
                opt.step()
                sync(plan)
                t3 = time.perf_counter()
                if step >= warmup:
                    times[hooked][0].append((t1 - t0) * 1e3)
                    times[hooked][1].append((t3 - t2) * 1e3)
                if hooked:
                    used.append(opt._hook_counts.used)
        equal = all(torch.equal(p.to_local(), q.to_local())
                    for p, q in zip(pairs[0][0].parameters(), pairs[1][0].parameters()))
        n_tensors = sum(1 for _ in pairs[0][0].parameters())
    for hooked in (True, False):
        fb, st = (statistics.median(t) for t in times[hooked])
        rows.append(dict(optimizer=f"CAdam(count_in_backward={hooked})", model=plan.model,
                         fwd_bwd_ms=fb, step_ms=st, iter_ms=fb + st,
                         counted_in_backward=used[-1] if hooked else None,
                         steps_timed=steps - warmup))
    rows[0]["iter_vs_count_in_step"] = rows[1]["iter_ms"] / rows[0]["iter_ms"]
    engaged = plan.device.type != "cuda" or used[1:] == [n_tensors] * (steps - 1)
    return {"status": "ok" if equal and engaged else "fail", "rows": rows,
            "params_bitwise_equal": equal, "counts_from_backward_each_step": used,
            "tensors": n_tensors,
            "note": ("iter_vs_count_in_step > 1: the count in backward made the iteration "
                     "faster. World size 1: the reduce-scatter is a copy; the count's "
                     "overlap with backward's matmuls is what is measured. In the dry run "
                     "the tiny model's groups take the _foreach path, which counts in the "
                     "step (counted_in_backward 0).")}
