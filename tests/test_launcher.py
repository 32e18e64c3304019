"""The Ray launcher: config parsing and the CLI (fast), Ray Train runs and torchrun (slow).

The slow tests share one embedded Ray (module fixture) and tiny jobs (eager backend, a
200 kB corpus, 30-60 steps); each ``TorchTrainer.fit`` still costs ~20-45 s here, so the
runs are shared where a test only reads them:

* ``reference``: 2 workers, 30 steps, checkpoints every 10, no failure;
* a run whose rank 1 exits after step 25 ends BITWISE equal to it (params and state);
* ``max_failures=0`` with a kill raises ``TrainingFailed`` naming the last checkpoint;
* rerunning the reference's command resumes at step 30 and trains nothing;
* a driver killed mid-run (SIGKILL, with its local Ray) is rerun on ONE worker: it
  resumes from the last committed checkpoint, resharded 2 -> 1;
* ``examples/torchrun_example.py`` trains, checkpoints and resumes under torchrun.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

from launcher.cli import main as cli_main  # noqa: E402
from launcher.config import (  # noqa: E402
    Config,
    JobConfig,
    ModelConfig,
    OptimConfig,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ROOT / "launcher" / "configs" / "gpt_tiny.toml"


# =============================================================================== config


def test_gpt_tiny_config_is_valid_and_fits_the_docker_commands():
    cfg = load_config(GPT_TINY, environ={})
    assert cfg.job.name and cfg.job.steps >= 1
    assert cfg.data.block_size == cfg.model.block_size  # unset: taken from the model
    assert Path(cfg.job.storage_path).is_absolute()
    # docker/rayjob.yaml runs it with --num-workers 4; the local default is 2
    for workers in (1, 2, 4):
        assert cfg.data.batch_size % workers == 0
    assert load_config(GPT_TINY, {"job.num_workers": 4, "job.use_gpu": True}, environ={}).job.use_gpu


def test_model_config_defaults_are_the_gpt_defaults():
    """Unset shape fields resolve to the architecture's defaults: [model] with only arch
    builds exactly GPTConfig() / the Llama "tiny" size."""
    import dataclasses

    from launcher.model import GPTConfig
    from launcher.models import build_model
    from launcher.models.sizes import ARCH_DEFAULTS

    gpt = build_model(dataclasses.asdict(ModelConfig(vocab_size=256)))
    assert gpt.cfg == GPTConfig()
    llama = ModelConfig(arch="llama")
    assert {k: getattr(llama, k) for k in ARCH_DEFAULTS["llama"]} == ARCH_DEFAULTS["llama"]
    assert ModelConfig(arch="llama", size="130m", n_layer=4).n_layer == 4  # a set field beats the size


def test_every_field_has_a_docstring():
    import ast

    tree = ast.parse((ROOT / "launcher" / "config.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                    f"{cls.name}.{node.target.id} has no docstring"


def test_toml_and_yaml_give_the_same_config(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text(
        '[job]\nname = "x"\nsteps = 7\nstorage_path = "s"\n[optim]\nbetas = [0.8, 0.9]\nlr = 1e-2\n'
        '[data]\nbatch_size = 8\n')
    (tmp_path / "a.yaml").write_text(
        "job: {name: x, steps: 7, storage_path: s}\noptim: {betas: [0.8, 0.9], lr: 0.01}\n"
        "data: {batch_size: 8}\n")
    monkeypatch.chdir(tmp_path)
    a, b = load_config("a.toml", environ={}), load_config("a.yaml", environ={})
    assert a == b
    assert a.optim.betas == (0.8, 0.9) and a.job.steps == 7
    assert a.job.storage_path == str(tmp_path / "s")
    assert load_config(None, environ={}) == Config()
    (tmp_path / "empty.yaml").write_text("")
    assert load_config("empty.yaml", environ={}) == Config()


@pytest.mark.parametrize("text, match", [
    ("[optim]\nlrr = 1\n", r"unknown key\(s\) in \[optim\]: \['lrr'\]"),
    ("[trainer]\nsteps = 1\n", r"unknown config section\(s\) \['trainer'\]"),
    ("steps = 1\n", r"unknown config section\(s\) \['steps'\]"),
    ("[job]\nsteps = 0\n", r"job\.steps must be >= 1"),
    ("[job]\nsteps = 1.5\n", r"job\.steps must be an integer"),
    ("[job]\nnum_workers = 0\n", r"job\.num_workers must be >= 1"),
    ("[job]\nname = \"a/b\"\n", r"job\.name"),
    ("[job]\nkeep_last = 0\n", r"job\.keep_last must be >= 1"),
    ("[job]\nmax_failures = -2\n", r"job\.max_failures must be >= -1"),
    ("[job]\nsteps = 10\nfail_at_step = 11\n", r"job\.fail_at_step must be <= job\.steps"),
    ("[job]\nnum_workers = 2\nfail_at_step = 5\nfail_rank = 2\n", r"job\.fail_rank must be < job\.num_workers"),
    ("[job]\nuse_gpu = \"yes\"\n", r"job\.use_gpu must be true or false"),
    ("[optim]\nlr = -1.0\n", r"optim\.lr must be >= 0"),
    ("[optim]\nbetas = [0.9]\n", r"optim\.betas must be a pair"),
    ("[optim]\nbetas = [0.9, 1.0]\n", r"optim\.betas\[1\] must be < 1"),
    ("[optim]\npreset = \"lion\"\n", r"optim\.preset must be one of"),
    ("[optim]\nbeta3 = 0.5\n", r"optim\.preset='grams' fixes beta3 and lam"),
    ("[optim]\nbackend = \"cuda\"\n", r"optim\.backend must be one of"),
    ("[optim]\nschedule = \"linear\"\n", r"optim\.schedule must be one of"),
    ("[optim]\neps = 0.0\n", r"optim\.eps must be > 0"),
    ("[optim]\nmax_grad_norm = 0.0\n", r"optim\.max_grad_norm must be > 0"),
    ("[data]\nval_fraction = 1.0\n", r"data\.val_fraction must be < 1"),
    ("[data]\nbatch_size = 15\n", r"data\.batch_size \(15\) .* divisible by job\.num_workers \(2\)"),
    ("[data]\nbatch_size = 16\nmicro_batch_size = 3\n",
     r"data\.micro_batch_size \(3\) must divide .* 16 / 2 = 8"),
    ("[data]\nmicro_batch_size = 0\n", r"data\.micro_batch_size must be >= 1"),
    ("[data]\npath = \"d\"\nfactory = \"m:f\"\n", r"data\.path or data\.factory, not both"),
    ("[data]\nfactory = \"nocolon\"\n", r"data\.factory must look like 'package\.module:function'"),
    ("[data]\nverify = \"md5\"\n", r"data\.verify must be one of"),
    ("[model]\narch = \"mamba\"\n", r"model\.arch must be one of \['gpt', 'llama'\]"),
    ("[model]\narch = \"llama\"\nsize = \"7b\"\n", r"model\.size '7b' is not a size of model\.arch='llama'"),
    ("[model]\nn_kv_head = 1\n", r"model\.n_kv_head does not apply to model\.arch='gpt'"),
    ("[model]\narch = \"llama\"\nn_head = 4\nn_kv_head = 3\n", r"model\.n_head \(4\) must be divisible by model\.n_kv_head \(3\)"),
    ("[model]\narch = \"llama\"\nn_embd = 96\nn_head = 32\n", r"n_embd / model\.n_head = 3 must be even"),
    ("[model]\nprecision = \"fp16\"\n", r"model\.precision must be one of"),
    ("[model]\nfactory = \"m:f\"\nactivation_checkpointing = true\n", r"built-in models only"),
    ("[model]\nfactory = \"m:f\"\n", r"data\.block_size .* must be set"),
    ("[optim]\ngrad_reduce_dtype = \"fp16\"\n", r"optim\.grad_reduce_dtype must be one of \['fp32', 'bf16'\]"),
    ("[job]\npy_modules = \"x\"\n", r"job\.py_modules must be a list"),
    ("[data]\nblock_size = 128\n", r"data\.block_size \(128\) must be <= model\.block_size \(64\)"),
    ("[model]\nn_head = 3\n", r"model\.n_embd \(64\) must be divisible by model\.n_head \(3\)"),
    ("[model]\nvocab_size = 0\n", r"model\.vocab_size must be >= 1"),
    ("[model]\ndropout = 1.0\n", r"model\.dropout must be < 1"),
    ("[job\n", r"invalid TOML"),
])
def test_invalid_configs_name_the_field(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path, environ={})


def test_custom_beta3_lam_without_preset():
    cfg = load_config(None, {"optim.preset": "", "optim.beta3": 0.9, "optim.lam": -0.5}, environ={})
    assert cfg.optim.preset is None
    assert cfg.optim.optimizer_kwargs()["beta3"] == 0.9 and "preset" not in cfg.optim.optimizer_kwargs()
    assert OptimConfig(preset="GRAMS").preset == "grams"


def test_overrides_env_and_precedence(tmp_path):
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("job.use_gpu=true") == ("job.use_gpu", True)
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("job.name=my-run") == ("job.name", "my-run")
    assert parse_override("job.fail_at_step=none") == ("job.fail_at_step", None)
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("steps")
    with pytest.raises(ValueError, match=r"unknown key 'stepz' in \[job\]"):
        load_config(None, ["job.stepz=3"], environ={})
    with pytest.raises(ValueError, match="must be section.key"):
        load_config(None, ["steps=3"], environ={})
    env = {"SHARDED_AMS_FAIL_AT_STEP": "5", "SHARDED_AMS_FAIL_RANK": "1"}
    cfg = load_config(GPT_TINY, environ=env)
    assert (cfg.job.fail_at_step, cfg.job.fail_rank) == (5, 1)
    cfg = load_config(GPT_TINY, ["job.fail_at_step=7"], environ=env)  # --set beats the env
    assert (cfg.job.fail_at_step, cfg.job.fail_rank) == (7, 1)
    with pytest.raises(ValueError, match="SHARDED_AMS_FAIL_AT_STEP must be an integer"):
        load_config(GPT_TINY, environ={"SHARDED_AMS_FAIL_AT_STEP": "x"})
    assert JobConfig(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
    assert JobConfig(storage_path="s3://bucket/runs", name="r").run_dir == "s3://bucket/runs/r"


def test_runtime_env_ships_user_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkg").mkdir()
    assert JobConfig().runtime_env() == {}
    job = JobConfig(working_dir=".", py_modules=["pkg", "s3://bucket/code.zip"])
    assert job.runtime_env() == {"working_dir": str(tmp_path), "py_modules": [str(tmp_path / "pkg"),
                                                                               "s3://bucket/code.zip"]}


def test_to_dict_round_trip():
    cfg = load_config(GPT_TINY, environ={})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(d) == cfg


def test_lr_schedule():
    pytest.importorskip("ray.train")
    from launcher.train_fn import lr_factor

    kw = dict(total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.55)
    assert lr_factor(100, **kw) == pytest.approx(0.1)
    assert lr_factor(50, **{**kw, "schedule": "constant"}) == 1.0


def test_find_resume_point_without_ray_snapshot(tmp_path):
    """No Ray run snapshot (older Ray, deleted, or checkpoints copied in): the newest
    committed checkpoint in the run dir is found; a differently shaped model is refused."""
    import dataclasses

    pytest.importorskip("ray.train")
    from launcher.models import build_model
    from launcher.ray_launcher import TrainingFailed, _check_same_model, find_resume_point
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import save_checkpoint

    cfg = _config(tmp_path, "scan")
    assert find_resume_point(cfg).source is None
    model = build_model(dataclasses.asdict(cfg.model))
    opt = ShardedAMS(model, backend="eager")
    run_dir = Path(cfg.job.run_dir)
    for step in (5, 10):
        save_checkpoint(run_dir / f"step-{step:08d}", opt, model=model, step=step,
                        extra={"model": dataclasses.asdict(cfg.model)})
    (run_dir / "step-00000015").mkdir()  # a save that never committed (no manifest): skipped
    point = find_resume_point(cfg)
    assert (point.source, point.step, point.path) == ("scan", 10, str(run_dir / "step-00000010"))
    _check_same_model(cfg, point)
    with pytest.raises(TrainingFailed, match=r"model\.n_layer: checkpoint 2, config 3"):
        _check_same_model(_config(tmp_path, "scan", model__n_layer=3), point)
    point = find_resume_point(_config(tmp_path, "other", job__resume_from=point.path))
    assert (point.source, point.step) == ("config", 10)


def test_metrics_history_write_and_read(tmp_path):
    """Rank 0's metrics.jsonl (launcher.train_fn.MetricsHistory) read back by the driver
    (read_history): one record per step in step order, the newest record of a step
    re-trained after a restart, no records an abandoned attempt left past its checkpoint."""
    pytest.importorskip("ray.train")
    from launcher.ray_launcher import HISTORY_FILE, read_history
    from launcher.train_fn import METRICS_FILE, STATE_DIR, MetricsHistory

    assert HISTORY_FILE == f"{STATE_DIR}/{METRICS_FILE}"
    run_dir = str(tmp_path / "run")
    assert read_history(run_dir) == []  # a new run

    def attempt(name, launch, start, steps, extra=None):
        h = MetricsHistory(run_dir, launch, name)
        for s in steps:
            h.append({"step": s, "start_step": start, "loss": 5.0 - s / 100 - (name == "b") / 10,
                      "grad_norm": float("nan"), "lr": 1e-3, "world_size": 2, **(extra or {}).get(s, {})})

    attempt("a", "L1", 0, [5, 10, 15], {10: {"val_loss": 4.9}})  # checkpoint at 10; dies after 15
    with open(tmp_path / "run" / HISTORY_FILE, "a") as f:
        f.write('{"step": 16, "lo')  # a line cut short: skipped
    attempt("b", "L1", 10, [15, 20, 25])  # restarted from step 10; the driver dies after 25
    attempt("c", "L2", 20, [30])  # relaunched from the step-20 checkpoint, log_every=10
    hist = read_history(run_dir)
    assert [(r["step"], r["attempt"]) for r in hist] == [(5, "a"), (10, "a"), (15, "b"), (20, "b"),
                                                         (30, "c")]
    assert hist[1]["val_loss"] == 4.9 and "val_loss" not in hist[0]
    assert hist[2]["loss"] == pytest.approx(5.0 - 0.15 - 0.1) and hist[2]["start_step"] == 10
    assert hist[-1]["launch_id"] == "L2" and hist[0]["grad_norm"] is None  # NaN -> null
    for line in (tmp_path / "run" / HISTORY_FILE).read_text().splitlines()[:3]:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert read_history(run_dir + "/") == hist
    uri = f"file://{tmp_path}/uri-run"  # a URI run dir: pyarrow's filesystem, where it can append
    for s in (1, 2):
        MetricsHistory(uri, "L", f"x{s}").append({"step": s, "start_step": s - 1, "loss": 1.0})
    assert [r["step"] for r in read_history(uri)] == [1, 2] and read_history(uri + "x") == []


# =============================================================================== CLI


def test_cli_dry_run_applies_flags_over_set(capsys):
    rc = cli_main(["train", str(GPT_TINY), "--dry-run", "--num-workers", "4", "--gpus", "--steps", "9",
                   "--set", "job.steps=5", "--set", "optim.lr=0.01", "--storage-path", "/mnt/ckpt/runs",
                   "--fail-at-step", "3", "--fail-rank", "2", "--name", "n1", "--max-failures", "-1"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    want = {"num_workers": 4, "use_gpu": True, "steps": 9, "name": "n1", "storage_path": "/mnt/ckpt/runs",
            "fail_at_step": 3, "fail_rank": 2, "max_failures": -1}
    assert {k: d["job"][k] for k in want} == want
    assert d["optim"]["lr"] == 0.01


def test_cli_errors_exit_2(capsys, tmp_path):
    assert cli_main(["train", str(GPT_TINY), "--num-workers", "3", "--dry-run"]) == 2
    assert "divisible by job.num_workers (3)" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["train"])
    assert e.value.code == 2


def test_cli_help_lists_train_and_ckpt(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "ckpt" in out
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--address", "--num-workers", "--gpus", "--storage-path", "--name", "--steps",
                 "--max-failures", "--fail-at-step", "--fail-rank", "--set"):
        assert flag in out


def test_python_dash_m_launcher():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "launcher", "train", str(GPT_TINY), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["name"] == "gpt-tiny"


def test_ray_log_filter():
    pytest.importorskip("ray")
    from launcher.ray_launcher import _filter_line

    for noise in ("Failed to query Ray Train Controller actor state. State API may be temporarily",
                  "Reporting training result 3: TrainingReport(...)",
                  "Traceback (most recent call last):",
                  '  File "/x/train_fn.py", line 273, in train_loop',
                  "    ^^^^^^^^^^^^",
                  "committed checkpoint /tmp/sharded-ams-ckpt-abc123 (step 20)"):
        assert _filter_line(noise) is None, noise
    for keep in ("[FailurePolicy] RETRY", "  Error count: 1 (max allowed: 3)",
                 "RuntimeError: Connection closed by peer", "my own print from the train loop"):
        assert _filter_line(keep) == keep
    long = "The actor is dead because its worker process has died. Some common causes include: OOM"
    assert _filter_line(long) == "The actor is dead because its worker process has died."


# =============================================================================== Ray runs

STEPS = 30


def _config(storage: Path, name: str, **overrides) -> Config:
    base = {
        "job.storage_path": str(storage), "job.name": name, "job.steps": STEPS,
        "job.num_workers": 2, "job.checkpoint_every": 10, "job.log_every": 10, "job.keep_last": 5,
        "job.eval_every": 0, "job.max_failures": 2, "optim.backend": "eager",
        "data.max_bytes": 200_000, "data.eval_iters": 2,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(GPT_TINY, base, environ={})


def _consolidated(path):
    from sharded_ams.checkpoint import consolidate

    return consolidate(path)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (a["param_names"][i], k)
    assert a["lr_scheduler"] == b["lr_scheduler"]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """An uninterrupted 2-worker run of STEPS steps."""
    from launcher.ray_launcher import run

    storage = tmp_path_factory.mktemp("ref")
    res = run(_config(storage, "ref"))
    assert res.start_step == 0 and res.step == STEPS and res.restarts == 0
    return res


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_resumes_bitwise_equal(reference, tmp_path):
    from launcher.ray_launcher import run

    res = run(_config(tmp_path, "killed", job__fail_at_step=25, job__fail_rank=1))
    assert res.restarts == 1
    assert res.start_step == 20  # the restarted group resumed from the step-20 checkpoint
    assert res.step == STEPS
    assert (Path(res.run_dir) / ".sharded_ams" / "failed-at-step25-rank1").exists()
    assert Path(res.checkpoint).name == Path(reference.checkpoint).name == f"step-{STEPS:08d}"
    _assert_bitwise_equal(_consolidated(reference.checkpoint), _consolidated(res.checkpoint))
    assert res.train_loss == reference.train_loss and res.val_loss == reference.val_loss
    # the metrics history: the restarted group's records replace the dead one's after step 20
    steps = [r["step"] for r in res.history]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert steps == [r["step"] for r in reference.history] == [10, 20, 30]
    assert [r["loss"] for r in res.history] == [r["loss"] for r in reference.history]
    assert [r["start_step"] for r in res.history] == [0, 0, 20]
    assert res.history[-1]["val_loss"] == res.val_loss
    assert len({r["attempt"] for r in res.history}) == 2 and len({r["launch_id"] for r in res.history}) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_max_failures_zero_fails_with_a_clear_error(ray_session, tmp_path):
    from launcher.ray_launcher import TrainingFailed, run

    t0 = time.monotonic()
    with pytest.raises(TrainingFailed) as info:
        run(_config(tmp_path, "fail0", job__fail_at_step=15, job__fail_rank=1, job__max_failures=0))
    assert time.monotonic() - t0 < 300  # an error, not a hang
    msg = str(info.value)
    assert "max_failures=0" in msg and "rerun the same command" in msg
    assert info.value.checkpoint is not None and info.value.checkpoint.endswith("step-00000010")
    assert "Traceback" not in msg  # Ray's traceback frames are trimmed from the summary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerun_after_completion_resumes_at_the_last_step(reference):
    from launcher.ray_launcher import find_resume_point, run

    cfg = _config(Path(reference.run_dir).parent, "ref")
    point = find_resume_point(cfg)
    assert point.source == "ray" and point.step == STEPS  # Ray Train V2 keeps a run snapshot
    res = run(cfg)
    assert res.start_step == res.step == STEPS and res.restarts == 0
    assert res.checkpoint == reference.checkpoint
    assert res.val_loss == reference.val_loss  # the same params, restored exactly


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session ``sid`` (the driver we started and its Ray)."""
    for _ in range(3):
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == sid:
                        pids.append(int(entry))
                except OSError:
                    pass
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_driver_crash_then_rerun_on_one_worker(ray_session, tmp_path):
    """The CLI driver (with its own local Ray) is SIGKILLed once a checkpoint is committed;
    the same run, relaunched on 1 worker, resumes from that checkpoint (resharded 2 -> 1)."""
    from launcher.ray_launcher import find_resume_point, run

    steps = 60
    log = tmp_path / "driver.log"
    cmd = [sys.executable, "-m", "launcher", "train", str(GPT_TINY), "--storage-path", str(tmp_path),
           "--name", "crash", "--steps", str(steps), "--set", "job.checkpoint_every=10",
           "--set", "job.log_every=10", "--set", "optim.backend=eager", "--set", "data.max_bytes=200000",
           "--set", "data.eval_iters=2", "--set", "job.eval_every=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    snapshot = tmp_path / "crash" / "checkpoint_manager_snapshot.json"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, f"driver exited before a checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint committed in time:\n{log.read_text()}"
    finally:
        _kill_session(proc.pid)
        proc.wait()

    cfg = _config(tmp_path, "crash", job__steps=steps, job__num_workers=1)
    point = find_resume_point(cfg)
    assert point.source == "ray" and point.step is not None and 10 <= point.step < steps
    from sharded_ams.checkpoint import validate_checkpoint

    assert validate_checkpoint(point.path).world_size == 2
    res = run(cfg)
    assert res.start_step == point.step  # resumed where the dead driver's run had got to
    assert res.step == steps and res.num_workers == 1
    assert validate_checkpoint(res.checkpoint).world_size == 1
    assert math.isfinite(res.train_loss) and res.train_loss < 3.5 and math.isfinite(res.val_loss)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_example_trains_checkpoints_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(nproc: int, steps: int) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               str(ROOT / "examples" / "torchrun_example.py"), "--steps", str(steps),
               "--checkpoint-every", "5", "--log-every", "5", "--backend", "eager",
               "--max-bytes", "200000", "--ckpt-dir", str(ckpt)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    first = torchrun(2, 10)
    assert "2 rank(s), cpu, gloo" in first and "starting from scratch" in first
    assert f"checkpoint {ckpt / 'step-00000010'}" in first
    second = torchrun(1, 15)  # resumes, resharded 2 -> 1
    assert f"resumed from {ckpt / 'step-00000010'} (step 10)" in second
    assert "done: step 15/15" in second
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-00000010", "step-00000015"]
