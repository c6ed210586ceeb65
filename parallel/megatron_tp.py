"""Tensor parallelism with megatron-core's layers: what a plan's ``tp_impl = "megatron"`` runs.

`parallelize_block_megatron` shards a single-device `Block` as `parallel.tensor_parallel.
parallelize_block` does, for the layer types of `parallel.plan.MEGATRON_TP`, with megatron-core's
`ColumnParallelLinear` for attention's wq, wk, wv (by heads, KV heads alongside) and the MLP's
w1, w3 (by width), and `RowParallelLinear` for wo and w2 (one all-reduce in forward). The block's
input and output stay plain tensors replicated over tp, so megatron and DTensor layers, and
layers of other degrees, compose in one plan; the embedding and the head stay the DTensor path's
(`parallelize_embedding`, `parallelize_head`). Everything around megatron's layers is the DTensor
path's too:

- Process groups. megatron-core 0.16's layers take their tensor-parallel group (``tp_group``):
  each gets its layer's tp mesh's group (`parallel.mesh`), so megatron's groups are the plan's.
  `megatron.core.parallel_state` is not initialised: its groups are global, one tp size for the
  whole model, where a plan gives each layer its own.
- Parameters. Every rank holds the full model (same seed). A megatron layer's weight becomes a
  DTensor on the tp mesh, sliced from the full weight as the DTensor path slices it (Shard(0)
  column-wise, Shard(1) row-wise), and megatron computes with its local tensor, this rank's shard
  (`LocalParams`). As megatron builds them, its layers hold plain tensors of the shard's shape:
  FSDP2 would take each shard for a whole weight, gradient clipping would see only this rank's
  shard of each (a different norm on every tp rank), and every tp rank would write its own shard
  under the same checkpoint key. As DTensors they are what the DTensor path's are: FSDP2 shards
  them over dp on top of tp, `parallel.grad_norm` reduces their norm over the shards (each weight
  counted once), and DCP stores them under the full model's names with the full shapes, so a
  checkpoint moves between megatron plans, DTensor plans and one process. The norms are
  replicated DTensors, as there.
- One input-gradient all-reduce per sublayer. The column layers are built with
  ``disable_grad_reduce`` and the sublayer's input gradient is summed over tp once
  (`SummedInputGrad`), not once per column layer: megatron gets that by fusing Q, K, V (and the
  MLP's gate and up projections) into one layer, which would change the parameter names.
- The model stays single-device code. Megatron's layers return ``(output, bias)``: a forward hook
  keeps the output, so the mixers call them as they call `nn.Linear`. They sit where the
  `nn.Linear`s sat, under the same names (``mixer.wq.weight``), and their empty ``_extra_state``
  entries are left out of the state dict, so checkpoint keys are the full model's.

Layer types and sizes are checked by `parallel.plan.check_plan` (the runtime checks every plan
before it lays out a layer): tp divides the heads, the KV heads and ffn_hidden, and the layer's
mixer and feed-forward are in `MEGATRON_TP`.

Not supported:

- Sequence parallelism. Megatron's layers shard activations along their first dimension, the
  sequence of its [T, B, dim] layout, where this model's are [B, T, dim]; a block's input and
  output are replicated over tp by contract (relayout between layouts), so only the norms and
  residual adds inside a block could run on sequence shards, at one all-gather per column layer
  (five per block, not megatron's two). And megatron-core 0.16's sequence-parallel backward
  allocates its reduce-scatter buffer on ``torch.cuda.current_device()``: it cannot run on CPU.
- Generation: like the DTensor path, training only (``Attention.init_cache`` reads
  ``wk.out_features``, which megatron's layers do not have).

megatron-core is imported on first use: importing it takes ~4 s beyond torch.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from stratagem.model.transformer import Block
from stratagem.parallel.tensor_parallel import LocalParams, SummedInputGrad

# Per layer type (`parallel.plan.MEGATRON_TP`): its column-wise projections and its row-wise one.
MEGATRON_LINEARS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention": (("wq", "wk", "wv"), "wo"),
    "swa": (("wq", "wk", "wv"), "wo"),
    "mlp": (("w1", "w3"), "w2"),
}


def parallelize_block_megatron(block: Block, mesh: DeviceMesh) -> None:
    """Shard `block` (a single-device `Block` of MEGATRON_TP types) over the 1-D tp `mesh` in place,
    its projections replaced by megatron-core's tensor-parallel layers."""
    for kind, sublayer in ((block.spec.mixer, block.mixer), (block.spec.ffn, block.ffn)):
        columns, row = MEGATRON_LINEARS[kind]
        parallelize_module(sublayer, mesh, SummedInputGrad())
        for name in columns:
            setattr(sublayer, name, _megatron_linear(getattr(sublayer, name), mesh, column=True))
        setattr(sublayer, row, _megatron_linear(getattr(sublayer, row), mesh, column=False))
    for norm in (block.mixer_norm, block.ffn_norm, block.mixer_out_norm, block.ffn_out_norm):
        if norm is not None:
            parallelize_module(norm, mesh, LocalParams({"weight": Replicate()}))


def _megatron_linear(linear: nn.Linear, mesh: DeviceMesh, *, column: bool) -> nn.Module:
    """A megatron-core ColumnParallelLinear (`column`) or RowParallelLinear computing the bias-free
    `linear` with this rank's shard of its weight, called like `linear`. The column layer's output
    and the row layer's input are this rank's heads (or width); the column layer's input gradient
    is this rank's term of a sum over tp, which the caller takes."""
    with warnings.catch_warnings():  # about megatron's optimizers and fused kernels, unused here
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    # The weight megatron allocates is replaced: no initialisation, and on the CPU (its GPU path
    # allocates on CUDA and draws from megatron's CUDA RNG tracker).
    config = ModelParallelConfig(tensor_model_parallel_size=mesh.size(), use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=linear.weight.dtype)
    sizes, group = (linear.in_features, linear.out_features), mesh.get_group()
    if column:
        layer = ColumnParallelLinear(*sizes, config=config, init_method=None, bias=False, disable_grad_reduce=True,
                                     tp_group=group)
    else:
        layer = RowParallelLinear(*sizes, config=config, init_method=None, bias=False, input_is_parallel=True,
                                  skip_bias_add=False, tp_group=group)
    layer.weight = linear.weight  # the full weight: LocalParams keeps this rank's slice
    parallelize_module(layer, mesh, LocalParams({"weight": Shard(0 if column else 1)}))
    layer.register_forward_hook(lambda _layer, _args, output: output[0])
    layer.register_state_dict_post_hook(_drop_extra_state)
    return layer


def _drop_extra_state(_module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """Megatron's layers save an empty ``_extra_state`` (for TransformerEngine); a checkpoint
    without it (any other plan's) then loads, and megatron's load hook fills it in."""
    state_dict.pop(f"{prefix}_extra_state", None)
