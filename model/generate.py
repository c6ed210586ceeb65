"""Greedy generation with per-layer caches: KV caches for attention layers, the recurrent state
(and short-conv inputs) for linear ones, so each new token costs one `Transformer.forward_step`.
"""

from __future__ import annotations

import torch

from stratagem.model.transformer import Transformer


@torch.no_grad()
def prefill(model: Transformer, prompt: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Run ``prompt [B, T0]`` (T0 >= 1) through the caches; return the logits after its last token
    ``[B, vocab_size]`` and the caches.

    Token by token, so every mixer only needs its step: simple and exact, but sequential. A chunked
    prefill (the sequence kernels with the cache as initial state) is the fast form.
    """
    caches = model.init_caches(prompt.shape[0])
    for t in range(prompt.shape[1]):
        logits, caches = model.forward_step(prompt[:, t], caches)
    return logits, caches


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation: ``prompt [B, T0]`` -> ``[B, T0 + max_new_tokens]`` (prompt included).

    Each new token is the argmax of the logits after the previous one.
    """
    logits, caches = prefill(model, prompt)
    tokens = [prompt]
    for i in range(max_new_tokens):
        next_token = logits.argmax(dim=-1)
        tokens.append(next_token[:, None])
        if i + 1 < max_new_tokens:
            logits, caches = model.forward_step(next_token, caches)
    return torch.cat(tokens, dim=1)
