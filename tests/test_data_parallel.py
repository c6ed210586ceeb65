"""Data parallelism (`parallel/data_parallel.py`) on 4 real gloo processes: each kind trains the
tiny model like one process on the whole batch, model-state memory falls ddp -> zero2 -> fsdp,
the gradient divisor applies to every kind on meshes of 4 ranks and of 1, bad kinds are one line.

One launch runs every scenario (start-up costs seconds per process); the tests compare its results
with one-process references computed here.
"""

from __future__ import annotations

import functools
from itertools import chain

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from stratagem.errors import ConfigValueError
from stratagem.model import Transformer, get_flavor
from stratagem.parallel.data_parallel import apply_data_parallel
from stratagem.parallel.plan import DP_KINDS
from tests.distributed import run_ranks

WORLD = 4
STEPS = 3
BATCH, SEQ = 8, 16  # global sequences per step (2 per rank) and their length
DIVISOR = 8.0


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_flavor("tiny"))


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one process holds it (DTensors gathered)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def parallelize(model: Transformer, mesh: DeviceMesh, kind: str, divisor: float | None = None) -> None:
    """As the plan runtime will: each layer, the embedding, then the root (final norm and head)."""
    for module in [*model.layers, model.tok_embeddings, model]:
        apply_data_parallel(module, mesh, kind, gradient_divide_factor=divisor)


# --- model-state memory -------------------------------------------------------------------------

def model_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages held as model state right now: parameters as the optimizer
    holds them (shards under zero2 / fsdp) and as the modules hold them (gathered ones while FSDP
    has them registered), gradients, optimizer state. A freed gathered parameter has 0 bytes."""
    storages = {}

    def add(tensor) -> None:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for param in chain(model.parameters(), *(group["params"] for group in opt.param_groups)):
        add(param)
        add(param.grad)
    for state in opt.state.values():
        for value in state.values():
            add(value)
    return sum(storages.values())


class PeakTracker:
    """The highest `model_state_bytes` seen at every module's forward (before and after) and every
    leaf module's backward, and whenever `sample` is called."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt, self.peak = model, opt, 0
        for module in model.modules():
            module.register_forward_pre_hook(lambda *_: self.sample())
            module.register_forward_hook(lambda *_: self.sample())
            if not list(module.children()):
                module.register_full_backward_hook(lambda *_: self.sample())

    def sample(self) -> None:
        self.peak = max(self.peak, model_state_bytes(self.model, self.opt))


# --- the ranks ------------------------------------------------------------------------------------

def train_rank(rank: int, world: int, mesh: DeviceMesh, kind: str) -> dict:
    """STEPS AdamW steps on this rank's slice of each global batch: the mean loss over the ranks
    per step, the first step's gradients and the final parameters (whole), the peak model-state bytes."""
    model = tiny_model()
    parallelize(model, mesh, kind)
    opt = optimizer(model)
    tracker = PeakTracker(model, opt)
    losses, grads = [], None
    for tokens in global_batches():
        loss = lm_loss(model, tokens.chunk(world)[rank])
        loss.backward()
        tracker.sample()
        grads = grads or {name: full(p.grad) for name, p in model.named_parameters()}
        opt.step()
        tracker.sample()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    params = {name: full(p).detach() for name, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params, "peak_state_bytes": tracker.peak}


def divided_grads_rank(rank: int, world: int, mesh: DeviceMesh, kind: str) -> dict[str, torch.Tensor]:
    """Gradients of this rank's slice of the first batch with the divisor DIVISOR."""
    model = tiny_model()
    parallelize(model, mesh, kind, DIVISOR)
    lm_loss(model, global_batches()[0].chunk(world)[rank]).backward()
    return {name: full(p.grad) for name, p in model.named_parameters()}


def scenarios(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    alone = mesh._unflatten(0, (world, 1), ("replica", "alone"))["alone"]  # each rank a mesh of its own
    assert alone.size() == 1
    return {"train": {kind: train_rank(rank, world, mesh, kind) for kind in DP_KINDS},
            "divided": {(kind, size): divided_grads_rank(rank, world, m, kind)
                        for kind in DP_KINDS for size, m in ((world, mesh), (1, alone))}}


@functools.cache
def results() -> list[dict]:
    return run_ranks(WORLD, scenarios, timeout=180)


# --- the one-process reference ----------------------------------------------------------------------

@functools.cache
def reference() -> dict:
    model = tiny_model()
    opt = optimizer(model)
    losses = []
    for tokens in global_batches():
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "params": {name: p.detach() for name, p in model.named_parameters()}}


def reference_grads(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model = tiny_model()
    lm_loss(model, tokens).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual - expected| <= tolerance * max |expected| (expected not all zero)."""
    scale = expected.abs().max().item()
    assert actual.shape == expected.shape and scale > 0, what
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} vs max |expected| {scale:.3g}"


# --- tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DP_KINDS)
def test_each_kind_trains_like_one_process_on_the_whole_batch(kind):
    """4 ranks, 2 sequences each, 3 AdamW steps: the loss of every step, the first step's gradients
    (which AdamW's updates could not tell from a multiple of them) and every parameter at the end
    equal one process on all 8 sequences, on every rank."""
    ref = reference()
    first_grads = reference_grads(global_batches()[0])
    init = tiny_model().state_dict()
    for rank, result in enumerate(results()):
        run = result["train"][kind]
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-4), f"rank {rank}"
        for name, expected in first_grads.items():
            assert_relative(run["grads"][name], expected, 1e-5, f"{kind} rank {rank} grad of {name}")
        assert run["params"].keys() == ref["params"].keys()
        for name, expected in ref["params"].items():
            assert_relative(run["params"][name], expected, 1e-4, f"{kind} rank {rank} {name}")
        moved = max((run["params"][n] - init[n]).abs().max() for n in ref["params"])
        assert moved > 1e-3  # the steps did change the weights


def test_model_state_memory_falls_from_ddp_to_zero2_to_fsdp():
    """Peak bytes of parameters + gradients + AdamW state per rank, for P bytes of parameters.
    Measured (tiny, 4 ranks, float32), each peak in the middle of a backward: ddp 4.5 P (the
    parameters, FSDP2's gathered copy of them, which its replicate mode keeps apart from the whole
    "shard", half the gradients so far and two Adam moments), zero2 2.25 P (every layer gathered, a
    quarter of the rest), fsdp 1.84 P (a layer or two gathered at a time, their unsharded gradients
    before the reduce-scatter)."""
    param_bytes = sum(p.numel() * 4 for p in tiny_model().parameters())
    peaks = {kind: [r["train"][kind]["peak_state_bytes"] for r in results()] for kind in DP_KINDS}
    print({kind: [round(b / param_bytes, 2) for b in per_rank] for kind, per_rank in peaks.items()},
          "x parameter bytes", param_bytes)
    for rank in range(WORLD):
        ddp, zero2, fsdp = (peaks[kind][rank] for kind in DP_KINDS)
        assert ddp > zero2 > fsdp, (rank, peaks)
        assert ddp >= 4 * param_bytes  # everything whole: parameters, gradients and two moments
        # the parameters' shards, gradients and moments are a quarter: 4 P / 4, plus what is gathered
        assert fsdp < 2 * param_bytes


@pytest.mark.parametrize("size", [WORLD, 1])
@pytest.mark.parametrize("kind", DP_KINDS)
def test_gradient_divide_factor_replaces_the_mean(kind, size):
    """Gradients are sum / DIVISOR over the mesh: over 4 ranks, 4 / DIVISOR times the whole batch's
    (mean) gradient; on a mesh of one rank, 1 / DIVISOR times that rank's slice's gradient."""
    tokens = global_batches()[0]
    for rank, result in enumerate(results()):
        expected = reference_grads(tokens if size == WORLD else tokens.chunk(WORLD)[rank])
        grads = result["divided"][(kind, size)]
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert_relative(grads[name], grad * size / DIVISOR, 1e-5, f"{kind} on {size} rank {rank} {name}")


def test_unknown_kind_and_bad_divisor_are_one_line_config_errors():
    with pytest.raises(ConfigValueError) as err:
        apply_data_parallel(nn.Linear(2, 2), None, "zero3")
    assert str(err.value) == "dp = 'zero3': unknown data-parallel kind; known: ddp, zero2, fsdp"
    with pytest.raises(ConfigValueError, match="gradient_divide_factor = 0: must be positive"):
        apply_data_parallel(nn.Linear(2, 2), None, "fsdp", gradient_divide_factor=0)
