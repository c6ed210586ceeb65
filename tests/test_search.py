"""The planner's search against brute force: on small instances it finds the optimum of every plan
in its space, as the cost model (`launcher.cost.predict`) scores them."""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.cluster import Link, builtin_cluster
from stratagem.launcher.cost import Workload, predict
from stratagem.launcher.hardware import Analytic
from stratagem.launcher.search import Planner, Space, layer_options, pipeline_settings, plan_of, plan_search
from stratagem.model import get_flavor
from stratagem.parallel.plan import check_plan, load_plan


def hardware(memory: float, devices_per_node: int = 8, nodes: int = 1) -> Analytic:
    """An H100-like cluster with `memory` bytes per device, slow links so communication matters."""
    cluster = dataclasses.replace(builtin_cluster("h100-sxm", nodes), devices_per_node=devices_per_node,
                                  device_memory=int(memory), intra_node=Link(bandwidth=2e9, latency=2e-5),
                                  inter_node=Link(bandwidth=2e8, latency=1e-4))
    return Analytic(cluster)


def cuts(n_layers: int, chunks: int):
    """Every cut of n_layers into `chunks` non-empty contiguous ranges."""
    for bounds in itertools.combinations(range(1, n_layers), chunks - 1):
        edges = (0, *bounds, n_layers)
        yield [(edges[i], edges[i + 1]) for i in range(chunks)]


def brute_force(hw, work: Workload, cfg, world: int, space: Space) -> float:
    """The least predicted step time over every plan of the space that fits."""
    specs = cfg.layer_specs()
    best = math.inf
    for s in pipeline_settings(cfg, world, work.global_batch, hw.max_tp, space):
        stage = world // s.pp
        per_layer = [layer_options(cfg, spec, stage, s.micro_batch, hw.max_tp, space) for spec in specs]
        for stages in cuts(len(specs), s.chunks):
            for layouts in itertools.product(*per_layer):
                plan = plan_of(s, world, list(layouts), stages)
                prediction = predict(hw, work, plan)
                if prediction.fits:
                    best = min(best, prediction.step_seconds)
    return best


def small(flavor: str, **changes):
    return dataclasses.replace(get_flavor(flavor), **changes)


INSTANCES = {
    # name: (model, world, global batch, seq_len, memory per device, space)
    "dense-2-ranks-all-choices": (small("tiny", n_layers=3), 2, 4, 64, 3e6, Space()),
    "hybrid-4-ranks-partitions": (small("tiny-hybrid", n_layers=4, n_kv_heads=4), 4, 8, 64, 2.5e6,
                                  Space(dp_kinds=("fsdp",))),
    "hybrid-8-layers-checkpointing": (small("tiny-hybrid", n_layers=8, n_kv_heads=4), 4, 8, 64, 5e6,
                                      Space(dp_kinds=("zero2",), tps=(1,), schedules=("1f1b", "interleaved_1f1b"))),
    "moe-4-ranks-expert-degrees": (small("tiny-moe", n_layers=2, n_kv_heads=4), 4, 4, 32, 1.9e6,
                                   Space(checkpoints=(False,))),
    "big-vocab-head-layouts": (small("tiny", n_layers=4, n_kv_heads=4, vocab_size=8192, tie_embeddings=False), 4, 8,
                               64, 1.2e7, Space(dp_kinds=("ddp", "fsdp"), tps=(1,), checkpoints=(False,))),
    "moe-8-ranks-2-nodes": (small("tiny-hybrid-moe", n_layers=4, n_kv_heads=4), 8, 8, 32, 4e6,
                            Space(dp_kinds=("fsdp",), checkpoints=(False,), schedules=("1f1b", "zero_bubble"))),
}


@pytest.mark.parametrize("name", INSTANCES)
def test_search_finds_the_brute_force_optimum(name):
    cfg, world, batch, seq_len, memory, space = INSTANCES[name]
    hw = hardware(memory, devices_per_node=4 if world == 8 else 8, nodes=2 if world == 8 else 1)
    work = Workload.of(cfg, seq_len, batch)
    want = brute_force(hw, work, cfg, world, space)
    assert want < math.inf, "the instance must have plans that fit"
    result = plan_search(hw, work, cfg, world, space)
    check_plan(result.plan, cfg, world=world)
    assert result.prediction.fits
    assert result.prediction.step_seconds == pytest.approx(want, rel=1e-9)
    assert result.plan.predicted.step_time_s == pytest.approx(want, rel=1e-9)
    # the memory limit binds on these instances: without it the optimum is faster
    roomy = hardware(1e12, devices_per_node=4 if world == 8 else 8, nodes=2 if world == 8 else 1)
    assert plan_search(roomy, work, cfg, world, space).prediction.step_seconds < want


@pytest.mark.parametrize("memory", [8e6, 1.5e7, 1e9])
def test_a_larger_search_scores_its_plan_as_the_cost_model_does(memory):
    """Beyond brute force: 16 layers on 8 ranks over 2 nodes, memory binding or not. plan_search
    raises if the score it searched by differs from `predict` of the plan it returns."""
    cfg = small("tiny-hybrid-moe", n_layers=16, n_kv_heads=4)
    hw = hardware(memory, devices_per_node=4, nodes=2)
    result = plan_search(hw, Workload.of(cfg, 64, 16), cfg, 8)
    check_plan(result.plan, cfg, world=8)
    assert result.prediction.fits and result.uniform_prediction.fits
    assert result.prediction.step_seconds <= result.uniform_prediction.step_seconds


def test_uniform_plan_is_never_faster_and_is_uniform():
    cfg, world, batch, seq_len, memory, space = INSTANCES["hybrid-8-layers-checkpointing"]
    hw = hardware(memory)
    result = plan_search(hw, Workload.of(cfg, seq_len, batch), cfg, world, space)
    uniform = result.uniform_plan
    assert uniform is not None
    assert len({(l.tp, l.dp, l.checkpoint) for l in uniform.layers}) == 1
    assert result.uniform_prediction.fits
    assert result.prediction.step_seconds <= result.uniform_prediction.step_seconds


def test_a_model_that_cannot_fit_says_how_much_it_needs():
    cfg = small("tiny", n_layers=2)
    with pytest.raises(ConfigError, match=r"^no plan fits: .* needs [0-9.]+ [KM]iB per device; 1000 B available$"):
        plan_search(hardware(1e3), Workload.of(cfg, 64, 4), cfg, 2)


def test_a_batch_no_plan_can_split_is_refused():
    cfg = small("tiny", n_layers=2)
    planner = Planner(hardware(1e9), Workload.of(cfg, 64, 3), cfg, 4, Space(max_pp=1, tps=(1,)))
    with pytest.raises(ConfigError, match="global batch of 3 sequences"):
        planner.search(3)


# --- the command line -----------------------------------------------------------------------------

def stratagem(*args, cwd):
    exe = shutil.which("stratagem") or str(Path(sys.executable).parent / "stratagem")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd)


def test_plan_search_prints_the_plan_and_writes_it(tmp_path):
    done = stratagem("plan", "search", "--model", "llama-1b", "--cluster", "h100-sxm", "--nodes", "2",
                     "--global-batch-tokens", str(64 * 2048), "--seq-len", "2048", "--precision", "bf16-mixed",
                     "--out", "plan.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "planned for 16 ranks of h100-sxm" in done.stdout
    assert "per-layer" in done.stdout and "uniform" in done.stdout and "best uniform plan's speed" in done.stdout
    plan = load_plan(tmp_path / "plan.json")
    check_plan(plan, get_flavor("llama-1b"), world=16)
    assert plan.predicted.step_time_s > 0
    again = stratagem("plan", "search", "--model", "llama-1b", "--cluster", "h100-sxm", "--out", "plan.json",
                      cwd=tmp_path)
    assert again.returncode == 2 and "plan.json: already exists" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["--cluster", "tpu-v9"], "tpu-v9"),
    (["--cluster", "h100-sxm", "--global-batch-tokens", "1000", "--seq-len", "64"],
     "--global-batch-tokens 1000: not a whole number of 64-token sequences"),
    (["--cluster", "h100-sxm", "--nodes", "0"], "nodes = 0"),
])
def test_plan_search_bad_input_is_one_line(tmp_path, args, message):
    done = stratagem("plan", "search", "--model", "tiny", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cached_rows_and_chunk_results_never_leak_between_settings():
    """Every pipeline setting costed by one planner (whose caches hold the others' rows and chunk
    results) gives what a fresh planner gives for that setting alone."""
    cfg = small("tiny", n_layers=6, n_kv_heads=4, vocab_size=4096, tie_embeddings=False)
    hw, work = hardware(1.2e7), Workload.of(cfg, 64, 8)
    space = Space(dp_kinds=("ddp", "fsdp"), tps=(1, 2), checkpoints=(False, True))
    shared = Planner(hw, work, cfg, 4, space)
    settings = [s for s in pipeline_settings(cfg, 4, 8, hw.max_tp, space)
                if all(shared.options(i, s) for i in range(cfg.n_layers))]
    assert len({s.ends for s in settings}) > 1 and any(s.pp > 1 for s in settings)
    together = [shared.partition(s) for s in settings]
    for s, found in zip(settings, together):
        alone = Planner(hw, work, cfg, 4, space).partition(s)
        assert (found is None) == (alone is None), s
        if found is not None:
            assert found[0] == pytest.approx(alone[0], rel=1e-12), s
