"""The layer-type registry: every mixer and feed-forward a model can be built from.

A model is a list of `LayerSpec`s; each names one mixer (token mixing: ``attention``, ``swa``,
``gla``, ``deltanet``, ``gated_deltanet``) and one feed-forward (``mlp``, ``moe``). A
layer type is an ``nn.Module`` class registered under its name with `register_mixer` or
`register_ffn`, and it follows this protocol (checked at registration):

- ``cls(cfg: ModelConfig)`` builds it; ``forward(x)`` maps ``[B, T, dim] -> [B, T, dim]``.
- ``init_weights(self, std: float, out_std: float)`` draws its weights; ``out_std`` is for the
  projection that writes into the residual stream (see `Transformer.init_weights`).
- ``num_params(cfg) -> int``: parameters of one instance.
- ``flops_per_token(cfg, seq_len) -> int``: forward matmul FLOPs per token (2 per
  multiply-accumulate). Element-wise work (norms, activations, softmax, RoPE) is not counted.
- ``activation_bytes_per_token(cfg, seq_len, dtype_bytes) -> int``: bytes of tensors the
  layer keeps for backward per token in training, without activation checkpointing,
  including its input if it saves it.

Optionally (each with a fallback below):

- ``active_params(cfg) -> int``: the parameters one token goes through (a mixture of experts
  uses top_k of its experts); falls back to ``num_params``.
- ``expert_params(cfg) -> int``: the parameters expert parallelism splits over its ranks (a
  mixture of experts' routed experts); falls back to 0.
- ``tp_replicated_activation_bytes_per_token(cfg, seq_len, dtype_bytes) -> int``: the part of
  ``activation_bytes_per_token`` that tensor parallelism does not divide (it is replicated over
  the tp group); the rest is split by heads or hidden width. Falls back to the layer's input,
  ``dtype_bytes * dim``, which its column-wise projections save.

These classmethods are the only source of a layer's size and cost: `count_model`, the cost
model and the scaling-law module read them and never re-derive them.

Mixers also generate token by token (`model.generate`), carrying what they need from the past in
a cache of their own type:

- ``init_cache(self, batch, device, dtype)``: the cache before the first token (an attention
  layer's empty KV cache; a linear layer's zero recurrent state and conv inputs).
- ``forward_step(self, x_t, cache) -> (y_t, cache)``: one token, ``x_t [B, dim] -> y_t [B, dim]``,
  at the position after those the cache has seen. Feeding a sequence through ``forward_step``
  one token at a time gives ``forward``'s outputs (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL = ("init_weights", "num_params", "flops_per_token", "activation_bytes_per_token")
MIXER_PROTOCOL = (*PROTOCOL, "init_cache", "forward_step")

MIXERS: dict[str, type] = {}
FFNS: dict[str, type] = {}


@dataclass(frozen=True)
class LayerSpec:
    """The layer types of one layer: a mixer name from `MIXERS`, a feed-forward from `FFNS`."""

    mixer: str
    ffn: str


def _register(registry: dict[str, type], kind: str, name: str, protocol: tuple[str, ...]):
    def register(cls: type) -> type:
        missing = [m for m in protocol if not hasattr(cls, m)]
        if missing:
            raise TypeError(f"{kind} {name!r} ({cls.__name__}) lacks {', '.join(missing)}")
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered by {registry[name].__name__}")
        registry[name] = cls
        return cls

    return register


def active_params(cls: type, cfg) -> int:
    """Parameters of layer type `cls` that one token uses: its ``active_params(cfg)`` if it has one,
    else all of them (``num_params(cfg)``)."""
    counted = getattr(cls, "active_params", None)
    return counted(cfg) if counted is not None else cls.num_params(cfg)


def expert_params(cls: type, cfg) -> int:
    """Parameters of layer type `cls` that expert parallelism splits: its ``expert_params(cfg)``, else 0."""
    counted = getattr(cls, "expert_params", None)
    return counted(cfg) if counted is not None else 0


def tp_replicated_activation_bytes_per_token(cls: type, cfg, seq_len: int, dtype_bytes: int) -> int:
    """The activation bytes per token of layer type `cls` that tensor parallelism replicates: its
    own count if it has one, else its input (``dtype_bytes * dim``)."""
    counted = getattr(cls, "tp_replicated_activation_bytes_per_token", None)
    return counted(cfg, seq_len, dtype_bytes) if counted is not None else dtype_bytes * cfg.dim


def register_mixer(name: str):
    """Class decorator: register a mixer layer type under `name`."""
    return _register(MIXERS, "mixer", name, MIXER_PROTOCOL)


def register_ffn(name: str):
    """Class decorator: register a feed-forward layer type under `name`."""
    return _register(FFNS, "ffn", name, PROTOCOL)
