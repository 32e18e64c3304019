"""ShardedAMS (ZeRO-1) against the single-process AMS, on 1-4 gloo processes (CPU).

Why the proof is split in three. With true data parallelism each rank's gradient is
g_r / N summed by the all-reduce, which differs from the one-process mean in the last
bits; sign-based updates (Grams, C-Adam) and Adam's normalisation of near-zero
gradients turn that into visible differences within tens of steps (measured below). So:

(a) **the sharded update is exact**: every step's reduced gradient (on gloo the whole
    grad buffer is all-reduced, so after ``step()`` every ``p.grad`` holds the full
    averaged gradient) is replayed through the single-process ``AMS(fused="eager")`` from
    the same initial params: params AND every rank's state shard (m, v[, s]) are bitwise
    equal, for N = 1, 2, 3, 4 and grams / adamw / cadam / lam=-0.5, beta3=0.5, 50 steps
    of the small GPT;
(b) **replicated data** (every rank fed the one-process batch): at N = 2 and 4 the mean
    of N equal gradients is exact (division by a power of two, exact sums), so the run is
    bitwise equal to N = 1 end to end. (N = 3 is not: (g/3)*3 != g in floating point.);
(c) **true data parallel vs one process**, AdamW only, within a measured tolerance
    (see ``test_data_parallel_adamw_close_to_one_process``).

Every rank's final params must be identical (the all-gather), on every N.

The feature checks (bf16 + fp32 masters, param groups, frozen and tied params, several
buckets, grad accumulation, zero_grad / set_to_none, LR scheduler, clipping, inf/NaN
skip, state memory, collective counts) run in one 3-process job; N = 3 puts shard
boundaries inside parameters. Checks whose reference differs from the sharded run by
fp32 rounding of the gradient (clipping, accumulation) use a small dense MLP whose
gradients have no near-zero elements, so rounding is not amplified (see (c)).

Spawned jobs are few and reused (one per world size for (a)-(c), one for the features);
the "compiled" backend runs once, inside the N = 2 job.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launcher.data import get_batch, load_corpus
from launcher.model import GPT, GPTConfig
from sharded_ams import AMS, PRESETS, ShardedAMS
from sharded_ams.layout import ALIGN

from dist_utils import run_distributed

# --------------------------------------------------------------------------- setup
GPT_CFG = GPTConfig(n_layer=1, n_embd=32, block_size=16)
GLOBAL_BATCH = 12          # divisible by 1, 2, 3, 4
STEPS = 50                 # (a) and (b)
DP_STEPS = 20              # (c): see the tolerance comment there
CORPUS_BYTES = 200_000
JOB_TIMEOUT = 400

#: ShardedAMS keyword arguments of each proof configuration (eager backend added later).
CONFIGS: dict[str, dict] = {
    "grams": dict(preset="grams", lr=1e-2),
    "adamw": dict(preset="adamw", lr=1e-2, weight_decay=0.1),
    "cadam": dict(preset="cadam", lr=1e-2),
    "lam-0.5_beta3-0.5": dict(lam=-0.5, beta3=0.5, lr=1e-2, weight_decay=0.05),
}


def ams_kwargs(kw: dict) -> dict:
    """The single-process AMS arguments equal to ShardedAMS keyword arguments ``kw``."""
    kw = dict(kw)
    preset = kw.pop("preset", None)
    for k in ("backend", "max_grad_norm", "skip_nonfinite", "bucket_numel", "broadcast_params"):
        kw.pop(k, None)
    if preset:
        kw.update(PRESETS[preset])
    return kw


def make_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPT_CFG)


def gpt_batch(step: int, replicated: bool = False):
    """This rank's share of the global batch (replicated: the one-process batch)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if replicated:
        rank, world = 0, 1
    return get_batch(load_corpus(CORPUS_BYTES), step, GLOBAL_BATCH, GPT_CFG.block_size,
                     seed=0, rank=rank, world_size=world)


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def gather_to_rank0(obj):
    """Every rank's ``obj`` on rank 0 (a list in rank order); None elsewhere."""
    rank, n = world()
    if n == 1:
        return [obj]
    out = [None] * n if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if world()[1] > 1:
        dist.all_reduce(t)
    return t.item() / world()[1]


def replay(model: nn.Module, init: dict[str, torch.Tensor], grads: list[list[torch.Tensor]],
           scheduler=None, **kw) -> AMS:
    """Single-process AMS(fused="eager") over recorded gradients from ``init``.

    ``grads[t]`` follows ``trainable(model)``; ``scheduler``: a function of the optimizer
    returning an LR scheduler, stepped after every step."""
    model.load_state_dict(init, strict=False)  # strict=False: tied lm_head has no own key
    opt = AMS(trainable(model), fused="eager", **kw)
    sched = scheduler(opt) if scheduler else None
    for gs in grads:
        for p, g in zip(trainable(model), gs):
            p.grad = g.clone()
        opt.step()
        if sched:
            sched.step()
    return opt


def compare_params(a: dict, b: dict) -> dict:
    """Bitwise equality and the largest difference of two name -> tensor dicts."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    diffs = {n: (a[n].double() - b[n].double()).abs().max().item() if a[n].numel() else 0.0
             for n in a}
    unequal = sorted(n for n in a if not torch.equal(a[n], b[n]))
    return dict(equal=not unequal, unequal=unequal, max_abs=max(diffs.values(), default=0.0))


def compare_state(state_dicts: list[dict], ams: AMS, params_by_name: dict) -> dict:
    """Every rank's ShardedAMS state pieces against the AMS state of the same elements:
    (number of elements compared, list of mismatches (name, key))."""
    mismatches, count = [], 0
    for sd in state_dicts:
        for rec in sd["pieces"]:
            p = params_by_name[rec["name"]]
            st = ams.state[p]
            sl = slice(rec["offset"], rec["offset"] + rec["length"])
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_s", "master"):
                if key not in rec:
                    continue
                ref = st["master"] if key == "master" and "master" in st else \
                    (p.detach() if key == "master" else st[key])
                if not torch.equal(rec[key], ref.reshape(-1)[sl].float()):
                    mismatches.append((rec["name"], key))
            count += rec["length"]
    return dict(elements=count, mismatches=mismatches)


# --------------------------------------------------------------------------- (a) (b) (c)
def _train_gpt(kw: dict, steps: int, replicated: bool, snapshot_at: int = 0) -> dict:
    """Train the small GPT with ShardedAMS; rank 0 records every reduced gradient."""
    rank, n = world()
    model = make_gpt()
    opt = ShardedAMS(model, **kw)
    init = snapshot(model)
    grads, losses, snap = [], [], None
    for step in range(steps):
        x, y = gpt_batch(step, replicated)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        assert not opt.last_step.skipped
        if rank == 0:
            grads.append([p.grad.clone() for p in trainable(model)])
        opt.zero_grad()
        losses.append(mean_over_ranks(loss.item()))
        if step + 1 == snapshot_at:
            snap = snapshot(model)
    return dict(model=model, opt=opt, init=init, grads=grads, losses=losses, snap=snap,
                final=snapshot(model), steps=[g["step"] for g in opt.param_groups])


def _check_exact(run: dict, kw: dict) -> Optional[dict]:
    """(a): replay the recorded gradients through AMS; compare params and state bitwise."""
    sds = gather_to_rank0(run["opt"].state_dict())
    if world()[0] != 0:
        return None
    ref_model = make_gpt(seed=1)  # different init: everything comes from ``init``
    ams = replay(ref_model, run["init"], run["grads"], **ams_kwargs(kw))
    names = {n: p for n, p in ref_model.named_parameters()}
    return dict(params=compare_params(snapshot(ref_model), run["final"]),
                state=compare_state(sds, ams, names),
                numel=sum(p.numel() for p in trainable(ref_model)))


def _proof_job(with_replicated: bool, with_compiled: bool) -> dict:
    rank, n = world()
    out: dict = {"configs": {}}
    for name, kw in CONFIGS.items():
        kw = dict(kw, backend="eager")
        res = {}
        dp = _train_gpt(kw, STEPS, replicated=False, snapshot_at=DP_STEPS)
        res["dp_exact"] = _check_exact(dp, kw)
        res["dp_final"], res["dp_snap"], res["dp_losses"] = dp["final"], dp["snap"], dp["losses"]
        res["group_steps"] = dp["steps"]
        if with_replicated:
            rep = _train_gpt(kw, STEPS, replicated=True)
            res["rep_exact"] = _check_exact(rep, kw)
            res["rep_final"] = rep["final"]
        out["configs"][name] = res
    if with_compiled:
        # One small case on the torch.compile backend (the CPU default): the replayed
        # eager AMS is the reference, within a tolerance, as Inductor's C++ may contract
        # a*b+c into FMAs and vectorise tails differently.
        kw = dict(CONFIGS["grams"], backend="compiled")
        run = _train_gpt(kw, 20, replicated=False)
        if rank == 0:
            ref_model = make_gpt(seed=1)
            replay(ref_model, run["init"], run["grads"], **ams_kwargs(kw))
            ref = snapshot(ref_model)
            out["compiled"] = dict(
                backend=run["opt"].backend,
                rel={k: ((run["final"][k].double() - ref[k].double()).abs().max()
                         / ref[k].double().abs().max()).item() for k in ref},
                moved=max((run["final"][k] - run["init"][k]).abs().max().item() for k in ref))
    return out


_PROOF_CACHE: dict[int, object] = {}


def proof_results(n: int) -> list[dict]:
    """The proof job on ``n`` ranks, run once per session (N = 2 also runs "compiled")."""
    if n not in _PROOF_CACHE:
        try:
            _PROOF_CACHE[n] = run_distributed(_proof_job, n, n in (2, 4), n == 2,
                                              timeout=JOB_TIMEOUT)
        except Exception as exc:  # report the same failure in every test that needs it
            _PROOF_CACHE[n] = exc
    res = _PROOF_CACHE[n]
    if isinstance(res, Exception):
        raise res
    return res


WORLD_SIZES = [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_sharded_update_bitwise_equals_single_process_replay(n, config):
    """(a) params and every rank's state pieces equal AMS on the reduced gradients."""
    results = proof_results(n)
    res = results[0]["configs"][config]
    ex = res["dp_exact"]
    assert ex["params"]["equal"], f"params differ from the AMS replay: {ex['params']}"
    assert ex["state"]["elements"] == ex["numel"], "state pieces cover every element once"
    assert not ex["state"]["mismatches"], ex["state"]["mismatches"][:10]
    assert res["group_steps"] == [STEPS]
    for r, other in enumerate(results[1:], 1):  # the all-gather gave every rank the params
        cmp = compare_params(other["configs"][config]["dp_final"], res["dp_final"])
        assert cmp["equal"], f"rank {r} params differ from rank 0: {cmp}"
    moved = max((res["dp_final"][k] - make_gpt().state_dict()[k]).abs().max().item()
                for k in res["dp_final"])
    assert moved > 1e-2, "training moved the params"


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("n", [2, 4])
def test_replicated_data_bitwise_equals_one_process(n, config):
    """(b) every rank fed the one-process batch: bitwise equal to N = 1 end to end."""
    results = proof_results(n)
    base = proof_results(1)[0]["configs"][config]["dp_final"]
    for r, res in enumerate(results):
        cmp = compare_params(res["configs"][config]["rep_final"], base)
        assert cmp["equal"], f"rank {r}: {cmp}"
    ex = results[0]["configs"][config]["rep_exact"]
    assert ex["params"]["equal"] and not ex["state"]["mismatches"]


# (c) Tolerance of true data parallelism vs one process (AdamW, lr 1e-2, wd 0.1, global
# batch 12, eager backend), measured on this machine at N = 2, 3, 4:
#   step-1 reduced gradient vs the one-process mean: max rel 5.2e-7 (fp32 rounding of
#   g_r / N summed in another order);
#   after 20 steps: params, all but the attention key bias: max |diff| 7.6e-6 .. 2.9e-5,
#   norm-wise relative L2 1.6e-5 .. 2.9e-5; key bias (qkv.bias[32:64]) 1.0e-4 .. 1.9e-4;
#   mean loss per step: relative diff <= 1.9e-7.
# The key bias's exact gradient is zero (softmax is invariant to adding the same
# q.b_k to every key's score), so its computed gradient is pure rounding noise, and Adam
# normalises noise into steps of up to ~lr in a direction set by that noise: those 32
# elements random-walk apart. The same happens, later, to any element whose exact
# gradient nearly cancels: at step 33 one key-weight element (its input feature is
# almost constant over positions) jumped 1.3e-3 in one step, and after 50 steps max
# |diff| reached 1.1e-2 (rel L2 3e-3). That is why (c) stops at 20 steps and why
# exactness is proven by (a)/(b) instead. Tolerances below are ~5-10x the measured
# values; params are O(0.02-1). The other presets are not compared: at 20 steps Grams
# is at max |diff| 2e-6 outside the key bias but 8e-4 on it, and C-Adam and
# lam=-0.5 differ by O(0.1) (loss by 1-6 %) -- and so does the single-process AMS when
# its gradients get a 1e-7 relative perturbation (C-Adam: 0.16 max |diff| after 20
# steps), so that is the method's sensitivity, not the sharding.
DP_TOL_ABS = 2e-4            # every element except the key bias
DP_TOL_REL_L2 = 2e-4
DP_TOL_KEY_BIAS = 2e-3       # <= 2 lr DP_STEPS / 20: far below an lr-sized random walk
DP_TOL_LOSS = 2e-6


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 4])
def test_data_parallel_adamw_close_to_one_process(n):
    """(c) true data parallel (different data per rank) vs N = 1, AdamW, 20 steps."""
    got = proof_results(n)[0]["configs"]["adamw"]
    base = proof_results(1)[0]["configs"]["adamw"]
    a, b = got["dp_snap"], base["dp_snap"]
    key = "blocks.0.attn.qkv.bias"
    c = GPT_CFG.n_embd
    worst = {}
    for name in b:
        d = (a[name].double() - b[name].double()).abs()
        if name == key:
            assert d[c:2 * c].max().item() <= DP_TOL_KEY_BIAS, d[c:2 * c].max().item()
            d = torch.cat([d[:c], d[2 * c:]])
        worst[name] = d.max().item()
    assert max(worst.values()) <= DP_TOL_ABS, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    num = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))
    den = math.sqrt(sum((b[k].double() ** 2).sum().item() for k in b))
    assert num / den <= DP_TOL_REL_L2, num / den
    for t, (la, lb) in enumerate(zip(got["dp_losses"][:DP_STEPS], base["dp_losses"][:DP_STEPS])):
        assert abs(la - lb) <= DP_TOL_LOSS * abs(lb), (t, la, lb)
    assert max(worst.values()) > 0, "different data per rank changes the rounding"


# Compiled backend: replaying the same gradients, Grams, 20 steps, N = 2: measured max
# relative difference (per param, vs its max |value|) to the eager AMS replay 8.3e-8,
# about one fp32 ulp. The tolerance allows ~10 ulps.
COMPILED_RTOL = 1e-6


@pytest.mark.slow
def test_compiled_backend_close_to_eager_replay():
    res = proof_results(2)[0]["compiled"]
    assert res["backend"] == "compiled"
    assert res["moved"] > 1e-2
    worst = max(res["rel"].values())
    assert worst <= COMPILED_RTOL, sorted(res["rel"].items(), key=lambda kv: -kv[1])[:3]


# --------------------------------------------------------------------------- features
def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def mlp_batch(step: int, rows: Optional[slice] = None):
    """A global batch of 12 regression samples; this rank's rows (or ``rows``)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    y = torch.sin(x[:, :4] * 2) + 0.1 * torch.randn(GLOBAL_BATCH, 4, generator=g)
    rank, n = world()
    per = GLOBAL_BATCH // n
    rows = rows or slice(rank * per, (rank + 1) * per)
    return x[rows], y[rows]


def _calls_delta(opt, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in opt.comm.calls.items() if v - before.get(k, 0)}


def _feat_groups_frozen_tied_buckets() -> dict:
    """cadam (per-tensor counts: one small all-reduce per (bucket, group) run), two groups
    with different lr / weight decay, a frozen param inside a group, the tied lm_head,
    and several buckets. Replayed bitwise."""
    rank, n = world()
    model = make_gpt()
    model.wpe.weight.requires_grad_(False)
    frozen0 = model.wpe.weight.detach().clone()
    named = [(k, p) for k, p in model.named_parameters()]
    decay = [k for k, p in named if p.dim() >= 2 and p.requires_grad]
    no_decay = [k for k, p in named if p.dim() < 2] + ["wpe.weight"]  # frozen, in a group
    groups = [dict(params=decay, lr=1e-2, weight_decay=0.1),
              dict(params=no_decay, lr=3e-3, weight_decay=0.0)]
    by_name = dict(named)
    opt = ShardedAMS([{**g, "params": [by_name[k] for k in g["params"]]} for g in groups],
                     preset="cadam", backend="eager", bucket_numel=4000)
    init = snapshot(model)
    sh = opt.shards[0]
    lo, hi = sh.buf.param.data_ptr(), sh.buf.param.data_ptr() + sh.buf.param.numel() * 4
    in_buf = {k: lo <= p.data_ptr() < hi for k, p in named}
    grads, calls = [], []
    order = [by_name[k] for k in decay + no_decay if by_name[k].requires_grad]
    for step in range(12):
        x, y = gpt_batch(step)
        model(x, y)[1].backward()
        before = dict(opt.comm.calls)
        opt.step()
        calls.append(_calls_delta(opt, before))
        if rank == 0:
            grads.append([p.grad.clone() for p in order])
        opt.zero_grad()
    out = dict(in_buf=in_buf, frozen_unchanged=torch.equal(model.wpe.weight, frozen0),
               frozen_grad_none=model.wpe.weight.grad is None,
               tied=model.lm_head.weight is model.wte.weight,
               slot_names=[s.name for s in sh.layout.slots], n_buckets=len(sh.layout.buckets),
               n_runs=len(sh.runs), calls=calls, steps=[g["step"] for g in opt.param_groups],
               lrs=[g["lr"] for g in opt.param_groups])
    sds = gather_to_rank0(opt.state_dict())
    if rank == 0:
        final = snapshot(model)
        ref = make_gpt(seed=1)
        ref.wpe.weight.requires_grad_(False)
        # AMS's trainable order must follow the groups: replay with that order
        ref.load_state_dict(init, strict=False)
        rnamed = dict(ref.named_parameters())
        ams = AMS([{**g, "params": [rnamed[k] for k in g["params"]]} for g in groups],
                  fused="eager", **ams_kwargs(dict(preset="cadam")))
        for gs in grads:
            for p, g in zip([rnamed[k] for k in decay + no_decay if rnamed[k].requires_grad], gs):
                p.grad = g
            ams.step()
        rsnap = snapshot(ref)
        out["replay"] = compare_params(rsnap, final)
        # state pieces are named by the optimizer: "group{g}.param{i}" for plain groups
        pnames = {f"group{gi}.param{i}": p for gi, g in enumerate(ams.param_groups)
                  for i, p in enumerate(g["params"])}
        out["state"] = compare_state(sds, ams, pnames)
        out["moved"] = {k: not torch.equal(final[k], init[k]) for k in final}
    return out


def _feat_bf16_masters() -> dict:
    """bf16 model params with fp32 masters: params == masters cast after every step;
    replayed bitwise against AMS on bf16 params (which keeps its own fp32 master)."""
    rank, n = world()
    model = make_gpt().to(torch.bfloat16)
    opt = ShardedAMS(model, preset="grams", lr=1e-2, backend="eager")
    init = snapshot(model)
    sh = opt.shards[0]
    cast_ok, grads = [], []
    for step in range(10):
        x, y = gpt_batch(step)
        model(x, y)[1].float().backward()
        opt.step()
        cast_ok.append(all(torch.equal(sh.param_shard(b), sh.master_view(b).to(torch.bfloat16))
                           for b in range(len(sh.layout.buckets))))
        if rank == 0:
            grads.append([p.grad.clone() for p in trainable(model)])
        opt.zero_grad()
    sd = opt.state_dict()
    final = snapshot(model)
    # every rank's masters, cast, equal the gathered bf16 params on every rank
    pieces_ok = all(torch.equal(rec["master"].to(torch.bfloat16),
                                final[rec["name"]].reshape(-1)[rec["offset"]:rec["offset"] + rec["length"]])
                    for rec in sd["pieces"])
    out = dict(cast_ok=cast_ok, pieces_ok=pieces_ok,
               dtypes={k: str(v.dtype) for k, v in final.items()},
               state_dtypes={k: str(t.dtype) for k, t in sh.state.items()},
               state_bytes=opt.state_bytes(), shard_numel=sh.layout.shard_numel,
               n_states=len(sh.state))
    sds = gather_to_rank0(sd)
    if rank == 0:
        ref = make_gpt(seed=1).to(torch.bfloat16)
        ams = replay(ref, init, grads, **ams_kwargs(dict(preset="grams", lr=1e-2)))
        out["replay"] = compare_params(snapshot(ref), final)
        out["state"] = compare_state(sds, ams, dict(ref.named_parameters()))
    return out


def _feat_grad_accumulation() -> dict:
    """Two micro-batches (loss / 2 each, no zero_grad between) == one step on the
    concatenated batch, to fp32 rounding: the reduced GPT gradients at step 1, and the
    MLP params after 6 AdamW steps (its gradients have no near-zero elements)."""
    rank, n = world()
    out = {}
    models = [make_gpt(), make_gpt()]
    opts = [ShardedAMS(m, preset="adamw", lr=1e-2, backend="eager") for m in models]
    x, y = gpt_batch(0)
    half = x.shape[0] // 2
    for sl in (slice(0, half), slice(half, None)):
        (models[0](x[sl], y[sl])[1] / 2).backward()
    models[1](x, y)[1].backward()
    for o in opts:
        o.step()
    ga = torch.cat([p.grad.reshape(-1) for p in trainable(models[0])])
    gb = torch.cat([p.grad.reshape(-1) for p in trainable(models[1])])
    out["gpt_grad_rel"] = ((ga - gb).abs().max() / gb.abs().max()).item()
    out["gpt_grad_equal"] = torch.equal(ga, gb)
    mlps = [make_mlp(), make_mlp()]
    opts = [ShardedAMS(m, preset="adamw", lr=1e-2, weight_decay=0.1, backend="eager")
            for m in mlps]
    for step in range(6):
        x, y = mlp_batch(step)
        h = x.shape[0] // 2
        for sl in (slice(0, h), slice(h, None)):
            (F.mse_loss(mlps[0](x[sl]), y[sl]) / 2).backward()
        F.mse_loss(mlps[1](x), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    a, b = snapshot(mlps[0]), snapshot(mlps[1])
    out["mlp_rel"] = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
    out["mlp_moved"] = max((b[k] - make_mlp().state_dict()[k]).abs().max().item() for k in b)
    return out


def _feat_zero_grad() -> dict:
    """opt.zero_grad keeps every grad a view of the flat grad buffer (also after backward);
    model.zero_grad(set_to_none=True) between steps gives bitwise the same training."""
    finals, views = [], []
    for mode in ("opt", "none"):
        model = make_gpt()
        opt = ShardedAMS(model, preset="grams", lr=1e-2, backend="eager")
        sh = opt.shards[0]
        for step in range(8):
            if mode == "none":
                model.zero_grad(set_to_none=True)
                views.append(all(p.grad is None for p in trainable(model)))
            x, y = gpt_batch(step)
            model(x, y)[1].backward()
            if mode == "opt":  # backward accumulated into the buffer views
                views.append(all(p.grad.data_ptr() == sh.buf.grad_view(s).data_ptr()
                                 for s, p in zip(sh.layout.slots, sh.buf.params)))
            opt.step()
            if mode == "opt":
                opt.zero_grad()
                views.append(all(p.grad is not None and p.grad.data_ptr()
                                 == sh.buf.grad_view(s).data_ptr() and not p.grad.any()
                                 for s, p in zip(sh.layout.slots, sh.buf.params)))
                views.append(not sh.buf.grad.any())
        finals.append(snapshot(model))
    return dict(views=views, same=compare_params(finals[0], finals[1]))


def _feat_scheduler() -> dict:
    """StepLR changes the group lr; the result equals AMS with the same scheduler."""
    rank, n = world()
    kw = dict(preset="grams", lr=1e-2, weight_decay=0.01)
    model = make_gpt()
    opt = ShardedAMS(model, backend="eager", **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    init, grads, lrs = snapshot(model), [], []
    for step in range(12):
        x, y = gpt_batch(step)
        model(x, y)[1].backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        if rank == 0:
            grads.append([p.grad.clone() for p in trainable(model)])
        opt.zero_grad()
    out = dict(lrs=lrs)
    if rank == 0:
        ref = make_gpt(seed=1)
        ams = replay(ref, init, grads, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(
            o, step_size=4, gamma=0.5), **ams_kwargs(kw))
        out["ref_lr"] = ams.param_groups[0]["lr"]
        out["replay"] = compare_params(snapshot(ref), snapshot(model))
    return out


def _feat_clipping() -> dict:
    """max_grad_norm == clip_grad_norm_ on the full averaged grads, then AMS (MLP, AdamW);
    last_step.grad_norm == clip_grad_norm_'s total norm."""
    rank, n = world()
    max_norm = 0.05
    kw = dict(preset="adamw", lr=1e-2, weight_decay=0.1)
    model = make_mlp()
    opt = ShardedAMS(model, backend="eager", max_grad_norm=max_norm, **kw)
    ref = make_mlp() if rank == 0 else None
    ams = AMS(ref.parameters(), fused="eager", **ams_kwargs(kw)) if rank == 0 else None
    norms, ref_norms = [], []
    for step in range(10):
        x, y = mlp_batch(step)
        F.mse_loss(model(x), y).backward()
        # the full averaged gradient, computed independently of the optimizer
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / n
        if n > 1:
            dist.all_reduce(flat)
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
        if rank == 0:
            off = 0
            for p in ref.parameters():
                p.grad = flat[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
            ams.step()
    out = dict(norms=norms, max_norm=max_norm)
    if rank == 0:
        a, b = snapshot(model), snapshot(ref)
        out["ref_norms"] = ref_norms
        out["rel"] = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
        out["moved"] = max((b[k] - make_mlp().state_dict()[k]).abs().max().item() for k in b)
    return out


def _state_copy(opt) -> dict:
    return {f"{i}.{k}": t.clone() for i, sh in enumerate(opt.shards) for k, t in sh.state.items()}


def _feat_nonfinite_skip() -> dict:
    """inf on rank 1 at step 2 and NaN on rank 2 at step 4: every rank skips, nothing
    changes (params, every state tensor, step counts), training goes on, and the run
    equals, bitwise, one that never saw those two batches."""
    rank, n = world()
    kw = dict(lam=-0.5, beta3=0.5, lr=1e-2, weight_decay=0.05, backend="eager")
    inject = {2: (1 % n, float("inf")), 4: (2 % n, float("nan"))}
    model = make_gpt()
    opt = ShardedAMS(model, **kw)
    events = []
    for step in range(7):
        x, y = gpt_batch(step)
        model(x, y)[1].backward()
        bad = inject.get(step)
        if bad and bad[0] == rank:
            model.blocks[0].mlp.fc.weight.grad[3, 5] = bad[1]
        p0, s0, k0 = snapshot(model), _state_copy(opt), [g["step"] for g in opt.param_groups]
        before = dict(opt.comm.calls)
        opt.step()
        ev = dict(step=step, skipped=opt.last_step.skipped, norm=opt.last_step.grad_norm,
                  calls=_calls_delta(opt, before),
                  params_same=compare_params(snapshot(model), p0)["equal"],
                  state_same=all(torch.equal(t, s0[k]) for k, t in _state_copy(opt).items()),
                  steps=[g["step"] for g in opt.param_groups], steps_before=k0)
        events.append(ev)
        opt.zero_grad()
    final = snapshot(model)
    # the same run without the two skipped batches
    model2 = make_gpt()
    opt2 = ShardedAMS(model2, **kw)
    for step in range(7):
        if step in inject:
            continue
        x, y = gpt_batch(step)
        model2(x, y)[1].backward()
        opt2.step()
        opt2.zero_grad()
    return dict(events=events, skipped_steps=opt.skipped_steps,
                same_as_clean=compare_params(final, snapshot(model2)))


def _feat_memory_and_calls() -> dict:
    """state_bytes for fp32 (2 and 3 states) and for bf16 (+ master); collective counts
    per step for the default single bucket, without the norm, and with buckets."""
    rank, n = world()
    out = {}
    for name, dtype, kw in [("adamw_fp32", torch.float32, dict(preset="adamw")),
                            ("beta3_fp32", torch.float32, dict(lam=-0.5, beta3=0.5)),
                            ("grams_bf16", torch.bfloat16, dict(preset="grams")),
                            ("grams_buckets", torch.float32, dict(preset="grams", bucket_numel=3000)),
                            ("grams_nonorm", torch.float32, dict(preset="grams", skip_nonfinite=False))]:
        model = make_gpt().to(dtype)
        opt = ShardedAMS(model, backend="eager", **kw)
        sh = opt.shards[0]
        x, y = gpt_batch(0)
        model(x, y)[1].float().backward()
        before = dict(opt.comm.calls)
        opt.step()
        out[name] = dict(state_bytes=opt.state_bytes(), shard_numel=sh.layout.shard_numel,
                         buffer_numel=sh.layout.numel, n_buckets=len(sh.layout.buckets),
                         n_params=len(sh.layout.slots), n_states=len(sh.state),
                         param_numel=sum(p.numel() for p in trainable(model)),
                         calls=_calls_delta(opt, before))
    return out


FEATURES = {
    "groups_frozen_tied_buckets": _feat_groups_frozen_tied_buckets,
    "bf16_masters": _feat_bf16_masters,
    "grad_accumulation": _feat_grad_accumulation,
    "zero_grad": _feat_zero_grad,
    "scheduler": _feat_scheduler,
    "clipping": _feat_clipping,
    "nonfinite_skip": _feat_nonfinite_skip,
    "memory_and_calls": _feat_memory_and_calls,
}
FEATURE_WORLD = 3


def _features_job() -> dict:
    return {name: fn() for name, fn in FEATURES.items()}


_FEATURE_CACHE: list = []


def features(name: str):
    """Results of feature check ``name`` on every rank (the job runs once per session)."""
    if not _FEATURE_CACHE:
        try:
            _FEATURE_CACHE.append(run_distributed(_features_job, FEATURE_WORLD,
                                                  timeout=JOB_TIMEOUT))
        except Exception as exc:
            _FEATURE_CACHE.append(exc)
    res = _FEATURE_CACHE[0]
    if isinstance(res, Exception):
        raise res
    return [r[name] for r in res]


@pytest.mark.slow
def test_param_groups_frozen_tied_and_buckets():
    res = features("groups_frozen_tied_buckets")
    r0 = res[0]
    assert r0["replay"]["equal"], r0["replay"]
    assert not r0["state"]["mismatches"], r0["state"]["mismatches"][:10]
    assert r0["state"]["elements"] == sum(
        p.numel() for k, p in make_gpt().named_parameters() if k != "wpe.weight")
    assert r0["frozen_unchanged"] and r0["frozen_grad_none"]
    assert not r0["in_buf"]["wpe.weight"], "a frozen param stays out of the buffers"
    assert all(v for k, v in r0["in_buf"].items() if k != "wpe.weight")
    n_trainable = len(list(make_gpt().parameters())) - 1  # all but the frozen wpe
    assert len(r0["slot_names"]) == len(set(r0["slot_names"])) == n_trainable
    assert r0["tied"], "lm_head stays tied to wte"
    assert all(moved for k, moved in r0["moved"].items() if k != "wpe.weight")
    assert r0["lrs"] == [1e-2, 3e-3] and r0["steps"] == [12, 12]
    assert r0["n_buckets"] > 1
    # per step: one grad reduction and one gather per bucket; one small all-reduce for
    # the norm plus one per (bucket, group) run for the C-Adam per-tensor counts
    for r in res:
        assert r["n_runs"] == r0["n_runs"]
        for calls in r["calls"]:
            assert calls == {"all_reduce": r0["n_buckets"], "all_gather": r0["n_buckets"],
                             "all_reduce_small": 1 + r0["n_runs"]}


@pytest.mark.slow
def test_bf16_params_fp32_masters():
    res = features("bf16_masters")
    for r in res:
        assert all(r["cast_ok"]), "params == masters cast after every step"
        assert r["pieces_ok"]
        assert set(r["dtypes"].values()) == {"torch.bfloat16"}
        assert set(r["state_dtypes"].values()) == {"torch.float32"}
        assert set(r["state_dtypes"]) == {"exp_avg", "exp_avg_sq", "master"}
    assert res[0]["replay"]["equal"], res[0]["replay"]
    assert not res[0]["state"]["mismatches"], res[0]["state"]["mismatches"][:10]


@pytest.mark.slow
def test_gradient_accumulation_equals_concatenated_batch():
    for r in features("grad_accumulation"):
        # fp32 rounding: (a/2 + b/2) vs the mean over the concatenated rows; measured
        # 8.5e-8 (GPT grads, max diff / max |g|) and 8.2e-8 (MLP params after 6 steps)
        assert r["gpt_grad_rel"] < 1e-6, r["gpt_grad_rel"]
        assert r["mlp_rel"] < 1e-6, r["mlp_rel"]
        assert r["mlp_moved"] > 1e-2


@pytest.mark.slow
def test_zero_grad_views_and_set_to_none():
    for r in features("zero_grad"):
        assert all(r["views"])
        assert r["same"]["equal"], r["same"]


@pytest.mark.slow
def test_lr_scheduler_matches_ams():
    res = features("scheduler")
    for r in res:
        assert r["lrs"] == pytest.approx([1e-2] * 3 + [5e-3] * 4 + [2.5e-3] * 4 + [1.25e-3])
    assert res[0]["ref_lr"] == res[0]["lrs"][-1]
    assert res[0]["replay"]["equal"], res[0]["replay"]


@pytest.mark.slow
def test_clipping_equals_clip_grad_norm_then_ams():
    res = features("clipping")
    r0 = res[0]
    assert all(nm > r0["max_norm"] for nm in r0["ref_norms"]), "clipping is active"
    for r in res:  # every rank saw the same global norm
        assert r["norms"] == res[0]["norms"]
    # measured: norms within rel 8.4e-8 (ShardedAMS sums squares in fp64, torch in fp32),
    # params after 10 clipped steps within 1.0e-7 of max |p|
    for got, ref in zip(r0["norms"], r0["ref_norms"]):
        assert got == pytest.approx(ref, rel=1e-6)
    assert r0["rel"] < 1e-6, r0["rel"]
    assert r0["moved"] > 1e-2


@pytest.mark.slow
def test_nonfinite_gradient_on_one_rank_skips_on_every_rank():
    res = features("nonfinite_skip")
    for r in res:
        assert r["skipped_steps"] == 2
        assert r["same_as_clean"]["equal"], r["same_as_clean"]
        done = 0
        for ev in r["events"]:
            if ev["step"] in (2, 4):
                assert ev["skipped"], ev
                assert not math.isfinite(ev["norm"])
                assert ev["params_same"] and ev["state_same"], ev
                assert ev["steps"] == ev["steps_before"] == [done]
                assert ev["calls"] == {"all_reduce": 1, "all_reduce_small": 1}, ev["calls"]
            else:
                done += 1
                assert not ev["skipped"] and math.isfinite(ev["norm"])
                assert not ev["params_same"] and not ev["state_same"]
                assert ev["steps"] == [done]


@pytest.mark.slow
def test_state_bytes_and_collective_counts():
    n = FEATURE_WORLD
    res = features("memory_and_calls")
    for name, n_states in [("adamw_fp32", 2), ("beta3_fp32", 3), ("grams_bf16", 3),
                           ("grams_buckets", 2), ("grams_nonorm", 2)]:
        per_rank = [r[name] for r in res]
        m = per_rank[0]
        assert m["n_states"] == n_states
        assert all(r["state_bytes"] == m["state_bytes"] for r in per_rank), "even shards"
        assert m["shard_numel"] * n == m["buffer_numel"]
        assert m["state_bytes"] == m["shard_numel"] * 4 * n_states
        padding = ALIGN * m["n_params"] + n * ALIGN * m["n_buckets"]
        assert m["state_bytes"] <= (m["param_numel"] + padding) / n * 4 * n_states
        assert m["state_bytes"] < m["param_numel"] * 4 * n_states / n * 1.1  # ~1/N of total
    r = res[0]
    assert r["adamw_fp32"]["calls"] == {"all_reduce": 1, "all_gather": 1, "all_reduce_small": 1}
    assert r["grams_nonorm"]["calls"] == {"all_reduce": 1, "all_gather": 1}
    nb = r["grams_buckets"]["n_buckets"]
    assert nb > 1
    assert r["grams_buckets"]["calls"] == {"all_reduce": nb, "all_gather": nb,
                                           "all_reduce_small": 1}
    # the two-pass case adds one small all-reduce of the per-tensor counts
    assert r["beta3_fp32"]["calls"] == {"all_reduce": 1, "all_gather": 1, "all_reduce_small": 2}


# --------------------------------------------------------------------------- no processes
def test_world_size_one_without_process_group_equals_ams():
    """No process group at all: ShardedAMS is AMS on flat buffers (bitwise)."""
    assert not dist.is_initialized()
    kw = dict(CONFIGS["lam-0.5_beta3-0.5"], backend="eager")
    run = _train_gpt(kw, 5, replicated=False)
    assert run["opt"].comm.calls == {}
    ref = make_gpt(seed=1)
    ams = replay(ref, run["init"], run["grads"], **ams_kwargs(kw))
    assert compare_params(snapshot(ref), run["final"])["equal"]
    st = compare_state([run["opt"].state_dict()], ams, dict(ref.named_parameters()))
    assert not st["mismatches"] and st["elements"] == ref.num_params()


def _tiny():
    return nn.Linear(3, 2)


def _mlp_run(state_dtype, steps, opt_state=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.GELU(), nn.Linear(33, 1))
    opt = ShardedAMS(model, preset="grams", lr=1e-2, weight_decay=0.1, backend="eager",
                     state_dtype=state_dtype)
    if opt_state is not None:
        model.load_state_dict(opt_state[0])
        opt.load_state_dict(opt_state[1])
    gen = torch.Generator().manual_seed(1 if opt_state is None else 2)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        F.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_bf16_moment_storage():
    """state_dtype=bf16: m, v stored in bf16 (half the bytes), rounded once from the fp32
    maths; the trajectory stays near the fp32 one and a state_dict round trip is exact."""
    m32, o32 = _mlp_run(torch.float32, 1)
    m16, o16 = _mlp_run(torch.bfloat16, 1)
    for key in ("exp_avg", "exp_avg_sq"):
        assert o16.shards[0].state[key].dtype == torch.bfloat16
        assert torch.equal(o16.shards[0].state[key], o32.shards[0].state[key].bfloat16())
    assert o16.state_bytes() * 2 == o32.state_bytes()
    m32, _ = _mlp_run(torch.float32, 60)
    m16, o16 = _mlp_run(torch.bfloat16, 60)
    for a, b in zip(m16.parameters(), m32.parameters()):
        rel = ((a - b).norm() / b.norm()).item()
        assert 0 < rel < 2e-2, rel  # differs (bf16 rounding) but stays close
    saved = ({k: v.clone() for k, v in m16.state_dict().items()}, o16.state_dict())
    cont, _ = _mlp_run(torch.bfloat16, 10, opt_state=saved)
    ref = m16
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        x = torch.randn(8, 16, generator=gen)
        F.mse_loss(ref(x), x.sum(1, keepdim=True)).backward()
        o16.step()
        o16.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(cont.parameters(), ref.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(eps=0.0), "Invalid epsilon"),
    (dict(weight_decay=-1.0), "Invalid weight_decay"),
    (dict(beta3=1.0), "Invalid beta3"),
    (dict(preset="sgd"), "Unknown preset 'sgd'"),
    (dict(preset="grams", lam=0.5), "fixes beta3 and lam"),
    (dict(preset="adamw", beta3=0.5), "fixes beta3 and lam"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm"),
    (dict(max_grad_norm=-1.0), "Invalid max_grad_norm"),
    (dict(max_grad_norm=float("inf")), "Invalid max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "Invalid max_grad_norm"),
    (dict(bucket_numel=0), "Invalid bucket_numel"),
    (dict(backend="cuda-magic"), "Invalid backend"),
    (dict(state_dtype=torch.float16), "Invalid state_dtype"),
])
def test_validation_errors(kwargs, match):
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        ShardedAMS(model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_group_hparams_validated():
    model = _tiny()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ShardedAMS([{"params": [model.weight], "lr": -1.0}, {"params": [model.bias]}])
