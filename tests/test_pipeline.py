"""Pipeline parallelism (`parallel.pipeline`): stage modules cut from the model, and every schedule on
2 and 4 real gloo ranks training exactly like one process (loss, gradients, gradient norm and
parameters after AdamW steps), with uneven stages, hybrid and MoE layers and a tied head."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

from stratagem.errors import ConfigError
from stratagem.model import Transformer, get_flavor
from stratagem.model.moe import set_aux_loss_scale
from stratagem.parallel.pipeline import (build_pipeline, build_stage_modules, clip_grad_norm_, stage_indices,
                                         train_step)
from stratagem.parallel.plan import Plan, check_plan, uniform_plan
from stratagem.train.config import TrainConfig
from stratagem.train.engine import loss_fn
from stratagem.train.optim import build_optimizer
from tests.distributed import run_ranks
from tests.seeds import describe, fresh_seed

MODELS = {  # 8 layers: 4 pipeline ranks x 2 virtual stages get one each
    "tiny": dataclasses.replace(get_flavor("tiny"), n_layers=8),
    "tiny-tied": dataclasses.replace(get_flavor("tiny"), n_layers=8, tie_embeddings=True),
    "tiny-hybrid": dataclasses.replace(get_flavor("tiny-hybrid"), n_layers=8),
    "tiny-moe": dataclasses.replace(get_flavor("tiny-moe"), n_layers=8),
}
# (pipeline degree, virtual stages) -> stage boundaries, uneven where the layer count allows
STAGES = {
    (2, 1): [(0, 5), (5, 8)],
    (2, 2): [(0, 3), (3, 4), (4, 7), (7, 8)],
    (4, 1): [(0, 1), (1, 4), (4, 6), (6, 8)],
    (4, 2): [(s, s + 1) for s in range(8)],
}
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 2}  # -> virtual stages
MICRO_BATCH, MICRO_BATCHES, SEQ_LEN, STEPS = 2, 4, 16, 3
MAX_NORM = 0.5  # below the first steps' gradient norms: clipping is active
SEED = fresh_seed(0)  # this session's; the rank processes get it as an argument


def pipeline_plan(cfg, degree: int, schedule: str) -> Plan:
    """A pure pipeline of `degree` ranks running `schedule` over this file's uneven stages."""
    virtual = SCHEDULES[schedule]
    plan = uniform_plan(cfg, degree, pp=degree, virtual_stages=virtual, schedule=schedule,
                        micro_batch_size=MICRO_BATCH, num_micro_batches=MICRO_BATCHES)
    plan.pipeline.stages = STAGES[degree, virtual]
    check_plan(plan, cfg, world=degree)  # before any process starts, as the launcher does
    return plan


def step_batches(vocab_size: int, seed: int, micro_batch: int = MICRO_BATCH,
                 micro_batches: int = MICRO_BATCHES) -> list[list[torch.Tensor]]:
    """STEPS optimizer steps of `micro_batches` token micro-batches ``[micro_batch, SEQ_LEN + 1]``."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(vocab_size, (micro_batch, SEQ_LEN + 1), generator=generator)
             for _ in range(micro_batches)] for _ in range(STEPS)]


def seeded_model(cfg, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def train_record(steps: list[list[torch.Tensor]], named_params: list[tuple[str, nn.Parameter]], optimizer,
                 forward_backward, clip) -> dict:
    """For each step's micro-batches ``forward_backward(micro_batches) -> loss``, ``clip(max_norm)
    -> norm`` and the optimizer: the losses and norms, the first step's unclipped gradients and
    the final parameters."""
    record = {"losses": [], "norms": []}
    for batches in steps:
        record["losses"].append(forward_backward(batches))
        record.setdefault("grads", {name: p.grad.clone() for name, p in named_params})
        record["norms"].append(clip(MAX_NORM))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    record["params"] = {name: p.detach().clone() for name, p in named_params}
    return record


# --- one process: the reference -----------------------------------------------------------------

def one_process_step(model: Transformer, batches: list[torch.Tensor]) -> float:
    """The training loop's accumulation: backward of loss / k per micro-batch; the mean loss."""
    total = 0.0
    for tokens in batches:
        loss = loss_fn(model, tokens)
        (loss / len(batches)).backward()
        total += loss.item()
    return total / len(batches)


@functools.cache
def reference(name: str) -> dict:
    """One process training `name` as `train.loop` does (MoE aux scale 1 / k, clipping, AdamW).

    On one thread: these tiny ops gain nothing from two, and on cores busy with other work
    (rank processes, other tests) two threads made this 30 times slower.
    """
    cfg = MODELS[name]
    model = seeded_model(cfg, SEED)
    set_aux_loss_scale(model, 1 / MICRO_BATCHES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_record(step_batches(cfg.vocab_size, SEED), list(model.named_parameters()),
                            build_optimizer(model, TrainConfig()),
                            functools.partial(one_process_step, model),
                            lambda max_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
    finally:
        torch.set_num_threads(threads)


# --- pipeline ranks ---------------------------------------------------------------------------

def pipelined(pp_rank: int, plan: Plan, name: str, seed: int) -> dict:
    """This rank's record of the same training under `plan`."""
    cfg = MODELS[name]
    modules = build_stage_modules(plan, seeded_model(cfg, seed), pp_rank)
    pipe = build_pipeline(plan, modules)
    named = [item for module in modules for item in module.named_parameters()]
    optimizer = build_optimizer(nn.ModuleList(modules), TrainConfig())
    return train_record(step_batches(cfg.vocab_size, seed), named, optimizer,
                        functools.partial(train_step, pipe), functools.partial(clip_grad_norm_, pipe))


def runtime_errors(rank: int, world: int, seed: int) -> list[str]:
    """What only a running pipeline can find, each reported as one line by every rank (at 2 ranks
    both hold the first or last stage, so none is left waiting for the others)."""
    cfg = MODELS["tiny"]
    wider = pipeline_plan(cfg, 2 * world, "1f1b")
    messages = [error_of(build_pipeline, wider, build_stage_modules(wider, seeded_model(cfg, seed), rank))]
    plan = pipeline_plan(cfg, world, "1f1b")
    pipe = build_pipeline(plan, build_stage_modules(plan, seeded_model(cfg, seed), rank))
    first, second, _ = step_batches(cfg.vocab_size, seed)
    messages.append(error_of(train_step, pipe, first[:-1]))
    train_step(pipe, first)
    messages.append(error_of(train_step, pipe, [tokens[:, :9] for tokens in second]))
    return messages


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def scenarios(rank: int, world: int, cases: list[tuple[str, str]], errors: bool, seed: int) -> dict:
    """Every (model, schedule) case on this launch's ranks, then the runtime errors if asked:
    one launch shares the start-up."""
    results = {(name, schedule): pipelined(rank, pipeline_plan(MODELS[name], world, schedule), name, seed)
               for name, schedule in cases}
    return {"cases": results, "errors": runtime_errors(rank, world, seed) if errors else None}


@functools.cache
def launch(world: int) -> list[dict]:
    """Every case on `world` pipeline ranks (and, at 2 ranks, the runtime errors)."""
    return run_ranks(world, scenarios, CASES, world == 2, SEED, timeout=300)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def assert_matches(records: list[dict], expected: dict, where: str) -> None:
    """Every rank's losses and norms, and the union of their gradients and parameters, equal one
    process's (`expected`) to 1e-4 relative; a tied weight's two copies both do."""
    for record in records:
        for key in ("losses", "norms"):
            assert record[key] == pytest.approx(expected[key], rel=1e-4), f"{where}: {key}"
    for key in ("grads", "params"):
        seen = set()
        for record in records:
            for param, value in record[key].items():
                error = relative_error(value, expected[key][param])
                assert error < 1e-4, f"{where}: {key} of {param} differ by {error:.2e} (relative)"
                seen.add(param)
        assert seen == set(expected[key]), f"{where}: {key} missing for {set(expected[key]) - seen}"


# every schedule on the dense, hybrid and MoE models; the tied head's gradient exchange once
CASES = [(name, schedule) for name in ("tiny", "tiny-hybrid", "tiny-moe") for schedule in SCHEDULES]
CASES.append(("tiny-tied", "interleaved_1f1b"))


@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_trains_like_one_process(world):
    for case in CASES:
        assert_matches([ranks["cases"][case] for ranks in launch(world)], reference(case[0]),
                       f"pp {world}, {case}, {describe(SEED)}")


def test_runtime_errors_are_one_line_on_every_rank():
    expected = ["uniform plan: pipeline.degree = 4, but the pipeline process group has 2 ranks",
                "uniform plan: pipeline.num_micro_batches = 4, but the step has 3 micro-batches",
                ("pipeline micro-batches all need the shape [2, 17] (the first one's; the stages' buffers are "
                 "sized on the first step), got [[2, 9]]")]
    assert [ranks["errors"] for ranks in launch(2)] == [expected, expected]


# --- one process: cutting the model -----------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-hybrid", "tiny-tied"])
def test_stage_modules_chain_to_the_model_and_share_nothing(name):
    cfg = MODELS[name]
    plan = pipeline_plan(cfg, 4, "interleaved_1f1b")
    model = seeded_model(cfg, SEED)
    by_stage = {}
    for pp_rank in range(4):
        modules = build_stage_modules(plan, model, pp_rank)
        by_stage.update(zip(stage_indices(plan, pp_rank), modules, strict=True))
    assert sorted(by_stage) == list(range(8))
    tokens = step_batches(cfg.vocab_size, SEED)[0][0]
    h = tokens
    for s in range(8):
        h = by_stage[s](h)
    assert torch.equal(h, model(tokens))
    names = [n for s in range(8) for n, _ in by_stage[s].named_parameters()]
    tied = ["tok_embeddings.weight"] if cfg.tie_embeddings else []
    assert sorted(names) == sorted([n for n, _ in model.named_parameters()] + tied)
    storages = [p.untyped_storage().data_ptr() for s in range(8) for p in by_stage[s].parameters()]
    storages += [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)


def test_a_plan_for_another_model_is_rejected_before_any_process_starts():
    plan = pipeline_plan(MODELS["tiny"], 2, "1f1b")
    expected = "uniform plan: layers: 8 entries, but the model has n_layers = 4"
    other = get_flavor("tiny-hybrid")
    with pytest.raises(ConfigError) as info:
        check_plan(plan, other, world=2)
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        build_stage_modules(plan, Transformer(other), 0)
    assert str(info.value) == expected
