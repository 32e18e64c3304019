"""The launcher's resume and batch checks under careless input (issue 23): a resume that
changes the optimizer is refused naming both values (lr: the checkpoint's wins, said
plainly), as is one that changes the run's data, seed, precision or a factory model's
inputs (global batch and sequence length: a note); and a batch the workers cannot split names the nearest batch
sizes that work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_common import make_model, train
from launcher.cli import main as cli_main
from launcher.run.resume_checks import check_loaded_groups
from launcher.run.scaling import check_batch_split
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import CheckpointError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grams_run(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of a Grams run with lr 1e-2 (and its scheduler)."""
    root = tmp_path_factory.mktemp("runs")
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", preset="grams", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train(model, opt, range(1), sched=sched)
    save_checkpoint(root / "run" / "step-00000001", opt, model=model, step=1, lr_scheduler=sched, extra={})
    return root


def _dry_run(capsys, root: Path, *sets: str) -> tuple[int, str]:
    argv = ["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--storage-path", str(root), "--name", "run",
            "--dry-run", "--set", "data.max_bytes=60000"]
    for s in sets:
        argv += ["--set", s]
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("sets, named", [
    (["optim.preset=adamw", "optim.lr=0.5"], ["preset 'grams' (beta3=0.0, lam=-1.0)", "preset 'adamw' (beta3=0.0, lam=1.0)"]),
    (["optim.preset=", "optim.lam=0.5", "optim.lr=0.01"], ["preset 'grams'", "no preset (beta3=0.0, lam=0.5)"]),
    (["optim.preset=", "optim.beta3=0.9", "optim.lr=0.01"], ["preset 'grams'", "no preset (beta3=0.9, lam=-1.0)"]),
])
def test_resume_refuses_a_changed_optimizer(grams_run, capsys, sets, named):
    rc, err = _dry_run(capsys, grams_run, *sets)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "manifest.json: param_groups[0] was trained with" in err and "cannot change the optimizer" in err
    for n in named:
        assert n in err, err


def test_resume_says_which_lr_wins(grams_run, capsys):
    rc, err = _dry_run(capsys, grams_run, "optim.lr=0.5")
    assert rc == 0, err
    assert "optim.lr = 0.5 differs from the run's 0.01" in err and "the checkpoint's lr wins" in err
    assert "schedule's shape (optim.schedule, warmup_steps, min_lr_ratio, job.steps) comes from the config" in err
    rc, err = _dry_run(capsys, grams_run, "optim.lr=0.01", "optim.preset=", "optim.lam=-1")  # Grams spelled out
    assert rc == 0 and "differs" not in err, err


def test_worker_refuses_to_load_into_another_preset(grams_run):
    """The worker's own check (a Ray checkpoint the driver could not read, or a direct call)."""
    from launcher.train.parallel.layout import Layout
    from launcher.train.resume import _load  # what resume() calls for each candidate

    path = str(grams_run / "run" / "step-00000001")
    model = make_model(1)
    opt = ShardedAMS(model, backend="eager", preset="adamw", lr=1e-2)
    with pytest.raises(ValueError, match=r"trained with preset 'grams'.*this optimizer has preset 'adamw'"):
        _load(path, opt, model, None, Layout("zero1", 1, 0, 1))
    check_loaded_groups(path, ShardedAMS(make_model(1), backend="eager", preset="grams").param_groups)


@pytest.mark.parametrize("batch, workers, micro, nearest", [
    (16, 3, None, "15 or 18"),
    (16, 2, 3, "12 or 18"),
    (2, 4, None, ": 4"),
    (16, [2, 4], None, "12 or 24"),
    (24, [1, 4], 4, ": 48"),
])
def test_batch_split_errors_name_the_nearest_batches_that_work(batch, workers, micro, nearest):
    with pytest.raises(ValueError) as e:
        check_batch_split(batch, workers, micro)
    msg = str(e.value)
    assert f"the nearest data.batch_size values that work{'' if nearest.startswith(':') else ': '}{nearest}" in msg, msg
    assert "every size in the range must divide" not in msg  # read backwards
    for fix in [int(x) for x in nearest.replace(":", "").split(" or ")]:
        check_batch_split(fix, workers, micro)  # each named size does split


def test_cli_names_a_batch_for_a_fixed_worker_count(capsys):
    rc = cli_main(["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--num-workers", "3",
                   "--set", "data.batch_size=16", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "the nearest data.batch_size values that work: 15 or 18" in err, err


@pytest.mark.timeout(60)  # without the check, ray.init retries here for many minutes
def test_an_address_nothing_answers_at_is_refused_in_seconds(tmp_path, capsys):
    """A mistyped port: Ray's connect retried for minutes (still at it after 200 s), with
    GCS timeouts on the terminal; now one line, exit 2, before any Ray call."""
    import socket

    from launcher.run.preflight import LaunchError, check_ray_address

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")  # something answers: Ray's turn
        check_ray_address(f"ray://127.0.0.1:{port}")
    check_ray_address("auto")  # Ray's to resolve
    with pytest.raises(LaunchError, match=rf"--address ray://127\.0\.0\.1:{port}: no Ray cluster"):
        check_ray_address(f"ray://127.0.0.1:{port}")
    rc = cli_main(["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--address",
                   f"127.0.0.1:{port}", "--set", f"job.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"sharded-ams train: error: --address 127.0.0.1:{port}: "
                                          "no Ray cluster answers there"), err
    assert "ray start --head --port=" in err[-1]


# ----------------------------------------------------------------------------- data and precision


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory "run" holding a checkpoint of gpt_tiny at step 3 written as the
    training loop writes it (its _build and _extra: data, seed, precision, batch shape),
    on 1 worker: the dry-runs below (2 workers) resume it resized."""
    pytest.importorskip("ray.train")
    from launcher.train.loop import _extra

    root = tmp_path_factory.mktemp("runs")
    w = _tiny_worker(root)
    save_checkpoint(root / "run" / "step-00000003", w.optimizer, model=w.model, step=3, extra=_extra(w),
                    lr_scheduler=w.scheduler)
    return root


def _tiny_worker(root: Path, **sets):
    from launcher.config import load_config
    from launcher.train.loop import _build

    cfg = load_config(ROOT / "launcher/configs/gpt_tiny.toml",
                      {"job.storage_path": str(root), "job.name": "run", "optim.backend": "eager",
                       "data.max_bytes": 60000, "job.num_workers": 1, **sets}, environ={})
    return _build({**cfg.to_dict(), "run_dir": cfg.job.run_dir}, device=torch.device("cpu"))


_NEW_RUN = "start a new run (--name NEW; with --resume-from "


@pytest.mark.parametrize("sets, named", [
    (["data.seed=7"], "data.seed = 7 differs from the run's 0: the batch of each step is drawn from (data.seed, step)"),
    (["model.precision=bf16"], "model.precision is 'bf16'; the run trained in 'fp32'"),
    (["data.max_bytes=50000"], "data.max_bytes = 50000 differs from the run's 60000"),
    (["data.val_fraction=0.2"], "data.val_fraction = 0.2 differs from the run's 0.1: another train split"),
])
def test_resume_refuses_other_data_seed_or_precision(tiny_run, capsys, sets, named):
    """A rerun of the run's name resumed its checkpoint silently on other batches or in
    another precision; the checkpoint records them (extra)."""
    rc, err = _dry_run(capsys, tiny_run, *sets)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sharded-ams train: error: {tiny_run / 'run' / 'step-00000003'}: {named}"), err
    assert _NEW_RUN + str(tiny_run / "run" / "step-00000003") in err, err


@pytest.mark.parametrize("sets, note", [
    ([], None),
    (["job.num_workers=1"], None),  # the size it was saved at; the others resize 1 -> 2
    (["data.micro_batch_size=4"], None),  # the same global batch, accumulated
    (["data.batch_size=8"], "note: data.batch_size = 8 differs from the run's 16"),
    (["data.block_size=32"], "note: data.block_size = 32 differs from the run's 64"),
])
def test_resume_allows_a_resize_and_notes_a_new_batch_shape(tiny_run, capsys, sets, note):
    rc, err = _dry_run(capsys, tiny_run, *sets)
    notes = [ln for ln in err.splitlines() if "note:" in ln]
    assert rc == 0, err
    assert notes == ([] if note is None else [notes[0]]) and (note is None or note in notes[0]), err


def test_resume_from_starts_a_new_run_that_may_change_the_data(tiny_run, capsys):
    """job.resume_from (a new run from a checkpoint: fine-tuning, a copy) is not held to
    the data, seed or precision of the run it starts from."""
    ckpt = str(tiny_run / "run" / "step-00000003")
    argv = ["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--storage-path", str(tiny_run), "--dry-run",
            "--name", "tuned", "--resume-from", ckpt]
    for s in ("data.seed=7", "model.precision=bf16", "data.max_bytes=50000", "data.batch_size=8"):
        argv += ["--set", s]
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 0 and "error" not in err and "note: data" not in err, err
    assert not (tiny_run / "tuned").exists()


def test_a_different_model_is_refused_with_the_way_out_that_fits(tiny_run, capsys):
    """A rerun of the run with another model shape: a new name; --resume-from a checkpoint
    of another model (already a new name): a checkpoint of this model, or none."""
    rc, err = _dry_run(capsys, tiny_run, "model.n_embd=32")
    assert rc == 2 and "holds a different model (model.n_embd: checkpoint 64, config 32)" in err, err
    assert "Use a new job.name (--name)" in err, err
    ckpt = str(tiny_run / "run" / "step-00000003")
    rc = cli_main(["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--storage-path", str(tiny_run),
                   "--dry-run", "--name", "other", "--resume-from", ckpt, "--set", "model.n_embd=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a different model" in err and "job.name" not in err, err
    assert "name one of this model, or start from scratch without it" in err, err


def test_a_changed_corpus_or_tokenizer_is_refused_by_name():
    """check_same_run on the corpus descriptions a checkpoint records (prepare-data dirs
    without preparing any): another directory; the same one prepared again with another
    tokenizer (its sha256); another kind of data. Unrecorded keys (older checkpoints) pass."""
    from types import SimpleNamespace

    from launcher.run.resume_checks import check_same_run

    data = SimpleNamespace(seed=0, val_fraction=0.1, max_bytes=1, batch_size=16, block_size=64)

    def run(saved, now):
        return check_same_run({"data": saved, "data_seed": 0, "precision": "fp32"}, data=data,
                              data_describe=now, precision="fp32", path="CK")

    a = {"path": "/d/a", "tokenizer_sha256": "1" * 64}
    assert run(a, dict(a)) == [] and run(a, {**a, "path": "/d/a/"}) == []
    for now, why in (({"path": "/d/b", "tokenizer_sha256": "1" * 64}, "another corpus"),
                     ({"path": "/d/a", "tokenizer_sha256": "2" * 64}, "prepared again, with another tokenizer"),
                     ({"corpus": "stdlib", "vocab_size": 256}, "another corpus"),
                     ({"factory": "m:f", "vocab_size": 9}, "another corpus")):
        with pytest.raises(ValueError, match=r"^CK: the run trained on data\.path /d/a \(tokenizer sha256 "
                                             r"1111111111111111\.\.\.\); the config gives .*" + why):
            run(a, now)
    with pytest.raises(ValueError, match=r"trained on data\.factory 'm:f'; the config gives data\.factory 'm:g'"):
        run({"factory": "m:f"}, {"factory": "m:g"})
    assert check_same_run({"model": {}}, data=data, data_describe=a, precision="bf16", path="CK") == []


def test_a_checkpoint_whose_contents_fail_to_load_gives_way_to_an_older_one(tmp_path, monkeypatch,
                                                                           capsys):
    """A flipped bit in the newest checkpoint (sizes intact: only the load's sha256 sees it):
    the worker said "trying the next newest checkpoint" but had no other candidate, so every
    restart and every rerun failed; now it loads the next older one."""
    import ray.train

    from launcher.train.loop import _extra
    from launcher.train.resume import resume

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    w = _tiny_worker(tmp_path)
    run = tmp_path / "run"
    for step in (3, 5):
        save_checkpoint(run / f"step-{step:08d}", w.optimizer, model=w.model, step=step,
                        extra=_extra(w), lr_scheduler=w.scheduler)
    shard = next((run / "step-00000005").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    args = (0, 1, w.optimizer, w.model, w.scheduler, w.layout)
    assert resume(w.config, str(run), *args) == (3, str(run / "step-00000003"))
    out = capsys.readouterr().out
    assert f"cannot resume from {run / 'step-00000005'}" in out and "checksum" in out, out
    (run / "step-00000003" / "manifest.json").unlink()  # nothing older left: refused, not a new start
    with pytest.raises(CheckpointError, match="no checkpoint of the run could be loaded"):
        resume(w.config, str(run), *args)


def test_a_reported_lr_is_the_one_its_step_used(tmp_path):
    """`step 20 | loss ... | lr X`: X was read after the scheduler moved on, so it was the
    next step's lr (step 30 of a 30-step warmup said 3e-4, the end of the schedule, for a
    step taken at 3e-3). The loss and grad norm beside it are the step's own."""
    from launcher.train.loop import _step_metrics, _train_step, _Window, lr_factor

    w = _tiny_worker(tmp_path, **{"job.steps": 4, "optim.warmup_steps": 3})
    window = _Window(w.device)
    for step in range(4):
        window.add(_train_step(w, step).detach())
        used = 3e-3 * lr_factor(step, total_steps=4, warmup_steps=3, schedule="cosine",
                                min_lr_ratio=0.1)
        metrics = _step_metrics(w, step + 1, 0, window)
        assert metrics["lr"] == pytest.approx(used, rel=1e-12), (step, metrics["lr"], used)
    assert metrics["lr"] == pytest.approx(3e-3)  # the last step ran at full lr; after it, the minimum


def test_worker_refuses_to_resume_its_run_on_other_data(tiny_run, monkeypatch):
    """The worker's own check (a checkpoint on an object store the driver could not read,
    or a direct call): the run's checkpoints are checked, job.resume_from is not."""
    import ray.train

    from launcher.train.resume import resume

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    w = _tiny_worker(tiny_run)
    same = {"data": w.data.describe, "precision": "bf16"}  # as a worker with model.precision = "bf16"
    args = (0, 1, w.optimizer, w.model, w.scheduler, w.layout)
    with pytest.raises(ValueError, match=r"model\.precision is 'bf16'; the run trained in 'fp32'"):
        resume(w.config, str(tiny_run / "run"), *args, same_run=same)
    ckpt = str(tiny_run / "run" / "step-00000003")  # job.resume_from of a new run: not checked
    assert resume({**w.config, "resume_from": ckpt}, str(tiny_run / "other"), *args, same_run=same) == (3, ckpt)
    assert resume(w.config, str(tiny_run / "run"), *args,
                  same_run={**same, "precision": "fp32"}) == (3, ckpt)  # the same run: resumes


# ----------------------------------------------------------------------------- a factory's model

FACTORY = """
import torch
class Scaled(torch.nn.Module):
    def __init__(self, vocab, scale):
        super().__init__()
        self.table, self.scale = torch.nn.Embedding(vocab, vocab), scale
    def forward(self, idx, targets=None):
        return self.table(idx) * self.scale
def build(table):
    return Scaled(table["vocab_size"], table["options"].get("scale", 1.0))
def build_other(table):
    return Scaled(table["vocab_size"], 2.0)
"""
_FACTORY = {"model.factory": "resume_factory:build", "model.options": {"scale": 0.5}}


@pytest.fixture
def factory_run(tmp_path, monkeypatch) -> Path:
    """A run "run" of a factory model whose option (a logit scale) keeps every shape, saved
    as the training loop saves it (_extra)."""
    pytest.importorskip("ray.train")
    from launcher.train.loop import _extra

    (tmp_path / "resume_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    w = _tiny_worker(tmp_path, **_FACTORY)
    assert _extra(w)["model"]["options"] == {"scale": 0.5}  # the record the check reads
    save_checkpoint(tmp_path / "run" / "step-00000003", w.optimizer, model=w.model, step=3, extra=_extra(w),
                    lr_scheduler=w.scheduler)
    return tmp_path


_OPTIONS = "model.options differ from the run's "


@pytest.mark.parametrize("sets, named", [
    (["model.options={ scale = 0.25 }"],
     _OPTIONS + "(scale: the run's 0.5, now 0.25): model.factory 'resume_factory:build' builds the model from them"),
    (["model.options={ scale = 0.5, rope = \"yarn\" }"], _OPTIONS + "(rope: the run's unset, now 'yarn')"),
    (["model.options={}"], _OPTIONS + "(scale: the run's 0.5, now unset)"),
    (["model.options={ scale = 0.5 }", "model.dropout=0.1"],
     "model.dropout = 0.1 differs from the run's None: model.factory 'resume_factory:build' is given"),
])
def test_resume_refuses_other_factory_options(factory_run, capsys, sets, named):
    """Options that keep every tensor's shape loaded silently into another model."""
    rc, err = _dry_run(capsys, factory_run, "model.factory=resume_factory:build", *sets)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sharded-ams train: error: {factory_run / 'run' / 'step-00000003'}: {named}"), err
    assert _NEW_RUN + str(factory_run / "run" / "step-00000003") in err, err
    rc, err = _dry_run(capsys, factory_run, "model.factory=resume_factory:build", "model.options={ scale = 0.5 }")
    assert rc == 0 and "error" not in err, err


def test_worker_refuses_to_resume_its_run_with_another_factory_or_options(factory_run, monkeypatch):
    import ray.train

    from launcher.train.resume import resume

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    w = _tiny_worker(factory_run, **_FACTORY)
    same = {"data": w.data.describe, "precision": w.precision}
    args = (0, 1, w.optimizer, w.model, w.scheduler, w.layout)
    run, ckpt = str(factory_run / "run"), str(factory_run / "run" / "step-00000003")
    other = "resume_factory:build_other"
    refusals = (({"options": {"scale": 2.0}}, r"model\.options differ from the run's \(scale: the run's 0\.5, now 2\.0\)"),
                ({"factory": other}, rf"model\.factory = '{other}' differs from the run's 'resume_factory:build'"))
    for model, match in refusals:
        config = {**w.config, "model": {**w.config["model"], **model}}
        with pytest.raises(ValueError, match=match):
            resume(config, run, *args, same_run=same)
        assert resume({**config, "resume_from": ckpt}, str(factory_run / "new"), *args, same_run=same) == (3, ckpt)
    assert resume(w.config, run, *args, same_run=same) == (3, ckpt)


def test_a_model_record_without_options_is_not_held_to_them():
    """Checkpoints written before a key was recorded resume; a built-in model ignores options."""
    from types import SimpleNamespace

    from launcher.run.resume_checks import check_same_run

    data = SimpleNamespace(seed=0, val_fraction=0.1, max_bytes=1, batch_size=16, block_size=64)
    now = {"factory": "m:f", "options": {"scale": 2.0}, "dropout": 0.1}

    def run(saved_model, model=now):
        extra = {"data_seed": 0} if saved_model is None else {"data_seed": 0, "model": saved_model}
        return check_same_run(extra, data=data, data_describe={}, precision="fp32", path="CK", model=model)

    assert run(None) == [] and run({}) == [] and run({"factory": "m:f"}) == []
    assert run({"factory": None, "options": {"a": 1}}, {"factory": None, "options": {"a": 2}}) == []
    assert run({"factory": "m:f", "options": {"scale": 2.0}, "dropout": 0.1}) == []
    assert run({"factory": "m:f", "options": {"scale": 2.0}}, model=None) == []  # not asked to check
    with pytest.raises(ValueError, match=r"^CK: model\.factory = 'm:f' differs from the run's None"):
        run({"factory": None, "options": {}})


def test_a_rerun_of_a_finished_run_says_so_without_starting_ray(tiny_run, tmp_path, monkeypatch, capsys):
    """Its checkpoint is at job.steps already: the driver says so and reports the run's last
    losses from its records, in seconds; Ray and its workers (~16 s) are not started."""
    import json
    import shutil

    import launcher.run.driver as rl
    from launcher.config import load_config
    from launcher.run.records import METRICS_FILE, STATE_DIR

    shutil.copytree(tiny_run / "run", tmp_path / "run")
    (tmp_path / "run" / STATE_DIR).mkdir()
    recs = [{"step": 2, "loss": 2.5, "attempt": "a", "start_step": 0},
            {"step": 3, "loss": 2.25, "val_loss": 2.75, "attempt": "a", "start_step": 0}]
    (tmp_path / "run" / STATE_DIR / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setattr(rl, "_ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    for steps in (3, 2):
        cfg = load_config(ROOT / "launcher/configs/gpt_tiny.toml",
                          {"job.storage_path": str(tmp_path), "job.name": "run", "job.steps": steps,
                           "data.max_bytes": 60000, "job.num_workers": 1}, environ={})
        out = rl.run(cfg)
        said = capsys.readouterr().out
        assert (out.step, out.start_step, out.train_loss, out.val_loss) == (3, 3, 2.25, 2.75)
        assert out.checkpoint.endswith("step-00000003") and out.restarts == 0
        assert (f"run 'run' is already at step 3 (job.steps={steps}), checkpoint " in said
                and "nothing to train; raise job.steps (--steps N) to train further" in said), said
        assert "nothing left to train" in said and "val loss    2.7500" in said
