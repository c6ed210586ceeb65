"""Per-layer and whole-model counts: parameters, forward FLOPs and activation bytes per token.

Every number comes from the layer types' classmethods (through `Block`) plus the embedding,
the output head and the final norm; the cost model and the scaling-law module read these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stratagem.model.config import ModelConfig
from stratagem.model.norms import RMSNorm
from stratagem.model.transformer import Block


@dataclass
class LayerCounts:
    index: int
    mixer: str
    ffn: str
    params: int
    active_params: int  # used by one token: a mixture of experts counts only top_k experts
    flops_per_token: int  # forward matmul FLOPs
    activation_bytes_per_token: int  # saved for backward in training, no checkpointing
    tp_replicated_activation_bytes_per_token: int  # the part of it tensor parallelism does not divide
    expert_params: int  # what expert parallelism splits over its ranks
    input_bytes_per_token: int  # the layer's input: all a checkpointed layer keeps for backward


@dataclass
class ModelCounts:
    layers: list[LayerCounts]
    embedding_params: int
    head_params: int  # 0 when the head is tied to the embedding
    final_norm_params: int
    total_params: int
    active_params: int  # what one token uses: total_params less the experts it is not routed to
    non_embedding_params: int  # total minus the embedding and an untied head
    head_activation_bytes_per_token: int  # the final norm, the head's input and the loss's float32 log-softmax
    forward_flops_per_token: int  # all layers plus the output head
    train_flops_per_token: int  # 3 * forward: the backward costs about twice the forward

    def summary(self) -> dict:
        """The whole-model figures (no per-layer rows): what a run directory records for scaling fits."""
        return {k: v for k, v in asdict(self).items() if k != "layers"}

    def table(self) -> str:
        """A per-layer table followed by the totals, in human units."""
        header = ("layer", "mixer", "ffn", "params", "fwd FLOP/token", "act/token")
        rows = [(str(c.index), c.mixer, c.ffn, human_count(c.params), human_flops(c.flops_per_token),
                 human_bytes(c.activation_bytes_per_token)) for c in self.layers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in
                           enumerate(zip(row, widths))) for row in [header, *rows]]
        lines.insert(1, "-" * len(lines[0]))
        act = sum(c.activation_bytes_per_token for c in self.layers)
        active = (f"{human_count(self.active_params)} active per token, "
                  if self.active_params != self.total_params else "")
        lines += [
            "",
            f"parameters      {human_count(self.total_params)} total, "
            f"{active}{human_count(self.non_embedding_params)} non-embedding "
            f"(embedding {human_count(self.embedding_params)}, head {human_count(self.head_params)}"
            f"{' (tied)' if self.head_params == 0 else ''}, final norm {human_count(self.final_norm_params)})",
            f"FLOP per token  {human_flops(self.forward_flops_per_token)} forward, "
            f"{human_flops(self.train_flops_per_token)} train",
            f"activations     {human_bytes(act)} per token over all layers",
        ]
        return "\n".join(lines)


def count_model(cfg: ModelConfig, seq_len: int, dtype_bytes: int = 4) -> ModelCounts:
    """Counts for `cfg` trained on sequences of `seq_len` tokens with activations of `dtype_bytes`."""
    cfg.validate()
    layers = [LayerCounts(index=i, mixer=spec.mixer, ffn=spec.ffn,
                          params=Block.num_params(cfg, spec), active_params=Block.active_params(cfg, spec),
                          flops_per_token=Block.flops_per_token(cfg, spec, seq_len),
                          activation_bytes_per_token=Block.activation_bytes_per_token(cfg, spec, seq_len, dtype_bytes),
                          tp_replicated_activation_bytes_per_token=Block.tp_replicated_activation_bytes_per_token(
                              cfg, spec, seq_len, dtype_bytes),
                          expert_params=Block.expert_params(cfg, spec), input_bytes_per_token=dtype_bytes * cfg.dim)
              for i, spec in enumerate(cfg.layer_specs())]
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.dim * cfg.vocab_size
    final_norm = RMSNorm.num_params(cfg.dim)
    total = sum(c.params for c in layers) + embedding + head + final_norm
    active = sum(c.active_params for c in layers) + embedding + head + final_norm
    forward = sum(c.flops_per_token for c in layers) + 2 * cfg.dim * cfg.vocab_size
    head_activations = RMSNorm.activation_bytes_per_token(cfg.dim, dtype_bytes) + dtype_bytes * cfg.dim + 4 * cfg.vocab_size
    return ModelCounts(layers=layers, embedding_params=embedding, head_params=head,
                       final_norm_params=final_norm, total_params=total, active_params=active,
                       non_embedding_params=total - embedding - head,
                       head_activation_bytes_per_token=head_activations,
                       forward_flops_per_token=forward, train_flops_per_token=3 * forward)


def _scaled(n: float, base: int, prefixes: tuple[str, ...]) -> tuple[str, str]:
    i = 0
    while abs(n) >= base and i < len(prefixes) - 1:
        n, i = n / base, i + 1
    return (f"{n:.0f}" if i == 0 else f"{n:.3g}"), prefixes[i]


def human_count(n: int) -> str:
    """1235814400 -> '1.24B'."""
    value, prefix = _scaled(n, 1000, ("", "K", "M", "B", "T"))
    return value + prefix


def human_flops(n: int) -> str:
    """3100000000 -> '3.1 GFLOP'."""
    value, prefix = _scaled(n, 1000, ("", "K", "M", "G", "T", "P", "E"))
    return f"{value} {prefix}FLOP"


def human_bytes(n: int) -> str:
    """12288 -> '12 KiB'."""
    value, prefix = _scaled(n, 1024, ("", "Ki", "Mi", "Gi", "Ti"))
    return f"{value} {prefix}B"
