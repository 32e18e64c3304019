"""``ShardedAMS`` checkpoints in DCP format (``sharded_ams/checkpoint/dcp_sharded.py``): a
``zero1`` run on a (dp, tp) = (2, 2) mesh saves, and the checkpoint loads on every other
layout of 4 ranks, exactly. Issue 20, parts 2 and 4.

One spawned job of 4 gloo ranks. Run A trains the launcher's Llama (tensor-parallel, with
sequence parallelism, bf16 params with fp32 masters, lam = 0.5 and beta3 = 0.9 so every
state key and the per-tensor counts are in play) for ``STEPS`` steps and saves a DCP
checkpoint after step ``CKPT_STEP``. Then fresh models and optimizers of another seed load
it on (2, 2), (4, 1) (plain data parallelism), (1, 4) (tensor parallelism only) and as
``AMS`` on a ``fully_shard``-ed fp32 model over 4 ranks (FSDP2), through ``load_dcp`` and
through a DCP user's own ``dcp.load`` of ``get_optimizer_state_dict`` (every key it asks
for, param groups included, must be in the files).

The oracle shares no code with the DCP path: each optimizer's full state (m, v, s and the
fp32 weights of every param) is rebuilt from its own in-memory layout: ShardedAMS's
``state_dict()`` pieces (name, offset, length) joined per tp coordinate and then joined
over tp by the param's DTensor layout (``full_tensor``); FSDP2's DTensor state by
``full_tensor``. Every layout's loaded state must equal A's at the save bit for bit, as
must DCP's own reassembly of the files (``read_dcp_full``). The (2, 2) load then trains on
and its params must equal A's, bit for bit, at every later step. The tensors are shaped so
that every tp shard and dp piece is uneven (vocab 67 over tp 2 and 4, pieces that cut rows).
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch
import torch.distributed as dist

from dist_utils import run_distributed

STEPS = 5
CKPT_STEP = 2
LR = 1e-2
KW = dict(lr=LR, beta3=0.9, lam=0.5, weight_decay=0.1)
LAYOUTS = [(2, 2), (4, 1), (1, 4)]


def _cfg():
    from launcher.train.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=67, block_size=8, n_layer=1, n_head=4, n_kv_head=4,
                       n_embd=32, intermediate_size=40)


def _mesh(dp: int, tp: int):
    from torch.distributed.tensor import init_device_mesh

    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _sharded(dp: int, tp: int, seed: int):
    """The launcher's zero1 (+ tp) model and optimizer on a (dp, tp) mesh."""
    from launcher.train.models.llama import Llama
    from launcher.train.parallel.tp import apply_tp
    from sharded_ams import ShardedAMS

    torch.manual_seed(seed)
    model = Llama(_cfg()).to(torch.bfloat16)
    mesh = _mesh(dp, tp)
    if tp > 1:
        model = apply_tp(model, mesh["tp"])
    opt = ShardedAMS(model, max_grad_norm=1.0, backend="eager", device_mesh=mesh, **KW)
    return model, opt, mesh


def _fsdp(seed: int):
    from torch.distributed.fsdp import fully_shard

    from launcher.train.models.llama import Llama
    from sharded_ams import AMS

    torch.manual_seed(seed)
    model = Llama(_cfg())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # named params, as the launcher's FSDPAMS: its param groups carry param_names
    return model, AMS(model.named_parameters(), fused="eager", **KW)


def _train_step(model, opt, step: int, dp_rank: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    idx = torch.randint(0, 67, (2, 8), generator=g)
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()
    opt.finish_param_sync()


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sharded_full_state(model, opt) -> dict:
    """Every param's whole state and fp32 weight, from ShardedAMS's own pieces."""
    from torch.distributed.tensor import DTensor

    sds: list = [None] * dist.get_world_size()
    dist.all_gather_object(sds, opt.state_dict())
    mine = opt.mp.select(sds)  # the pieces of this rank's tp coordinate, all dp ranks
    out = {}
    for name, p in model.named_parameters():
        shape = tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
        recs = sorted((r for sd in mine for r in sd["pieces"] if r["name"] == name),
                      key=lambda r: r["offset"])
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_s", "master"):
            flat = torch.cat([r[key] for r in recs])
            loc = flat.view(shape)
            if isinstance(p, DTensor):
                loc = DTensor.from_local(loc, p.device_mesh, p.placements, shape=p.shape,
                                         stride=p.stride()).full_tensor()
            out[f"{name}.{key}"] = loc.clone()
    return out


def _fsdp_full_state(model, opt) -> dict:
    out = {}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_s"):
            out[f"{name}.{key}"] = _full(opt.state[p][key]).clone()
        out[f"{name}.master"] = _full(p.detach()).clone()
    return out


def _differ(a: dict, b: dict) -> list[str]:
    """Keys whose tensors are not bitwise equal (or missing on one side)."""
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or not torch.equal(a[k].float(), b[k].float()))


def _job(root: str) -> dict:
    from sharded_ams.checkpoint import load_dcp, save_dcp
    from sharded_ams.checkpoint.dcp_read import read_dcp_full

    rank = dist.get_rank()
    out: dict = {"differ": {}, "params_after": []}
    model, opt, mesh = _sharded(2, 2, seed=0)
    dp_rank = mesh["dp"].get_local_rank()
    ckpt = os.path.join(root, "ckpt")
    params_a = []
    for step in range(STEPS):
        _train_step(model, opt, step, dp_rank)
        params_a.append({n: _full(p.detach()).clone() for n, p in model.named_parameters()})
        if step == CKPT_STEP:
            want = _sharded_full_state(model, opt)
            save_dcp(ckpt, model, opt, step=step + 1)  # the mesh: ShardedAMS's own
    out["compiled"] = _compiles_over_the_params(model, opt)
    from sharded_ams.checkpoint import save_checkpoint

    try:  # the native format cannot hold tp pieces: refused on every rank, naming DCP
        save_checkpoint(os.path.join(root, "native"), opt, model=model, step=STEPS)
        out["native_refusal"] = None
    except ValueError as exc:
        out["native_refusal"] = str(exc)
    opt.close()
    if rank == 0:
        full = read_dcp_full(ckpt)
        files = {f"{n}.{k}": v for n, st in full["optim"]["state"].items()
                 for k, v in st.items() if k != "step"}
        files.update({f"{n}.master": v for n, v in full["model"].items()})
        out["differ"]["files"] = _differ(want, files)
        out["manifest"] = dict(full["manifest"].raw["optimizer"], mesh=full["manifest"].mesh)
    dist.barrier()
    for dp, tp in LAYOUTS:
        model, opt, mesh = _sharded(dp, tp, seed=1)
        got = load_dcp(ckpt, model, opt)
        out["differ"][f"zero1 {dp}x{tp}"] = _differ(want, _sharded_full_state(model, opt))
        out.setdefault("steps", []).append(got["step"])
        if (dp, tp) == (2, 2):  # trains on: A's params, bit for bit
            for step in range(CKPT_STEP + 1, STEPS):
                _train_step(model, opt, step, mesh["dp"].get_local_rank())
                out["params_after"].append(_differ(
                    params_a[step], {n: _full(p.detach()) for n, p in model.named_parameters()}))
        opt.close()
    out["tied"] = _tied_round_trip(os.path.join(root, "tied"))
    model, opt = _fsdp(seed=1)
    load_dcp(ckpt, model, opt)
    out["differ"]["fsdp 4"] = _differ(want, _fsdp_full_state(model, opt))
    # a DCP user's own load, param groups and all (torch's reader: trusted files here)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    model, opt = _fsdp(seed=2)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    out["differ"]["fsdp 4, plain dcp.load"] = _differ(want, _fsdp_full_state(model, opt))
    return out


class _Tied(torch.nn.Module):
    """An embedding and a head sharing one weight: two state-dict keys, one param."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(67, 8)
        self.head = torch.nn.Linear(8, 67, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx)).float().square().mean()


def _tied_round_trip(path: str) -> list:
    """ShardedAMS over the world on a tied bf16 model: both keys hold the fp32 masters in
    the files, and a fresh model loads them (what failed, empty: nothing)."""
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import load_dcp, save_dcp
    from sharded_ams.checkpoint.dcp_read import read_dcp_full

    def build(seed):
        torch.manual_seed(seed)
        model = _Tied().to(torch.bfloat16)
        return model, ShardedAMS(model, backend="eager", **KW)

    model, opt = build(0)
    model(torch.arange(8).view(2, 4)).backward()
    opt.step()
    save_dcp(path, model, opt, step=1)
    master = _sharded_full_state(model, opt)["emb.weight.master"]
    bad = []
    if dist.get_rank() == 0:
        files = read_dcp_full(path)["model"]
        bad += [k for k in ("emb.weight", "head.weight") if not torch.equal(files[k], master)]
    fresh, fopt = build(1)
    load_dcp(path, fresh, fopt)
    bad += [] if torch.equal(fresh.emb.weight, model.emb.weight) else ["loaded weight"]
    opt.close()
    fopt.close()
    return bad


def _compiles_over_the_params(model, opt) -> list:
    """torch.compile over the DTensor params, whose local tensors live in ShardedAMS's flat
    buffer: torch 2.13's fake-tensor conversion crashed on an inner tensor at a non-zero
    storage offset (``buffers.offset_free``). Returns what failed (empty: nothing)."""
    params = [p for p in model.parameters()]
    try:
        got = torch.compile(lambda ts: [t.to_local() * 2 for t in ts], fullgraph=True)(params)
    except Exception as exc:  # the crash itself is what this guards
        return [f"{type(exc).__name__}: {str(exc)[:200]}"]
    bad = [n for (n, p), g in zip(model.named_parameters(), got)
           if not torch.equal(g, p.to_local() * 2)]
    bufs = [sh.buf.param for sh in opt.shards]  # their memory is the params' (writes show)
    saved, before = [b.clone() for b in bufs], [p.to_local().clone() for p in params]
    for b in bufs:
        b.add_(1)
    bad += [n for (n, p), b in zip(model.named_parameters(), before)
            if not torch.equal(p.to_local(), b + 1)]
    for b, s in zip(bufs, saved):
        b.copy_(s)
    return bad


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        return run_distributed(_job, 4, root, timeout=300)


def test_zero1_tp_checkpoint_loads_exactly_on_every_layout():
    """The files and every layout's loaded state equal run A's state at the save."""
    for rank, res in enumerate(_results()):
        assert res["differ"] and all(v == [] for v in res["differ"].values()), (rank, res["differ"])
        assert len(res["differ"]) == len(LAYOUTS) + 2 + (rank == 0)
        assert res["steps"] == [CKPT_STEP + 1] * len(LAYOUTS)


def test_tied_weights_save_their_masters_under_every_key():
    for rank, res in enumerate(_results()):
        assert res["tied"] == [], (rank, res["tied"])


def test_compile_sees_the_params_in_the_flat_buffer():
    for rank, res in enumerate(_results()):
        assert res["compiled"] == [], (rank, res["compiled"])


def test_resumed_run_follows_the_uninterrupted_one_bitwise():
    for rank, res in enumerate(_results()):
        assert res["params_after"] == [[]] * (STEPS - CKPT_STEP - 1), (rank, res["params_after"])


def test_the_native_format_refuses_tp_and_names_dcp():
    for res in _results():
        assert "save_dcp" in (res["native_refusal"] or ""), res["native_refusal"]


def test_manifest_names_the_optimizer_and_its_groups():
    man = _results()[0]["manifest"]
    assert man["class"] == "ShardedAMS"
    assert [g["step"] for g in man["param_groups"]] == [CKPT_STEP + 1]
    assert man["param_groups"][0]["lam"] == 0.5 and man["skipped_steps"] == 0
    assert man["mesh"] == {"strategy": "zero1", "dp": 2, "tp": 2}
