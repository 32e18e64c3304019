"""``ShardedAMS``: ZeRO-1 AMS over torch.distributed, with flat buffers and no DDP wrapper.

Per step, for each dtype buffer and bucket: reduce the gradients to their owner
(reduce-scatter; all-reduce on gloo), one small all-reduce for the global grad norm
(clipping and the non-finite check: every rank skips together), the fused AMS step on
the local shard (fp32 masters, m, v[, s]), and an all-gather of the params.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .buffers import FlatParamGradBuffer
from .collectives import Comm, bytes_of
from .config import DEFAULTS, check_grad, check_params, preset_hparams, validate_hparams
from .kernels import GroupHParams, Piece, flat_step, resolve_backend
from .layout import BufferLayout, Run

STATE_FORMAT_VERSION = 1


@dataclass
class StepInfo:
    """What the last ``step()`` did: the global grad norm (before clipping) and whether
    the step was skipped because a gradient was not finite on some rank."""

    grad_norm: Optional[float]
    skipped: bool


class _DtypeShard:
    """Everything about one dtype: buffers, layout and this rank's optimizer state."""

    def __init__(self, layout: BufferLayout, params: list[Tensor], dtype: torch.dtype,
                 device: torch.device, rank: int, with_s: bool,
                 state_dtype: torch.dtype = torch.float32):
        self.layout, self.rank = layout, rank
        self.buf = FlatParamGradBuffer(layout, params, dtype, device)
        n = layout.shard_numel
        f32 = dict(dtype=torch.float32, device=device)
        moments = dict(dtype=state_dtype, device=device)
        self.state: dict[str, Tensor] = {"exp_avg": torch.zeros(n, **moments),
                                         "exp_avg_sq": torch.zeros(n, **moments)}
        if with_s:
            self.state["exp_avg_s"] = torch.zeros(n, **moments)
        # fp32 params are their own masters (the shard of the param buffer); others keep one.
        self.own_master = dtype != torch.float32
        if self.own_master:
            self.state["master"] = torch.zeros(n, **f32)
            for b in range(len(layout.buckets)):
                self.master_view(b).copy_(self.param_shard(b))
        self.runs: list[Run] = []

    def bucket_range(self, b: int) -> tuple[int, int]:
        bk = self.layout.buckets[b]
        return bk.start, bk.end

    def param_shard(self, b: int) -> Tensor:
        s0, s1 = self.layout.buckets[b].shard(self.rank)
        return self.buf.param[s0:s1]

    def grad_shard(self, b: int) -> Tensor:
        s0, s1 = self.layout.buckets[b].shard(self.rank)
        return self.buf.grad[s0:s1]

    def local(self, key: str, b: int) -> Tensor:
        off = self.layout.local_offset(b)
        return self.state[key][off:off + self.layout.buckets[b].shard_size]

    def master_view(self, b: int) -> Tensor:
        return self.local("master", b) if self.own_master else self.param_shard(b)

    def master_piece(self, local_start: int, length: int) -> Tensor:
        """fp32 master values of a local range (it may not cross a bucket)."""
        if self.own_master:
            return self.state["master"][local_start:local_start + length]
        for b, bk in enumerate(self.layout.buckets):
            off = self.layout.local_offset(b)
            if off <= local_start < off + bk.shard_size:
                s0 = bk.shard(self.rank)[0] + local_start - off
                return self.buf.param[s0:s0 + length]
        raise IndexError(local_start)


class ShardedAMS(Optimizer):
    """ZeRO-1 AMS/Grams: optimizer state split across the ranks of ``process_group``.

    Args:
        params: an ``nn.Module`` (its trainable parameters, named), or params / param groups
            as for any torch optimizer. Params are moved into flat buffers (their
            ``.data`` becomes a view); frozen params (``requires_grad=False``) are left alone.
        process_group: data-parallel group (default: the world; none initialised: world size 1).
        preset: ``"grams"``, ``"cadam"`` or ``"adamw"`` set (beta3, lam).
        lr, betas, beta3, lam, eps, weight_decay: as :class:`AMS`.
        max_grad_norm: clip the global grad norm (as ``clip_grad_norm_`` on the full grads).
        skip_nonfinite: skip the step on every rank when any gradient is inf/NaN.
        bucket_numel: elements per communication bucket (None: one bucket per dtype).
        backend: step kernel: "auto", "triton", "compiled" or "eager".
        broadcast_params: copy rank 0's initial params to every rank, as DDP does.
        state_dtype: storage of m, v[, s]: ``torch.float32`` (default) or ``torch.bfloat16``
            (halves their memory; the maths stays fp32, values are rounded on store;
            masters stay fp32). See ``docs/maths.md`` for the measured effect.

    Use it in place of both DDP and the optimizer: ``loss.backward(); opt.step();
    opt.zero_grad()``. Gradients are averaged over ranks. A param that got no gradient
    on any rank is treated as having a zero gradient (as DDP + AdamW do).
    """

    def __init__(self, params: Union[nn.Module, Iterable], process_group: Optional[Any] = None,
                 *, preset: Optional[str] = None, lr: Union[float, Tensor] = DEFAULTS["lr"],
                 betas: tuple[float, float] = DEFAULTS["betas"], beta3: Optional[float] = None,
                 lam: Optional[float] = None, eps: float = DEFAULTS["eps"],
                 weight_decay: float = DEFAULTS["weight_decay"],
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = True,
                 bucket_numel: Optional[int] = None, backend: str = "auto",
                 broadcast_params: bool = True, state_dtype: torch.dtype = torch.float32):
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
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel}")
        names: dict[int, str] = {}
        if isinstance(params, nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
            names = {id(p): n for n, p in named}
            params = [p for _, p in named]
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, lam=lam, eps=eps,
                        weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.comm = Comm(process_group)
        self.max_grad_norm, self.skip_nonfinite = max_grad_norm, skip_nonfinite
        self.last_step = StepInfo(None, False)
        self.skipped_steps = 0
        self._names: dict[Tensor, str] = {}
        for gi, group in enumerate(self.param_groups):
            check_params(group["params"])
            validate_hparams(group["lr"], group["betas"], group["beta3"], group["lam"],
                             group["eps"], group["weight_decay"])
            pnames = group.get("param_names")
            for i, p in enumerate(group["params"]):
                self._names[p] = names.get(id(p)) or (pnames[i] if pnames else f"group{gi}.param{i}")
        self.state_dtype = state_dtype
        self._build(bucket_numel, backend, broadcast_params)

    # ------------------------------------------------------------------ layout
    def _build(self, bucket_numel: Optional[int], backend: str, broadcast: bool) -> None:
        by_dtype: dict[tuple, list[tuple[int, Tensor]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    by_dtype.setdefault((p.dtype, p.device), []).append((gi, p))
        if len({d for _, d in by_dtype}) > 1:
            raise ValueError("ShardedAMS needs all trainable params on one device")
        with_s = any(g["beta3"] > 0 for g in self.param_groups)
        self.shards: list[_DtypeShard] = []
        for (dtype, device), items in sorted(by_dtype.items(), key=lambda kv: str(kv[0][0])):
            spec = [(self._names[p], tuple(p.shape), gi) for gi, p in items]
            layout = BufferLayout.build(spec, self.comm.world_size, bucket_numel)
            shard = _DtypeShard(layout, [p for _, p in items], dtype, device, self.comm.rank,
                                with_s, self.state_dtype)
            shard.runs = layout.runs(self.comm.rank, range(len(self.param_groups)))
            self.shards.append(shard)
        self.device = next(iter(by_dtype))[1] if by_dtype else torch.device("cpu")
        self.backend = resolve_backend(backend, self.device)
        if broadcast and self.comm.active:
            handles = [self.comm.broadcast(sh.buf.param) for sh in self.shards]
            for h in handles:
                h.wait()
            for sh in self.shards:  # masters follow the broadcast params
                if sh.own_master:
                    for b in range(len(sh.layout.buckets)):
                        sh.master_view(b).copy_(sh.param_shard(b))

    # ------------------------------------------------------------------ sync API
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this context accumulate gradients locally without
        starting their reduction (as DDP's ``no_sync``): run every micro-batch but the last
        of an optimizer step under it. Without overlap the reduction happens in ``step()``
        anyway, so this changes nothing but is always safe to use."""
        yield

    def finish_param_sync(self) -> None:
        """Wait until every parameter holds its gathered value. Call before reading params
        outside a forward (evaluation, ``state_dict``, checkpoints); a no-op when no gather
        is pending."""

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat grad buffers; grads stay views into them (``set_to_none`` is ignored)."""
        for sh in self.shards:
            sh.buf.zero_grad()

    def _reduce_grads(self) -> None:
        world = self.comm.world_size
        handles = []
        for sh in self.shards:
            sh.buf.attach_grads()
            for p in sh.buf.params:
                check_grad(p, self._names.get(p))
            for b in range(len(sh.layout.buckets)):
                s, e = sh.bucket_range(b)
                if world > 1:
                    sh.buf.grad[s:e].div_(world)
                handles.append(self.comm.reduce_grads(sh.buf.grad[s:e], sh.grad_shard(b)))
        for h in handles:
            h.wait()

    def _global_grad_norm(self) -> Tensor:
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for sh in self.shards:
            for b in range(len(sh.layout.buckets)):
                # fp32 norm (as clip_grad_norm_; a float64 one is ~30x slower on CPU),
                # squared and summed in float64; an fp32 overflow is inf and skips the step.
                sq += torch.linalg.vector_norm(sh.grad_shard(b), dtype=torch.float32).double() ** 2
        self.comm.all_reduce(sq).wait()
        return sq.sqrt()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Reduce grads, clip, check, update the local shard, gather params. Returns the
        closure's loss; :attr:`last_step` says the grad norm and whether it was skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._reduce_grads()
        norm = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm_t = self._global_grad_norm()
            norm = float(norm_t)  # one host sync: every rank must agree on skipping
            if self.skip_nonfinite and not math.isfinite(norm):
                self.skipped_steps += 1
                self.last_step = StepInfo(norm, True)
                return loss
            if self.max_grad_norm is not None:
                coef = self.max_grad_norm / (norm + 1e-6)
                if coef < 1.0:
                    for sh in self.shards:
                        for b in range(len(sh.layout.buckets)):
                            sh.grad_shard(b).mul_(coef)
        for group in self.param_groups:
            group["step"] += 1
        for sh in self.shards:
            self._step_shard(sh)
        self._gather_params()
        self.last_step = StepInfo(norm, False)
        return loss

    def _step_shard(self, sh: _DtypeShard) -> None:
        num = len(sh.layout.slots)
        low = sh.own_master
        for run in sh.runs:
            group = self.param_groups[run.group]
            lo, hi = run.local_start, run.local_end
            if hi == lo and abs(group["lam"]) == 1:
                continue
            b = run.bucket
            off = sh.layout.local_offset(b)
            r0, r1 = lo - off, hi - off
            pieces = tuple(Piece(pc.local_start - lo, pc.local_start - lo + pc.length,
                                 pc.slot.index, pc.slot.numel) for pc in run.pieces)
            flat_step(sh.master_view(b)[r0:r1], sh.grad_shard(b)[r0:r1],
                      sh.local("exp_avg", b)[r0:r1], sh.local("exp_avg_sq", b)[r0:r1],
                      sh.local("exp_avg_s", b)[r0:r1] if "exp_avg_s" in sh.state else None,
                      sh.param_shard(b)[r0:r1] if low else None, lr=group["lr"],
                      step=group["step"], hp=GroupHParams.from_group(group), pieces=pieces,
                      num_tensors=num, backend=self.backend,
                      count_reduce=lambda c: self.comm.all_reduce(c).wait())

    def _gather_params(self) -> None:
        handles = []
        for sh in self.shards:
            for b in range(len(sh.layout.buckets)):
                s, e = sh.bucket_range(b)
                handles.append(self.comm.gather_params(sh.buf.param[s:e], sh.param_shard(b)))
        for h in handles:
            h.wait()

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (m, v[, s], separate fp32 masters)."""
        return sum(bytes_of(t) for sh in self.shards for t in sh.state.values())

    def param_names(self) -> list[str]:
        return [self._names[p] for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard in the unpadded per-parameter index space (see docs/checkpoint.md).

        Pieces are (name, offset, length) ranges of each param with their state; any set
        of pieces covering every param loads on any world size."""
        groups = []
        for g in self.param_groups:
            hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            hp["lr"] = float(hp["lr"]) if isinstance(hp["lr"], Tensor) else hp["lr"]
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
                        rec[k] = t[sl].clone()
                rec["master"] = sh.master_piece(pc.local_start, pc.length).float().clone()
                pieces.append(rec)
        return {"format": "sharded_ams", "version": STATE_FORMAT_VERSION,
                "world_size": self.comm.world_size, "rank": self.comm.rank,
                "param_groups": groups, "params": params, "pieces": pieces,
                "state_keys": sorted({k for sh in self.shards for k in sh.state} | {"master"}),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: Union[dict, list[dict]]) -> None:
        """Load state saved on any world size: one rank's dict, or a list of them (every
        rank's pieces merged). Params are re-gathered from the fp32 masters afterwards."""
        sds = state_dict if isinstance(state_dict, list) else [state_dict]
        if not sds:
            raise ValueError("load_state_dict got an empty list")
        head = sds[0]
        if head.get("format") != "sharded_ams":
            raise ValueError("Not a ShardedAMS state dict (missing format='sharded_ams'); "
                             "for a single-process AMS state dict use AMS.load_state_dict")
        self._check_compatible(head)
        for saved in head["param_groups"]:  # as the constructor does, before changing anything
            validate_hparams(saved["lr"], saved["betas"], saved["beta3"], saved["lam"],
                             saved["eps"], saved["weight_decay"])
        for g, saved in zip(self.param_groups, head["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
        self.skipped_steps = head.get("skipped_steps", 0)
        by_name: dict[str, list[dict]] = {}
        for sd in sds:
            for rec in sd["pieces"]:
                by_name.setdefault(rec["name"], []).append(rec)
        for sh in self.shards:
            for pc in sh.layout.pieces(self.comm.rank):
                self._fill_piece(sh, pc, by_name.get(pc.slot.name, []))
            for b in range(len(sh.layout.buckets)):
                if sh.own_master:
                    sh.param_shard(b).copy_(sh.master_view(b))
        self._gather_params()

    def _check_compatible(self, sd: dict) -> None:
        mine = {s.name: list(s.shape) for sh in self.shards for s in sh.layout.slots}
        theirs = {n: list(v["shape"]) for n, v in sd["params"].items()}
        if mine != theirs:
            missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            shapes = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
            raise ValueError(f"Checkpoint is for a different model: missing params {missing[:5]}, "
                             f"unexpected params {extra[:5]}, shape mismatch {shapes[:5]}")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"Checkpoint has {len(sd['param_groups'])} param groups, "
                             f"the optimizer {len(self.param_groups)}")
        need = {k for sh in self.shards for k in sh.state} | {"master"}
        if need != set(sd["state_keys"]):
            raise ValueError(f"Checkpoint state {sorted(sd['state_keys'])} differs from this "
                             f"optimizer's {sorted(need)} (saved with a different beta3 or optimizer?)")

    def _fill_piece(self, sh: _DtypeShard, pc, recs: list[dict]) -> None:
        lo, hi = pc.param_offset, pc.param_offset + pc.length
        covered = 0
        for rec in recs:
            a, b = max(lo, rec["offset"]), min(hi, rec["offset"] + rec["length"])
            if a >= b:
                continue
            src = slice(a - rec["offset"], b - rec["offset"])
            dst = slice(pc.local_start + a - lo, pc.local_start + b - lo)
            for k, t in sh.state.items():
                if k != "master":
                    t[dst].copy_(rec[k][src])
            sh.master_piece(dst.start, b - a).copy_(rec["master"][src])
            covered += b - a
        if covered != pc.length:
            raise ValueError(f"Checkpoint does not cover param {pc.slot.name!r} elements "
                             f"[{lo}, {hi}) (covered {covered} of {pc.length})")
