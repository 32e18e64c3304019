"""The rows of ``bench_step.py``: each builds one optimizer on a GPT-like parameter set
and returns (its step function, a note), or raises NotImplementedError for "n/a".

Rows (one function each, ``row_*``), all Grams (beta3 = 0, lam = -1) except torch's AdamW;
fp32 params, grads set once, weight decay 0:

* ``adamw_default``: ``torch.optim.AdamW(params)``, torch's default path for the device
  (the single-tensor loop on CPU, ``_foreach`` on CUDA).
* ``adamw_foreach``: ``torch.optim.AdamW(foreach=True)`` (the baseline of "speedup").
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``, the peer to beat; "n/a" where the
  build has no such kernel for the device.
* ``adamw_fused_norm``: ``get_total_norm(foreach=True)`` then fused AdamW: the peer of
  ``sharded_ams`` (both read the gradients once more for their norm).
* ``adamw_fused_clip``: ``clip_grad_norm_(1.0, foreach=True)`` then fused AdamW: the peer
  of ``sharded_ams_clip`` (norm, then the gradients scaled in place).
* ``ams_default``: ``sharded_ams.Grams(params)``, what a user gets
  (``optimizer.default_path``: on CPU at this size ONE compiled call over all the
  group's tensors, ``kernels/multi.py``; Triton on CUDA).
* ``cadam_default``: ``sharded_ams.CAdam(params)`` (lam = 0: per-tensor scale, so a count
  pass and an apply pass; the same one-call path).
* ``cadam_count_pass``: that count pass alone (reads g and m, 8 B per element). The apply
  pass needs every tensor's whole count, so no exact C-Adam step is faster than this
  plus a one-pass step: "two-pass floor" = t(cadam_count_pass) + t(ams_default), and the
  printed "of floor" is that sum over t(cadam_default), per round (1.0: at the floor).
* ``ams_foreach``: ``Grams(foreach=True)``.
* ``ams_fused_compiled``: ``Grams(fused="compiled")``: one torch.compile'd pass per tensor
  (``fused="auto"`` on CUDA, i.e. Triton).
* ``ams_triton`` / ``cadam_triton``: ``Grams`` / ``CAdam(fused="triton")``: the CUDA
  default's path (a Triton kernel per tensor; under ``TRITON_INTERPRET=1`` on CPU, as the
  GPU check's dry run runs it).
* ``flat_compiled``: the compiled kernel over ONE flat buffer holding all parameters,
  ``sharded_ams.kernels.flat_step(...)``: ShardedAMS's kernel path.
* ``sharded_ams``: ``ShardedAMS(params, preset="grams")`` at world size 1 (no process
  group): the flat pass plus its global grad norm (the non-finite check), a read of g.
* ``sharded_cadam``: ``ShardedAMS(params, preset="cadam")``: the count pass, whose calls
  also sum the gradients' squares for the norm (``shard_step.step_shards_norm_in_count``;
  one all-reduce for both), and the apply pass (the whole step with per-tensor step
  sizes); peer ``adamw_fused_norm``.
* ``sharded_cadam_clip``: the same with ``max_grad_norm=1.0``: the norm pass first (the
  count reads the clipped gradient), then the count and apply passes; peer
  ``adamw_fused_clip``.
* ``sharded_cadam_bwd``: the same optimizer, its gradients from a backward
  (``_leaf_backward``: autograd adds fixed gradients into the zeroed ``p.grad`` and runs
  the hooks), which counts the buckets (``count_in_backward``, on by default): the timed
  ``step()`` is the one all-reduce and the apply pass; the backward is untimed. Peer
  ``adamw_fused_norm``.
* ``sharded_cadam_clip_bwd``: the same with ``max_grad_norm=CLIP_NOT_HIT`` (100, above
  these gradients' norm of about 54): the norm pass, a clip coefficient of exactly 1, so
  backward's counts hold and the apply pass follows. Peer ``adamw_fused_clip``.
* ``sharded_cadam_bwd_iter`` / ``sharded_cadam_iter``: zero_grad + that backward + step,
  timed together, with the count in backward / in ``step()`` (``count_in_backward=False``):
  at world size 1 the count moves, it does not vanish. Peer ``adamw_fused_norm_iter``:
  zero_grad + the same backward + ``get_total_norm`` + fused AdamW.
* ``sharded_ams_no_check``: the same with ``skip_nonfinite=False`` (no norm pass): the
  work of fused AdamW, so "vs fused" compares like with like.
* ``sharded_ams_clip``: ``ShardedAMS(max_grad_norm=1.0)``: the norm pass, then the step
  with the clip coefficient applied inside the kernel (no pass scales the gradients).
* ``grad_norm_pass``: ShardedAMS's norm pass alone (``shard_step.global_grad_norm`` over
  its gradient buffer: the norm and the non-finite test in one read); its peer
  ``grad_sum``: a plain ``g.sum()`` over the same buffer (the read-bandwidth yardstick).
* ``copy_floor``: the memory-traffic floor of the step: ONE torch.compile'd pass that moves
  the same bytes in place, ``p += g; m += g; v += g`` over four flat fp32 buffers of the
  same total size (one fused loop): reads 16 B (p, g, m, v) and writes 12 B (p, m, v) per
  element, like an fp32 AMS/Adam step, with three adds instead of the step's arithmetic. The ratios
  "x copy floor" are against this row.
* ``copy_floor_eager``: the same bytes with eager ops: three fp32 buffers copied from
  three others (``torch._foreach_copy_``: reads 12 B, writes 12 B per element) plus one
  streaming read of a fourth (``torch.sum``: reads 4 B). Four passes, and its writes go to
  buffers it did not read (write-allocate caches add up to 12 B of reads), so it is slower
  than the one-pass floor; shown for reference.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_common import step_keeping_grads  # noqa: E402
from sharded_ams import CAdam, Grams, ShardedAMS  # noqa: E402
from sharded_ams.kernels import GroupHParams, flat_step, triton_available  # noqa: E402
from sharded_ams.kernels.eager import compile_available  # noqa: E402
from sharded_ams.shard_step import global_grad_norm  # noqa: E402

BYTES_PER_ELEMENT = 28  # fp32: read p, g, m, v (16 B); write p, m, v (12 B)
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
GRAMS_HP = GroupHParams(beta1=BETAS[0], beta2=BETAS[1], beta3=0.0, lam=-1.0, eps=EPS,
                        weight_decay=0.0)


# --- the parameter set ------------------------------------------------------------------


def gpt_shapes(numel_scale: float = 1.0, layers: int = 4, vocab: int = 32000, d: int = 512,
               ffn: int = 2048) -> list[tuple[int, ...]]:
    """Shapes of the GPT-like set; every tensor's first dimension times ``numel_scale``."""

    def sc(n: int) -> int:
        return max(1, math.ceil(n * numel_scale))

    shapes: list[tuple[int, ...]] = [(sc(vocab), d)]
    for _ in range(layers):
        shapes += [(sc(d),), (sc(d),)]  # LayerNorm 1
        shapes += [(sc(d), d)] * 4  # q, k, v, o
        shapes += [(sc(d),), (sc(d),)]  # LayerNorm 2
        shapes += [(sc(ffn), d), (sc(d), ffn)]  # MLP up, down
    shapes += [(sc(d),), (sc(d),)]  # final LayerNorm
    return shapes


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
        p.grad = torch.randn(s, generator=gen).to(device) * 1e-2
        params.append(p)
    return params


# --- rows: each returns (step function, note) or raises NotImplementedError for "n/a" ---


def row_adamw_default(shapes, device):
    params = make_params(shapes, device)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    return opt.step, "torch.optim.AdamW(params): torch's default path"


def row_adamw_foreach(shapes, device):
    params = make_params(shapes, device)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)
    return opt.step, "torch.optim.AdamW(foreach=True)"


def _fused_adamw(params):
    try:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0,
                                fused=True)
        opt.step()  # some builds only fail at the first step
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise NotImplementedError(f"fused AdamW unsupported here: {exc}") from None
    return opt


def row_adamw_fused(shapes, device):
    return _fused_adamw(make_params(shapes, device)).step, "torch.optim.AdamW(fused=True)"


def row_adamw_fused_norm(shapes, device):
    params = make_params(shapes, device)
    opt = _fused_adamw(params)
    grads = [p.grad for p in params]
    sink = []

    def step():
        sink[:] = [torch.nn.utils.get_total_norm(grads, foreach=True)]
        opt.step()

    return step, ("get_total_norm(foreach=True) + AdamW(fused=True): the peer with a grad-norm "
                  "read, like ShardedAMS's non-finite check")


def row_adamw_fused_clip(shapes, device):
    params = make_params(shapes, device)
    opt = _fused_adamw(params)

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    return step, "clip_grad_norm_(1.0, foreach=True) + AdamW(fused=True): the peer with clipping"


def row_ams_default(shapes, device):
    from sharded_ams.optimizer import default_path

    params = make_params(shapes, device)
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS)
    numel = sum(p.numel() for p in params)
    return opt.step, f"sharded_ams.Grams(params): default path {default_path(device, numel)!r}"


def row_cadam_default(shapes, device):
    params = make_params(shapes, device)
    opt = CAdam(params, lr=LR, betas=BETAS, eps=EPS)
    return opt.step, "sharded_ams.CAdam(params): lam = 0, count + apply, default path"


def row_cadam_count_pass(shapes, device):
    from sharded_ams.kernels.multi import multi_ops
    from sharded_ams.optimizer import default_path

    params = make_params(shapes, device)
    opt = CAdam(params, lr=LR, betas=BETAS, eps=EPS)
    opt.step()  # creates the state
    path = default_path(device, sum(p.numel() for p in params))
    if path not in ("compiled", "triton"):
        raise NotImplementedError(f"CAdam's default path here is {path!r}, not one call")
    _, count, _ = multi_ops(path)
    hp = GroupHParams.from_group(opt.param_groups[0])
    states = [opt.state[p] for p in params]
    gs, ms = [p.grad for p in params], [st["exp_avg"] for st in states]
    sink = []

    def step():
        sink[:] = [count(params, gs, ms, None, None, None, hp)]

    return step, ("CAdam's count pass alone (reads g, m): what the apply pass must wait for; "
                  "it plus ams_default is the two-pass floor")


def row_ams_foreach(shapes, device):
    params = make_params(shapes, device)
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS, foreach=True)
    return opt.step, "sharded_ams.Grams(foreach=True)"


def row_ams_fused_compiled(shapes, device):
    params = make_params(shapes, device)
    backend = "compiled" if device.type == "cpu" else "auto"
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS, fused=backend)
    return opt.step, f"sharded_ams.Grams(fused={backend!r}): one kernel per tensor"


def _triton_runs(device) -> None:
    if not triton_available():
        raise NotImplementedError("needs the triton package")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotImplementedError("needs CUDA, or TRITON_INTERPRET=1 on CPU")


def row_ams_triton(shapes, device):
    _triton_runs(device)
    params = make_params(shapes, device)
    opt = Grams(params, lr=LR, betas=BETAS, eps=EPS, fused="triton")
    return opt.step, "sharded_ams.Grams(fused='triton'): the CUDA default's kernel per tensor"


def row_cadam_triton(shapes, device):
    _triton_runs(device)
    params = make_params(shapes, device)
    opt = CAdam(params, lr=LR, betas=BETAS, eps=EPS, fused="triton")
    return opt.step, "sharded_ams.CAdam(fused='triton'): count + apply kernels per tensor"


def row_flat_compiled(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = torch.randn(numel, generator=gen).to(device)
    g = (torch.randn(numel, generator=gen) * 1e-2).to(device)
    m = torch.zeros(numel, device=device)
    v = torch.zeros(numel, device=device)
    backend = "compiled" if device.type == "cpu" else "triton"
    state = {"step": 0}

    @torch.no_grad()
    def step():
        state["step"] += 1
        flat_step(p, g, m, v, None, None, lr=LR, step=state["step"], hp=GRAMS_HP,
                  backend=backend)

    return step, f"kernels.flat_step(backend={backend!r}) over one flat buffer"


def _sharded(shapes, device, preset: str = "grams", **kw):
    params = make_params(shapes, device)
    grads = [p.grad for p in params]
    opt = ShardedAMS(params, preset=preset, lr=LR, betas=BETAS, eps=EPS, **kw)
    for p, g in zip(params, grads):  # ShardedAMS moved the params into its buffers; the
        p.grad = g                   # first step copies g in, later ones use the views
    return opt


def row_sharded_ams(shapes, device):
    opt = _sharded(shapes, device)
    return step_keeping_grads(opt), (f"ShardedAMS(preset='grams') at world size 1, "
                                      f"backend {opt.backend!r}")


def row_sharded_ams_no_check(shapes, device):
    opt = _sharded(shapes, device, skip_nonfinite=False)
    return step_keeping_grads(opt), ("ShardedAMS(preset='grams', skip_nonfinite=False): no "
                                      "grad-norm pass, the same work as fused AdamW")


def row_sharded_cadam(shapes, device):
    opt = _sharded(shapes, device, preset="cadam")
    return step_keeping_grads(opt), (f"ShardedAMS(preset='cadam') at world size 1, backend "
                                      f"{opt.backend!r}: count (with the norm), apply")


def row_sharded_cadam_clip(shapes, device):
    opt = _sharded(shapes, device, preset="cadam", max_grad_norm=1.0)
    return step_keeping_grads(opt), ("ShardedAMS(preset='cadam', max_grad_norm=1.0): norm, "
                                      "count, apply")


#: a clip limit above these gradients' norm (about 54: 29M elements of 0.01 N(0, 1)): the
#: clipping pass runs, its coefficient is 1, as on most steps of a pre-training run
CLIP_NOT_HIT = 100.0


def _leaf_backward(params, grads) -> Callable[[], None]:
    """A backward that gives every param the same gradient again (autograd adds it into
    the zeroed ``p.grad`` in place and runs the post-accumulate-grad hooks, as a model's
    backward would), from fixed copies of the first gradients."""
    fixed = [g.detach().clone() for g in grads]

    def backward():
        torch.autograd.backward(params, grad_tensors=fixed)
    return backward


def _sharded_after_backward(shapes, device, iteration: bool, **kw):
    """ShardedAMS C-Adam whose gradients come from :func:`_leaf_backward`: ``iteration``
    times zero_grad + backward + step, else step() alone (the backward untimed before)."""
    opt = _sharded(shapes, device, preset="cadam", **kw)
    params = [p for sh in opt.shards for p in sh.buf.params]
    backward = _leaf_backward(params, [p.grad for p in params])

    def before():
        opt.zero_grad()
        backward()

    if iteration:
        def step():
            before()
            opt.step()
        return step
    step = opt.step
    step_fn = lambda: step()  # noqa: E731  (an attribute can ride on it)
    step_fn.before = before
    return step_fn


def row_sharded_cadam_bwd(shapes, device):
    return _sharded_after_backward(shapes, device, False), (
        "ShardedAMS(preset='cadam') step() alone, after a backward that counted (world "
        "size 1: the one bucket is counted in its last hook); the backward untimed")


def row_sharded_cadam_clip_bwd(shapes, device):
    return _sharded_after_backward(shapes, device, False, max_grad_norm=CLIP_NOT_HIT), (
        f"ShardedAMS(preset='cadam', max_grad_norm={CLIP_NOT_HIT:g}) step() alone after a "
        "backward that counted: the norm pass, then the apply pass (the norm is within the "
        "limit, so backward's counts hold); the backward untimed")


def row_sharded_cadam_bwd_iter(shapes, device):
    return _sharded_after_backward(shapes, device, True), (
        "zero_grad + backward (the count in it) + step() of ShardedAMS(preset='cadam')")


def row_sharded_cadam_iter(shapes, device):
    return _sharded_after_backward(shapes, device, True, count_in_backward=False), (
        "the same with count_in_backward=False: the count in step()")


def row_adamw_fused_norm_iter(shapes, device):
    params = make_params(shapes, device)
    opt = _fused_adamw(params)
    backward = _leaf_backward(params, [p.grad for p in params])
    sink = []

    def step():
        opt.zero_grad(set_to_none=False)  # zeroed in place: backward adds into it, as above
        backward()
        sink[:] = [torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)]
        opt.step()

    return step, "zero_grad + the same backward + get_total_norm + AdamW(fused=True)"


def row_sharded_ams_clip(shapes, device):
    opt = _sharded(shapes, device, max_grad_norm=1.0)
    return step_keeping_grads(opt), ("ShardedAMS(preset='grams', max_grad_norm=1.0): norm, "
                                      "then the step with the coefficient in the kernel")


def row_grad_norm_pass(shapes, device):
    opt = _sharded(shapes, device)
    step_keeping_grads(opt)()  # the grads move into the optimizer's buffer
    sink = []

    def step():
        sink[:] = [global_grad_norm(opt.shards, opt.device, lambda t: None, opt.backend)]

    return step, "ShardedAMS's grad-norm pass alone (norm + non-finite test, one read)"


def row_grad_sum(shapes, device):
    opt = _sharded(shapes, device)
    step_keeping_grads(opt)()
    g = opt.shards[0].buf.grad
    sink = []

    def step():
        sink[:] = [g.sum()]

    return step, "g.sum() over the same gradient buffer: the read-bandwidth yardstick"


def _floor_pass(p, g, m, v):
    # one fused loop, in place: reads p, g, m, v (16 B), writes p, m, v (12 B) per element;
    # each output depends only on its own old value and g, so no temporaries are needed
    p.add_(g)
    m.add_(g)
    v.add_(g)


def row_copy_floor(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    p, g, m, v = (torch.randn(numel, device=device) for _ in range(4))
    if device.type == "cpu" and not compile_available():
        raise NotImplementedError("torch.compile unavailable: see copy_floor_eager")
    fn = torch.compile(_floor_pass, dynamic=True, fullgraph=True)

    def step():
        fn(p, g, m, v)

    return step, ("one compiled pass, in place: p += g; m += g; v += g: "
                  "16 B read, 12 B written per element, like the step")


def row_copy_floor_eager(shapes, device):
    numel = sum(math.prod(s) for s in shapes)
    src = [torch.randn(numel, device=device) for _ in range(4)]
    dst = [torch.empty(numel, device=device) for _ in range(3)]
    sink = []

    def step():
        torch._foreach_copy_(dst, src[:3])
        sink[:] = [torch.sum(src[3])]

    return step, "3 fp32 copies (foreach_copy_) + 1 fp32 read (sum): 16 B read, 12 B written"


ROWS: dict[str, Callable] = {
    "adamw_default": row_adamw_default,
    "adamw_foreach": row_adamw_foreach,
    "adamw_fused": row_adamw_fused,
    "adamw_fused_norm": row_adamw_fused_norm,
    "adamw_fused_clip": row_adamw_fused_clip,
    "ams_default": row_ams_default,
    "cadam_default": row_cadam_default,
    "cadam_count_pass": row_cadam_count_pass,
    "ams_foreach": row_ams_foreach,
    "ams_fused_compiled": row_ams_fused_compiled,
    "ams_triton": row_ams_triton,
    "cadam_triton": row_cadam_triton,
    "flat_compiled": row_flat_compiled,
    "sharded_ams": row_sharded_ams,
    "sharded_cadam": row_sharded_cadam,
    "sharded_cadam_clip": row_sharded_cadam_clip,
    "sharded_cadam_bwd": row_sharded_cadam_bwd,
    "sharded_cadam_clip_bwd": row_sharded_cadam_clip_bwd,
    "sharded_cadam_bwd_iter": row_sharded_cadam_bwd_iter,
    "sharded_cadam_iter": row_sharded_cadam_iter,
    "adamw_fused_norm_iter": row_adamw_fused_norm_iter,
    "sharded_ams_no_check": row_sharded_ams_no_check,
    "sharded_ams_clip": row_sharded_ams_clip,
    "grad_norm_pass": row_grad_norm_pass,
    "grad_sum": row_grad_sum,
    "copy_floor": row_copy_floor,
    "copy_floor_eager": row_copy_floor_eager,
}
ROW_NAMES = tuple(ROWS)
#: The torch row doing the same work as a row of ours ("vs peer" = t(peer) / t(row)).
PEERS = {"ams_default": "adamw_fused", "cadam_default": "adamw_fused",
         "ams_foreach": "adamw_foreach", "grad_norm_pass": "grad_sum",
         "ams_fused_compiled": "adamw_fused", "flat_compiled": "adamw_fused",
         "ams_triton": "adamw_fused", "cadam_triton": "adamw_fused",
         "sharded_ams_no_check": "adamw_fused", "sharded_ams": "adamw_fused_norm",
         "sharded_cadam": "adamw_fused_norm", "sharded_cadam_clip": "adamw_fused_clip",
         "sharded_ams_clip": "adamw_fused_clip", "sharded_cadam_bwd": "adamw_fused_norm",
         "sharded_cadam_clip_bwd": "adamw_fused_clip",
         "sharded_cadam_bwd_iter": "adamw_fused_norm_iter",
         "sharded_cadam_iter": "adamw_fused_norm_iter"}

#: The rows whose sum is the floor of an exact two-pass C-Adam step (``cadam_default``).
TWO_PASS_FLOOR = ("cadam_count_pass", "ams_default")
