"""The plan runtime (`parallel.runtime`): every plan trains like one process.

Each case trains a tiny model 3 AdamW steps (gradient clipping active) under a plan on real gloo
ranks, and compares every rank's losses and gradient norms, and the union of the ranks' first-step
gradients and final parameters, with one process trained as `train.loop` trains (relative 1e-4,
float32). One launch per world size runs all its cases, to share the start-up.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from stratagem.model import get_flavor
from stratagem.model.moe import set_aux_loss_scale
from stratagem.parallel.plan import LayerLayout, Plan, check_plan, uniform_plan
from stratagem.parallel.runtime import parallelize
from stratagem.train.config import TrainConfig
from stratagem.train.engine import loss_fn
from stratagem.train.optim import build_optimizer
from tests.distributed import run_ranks
from tests.test_pipeline import assert_matches, seeded_model
from tests.test_pipeline import step_batches as pipeline_step_batches
from tests.seeds import describe, fresh_seed

MICRO_BATCH, MICRO_BATCHES = 8, 2  # sequences of 16 tokens, 3 steps: tests/test_pipeline.py's
MAX_NORM = 0.5  # below the first steps' gradient norms: clipping is active
SEED = fresh_seed(0)
OPTIMIZER = TrainConfig(lr=1e-3, eps=1e-6)  # default eps lets float32 rounding of ~0 gradients move weights by lr

MODELS = {
    "tiny": get_flavor("tiny"),
    "tiny-kv4": dataclasses.replace(get_flavor("tiny"), n_kv_heads=4),  # TP=4 needs 4 KV heads
    "tiny-hybrid": get_flavor("tiny-hybrid"),
    "tiny-hybrid-kv4": dataclasses.replace(get_flavor("tiny-hybrid"), n_kv_heads=4),
    "tiny-moe": get_flavor("tiny-moe"),
    "tiny-moe-kv4": dataclasses.replace(get_flavor("tiny-moe"), n_kv_heads=4),
}


def plan_of(name: str, world: int, **kwargs) -> Plan:
    layers = kwargs.pop("layers", None)
    plan = uniform_plan(MODELS[name], world, micro_batch_size=MICRO_BATCH, num_micro_batches=MICRO_BATCHES, **kwargs)
    if layers is not None:
        plan.layers = [LayerLayout(**layer) for layer in layers]
    check_plan(plan, MODELS[name], world=world)  # before any process starts, as the launcher does
    return plan


def layer(tp=1, dp="fsdp", checkpoint="none", ep=1) -> dict:
    return {"tp": tp, "dp": dp, "checkpoint": checkpoint, "ep": ep}


def step_batches(vocab_size: int, seed: int) -> list[list[torch.Tensor]]:
    return pipeline_step_batches(vocab_size, seed, MICRO_BATCH, MICRO_BATCHES)


# --- one process: the reference -----------------------------------------------------------------

@functools.cache
def reference(name: str) -> dict:
    cfg = MODELS[name]
    model = seeded_model(cfg, SEED)
    set_aux_loss_scale(model, 1 / MICRO_BATCHES)
    optimizer = build_optimizer(model, OPTIMIZER)
    record = {"losses": [], "norms": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batches in step_batches(cfg.vocab_size, SEED):
            total = 0.0
            for tokens in batches:
                loss = loss_fn(model, tokens)
                (loss / MICRO_BATCHES).backward()
                total += loss.item()
            record["losses"].append(total / MICRO_BATCHES)
            record.setdefault("grads", {n: p.grad.clone() for n, p in model.named_parameters()})
            record["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return record


# --- ranks ---------------------------------------------------------------------------------------

def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    return full.clone()  # a replicated DTensor's full tensor is its local one, which clipping scales later


def _named(parallel) -> list[tuple[str, nn.Parameter]]:
    """Parameter names as the full model's (without the checkpoint wrapper's part)."""
    return [(name.replace("._checkpoint_wrapped_module", ""), p)
            for module in parallel.modules for name, p in module.named_parameters()]


def trained(rank: int, plan: Plan, name: str, seed: int) -> dict:
    cfg = MODELS[name]
    parallel = parallelize(seeded_model(cfg, seed), plan)
    named = _named(parallel)
    optimizer = build_optimizer(nn.ModuleList(parallel.modules), OPTIMIZER)
    record = {"losses": [], "norms": []}
    for batches in step_batches(cfg.vocab_size, seed):
        record["losses"].append(parallel.train_step(batches))
        record.setdefault("grads", {n: _full(p.grad) for n, p in named})
        record["norms"].append(parallel.clip_grad_norm_(MAX_NORM))
        optimizer.step()
        parallel.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    record["params"] = {n: _full(p) for n, p in named}
    return record


def scenarios(rank: int, world: int, cases: dict, seed: int) -> dict:
    return {case: trained(rank, plan, name, seed) for case, (name, plan) in cases.items()}


def model_cases(world: int, stem: str, kv4: bool = False, **kwargs) -> dict:
    """One plan on the dense, hybrid and MoE tiny models."""
    names = [f"{name}-kv4" if kv4 else name for name in ("tiny", "tiny-hybrid", "tiny-moe")]
    return {f"{stem}-{name}": (name, plan_of(name, world, **kwargs)) for name in names}


CASES = {
    4: {
        **model_cases(4, "dp4-ddp", dp="ddp"),
        **model_cases(4, "dp4-fsdp", dp="fsdp"),
        **model_cases(4, "dp4-zero2", dp="zero2"),
        **model_cases(4, "tp2-dp2", tp=2, dp="fsdp"),
        **model_cases(4, "tp4", kv4=True, tp=4),
        "tp4-fsdp-alternating": ("tiny-kv4", plan_of("tiny-kv4", 4, layers=[layer(tp=4), layer(tp=1, dp="fsdp")])),
        "tp2-next-to-dp4-checkpointed": ("tiny-hybrid", plan_of("tiny-hybrid", 4, layers=[
            layer(tp=2, dp="zero2", checkpoint="full"), layer(tp=1, dp="ddp"),
            layer(tp=2, dp="fsdp"), layer(tp=1, dp="zero2", checkpoint="full")])),
        "moe-ep2-dp4": ("tiny-moe", plan_of("tiny-moe", 4, dp="fsdp", ep=2)),
        "moe-ep4-tp1-next-to-tp2": ("tiny-moe", plan_of("tiny-moe", 4, layers=[
            layer(tp=1, dp="zero2", ep=4), layer(tp=2, dp="ddp", checkpoint="full")])),
        **model_cases(4, "pp2-dp2-1f1b", pp=2, dp="fsdp", schedule="1f1b"),
        "pp4-interleaved-hybrid": ("tiny-hybrid", plan_of("tiny-hybrid", 4, pp=4, virtual_stages=1,
                                                           schedule="interleaved_1f1b")),
    },
    2: {
        **model_cases(2, "tp2", tp=2),
        **model_cases(2, "pp2-gpipe", pp=2, schedule="gpipe"),
        "pp2-zero-bubble-tp1": ("tiny", plan_of("tiny", 2, pp=2, schedule="zero_bubble")),
    },
    8: {
        **model_cases(8, "pp2-tp2-dp2", pp=2, tp=2, dp="fsdp", schedule="1f1b"),
    },
}


@functools.cache
def launch(world: int) -> list[dict]:
    return run_ranks(world, scenarios, CASES[world], SEED, timeout=900)


@pytest.mark.parametrize("world,case", [pytest.param(world, case, marks=[pytest.mark.slow] if world == 8 else [])
                                        for world in CASES for case in CASES[world]])
def test_plan_trains_like_one_process(world, case):
    name = CASES[world][case][0]
    assert_matches([ranks[case] for ranks in launch(world)], reference(name), f"{case}, {describe(SEED)}")
