"""C-Adam's count pass during backward (``sharded_ams/backward_count.py``).

With overlap and |lam| != 1, ``ShardedAMS`` counts each bucket once its reduction has
finished, from the post-accumulate-grad hooks, and ``step()`` counts only the rest. The
counts are integers summed per piece, so the results must be bitwise those of counting in
``step()`` (``count_in_backward=False``, itself checked against the float64 oracle in
test_norm_in_count.py and test_sharded.py). Checked here at world size 1:

* bitwise equal to counting in the step, and every run counted in backward, for C-Adam
  and lam = -0.5 with beta3 = 0.5, two dtype shards (bf16 with fp32 masters, fp32), a
  |lam| = 1 group beside a counted one, a non-finite step, the skip off;
* the counts are thrown away, not used stale, when something changes between backward
  and ``step()``: an in-place write to ``p.grad``, beta1, a state load, clipping turned
  on; nothing is counted under ``no_sync``; with ``max_grad_norm`` they are used exactly
  on the steps whose clip coefficient is 1.

At world size 2 (the shared features job, both collective paths) the reductions are made
to finish inside backward deterministically, every run is counted there, and the params
and state replay bitwise through the independent oracle: test_sharded_features.py,
``test_counted_in_backward_replays_bitwise``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sharded_ams.backward_count as bc
import sharded_ams.sharded as sharded_mod
from sharded_ams import ShardedAMS

STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 80), nn.Tanh(),
                      nn.Linear(80, 5))
    m[2].to(torch.bfloat16)  # a second dtype shard, with fp32 masters
    return m


def _forward(m: nn.Module, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(12, 24, generator=g)
    h = torch.tanh(m[0](x))
    h = torch.tanh(m[2](h.bfloat16()).float())
    return m[4](h).pow(2).mean()


def _groups(m: nn.Module, mixed: bool) -> list[dict]:
    if not mixed:
        return [dict(params=list(m.parameters()))]
    return [dict(params=list(m[0].parameters()) + list(m[4].parameters())),
            dict(params=list(m[2].parameters()), lam=1.0, beta3=0.0)]  # Grams: one pass


def _train(cib: bool, kw: dict, mixed: bool = False, between=None, nan_at: int = -1,
           micro: int = 1) -> dict:
    """STEPS steps; ``between(t, model, opt)`` runs after backward, before ``step()``."""
    m = _model()
    opt = ShardedAMS(_groups(m, mixed), module=m, lr=1e-2, weight_decay=0.05,
                     count_in_backward=cib, **kw)
    start, norms = len(_TAKEN), []
    for t in range(STEPS):
        for j in range(micro):
            ctx = opt.no_sync() if j < micro - 1 else _null()
            with ctx:
                loss = _forward(m, t * micro + j)
                (loss * (float("nan") if t == nan_at else 1.0)).backward()
        if between is not None:
            between(t, m, opt)
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
    opt.finish_param_sync()
    state = [x.clone() for sh in opt.shards for x in sh.state.values()]
    per_tensor = sum(1 for sh in opt.shards for run in sh.runs
                     if run.local_end > run.local_start
                     and abs(float(opt.param_groups[run.group]["lam"])) != 1.0)
    return dict(params=[p.detach().clone() for p in m.parameters()], state=state,
                taken=_TAKEN[start:], norms=norms, stat=opt.sync_stats.counted_in_backward,
                per_tensor=per_tensor, skipped=int(opt.skipped_steps))


_TAKEN: list = []


@pytest.fixture(autouse=True)
def record_counts_used(monkeypatch):
    """Per step, how many runs the step took from backward (None: it counted them all)."""
    _TAKEN.clear()
    for name in ("step_shards", "step_shards_norm_in_count"):
        real = getattr(sharded_mod, name)

        def recorded(*args, _real=real, **kw):
            _TAKEN.append(None if kw["pre"] is None else len(kw["pre"].done))
            return _real(*args, **kw)
        monkeypatch.setattr(sharded_mod, name, recorded)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _equal(a: dict, b: dict) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
            and all(torch.equal(x, y) for x, y in zip(a["state"], b["state"])))


CASES = {
    "cadam": (dict(preset="cadam"), False, -1),
    "lam-0.5_beta3-0.5": (dict(lam=-0.5, beta3=0.5), False, -1),
    "mixed_groups": (dict(lam=0.0, beta3=0.0), True, -1),
    "nonfinite_step": (dict(preset="cadam"), False, 2),
    "skip_off": (dict(preset="cadam", skip_nonfinite=False), False, -1),
}


@pytest.mark.parametrize("case", CASES)
def test_bitwise_as_counting_in_step(case):
    kw, mixed, nan_at = CASES[case]
    got = _train(True, kw, mixed, nan_at=nan_at)
    ref = _train(False, kw, mixed, nan_at=nan_at)
    assert _equal(got, ref)
    assert got["per_tensor"] > 0
    assert got["taken"] == [got["per_tensor"]] * STEPS, "every run counted in backward"
    assert got["stat"] == got["per_tensor"] * STEPS and ref["stat"] == 0  # sync_stats
    assert got["skipped"] == ref["skipped"] == (1 if nan_at >= 0 else 0)


def _scale_grads(t, m, opt):
    if t == 2:
        for p in m.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


def _change_beta1(t, m, opt):
    if t == 3:
        for g in opt.param_groups:
            g["betas"] = (0.8, g["betas"][1])


_SAVED: dict = {}


def _reload_state(t, m, opt):
    if t == 1:
        _SAVED["sd"] = copy.deepcopy(opt.state_dict())
    if t == 3:  # back to the state after step 1: m differs from what backward read
        opt.load_state_dict(_SAVED["sd"])


def _clip_on(t, m, opt):
    if t == 2:
        opt.max_grad_norm = 1e-6  # every later step clipped: counted again in step()


STALE = {"grad_written_in_place": (_scale_grads, 2), "beta1_changed": (_change_beta1, 3),
         "state_loaded": (_reload_state, 3), "clipping_turned_on": (_clip_on, 2)}


@pytest.mark.parametrize("case", STALE)
def test_stale_counts_are_not_used(case):
    """A change between backward and step(): that step counts everything itself."""
    between, at = STALE[case]
    got = _train(True, dict(preset="cadam"), between=between)
    ref = _train(False, dict(preset="cadam"), between=between)
    assert _equal(got, ref)
    n = got["per_tensor"]
    assert got["taken"][at] is None
    assert got["taken"][:at] == [n] * at
    later = [None if case == "clipping_turned_on" else n] * (STEPS - at - 1)
    assert got["taken"][at + 1:] == later


def test_accumulation_counts_only_the_last_micro_batch(monkeypatch):
    calls = []
    real = bc.BackwardCounts.count_bucket

    def count_bucket(self, bk):
        calls.append(bk.index)
        return real(self, bk)
    monkeypatch.setattr(bc.BackwardCounts, "count_bucket", count_bucket)
    got = _train(True, dict(preset="cadam"), micro=3)
    ref = _train(False, dict(preset="cadam"), micro=3)
    assert _equal(got, ref)
    assert got["taken"] == [got["per_tensor"]] * STEPS
    assert len(calls) == STEPS * 2  # two dtype shards, one bucket each at world size 1


def test_off_without_overlap():
    assert ShardedAMS(_model(), preset="cadam", overlap=False)._bwd is None


def test_with_clipping_used_on_the_steps_it_does_not_clip():
    """max_grad_norm between the steps' norms: the steps within it take backward's counts
    (g * 1.0 == g), the clipped ones count g * coef themselves; bitwise either way."""
    norms = _train(False, dict(preset="cadam"))["norms"]
    limit = sorted(norms)[len(norms) // 2]
    kw = dict(preset="cadam", max_grad_norm=limit * (1 + 1e-6))
    got, ref = _train(True, kw), _train(False, kw)
    assert _equal(got, ref)
    n = got["per_tensor"]
    clipped = [x > kw["max_grad_norm"] for x in got["norms"]]
    assert 0 < sum(clipped) < STEPS, got["norms"]
    assert got["taken"] == [None if c else n for c in clipped]
