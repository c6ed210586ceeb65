"""GLA kernels: chunked torch and Triton (interpreter) against the token-by-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stratagem.kernels.gla import chunk_gla, gla, gla_step, naive_gla
from tests.seeds import describe, fresh_seed

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
GATES = ("random", "near_0", "near_1")


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| over the whole tensor, in float64."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(seed, batch, heads, length, d_k, d_v, gate="random", initial_state=True, dtype=torch.float64):
    """q, k, v, g, initial state drawn in float64, then rounded to ``dtype``.

    Gates: ``random`` g = logsigmoid(N(0, 1)); ``near_0`` g ~ -20 (a ~ 2e-9, the state forgets
    everything each token); ``near_1`` g ~ -1e-4 (the state sums over the whole sequence).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    g = {"random": lambda: F.logsigmoid(randn(batch, heads, length, d_k)),
         "near_0": lambda: -20.0 * (0.5 + torch.rand(batch, heads, length, d_k, generator=gen, dtype=torch.float64)),
         "near_1": lambda: -1e-4 * torch.rand(batch, heads, length, d_k, generator=gen, dtype=torch.float64)}[gate]()
    inputs = dict(q=randn(batch, heads, length, d_k), k=randn(batch, heads, length, d_k),
                  v=randn(batch, heads, length, d_v), g=g,
                  initial_state=randn(batch, heads, d_k, d_v) if initial_state else None)
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


def run(fn, inputs, seed, **kwargs):
    """Forward, then backward of <o, do> + <S, dS> with random do, dS; returns o, S and the gradients."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items() if x is not None}
    o, state = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    d_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    d_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    ((o * d_o).sum() + (state * d_state).sum()).backward()
    return o, state, {name: x.grad for name, x in leaves.items()}


def assert_close(got, ref, tol, label=""):
    o, state, grads = got
    o_ref, state_ref, grads_ref = ref
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(state, state_ref)}
    errors.update({f"d{name}": rel_err(grads[name], grads_ref[name]) for name in grads_ref})
    assert max(errors.values()) < tol, f"{label}: {errors}"
    return errors


# (B, H, T, d_k, d_v, chunk): T not a multiple of the chunk, T < chunk (and no initial state:
# the zeros default), exact multiples, d_k != d_v.
SHAPES = [(2, 3, 50, 8, 12, 16), (1, 2, 100, 16, 8, 64), (1, 1, 5, 4, 4, 8), (2, 2, 96, 32, 16, 32)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}dk{}dv{}C{}".format(*s))
def test_chunk_matches_naive_outputs_states_and_gradients(shape, gate, dtype):
    *dims, chunk = shape
    seed = fresh_seed(100 * SHAPES.index(shape) + 10 * GATES.index(gate) + (dtype == torch.float32))
    inputs = make_inputs(seed, *dims, gate=gate, initial_state=shape != SHAPES[2], dtype=dtype)
    ref = run(naive_gla, {n: None if x is None else x.double() for n, x in inputs.items()}, seed)
    got = run(chunk_gla, inputs, seed, chunk_size=chunk)
    assert got[0].dtype == dtype
    assert_close(got, ref, TOLERANCE[dtype], describe(seed))


def test_chunk_computes_half_precision_in_float32():
    inputs = make_inputs(7, 1, 2, 40, 16, 16)
    o_ref, state_ref = naive_gla(**inputs)
    o, state = chunk_gla(**{n: x.bfloat16() for n, x in inputs.items()}, chunk_size=16)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(o, o_ref) < 2e-2 and rel_err(state, state_ref) < 2e-2


def test_recurrent_steps_match_chunk_with_initial_state():
    inputs = make_inputs(11, 2, 2, 37, 8, 12)
    o_ref, state_ref = chunk_gla(**inputs, chunk_size=16)
    state, outputs = inputs["initial_state"], []
    for t in range(37):
        o_t, state = gla_step(*(inputs[n][:, :, t] for n in "qkvg"), state)
        outputs.append(o_t)
    assert rel_err(torch.stack(outputs, dim=2), o_ref) < 1e-12
    assert rel_err(state, state_ref) < 1e-12


def test_splitting_the_sequence_with_the_state_carried_equals_one_pass():
    inputs = make_inputs(12, 1, 3, 90, 16, 8)
    o_ref, state_ref = chunk_gla(**inputs, chunk_size=32)
    first = {n: x[:, :, :41] for n, x in inputs.items() if n != "initial_state"}
    second = {n: x[:, :, 41:] for n, x in inputs.items() if n != "initial_state"}
    o_1, state_1 = chunk_gla(**first, initial_state=inputs["initial_state"], chunk_size=32)
    o_2, state_2 = chunk_gla(**second, initial_state=state_1, chunk_size=16)
    assert rel_err(torch.cat([o_1, o_2], dim=2), o_ref) < 1e-12
    assert rel_err(state_2, state_ref) < 1e-12


def test_dispatcher_runs_chunk_gla_on_cpu():
    inputs = make_inputs(13, 1, 2, 20, 8, 8)
    for got, ref in zip(gla(**inputs, chunk_size=8), chunk_gla(**inputs, chunk_size=8)):
        assert torch.equal(got, ref)


def triton_gla():
    """The Triton kernel under the interpreter; an ImportError (no triton) fails the test."""
    from triton.runtime.interpreter import InterpretedFunction

    from stratagem.kernels.gla import triton_chunk
    assert isinstance(triton_chunk._gla_fwd_kernel, InterpretedFunction), "kernels built without the interpreter"
    return triton_chunk.triton_chunk_gla


# (B, H, T, d_k, d_v, chunk, gate, initial state)
TRITON_CASES = [(1, 2, 40, 16, 16, 16, "random", True), (1, 2, 40, 16, 32, 16, "near_0", True),
                (2, 1, 70, 20, 8, 32, "near_1", False), (1, 1, 64, 16, 16, 64, "random", True)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}H{}T{}dk{}dv{}C{}-{}-h0{}".format(*c))
def test_triton_forward_and_backward_match_torch_reference_under_interpreter(case):
    *dims, chunk, gate, initial_state = case
    seed = fresh_seed(900 + TRITON_CASES.index(case))
    inputs = make_inputs(seed, *dims, gate=gate, initial_state=initial_state, dtype=torch.float32)
    ref = run(chunk_gla, {n: None if x is None else x.double() for n, x in inputs.items()}, seed)
    got = run(triton_gla(), inputs, seed, chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, ref, TOLERANCE[torch.float32], describe(seed))


def test_bad_inputs_raise_clear_value_errors():
    good = make_inputs(14, 1, 2, 24, 16, 16, dtype=torch.float32)
    for fn in (naive_gla, chunk_gla, gla, triton_gla()):
        with pytest.raises(ValueError, match="k must have q's shape"):
            fn(**{**good, "k": good["k"][..., :8]})
        with pytest.raises(ValueError, match="g must have q's shape"):
            fn(**{**good, "g": good["g"][:, :1]})
        with pytest.raises(ValueError, match=r"v must be \[B, H, T, d_v\]"):
            fn(**{**good, "v": good["v"][:, :, :10]})
        with pytest.raises(ValueError, match="initial_state must be"):
            fn(**{**good, "initial_state": good["initial_state"][..., :4]})
        with pytest.raises(ValueError, match="q must be"):
            fn(**{**good, "q": good["q"][0]})
    for fn in (chunk_gla, gla, triton_gla()):
        for size in (48, 0, 12):
            with pytest.raises(ValueError, match=f"chunk_size must be a positive power of two, got {size}"):
                fn(**good, chunk_size=size)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        triton_gla()(**good, chunk_size=128)
    wide = make_inputs(15, 1, 1, 8, 256, 16, initial_state=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="d_k and d_v must be at most 128"):
        triton_gla()(**wide, chunk_size=16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        triton_gla()(**{n: x.double() for n, x in good.items()}, chunk_size=16)
    with pytest.raises(ValueError, match="q_t, k_t, g_t must be"):
        gla_step(good["q"][:, :, 0], good["k"][:, :, 0, :8], good["v"][:, :, 0], good["g"][:, :, 0], None)
    with pytest.raises(ValueError, match="state must be"):
        gla_step(*(good[n][:, :, 0] for n in "qkvg"), good["initial_state"][..., :4])
