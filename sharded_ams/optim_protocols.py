"""torch.optim protocols that ``AMS`` and ``ShardedAMS`` keep although they override
``state_dict`` / ``load_state_dict``: torch runs the four state-dict hook kinds inside its
own methods, which an override bypasses (or, calling ``super()``, runs too early or on a
stripped dict). And ``torch.amp.GradScaler``, which ``ShardedAMS`` refuses: it unscales
and inf-checks ``p.grad``, where ``ShardedAMS``'s gradients are not."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

from torch.optim import Optimizer

__all__ = ["refuse_grad_scaler", "runs_load_state_dict_hooks", "runs_state_dict_hooks"]

_SAVE_HOOKS = ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks")
_LOAD_HOOKS = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


@contextlib.contextmanager
def _held_back(opt: Optimizer, names: tuple[str, ...]) -> Iterator[None]:
    """No hooks of ``names`` while the override runs: a ``super()`` call inside must not run
    them a second time. Handles stay valid (they hold the original dicts)."""
    kept = [getattr(opt, n) for n in names]
    for n in names:
        setattr(opt, n, OrderedDict())
    try:
        yield
    finally:
        for n, hooks in zip(names, kept):
            setattr(opt, n, hooks)


def runs_state_dict_hooks(settle: Optional[Callable[[Any], None]] = None):
    """Decorator for a ``state_dict`` override, running the hooks as torch.optim does:
    pre-hooks ``hook(opt)`` in order, the override, then post-hooks ``hook(opt, sd)``, a
    returned dict replacing ``sd`` for the hooks after it and the caller. ``settle(opt)``
    brings the state up to date first (what the save will hold: pending gathers, masters
    following written params), so the pre-hooks see the real state; it runs again after
    them, in case a hook wrote the params."""
    def wrap(fn: Callable[[Any], dict]) -> Callable[[Any], dict]:
        @functools.wraps(fn)
        def state_dict(self) -> dict:
            pre = list(self._optimizer_state_dict_pre_hooks.values())
            if settle is not None:
                settle(self)
            for hook in pre:
                hook(self)
            if settle is not None and pre:
                settle(self)
            with _held_back(self, _SAVE_HOOKS):
                sd = fn(self)
            for hook in list(self._optimizer_state_dict_post_hooks.values()):
                result = hook(self, sd)
                if result is not None:
                    sd = result
            return sd
        return state_dict
    return wrap


def runs_load_state_dict_hooks(fn: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Decorator for a ``load_state_dict`` override, running the hooks as torch.optim does:
    pre-hooks ``hook(opt, sd)`` on a shallow copy of what was passed (ShardedAMS: a dict or
    a list of them), a returned value replacing it for the hooks after it and for the load;
    then the override; then post-hooks ``hook(opt)``, which see the loaded state."""
    @functools.wraps(fn)
    def load_state_dict(self, state_dict: Any) -> None:
        state_dict = state_dict.copy()  # shallow, as torch.optim
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        with _held_back(self, _LOAD_HOOKS):
            fn(self, state_dict)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)
    return load_state_dict


def refuse_grad_scaler(opt: Optimizer) -> None:
    """Raises where ``torch.amp.GradScaler`` drives ``opt.step()``; ``ShardedAMS.step``
    calls it first. ShardedAMS's gradients live in its flat buffers, reduced across ranks
    in backward and ``step()``, so the scaler's unscale and inf check of ``p.grad`` would
    miss them (16-bit params: no ``p.grad`` at all) or read them mid-reduction and decide
    the skip per rank (ranks that disagree desynchronise their collectives).

    How it knows: ShardedAMS declares ``_step_supports_amp_scaling = True`` (a plain
    attribute: ``hasattr`` and other introspection keep working), so ``GradScaler.step``
    hands the step over with its ``grad_scale`` and ``found_inf`` set as attributes of the
    optimizer instead of stepping it itself. They are removed here, as the scaler removes
    them after a step that returns, so a later plain ``step()`` is not refused."""
    handed = [name for name in ("grad_scale", "found_inf") if name in vars(opt)]
    if not handed:
        return
    for name in handed:
        delattr(opt, name)
    raise RuntimeError(
        f"torch.amp.GradScaler cannot drive {type(opt).__name__}: its gradients live in "
        "the optimizer's flat buffers (reduced across ranks during backward and step()), "
        "not in p.grad, so the scaler could neither unscale them nor agree across ranks "
        "on skipping a step with inf/NaN gradients. Train in bf16 (bf16 params or "
        "torch.autocast(dtype=torch.bfloat16): no loss scaling needed; ShardedAMS skips "
        "non-finite steps on every rank itself, skip_nonfinite=True), or use the "
        "single-process AMS optimizer, which works with GradScaler")
