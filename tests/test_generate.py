"""Token-by-token generation: `forward_step` reproduces the full forward, greedy `generate`
continues with the full forward's argmax."""

from __future__ import annotations

import pytest
import torch

from stratagem.model import ModelConfig, Transformer, generate
from stratagem.model.generate import prefill

# Weights larger than the default init so every mixer moves the logits well above the
# tolerances; chunks of 8 and a window of 6 so 21 positions span several of each (padded).
SHAPE = dict(dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=40, chunk_size=8, swa_window=6,
             init_std=0.2)
PATTERNS = {
    "attention": ["attention"],
    "swa": ["swa"],
    "gla": ["gla"],
    "deltanet": ["deltanet"],
    "gated_deltanet": ["gated_deltanet"],
    "hybrid": ["gated_deltanet", "gla", "swa", "attention"],
    "no-conv-peri": ["gla", "deltanet"],
    "moe-hybrid": ["gated_deltanet+moe", "attention+moe"],
}


def build(name: str, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    extra = dict(conv_size=0, norm="peri") if name == "no-conv-peri" else {}
    pattern = PATTERNS[name]
    cfg = ModelConfig(**SHAPE, **extra, pattern=pattern, n_layers=max(2, len(pattern)))
    return Transformer(cfg).to(dtype)


def stepped_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    caches = model.init_caches(tokens.shape[0])
    logits = []
    for t in range(tokens.shape[1]):
        step, caches = model.forward_step(tokens[:, t], caches)
        logits.append(step)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", PATTERNS)
def test_forward_step_reproduces_the_full_forward(name, dtype, tolerance):
    model = build(name, dtype)
    tokens = torch.randint(0, 40, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        stepped = stepped_logits(model, tokens)
    assert full.std() > 0.5  # the layers matter at this scale
    torch.testing.assert_close(stepped, full, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", ["gated_deltanet", "swa", "hybrid"])
def test_generate_continues_with_the_full_forward_argmax(name):
    model = build(name, torch.float64)
    prompt = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (3, 17) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        predicted = model(out[:, :-1]).argmax(dim=-1)
    assert torch.equal(out[:, 5:], predicted[:, 4:])


def test_prefill_returns_the_logits_after_the_prompt():
    model = build("hybrid", torch.float64)
    prompt = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    logits, caches = prefill(model, prompt)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(prompt)[:, -1], rtol=0, atol=1e-10)
    assert len(caches) == len(model.layers)
    attention, swa = caches[3], caches[2]
    assert attention.k.shape[2] == 9 and attention.pos == 9
    assert swa.k.shape[2] == 6  # swa keeps only its window
    assert tuple(caches[0].state.shape) == (2, 2, 16, 16)  # [B, H, d_k, d_v], whatever the length


def test_generate_zero_new_tokens_returns_the_prompt():
    model = build("gla", torch.float32)
    prompt = torch.randint(0, 40, (1, 4))
    assert torch.equal(generate(model, prompt, 0), prompt)
