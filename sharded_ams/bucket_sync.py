"""When each bucket's collectives are launched and waited for (Megatron-Core's
``overlap_grad_reduce`` and ``overlap_param_gather``).

Launch and wait are separate named steps, as in Megatron's ``param_and_grad_buffer``:

* :meth:`BucketSync.start_grad_sync` divides one bucket's gradients by N and launches its
  reduction; :meth:`BucketSync.finish_grad_sync` launches the buckets backward did not
  complete (unused params count as zeros) and waits for every reduction;
* :meth:`BucketSync.start_param_sync` launches every bucket's param all-gather;
  :meth:`BucketSync.finish_param_sync` waits for some or all of them.

With overlap, a post-accumulate-grad hook per param (``register_post_accumulate_grad_hook``)
folds the gradient into the buffer and marks it ready; once every param of a bucket is
ready the bucket is launched, during backward. Buckets launch only in their fixed order
(the order backward is expected to complete them): every rank must issue collectives in
the same order whatever order its hooks fire in, so a bucket that is ready early waits for
the ones before it, as in DDP's reducer. Forward pre-hooks on the modules that own params
wait for the gather of just the buckets they need.

Misuse that would silently give wrong numbers raises instead: a param that receives a
gradient after its bucket's reduction started (a second backward without ``no_sync``), or
one that receives a gradient while its gather is still pending (a forward that read it
without running its module's pre-hook), or an unsupported (sparse, complex, integer) one.
Such a check depends on one rank's data, so at world size > 1 it does not raise where it
fails: raising in a hook would leave the other ranks waiting in a collective this rank
never joins. The failing rank records the error and keeps issuing the step's collectives
(a gradient that arrived too late is dropped); ``step()`` carries a flag in its small
all-reduce and every rank raises there together (:meth:`BucketSync.raise_if_failed`),
before anything is updated. At world size 1 the error is raised at once.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import check_grad

#: param -> the BucketSync whose hooks it carries (a newer optimizer on the same params
#: removes the older one's hooks, so stale hooks never launch collectives)
_OWNERS = WeakIdKeyDictionary()


@dataclass
class SyncStats:
    """Seconds the host was blocked on communication (host timers, ``time.perf_counter``).

    On NCCL a wait only makes the compute stream wait, so these show launch costs, not
    device-side exposure (use ``torch.profiler`` there)."""

    grad_wait_s: float = 0.0    # step(): launching late buckets and waiting for reductions
    param_wait_s: float = 0.0   # param all-gathers: forward pre-hooks and step()
    small_wait_s: float = 0.0   # the grad-norm and per-tensor-count all-reduces
    late_buckets: int = 0       # buckets launched by step() rather than during backward
    counted_in_backward: int = 0  # C-Adam runs whose count step() took from backward
    steps: int = 0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, type(getattr(self, k))())

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _Bucket:
    """One bucket of one dtype buffer and its per-step sync state."""

    def __init__(self, shard: Any, index: int, slots: list[int]):
        self.shard, self.index, self.slots = shard, index, slots
        self.start, self.end = shard.layout.buckets[index].start, shard.layout.buckets[index].end
        self.ready = [False] * len(slots)
        self.n_ready = 0
        self.launched = False
        self.gather: Optional[Any] = None   # pending all-gather handle
        self.forward_waited = False          # True: a forward pre-hook waits for its gather

    def reset(self) -> None:
        self.ready = [False] * len(self.slots)
        self.n_ready = 0
        self.launched = False


class BucketSync:
    """Gradient reduction and param gather of every bucket of every dtype buffer.

    ``shards``: the optimizer's per-dtype shards (``buf``, ``layout``, ``grad_shard(b)``,
    ``param_shard(b)``); ``fill_pos``: id(param) -> its position in the order gradients
    are expected (buckets launch in the order they complete); ``names``: param -> name."""

    def __init__(self, shards: Sequence[Any], comm: Any, fill_pos: dict[int, int],
                 names: dict[Tensor, str], overlap: bool):
        self.comm, self.overlap, self.names = comm, overlap, names
        self.stats = SyncStats()
        buckets: list[tuple[int, _Bucket]] = []
        self._where: dict[int, tuple[_Bucket, int, int]] = {}  # id(p) -> (bucket, k, slot)
        for sh in shards:
            per: list[list[int]] = [[] for _ in sh.layout.buckets]
            for slot in sh.layout.slots:
                per[slot.bucket].append(slot.index)
            for b, slots in enumerate(per):
                bk = _Bucket(sh, b, slots)
                for k, i in enumerate(slots):
                    self._where[id(sh.buf.params[i])] = (bk, k, i)
                key = max((fill_pos[id(sh.buf.params[i])] for i in slots), default=-1)
                buckets.append((key, bk))
        #: reduction order: the order backward completes the buckets (gathers go in reverse)
        self.order = [bk for _, bk in sorted(buckets, key=lambda kb: kb[0])]
        self._next = 0                      # next bucket (in ``order``) to launch
        self._grad_handles: list[Any] = []
        self._launched: list[_Bucket] = []  # the bucket of each of ``_grad_handles``
        self._polled = 0                    # handles known finished (``poll_reduced``)
        #: called with each bucket whose reduction finished during backward (C-Adam's
        #: count pass, backward_count.py); None: nothing polls
        self.on_reduced: Optional[Callable[[_Bucket], None]] = None
        self._gathers_pending = False
        self._n_gathers = 0                 # gathers launched and not waited for yet
        self.accumulating = False           # inside no_sync()
        self._hooks: list[Any] = []
        self.closed = False
        self.error: Optional[str] = None    # this rank's deferred error (world size > 1)

    # ------------------------------------------------------------------ hooks
    def register_grad_hooks(self, collect_in_hook: bool) -> None:
        """Sparse-gradient check on every param; with overlap (or main grads), the
        post-accumulate hook that collects the gradient and marks it ready."""
        ref = weakref.ref(self)
        for bk, k, i in self._where.values():
            p = bk.shard.buf.params[i]
            old = _OWNERS.get(p)
            if old is not None and old() is not None and old() is not self:
                old().remove_hooks()
            _OWNERS[p] = ref
            self._hooks.append(p.register_hook(_sparse_check(ref, self.names.get(p, "?"))))
            if collect_in_hook:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    _grad_hook(ref, bk, k, i)))

    def register_module_hooks(self, module: nn.Module,
                              wait_modules: Optional[Sequence[nn.Module]] = None) -> None:
        """Forward pre-hooks waiting for the gathers of the buckets each module's own params
        live in; state_dict / load_state_dict pre-hooks waiting for them too. A bucket with
        a param no module owns is gathered synchronously at the end of ``step()``.

        ``wait_modules`` (e.g. the transformer blocks): each gets ONE hook for every param
        under it, and the modules inside it get none: under ``torch.compile`` each hook is
        a graph break (it is ``torch.compiler.disable``-d), so one per block instead of one
        per Linear / norm. Modules outside them keep their own hooks."""
        ref = weakref.ref(self)
        owned: set[int] = set()
        for m, params in _hook_targets(module, wait_modules or ()):
            mine = [self._where[id(p)][0] for p in params if id(p) in self._where]
            if not mine:
                continue
            bks = list({id(b): b for b in mine}.values())
            owned.update(id(p) for p in params)
            wait = _wait_hook(ref, bks)
            self._hooks.append(m.register_forward_pre_hook(
                lambda mod, args, _w=wait: _w()))
            self._hooks.append(m.register_state_dict_pre_hook(
                lambda mod, prefix, keep_vars, _w=wait: _w()))
            self._hooks.append(m.register_load_state_dict_pre_hook(
                lambda mod, *args, _w=wait: _w()))
        for bk in self.order:
            bk.forward_waited = self.overlap and all(
                id(bk.shard.buf.params[i]) in owned for i in bk.slots)

    def keep_hook(self, handle) -> None:
        """A hook of the optimizer's own, removed with these (``remove_hooks``)."""
        self._hooks.append(handle)

    def remove_hooks(self) -> None:
        """Detach every hook (another optimizer took these params over)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.closed = True

    # ------------------------------------------------------------------ gradients
    def grad_ready(self, bk: _Bucket, k: int, i: int) -> None:
        """Post-accumulate-grad hook body: param ``i`` of bucket ``bk`` has its gradient."""
        p = bk.shard.buf.params[i]
        if bk.gather is not None:
            self.fail(
                f"ShardedAMS: parameter {self.names.get(p)!r} received a gradient while its "
                "all-gather from the last step was still pending, so the forward read stale "
                "values: it was used without its module's forward running (call "
                "opt.finish_param_sync() before such a forward)")
        if bk.launched:  # the buffer is being reduced: drop this gradient, never write it
            self.fail(
                f"ShardedAMS: parameter {self.names.get(p)!r} received a gradient after its "
                "bucket's reduction had started (a second backward in one step?): run every "
                "micro-batch but the last under opt.no_sync()")
            return
        if p.grad is not None and p.grad.is_sparse:  # refused by its tensor hook already
            p.grad = None
        bk.shard.buf.collect(i)
        if self.accumulating or not self.overlap:
            return
        if not bk.ready[k]:
            bk.ready[k] = True
            bk.n_ready += 1
        if bk.n_ready == len(bk.slots):
            while self._next < len(self.order):
                nxt = self.order[self._next]
                if nxt.n_ready < len(nxt.slots):
                    break
                self.start_grad_sync(nxt)
        if self.on_reduced is not None:
            self.poll_reduced()

    def poll_reduced(self) -> None:
        """Hand every bucket whose reduction has finished, in launch order, to
        ``on_reduced`` (without waiting for the ones still running)."""
        while self._polled < len(self._grad_handles):
            h = self._grad_handles[self._polled]
            if not h.is_completed():
                return
            h.wait()  # finished: returns at once (raises if the collective failed)
            self._polled += 1
            self.on_reduced(self._launched[self._polled - 1])

    def start_grad_sync(self, bk: _Bucket) -> None:
        """Launch one bucket's averaging reduction (no wait)."""
        sh = bk.shard
        grad = sh.buf.grad[bk.start:bk.end]
        self._grad_handles.append(self.comm.average_grads(grad, sh.grad_shard(bk.index)))
        self._launched.append(bk)
        bk.launched = True
        self._next += 1

    def finish_grad_sync(self) -> None:
        """Launch every bucket backward did not complete, in order (a param without a
        gradient counts as zero), then wait for all reductions."""
        t0 = time.perf_counter()
        late = self.order[self._next:]
        for bk in late:
            buf = bk.shard.buf
            for k, i in enumerate(bk.slots):
                if not bk.ready[k] and not buf.holds_grad(i):
                    p = buf.params[i]
                    try:
                        check_grad(p, self.names.get(p))
                    except RuntimeError as exc:
                        self.fail(str(exc))
                        p.grad = None  # counts as zero; step() raises before using it
                    buf.collect(i)
            self.start_grad_sync(bk)
        for h in self._grad_handles:
            h.wait()
        self.stats.grad_wait_s += time.perf_counter() - t0
        if self.overlap:
            self.stats.late_buckets += len(late)
        self._reset_grad_state()

    def abandon_grad_sync(self) -> None:
        """Wait for reductions already launched (they write into the grad buffer) and forget
        the step's readiness: ``zero_grad`` and loads call this before touching buffers."""
        for h in self._grad_handles:
            h.wait()
        self._reset_grad_state()

    # ------------------------------------------------------------------ errors
    def fail(self, message: str) -> None:
        """A check failed on this rank: raise now at world size 1; otherwise remember the
        first message for :meth:`raise_if_failed` (the other ranks do not know yet)."""
        if not self.comm.active:
            raise RuntimeError(message)
        if self.error is None:
            self.error = message

    def error_flag(self, device: torch.device) -> Optional[Tensor]:
        """1.0 if this rank failed, else 0.0 (float64, to ride in the norm all-reduce);
        None at world size 1, where errors were raised at once."""
        if not self.comm.active:
            return None
        return torch.full((), 0.0 if self.error is None else 1.0, dtype=torch.float64,
                          device=device)

    def raise_if_failed(self, failed: Tensor) -> None:
        """``failed``: the flags summed over ranks (reduced already). Raise on every rank
        if any rank failed: its own message there, a pointer to it elsewhere. A host read
        of one number (only at world size > 1)."""
        count = int(failed.item())
        err, self.error = self.error, None
        if err is not None:
            raise RuntimeError(f"{err} [rank {self.comm.rank}; {count} rank(s) failed this "
                               "step, every rank raises in step() and the step is not applied]")
        if count:
            raise RuntimeError(
                f"ShardedAMS: {count} other rank(s) failed in this step's backward or "
                f"gradient checks (their error says why); rank {self.comm.rank} raises too, "
                "so no rank is left waiting in a collective. The step was not applied")

    def _reset_grad_state(self) -> None:
        self._grad_handles, self._launched, self._polled = [], [], 0
        self._next = 0
        for bk in self.order:
            bk.reset()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        prev, self.accumulating = self.accumulating, True
        try:
            yield
        finally:
            self.accumulating = prev

    # ------------------------------------------------------------------ params
    def start_param_sync(self) -> None:
        """Launch every bucket's all-gather, the first layers' bucket first (forward
        order). Without overlap, or for buckets no forward pre-hook waits for, wait now."""
        if not self.comm.active:
            return
        for bk in reversed(self.order):
            if bk.gather is None:
                self._n_gathers += 1
            bk.gather = self.comm.gather_params(bk.shard.buf.param[bk.start:bk.end],
                                                bk.shard.param_shard(bk.index))
        self._gathers_pending = True
        self.finish_param_sync([bk for bk in self.order if not bk.forward_waited])

    def finish_param_sync(self, buckets: Optional[Sequence[_Bucket]] = None) -> None:
        """Wait for the pending gathers of ``buckets`` (default: all). O(len(buckets)): a
        count of the pending gathers says whether any is left, not a scan of every bucket
        (each forward pre-hook calls this; the scan stopped at the first pending bucket,
        cheap in forward order, O(B) per hook in other orders)."""
        if not self._gathers_pending:
            return
        t0 = time.perf_counter()
        for bk in self.order if buckets is None else buckets:
            if bk.gather is not None:
                bk.gather.wait()
                bk.gather = None
                self._n_gathers -= 1
        self.stats.param_wait_s += time.perf_counter() - t0
        self._gathers_pending = self._n_gathers > 0

    def wait_small(self, handle: Any) -> None:
        """Wait for a small all-reduce (grad norm, per-tensor counts), timed."""
        t0 = time.perf_counter()
        handle.wait()
        self.stats.small_wait_s += time.perf_counter() - t0


def _hook_targets(module: nn.Module, wait_modules: Sequence[nn.Module]
                  ) -> list[tuple[nn.Module, list[Tensor]]]:
    """(module, the params its hook waits for): each of ``wait_modules`` with every param
    under it, then every other module of ``module`` not inside one of them, with its own
    params."""
    inside: set[int] = set()
    known = {id(m) for m in module.modules()}
    targets = []
    for w in wait_modules:
        if id(w) not in known:
            raise ValueError(f"param_sync_modules: {type(w).__name__} is not a submodule of "
                             "the model given to ShardedAMS")
        targets.append((w, list(w.parameters())))
        inside.update(id(m) for m in w.modules())
    targets += [(m, list(m.parameters(recurse=False))) for m in module.modules()
                if id(m) not in inside]
    return targets


def quiesce_owners(params: Iterable[Tensor]) -> None:
    """Before a new optimizer copies ``params`` into its buffers: wait for what the
    optimizers owning them still have in flight (their param all-gathers write these
    params, their reductions the grads ``p.grad`` views). Their hooks are removed later,
    once the new optimizer registers its own."""
    owners: dict[int, BucketSync] = {}
    for p in params:
        ref = _OWNERS.get(p)
        old = ref() if ref is not None else None
        if old is not None and not old.closed:
            owners[id(old)] = old
    for old in owners.values():
        old.finish_param_sync()
        for h in old._grad_handles:
            h.wait()


def _sparse_check(ref: "weakref.ref[BucketSync]",
                  name: str) -> Callable[[Tensor], Optional[Tensor]]:
    def hook(grad: Tensor) -> Optional[Tensor]:
        if grad.is_sparse:
            sync = ref()
            msg = (f"AMS does not support sparse gradients (parameter {name!r}); "
                   "use dense gradients (e.g. nn.Embedding(sparse=False))")
            if sync is None:
                raise RuntimeError(msg)
            sync.fail(msg)  # world size > 1: recorded; backward goes on with a zero
            return torch.zeros_like(grad)  # (sparse: a hook may not change the layout)
        return None
    return hook


def _grad_hook(ref: "weakref.ref[BucketSync]", bk: _Bucket, k: int, i: int):
    def hook(p: Tensor) -> None:
        sync = ref()
        if sync is not None:
            sync.grad_ready(bk, k, i)
    return hook


def _wait_hook(ref: "weakref.ref[BucketSync]", buckets: list[_Bucket]) -> Callable[[], None]:
    @torch.compiler.disable
    def wait() -> None:
        sync = ref()
        if sync is not None and sync._gathers_pending:
            sync.finish_param_sync(buckets)
    return wait
