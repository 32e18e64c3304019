"""``AMS``: the single-process AMS/Grams optimizer, a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import warnings
from itertools import chain
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .config import (DEFAULTS, check_grad, check_params, preset_hparams, validate_group,
                     validate_hparams)
from .dtensor import (CountBatch, LocalParam, describe, dtensor_layout, is_dtensor, is_flat,
                      local, local_param, needs_batch)
from .dtype_shard import follow_params
from .hook_count import HookCounts
from .kernels import (GroupHParams, Piece, flat_apply, flat_count, flat_step, host_scalar,
                      resolve_backend, scaled_scalars, triton_available)
from .kernels.eager import compile_available
from .kernels.foreach import foreach_apply, foreach_count, foreach_moments
from .kernels.tables import RunTable, build_run_table
from .kernels.multi import multi_ops
from .optim_protocols import runs_load_state_dict_hooks, runs_state_dict_hooks
from .update import bias_corrections, lam_is_unit, step_scalars

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_s", "master")
_STRIDED = torch.strided
_REAL_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
#: on CPU, the default path compiles once a group holds this many elements (see default_path)
COMPILE_MIN_NUMEL = 1 << 20


def default_path(device: torch.device, numel: int) -> str:
    """The step path ``AMS`` takes when neither ``fused`` nor ``foreach`` is set: the
    fastest correct one for the device (measured in ``benchmarks/bench_step.py``; the
    reasoning is in ``docs/maths.md``, "Which path runs").

    * CUDA: when triton is importable, ONE Triton launch over all the group's contiguous
      tensors (``kernels/triton_multi.py``; one pass each, no host sync), else
      ``_foreach`` (torch's own CUDA default for AdamW).
    * CPU: when a C++ compiler works and the group holds at least ``COMPILE_MIN_NUMEL``
      elements, ONE torch.compile'd call over all the group's tensors (one loop nest per
      tensor, ``kernels/multi.py``; a call per tensor cost ~0.1 ms each); the first step
      pays the compile (seconds; cached on disk for later runs). Smaller groups, or no
      compiler: ``_foreach``.
    """
    if device.type == "cuda":
        return "triton" if triton_available() else "foreach"
    if device.type == "cpu" and numel >= COMPILE_MIN_NUMEL and compile_available():
        return "compiled"
    return "foreach"


class AMS(Optimizer):
    r"""Adaptive Momentum Scaling (AMS), the family of the Grams paper (Algorithm 1).

    .. math::
        m_t = \beta_1 m + (1-\beta_1) g,\quad v_t = \beta_2 v + (1-\beta_2) g^2,\quad
        s_t = \beta_3 s + (1-\beta_3) g \ (s_t = g \text{ if } \beta_3 = 0) \\
        u = \hat m / (\sqrt{\hat v} + \epsilon),\quad
        w = 1 [u s > 0] + \lambda [u s < 0] + \max(\lambda, 0) [u s = 0] \\
        \hat\eta = \eta\, d / (\#(u s \ge 0) + |\lambda| \#(u s < 0)) \text{ per tensor}
        \ (\hat\eta = \eta \text{ when } |\lambda| = 1) \\
        w_t = w_{t-1} (1 - \hat\eta \gamma) - \hat\eta\, w \odot u

    ``lam=-1, beta3=0`` is Grams, ``lam=0, beta3=0`` Cautious Adam, ``lam=1`` AdamW.
    The per-tensor scale (only for lam not in {1, -1}) counts over each whole
    parameter tensor; a zero denominator leaves the step at eta.

    Args:
        params: parameters or param groups.
        lr: learning rate eta (float or 0-d tensor). Default 1e-3.
        betas: (beta1, beta2) for m and v. Default (0.9, 0.999).
        beta3: EMA factor of the sign reference s; 0 keeps no state (s = g). Default 0.
        lam: negative-momentum scale lambda. Default -1 (Grams).
        eps: added to sqrt(v^) after bias correction, as AdamW. Default 1e-8.
        weight_decay: decoupled weight decay gamma. Default 0.
        foreach: ``True``: the multi-tensor ``_foreach`` path; ``False``: plain ops per
            tensor. Default (neither set): the fastest path for the device, see
            :func:`default_path`.
        fused: single-pass kernel per tensor: ``True``/``"auto"`` (Triton on CUDA,
            torch.compile on CPU) or a backend name ``"triton"``, ``"compiled"``, ``"eager"``.
        count_in_backward: for DTensor params (FSDP2, tensor parallel) with lam not in
            {1, -1} on the default path, count each tensor in its post-accumulate-grad hook
            (on FSDP2 right after its reduce-scatter), so ``step()`` does not read g and m
            twice; used only when it is exactly what the step would count
            (``hook_count.py``). Plain params are never hooked. Default None: CUDA params
            only (there the count can run beside backward's matmuls; on CPU the gloo
            transfers of backward already fill the cores, and it slowed a whole FSDP2
            iteration by ~7% while saving ~30% of the step: ``benchmarks/RESULTS.md``).

    bf16/fp16 params keep an fp32 master copy in the state ("master"); m, v, s are fp32.
    For flat buffers and ZeRO-1 sharding across ranks use :class:`ShardedAMS`.
    """

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = DEFAULTS["lr"],
                 betas: tuple[float, float] = DEFAULTS["betas"], beta3: float = DEFAULTS["beta3"],
                 lam: float = DEFAULTS["lam"], eps: float = DEFAULTS["eps"],
                 weight_decay: float = DEFAULTS["weight_decay"], *,
                 foreach: Optional[bool] = None, fused: Optional[Union[bool, str]] = None,
                 count_in_backward: Optional[bool] = None):
        validate_hparams(lr, betas, beta3, lam, eps, weight_decay)
        if foreach and fused:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, lam=lam, eps=eps,
                        weight_decay=weight_decay, foreach=foreach, fused=fused)
        #: tables built once per layout and kept: run tables, sizes, multi-tensor launches
        self._tables: dict[tuple, Any] = {}
        #: DTensor params' checked layouts and local state views (``dtensor.local_param``)
        self._checked: dict[int, Any] = {}
        #: id(p) -> ``_written(p)`` after this optimizer last wrote p, for the 16-bit params
        #: (fp32 masters), plain or DTensor: another write since (a model.load_state_dict,
        #: an in-place init) makes the next step re-read the master from the param
        self._versions: dict[int, Any] = {}
        #: C-Adam's counts of DTensor params taken during backward (``hook_count.py``)
        self._hook_counts = (HookCounts(self, cuda_only=count_in_backward is None)
                             if count_in_backward is not False else None)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        # torch.optim pickles (and deep-copies) only defaults, state and param_groups; the
        # tables and checked layouts are caches, rebuilt by the copy's first step
        super().__setstate__(state)
        self.__dict__.setdefault("_tables", {})
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("_versions", {})
        self.__dict__.setdefault("_hook_counts", None)  # a copy's params are not hooked

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim, and the group's hyperparameters and params are validated (a
        param listed twice is an error, not torch's warning); a bad group is not added."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*duplicate parameters")
            super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_params(group["params"], group.get("param_names"))
            validate_group(group)
            names, gi = group.get("param_names"), len(self.param_groups) - 1
            for i, p in enumerate(group["params"]):  # a layout it cannot step: say so now
                dtensor_layout(p, describe(names[i] if names else None, i, gi, p))
        except Exception:
            self.param_groups.pop()
            raise
        if self._hook_counts is not None:
            self._hook_counts.register(group["params"])

    def _init_state(self, p: Tensor, beta3: float) -> dict:
        state = self.state[p]
        if not state:
            opts = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
            state["step"] = torch.tensor(0.0)  # on the CPU: read without a device sync
            state["exp_avg"] = torch.zeros_like(p, **opts)
            state["exp_avg_sq"] = torch.zeros_like(p, **opts)
            if beta3 > 0:
                state["exp_avg_s"] = torch.zeros_like(p, **opts)
            if p.dtype != torch.float32:
                state["master"] = p.detach().float().contiguous()
        else:
            if beta3 > 0 and "exp_avg_s" not in state:
                raise RuntimeError("beta3 > 0 but the loaded state has no 'exp_avg_s' "
                                   "(was it saved with beta3 == 0?)")
            if p.dtype != torch.float32 and "master" not in state:
                # state saved from fp32 params, loaded into low-precision ones
                state["master"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One optimizer step. Params without a gradient are skipped (torch.optim convention).
        DTensor params (FSDP2, tensor parallel) are stepped on their local shards; their
        per-tensor counts are summed across ranks in one all-reduce (``dtensor.py``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_scaled(None)
        return loss

    @torch.no_grad()
    def _step_scaled(self, coef: Optional[Tensor]) -> None:
        """The step, every gradient read as ``g * coef`` when ``coef`` (a 0-d fp32 tensor
        on the params' device: a clip coefficient) is given; the gradients are left as they
        are. For ``FSDPAMS``: no pass over the gradients to clip them."""
        # every param of every group checked before anything moves: an error leaves no
        # group half-stepped (the applies of lam not in {1, -1} wait for the last group)
        groups = [(group, GroupHParams.from_group(group), self._local_params(gi, group))
                  for gi, group in enumerate(self.param_groups)]
        batch = CountBatch()
        if self._hook_counts is not None:
            self._hook_counts.start_step()
        try:
            self._step_groups(groups, batch, coef)
        finally:  # the apply moved m: what backward counted is stale either way
            if self._hook_counts is not None:
                self._hook_counts.clear()
        for group, _, params in groups:
            for lp in params:
                if "master" in lp.state:  # 16-bit params (lp.p: a DTensor's local shard)
                    p = group["params"][lp.key[1]]
                    self._versions[id(p)] = _written(p, lp.p)

    def _step_groups(self, groups: list, batch: CountBatch, coef: Optional[Tensor]) -> None:
        for group, hp, params in groups:
            if params:  # one op for every step count (CPU tensors), as torch.optim does
                torch._foreach_add_([lp.state["step"] for lp in params], 1.0)
            # one call per (device, step count); the step is a CPU tensor: no sync to read
            buckets: dict[tuple, list[LocalParam]] = {}
            for lp in params:
                buckets.setdefault((lp.p.device, float(lp.state["step"])), []).append(lp)
            for (device, step), part in buckets.items():
                self._step_bucket(group, hp, part, device, step, batch, coef)
        batch.finish()

    def _local_params(self, gi: int, group: dict) -> list[LocalParam]:
        """The params with a gradient, checked, with their state (created if new) as plain
        tensors: a DTensor's local shard (``dtensor.py``)."""
        hp_beta3, names, out = float(group["beta3"]), group.get("param_names"), []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if not (g.layout is _STRIDED and g.dtype in _REAL_FLOATS and p.dtype in _REAL_FLOATS):
                check_grad(p, names[i] if names else None)  # raises before any state exists
            state = self._init_state(p, hp_beta3)
            if type(g) is Tensor and not is_dtensor(p):
                # the every-step case, plain tensors: nothing to unwrap
                if self._versions.get(id(p), p._version) != p._version:
                    follow_params(state["master"], p.detach())  # p was written since
                out.append(LocalParam(p, g, state, p.numel(), (), (gi, i)))
                continue
            what = describe(names[i] if names else None, i, gi, p)
            lp = local_param(p, state, (gi, i), what, self._checked)
            if "master" in state:  # a DTensor op bumps the wrapper's version, not the shard's
                seen = self._versions.get(id(p))
                if seen is not None and seen != _written(p, lp.p):
                    follow_params(lp.state["master"], lp.p.detach())  # p was written since
            out.append(lp)
        return out

    def _step_bucket(self, group: dict, hp: GroupHParams, params: list, device: torch.device,
                     step: float, batch: CountBatch, coef: Optional[Tensor]) -> None:
        path = self._path(group, device, sum(lp.p.numel() for lp in params))
        if self._is_default(group) and ((path == "compiled" and device.type == "cpu")
                                        or path == "triton"):
            # one call over every contiguous tensor: a compiled loop each on CPU, one Triton
            # launch on CUDA (a call per tensor costs ~0.1 ms on CPU, ~10-20 us on CUDA)
            flat, rest = [], []
            for lp in params:
                (flat if is_flat(lp) else rest).append(lp)
            if flat:
                self._multi_group(group, hp, flat, step, batch, coef, backend=path)
            params = rest
        if not params:
            return
        if path == "foreach":
            self._foreach_group(group, hp, params, step, batch, coef)
        else:
            self._fused_group(group, hp, params, step, batch, coef, backend=path)

    @staticmethod
    def _is_default(group: dict) -> bool:
        return group["fused"] is None and group["foreach"] is None

    @staticmethod
    def _path(group: dict, device: torch.device, numel: int) -> str:
        """"foreach", or a flat_step backend name."""
        fused, foreach = group["fused"], group["foreach"]
        if fused:
            return resolve_backend("auto" if fused is True else fused, device)
        if foreach is False:
            return "eager"
        if foreach is None and fused is None:
            path = default_path(device, numel)
            return path if path == "foreach" else resolve_backend(path, device)
        return "foreach"

    def _foreach_group(self, group, hp: GroupHParams, params: list, step: float,
                       batch: CountBatch, coef: Optional[Tensor]) -> None:
        device = params[0].p.device
        bc1, bc2 = bias_corrections(step, hp.beta1, hp.beta2)
        states = [lp.state for lp in params]
        lowp = [i for i, st in enumerate(states) if "master" in st]
        masters = [st.get("master", lp.p) for lp, st in zip(params, states)]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        ss = [st["exp_avg_s"] for st in states] if hp.beta3 > 0 else None
        kw = dict(lr=host_scalar(group["lr"], device), bc1=bc1, bc2=bc2, lam=hp.lam,
                  eps=hp.eps, wd=hp.weight_decay)

        def finish(counts=None) -> None:
            foreach_apply(masters, grads, ms, vs, ss, None, counts=counts,
                          numels=[lp.numel for lp in params], **kw)
            if lowp:
                torch._foreach_copy_([params[i].p for i in lowp],
                                     [states[i]["master"] for i in lowp])

        grads = foreach_moments([lp.grad for lp in params], ms, vs, ss, beta1=hp.beta1,
                                beta2=hp.beta2, beta3=hp.beta3, coef=coef)
        if not needs_batch(params, hp.lam):
            finish()
            return
        counts = foreach_count(ms, ss if ss is not None else grads)
        for lp, c in zip(params, counts):
            batch.add([lp], c.view(1))
        batch.defer(lambda: finish(counts))

    def _multi_group(self, group, hp: GroupHParams, params: list, step: float,
                     batch: CountBatch, coef: Optional[Tensor], *, backend: str) -> None:
        """Every tensor in one call (``kernels/multi.py``: compiled on CPU, Triton on CUDA);
        with lam not in {1, -1} a count call, the counts summed across ranks where a tensor
        is split (``batch``), then an apply call."""
        fused_step, count, apply = multi_ops(backend)
        states = [lp.state for lp in params]
        ps = [st.get("master", lp.p) for lp, st in zip(params, states)]
        outs = [lp.p if "master" in st else None for lp, st in zip(params, states)]
        gs = [lp.grad for lp in params]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        ss = [st["exp_avg_s"] for st in states] if hp.beta3 > 0 else None
        lr = host_scalar(group["lr"], ps[0].device)
        if lam_is_unit(hp.lam):
            bc1, bc2 = bias_corrections(step, hp.beta1, hp.beta2)
            fused_step(ps, gs, ms, vs, ss, outs, step_scalars(lr, bc1, bc2, hp.weight_decay),
                       hp, cache=self._tables, coef=coef)
            return
        # backward counted the gradients as they are, not scaled by coef
        counts = None if self._hook_counts is None or coef is not None else \
            self._hook_counts.take(group, params, hp, backend)
        if counts is None:
            counts = count(ps, gs, ms, vs, ss, outs, hp, cache=self._tables, coef=coef)
        numels = self._numels(tuple(lp.numel for lp in params), counts.device)

        def finish() -> None:
            apply(ps, gs, ms, vs, ss, outs, scaled_scalars(lr, step, numels, counts, hp, backend),
                  hp, cache=self._tables, coef=coef)

        if not needs_batch(params, hp.lam):
            finish()
            return
        batch.add(params, counts)
        batch.defer(finish)

    def _numels(self, numels: tuple, device: torch.device) -> Tensor:
        """The whole tensors' sizes (the scale's d) on the counts' device, copied once per
        list and kept by this optimizer: no host-to-device copy per step."""
        key = (numels, device)
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = torch.tensor(numels, dtype=torch.int64, device=device)
        return t

    def _fused_group(self, group, hp: GroupHParams, params: list, step: float,
                     batch: CountBatch, coef: Optional[Tensor], *, backend: str) -> None:
        deferred = needs_batch(params, hp.lam)
        for lp in params:
            p, st = lp.p, lp.state
            master = st.get("master", p)
            work = master if master.is_contiguous() else master.contiguous()
            out = p if "master" in st and p.is_contiguous() else None
            vecs = (work.view(-1), lp.grad.contiguous().view(-1), st["exp_avg"].view(-1),
                    st["exp_avg_sq"].view(-1),
                    st["exp_avg_s"].view(-1) if "exp_avg_s" in st else None)
            outv = out.view(-1) if out is not None else None
            table = None if lam_is_unit(hp.lam) else self._run_table(p.numel(), lp.numel,
                                                                      p.device)
            if deferred:
                table, counts = flat_count(*vecs[1:], hp=hp, num_tensors=1, backend=backend,
                                           table=table, coef=coef)
                batch.add([lp], counts[:1])
                batch.defer(functools.partial(
                    self._apply_one, vecs, outv, group["lr"], step, hp, table, counts,
                    backend, (p, st, master, work, out), coef))
                continue
            flat_step(*vecs, outv, lr=group["lr"], step=step, hp=hp, num_tensors=1,
                      backend=backend, table=table, coef=coef)
            self._write_back(p, st, master, work, out)

    def _run_table(self, n: int, numel: int, device: torch.device) -> RunTable:
        """The table of a one-tensor run (lam not in {1, -1}), built once per (local size,
        full size, device) and kept by this optimizer: no cache to miss, so no rebuild
        (a host-to-device copy) per step however many params."""
        key = (n, numel, device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = build_run_table((Piece(0, n, 0, numel),), n, 1, device)
        return table

    @classmethod
    def _apply_one(cls, vecs, outv, lr, step, hp, table, counts, backend, back,
                   coef) -> None:
        flat_apply(*vecs, outv, lr=lr, step=step, hp=hp, table=table, counts=counts,
                   backend=backend, coef=coef)
        cls._write_back(*back)

    @staticmethod
    def _write_back(p: Tensor, st: dict, master: Tensor, work: Tensor,
                    out: Optional[Tensor]) -> None:
        if work is not master:
            master.copy_(work)
        if "master" in st and out is None:
            p.copy_(master)
        elif "master" not in st and work is not p:
            p.copy_(work)

    def _follow_written_params(self) -> None:
        """16-bit params written since this optimizer last stepped them (a model load, an
        in-place init): their fp32 masters follow them now, as the next step would, so a
        save (and a state-dict hook) holds the weights that step starts from."""
        if not self._versions:
            return
        for group in self.param_groups:
            for p in group["params"]:
                seen, shard = self._versions.get(id(p)), local(p)
                if seen is not None and seen != _written(p, shard) and "master" in self.state[p]:
                    follow_params(local(self.state[p]["master"]), shard.detach())
                    self._versions[id(p)] = _written(p, shard)

    @runs_state_dict_hooks(settle=_follow_written_params)
    def state_dict(self) -> dict[str, Any]:
        """As torch.optim (its four state-dict hook kinds included), the masters first
        following weights written since the last step."""
        return super().state_dict()

    @runs_load_state_dict_hooks
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim (pre-hooks see the whole dict and may replace it; post-hooks see
        the loaded state), but optimizer state stays fp32 whatever the param dtype."""
        saved = state_dict["state"]
        pairs = self._check_saved_state(state_dict)  # before anything changes: a refused
        super().load_state_dict({**state_dict, "state": {}})  # load leaves the state as it was
        self._versions.clear()  # the loaded masters are the weights to step from
        for group in self.param_groups:  # groups saved by another optimizer lack our keys
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for pid, p in pairs:
            self.state[p] = {k: torch.as_tensor(v, dtype=torch.float32).clone() if k == "step"
                             else v.to(device=p.device, dtype=torch.float32).clone()
                             for k, v in saved[pid].items()}

    def _check_saved_state(self, state_dict: dict) -> list:
        """(saved id, param) of every saved state, each entry checked: keys this optimizer
        keeps, the param's shape and sharding. Groups that do not match in number or size
        are left to torch.optim's own check (its error)."""
        saved_groups, groups = state_dict["param_groups"], self.param_groups
        if len(saved_groups) != len(groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups)):
            return []  # torch.optim's load_state_dict raises
        saved = state_dict["state"]
        ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in groups)
        pairs = [(pid, p) for pid, p in zip(ids, params) if pid in saved]
        for pid, p in pairs:
            for k, v in saved[pid].items():
                if k != "step" and k not in STATE_KEYS:
                    raise KeyError(f"Unexpected optimizer state {k!r} for param {pid}: "
                                   "was this state_dict saved by a different optimizer?")
                if k == "step":
                    continue
                if is_dtensor(v) != is_dtensor(p):  # step() would fail in DTensor dispatch
                    raise ValueError(
                        f"State {k!r} of param {pid} is {_kind(v)}, the param is "
                        f"{_kind(p)}: this state_dict was saved with another sharding. "
                        "Move between FSDP/TP and plain params through "
                        "torch.distributed.checkpoint.state_dict's get/set_optimizer_state_dict "
                        "(full_state_dict) or `sharded-ams ckpt consolidate`")
                if v.shape != p.shape:
                    raise ValueError(f"State {k!r} of param {pid} has shape {tuple(v.shape)}, "
                                     f"the param has {tuple(p.shape)}")
        return pairs


def _kind(t: Tensor) -> str:
    return "a DTensor" if is_dtensor(t) else "a plain tensor"


def _written(p: Tensor, shard: Tensor) -> Union[int, tuple[int, int]]:
    """What a write to ``p`` changes: its version; for a DTensor (``shard`` its local
    tensor) the wrapper's and the shard's, as an in-place DTensor op (a model's
    load_state_dict) bumps only the wrapper's, a write to ``to_local()`` (and this
    optimizer's own) only the shard's."""
    return p._version if shard is p else (p._version, shard._version)


def _preset(name: str, doc: str):
    fixed = preset_hparams(name)

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = DEFAULTS["lr"],
                 betas: tuple[float, float] = DEFAULTS["betas"], eps: float = DEFAULTS["eps"],
                 weight_decay: float = DEFAULTS["weight_decay"], **kwargs):
        AMS.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     **fixed, **kwargs)

    return type(name.capitalize() if name != "cadam" else "CAdam", (AMS,),
                {"__init__": __init__, "__doc__": doc})


Grams = _preset("grams", "AMS with beta3=0, lam=-1: Grams, u^ = sign(g) |u| (zero grad: no move).")
CAdam = _preset("cadam", "AMS with beta3=0, lam=0: Cautious Adam, masked and rescaled per tensor.")
AdamW = _preset("adamw", "AMS with lam=1: AdamW (equal to torch.optim.AdamW to fp32 rounding).")
AdamW.__name__ = AdamW.__qualname__ = "AdamW"
