"""The cost model against published formulas and the monotonicity it owes.

A GPT-3 175B shape (96 layers, hidden 12288, 96 heads, 2048 tokens; the SwiGLU feed-forward sized
to GPT-3's 8 h^2 parameters) priced under uniform plans: model states as the ZeRO paper splits
mixed-precision Adam's 16 bytes per parameter (Rajbhandari et al. 2020: 16 psi, (2 + 14 / N) psi
for ZeRO-2, 16 psi / N for ZeRO-3), and activations as Megatron states them (Korthikanti et al.
2022): full recomputation keeps each layer's input, 2 s b h bytes; 1F1B's first stage holds the
activations of p micro-batches, interleaving (v chunks per rank) of (1 + (p - 1) / (p v)) times a
stage's layers; tensor parallelism divides all but the replicated part.
"""

from __future__ import annotations

import dataclasses

import pytest

from stratagem.launcher.cluster import builtin_cluster
from stratagem.launcher.cost import (MIXED_ADAM, UnitLayout, Workload, chunk_costs, chunk_memory, in_flight, predict,
                                     unit_cost, units)
from stratagem.launcher.hardware import Analytic
from stratagem.model.config import ModelConfig
from stratagem.parallel.plan import check_plan, uniform_plan

H, LAYERS, SEQ = 12288, 96, 2048
GPT3 = ModelConfig(dim=H, n_layers=LAYERS, n_heads=96, n_kv_heads=96, ffn_hidden=8 * H // 3, vocab_size=51200)
HW = Analytic(builtin_cluster("h100-sxm", 128))


def work(global_batch: int = 1536) -> Workload:
    return Workload.of(GPT3, SEQ, global_batch, state=MIXED_ADAM, activation_bytes=2)


def plan(world: int, **kwargs):
    p = uniform_plan(GPT3, world, **kwargs)
    check_plan(p, GPT3, world=world)
    return p


def layer_params() -> int:
    return work().counts.layers[0].params


def test_the_shape_is_gpt3_175b():
    assert work().counts.total_params == pytest.approx(175e9, rel=0.01)
    assert layer_params() == pytest.approx(12 * H * H, rel=1e-3)


@pytest.mark.parametrize("kind,bytes_per_param", [("ddp", lambda n: 16), ("zero2", lambda n: 2 + 14 / n),
                                                  ("fsdp", lambda n: 16 / n)])
@pytest.mark.parametrize("tp,dp", [(8, 16), (4, 32), (1, 64)])
def test_model_states_split_as_the_zero_paper_says(kind, bytes_per_param, tp, dp):
    layer = units(work())[1]
    cost = unit_cost(HW, work(), layer, UnitLayout(tp=tp, dp=kind), stage_size=tp * dp, micro_batch=dp)
    assert cost.state_bytes == pytest.approx(bytes_per_param(dp) * layer.params / tp, rel=1e-12)


@pytest.mark.parametrize("tp", [1, 8])
def test_full_recomputation_keeps_2sbh_per_layer(tp):
    layer, dp = units(work())[1], 4
    cost = unit_cost(HW, work(), layer, UnitLayout(tp=tp, dp="fsdp", checkpoint=True), stage_size=tp * dp,
                     micro_batch=dp)  # one sequence per data-parallel rank: b = 1
    assert cost.activation_bytes == 2 * SEQ * 1 * H


def test_tensor_parallelism_divides_all_but_the_replicated_activations():
    layer, counts = units(work())[1], work().counts.layers[0]
    one = unit_cost(HW, work(), layer, UnitLayout(tp=1), stage_size=1, micro_batch=1).activation_bytes
    eight = unit_cost(HW, work(), layer, UnitLayout(tp=8), stage_size=8, micro_batch=1).activation_bytes
    replicated = SEQ * counts.tp_replicated_activation_bytes_per_token
    assert one == SEQ * counts.activation_bytes_per_token
    assert eight == pytest.approx(replicated + (one - replicated) / 8, rel=1e-12)
    assert 0 < replicated < one / 2  # sublayer inputs and norms (Megatron's is 10 of 34 sbh)


def test_1f1b_first_stage_holds_p_micro_batches_and_gpipe_all():
    p, m = 8, 32
    assert [in_flight("1f1b", p, 1, m, r) for r in range(p)] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert {in_flight("gpipe", p, 1, m, r) for r in range(p)} == {m}
    for v in (2, 4):  # Megatron: the first stage holds (1 + (p - 1) / (p v)) x its layers' activations
        layers_held = in_flight("interleaved_1f1b", p, v, m, 0) * v * (LAYERS / (p * v))
        assert layers_held == pytest.approx(LAYERS / p * p * (1 + (p - 1) / (p * v)), rel=1e-12)


def test_a_megatron_175b_layout_on_1024_gpus():
    """t = 8, p = 16 (6 layers a stage), 1F1B, micro-batches of 8 sequences over dp 8: the first
    stage's memory is its states plus p in-flight micro-batches of its layers' activations."""
    wk = work(global_batch=1536)
    pl = plan(1024, tp=8, pp=16, dp="zero2", micro_batch_size=8, num_micro_batches=192, checkpoint="full")
    prediction = predict(HW, wk, pl)
    stage_layers = LAYERS // 16
    psi = stage_layers * layer_params() / 8 + (units(wk)[0].params / 8)  # the embedding rides on stage 0
    activations = 16 * stage_layers * 2 * SEQ * 1 * H  # p micro-batches x 2 s b h per layer, b = 1 per rank
    chunk = chunk_costs(HW, wk, pl)[0]
    assert chunk.state_bytes == pytest.approx((2 + 14 / 8) * psi, rel=1e-9)
    assert chunk.activation_bytes * 16 == pytest.approx(activations, rel=1e-9)
    assert prediction.memory_per_rank[0] == pytest.approx(chunk.state_bytes + activations + chunk.transient_bytes,
                                                          rel=1e-9)
    assert prediction.fits


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)])
def test_more_micro_batches_never_add_bubble(schedule, virtual):
    """Same micro-batch size, more of them (a bigger global batch): the bubble does not grow, and its
    share of the step falls."""
    bubbles, shares = [], []
    for m in (16, 32, 64, 128):
        pl = plan(512, tp=8, pp=8, dp="zero2", micro_batch_size=8, num_micro_batches=m, schedule=schedule,
                  virtual_stages=virtual)
        prediction = predict(HW, work(global_batch=8 * m), pl)
        bubbles.append(prediction.breakdown["bubble"])
        shares.append(prediction.breakdown["bubble"] / prediction.step_seconds)
    assert all(b2 <= b1 * (1 + 1e-12) for b1, b2 in zip(bubbles, bubbles[1:]))
    assert all(s2 < s1 for s1, s2 in zip(shares, shares[1:]))


def test_zero_bubble_and_interleaving_shrink_the_bubble():
    kinds = {}
    for schedule, virtual in (("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4), ("zero_bubble", 2)):
        pl = plan(512, tp=8, pp=8, dp="zero2", micro_batch_size=8, num_micro_batches=32, schedule=schedule,
                  virtual_stages=virtual)
        kinds[(schedule, virtual)] = predict(HW, work(global_batch=256), pl).breakdown["bubble"]
    # (the step itself may not shrink: each extra chunk boundary adds a send per micro-batch)
    assert kinds[("interleaved_1f1b", 4)] < kinds[("interleaved_1f1b", 2)] < kinds[("1f1b", 1)]
    assert kinds[("zero_bubble", 2)] < kinds[("interleaved_1f1b", 2)]


@pytest.mark.parametrize("tp,kind", [(1, "ddp"), (8, "zero2"), (4, "fsdp")])
@pytest.mark.parametrize("schedule,virtual,pp", [("1f1b", 1, 1), ("gpipe", 1, 8), ("1f1b", 1, 8),
                                                 ("interleaved_1f1b", 2, 8)])
def test_checkpointing_never_raises_memory(tp, kind, schedule, virtual, pp):
    base = dict(tp=tp, pp=pp, dp=kind, micro_batch_size=512 // pp // tp, num_micro_batches=pp * 4,
                schedule=schedule, virtual_stages=virtual)
    wk = work(global_batch=512 // pp // tp * pp * 4)
    plain = plan(512, **base)
    some = plan(512, **base)
    for i in range(0, LAYERS, 3):
        some.layers[i] = dataclasses.replace(some.layers[i], checkpoint="full")
    every = plan(512, checkpoint="full", **base)
    memories = [predict(HW, wk, p).memory_per_rank for p in (plain, some, every)]
    for fewer, more in zip(memories, memories[1:]):
        assert all(b <= a for a, b in zip(fewer, more))
    assert max(memories[2]) < max(memories[0])
    chunks = chunk_memory(chunk_costs(HW, wk, every), schedule, pp, virtual, pp * 4)
    assert sum(chunks) == pytest.approx(sum(memories[2]), rel=1e-12)
