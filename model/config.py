"""`ModelConfig`: the shape of a model, from which the layers, counts and flavors are built."""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.errors import ConfigValueError
from stratagem.model.layers import FFNS, MIXERS, LayerSpec

NORMS = ("pre", "peri")


@dataclass
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_hidden: int = 192  # SwiGLU hidden width
    vocab_size: int = 256
    # Layer types tiled over n_layers; each entry is "mixer" (feed-forward `ffn`) or "mixer+ffn".
    pattern: list[str] = field(default_factory=lambda: ["attention"])
    ffn: str = "mlp"
    norm: str = "pre"  # "pre": normalise sublayer inputs; "peri": inputs and outputs (Peri-LN)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def layer_specs(self) -> list[LayerSpec]:
        """One `LayerSpec` per layer: `pattern` repeated until it covers `n_layers`."""
        specs = [self._parse(entry) for entry in self.pattern]
        return [specs[i % len(specs)] for i in range(self.n_layers)]

    def _parse(self, entry: str) -> LayerSpec:
        mixer, _, ffn = entry.partition("+")
        return LayerSpec(mixer=mixer, ffn=ffn or self.ffn)

    def validate(self) -> None:
        """Raise `ConfigValueError` (key relative to the model section) for an impossible shape."""
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(key, getattr(self, key), "must be positive")
        if self.dim % self.n_heads:
            raise ConfigValueError("n_heads", self.n_heads, f"does not divide dim = {self.dim}")
        if self.head_dim % 2:
            raise ConfigValueError("n_heads", self.n_heads,
                                   f"gives an odd head_dim = {self.head_dim}; RoPE needs it even")
        if self.n_heads % self.n_kv_heads:
            raise ConfigValueError("n_kv_heads", self.n_kv_heads,
                                   f"does not divide n_heads = {self.n_heads}")
        if not self.pattern:
            raise ConfigValueError("pattern", self.pattern, "must list at least one layer type")
        if self.n_layers % len(self.pattern):
            raise ConfigValueError("n_layers", self.n_layers,
                                   f"is not a multiple of len(pattern) = {len(self.pattern)}")
        if self.ffn not in FFNS:
            raise ConfigValueError("ffn", self.ffn, f"unknown ffn; known: {', '.join(sorted(FFNS))}")
        for entry in self.pattern:
            self._validate_entry(entry)
        if self.norm not in NORMS:
            raise ConfigValueError("norm", self.norm, f"must be one of {', '.join(NORMS)}")
        for key in ("norm_eps", "init_std", "rope_theta"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(key, getattr(self, key), "must be positive")

    def _validate_entry(self, entry: str) -> None:
        if not isinstance(entry, str) or entry.count("+") > 1:
            raise ConfigValueError("pattern", entry, "each entry must be 'mixer' or 'mixer+ffn'")
        spec = self._parse(entry)
        if spec.mixer not in MIXERS:
            raise ConfigValueError("pattern", entry, f"unknown mixer {spec.mixer!r}; "
                                   f"known: {', '.join(sorted(MIXERS))}")
        if spec.ffn not in FFNS:
            raise ConfigValueError("pattern", entry, f"unknown ffn {spec.ffn!r}; "
                                   f"known: {', '.join(sorted(FFNS))}")
