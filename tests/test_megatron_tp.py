"""megatron-core tensor parallelism (`parallel.megatron_tp`, plan ``tp_impl = "megatron"``) against
DTensor tensor parallelism and one process.

One launch of 4 gloo ranks runs every case (start-up is most of the cost):

- blocks (attention, swa and peri-norm attention, each with mlp) at TP 2 and 4, TP 4 under
  activation checkpointing: output, input gradient and every parameter gradient equal the DTensor
  block's and the single-device block's (relative 1e-5, float32);
- training: 3 AdamW steps with clipping under megatron plans (tp x dp kinds, checkpointing, a
  megatron layer beside a tp-1 layer, a pipeline) equal one process (tests/test_runtime.py's comparison);
- checkpoints: one process's checkpoint (model and optimizer) loads exactly under a megatron plan,
  which then evaluates like one process (megatron's no-grad path), and that plan's checkpoint loads
  exactly on one process, with the one process's keys and shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from stratagem.model.config import ModelConfig
from stratagem.model.layers import LayerSpec
from stratagem.model.transformer import Block
from stratagem.parallel.megatron_tp import MEGATRON_LINEARS, parallelize_block_megatron
from stratagem.parallel.mesh import StageMeshes
from stratagem.parallel.plan import MEGATRON_TP, Plan, check_plan
from stratagem.parallel.runtime import parallelize
from stratagem.parallel.tensor_parallel import parallelize_block
from stratagem.train.checkpoint import Checkpointer, TrainState
from stratagem.train.engine import loss_fn
from stratagem.train.optim import build_optimizer
from tests.distributed import run_ranks
from tests.seeds import describe, fresh_seed
from tests.test_pipeline import assert_matches, seeded_model
from tests.test_runtime import MODELS, OPTIMIZER, SEED, _full, _named, layer, plan_of, reference, step_batches, trained
from tests.test_tensor_parallel import BLOCK_TOL, block_cfg, rel, worst_grad

WORLD = 4
BLOCK_SEED = fresh_seed(1)
BLOCK_CASES = [(f"{mixer}+mlp tp{tp}", block_cfg(tp), LayerSpec(mixer, "mlp"), tp)
               for tp in (2, 4) for mixer in ("attention", "swa")]
BLOCK_CASES.append(("peri attention+mlp tp2", block_cfg(2, norm="peri"), LayerSpec("attention", "mlp"), 2))
CHECKPOINTED = "tiny"  # the model of the checkpoint round trip


def megatron_plan(name: str, **kwargs) -> Plan:
    """tests/test_runtime.py's plan on 4 ranks with megatron-core's layers, checked as the launcher checks."""
    plan = dataclasses.replace(plan_of(name, WORLD, **kwargs), tp_impl="megatron")
    check_plan(plan, MODELS[name], world=WORLD)
    return plan


TRAIN_CASES = {
    "tp2-dp2-fsdp": ("tiny", megatron_plan("tiny", tp=2, dp="fsdp")),
    "tp4-checkpointed": ("tiny-kv4", megatron_plan("tiny-kv4", tp=4, checkpoint="full")),
    "tp2-zero2-beside-tp1-ddp": ("tiny", megatron_plan("tiny", layers=[layer(tp=2, dp="zero2"), layer(dp="ddp")])),
    "pp2-tp2-1f1b": ("tiny", megatron_plan("tiny", tp=2, pp=2, schedule="1f1b")),
}
CHECKPOINT_PLAN = megatron_plan(CHECKPOINTED, tp=2, dp="fsdp")


# --- scenarios (run on every rank) -----------------------------------------------------------------

def block_errors(cfg: ModelConfig, spec: LayerSpec, meshes: StageMeshes, tp: int, seed: int) -> dict:
    """The megatron block's worst relative error (output, input gradient, parameter gradients)
    against the DTensor block and against one process; and what it is made of."""
    torch.manual_seed(seed)
    ref = Block(cfg, spec)
    ref.init_weights(0.1, 0.1)
    mesh = meshes.layout(tp)["tp"]
    megatron, dtensor = copy.deepcopy(ref), copy.deepcopy(ref)
    parallelize_block_megatron(megatron, mesh)
    parallelize_block(dtensor, mesh, 0)
    x, weight = torch.randn(2, 24, cfg.dim), torch.randn(2, 24, cfg.dim)
    results = {}
    for name, block in (("megatron", megatron), ("dtensor", dtensor), ("one process", ref)):
        module = partial(checkpoint, block, use_reentrant=False) if tp == 4 and block is not ref else block
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * weight).sum().backward()
        results[name] = (out - x, xi.grad)  # the block's update: the residual alone would match trivially
    errors = {other: max(rel(results["megatron"][0], results[other][0]), rel(results["megatron"][1], results[other][1]),
                         worst_grad(megatron, against))
              for other, against in (("dtensor", dtensor), ("one process", ref))}
    linears = [getattr(sublayer, name) for sublayer, kind in ((megatron.mixer, spec.mixer), (megatron.ffn, spec.ffn))
               for name in (*MEGATRON_LINEARS[kind][0], MEGATRON_LINEARS[kind][1])]
    return {**errors, "layers": sorted({type(linear).__name__ for linear in linears}),
            "own groups": all(linear.tp_group is mesh.get_group() for linear in linears),
            "plain": [name for name, p in megatron.named_parameters() if not isinstance(p, DTensor)]}


def full_state(named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> dict:
    """Every parameter and its AdamW state by the full model's names, gathered."""
    return {name: [_full(p), *(_full(optimizer.state[p][key]) for key in ("exp_avg", "exp_avg_sq"))]
            for name, p in named}


def held_out(seed: int) -> list[torch.Tensor]:
    return step_batches(MODELS[CHECKPOINTED].vocab_size, seed)[1]


def checkpoint_round_trip(seed: int, folder: str) -> dict:
    """Load the one-process checkpoint under the megatron plan (into a model of another seed),
    evaluate, save it again; the state after loading and the evaluation loss."""
    parallel = parallelize(seeded_model(MODELS[CHECKPOINTED], seed + 1), CHECKPOINT_PLAN)
    optimizer = build_optimizer(parallel.state_module, OPTIMIZER)
    Checkpointer(Path(folder) / "one").load(Path(folder) / "one" / "step-1", parallel.state_module, optimizer,
                                            TrainState(0, {}, {}))
    Checkpointer(Path(folder) / "megatron").save(1, parallel.state_module, optimizer, TrainState(1, {}, {}),
                                                 {"model": {}})
    return {"state": full_state(_named(parallel), optimizer), "eval": parallel.evaluate(held_out(seed))}


def scenarios(rank: int, world_size: int, train_seed: int, block_seed: int, folder: str) -> dict:
    meshes = StageMeshes(world_size, 1, [[2, 4]])
    out = {name: block_errors(cfg, spec, meshes, tp, block_seed + i)
           for i, (name, cfg, spec, tp) in enumerate(BLOCK_CASES)}
    out.update({name: trained(rank, plan, model, train_seed) for name, (model, plan) in TRAIN_CASES.items()})
    out["checkpoint"] = checkpoint_round_trip(train_seed, folder)
    return out


# --- one process ---------------------------------------------------------------------------------

def one_process_step(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The checkpointed model after one AdamW step (so that the optimizer has state)."""
    model = seeded_model(MODELS[CHECKPOINTED], seed)
    optimizer = build_optimizer(model, OPTIMIZER)
    loss_fn(model, step_batches(MODELS[CHECKPOINTED].vocab_size, seed)[0][0]).backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("megatron-checkpoints")
    model, optimizer = one_process_step(SEED)
    Checkpointer(folder / "one").save(1, model, optimizer, TrainState(1, {}, {}), {"model": {}})
    ranks = run_ranks(WORLD, scenarios, SEED, BLOCK_SEED, str(folder), timeout=300)
    with torch.no_grad():
        evaluation = sum(loss_fn(model, tokens).item() for tokens in held_out(SEED)) / len(held_out(SEED))
    return ranks, folder, {"state": full_state(list(model.named_parameters()), optimizer), "eval": evaluation}


# --- tests -----------------------------------------------------------------------------------------

def test_megatron_layers_cover_the_plans_megatron_types():
    """check_plan admits tp_impl "megatron" for exactly the layer types the module shards."""
    assert set(MEGATRON_LINEARS) == set(MEGATRON_TP)


@pytest.mark.parametrize("name", [case[0] for case in BLOCK_CASES])
def test_block_matches_dtensor_and_one_process(results, name):
    """On every rank: the projections are megatron-core's, on the tp mesh's process group; every
    parameter is a DTensor; output and gradients equal the DTensor block's and one process's."""
    ranks, _, _ = results
    for r, case in enumerate(rank[name] for rank in ranks):
        assert case["layers"] == ["ColumnParallelLinear", "RowParallelLinear"] and case["own groups"], (name, r)
        assert not case["plain"], f"{name} rank {r}: parameters left plain: {case['plain']}"
        assert max(case["dtensor"], case["one process"]) < BLOCK_TOL, f"{name} rank {r}: {case}; {describe(BLOCK_SEED)}"


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_megatron_plan_trains_like_one_process(results, case):
    """Losses, gradient norms (each sharded weight counted once), first-step gradients and the
    parameters after 3 steps equal one process's (tests/test_runtime.py's tolerance, 1e-4)."""
    ranks, _, _ = results
    assert_matches([rank[case] for rank in ranks], reference(TRAIN_CASES[case][0]), f"{case}, {describe(SEED)}")


def test_a_checkpoint_moves_between_one_process_and_a_megatron_plan(results):
    """One process's checkpoint loads under the megatron plan, which evaluates it like one process;
    the plan's checkpoint holds the same keys and shapes and loads on one process: parameters and
    AdamW state exactly the saved ones."""
    ranks, folder, one = results
    saved = one["state"]
    for r, rank in enumerate(ranks):
        loaded = rank["checkpoint"]["state"]
        for name, tensors in saved.items():
            assert all(torch.equal(a, b) for a, b in zip(loaded[name], tensors)), f"rank {r}: {name}"
        assert rank["checkpoint"]["eval"] == pytest.approx(one["eval"], rel=BLOCK_TOL), f"rank {r}; {describe(SEED)}"
    model, optimizer = one_process_step(SEED + 1)
    Checkpointer(folder / "megatron").load(folder / "megatron" / "step-1", model, optimizer, TrainState(0, {}, {}))
    loaded = full_state(list(model.named_parameters()), optimizer)
    assert all(torch.equal(a, b) for name in saved for a, b in zip(loaded[name], saved[name]))
    layouts = [{key: getattr(meta, "size", None) for key, meta in
                dcp.FileSystemReader(str(folder / run / "step-1")).read_metadata().state_dict_metadata.items()}
               for run in ("one", "megatron")]
    assert layouts[0] == layouts[1]
