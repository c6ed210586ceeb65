"""Linear-attention and sliding-window mixers: counts against the built modules, causality,
the window, config errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stratagem.errors import ConfigError, ConfigValueError
from stratagem.launcher.config import load_config
from stratagem.model import ModelConfig, Transformer, count_model, get_flavor
from stratagem.model.layers import MIXERS

NEW_MIXERS = ["gla", "deltanet", "gated_deltanet", "swa"]
LINEAR = ["gla", "deltanet", "gated_deltanet"]
# head_dim 16, 2 kv heads for attention and swa; chunks of 16 and a window of 16 so that short
# sequences span several of them.
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=64, chunk_size=16,
             swa_window=16)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# 1. parameters


@pytest.mark.parametrize("conv_size", [4, 0])
@pytest.mark.parametrize("name", NEW_MIXERS)
def test_mixer_params_equal_numel(name, conv_size):
    cfg = ModelConfig(**SMALL, conv_size=conv_size)
    assert MIXERS[name].num_params(cfg) == numel(MIXERS[name](cfg))


@pytest.mark.parametrize("flavor", ["tiny-hybrid", "tiny-swa-hybrid", "tiny-gla"])
def test_hybrid_model_params_equal_numel(flavor):
    cfg = get_flavor(flavor)
    model = Transformer(cfg)
    counts = count_model(cfg, seq_len=64)
    assert counts.total_params == numel(model)
    assert [c.params for c in counts.layers] == [numel(block) for block in model.layers]
    assert [c.mixer for c in counts.layers] == [spec.mixer for spec in cfg.layer_specs()]


# 2. FLOPs


def test_gated_deltanet_flops_against_a_hand_count():
    cfg = ModelConfig(**SMALL)  # dim 64, 4 heads of D = 16, chunks of C = 16, conv 4
    seq_len = 64
    width = 4 * 16
    projections = 5 * 2 * 64 * width  # q, k, v, output gate, o
    convs = 3 * 2 * width * 4
    gates = 2 * 2 * 64 * 4  # beta and decay: dim -> one value per head
    # Per token and head, from the chunked form (kernels/delta_rule/chunk.py):
    kk_qk = 2 * 2 * 16 * 16  # K K^T and Q K^T: each token's row of C scores, D wide
    solve = 2 * 15 * (16 + 16) // 2  # forward substitution: on average (C - 1) / 2 earlier rows, 2 D columns
    state = 3 * 2 * 16 * 16  # W S, K^T U (state update), Q S (read the state): D x D each
    intra_out = 2 * 16 * 16  # (Q K^T) U
    kernel = 4 * (kk_qk + solve + state + intra_out)
    assert kernel == 4 * 3552
    assert MIXERS["gated_deltanet"].flops_per_token(cfg, seq_len) == projections + convs + gates + kernel == 57_728


def test_gla_flops_against_a_hand_count():
    cfg = ModelConfig(**SMALL)
    width = 4 * 16
    layer = 5 * 2 * 64 * width + 3 * 2 * width * 4 + 2 * 16 * (64 + width)  # + the rank-16 gate
    scores = 2 * 16 * (16 + 1) // 2  # D-wide products with itself and, on average, (C - 1) / 2 earlier tokens
    av = 2 * 16 * 16  # A V over the whole C x C block
    state = 2 * 16 * 16 + 2 * 16 * 16  # update and read
    assert scores == 272
    assert MIXERS["gla"].flops_per_token(cfg, 64) == layer + 4 * (scores + av + state) == 53_824


# FLOPs torch's counter does not see: the delta rule's triangular solve and GLA's diagonal
# scores q_i . k_i (element-wise products summed), per token; the counter sees the conv's
# conv_size - 1 extra (dropped) outputs per sequence. Everything else must agree exactly.
UNCOUNTED = {
    "gla": lambda cfg: cfg.n_heads * 2 * cfg.head_dim,
    "deltanet": lambda cfg: cfg.n_heads * 2 * (cfg.chunk_size - 1) * cfg.head_dim,
    "gated_deltanet": lambda cfg: cfg.n_heads * 2 * (cfg.chunk_size - 1) * cfg.head_dim,
}


@pytest.mark.parametrize("chunk_size", [8, 32])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_flops_match_torch_flop_counter(name, chunk_size):
    cfg = ModelConfig(**{**SMALL, "chunk_size": chunk_size})
    B, T, width = 2, 64, cfg.n_heads * cfg.head_dim
    with FlopCounterMode(display=False) as counter:
        MIXERS[name](cfg)(torch.randn(B, T, cfg.dim))
    conv_extra = 3 * 2 * width * cfg.conv_size * (cfg.conv_size - 1) / T
    measured = counter.get_total_flops() / (B * T) - conv_extra + UNCOUNTED[name](cfg)
    assert measured == MIXERS[name].flops_per_token(cfg, T)


def test_swa_scores_count_only_the_window():
    cfg = ModelConfig(**SMALL)  # window 16, 4 heads of 16
    scores = lambda name, T: MIXERS[name].flops_per_token(cfg, T) - MIXERS[name].flops_per_token(cfg, 1)
    assert scores("swa", 16) == scores("attention", 16)
    # T = 64: positions 1..16 see t keys, the other 48 see 16: (136 + 768) / 64 keys on average.
    assert scores("swa", 64) == 4 * 4 * 16 * (136 + 48 * 16) // 64 - 4 * 4 * 16 * 1
    assert scores("swa", 8192) < 4 * 4 * 16 * 16 < scores("attention", 64)  # at most window keys


# 3. activation memory


def retained_bytes_per_token(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Bytes of the distinct non-parameter storages saved by the autograd graph of the output.

    Walking the output's graph (rather than hooking every save) leaves out what only a dropped
    output holds, such as the graph of the kernels' final state, which is freed as soon as the
    layer discards it.
    """
    out = module(x)
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in own:
                        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    B, T, _ = x.shape
    return sum(saved.values()) / (B * T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size, head_dim, conv_size", [(16, 16, 4), (32, 8, 0)])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_activation_bytes_match_retained_tensors(name, chunk_size, head_dim, conv_size, dtype):
    """Exact when T is a multiple of chunk_size, up to what is per batch rather than per token
    (the kernels' C x C boolean masks, two at most, and Gated DeltaNet's exp(A_log)) and the
    count's rounding down to whole bytes per token."""
    cfg = ModelConfig(dim=4 * head_dim, n_heads=4, n_kv_heads=2, chunk_size=chunk_size, conv_size=conv_size)
    B, T = 2, 64
    x = torch.randn(B, T, cfg.dim, dtype=dtype, requires_grad=True)
    measured = retained_bytes_per_token(MIXERS[name](cfg).to(dtype), x)
    counted = MIXERS[name].activation_bytes_per_token(cfg, T, dtype.itemsize)
    per_batch = 2 * chunk_size**2 + 64  # two masks; exp(A_log) and its negation (16 bytes each), scalars
    assert 0 <= measured - counted < per_batch / (B * T) + 1


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_activation_bytes_of_a_padded_sequence(name):
    """T = 40 pads to 48 (chunks or windows of 16). Counted within 1%: in float32 the per-head
    norm's input is a view of the kernel's padded output, 8/40 of which the count leaves out."""
    cfg = ModelConfig(**SMALL)
    B, T = 2, 40
    measured = retained_bytes_per_token(MIXERS[name](cfg), torch.randn(B, T, cfg.dim, requires_grad=True))
    counted = MIXERS[name].activation_bytes_per_token(cfg, T, 4)
    assert counted <= measured <= 1.01 * counted


def test_swa_activation_bytes_exact_beyond_the_window():
    cfg = ModelConfig(**SMALL)
    B, T = 2, 64
    measured = retained_bytes_per_token(MIXERS["swa"](cfg), torch.randn(B, T, cfg.dim, requires_grad=True))
    assert measured == MIXERS["swa"].activation_bytes_per_token(cfg, T, 4)


# 4. causality and the window


@pytest.mark.parametrize("name", [*NEW_MIXERS, "attention"])
def test_changing_a_position_never_changes_earlier_outputs(name):
    """Exactly: masked scores are exact zeros and the triangular solve reads earlier rows only.
    T = 40 with chunks and a window of 16: positions inside, at the edge of and across chunks."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    mixer = MIXERS[name](cfg)
    mixer.init_weights(0.2, 0.2)
    x = torch.randn(2, 40, cfg.dim)
    with torch.no_grad():
        base = mixer(x)
        for t in (0, 15, 16, 17, 39):
            changed = x.clone()
            changed[:, t] += 1.0
            out = mixer(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t]), t


def test_swa_sees_exactly_window_positions():
    """Position t's output depends on positions t - 15 .. t (window 16) and on nothing earlier."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    swa = MIXERS["swa"](cfg)
    swa.init_weights(0.2, 0.2)
    x = torch.randn(1, 64, cfg.dim)
    with torch.no_grad():
        base = swa(x)
        for s in (0, 10, 20, 33):
            changed = x.clone()
            changed[:, s] += 1.0
            out = swa(changed)
            affected = (out != base).any(dim=-1)[0].nonzero().squeeze(1).tolist()
            assert affected == list(range(s, min(s + 16, 64))), s


def test_swa_equals_attention_within_the_window():
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    swa, attention = MIXERS["swa"](cfg), MIXERS["attention"](cfg)
    attention.load_state_dict(swa.state_dict())
    x = torch.randn(2, 16, cfg.dim)
    torch.testing.assert_close(swa(x), attention(x), rtol=0, atol=0)


# 5. config


@pytest.mark.parametrize("key, value, reason", [
    ("chunk_size", 48, "power of two"),
    ("chunk_size", 0, "power of two"),
    ("conv_size", -1, "must not be negative"),
    ("swa_window", 0, "must be positive"),
    ("n_heads", 3, "does not divide dim"),
    ("pattern", ["gated_deltanet", "mamba"],
     "unknown mixer 'mamba'; known: attention, deltanet, gated_deltanet, gla, swa"),
    ("n_layers", 5, "not a multiple of the pattern's 2 layers"),
    ("n_layers", 6, "not a multiple of the pattern's 4 layers"),  # with pattern 3*gated_deltanet, attention
    ("pattern", ["0*gla"], "repeat count '0' must be a positive integer"),
    ("pattern", ["x*gla"], "repeat count 'x' must be a positive integer"),
    ("pattern", ["2*3*gla"], "each entry must be"),
])
def test_bad_linear_attention_configs_name_the_key(key, value, reason):
    cfg = ModelConfig(**{**SMALL, "pattern": ["gated_deltanet", "attention"]})
    if key == "n_layers" and value == 6:
        cfg.pattern = ["3*gated_deltanet", "attention"]
    setattr(cfg, key, value)
    with pytest.raises(ConfigValueError, match=re.escape(reason)) as err:
        cfg.validate()
    assert err.value.key == key


def test_bad_chunk_size_is_one_line_from_the_command_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--model.flavor=tiny-hybrid", "--model.chunk_size=48"])
    assert str(err.value) == ("override --model.chunk_size=48: model.chunk_size = 48: must be a power of two")


def test_a_ratio_pattern_expands_in_order_and_tiles():
    cfg = ModelConfig(**{**SMALL, "n_layers": 8, "pattern": ["3*gated_deltanet", "attention+mlp"]})
    cfg.validate()
    mixers = [spec.mixer for spec in cfg.layer_specs()]
    assert mixers == (["gated_deltanet"] * 3 + ["attention"]) * 2
    assert ModelConfig(**{**SMALL, "n_layers": 3, "pattern": ["3*gla"]}).layer_specs() == \
        ModelConfig(**{**SMALL, "n_layers": 3, "pattern": ["gla"]}).layer_specs()


def test_hybrid_pattern_from_the_command_line():
    config = load_config(None, ["--model.n_layers=4", "--model.pattern=gated_deltanet,gated_deltanet,gla,swa"])
    assert [s.mixer for s in config.model.layer_specs()] == ["gated_deltanet", "gated_deltanet", "gla", "swa"]
