"""The decoder-only model: token embedding, a stack of `Block`s, final norm, output head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.config import ModelConfig
from stratagem.model.layers import (FFNS, MIXERS, LayerSpec, active_params, expert_params,
                                    tp_replicated_activation_bytes_per_token)
from stratagem.model.norms import RMSNorm


class Block(nn.Module):
    """One layer: a mixer sublayer then a feed-forward sublayer, each on the residual stream.

    Pre-norm:  ``h = x + mixer(mixer_norm(x))``; ``out = h + ffn(ffn_norm(h))``.
    Peri-norm (Peri-LN) also normalises each sublayer's output before adding it:
    ``h = x + mixer_out_norm(mixer(mixer_norm(x)))``, and likewise for the ffn, which bounds
    what a sublayer can add to the residual stream whatever the scale of its weights.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = MIXERS[spec.mixer](cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FFNS[spec.ffn](cfg)
        peri = cfg.norm == "peri"
        self.mixer_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if peri else None
        self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if peri else None

    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)
        for norm in (self.mixer_norm, self.ffn_norm, self.mixer_out_norm, self.ffn_out_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn_sublayer(self._residual(x, self.mixer(self.mixer_norm(x)), self.mixer_out_norm))

    def forward_step(self, x: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """One token, ``x [B, dim]``, with the mixer's cache (see `model.layers`)."""
        out, cache = self.mixer.forward_step(self.mixer_norm(x), cache)
        return self._ffn_sublayer(self._residual(x, out, self.mixer_out_norm)), cache

    def _ffn_sublayer(self, h: torch.Tensor) -> torch.Tensor:
        return self._residual(h, self.ffn(self.ffn_norm(h)), self.ffn_out_norm)

    @staticmethod
    def _residual(x: torch.Tensor, out: torch.Tensor, out_norm: RMSNorm | None) -> torch.Tensor:
        return x + (out_norm(out) if out_norm is not None else out)

    @staticmethod
    def n_norms(cfg: ModelConfig) -> int:
        return 4 if cfg.norm == "peri" else 2

    @classmethod
    def num_params(cls, cfg: ModelConfig, spec: LayerSpec) -> int:
        return (MIXERS[spec.mixer].num_params(cfg) + FFNS[spec.ffn].num_params(cfg)
                + cls.n_norms(cfg) * RMSNorm.num_params(cfg.dim))

    @classmethod
    def active_params(cls, cfg: ModelConfig, spec: LayerSpec) -> int:
        """The parameters one token uses (a mixture of experts uses top_k of its experts)."""
        return (active_params(MIXERS[spec.mixer], cfg) + active_params(FFNS[spec.ffn], cfg)
                + cls.n_norms(cfg) * RMSNorm.num_params(cfg.dim))

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, spec: LayerSpec, seq_len: int) -> int:
        """Forward matmul FLOPs per token of the mixer and the ffn (norms are element-wise)."""
        return MIXERS[spec.mixer].flops_per_token(cfg, seq_len) + FFNS[spec.ffn].flops_per_token(cfg, seq_len)

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, spec: LayerSpec, seq_len: int, dtype_bytes: int) -> int:
        """The mixer's, the ffn's and every norm's saved tensors; residual adds save nothing."""
        return (MIXERS[spec.mixer].activation_bytes_per_token(cfg, seq_len, dtype_bytes)
                + FFNS[spec.ffn].activation_bytes_per_token(cfg, seq_len, dtype_bytes)
                + cls.n_norms(cfg) * RMSNorm.activation_bytes_per_token(cfg.dim, dtype_bytes))

    @classmethod
    def tp_replicated_activation_bytes_per_token(cls, cfg: ModelConfig, spec: LayerSpec, seq_len: int,
                                                 dtype_bytes: int) -> int:
        """The part of `activation_bytes_per_token` that tensor parallelism replicates over its
        group: the norms' and what each sublayer reports (`model.layers`); the rest divides by tp."""
        return (tp_replicated_activation_bytes_per_token(MIXERS[spec.mixer], cfg, seq_len, dtype_bytes)
                + tp_replicated_activation_bytes_per_token(FFNS[spec.ffn], cfg, seq_len, dtype_bytes)
                + cls.n_norms(cfg) * RMSNorm.activation_bytes_per_token(cfg.dim, dtype_bytes))

    @classmethod
    def expert_params(cls, cfg: ModelConfig, spec: LayerSpec) -> int:
        """The parameters expert parallelism splits (the ffn's routed experts)."""
        return expert_params(FFNS[spec.ffn], cfg)


class Transformer(nn.Module):
    """``tokens [B, T] (long) -> logits [B, T, vocab_size] (float32)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in cfg.layer_specs())
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Embedding, head and every sublayer weight ~ N(0, init_std), norm weights 1, except the
        projections that write into the residual stream (attention wo, mlp and expert w2), drawn
        with std init_std / sqrt(2 * n_layers).

        Each of the 2 * n_layers sublayers adds its output to the residual stream, so with
        independent outputs its variance grows with their number; shrinking those projections
        by sqrt(2 * n_layers) keeps the stream's scale at the output independent of depth
        (the GPT-2 / Megatron-LM scheme).
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self._logits(h)

    def init_caches(self, batch: int, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> list:
        """Every layer's empty generation cache (by default on the model's device and dtype)."""
        weight = self.tok_embeddings.weight
        return [layer.mixer.init_cache(batch, device or weight.device, dtype or weight.dtype)
                for layer in self.layers]

    def forward_step(self, tokens: torch.Tensor, caches: list) -> tuple[torch.Tensor, list]:
        """The next position: ``tokens [B]`` -> ``(logits [B, vocab_size] float32, caches)``.

        Stepping through a sequence gives the logits of `forward` on it, position by position.
        """
        h = self.tok_embeddings(tokens)
        new_caches = []
        for layer, cache in zip(self.layers, caches, strict=True):
            h, cache = layer.forward_step(h, cache)
            new_caches.append(cache)
        return self._logits(h), new_caches

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        return logits.float()
