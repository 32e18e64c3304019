"""`ckpt export` and `ckpt consolidate` under careless or hostile input (issue 23): the
tokenizer copied only if it is the run's, one rule for OUT (no --force: nothing replaced; a
user's folder, a symlink, a FIFO, the checkpoint itself: refused), a corrupt newest
checkpoint passed over as a resume does, and one exit-status convention for every command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from launcher.cli import main as cli_main
from launcher.commands.export import ExportError, export_checkpoint
from launcher.config import load_config
from launcher.data.prepare import prepare_data
from launcher.data.tokens import load_training_data
from launcher.train.step import build_model_for_training, forward_backward
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EMAIL = Path(json.__file__).parent.parent / "email"
LLAMA = {"model.arch": "llama", "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2,
         "model.intermediate_size": 64, "model.block_size": 16, "data.block_size": 16,
         "optim.backend": "eager"}
QUIET = dict(log=lambda *_: None)


def _prep(inputs, out, **kw):
    return prepare_data([str(i) for i in inputs], out, progress=False, log=lambda *_: None,
                        warn=lambda *_: None, **kw)


def _save_run(run: Path, data_dir: Path, steps=(1, 2), extra_data=None, nan_at=None) -> None:
    cfg = load_config(None, {**LLAMA, "data.path": str(data_dir)}, environ={})
    data = load_training_data(dataclasses.asdict(cfg.data))
    table = dict(dataclasses.asdict(cfg.model), vocab_size=data.vocab_size)
    torch.manual_seed(0)
    model = build_model_for_training(table, torch.device("cpu"), "fp32")
    opt = ShardedAMS(model, backend="eager", lr=1e-2)
    for step in range(1, max(steps) + 1):
        x, y = data.get_batch("train", step, 2, 16, seed=0, rank=0, world_size=1)
        forward_backward(model, opt, [(x, y)])
        opt.step()
        opt.zero_grad()
        if step == nan_at:  # a diverged run: fp32 params are the masters
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        if step in steps:  # the trainer extra as launcher.train.loop._extra records it
            save_checkpoint(run / f"step-{step:08d}", opt, model=model, step=step,
                            extra={"model": table, "data": extra_data or data.describe})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    _prep([EMAIL / "charset.py"], root / "data")
    _save_run(root / "run", root / "data")
    return root


@pytest.fixture
def work(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(d.rglob("*"))}


def _cli_refused(capsys, argv: list[str], *needles: str) -> str:
    rc = cli_main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.err)
    assert len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err, cap.err
    for n in needles:
        assert n in cap.err, cap.err
    return cap.err


# ----------------------------------------------------------------------------- item 1: the tokenizer


def test_export_copies_the_runs_tokenizer_and_records_its_sha256(work):
    from sharded_ams.checkpoint import consolidate

    ckpt = work / "run" / "step-00000002"
    extra = consolidate(ckpt)["extra"]["data"]
    tok = (work / "data" / "tokenizer.json").read_bytes()
    assert extra["tokenizer_sha256"] == hashlib.sha256(tok).hexdigest()
    out = export_checkpoint(work / "run", work / "hf", "hf", **QUIET)
    assert (out / "tokenizer.json").read_bytes() == tok
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]


def test_export_dtype_takes_the_configs_spelling_too(work, capsys):
    """``--dtype bf16`` (as ``model.precision`` spells it) is bfloat16, not a usage error."""
    from safetensors import safe_open

    for name, want in (("bf16", "BF16"), ("fp16", "F16"), ("float32", "F32")):
        assert cli_main(["ckpt", "export", str(work / "run"), str(work / name), "--format",
                         "safetensors", "--dtype", name]) == 0
        with safe_open(work / name / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
    with pytest.raises(SystemExit):
        cli_main(["ckpt", "export", str(work / "run"), str(work / "x"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("how, match", [
    ("dotdot", r"tokenizer\.file '\.\./secret/creds' must be a plain file name"),
    ("symlink", r"tokenizer\.json: cannot open the tokenizer .*symbolic link is not followed"),
    ("copy", r"tokenizer\.json: not a Hugging Face tokenizer\.json"),
    ("fifo", r"tokenizer\.json: not a regular file"),
])
def test_a_planted_checkpoint_cannot_export_other_files(work, capsys, how, match):
    """The checkpoint's extra names a credentials file (and its sha256); the data directory it
    names points at it in every way there is: nothing of it reaches OUT."""
    (work / "secret").mkdir()
    creds = work / "secret" / "creds"
    creds.write_text("aws_secret_access_key = hunter2\n")
    evil = work / "evil"
    shutil.copytree(work / "data", evil)
    index = json.loads((evil / "index.json").read_text())
    if how == "dotdot":
        index["tokenizer"]["file"] = "../secret/creds"
    (evil / "tokenizer.json").unlink()
    if how == "symlink":
        os.symlink(creds, evil / "tokenizer.json")
    elif how == "copy":
        shutil.copyfile(creds, evil / "tokenizer.json")
    elif how == "fifo":
        os.mkfifo(evil / "tokenizer.json")
    (evil / "index.json").write_text(json.dumps(index))
    describe = {"path": str(evil), "vocab_size": 256, "tokenizer": index["tokenizer"],
                "tokenizer_file": str(creds), "tokenizer_sha256": hashlib.sha256(creds.read_bytes()).hexdigest()}
    _save_run(work / "planted", work / "data", steps=(1,), extra_data=describe)
    with pytest.raises(ExportError, match=match):
        export_checkpoint(work / "planted", work / "hf", "hf", **QUIET)
    _cli_refused(capsys, ["ckpt", "export", str(work / "planted"), str(work / "hf")], "--no-tokenizer")
    assert not (work / "hf").exists()
    export_checkpoint(work / "planted", work / "hf", "hf", tokenizer=False, **QUIET)
    assert not (work / "hf" / "tokenizer.json").exists()
    assert b"hunter2" not in b"".join(p.read_bytes() for p in (work / "hf").iterdir())


def test_a_re_prepared_data_directory_is_not_shipped_as_the_runs_tokenizer(work, capsys):
    _save_run(work / "run2", work / "data", steps=(1,))  # trained on this copy's data
    (work / "more").mkdir()
    (work / "more" / "a.txt").write_text((EMAIL / "charset.py").read_text())
    shutil.rmtree(work / "data")
    _prep([work / "more"], work / "data", tokenizer="bpe:300")  # same path, another tokenizer
    with pytest.raises(ExportError, match=r"tokenizer\.json: sha256 .* is not the tokenizer the run "
                                          r"trained with .*data\.tokenizer_sha256.*re-prepared"):
        export_checkpoint(work / "run2", work / "hf", "hf", **QUIET)
    notes: list[str] = []
    shutil.rmtree(work / "data")  # gone: exported without a tokenizer, with a note
    export_checkpoint(work / "run2", work / "hf", "hf", log=notes.append)
    assert any("no tokenizer copied" in n and "is gone" in n for n in notes), notes
    assert not (work / "hf" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------- items 3, 13: OUT


def test_export_out_one_rule(work, capsys):
    ckpt = work / "run" / "step-00000002"
    mine = work / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')  # names a subset of an export's
    for force in ([], ["--force"]):
        _cli_refused(capsys, ["ckpt", "export", str(ckpt), str(mine), "--format", "safetensors", *force],
                     "is a directory, not an earlier export")
    assert (mine / "config.json").read_text() == '{"mine": true}'
    target = work / "target"
    target.mkdir()
    (target / "model.safetensors").write_text("the user's")
    os.symlink(target, work / "link")
    _cli_refused(capsys, ["ckpt", "export", str(ckpt), str(work / "link"), "--force"], "symbolic link")
    assert (target / "model.safetensors").read_text() == "the user's"
    os.mkfifo(work / "fifo")
    _cli_refused(capsys, ["ckpt", "export", str(ckpt), str(work / "fifo"), "--force"], "special file")
    before = _tree(work / "run")
    for inside in (ckpt / "hf", work / "run" / "hf", ckpt):
        _cli_refused(capsys, ["ckpt", "export", str(work / "run"), str(inside), "--force"],
                     "inside the checkpoint directory")
    assert _tree(work / "run") == before
    out = export_checkpoint(ckpt, work / "hf", "hf", **QUIET)
    with pytest.raises(ExportError, match="exists \\(an earlier export\\); pass --force"):
        export_checkpoint(ckpt, out, "hf", **QUIET)
    export_checkpoint(ckpt, out, "safetensors", force=True, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def test_consolidate_out_one_rule(work, capsys):
    ckpt = str(work / "run" / "step-00000002")
    notes = work / "notes.txt"
    notes.write_text("keep")
    for force in ([], ["--force"]):
        _cli_refused(capsys, ["ckpt", "consolidate", ckpt, str(notes), *force], "is a file, not an earlier "
                     "consolidated file")
    assert notes.read_text() == "keep"
    os.symlink(notes, work / "link.pt")
    _cli_refused(capsys, ["ckpt", "consolidate", ckpt, str(work / "link.pt"), "--force"], "symbolic link")
    os.mkfifo(work / "fifo.pt")
    _cli_refused(capsys, ["ckpt", "consolidate", ckpt, str(work / "fifo.pt"), "--force"], "special file")
    out = work / "full.pt"
    assert cli_main(["ckpt", "consolidate", ckpt, str(out)]) == 0
    _cli_refused(capsys, ["ckpt", "consolidate", ckpt, str(out)], "pass --force")
    assert cli_main(["ckpt", "consolidate", ckpt, str(out), "--force"]) == 0
    _cli_refused(capsys, ["ckpt", "consolidate", str(work / "run"), str(work / "run" / "x.pt")],
                 "inside the checkpoint directory")
    assert notes.read_text() == "keep" and torch.load(out, weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- item 14: fallback


def test_export_and_consolidate_fall_back_past_a_corrupt_newest_checkpoint(work, capsys):
    shard = next((work / "run" / "step-00000002").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10  # sizes intact, the sha256 fails
    shard.write_bytes(bytes(data))
    out = export_checkpoint(work / "run", work / "st", "safetensors", log=print)
    err = capsys.readouterr().out
    assert "newest checkpoint" in err and "step-00000002 is unusable" in err and "step-00000001" in err
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "1"
    assert cli_main(["ckpt", "consolidate", str(work / "run"), str(work / "full.pt")]) == 0
    cap = capsys.readouterr()
    assert "step-00000002 is unusable" in cap.err and "step 1" in cap.out
    # an explicitly named checkpoint is what the user asked for: no fallback
    _cli_refused(capsys, ["ckpt", "consolidate", str(work / "run" / "step-00000002"), str(work / "x.pt")])
    # inspect shows the newest (invalid) one, and says which one a resume loads instead
    assert cli_main(["ckpt", "inspect", str(work / "run")]) == 1
    cap = capsys.readouterr()
    assert "INVALID" in cap.out and (f"a resume would load {work / 'run' / 'step-00000001'}, the "
                                     "newest valid checkpoint") in cap.err, cap.err


def test_consolidate_and_convert_read_a_diverged_checkpoint_only_when_asked(work, capsys):
    """A NaN master is refused (a run directory falls back to the older checkpoint);
    --allow-nonfinite reads it, e.g. to look at a diverged run."""
    _save_run(work / "nan", work / "data", nan_at=2)
    ckpt = str(work / "nan" / "step-00000002")
    _cli_refused(capsys, ["ckpt", "consolidate", ckpt, str(work / "a.pt")], "NaN", "--allow-nonfinite")
    _cli_refused(capsys, ["ckpt", "convert", ckpt, str(work / "d"), "--to", "dcp"], "NaN",
                 "--allow-nonfinite")
    assert cli_main(["ckpt", "consolidate", str(work / "nan"), str(work / "b.pt")]) == 0
    assert "step-00000002 is unusable" in capsys.readouterr().err
    assert torch.load(work / "b.pt", weights_only=True)["step"] == 1
    assert cli_main(["ckpt", "consolidate", ckpt, str(work / "c.pt"), "--allow-nonfinite"]) == 0
    full = torch.load(work / "c.pt", weights_only=True)
    assert full["step"] == 2 and any(t.isnan().any() for t in full["model"].values())
    assert cli_main(["ckpt", "convert", ckpt, str(work / "d"), "--to", "dcp", "--allow-nonfinite"]) == 0
    _cli_refused(capsys, ["ckpt", "convert", str(work / "d"), str(work / "z"), "--to", "zero1"], "NaN")
    assert cli_main(["ckpt", "convert", str(work / "d"), str(work / "z"), "--to", "zero1",
                     "--allow-nonfinite"]) == 0


def test_convert_reads_a_run_directory_as_export_does(work, capsys):
    """SRC may be a run directory: its newest usable checkpoint (it said a run directory of
    DCP checkpoints "is already a zero1 checkpoint"); OUT is never written inside SRC."""
    run = work / "run"
    assert cli_main(["ckpt", "convert", str(run), str(work / "d"), "--to", "dcp"]) == 0
    assert f"from {run / 'step-00000002'}: step 2" in capsys.readouterr().out
    drun = work / "drun"  # an fsdp run's directory: DCP checkpoints
    drun.mkdir()
    shutil.move(work / "d", drun / "step-00000002")
    _cli_refused(capsys, ["ckpt", "convert", str(drun), str(work / "y"), "--to", "dcp"],
                 f"{drun / 'step-00000002'} is already a dcp checkpoint")
    assert cli_main(["ckpt", "convert", str(drun), str(work / "z"), "--to", "zero1"]) == 0
    assert f"from {drun / 'step-00000002'}: step 2" in capsys.readouterr().out
    _cli_refused(capsys, ["ckpt", "convert", str(run), str(run / "step-00000009"), "--to", "dcp"],
                 "inside the checkpoint directory")
    assert not (run / "step-00000009").exists() and not (work / "y").exists()
    _save_run(work / "nan", work / "data", nan_at=2)  # falls back past a diverged newest one
    assert cli_main(["ckpt", "convert", str(work / "nan"), str(work / "e"), "--to", "dcp"]) == 0
    assert "step-00000002 is unusable" in capsys.readouterr().err
    assert json.loads((work / "e" / "manifest.json").read_text())["step"] == 1


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`sharded-ams plan ... | head -1`: the reader leaves early; the command stops with
    128 + SIGPIPE and no BrokenPipeError traceback."""
    import signal

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(["sharded-ams", "plan", "--model", "llama3-8b", "--gpus", "8"],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "PATH": _bin_path()})
    finally:
        os.close(w)
    assert proc.returncode == 128 + signal.SIGPIPE and "Traceback" not in proc.stderr, proc.stderr


def _bin_path() -> str:
    import sys

    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


# ----------------------------------------------------------------------------- newcomers


def test_one_exit_status_convention(tmp_path, capsys):
    """2: refused before anything was done (argparse, config, input, checkpoint, OUT)."""
    with pytest.raises(SystemExit) as e:
        cli_main(["ckpt", "export"])
    assert e.value.code == 2
    capsys.readouterr()
    _cli_refused(capsys, ["ckpt", "export", str(tmp_path / "none"), str(tmp_path / "o")], "does not exist")
    _cli_refused(capsys, ["ckpt", "consolidate", str(tmp_path / "none"), str(tmp_path / "o.pt")])
    _cli_refused(capsys, ["prepare-data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    _cli_refused(capsys, ["train", str(ROOT / "launcher/configs/llama_tiny.toml"), "--set",
                          f"data.path={tmp_path / 'none'}", "--dry-run"])


def test_data_is_ignored_by_git():
    """The README's LLM commands write data/ into the checkout."""
    res = subprocess.run(["git", "check-ignore", "-q", "data/tok/shard-00000.bin"], cwd=ROOT)
    assert res.returncode == 0
