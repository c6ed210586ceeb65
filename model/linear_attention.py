"""Linear-attention mixers: "gla", "deltanet" and "gated_deltanet", thin layers over the kernels.

All three keep, per head, a d_k x d_v state S that summarises the past, and read it with the
query, o_t = scale * q_t S_t; they differ in how S is written (the kernels in `kernels/`):

- GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"):
  S_t = diag(a_t) S_{t-1} + k_t^T v_t, with a data-dependent forget gate a_t per key channel.
- DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length"): S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}), which overwrites what is
  stored under k_t instead of adding to it.
- Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with
  Delta Rule"): the delta rule with a scalar decay a_t per head, S_t = a_t (...).

The layer around the kernel is the one the papers share (and flash-linear-attention ships):

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))   (short conv: conv_size > 0)
    o = kernel(q, k, v, gates(x))                                         per head
    y = (RMSNorm_head(o) * silu(x W_gate)) W_o

with separate bias-free wq, wk, wv, wo (tensor parallelism shards them like attention's) and
n_heads heads of head_dim for q, k and v alike (d_k = d_v = head_dim; no grouped heads). The
per-head RMSNorm (one weight shared by all heads) keeps the output scale independent of how
much the state has accumulated; the swish output gate is GLA's (Gated DeltaNet keeps it).
Published GLA has no short conv, DeltaNet and Gated DeltaNet do; here ``conv_size`` switches it
for all three (0 gives GLA's published form). The delta rule needs unit-norm keys for
``I - beta k^T k`` to be a contraction; q is L2-normalised too, as the papers do.

Generation: ``init_cache`` / ``forward_step`` carry the recurrent state [B, H, d_k, d_v] and the
convs' last ``conv_size - 1`` inputs, so a step costs O(1) in the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.kernels.delta_rule import delta_rule, delta_rule_step
from stratagem.kernels.gla import gla, gla_step
from stratagem.model.config import ModelConfig
from stratagem.model.conv import ShortConv
from stratagem.model.layers import register_mixer
from stratagem.model.norms import RMSNorm

# GLA's forget gate: log a_t = logsigmoid(x W_down W_up + b) / GATE_NORMALIZER, with W_down W_up
# of rank GATE_RANK (both 16 in the paper). The low rank keeps the d_k-wide gate cheap; dividing
# by the normaliser pushes a_t towards 1 (slow forgetting; at init, a_t = 2^(-1/16) ~ 0.96).
GATE_RANK = 16
GATE_NORMALIZER = 16


@dataclass
class RecurrentCache:
    """Generation state of a linear mixer: the kernel state and one conv state per q, k, v."""

    state: torch.Tensor  # [B, H, d_k, d_v], at least float32
    conv: tuple[torch.Tensor, ...]  # ([B, conv_size - 1, H * head_dim],) * 3, or () without conv


class LinearAttention(nn.Module):
    """The shared layer; subclasses add their gates (`_gates`) and call their kernel.

    Subclass hooks, all on a head-last layout (``[B, T, H, ...]`` in training, ``[B, H, ...]``
    for one generated token):

    - ``_gates(x)``: the kernel's gate tensors computed from the layer input;
    - ``_kernel(q, k, v, gates)``: the sequence kernel on ``[B, H, T, ...]`` tensors, returns o;
    - ``_kernel_step(q, k, v, gates, state)``: one token, returns ``(o, state)``.
    """

    normalize_qk = False  # L2-normalise q and k per head (the delta rule)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.n_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.chunk_size = cfg.chunk_size
        self.wq = nn.Linear(cfg.dim, width, bias=False)
        self.wk = nn.Linear(cfg.dim, width, bias=False)
        self.wv = nn.Linear(cfg.dim, width, bias=False)
        convs = [ShortConv(width, cfg.conv_size) if cfg.conv_size else None for _ in range(3)]
        self.q_conv, self.k_conv, self.v_conv = convs
        self.wgate = nn.Linear(cfg.dim, width, bias=False)
        self.norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wo = nn.Linear(width, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv, self.wgate):
            nn.init.normal_(w.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for conv in self._convs():
            if conv is not None:
                conv.reset_parameters()
        self.norm.reset_parameters()

    def _convs(self) -> tuple:
        return self.q_conv, self.k_conv, self.v_conv

    def _features(self, x: torch.Tensor, conv_states: tuple = ()) -> tuple[list[torch.Tensor], tuple]:
        """q, k, v (head-last) from x; with ``conv_states`` (one token) also the new conv states."""
        features, states = [], []
        for i, (w, conv) in enumerate(zip((self.wq, self.wk, self.wv), self._convs())):
            y = w(x)
            if conv is not None and conv_states:
                y, state = conv.step(y, conv_states[i])
                states.append(state)
            elif conv is not None:
                y = conv(y)
            features.append(y.unflatten(-1, (-1, self.head_dim)))
        if self.normalize_qk:
            features[:2] = [F.normalize(f, dim=-1, eps=1e-6) for f in features[:2]]
        return features, tuple(states)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o`` head-last ``[..., H, d_v]`` -> the layer output ``[..., dim]``."""
        gate = F.silu(self.wgate(x)).unflatten(-1, (-1, self.head_dim))
        return self.wo((self.norm(o) * gate).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (q, k, v), _ = self._features(x)
        gates = tuple(g if g is None else g.transpose(1, 2) for g in self._gates(x))
        # Contiguous [B, H, T, D] inputs: the kernels' chunk views then reach their matmuls
        # without copies, which autograd would keep (~15% of the layer's saved bytes); these
        # copies themselves are not kept.
        o = self._kernel(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), gates)
        return self._output(o.transpose(1, 2), x)

    def init_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> RecurrentCache:
        heads = self.wq.out_features // self.head_dim
        state = torch.zeros(batch, heads, self.head_dim, self.head_dim, device=device,
                            dtype=torch.promote_types(dtype, torch.float32))
        convs = tuple(c.init_state(batch, device, dtype) for c in self._convs() if c is not None)
        return RecurrentCache(state, convs)

    def forward_step(self, x: torch.Tensor, cache: RecurrentCache) -> tuple[torch.Tensor, RecurrentCache]:
        """One token: ``x [B, dim]`` -> ``(y [B, dim], cache)``."""
        (q, k, v), convs = self._features(x, cache.conv)
        o, state = self._kernel_step(q, k, v, self._gates(x), cache.state)
        return self._output(o, x), RecurrentCache(state, convs)

    # -- counts ------------------------------------------------------------------------------
    # Subclasses provide their gate's parameters, FLOPs and saved tensors, and their kernel's
    # matmul FLOPs and saved elements per chunk of chunk_size tokens and head (see each).

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        """wq, wk, wv, wgate, wo (dim x width each, width = n_heads * head_dim), three convs of
        width x conv_size, the per-head norm (head_dim) and the gate's own."""
        width = cfg.n_heads * cfg.head_dim
        convs = 3 * ShortConv.num_params(width, cfg.conv_size)
        return 5 * cfg.dim * width + convs + RMSNorm.num_params(cfg.head_dim) + cls._gate_params(cfg)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs per token: 2 per multiply-accumulate of the matmuls and of the kernels'
        other contractions (the delta rule's triangular solve, GLA's diagonal scores); other
        element-wise work, the gates' non-linearities and the norms are not counted.

        Layer: the five dim x width projections, 10 * dim * width; the depthwise convs,
        3 * 2 * width * conv_size; the gate's projections (subclasses). Kernel: the chunked form's
        matmuls per chunk and head (``_kernel_flops``), on the sequence padded to whole chunks
        (the kernels zero-pad it), per real token, rounded down. Unlike attention, nothing grows
        with seq_len: the per-token cost is set by chunk_size and the head dims.
        """
        width = cfg.n_heads * cfg.head_dim
        layer = 10 * cfg.dim * width + 3 * ShortConv.flops_per_token(width, cfg.conv_size) + cls._gate_flops(cfg)
        chunks = -(-seq_len // cfg.chunk_size)
        return layer + cfg.n_heads * chunks * cls._kernel_flops(cfg) // seq_len

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """What the layer and the torch chunked kernel keep for backward per token (retained
        by the graph of the output, measured on CPU), in the activation dtype unless noted:

        - the input x (dim; saved by every projection);
        - each conv: its input and its pre-SiLU output (2 * 3 * width, width = n_heads * head_dim);
        - with L2-normalised q and k: each one's input (width) and its norm before and after the
          clamp (2 * n_heads), saved by the division;
        - the gate's tensors (subclasses);
        - the output: the per-head RMSNorm (float32 input, float32 reciprocal RMS per head,
          normalised values), the gate's pre-SiLU projection and SiLU output, the normalised
          output (saved by the product) and the product (saved by wo): 4 * width + RMSNorm's;
        - the kernel's saved tensors, which it computes and keeps in float32 (float64 for a float64
          model), per chunk and head (``_kernel_saved``), for the sequence padded to whole
          chunks. They include the recurrent state: the kernel keeps the d_k x d_v state at the
          start of every chunk (twice, as the list it builds and the stacked tensor the output
          matmul reads), 2 * d_k * d_v / chunk_size values per token and head: this term is
          what makes a small chunk expensive in memory, and d_k * d_v per head is also all a
          linear layer carries between tokens in generation (its cache does not grow with T,
          where attention's grows by 2 * n_kv_heads * head_dim per token).

        The count is per real token, rounded down. The Triton kernels (GPU) save only their
        inputs and the chunk-boundary states and recompute the rest, so this is an upper
        bound there.
        """
        width, heads = cfg.n_heads * cfg.head_dim, cfg.n_heads
        convs = 3 * ShortConv.activation_bytes_per_token(width, dtype_bytes) if cfg.conv_size else 0
        qk_norms = 2 * dtype_bytes * (width + 2 * heads) if cls.normalize_qk else 0
        output = 4 * dtype_bytes * width + heads * RMSNorm.activation_bytes_per_token(cfg.head_dim, dtype_bytes)
        layer = dtype_bytes * cfg.dim + convs + qk_norms + cls._gate_activation_bytes(cfg, dtype_bytes) + output
        chunks = -(-seq_len // cfg.chunk_size)
        kernel = max(dtype_bytes, 4) * heads * cls._kernel_saved(cfg, chunks)
        return layer + kernel // seq_len

    @classmethod
    def _gate_params(cls, cfg: ModelConfig) -> int:
        raise NotImplementedError

    @classmethod
    def _gate_flops(cls, cfg: ModelConfig) -> int:
        raise NotImplementedError

    @classmethod
    def _gate_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int) -> int:
        raise NotImplementedError

    @classmethod
    def _kernel_flops(cls, cfg: ModelConfig) -> int:
        """Matmul FLOPs of the chunked kernel for one chunk of one head."""
        raise NotImplementedError

    @classmethod
    def _kernel_saved(cls, cfg: ModelConfig, chunks: int) -> int:
        """Elements the chunked kernel keeps for backward for one sequence of ``chunks`` chunks
        and one head."""
        raise NotImplementedError


@register_mixer("gla")
class GatedLinearAttention(LinearAttention):
    """GLA: a forget gate per head and key channel, log a_t = logsigmoid(x W_down W_up + b) / 16."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wdecay_down = nn.Linear(cfg.dim, GATE_RANK, bias=False)
        self.wdecay_up = nn.Linear(GATE_RANK, cfg.n_heads * cfg.head_dim, bias=True)

    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        nn.init.normal_(self.wdecay_down.weight, std=std)
        nn.init.normal_(self.wdecay_up.weight, std=std)
        nn.init.zeros_(self.wdecay_up.bias)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        log_decay = F.logsigmoid(self.wdecay_up(self.wdecay_down(x))) / GATE_NORMALIZER
        return (log_decay.unflatten(-1, (-1, self.head_dim)),)

    def _kernel(self, q, k, v, gates):
        return gla(q, k, v, gates[0], chunk_size=self.chunk_size)[0]

    def _kernel_step(self, q, k, v, gates, state):
        return gla_step(q, k, v, gates[0], state)

    @classmethod
    def _gate_params(cls, cfg: ModelConfig) -> int:
        """W_down (dim x GATE_RANK), W_up (GATE_RANK x width) and its bias (width)."""
        return cfg.dim * GATE_RANK + (GATE_RANK + 1) * cfg.n_heads * cfg.head_dim

    @classmethod
    def _gate_flops(cls, cfg: ModelConfig) -> int:
        return 2 * GATE_RANK * (cfg.dim + cfg.n_heads * cfg.head_dim)

    @classmethod
    def _gate_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int) -> int:
        """W_down's output (saved by W_up) and logsigmoid's input and buffer (width each)."""
        return dtype_bytes * (GATE_RANK + 2 * cfg.n_heads * cfg.head_dim)

    @classmethod
    def _kernel_flops(cls, cfg: ModelConfig) -> int:
        """Per chunk of C tokens and head, d_k = d_v = D (kernels/gla/chunk.py):

        - intra-chunk scores A_ij = sum_d q_id k_jd exp(B_id - B_jd), j <= i: built by recursive
          halving, every pair j < i in exactly one block matmul, plus the diagonal q_i . k_i:
          C (C + 1) / 2 pairs of D multiply-adds, C (C + 1) D;
        - the intra-chunk output A V, C x C x D (all of it, the zero upper triangle included):
          2 C^2 D;
        - the state update (K decayed)^T V and the output (Q decayed) S, C x D x D each: 4 C D^2.

        Per token: (C + 1) D + 2 C D, i.e. ~ 1.5 C (d_k + d_v), for the intra-chunk part, and
        2 d_k d_v each for the state update and for reading the state.
        """
        C, D = cfg.chunk_size, cfg.head_dim
        return C * (C + 1) * D + 2 * C * C * D + 4 * C * D * D

    @classmethod
    def _kernel_saved(cls, cfg: ModelConfig, chunks: int) -> int:
        """Per token and head (D = head_dim, C = chunk_size), kernels/gla/chunk.py keeps:

        - its chunked copies of q (scaled), k and v, the decays exp(B_i) and exp(B_C - B_j), the
          decayed q and the transposed decayed k of the state matmuls: 7 D; the scores A: C;
        - per level of the recursive halving (log2 C of them), the decayed right-half queries
          and left-half keys of every block and their decay factors: 2 D;
        - the start state of every chunk, stacked for the output matmul, and (all but the last,
          which only feeds the final state) as the operand of the decay: (2 chunks - 1) D^2 per
          sequence; and the decay over each chunk, D per chunk.
        """
        C, D = cfg.chunk_size, cfg.head_dim
        levels = C.bit_length() - 1
        per_chunk = C * (7 * D + C + 2 * levels * D) + D + 2 * D * D
        return chunks * per_chunk - D * D


@register_mixer("deltanet")
class DeltaNet(LinearAttention):
    """DeltaNet: the write strength beta_t = sigmoid(x w_beta) per head; no decay.

    With ``gated`` (the "gated_deltanet" subclass) it adds Gated DeltaNet's scalar decay per
    head in Mamba2's parameterisation, log a_t = -exp(A_log) * softplus(x w_decay + dt_bias):
    A = exp(A_log) > 0 is a per-head decay rate and softplus(.) a data-dependent step size.
    """

    normalize_qk = True
    gated = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wbeta = nn.Linear(cfg.dim, cfg.n_heads, bias=False)
        if self.gated:
            self.wdecay = nn.Linear(cfg.dim, cfg.n_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(cfg.n_heads))
            self.dt_bias = nn.Parameter(torch.empty(cfg.n_heads))

    def init_weights(self, std: float, out_std: float) -> None:
        """Beta starts near 1/2. With the gate, Mamba2's init: A ~ U[1, 16] and dt_bias such that
        softplus(dt_bias) = dt, log-uniform in [1e-3, 1e-1]; the decay per token then starts
        between exp(-16 * 0.1) and exp(-1e-3), a spread of memory lengths over heads."""
        super().init_weights(std, out_std)
        nn.init.normal_(self.wbeta.weight, std=std)
        if self.gated:
            nn.init.normal_(self.wdecay.weight, std=std)
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))
                dt = log_dt.exp().clamp(min=1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        beta = torch.sigmoid(self.wbeta(x))
        if not self.gated:
            return beta, None
        return beta, -self.A_log.exp() * F.softplus(self.wdecay(x) + self.dt_bias)

    def _kernel(self, q, k, v, gates):
        beta, log_decay = gates
        return delta_rule(q, k, v, beta, log_decay, chunk_size=self.chunk_size)[0]

    def _kernel_step(self, q, k, v, gates, state):
        beta, log_decay = gates
        return delta_rule_step(q, k, v, beta, state, log_decay)

    @classmethod
    def _gate_params(cls, cfg: ModelConfig) -> int:
        """wbeta (dim x n_heads); gated: wdecay (dim x n_heads), A_log and dt_bias (n_heads each)."""
        return cfg.dim * cfg.n_heads + (cfg.dim * cfg.n_heads + 2 * cfg.n_heads if cls.gated else 0)

    @classmethod
    def _gate_flops(cls, cfg: ModelConfig) -> int:
        return 2 * cfg.dim * cfg.n_heads * (2 if cls.gated else 1)

    @classmethod
    def _gate_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int) -> int:
        """beta (saved by the sigmoid); gated: softplus's input and output, one per head each.
        exp(A_log) is saved too, but it is n_heads values per batch, not per token."""
        return dtype_bytes * cfg.n_heads * (3 if cls.gated else 1)

    @classmethod
    def _kernel_flops(cls, cfg: ModelConfig) -> int:
        """Per chunk of C tokens and head, d_k = d_v = D (kernels/delta_rule/chunk.py):

        - K K^T and Q K^T, C x C x D each: 2 * 2 C^2 D;
        - the unit lower-triangular solve for [U~, W] (2 D right-hand sides, C (C - 1) / 2
          multiply-adds each): 2 C (C - 1) D;
        - the state terms W S, K^T U (the state update) and Q S (the output), C x D x D each:
          3 * 2 C D^2;
        - the intra-chunk output (Q K^T) U, C x C x D: 2 C^2 D.

        Per token: 6 C D + 2 (C - 1) D + 6 D^2; the gate's decays are element-wise.
        """
        C, D = cfg.chunk_size, cfg.head_dim
        return 4 * C * C * D + 2 * C * (C - 1) * D + 6 * C * D * D + 2 * C * C * D

    @classmethod
    def _kernel_saved(cls, cfg: ModelConfig, chunks: int) -> int:
        """Per token and head (D = head_dim, C = chunk_size), kernels/delta_rule/chunk.py keeps:

        - its chunked copies of q (scaled), k and v, and beta: 3 D + 1;
        - K K^T, the masked Q K^T and the strictly lower L: 3 C;
        - the solve's output [U~, W]: 2 D;
        - the pseudo-values U of every chunk and their stacked copy: 2 D, less the last chunk's
          U, which only the graph of the final state (dropped by the layer) holds;
        - the start state of every chunk, as a list and stacked: 2 D^2 / C.

        With the gate also: the decayed q, beta * k before its decay and the keys decayed to the
        chunk end (3 D), the pair decays exp(G_t - G_i) and the undecayed K K^T and Q K^T (3 C),
        gamma and the decay to the chunk end (2), and one chunk decay per chunk.
        """
        C, D = cfg.chunk_size, cfg.head_dim
        per_chunk = C * (7 * D + 3 * C + 1) + 2 * D * D
        if cls.gated:
            per_chunk += C * (3 * D + 3 * C + 2) + 1
        return chunks * per_chunk - C * D


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    gated = True
