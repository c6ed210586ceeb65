"""Relayout between layers of different (dp, tp) layouts in a stage, against one process on the
whole batch: forward and every gradient, under the loss convention of `parallel.relayout`.

One launch of 4 ranks runs the model scenarios (tp 4 / tp 1 alternating, tp 2 next to tp 1, and
two pipeline stages of 2 ranks each), one of 6 ranks the degrees that do not divide each other."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from stratagem.model import Transformer, get_flavor
from stratagem.parallel.mesh import StageMeshes
from stratagem.parallel.plan import LayerLayout, Layout, Pipeline, Plan, check_plan
from stratagem.parallel.relayout import local_batch, relayout
from stratagem.parallel.tensor_parallel import parallelize_block, parallelize_embedding, parallelize_head
from tests.distributed import run_ranks
from tests.seeds import describe, fresh_seed
from tests.test_tensor_parallel import rel, worst_grad

TOL = 1e-5
# Gated DeltaNet's per-head decay parameters: each gradient entry sums over every token of the
# batch with cancelling signs, so float32 reduction order moves it more relative to its (small)
# norm. Over 26 seeds of the tp cases the worst was 1.8e-5, the median 1.4e-6; every other
# gradient stayed under 1e-5. A missing or doubled reduction errs by O(1) on them too.
PER_HEAD_DECAY = ("mixer.A_log", "mixer.dt_bias")
DECAY_TOL = 1e-4
HYBRID = dataclasses.replace(get_flavor("tiny-hybrid"), n_kv_heads=4)  # 3 gated_deltanet, 1 attention
# name: (model, embedding tp, layer tps, head tp)
MODEL_CASES = {
    "tp 4 / tp 1 alternating": (HYBRID, 1, [4, 1, 4, 1], 4),
    "tp 2 next to tp 1": (HYBRID, 2, [2, 1, 1, 2], 1),
}
STAGE_CASE = (get_flavor("tiny"), 2, [1, 2], 1)  # on each of two 2-rank stages
GCD_TPS = [1, 2, 3, 6, 2, 3, 1]  # on 6 ranks: gathers, slices, and 2 <-> 3 through gcd 1


def plan_for(emb: int, layers: list[int], head: int, world: int) -> Plan:
    return Plan(world_size=world,
                pipeline=Pipeline(degree=1, stages=[(0, len(layers))], virtual_stages=1, schedule="1f1b",
                                  micro_batch_size=4, num_micro_batches=1),
                embedding=Layout(tp=emb, dp="ddp"), head=Layout(tp=head, dp="ddp"),
                layers=[LayerLayout(tp=tp, dp="ddp", checkpoint="none", ep=1) for tp in layers])


# --- scenarios (run on every rank) -----------------------------------------------------------------

def sum_over_dp(module: torch.nn.Module, mesh) -> None:
    """Sum gradients over the layout's dp ranks: what data parallelism does with
    gradient_divide_factor=1 (relayout's convention), without it, to test relayout alone."""
    group = mesh["dp"].get_group()
    for p in module.parameters():
        dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=group)


def stage_forward(model: Transformer, tokens: torch.Tensor, tps: list[int], meshes: StageMeshes):
    """Embedding, layers and head, each at its degree in `tps`, with relayouts between: this
    rank's logits and its loss under relayout's convention (its slice's mean / the head's dp)."""
    h = model.tok_embeddings(local_batch(tokens[:, :-1], meshes.layout(tps[0])))
    for block, src, dst in zip(model.layers, tps, tps[1:]):
        h = block(relayout(h, meshes, src, dst))
    logits = model.output(model.norm(relayout(h, meshes, tps[-2], tps[-1])))
    head = meshes.layout(tps[-1])
    targets = local_batch(tokens[:, 1:], head)
    return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / head["dp"].size()


def stage_errors(cfg, emb: int, layers: list[int], head: int, meshes: StageMeshes, seed: int) -> dict[str, float]:
    """The model laid out per `tps` against one process on the whole batch: this rank's logits,
    the loss summed over the head's dp groups, and every gradient summed over its layer's dp."""
    tps = [emb, *layers, head]
    torch.manual_seed(seed)
    ref = Transformer(cfg)
    model = copy.deepcopy(ref)
    parallelize_embedding(model, meshes.layout(emb)["tp"])
    for i, (block, tp) in enumerate(zip(model.layers, layers)):
        parallelize_block(block, meshes.layout(tp)["tp"], i)
    parallelize_head(model, meshes.layout(head)["tp"])
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    logits, loss = stage_forward(model, tokens, tps, meshes)
    loss.backward()
    ref_logits = ref(tokens[:, :-1])
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), tokens[:, 1:].flatten())
    ref_loss.backward()
    for module, tp in [(model.tok_embeddings, emb), *zip(model.layers, layers), (model.norm, head),
                       (model.output, head)]:
        sum_over_dp(module, meshes.layout(tp))
    dist.all_reduce(loss, group=meshes.layout(head)["dp"].get_group())
    decay, other = ([(name, p) for name, p in model.named_parameters() if name.endswith(PER_HEAD_DECAY) == kept]
                    for kept in (True, False))
    return {"logits": rel(logits, local_batch(ref_logits, meshes.layout(head))), "loss": rel(loss, ref_loss),
            "grads": worst_grad(other, ref), "decay grads": worst_grad(decay, ref)}


def model_scenarios(rank: int, world_size: int, seed: int) -> dict:
    out = {}
    for i, (name, (cfg, emb, layers, head)) in enumerate(MODEL_CASES.items()):
        plan = plan_for(emb, layers, head, world_size)
        check_plan(plan, cfg, world_size)
        out[name] = stage_errors(cfg, emb, layers, head, StageMeshes.for_plan(plan), seed + i)
    cfg, emb, layers, head = STAGE_CASE
    meshes = StageMeshes(world_size, 2, [[emb, *layers, head]] * 2)
    out["two stages"] = stage_errors(cfg, emb, layers, head, meshes, seed + 10)
    out["stage ranks"] = dist.get_process_group_ranks(meshes.layout(2)["tp"].get_group())
    try:
        local_batch(torch.zeros(3, 5), meshes.layout(1))
    except ValueError as err:
        out["odd batch"] = str(err)
    return out


def gcd_scenario(rank: int, world_size: int, seed: int) -> dict[str, float]:
    """Toy layers h = tanh(h W_i), layer i at degree GCD_TPS[i] (replicated weights), relayouts
    between, against one process: this rank's output rows, its input's gradient rows, and the
    weights' gradients summed over each layer's dp ranks."""
    meshes = StageMeshes(world_size, 1, [GCD_TPS])
    torch.manual_seed(seed)
    x = torch.randn(12, 8)
    weights = [torch.randn(8, 8, requires_grad=True) for _ in GCD_TPS]
    ref_weights = [w.detach().clone().requires_grad_() for w in weights]
    x_local = local_batch(x, meshes.layout(GCD_TPS[0])).requires_grad_()
    h, src = x_local, GCD_TPS[0]
    for w, tp in zip(weights, GCD_TPS):
        h, src = torch.tanh(relayout(h, meshes, src, tp) @ w), tp
    (h.square().sum() / x.shape[0]).backward()  # sum over this rank's rows / the whole batch
    x_ref = x.clone().requires_grad_()
    h_ref = x_ref
    for w in ref_weights:
        h_ref = torch.tanh(h_ref @ w)
    h_ref.square().mean(0).sum().backward()
    for w, tp in zip(weights, GCD_TPS):
        dist.all_reduce(w.grad, group=meshes.layout(tp)["dp"].get_group())
    last = meshes.layout(GCD_TPS[-1])
    return {"output": rel(h, local_batch(h_ref, last)),
            "input grad": rel(x_local.grad, local_batch(x_ref.grad, meshes.layout(GCD_TPS[0]))),
            "weight grads": max(rel(w.grad, r.grad) for w, r in zip(weights, ref_weights))}


@pytest.fixture(scope="module")
def model_results():
    seed = fresh_seed(0)
    return run_ranks(4, model_scenarios, seed, timeout=300), describe(seed)


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*MODEL_CASES, "two stages"])
def test_mixed_layouts_match_one_process(model_results, name):
    """Logits of every rank's rows, the loss summed over the head's dp groups and every gradient
    (summed over its layer's dp ranks, gathered over tp) equal one process, relative 1e-5 (the
    per-head decay parameters' gradients 1e-4)."""
    ranks, seed = model_results
    for r, errors in enumerate(result[name] for result in ranks):
        assert all(value < (DECAY_TOL if key == "decay grads" else TOL) for key, value in errors.items()), \
            f"{name} rank {r}: {errors}; {seed}"


def test_stage_meshes_cover_their_own_ranks(model_results):
    """With two pipeline stages of 2 ranks, each stage's tp group is its own two ranks."""
    ranks, _ = model_results
    assert [r["stage ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_batch_that_does_not_split_is_one_line(model_results):
    ranks, _ = model_results
    assert ranks[0]["odd batch"] == "a batch of 3 rows does not split over 2 data-parallel ranks"


def test_degrees_that_do_not_divide_each_other():
    """On 6 ranks, degrees 1 -> 2 -> 3 -> 6 -> 2 -> 3 -> 1: output, input gradient and weight
    gradients equal one process."""
    seed = fresh_seed(1)
    for r, errors in enumerate(run_ranks(6, gcd_scenario, seed, timeout=300)):
        assert max(errors.values()) < TOL, f"rank {r}: {errors}; {describe(seed)}"
