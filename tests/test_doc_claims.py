"""Claims in the docs that the code or a recorded JSON can contradict, checked against them
(the stale ones issue 27 found, kept from coming back)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_checkpoint_table_is_the_json_it_cites():
    doc = (ROOT / "docs" / "checkpoint.md").read_text()
    data = json.loads((ROOT / "benchmarks" / "results" / "bench_checkpoint.json").read_text())
    table = re.findall(r"^\| (\d) \| (sync|async|load|dcp_sync|dcp_load) \| (.*) \|$", doc,
                       re.M)
    want = [(str(r["world_size"]), r["mode"],
             f"{r['state_bytes'] / 1e9:.3f} | {r['blocked_s']:.3f} | {r['total_s']:.3f} | "
             f"{r['blocked_s_per_gb']:.2f} | {r['total_s_per_gb']:.2f}") for r in data["rows"]]
    assert table == want
    for field in re.findall(r"`(\w+)` in the JSON|JSON's `env\.(\w+)`", doc):
        name = field[0] or field[1]
        assert name in data["env"] or name in data, name


def test_readme_signatures_and_defaults():
    import torch

    from sharded_ams import AdamW, ShardedAMS

    first = next(iter(inspect.signature(ShardedAMS).parameters))
    assert f"`ShardedAMS({first}, process_group=None, *," in README
    ours = inspect.signature(AdamW).parameters["weight_decay"].default
    theirs = inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    assert (ours, theirs) == (0.0, 0.01)
    assert "`weight_decay` defaults to 0 here, to 0.01 in `torch.optim.AdamW`" in README


def test_readme_lists_every_job_key_and_the_optim_switches():
    from launcher.config import JobConfig

    def bullet(table: str) -> str:
        return README.split(f"- `{table}`: ", 1)[1].split("\n- `[", 1)[0]

    assert [f.name for f in dataclasses.fields(JobConfig) if f.name not in bullet("[job]")] == []
    for key in ("schedule_steps", "grad_reduce_dtype", "bucket_numel", "overlap"):
        assert key in bullet("[optim]"), key


def test_no_sync_is_not_called_a_no_op():
    assert "no-op" not in (ROOT / "docs" / "llm.md").read_text()


# ------------------------------------------------------------- flags and config keys named

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# flags of other programs that the docs quote, by program (ray start's and torchrun's are
# read from their own parsers)
FOREIGN = {
    "sbatch / srun": {"--job-name", "--nodes", "--ntasks", "--ntasks-per-node", "--gpus-per-node",
                      "--cpus-per-task", "--exclusive"},
    "hostname": {"--ip-address"},
    "ray get-auth-token / ray job submit": {"--generate", "--working-dir"},
    "pytest": {"--durations", "--pdb"},
    "tensorboard": {"--logdir"},
    "GaLore's torchrun_main.py (docs/llm.md)": {"--max_length", "--total_batch_size", "--scheduler",
                                                "--min_lr_ratio", "--grad_clipping"},
}
# `model.`, `data.` ... followed by a name that is not a config key
NOT_KEYS = {"model.py", "model.safetensors", "model.blocks", "model.load_state_dict"}


def _snippets(text: str):
    """The code of a Markdown text: code-block lines (continuations joined), inline spans."""
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def _cli_parsers(parser: argparse.ArgumentParser, prefix: tuple = ("sharded-ams",)) -> dict:
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_cli_parsers(sub, prefix + (name,)))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _quoted_flags(text: str) -> set[str]:
    return set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", text))


def _script_flags(script: Path) -> set[str]:
    """The flags a script's code names: its own and those of the modules beside it it imports."""
    mods = re.findall(r"^(?:from|import) (\w+)", script.read_text(), re.M)
    files = [script, *(script.parent / f"{m}.py" for m in mods if (script.parent / f"{m}.py").is_file())]
    return _quoted_flags("".join(f.read_text() for f in files))


def test_every_flag_in_the_docs_exists():
    """A `sharded-ams ...` command's flags are options of that (sub)command's parser; a
    `python script.py ...` command's appear in its directory's code; any other `--flag` of
    the docs is one of these, ray start's, torchrun's or a program's of FOREIGN."""
    from ray.scripts.scripts import start
    from torch.distributed.run import get_args_parser

    from launcher.cli import build_parser

    cli = _cli_parsers(build_parser())
    scripts = [*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("check_*.py")]
    known = set().union(*map(_options, cli.values()), *map(_script_flags, scripts), *FOREIGN.values(),
                        _options(get_args_parser()), *(p.opts for p in start.params))
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        bad += [f"{doc.name}: {f}" for f in FLAG.findall(text) if f not in known]
        for code in _snippets(text):
            for m in re.finditer(r"sharded-ams ((?:[a-z][\w-]*\s?)+)(.*)", code):
                words, key = m[1].split(), ("sharded-ams",)
                while words and key + (words[0],) in cli:
                    key += (words.pop(0),)
                rest = re.split(r"\s(?:#|\||&&|;)\s", " ".join(words) + " " + m[2])[0]
                bad += [f"{doc.name}: {' '.join(key)} {f}" for f in FLAG.findall(rest) if f not in _options(cli[key])]
            for m in re.finditer(r"python3? ((?:examples|benchmarks|tests)/\w+\.py)(.*)", code):
                assert (ROOT / m[1]).is_file(), m[1]
                rest = re.split(r"\s(?:#|\||&&|;)\s", m[2])[0]
                bad += [f"{doc.name}: {m[1]} {f}" for f in FLAG.findall(rest) if f not in _script_flags(ROOT / m[1])]
    assert bad == []


def test_every_config_key_in_the_docs_exists():
    """Every `table.key` the docs name (`--set data.max_bytes=...`, `job.num_workers`) is a key
    of that table."""
    from launcher.commands.config_reference import SECTIONS

    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    tables = "|".join(SECTIONS)
    bad = [f"{doc.name}: {m[0]}" for doc in DOCS
           for m in re.finditer(rf"(?<![\w./-])({tables})\.([A-Za-z_]\w*)\b(?![./(\w-])", doc.read_text())
           if m[2] not in keys[m[1]] and m[0] not in NOT_KEYS]
    assert bad == []


def test_every_toml_block_in_the_docs_is_a_valid_config(tmp_path):
    """A ```toml block of the docs loads as a job config as written (the fault-tolerance
    one's elastic range once came with a global batch it does not split)."""
    from launcher.config import load_config

    blocks = [(doc.name, toml) for doc in DOCS for toml in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S)]
    assert len(blocks) >= 4
    for i, (name, toml) in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(toml)
        try:
            load_config(tmp_path / f"{i}.toml", environ={})
        except ValueError as e:
            raise AssertionError(f"{name}: {e}") from e
