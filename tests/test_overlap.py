"""Overlap (gradient reduction during backward, param gather during the next forward)
changes no bit, and misuse fails loudly.

**Exactness** (N = 1..4, gloo, on both collective paths: 50 steps on the all-reduce
path, 20 on the reduce-scatter one; inside the per-N proof job of test_sharded.py):
the same training with ``overlap=False`` and ``overlap=True`` ends with bitwise equal
params on every rank and bitwise equal state shards. The run has everything users
combine with overlap: 4 micro-batches per step (the first 3 under ``no_sync()``),
clipping that is active, a non-finite loss on one rank (every rank skips), params used
only by some ranks on some micro-batches, a param never used, a frozen param, the tied
embedding, two param groups, several buckets, fp32 and bf16 params in one model (two
dtype buffers; bf16 gradients reduced in fp32), and in the overlapped run a checkpoint
saved at step 25 and loaded into a fresh model and optimizer that finish the run. It also checks the run exercised what it
claims (buckets launched during backward and late ones, clipped and skipped steps, waits
in the forward pre-hooks) and that padding stayed zero.

**Misuse** (N = 2, in the features job): ranks that disagree on the model or settings,
sparse gradients, a forward that bypasses a module's pre-hook (stale params), a second
backward without ``no_sync``, ``zero_grad`` while reductions run, a second optimizer on
the same params: each gives a clear error on every rank (or the right result), no hang.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.train.models.gpt import GPT
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import load_checkpoint, save_checkpoint

from sharded_common import (GPT_CFG, PATHS, compare_params, gather_to_rank0, gpt_batch,
                            paths_for, proof_results, snapshot, state_equal, world)

#: steps of the scenario per collective path (a multiple of 5: see the late-bucket count)
#: and the step whose start saves and reloads a checkpoint
STEPS = {"all_reduce": 50, "reduce_scatter": 20}
CKPT_AT = {"all_reduce": 25, "reduce_scatter": 12}
MICRO = 4
SKIP_AT = 7
MAX_NORM = 1.0
GLOBAL = 48          # sequences per step: 4 micro-batches on 1..4 ranks


class SideNet(nn.Module):
    """The small GPT (fp32), a bf16 side branch some ranks use on some micro-batches, and
    a bf16 layer no one uses (declared first, so its bucket is the last one reduced): two
    dtype buffers, so buckets of both interleave in one launch order."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.never = nn.Linear(4, 4).to(torch.bfloat16)
        self.gpt = GPT(GPT_CFG)
        self.side = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).to(torch.bfloat16)
        self.gpt.wpe.weight.requires_grad_(False)  # frozen

    def forward(self, x, y, use_side: bool):
        loss = self.gpt(x, y)[1]
        if use_side:
            h = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
            loss = loss + self.side(h).float().square().mean()
        return loss


def _uses_side(step: int, rank: int, k: int) -> bool:
    """Some micro-batches skip the side layer; on one step in five (a different one per
    rank) the last micro-batch does, so that rank reduces its bucket late."""
    return not (k == 1 and step % 2 == 0) and not (k == MICRO - 1 and (step + rank) % 5 == 0)


def _optimizer(model: SideNet, overlap: bool, path: str) -> ShardedAMS:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return ShardedAMS([dict(params=decay, weight_decay=0.1), dict(params=rest, lr=3e-3)],
                      module=model, overlap=overlap, lam=-1.0, beta3=0.5, lr=1e-2,
                      max_grad_norm=MAX_NORM, bucket_numel=6000, backend="eager",
                      collectives=path)


def padding_is_zero(opt: ShardedAMS) -> bool:
    """Every element no param owns is zero in the param and grad buffers and the state."""
    for sh in opt.shards:
        used = torch.zeros(sh.layout.numel, dtype=torch.bool)
        for slot in sh.layout.slots:
            used[slot.start:slot.end] = True
        if sh.buf.param[~used].any() or sh.buf.grad[~used].any():
            return False
        local = torch.cat([used[slice(*bk.shard(opt.comm.rank))] for bk in sh.layout.buckets])
        if any(t[~local].any() for t in sh.state.values()):
            return False
    return True


def _run(overlap: bool, path: str, ckpt: str = "") -> dict:
    rank, n = world()
    model = SideNet(0)
    opt = _optimizer(model, overlap, path)
    stats, norms = [], []
    for step in range(STEPS[path]):
        if ckpt and step == CKPT_AT[path]:
            save_checkpoint(ckpt, opt, model=model, step=step)
            stats.append(opt.sync_stats.as_dict())
            model = SideNet(1)   # another init: everything must come from the load
            opt = _optimizer(model, overlap, path)
            load_checkpoint(ckpt, opt, model=model)
        x, y = gpt_batch(step, global_batch=GLOBAL)
        for k, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
            with opt.no_sync() if k < MICRO - 1 else contextlib.nullcontext():
                loss = model(xm, ym, use_side=_uses_side(step, rank, k)) / MICRO
                if step == SKIP_AT and rank == 1 % n and k == 2:
                    loss = loss * float("inf")
                loss.backward()
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
    opt.finish_param_sync()
    stats.append(opt.sync_stats.as_dict())
    return dict(params=snapshot(model), state=opt.state_dict(), skipped=opt.skipped_steps,
                steps=[int(g["step"]) for g in opt.param_groups], norms=norms, stats=stats,
                padding_zero=padding_is_zero(opt), dtypes=[str(sh.buf.dtype) for sh in opt.shards],
                n_buckets=sum(len(sh.layout.buckets) for sh in opt.shards))


def overlap_scenarios(ckpt_dir: str, path: str) -> dict:
    """Overlap off vs on (with the checkpoint round trip) on one collective path,
    compared on each rank."""
    off = _run(overlap=False, path=path)
    on = _run(overlap=True, path=path, ckpt=os.path.join(ckpt_dir, "ckpt"))
    return dict(params=compare_params(on["params"], off["params"]),
                state=state_equal([on["state"]], [off["state"]]),
                skipped=(off["skipped"], on["skipped"]), steps=(off["steps"], on["steps"]),
                norms_equal=[repr(x) for x in on["norms"]] == [repr(x) for x in off["norms"]],
                norms=off["norms"], stats_on=on["stats"], stats_off=off["stats"],
                n_buckets=on["n_buckets"], dtypes=on["dtypes"], path=path,
                padding_zero=(off["padding_zero"], on["padding_zero"]))


WORLD_SIZES = [1, 2, 3, 4]
#: (world size, collective path): both paths at N > 1 (at N = 1 no collective runs)
PATH_CASES = [(n, path) for n in WORLD_SIZES for path in paths_for(n)]


@pytest.mark.slow
@pytest.mark.parametrize("n, path", PATH_CASES)
def test_overlap_equals_no_overlap_bitwise(n, path):
    steps = STEPS[path]
    for rank, res in enumerate(proof_results(n)):
        r = res[path]["overlap"]
        assert r["path"] == path
        assert r["dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert r["params"]["equal"], (rank, r["params"])
        assert r["state"], f"rank {rank}: state shards differ"
        assert r["norms_equal"], rank
        assert r["skipped"] == (1, 1) and r["steps"] == ([steps - 1] * 2, [steps - 1] * 2)
        assert r["padding_zero"] == (True, True)


@pytest.mark.slow
@pytest.mark.parametrize("n, path", PATH_CASES)
def test_overlap_scenario_exercised_what_it_claims(n, path):
    """Not vacuous: several buckets; reductions launched during backward and in step()
    (the unused params); clipping active on some steps; the injected inf skipped a step."""
    steps = STEPS[path]
    for res in proof_results(n):
        r = res[path]["overlap"]
        assert r["n_buckets"] > 3
        norms = r["norms"]
        assert norms[SKIP_AT] != norms[SKIP_AT] or norms[SKIP_AT] == float("inf")
        assert sum(x > MAX_NORM for x in norms) >= 3 and any(x < MAX_NORM for x in norms)
        on = r["stats_on"]
        late = sum(s["late_buckets"] for s in on)
        assert sum(s["steps"] for s in on) == steps
        # the bucket holding the never-used param is late on every step; on one step in
        # five the side branch's bucket (the first in order) is too, and with it every
        # bucket after it
        assert late == steps + steps // 5 * (r["n_buckets"] - 1), (late, r["n_buckets"])
        assert all(s["late_buckets"] == 0 for s in r["stats_off"])


# --------------------------------------------------------------------------- misuse (N = 2)
def misuse_checks(path: str) -> dict:
    """Run inside the features job (N = 2) on collective path ``path``; every entry is
    this rank's outcome."""
    rank, n = world()
    out: dict = {}

    def sharded(*args, **kw) -> ShardedAMS:
        return ShardedAMS(*args, collectives=path, **kw)

    def error_of(fn) -> str:
        try:
            fn()
        except (ValueError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    # ranks that disagree: a clear error on every rank, and the group still works after
    out["disagree"] = {
        "shape": error_of(lambda: sharded(nn.Linear(3, 2 + rank))),
        "lr": error_of(lambda: sharded(nn.Linear(3, 2), lr=1e-3 * (1 + rank))),
        "name": error_of(lambda: sharded(nn.Sequential(OrderedDict(
            [(f"layer{rank}", nn.Linear(3, 2))])))),
        "bucket": error_of(lambda: sharded(nn.Linear(3, 2), bucket_numel=10 + rank)),
        "same": error_of(lambda: sharded(nn.Linear(3, 2), lr=1e-3)),
        "collectives": error_of(lambda: ShardedAMS(nn.Linear(3, 2), collectives=PATHS[rank])),
    }
    out["sparse"] = error_of(lambda: sharded(nn.Embedding(5, 3, sparse=True)))

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x, bypass=False):
            h = F.linear(x, self.lin.weight, self.lin.bias) if bypass else self.lin(x)
            return self.head(h).square().mean()

    x = torch.randn(3, 4) + rank

    # a forward that reads a param without its module's pre-hook: stale values, refused
    # (at world size > 1 by step(), on every rank: see test_collectives.py)
    model = Bypass()
    opt = sharded(model, bucket_numel=1, backend="eager", lr=0.1)
    model(x).backward()
    opt.step()
    out["stale"] = error_of(lambda: (model(x, bypass=True).backward(), opt.step()))
    opt.zero_grad()
    opt.finish_param_sync()  # the documented remedy
    out["stale_then_ok"] = error_of(lambda: (model(x, bypass=True).backward(), opt.step()))
    # a second backward without no_sync: refused (the first one's reductions are running)
    opt.zero_grad()
    model(x).backward()
    out["twice"] = error_of(lambda: (model(x).backward(), opt.step()))
    opt.zero_grad()
    out["twice_then_ok"] = error_of(lambda: (model(x).backward(), opt.step()))
    # reads outside a forward: the module's state_dict waits for the gathers itself
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    everyone = gather_to_rank0(sd)
    out["state_dict_gathered"] = everyone is None or all(
        compare_params(e, everyone[0])["equal"] for e in everyone)
    out["pending_after_state_dict"] = opt._sync._gathers_pending
    # zero_grad while reductions run: waits for them, then the step sees only what follows
    results = []
    for overlap in (True, False):
        m = Bypass()
        o = sharded(m, overlap=overlap, bucket_numel=1, backend="eager", lr=0.1)
        m(x * 3).backward()
        o.zero_grad()
        m(x).backward()
        o.step()
        o.finish_param_sync()
        results.append(snapshot(m))
    out["zero_grad_in_flight"] = compare_params(results[0], results[1])["equal"]
    # a second optimizer on the same params takes over; the first one refuses to step
    m = Bypass()
    first = sharded(m, backend="eager")
    second = sharded(m, backend="eager")
    m(x).backward()
    second.step()
    out["replaced"] = error_of(first.step)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_ranks_that_disagree_get_one_clear_error_each(path):
    from sharded_common import features

    for r in features("misuse", path):
        d = r["disagree"]
        assert d["same"] == ""
        for case, what in (("shape", ["shape (2,)", "shape (3,)"]),
                           ("lr", ["'lr': 0.001", "'lr': 0.002"]),
                           ("name", ["'layer0.", "'layer1."]),
                           ("bucket", ["bucket_numel=10,", "bucket_numel=11,"])):
            assert d[case].startswith("ValueError: ShardedAMS: ranks disagree"), (case, d[case])
            assert all(w in d[case] for w in what) and "rank 1 has" in d[case], (case, d[case])
        assert "collectives=all_reduce" in d["collectives"], d["collectives"]
        assert "collectives=reduce_scatter" in d["collectives"], d["collectives"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_misuse_gives_clear_errors_not_hangs(path):
    from sharded_common import features

    for r in features("misuse", path):
        assert "sparse gradients" in r["sparse"] and "'weight'" in r["sparse"]
        assert "while its all-gather from the last step was still pending" in r["stale"]
        assert "'lin.weight'" in r["stale"] or "'lin.bias'" in r["stale"]
        assert r["stale_then_ok"] == ""
        assert "after its bucket's reduction had started" in r["twice"], r["twice"]
        assert "no_sync" in r["twice"]
        assert r["twice_then_ok"] == ""
        assert r["state_dict_gathered"] and not r["pending_after_state_dict"]
        assert r["zero_grad_in_flight"]
        assert "closed, or replaced by another one" in r["replaced"]


# --------------------------------------------------------------------------- one process
def _mlp(overlap: bool, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, ShardedAMS(model, overlap=overlap, bucket_numel=1, backend="eager", **kw)


def test_no_sync_defers_every_reduction_to_the_last_backward():
    """Under no_sync nothing is launched; after the last backward every bucket is; an
    unused param makes its bucket (and those after it) late."""
    model, opt = _mlp(True)
    x = torch.randn(5, 4)
    with opt.no_sync():
        model(x).sum().backward()
    opt.step()
    assert opt.sync_stats.late_buckets == len(opt._sync.order) == 4
    opt.sync_stats.reset()
    with opt.no_sync():
        model(x).sum().backward()
    model(x).sum().backward()
    opt.step()
    assert opt.sync_stats.late_buckets == 0
    opt.zero_grad()
    model[2](torch.randn(3, 8)).sum().backward()  # the first layer gets no gradient
    opt.step()
    assert opt.sync_stats.late_buckets == 2  # its two buckets come last in backward order


def test_second_backward_without_no_sync_is_refused():
    model, opt = _mlp(True)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"'2\.(bias|weight)'.*after its bucket's reduction"):
        model(x).sum().backward()


def test_overlap_off_accumulates_without_no_sync_as_before():
    """overlap=False keeps today's contract: grads accumulate until step(), with or
    without no_sync, and both give the same result."""
    finals = []
    for use_no_sync in (False, True):
        model, opt = _mlp(False)
        for k in range(3):
            with opt.no_sync() if use_no_sync and k < 2 else contextlib.nullcontext():
                model(torch.full((2, 4), float(k))).sum().backward()
        opt.step()
        finals.append(snapshot(model))
    assert compare_params(*finals)["equal"]


def test_measure_overlap_runs_in_process():
    """The benchmark core the GPU check calls, here at world size 1 without a process
    group (the GPU check runs it the same way with NCCL): rows, timers and medians."""
    from scripts import load_script

    bench = load_script("benchmarks/bench_overlap.py")

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def batch(step):
        return torch.full((4, 8), float(step)), torch.zeros(4, 1)

    def loss_fn(model, b):
        return F.mse_loss(model(b[0]), b[1])

    per_rank = bench.measure_overlap(build, batch, rows=("off", "on", "on@1"), steps=2,
                                     rounds=2, backend="eager", loss_fn=loss_fn)
    rows = {r["name"]: r for r in bench.summarise(per_rank)}
    assert set(rows) == {"off", "on", "on@1"}
    assert len(per_rank["on"]["step_ms"]) == 4 and per_rank["on@1"]["n_buckets"] == 4
    for r in rows.values():
        assert r["step_ms"] > 0 and r["exposed_ms"] >= 0 and r["late_buckets"] == 0
    assert rows["off"]["step_ms_x_off"] == 1.0


def test_close_hands_the_params_to_another_optimizer():
    """After close() the params are plain params again for another optimizer (bf16: the
    fp32-reduction hook no longer takes p.grad away), and the closed one refuses to step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(torch.bfloat16)
    opt = ShardedAMS(model, backend="eager")
    model(torch.ones(3, 4, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is None for p in model.parameters())  # collected into fp32
    opt.close()
    model(torch.ones(3, 4, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
