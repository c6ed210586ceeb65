"""Named model shapes: `FLAVORS[name]` is a `ModelConfig`; `get_flavor` hands out a copy."""

from __future__ import annotations

import copy

from stratagem.errors import ConfigError
from stratagem.model.config import ModelConfig, MoEConfig

FLAVORS: dict[str, ModelConfig] = {
    # The demo and test model.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256),
    "tiny-peri": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                             norm="peri"),
    "small": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=768, vocab_size=256),
    # Linear-attention and hybrid test models, the "tiny" shape with other mixers.
    "tiny-gla": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                            pattern=["gla"]),
    "tiny-deltanet": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                                 pattern=["deltanet"]),
    "tiny-gated-deltanet": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192,
                                       vocab_size=256, pattern=["gated_deltanet"]),
    "tiny-hybrid": ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                               pattern=["3*gated_deltanet", "attention"]),
    "tiny-swa-hybrid": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                                   pattern=["gated_deltanet", "swa"], swa_window=16),
    # Mixture-of-experts test models: the "tiny" shape with 8 experts of half its ffn width (96),
    # top-2, so that a token's expert compute equals tiny's dense feed-forward.
    "tiny-moe": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                            ffn="moe", moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=96)),
    "tiny-hybrid-moe": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                                   pattern=["gated_deltanet+moe", "attention+moe"],
                                   moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=96)),
    # A small model of Mixtral-8x7B's proportions (Jiang et al. 2024; JetMoE-8B routes its
    # feed-forward the same way): every layer's SwiGLU replaced by 8 experts of which a softmax
    # router picks 2 (weights renormalised over the two), experts 3.5 x dim wide (14336 / 4096),
    # 4:1 grouped-query attention, rope_theta 1e6, Llama-2's 32000-token vocabulary, untied head;
    # scaled to dim 512 and 8 layers: ~214M parameters, ~82M active per token.
    "moe-small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1792, vocab_size=32000,
                             rope_theta=1e6, ffn="moe", moe=MoEConfig(num_experts=8, top_k=2)),
    # The two scales of the published linear-attention and hybrid studies trained with
    # flash-linear-attention (GLA, DeltaNet, Gated DeltaNet and the hybrid analyses that mix
    # them with attention): "340M" (dim 1024) and "1.3B" (dim 2048), 24 layers, Llama-2's
    # 32000-token vocabulary, tied embeddings, SwiGLU at ~8/3 dim; here 3 gated_deltanet :
    # 1 attention with head_dim 128. The linear layers' output gate makes them ~360M and ~1.38B.
    "hybrid-340m": ModelConfig(dim=1024, n_layers=24, n_heads=8, n_kv_heads=8, ffn_hidden=2816, vocab_size=32000,
                               tie_embeddings=True, pattern=["3*gated_deltanet", "attention"]),
    "hybrid-1.3b": ModelConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=5632,
                               vocab_size=32000, tie_embeddings=True,
                               pattern=["3*gated_deltanet", "attention"]),
    # Llama-3.2-1B's shape.
    "llama-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                            vocab_size=128256, tie_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B's shape.
    "llama-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
                            vocab_size=32000),
}


def get_flavor(name: str) -> ModelConfig:
    """A fresh copy of the named flavor, safe to modify."""
    if name not in FLAVORS:
        raise ConfigError(f"unknown model flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
    return copy.deepcopy(FLAVORS[name])
