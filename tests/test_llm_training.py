"""The training pieces without Ray: gradient accumulation against one big batch, the
no_sync contract, precision, factories and the driver's checks, throughput/MFU,
TensorBoard, and export (read back by transformers and safetensors)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
import transformers  # in the test extra: an import error must fail, not skip

from dist_utils import run_distributed
from launcher.cli import main as cli_main
from launcher.config import accumulation_steps, load_config
from launcher.commands.export import ExportError, export_checkpoint
from launcher.run.preflight import preflight
from launcher.data.tokens import load_training_data
from launcher.train.step import (TensorBoardLog, build_model_for_training, device_batch, evaluate,
                               forward_backward, loss_of, peak_bf16_flops, peak_bf16_tflops,
                               resolve_precision, split_micro, throughput)
from sharded_ams import ShardedAMS
from sharded_ams.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model.arch": "llama", "model.n_layer": 2, "model.n_embd": 64, "model.intermediate_size": 128,
         "model.block_size": 32, "data.block_size": 32, "data.max_bytes": 60_000, "optim.backend": "eager",
         "data.eval_iters": 2}


def _config(**overrides):
    return preflight(load_config(None, {**LLAMA, **overrides}, environ={})).config


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("batch, workers, micro, steps", [(16, 2, None, 1), (16, 2, 4, 2), (16, 1, 2, 8),
                                                          (512, 8, 64, 1), (512, 1, 64, 8)])
def test_accumulation_steps(batch, workers, micro, steps):
    assert accumulation_steps(batch, workers, micro) == steps
    assert (micro or batch // workers) * steps * workers == batch


@pytest.mark.parametrize("batch, workers, micro, match", [
    (15, 2, None, r"data\.batch_size \(15\) is the global batch and must be divisible by job\.num_workers \(2\)"),
    (16, 2, 3, r"data\.micro_batch_size \(3\) must divide .* 16 / 2 = 8"),
    (16, 2, 16, r"data\.micro_batch_size \(16\) must divide"),
])
def test_accumulation_steps_errors(batch, workers, micro, match):
    with pytest.raises(ValueError, match=match):
        accumulation_steps(batch, workers, micro)


def _train(cfg, micro: int, steps: int, rank: int = 0, world: int = 1):
    """``steps`` optimizer steps of the config's model on its data; returns (params, first grads)."""
    data = load_training_data(dataclasses.asdict(cfg.data))
    torch.manual_seed(cfg.data.seed)
    model = build_model_for_training(dataclasses.asdict(cfg.model), torch.device("cpu"), "fp32")
    # overlap=False: p.grad after backward is then still the local gradient this test reads
    # (with overlap, buckets are reduced in place during backward)
    opt = ShardedAMS(model, **cfg.optim.optimizer_kwargs(), overlap=False)
    accum = accumulation_steps(cfg.data.batch_size, world, micro)
    grads = None
    for step in range(steps):
        x, y = data.get_batch("train", step, cfg.data.batch_size, cfg.data.block_size, seed=0, rank=rank,
                              world_size=world)
        forward_backward(model, opt, split_micro(x, y, accum))
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, grads


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def test_accumulation_matches_one_big_batch():
    """4 micro-batches of 4 vs 1 of 16 (same global batch): the same gradient up to fp32
    summation order, and trajectories that stay together over 20 steps (AdamW here: its
    update is scale-invariant, so the gradient check is what catches a wrong 1/n)."""
    cfg = _config(**{"data.batch_size": 16, "job.num_workers": 1, "optim.preset": "adamw"})
    p1, g1 = _train(cfg, None, 12)
    p4, g4 = _train(cfg, 4, 12)
    assert _max_rel(g4, g1) < 1e-5
    assert _max_rel(p4, p1) < 1e-3


def _dist_train(micro):
    import torch.distributed as dist

    cfg = _config(**{"data.batch_size": 8, "job.num_workers": 2, "optim.preset": "adamw"})
    return _train(cfg, micro, 6, rank=dist.get_rank(), world=2)


@pytest.mark.slow
def test_accumulation_on_two_workers_matches_one_worker():
    """2 gloo workers x 2 micro-batches of 2 = the 1-worker run on the global batch of 8:
    the loss is the mean over the global batch whatever the split."""
    ref, ref_grads = _train(_config(**{"data.batch_size": 8, "job.num_workers": 1, "optim.preset": "adamw"}),
                            None, 6)
    ranks = run_distributed(_dist_train, 2, 2, timeout=180)
    assert _max_rel(ranks[0][0], ranks[1][0]) == 0  # every rank holds the same gathered params
    # each rank's first local gradient is half the sum: their mean is the global gradient
    mean = {k: (ranks[0][1][k] + ranks[1][1][k]) / 2 for k in ref_grads}
    assert _max_rel(mean, ref_grads) < 1e-5
    assert _max_rel(ranks[0][0], ref) < 1e-4


def test_every_micro_batch_but_the_last_runs_under_no_sync():
    class Spy:
        inside = False

        @contextlib.contextmanager
        def no_sync(self):
            self.inside = True
            yield
            self.inside = False

    spy, seen = Spy(), []
    model = torch.nn.Linear(4, 3)
    model.weight.register_hook(lambda g: seen.append(spy.inside))
    x, y = torch.randn(8, 4), torch.randint(3, (8,))

    def run(mb):
        return forward_backward(lambda a, b: torch.nn.functional.cross_entropy(model(a), b), spy, mb)

    loss = run(split_micro(x, y, 4))
    assert seen == [True, True, True, False] and not spy.inside
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)


def test_loss_of_contract():
    y = torch.zeros(2, 5, dtype=torch.long)
    logits = torch.randn(2, 5, 7)
    scalar = torch.tensor(1.5)
    assert loss_of(scalar, y) is scalar and loss_of((logits, scalar), y) is scalar
    assert loss_of(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits.view(10, 7), y.view(10)).item())
    for bad in (torch.randn(2, 5), "loss", (logits, None)):
        with pytest.raises(ValueError, match=r"model\.factory 'm:f': forward\(x, y\) returned"):
            loss_of(bad, y, "model.factory 'm:f'")


# ----------------------------------------------------------------------------- precision, speed, logs


def test_bf16_params_train_with_fp32_masters():
    cfg = _config()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # bf16 params, fp32 masters
    torch.manual_seed(0)
    model = build_model_for_training(dataclasses.asdict(cfg.model), torch.device("cpu"), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt = ShardedAMS(model, backend="eager", lr=1e-2)
    assert "master" in opt.shards[0].state
    data = load_training_data(dataclasses.asdict(cfg.data))
    losses = []
    for step in range(8):
        x, y = data.get_batch("train", 0, 8, 32, seed=0, rank=0, world_size=1)
        losses.append(forward_backward(model, opt, split_micro(x, y, 2)).item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5  # the same batch: bf16 training still learns it


def test_throughput_and_mfu_numbers():
    t = throughput(tokens=1000, seconds=2.0, flops_per_token=6e6, world_size=2, peak=1e12)
    assert t == {"tokens_per_s": 500.0, "tflops": 6e6 * 500 / 2 / 1e12, "mfu": 6e6 * 500 / 2 / 1e12}
    assert "mfu" not in throughput(1000, 2.0, 6e6, 2, None)
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_mfu_peak_follows_the_device_name():
    """torch.cuda.get_device_name() spellings -> dense bf16 peak: the PCIe and NVL parts are
    not the SXM part; a name merely containing a known one (A10G, GH200 vs H200) is not it."""
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.0,
             "NVIDIA H20": 148.0, "NVIDIA H800 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0,
             "NVIDIA L4": 121.0, "NVIDIA A10": 125.0, "NVIDIA B200": 2250.0,
             "NVIDIA A10G": None, "NVIDIA GeForce RTX 4090": None}
    assert {n: peak_bf16_tflops(n) for n in names} == names


def test_batches_on_cpu_are_used_as_they_are():
    """device_batch pins and copies without blocking on CUDA only (tests/test_gpu.py); on
    the CPU the batch is the loader's own tensors, as before."""
    x = torch.arange(12).view(3, 4)
    y = x + 1
    bx, by = device_batch(x, y, torch.device("cpu"))
    assert bx is x and by is y


def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLog(str(tmp_path), start_step=0)
    tb.log({"step": 10, "loss": 2.5, "val_loss": 2.7, "tokens_per_s": 100.0, "grad_norm": float("nan")}, 10)
    tb.close()
    ev = EventAccumulator(str(tmp_path / "tensorboard"))
    ev.Reload()
    assert set(ev.Tags()["scalars"]) == {"loss/train", "loss/val", "train/tokens_per_s"}
    assert [(s.step, s.value) for s in ev.Scalars("loss/train")] == [(10, 2.5)]


# ----------------------------------------------------------------------------- factories, driver checks

MODEL_FACTORY = '''
import torch
class Bigram(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
    def forward(self, idx, targets=None):
        return self.table(idx)          # logits: the launcher computes the loss
def build(table):
    return Bigram(table["vocab_size"] + table["options"].get("extra", 0))
def wrong(table):
    return 42
'''
DATA_FACTORY = '''
import numpy as np
def build(table):
    rng = np.random.default_rng(table["options"]["seed"])
    return {"train": rng.integers(0, 50, 5000), "val": rng.integers(0, 50, 500), "vocab_size": 50}
def floats(table):
    return {"train": np.zeros(100), "val": np.zeros(100), "vocab_size": 50}
def missing(table):
    return {"train": np.zeros(100, dtype=np.int64)}
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_model.py").write_text(MODEL_FACTORY)
    (tmp_path / "my_data.py").write_text(DATA_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_factories_train_through_the_launchers_pieces(factories):
    cfg = _config(**{"model.factory": "my_model:build", "model.options": {"extra": 2},
                     "data.factory": "my_data:build", "data.options": {"seed": 1}, "data.micro_batch_size": 2,
                     "data.batch_size": 8, "job.num_workers": 1})
    assert cfg.model.vocab_size == 50  # taken from the data factory
    params, _ = _train(cfg, 2, 3)
    assert params["table.weight"].shape == (52, 52)
    model = build_model_for_training(dataclasses.asdict(cfg.model), torch.device("cpu"), "fp32")
    data = load_training_data(dataclasses.asdict(cfg.data))
    val = evaluate(model, data, batch_size=8, micro_batch_size=2, block_size=32, iters=2, seed=0, rank=0,
                   world_size=1, device=torch.device("cpu"))
    assert abs(val - torch.log(torch.tensor(52.0)).item()) < 0.5


@pytest.mark.parametrize("overrides, match", [
    ({"model.factory": "no_such_module:build"}, r"model\.factory = 'no_such_module:build': cannot import module"),
    ({"model.factory": "my_model:nope"}, r"model\.factory = 'my_model:nope': module 'my_model' has no attribute"),
    ({"model.factory": "my_model:wrong"}, r"model\.factory = 'my_model:wrong' returned a int, not a torch\.nn\.Module"),
    ({"data.factory": "my_data:floats"}, r"data\.factory = 'my_data:floats': 'train' must be a 1-D integer"),
    ({"data.factory": "my_data:missing"}, r"data\.factory = 'my_data:missing' must return a dict with keys"),
    ({"data.factory": "my_data:build", "data.options": {"seed": 0}, "model.vocab_size": 40},
     r"model\.vocab_size \(40\) is smaller than the data's vocabulary \(50, data\.factory 'my_data:build'\)"),
    ({"data.block_size": 32, "data.max_bytes": 300}, r"validation split has 30 tokens, fewer than data\.block_size \+ 1"),
    ({"data.path": "/nonexistent/dir"}, r"data\.path '/nonexistent/dir' does not exist"),
])
def test_driver_checks_name_the_key(factories, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**{"data.block_size": 32, **overrides})


def test_cli_refuses_a_bad_factory_before_ray(factories, capsys, monkeypatch):
    monkeypatch.chdir(factories)
    rc = cli_main(["train", str(ROOT / "launcher/configs/llama_tiny.toml"), "--set", "model.factory=my_model:wrong",
                   "--set", "data.path=none", "--dry-run"])
    assert rc == 2
    assert "model.factory = 'my_model:wrong' returned a int" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export


def _checkpoint(tmp_path: Path, cfg, steps: int = 3) -> tuple[Path, torch.nn.Module]:
    """A world-size-1 checkpoint as train_fn writes it (same extra)."""
    data = load_training_data(dataclasses.asdict(cfg.data))
    torch.manual_seed(0)
    table = dataclasses.asdict(cfg.model)
    model = build_model_for_training(table, torch.device("cpu"), "fp32")
    opt = ShardedAMS(model, backend="eager", lr=1e-2)
    for step in range(steps):
        x, y = data.get_batch("train", step, 4, 32, seed=0, rank=0, world_size=1)
        forward_backward(model, opt, [(x, y)])
        opt.step()
        opt.zero_grad()
    path = tmp_path / "run" / f"step-{steps:08d}"
    save_checkpoint(path, opt, model=model, step=steps, extra={"model": table, "data": data.describe})
    return path, model


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    cfg = _config(**{"model.tie_weights": tie})
    ckpt, model = _checkpoint(tmp_path, cfg)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", "hf", log=lambda *_: None)  # a run dir
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # stdlib: no tokenizer
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == tie and hf.dtype == torch.float32
    idx = torch.randint(256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - model.eval()(idx)[0]).abs().max().item()
    assert diff < 1e-5, diff
    export_checkpoint(ckpt, tmp_path / "hf", "hf", dtype="bfloat16", force=True, log=lambda *_: None)  # replaces its own
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def test_export_safetensors_is_the_plain_state_dict(tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(None, {"job.num_workers": 1, "data.max_bytes": 60_000, "data.block_size": 32}, environ={})
    ckpt, model = _checkpoint(tmp_path, cfg)  # the GPT, tied
    export_checkpoint(ckpt, tmp_path / "st", "safetensors", log=lambda *_: None)
    sd = load_file(tmp_path / "st" / "model.safetensors")
    fresh = build_model_for_training(dataclasses.asdict(cfg.model), torch.device("cpu"), "fp32")
    fresh.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(ExportError, match=r"--format hf needs a built-in Llama .* model\.arch 'gpt'"):
        export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda *_: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not an earlier export; refusing"):
        export_checkpoint(ckpt, tmp_path / "mine", "safetensors", log=lambda *_: None)
    assert cli_main(["ckpt", "export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2  # refused (exit status convention: launcher/commands/outputs.py)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the worker's build


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_worker_waits_for_param_gathers_once_per_block(monkeypatch, tmp_path, arch):
    """The worker's optimizer waits for the param gather once per transformer block (one
    graph break per block under torch.compile): every block is a sync module, and no module
    inside a block keeps a hook of its own."""
    import launcher.train.loop as loop

    monkeypatch.setattr(loop.ray.train.torch, "get_device", lambda: torch.device("cpu"))
    over = {} if arch == "llama" else {"model.arch": "gpt", "model.intermediate_size": None}
    cfg = preflight(load_config(None, {k: v for k, v in {**LLAMA, **over}.items() if v is not None},
                                environ={})).config
    w = loop._build({**cfg.to_dict(), "run_dir": str(tmp_path)})
    blocks = list(w.model.transformer_blocks())
    assert len(blocks) == 2
    assert [id(m) for m in w.optimizer._sync_modules] == [id(b) for b in blocks]
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    assert not any(id(m) in inside and m._forward_pre_hooks for m in w.model.modules())
