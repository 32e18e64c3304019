"""What the ShardedAMS tests share: the small GPT and its data, the independent oracle
(local gradients recorded by tensor hooks, averaged on one process, replayed through the
single-process AMS), comparisons, and the spawned jobs (run once per pytest session and
shared by test_sharded.py, test_sharded_features.py and test_overlap.py).

The oracle shares no code with what it checks: a tensor hook (``Tensor.register_hook``)
sees each backward's gradient before anything of ShardedAMS touches it; the test sums
micro-batches in the order autograd does and averages over ranks itself. With N = 1 or 2
that average is bitwise what any correct reduction gives (one addition is commutative and
dividing by 2 is exact); with N = 3 and 4 gloo's summation order is its own, so there the
reduced gradient is checked against the independent average within fp32 summation error
and the update is replayed on the reduced gradient.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_distributed
from launcher.data.corpus import get_batch, load_corpus
from launcher.train.models.gpt import GPT, GPTConfig
from sharded_ams import AMS, PRESETS

GPT_CFG = GPTConfig(n_layer=1, n_embd=32, block_size=16)
GLOBAL_BATCH = 12          # divisible by 1, 2, 3, 4
CORPUS_BYTES = 200_000
JOB_TIMEOUT = 400
#: the two collective paths (ShardedAMS(collectives=...)): gloo's default, and the
#: reduce-scatter + all-gather path NCCL uses, run on gloo. Every multi-process exactness
#: check loops over both inside one spawned job.
PATHS = ("all_reduce", "reduce_scatter")


def paths_for(n: int) -> tuple[str, ...]:
    """The paths worth running at world size ``n`` (at 1 no collective runs at all)."""
    return PATHS if n > 1 else PATHS[:1]


def ams_kwargs(kw: dict) -> dict:
    """The single-process AMS arguments equal to ShardedAMS keyword arguments ``kw``."""
    kw = dict(kw)
    preset = kw.pop("preset", None)
    for k in ("backend", "max_grad_norm", "skip_nonfinite", "bucket_numel", "broadcast_params",
              "overlap", "grad_reduce_dtype", "module", "state_dtype", "collectives"):
        kw.pop(k, None)
    if preset:
        kw.update(PRESETS[preset])
    return kw


def make_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPT_CFG)


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gpt_batch(step: int, replicated: bool = False, global_batch: int = GLOBAL_BATCH):
    """This rank's share of the global batch (replicated: the one-process batch)."""
    rank, n = world()
    if replicated:
        rank, n = 0, 1
    return get_batch(load_corpus(CORPUS_BYTES), step, global_batch, GPT_CFG.block_size,
                     seed=0, rank=rank, world_size=n)


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


# --------------------------------------------------------------------------- the oracle
class GradRecorder:
    """Each param's local gradient per optimizer step, recorded by tensor hooks before
    ShardedAMS sees it: micro-batches summed in ``dtype`` in arrival order (as autograd,
    or the fp32 main-grad buffer, accumulates them)."""

    def __init__(self, params: list[torch.Tensor], dtype: Optional[torch.dtype] = None):
        self.params, self.dtype = list(params), dtype
        self.acc: list[Optional[torch.Tensor]] = [None] * len(self.params)
        self.handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable:
        def hook(g: torch.Tensor) -> None:
            g = g.detach().to(self.dtype or g.dtype)
            self.acc[i] = g.clone() if self.acc[i] is None else self.acc[i] + g
        return hook

    def pop(self) -> list[torch.Tensor]:
        """This step's local gradients (zeros for params that got none) and reset."""
        out = [torch.zeros_like(p, dtype=self.dtype or p.dtype) if a is None else a
               for p, a in zip(self.params, self.acc)]
        self.acc = [None] * len(self.params)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ReducedGrads:
    """This rank's shard of the reduced (averaged) gradients, captured in every ``step()``
    right after the reduction finished, as (name, offset, values) pieces. ``p.grad`` is None
    after ``step()`` (and on the reduce-scatter path only the owner's shard is reduced), so
    the tests read the reduction here; :func:`assemble_reduced` joins every rank's pieces."""

    def __init__(self, opt):
        self.steps: list[list[tuple[str, int, torch.Tensor]]] = []
        sync, real = opt._sync, opt._sync.finish_grad_sync

        def finish_and_capture() -> None:
            real()
            self.steps.append([
                (pc.slot.name, pc.param_offset,
                 sh.buf.grad[pc.buffer_start:pc.buffer_start + pc.length].clone())
                for sh in opt.shards for pc in sh.layout.pieces(opt.comm.rank)])
        sync.finish_grad_sync = finish_and_capture


class _InBackward:
    """A reduction that runs (synchronously) the first time anyone asks whether it has
    finished: polled from backward, it has always finished there."""

    def __init__(self, run: Callable[[], None]):
        self.run: Optional[Callable[[], None]] = run

    def is_completed(self) -> bool:
        if self.run is not None:
            run, self.run = self.run, None
            run()
        return True

    def wait(self) -> bool:
        return self.is_completed()


def finish_in_backward(opt) -> list:
    """Make every gradient reduction of ``opt`` finish when first polled, so C-Adam's
    counts are taken in backward on every step (backward_count.py), deterministically;
    a poll that did not ask (counting before the reduction) reads unreduced gradients.
    Returns the list that gets, per step, how many runs backward counted (None: none)."""
    real, taken = opt.comm.average_grads, []
    opt.comm.average_grads = lambda bucket, shard: _InBackward(
        lambda: real(bucket, shard).wait())
    take = opt._bwd.take

    def recorded(*args):
        got = take(*args)
        taken.append(None if got is None else len(got.done))
        return got
    opt._bwd.take = recorded
    return taken


def assemble_reduced(per_rank: list[list[list]], params: dict[str, torch.Tensor]) -> list:
    """``per_rank[r][t]``: rank r's pieces at step t -> per step, the full reduced gradient
    of every param in ``params`` (name -> a tensor of its shape and dtype), in that order."""
    out = []
    for t in range(len(per_rank[0])):
        full = {n: torch.full((p.numel(),), float("nan"), dtype=torch.float32)
                for n, p in params.items()}
        for steps in per_rank:
            for name, off, vals in steps[t]:
                full[name][off:off + vals.numel()] = vals.float()
        out.append([full[n].to(p.dtype).view(p.shape) for n, p in params.items()])
    return out


def independent_mean(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """sum over ranks (in rank order) of g_r / N, per param: the average a reduction that
    divides first computes (bitwise any correct one's for N <= 2)."""
    n = len(per_rank)
    out = []
    for gs in zip(*per_rank):
        acc = gs[0] / n if n > 1 else gs[0].clone()
        for g in gs[1:]:
            acc = acc + g / n
        out.append(acc)
    return out


def means_per_step(recorded: list[list[list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
    """``recorded[r][t]``: rank r's local grads at step t -> the independent mean per step."""
    return [independent_mean([rank_steps[t] for rank_steps in recorded])
            for t in range(len(recorded[0]))]


def within_summation_error(got: torch.Tensor, per_rank: list[torch.Tensor]) -> float:
    """max over elements of |got - mean| / (4 N eps sum_r |g_r| / N): <= 1 when ``got`` is
    the mean up to fp32 summation order (0/0 counts as 0)."""
    n = len(per_rank)
    mean = sum(g.double() for g in per_rank) / n
    bound = 4 * n * torch.finfo(got.dtype).eps * sum(g.double().abs() for g in per_rank) / n
    err = (got.double() - mean).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound.clamp_min(1e-300))
    return ratio.max().item() if ratio.numel() else 0.0


def replay(model: nn.Module, init: dict[str, torch.Tensor], grads: list[list[torch.Tensor]],
           scheduler=None, params: Optional[list] = None, groups: Optional[list] = None,
           **kw) -> AMS:
    """Single-process AMS(fused="eager") over gradients from ``init``.

    ``grads[t]`` follows ``params`` (default ``trainable(model)``); ``groups`` (param
    groups of ``model``'s params) replaces the single group; ``scheduler``: a function of
    the optimizer returning an LR scheduler, stepped after every step."""
    model.load_state_dict(init, strict=False)  # strict=False: tied lm_head has no own key
    params = params if params is not None else trainable(model)
    opt = AMS(groups if groups is not None else params, fused="eager", **kw)
    sched = scheduler(opt) if scheduler else None
    for gs in grads:
        for p, g in zip(params, gs):
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


def state_equal(a: list[dict], b: list[dict]) -> bool:
    """Two optimizers' state dicts (lists of pieces) hold bitwise the same state."""
    def pieces(sds):
        return {(r["name"], r["offset"]): r for sd in sds for r in sd["pieces"]}
    pa, pb = pieces(a), pieces(b)
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[k][key], pb[k][key]) for k in pa for key in pa[k]
        if isinstance(pa[k][key], torch.Tensor))


# --------------------------------------------------------------------------- shared jobs
_CACHE: dict = {}


def _ckpt_dir(name: str) -> str:
    """A directory for a shared job's checkpoints, removed when this (pytest) process exits."""
    if "root" not in _CACHE:
        _CACHE["root"] = tempfile.mkdtemp(prefix="sharded_ams_tests_")
        atexit.register(shutil.rmtree, _CACHE["root"], ignore_errors=True)
    return os.path.join(_CACHE["root"], name)


def cached_job(key, fn: Callable, n: int, *args):
    """``run_distributed(fn, n, *args)`` once per session; a failure is re-raised in every
    test that needs it."""
    if key not in _CACHE:
        try:
            _CACHE[key] = run_distributed(fn, n, *args, timeout=JOB_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            _CACHE[key] = exc
    res = _CACHE[key]
    if isinstance(res, Exception):
        raise res
    return res


def proof_results(n: int) -> list[dict]:
    """The proof job (test_sharded.py) and the overlap scenario (test_overlap.py) on
    ``n`` ranks, in one spawned job."""
    from test_sharded import proof_job

    return cached_job(("proof", n), proof_job, n, _ckpt_dir(f"n{n}"))


def features(name: str, path: str) -> list:
    """Results of feature check ``name`` on collective path ``path`` on every rank (one
    N = 2 job per session runs every check on both paths)."""
    from test_sharded_features import FEATURE_WORLD, features_job

    return [r[path][name] for r in cached_job("features", features_job, FEATURE_WORLD,
                                              _ckpt_dir("features"))]

