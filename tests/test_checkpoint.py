"""Checkpoints of ShardedAMS, single process (``sharded_ams/checkpoint/``, format in
``docs/checkpoint.md``): the round trip, the format, every error case of a damaged
checkpoint, pruning and the CLI. World size 1, no process group; fast. Refusals of
planted or malformed input: ``test_checkpoint_refusals.py``; several processes, kills and
resharding: ``test_checkpoint_dist.py``. Every optimizer uses ``backend="eager"``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.commands import ckpt as ckpt_cli
from sharded_ams import AMS, ShardedAMS
from sharded_ams import checkpoint as C
from sharded_ams.checkpoint import (CheckpointError, CheckpointManager, commit, consolidate,
                                    find_latest_checkpoint, load_checkpoint, save_checkpoint,
                                    validate_checkpoint)

from ckpt_common import (ADAM_S, AMS_HALF, GRAMS, REPO, RichModel, assert_loaded_equals,
                         checkpoint_fixtures, draw_rngs, expect_error, file_digests, flip_bit,
                         fresh, grouped, make_checkpoint, make_model, manifest_json, named_params,
                         rewrite_manifest, seed_rngs, sha256_of, train)

base_ckpt, ckpt_copy = checkpoint_fixtures()

# ----------------------------------------------------------------------------- single process
def test_roundtrip_bf16_buffers_frozen_scheduler_rng_bitwise(tmp_path):
    """World size 1: resume continues bitwise (bf16 params with fp32 masters, lam=0.5),
    and buffers, a frozen param, the lr scheduler, ``extra`` and RNG come back."""
    K, J = 3, 3
    model, opt, sched = RichModel.build(0)
    train(model, opt, range(K), sched=sched, hook=RichModel.bump)
    seed_rngs(123)
    save_checkpoint(tmp_path / "ck", opt, model=model, step=K, extra={"tokens": 36, "t": [1.5]},
                    lr_scheduler=sched)
    rng_ref = draw_rngs()
    ref_losses = train(model, opt, range(K, K + J), sched=sched, hook=RichModel.bump)
    ref = named_params(model)

    model2, opt2, sched2 = RichModel.build(1)   # other init, other frozen wpe, other buffer
    for g in opt2.param_groups:
        g["lr"] = 0.5                            # hyperparameters come from the checkpoint
    seed_rngs(999)
    res = load_checkpoint(tmp_path / "ck", opt2, model=model2, lr_scheduler=sched2)
    assert res["step"] == K and res["extra"] == {"tokens": 36, "t": [1.5]}
    assert draw_rngs() == rng_ref
    cons = consolidate(tmp_path / "ck")
    assert_loaded_equals(model2, opt2, cons)
    assert torch.equal(model2.wpe.weight, cons["model"]["wpe.weight"])
    assert model2.counter.tolist() == [float(K)] * 3
    assert sched2.last_epoch == K and opt2.param_groups[0]["step"] == K
    losses = train(model2, opt2, range(K, K + J), sched=sched2, hook=RichModel.bump)
    assert losses == ref_losses
    for n, p in model2.named_parameters():
        assert torch.equal(p, ref[n]), n


@pytest.mark.parametrize("case", ["grams-fp32", "ams-lam0.5-bf16-groups", "rich-bf16"])
def test_consolidate_loads_into_ams_and_continues_exactly(tmp_path, case):
    """consolidate() -> single-process AMS (eager) continues exactly like the sharded run:
    params and every state tensor bitwise equal after 3 more steps."""
    K, J = 3, 3
    dtype = torch.float32 if case == "grams-fp32" else torch.bfloat16
    hp = GRAMS if case == "grams-fp32" else AMS_HALF
    hp = {k: v for k, v in hp.items() if k != "max_grad_norm"}  # AMS has no clipping
    if case == "rich-bf16":
        model, opt, _ = RichModel.build(0, hp=hp)
    else:
        model = make_model(0, dtype)
        opt = ShardedAMS(grouped(model) if "groups" in case else model, backend="eager", **hp)
    train(model, opt, range(K))
    save_checkpoint(tmp_path / "ck", opt, model=model, step=K)
    cons = consolidate(tmp_path / "ck", fused="eager")
    assert cons["step"] == K

    if case == "rich-bf16":
        model2, unused, _ = RichModel.build(7, hp=hp)
        unused.close()  # its gradient hooks must not act on model2: AMS trains it here
    else:
        model2 = make_model(7, dtype)
    model2.load_state_dict(cons["model"])       # strict: tied lm_head, buffer, frozen wpe
    for n, p in model2.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n
    ams_hp = {k: v for k, v in hp.items() if k != "preset"}
    if "preset" in hp:
        ams_hp.update(beta3=0.0, lam=-1.0)
    by_name = dict(model2.named_parameters())
    if "groups" in case:
        groups = [{**g, "params": [by_name[n] for n in g["param_names"]]} for g in grouped(model2)]
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    else:
        groups = [by_name[n] for n in cons["param_names"]]
    ams = AMS(groups, **ams_hp)
    ams.load_state_dict(cons["optimizer"])
    assert all(g["fused"] == "eager" for g in ams.param_groups)
    train(model, opt, range(K, K + J))
    train(model2, ams, range(K, K + J))
    for n, p in model2.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n
    sharded = {pc["name"]: pc for pc in opt.state_dict()["pieces"]}  # world 1: whole params
    for p, name in zip([p for g in ams.param_groups for p in g["params"]], cons["param_names"]):
        st = ams.state[p]
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_s"):
            if k in st:
                assert torch.equal(st[k].reshape(-1), sharded[name][k]), (name, k)
        assert torch.equal(st.get("master", p).float().reshape(-1), sharded[name]["master"])
        assert float(st["step"]) == K + J


def test_async_save_same_files_as_sync_and_point_in_time(tmp_path):
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    train(model, opt, range(2))
    seed_rngs(5)
    save_checkpoint(tmp_path / "sync", opt, model=model, step=2, extra={"a": 1})
    h = save_checkpoint(tmp_path / "async", opt, model=model, step=2, extra={"a": 1},
                        async_save=True)
    train(model, opt, range(2, 4))             # training goes on while the thread writes
    while h.writing():
        time.sleep(0.01)
    # every file is on disk, yet nothing is committed before wait(): no manifest
    assert (tmp_path / "async" / "shard-rank00000-of-00001.pt").is_file() and not h.done()
    assert not (tmp_path / "async" / C.MANIFEST_NAME).exists()
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        validate_checkpoint(tmp_path / "async")
    assert h.wait() == tmp_path / "async" and h.done()
    assert file_digests(tmp_path / "sync") == file_digests(tmp_path / "async")
    a, b = manifest_json(tmp_path / "sync"), manifest_json(tmp_path / "async")
    for m in (a, b):
        m.pop("created"), m.pop("created_unix")
    assert a == b
    # a synchronous handle is done at once
    h2 = save_checkpoint(tmp_path / "sync2", opt, step=4)
    assert h2.done() and h2.wait() == tmp_path / "sync2"


def test_valid_checkpoint_validates(base_ckpt):
    man = validate_checkpoint(base_ckpt)
    assert man.step == 2 and man.world_size == 1
    assert man.state_keys == ["exp_avg", "exp_avg_sq", "master"]
    assert man.param_names[0] == "wte.weight" and "lm_head.weight" not in man.params
    assert man.model["keys"]["lm_head.weight"] == {"param": "wte.weight"}
    assert set(man.files) == {"shard-rank00000-of-00001.pt", "model-extra.pt", "trainer.pt"}
    for f in man.files.values():
        assert len(f["sha256"]) == 64 and f["size"] > 0


def test_missing_manifest_is_not_a_checkpoint(ckpt_copy):
    (ckpt_copy / C.MANIFEST_NAME).unlink()
    err = expect_error(ckpt_copy, "uncommitted", "not a committed checkpoint")
    assert err.path == ckpt_copy / C.MANIFEST_NAME
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        validate_checkpoint(ckpt_copy)


def test_corrupt_manifest(ckpt_copy):
    (ckpt_copy / C.MANIFEST_NAME).write_text('{"format": "sharded_ams.checkpoint", "step"')
    expect_error(ckpt_copy, "format", "manifest.json", "corrupt manifest")


@pytest.mark.parametrize("victim", ["shard-rank00000-of-00001.pt", "trainer.pt", "model-extra.pt"])
def test_bit_flip_detected_naming_the_file(ckpt_copy, victim):
    flip_bit(ckpt_copy / victim)
    err = expect_error(ckpt_copy, "corrupt", victim, "sha256 checksum mismatch")
    assert err.path == ckpt_copy / victim
    with pytest.raises(CheckpointError, match=victim):
        validate_checkpoint(ckpt_copy)
    assert validate_checkpoint(ckpt_copy, checksums=False).step == 2  # sizes still match


def test_truncated_shard(ckpt_copy):
    victim = ckpt_copy / "shard-rank00000-of-00001.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    expect_error(ckpt_copy, "corrupt", victim.name, "truncated")


def test_missing_file(ckpt_copy):
    (ckpt_copy / "trainer.pt").unlink()
    expect_error(ckpt_copy, "missing", "trainer.pt", "missing file")


def test_unloadable_file_with_matching_checksum(ckpt_copy):
    """A file that matches its manifest entry but is not a torch file (e.g. written by
    something else): torch.load fails -> CheckpointError naming it."""
    victim = ckpt_copy / "trainer.pt"
    victim.write_bytes(b"definitely not a zip archive" * 10)
    man = manifest_json(ckpt_copy)
    man["files"]["trainer.pt"].update(size=victim.stat().st_size,
                                      sha256=sha256_of(victim))
    (ckpt_copy / C.MANIFEST_NAME).write_text(json.dumps(man))
    expect_error(ckpt_copy, "corrupt", "trainer.pt", "cannot be loaded")


def test_different_model_names_and_shapes(base_ckpt):
    e = expect_error(base_ckpt, "model_mismatch", "different model", "blocks.1.",
                     "not in the checkpoint", model_kw=dict(n_layer=2))
    assert "shape" not in str(e)
    expect_error(base_ckpt, "model_mismatch", "shape mismatch", "wte.weight (checkpoint [256, 32], "
                 "model [256, 48])", model_kw=dict(n_embd=48))
    expect_error(base_ckpt, "model_mismatch", "not in the checkpoint", "lm_head.weight",
                 model_kw=dict(tie_weights=False))
    # a buffer the checkpoint does not have
    model, opt = fresh()
    model.register_buffer("extra_buf", torch.zeros(2))
    with pytest.raises(CheckpointError, match="extra_buf") as ei:
        load_checkpoint(base_ckpt, opt, model=model)
    assert ei.value.kind == "model_mismatch"


def test_different_optimizer_state_keys(base_ckpt, tmp_path):
    # grams (beta3 == 0: no exp_avg_s) into beta3 > 0, and the reverse
    expect_error(base_ckpt, "optimizer_mismatch", "exp_avg_s", "beta3", hp=ADAM_S)
    make_checkpoint(tmp_path / "s", hp=ADAM_S)
    expect_error(tmp_path / "s", "optimizer_mismatch", "exp_avg_s", hp=GRAMS)
    # a different param-group split
    model = make_model(3)
    opt = ShardedAMS(grouped(model), backend="eager", preset="grams")
    with pytest.raises(CheckpointError, match="param groups") as ei:
        load_checkpoint(base_ckpt, opt, model=model)
    assert ei.value.kind == "optimizer_mismatch"
    # not a ShardedAMS at all
    with pytest.raises(CheckpointError, match="consolidate") as ei:
        load_checkpoint(base_ckpt, AMS(make_model(3).parameters()))
    assert ei.value.kind == "optimizer_mismatch"


def test_save_rejects_bad_inputs(tmp_path):
    model = make_model(0)
    with pytest.raises(TypeError, match="ShardedAMS"):
        save_checkpoint(tmp_path / "x", AMS(model.parameters()), step=1)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "x", opt, step=1, extra={"f": object()})
    assert find_latest_checkpoint(tmp_path) is None


def test_find_latest_skips_invalid(tmp_path, caplog):
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    for s in (1, 2, 3, 4):
        train(model, opt, range(s - 1, s))
        save_checkpoint(tmp_path / C.step_dir_name(s), opt, model=model, step=s)
    (tmp_path / "step-00000004" / C.MANIFEST_NAME).unlink()          # crashed save
    flip_bit(tmp_path / "step-00000003" / "shard-rank00000-of-00001.pt")   # rotten disk
    shutil.copytree(tmp_path / "step-00000001", tmp_path / "custom-name")  # any dir w/ manifest
    (tmp_path / "not-a-checkpoint").mkdir()
    with caplog.at_level(logging.WARNING, logger="sharded_ams.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    text = caplog.text
    assert "step-00000004" in text and "not a committed checkpoint" in text
    assert "step-00000003" in text and "checksum" in text
    assert find_latest_checkpoint(tmp_path / "empty") is None
    # the manager falls back the same way, collectively, when loading
    model2, opt2 = fresh()
    res = CheckpointManager(tmp_path).load_latest(opt2, model=model2)
    assert res["step"] == 2 and res["path"].endswith("step-00000002")


def test_manager_prunes_only_after_commit(tmp_path, monkeypatch):
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    mgr = CheckpointManager(tmp_path, keep_last=2)

    def dirs():
        return sorted(p.name for p in tmp_path.iterdir() if p.is_dir())

    for s in (1, 2, 3, 4):
        train(model, opt, range(s - 1, s))
        mgr.save(s, opt, model=model)
    assert dirs() == ["step-00000003", "step-00000004"]
    # a save whose commit fails deletes nothing it did not write, and leaves nothing behind
    (tmp_path / "step-00000005").mkdir()  # a crashed save's leftover: pruned after a commit

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(commit, "_commit_manifest", fail)
    with pytest.raises(CheckpointError, match="disk full") as ei:
        mgr.save(5, opt, model=model)
    assert ei.value.kind == "save_failed"
    assert dirs() == ["step-00000003", "step-00000004", "step-00000005"]
    assert list((tmp_path / "step-00000005").iterdir()) == []  # its files were removed
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    monkeypatch.undo()
    mgr.save(6, opt, model=model)                   # prunes 3 and the crashed 5
    assert dirs() == ["step-00000004", "step-00000006"]
    # async: nothing is pruned until the commit in wait()
    h = mgr.save(7, opt, model=model, async_save=True)
    assert {"step-00000004", "step-00000006"} <= set(dirs())
    mgr.wait()
    assert h.done() and dirs() == ["step-00000006", "step-00000007"]
    mgr.close()
    # keep_last=1 is allowed (commit happens before pruning); the just-committed checkpoint
    # survives even if a stale leftover has a higher step
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    stale = tmp_path / "step-00000099"
    shutil.copytree(tmp_path / "step-00000007", stale)
    rewrite_manifest(stale, step=99)
    mgr1.save(8, opt, model=model)
    assert dirs() == ["step-00000008", "step-00000099"]
    mgr1.close()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    assert CheckpointManager(tmp_path, keep_last=None).prune() == []


# ----------------------------------------------------------------------------- CLI
def test_cli_inspect_and_consolidate(base_ckpt, ckpt_copy, tmp_path, capsys):
    assert ckpt_cli.main(["inspect", str(base_ckpt)]) == 0
    out = capsys.readouterr().out
    man = validate_checkpoint(base_ckpt)
    assert "status:     valid" in out and "step:       2" in out and "world size: 1" in out
    assert f"{len(man.params)} tensors, {man.numel():,} elements" in out
    assert f"({4 * man.numel():,} B)" in out and "lam=-1.0" in out

    assert ckpt_cli.main(["inspect", str(base_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] and info["reason"] is None and info["step"] == 2
    assert info["world_size"] == 1 and info["num_params"] == len(man.params)
    assert info["state_bytes"] == {k: 4 * man.numel() for k in man.state_keys}
    assert info["hyperparameters"][0]["lam"] == -1.0 and info["optimizer"] == "ShardedAMS"

    flip_bit(ckpt_copy / "shard-rank00000-of-00001.pt")
    assert ckpt_cli.main(["inspect", str(ckpt_copy)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "shard-rank00000-of-00001.pt" in out and "step:       2" in out
    assert ckpt_cli.main(["inspect", str(tmp_path / "nothing"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["valid"] is False
    (tmp_path / "a_file").write_text("x")  # a file, an empty run dir: said as they are
    assert ckpt_cli.main(["inspect", str(tmp_path / "a_file")]) == 1
    assert f"{tmp_path / 'a_file'}: not a directory" in capsys.readouterr().out
    (tmp_path / "empty_run").mkdir()
    assert ckpt_cli.main(["inspect", str(tmp_path / "empty_run")]) == 1
    assert "not a checkpoint, nor a run directory holding a committed one" in capsys.readouterr().err

    out_file = tmp_path / "full" / "consolidated.pt"
    assert ckpt_cli.main(["consolidate", str(base_ckpt), str(out_file)]) == 0
    assert "wrote" in capsys.readouterr().out
    full = torch.load(out_file, weights_only=True)
    ref = consolidate(base_ckpt)
    assert full["step"] == 2 and full["param_names"] == ref["param_names"]
    for k, v in ref["model"].items():
        assert torch.equal(full["model"][k], v)
    make_model(5).load_state_dict(full["model"])
    assert ckpt_cli.main(["consolidate", str(ckpt_copy), str(tmp_path / "bad.pt")]) == 2  # refused: a corrupt checkpoint
    assert "checksum" in capsys.readouterr().err

    # registered as a subcommand of another parser (launcher/cli.py does this)
    import argparse
    parser = argparse.ArgumentParser(prog="sharded-ams")
    sub = parser.add_subparsers(dest="command")
    ckpt_cli.add_ckpt_subparser(sub)
    args = parser.parse_args(["ckpt", "inspect", str(base_ckpt), "--json", "--no-checksums"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["valid"]


def test_cli_standalone_module(base_ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "launcher.commands.ckpt", "inspect", str(base_ckpt),
                        "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 2


# ----------------------------------------------------------------------------- snapshots, sync
class _CountCopies(TorchDispatchMode):
    """Records every aten copy/clone with its non_blocking flag."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("copy_", "clone", "_to_copy"):
            nb = kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False)
            self.ops.append((name, bool(nb)))
        return func(*args, **kwargs)


def test_host_copies_are_batched_non_blocking():
    """copy_to_host: one host buffer per dtype, each tensor copied once with
    non_blocking=True (then one synchronize per CUDA device); cpu_snapshot does not copy
    the CPU tensors that state_dict() already cloned, and copies the others once."""
    from sharded_ams.checkpoint.snapshot import copy_to_host, cpu_snapshot

    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(4, 3).t(), torch.randn(2).bfloat16()]
    with _CountCopies() as mode:
        out = copy_to_host(ts)
    assert mode.ops == [("copy_", True)] * len(ts)
    for a, b in zip(ts, out):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.data_ptr() != b.data_ptr()
    fp32 = {t.untyped_storage().data_ptr() for t in out[:3]}
    assert len(fp32) == 1 and out[3].untyped_storage().data_ptr() not in fp32

    osd = {"pieces": [{"exp_avg": torch.ones(3)}]}
    trainer = {"extra": {"t": torch.zeros(2)}, "n": 1}
    with _CountCopies() as mode:
        osd2, trainer2, none = cpu_snapshot([osd, trainer, None], [False, True, True])
    assert osd2["pieces"][0]["exp_avg"] is osd["pieces"][0]["exp_avg"]
    assert trainer2["extra"]["t"] is not trainer["extra"]["t"] and trainer2["n"] == 1
    assert mode.ops == [("clone", False)] and none is None


def test_finish_param_sync_before_reading_and_after_loading(tmp_path):
    """Saving calls optimizer.finish_param_sync() before it reads the optimizer state or
    the model; loading calls it after load_state_dict (params gathered on return)."""
    model, opt = fresh()
    calls: list[str] = []

    def spy(obj, name):
        real = getattr(obj, name)

        def wrapped(*a, **k):
            calls.append(name)
            return real(*a, **k)

        setattr(obj, name, wrapped)

    opt.finish_param_sync = lambda: calls.append("finish_param_sync")
    for obj, name in ((opt, "state_dict"), (opt, "load_state_dict"), (model, "state_dict")):
        spy(obj, name)
    save_checkpoint(tmp_path / "ck", opt, model=model, step=1)
    assert calls[0] == "finish_param_sync" and "state_dict" in calls, calls
    calls.clear()
    load_checkpoint(tmp_path / "ck", opt, model=model)
    assert calls[calls.index("load_state_dict"):] == ["load_state_dict", "finish_param_sync"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_save_copies_into_pinned_memory_with_one_sync(tmp_path, monkeypatch):
    """On a GPU the snapshot goes into pinned host memory with non-blocking copies and
    exactly one synchronize per save, with no device memory on top of the state (no clone
    on the device first); the files hold the GPU state exactly."""
    from sharded_ams.checkpoint import snapshot

    model = make_model(0).cuda()
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    syncs, written = [], []
    real_sync, real_write = torch.cuda.synchronize, commit.write_file
    monkeypatch.setattr(snapshot.torch.cuda, "synchronize", lambda d=None: (syncs.append(d), real_sync(d))[1])
    monkeypatch.setattr(commit, "write_file", lambda d, n, o: (written.append(o), real_write(d, n, o))[1])
    live = opt.state_dict()
    assert len(syncs) == 1 and live["pieces"][0]["master"].is_pinned()
    syncs.clear()
    state_bytes = sum(t.numel() * t.element_size() for sh in opt.shards
                      for t in sh.state.values())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    h = save_checkpoint(tmp_path / "ck", opt, model=model, step=1, async_save=True)
    assert len(syncs) == 1
    assert torch.cuda.max_memory_allocated() - base < state_bytes / 10  # a clone: >= state
    h.wait()
    pieces = written[0]["optimizer"]["pieces"]
    for a, b in zip(pieces, live["pieces"]):
        for k in live["state_keys"]:
            assert a[k].device.type == "cpu" and a[k].is_pinned() and torch.equal(a[k], b[k].cpu())
