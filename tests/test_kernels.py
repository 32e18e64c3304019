"""The step driver (``sharded_ams.kernels``) and its tables, without a GPU.

* Piece tables: exact per-tensor counts by prefix sums (against brute force), chunks that
  cover every element once on 16-element-aligned bases, bad pieces refused.
* One count pass and one apply pass per run (lam not in {1, -1}), one pass otherwise,
  counted for the eager and compiled backends (Triton's launches are counted in
  ``test_triton_interpret.py``).
* The device path makes no host-to-device copy and no host sync per step: run on
  ``meta`` tensors standing in for the accelerator (shapes and a device, no data; a CPU
  build cannot fake CUDA's ``copy_``), with every dispatched op logged. Covered:
  ``flat_step`` (eager, and Triton with the launch recorded instead of run), the
  ``_foreach`` path and ``AMS(fused=...)``, with Python and device scalars.
* The default path per device, and the Triton launch options (no fma contraction).
"""

from __future__ import annotations

import contextlib
import importlib.util
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sharded_ams import AMS, Grams, ShardedAMS
from sharded_ams import optimizer as optimizer_mod
from sharded_ams.kernels import GroupHParams, Piece, flat_step
from sharded_ams.kernels.eager import CompiledOps, EagerOps, compile_available
from sharded_ams.kernels.tables import ALIGN, run_table, segment_sums

needs_compile = pytest.mark.skipif(not compile_available(), reason="torch.compile unavailable here")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")

HP_GRAMS = GroupHParams(0.9, 0.999, 0.0, -1.0, 1e-8, 0.1)
HP_AMS = GroupHParams(0.9, 0.999, 0.9, -0.5, 1e-8, 0.1)
#: tensor 1 split in two pieces, a gap of padding at [70, 100)
PIECES = (Piece(0, 5, 0, 5), Piece(5, 40, 1, 60), Piece(40, 70, 1, 60), Piece(100, 130, 2, 30))
N = 130


def _random_segments(rng: random.Random, n: int, k: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(n + 1), min(2 * k, n + 1)))
    return [(a, b) for a, b in zip(cuts[::2], cuts[1::2])]


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200, 64 * 7])
def test_segment_sums_match_brute_force(n):
    rng = random.Random(n)
    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    segs = _random_segments(rng, n, 6) + [(0, n), (n, n)]
    starts = torch.tensor([a for a, _ in segs], dtype=torch.int64)
    ends = torch.tensor([b for _, b in segs], dtype=torch.int64)
    got = segment_sums(flags, starts, ends)
    want = torch.tensor([int(flags[a:b].sum()) for a, b in segs], dtype=torch.int64)
    assert torch.equal(got, want), (segs, got, want)


def test_run_table_chunks_cover_every_element_once():
    table = run_table(PIECES, N, 3, torch.device("cpu"))
    base, lo, hi, idx = table.chunks(16)
    owner = torch.full((N,), -1, dtype=torch.int64)
    for b, a, e, i in zip(base.tolist(), lo.tolist(), hi.tolist(), idx.tolist()):
        assert b % ALIGN == 0 and b <= a < e <= b + 16, (b, a, e)
        assert (owner[a:e] == -1).all(), "an element in two chunks"
        owner[a:e] = i
    assert torch.equal(owner, table.element_tensor().long())
    assert owner[70:100].eq(3).all() and owner[5:70].eq(1).all()
    assert table.numels.tolist() == [5, 60, 30, 0]
    assert table.single is None
    one = run_table((Piece(0, 9, 0, 9),), 9, 1, torch.device("cpu"))
    assert one.single == Piece(0, 9, 0, 9)


@pytest.mark.parametrize("pieces,n,num,match", [
    ((Piece(0, 10, 0, 10), Piece(5, 12, 1, 7)), 12, 2, "overlap"),
    ((Piece(0, 13, 0, 13),), 12, 1, "Invalid piece"),
    ((Piece(0, 4, 2, 4),), 12, 2, "Invalid piece"),
    ((Piece(0, 8, 0, 4),), 12, 1, "Invalid piece"),
])
def test_run_table_rejects_bad_pieces(pieces, n, num, match):
    with pytest.raises(ValueError, match=match):
        run_table(pieces, n, num, torch.device("cpu"))


def _run_state(n=N, seed=0, with_s=True):
    gen = torch.Generator().manual_seed(seed)
    st = [torch.randn(n, generator=gen) for _ in range(3)] + [torch.rand(n, generator=gen)]
    st.append(torch.randn(n, generator=gen) * 0.1 if with_s else None)
    return st  # p, g, m, v, s


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=needs_compile)])
def test_one_count_and_one_apply_per_run(backend, monkeypatch):
    ops = {"eager": EagerOps, "compiled": CompiledOps}[backend]
    calls = []
    for name in ("fused_step", "count_run", "apply_run"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, (lambda real, name: lambda *a, **k: (
            calls.append(name), real(*a, **k))[1])(real, name))
    p, g, m, v, s = _run_state()
    counts = []
    flat_step(p, g, m, v, s, None, lr=1e-2, step=2, hp=HP_AMS, pieces=PIECES, num_tensors=3,
              backend=backend, count_reduce=lambda c: counts.append(c.clone()))
    assert calls == ["count_run", "apply_run"]
    # the per-tensor counts are exact: u*s < 0 <=> sign(m) != sign(s), both nonzero
    neg = (torch.sign(m) * torch.sign(s)) < 0
    want = [int(neg[0:5].sum()), int(neg[5:70].sum()), int(neg[100:130].sum())]
    assert counts[0].tolist() == want and sum(want) > 0
    calls.clear()
    flat_step(p, g, m, v, None, None, lr=1e-2, step=3, hp=HP_GRAMS, backend=backend)
    assert calls == ["fused_step"]


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=needs_compile)])
@pytest.mark.parametrize("hp", [HP_AMS, GroupHParams(0.9, 0.999, 0.0, 0.0, 1e-8, 0.1)],
                         ids=["lam-0.5_beta3", "cadam"])
def test_a_run_stepped_as_a_list_of_segments_equals_the_per_element_tables(backend, hp,
                                                                           monkeypatch):
    """Runs whose pieces are long go as a list of their pieces (and gaps) through one call
    per pass, short ones through per-element tables (``eager.SEGMENT_LOOP_MIN_AVG``): the
    same counts and the same bits either way, with a skip flag and a clip coefficient.
    (Fails with the counts added to the wrong slots, the gaps left unstepped, the step
    sizes not gathered per segment, or the clip coefficient left out of the count.)"""
    import sharded_ams.kernels.eager as eager_mod

    out = {}
    for name, threshold in (("tables", 1 << 40), ("segments", 0)):
        monkeypatch.setattr(eager_mod, "SEGMENT_LOOP_MIN_AVG", threshold)
        p, g, m, v, s = _run_state(seed=3)
        counts = []
        for step in (1, 2):
            flat_step(p, g, m, v, s, None, lr=1e-2, step=step, hp=hp, pieces=PIECES,
                      num_tensors=3, backend=backend, skip=torch.tensor(False),
                      coef=torch.tensor(0.5), count_reduce=lambda c: counts.append(c.clone()))
        out[name] = (p, m, v, s, torch.stack(counts))
    for a, b in zip(*out.values()):
        assert torch.equal(a, b)


# --- the device path on meta tensors: no host-to-device copy, no sync --------------------

DEV = "meta"  # the stand-in accelerator


class _TransferLog(TorchDispatchMode):
    """Records host-to-device copies and host syncs (reads of a device value): copies
    and syncs as dispatched ops, and ``torch.tensor``/``as_tensor`` with host data for the
    device (its copy happens below the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)

            def spy(data, *a, _real=real, _name=name, **kw):
                out = _real(data, *a, **kw)
                if out.device.type == DEV and not (isinstance(data, torch.Tensor)
                                                   and data.device.type == DEV):
                    self.events.append(f"host-to-device: torch.{_name}")
                return out

            self._patch.setattr(torch, name, spy)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name.startswith("_local_scalar_dense") or name.startswith("is_nonzero"):
            if any(t.device.type == DEV for t in tensors):
                self.events.append(f"sync: {name}")
        if name.startswith("_to_copy") and tensors and tensors[0].device.type == "cpu" \
                and str(kwargs.get("device", "cpu")).startswith(DEV):
            self.events.append(f"host-to-device: {name} {tuple(tensors[0].shape)}")
        if name.startswith("copy_") and len(tensors) == 2 and tensors[0].device.type == DEV \
                and tensors[1].device.type == "cpu" and tensors[1].dim() > 0:
            self.events.append(f"host-to-device: copy_ {tuple(tensors[1].shape)}")
        return func(*args, **kwargs)


@pytest.fixture
def fresh_tables():
    """Tables are cached per layout and device: start and end without any."""
    run_table.cache_clear()
    yield
    run_table.cache_clear()


class _LaunchRecorder:
    """Stands in for the Triton kernel on meta tensors: records each launch's mode."""

    def __init__(self):
        self.modes: list[int] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.modes.append(kw["MODE"])


@pytest.fixture
def fake_triton(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    import sharded_ams.kernels.triton_kernel as tk

    rec = _LaunchRecorder()
    monkeypatch.setattr(tk, "_ams_kernel", rec)
    monkeypatch.setattr(tk, "_device_guard", lambda t: contextlib.nullcontext())
    return rec


def _device_state(with_s):
    st = [torch.randn(N, device=DEV) for _ in range(4)]
    st.append(torch.randn(N, device=DEV) if with_s else None)
    return st


@pytest.mark.usefixtures("fresh_tables")
@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("scalars", ["python", "device"])
def test_flat_step_device_path_has_no_copy_or_sync(backend, scalars, request):
    rec = request.getfixturevalue("fake_triton") if backend == "triton" else None
    p, g, m, v, s = _device_state(with_s=True)
    out = torch.empty(N, device=DEV, dtype=torch.bfloat16)
    if scalars == "python":
        lr, step = 1e-2, 5
    else:
        lr, step = torch.full((), 1e-2, device=DEV), torch.full((), 5.0, device=DEV)
    for hp, pieces, warm in ((HP_GRAMS, (), False), (HP_AMS, PIECES, True)):
        kw = dict(lr=lr, step=step, hp=hp, pieces=pieces, num_tensors=3, backend=backend)
        if warm:  # the piece table is built (and copied) once per layout
            with _TransferLog() as log:
                flat_step(p, g, m, v, s, out, **kw)
            assert log.events, "the first use of a layout copies its table: the log sees it"
        if rec is not None:
            rec.modes.clear()
        with _TransferLog() as log:
            flat_step(p, g, m, v, s, out, **kw)
            flat_step(p, g, m, v, s, out, **kw)
        assert log.events == [], (hp, log.events)
        if rec is not None:  # 1 launch per step with |lam| = 1, count + apply otherwise
            assert rec.modes == ([0, 0] if hp.lam == -1.0 else [3, 4, 3, 4]), rec.modes


@pytest.mark.usefixtures("fresh_tables")
@pytest.mark.parametrize("kw", [dict(foreach=True), dict(fused="eager"),
                                pytest.param(dict(fused="triton"), marks=needs_triton)])
@pytest.mark.parametrize("lam", [-1.0, 0.0])
@pytest.mark.parametrize("lr", [1e-2, "cpu tensor"])
def test_ams_device_step_has_no_copy_or_sync(kw, lam, lr, request, monkeypatch):
    """The old fused path copied the CPU step to the device per param (two syncs each);
    a CPU tensor lr is read on the host too."""
    rec = request.getfixturevalue("fake_triton") if kw.get("fused") == "triton" else None
    if rec is not None:  # fused="triton" on a non-CUDA device needs the interpreter flag
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = [torch.nn.Parameter(torch.randn(sh, device=DEV)) for sh in ((7, 3), (11,))]
    params.append(torch.nn.Parameter(torch.randn(5, device=DEV, dtype=torch.bfloat16)))
    opt = AMS(params, lr=torch.tensor(1e-2) if lr == "cpu tensor" else lr, lam=lam, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state creation and, with lam = 0, the single-piece tables
    if rec is not None:
        rec.modes.clear()
    with _TransferLog() as log:
        opt.step()
        opt.step()
    assert log.events == [], log.events
    if rec is not None:
        assert len(rec.modes) == 2 * len(params) * (1 if lam == -1.0 else 2)


# --- which path runs by default -----------------------------------------------------------


def test_default_path_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(optimizer_mod, "triton_available", lambda: True)
    assert optimizer_mod.default_path(cuda, 10) == "triton"
    monkeypatch.setattr(optimizer_mod, "triton_available", lambda: False)
    assert optimizer_mod.default_path(cuda, 10 ** 9) == "foreach"
    big = optimizer_mod.COMPILE_MIN_NUMEL
    monkeypatch.setattr(optimizer_mod, "compile_available", lambda: True)
    assert optimizer_mod.default_path(cpu, big) == "compiled"
    assert optimizer_mod.default_path(cpu, big - 1) == "foreach"
    monkeypatch.setattr(optimizer_mod, "compile_available", lambda: False)
    assert optimizer_mod.default_path(cpu, 10 ** 9) == "foreach"


@pytest.mark.parametrize("numels,kw,expect", [
    ((100,), {}, [("foreach", 1)]),                       # a small group: no compile
    ((300,), {}, [("multi", 1)]),                         # compiled: one call for the group
    ((300, 50, 400, 60), {}, [("multi", 4)]),             # every tensor in that one call
    ((300, 50, (20, 20), 60), {}, [("multi", 3), ("fused", 1)]),  # not contiguous: per tensor
    ((300, 50, 400, 60), dict(fused="compiled"), [("fused", 4)]),  # as asked: no routing
])
def test_ams_default_takes_the_default_path(numels, kw, expect, monkeypatch):
    monkeypatch.setattr(optimizer_mod, "COMPILE_MIN_NUMEL", 200)
    monkeypatch.setattr(optimizer_mod, "compile_available", lambda: True)
    taken = []
    monkeypatch.setattr(AMS, "_foreach_group",
                        lambda self, g, hp, params, *a: taken.append(("foreach", len(params))))
    monkeypatch.setattr(AMS, "_multi_group", lambda self, g, hp, params, *a, backend:
                        taken.append(("multi", len(params))) if backend == "compiled" else 1 / 0)
    monkeypatch.setattr(AMS, "_fused_group", lambda self, g, hp, params, *a, backend:
                        taken.append(("fused", len(params))))
    params = [torch.nn.Parameter(torch.zeros(n) if isinstance(n, int) else torch.zeros(n).t())
              for n in numels]
    opt = Grams(params, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert taken == expect


@pytest.mark.parametrize("kw,expect", [
    ({}, [("multi", "triton", 3), ("fused", "triton", 1)]),  # the default: one launch
    (dict(fused="triton"), [("fused", "triton", 4)]),         # as asked: a launch per tensor
])
def test_ams_default_on_cuda_takes_one_triton_launch_per_group(kw, expect, monkeypatch):
    """Where the default path is Triton (CUDA), the group's contiguous tensors go in one
    multi-tensor launch (``kernels/triton_multi.py``); a non-contiguous one on its own."""
    monkeypatch.setattr(optimizer_mod, "default_path", lambda device, numel: "triton")
    monkeypatch.setattr(optimizer_mod, "resolve_backend", lambda backend, device: "triton")
    taken = []
    monkeypatch.setattr(AMS, "_multi_group", lambda self, g, hp, params, *a, backend:
                        taken.append(("multi", backend, len(params))))
    monkeypatch.setattr(AMS, "_fused_group", lambda self, g, hp, params, *a, backend:
                        taken.append(("fused", backend, len(params))))
    params = [torch.nn.Parameter(torch.zeros(n) if isinstance(n, int) else torch.zeros(n).t())
              for n in (300, 50, (20, 20), 60)]
    opt = Grams(params, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert taken == expect


def test_triton_launches_without_fma_contraction():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from sharded_ams.kernels.triton_kernel import LAUNCH_OPTIONS

    assert LAUNCH_OPTIONS == {"enable_fp_fusion": False}


# --- a param listed twice -----------------------------------------------------------------


def test_duplicate_param_is_refused_naming_it():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"position 2 \(shape \(2, 2\)\) appears twice.*position 1"):
        AMS([a, b, b])
    with pytest.raises(ValueError, match=r"'w' appears twice"):
        AMS([("v", a), ("w", b), ("w2", b)][:2] + [("w", b)])
    with pytest.raises(ValueError, match="appears twice"):
        ShardedAMS([a, b, a], broadcast_params=False)
    opt = AMS([a])
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [b, b]})
    assert len(opt.param_groups) == 1  # the bad group was not kept


# --- step scalars: host numbers and device tensors give the same fp32 values -------------


def test_device_scalars_equal_host_scalars():
    """The capturable path (lr and step as float64 device tensors) computes the same fp32
    step size, decay and 1/sqrt(1 - beta2^t) as the host path, step after step."""
    from sharded_ams.update import bias_corrections, step_scalars

    for step in (1, 2, 3, 10, 137, 1000, 99_999):
        for lr in (1e-3, 3e-4, 0.1):
            host = step_scalars(lr, *bias_corrections(step, 0.9, 0.999), 0.1)
            dev = step_scalars(torch.tensor(lr, dtype=torch.float64),
                               *bias_corrections(torch.tensor(float(step)), 0.9, 0.999), 0.1)
            for h, d in zip((host.step_size, host.decay, host.inv_sqrt_bc2),
                            (dev.step_size, dev.decay, dev.inv_sqrt_bc2)):
                assert d.dtype == torch.float32
                assert torch.tensor(h, dtype=torch.float32) == d, (step, lr, h, float(d))


@needs_compile
def test_device_step_scalars_compiled_equal_the_host_maths():
    """``kernels/scalars.py``: the fp32[3] scalars of a device step in one compiled call
    are bit for bit the eager tensor maths and the host float64 maths (``update.py``), over
    steps 1..300 and far ones, float and tensor lr, with and without weight decay; and an lr
    that changes every step (a schedule) compiles nothing new."""
    import torch._dynamo.utils as dyn_utils

    from sharded_ams.kernels.scalars import device_step_scalars, scalar_vector
    from sharded_ams.update import bias_corrections, step_scalars

    for b1, b2, wd in ((0.9, 0.999, 0.0), (0.95, 0.98, 0.1)):
        for lr in (1e-3, 3e-4, torch.tensor(2e-3)):
            for t in list(range(1, 300)) + [1000, 100_000]:
                step = torch.tensor(float(t))
                got = device_step_scalars(lr, step, b1, b2, wd)
                h = step_scalars(float(lr), *bias_corrections(float(t), b1, b2), wd)
                host = torch.tensor([h.step_size, h.decay, h.inv_sqrt_bc2], dtype=torch.float32)
                assert torch.equal(got.packed, host), (b1, b2, wd, lr, t, got.packed, host)
                assert torch.equal(got.packed, scalar_vector(lr, step, b1, b2, wd))
                assert got.step_size.data_ptr() == got.packed.data_ptr()  # views of one vector
    before = dyn_utils.counters["stats"]["unique_graphs"]
    for i in range(10):
        device_step_scalars(1e-3 * (1 + i), torch.tensor(5.0), 0.9, 0.999, 0.1)
    assert dyn_utils.counters["stats"]["unique_graphs"] == before, "an lr change recompiled"


@needs_compile
def test_device_scaled_scalars_compiled_equal_the_eager_maths():
    """``kernels/scalars.py``: the per-tensor scalars of lam not in {1, -1} in one compiled
    call (the Triton backend's) are bit for bit ``update.scaled_step_scalars`` on eager
    ops: a host step (float) and a device step (tensor: its bias corrections in the same
    call), float and tensor lr,
    with and without weight decay, a padding slot (numel 0) and a tensor whose every
    element disagrees (lam = 0: denominator 0, scale 1); the three fields are views of one
    vector, and an lr or step that changes every call compiles nothing new."""
    import torch._dynamo.utils as dyn_utils

    from sharded_ams.kernels import scalars
    from sharded_ams.kernels.scalars import device_scaled_scalars
    from sharded_ams.update import bias_corrections, scaled_step_scalars

    gen = torch.Generator().manual_seed(0)
    numels = torch.tensor([7, 4096, 1, 300_000, 5, 0], dtype=torch.int64)
    for lam, wd in ((0.0, 0.0), (-0.5, 0.1), (0.3, 0.01)):
        for lr in (1e-3, torch.tensor(3e-4)):
            for t in (1, 2, 7, 1000):
                counts = (torch.rand(6, generator=gen, dtype=torch.float64) * numels).long()
                counts[2] = 1  # all of it disagrees
                for step in (float(t), torch.tensor(float(t))):
                    got = device_scaled_scalars(lr, step, numels, counts, 0.9, 0.999, lam, wd)
                    want = scaled_step_scalars(lr, *bias_corrections(step, 0.9, 0.999),
                                               numels, counts, lam, wd)
                    assert torch.equal(got.step_size, want.step_size), (lam, wd, lr, t)
                    assert torch.equal(got.decay, want.decay), (lam, wd, lr, t)
                    assert torch.equal(got.inv_sqrt_bc2, torch.as_tensor(
                        want.inv_sqrt_bc2, dtype=torch.float32)), (lam, wd, lr, t)
                    base = got.inv_sqrt_bc2.untyped_storage().data_ptr()
                    assert got.step_size.untyped_storage().data_ptr() == base
                    assert got.decay.untyped_storage().data_ptr() == base
    before = dyn_utils.counters["stats"]["unique_graphs"]
    for i in range(10):
        counts = torch.tensor([1, 2, 0, i, 3, 0])
        for step in (float(i + 2), torch.tensor(float(i + 2))):
            device_scaled_scalars(1e-3 * (1 + i), step, numels, counts, 0.9, 0.999, -0.5, 0.1)
    assert dyn_utils.counters["stats"]["unique_graphs"] == before, "a new lr or step recompiled"
    assert not scalars._compile_failed  # the compiled call ran, not its eager fallback


@needs_compile
def test_multi_count_sums_in_int64_where_int32_could_overflow(monkeypatch):
    """The one-call count pass sums in int32 (faster) only while no tensor could overflow
    it: with the limit lowered below a tensor's length, that call takes int64, and the
    counts are the same either way (a plain count over the new m's and g's signs)."""
    from sharded_ams.kernels import eager, multi

    hp = GroupHParams(0.9, 0.999, 0.0, 0.0, 1e-8, 0.0)
    g, m = torch.randn(3000), torch.randn(3000)
    want = int(((m * 0.9 + g * 0.1 > 0) & (g < 0) | (m * 0.9 + g * 0.1 < 0) & (g > 0)).sum())
    seen = []
    real = multi.compiled
    monkeypatch.setattr(multi, "compiled", lambda fn, **o: lambda *a, **k: (
        seen.append(k["wide"]), real(fn, **o)(*a, **k))[1])
    for limit in (eager.COUNT_INT32_MAX, 2999):
        monkeypatch.setattr(eager, "COUNT_INT32_MAX", limit)
        got = multi.multi_count([g], [g], [m], [m], None, [None], hp)
        assert got.dtype == torch.int64 and got.tolist() == [want]
    assert seen == [False, True]
