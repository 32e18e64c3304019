"""``ShardedAMS`` on the data-parallel dimension of a (dp, tp) = (2, 2) mesh whose params are
tensor-parallel DTensors (Megatron's layout), against one process. Issue 20, part 2.

One spawned job of 4 gloo ranks runs every check. The model is the launcher's Llama,
parallelized with its own plan (``launcher/train/parallel/tp.py``: q/k/v, gate/up
column-parallel, o, down row-parallel, embedding and head split over the vocabulary), with
and without sequence parallelism: with it the RMSNorm weights are replicated DTensors whose
gradients come back ``Partial`` (a sum over the tp ranks); without it they are plain
tensors, replicated over tp by construction.

The reference shares no code with ``sharded_ams``: every step each rank rebuilds the full
params (``full_tensor``) in a plain Llama, computes both data-parallel ranks' gradients on
it and averages them itself; ShardedAMS's reduced gradient (each rank's local shard,
joined by the DTensor layout) must match that within fp32 rounding. The float64 numpy
oracle (``tests/oracle.py``) then replays the reduced gradient, clipped with its own
float64 norm of the whole gradient, and the full params must stay within fp32 rounding of
it for every step; the norm ShardedAMS reports must equal the oracle's.

Cases: Grams (``process_group=mesh["dp"].get_group()``, sequence parallel, a checkpoint
saved on every rank and loaded into a fresh model and optimizer midway) and C-Adam
(beta3 = 0, lam = 0: per-tensor counts over the whole tensor; ``device_mesh=``, no sequence
parallelism), both clipped on every step. In the C-Adam run one rank's replicated norm
weight gets an inf gradient at one step: every rank must skip it. Each ShardedAMS
``step()`` issues one small all-reduce for the norm (two with C-Adam's counts) over the
whole grid. A third case steps the same TP Llama ``fully_shard``-ed over dp with ``AMS``
(C-Adam on 2-D DTensors: FSDP2 + TP). Last, ranks that initialise the model from their own
seeds must all start from rank 0's params (``broadcast_params``, over dp and tp).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from oracle import AMSOracle

STEPS = 6
LR = 1e-2
MAX_NORM = 0.5     # the grad norm here is 1.5-2: every step is clipped
INF_STEP = 3       # C-Adam: rank 3 (dp 1, tp 1) gets an inf norm-weight gradient here
CKPT_STEP = 2      # Grams: save after this step, resume in a fresh model and optimizer
PARAM_TOL = 1e-6   # measured max below 2e-7; a local-shard count or norm is >1e-4 off
GRAD_TOL = 1e-5    # relative; TP changes the summation order only
CASES = {
    "grams": dict(kw=dict(preset="grams"), sp=True, mesh_arg=False, ckpt=True),
    "cadam": dict(kw=dict(preset="cadam", weight_decay=0.1), sp=False, mesh_arg=True, inf=True),
    # no clipping: the norm taken with the count pass, one all-reduce for both
    "cadam_noclip": dict(kw=dict(preset="cadam", weight_decay=0.1, max_grad_norm=None),
                         sp=False, mesh_arg=True, inf=True),
    # AMS (C-Adam) on FSDP2 over dp of the same TP Llama: 2-D DTensors (part 1's path)
    "fsdp_cadam": dict(kw=dict(weight_decay=0.1), sp=True, fsdp=True),
}


def _cfg():
    from launcher.train.models.llama import LlamaConfig

    # vocab 66 and intermediate 40: the shards of every matrix differ in size by dimension
    return LlamaConfig(vocab_size=66, block_size=8, n_layer=1, n_head=4, n_kv_head=2,
                       n_embd=32, intermediate_size=40)


def _batch(step: int, dp_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randint(0, 66, (2, 8), generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _build(mesh, case: dict, seed: int):
    from launcher.train.models.llama import Llama
    from launcher.train.parallel.tp import apply_tp
    from sharded_ams import ShardedAMS

    torch.manual_seed(seed)
    model = apply_tp(Llama(_cfg()), mesh["tp"], sequence_parallel=case["sp"])
    if case.get("fsdp"):
        from torch.distributed.fsdp import fully_shard

        from sharded_ams import CAdam

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model, CAdam(model.parameters(), lr=LR, fused="eager", **case["kw"])
    where = dict(device_mesh=mesh) if case["mesh_arg"] else dict(
        process_group=mesh["dp"].get_group())
    # eager: the step kernels see plain local buffers (TP changes nothing there; the
    # compiled and Triton paths are tested on those in test_sharded.py), no compile wait
    return model, ShardedAMS(model, lr=LR, backend="eager", **where,
                             **{"max_grad_norm": MAX_NORM, **case["kw"]})


def _capture_reduced(model, opt) -> list:
    """After each reduction (all-reduce path: the whole local buffer holds the average),
    every param's local gradient joined into the full tensor by its DTensor layout."""
    from torch.distributed.tensor import DTensor

    box: list = []
    real = opt._sync.finish_grad_sync
    where = {id(p): (sh, slot) for sh in opt.shards
             for slot, p in zip(sh.layout.slots, sh.buf.params)}

    def finish_and_capture() -> None:
        real()
        out = {}
        for name, p in model.named_parameters():
            sh, slot = where[id(p)]
            g = sh.buf.grad_view(slot).clone()
            if isinstance(p, DTensor):
                g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride()).full_tensor()
            out[name] = g
        box.append(out)
    opt._sync.finish_grad_sync = finish_and_capture
    return box


def _stepper(model, opt):
    """A function that steps ``opt`` and returns (the reduced gradients by name, skipped,
    the norm the optimizer reports, small all-reduces issued)."""
    if not hasattr(opt, "shards"):  # AMS on FSDP2: the reduced gradient is p.grad
        def fsdp_step():
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
            opt.step()
            return grads, False, None, None
        return fsdp_step
    reduced = _capture_reduced(model, opt)

    def sharded_step():
        calls = _small_all_reduces(opt.step)
        return reduced[-1], opt.last_step.skipped, opt.last_step.grad_norm, calls
    return sharded_step


def _run_case(name: str, mesh) -> dict:
    from launcher.train.models.llama import Llama

    case = CASES[name]
    dp_rank, tp_rank = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    model, opt = _build(mesh, case, seed=0)
    step_fn = _stepper(model, opt)
    hp = {"beta3": 0.0, "lam": -1.0 if name == "grams" else 0.0,
          "weight_decay": case["kw"].get("weight_decay", 0.0)}
    oracle = AMSOracle.start([_full(p.detach()) for p in model.parameters()], lr=LR,
                             betas=(0.9, 0.999), eps=1e-8, **hp)
    ref = Llama(_cfg())
    out = dict(param_err=[], grad_err=[], norm_err=[], skipped=[], small_all_reduces=[])
    for step in range(STEPS):
        getattr(opt, "finish_param_sync", lambda: None)()
        before = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
        ref.load_state_dict(before)
        ref.zero_grad()
        for r in range(2):  # the independent mean: (g_0 + g_1) / 2, in that order
            idx = _batch(step, r)
            (ref(idx, idx)[1] / 2).backward()
        poison = case.get("inf") and step == INF_STEP and (dp_rank, tp_rank) == (1, 1)
        hook = model.model.norm.weight.register_hook(lambda g: g * float("inf")) \
            if poison else None
        idx = _batch(step, dp_rank)
        model(idx, idx)[1].backward()
        got, skipped, reported, calls = step_fn()
        out["small_all_reduces"].append(calls)
        opt.zero_grad()
        if hook is not None:
            hook.remove()
        out["skipped"].append(skipped)
        if not skipped:
            out["grad_err"].append(max(
                float((got[n] - p.grad).abs().max() / (p.grad.abs().max() + 1e-12))
                for n, p in ref.named_parameters()))
            grads = [got[n].double() for n, _ in model.named_parameters()]
            norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
            max_norm = case["kw"].get("max_grad_norm", MAX_NORM)
            coef = 1.0 if reported is None or max_norm is None else max_norm / (norm + 1e-6)
            out["norm_err"].append(0.0 if reported is None else abs(reported - norm) / norm)
            oracle.step([g * coef for g in grads] if coef < 1 else grads)
        getattr(opt, "finish_param_sync", lambda: None)()
        out["param_err"].append(max(
            float((_full(p.detach()).double() - torch.from_numpy(o.p)).abs().max())
            for p, o in zip(model.parameters(), oracle.tensors)))
        if case.get("ckpt") and step == CKPT_STEP:
            model, opt, out["refusal"] = _resume(mesh, case, opt)
            step_fn = _stepper(model, opt)
    return out


def _small_all_reduces(step) -> int:
    """How many all-reduces of small tensors (the norm, the counts; not the gradient
    buckets) ``step()`` issues."""
    real, calls = dist.all_reduce, []

    def counting(t, *args, **kwargs):
        if t.numel() < 256:
            calls.append(t.numel())
        return real(t, *args, **kwargs)
    dist.all_reduce = counting
    try:
        step()
    finally:
        dist.all_reduce = real
    return len(calls)


def _resume(mesh, case: dict, opt):
    """Every rank's state dict, loaded (all four) into a fresh model and optimizer of
    another seed; and the refusal of a checkpoint from another tp layout."""
    sds: list = [None] * dist.get_world_size()
    dist.all_gather_object(sds, opt.state_dict())
    opt.close()
    model, new = _build(mesh, case, seed=1)
    other_tp = [dict(sd, model_parallel=dict(sd["model_parallel"], shape=[4])) for sd in sds]
    try:
        new.load_state_dict(other_tp)
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    new.load_state_dict(sds)
    return model, new, refusal


def _misuse() -> str:
    """A DTensor param split over the data-parallel ranks themselves (FSDP's layout)."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from sharded_ams import ShardedAMS

    world = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), world, [Shard(0)]))
    try:
        ShardedAMS([p])
    except ValueError as exc:
        return str(exc)
    return "no error"


def _seeded_per_rank(mesh) -> dict:
    """Each rank builds the TP Llama from its own seed, with random norm weights (with
    sequence parallelism they are Replicate DTensors made from each rank's values, without
    it plain tensors): after ``ShardedAMS(broadcast_params=True)`` every param must hold
    rank 0's (seed 0) values on every rank, its tp copies included. The largest
    difference per layout."""
    from launcher.train.models.llama import Llama
    from launcher.train.parallel.tp import apply_tp
    from sharded_ams import ShardedAMS

    def llama(seed: int):
        torch.manual_seed(seed)
        model = Llama(_cfg())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:  # ones by default: the same on every rank anyway
                    p.add_(0.1 * torch.randn_like(p))
        return model

    want = dict(llama(0).named_parameters())
    out = {}
    for sp in (True, False):
        model = apply_tp(llama(dist.get_rank()), mesh["tp"], sequence_parallel=sp)
        opt = ShardedAMS(model, device_mesh=mesh, backend="eager")
        opt.finish_param_sync()
        out[sp] = max(float((_full(p.detach()) - want[n]).abs().max())
                      for n, p in model.named_parameters())
        opt.close()
    return out


def _job() -> dict:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {name: _run_case(name, mesh) for name in CASES}
    out["misuse"] = _misuse()
    out["seeded"] = _seeded_per_rank(mesh)
    return out


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_distributed(_job, 4, timeout=300)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tp_dp_mesh_equals_one_process(name):
    """Reduced gradients equal the independent mean, the reported norm the oracle's, and
    the params stay on the float64 oracle's trajectory every step on every rank."""
    for rank, res in enumerate(_results()):
        r = res[name]
        assert max(r["grad_err"]) < GRAD_TOL, (rank, r["grad_err"])
        assert max(r["norm_err"]) < 1e-6, (rank, r["norm_err"])
        assert max(r["param_err"]) < PARAM_TOL, (rank, r["param_err"])


def test_one_small_all_reduce_each_for_the_norm_and_the_counts():
    """The grid (dp x tp) is the world: the norm (with the error flags) takes one
    all-reduce, and C-Adam's per-tensor counts of every tensor one more, per step; without
    clipping C-Adam's count pass takes the norm and one all-reduce carries both."""
    for res in _results():
        assert res["grams"]["small_all_reduces"] == [1] * STEPS
        assert res["cadam"]["small_all_reduces"] == [2] * STEPS
        assert res["cadam_noclip"]["small_all_reduces"] == [1] * STEPS


def test_nonfinite_on_one_rank_skips_everywhere():
    """An inf in one rank's copy of a replicated (norm) weight: every rank skips that step
    (and only that one); the oracle skips it too, so the trajectories above still agree."""
    for rank, res in enumerate(_results()):
        want = [s == INF_STEP for s in range(STEPS)]
        for name in ("cadam", "cadam_noclip"):
            assert res[name]["skipped"] == want, (rank, name, res[name]["skipped"])
        assert res["grams"]["skipped"] == res["fsdp_cadam"]["skipped"] == [False] * STEPS


def test_broadcast_params_makes_tp_copies_rank_0s():
    """Ranks seeded differently: the dp broadcast alone left each tp rank its own copy of
    the replicated norm weights (each tp rank then trained a different model)."""
    for rank, res in enumerate(_results()):
        assert res["seeded"] == {True: 0.0, False: 0.0}, (rank, res["seeded"])


def test_checkpoint_records_the_mesh_and_refuses_another_tp():
    for res in _results():
        assert "resharding across tp is not supported" in res["grams"]["refusal"]
        assert "FSDP's layout" in res["misuse"]


def test_tp_plan_refusals_name_the_problem():
    """No process group needed: what the plan refuses, one reason each."""
    from launcher.train.models.gpt import GPT, GPTConfig
    from launcher.train.models.llama import LlamaConfig
    from launcher.train.parallel.tp import apply_tp, tp_refusals

    cfg = LlamaConfig(vocab_size=66, n_head=6, n_kv_head=3, n_embd=48, intermediate_size=42)
    assert tp_refusals(cfg, 3, seq_len=9) == []
    got = tp_refusals(cfg, 2, seq_len=9)
    assert got == ["tp = 2 does not divide model.n_kv_head = 3",
                   "tp = 2 does not divide the sequence length 9 (sequence parallelism "
                   "splits it)"]
    assert tp_refusals(cfg, 2, seq_len=9, sequence_parallel=False) == got[:1]
    assert tp_refusals(cfg, 4) == [f"tp = 4 does not divide model.{k}" for k in
                                   ("n_head = 6", "n_kv_head = 3", "intermediate_size = 42")]
    tied = LlamaConfig(vocab_size=66, tie_weights=True)
    assert any("tie_weights" in r for r in tp_refusals(tied, 2))
    with pytest.raises(ValueError, match="built-in Llama only, not GPT"):
        apply_tp(GPT(GPTConfig(vocab_size=66, n_layer=1, n_embd=32, block_size=8)), None)
