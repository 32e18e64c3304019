"""The CUDA path on a real GPU: the Triton kernel, its scalars, CUDA graphs, NCCL.

Skipped without CUDA (CI has none); ``benchmarks/gpu_check.py`` runs this file on a GPU
machine (``pytest -m gpu -o addopts=-ra tests/test_gpu.py``: no pytest-xdist needed). Data
is fresh random every run (the seed is printed on failure).

* The kernel against the eager ops on the same GPU, bit for bit (it is launched without
  fma contraction and follows ``update.py``'s order of operations), and against the
  float64 reference, at lengths that are multiples of 16 (every block takes the
  unmasked vector path) and not, in one pass and in two passes over a multi-piece run.
* Python scalars and device scalars give the same bits; a device step count (the path
  ``ShardedAMS`` takes) costs at most 3 kernel launches per one-pass ``flat_step``.
* A CUDA graph captures the step (device lr and step: the replay follows the step
  count; Python scalars: capture succeeds, so nothing copies from the host).
* bf16 moment storage rounds to nearest even.
* ``ShardedAMS`` on NCCL at world size 1 equals an unsharded ``AMS`` fed the same grads.
* The launch follows the tensors' device, not the current one (needs two GPUs).
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from sharded_ams import AMS, ShardedAMS
from sharded_ams.kernels import GroupHParams, Piece, flat_step, triton_available
from sharded_ams.update import reference_init, reference_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                                 reason="needs CUDA and triton")]

HP = {"grams": GroupHParams(0.9, 0.999, 0.0, -1.0, 1e-8, 0.1),
      "lam-0.5_beta3-0.9": GroupHParams(0.95, 0.999, 0.9, -0.5, 1e-8, 0.1)}  # beta1 != beta3


def _layout(n: int):
    """Four tensors in one run: tensor 1 split in two pieces, 64-element padding."""
    sizes = [1000, n // 3, n // 3 + 5, n - 2 * (n // 3) - 1200]
    pieces, spans, pos = [], [], 0
    for i, size in enumerate(sizes):
        pos = -(-pos // 64) * 64
        if i == 1:
            pieces += [Piece(pos, pos + size // 2, i, size), Piece(pos + size // 2, pos + size, i, size)]
        else:
            pieces.append(Piece(pos, pos + size, i, size))
        spans.append((pos, pos + size))
        pos += size
    return pos, tuple(pieces), spans


def _state(n, seed, with_s, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(seed)
    g = torch.randn(n, device=dev, generator=gen)
    g[torch.rand(n, device=dev, generator=gen) < 0.05] = 0.0  # exact zeros: ties
    return dict(p=torch.randn(n, device=dev, generator=gen), g=g,
                m=torch.randn(n, device=dev, generator=gen) * 0.1,
                v=torch.rand(n, device=dev, generator=gen) * 0.01,
                s=torch.randn(n, device=dev, generator=gen) * 0.1 if with_s else None)


def _clone(st):
    return {k: (v.clone() if v is not None else None) for k, v in st.items()}


def _step(st, backend, hp, pieces=(), num=0, lr=1e-3, step=7, out=None):
    flat_step(st["p"], st["g"], st["m"], st["v"], st["s"], out, lr=lr, step=step, hp=hp,
              pieces=pieces, num_tensors=num, backend=backend)


def _reference(st0, hp, spans, step=7, lr=1e-3):
    """float64: a state that has seen step-1 steps is stepped once more, per tensor."""
    p = st0["p"].double().clone()
    out = {}
    for i, (a, b) in enumerate(spans):
        ref = reference_init(st0["p"][a:b], hp.beta3)
        ref.m, ref.v = st0["m"][a:b].double(), st0["v"][a:b].double()
        ref.s = st0["s"][a:b].double() if st0["s"] is not None else None
        ref.step = step - 1
        ref = reference_step(ref, st0["g"][a:b], lr=lr, beta1=hp.beta1, beta2=hp.beta2,
                             beta3=hp.beta3, lam=hp.lam, eps=hp.eps, weight_decay=hp.weight_decay)
        p[a:b] = ref.p
        out[i] = ref
    return p, out


def _dev(x: float) -> torch.Tensor:
    return torch.full((), x, dtype=torch.float64, device="cuda")


def _rel(x, ref) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("case", list(HP))
@pytest.mark.parametrize("n", [2 ** 24, 2 ** 24 + 7, 50_000_017])
def test_kernel_equals_eager_bitwise_and_the_reference(n, case):
    seed = torch.seed()
    hp = HP[case]
    if hp.lam == -1.0:
        pieces, num, spans = (), 0, [(0, n)]
    else:
        n, pieces, spans = _layout(n)
        num = len(spans)
    base = _state(n, seed % 2 ** 31, hp.beta3 > 0)
    tri, eag = _clone(base), _clone(base)
    out_t = torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    out_e = torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    _step(tri, "triton", hp, pieces, num, out=out_t)
    _step(eag, "eager", hp, pieces, num, out=out_e)
    torch.cuda.synchronize()
    for k in ("p", "m", "v", "s"):
        if tri[k] is not None:
            diff = int((tri[k] != eag[k]).sum())
            assert diff == 0, f"{k}: {diff} of {n} elements differ from eager (seed {seed})"
    assert torch.equal(out_t, out_e) and torch.equal(out_t, tri["p"].to(torch.bfloat16))
    ref_p, refs = _reference(base, hp, spans)
    inside = torch.zeros(n, dtype=torch.bool, device="cuda")
    for a, b in spans:
        inside[a:b] = True
    assert _rel(tri["p"][inside], ref_p[inside]) < 1e-6, seed
    for i, (a, b) in enumerate(spans):
        assert _rel(tri["m"][a:b], refs[i].m) < 1e-6 and _rel(tri["v"][a:b], refs[i].v) < 1e-6
        if refs[i].s is not None:
            assert _rel(tri["s"][a:b], refs[i].s) < 1e-6


@pytest.mark.parametrize("case", list(HP))
def test_python_and_device_scalars_give_the_same_bits(case):
    hp = HP[case]
    n, pieces, spans = _layout(1 << 20)
    a = _state(n, 3, hp.beta3 > 0)
    b = _clone(a)
    _step(a, "triton", hp, pieces, len(spans), lr=1e-3, step=9)
    # float64 device scalars: the same values the host computes with
    _step(b, "triton", hp, pieces, len(spans), lr=_dev(1e-3), step=_dev(9.0))
    for k in ("p", "m", "v", "s"):
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("lr", [1e-3, "device"])
def test_device_step_is_at_most_three_launches(lr):
    """Issue 21: a one-pass ``flat_step`` with the step count on the device launches the
    scalars kernel (``kernels/scalars.py``) and the step kernel: at most 3 GPU kernels (a
    memset or copy counts as one), counted by the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile

    hp = HP["grams"]
    st = _state(1 << 20, 13, False)
    lr_arg, step = (_dev(1e-3) if lr == "device" else lr), _dev(4.0)
    _step(st, "triton", hp, lr=lr_arg, step=step)  # compile both
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(st, "triton", hp, lr=lr_arg, step=step)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 3, kernels


@pytest.mark.parametrize("case", list(HP))
def test_cuda_graph_captures_the_step(case):
    hp = HP[case]
    n, pieces, spans = _layout(1 << 20)
    num = len(spans) if hp.lam != -1.0 else 0
    pieces = pieces if num else ()
    graphed = _state(n, 5, hp.beta3 > 0)
    eager = _clone(graphed)
    lr, step = _dev(1e-3), _dev(1.0)
    _step(graphed, "triton", hp, pieces, num, lr=lr, step=step)  # compile, build the tables
    _step(eager, "triton", hp, pieces, num, lr=1e-3, step=1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.add_(1.0)
        _step(graphed, "triton", hp, pieces, num, lr=lr, step=step)
    for t in range(2, 7):
        graph.replay()
        _step(eager, "triton", hp, pieces, num, lr=1e-3, step=t)
    torch.cuda.synchronize()
    for k in ("p", "m", "v", "s"):
        if eager[k] is not None:
            assert torch.equal(graphed[k], eager[k]), k
    # Python scalars: capture works (a host-to-device copy inside would raise)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        _step(graphed, "triton", hp, pieces, num, lr=1e-3, step=7)


def test_bf16_moments_round_to_nearest_even():
    hp = HP["lam-0.5_beta3-0.9"]
    n, pieces, spans = _layout(1 << 22)
    st = _state(n, 8, True)
    for k in ("m", "v", "s"):
        st[k] = st[k].to(torch.bfloat16)
    prev = {k: st[k].float() for k in ("m", "v", "s")}
    g = st["g"]
    _step(st, "triton", hp, pieces, len(spans), step=3)
    exact = {"m": prev["m"] * 0.95 + g * (1 - 0.95), "v": prev["v"] * 0.999 + g * g * (1 - 0.999),
             "s": prev["s"] * 0.9 + g * (1 - 0.9)}
    for k, x in exact.items():
        assert torch.equal(st[k], x.to(torch.bfloat16)), k
        rtz = x.view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32).to(torch.bfloat16)
        assert (rtz != st[k]).any(), "the check cannot tell rounding from truncation"


@pytest.mark.parametrize("kw", [dict(lam=-1.0), dict(lam=0.0, weight_decay=0.1),
                                dict(lam=-0.5, beta3=0.9)])
def test_default_one_launch_per_group_equals_a_launch_per_tensor(kw):
    """AMS's CUDA default (``kernels/triton_multi.py``: the group's tensors in one launch,
    bf16 params with fp32 masters in a second) is bit for bit ``fused="triton"`` (a launch
    per tensor), over 5 steps, every other one with a clip coefficient read in the kernels
    (``FSDPAMS``'s clipping); the default launches the multi-tensor kernel once per dtype
    signature and pass, and the per-tensor kernel never."""
    import sharded_ams.kernels.triton_kernel as tk
    import sharded_ams.kernels.triton_multi as tm

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 1000), (1000,), (1,), (3, 1025), (0, 7), (777, 513)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32,
              torch.bfloat16]
    runs = [[torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).to(d))
             for s, d in zip(shapes, dtypes)] for _ in range(2)]
    for p, q in zip(*runs):
        q.data.copy_(p.data)
    opts = [AMS(runs[0], lr=1e-3, **kw), AMS(runs[1], lr=1e-3, fused="triton", **kw)]
    launches = {"multi": 0, "single": 0}
    multi_kernel, single_kernel = tm._ams_multi_kernel, tk._ams_kernel

    class Count:
        def __init__(self, kernel, what):
            self.kernel, self.what = kernel, what

        def __getitem__(self, grid):
            launches[self.what] += 1
            return self.kernel[grid]

    for step in range(5):
        grads = [torch.randn(s, device="cuda", generator=gen).to(d) for s, d in zip(shapes, dtypes)]
        for ps in runs:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        coef = torch.tensor(0.37, device="cuda") if step % 2 else None
        tm._ams_multi_kernel, tk._ams_kernel = Count(multi_kernel, "multi"), Count(single_kernel, "single")
        try:
            opts[0]._step_scaled(coef)
        finally:
            tm._ams_multi_kernel, tk._ams_kernel = multi_kernel, single_kernel
        opts[1]._step_scaled(coef)
        passes = 1 if abs(kw["lam"]) == 1 else 2
        assert launches == {"multi": 2 * passes, "single": 0}, launches
        launches.update(multi=0, single=0)
        for a, b in zip(*runs):
            assert torch.equal(a, b), (step, a.shape)
            for k in opts[0].state[a]:
                if k != "step":
                    assert torch.equal(opts[0].state[a][k], opts[1].state[b][k]), (step, k)


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
@pytest.mark.parametrize("kw", [dict(preset="grams"), dict(lam=-0.5, beta3=0.9, betas=(0.95, 0.999))])
def test_sharded_ams_on_nccl_world_size_1(kw):
    import torch.distributed as dist

    from launcher.train.models.gpt import GPT, GPTConfig

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_embd=128)).cuda()
            ref = copy.deepcopy(model)
            opt = ShardedAMS(model, lr=1e-3, weight_decay=0.1, **kw)
            assert opt.backend == "triton"
            ref_kw = {"lam": -1.0, "beta3": 0.0} if kw.get("preset") else dict(kw)
            ref_opt = AMS(ref.parameters(), lr=1e-3, weight_decay=0.1, fused="eager", **ref_kw)
            for _ in range(10):
                x = torch.randint(256, (8, 64), device="cuda")
                model(x, torch.roll(x, -1, 1))[1].backward()
                for p, q in zip(model.parameters(), ref.parameters()):
                    q.grad = p.grad.detach().clone()
                opt.step()
                ref_opt.step()
                opt.zero_grad()
                ref.zero_grad()
            opt.finish_param_sync()
            for p, q in zip(model.parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach().double()) < 1e-5
        finally:
            dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_follows_the_tensors_device():
    hp = HP["grams"]
    with torch.cuda.device(0):
        st = _state(1 << 20, 4, False, dev="cuda:1")
        ref = {k: (v.cpu() if v is not None else None) for k, v in st.items()}
        _step(st, "triton", hp)
        _step(ref, "eager", hp)
    torch.cuda.synchronize(1)
    assert torch.allclose(st["p"].cpu(), ref["p"], rtol=1e-6, atol=1e-7)


def test_training_batches_copy_from_pinned_memory_without_blocking():
    """The training loop's batch copy (``launcher.train.step.device_batch``) returns while
    the stream is still busy: a copy from pageable memory would have waited for it."""
    from launcher.train.step import device_batch

    x = torch.randint(50_000, (8, 512))
    y = torch.roll(x, -1, 1)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time queued ahead of the copy
    bx, by = device_batch(x, y, torch.device("cuda"))
    assert not torch.cuda.current_stream().query()  # the host did not wait
    assert bx.is_cuda and torch.equal(bx.cpu(), x) and torch.equal(by.cpu(), y)
