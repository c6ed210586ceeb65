"""Model: layer specs and the layer-type registry, attention (full and sliding-window), linear
attention (GLA, DeltaNet, Gated DeltaNet), SwiGLU, mixture of experts, norms, the Transformer,
greedy generation, named flavors and the per-layer counts (parameters, FLOPs, activation memory)."""

# Importing the layer-type modules registers them in MIXERS / FFNS.
from stratagem.model import attention, linear_attention, mlp, moe  # noqa: F401
from stratagem.model.config import ModelConfig
from stratagem.model.counts import count_model
from stratagem.model.flavors import FLAVORS, get_flavor
from stratagem.model.generate import generate
from stratagem.model.layers import LayerSpec
from stratagem.model.transformer import Transformer

__all__ = ["FLAVORS", "LayerSpec", "ModelConfig", "Transformer", "count_model", "generate", "get_flavor"]
