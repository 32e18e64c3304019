"""Fast tests for the launcher's built-in task: the GPT model and the byte-level corpus."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from launcher.data.corpus import estimate_loss, get_batch, load_corpus, split
from launcher.train.models.gpt import GPT, GPTConfig

SMALL_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return load_corpus(SMALL_BYTES)


# ---------------------------------------------------------------- model


def test_forward_shapes_and_initial_loss() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    idx = torch.randint(cfg.vocab_size, (4, cfg.block_size))
    targets = torch.randint(cfg.vocab_size, (4, cfg.block_size))
    # Independent targets: with tied weights the init slightly favours repeating the input
    # token, so targets=idx would not give ~ln(V).
    logits, loss = model(idx, targets)
    assert logits.shape == (4, cfg.block_size, cfg.vocab_size)
    assert loss is not None and loss.ndim == 0
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.2  # near-uniform predictions at init
    logits2, loss2 = model(idx[:, :10])
    assert logits2.shape == (4, 10, cfg.vocab_size) and loss2 is None


def test_too_long_sequence_raises() -> None:
    model = GPT(GPTConfig(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_head_count_raises() -> None:
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=64, n_head=3)


def test_tied_weights_share_storage() -> None:
    model = GPT(GPTConfig(tie_weights=True))
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = GPT(GPTConfig(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    # The tied matrix is counted once.
    assert untied.num_params() - model.num_params() == model.wte.weight.numel()
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_deterministic_init_and_zero_biases() -> None:
    torch.manual_seed(123)
    a = GPT(GPTConfig())
    torch.manual_seed(123)
    b = GPT(GPTConfig())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    torch.manual_seed(124)
    c = GPT(GPTConfig())
    assert not torch.equal(a.wte.weight, c.wte.weight)
    for name, mod in a.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            assert torch.count_nonzero(mod.bias) == 0, name
    assert abs(a.wte.weight.std().item() - 0.02) < 0.002


def test_forward_does_not_touch_global_rng_when_dropout_zero() -> None:
    model = GPT(GPTConfig()).train()
    idx = torch.zeros(2, 16, dtype=torch.long)
    state = torch.get_rng_state()
    out1, _ = model(idx)
    assert torch.equal(torch.get_rng_state(), state)
    out2, _ = model(idx)
    assert torch.equal(out1, out2)


# ---------------------------------------------------------------- data


def test_corpus_basic_properties(corpus: torch.Tensor) -> None:
    assert corpus.dtype == torch.uint8 and corpus.dim() == 1
    assert len(corpus) == SMALL_BYTES
    assert load_corpus(SMALL_BYTES) is corpus  # lru_cache
    tiny = load_corpus(1000)
    assert len(tiny) == 1000
    assert torch.equal(tiny, corpus[:1000])  # a smaller cap is a prefix of a larger one
    assert bytes(corpus[:7].tolist()) == b"# ---- "
    with pytest.raises(ValueError):
        load_corpus(0)


def test_corpus_deterministic_across_processes(corpus: torch.Tensor) -> None:
    code = (
        "import hashlib; from launcher.data.corpus import load_corpus; "
        f"print(hashlib.sha256(load_corpus({SMALL_BYTES}).numpy().tobytes()).hexdigest())"
    )
    # A fresh interpreter: no shared lru_cache, a different os.walk history.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=repo
    )
    assert out.stdout.strip() == hashlib.sha256(corpus.numpy().tobytes()).hexdigest()


def test_split(corpus: torch.Tensor) -> None:
    train, val = split(corpus, 0.1)
    assert len(val) == int(len(corpus) * 0.1)
    assert len(train) + len(val) == len(corpus)
    assert torch.equal(torch.cat([train, val]), corpus)
    with pytest.raises(ValueError):
        split(corpus, 0.0)


def test_get_batch_shapes_and_shift(corpus: torch.Tensor) -> None:
    x, y = get_batch(corpus, step=3, batch_size=8, block_size=32)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every row is a real window of the corpus, y being the next bytes.
    c = corpus.long()
    for row_x, row_y in zip(x, y):
        starts = (c[: len(c) - 32] == row_x[0]).nonzero().flatten()
        assert any(
            torch.equal(c[s : s + 32], row_x) and torch.equal(c[s + 1 : s + 33], row_y) for s in starts
        )


def test_get_batch_deterministic_and_rng_free(corpus: torch.Tensor) -> None:
    state = torch.get_rng_state()
    x1, y1 = get_batch(corpus, step=5, batch_size=8, block_size=16, seed=7)
    torch.manual_seed(999)  # the global RNG must not matter
    x2, y2 = get_batch(corpus, step=5, batch_size=8, block_size=16, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = get_batch(corpus, step=6, batch_size=8, block_size=16, seed=7)
    x4, _ = get_batch(corpus, step=5, batch_size=8, block_size=16, seed=8)
    assert not torch.equal(x1, x3)
    assert not torch.equal(x1, x4)
    torch.set_rng_state(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_union_of_rank_batches_equals_global_batch(corpus: torch.Tensor, world_size: int) -> None:
    for step in (0, 1, 17):
        gx, gy = get_batch(corpus, step, batch_size=8, block_size=16, seed=3)
        parts = [
            get_batch(corpus, step, 8, 16, seed=3, rank=r, world_size=world_size) for r in range(world_size)
        ]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), gx)
        assert torch.equal(torch.cat([p[1] for p in parts]), gy)


def test_get_batch_validation(corpus: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="divisible by world_size"):
        get_batch(corpus, 0, batch_size=6, block_size=8, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        get_batch(corpus, 0, batch_size=8, block_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(corpus[:8], 0, batch_size=2, block_size=8)


# ---------------------------------------------------------------- training


def test_short_training_lowers_loss(corpus: torch.Tensor) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32)
    model = GPT(cfg)
    train, val = split(corpus)
    before = estimate_loss(model, val, batch_size=16, block_size=32, iters=2, seed=1)
    assert model.training  # estimate_loss restores train mode
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        x, y = get_batch(train, step, batch_size=16, block_size=32)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = estimate_loss(model, val, batch_size=16, block_size=32, iters=2, seed=1)
    assert after < before - 1.0, (before, after)
    model.eval()
    estimate_loss(model, val, batch_size=4, block_size=32, iters=1, seed=1)
    assert not model.training  # eval mode is restored too
