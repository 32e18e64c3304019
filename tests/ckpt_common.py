"""Shared pieces of the checkpoint tests (``test_checkpoint*.py``): a tiny GPT, training
keyed by step, checkpoint helpers and the state comparisons used as oracles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data.corpus import get_batch, load_corpus
from launcher.train.models.gpt import GPT, GPTConfig
from sharded_ams import ShardedAMS
from sharded_ams import checkpoint as C
from sharded_ams.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)
BATCH = 12  # global batch; divisible by every world size 1..4
CORPUS_BYTES = 200_000
GRAMS = dict(preset="grams", lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
# lam=1 (Adam dynamics, smooth in the gradient) with beta3 > 0 (so exp_avg_s is stored too)
ADAM_S = dict(lr=1e-2, beta3=0.9, lam=1.0, weight_decay=0.1)
# lam=0.5: the per-tensor step scale (a count all-reduced across ranks), bf16 masters
AMS_HALF = dict(lr=1e-2, beta3=0.9, lam=0.5, weight_decay=0.1)


# ----------------------------------------------------------------------------- helpers
def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG, **cfg})).to(dtype)


def grouped(model: torch.nn.Module, wd: float = 0.1) -> list[dict]:
    """Two named param groups (decay for matrices, none for vectors), as trainers do."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dec = [(n, p) for n, p in named if p.dim() >= 2]
    nod = [(n, p) for n, p in named if p.dim() < 2]
    return [{"params": [p for _, p in dec], "param_names": [n for n, _ in dec], "weight_decay": wd},
            {"params": [p for _, p in nod], "param_names": [n for n, _ in nod],
             "weight_decay": 0.0}]


def train(model, opt, steps, *, rank: int = 0, world: int = 1, sched=None,
          replicated: bool = False, hook=None) -> list[float]:
    """Steps keyed by step number: the data of step s is the same whatever ran before.
    ``replicated``: every rank uses the whole (world-size-1) batch."""
    data = load_corpus(CORPUS_BYTES)
    losses = []
    for s in steps:
        r, w = (0, 1) if replicated else (rank, world)
        x, y = get_batch(data, s, BATCH, CFG["block_size"], rank=r, world_size=w)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if hook is not None:
            hook(model)
        losses.append(loss.item())
    if hasattr(opt, "finish_param_sync"):  # callers read the params next (overlap: gathers run)
        opt.finish_param_sync()
    return losses


def seed_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def draw_rngs() -> tuple:
    return (torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist())


def named_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_state(cons: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {state key: flat fp32 tensor}} from consolidate(), masters included."""
    out = {}
    for i, name in enumerate(cons["param_names"]):
        st = cons["optimizer"]["state"][i]
        d = {k: v.reshape(-1) for k, v in st.items() if k != "step"}
        d.setdefault("master", cons["model"][name].float().reshape(-1))
        out[name] = d
    return out


def assert_loaded_equals(model, opt, cons: dict) -> None:
    """Exact: this rank's pieces of every state equal the consolidated checkpoint, and the
    model params equal the fp32 masters (cast to the param dtype)."""
    full = full_state(cons)
    sd = opt.state_dict()
    assert sorted(sd["state_keys"]) == sorted(next(iter(full.values())))
    for pc in sd["pieces"]:
        sl = slice(pc["offset"], pc["offset"] + pc["length"])
        for k in sd["state_keys"]:
            assert torch.equal(pc[k], full[pc["name"]][k][sl]), (pc["name"], k)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), full[n]["master"].view(p.shape).to(p.dtype)), n


def manifest_json(path) -> dict:
    return json.loads((Path(path) / C.MANIFEST_NAME).read_text())


def file_digests(path) -> dict[str, tuple[int, str]]:
    return {n: (f["size"], f["sha256"]) for n, f in manifest_json(path)["files"].items()}


def rewrite_manifest(path: Path, files_from: tuple = (), **fields) -> dict:
    """Edit a manifest by hand: set top-level ``fields`` and re-record the size and
    sha256 of the files in ``files_from`` (as an attacker or a hand edit would)."""
    man = manifest_json(path)
    man.update(fields)
    for name in files_from:
        man["files"][name].update(size=(path / name).stat().st_size, sha256=sha256_of(path / name))
    (path / C.MANIFEST_NAME).write_text(json.dumps(man))
    return man


def edit_shard(ckpt: Path, name: str, edit) -> None:
    """Change what a shard file holds (``edit(obj)`` in place) and record its new size and
    sha256 in the manifest, as a careful forger would."""
    obj = torch.load(ckpt / name, weights_only=True)
    edit(obj)
    torch.save(obj, ckpt / name)
    rewrite_manifest(ckpt, files_from=(name,))


def short_first_piece(obj: dict) -> None:
    """A shard edit: the first piece's exp_avg loses its last element."""
    pc = obj["optimizer"]["pieces"][0]
    pc["exp_avg"] = pc["exp_avg"][:-1]


def sha256_of(fpath: Path) -> str:
    return hashlib.sha256(Path(fpath).read_bytes()).hexdigest()


def flip_bit(fpath: Path, offset_from_end: int = 100) -> None:
    data = bytearray(fpath.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    fpath.write_bytes(bytes(data))


class RichModel:
    """A bf16 GPT with a buffer that changes every step and a frozen param: state that
    only ``model-extra.pt`` holds. lm_head.weight is tied to wte.weight."""

    @staticmethod
    def build(seed: int, dtype=torch.bfloat16, hp=AMS_HALF):
        model = make_model(seed, dtype)
        model.register_buffer("counter", torch.full((3,), float(seed)))
        model.wpe.weight.requires_grad_(False)
        opt = ShardedAMS(model, backend="eager", **hp)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        return model, opt, sched

    @staticmethod
    def bump(model) -> None:
        model.counter += 1


def make_checkpoint(path: Path, hp=GRAMS, steps: int = 2, **model_kw) -> tuple:
    model = make_model(0, **model_kw)
    opt = ShardedAMS(model, backend="eager", **hp)
    train(model, opt, range(steps))
    save_checkpoint(path, opt, model=model, step=steps, extra={"tokens": steps * BATCH})
    return model, opt


def checkpoint_fixtures():
    """``base_ckpt`` (a module's committed checkpoint of 2 Grams steps, read-only) and
    ``ckpt_copy`` (a fresh copy of it per test, to damage): ``base_ckpt, ckpt_copy =
    checkpoint_fixtures()`` at a test module's top level."""

    @pytest.fixture(scope="module")
    def base_ckpt(tmp_path_factory) -> Path:
        path = tmp_path_factory.mktemp("base") / "step-00000002"
        make_checkpoint(path)
        return path

    @pytest.fixture
    def ckpt_copy(base_ckpt, tmp_path) -> Path:
        dst = tmp_path / base_ckpt.name
        shutil.copytree(base_ckpt, dst)
        return dst

    return base_ckpt, ckpt_copy


def fresh(hp=GRAMS, **model_kw):
    model = make_model(3, **model_kw)
    return model, ShardedAMS(model, backend="eager", **hp)


def expect_error(path, kind: str, *needles: str, model_kw=None, hp=GRAMS) -> CheckpointError:
    model, opt = fresh(hp, **(model_kw or {}))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, opt, model=model)
    err = ei.value
    assert isinstance(err, RuntimeError) and err.kind == kind, (err.kind, str(err))
    for s in needles:
        assert s in str(err), (s, str(err))
    return err



class Hung(BaseException):
    """Raised by ``deadline``; not an OSError (as TimeoutError is) nor an Exception, so
    that no ``except`` in the code under test can swallow it."""


@contextlib.contextmanager
def deadline(seconds: int, what: str = "call"):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``: a
    guard against a blocking open of a FIFO, not a timing assertion. The signal is sent to
    this thread (``pthread_kill``): a process-wide alarm may be delivered to one of
    torch's worker threads and leave a blocked ``open`` in this one uninterrupted."""
    def boom(*_):
        raise Hung(f"{what} still running after {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, boom)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.get_ident(), signal.SIGALRM))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGALRM, old)


OLD, NEW = "step-00000001", "step-00000002"
SHARD = "shard-rank00000-of-00001.pt"


def make_run_ckpts(root: Path) -> Path:
    """A run dir with two committed checkpoints of one run (steps 1 and 2)."""
    model = make_model(0)
    opt = ShardedAMS(model, backend="eager", **GRAMS)
    for s in (1, 2):
        train(model, opt, range(s - 1, s))
        save_checkpoint(root / C.step_dir_name(s), opt, model=model, step=s)
    return root
