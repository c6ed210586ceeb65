"""Delta-rule kernels (DeltaNet: g=None; Gated DeltaNet: g given) against the token-by-token definition."""

import pytest
import torch
import torch.nn.functional as F

from stratagem.kernels.delta_rule import chunk_delta_rule, delta_rule, delta_rule_step, naive_delta_rule
from tests.seeds import describe, fresh_seed

NAMES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "dg", "dinitial_state")
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}

# (batch, heads, T, d_k, d_v, chunk_size): T not a multiple of the chunk, T below one chunk, d_k != d_v.
SHAPES = [(2, 2, 50, 16, 16, 16), (1, 3, 64, 8, 24, 32), (1, 2, 37, 32, 12, 64)]
# beta = sigmoid(x + shift), g = logsigmoid(x + shift): "near 0" / "near 1" push them to the ends of (0, 1).
REGIMES = {
    "random": (0.0, 2.0),
    "beta_near_0": (-7.0, 2.0),
    "beta_near_1": (7.0, 2.0),
    "gate_near_0": (0.0, -7.0),
    "gate_near_1": (0.0, 7.0),
}


def make_inputs(seed, batch, heads, length, d_k, d_v, gated, regime="random", dtype=torch.float64,
                initial_state=True):
    """Random inputs with L2-normalised keys, made in float64 so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    beta_shift, gate_shift = REGIMES[regime]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(batch, heads, length, d_k),
        "k": F.normalize(randn(batch, heads, length, d_k), dim=-1),
        "v": randn(batch, heads, length, d_v),
        "beta": torch.sigmoid(randn(batch, heads, length) + beta_shift),
        "g": F.logsigmoid(randn(batch, heads, length) + gate_shift) if gated else None,
        "initial_state": randn(batch, heads, d_k, d_v) if initial_state else None,
    }
    return {name: None if x is None else x.to(dtype).requires_grad_() for name, x in inputs.items()}


def run(fn, inputs, seed, **kwargs):
    """Outputs and gradients (in NAMES order) of a fixed random projection of (o, final_state)."""
    o, state = fn(**inputs, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = ((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
            + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum())
    leaves = [inputs[name] for name in ("q", "k", "v", "beta", "g", "initial_state")]
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    grads = iter(grads)
    return [o, state] + [None if x is None else next(grads) for x in leaves]


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def assert_close(got, want, tolerance, context):
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), f"{name}: {context}"
        if a is not None:
            error = relative_error(a, b)
            assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e} ({context})"


CASES = [(shape, gated, regime) for shape in SHAPES for gated in (False, True) for regime in REGIMES
         if gated or not regime.startswith("gate")]


def case_id(case):
    (batch, heads, length, d_k, d_v, chunk_size), gated, regime = case
    kind = "gated" if gated else "deltanet"
    return f"{kind}-{regime}-B{batch}H{heads}T{length}dk{d_k}dv{d_v}c{chunk_size}"


@pytest.mark.parametrize("shape, gated, regime", CASES, ids=[case_id(case) for case in CASES])
def test_chunk_matches_naive_outputs_states_and_gradients(shape, gated, regime):
    seed = fresh_seed(CASES.index((shape, gated, regime)))
    *dims, chunk_size = shape
    reference = run(naive_delta_rule, make_inputs(seed, *dims, gated, regime), seed)
    for dtype, tolerance in TOLERANCE.items():
        got = run(chunk_delta_rule, make_inputs(seed, *dims, gated, regime, dtype), seed, chunk_size=chunk_size)
        assert_close(got, reference, tolerance, f"{dtype}, {describe(seed)}")


@pytest.mark.parametrize("gated", [False, True])
def test_step_by_step_matches_chunked_with_initial_state(gated):
    inputs = make_inputs(3, 2, 2, 45, 16, 8, gated)
    o_chunk, state_chunk = chunk_delta_rule(**inputs, chunk_size=16)
    state, outputs = inputs["initial_state"], []
    for t in range(45):
        o_t, state = delta_rule_step(inputs["q"][:, :, t], inputs["k"][:, :, t], inputs["v"][:, :, t],
                                     inputs["beta"][:, :, t], state,
                                     g_t=None if inputs["g"] is None else inputs["g"][:, :, t])
        outputs.append(o_t)
    assert relative_error(torch.stack(outputs, dim=2), o_chunk) < 1e-10
    assert relative_error(state, state_chunk) < 1e-10


@pytest.mark.parametrize("gated", [False, True])
def test_split_sequence_with_carried_state_equals_one_pass(gated):
    inputs = make_inputs(5, 1, 2, 90, 16, 16, gated)
    o_full, state_full = chunk_delta_rule(**inputs, chunk_size=32)
    first = {name: x if x is None or name == "initial_state" else x[:, :, :37] for name, x in inputs.items()}
    second = {name: x if x is None else x[:, :, 37:] for name, x in inputs.items() if name != "initial_state"}
    o_first, state_mid = chunk_delta_rule(**first, chunk_size=32)
    o_second, state_end = chunk_delta_rule(**second, initial_state=state_mid, chunk_size=32)
    assert relative_error(torch.cat([o_first, o_second], dim=2), o_full) < 1e-10
    assert relative_error(state_end, state_full) < 1e-10


@pytest.mark.parametrize("gated, d_k, d_v, initial_state", [
    (False, 16, 16, True), (True, 16, 16, True), (True, 12, 32, False)])
def test_triton_forward_and_backward_match_torch_reference(gated, d_k, d_v, initial_state):
    from stratagem.kernels.delta_rule import triton_chunk_delta_rule  # imports triton: fails if missing

    seed = fresh_seed(100 + d_k + gated)
    reference = run(chunk_delta_rule, make_inputs(seed, 1, 2, 40, d_k, d_v, gated, initial_state=initial_state),
                    seed, chunk_size=16)
    got = run(triton_chunk_delta_rule, make_inputs(seed, 1, 2, 40, d_k, d_v, gated, dtype=torch.float32,
                                                   initial_state=initial_state), seed, chunk_size=16)
    assert_close(got, reference, 1e-5, describe(seed))


def test_dispatcher_uses_torch_chunked_kernel_on_cpu():
    inputs = make_inputs(7, 1, 2, 20, 8, 8, gated=True)
    for got, want in zip(delta_rule(**inputs, chunk_size=8), chunk_delta_rule(**inputs, chunk_size=8)):
        assert torch.equal(got, want)


def test_chunked_kernel_keeps_float32_under_bf16_autocast():
    inputs = make_inputs(9, 1, 2, 64, 16, 16, gated=True, dtype=torch.float32)
    want, _ = chunk_delta_rule(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = chunk_delta_rule(**inputs)
    assert got.dtype == torch.float32 and relative_error(got, want) < 1e-6


def test_bad_inputs_raise_clear_value_errors():
    from stratagem.kernels.delta_rule import triton_chunk_delta_rule

    good = make_inputs(0, 1, 2, 20, 16, 16, gated=True)
    for fn in (naive_delta_rule, chunk_delta_rule, triton_chunk_delta_rule):
        for name, bad, message in [
            ("k", good["k"][..., :8], "q and k must have the same shape"),
            ("v", good["v"][:, :, :10], "v must be"),
            ("beta", good["beta"][..., None], "beta must be"),
            ("g", good["g"][:, :1], "g must be"),
            ("initial_state", good["initial_state"][..., :4, :], "initial_state must be"),
            ("q", good["q"][0], "q must be"),
        ]:
            with pytest.raises(ValueError, match=message):
                fn(**{**good, name: bad})
    for fn in (chunk_delta_rule, triton_chunk_delta_rule):
        for chunk_size in (0, 24, 48.0):
            with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
                fn(**good, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="supports chunk_size"):
        triton_chunk_delta_rule(**good, chunk_size=8)
    wide = make_inputs(0, 1, 1, 4, 16, 256, gated=False)
    with pytest.raises(ValueError, match="d_k, d_v <= 128"):
        triton_chunk_delta_rule(**wide, chunk_size=16)
    q_t, state = good["q"][:, :, 0], good["initial_state"]
    with pytest.raises(ValueError, match="state must be"):
        delta_rule_step(q_t, q_t, q_t, good["beta"][:, :, 0], state[..., :3])
