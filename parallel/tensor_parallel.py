"""Tensor parallelism per layer type: DTensor plans that shard a single-device `Block` in place.

A layer of tensor degree t runs on the 1-D "tp" mesh of its (dp, tp) layout (`parallel.mesh`).
Its input and output are plain tensors replicated over the tp group, so layers of different
layouts compose (`parallel.relayout` moves the batch rows between them). Inside, the usual
Megatron split, written with torch's DTensor styles:

- a sublayer's input enters once as a replicated DTensor (`PrepareModuleInput`); the column-wise
  projections read it and hand on their local, head- or width-sharded outputs, so everything up
  to the row-wise output projection runs on plain local tensors, and the sublayer's input
  gradient is summed over tp once (not once per projection);
- the output projection is row-wise: one all-reduce in forward, none in backward.

Per layer type (`LAYER_TP`, keyed like `parallel.plan.TP_SHARDS`, which names what t divides):

- attention, swa: wq, wk, wv column-wise by heads, KV heads alongside (each rank keeps whole
  GQA groups), wo row-wise. The mixers infer their head counts from the projections' widths.
- gla, deltanet, gated_deltanet: wq, wk, wv, wgate column-wise by heads; the short convs by
  channel (a depthwise conv's channels are the heads' channels); the gates by head (GLA's
  wdecay_up column-wise after its replicated rank-16 wdecay_down; DeltaNet's wbeta and wdecay
  column-wise, A_log and dt_bias sharded); the per-head output norm replicated with its weight
  gradient summed over tp (each rank normalises its own heads); wo row-wise.
- mlp: w1, w3 column-wise, w2 row-wise.
- moe: the router replicated (every tp rank routes the same replicated tokens identically), each
  expert sharded along its width (w1, w3 [E, dim, h] on dim 2, w2 [E, h, dim] on dim 1): the
  experts' output is a partial sum, all-reduced before the weighted combine (top_k rows per
  token, not one: the price of leaving router and dispatcher untouched) so that the routing
  weights' gradient is whole; shared experts like mlp. The experts are whatever `GroupedExperts`
  holds, so expert parallelism (which keeps E / ep of them) is applied first.

All parameters of a sharded block become DTensors on the tp mesh, replicated ones included
(norms, router), so that data parallelism and checkpoints see one kind of parameter. Parameters
that DTensor's operators cannot take (a depthwise conv sharded by channel, grouped expert
matmuls, the element-wise gate and norm weights) are used through their local tensors during
the forward of the module that reads them (`LocalParams`); data parallelism must wrap the
block, not those modules.

The embedding is sharded row-wise over the vocabulary (one all-reduce); the head column-wise
over the vocabulary with its logits gathered, so the loss function and the pipeline's loss see
plain [B, T, vocab] logits. `loss_parallel` would save that gather and the full softmax; it needs
the loss and its backward under one context, which the runtime does not give yet.

Training only: a sharded mixer's `init_cache` still sizes generation caches for all its heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               PrepareModuleOutput, RowwiseParallel, parallelize_module)

from stratagem.errors import ConfigValueError
from stratagem.model.transformer import Block, Transformer


def sum_grad(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward sums the gradient over `mesh` (Megatron's "copy to the
    tensor-parallel region"). For a replicated tensor a rank uses with its shard only: each
    rank's gradient of it is then a partial sum."""
    return DTensor.from_local(x, mesh, [Replicate()]).to_local(grad_placements=[Partial()])


class LocalParams(ParallelStyle):
    """Distribute some parameters of a module as DTensors and run the module's forward on their
    local tensors.

    `placements` maps parameter names (dotted for a submodule's, e.g. ``router.weight``, when the
    module reads it directly) to their placement; names in `summed` get their gradient summed
    over the mesh (`sum_grad`): replicated weights applied to this rank's shard only. The local
    tensors are views of the DTensors, so gradients reach the DTensor parameters, sharded like
    them; the parameters are swapped back after the forward, even if it raises.
    """

    def __init__(self, placements: dict[str, Placement], summed: tuple[str, ...] = ()):
        super().__init__()
        self.placements, self.summed = placements, summed

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        owners = {name: _owner(module, name) for name in self.placements}
        for name, placement in self.placements.items():
            owner, leaf = owners[name]
            param = distribute_tensor(getattr(owner, leaf), device_mesh, [placement], src_data_rank=self.src_data_rank)
            owner.register_parameter(leaf, nn.Parameter(param))
        swapped: dict[str, nn.Parameter] = {}

        def use_local(_module, _args):
            for name, (owner, leaf) in owners.items():
                swapped[name] = param = owner._parameters[leaf]
                local = param.to_local()
                owner._parameters[leaf] = sum_grad(local, device_mesh) if name in self.summed else local

        def restore(_module, _args, _output):
            for name, param in swapped.items():
                owner, leaf = owners[name]
                owner._parameters[leaf] = param
            swapped.clear()

        module.register_forward_pre_hook(use_local)
        module.register_forward_hook(restore, always_call=True)
        return module


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return module.get_submodule(path), leaf


class SummedInputGrad(ParallelStyle):
    """The module's first input is replicated, the module computes with its shard: sum the input's
    gradient over the mesh (`sum_grad`)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(lambda _module, args: (sum_grad(args[0], device_mesh), *args[1:]))
        return module


def _replicated_input(module: nn.Module, mesh: DeviceMesh) -> None:
    """The sublayer's input as one replicated DTensor: its gradients from the column-wise
    projections stay partial DTensors, summed by autograd, and reduced over tp once."""
    parallelize_module(module, mesh, PrepareModuleInput(input_layouts=(Replicate(),),
                                                        desired_input_layouts=(Replicate(),)))


def _replicated(*names: str) -> LocalParams:
    return LocalParams({name: Replicate() for name in names})


# --- per layer type ------------------------------------------------------------------------------

def attention_tp(mixer: nn.Module, mesh: DeviceMesh) -> None:
    _replicated_input(mixer, mesh)
    parallelize_module(mixer, mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
                                     "wo": RowwiseParallel()})


def _linear_attention_tp(mixer: nn.Module, mesh: DeviceMesh, gates: dict[str, ParallelStyle]) -> None:
    """The layer shared by gla, deltanet and gated_deltanet, plus the subclass's gate styles."""
    _replicated_input(mixer, mesh)
    plan = {name: ColwiseParallel() for name in ("wq", "wk", "wv", "wgate")}
    plan.update({name: LocalParams({"weight": Shard(0)}) for name in ("q_conv", "k_conv", "v_conv")
                 if getattr(mixer, name) is not None})
    plan.update(gates, norm=LocalParams({"weight": Replicate()}, summed=("weight",)), wo=RowwiseParallel())
    parallelize_module(mixer, mesh, plan)


def gla_tp(mixer: nn.Module, mesh: DeviceMesh) -> None:
    # wdecay_down is replicated: it reads the replicated input as a local tensor, and its output
    # enters wdecay_up (column-wise), whose input gradient is summed over tp, so its own is whole.
    parallelize_module(mixer.wdecay_down, mesh, PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=True))
    _linear_attention_tp(mixer, mesh, {"wdecay_down": _replicated("weight"), "wdecay_up": ColwiseParallel()})


def deltanet_tp(mixer: nn.Module, mesh: DeviceMesh) -> None:
    gates = {"wbeta": ColwiseParallel()}
    if mixer.gated:
        gates["wdecay"] = ColwiseParallel()
        parallelize_module(mixer, mesh, LocalParams({"A_log": Shard(0), "dt_bias": Shard(0)}))
    _linear_attention_tp(mixer, mesh, gates)


def mlp_tp(ffn: nn.Module, mesh: DeviceMesh) -> None:
    _replicated_input(ffn, mesh)
    parallelize_module(ffn, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})


def moe_tp(ffn: nn.Module, mesh: DeviceMesh) -> None:
    # MoE.route reads router.weight itself, so the MoE module swaps it in.
    parallelize_module(ffn, mesh, _replicated("router.weight"))
    for style in (SummedInputGrad(), LocalParams({"w1": Shard(2), "w3": Shard(2), "w2": Shard(1)}),
                  PrepareModuleOutput(output_layouts=(Partial(),), desired_output_layouts=(Replicate(),))):
        parallelize_module(ffn.experts, mesh, style)
    if ffn.shared_experts is not None:
        mlp_tp(ffn.shared_experts, mesh)


@dataclass(frozen=True)
class LayerTP:
    """How tensor parallelism shards one layer type.

    `sharded` gives the sizes the tp degree must divide, keyed by the `ModelConfig` field that
    sets them (as `parallel.plan.TP_SHARDS` names them), read from the module itself; `apply`
    shards the module in place on a 1-D tp mesh."""

    sharded: Callable[[nn.Module], dict[str, int]]
    apply: Callable[[nn.Module, DeviceMesh], None]


def _heads(mixer: nn.Module) -> dict[str, int]:
    return {"n_heads": mixer.wq.out_features // mixer.head_dim}


def _attention_heads(mixer: nn.Module) -> dict[str, int]:
    return {**_heads(mixer), "n_kv_heads": mixer.wk.out_features // mixer.head_dim}


LAYER_TP: dict[str, LayerTP] = {
    "attention": LayerTP(_attention_heads, attention_tp),
    "swa": LayerTP(_attention_heads, attention_tp),
    "gla": LayerTP(_heads, gla_tp),
    "deltanet": LayerTP(_heads, deltanet_tp),
    "gated_deltanet": LayerTP(_heads, deltanet_tp),
    "mlp": LayerTP(lambda ffn: {"ffn_hidden": ffn.w1.out_features}, mlp_tp),
    "moe": LayerTP(lambda ffn: {"expert_hidden": ffn.experts.w1.shape[2]}, moe_tp),
}


# --- blocks, embedding, head ---------------------------------------------------------------------

def parallelize_block(block: Block, mesh: DeviceMesh, layer: int) -> None:
    """Shard layer `layer` (a single-device `Block`) over the 1-D tp `mesh`; tp 1 leaves it as is.

    Every size is checked before anything changes: a degree that does not divide what the
    layer's types shard raises one `ConfigValueError` line naming the layer.
    """
    tp = mesh.size()
    parts = [(block.spec.mixer, block.mixer), (block.spec.ffn, block.ffn)]
    for kind, module in parts:
        rule = LAYER_TP.get(kind)
        if rule is None and tp > 1:
            raise ConfigValueError(f"layers[{layer}].tp", tp, f"layer {layer} ({kind}) cannot be sharded "
                                                              f"(no tensor-parallel rule for its type); use 1")
        for name, size in (rule.sharded(module) if rule else {}).items():
            if size % tp:
                raise ConfigValueError(f"layers[{layer}].tp", tp, f"does not divide {name} = {size} "
                                                                  f"of layer {layer} ({kind})")
    if tp == 1:
        return
    for kind, module in parts:
        LAYER_TP[kind].apply(module, mesh)
    for norm in (block.mixer_norm, block.ffn_norm, block.mixer_out_norm, block.ffn_out_norm):
        if norm is not None:
            parallelize_module(norm, mesh, _replicated("weight"))


def parallelize_embedding(model: Transformer, mesh: DeviceMesh) -> None:
    """Shard the token embedding over the vocabulary (row-wise): tokens in, replicated [B, T, dim] out."""
    if _check_vocab(model, mesh, "embedding"):
        parallelize_module(model.tok_embeddings, mesh, RowwiseParallel(input_layouts=Replicate(),
                                                                       output_layouts=Replicate()))


def parallelize_head(model: Transformer, mesh: DeviceMesh) -> None:
    """Shard the output head over the vocabulary (column-wise), the final norm replicated; the
    logits come out gathered, a plain [B, T, vocab] tensor.

    A head tied to the embedding is the embedding's (already sharded) weight, applied by
    `Transformer._logits` to the normalised stream: the final norm hands it a replicated
    DTensor, and a hook on the model gathers the vocabulary-sharded logits."""
    if not _check_vocab(model, mesh, "head"):
        return
    parallelize_module(model.norm, mesh, _replicated("weight"))
    if model.output is not None:
        parallelize_module(model.output, mesh, ColwiseParallel(output_layouts=Replicate()))
        return
    weight = model.tok_embeddings.weight
    if not (isinstance(weight, DTensor) and weight.device_mesh == mesh):
        raise ValueError("the head is tied to the embedding: shard the embedding first, on the same mesh")
    parallelize_module(model.norm, mesh, PrepareModuleOutput(output_layouts=(Replicate(),),
                                                             desired_output_layouts=(Replicate(),),
                                                             use_local_output=False))
    model.register_forward_hook(lambda _model, _args, logits: logits.full_tensor())


def _check_vocab(model: Transformer, mesh: DeviceMesh, key: str) -> bool:
    """Whether `key` (embedding or head) is sharded at all; a degree not dividing the vocabulary raises."""
    table = model.output if key == "head" and model.output is not None else model.tok_embeddings
    tp, vocab = mesh.size(), table.weight.shape[0]  # a pipeline's last stage may hold no embedding
    if vocab % tp:
        raise ConfigValueError(f"{key}.tp", tp, f"does not divide vocab_size = {vocab} of the {key}")
    return tp > 1
