"""`ModelConfig`: the shape of a model, from which the layers, counts and flavors are built."""

from __future__ import annotations

from dataclasses import dataclass, field

from stratagem.errors import ConfigValueError
from stratagem.model.layers import FFNS, MIXERS, LayerSpec

NORMS = ("pre", "peri")
ROUTERS = ("softmax", "sigmoid")
MOE_MODES = ("dropless", "capacity")


@dataclass
class MoEConfig:
    """The ``moe`` feed-forward (`model.moe`), TOML ``[model.moe]``; ignored by models without it."""

    num_experts: int = 8
    top_k: int = 2  # experts per token
    expert_hidden: int = 0  # SwiGLU width of each expert; 0 means ffn_hidden (fine-grained experts: smaller)
    num_shared_experts: int = 0  # experts of width expert_hidden that every token also goes through
    router: str = "softmax"  # softmax | sigmoid: scores from the router logits, in float32
    renormalize: bool = True  # divide each token's top-k weights by their sum
    mode: str = "dropless"  # dropless | capacity (at most capacity_factor * N * top_k / num_experts per expert)
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01  # switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss: mean squared logsumexp of the logits
    bias_update_rate: float = 0.0  # aux-loss-free balancing: > 0 adds a per-expert selection bias

    def validate(self) -> None:
        """Raise `ConfigValueError` with a key relative to `ModelConfig` (``moe.top_k``)."""
        if self.num_experts < 1:
            raise ConfigValueError("moe.num_experts", self.num_experts, "must be at least 1")
        if self.top_k < 1:
            raise ConfigValueError("moe.top_k", self.top_k, "must be at least 1")
        if self.top_k > self.num_experts:
            raise ConfigValueError("moe.top_k", self.top_k, f"exceeds moe.num_experts = {self.num_experts}")
        for key in ("expert_hidden", "num_shared_experts"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"moe.{key}", getattr(self, key), "must not be negative")
        if self.router not in ROUTERS:
            raise ConfigValueError("moe.router", self.router, f"must be one of {', '.join(ROUTERS)}")
        if self.mode not in MOE_MODES:
            raise ConfigValueError("moe.mode", self.mode, f"must be one of {', '.join(MOE_MODES)}")
        if self.capacity_factor <= 0:
            raise ConfigValueError("moe.capacity_factor", self.capacity_factor, "must be positive")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"moe.{key}", getattr(self, key), "must not be negative")


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
    moe: MoEConfig = field(default_factory=MoEConfig)  # the "moe" feed-forward's experts and router

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def expert_hidden(self) -> int:
        """The SwiGLU width of each "moe" expert: ``moe.expert_hidden``, or ffn_hidden when it is 0."""
        return self.moe.expert_hidden or self.ffn_hidden

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
        self.moe.validate()

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
