"""The launcher's resume and batch checks under careless input (issue 23): a resume that
changes the optimizer is refused naming both values (lr: the checkpoint's wins, said
plainly), and a batch the workers cannot split names the nearest batch sizes that work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_common import make_model, train
from launcher.cli import main as cli_main
from launcher.run.resume_checks import check_loaded_groups
from launcher.run.scaling import check_batch_split
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import save_checkpoint

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
    assert f"the nearest data.batch_size that work{'' if nearest.startswith(':') else ': '}{nearest}" in msg, msg
    assert "every size in the range must divide" not in msg  # read backwards
    for fix in [int(x) for x in nearest.replace(":", "").split(" or ")]:
        check_batch_split(fix, workers, micro)  # each named size does split


def test_cli_names_a_batch_for_a_fixed_worker_count(capsys):
    rc = cli_main(["train", str(ROOT / "launcher/configs/gpt_tiny.toml"), "--num-workers", "3",
                   "--set", "data.batch_size=16", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "the nearest data.batch_size that work: 15 or 18" in err, err
