"""The Ray launcher without Ray runs: config parsing (fixed and elastic worker counts,
the batch-split rule), the CLI and its driver-side checks (exit status 2 before Ray
starts), the run's records (metrics, start events, size history), the console filter; and
``examples/torchrun_example.py`` under torchrun.

Runs on Ray, with faults injected from outside, are in ``tests/test_faults.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

from launcher.cli import main as cli_main  # noqa: E402
from launcher.config import (  # noqa: E402
    Config,
    JobConfig,
    ModelConfig,
    OptimConfig,
    accumulation_steps,
    load_config,
    parse_override,
)
from launcher.run.scaling import check_batch_split, oversubscription_warning  # noqa: E402

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

    from launcher.train.models.gpt import GPTConfig
    from launcher.train.models import build_model
    from launcher.train.models.sizes import ARCH_DEFAULTS

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


@pytest.mark.parametrize("text, where", [
    ("job:\n  name: mine\n  steps: 7\ndata:\n  batch_size: 8\njob:\n  num_workers: 1\n",
     "key 'job' on line 6 was already set on line 1"),
    ("job:\n  name: a\n  steps: 7\n  name: b\n", "key 'name' on line 4 was already set on line 2"),
    ("job: {steps: 3, steps: 4}\n", "key 'steps' on line 1 was already set on line 1"),
])
def test_a_yaml_key_written_twice_is_refused_as_in_toml(tmp_path, text, where):
    """PyYAML's safe_load keeps the last of two equal keys: a second [job] section dropped
    the first one's name and steps without a word (TOML refuses: "Cannot declare ('job',) twice")."""
    (tmp_path / "twice.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"twice\.yaml: invalid YAML: " + re.escape(where)):
        load_config(tmp_path / "twice.yaml", environ={})
    # YAML merge keys may be overridden: that is what they are for
    from launcher.config_checks import read_config_file

    (tmp_path / "m.yaml").write_text("base: &b\n  steps: 3\njob:\n  <<: *b\n  steps: 5\n")
    assert read_config_file(tmp_path / "m.yaml")["job"] == {"steps": 5}


@pytest.mark.parametrize("text, match", [
    ("[optim]\nlrr = 1\n", r"bad\.toml: unknown key\(s\) in \[optim\]: \['lrr'\] \(did you mean 'lr'\?\)"),
    ("[optim]\nzzz = 1\n", r"unknown key\(s\) in \[optim\]: \['zzz'\]; known keys"),
    ("[trainer]\nsteps = 1\n", r"unknown config section\(s\) \['trainer'\]"),
    ("steps = 1\n", r"unknown config section\(s\) \['steps'\]"),
    ("[job]\nsteps = 0\n", r"job\.steps must be >= 1"),
    ("[job]\nsteps = 1.5\n", r"job\.steps must be an integer"),
    ("[job]\nnum_workers = 0\n", r"job\.num_workers must be >= 1"),
    ("[job]\nname = \"a/b\"\n", r"job\.name"),
    ("[job]\nname = \"abc\\n\"\n", r"job\.name must be letters.*got 'abc\\n'"),  # re.match + $ let it through
    ("[job]\nenv = {\"X\\n\" = \"a\"}\n", r"job\.env names must be letters.*got 'X\\n'"),
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
    ("[data]\nseed = 18446744073709551616\n", r"data\.seed must be < 2\*\*64 .*got 18446744073709551616"),
    ("[data]\nseed = -1\n", r"data\.seed must be >= 0"),
    ("[model]\nsize = [\"tiny\"]\n", r"model\.size must be a size name .*got \['tiny'\]"),
    ("[model]\narch = \"llama\"\nsize = {name = \"60m\"}\n", r"model\.size must be a size name .*got \{'name': '60m'\}"),
    ("[model]\nsize = 60\n", r"model\.size must be a size name .*got 60"),
    ("[data]\npath = \"d\"\nfactory = \"m:f\"\n", r"data\.path or data\.factory, not both"),
    ("[data]\nfactory = \"nocolon\"\n", r"data\.factory must look like 'package\.module:function'"),
    ("[data]\nverify = \"md5\"\n", r"data\.verify must be one of"),
    ("[model]\nfactory = \"m:f\"\noptions = {start = 2026-01-01}\n",  # unreadable in the record
     r"model\.options\.start must be a string, number, boolean, list or table, not date"),
    ("[data]\nfactory = \"m:f\"\n[data.options]\nat = [{t = 07:32:00}]\n",
     r"data\.options\.at\[0\]\.t must be .* not time"),
    ("[model]\narch = \"mamba\"\n", r"model\.arch must be one of \['gpt', 'llama'\]"),
    ("[model]\narch = \"llama\"\nsize = \"7b\"\n", r"model\.size '7b' is not a size of model\.arch='llama'"),
    ("[model]\nn_kv_head = 1\n", r"model\.n_kv_head does not apply to model\.arch='gpt'"),
    ("[model]\narch = \"llama\"\nn_head = 4\nn_kv_head = 3\n", r"model\.n_head \(4\) must be divisible by model\.n_kv_head \(3\)"),
    ("[model]\narch = \"llama\"\nn_embd = 96\nn_head = 32\n", r"n_embd / model\.n_head = 3 must be even"),
    ("[model]\nprecision = \"fp16\"\n", r"model\.precision must be one of"),
    ("[model]\nfactory = \"m:f\"\nactivation_checkpointing = true\n", r"built-in models only"),
    ("[model]\nfactory = \"m:f\"\n", r"data\.block_size .* must be set"),
    ("[optim]\ngrad_reduce_dtype = \"fp16\"\n", r"optim\.grad_reduce_dtype must be one of \['fp32', 'bf16'\]"),
    ("[optim]\nbucket_numel = 0\n", r"optim\.bucket_numel must be >= 1"),
    ("[optim]\nbucket_numel = \"big\"\n", r"optim\.bucket_numel must be an integer"),
    ("[job]\npy_modules = \"x\"\n", r"job\.py_modules must be a list"),
    ("[job]\nenv = {NCCL_IB_DISABLE = 1}\n", r'job\.env\.NCCL_IB_DISABLE must be a string \(quote it: "1"\), got 1'),
    ("[job]\nenv = {\"1X\" = \"a\"}\n", r"job\.env names must be letters, digits and '_'.*got '1X'"),
    ("[job]\nenv = \"NCCL_DEBUG=INFO\"\n", r"job\.env must be a table of settings"),
    ("[optim]\noverlap = 1\n", r"optim\.overlap must be true or false"),
    ("[optim]\nschedule_steps = 0\n", r"optim\.schedule_steps must be >= 1"),
    ("[data]\nblock_size = 128\n", r"data\.block_size \(128\) must be <= model\.block_size \(64\)"),
    ("[model]\nn_head = 3\n", r"model\.n_embd \(64\) must be divisible by model\.n_head \(3\)"),
    ("[model]\nvocab_size = 0\n", r"model\.vocab_size must be >= 1"),
    ("[model]\ndropout = 1.0\n", r"model\.dropout must be < 1"),
    ("[job\n", r"invalid TOML"),
    # elastic ranges: every size must split the global batch (the rule in launcher/run/scaling.py)
    ("[job]\nnum_workers = [2, 4]\n", r"data\.batch_size \(16\) does not split evenly over 3 worker\(s\), "
                                    r"which the elastic job\.num_workers \[2, 4\] allows.* multiple of 12"),
    ("[job]\nnum_workers = [1, 4]\n[data]\nbatch_size = 24\nmicro_batch_size = 4\n",
     r"does not split evenly over 4 worker\(s\).*x data\.micro_batch_size \(4\)\. Use a multiple of 48"),
    ("[job]\nnum_workers = [3, 2]\n", r"job\.num_workers must be \[min, max\] with 1 <= min <= max, got \[3, 2\]"),
    ("[job]\nnum_workers = [0, 2]\n", r"job\.num_workers must be \[min, max\] with 1 <= min"),
    ("[job]\nnum_workers = [1, 2, 4]\n", r"job\.num_workers must be a worker count \(4\) or an elastic range"),
    ("[job]\nnum_workers = \"2-x\"\n", r"job\.num_workers must be a worker count"),
    ("[job]\nresize_interval_s = 0\n", r"job\.resize_interval_s must be > 0"),
    ("[job]\nnum_workers = [1, 2]\nfail_at_step = 5\nfail_rank = 1\n", r"job\.fail_rank must be < job\.num_workers \(1"),
])
def test_invalid_configs_name_the_field(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path, environ={})


def test_the_largest_seed_the_config_accepts_is_one_torch_accepts():
    """data.seed >= 2**64 passed the checks, then every worker died in torch.manual_seed
    ("Overflow when unpacking long long"), max_failures times."""
    import torch

    cfg = load_config(None, {"data.seed": 2**64 - 1}, environ={})
    torch.Generator().manual_seed(cfg.data.seed)  # what _build's torch.manual_seed takes
    with pytest.raises(ValueError, match=r"data\.seed must be < 2\*\*64"):
        load_config(None, {"data.seed": 2**64}, environ={})
    with pytest.raises((ValueError, OverflowError, RuntimeError)):
        torch.Generator().manual_seed(2**64)  # the bound is torch's


def test_a_non_string_model_size_is_a_usage_error(tmp_path, capsys):
    """A list or table for model.size (--set, YAML) was a raw TypeError (unhashable), exit 1."""
    rc = cli_main(["train", str(GPT_TINY), "--set", 'model.size=["tiny"]', "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["sharded-ams train: error: model.size must be a size name (a string such "
                               "as \"60m\"), got ['tiny']"], err
    (tmp_path / "c.yaml").write_text("model:\n  arch: llama\n  size: {name: 60m}\n")
    assert cli_main(["train", str(tmp_path / "c.yaml"), "--dry-run"]) == 2
    assert "model.size must be a size name" in capsys.readouterr().err


def test_bucket_numel_reaches_the_optimizer():
    """Unset: ShardedAMS's own default (not passed); set: passed through as given."""
    import torch

    from sharded_ams import ShardedAMS

    assert "bucket_numel" not in load_config(None, {}, environ={}).optim.optimizer_kwargs()
    kw = load_config(None, {"optim.bucket_numel": 300}, environ={}).optim.optimizer_kwargs()
    assert kw["bucket_numel"] == 300
    opt = ShardedAMS(torch.nn.Linear(40, 20), **{**kw, "backend": "eager"})
    assert opt.bucket_numel == 300 and opt.overlap
    kw = load_config(None, {"optim.overlap": False}, environ={}).optim.optimizer_kwargs()
    assert not ShardedAMS(torch.nn.Linear(40, 20), **{**kw, "backend": "eager"}).overlap


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
    with pytest.raises(ValueError, match=r"unknown key 'stepz' in \[job\] \(did you mean 'steps'\?\)"):
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
    cfg = load_config(None, ['job.env={NCCL_DEBUG = "WARN", NCCL_SOCKET_IFNAME = "eth0"}'], environ={})
    assert cfg.job.runtime_env() == {"env_vars": {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0"}}
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what the workers get
    pytest.importorskip("ray.train")
    from launcher.run.driver import ResumePoint, _trainer

    # also in a Ray the driver did not start (ray.init's runtime_env does not apply there)
    trainer = _trainer(cfg, ResumePoint(), "launch")
    assert trainer.run_config.worker_runtime_env == {"env_vars": {"NCCL_DEBUG": "WARN",
                                                                  "NCCL_SOCKET_IFNAME": "eth0"}}


def test_to_dict_round_trip():
    cfg = load_config(GPT_TINY, environ={})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(d) == cfg


def test_num_workers_range_in_the_file_on_the_cli_and_for_ray(tmp_path, capsys):
    (tmp_path / "e.toml").write_text("[job]\nnum_workers = [2, 4]\n[data]\nbatch_size = 24\n")
    cfg = load_config(tmp_path / "e.toml", environ={})
    job = cfg.job
    assert (job.num_workers, job.min_workers, job.max_workers, job.elastic) == ([2, 4], 2, 4, True)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what the workers get
    assert cli_main(["train", str(GPT_TINY), "--dry-run", "--num-workers", "2-4", "--set", "data.batch_size=24"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["num_workers"] == [2, 4]
    for value, want in (("3", 3), ([2, 2], 2), ("1 - 2", [1, 2]), ((1, 2), [1, 2])):
        assert load_config(None, {"job.num_workers": value, "data.batch_size": 12},
                           environ={}).job.num_workers == want, value
    pytest.importorskip("ray.train")
    from launcher.run.driver import _scaling_config

    sc = _scaling_config(job)  # Ray's own ScalingConfig: elastic, with our resize interval
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (2, 4)
    assert sc.elastic_resize_monitor_interval_s == job.resize_interval_s == JobConfig().resize_interval_s
    sc = _scaling_config(load_config(GPT_TINY, environ={}).job)
    assert not sc.elasticity_enabled and sc.num_workers == 2


@pytest.mark.parametrize("batch, micro, lo, hi", [(24, None, 1, 4), (48, 2, 2, 4), (60, 5, 2, 3), (16, 2, 1, 8)])
def test_the_global_batch_is_the_same_at_every_worker_count(batch, micro, lo, hi):
    """global batch = micro-batch x accumulation steps x workers, for every size of the
    range; when a size cannot split it, the error's suggested batch splits at every size."""
    try:
        check_batch_split(batch, [lo, hi], micro)
    except ValueError as exc:
        unit = int(re.search(r"multiple of (\d+)", str(exc)).group(1))
        bad = [w for w in range(lo, hi + 1) if batch % (w * (micro or 1))]
        assert bad and all(str(w) in str(exc).split("over ")[1].split(" worker")[0] for w in bad)
        batch = unit
        check_batch_split(batch, [lo, hi], micro)
    for w in range(lo, hi + 1):
        steps = accumulation_steps(batch, w, micro)
        assert (micro or batch // w) * steps * w == batch


def test_lr_schedule():
    pytest.importorskip("ray.train")
    from launcher.train.loop import lr_factor

    kw = dict(total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.55)
    assert lr_factor(100, **kw) == pytest.approx(0.1)
    assert lr_factor(50, **{**kw, "schedule": "constant"}) == 1.0
    # a warmup as long as the run (--steps 30 on a config warming up 30): past the end
    # of the schedule its minimum, not the full lr of a cosine of length 0
    assert lr_factor(9, **{**kw, "total_steps": 10}) == pytest.approx(1.0)
    assert lr_factor(10, **{**kw, "total_steps": 10}) == pytest.approx(0.1)
    assert lr_factor(12, **{**kw, "total_steps": 5}) == pytest.approx(0.1)


def test_resume_point_is_the_newest_committed_checkpoint(tmp_path):
    """The driver (find_resume_point) and the workers (train_fn._resume_candidates) pick
    the newest committed checkpoint: in the run dir when Ray's snapshot is missing or
    lags (a report lost with a worker killed right after it), Ray's on a tie; resume_from
    only for a run without checkpoints; a differently shaped model is refused."""
    import dataclasses
    from types import SimpleNamespace

    pytest.importorskip("ray.train")
    from launcher.train.models import build_model
    from launcher.run.resume_point import LaunchError, _check_same_model, find_resume_point
    from launcher.train.resume import _resume_candidates
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import CheckpointError, save_checkpoint

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
    with pytest.raises(LaunchError, match=r"model\.n_layer: checkpoint 2, config 3"):
        _check_same_model(_config(tmp_path, "scan", model__n_layer=3), point)
    point = find_resume_point(_config(tmp_path, "other", job__resume_from=point.path))
    assert (point.source, point.step) == ("config", 10)
    with pytest.raises(LaunchError, match=r"is a run directory, not a checkpoint: name one of its "
                                          r"checkpoints, e\.g\. its newest, .*step-00000010$"):
        find_resume_point(_config(tmp_path, "other", job__resume_from=str(run_dir)))

    ray_ckpt = SimpleNamespace(path=str(run_dir / "step-00000005"))  # Ray lags: it registered step 5
    loop = {"resume_from": str(run_dir / "step-00000005")}
    assert _resume_candidates(loop, str(run_dir), ray_ckpt) == [
        (10, str(run_dir / "step-00000010"), "scan"), (5, str(run_dir / "step-00000005"), "ray")]
    assert _resume_candidates(loop, str(run_dir), SimpleNamespace(path=str(run_dir / "step-00000010")))[0][2] == "ray"
    assert _resume_candidates(loop, str(tmp_path / "new"), None) == [(5, loop["resume_from"], "config")]
    assert _resume_candidates({}, str(tmp_path / "new"), None) == []
    with pytest.raises(CheckpointError, match="not a valid checkpoint and the run dir holds no other"):
        _resume_candidates(loop, str(tmp_path / "new"), SimpleNamespace(path=str(run_dir / "step-00000015")))


def test_a_ray_checkpoint_with_a_truncated_file_is_passed_over_on_the_driver(tmp_path, monkeypatch,
                                                                            capsys):
    """Ray's snapshot registered step 12, whose shard was then truncated: the driver said
    "resuming ... from its checkpoint at step 12" and the workers resumed from step 10.
    Now the driver passes it over as they do and says so once; a run whose only
    checkpoint, Ray's, is unusable is refused (the workers would not start over on top of
    it)."""
    import dataclasses
    import shutil

    pytest.importorskip("ray.train")
    import launcher.run.resume_point as rp
    from launcher.train.models import build_model
    from sharded_ams import ShardedAMS
    from sharded_ams.checkpoint import save_checkpoint

    cfg = _config(tmp_path, "r")
    model = build_model(dataclasses.asdict(cfg.model))
    opt = ShardedAMS(model, backend="eager")
    run_dir = Path(cfg.job.run_dir)
    for step in (10, 12):
        save_checkpoint(run_dir / f"step-{step:08d}", opt, model=model, step=step)
    shard = next((run_dir / "step-00000012").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:-1])
    monkeypatch.setattr(rp, "_ray_latest", lambda d: rp.ResumePoint("ray", f"{d}/step-00000012", 12))
    said: list[str] = []
    point = rp.find_resume_point(cfg, say=said.append)
    assert (point.source, point.step) == ("scan", 10), point
    assert len(said) == 1 and said[0].startswith(f"not resuming from {run_dir}/step-00000012: "), said
    from types import SimpleNamespace

    from launcher.train.resume import _resume_candidates

    capsys.readouterr()  # the workers' choice, said once too (their scan logged it again)
    assert _resume_candidates({}, str(run_dir), SimpleNamespace(path=f"{run_dir}/step-00000012")) \
        == [(10, str(run_dir / "step-00000010"), "scan")]
    assert capsys.readouterr().out.count("not resuming from") == 1
    shutil.rmtree(run_dir / "step-00000010")
    with pytest.raises(rp.LaunchError, match=r"Ray Train's latest checkpoint is unusable \(.*step-00000012: "
                                             r".*\) and .* holds no other"):
        rp.find_resume_point(cfg)
    # a directory only the scan finds broken may be a save that never finished (a rank's
    # files missing, killed in the run's first save): not Ray's, so the run starts over
    monkeypatch.setattr(rp, "_ray_latest", lambda d: rp.ResumePoint())
    said.clear()
    assert rp.find_resume_point(cfg, say=said.append).source is None
    assert len(said) == 1 and "truncated" in said[0], said


def test_run_takes_the_resume_point_the_cli_checked(tmp_path, monkeypatch):
    """The CLI checks the resume point before run(); run() checked it again and printed
    every note (a changed lr's) twice."""
    import launcher.run.driver as drv

    class Started(Exception):
        pass

    def ray_session(*_a, **_k):
        raise Started

    monkeypatch.setattr(drv, "check_resume", lambda cfg: pytest.fail("the resume point checked twice"))
    monkeypatch.setattr(drv, "_prepare_env", lambda address: None)
    monkeypatch.setattr(drv, "_ray_session", ray_session)
    with pytest.raises(Started):
        drv.run(_config(tmp_path, "once"), checked=True, resume=drv.ResumePoint())


# =============================================================================== CLI


def test_cli_dry_run_applies_flags_over_set(capsys, monkeypatch):
    rc = cli_main(["train", str(GPT_TINY), "--dry-run", "--address", "auto", "--num-workers", "4", "--gpus", "--steps", "9",
                   "--set", "job.steps=5", "--set", "optim.lr=0.01", "--storage-path", "/mnt/ckpt/runs",
                   "--fail-at-step", "3", "--fail-rank", "2", "--name", "n1", "--max-failures", "-1"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    want = {"num_workers": 4, "use_gpu": True, "steps": 9, "name": "n1", "storage_path": "/mnt/ckpt/runs",
            "fail_at_step": 3, "fail_rank": 2, "max_failures": -1}
    assert {k: d["job"][k] for k in want} == want
    assert d["optim"]["lr"] == 0.01
    import torch  # an embedded Ray (no --address) has this machine's GPUs only

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli_main(["train", str(GPT_TINY), "--dry-run", "--num-workers", "4", "--gpus"]) == 2
    assert "job.use_gpu with 4 workers needs 4 GPUs; this machine has 1" in capsys.readouterr().err


def test_dry_run_prints_the_batch_split(capsys):
    """As the README says: workers x micro-batches (accumulation) x sequences, at every size
    of an elastic range; on stderr, so stdout stays the JSON config."""
    assert cli_main(["train", str(GPT_TINY), "--dry-run", "--num-workers", "1-2",
                     "--set", "data.micro_batch_size=4"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["data"]["micro_batch_size"] == 4
    assert err.strip() == ("[sharded-ams] batch split: global batch 16 sequences x 64 tokens = 1 worker x "
                           "4 micro-batches (accumulation steps) x 4 sequences; or 2 workers x 2 "
                           "micro-batches (accumulation steps) x 4 sequences")
    assert cli_main(["train", str(GPT_TINY), "--dry-run"]) == 0
    assert "= 2 workers x 1 micro-batch (accumulation steps) x 8 sequences\n" in capsys.readouterr().err


@pytest.mark.parametrize("batch, micro, workers, split", [
    (4, 2, "4", "2 data-parallel replicas (4 workers, tp 2) x 1 micro-batch (accumulation steps) x 2 sequences"),
    (8, None, "4", "2 data-parallel replicas (4 workers, tp 2) x 1 micro-batch (accumulation steps) x 4 sequences"),
    (8, 1, "2", "1 data-parallel replica (2 workers, tp 2) x 8 micro-batches (accumulation steps) x 1 sequences"),
])
def test_dry_run_splits_the_batch_over_data_parallel_replicas_with_tp(capsys, monkeypatch, batch, micro, workers, split):
    """The tp ranks of a replica share its rows: the batch splits over workers / tp replicas,
    as the workers split it (the split over all workers crashed --dry-run, or was wrong)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    rc = cli_main(["train", str(ROOT / "launcher/configs/llama_tiny.toml"), "--dry-run", "--num-workers", workers,
                   "--set", "data.path=none", "--set", "model.tie_weights=false", "--set", "parallel.tp=2",
                   "--set", f"data.batch_size={batch}", "--set", f"data.micro_batch_size={micro or 'none'}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.strip().splitlines()[-1].endswith(f"tokens = {split}"), err


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


@pytest.mark.parametrize("args, match", [
    (["--storage-path", "{file}/runs"], r"job\.storage_path .*/file/runs is not writable \(.*Not a directory\)"),
    (["--storage-path", "/proc/sharded-ams-test/runs"], r"job\.storage_path /proc/sharded-ams-test/runs is not writable"),
    (["--name", "file"], r"job\.storage_path/job\.name .*/file exists and is not a directory"),
    (["--resume-from", "{tmp}/missing"], r"job\.resume_from .*/missing is not a usable checkpoint: .*no such checkpoint"),
    (["--resume-from", "{tmp}"], r"job\.resume_from .* is not a usable checkpoint: .*no manifest\.json"),
    (["--set", "data.max_bytes=1"], r"corpus of 1 bytes is too small"),
    (["--num-workers", "2-4"], r"data\.batch_size \(16\) does not split evenly over 3 worker"),
    (["--num-workers", "3"], r"divisible by job\.num_workers \(3\)"),
    (["--set", "optim.backend=triton"], r'optim\.backend = "triton" needs GPU workers'),
    (["--set", "job.working_dir=/nonexistent-dir"], r"job\.working_dir /nonexistent-dir is not a directory"),
    (["--set", "job.py_modules=[\"/nonexistent-pkg\"]"], r"job\.py_modules: /nonexistent-pkg does not exist"),
])
def test_cli_checks_on_the_driver_exit_2_in_one_line_before_ray(args, match, tmp_path, capsys, monkeypatch):
    """What can be checked on the driver is, before Ray starts: exit status 2 and one line
    naming the key (the CLI's docstring), also without --dry-run."""
    pytest.importorskip("ray.train")
    import launcher.run.driver as rl

    monkeypatch.setattr(rl, "_ray_session", lambda *a, **k: pytest.fail("Ray was started"))
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    args = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in args]
    rc = cli_main(["train", str(GPT_TINY), "--storage-path", str(tmp_path), "--name", "r", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("sharded-ams train: error: ") and re.search(match, err[0]), err[0]
    assert not (tmp_path / "r").exists()  # nothing was started


def test_cli_launch_errors_inside_run_exit_2(monkeypatch, capsys):
    """A LaunchError raised once run() started (e.g. a local Ray without the GPUs asked for)
    is a usage error too, not a traceback."""
    pytest.importorskip("ray.train")
    import launcher.run.driver as rl

    def run(*a, **k):
        raise rl.LaunchError("job.use_gpu with 2 workers needs 2 GPUs;\nthis machine has 0")

    monkeypatch.setattr(rl, "run", run)
    assert cli_main(["train", str(GPT_TINY)]) == 2
    assert capsys.readouterr().err == ("sharded-ams train: error: job.use_gpu with 2 workers needs 2 GPUs; "
                                       "this machine has 0\n")


def test_warns_when_workers_exceed_the_cpus_ray_sees(monkeypatch, capsys):
    """An embedded Ray gives every worker a logical CPU: more workers than cores share
    them (~20x slower) -> a warning. On a cluster Ray never oversubscribes; a minimum the
    cluster cannot hold waits -> a warning."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cli_main(["train", str(GPT_TINY), "--num-workers", "8", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 workers on a machine with 2 CPUs" in err and "lower job.num_workers" in err
    assert cli_main(["train", str(GPT_TINY), "--num-workers", "2", "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "up to 4 workers" in oversubscription_warning([1, 4], 2, "CPU", local=True)
    assert oversubscription_warning([1, 4], 2, "CPU", local=False) is None  # elastic: starts on 2
    assert "3 workers needed to start, the Ray cluster has 2 CPUs" in oversubscription_warning(3, 2, "CPU", local=False)
    assert "lower the minimum" in oversubscription_warning([3, 4], 2, "GPU", local=False)
    pytest.importorskip("ray.train")
    import ray

    from launcher.run.driver import _check_cluster_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    _check_cluster_resources(load_config(GPT_TINY, {"job.num_workers": 4}, environ={}), started_locally=False)
    assert "4 workers needed to start, the Ray cluster has 2 CPUs now" in capsys.readouterr().out


# =============================================================================== helpers

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
