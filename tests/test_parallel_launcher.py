"""The launcher's ``[parallel]`` strategies through its own train step, against one process.

Three gloo spawns (no Ray, for exactness): 2 ranks train a small Llama with
``strategy = "fsdp"`` for STEPS steps (2 micro-batches per step, the first without
gradient sync; lam = 0 so every tensor's scale needs counts from both ranks; a clip that
binds) and save a DCP checkpoint after step SAVE_AT through the launcher's save; then 4
ranks resume that checkpoint on a 2 x 2 (dp x tp) mesh (DCP reshards) and train the
remaining steps, once with ``fsdp`` (``parallel.grad_sync = "micro_batch"``: both
micro-batches reduce-scattered) and once with ``zero1`` (ShardedAMS over dp of the
tensor-parallel model: a switch of strategy through the DCP format).

The reference shares no code with the launcher's optimizer path: each step the test
copies the gathered params into a plain Llama, computes every data-parallel rank's
micro-batch gradients itself, averages them, clips them in float64 and replays them
through the float64 numpy oracle (tests/oracle.py). The FSDP params must stay within fp32
rounding of it every step, and the resumed 2 x 2 run must end where the uninterrupted
2-rank run ended.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from oracle import AMSOracle

STEPS, SAVE_AT = 4, 2
LR, CLIP, EPS = 2e-2, 0.05, 1e-4  # eps near the clipped gradients: the clip shows
TOL = 2e-6  # measured max 1.7e-7 (fp32 rounding)

MODEL = {"arch": "llama", "vocab_size": 256, "block_size": 16, "n_layer": 2, "n_head": 4,
         "n_kv_head": 2, "n_embd": 32, "intermediate_size": 48, "tie_weights": False}


def _config(run_dir: str, tp: int, strategy: str, grad_sync: str = "step") -> dict:
    from launcher.config import Config

    cfg = Config.from_dict({
        "model": MODEL,
        "data": {"batch_size": 8, "micro_batch_size": 2, "max_bytes": 60_000, "seed": 3},
        "optim": {"preset": "cadam", "lr": LR, "max_grad_norm": CLIP, "eps": EPS,
                  "backend": "eager"},
        "job": {"steps": STEPS, "num_workers": dist.get_world_size(), "storage_path": run_dir},
        "parallel": {"strategy": strategy, "tp": tp, "grad_sync": grad_sync}})
    return {**cfg.to_dict(), "run_dir": run_dir}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()


def _oracle_grads(w, ref, step: int) -> list:
    """Every data-parallel rank's micro-batch gradients on the plain ``ref``, averaged,
    then clipped as clip_grad_norm_ does (float64)."""
    from launcher.train.step import split_micro

    d = w.cfg.data
    with torch.no_grad():
        for rp, p in zip(ref.parameters(), w.model.parameters()):
            rp.copy_(_full(p))
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for r in range(w.layout.dp_size):
        x, y = w.data.get_batch("train", step, d.batch_size, d.block_size, seed=d.seed, rank=r,
                                world_size=w.layout.dp_size)
        micro = split_micro(x, y, w.accum)
        for mx, my in micro:
            ref.zero_grad()
            (ref(mx, my)[1] / len(micro)).backward()
            for t, p in zip(total, ref.parameters()):
                t += p.grad
    grads = [t / w.layout.dp_size for t in total]
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    coef = min(1.0, CLIP / (norm + 1e-6))
    return [g * coef for g in grads], norm


def _train(w, start: int, stop: int, oracle, ref) -> dict:
    from launcher.train.loop import _train_step

    errs, norms = [], []
    for step in range(start, stop):
        grads, norm = _oracle_grads(w, ref, step)
        _train_step(w, step)
        oracle.step([g.numpy() for g in grads])
        norms.append((w.optimizer.last_step.grad_norm, norm))
        w.optimizer.finish_param_sync()  # zero1: the params' gather may still be in flight
        got = [_full(p) for p in w.model.parameters()]
        errs.append(max(float((g - torch.from_numpy(o.p)).abs().max())
                        for g, o in zip(got, oracle.tensors)))
    return {"errs": errs, "norms": norms, "final": [_full(p) for p in w.model.parameters()]}


def _job(ckpt: str, tp: int, resume: bool, strategy: str = "fsdp", grad_sync: str = "step") -> dict:
    from launcher.train.loop import _build, _extra, _reduced
    from launcher.train.models import build_model
    from sharded_ams.checkpoint import load_dcp, save_dcp
    from sharded_ams.checkpoint.dcp_read import read_dcp_full

    torch.manual_seed(0)
    w = _build(_config(os.path.join(ckpt, "run", strategy), tp, strategy, grad_sync),
               device=torch.device("cpu"))
    ref = build_model(w.model_table).double()
    start = 0
    if resume:
        start = load_dcp(ckpt + "/step", w.model, w.optimizer, lr_scheduler=w.scheduler)["step"]
    init = [_full(p) for p in w.model.parameters()]
    oracle = AMSOracle.start(init, lr=LR, betas=(0.9, 0.999), beta3=0.0, lam=0.0, eps=EPS,
                             weight_decay=0.0)
    if resume:  # the oracle continues from the checkpoint's moments, as DCP reads them
        saved = read_dcp_full(ckpt + "/step")["optim"]["state"]
        for o, (name, _) in zip(oracle.tensors, w.model.named_parameters()):
            o.m, o.v = (saved[name][k].double().numpy() for k in ("exp_avg", "exp_avg_sq"))
            o.t = start
    out = _train(w, start, SAVE_AT if not resume else STEPS, oracle, ref)
    if not resume:
        save_dcp(ckpt + "/step", w.model, w.optimizer, step=SAVE_AT, extra=_extra(w),
                 lr_scheduler=w.scheduler, mesh=_extra(w)["mesh"])
        more = _train(w, SAVE_AT, STEPS, oracle, ref)
        out = {k: out[k] + more[k] if k != "final" else more[k] for k in out}
    out["layout"] = (w.layout.strategy, w.layout.dp_size, w.layout.tp)
    out["sync_every_micro_batch"] = getattr(w.optimizer, "sync_every_micro_batch", None)
    out["start_line"] = _reduced(w)  # what the start line says of it
    return out


@functools.cache
def _results() -> tuple:
    with tempfile.TemporaryDirectory(prefix="parlaunch_") as d:
        first = run_distributed(_job, 2, d, 1, False, timeout=300)
        second = run_distributed(_job, 4, d, 2, True, "fsdp", "micro_batch", timeout=300)
        third = run_distributed(_job, 4, d, 2, True, "zero1", timeout=300)
    return first, second, third


def _check(r: dict, layout: tuple) -> None:
    assert r["layout"] == layout
    assert max(r["errs"]) < TOL, r["errs"]
    for got, want in r["norms"]:  # the global norm before clipping, over dp x tp
        assert got == pytest.approx(want, rel=1e-5)


def test_fsdp_train_step_equals_one_process():
    first = _results()[0]
    for r in first:
        _check(r, ("fsdp", 2, 1))
        assert r["sync_every_micro_batch"] is False  # the default: no sync before the last
        assert r["start_line"] == ", grads reduced once per step (unsharded grads held between micro-batches)"


@pytest.mark.parametrize("strategy", ["fsdp", "zero1"])
def test_dcp_resume_on_a_2x2_tp_mesh_equals_the_uninterrupted_run(strategy):
    """fsdp's checkpoint resumed on dp 2 x tp 2 by fsdp, and by zero1 (ShardedAMS on the
    tensor-parallel model): on the oracle every step, and where the 2-rank run ended."""
    first, *resumed = _results()
    for r in resumed[strategy == "zero1"]:
        _check(r, (strategy, 2, 2))
        assert r["sync_every_micro_batch"] is (True if strategy == "fsdp" else None)
        assert r["start_line"] == (", grads reduce-scattered each micro-batch" if strategy == "fsdp" else "")
        for a, b in zip(r["final"], first[0]["final"]):
            assert float((a - b).abs().max()) < TOL


@pytest.mark.parametrize("sets, message", [
    (["parallel.strategy=ddp"], r"parallel.strategy must be one of \['zero1', 'fsdp'\]"),
    (["parallel.grad_sync=micro_batch"], r"parallel.grad_sync is for strategy 'fsdp' \(strategy 'zero1' reduces once"),
    (["parallel.strategy=fsdp", "parallel.grad_sync=layer"], r"parallel.grad_sync must be one of \['step', 'micro_batch'\]"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "model.arch=gpt"], r"built-in llama only.*'gpt'"),
    (["parallel.strategy=fsdp", "parallel.tp=3"], r"tp = 3 does not divide model.n_head = 4"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "model.n_kv_head=1"], r"tp = 2 does not divide model.n_kv_head = 1"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "model.tie_weights=true"],
     r"^parallel\.tp = 2 does not fit the model: .*this model ties them: set model\.tie_weights = false"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "data.block_size=15", "model.block_size=16"],
     r"does not divide the sequence length 15"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "model.factory=x:y", "data.block_size=8"],
     r"llama only.*'x:y'"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "job.num_workers=\"2-4\""], r"every worker count.*\(3 do not\)"),
    (["parallel.strategy=fsdp", "parallel.tp=2", "job.num_workers=4", "data.batch_size=6"],
     r"4 workers are 2 data-parallel replicas: data.micro_batch_size \(2\) must divide"),
])
def test_what_does_not_compose_is_refused_by_name(sets, message):
    from launcher.config import load_config

    base = ["model.arch=llama", "model.n_head=4", "model.n_embd=32", "model.tie_weights=false",
            "data.batch_size=8", "data.micro_batch_size=2", "job.num_workers=2"]
    with pytest.raises(ValueError, match=message):
        load_config(None, base + sets, environ={})


@pytest.mark.parametrize("strategy", ["fsdp", "zero1"])
def test_tp_configs_that_compose(strategy):
    from launcher.config import load_config

    cfg = load_config(None, ["model.arch=llama", "model.n_head=4", "model.n_embd=32",
                             "model.tie_weights=false", "data.batch_size=6", "job.num_workers=4",
                             f"parallel.strategy={strategy}", "parallel.tp=2"],
                      environ={})  # 6 rows split over 2 replicas, not 4
    assert (cfg.parallel.strategy, cfg.parallel.tp) == (strategy, 2)
    assert cfg.to_dict()["parallel"] == {"strategy": strategy, "tp": 2, "grad_sync": "step"}


def test_fsdp_reduces_fp32_params_in_fp32_whatever_grad_reduce_dtype_says():
    """optim.grad_reduce_dtype applies to bf16 params only (docs/config.md: "fp32 params
    always reduce in fp32", as ShardedAMS does under zero1); FSDP2's policy for fp32 and
    bf16-autocast params reduced their gradients in bf16."""
    from launcher.train.parallel.layout import mixed_precision

    for precision in ("fp32", "bf16-autocast"):
        for reduce in ("fp32", "bf16"):
            assert mixed_precision(precision, reduce) is None, (precision, reduce)
    for reduce, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        policy = mixed_precision("bf16", reduce)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, dtype)


def test_compile_with_tp_gets_a_cache_per_rank(monkeypatch, tmp_path):
    """Compiled tp graphs name their tp process group, and the names differ between tp
    groups; a shared warm Inductor cache handed ranks another group's graph (a crash on the
    second launch: tests/check_compile_parallel.py, run by hand). Each rank gets its own
    cache directory, once (a second call does not nest it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from launcher.train.loop import _per_rank_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _per_rank_compile_cache(3)
    _per_rank_compile_cache(3)
    assert cache_dir() == str(tmp_path / "inductor" / "rank3")


def test_fsdp_accumulating_per_step_notes_the_gradients_it_holds(monkeypatch, capsys, tmp_path):
    """At launch, what ``grad_sync = "step"`` holds between micro-batches (and the way out);
    nothing when it reduces each micro-batch, does not accumulate, or holds little."""
    from pathlib import Path

    import launcher.run.parallel_config as pc
    from launcher.cli import main as cli_main
    from launcher.config import load_config
    from launcher.run.preflight import preflight

    gpt = str(Path(__file__).resolve().parents[1] / "launcher" / "configs" / "gpt_tiny.toml")
    sets = ["data.max_bytes=60000", "parallel.strategy=fsdp", "data.micro_batch_size=2",
            f"job.storage_path={tmp_path}"]
    n = preflight(load_config(gpt, sets, environ={})).num_params
    base = ["train", gpt, "--dry-run", *[x for s in sets for x in ("--set", s)]]
    assert cli_main(base) == 0 and "unsharded" not in capsys.readouterr().err  # far below the bar
    monkeypatch.setattr(pc, "HELD_NOTE_BYTES", 0)
    assert cli_main(base) == 0
    err = capsys.readouterr().err
    assert (f"parallel.grad_sync = 'step' with 4 micro-batches: every worker holds the model's "
            f"unsharded gradients between them ({4 * n / (1 << 30):.1f} GiB in fp32); "
            "parallel.grad_sync = 'micro_batch' keeps them sharded") in err, err
    for extra in ("parallel.grad_sync=micro_batch", "data.micro_batch_size=8"):
        assert cli_main(base + ["--set", extra]) == 0
        assert "unsharded" not in capsys.readouterr().err, extra
    cfg = load_config(gpt, sets + ["model.arch=llama", "model.tie_weights=false", "parallel.tp=2",
                                   "model.precision=bf16", "optim.grad_reduce_dtype=bf16"], environ={})
    note = pc.held_grads_note(cfg.parallel, cfg.model, cfg.data, cfg.optim, cfg.job, 8 << 30)
    assert "with 8 micro-batches" in note and "(8.0 GiB in bf16)" in note, note  # 2 B x 8 Gi / tp 2
