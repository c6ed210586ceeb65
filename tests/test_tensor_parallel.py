"""Tensor parallelism per layer type against one process: every layer type's block at TP 2 and 4,
whole models with the vocabulary sharded (and data parallelism beside), AdamW steps, bad degrees.

One launch of 4 gloo ranks runs every scenario (start-up is most of the cost)."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from stratagem.errors import ConfigValueError
from stratagem.model import Transformer, get_flavor
from stratagem.model.config import ModelConfig, MoEConfig
from stratagem.model.layers import FFNS, MIXERS, LayerSpec
from stratagem.model.transformer import Block
from stratagem.parallel.data_parallel import apply_data_parallel
from stratagem.parallel.mesh import StageMeshes
from stratagem.parallel.plan import TP_SHARDS
from stratagem.parallel.relayout import local_batch
from stratagem.parallel.tensor_parallel import (LAYER_TP, parallelize_block, parallelize_embedding,
                                                parallelize_head)
from tests.distributed import run_ranks
from tests.seeds import describe, fresh_seed

WORLD = 4
BLOCK_TOL = 1e-5
STEP_TOL = 1e-4
MOE = MoEConfig(num_experts=8, top_k=2, expert_hidden=96, num_shared_experts=1)


def block_cfg(tp: int, **changes) -> ModelConfig:
    """tiny (4 heads, 2 KV heads) with short chunks and window, so the kernels' chunked and
    blocked paths run; 4 KV heads for TP 4."""
    cfg = dataclasses.replace(get_flavor("tiny"), chunk_size=8, swa_window=8, moe=MOE, **changes)
    return dataclasses.replace(cfg, n_kv_heads=4) if tp == 4 else cfg


BLOCK_CASES = [(f"{mixer}+{ffn} tp{tp}", block_cfg(tp), LayerSpec(mixer, ffn), tp)
               for tp in (2, 4) for mixer, ffn in [("attention", "mlp"), ("swa", "mlp"), ("gla", "mlp"),
                                                   ("deltanet", "mlp"), ("gated_deltanet", "mlp"),
                                                   ("attention", "moe")]]
BLOCK_CASES.append(("peri gated_deltanet+moe tp2", block_cfg(2, norm="peri"), LayerSpec("gated_deltanet", "moe"), 2))

# name: (model, data-parallel kind beside TP 2)
MODEL_CASES = {"tiny ddp": (get_flavor("tiny"), "ddp"), "tiny-hybrid fsdp": (get_flavor("tiny-hybrid"), "fsdp"),
               "tiny tied zero2": (dataclasses.replace(get_flavor("tiny"), tie_embeddings=True), "zero2")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of `a` against `b`; DTensors gathered first."""
    a, b = (t.full_tensor() if isinstance(t, DTensor) else t for t in (a, b))
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def worst_grad(model: torch.nn.Module | list, ref: torch.nn.Module) -> float:
    """The largest relative gradient error over `model`'s parameters (or a list of (name, parameter))."""
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    params = dict(ref.named_parameters())
    return max((rel(p.grad, params[name].grad) for name, p in named), default=0.0)


# --- scenarios (run on every rank) -----------------------------------------------------------------

def block_error(cfg: ModelConfig, spec: LayerSpec, meshes: StageMeshes, tp: int, seed: int) -> float:
    """Worst relative error of the output, the input gradient and every parameter gradient. At
    TP 4 the sharded block runs under activation checkpointing (its forward runs twice)."""
    torch.manual_seed(seed)
    ref = Block(cfg, spec)
    ref.init_weights(0.1, 0.1)
    block = copy.deepcopy(ref)
    parallelize_block(block, meshes.layout(tp)["tp"], 0)
    x = torch.randn(2, 24, cfg.dim)
    weight = torch.randn(2, 24, cfg.dim)
    outputs, inputs = [], []
    sharded = partial(checkpoint, block, use_reentrant=False) if tp == 4 else block
    for module in (sharded, ref):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * weight).sum().backward()
        outputs.append(out - x)  # the block's update: the residual alone would match trivially
        inputs.append(xi.grad)
    return max(rel(*outputs), rel(*inputs), worst_grad(block, ref))


def model_errors(cfg: ModelConfig, kind: str, meshes: StageMeshes, tp: int, seed: int) -> dict[str, float]:
    """Every layer, the embedding and the head at `tp`, data-parallel of `kind` over the dp = 4 / tp
    ranks, each taking a slice of the batch (relayout's loss convention: gradients summed over dp):
    loss, gradients, and parameters after 3 AdamW steps, against one process."""
    torch.manual_seed(seed)
    ref = Transformer(cfg)
    model = copy.deepcopy(ref)
    mesh = meshes.layout(tp)
    parallelize_embedding(model, mesh["tp"])
    for i, block in enumerate(model.layers):
        parallelize_block(block, mesh["tp"], i)
    parallelize_head(model, mesh["tp"])
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not plain, f"parameters left out of the tensor-parallel plans: {plain}"
    for module in (*model.layers, model.tok_embeddings, model.output, model):
        if module is not None:
            apply_data_parallel(module, mesh["dp"], kind, gradient_divide_factor=1)
    dp = mesh["dp"].size()
    # Adam's first steps move every element by ~lr whatever its gradient's size, so a gradient
    # element within float32 rounding of zero (summed in another order under TP) would step at
    # random; eps 1e-6 (not 1e-8) bounds the step of such elements.
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1) for m in (model, ref)]
    errors = {}
    for step in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (4, 17))
        losses = []
        for m, batch, share in ((model, local_batch(tokens, mesh), dp), (ref, tokens, 1)):
            logits = m(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / share
            loss.backward()
            losses.append(loss.detach())
        dist.all_reduce(losses[0], group=mesh["dp"].get_group())
        if step == 0:
            errors["loss"], errors["grads"] = rel(*losses), worst_grad(model, ref)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    params = dict(ref.named_parameters())
    errors["params after 3 steps"] = max(rel(p, params[name]) for name, p in model.named_parameters())
    return errors


def bad_degrees(meshes: StageMeshes) -> list[str]:
    """The one-line errors of degrees that do not divide what a layer or the vocabulary shards."""
    cfg = get_flavor("tiny")
    tp4 = meshes.layout(4)["tp"]
    attempts = [
        lambda: parallelize_block(Block(cfg, LayerSpec("attention", "mlp")), tp4, 3),
        lambda: parallelize_block(Block(dataclasses.replace(cfg, ffn_hidden=90), LayerSpec("gla", "mlp")), tp4, 0),
        lambda: parallelize_embedding(Transformer(dataclasses.replace(cfg, vocab_size=254)), tp4),
    ]
    messages = []
    for attempt in attempts:
        try:
            attempt()
        except ConfigValueError as err:
            messages.append(str(err))
    return messages


def scenarios(rank: int, world_size: int, seed: int) -> dict:
    meshes = StageMeshes(world_size, 1, [[1, 2, 4]])
    out = {"bad": bad_degrees(meshes)}
    for i, (name, cfg, spec, tp) in enumerate(BLOCK_CASES):
        out[name] = block_error(cfg, spec, meshes, tp, seed + i)
    for i, (name, (cfg, kind)) in enumerate(MODEL_CASES.items()):
        out[name] = model_errors(cfg, kind, meshes, 2, seed + 100 + i)
    return out


@pytest.fixture(scope="module")
def results():
    seed = fresh_seed(0)
    return run_ranks(WORLD, scenarios, seed, timeout=300), describe(seed)


# --- tests -----------------------------------------------------------------------------------------

def test_registry_matches_plan_shards():
    """Every layer type the plan lets tensor parallelism shard has a rule, and no other; each rule
    checks exactly the config fields the plan names."""
    assert set(LAYER_TP) == set(TP_SHARDS)
    cfg = dataclasses.replace(get_flavor("tiny"), moe=MOE)
    for kind, rule in LAYER_TP.items():
        module = (MIXERS.get(kind) or FFNS[kind])(cfg)
        expected = {name: getattr(cfg, name) for name in TP_SHARDS[kind]}
        assert rule.sharded(module) == expected, kind


@pytest.mark.parametrize("name", [case[0] for case in BLOCK_CASES])
def test_block_matches_one_process(results, name):
    """Output, input gradient and every parameter gradient (gathered) of a TP block equal the
    single-device block's, relative 1e-5 in float32, on every rank."""
    ranks, seed = results
    errors = [r[name] for r in ranks]
    assert max(errors) < BLOCK_TOL, f"{name}: relative errors by rank {errors}; {seed}"


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_matches_one_process(results, name):
    """Every layer, the embedding and the head at TP 2 beside dp 2 (ddp, zero2 or fsdp): the loss
    and every gradient equal one process on the whole batch, and so do the parameters after 3
    AdamW steps."""
    ranks, seed = results
    for r, errors in enumerate(r[name] for r in ranks):
        assert errors["loss"] < BLOCK_TOL and errors["grads"] < BLOCK_TOL, f"{name} rank {r}: {errors}; {seed}"
        assert errors["params after 3 steps"] < STEP_TOL, f"{name} rank {r}: {errors}; {seed}"


def test_bad_degree_is_one_line_naming_the_layer(results):
    ranks, _ = results
    assert ranks[0]["bad"] == [
        "layers[3].tp = 4: does not divide n_kv_heads = 2 of layer 3 (attention)",
        "layers[0].tp = 4: does not divide ffn_hidden = 90 of layer 0 (mlp)",
        "embedding.tp = 4: does not divide vocab_size = 254 of the embedding",
    ]
