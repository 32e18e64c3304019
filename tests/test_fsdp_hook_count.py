"""C-Adam's count in FSDP2's post-accumulate-grad hooks (``sharded_ams/hook_count.py``).

``count_in_backward=True`` (the default hooks CUDA params only) against the oracle: the
same optimizer with ``count_in_backward=False`` (every count taken in
``step()``; that path is checked against the float64 oracle in ``test_fsdp.py``), run on
the same model, batches and user actions: the params must be bitwise equal after every
step, and ``used`` (the tensors whose counts the step took from backward) shows which way
each step went. One spawn of 2 gloo ranks; the model is three equal ``fully_shard``-ed
Linear layers and a root head, uneven shards (257 rows over 2 ranks), the compiled
one-call path (``COMPILE_MIN_NUMEL = 0``).

Each user action that changes what the step would count must make the step count again:
a gradient written in place after backward (through the DTensor or its local shard), a
state loaded between backward and step, beta1 changed, a second step on the same
gradients. ``FSDPAMS`` keeps backward's counts when its clip coefficient is exactly 1 and
counts again when it clips; its clip coefficient, read inside the step, gives bitwise the
step on gradients scaled beforehand.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from dist_utils import run_distributed

STEPS = 4
WIDTH = 257
KW = {"cadam": dict(lam=0.0), "lam-0.5_beta3-0.5": dict(lam=-0.5, beta3=0.5, weight_decay=0.1)}
#: what the second preset (beta3 > 0: the s state) runs too (each new layout compiles)
LAM_ACTIONS = ("none",)
ACTIONS = ("none", "no_sync", "root_only", "bf16", "threshold", "tp", "grad_dropped", "dtensor_grad_write", "local_grad_write", "load_state",
           "beta1", "second_step")


def _model(root_only: bool = False, bf16: bool = False):
    """Three fully_shard-ed layers under a root that holds the head; or (``root_only``)
    every param in the root's one group: one count call for the whole param group.
    ``bf16``: bf16 params (fp32 masters in the optimizer), gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(3)], nn.Linear(WIDTH, 2))
    kw = {}
    if bf16:
        model.to(torch.bfloat16)
        kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in model[:3] if not root_only else ():
        fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def _tp_model():
    """Tensor parallel only (no FSDP2): DTensor params whose gradients autograd
    accumulates, each in a storage of its own, so the step counts them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    torch.manual_seed(0)  # in WIDTH features; an even hidden width (TP splits it evenly)
    model = nn.Sequential(nn.Linear(WIDTH, 256), nn.Tanh(), nn.Linear(256, 2))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _backward(model, step: int, micro: int = 0, same_input: bool = False) -> None:
    import torch.distributed as dist

    rank = 0 if same_input else dist.get_rank()  # tensor parallel: one batch for all ranks
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randn(6, WIDTH, generator=g).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()


def _act(action: str, step: int, model, opt, saved) -> None:
    """What the user does between backward and step (from the second step on)."""
    if step == 0:
        return
    p = next(model.parameters())
    if action == "dtensor_grad_write":
        p.grad.mul_(0.5)
    elif action == "local_grad_write":
        p.grad.to_local().mul_(0.5)
    elif action == "load_state":
        opt.load_state_dict(saved)
    elif action == "grad_dropped":  # the step skips it; the others keep their counts
        list(model.parameters())[-1].grad = None
    elif action == "beta1":  # another value each step (two values: fewer recompiles)
        opt.param_groups[0]["betas"] = (0.85 if step % 2 else 0.9, 0.999)


def _run(kw: dict, action: str, count_in_backward: bool) -> tuple[list, list]:
    import sharded_ams.optimizer as optimizer

    threshold = optimizer.COMPILE_MIN_NUMEL
    if action == "threshold":  # above one module's shards, below the group's: the hooks
        optimizer.COMPILE_MIN_NUMEL = 50_000  # must choose the step's (compiled) path
    try:
        return _train(kw, action, count_in_backward)
    finally:
        optimizer.COMPILE_MIN_NUMEL = threshold


def _train(kw: dict, action: str, count_in_backward: bool) -> tuple[list, list]:
    from sharded_ams import AMS

    model = (_tp_model() if action == "tp" else
             _model(root_only=action in ("root_only", "grad_dropped"), bf16=action == "bf16"))
    opt = AMS(model.parameters(), lr=1e-2, count_in_backward=count_in_backward, **kw)
    used, saved = [], None
    for step in range(STEPS):
        if action == "no_sync":  # accumulation: hooks fire on the synced micro-batch only
            model.set_requires_gradient_sync(False)
            _backward(model, step, 1)
            model.set_requires_gradient_sync(True)
        _backward(model, step, same_input=action == "tp")
        _act(action, step, model, opt, saved)
        opt.step()
        used.append(opt._hook_counts.used if count_in_backward else None)
        if action == "second_step":
            # nothing kept past a step: on CUDA the kernels write m without a version bump
            assert not count_in_backward or not opt._hook_counts._entries
            opt.step()
            used.append(opt._hook_counts.used if count_in_backward else None)
        if step == 0:
            saved = _state_at_first_step(opt)
        opt.zero_grad()
    return [p.detach().full_tensor().clone() for p in model.parameters()], used


def _state_at_first_step(opt) -> dict:
    """A state_dict to load later: the state after the first step (not the current one)."""
    import copy

    return copy.deepcopy(opt.state_dict())


def _bursts() -> list[int]:
    """The sizes of the count calls one backward makes: one per ``fully_shard`` module."""
    from sharded_ams import AMS
    from sharded_ams.hook_count import HookCounts

    sizes = []
    orig = HookCounts._count_group

    def spy(self, opt, gi, pairs):
        sizes.append(len(pairs))
        return orig(self, opt, gi, pairs)

    HookCounts._count_group = spy
    try:
        model = _model()
        opt = AMS(model.parameters(), lr=1e-2, lam=0.0, count_in_backward=True)
        _backward(model, 0)
        opt.step()  # creates the state: the first backward counts nothing
        sizes.clear()
        _backward(model, 1)
        return sizes
    finally:
        HookCounts._count_group = orig


def _fsdpams(max_grad_norm: float, count_in_backward: bool) -> tuple[list, list]:
    from launcher.train.fsdp_optim import FSDPAMS

    model = _model()
    opt = FSDPAMS(model, preset="cadam", lr=1e-2, max_grad_norm=max_grad_norm,
                  count_in_backward=count_in_backward)
    used = []
    for step in range(STEPS):
        _backward(model, step)
        opt.step()
        used.append(opt._hook_counts.used if count_in_backward else None)
        opt.zero_grad()
    return [p.detach().full_tensor().clone() for p in model.parameters()], used


def _fsdpams_vs_grads_scaled_first(backend: str) -> bool:
    """``FSDPAMS`` clipping every step (its coefficient read inside the step's kernels,
    the gradients left as they are) against ``AMS`` stepping the same model's gradients
    scaled beforehand by that coefficient: bitwise equal params. ``backend="eager"``: the
    per-tensor path (count and apply per tensor, the counts summed across ranks)."""
    import torch.distributed as dist

    from launcher.train.fsdp_optim import FSDPAMS, global_grad_norm
    from sharded_ams import AMS

    clip, fused = 1e-3, None if backend == "auto" else backend
    a, b = _model(), _model()
    opt = FSDPAMS(a, preset="cadam", lr=1e-2, max_grad_norm=clip, backend=backend)
    ref = AMS(b.parameters(), lr=1e-2, lam=0.0, fused=fused)
    for step in range(STEPS):
        _backward(a, step)
        _backward(b, step)
        norm = global_grad_norm(list(b.parameters()), dist.get_world_size(), torch.device("cpu"))
        coef = clip / (norm + 1e-6)
        assert float(coef) < 1.0
        torch._foreach_mul_([p.grad.to_local() for p in b.parameters()], coef.float())
        opt.step()
        ref.step()
        assert not any(torch.equal(p.grad.to_local(), q.grad.to_local())  # a's: unscaled
                       for p, q in zip(a.parameters(), b.parameters()) if p.grad.numel())
        opt.zero_grad()
        ref.zero_grad()
    return all(torch.equal(p.full_tensor(), q.full_tensor())
               for p, q in zip(a.parameters(), b.parameters()))


def _hooked_by_default() -> int:
    """Params hooked by ``AMS``'s default (None: CUDA params only) on these CPU params."""
    from sharded_ams import AMS

    return len(AMS(_model().parameters(), lam=0.0)._hook_counts.handles)


def _hooks_left_by_a_deleted_optimizer() -> tuple[int, int]:
    """(hooks on the params while the optimizer lives, after it is deleted)."""
    import gc

    from sharded_ams import AMS

    params = list(_model().parameters())
    opt = AMS(params, lam=0.0, count_in_backward=True)

    def hooks() -> int:
        return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in params)

    alive = hooks()
    del opt
    gc.collect()
    return alive, hooks()


def _job() -> dict:
    import sharded_ams.optimizer as optimizer

    optimizer.COMPILE_MIN_NUMEL = 0  # the one compiled call per group, as on big models
    out: dict = {"bursts": _bursts(), "hooked_by_default": _hooked_by_default(),
                 "hooks_after_delete": _hooks_left_by_a_deleted_optimizer()}
    for name, kw in KW.items():
        for action in ACTIONS:
            if name != "cadam" and action not in LAM_ACTIONS:
                continue
            hooked, used = _run(kw, action, True)
            plain, _ = _run(kw, action, False)
            out[(name, action)] = dict(used=used, equal=all(
                torch.equal(a, b) for a, b in zip(hooked, plain)))
    for clip in (1e6, 1e-3):  # never reached / always reached
        hooked, used = _fsdpams(clip, True)
        plain, _ = _fsdpams(clip, False)
        out[("fsdpams", clip)] = dict(used=used, equal=all(
            torch.equal(a, b) for a, b in zip(hooked, plain)))
    out["fsdpams_clip_in_step"] = {b: _fsdpams_vs_grads_scaled_first(b) for b in ("auto", "eager")}
    return out


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_distributed(_job, 2, timeout=300)


N_TENSORS = 8  # 4 Linear layers, weight and bias


def test_the_default_counts_in_backward_on_cuda_only():
    """On CPU the count in backward competes with gloo's transfers for the cores (a slower
    iteration, RESULTS.md): the default hooks no CPU param."""
    for r in _results():
        assert r["hooked_by_default"] == 0


def test_a_deleted_optimizer_takes_its_hooks_with_it():
    for r in _results():
        assert r["hooks_after_delete"] == (N_TENSORS, 0), r["hooks_after_delete"]


def test_one_count_call_per_fully_shard_module():
    """FSDP2 calls the hooks of one module's params back to back: one count each."""
    for r in _results():
        assert r["bursts"] == [2, 2, 2, 2], r["bursts"]


@pytest.mark.parametrize("name, action", [
    (name, action) for name in KW
    for action in ("none", "no_sync", "root_only", "bf16", "threshold")
    if name == "cadam" or action in LAM_ACTIONS])
def test_counts_from_backward_are_used_and_bitwise_equal(name, action):
    for r in _results():
        got = r[(name, action)]
        assert got["equal"], (name, action)
        # the first step creates m: nothing to count in the first backward
        assert got["used"] == [0] + [N_TENSORS] * (STEPS - 1), got["used"]


@pytest.mark.parametrize("action", ["dtensor_grad_write", "local_grad_write", "load_state",
                                    "beta1"])
def test_a_change_after_backward_makes_the_step_count_again(action):
    for r in _results():
        got = r[("cadam", action)]
        assert got["equal"], action
        # the written gradient is the first param's (the first layer's group counts again)
        assert all(u < N_TENSORS for u in got["used"][1:]), got["used"]


def test_a_param_left_without_a_gradient_leaves_the_others_counts():
    for r in _results():
        got = r[("cadam", "grad_dropped")]
        assert got["equal"]
        assert got["used"] == [0] + [N_TENSORS - 1] * (STEPS - 1), got["used"]


def test_tensor_parallel_gradients_of_their_own_are_counted_in_the_step():
    for r in _results():
        got = r[("cadam", "tp")]
        assert got["equal"] and got["used"] == [0] * STEPS, got["used"]


def test_a_second_step_on_the_same_gradients_counts_again():
    for r in _results():
        got = r[("cadam", "second_step")]
        assert got["equal"]
        assert got["used"] == [0, 0] + [N_TENSORS, 0] * (STEPS - 1), got["used"]


def test_fsdpams_keeps_the_counts_unless_it_clips():
    for r in _results():
        never, always = r[("fsdpams", 1e6)], r[("fsdpams", 1e-3)]
        assert never["equal"] and always["equal"]
        assert never["used"] == [0] + [N_TENSORS] * (STEPS - 1), never["used"]
        assert always["used"] == [0] * STEPS, always["used"]


def test_fsdpams_clips_inside_the_step_as_on_gradients_scaled_first():
    for r in _results():
        assert r["fsdpams_clip_in_step"] == {"auto": True, "eager": True}


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("a backward that raises")


def test_a_step_clears_what_a_backward_that_raised_left_pending():
    """A backward that raises never runs its end-of-backward callbacks: without the step's
    clear(), no later backward would queue one again (its last FSDP2 group left to the
    step for good). FSDP2 itself needs a fresh start after such a backward, so this is
    checked on the bookkeeping alone (one process, no FSDP2)."""
    from sharded_ams import AMS

    w = nn.Parameter(torch.ones(3))
    hc = AMS([w], lam=0.0, count_in_backward=True)._hook_counts
    w.register_post_accumulate_grad_hook(lambda _: hc._queue_end_of_backward())
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="a backward that raises"):
        (_Boom.apply(x) * w).sum().backward()
    assert hc._end_queued  # the callback was queued and never ran
    hc.clear()
    assert not hc._end_queued and not hc._burst
