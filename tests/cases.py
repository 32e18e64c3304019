"""One table of optimizer test configurations, in the style of torch's ``OptimizerInfo``.

Every optimizer test (single-process ``AMS`` and its presets here, the sharded optimizer
later) draws its configurations from this module, so a new case added here is tested
everywhere:

* ``CONFIGS``: valid hyperparameter sets (:class:`Case`). ``case.hparams`` is the full,
  resolved set (``lr, betas, beta3, lam, eps, weight_decay``) that any AMS-family
  constructor accepts; ``case.build(params, **extra)`` constructs the named preset class
  (``Grams``/``CAdam``/``AdamW``) or ``AMS``; ``case.ref_kwargs`` are the keyword arguments
  of :func:`sharded_ams.update.reference_step`.
* ``BAD_CONFIGS``: invalid configurations (:class:`BadCase`) with the exception type and
  a regex of the message; ``at_step`` cases are accepted by the constructor and must fail
  at the first ``step()``.
* ``make_grads``: deterministic gradient sequences with exact zeros (both elements that
  are zero at every step, like embedding rows absent from every batch, and elements zero
  at random steps) and magnitudes spread over many decades, so sqrt(v^) meets eps.
* ``reference_run`` / ``reference_trajectory``: the float64 oracle over such a sequence.
* ``rel_err``: the norm-wise relative error used for the fp32 tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from sharded_ams import AMS, AdamW, CAdam, Grams
from sharded_ams.update import PRESETS, RefState, reference_init, reference_step

#: fp32 tolerance on params and moments against the float64 reference (see ``rel_err``).
FP32_RTOL = 1e-5

_PRESET_CLASSES = {"grams": Grams, "cadam": CAdam, "adamw": AdamW, None: AMS}
#: the (beta3, lam) each preset class fixes (it takes neither as an argument)
_PRESET_FIXED = {name: dict(fixed) for name, fixed in PRESETS.items()}


@dataclass(frozen=True)
class Case:
    """A valid configuration. ``preset`` names the class that ``build`` uses (None: AMS)."""

    name: str
    hparams: dict
    preset: Optional[str] = None
    desc: str = ""

    @property
    def beta3(self) -> float:
        return float(self.hparams["beta3"])

    @property
    def lam(self) -> float:
        return float(self.hparams["lam"])

    @property
    def lam_is_unit(self) -> bool:
        """|lam| == 1: one pass, no per-tensor count (the Triton MODE_FUSED kernel)."""
        return abs(self.lam) == 1.0

    @property
    def ctor_kwargs(self) -> dict:
        """Keyword arguments for ``build``'s class (a preset takes no beta3/lam)."""
        kw = dict(self.hparams)
        for k in _PRESET_FIXED.get(self.preset, {}):
            kw.pop(k)
        return kw

    @property
    def ref_kwargs(self) -> dict:
        """Keyword arguments of ``reference_step`` (lr must be a number here)."""
        h = self.hparams
        b1, b2 = h["betas"]
        return dict(lr=float(h["lr"]), beta1=float(b1), beta2=float(b2), beta3=float(h["beta3"]),
                    lam=float(h["lam"]), eps=float(h["eps"]),
                    weight_decay=float(h["weight_decay"]))

    def build(self, params, **extra) -> AMS:
        """The optimizer for this case; ``extra`` adds e.g. ``foreach=``/``fused=``."""
        return _PRESET_CLASSES[self.preset](params, **self.ctor_kwargs, **extra)

    def with_(self, name: Optional[str] = None, desc: Optional[str] = None, **hp) -> "Case":
        """A copy with some hyperparameters replaced (keeps no preset if beta3/lam change)."""
        preset = self.preset
        if any(k in _PRESET_FIXED.get(preset, {}) for k in hp):
            preset = None
        return Case(name or self.name, {**self.hparams, **hp}, preset,
                    self.desc if desc is None else desc)

    def __post_init__(self):
        missing = {"lr", "betas", "beta3", "lam", "eps", "weight_decay"} - set(self.hparams)
        assert not missing, (self.name, missing)
        for k, val in _PRESET_FIXED.get(self.preset, {}).items():
            assert self.hparams[k] == val, f"case {self.name}: preset {self.preset} has {k}={val}"

    def __str__(self) -> str:  # pytest ids
        return self.name


def _hp(lr=1e-3, betas=(0.9, 0.999), beta3=0.0, lam=-1.0, eps=1e-8, weight_decay=0.0) -> dict:
    return dict(lr=lr, betas=betas, beta3=beta3, lam=lam, eps=eps, weight_decay=weight_decay)


#: Valid configurations. lr is larger than usual so that 100 steps move params visibly.
CONFIGS: list[Case] = [
    Case("grams", _hp(lr=1e-2), "grams", "Grams: beta3=0, lam=-1"),
    Case("grams_wd", _hp(lr=1e-2, weight_decay=0.1), "grams", "Grams with decoupled decay"),
    Case("cadam", _hp(lr=1e-2, lam=0.0), "cadam", "Cautious Adam: beta3=0, lam=0, per-tensor rescale"),
    Case("cadam_wd", _hp(lr=1e-2, lam=0.0, weight_decay=0.05), "cadam", "C-Adam with decay"),
    Case("adamw", _hp(lr=1e-2, lam=1.0), "adamw", "AdamW: lam=1"),
    Case("adamw_wd", _hp(lr=1e-2, betas=(0.8, 0.99), lam=1.0, eps=1e-6, weight_decay=0.1),
         "adamw", "AdamW, other betas/eps, with decay"),
    Case("lam-0.5_beta3-0.5", _hp(lr=1e-2, beta3=0.5, lam=-0.5),
         None, "general AMS: sign reference s is an EMA, negative lam, per-tensor rescale"),
    Case("lam-0.5_beta3-0.5_wd", _hp(lr=1e-2, beta3=0.5, lam=-0.5, weight_decay=0.1),
         None, "the same with decay"),
    Case("lam0.5", _hp(lr=1e-2, lam=0.5), None, "0 < lam < 1: partial step on disagreement"),
    Case("lam0.5_wd", _hp(lr=1e-2, lam=0.5, weight_decay=0.01), None, "the same with decay"),
]

CONFIGS_BY_NAME: dict[str, Case] = {c.name: c for c in CONFIGS}

#: Checked against the independent numpy oracle (``tests/oracle.py``) on every backend:
#: the three presets (with decay) and general AMS with an EMA sign reference. beta3 = 0.9
#: with beta1 = 0.95: at beta1 = beta3 the reference s equals m and the step is AdamW's.
ORACLE_CASES: list[Case] = [CONFIGS_BY_NAME[n] for n in ("grams_wd", "cadam_wd", "adamw_wd")] + [
    CONFIGS_BY_NAME["lam-0.5_beta3-0.5_wd"].with_("lam-0.5_beta3-0.9_wd", beta3=0.9,
                                                  betas=(0.95, 0.999),
                                                  desc="lam=-0.5, beta3=0.9, beta1=0.95")]


@dataclass(frozen=True)
class BadCase:
    """An invalid configuration: ``kwargs`` for ``AMS`` (or ``preset``), the expected
    exception and a regex of its message. ``at_step``: the constructor accepts it and the
    first ``step()`` must raise."""

    name: str
    kwargs: dict
    error: type
    match: str
    at_step: bool = False
    preset: Optional[str] = None

    def build(self, params) -> AMS:
        return _PRESET_CLASSES[self.preset](params, **self.kwargs)

    def __str__(self) -> str:
        return self.name


BAD_CONFIGS: list[BadCase] = [
    BadCase("negative_lr", dict(lr=-1e-3), ValueError, r"Invalid learning rate"),
    BadCase("nan_lr", dict(lr=float("nan")), ValueError, r"Invalid learning rate"),
    BadCase("inf_lr", dict(lr=float("inf")), ValueError, r"Invalid learning rate"),
    BadCase("beta1_1.0", dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0"),
    BadCase("beta2_1.0", dict(betas=(0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1"),
    BadCase("beta1_neg", dict(betas=(-0.1, 0.999)), ValueError, r"Invalid beta parameter at index 0"),
    BadCase("beta2_neg", dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1"),
    BadCase("beta3_1.0", dict(beta3=1.0), ValueError, r"Invalid beta3"),
    BadCase("beta3_neg", dict(beta3=-0.1), ValueError, r"Invalid beta3"),
    BadCase("eps_0", dict(eps=0.0), ValueError, r"Invalid epsilon value"),
    BadCase("eps_neg", dict(eps=-1e-8), ValueError, r"Invalid epsilon value"),
    BadCase("nan_lam", dict(lam=float("nan")), ValueError, r"Invalid lam"),
    BadCase("weight_decay_neg", dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay"),
    BadCase("betas_len3", dict(betas=(0.9, 0.99, 0.999)), ValueError, r"Invalid betas"),
    BadCase("betas_len1", dict(betas=(0.9,)), ValueError, r"Invalid betas"),
    BadCase("lr_tensor_2elem", dict(lr=torch.tensor([1e-3, 1e-3])), ValueError,
            r"Invalid learning rate.*one element"),
    BadCase("foreach_and_fused", dict(foreach=True, fused=True), RuntimeError,
            r"`fused` and `foreach` cannot be `True` together"),
    BadCase("grams_nan_lr", dict(lr=float("nan")), ValueError, r"Invalid learning rate",
            preset="grams"),
    BadCase("unknown_fused_backend", dict(fused="cuda-magic"), ValueError,
            r"Invalid backend 'cuda-magic'", at_step=True),
]


def make_grads(shape: Sequence[int], steps: int, seed: int, zero_frac: float = 0.1, *,
               dtype: torch.dtype = torch.float32, min_log10: float = -7.0,
               max_log10: float = 0.0) -> list[Tensor]:
    """``steps`` deterministic gradients of ``shape`` (CPU, ``dtype``) with exact zeros.

    * each element has a fixed magnitude 10^U(min_log10, max_log10) times a slowly varying
      mean plus noise, so some elements sit where sqrt(v^) ~ eps and signs flip;
    * about ``zero_frac / 2`` of the elements are exactly zero at every step (never-seen
      embedding rows), and each other element is zero at a step with probability
      ``zero_frac / 2``;
    * the result is contiguous; transpose it yourself for a non-contiguous parameter.
    """
    gen = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    scale = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * (max_log10 - min_log10)
                     + min_log10)
    bias = torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    always_zero = torch.rand(n, generator=gen, dtype=torch.float64) < zero_frac / 2
    out = []
    for t in range(steps):
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        g = scale * (bias * math.cos(t / 17.0) + noise)
        zero = always_zero | (torch.rand(n, generator=gen, dtype=torch.float64) < zero_frac / 2)
        g = torch.where(zero, torch.zeros_like(g), g)
        out.append(g.to(dtype).reshape(shape))
    return out


def make_param(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A deterministic initial parameter value of ``shape`` (values ~ N(0, 1))."""
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def reference_run(p0: Tensor, grads: Sequence[Tensor], *, lr: float | Sequence[float],
                  beta1: float, beta2: float, beta3: float, lam: float, eps: float,
                  weight_decay: float) -> RefState:
    """The float64 reference after ``len(grads)`` steps from ``p0`` (``lr`` may be a list
    with one value per step, e.g. a scheduler's)."""
    return reference_trajectory(p0, grads, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3,
                                lam=lam, eps=eps, weight_decay=weight_decay)[-1]


def reference_trajectory(p0: Tensor, grads: Sequence[Tensor], *, lr: float | Sequence[float],
                         beta1: float, beta2: float, beta3: float, lam: float, eps: float,
                         weight_decay: float) -> list[RefState]:
    """All float64 reference states: element 0 is the initial state, element t after step t."""
    st = reference_init(p0, beta3)
    lrs = [float(lr)] * len(grads) if isinstance(lr, (int, float)) else [float(x) for x in lr]
    assert len(lrs) == len(grads)
    states = [st]
    for g, lr_t in zip(grads, lrs):
        st = reference_step(st, g.to(torch.float64), lr=lr_t, beta1=beta1, beta2=beta2,
                            beta3=beta3, lam=lam, eps=eps, weight_decay=weight_decay)
        states.append(st)
    return states


def rel_err(actual: Tensor, expected: Tensor, scale: Optional[float] = None) -> float:
    """max |actual - expected| / max(max |expected|, scale), in float64 (0 for empty).

    Norm-wise rather than element-wise: fp32 rounding error is relative to the size of the
    terms summed, not to a result that cancels to ~0. ``scale`` is such a term size (see
    ``error_scales``); it matters for tiny tensors (a 1-element m near zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    denom = max(e.abs().max().item(), float(scale or 0.0))
    diff = (a - e).abs().max().item()
    if denom == 0.0:
        return diff
    return diff / denom


def error_scales(p0: Tensor, grads: Sequence[Tensor]) -> dict[str, float]:
    """Sizes of the terms that make up each state after a run, for ``rel_err``: m and s
    are averages of g (|m| <= max|g|), v of g^2, the param starts at p0."""
    gmax = max((g.detach().abs().max().item() for g in grads if g.numel()), default=0.0)
    pmax = p0.detach().abs().max().item() if p0.numel() else 0.0
    return {"param": pmax, "exp_avg": gmax, "exp_avg_s": gmax, "exp_avg_sq": gmax * gmax}


def assert_matches_reference(opt: AMS, p: Tensor, ref: RefState, rtol: float = FP32_RTOL,
                             what: str = "", p0: Optional[Tensor] = None,
                             grads: Optional[Sequence[Tensor]] = None) -> None:
    """The optimizer's param (fp32 master when present), m, v[, s] and step count equal
    the reference to ``rtol`` (norm-wise; give ``p0`` and ``grads`` for the term sizes)."""
    st = opt.state[p]
    master = st.get("master", p)
    scales = error_scales(p0, grads) if p0 is not None and grads is not None else {}
    checks = [("param", master, ref.p), ("exp_avg", st["exp_avg"], ref.m),
              ("exp_avg_sq", st["exp_avg_sq"], ref.v)]
    if ref.s is not None:
        checks.append(("exp_avg_s", st["exp_avg_s"], ref.s))
    for name, a, e in checks:
        err = rel_err(a, e, scales.get(name))
        assert err < rtol, f"{what}: {name} rel err {err:.3g} >= {rtol:g} (shape {tuple(p.shape)})"
    assert int(st["step"]) == ref.step, (what, int(st["step"]), ref.step)


# --- torch.compile budget -----------------------------------------------------------------
#
# The "compiled" backend (sharded_ams/kernels/eager.py) is torch.compile(dynamic=True,
# fullgraph=True). It recompiles per distinct lam value, per size class (0, 1, other), per
# rank of the *base* of the ``.view(-1)`` it is given, and on a change of ``requires_grad``
# of the param view; with fullgraph=True the 9th variant of one function raises
# FailOnRecompileLimitHit (see test_update.py::test_compiled_recompile_limit_regression).
# Until that is fixed, tests that check the compiled backend's *numbers* run under a
# larger limit, and drop the compiled code when done so later test modules start clean.

COMPILE_RECOMPILE_LIMIT = 64


def compiled_budget_fixture():
    """Build a module-scoped fixture: ``compiled_budget = compiled_budget_fixture()``."""
    import pytest

    @pytest.fixture(scope="module")
    def compiled_budget():
        import torch._dynamo

        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        old = getattr(cfg, name)
        setattr(cfg, name, max(old, COMPILE_RECOMPILE_LIMIT))
        try:
            yield
        finally:
            setattr(cfg, name, old)
            torch._dynamo.reset()

    return compiled_budget
