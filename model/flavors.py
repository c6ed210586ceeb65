"""Named model shapes: `FLAVORS[name]` is a `ModelConfig`; `get_flavor` hands out a copy."""

from __future__ import annotations

import copy

from stratagem.errors import ConfigError
from stratagem.model.config import ModelConfig

FLAVORS: dict[str, ModelConfig] = {
    # The demo and test model.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256),
    "tiny-peri": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256,
                             norm="peri"),
    "small": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=768, vocab_size=256),
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
