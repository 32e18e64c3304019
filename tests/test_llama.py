"""The built-in Llama against Hugging Face's ``LlamaForCausalLM`` (the oracle: no shared
code), its named sizes against GaLore's configs, and the model options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers  # in the test extra: an import error must fail, not skip

from launcher.config import ModelConfig
from launcher.train.models import build_model
from launcher.train.models.gpt import GPT, GPTConfig
from launcher.train.models.llama import Llama, LlamaConfig


def _hf_twin(model: Llama, attn: str = "sdpa") -> transformers.LlamaForCausalLM:
    """Hugging Face's model built from our ``hf_config()`` (the exported config.json)."""
    cfg = {k: v for k, v in model.hf_config().items() if k not in ("architectures", "model_type")}
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**cfg),
                                                     attn_implementation=attn).eval()


def _small(**kw) -> Llama:
    torch.manual_seed(0)
    shape = dict(vocab_size=300, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                 intermediate_size=160, tie_weights=False)
    return Llama(LlamaConfig(**{**shape, **kw}))


@pytest.mark.parametrize("tie, n_kv_head", [(False, 2), (True, 2), (False, 4), (True, 1)])
def test_logits_match_transformers_float64(tie, n_kv_head):
    """Our weights in HF's model (strict load) give the same logits, exactly in float64:
    names, shapes, rotary layout, GQA head grouping, norm placement, tying all agree.
    (HF's SDPA attention: its "eager" one takes the softmax in fp32 even for float64.)"""
    ours = _small(tie_weights=tie, n_kv_head=n_kv_head).double().eval()
    hf = _hf_twin(ours).double()
    assert hf.load_state_dict(ours.state_dict(), strict=True)
    idx = torch.randint(300, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-12, diff
    assert hf.config.tie_word_embeddings == tie
    # and back: HF's own (differently initialised) weights in ours
    torch.manual_seed(5)
    hf2 = _hf_twin(ours).double()
    ours.load_state_dict(hf2.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours(idx)[0] - hf2(idx).logits).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype, attn, tol", [(torch.float32, "sdpa", 1e-5), (torch.float32, "eager", 1e-5),
                                              (torch.bfloat16, "sdpa", 2e-2)])
def test_logits_match_transformers_low_precision(dtype, attn, tol):
    """fp32 (HF's SDPA and eager attention) and bf16: equal to rounding, relative to the
    largest logit (bf16: ~1 ulp)."""
    ours = _small().eval()
    hf = _hf_twin(ours, attn)
    hf.load_state_dict(ours.state_dict(), strict=True)
    ours, hf = ours.to(dtype), hf.to(dtype)
    idx = torch.randint(300, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(idx)[0].float(), hf(idx).logits.float()
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# GaLore's public configs (github.com/jiaweizzhao/GaLore configs/llama_*.json): hidden,
# intermediate, heads, layers; 1024 positions, vocab 32000, untied.
GALORE = {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12), "350m": (1024, 2736, 16, 24),
          "1b": (2048, 5461, 32, 24)}


@pytest.mark.parametrize("size", list(GALORE))
def test_named_sizes_are_galores_configs(size):
    """Each named size is GaLore's config, and Hugging Face builds the same tensors from our
    exported config (on the meta device: no memory)."""
    hidden, inter, heads, layers = GALORE[size]
    table = dataclasses.asdict(ModelConfig(arch="llama", size=size, vocab_size=32000))
    with torch.device("meta"):
        ours = build_model(table)
        hf = _hf_twin(ours)
    c = hf.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == GALORE[size]
    assert (c.num_key_value_heads, c.max_position_embeddings, c.rms_norm_eps, c.tie_word_embeddings) == \
        (heads, 1024, 1e-6, False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert (hidden, inter, layers) == (ours.cfg.n_embd, ours.cfg.intermediate_size, ours.cfg.n_layer)


def test_flops_per_token_hand_count():
    """6 x (matmul weights) + 12 L d T, the weights counted here from the shapes by hand."""
    L, d, h, kv, ff, V, T = 3, 64, 4, 2, 160, 300, 50
    hd = d // h
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff  # q, o; k, v; gate, up, down
    for tie in (False, True):
        model = _small(tie_weights=tie)
        assert model.flops_per_token(T) == 6 * (L * per_layer + V * d) + 12 * L * d * T
    gpt = GPT(GPTConfig(vocab_size=256, n_layer=2, n_embd=64, block_size=32))
    assert gpt.flops_per_token(32) == 6 * (2 * (3 * 64 * 64 + 64 * 64 + 8 * 64 * 64) + 256 * 64) + 12 * 2 * 64 * 32


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2))


@pytest.mark.parametrize("make", [_small, _gpt])
def test_activation_checkpointing_gives_the_same_gradients(make):
    """Same gradients, bitwise; and each block's forward really runs twice (recomputed)."""
    grads = []
    for ckpt in (False, True):
        model = make().train()
        model.activation_checkpointing = ckpt
        blocks = model.model.layers if isinstance(model, Llama) else model.blocks
        calls = []
        for b in blocks:  # count forward() itself: a recomputation skips module hooks
            b.forward = (lambda f: lambda *a: calls.append(1) or f(*a))(b.forward)
        idx = torch.randint(256, (2, 32), generator=torch.Generator().manual_seed(3))
        model(idx, idx.roll(-1, 1))[1].backward()
        assert len(calls) == len(blocks) * (2 if ckpt else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_forward_contract_and_errors():
    model = _small()
    logits, loss = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 300) and loss.ndim == 0
    assert model(torch.zeros(1, 8, dtype=torch.long))[1] is None
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="n_head .4. must be divisible by n_kv_head .3."):
        LlamaConfig(n_head=4, n_kv_head=3, n_embd=64)
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(n_head=4, n_embd=12)
    assert LlamaConfig(n_embd=512, n_head=8).intermediate_size == 1376  # 8/3 d rounded up to 32
