"""ShardedAMS features on 2 gloo processes, each against an independent oracle.

The features (bf16 params with fp32 masters and fp32 or bf16 gradient reduction, param
groups, frozen and tied params, several buckets, gradient accumulation with ``no_sync``,
zero_grad / set_to_none, LR scheduler, clipping, inf/NaN skip, state memory, collective
counts) and the misuse checks (ranks that disagree, sparse gradients, a forward that
bypasses the param gather, a second backward without ``no_sync``, zero_grad while
reductions run) share one N = 2 job, which runs every check on both collective paths
(``sharded_common.PATHS``: gloo's all-reduce and NCCL's reduce-scatter + all-gather). N = 2 because there the independent average of the
ranks' recorded local gradients (``sharded_common``) is bitwise what a correct reduction
gives, so every replay is exact; shard boundaries still fall inside params. Checks whose
reference differs by fp32 rounding of the gradient (clipping, accumulation against one
big batch) use a small dense MLP whose gradients have no near-zero elements.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharded_ams import AMS, ShardedAMS
from sharded_ams.layout import ALIGN

from sharded_common import (PATHS, GradRecorder, ams_kwargs, compare_params, compare_state,
                            features, finish_in_backward, gather_to_rank0, gpt_batch,
                            make_gpt, make_mlp, means_per_step, mlp_batch, replay, snapshot,
                            trainable, world)

FEATURE_WORLD = 2


def _calls_delta(opt, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in opt.comm.calls.items() if v - before.get(k, 0)}


def _means(recorded_local: list) -> list:
    """Rank 0: the independent mean of every rank's recorded local gradients, per step."""
    everyone = gather_to_rank0(recorded_local)
    return means_per_step(everyone) if everyone is not None else None


def _feat_groups_frozen_tied_buckets(path: str, in_backward: bool = False) -> dict:
    """cadam (per-tensor counts and, without clipping, the norm: ONE small all-reduce per
    step for all runs), two groups
    with different lr / weight decay, a frozen param inside a group, the tied lm_head,
    several buckets, overlap through ``module=``. Replayed bitwise. ``in_backward``: the
    reductions finish in backward, so every run is counted there (test_backward_count)."""
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
                     preset="cadam", backend="eager", bucket_numel=4000, module=model,
                     collectives=path)
    taken = finish_in_backward(opt) if in_backward else None
    init = snapshot(model)
    sh = opt.shards[0]
    lo, hi = sh.buf.param.data_ptr(), sh.buf.param.data_ptr() + sh.buf.param.numel() * 4
    in_buf = {k: lo <= p.data_ptr() < hi for k, p in named}
    order = [by_name[k] for k in decay + no_decay if by_name[k].requires_grad]
    rec = GradRecorder(order)
    local, calls = [], []
    for step in range(12):
        x, y = gpt_batch(step)
        before = dict(opt.comm.calls)  # with overlap the reductions start in backward
        model(x, y)[1].backward()
        opt.step()
        calls.append(_calls_delta(opt, before))
        local.append(rec.pop())
        opt.zero_grad()
    out = dict(in_buf=in_buf, frozen_unchanged=torch.equal(model.wpe.weight, frozen0),
               frozen_grad_none=model.wpe.weight.grad is None,
               tied=model.lm_head.weight is model.wte.weight,
               slot_names=[s.name for s in sh.layout.slots], n_buckets=len(sh.layout.buckets),
               n_runs=len(sh.runs), calls=calls, steps=[int(g["step"]) for g in opt.param_groups],
               lrs=[g["lr"] for g in opt.param_groups], stats=opt.sync_stats.as_dict(),
               taken=taken, nonempty_runs=sum(r.local_end > r.local_start for r in sh.runs))
    means = _means(local)
    sds = gather_to_rank0(opt.state_dict())
    if rank == 0:
        final = snapshot(model)
        ref = make_gpt(seed=1)
        ref.wpe.weight.requires_grad_(False)
        rnamed = dict(ref.named_parameters())
        ams = replay(ref, init, means, params=[rnamed[k] for k in decay + no_decay
                                               if rnamed[k].requires_grad],
                     groups=[{**g, "params": [rnamed[k] for k in g["params"]]} for g in groups],
                     **ams_kwargs(dict(preset="cadam")))
        out["replay"] = compare_params(snapshot(ref), final)
        out["state"] = compare_state(sds, ams, rnamed)  # pieces are named by the module
        out["moved"] = {k: not torch.equal(final[k], init[k]) for k in final}
    return out


def _extra_term(extra: nn.Parameter, step: int):
    """A param outside the model, used on even steps only: on odd steps it gets no gradient
    at all, and whatever its gradient buffer held must count as zero."""
    return 0.01 * extra.float().square().sum() if step % 2 == 0 else 0.0


def _bf16_run(grad_reduce_dtype, path: str) -> dict:
    rank, n = world()
    model = make_gpt().to(torch.bfloat16)
    extra = nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.bfloat16))
    opt = ShardedAMS(trainable(model) + [extra], module=model, preset="grams", lr=1e-2,
                     backend="eager", grad_reduce_dtype=grad_reduce_dtype, collectives=path)
    init, extra0 = snapshot(model), extra.detach().clone()
    sh = opt.shards[0]
    main = sh.buf.main_grad
    rec = GradRecorder(trainable(model) + [extra], torch.float32 if main else None)
    cast_ok, local, grad_none = [], [], []
    for step in range(10):
        x, y = gpt_batch(step)
        (model(x, y)[1].float() + _extra_term(extra, step)).backward()
        grad_none.append(all(p.grad is None for p in trainable(model) + [extra]))
        opt.step()
        cast_ok.append(all(torch.equal(sh.param_shard(b), sh.master_view(b).to(torch.bfloat16))
                           for b in range(len(sh.layout.buckets))))
        local.append(rec.pop())
        opt.zero_grad()
    sd = opt.state_dict()
    final = {**snapshot(model), "extra": extra.detach().clone()}
    names = {rec["name"] for rec in sd["pieces"]}
    final_by_piece = {**final, **{n: final["extra"] for n in names if n not in final}}
    # every rank's masters, cast, equal the gathered bf16 params on every rank
    pieces_ok = all(torch.equal(rec["master"].to(torch.bfloat16),
                                final_by_piece[rec["name"]].reshape(-1)[rec["offset"]:rec["offset"] + rec["length"]])
                    for rec in sd["pieces"])
    out = dict(cast_ok=cast_ok, pieces_ok=pieces_ok, grad_none=grad_none, main_grad=main,
               grad_dtype=str(sh.buf.grad.dtype),
               dtypes={k: str(v.dtype) for k, v in final.items()},
               state_dtypes={k: str(t.dtype) for k, t in sh.state.items()})
    means = _means(local)
    sds = gather_to_rank0(sd)
    if rank == 0:
        # fp32 reduction: the maths is fp32 throughout, so the reference is AMS on fp32
        # params from the (exactly representable) bf16 init; bf16 reduction: AMS on bf16
        dtype = torch.float32 if main else torch.bfloat16
        ref = make_gpt(seed=1).to(dtype)
        ref_extra = nn.Parameter(extra0.to(dtype))
        ams = replay(ref, {k: v.to(dtype) for k, v in init.items()}, means,
                     params=trainable(ref) + [ref_extra],
                     **ams_kwargs(dict(preset="grams", lr=1e-2)))
        ref_bf16 = {k: v.to(torch.bfloat16)
                    for k, v in {**snapshot(ref), "extra": ref_extra.detach()}.items()}
        out["replay"] = compare_params(ref_bf16, final)
        by_name = dict(ref.named_parameters())
        everyone = {rec["name"] for sd in sds for rec in sd["pieces"]}
        out["state"] = compare_state(sds, ams, {n: by_name.get(n, ref_extra) for n in everyone})
    return out


def _feat_bf16_masters(path: str) -> dict:
    """bf16 params with fp32 masters, gradients reduced in fp32 (default: ``p.grad`` is
    None after backward, the gradient is in the fp32 buffer) and in bf16."""
    return {"fp32_reduce": _bf16_run(None, path), "bf16_reduce": _bf16_run(torch.bfloat16, path)}


MICRO = 4


def _feat_grad_accumulation(path: str) -> dict:
    """4 micro-batches per step, the first 3 under no_sync(): nothing is reduced until the
    last one; replayed bitwise on the independently accumulated and averaged local grads.
    Also an MLP against one step on the concatenated batch, to fp32 rounding."""
    rank, n = world()
    out = {}
    model = make_gpt()
    opt = ShardedAMS(model, preset="adamw", lr=1e-2, weight_decay=0.1, backend="eager",
                     bucket_numel=5000, collectives=path)
    rec = GradRecorder(trainable(model))
    init, local, quiet = snapshot(model), [], []
    for step in range(6):
        x, y = gpt_batch(step, global_batch=4 * MICRO * FEATURE_WORLD)
        for k, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
            before = dict(opt.comm.calls)
            ctx = opt.no_sync() if k < MICRO - 1 else contextlib.nullcontext()
            with ctx:
                (model(xm, ym)[1] / MICRO).backward()
            if k < MICRO - 1:
                quiet.append(_calls_delta(opt, before) == {})
        opt.step()
        local.append(rec.pop())
        opt.zero_grad()
    opt.finish_param_sync()  # read params outside a forward only after this
    out["quiet"] = quiet
    out["late_buckets"] = opt.sync_stats.late_buckets
    means = _means(local)
    if rank == 0:
        ref = make_gpt(seed=1)
        replay(ref, init, means, **ams_kwargs(dict(preset="adamw", lr=1e-2, weight_decay=0.1)))
        out["replay"] = compare_params(snapshot(ref), snapshot(model))
    mlps = [make_mlp(), make_mlp()]
    opts = [ShardedAMS(m, preset="adamw", lr=1e-2, weight_decay=0.1, backend="eager",
                       collectives=path)
            for m in mlps]
    for step in range(6):
        x, y = mlp_batch(step)
        h = x.shape[0] // 2
        with opts[0].no_sync():
            (F.mse_loss(mlps[0](x[:h]), y[:h]) / 2).backward()
        (F.mse_loss(mlps[0](x[h:]), y[h:]) / 2).backward()
        F.mse_loss(mlps[1](x), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    for o in opts:
        o.finish_param_sync()
    a, b = snapshot(mlps[0]), snapshot(mlps[1])
    out["mlp_rel"] = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
    out["mlp_moved"] = max((b[k] - make_mlp().state_dict()[k]).abs().max().item() for k in b)
    return out


def _feat_zero_grad(path: str) -> dict:
    """opt.zero_grad keeps every grad a view of the flat grad buffer (also after backward);
    model.zero_grad(set_to_none=True) between steps gives bitwise the same training."""
    finals, views = [], []
    for mode in ("opt", "none"):
        model = make_gpt()
        extra = nn.Parameter(torch.linspace(-1, 1, 7))
        opt = ShardedAMS(trainable(model) + [extra], module=model, preset="grams", lr=1e-2,
                         backend="eager", collectives=path)
        sh = opt.shards[0]
        for step in range(8):
            if mode == "none":
                model.zero_grad(set_to_none=True)
                extra.grad = None
                views.append(all(p.grad is None for p in trainable(model)))
            x, y = gpt_batch(step)
            (model(x, y)[1] + _extra_term(extra, step)).backward()
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
        opt.finish_param_sync()
        finals.append({**snapshot(model), "extra": extra.detach().clone()})
    return dict(views=views, same=compare_params(finals[0], finals[1]))


def _feat_scheduler(path: str) -> dict:
    """StepLR changes the group lr; the result equals AMS with the same scheduler."""
    rank, n = world()
    kw = dict(preset="grams", lr=1e-2, weight_decay=0.01)
    model = make_gpt()
    opt = ShardedAMS(model, backend="eager", collectives=path, **kw)
    rec = GradRecorder(trainable(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    init, local, lrs = snapshot(model), [], []
    for step in range(12):
        x, y = gpt_batch(step)
        model(x, y)[1].backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        local.append(rec.pop())
        opt.zero_grad()
    opt.finish_param_sync()
    out = dict(lrs=lrs)
    means = _means(local)
    if rank == 0:
        ref = make_gpt(seed=1)
        ams = replay(ref, init, means, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(
            o, step_size=4, gamma=0.5), **ams_kwargs(kw))
        out["ref_lr"] = ams.param_groups[0]["lr"]
        out["replay"] = compare_params(snapshot(ref), snapshot(model))
    return out


def _feat_clipping(path: str) -> dict:
    """max_grad_norm == clip_grad_norm_ on the independently averaged grads, then AMS (MLP,
    AdamW), on steps that clip and steps that do not; last_step.grad_norm ==
    clip_grad_norm_'s total norm."""
    rank, n = world()
    max_norm = 0.6
    kw = dict(preset="adamw", lr=1e-2, weight_decay=0.1)
    model = make_mlp()
    # several buckets: the norm and the clip must cover every bucket's shard
    opt = ShardedAMS(model, backend="eager", max_grad_norm=max_norm, bucket_numel=1,
                     collectives=path, **kw)
    rec = GradRecorder(trainable(model))
    norms, local = [], []
    for step in range(10):
        x, y = mlp_batch(step)
        F.mse_loss(model(x), y).backward()
        opt.step()
        norms.append(opt.last_step.grad_norm)
        local.append(rec.pop())
        opt.zero_grad()
    opt.finish_param_sync()
    out = dict(norms=norms, max_norm=max_norm, n_buckets=len(opt.shards[0].layout.buckets))
    means = _means(local)
    if rank == 0:
        ref = make_mlp()
        ams = AMS(ref.parameters(), fused="eager", **ams_kwargs(kw))
        ref_norms = []
        for gs in means:
            for p, g in zip(ref.parameters(), gs):
                p.grad = g.clone()
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
            ams.step()
        a, b = snapshot(model), snapshot(ref)
        out["ref_norms"] = ref_norms
        out["rel"] = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
        out["moved"] = max((b[k] - make_mlp().state_dict()[k]).abs().max().item() for k in b)
    return out


def _state_copy(opt) -> dict:
    return {f"{i}.{k}": t.clone() for i, sh in enumerate(opt.shards) for k, t in sh.state.items()}


def _feat_nonfinite_skip(path: str) -> dict:
    """inf on rank 1 at step 2 and NaN on rank 0 at step 4 (one gradient element, through
    the loss): every rank skips, nothing changes (params, every state tensor, step
    counts), training goes on, and the run equals, bitwise, one that never saw those
    two batches."""
    rank, n = world()
    kw = dict(lam=-0.5, beta3=0.5, lr=1e-2, weight_decay=0.05, backend="eager", collectives=path)
    inject = {2: (1 % n, float("inf")), 4: (0, float("nan"))}
    model = make_gpt()
    opt = ShardedAMS(model, **kw)
    events = []
    for step in range(7):
        x, y = gpt_batch(step)
        before = dict(opt.comm.calls)
        loss = model(x, y)[1]
        bad = inject.get(step)
        if bad and bad[0] == rank:
            loss = loss + bad[1] * model.blocks[0].mlp.fc.weight[3, 5]
        loss.backward()
        p0, s0 = snapshot(model), _state_copy(opt)
        k0 = [int(g["step"]) for g in opt.param_groups]
        opt.step()
        opt.finish_param_sync()
        ev = dict(step=step, skipped=opt.last_step.skipped, norm=opt.last_step.grad_norm,
                  calls=_calls_delta(opt, before),
                  params_same=compare_params(snapshot(model), p0)["equal"],
                  state_same=all(torch.equal(t, s0[k]) for k, t in _state_copy(opt).items()),
                  steps=[int(g["step"]) for g in opt.param_groups], steps_before=k0)
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
    opt2.finish_param_sync()
    return dict(events=events, skipped_steps=opt.skipped_steps,
                same_as_clean=compare_params(final, snapshot(model2)))


def _feat_memory_and_calls(path: str) -> dict:
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
        opt = ShardedAMS(model, backend="eager", collectives=path, **kw)
        sh = opt.shards[0]
        x, y = gpt_batch(0)
        before = dict(opt.comm.calls)
        model(x, y)[1].float().backward()
        opt.step()
        out[name] = dict(state_bytes=opt.state_bytes(), shard_numel=sh.layout.shard_numel,
                         buffer_numel=sh.layout.numel, n_buckets=len(sh.layout.buckets),
                         n_params=len(sh.layout.slots), n_states=len(sh.state),
                         param_numel=sum(p.numel() for p in trainable(model)),
                         calls=_calls_delta(opt, before))
    return out


def _feat_misuse(path: str) -> dict:
    """Misuse that must raise a clear error on every rank instead of hanging or training
    on wrong numbers."""
    from test_overlap import misuse_checks

    return misuse_checks(path)


FEATURES = {
    "groups_frozen_tied_buckets": _feat_groups_frozen_tied_buckets,
    "bf16_masters": _feat_bf16_masters,
    "grad_accumulation": _feat_grad_accumulation,
    "zero_grad": _feat_zero_grad,
    "scheduler": _feat_scheduler,
    "clipping": _feat_clipping,
    "nonfinite_skip": _feat_nonfinite_skip,
    "memory_and_calls": _feat_memory_and_calls,
    "misuse": _feat_misuse,
    "backward_count": lambda path: _feat_groups_frozen_tied_buckets(path, in_backward=True),
}


def features_job(ckpt_dir: str) -> dict:
    """Every feature check on both collective paths, in one N = 2 job."""
    return {path: {name: fn(path) for name, fn in FEATURES.items()} for path in PATHS}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_param_groups_frozen_tied_and_buckets(path):
    res = features("groups_frozen_tied_buckets", path)
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
    # every param got a gradient: every bucket was reduced during backward
    assert r0["stats"]["late_buckets"] == 0 and r0["stats"]["steps"] == 12
    # per step: one grad reduction and one gather per bucket; ONE small all-reduce for
    # the C-Adam per-tensor counts of every (bucket, group) run and the norm, which the
    # count pass takes (no clipping: shard_step.step_shards_norm_in_count)
    assert r0["n_runs"] > r0["n_buckets"]
    for r in res:
        assert r["n_runs"] == r0["n_runs"]
        for calls in r["calls"]:
            assert calls == {path: r0["n_buckets"], "all_gather": r0["n_buckets"],
                             "all_reduce_small": 1}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduce", ["fp32_reduce", "bf16_reduce"])
def test_bf16_params_fp32_masters(reduce, path):
    res = [r[reduce] for r in features("bf16_masters", path)]
    fp32 = reduce == "fp32_reduce"
    for r in res:
        assert all(r["cast_ok"]), "params == masters cast after every step"
        assert r["pieces_ok"]
        assert set(r["dtypes"].values()) == {"torch.bfloat16"}
        assert set(r["state_dtypes"].values()) == {"torch.float32"}
        assert set(r["state_dtypes"]) == {"exp_avg", "exp_avg_sq", "master"}
        assert r["main_grad"] == fp32 and all(r["grad_none"]) == fp32
        assert r["grad_dtype"] == ("torch.float32" if fp32 else "torch.bfloat16")
    assert res[0]["replay"]["equal"], res[0]["replay"]
    assert not res[0]["state"]["mismatches"], res[0]["state"]["mismatches"][:10]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_gradient_accumulation_with_no_sync(path):
    for r in features("grad_accumulation", path):
        assert r["quiet"] and all(r["quiet"]), "no collective inside no_sync()"
        assert r["late_buckets"] == 0, "the last micro-batch's backward reduced every bucket"
        # fp32 rounding: (a/2 + b/2) vs the mean over the concatenated rows; measured
        # 8.2e-8 (MLP params after 6 steps)
        assert r["mlp_rel"] < 1e-6, r["mlp_rel"]
        assert r["mlp_moved"] > 1e-2
    r0 = features("grad_accumulation", path)[0]
    assert r0["replay"]["equal"], r0["replay"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_zero_grad_views_and_set_to_none(path):
    for r in features("zero_grad", path):
        assert all(r["views"])
        assert r["same"]["equal"], r["same"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_lr_scheduler_matches_ams(path):
    res = features("scheduler", path)
    for r in res:
        assert r["lrs"] == pytest.approx([1e-2] * 3 + [5e-3] * 4 + [2.5e-3] * 4 + [1.25e-3])
    assert res[0]["ref_lr"] == res[0]["lrs"][-1]
    assert res[0]["replay"]["equal"], res[0]["replay"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_clipping_equals_clip_grad_norm_then_ams(path):
    res = features("clipping", path)
    r0 = res[0]
    # clipping is active on some steps, not on others (the factor must be exactly 1 there)
    assert sum(nm > r0["max_norm"] for nm in r0["ref_norms"]) >= 3
    assert sum(nm < r0["max_norm"] for nm in r0["ref_norms"]) >= 3
    assert r0["n_buckets"] > 2
    for r in res:  # every rank saw the same global norm
        assert r["norms"] == res[0]["norms"]
    # measured: norms within rel 8.4e-8 (ShardedAMS sums squares in fp64, torch in fp32),
    # params after 10 clipped steps within 1.0e-7 of max |p|
    for got, ref in zip(r0["norms"], r0["ref_norms"]):
        assert got == pytest.approx(ref, rel=1e-6)
    assert r0["rel"] < 1e-6, r0["rel"]
    assert r0["moved"] > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_gradient_on_one_rank_skips_on_every_rank(path):
    res = features("nonfinite_skip", path)
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
                # decided on the device: the host does not know, so the step's collectives
                # (the counts and norm of the two-pass case, the gather of unchanged
                # params) all run
                assert ev["calls"] == {path: 1, "all_reduce_small": 1,
                                       "all_gather": 1}, ev["calls"]
            else:
                done += 1
                assert ev["calls"] == {path: 1, "all_reduce_small": 1, "all_gather": 1}
                assert not ev["skipped"] and math.isfinite(ev["norm"])
                assert not ev["params_same"] and not ev["state_same"]
                assert ev["steps"] == [done]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_state_bytes_and_collective_counts(path):
    n = FEATURE_WORLD
    res = features("memory_and_calls", path)
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
    assert r["adamw_fp32"]["calls"] == {path: 1, "all_gather": 1, "all_reduce_small": 1}
    # without the norm all-reduce, the ranks' error flags take one of their own
    # (bucket_sync.py, "Misuse")
    assert r["grams_nonorm"]["calls"] == {path: 1, "all_gather": 1, "all_reduce_small": 1}
    nb = r["grams_buckets"]["n_buckets"]
    assert nb > 1
    assert r["grams_buckets"]["calls"] == {path: nb, "all_gather": nb,
                                           "all_reduce_small": 1}
    # the two-pass case without clipping: its per-tensor counts and the norm (from the
    # count pass) in the one small all-reduce
    assert r["beta3_fp32"]["calls"] == {path: 1, "all_gather": 1, "all_reduce_small": 1}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_counted_in_backward_replays_bitwise(path):
    """C-Adam's counts taken in backward (test_backward_count.py), the reductions made to
    finish there (``sharded_common.finish_in_backward``): every run counted in backward,
    from reduced gradients, and the run replays bitwise through the oracle."""
    res = features("backward_count", path)
    assert res[0]["replay"]["equal"], res[0]["replay"]
    assert not res[0]["state"]["mismatches"], res[0]["state"]["mismatches"][:10]
    for r in res:
        assert r["n_buckets"] > 1 and r["taken"] == [r["nonempty_runs"]] * 12, r["taken"]
