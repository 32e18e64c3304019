"""What ``ShardedAMS`` checks about its params changing behind it: its flat buffers are
laid out once, at construction, so a param frozen then and trained later, a sparse
gradient, or weights loaded into the model are caught here rather than silently ignored."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

__all__ = ["frozen_params", "refuse_grads_of_frozen", "refuse_sparse_modules",
           "watch_model_loads"]


def frozen_params(param_groups: Sequence[dict], module: Optional[nn.Module],
                  trained: Sequence[tuple[int, Tensor]],
                  names: dict[Tensor, str]) -> list[tuple[str, Tensor]]:
    """(name, param) of the params given (or in the model) that are frozen now: they get
    no place in the buffers. Params merely left out of the groups are another optimizer's
    business and not listed."""
    stepped = {id(p) for _, p in trained}
    frozen = {id(p): p for g in param_groups for p in g["params"] if id(p) not in stepped}
    if module is not None:
        frozen.update((id(p), p) for p in module.parameters() if not p.requires_grad)
    by_id = {id(p): n for n, p in (module.named_parameters() if module else ())}
    return [(by_id.get(id(p)) or names.get(p, "?"), p) for p in frozen.values()]


def refuse_grads_of_frozen(frozen: Sequence[tuple[str, Tensor]]) -> None:
    """A param frozen at construction that has a gradient now was unfrozen: it would never
    be stepped. Raise before anything moves."""
    for name, p in frozen:
        if p.grad is not None:
            raise RuntimeError(
                f"Parameter {name!r} has a gradient, but it was frozen (requires_grad=False) "
                "when this ShardedAMS was built, so its buffers hold no place for it and it "
                "would never be stepped. Build a new ShardedAMS after unfreezing it (its "
                "state_dict loads into the new one)")


def watch_model_loads(module: nn.Module, opt: Any, stepped: set[int],
                      keep: Callable[[Any], None]) -> None:
    """A ``load_state_dict`` into any module holding stepped params marks ``opt``'s fp32
    masters stale (``opt._masters_stale``): its next step re-reads them from the params.
    The hook holds the optimizer weakly; ``keep`` takes each handle (removed with the
    optimizer's other hooks)."""
    ref = weakref.ref(opt)

    def params_loaded(mod, incompatible) -> None:
        o = ref()
        if o is not None:
            o._masters_stale = True

    for m in module.modules():
        if any(id(p) in stepped for p in m.parameters(recurse=False)):
            keep(m.register_load_state_dict_post_hook(params_loaded))


def refuse_sparse_modules(module: nn.Module, names: dict[Tensor, str]) -> None:
    """Embeddings built with ``sparse=True`` produce sparse gradients, which AMS refuses:
    say so at construction (other sparse gradients are refused by a hook in backward)."""
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight in names:
            raise ValueError(f"AMS does not support sparse gradients: parameter "
                             f"{names[m.weight]!r} belongs to {type(m).__name__}(sparse=True); "
                             "build it with sparse=False")
