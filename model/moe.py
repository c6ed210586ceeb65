"""Mixture-of-experts feed-forward, registered as the ffn "moe" (configured by `ModelConfig.moe`).

A router sends each token to ``top_k`` of ``num_experts`` SwiGLU experts, and every token also
goes through ``num_shared_experts`` shared ones (one SwiGLU of their summed width). For the N
tokens ``x [N, dim]`` of one forward call:

    logits = x W_router                        [N, E], float32 (float64 for float64 inputs)
    scores = softmax(logits) | sigmoid(logits)
    chosen = top_k(scores + expert_bias)       the bias (aux-loss-free balancing) only selects
    w      = scores[chosen], / their sum if renormalize
    y      = sum over chosen e of w_e * SwiGLU_e(x) + SwiGLU_shared(x)

The forward is four steps with narrow interfaces, so that expert parallelism (``parallel/``) can
swap the token movement (the dispatcher) without touching this file:

1. `MoE.route`: ``indices [N, k]`` and ``weights [N, k]``. In capacity mode,
   `drop_over_capacity` has already marked the dropped assignments ``DROPPED`` (-1, weight 0).
2. ``dispatcher.dispatch(x, indices, weights) -> (expert_input [M, dim], tokens_per_expert
   LongTensor [num_local_experts], ctx)``: one row of x per kept assignment, grouped by expert in
   ascending order (rows of one expert in token order); M = kept assignments.
3. ``experts(expert_input, tokens_per_expert) -> [M, dim]`` (`GroupedExperts`).
4. ``dispatcher.combine(expert_output, ctx) -> [N, dim]``: multiplies each row by its routing
   weight (in the expert output's dtype) and sums each token's rows; a token without a kept
   assignment gets zeros.

And ``dispatcher.reduce_load(counts LongTensor [E]) -> LongTensor [E]`` turns this process's
per-expert counts into the global ones (`LocalDispatcher`: the identity; expert parallelism
all-reduces them over its ranks), which feed the balancing loss, the expert bias and the logs.
It is called in training mode only: once per forward for the top-k selections and, in capacity
mode, a second time for the dropped assignments.

Capacity mode (``mode = "capacity"``). The group is the N tokens of one forward call (a rank's
micro-batch, batch x sequence). Each expert takes at most C = ceil(capacity_factor * N * top_k /
num_experts) assignments: those with the highest routing weight w (after renormalisation; the
"probs" drop policy, Megatron-Core's default), ties going to the earlier token (batch-major,
then position), then to the earlier of its top-k slots. The others are dropped: they add
nothing, and the kept weights are not renormalised, so a token whose every assignment is dropped
leaves the layer as the shared experts' output alone (zeros without them) and passes the block
through its residual. In a causal model this makes a token's output depend on other tokens of
the group, later ones included (as in every capacity-based MoE). Dropless mode keeps all N * k.

Auxiliary losses, added to the training loss through the graph (not the loss function, so they
work under pipeline parallelism too): `AttachAuxLoss` returns the layer output unchanged and, in
backward, gives the loss below the gradient ``aux_loss_scale`` (1 by default; the training loop
sets 1 / micro-batches with `set_aux_loss_scale`, as it divides the LM loss):

    loss = aux_loss_coef * E * sum_i f_i P_i  +  z_loss_coef * mean_n logsumexp(logits_n)^2

with f_i = c_i / sum_j c_j the fraction of this step's top-k selections (before capacity
dropping) that went to expert i, c the global counts from ``reduce_load`` (no gradient), and
P_i the mean over this process's N tokens of p_i, the softmax scores (for the sigmoid router the
scores divided by their per-token sum). Perfect balance gives f_i = P_i = 1/E and a balance term
of 1 (the switch loss, Fedus et al. 2021; the z-loss is ST-MoE's, Zoph et al. 2022).

Aux-loss-free balancing (``bias_update_rate > 0``, DeepSeek-V3): the layer sums the global
counts over the micro-batches of a step, and after the optimizer step `update_expert_biases`
sets ``expert_bias_i += rate * sign(mean(load) - load_i)`` and clears the sum. The bias is a
persistent buffer, so checkpoints carry it.

`moe_metrics` reports per layer the step's load max/mean, dropped fraction and mean balance term
and z-loss (without their coefficients). Statistics and losses are only computed in training mode.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from stratagem.model.config import ModelConfig, MoEConfig
from stratagem.model.layers import register_ffn
from stratagem.model.mlp import SwiGLU

__all__ = ["DROPPED", "GroupedExperts", "LocalDispatcher", "MoE", "MoEConfig", "moe_layers", "moe_metrics",
           "set_aux_loss_scale", "update_expert_biases"]

DROPPED = -1  # the expert index of an assignment dropped by capacity


# --- routing ---------------------------------------------------------------------------------

def router_scores(logits: torch.Tensor, router: str) -> torch.Tensor:
    """``softmax`` over experts, or an independent ``sigmoid`` per expert."""
    return logits.softmax(dim=-1) if router == "softmax" else logits.sigmoid()


def select_experts(scores: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                   renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts by ``scores + bias`` and their weights from the unbiased scores,
    divided by their sum when `renormalize`: ``(indices [N, k] long, weights [N, k])``."""
    indices = (scores if bias is None else scores + bias).topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> int:
    """ceil(capacity_factor * num_tokens * top_k / num_experts), rounding away float noise first
    (1.1 * 40 / 4 is 11, not 12)."""
    return math.ceil(round(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts, 9))


def drop_over_capacity(indices: torch.Tensor, weights: torch.Tensor, capacity: int,
                       num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` assignments per expert, those of highest weight (ties: earlier
    token, then earlier slot); the others get index `DROPPED` and weight 0."""
    flat = indices.flatten()
    by_weight = torch.sort(weights.detach().flatten(), descending=True, stable=True).indices
    order = by_weight[torch.sort(flat[by_weight], stable=True).indices]  # by expert, then weight
    counts = torch.bincount(flat, minlength=num_experts)
    rank = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = rank < capacity
    drop = ~keep.view_as(indices)
    return indices.masked_fill(drop, DROPPED), weights.masked_fill(drop, 0.0)


def load_balancing_loss(scores: torch.Tensor, load: torch.Tensor, router: str) -> torch.Tensor:
    """The switch balance term E * sum_i f_i P_i (1 at perfect balance), without its coefficient:
    f = load / sum(load) (no gradient), P = mean over tokens of the per-token normalised scores."""
    probs = scores if router == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    fraction = load.to(probs.dtype) / load.sum().clamp(min=1)
    return scores.shape[-1] * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, without its coefficient."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class AttachAuxLoss(torch.autograd.Function):
    """``attach(output, loss, scale)`` returns `output`; backward passes output's gradient through
    and gives `loss` the gradient `scale`, as if ``scale * loss`` were part of the training loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.loss_dtype, ctx.loss_device = scale, loss.dtype, loss.device
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.loss_dtype, device=ctx.loss_device), None


# --- token dispatch ----------------------------------------------------------------------------

@dataclass
class DispatchContext:
    """What `LocalDispatcher.combine` needs: each expert-input row's token and routing weight."""

    token_ids: torch.Tensor  # [M] long
    weights: torch.Tensor  # [M]
    num_tokens: int  # N


class LocalDispatcher:
    """Token movement when every expert lives in this process: a gather of x's rows in expert
    order, and a weighted scatter-add back. Expert parallelism replaces it (same methods)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, expert_indices: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """``x [N, dim]``, ``expert_indices [N, k]`` (`DROPPED` = no expert), ``weights [N, k]`` ->
        ``(expert_input [M, dim] grouped by ascending expert, tokens_per_expert [E] long, ctx)``."""
        flat = expert_indices.flatten()
        kept = (flat != DROPPED).nonzero().squeeze(1)
        order = kept[torch.sort(flat[kept], stable=True).indices]
        token_ids = order.div(expert_indices.shape[-1], rounding_mode="floor")
        tokens_per_expert = torch.bincount(flat[kept], minlength=self.num_experts)
        ctx = DispatchContext(token_ids=token_ids, weights=weights.flatten()[order], num_tokens=x.shape[0])
        return x.index_select(0, token_ids), tokens_per_expert, ctx

    def combine(self, expert_output: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """``[M, dim] -> [N, dim]``: sum over a token's rows of weight * row (zeros for a token
        without rows), in the expert output's dtype."""
        weighted = expert_output * ctx.weights.to(expert_output.dtype).unsqueeze(-1)
        # index_put saves only the indices for backward (index_add would also keep `weighted`)
        out = weighted.new_zeros(ctx.num_tokens, weighted.shape[-1])
        return out.index_put((ctx.token_ids,), weighted, accumulate=True)

    def reduce_load(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-expert counts over every process that shares the experts: here, this one's."""
        return counts


# --- experts -----------------------------------------------------------------------------------

class _RowMajorGrad(torch.autograd.Function):
    """Identity whose backward hands on a row-major copy of an incoming gradient of other strides
    (``sum().backward()`` sends an expanded, stride-0 one), which `grouped_mm`'s backward rejects."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == (grad.shape[1], 1):
            return grad
        return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)


def grouped_mm_supported(x: torch.Tensor, hidden: int) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands: float32 or bfloat16 on CPU
    (bfloat16 on a CUDA GPU of compute capability 8.0+), rows 16-byte aligned, at least one row."""
    if x.shape[0] == 0 or any(n * x.element_size() % 16 for n in (x.shape[1], hidden)):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _grouped_matmul(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `a` grouped by expert (group e ends at ``offsets[e]``) times ``w[e]``."""
    return _RowMajorGrad.apply(F.grouped_mm(a, w, offs=offsets))


def _padded_matmul(tokens_per_expert: torch.Tensor):
    """The same product as `_grouped_matmul` as one `torch.bmm`: each expert's rows scattered into
    ``[E, max_count, in]`` (zeros elsewhere), the product's rows gathered back."""
    counts = tokens_per_expert
    num_experts, rows = counts.numel(), int(counts.sum())
    capacity = int(counts.max()) if rows else 0
    expert = torch.repeat_interleave(torch.arange(num_experts, device=counts.device), counts)
    slot = expert * capacity + torch.arange(rows, device=counts.device) - (counts.cumsum(0) - counts)[expert]

    def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        padded = a.new_zeros(num_experts * capacity, a.shape[-1]).index_copy(0, slot, a)
        return torch.bmm(padded.view(num_experts, capacity, a.shape[-1]), w).flatten(0, 1).index_select(0, slot)

    return matmul


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts, ``w2_e(silu(x w1_e) * x w3_e)``, with the weights of all in
    ``w1 [E, dim, hidden]``, ``w3 [E, dim, hidden]`` and ``w2 [E, hidden, dim]``.

    ``forward(x [M, dim], tokens_per_expert [E]) -> [M, dim]`` for rows grouped by expert (the
    first ``tokens_per_expert[0]`` rows go to expert 0, ...), each matmul one grouped product over
    all experts: `grouped_mm` where it works (`grouped_mm_supported`), else a padded `torch.bmm`
    (float64, unaligned widths, no rows; ``use_grouped_mm = False`` forces it). Under autocast
    the experts compute in the autocast dtype.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts  # experts held here (all of them without expert parallelism)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.use_grouped_mm = True

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, w1, w3, w2 = (t.to(dtype) for t in (x, self.w1, self.w3, self.w2))
        if self.use_grouped_mm and grouped_mm_supported(x, w1.shape[-1]):
            matmul = partial(_grouped_matmul, offsets=tokens_per_expert.cumsum(0).to(torch.int32))
        else:
            matmul = _padded_matmul(tokens_per_expert)
        return matmul(F.silu(matmul(x, w1)) * matmul(x, w3), w2)


# --- the layer ---------------------------------------------------------------------------------

def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing it.
    Its statistics were recorded by the first forward and must not count twice."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Routing:
    """One forward call's routing of N tokens."""

    indices: torch.Tensor  # [N, k] long: the chosen experts, DROPPED where capacity dropped them
    weights: torch.Tensor  # [N, k]: routing weights, 0 where dropped
    logits: torch.Tensor  # [N, E] router logits, float32 or float64
    scores: torch.Tensor  # [N, E] softmax or sigmoid of the logits
    load: torch.Tensor  # [E] long: top-k selections per expert, before capacity dropping
    dropped: torch.Tensor | None  # [E] long: of those, dropped by capacity (None when dropless)


@dataclass
class _StepTotals:
    """A layer's statistics summed over the micro-batches since `moe_metrics` last read them."""

    load: torch.Tensor  # [E] global selections
    dropped: torch.Tensor  # [] global dropped assignments
    aux_loss: torch.Tensor  # [] sum of the balance terms
    z_loss: torch.Tensor  # [] sum of the z-losses
    micro_batches: int = 0


@register_ffn("moe")
class MoE(nn.Module):
    """The "moe" feed-forward: ``router``, ``experts`` (`GroupedExperts`), optional
    ``shared_experts`` (a `SwiGLU` of width num_shared_experts * expert_hidden), ``dispatcher``
    (`LocalDispatcher` unless expert parallelism swaps it) and, with aux-loss-free balancing, the
    buffer ``expert_bias [E]``. See the module docstring for the computation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = self.cfg = cfg.moe
        hidden = cfg.expert_hidden
        self.router = nn.Linear(cfg.dim, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, cfg.dim, hidden)
        self.shared_experts = (SwiGLU(self._shared_cfg(cfg)) if moe.num_shared_experts else None)
        self.dispatcher = LocalDispatcher(moe.num_experts)
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts) if moe.bias_update_rate > 0 else None)
        self.aux_loss_scale = 1.0  # gradient of the auxiliary losses; see set_aux_loss_scale
        self._totals: _StepTotals | None = None
        self._load_since_bias_update: torch.Tensor | None = None

    @classmethod
    def _shared_cfg(cls, cfg: ModelConfig) -> ModelConfig:
        """The config of the shared experts' SwiGLU (`model/mlp.py`): their summed width."""
        return dataclasses.replace(cfg, ffn_hidden=cfg.moe.num_shared_experts * cfg.expert_hidden)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x)
        expert_input, tokens_per_expert, ctx = self.dispatcher.dispatch(x, routing.indices, routing.weights)
        out = self.dispatcher.combine(self.experts(expert_input, tokens_per_expert), ctx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training:
            out = self._balance(out, routing)
        return out.view(shape)

    def route(self, x: torch.Tensor) -> Routing:
        """Router logits and scores in float32 (float64 for float64 input, autocast off), top-k
        selection, and in capacity mode the drops (see the module docstring)."""
        cfg = self.cfg
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        scores = router_scores(logits, cfg.router)
        bias = None if self.expert_bias is None else self.expert_bias.to(dtype)
        indices, weights = select_experts(scores, cfg.top_k, bias, cfg.renormalize)
        load = torch.bincount(indices.flatten(), minlength=cfg.num_experts)
        dropped = None
        if cfg.mode == "capacity":
            capacity = expert_capacity(x.shape[0], cfg)
            indices, weights = drop_over_capacity(indices, weights, capacity, cfg.num_experts)
            kept = indices.flatten()
            dropped = load - torch.bincount(kept[kept != DROPPED], minlength=cfg.num_experts)
        return Routing(indices=indices, weights=weights, logits=logits, scores=scores, load=load, dropped=dropped)

    def _balance(self, out: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Global load, the auxiliary losses attached to `out`, and this step's statistics."""
        cfg = self.cfg
        load = self.dispatcher.reduce_load(routing.load)
        dropped = (self.dispatcher.reduce_load(routing.dropped).sum() if routing.dropped is not None
                   else load.new_zeros(()))
        aux = load_balancing_loss(routing.scores, load, cfg.router)
        z = router_z_loss(routing.logits)
        if not recomputing():
            self._record(load, dropped, aux.detach(), z.detach())
        if torch.is_grad_enabled() and (cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0):
            out = AttachAuxLoss.apply(out, cfg.aux_loss_coef * aux + cfg.z_loss_coef * z, self.aux_loss_scale)
        return out

    def _record(self, load: torch.Tensor, dropped: torch.Tensor, aux: torch.Tensor, z: torch.Tensor) -> None:
        if self._totals is None:
            self._totals = _StepTotals(load=torch.zeros_like(load), dropped=torch.zeros_like(dropped),
                                       aux_loss=torch.zeros_like(aux), z_loss=torch.zeros_like(z))
        t = self._totals
        t.load, t.dropped, t.aux_loss, t.z_loss = t.load + load, t.dropped + dropped, t.aux_loss + aux, t.z_loss + z
        t.micro_batches += 1
        if self.expert_bias is not None:
            before = self._load_since_bias_update
            self._load_since_bias_update = load.clone() if before is None else before + load

    @torch.no_grad()
    def update_bias(self) -> None:
        """``expert_bias_i += bias_update_rate * sign(mean(load) - load_i)`` for the load summed since
        the last update, then clear that sum (nothing to do without bias or load)."""
        load = self._load_since_bias_update
        if self.expert_bias is None or load is None:
            return
        load = load.to(self.expert_bias.dtype)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self._load_since_bias_update = None

    def step_metrics(self) -> dict[str, float]:
        """The statistics summed since the last call (see `moe_metrics`), then cleared."""
        t, self._totals = self._totals, None
        if t is None:
            return {}
        load = t.load.double()
        return {"load_max_over_mean": (load.max() / load.mean().clamp(min=1e-12)).item(),
                "dropped_fraction": (t.dropped / t.load.sum().clamp(min=1)).item(),
                "aux_loss": t.aux_loss.item() / t.micro_batches,
                "z_loss": t.z_loss.item() / t.micro_batches}

    # --- counts --------------------------------------------------------------------------------

    @classmethod
    def _expert_params(cls, cfg: ModelConfig) -> int:
        return 3 * cfg.dim * cfg.expert_hidden

    @classmethod
    def _router_and_shared_params(cls, cfg: ModelConfig) -> int:
        shared = SwiGLU.num_params(cls._shared_cfg(cfg)) if cfg.moe.num_shared_experts else 0
        return cfg.dim * cfg.moe.num_experts + shared

    @classmethod
    def num_params(cls, cfg: ModelConfig) -> int:
        """Router (dim x E), every expert and the shared experts."""
        return cls._router_and_shared_params(cfg) + cfg.moe.num_experts * cls._expert_params(cfg)

    @classmethod
    def active_params(cls, cfg: ModelConfig) -> int:
        """What one token goes through: the router, top_k experts and the shared experts."""
        return cls._router_and_shared_params(cfg) + cfg.moe.top_k * cls._expert_params(cfg)

    @classmethod
    def expert_params(cls, cfg: ModelConfig) -> int:
        """The routed experts, which expert parallelism splits over its ranks."""
        return cfg.moe.num_experts * cls._expert_params(cfg)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward matmul FLOPs of the active parameters: 2 per router, expert and shared weight a
        token uses (capacity mode does at most this; weighting and sums are element-wise)."""
        return 2 * cls.active_params(cfg)

    @classmethod
    def activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """Saved for backward per token, dropless, with `grouped_mm` (float32, bfloat16); exact
        up to per-call constants for a model in dtype_bytes, and for float32 under bf16 autocast
        but for the shared experts, whose two projections then each keep a bf16 copy of x:

        - the router's input, x in float32 (x itself for float32 input): 4 * dim bytes, and x in
          its own dtype too if the shared experts save it (bfloat16);
        - per assignment (top_k of them): the expert's SwiGLU saves, dim + 4 * hidden values as
          in `SwiGLU` (its input is the gathered row), its output (saved by the weighting in
          combine, dim values) and weight (one value), and two int64 indices (the row's token,
          for the gather and the scatter-add, and its assignment, for the weight);
        - the router, in float32: logits and scores (E values each), logsumexp's result for the
          z-loss, the top-k weights and their sum when renormalised, the scores' sum for the
          sigmoid router's balance loss, and the top-k indices (int64);
        - the shared experts' 4 * shared width values.

        Left out: per-call constants (the f_i of the balance loss, the group offsets, copies of
        the weights in the compute dtype). Capacity mode adds a boolean mask (top_k bytes) and
        saves less for each dropped assignment, so this count bounds it. The padded `torch.bmm`
        fallback (float64, unaligned widths) saves more: its padded tensors.
        """
        moe = cfg.moe
        k, hidden, router_bytes = moe.top_k, cfg.expert_hidden, max(4, dtype_bytes)
        x = router_bytes * cfg.dim + (dtype_bytes * cfg.dim if moe.num_shared_experts and dtype_bytes < 4 else 0)
        per_assignment = dtype_bytes * (2 * cfg.dim + 4 * hidden + 1) + 2 * 8
        router_values = 2 * moe.num_experts + 1 + (k + 1 if moe.renormalize else 0) + (moe.router == "sigmoid")
        router = router_bytes * router_values + 8 * k
        shared = dtype_bytes * 4 * moe.num_shared_experts * hidden
        capacity_mask = k if moe.mode == "capacity" else 0
        return x + k * per_assignment + router + shared + capacity_mask

    @classmethod
    def tp_replicated_activation_bytes_per_token(cls, cfg: ModelConfig, seq_len: int, dtype_bytes: int) -> int:
        """All but the experts' hidden activations (4 * hidden per assignment and per shared
        expert), which tensor parallelism splits by expert width: the router's tensors, and per
        assignment the gathered input row, the all-reduced output, the weight and the indices."""
        moe, hidden = cfg.moe, cfg.expert_hidden
        sharded = dtype_bytes * 4 * hidden * (moe.top_k + moe.num_shared_experts)
        return cls.activation_bytes_per_token(cfg, seq_len, dtype_bytes) - sharded


# --- the training loop's handles ---------------------------------------------------------------

def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every `MoE` in `model` by name: ``layer3`` for the ffn of ``layers.3``, else its module name
    (``ffn`` for a bare layer)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            index = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            found[f"layer{index.group(1)}" if index else (name or "ffn")] = module
    return found


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient every MoE layer gives its auxiliary losses: 1 / micro-batches per step."""
    for layer in moe_layers(model).values():
        layer.aux_loss_scale = scale


def update_expert_biases(model: nn.Module) -> None:
    """After an optimizer step: aux-loss-free bias update of every MoE layer that has one."""
    for layer in moe_layers(model).values():
        layer.update_bias()


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer, over the training micro-batches since the last call (then cleared):
    ``moe/layerN/load_max_over_mean`` (global top-k selections per expert, max over mean: 1 is
    perfect balance), ``dropped_fraction`` (of all assignments, by capacity), ``aux_loss`` (the
    balance term E * sum f_i P_i, 1 at perfect balance) and ``z_loss`` (mean squared logsumexp),
    the last two averaged over micro-batches and without their coefficients."""
    return {f"moe/{name}/{key}": value for name, layer in moe_layers(model).items()
            for key, value in layer.step_metrics().items()}
