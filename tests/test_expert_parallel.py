"""Expert parallelism (`parallel/expert_parallel.py`) on real gloo processes against one process with
the same weights: EP=2 (2 ranks), EP=4 and EP=2 x DP=2 (4 ranks), on tiny-moe and tiny-hybrid-moe,
with top-1, sigmoid routers, shared experts, capacity mode, aux-loss-free biases, and routing
skewed so that some ranks receive no rows at all.

Every rank takes its slice of each global batch. Compared with one process on the whole batch (in
capacity mode, on each rank's slice in turn, since capacity is per forward call): each rank's
logits, the mean loss, every gradient (expert weights gathered from their ranks), the metrics and
expert biases after every step, and every parameter after the AdamW steps.

One launch per world size runs all its cases; the references are computed here by the same
`run_case` without parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from stratagem.errors import ConfigValueError
from stratagem.model import Transformer, get_flavor
from stratagem.model.moe import (GroupedExperts, LocalDispatcher, moe_layers, moe_metrics, set_aux_loss_scale,
                                 update_expert_biases)
from stratagem.parallel.data_parallel import apply_data_parallel
from stratagem.parallel.expert_parallel import apply_expert_parallel, expert_parallel_mesh, rows_by_local_expert
from tests.distributed import run_ranks
from tests.seeds import describe, fresh_seed
from tests.test_data_parallel import assert_relative

LR = 1e-3
# After AdamW steps the one-process float32 run itself is only this close to float64 (worst tensor,
# measured over these cases and several seeds: 1.7e-4 relative to its largest weight): AdamW's
# first update is lr * g / (|g| + eps) per element, which rounding moves most where |g| ~ eps
# (eps 1e-6 here; the default 1e-8 measured 1.1e-3). Weights are compared at 10x that; a wrong
# gradient in any step moves weights by ~lr, 2.5e-2 of the largest ones (~0.04).
STEPS_TOLERANCE = 1e-3
SKEWED = -5.0  # expert bias of experts 2.. when skewed (scores lie in [0, 1]): all tokens pick 0 and 1


@dataclasses.dataclass(frozen=True)
class Case:
    flavor: str
    ep: tuple[int, ...]  # per layer (every layer of both flavors has a moe feed-forward)
    kind: str  # data-parallel kind of everything
    seed: int
    moe: tuple[tuple[str, object], ...] = ()  # MoEConfig overrides
    steps: int = 1
    skew: bool = False
    batch: int = 4  # global sequences per step
    seq: int = 16

    @property
    def capacity(self) -> bool:
        return dict(self.moe).get("mode") == "capacity"

    def describe(self) -> str:
        return describe(self.seed)


def cases(world: int, specs: dict[str, dict]) -> dict[str, Case]:
    return {name: Case(seed=fresh_seed(world * 100 + i), **spec) for i, (name, spec) in enumerate(specs.items())}


SKEW = {"skew": True, "moe": (("bias_update_rate", 0.01),)}
CAPACITY = (("mode", "capacity"), ("capacity_factor", 1.0), ("aux_loss_coef", 0.0))  # see test_capacity_...
CASES = {
    2: cases(2, {
        "moe-ep2-fsdp": dict(flavor="tiny-moe", ep=(2, 2), kind="fsdp", steps=3),
        "hybrid-sigmoid-shared-ep2-ddp": dict(flavor="tiny-hybrid-moe", ep=(2, 2), kind="ddp", moe=(
            ("router", "sigmoid"), ("renormalize", False), ("num_shared_experts", 1))),
        "skewed-bias-ep2-zero2": dict(flavor="tiny-moe", ep=(2, 2), kind="zero2", steps=2, **SKEW),
        "capacity-ep2": dict(flavor="tiny-moe", ep=(2, 2), kind="fsdp", moe=CAPACITY),
        "ep1-dp2": dict(flavor="tiny-moe", ep=(1, 1), kind="fsdp"),
    }),
    4: cases(4, {
        "moe-top1-ep4": dict(flavor="tiny-moe", ep=(4, 4), kind="fsdp", moe=(("top_k", 1),), steps=2),
        "hybrid-bias-ep2xdp2-zero2": dict(flavor="tiny-hybrid-moe", ep=(2, 2), kind="zero2", steps=3,
                                          moe=(("bias_update_rate", 0.01),)),
        "skewed-ep4-ddp": dict(flavor="tiny-moe", ep=(4, 4), kind="ddp", **SKEW),
        "skewed-capacity-ep2xdp2": dict(flavor="tiny-moe", ep=(2, 2), kind="fsdp", skew=True,
                                        moe=(*CAPACITY, ("bias_update_rate", 0.01))),
        "ep1-and-ep2-shared-dp4": dict(flavor="tiny-moe", ep=(1, 2), kind="fsdp", steps=2,
                                       moe=(("num_shared_experts", 1),)),
    }),
}
ALL = [(world, name) for world, named in CASES.items() for name in named]


# --- one run, parallel or not ---------------------------------------------------------------------

def build(case: Case) -> Transformer:
    cfg = get_flavor(case.flavor)
    cfg.moe = dataclasses.replace(cfg.moe, **dict(case.moe))
    torch.manual_seed(case.seed)
    model = Transformer(cfg)
    if case.skew:
        for layer in moe_layers(model).values():
            layer.expert_bias[2:] = SKEWED
    return model


def global_batches(case: Case) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(case.seed)
    return [torch.randint(0, 256, (case.batch, case.seq + 1), generator=generator) for _ in range(case.steps)]


def run_case(model: Transformer, batches: list[list[torch.Tensor]], whole: Callable = lambda name, t: t,
             mean: Callable = lambda t: t) -> dict:
    """AdamW steps, step s running forward and backward over the micro-batches ``batches[s]`` (LM
    loss and auxiliary losses divided by their number), then the expert-bias update. Returns the
    first step's logits and gradients, per step the loss, metrics and expert biases, and the final
    parameters. `whole` turns a parameter or gradient into the one-process tensor, `mean` averages
    a tensor over the data-parallel ranks."""
    set_aux_loss_scale(model, 1 / len(batches[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=1e-6)
    out = {"losses": [], "metrics": [], "biases": []}
    for step, chunks in enumerate(batches):
        losses, logits = [], []
        for tokens in chunks:
            y = model(tokens[:, :-1])
            loss = F.cross_entropy(y.flatten(0, 1), tokens[:, 1:].flatten())
            (loss / len(chunks)).backward()
            losses.append(loss.detach())
            logits.append(y.detach())
        if step == 0:
            out["logits"] = torch.cat(logits)
            out["grads"] = {name: whole(name, p.grad) for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_biases(model)
        out["losses"].append(mean(torch.stack(losses).mean()).item())
        metrics = moe_metrics(model)
        # the balance term and z-loss average this rank's tokens; the load and drops are global
        averaged = [key for key in metrics if key.endswith(("/aux_loss", "/z_loss"))]
        values = mean(torch.tensor([metrics[key] for key in averaged], dtype=torch.float64))
        out["metrics"].append({**metrics, **dict(zip(averaged, values.tolist()))})
        out["biases"].append([layer.expert_bias.clone() for layer in moe_layers(model).values()
                              if layer.expert_bias is not None])
    out["params"] = {name: whole(name, p.detach()) for name, p in model.named_parameters()}
    return out


# --- the ranks ------------------------------------------------------------------------------------

def parallelize(model: Transformer, case: Case, dp_mesh: DeviceMesh) -> dict[int, DeviceMesh]:
    """Each layer with its ep, then the embedding and the root; the ("edp", "ep") mesh per ep."""
    meshes = {ep: expert_parallel_mesh(dp_mesh, ep) for ep in sorted(set(case.ep))}
    for ep, mesh in meshes.items():
        layers = [i for i, layer_ep in enumerate(case.ep) if layer_ep == ep]
        apply_expert_parallel(model, dp_mesh, mesh, dp_kind=case.kind, layers=layers)
    for module in (model.tok_embeddings, model):
        apply_data_parallel(module, dp_mesh, case.kind)
    return meshes


def whole_tensor(case: Case, meshes: dict[int, DeviceMesh], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one process has it: expert weights are DTensors over their
    expert-parallel and data-parallel ranks, the others over their data-parallel shards."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor


def run_on_rank(case: Case, rank: int, world: int, dp_mesh: DeviceMesh) -> dict:
    model = build(case)
    meshes = parallelize(model, case, dp_mesh)
    received = {}  # rows per local expert of each layer's first forward

    def record(name: str, module, args) -> None:
        received.setdefault(name, args[1].tolist())

    for name, layer in moe_layers(model).items():
        layer.experts.register_forward_pre_hook(functools.partial(record, name))
    batches = [[tokens.chunk(world)[rank]] for tokens in global_batches(case)]
    result = run_case(model, batches, functools.partial(whole_tensor, case, meshes), mean_over_ranks)
    return {**result, "received": received}


def bad_inputs(dp_mesh: DeviceMesh) -> dict[str, str]:
    """The one-line errors of impossible requests, each raised before the model changed."""
    with pytest.raises(ConfigValueError) as err:
        expert_parallel_mesh(dp_mesh, 3)
    messages = {"ep3": str(err.value)}
    tiny_moe = get_flavor("tiny-moe")
    six = dataclasses.replace(tiny_moe, moe=dataclasses.replace(tiny_moe.moe, num_experts=6))
    requests = {"six-experts": (six, 4, "fsdp", None), "dense": (get_flavor("tiny"), 2, "fsdp", None),
                "dense-layer": (get_flavor("tiny"), 1, "fsdp", [0]), "kind": (tiny_moe, 2, "zero3", None)}
    for name, (cfg, ep, kind, layers) in requests.items():
        model = Transformer(cfg)
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ConfigValueError) as err:
            apply_expert_parallel(model, dp_mesh, expert_parallel_mesh(dp_mesh, ep), dp_kind=kind, layers=layers)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()), name
        assert all(isinstance(layer.dispatcher, LocalDispatcher) for layer in moe_layers(model).values()), name
        messages[name] = str(err.value)
    return messages


def all_cases(rank: int, world: int, cases: dict[str, Case]) -> dict:
    dp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    results = {name: run_on_rank(case, rank, world, dp_mesh) for name, case in cases.items()}
    return {**results, "errors": bad_inputs(dp_mesh) if world == 4 else {}}


@functools.cache
def launch(world: int) -> list[dict]:
    return run_ranks(world, all_cases, CASES[world], timeout=240)


@functools.cache
def reference(world: int, name: str) -> dict:
    """One process, the same weights: the whole batch, or each rank's slice in turn (capacity)."""
    case = CASES[world][name]
    batches = [list(tokens.chunk(world)) if case.capacity else [tokens] for tokens in global_batches(case)]
    return run_case(build(case), batches)


def ranks_and_reference(world: int, name: str):
    case = CASES[world][name]
    return case, launch(world), reference(world, name)


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world, name", ALL)
def test_logits_loss_and_every_gradient_equal_one_process(world, name):
    """First step: each rank's logits are its rows of the one-process logits, the mean loss is the
    one-process loss, and every gradient (auxiliary losses in the graph) the one-process gradient."""
    case, ranks, ref = ranks_and_reference(world, name)
    for rank, result in enumerate(ranks):
        what = f"{name} rank {rank} ({case.describe()})"
        run = result[name]
        assert_relative(run["logits"], ref["logits"].chunk(world)[rank], 1e-5, f"{what} logits")
        assert run["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5), what
        assert run["grads"].keys() == ref["grads"].keys()
        for param, grad in ref["grads"].items():
            assert_relative(run["grads"][param], grad, 1e-5, f"{what} grad of {param}")


@pytest.mark.parametrize("world, name", ALL)
def test_steps_metrics_and_expert_biases_stay_equal(world, name):
    """After every AdamW step: the loss, the global load's max/mean and dropped fraction (exact:
    counts), the mean balance term (but in capacity mode) and z-loss, the aux-loss-free biases
    (exact: sign steps); every parameter at the end (see STEPS_TOLERANCE)."""
    case, ranks, ref = ranks_and_reference(world, name)
    for rank, result in enumerate(ranks):
        what = f"{name} rank {rank} ({case.describe()})"
        run = result[name]
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), what
        for metrics, expected in zip(run["metrics"], ref["metrics"], strict=True):
            assert metrics.keys() == expected.keys()
            for key, value in expected.items():
                if case.capacity and key.endswith("/aux_loss"):
                    continue  # the reference's micro-batches see one slice's load (test_capacity_...)
                exact = key.endswith(("load_max_over_mean", "dropped_fraction"))
                assert metrics[key] == (value if exact else pytest.approx(value, rel=1e-5)), f"{what} {key}"
        for biases, expected in zip(run["biases"], ref["biases"], strict=True):
            assert len(biases) == len(expected) and all(map(torch.equal, biases, expected)), what
        for param, value in ref["params"].items():
            assert_relative(run["params"][param], value, STEPS_TOLERANCE, f"{what} {param} after {case.steps} steps")
    if dict(case.moe).get("bias_update_rate"):
        assert not torch.equal(ref["biases"][-1][0], build(case).layers[0].ffn.expert_bias)  # they moved


def test_skewed_routing_leaves_ranks_without_rows():
    """The skewed cases do what they are there for: every token picks experts 0 and 1, so only
    they receive rows; with EP=4 both live on rank 0 and ranks 1-3 receive no rows at all, with
    EP=2 rank 1 receives none and rank 0 none for its experts 2 and 3."""
    for world, name, ep in [(4, "skewed-ep4-ddp", 4), (2, "skewed-bias-ep2-zero2", 2)]:
        local = 8 // ep
        for rank, result in enumerate(launch(world)):
            place = rank % ep
            expected = [expert in (0, 1) for expert in range(place * local, (place + 1) * local)]
            for layer, rows in result[name]["received"].items():
                assert [count > 0 for count in rows] == expected, (name, rank, layer, rows)


def test_capacity_drops_per_rank_as_one_process_per_slice():
    """Capacity is per forward call, here each rank's slice: the case drops (so the per-slice
    reference matters) and its aux_loss_coef is 0, since the one-process reference runs the
    slices as micro-batches whose balance terms would see one slice's load, not the global one."""
    for world, name in [(2, "capacity-ep2"), (4, "skewed-capacity-ep2xdp2")]:
        dropped = reference(world, name)["metrics"][0]["moe/layer0/dropped_fraction"]
        assert 0 < dropped, name


def test_bad_requests_are_one_line_errors_before_any_change():
    expected = {
        "ep3": "ep = 3: must be a positive divisor of the layer's data-parallel size 4",
        "six-experts": "ep = 4: must divide moe.num_experts = 6 (layer 0)",
        "dense": "ep = 2: expert parallelism needs moe layers; the model has none",
        "dense-layer": "layers = [0]: layer 0 has no moe feed-forward (model layers with one: [])",
        "kind": "dp = 'zero3': unknown data-parallel kind; known: ddp, zero2, fsdp",
    }
    for result in launch(4):
        assert result["errors"] == expected


def test_rows_are_regrouped_by_local_expert_then_source_rank():
    """Rows from 3 ranks for 2 local experts: rank 0 sends 2 rows for expert 0 and 1 for expert 1,
    rank 1 one for expert 0, rank 2 two for expert 1."""
    counts = torch.tensor([[2, 1], [1, 0], [0, 2]])
    assert rows_by_local_expert(counts).tolist() == [0, 1, 3, 2, 4, 5]
    assert rows_by_local_expert(torch.zeros(2, 3, dtype=torch.long)).tolist() == []


def test_experts_without_rows_run_and_give_zero_gradients():
    """A rank whose experts receive no rows still runs them: FSDP reduces the experts' gradients on
    every rank together, so each needs one (zeros here)."""
    experts = GroupedExperts(2, 16, 8)
    experts.init_weights(0.1, 0.1)
    out = experts(torch.zeros(0, 16), torch.zeros(2, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0, 16)
    for weight in (experts.w1, experts.w3, experts.w2):
        assert torch.equal(weight.grad, torch.zeros_like(weight))
