"""End to end through the CLI and a fresh local Ray (each ~30-60 s here):

* the README's "Pre-train an LLM" commands, extracted from README.md and run as written
  (the train line gets flags appended to stay short: fewer steps; the compile backend
  stays on, as a user gets it);
* a run of a user's model and data factories living in the current directory, which the
  Ray workers must import too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = ("--steps 20 --set job.checkpoint_every=20 --set job.eval_every=20 "
         "--set job.log_every=10")


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # sharded-ams and python of this interpreter
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def readme_commands() -> list[str]:
    """The bash block of the README's "Pre-train an LLM" section, as lines."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Pre-train an LLM\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one bash block: the whole path"
    return blocks[0].splitlines()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_pretrain_an_llm(tmp_path):
    lines = readme_commands()
    train = [i for i, ln in enumerate(lines) if ln.startswith("sharded-ams train ")]
    assert [ln.split()[:2] for ln in lines if ln.startswith("sharded-ams")] == \
        [["sharded-ams", "prepare-data"], ["sharded-ams", "train"], ["sharded-ams", "ckpt"]]
    lines[train[0]] += " " + SHORT
    (tmp_path / "launcher").symlink_to(ROOT / "launcher")  # the README runs from the repo root
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    index = json.loads((tmp_path / "data/email/index.json").read_text())
    assert index["tokenizer"]["kind"] == "bpe" and index["vocab_size"] == 2048
    assert "4 x 2 micro-batch(es) x 2 worker(s)" in out  # accumulation on 2 workers
    assert re.search(r"step 20/20 \| loss \d+\.\d+ \| val \d+\.\d+ \| [\d,]+ tok/s \| [\d.e-]+ TFLOP/s", out), out[-3000:]
    assert any((tmp_path / "runs/llama-tiny/tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "out/llama-tiny").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    generated = proc.stdout.strip().splitlines()[-1]
    assert generated.startswith("def parse(") and len(generated) > len("def parse(")


MY_MODEL = '''
import torch, torch.nn as nn

class TinyLSTM(nn.Module):
    """Not a transformer: an LSTM language model returning logits only."""
    def __init__(self, vocab, width):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(vocab, width), nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)
    def forward(self, idx, targets=None):
        return self.head(self.lstm(self.embed(idx))[0])

def build(table):
    return TinyLSTM(table["vocab_size"], table["options"]["width"])
'''
MY_DATA = '''
import numpy as np

def build(table):
    """A repeating pattern: learnable, so the loss must fall."""
    stream = np.tile(np.arange(table["options"]["period"]), 4000)
    return {"train": stream[:-2000], "val": stream[-2000:], "vocab_size": 64}
'''
MY_CONFIG = '''
[job]
name = "mine"
steps = 30
num_workers = 2
log_every = 10
checkpoint_every = 30
[model]
factory = "my_model:build"
options = { width = 32 }
[data]
factory = "my_data:build"
options = { period = 7 }
block_size = 16
batch_size = 8
micro_batch_size = 2
eval_iters = 2
[optim]
lr = 1e-2
backend = "eager"
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_user_model_and_data_factories_reach_the_workers(tmp_path):
    """Factories in the current directory: the driver checks them, the workers (a fresh
    local Ray started by the CLI) import them, the loss falls, the model exports."""
    (tmp_path / "my_model.py").write_text(textwrap.dedent(MY_MODEL))
    (tmp_path / "my_data.py").write_text(textwrap.dedent(MY_DATA))
    (tmp_path / "mine.toml").write_text(MY_CONFIG)
    proc = subprocess.run(["sharded-ams", "train", "mine.toml"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "model.factory 'my_model:build' with" in out and "2 x 2 micro-batch(es) x 2 worker(s)" in out
    history = [json.loads(ln) for ln in (tmp_path / "runs/mine/.sharded_ams/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and history[-1]["val_loss"] < 1.0
    from safetensors.torch import load_file

    from launcher.commands.export import export_checkpoint

    export_checkpoint(tmp_path / "runs/mine", tmp_path / "export", "safetensors", log=lambda *_: None)
    assert load_file(tmp_path / "export/model.safetensors")["head.weight"].shape == (64, 32)
