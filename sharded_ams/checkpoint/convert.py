"""Converting checkpoints between the native (``zero1``) format and DCP (``fsdp``), in one
process, so that a run can switch strategy (``sharded-ams ckpt convert SRC OUT --to``).

Both hold the same numbers; what differs is where the fp32 weights live. ZeRO-1 keeps the
params in the model's dtype and the fp32 masters in the optimizer state (``master``;
fp32 params are their own); an FSDP run keeps fp32 sharded params (they are the masters,
computed in bf16 by FSDP2's policy) and no ``master`` state. So:

* zero1 -> dcp: the model tensors are the fp32 masters, the optimizer state m, v[, s]
  and ``step`` (each group's step count) under the params' names, the groups'
  hyperparameters, the trainer state and ``skipped_steps`` as they were;
* dcp -> zero1: a ShardedAMS of world size 1 is built over params of the run's dtype
  (``extra["precision"]`` "bf16": bf16 params with fp32 masters), loaded with the state,
  and saved with ``save_checkpoint``; it loads on any world size as any other. Tied
  weights (the DCP manifest's ``tied``) are one Parameter under every key again.

zero1 -> dcp -> zero1 gives back every tensor bit for bit (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .consolidate import consolidate
from .dcp import write_dcp_state
from .dcp_read import read_dcp_full, refusing, saved_groups
from .dcp_sharded import dcp_param_groups
from .format import HP_KEYS, CheckpointError, PathLike

__all__ = ["to_dcp", "to_zero1"]



def to_dcp(src: PathLike, out: PathLike, *, allow_nonfinite: bool = False) -> dict:
    """Write the native checkpoint ``src`` as a DCP checkpoint in ``out`` (new). NaN/inf or
    a negative ``exp_avg_sq`` is refused (``kind="values"``) unless ``allow_nonfinite``."""
    full = consolidate(src, allow_nonfinite=allow_nonfinite)
    names, groups = full["param_names"], full["optimizer"]["param_groups"]
    state = {names[i]: st for i, st in full["optimizer"]["state"].items()}
    masters = {n: st.get("master", full["model"].get(n)) for n, st in state.items()}
    model = {}
    for key, t in full["model"].items():  # tied weights under every key, fp32 masters
        alias = next((n for n in names if full["model"].get(n) is t), None)
        model[key] = masters[alias].float() if alias is not None else t
    optim = {"state": {n: {k: v for k, v in st.items() if k != "master"}
                       for n, st in state.items()},
             "param_groups": dcp_param_groups([{**g, "params": g["param_names"]} for g in groups],
                                              HP_KEYS)}
    from .validate import read_manifest

    man = read_manifest(src)
    hp = [{**{k: (list(g[k]) if k == "betas" else g[k]) for k in HP_KEYS}, "step": int(g["step"])}
          for g in man.param_groups]
    tied = {k: v["param"] for k, v in (man.model or {"keys": {}})["keys"].items()
            if "param" in v and v["param"] != k}
    write_dcp_state(out, {"model": model, "optim": optim}, step=full["step"],
                    extra=full["extra"], scheduler_state=full["lr_scheduler"],
                    mesh={"strategy": "fsdp", "dp": 1, "tp": 1}, groups=hp,
                    skipped_steps=man.optimizer.get("skipped_steps", 0), rng=False, tied=tied)
    return {"step": full["step"], "params": len(names)}


class _SavedScheduler:
    """What ``save_checkpoint`` asks of an LR scheduler: its saved state."""

    def __init__(self, state: Any):
        self.state = state

    def state_dict(self) -> Any:
        return self.state


def _holder(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> nn.Module:
    """A module whose ``state_dict()`` has exactly ``tensors``' keys: the optimized ones as
    the given Parameters (tied keys share one), the rest as buffers. The first name of each
    Parameter is registered first: ShardedAMS names a param by its first name in the
    module, which must be the optimizer's (``wte.weight``, not ``lm_head.weight``)."""
    root = nn.Module()
    canonical = {id(p): k for k, p in reversed(params.items())}  # the first key of each
    first = [k for k in tensors if k in params and canonical[id(params[k])] == k]
    for key in first + [k for k in tensors if k not in first]:
        t = tensors[key]
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if key in params:
            mod.register_parameter(leaf, params[key])
        else:
            mod.register_buffer(leaf, t)
    return root


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (``torch.equal`` calls NaN unequal to itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _tied(man, tensors: dict, params: dict) -> dict[str, nn.Parameter]:
    """The manifest's tied keys (``lm_head.weight`` -> ``wte.weight``), each the very
    Parameter of the key it is tied to: a tied key left a buffer would come back as an
    fp32 copy in model-extra.pt, and the model (whose keys are tied) would no longer
    load it. A tied key must name a param and hold its values."""
    out = {}
    for key, name in man.tied.items():
        if key not in tensors or name not in params:
            raise CheckpointError(f"{man.path}: tied key {key!r:.80} -> {name!r:.80} is not a "
                                  "model tensor tied to an optimized param", path=man.path,
                                  kind="corrupt", field=f"tied[{key!r:.80}]")
        if not _same_bits(tensors[key], tensors[name]):  # NaN too (a diverged run's)
            raise CheckpointError(f"{man.path}: tied key {key!r:.80} holds other values than "
                                  f"{name!r:.80}", path=man.path, kind="corrupt",
                                  field=f"tied[{key!r:.80}]")
        out[key] = params[name]
    return out


def to_zero1(src: PathLike, out: PathLike, *, allow_nonfinite: bool = False) -> dict:
    """Write the DCP checkpoint ``src`` as a native checkpoint of world size 1 in ``out``
    (the groups' hyperparameters and steps from its manifest). NaN/inf or a negative
    ``exp_avg_sq`` is refused (``kind="values"``) unless ``allow_nonfinite``."""
    from .commit import save_checkpoint

    full = read_dcp_full(src, allow_nonfinite=allow_nonfinite)
    man, trainer = full["manifest"], full["trainer"]
    with refusing(man.path):  # what the checks let through, and the load, are the input's
        opt, holder = _zero1_optimizer(full)
    save_checkpoint(Path(out), opt, model=holder, step=man.step, extra=trainer.get("extra"),
                    lr_scheduler=_SavedScheduler(trainer.get("lr_scheduler")))
    opt.close()
    return {"step": man.step, "params": sum(len(g["params"]) for g in opt.param_groups)}


def _moments(st: Optional[dict], keys: list[str], numel: int) -> dict[str, torch.Tensor]:
    """A param's flat fp32 moments for a ShardedAMS piece. The zero1 format holds every
    state key for every param; a param the DCP checkpoint has no state for (it never had a
    gradient, so torch.optim-style AMS never made any) gets zeros: exactly what ShardedAMS
    holds for a param whose gradients were all zero (its moments stay 0; its group's step
    counts on, there is no per-param step)."""
    if st is None:
        return {k: torch.zeros(numel) for k in keys if k != "master"}
    return {k: st[k].reshape(-1).float() for k in keys if k != "master"}


def _zero1_optimizer(full: dict):
    """A world-size-1 ShardedAMS (and the module holding its params) loaded with the state
    ``read_dcp_full`` read."""
    from ..sharded import ShardedAMS

    man, trainer, optim = full["manifest"], full["trainer"], full["optim"]
    extra = trainer.get("extra") or {}
    dtype = torch.bfloat16 if isinstance(extra, dict) and extra.get("precision") == "bf16" \
        else torch.float32
    groups = saved_groups(full)  # the manifest's hyperparameters, the files' param names
    names = [n for g in groups for n in g["params"]]
    params = {n: nn.Parameter(full["model"][n].to(dtype)) for n in names}
    params.update(_tied(man, full["model"], params))
    holder = _holder(full["model"], params)
    opt_groups = [{"params": [params[n] for n in g["params"]], **{k: g[k] for k in HP_KEYS}}
                  for g in groups]
    opt = ShardedAMS(opt_groups, module=holder, broadcast_params=False, overlap=False,
                     bucket_numel=None, backend="eager")  # never stepped: no compile probe
    keys = sorted({k for sh in opt.shards for k in sh.state} | {"master"})
    state = optim.get("state") or {}
    pieces = [{"name": n, "offset": 0, "length": params[n].numel(),
               **_moments(state.get(n), keys, params[n].numel()),
               "master": full["model"][n].reshape(-1).float()} for n in names]
    sd = {"format": "sharded_ams", "version": 1, "world_size": 1, "rank": 0,
          "param_groups": [{**{k: g[k] for k in HP_KEYS}, "step": g["step"], "params": g["params"]}
                           for g in groups],
          "params": {n: {"shape": list(params[n].shape), "dtype": str(dtype), "group": gi}
                     for gi, g in enumerate(groups) for n in g["params"]},
          "pieces": pieces, "state_keys": keys,
          "skipped_steps": man.raw["optimizer"].get("skipped_steps", 0)}
    opt.load_state_dict(sd)
    return opt, holder
