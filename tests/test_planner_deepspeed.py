"""The planner's DeepSpeed plans: ZeRO's memory and time terms in the cost model, offload and the
split update, the search choosing DeepSpeed only when it is faster or the only plan that fits, and
the profile's host figures (an old profile without them still loads)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import numpy as np
import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.cli import main
from stratagem.launcher.cluster import Link, builtin_cluster
from stratagem.launcher.cost import (FP32_ADAM, MIXED_ADAM, UnitLayout, Workload, balanced_offload_ratio, predict,
                                     split_update_seconds, unit_cost, units, zero_state_bytes, zero_update_seconds)
from stratagem.launcher.hardware import HOST_STATE_BYTES, Analytic
from stratagem.launcher.profile import HostProfile, Profile, load_profile, this_machine
from stratagem.launcher.search import Space, choose, deepspeed_plans, plan_search
from stratagem.model import get_flavor
from stratagem.parallel.plan import Engine, deepspeed_plan, load_plan, uniform_plan

CFG = get_flavor("tiny")  # 2 attention/mlp layers, an untied head
WORLD, SEQ, BATCH = 2, 64, 4
SLOW = Link(bandwidth=2e9, latency=2e-5)  # so that communication matters at this size
FREE = Link(bandwidth=1e18, latency=0.0)  # so that it does not


def hardware(memory: float = 1e12, link: Link = SLOW) -> Analytic:
    """An H100-like cluster with `memory` bytes per device and `link` between its devices."""
    return Analytic(dataclasses.replace(builtin_cluster("h100-sxm"), device_memory=int(memory), intra_node=link))


def comparable_host() -> Analytic:
    """The host updates as fast as the device and copies faster than the device updates."""
    hw = hardware()
    return dataclasses.replace(hw, host_memory_bandwidth=hw.memory_bandwidth, host_link_bandwidth=1e13)


def ds(stage: int, **engine) -> Engine:
    return Engine("deepspeed", stage, **engine)


def work(state=FP32_ADAM) -> Workload:
    return Workload.of(CFG, SEQ, BATCH, state=state)


# --- memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [FP32_ADAM, MIXED_ADAM], ids=["fp32", "mixed"])
def test_device_memory_shrinks_as_the_stage_rises_as_the_zero_paper_says(state):
    """Per parameter over W ranks: stage 1 w + g + o / W, stage 2 w + (g + o) / W (native zero2),
    stage 3 (w + g + o) / W (native fsdp); nothing on the host."""
    layer, w = units(work(state))[1], 8
    p = layer.params
    device = {s: zero_state_bytes(ds(s), p, w, state) for s in (1, 2, 3)}
    assert device[1] == (pytest.approx(p * (state.weight + state.grad + state.optimizer / w)), 0.0)
    assert device[2] == (pytest.approx(p * (state.weight + (state.grad + state.optimizer) / w)), 0.0)
    assert device[3] == (pytest.approx(p * state.total / w), 0.0)
    assert device[1][0] > device[2][0] > device[3][0]
    for stage, kind in ((2, "zero2"), (3, "fsdp")):  # the same thing as the native kind: the same term
        native = unit_cost(hardware(), work(state), layer, UnitLayout(dp=kind), w, w).state_bytes
        zero = unit_cost(hardware(), work(state), layer, UnitLayout(dp=kind), w, w, ds(stage)).state_bytes
        assert zero == pytest.approx(native, rel=1e-12)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_moves_the_optimizer_states_to_the_host(stage):
    p, w, state = 1e6, 4, MIXED_ADAM
    q = p / w
    device, host = zero_state_bytes(ds(stage), p, w, state)
    off_device, off_host = zero_state_bytes(ds(stage, offload_optimizer=True), p, w, state)
    partitioned_grads = state.grad if stage > 1 else 0  # stage 1 keeps whole gradients on the device
    assert device - off_device == pytest.approx(q * (state.optimizer + partitioned_grads))
    assert (host, off_host) == (0.0, pytest.approx(q * HOST_STATE_BYTES))
    if stage == 3:  # parameter offload moves the weight partition too
        both = zero_state_bytes(ds(3, offload_optimizer=True, offload_params=True), p, w, state)
        assert both == (pytest.approx(off_device - q * state.weight), pytest.approx(off_host + q * state.weight))
        assert both[0] == pytest.approx(0.0, abs=1e-6)  # every model state off the device


def test_a_whole_plan_with_offload_needs_less_device_and_some_host_memory():
    hw, wk = hardware(), work()
    plain = predict(hw, wk, deepspeed_plan(CFG, WORLD, 3, micro_batch_size=2, num_micro_batches=2))
    offloaded = predict(hw, wk, deepspeed_plan(CFG, WORLD, 3, offload_optimizer=True, offload_params=True,
                                               micro_batch_size=2, num_micro_batches=2))
    assert plain.host_bytes == 0 < offloaded.host_bytes
    assert max(offloaded.memory_per_rank) < max(plain.memory_per_rank)
    assert offloaded.step_seconds > plain.step_seconds  # the host's update and the copies cost time here


# --- time ------------------------------------------------------------------------------------------


def test_the_split_update_is_the_slower_part_plus_the_host_parts_transfers():
    assert split_update_seconds(3.0, 2.0, 0.5, overlap=True) == 3.5
    assert split_update_seconds(1.0, 2.0, 0.5, overlap=True) == 2.5
    assert split_update_seconds(1.0, 2.0, 0.5, overlap=False) == 3.5  # CPU ranks: one set of cores
    hw, q, state = hardware(), 1e6, MIXED_ADAM
    for r in (0.25, 0.5, 1.0):
        engine = ds(3, offload_optimizer=True, offload_ratio=r)
        host = hw.host_optimizer_seconds(r * q)
        device = hw.optimizer_seconds((1 - r) * q)
        transfer = r * q * (state.grad + state.weight) / hw.host_link_bandwidth  # gradients down, weights up
        assert zero_update_seconds(hw, engine, q, state) == pytest.approx(max(host, device) + transfer)
    no_weights_up = ds(3, offload_optimizer=True, offload_params=True)  # they stay on the host
    assert zero_update_seconds(hw, no_weights_up, q, state) == pytest.approx(
        hw.host_optimizer_seconds(q) + q * state.grad / hw.host_link_bandwidth)


def split_step(hw, ratio: float) -> float:
    """The predicted step of ZeRO-3 with a host share `ratio` of the update (0: no offload)."""
    plan = deepspeed_plan(CFG, WORLD, 3, offload_optimizer=ratio > 0, offload_ratio=ratio or 1.0,
                          micro_batch_size=BATCH, num_micro_batches=1)
    return predict(hw, work(), plan).step_seconds


def test_a_partial_split_is_fastest_when_host_and_device_update_alike():
    hw = comparable_host()
    ratios = np.linspace(0.0, 1.0, 21)
    steps = [split_step(hw, r) for r in ratios]
    best = ratios[int(np.argmin(steps))]
    assert 0 < best < 1
    assert best == pytest.approx(balanced_offload_ratio(hw)) == pytest.approx(0.5)
    assert min(steps) < steps[0] and min(steps) < steps[-1]


def test_a_slow_host_makes_any_split_slower_than_none():
    hw = hardware()  # the host's AdamW is ~40x slower than the GPU's
    assert balanced_offload_ratio(hw) < 0.05
    steps = [split_step(hw, r) for r in (0.0, 0.25, 0.5, 1.0)]
    assert steps == sorted(steps)


def test_gradient_accumulation_spares_zero_1_and_2_the_reductions_of_every_micro_batch():
    """DeepSpeed reduces stage 1's gradients once per step; this runtime's zero2 every micro-batch."""
    hw, wk = hardware(), Workload.of(CFG, SEQ, 8)
    seconds = {}
    for stage in (1, 2, 3):
        plan = deepspeed_plan(CFG, WORLD, stage, micro_batch_size=2, num_micro_batches=4)
        seconds[stage] = predict(hw, wk, plan).breakdown["dp"]
    native = predict(hw, wk, dataclasses.replace(deepspeed_plan(CFG, WORLD, 2, micro_batch_size=2,
                                                                num_micro_batches=4), engine=Engine()))
    assert seconds[1] < seconds[2] < native.breakdown["dp"] < seconds[3]


# --- search ----------------------------------------------------------------------------------------


def fits_without_offload(hw) -> bool:
    try:
        plan_search(hw, work(), CFG, WORLD, Space(engines=("native",)))
        return True
    except ConfigError:
        pass
    return any(predict(hw, work(), p).fits for p in deepspeed_plans(hw, CFG, WORLD, BATCH)
               if not (p.engine.offload_optimizer or p.engine.offload_params))


def test_the_search_picks_offload_exactly_when_only_offload_fits():
    """Free links, so that only memory and the update tell the plans apart (with costly reductions,
    DeepSpeed's gradient accumulation may make an offload plan the fastest: the next test)."""
    picked = []
    for memory in np.geomspace(3e5, 1e7, 12):
        hw = hardware(memory, FREE)
        try:
            result = plan_search(hw, work(), CFG, WORLD)
        except ConfigError as err:
            assert str(err).startswith("no plan fits") and "DeepSpeed ZeRO-3 with offload" in str(err)
            continue
        engine = result.plan.engine
        offload = engine.offload_optimizer or engine.offload_params
        assert offload == (not fits_without_offload(hw)), memory
        assert result.prediction.fits
        if offload:
            assert result.native_prediction is None
            assert result.reason.startswith("the only plan under the memory limit: no native plan fits")
            assert result.plan.notes.startswith("planner chose deepspeed: the only plan under the memory limit")
        picked.append(offload)
    assert True in picked and False in picked  # the sweep crosses the limit


def test_deepspeed_is_chosen_when_predicted_faster_and_can_be_left_out():
    """Memory forces small micro-batches, many of them, on slow links: ZeRO-1 reduces the gradients
    once per step, native plans after every micro-batch."""
    hw, wk = hardware(5e6), Workload.of(CFG, SEQ, 64)
    result = plan_search(hw, wk, CFG, WORLD)
    assert result.plan.engine == ds(1)
    assert result.prediction.step_seconds < result.native_prediction.step_seconds / 2
    assert result.reason.startswith("predicted faster: ") and "s for the best native plan" in result.reason
    native = plan_search(hw, wk, CFG, WORLD, Space(engines=("native",)))
    assert not native.plan.engine.deepspeed and native.deepspeed_prediction is None
    assert native.reason.startswith("native plans only (--engines)")
    only = plan_search(hw, wk, CFG, WORLD, Space(engines=("deepspeed",)))
    assert only.plan.engine == ds(1) and only.uniform_plan is None and only.native_prediction is None
    assert only.reason.startswith("DeepSpeed plans only (--engines)")
    assert math.isclose(only.plan.predicted.step_time_s, only.prediction.step_seconds)


def test_equal_predictions_keep_the_native_plan():
    """ZeRO-2 in one micro-batch is native zero2 term for term: a tie, and native wins it."""
    result = plan_search(hardware(), Workload.of(CFG, SEQ, 16), CFG, WORLD)
    assert not result.plan.engine.deepspeed
    assert result.deepspeed_prediction.step_seconds == pytest.approx(result.prediction.step_seconds, rel=1e-9)


@pytest.mark.parametrize("deepspeed_seconds, chosen", [(0.97, "native"), (0.94, "deepspeed")])
def test_deepspeed_must_be_predicted_clearly_faster_to_replace_a_native_plan(deepspeed_seconds, chosen):
    """Its terms are not calibrated by the probes: a lead under ENGINE_MARGIN (5%) keeps native."""
    native_plan = uniform_plan(CFG, WORLD, dp="fsdp")
    deepspeed_plan_ = deepspeed_plan(CFG, WORLD, 3)
    predicted = lambda seconds: types.SimpleNamespace(step_seconds=seconds)  # noqa: E731
    plan, _, reason = choose((native_plan, predicted(1.0)), (deepspeed_plan_, predicted(deepspeed_seconds)),
                             hardware(), Space())
    assert plan.engine.kind == chosen
    if chosen == "native":
        assert reason.endswith("less than the 5% faster an engine switch needs)")


def test_plan_search_command_says_why_it_chose_deepspeed(tmp_path, capsys):
    spec = tmp_path / "small.toml"
    spec.write_text('base = "h100-sxm"\ndevice_memory = 1000000\n[intra_node]\nbandwidth = 2e9\nlatency = 2e-5\n')
    args = ["plan", "search", "--model", "tiny", "--cluster", str(spec), "--world", "2", "--seq-len", str(SEQ),
            "--global-batch-tokens", str(BATCH * SEQ)]
    assert main([*args, "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "chosen    deepspeed ZeRO-3" in out and "the only plan under the memory limit" in out
    plan = load_plan(tmp_path / "plan.json")
    assert plan.engine.deepspeed and "the only plan under the memory limit" in plan.notes
    assert main(["plan", "show", str(tmp_path / "plan.json")]) == 0
    shown = capsys.readouterr().out
    assert "engine      deepspeed ZeRO-3" in shown and "notes       planner chose deepspeed: the only plan" in shown
    assert main([*args, "--engines", "native"]) == 2
    assert "no plan fits" in capsys.readouterr().err


# --- the profile's host figures ------------------------------------------------------------------------


def test_a_profile_from_before_host_figures_loads_with_them_measured(tmp_path):
    host = HostProfile(separate_device=False, copy_bandwidth=5e9, pinned_copy_bandwidth=None,
                       adam_seconds_per_param=3e-9, adam="torch.optim.AdamW")
    profile = Profile(machine=this_machine(2), seq_len=SEQ, dtype="float32", layers={},
                      optimizer_seconds_per_param=2e-9, collectives={}, memory_available=2**30, created="then",
                      wall_seconds=1.0, host=host)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert load_profile(path).host == host  # kept in the file
    document = json.loads(path.read_text())
    del document["host"]
    path.write_text(json.dumps(document))
    old = load_profile(path).host
    assert not old.separate_device and old.copy_bandwidth > 1e8  # a memory copy: GB/s
    assert old.adam_seconds_per_param == 2e-9 and old.adam.startswith("torch.optim.AdamW")
    assert "predates host figures" in old.note
    assert "the ranks are their own host" in load_profile(path).summary()
