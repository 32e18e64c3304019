"""The launcher examples in tiny mode: pretrain_compare.py, lam_sweep.py, resume_demo.py.

Each Ray Train run costs ~10-45 s here, so five short runs (in one embedded Ray, module
fixture) cover what needs Ray, and the rest runs without it:

* ``pretrain_compare``: Grams and AdamW, 20 steps of the tiny GPT. This is the real test
  of the shared ``_common.run_with_history`` (loss history from the launcher's
  ``RunResult.history``, run dirs keeping only their final checkpoint) and of the CSV, PNG
  and table;
* ``resume_demo``: rank 1 exits after step 15, checkpoints every 10 steps: the run reports
  one restart and resumes at step 10 (``--no-compare``: the bitwise equality with an
  uninterrupted run is already ``tests/test_faults.py``'s: a run whose worker is SIGKILLed
  ends bitwise where the uninterrupted reference does);
* ``lam_sweep``: lam = 0.5 and -0.5, 10 steps, on Ray (the two-pass AMS step that no
  preset uses); and without Ray, a fake runner checks the config each lam gets (no
  preset, beta3 = 0, lam) and returns a synthetic ``RunResult.history`` through the same
  ``history_from_result``, and the CSV, PNG and table are checked;
* ``resume_demo.compare`` on pretrain_compare's checkpoints (no extra run).

About 1.5 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ex():
    """The example modules. Importing ``_common`` sets Ray environment variables: they are
    restored afterwards, so that other test modules' Ray sessions do not inherit them."""
    saved_env, saved_path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(EXAMPLES))
    import _common
    import lam_sweep
    import pretrain_compare
    import resume_demo

    yield SimpleNamespace(common=_common, pc=pretrain_compare, lam=lam_sweep, resume=resume_demo)
    os.environ.clear()
    os.environ.update(saved_env)
    sys.path[:] = saved_path


@pytest.fixture(scope="module")
def ray_session(ex):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


# =============================================================================== no Ray


def test_bad_flags_exit_2(ex, capsys):
    for main, argv, msg in [
        (ex.pc.main, ["--eval-every", "15"], "multiple of --log-every"),
        (ex.pc.main, ["--optimizers", "grams,sgd"], "unknown ['sgd']"),
        (ex.pc.main, ["--workers", "3"], "divisible by job.num_workers"),
        (ex.pc.main, ["--set", "model.depth=3"], "unknown key 'depth'"),
        (ex.lam.main, ["--lams", "1,x"], "comma-separated numbers"),
        (ex.lam.main, ["--lams", "1,1"], "distinct"),
        (ex.resume.main, ["--fail-rank", "2"], "--fail-rank must be in [0, --workers=2)"),
        (ex.resume.main, ["--steps", "20", "--fail-at-step", "30"], "--fail-at-step must be in [1"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert msg in capsys.readouterr().err, argv


def _fake_result(cfg, loss0: float):
    """What ``launcher.run.driver.run`` returns, as far as ``history_from_result`` reads it."""
    job = cfg.job
    rows = []
    for s in range(job.log_every, job.steps + 1, job.log_every):
        row = {"step": s, "loss": loss0 / (1 + 0.01 * s)}
        if s == job.steps or (job.eval_every and s % job.eval_every == 0):
            row["val_loss"] = row["loss"] + 0.05
        rows.append(row)
    return SimpleNamespace(history=rows, train_loss=rows[-1]["loss"], val_loss=rows[-1]["val_loss"],
                           wall_time_s=1.0)


def test_lam_sweep_without_ray(ex, tmp_path, capsys):
    seen = []

    def runner(cfg, key, title):
        o, j = cfg.optim, cfg.job
        seen.append((key, title, o.preset, o.beta3, o.lam, j.name))
        assert (j.steps, j.num_workers, o.backend, cfg.model.n_layer) == (40, 2, "eager", 2)
        assert j.log_every == 10 and j.checkpoint_every == 50 and j.keep_last == 1  # config's, at log steps
        assert ex.common.make_config("/tmp/unused", "x", steps=40, log_every=20, eval_every=0).job.checkpoint_every == 60
        return ex.common.history_from_result(_fake_result(cfg, 5.0 + o.lam), cfg, key, title)

    out = tmp_path / "sweep"
    res = ex.lam.main(["--steps", "40", "--lams", "1,-0.5,-1", "--eval-every", "20", "--model", "tiny",
                       "--out", str(out)], runner=runner)
    assert seen == [("1", "lam=1 (AdamW)", None, 0.0, 1.0, "lam_1"),
                    ("-0.5", "lam=-0.5", None, 0.0, -0.5, "lam_-0.5"),
                    ("-1", "lam=-1 (Grams)", None, 0.0, -1.0, "lam_-1")]
    rows = ex.common.read_csv(res["csv"])
    assert list(rows[0]) == ["lam", "step", "train_loss", "val_loss"]
    assert [(r["lam"], r["step"]) for r in rows] == [(k, str(s)) for k in ("1", "-0.5", "-1")
                                                    for s in (10, 20, 30, 40)]
    assert [r["val_loss"] != "" for r in rows[:4]] == [False, True, False, True]
    assert res["png"] == out / "lam_sweep.png" and res["png"].read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "| lam | final train loss | final val loss |" in printed
    assert "| lam=-1 (Grams) | 2.8571 | **2.9071** |" in printed  # 4 / 1.4 (+ 0.05): the lowest
    assert "same peak lr (0.003), not tuned per optimizer, and one seed" in printed


def test_history_names_missing_steps(ex):
    cfg = ex.common.make_config("/tmp/unused", "h", steps=30, log_every=10, eval_every=0)
    res = _fake_result(cfg, 5.0)
    res.history = res.history[1:]  # step 10 gone
    with pytest.raises(RuntimeError, match=r"no train loss for step\(s\) \[10\]"):
        ex.common.history_from_result(res, cfg, "k", "t")


# =============================================================================== on Ray


@pytest.fixture(scope="module")
def pretrain_tiny(ex, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("pc")
    res = ex.pc.main(["--steps", "20", "--log-every", "5", "--eval-every", "10", "--model", "tiny",
                      "--optimizers", "grams,adamw", "--out", str(out)])
    return out, res


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pretrain_compare_tiny(ex, pretrain_tiny):
    out, res = pretrain_tiny
    rows = ex.common.read_csv(out / "losses.csv")
    assert list(rows[0]) == ["optimizer", "step", "train_loss", "val_loss"]
    assert [(r["optimizer"], int(r["step"])) for r in rows] == [(o, s) for o in ("grams", "adamw")
                                                               for s in (5, 10, 15, 20)]
    assert [r["step"] for r in rows if r["val_loss"]] == ["10", "20", "10", "20"]
    for h in res["histories"]:
        assert h.train_loss[-1] < h.train_loss[0] - 0.5  # it trains
        assert h.final_train == pytest.approx(h.train_loss[-1]) and h.final_val == pytest.approx(h.val_loss[-1])
        run_dir = out / "runs" / h.key
        assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000020"]  # keep_last=1
        assert [r["step"] for r in h.result.history] == [5, 10, 15, 20]
    assert (out / "losses.png").read_bytes()[:8] == PNG_MAGIC and (out / "losses.png").stat().st_size > 20_000
    assert res["table"].splitlines()[0] == "| optimizer | final train loss | final val loss | wall time |"
    assert [ln.split(" | ")[0] for ln in res["table"].splitlines()[2:]] == ["| Grams", "| AdamW"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lam_sweep_tiny(ex, ray_session, tmp_path):
    """Two lam values with |lam| != 1 (the two-pass step with its count all-reduce across
    the two ranks, which no preset uses), on Ray."""
    out = tmp_path / "ls"
    res = ex.lam.main(["--steps", "10", "--log-every", "5", "--eval-every", "0", "--model", "tiny",
                       "--lams", "0.5,-0.5", "--out", str(out)])
    rows = ex.common.read_csv(out / "losses.csv")
    assert [(r["lam"], r["step"], r["val_loss"] != "") for r in rows] == [
        ("0.5", "5", False), ("0.5", "10", True), ("-0.5", "5", False), ("-0.5", "10", True)]
    a, b = res["histories"]
    assert a.train_loss[0] < 5.6 and b.train_loss[0] < 5.6  # from ln(256) = 5.55
    assert a.train_loss != b.train_loss  # lam matters
    assert (out / "lam_sweep.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_resume_demo_compare(ex, pretrain_tiny, tmp_path):
    """resume_demo's comparison on pretrain_compare's checkpoints (no extra run). The
    2-rank Grams checkpoint against: the same state loaded and saved again on 1 rank
    (other files, the same tensors): none differ; a copy with one element of one state
    changed (checksums recomputed): exactly one differs; the AdamW run: many differ."""
    import shutil

    from ckpt_common import edit_shard
    from launcher.train.models import build_model
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import consolidate, load_checkpoint, save_checkpoint

    _, res = pretrain_tiny
    grams, adamw = (h.result.checkpoint for h in res["histories"])
    extra = consolidate(grams)["extra"]
    model = build_model(extra["model"])
    opt = ShardedAMS(model, preset="grams", backend="eager")
    step = load_checkpoint(grams, opt, model=model)["step"]
    save_checkpoint(tmp_path / "resaved", opt, model=model, step=step, extra=extra)
    assert sorted(os.listdir(tmp_path / "resaved")) != sorted(os.listdir(grams))  # 1 shard, not 2
    n, differing = ex.resume.compare(grams, tmp_path / "resaved")
    assert n > 10 and differing == 0

    poked = tmp_path / "poked"
    shutil.copytree(grams, poked)

    def poke(shard):
        shard["optimizer"]["pieces"][0]["exp_avg"][0] += 1.0

    edit_shard(poked, "shard-rank00000-of-00002.pt", poke)
    assert ex.resume.compare(grams, poked) == (n, 1)
    n2, differing = ex.resume.compare(grams, adamw)
    assert n2 == n and 1 < differing <= n


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_demo_tiny(ex, ray_session, tmp_path, capsys):
    res = ex.resume.main(["--steps", "20", "--checkpoint-every", "10", "--fail-at-step", "15",
                          "--fail-rank", "1", "--no-compare", "--out", str(tmp_path / "rd")])
    assert (res["restarts"], res["resumed_at"], res["step"]) == (1, 10, 20)
    assert res["uninterrupted"] is None
    printed = capsys.readouterr().out
    assert "1 restart(s); the restarted workers resumed at step 10" in printed
