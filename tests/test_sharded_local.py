"""ShardedAMS in one process, without spawned jobs: no host read and no CUDA sync in
``step()``, padding and kernel alignment, the skip flag as an exact no-op (eager and
Triton interpreted, with the clip coefficient), sparse gradients refused, bf16 moment
storage, argument validation. Split from tests/test_sharded.py, whose tests share the
spawned proof jobs (the oracle comparisons at world sizes 1-4).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharded_ams.backward_count as backward_count
import sharded_ams.shard_step as shard_step_mod
from sharded_ams import ShardedAMS
from sharded_ams.layout import KERNEL_MULTIPLE

from sharded_common import GradRecorder, compare_params, replay, snapshot, trainable


def _tiny():
    return nn.Linear(3, 2)


#: Tensor methods that read a value back to the host (a device sync on CUDA)
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _HostReads:
    """Counts calls of HOST_READS on any tensor while active (monkeypatched on torch.Tensor)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.active = False
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return orig(t, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(preset="grams", max_grad_norm=0.05),
                                dict(lam=-0.5, beta3=0.5, weight_decay=0.1, max_grad_norm=1e9)])
def test_step_reads_nothing_back_to_the_host(monkeypatch, kw, dtype):
    """step() decides clipping and the non-finite skip on the device: no .item(), float(),
    bool() ... of a tensor anywhere on its path (each is a host sync on CUDA), including
    a skipped step; last_step and skipped_steps resolve when read, and are right. Run as
    on CUDA: on CPU a clipped C-Adam step reads whether its clip coefficient is 1 (free
    there; ``backward_count.HOST_READ_FREE``)."""
    monkeypatch.setattr(backward_count, "HOST_READ_FREE", frozenset())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    opt = ShardedAMS(model, lr=1e-2, backend="eager", **kw)
    reads = _HostReads(monkeypatch)
    x = torch.randn(6, 8, dtype=dtype)
    for t in range(4):
        loss = model(x).float().square().mean() * (float("inf") if t == 2 else 1.0)
        loss.backward()
        reads.active = True
        opt.step()
        opt.zero_grad()
        reads.active = False
        assert reads.calls == [], reads.calls
        assert opt.last_step.skipped == (t == 2)
        norm = opt.last_step.grad_norm
        assert (t == 2) != math.isfinite(norm)
    assert opt.skipped_steps == 1
    assert [int(g["step"]) for g in opt.param_groups] == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_makes_no_cuda_sync():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).cuda()
    opt = ShardedAMS(model, preset="grams", lr=1e-2, max_grad_norm=1.0)
    x = torch.randn(16, 64, device="cuda")
    for _ in range(3):  # warm up (compiles, allocations)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_padding_stays_zero_and_kernel_runs_are_aligned(monkeypatch):
    """Every range handed to the step kernel has a length that is a multiple of 16; the
    padding it covers stays exactly zero in every buffer and state (weight decay, the
    per-tensor count pass and bf16 masters included), and the result is bitwise AMS's
    (so the padding was not counted in the per-tensor step scale)."""
    lengths = []
    real = shard_step_mod._ranges  # the (p, g, m, v, s, out) ranges of each kernel call

    def spy(sh, run):
        ranges = real(sh, run)
        lengths.append(ranges[0].numel())
        return ranges

    monkeypatch.setattr(shard_step_mod, "_ranges", spy)
    kw = dict(lam=-0.5, beta3=0.5, lr=1e-2, weight_decay=0.5)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
        ref = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
        ref.load_state_dict(model.state_dict())
        opt = ShardedAMS(model, backend="eager", grad_reduce_dtype=dtype, **kw)
        rec = GradRecorder(trainable(model))
        grads = []
        for _ in range(6):
            x = torch.randn(4, 7, dtype=dtype)
            model(x).float().square().mean().backward()
            opt.step()
            grads.append(rec.pop())
            opt.zero_grad()
        replay(ref, dict(ref.named_parameters()), grads, **kw)
        assert compare_params(snapshot(ref), snapshot(model))["equal"]
        sh = opt.shards[0]
        used = torch.zeros(sh.layout.numel, dtype=torch.bool)
        for slot in sh.layout.slots:
            used[slot.start:slot.end] = True
        assert (~used).sum() > 0
        assert not sh.buf.param[~used].any() and not sh.buf.grad[~used].any()
        for key, t in sh.state.items():
            assert not t[~used].any(), key  # world size 1: local == buffer index space
    assert lengths and all(n % KERNEL_MULTIPLE == 0 for n in lengths), lengths


def skip_flag_failures(backend: str) -> list[str]:
    """``flat_step(..., skip=...)`` on ``backend``: skip=True writes nothing (p, m, v, s and
    the bf16 copy bitwise unchanged), skip=False equals no flag, in the one-pass (lam=-1)
    and the two-pass (lam=-0.5, per-tensor counts) cases. And the clip coefficient folded
    into the kernels: ``coef=c`` equals the step on gradients scaled by c beforehand, bit
    for bit (what ShardedAMS did before: an in-place ``mul_`` pass), with and without skip.
    Returns what failed."""
    from sharded_ams.kernels import GroupHParams, Piece, flat_step

    failures = []
    n = 300
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=gen) * s for s in (1.0, 0.1, 0.1, 0.01, 0.1)]
    base[3] = base[3].abs()  # v >= 0
    for lam, beta3 in ((-1.0, 0.0), (-0.5, 0.5)):
        hp = GroupHParams(0.9, 0.999, beta3, lam, 1e-8, 0.1)
        results = {}
        coef = torch.tensor(0.37)
        for flag in (None, False, True, "coef", "prescaled", "coef+skip"):
            p, g, m, v, s_ = (t.clone() for t in base)
            if flag == "prescaled":
                g.mul_(coef)
            out = p.to(torch.bfloat16)
            flat_step(p, g, m, v, s_ if beta3 else None, out, lr=1e-2,
                      step=torch.tensor(3.0), hp=hp, backend=backend,
                      pieces=(Piece(0, 170, 0, 170), Piece(170, n, 1, 200)), num_tensors=2,
                      skip=None if flag in (None, "coef", "prescaled") else torch.tensor(
                          flag is True or flag == "coef+skip"),
                      coef=coef if flag in ("coef", "coef+skip") else None)
            results[flag] = (p, m, v, s_, out)
        before = (base[0], base[2], base[3], base[4], base[0].to(torch.bfloat16))
        for what, got, ref in (("skip=True changed", results[True], before),
                               ("skip=False differs from no flag", results[False], results[None]),
                               ("coef differs from prescaled g", results["coef"],
                                results["prescaled"]),
                               ("coef with skip=True changed", results["coef+skip"], before)):
            if not all(torch.equal(a, b) for a, b in zip(got, ref)):
                failures.append(f"{backend} lam={lam}: {what}")
        for key in (None, "coef"):
            if all(torch.equal(a, b) for a, b in zip(results[key], before)):
                failures.append(f"{backend} lam={lam}: the step ({key}) moved nothing")
        if torch.equal(results["coef"][1], results[None][1]):
            failures.append(f"{backend} lam={lam}: the coefficient changed nothing")
    return failures


def test_skip_flag_is_an_exact_no_op_eager():
    assert skip_flag_failures("eager") == []


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_skip_flag_is_an_exact_no_op_triton_interpreted():
    root = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']; "
            "import test_sharded_local as t; print('FAILURES', t.skip_flag_failures('triton'))")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FAILURES []" in proc.stdout, proc.stdout[-2000:]


def test_sparse_gradients_refused_naming_the_param():
    """As AMS: sparse gradients are an error naming the param, never densified silently:
    an Embedding(sparse=True) at construction, a sparse gradient arriving in backward, a
    sparse ``p.grad`` assigned by hand at step()."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"sparse gradients.*'0.weight'"):
        ShardedAMS(model)
    emb = nn.Parameter(torch.randn(10, 4))
    opt = ShardedAMS([emb], lr=1e-2, backend="eager")
    with pytest.raises(RuntimeError, match=r"sparse gradients.*'group0.param0'"):
        F.embedding(torch.tensor([1, 2]), emb, sparse=True).sum().backward()
    for overlap in (True, False):
        w = nn.Parameter(torch.randn(3))
        opt = ShardedAMS([w], backend="eager", overlap=overlap)
        w.grad = torch.ones(3).to_sparse()
        with pytest.raises(RuntimeError, match=r"sparse gradients.*'group0.param0'"):
            opt.step()


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
    (dict(bucket_numel="big"), "Invalid bucket_numel"),
    (dict(grad_reduce_dtype=torch.int8), "Invalid grad_reduce_dtype"),
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


def test_duplicate_param_and_grad_reduce_dtype_mismatch():
    model = _tiny()
    with pytest.raises(ValueError, match="appears twice"), \
            pytest.warns(UserWarning, match="duplicate parameters"):  # torch only warns
        ShardedAMS([{"params": [model.weight, model.weight]}])
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        ShardedAMS(_tiny().to(torch.bfloat16), grad_reduce_dtype=torch.float16, backend="eager")


def test_launcher_passes_grad_reduce_dtype():
    from launcher.config import OptimConfig

    assert "grad_reduce_dtype" not in OptimConfig().optimizer_kwargs()  # fp32: the default
    kw = OptimConfig(grad_reduce_dtype="bf16").optimizer_kwargs()
    assert kw["grad_reduce_dtype"] is torch.bfloat16
    model = nn.Linear(3, 2).to(torch.bfloat16)
    assert ShardedAMS(model, **{**kw, "backend": "eager"}).shards[0].buf.grad.dtype == torch.bfloat16
