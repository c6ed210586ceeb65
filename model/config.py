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
    # Layer types tiled over n_layers; each entry is "mixer" (feed-forward `ffn`) or "mixer+ffn",
    # optionally repeated as "N*entry": ["3*gated_deltanet", "attention"] is a 3:1 hybrid.
    pattern: list[str] = field(default_factory=lambda: ["attention"])
    ffn: str = "mlp"
    norm: str = "pre"  # "pre": normalise sublayer inputs; "peri": inputs and outputs (Peri-LN)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Linear-attention mixers (gla, deltanet, gated_deltanet) use n_heads heads of head_dim for
    # queries, keys and values alike (n_kv_heads applies to attention and swa only).
    chunk_size: int = 64  # tokens per chunk of the chunked kernels (a power of two)
    conv_size: int = 4  # short causal depthwise conv on q, k, v of linear mixers; 0 disables it
    swa_window: int = 256  # tokens a "swa" layer attends to, its own included

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def layer_specs(self) -> list[LayerSpec]:
        """One `LayerSpec` per layer: the expanded `pattern` repeated until it covers `n_layers`."""
        specs = self._period()
        return [specs[i % len(specs)] for i in range(self.n_layers)]

    def _period(self) -> list[LayerSpec]:
        """The pattern with every "N*entry" expanded: one spec per layer of one period."""
        return [spec for entry in self.pattern for spec in [self._parse(entry)] * self._repeats(entry)]

    @staticmethod
    def _repeats(entry: str) -> int:
        count, star, _ = entry.rpartition("*")
        return int(count) if star else 1

    def _parse(self, entry: str) -> LayerSpec:
        mixer, _, ffn = entry.rpartition("*")[2].partition("+")
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
        if self.ffn not in FFNS:
            raise ConfigValueError("ffn", self.ffn, f"unknown ffn; known: {', '.join(sorted(FFNS))}")
        for entry in self.pattern:
            self._validate_entry(entry)
        period = len(self._period())
        if self.n_layers % period:
            raise ConfigValueError("n_layers", self.n_layers,
                                   f"is not a multiple of the pattern's {period} layers")
        if self.norm not in NORMS:
            raise ConfigValueError("norm", self.norm, f"must be one of {', '.join(NORMS)}")
        for key in ("norm_eps", "init_std", "rope_theta", "swa_window"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(key, getattr(self, key), "must be positive")
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigValueError("chunk_size", self.chunk_size, "must be a power of two")
        if self.conv_size < 0:
            raise ConfigValueError("conv_size", self.conv_size, "must not be negative (0 disables the conv)")

    def _validate_entry(self, entry: str) -> None:
        if not isinstance(entry, str) or entry.count("+") > 1 or entry.count("*") > 1:
            raise ConfigValueError("pattern", entry, "each entry must be 'mixer', 'mixer+ffn' or 'N*' before either")
        count, star, _ = entry.partition("*")
        if star and not (count.isdigit() and int(count) > 0):
            raise ConfigValueError("pattern", entry, f"repeat count {count!r} must be a positive integer")
        spec = self._parse(entry)
        if spec.mixer not in MIXERS:
            raise ConfigValueError("pattern", entry, f"unknown mixer {spec.mixer!r}; "
                                   f"known: {', '.join(sorted(MIXERS))}")
        if spec.ffn not in FFNS:
            raise ConfigValueError("pattern", entry, f"unknown ffn {spec.ffn!r}; "
                                   f"known: {', '.join(sorted(FFNS))}")
