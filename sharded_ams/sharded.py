"""``ShardedAMS``: ZeRO-1 AMS over torch.distributed, with flat buffers and no DDP wrapper.

Per step, for each dtype buffer and bucket: reduce the gradients to their owner
(reduce-scatter; all-reduce on gloo), one small all-reduce for the global grad norm
(clipping and the non-finite check: every rank skips together, decided on the device),
the fused AMS step on the local shard (fp32 masters, m, v[, s]), and an all-gather of the
params. With ``overlap=True`` (default) the reductions run during backward and the
gathers during the next forward (``bucket_sync.py``); the maths is the same bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backward_count import BackwardCounts
from .bucket_sync import BucketSync, SyncStats, quiesce_owners
from .collectives import COLLECTIVES, Comm, bytes_of
from .config import DEFAULTS, check_params, preset_hparams, validate_hparams
from .kernels import resolve_backend
from .dtype_shard import DtypeShard, follow_params
from .layout import BufferLayout, default_bucket_numel
from .model_parallel import ModelParallel, resolve_groups
from .optim_protocols import refuse_grad_scaler, runs_load_state_dict_hooks, runs_state_dict_hooks
from .param_guards import (frozen_params, refuse_grads_of_frozen, refuse_sparse_modules,
                           watch_model_loads)
from .shard_step import (StepInfo, clip_coef, global_grad_norm, norm_in_count, step_shards,
                         step_shards_norm_in_count)
from .state_records import check_compatible, check_covered, fill_piece, records_by_name

STATE_FORMAT_VERSION = 1

LOW_PRECISION = (torch.bfloat16, torch.float16)


class ShardedAMS(Optimizer):
    """ZeRO-1 AMS/Grams: optimizer state split across the ranks of ``process_group``.

    Args:
        params: an ``nn.Module`` (its trainable parameters, named), or params / param groups
            as for any torch optimizer. Params are moved into flat buffers (their
            ``.data`` becomes a view); frozen params (``requires_grad=False``) are left alone.
        process_group: data-parallel group (default: the world; none initialised: world size 1).
        device_mesh: instead of ``process_group``, a DeviceMesh with a dimension named
            ``"dp"`` (sharded over) and model-parallel ones (e.g. ``("dp", "tp")``). Params
            may be tensor-parallel DTensors (``parallelize_module`` on the ``tp`` sub-mesh)
            with either argument: each rank's local shard is sharded again over dp, and the
            grad norm, the non-finite skip and the per-tensor counts cover the whole grid
            (``model_parallel.py``; docs/parallelism.md). Plain params of such a model
            are taken to be replicated over the tp ranks.
        preset: ``"grams"``, ``"cadam"`` or ``"adamw"`` set (beta3, lam).
        lr, betas, beta3, lam, eps, weight_decay: as :class:`AMS`.
        max_grad_norm: clip the global grad norm (as ``clip_grad_norm_`` on the full grads).
        skip_nonfinite: skip the step on every rank when any gradient is inf/NaN.
        bucket_numel: elements per communication bucket: ``"auto"`` (default: with overlap
            :func:`sharded_ams.layout.default_bucket_numel` of the backend and world size,
            NCCL max(6.55M, 1M x N); without it one bucket per dtype), None (one bucket per
            dtype) or a number.
        backend: step kernel: "auto", "triton", "compiled" or "eager".
        broadcast_params: copy rank 0's initial params to every rank, as DDP does.
        state_dtype: storage of m, v[, s]: ``torch.float32`` (default) or ``torch.bfloat16``
            (halves their memory; the maths stays fp32, values are rounded on store;
            masters stay fp32). See ``docs/maths.md`` for the measured effect.
        overlap: reduce each bucket's gradients during backward, as soon as backward has
            produced them all, and wait for each bucket's param all-gather in the next
            forward, just before the first module that uses it (default True; for equal
            ``bucket_numel`` bitwise the same results as False). See docs/sharding.md.
        count_in_backward: with overlap and |lam| != 1 (C-Adam), count each bucket's
            signs as soon as its reduction finishes in backward, not in ``step()``
            (default True; bitwise the same results, used only when still exact:
            ``backward_count.py``; with ``max_grad_norm``, on steps it does not clip).
            No effect without overlap.
        grad_reduce_dtype: dtype gradients of bf16/fp16 params are accumulated and reduced
            in: None or ``torch.float32`` (default: fp32, as Megatron's
            ``grad_reduce_in_fp32``; ``p.grad`` is then None after backward, the gradient
            lives in the optimizer's fp32 buffer) or the params' own dtype (today's
            16-bit reduction: half the bytes). fp32 params always reduce in fp32.
        module: the model, when ``params`` are params or groups rather than the module
            itself: its parameter order sets the bucket order, and its modules get the
            forward pre-hooks that overlap the param gather (without it the gather is
            waited for at the end of ``step()``).
        param_sync_modules: submodules of the model (e.g. its transformer blocks) that each
            wait for the param gather of every param under them, in one forward pre-hook,
            instead of one hook per module that owns params: under ``torch.compile`` every
            hook is a graph break, so this leaves one per block (docs/sharding.md). Params
            under none of them keep their own module's hook. A param under one of them
            must be read only inside its forward.
        collectives: ``"auto"`` (default: all-reduce + broadcasts on gloo, reduce-scatter +
            all-gather elsewhere), ``"reduce_scatter"`` (NCCL's path, also on gloo: tests
            run it on CPU) or ``"all_reduce"``. The results are the same up to the
            backend's summation order; see docs/sharding.md.

    Use it in place of both DDP and the optimizer: ``loss.backward(); opt.step();
    opt.zero_grad()``; for gradient accumulation run every micro-batch's backward but the
    last under :meth:`no_sync`. Gradients are averaged over ranks. A param that got no
    gradient on any rank is treated as having a zero gradient (as DDP + AdamW do).
    ``step()`` consumes the gradients: afterwards every ``p.grad`` is None, on every
    collective path (the next backward starts afresh; read the norm from
    :attr:`last_step`). Read params outside a forward only after :meth:`finish_param_sync`.
    """

    def __init__(self, params: Union[nn.Module, Iterable], process_group: Optional[Any] = None,
                 *, preset: Optional[str] = None, lr: Union[float, Tensor] = DEFAULTS["lr"],
                 betas: tuple[float, float] = DEFAULTS["betas"], beta3: Optional[float] = None,
                 lam: Optional[float] = None, eps: float = DEFAULTS["eps"],
                 weight_decay: float = DEFAULTS["weight_decay"],
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = True,
                 bucket_numel: Union[int, str, None] = "auto", backend: str = "auto",
                 broadcast_params: bool = True, state_dtype: torch.dtype = torch.float32,
                 overlap: bool = True, grad_reduce_dtype: Optional[torch.dtype] = None,
                 module: Optional[nn.Module] = None,
                 param_sync_modules: Optional[Iterable[nn.Module]] = None,
                 collectives: str = "auto", device_mesh: Optional[Any] = None,
                 count_in_backward: bool = True):
        fixed = preset_hparams(preset) if preset else {}
        if fixed and (beta3 is not None or lam is not None):
            raise ValueError(f"preset={preset!r} fixes beta3 and lam; do not pass them too")
        beta3 = fixed.get("beta3", DEFAULTS["beta3"] if beta3 is None else beta3)
        lam = fixed.get("lam", DEFAULTS["lam"] if lam is None else lam)
        validate_hparams(lr, betas, beta3, lam, eps, weight_decay)
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype} (use torch.float32 or torch.bfloat16)")
        if bucket_numel != "auto" and bucket_numel is not None and (
                isinstance(bucket_numel, (str, bool)) or bucket_numel < 1):
            raise ValueError(f"Invalid bucket_numel: {bucket_numel!r}")
        if collectives not in COLLECTIVES:
            raise ValueError(f"Invalid collectives: {collectives!r} (use one of {COLLECTIVES})")
        if grad_reduce_dtype not in (None, torch.float32) + LOW_PRECISION:
            raise ValueError(f"Invalid grad_reduce_dtype: {grad_reduce_dtype} (use None, "
                             "torch.float32 or the params' 16-bit dtype)")
        names: dict[int, str] = {}
        if isinstance(params, nn.Module):
            module = params
            params = [p for p in module.parameters() if p.requires_grad]
        if module is not None:
            names = {id(p): n for n, p in module.named_parameters()}
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, lam=lam, eps=eps,
                        weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self._sync: Optional[BucketSync] = None
        process_group, self._mp_mesh = resolve_groups(process_group, device_mesh)
        self._comm_args = (process_group, collectives)  # the Comm is made once the device is known
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.overlap, self.grad_reduce_dtype = overlap, grad_reduce_dtype
        self.count_in_backward = count_in_backward
        self._names: dict[Tensor, str] = {}
        seen: set[int] = set()
        for gi, group in enumerate(self.param_groups):
            check_params(group["params"])
            validate_hparams(group["lr"], group["betas"], group["beta3"], group["lam"],
                             group["eps"], group["weight_decay"])
            pnames = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = names.get(id(p)) or (pnames[i] if pnames else f"group{gi}.param{i}")
                if id(p) in seen:
                    raise ValueError(f"Parameter {name!r} appears twice in the param groups")
                seen.add(id(p))
                self._names[p] = name
        if module is not None:
            refuse_sparse_modules(module, self._names)
        elif param_sync_modules is not None:
            raise ValueError("param_sync_modules needs the model (pass it as params or module=)")
        param_sync_modules = list(param_sync_modules or ())
        if module is not None and not {id(m) for m in param_sync_modules} <= {
                id(m) for m in module.modules()}:
            raise ValueError("param_sync_modules must be submodules of the model")
        self.state_dtype = state_dtype
        self._sync_modules = param_sync_modules
        self._build(bucket_numel, backend, broadcast_params, module)

    def add_param_group(self, param_group: dict) -> None:
        """Only while constructing: the flat buffers are laid out once, for the groups
        given to the constructor."""
        if "shards" in self.__dict__:
            raise NotImplementedError(
                "ShardedAMS lays out its flat buffers for the param groups it is built "
                "with; add_param_group afterwards would leave the new params untrained. "
                "Build a new ShardedAMS with every group (its state_dict loads into it)")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        raise TypeError("ShardedAMS cannot be pickled or deep-copied: it owns the model's flat "
                        "param and grad buffers and a process group. Save its state_dict() "
                        "and load it into a ShardedAMS built on the copy of the model")

    _step_supports_amp_scaling = True  # GradScaler.step hands the step over: refused in step()

    # ------------------------------------------------------------------ layout
    def _build(self, bucket_numel: Union[int, str, None], backend: str, broadcast: bool,
               module: Optional[nn.Module]) -> None:
        trained = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]
                   if p.requires_grad]
        if len({p.device for _, p in trained}) > 1:
            raise ValueError("ShardedAMS needs all trainable params on one device")
        self.device = trained[0][1].device if trained else torch.device("cpu")
        self.comm = Comm(self._comm_args[0], self.device, self._comm_args[1])
        self.mp = ModelParallel.of([p for _, p in trained], self._names, self.comm.group,
                                   self._mp_mesh, self.device)
        # one buffer per (dtype, model-parallel dims the params are replicated over)
        by_dtype: dict[tuple, list[tuple[int, Tensor]]] = {}
        for gi, p in trained:
            by_dtype.setdefault((p.dtype, self.mp.replicated_dims(p)), []).append((gi, p))
        # an older optimizer on these params may still write them (gather) or their grads
        quiesce_owners(p for items in by_dtype.values() for _, p in items)
        # fill order: the order gradients are expected in backward, the reverse of the
        # module's parameter order (params the module does not hold come last)
        rank_in_module = {id(p): i for i, p in enumerate(module.parameters())} if module else {}
        listed = [p for _, items in by_dtype.items() for _, p in items]
        fwd = sorted(listed, key=lambda p: rank_in_module.get(id(p), len(rank_in_module)))
        fill_pos = {id(p): len(fwd) - 1 - i for i, p in enumerate(fwd)}
        if bucket_numel == "auto":
            bucket_numel = default_bucket_numel(self.comm.backend, self.comm.world_size) \
                if self.overlap and self.comm.active else None
        self.bucket_numel = bucket_numel
        grad_dtypes = {dtype: self._grad_dtype(dtype) for dtype, _ in by_dtype}
        self.backend = resolve_backend(backend, self.device)  # before any collective
        with_s = any(g["beta3"] > 0 for g in self.param_groups)
        groups_of = {id(p): gi for items in by_dtype.values() for gi, p in items}
        specs = []
        for (dtype, rdims), items in sorted(by_dtype.items(),
                                            key=lambda kv: (str(kv[0][0]), kv[0][1])):
            ordered = sorted((p for _, p in items), key=lambda p: fill_pos[id(p)])
            specs.append((dtype, rdims, ordered))
        self.comm.check_same("the params and optimizer settings", self._fingerprint(specs),
                             self.device)
        self.shards: list[DtypeShard] = []
        for dtype, rdims, ordered in specs:
            spec = [(self._names[p], ModelParallel.local_shape(p), groups_of[id(p)])
                    for p in ordered]
            layout = BufferLayout.build(spec, self.comm.world_size, bucket_numel)
            by_name = {self._names[p]: p for p in ordered}
            shard = DtypeShard(layout, [by_name[s.name] for s in layout.slots], dtype,
                                self.device, self.comm.rank, with_s, self.state_dtype,
                                grad_dtypes[dtype])
            shard.runs = layout.runs(self.comm.rank, range(len(self.param_groups)))
            if self.mp.mesh is not None:
                shard.counted = self.mp.counted(rdims)
                shard.numels = torch.tensor([by_name[s.name].numel() for s in layout.slots]
                                            + [0], dtype=torch.int64, device=self.device)
            self.shards.append(shard)
        if self.mp.mesh is not None:
            self._count_mask = torch.cat([torch.full((len(sh.layout.slots) + 1,),
                                                     int(sh.counted), dtype=torch.int64,
                                                     device=self.device) for sh in self.shards])
            self.mp.check_same("the buffers' params (the count vector lines up across "
                               "model-parallel ranks)", [f"{s.name}@{i}" for i, sh in
                               enumerate(self.shards) for s in sh.layout.slots], self.device)
        if broadcast and (self.comm.active or self.mp.active):
            for h in [self.comm.broadcast(sh.buf.param) for sh in self.shards]:
                h.wait()  # then the tp copies of replicated params: rank 0's too
            self.mp.broadcast_replicated([sh.buf.param for sh in self.shards],
                                         [rd for _, rd, _ in specs])
            for sh in self.shards:  # masters follow the broadcast params
                if sh.own_master:
                    for b in range(len(sh.layout.buckets)):
                        sh.master_view(b).copy_(sh.param_shard(b))
        for group in self.param_groups:  # step counts live on the device (no host sync)
            group["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                         device=self.device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_step = StepInfo()
        self._sync = BucketSync(self.shards, self.comm, fill_pos, self._names, self.overlap)
        self._sync.register_grad_hooks(
            collect_in_hook=self.overlap or any(sh.buf.main_grad for sh in self.shards))
        if module is not None:
            self._sync.register_module_hooks(module, self._sync_modules)
        self._bwd = None
        if self.overlap and self.count_in_backward:
            self._bwd = BackwardCounts(self.shards, self.param_groups, self.device,
                                       self.backend, [len(sh.layout.slots) + 1
                                                      for sh in self.shards])
            self._sync.on_reduced = self._bwd.count_bucket
            self._bwd.set_policy(self.max_grad_norm, self.skip_nonfinite)
        self._frozen = frozen_params(self.param_groups, module, trained, self._names)
        # 16-bit params' fp32 masters follow writes to the params behind the optimizer
        # (``_refresh_masters``): a model load any time, any in-place write before step 1
        self._masters_stale = False
        self._versions = self._param_versions()
        if module is not None and any(sh.own_master for sh in self.shards):
            watch_model_loads(module, self, {id(p) for _, p in trained}, self._sync.keep_hook)

    def _grad_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in LOW_PRECISION or self.grad_reduce_dtype in (None, torch.float32):
            return torch.float32 if dtype in LOW_PRECISION else dtype
        if self.grad_reduce_dtype != dtype:
            raise ValueError(f"grad_reduce_dtype={self.grad_reduce_dtype} does not match the "
                             f"{dtype} params: use None (fp32) or {dtype}")
        return dtype

    def _fingerprint(self, specs: list) -> list[str]:
        """What every rank must agree on: params (names, shapes, dtypes, groups, order),
        group hyperparameters and the optimizer's options."""
        items = [f"world_size={self.comm.world_size}", f"model_parallel={self.mp.describe()}"]
        for dtype, _, ordered in specs:
            items += [f"param {self._names[p]!r}: shape {tuple(p.shape)}, {dtype}" for p in ordered]
        for gi, g in enumerate(self.param_groups):
            hp = {k: float(g[k]) if k != "betas" else tuple(map(float, g[k]))
                  for k in ("lr", "betas", "beta3", "lam", "eps", "weight_decay")}
            items.append(f"group {gi}: {hp}, params "
                         f"{[self._names[p] for p in g['params'] if p.requires_grad]}")
        items.append(f"options: max_grad_norm={self.max_grad_norm}, skip_nonfinite="
                     f"{self.skip_nonfinite}, bucket_numel={self.bucket_numel}, state_dtype="
                     f"{self.state_dtype}, overlap={self.overlap}, grad_reduce_dtype="
                     f"{self.grad_reduce_dtype}, collectives={self.comm.path}")
        return items

    # ------------------------------------------------------------------ sync API
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside this context accumulate gradients locally without
        starting their reduction (as DDP's ``no_sync``): run every micro-batch but the last
        of an optimizer step under it. Without overlap the reduction happens in ``step()``
        anyway, so it changes nothing there but is always safe to use."""
        with self._sync.no_sync():
            yield

    def finish_param_sync(self) -> None:
        """Wait until every parameter holds its gathered value. Call before reading params
        outside a forward (evaluation by hand, checkpoints, export); forwards through the
        module, ``state_dict()`` / ``load_state_dict()`` of the module or this optimizer
        wait by themselves. A no-op when no gather is pending."""
        self._sync.finish_param_sync()

    def close(self) -> None:
        """Detach from the params: remove this optimizer's backward and forward hooks (they
        would otherwise keep collecting gradients). Call it before training the same params
        with another optimizer; this one cannot step afterwards. A new ShardedAMS built on
        the same params closes the old one itself."""
        self._sync.finish_param_sync()
        self._sync.abandon_grad_sync()
        self._sync.remove_hooks()

    @property
    def sync_stats(self) -> SyncStats:
        """Host time blocked on communication, by where (see :class:`SyncStats`)."""
        return self._sync.stats

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (reading it is a host sync)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped.fill_(int(value))

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients: the flat grad buffers (fp32 params: grads stay views into
        them; ``set_to_none`` is ignored), after waiting for reductions still running."""
        self._sync.abandon_grad_sync()
        if self._bwd is not None:
            self._bwd.discard()
        for sh in self.shards:
            sh.buf.zero_grad()

    def _reduce_small(self, t: Tensor) -> None:
        """All-reduce a small tensor (the squared norm, the per-tensor counts) and wait."""
        self._sync.wait_small(self.comm.all_reduce(t))

    def _reduce_counts(self, counts: Tensor) -> None:
        """All-reduce the step's per-tensor count vector (shard_step.step_shards) over dp,
        and over the model-parallel dims: copies another rank counts are zeroed first."""
        if self.mp.active:
            counts.mul_(self._count_mask)
        self.mp.reduce(counts, self._reduce_small)

    def _reduce_with_error_flag(self, t: Optional[Tensor]) -> None:
        """All-reduce the small tensor ``t`` in place (None: nothing else to reduce) with the
        ranks' error flags riding along (no extra collective), and raise on every rank if
        one failed (bucket_sync.py, "Misuse"). With model parallelism both are summed over
        the whole dp x mp grid, so every rank of it skips and raises together."""
        flag = self._sync.error_flag(self.device)
        if flag is None:
            if t is not None:
                self.mp.reduce(t, self._reduce_small)
            return
        both = flag.reshape(1) if t is None else torch.cat([t.reshape(-1), flag.reshape(1)])
        self.mp.reduce(both, self._reduce_small)
        self._sync.raise_if_failed(both[-1])
        if t is not None:
            t.copy_(both[:-1].reshape(t.shape))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Reduce grads, clip, check, update the local shard, gather params. Returns the
        closure's loss; :attr:`last_step` says the grad norm and whether it was skipped.

        Clipping and the non-finite skip are decided on the device; the only host reads
        are the ranks' error flag at world size > 1 (bucket_sync.py, "Misuse") and, where
        a read is free or that one was made, whether a clipped C-Adam step's coefficient
        is 1 (``BackwardCounts.unclipped``)."""
        refuse_grad_scaler(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sync.closed:
            raise RuntimeError("This ShardedAMS was closed, or replaced by another one built "
                               "on the same params; step the new one")
        refuse_grads_of_frozen(self._frozen)
        self._refresh_masters()
        self._versions = None
        fold = self.skip_nonfinite and self.max_grad_norm is None and norm_in_count(
            self.param_groups)  # the count pass reads g: the norm rides on it
        pre = None if self._bwd is None else self._bwd.take(fold)  # before late reductions
        self._sync.finish_grad_sync()
        norm = skip = coef = None
        if fold:
            norm = step_shards_norm_in_count(self.shards, self.param_groups, self.device,
                                             self.backend, self._reduce_with_error_flag,
                                             self._count_mask if self.mp.active else None,
                                             pre=pre)
            skip = ~torch.isfinite(norm)
            self._finish_step(norm, skip, pre)
            return loss
        if self.max_grad_norm is None and not self.skip_nonfinite:
            self._reduce_with_error_flag(None)  # world size > 1: the ranks' error flags
        else:  # one read of the gradients gives the norm and the non-finite test
            norm = global_grad_norm(self.shards, self.device, self._reduce_with_error_flag,
                                    self.backend)
            if self.skip_nonfinite:
                skip = ~torch.isfinite(norm)
            if self.max_grad_norm is not None:  # applied inside the step's kernels
                coef = clip_coef(norm, self.max_grad_norm)
                if pre is not None and not self._bwd.unclipped(coef, self.comm.active):
                    pre = None  # backward counted g, the step counts g * coef
        for group in self.param_groups:
            group["step"] += 1 if skip is None else (~skip).float()
        step_shards(self.shards, self.param_groups, self.device, self.backend, skip,
                    self._reduce_counts, coef, pre=pre)
        self._finish_step(norm, skip, pre)
        return loss

    def _finish_step(self, norm: Optional[Tensor], skip: Optional[Tensor],
                     pre: Optional[Any] = None) -> None:
        """After the update: gradients consumed, the param gathers launched, the record
        (``pre``: what the step took from backward's counts)."""
        for sh in self.shards:
            sh.buf.consumed()
        if skip is not None:
            self._skipped += skip
        self._sync.start_param_sync()
        self._sync.stats.steps += 1
        if pre is not None:
            self._sync.stats.counted_in_backward += len(pre.done)
        self.last_step = StepInfo(norm, skip)
        if self._bwd is not None:  # what the next backward counts (clipping may change)
            self._bwd.set_policy(self.max_grad_norm, self.skip_nonfinite)

    def _param_versions(self) -> list[int]:  # each param's: ``.data`` views keep their own
        return [p._version for sh in self.shards for p in sh.buf.params]

    def _refresh_masters(self) -> None:
        """Pending gathers waited for (also unused params', which no forward waited for),
        then 16-bit params' fp32 masters follow the params where something else wrote them
        (``_build``, ``follow_params``; fp32 params' buffer is their master). Nothing is read
        or allocated when nothing was written (a save stays free of device memory). Versions
        are compared only until the first step: then its own gathers write the params too."""
        self._sync.finish_param_sync()
        if self._versions is not None and self._versions != self._param_versions():
            self._masters_stale = True
        if not self._masters_stale:
            return
        for sh in self.shards:
            if sh.own_master:
                for b in range(len(sh.layout.buckets)):
                    follow_params(sh.master_view(b), sh.param_shard(b))
        self._masters_stale = False

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (m, v[, s], separate fp32 masters)."""
        return sum(bytes_of(t) for sh in self.shards for t in sh.state.values())

    def param_names(self) -> list[str]:
        return [self._names[p] for g in self.param_groups for p in g["params"]]

    @runs_state_dict_hooks(settle=_refresh_masters)  # torch's hooks, seeing the settled state
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard in the unpadded per-parameter index space (see docs/checkpoint.md).

        Pieces are (name, offset, length) ranges of each param with their state; any set
        of pieces covering every param loads on any world size. The tensors are host copies
        (pinned when the state is on a GPU), copied straight from the state and complete on
        return: a save needs no device memory (a clone first would need 12-16 bytes per
        local element)."""
        from .checkpoint.snapshot import copy_to_host  # here: `import sharded_ams` stays light

        groups = []
        for g in self.param_groups:
            hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            hp["lr"] = float(hp["lr"]) if isinstance(hp["lr"], Tensor) else hp["lr"]
            hp["step"] = int(hp["step"])
            hp["params"] = [self._names[p] for p in g["params"] if p.requires_grad]
            groups.append(hp)
        params, pieces = {}, []
        for sh in self.shards:
            for slot in sh.layout.slots:
                params[slot.name] = {"shape": list(slot.shape), "dtype": str(sh.buf.dtype),
                                     "group": slot.group}
            for pc in sh.layout.pieces(self.comm.rank):
                rec = {"name": pc.slot.name, "offset": pc.param_offset, "length": pc.length}
                sl = slice(pc.local_start, pc.local_start + pc.length)
                for k, t in sh.state.items():
                    if k != "master":
                        rec[k] = t[sl]  # views here, copied to the host below
                rec["master"] = sh.master_piece(pc.local_start, pc.length).float()  # no-op: fp32
                pieces.append(rec)
        keys = [(rec, k) for rec in pieces for k, v in rec.items() if isinstance(v, Tensor)]
        for (rec, k), t in zip(keys, copy_to_host([rec[k] for rec, k in keys])):
            rec[k] = t
        return {"format": "sharded_ams", "version": STATE_FORMAT_VERSION,
                "world_size": self.comm.world_size, "rank": self.comm.rank,
                "param_groups": groups, "params": params, "pieces": pieces,
                "state_keys": sorted({k for sh in self.shards for k in sh.state} | {"master"}),
                "skipped_steps": self.skipped_steps, "model_parallel": self.mp.describe()}

    @runs_load_state_dict_hooks  # torch's hooks: post-hooks see the loaded state
    def load_state_dict(self, state_dict: Union[dict, list[dict]]) -> None:
        """Load state saved on any world size: one rank's dict, or a list of them (every
        rank's pieces merged). Params are re-gathered from the fp32 masters afterwards."""
        sds = state_dict if isinstance(state_dict, list) else [state_dict]
        if not sds:
            raise ValueError("load_state_dict got an empty list")
        if sds[0].get("format") != "sharded_ams":
            raise ValueError("Not a ShardedAMS state dict (missing format='sharded_ams'); "
                             "for a single-process AMS state dict use AMS.load_state_dict")
        sds = self.mp.select(sds)  # this rank's tp coordinate; another mp layout: refused
        head = sds[0]
        check_compatible(self.shards, head)
        self._check_groups(head["param_groups"])
        by_name = records_by_name(sds, set(head["state_keys"]),
                                  {s.name: s.numel for sh in self.shards for s in sh.layout.slots})
        mine = [(sh, pc, by_name.get(pc.slot.name, [])) for sh in self.shards
                for pc in sh.layout.pieces(self.comm.rank)]
        for _, pc, recs in mine:  # every check before the first write
            check_covered(pc.slot.name, pc.param_offset, pc.param_offset + pc.length, recs)
        self._begin_state_load()
        for sh, pc, recs in mine:
            fill_piece(sh, pc, recs)
        self._end_state_load(head["param_groups"], head.get("skipped_steps", 0))

    def _check_groups(self, saved_groups: list[dict]) -> None:
        """Saved groups' hyperparameters, checked as the constructor does, before
        anything changes."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"Checkpoint has {len(saved_groups)} param groups, "
                             f"the optimizer {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            validate_hparams(saved["lr"], saved["betas"], saved["beta3"], saved["lam"],
                             saved["eps"], saved["weight_decay"])
            # each group's hyperparameters go to the group holding the same params: groups
            # built in another order or split differently would swap lr / weight decay
            mine = {self._names[p] for p in group["params"] if p.requires_grad}
            theirs = set(saved.get("params", mine))
            if theirs != mine:
                raise ValueError(
                    f"Checkpoint param group {gi} holds other params than this optimizer's "
                    f"group {gi}: only saved {sorted(theirs - mine)[:5]}, only here "
                    f"{sorted(mine - theirs)[:5]}; build the groups as the saving run did")

    def _begin_state_load(self) -> None:
        """Before the state is overwritten in place (``load_state_dict``, a DCP load):
        no pending gather may overwrite it, no pending reduction may land after it."""
        self._sync.finish_param_sync()
        self._sync.abandon_grad_sync()
        if self._bwd is not None:
            self._bwd.discard()

    def _end_state_load(self, saved_groups: list[dict], skipped_steps: int) -> None:
        """After the state and fp32 masters were written: the groups' hyperparameters and
        step counts, then the params re-gathered from the masters."""
        for g, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k == "step":
                    g[k] = torch.tensor(float(v), dtype=torch.float32, device=self.device)
                elif k != "params":
                    g[k] = tuple(v) if k == "betas" else v
        self.skipped_steps = skipped_steps
        self._masters_stale = False
        self._versions = None
        for sh in self.shards:
            for b in range(len(sh.layout.buckets)):
                if sh.own_master:
                    sh.param_shard(b).copy_(sh.master_view(b))
        self._sync.start_param_sync()  # the params re-gathered now
        self._sync.finish_param_sync()
