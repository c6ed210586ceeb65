"""The model: counts against the built modules, causality, RoPE, norm placements, config checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stratagem.errors import ConfigError, ConfigValueError
from stratagem.model import FLAVORS, LayerSpec, ModelConfig, Transformer, count_model, get_flavor
from stratagem.model.layers import FFNS, MIXERS, register_ffn, register_mixer
from stratagem.model.norms import RMSNorm
from stratagem.model.rope import RotaryEmbedding
from stratagem.model.transformer import Block

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=256)

COUNT_CONFIGS = {
    "gqa-pre": ModelConfig(**TINY),
    "gqa-peri": ModelConfig(**TINY, norm="peri"),
    "mha-tied": ModelConfig(**{**TINY, "n_kv_heads": 4}, tie_embeddings=True),
    "mqa-peri-tied": ModelConfig(**{**TINY, "n_kv_heads": 1, "n_layers": 4}, norm="peri", tie_embeddings=True,
                                 pattern=["attention", "attention+mlp"]),
}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# 1. parameter counts


@pytest.mark.parametrize("name", COUNT_CONFIGS)
def test_count_model_params_match_the_built_model(name):
    cfg = COUNT_CONFIGS[name]
    model = Transformer(cfg)
    counts = count_model(cfg, seq_len=32)
    assert counts.total_params == numel(model)
    assert [c.params for c in counts.layers] == [numel(block) for block in model.layers]
    assert counts.embedding_params == numel(model.tok_embeddings)
    assert counts.head_params == (0 if cfg.tie_embeddings else numel(model.output))
    assert counts.final_norm_params == numel(model.norm)
    assert counts.non_embedding_params == numel(model.layers) + numel(model.norm)


def test_real_llama_parameter_counts():
    assert count_model(get_flavor("llama-7b"), seq_len=4096).total_params == 6_738_415_616
    assert count_model(get_flavor("llama-1b"), seq_len=2048).total_params == 1_235_814_400


# 2. FLOPs


def test_flops_against_a_hand_count():
    cfg = ModelConfig(**TINY)  # dim 64, 4 heads of 16, 2 kv heads, ffn 192, vocab 256
    seq_len = 128
    q_proj = 2 * 64 * (4 * 16)
    k_proj = v_proj = 2 * 64 * (2 * 16)
    o_proj = 2 * (4 * 16) * 64
    avg_context = (128 + 1) / 2  # token t of 1..128 attends to t keys
    qk = 2 * 4 * 16 * avg_context
    av = 2 * 4 * 16 * avg_context
    mlp = 3 * (2 * 64 * 192)
    layer = q_proj + k_proj + v_proj + o_proj + qk + av + mlp
    head = 2 * 64 * 256
    assert layer == 114_816
    counts = count_model(cfg, seq_len)
    assert [c.flops_per_token for c in counts.layers] == [114_816, 114_816]
    assert counts.forward_flops_per_token == 2 * layer + head == 262_400
    assert counts.train_flops_per_token == 3 * 262_400


def test_mlp_flops_match_torch_flop_counter():
    cfg = ModelConfig(**TINY)
    mlp = FFNS["mlp"](cfg)
    B, T = 2, 8
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(B, T, cfg.dim))
    assert counter.get_total_flops() == B * T * mlp.flops_per_token(cfg, T)


# 3. activation memory


def saved_bytes_per_token(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Bytes of the distinct non-parameter, non-buffer storages autograd saves in one forward."""
    module(x)  # builds the lazy RoPE tables, so they are among the buffers below
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    B, T, _ = x.shape
    return sum(saved.values()) / (B * T)


def layer_types() -> list:
    """The layer types whose count is exact under this every-save hook. The linear-attention
    mixers' kernels also save tensors that only the dropped final state's graph holds; their
    counts are checked against the output's graph in test_linear_attention.py. The moe count
    leaves out per-call constants (group offsets, the balance loss's expert fractions): checked
    with them in test_moe.py."""
    linear = {"gla", "deltanet", "gated_deltanet"}
    return ([pytest.param(cls, id=f"mixer-{name}") for name, cls in MIXERS.items() if name not in linear]
            + [pytest.param(cls, id=f"ffn-{name}") for name, cls in FFNS.items() if name != "moe"])


@pytest.mark.parametrize("cls", layer_types())
def test_layer_type_activation_bytes_match_saved_tensors_exactly_in_float32(cls):
    cfg = ModelConfig(**TINY)
    B, T = 2, 24
    measured = saved_bytes_per_token(cls(cfg), torch.randn(B, T, cfg.dim, requires_grad=True))
    assert measured == cls.activation_bytes_per_token(cfg, T, 4)


@pytest.mark.parametrize("norm", ["pre", "peri"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_activation_bytes_match_saved_tensors(norm, dtype):
    """Exact in float32. In bfloat16 RoPE casts its tables per forward: a per-batch constant
    (not per token) the count leaves out, here under 2%."""
    cfg = ModelConfig(**TINY, norm=norm)
    spec = cfg.layer_specs()[0]
    B, T = 2, 32
    block = Block(cfg, spec).to(dtype)
    measured = saved_bytes_per_token(block, torch.randn(B, T, cfg.dim, dtype=dtype, requires_grad=True))
    expected = Block.activation_bytes_per_token(cfg, spec, T, dtype.itemsize)
    if dtype == torch.float32:
        assert measured == expected
    else:
        assert expected <= measured <= 1.02 * expected


# 4. causality


def test_changing_a_token_changes_only_its_own_and_later_logits():
    torch.manual_seed(0)
    model = Transformer(get_flavor("tiny"))
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 5, 15):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 256
            logits = model(changed)
            assert torch.equal(logits[:, :t], base[:, :t])
            assert not torch.allclose(logits[:, t], base[:, t])


def test_forward_shape_and_dtype():
    model = Transformer(get_flavor("tiny")).to(torch.bfloat16)
    logits = model(torch.randint(0, 256, (3, 7)))
    assert logits.shape == (3, 7, 256) and logits.dtype == torch.float32


# 5. RoPE


def test_rope_matches_explicit_rotation_matrices():
    head_dim, theta, T, H = 8, 10000.0, 6, 3
    rope = RotaryEmbedding(head_dim, theta)
    x = torch.randn(1, T, H, head_dim, dtype=torch.float64)
    out = rope(x.float()).double()
    expected = torch.empty_like(x)
    for m in range(T):
        for i in range(head_dim // 2):
            angle = m * theta ** (-2 * i / head_dim)
            rotation = torch.tensor([[math.cos(angle), -math.sin(angle)],
                                     [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
            expected[0, m, :, 2 * i:2 * i + 2] = x[0, m, :, 2 * i:2 * i + 2] @ rotation.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
    head_dim, T = 16, 12
    rope = RotaryEmbedding(head_dim, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = rope(q.expand(1, T, 1, head_dim).contiguous())[0, :, 0]
    rk = rope(k.expand(1, T, 1, head_dim).contiguous())[0, :, 0]
    for offset in (0, 3, -2):
        dots = torch.stack([rq[m] @ rk[m - offset] for m in range(max(0, offset), T + min(0, offset))])
        torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4])


def test_rope_tables_are_cached_for_the_longest_sequence_seen():
    rope = RotaryEmbedding(8, 10000.0)
    x = torch.randn(2, 16, 2, 8)
    full = rope(x)
    assert rope.cos.shape == (16, 4)
    torch.testing.assert_close(rope(x[:, :5]), full[:, :5], atol=0, rtol=0)
    assert rope.cos.shape == (16, 4)


# 6. norm placement


def scaled_output_projections_change(norm: str) -> float:
    """Max relative change of a block's output when wo and w2 are scaled by 100."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, norm=norm, norm_eps=1e-12)  # no eps, so peri-norm is exactly scale-free
    block = Block(cfg, cfg.layer_specs()[0])
    x = torch.randn(2, 8, cfg.dim)
    with torch.no_grad():
        before = block(x)
        block.mixer.wo.weight.mul_(100)
        block.ffn.w2.weight.mul_(100)
        after = block(x)
    return ((after - before).abs().max() / before.abs().max()).item()


def test_peri_norm_output_is_invariant_to_the_scale_of_output_projections():
    assert scaled_output_projections_change("peri") < 1e-5
    assert scaled_output_projections_change("pre") > 1.0


@pytest.mark.parametrize("norm, n_norms", [("pre", 2), ("peri", 4)])
def test_norms_per_block(norm, n_norms):
    cfg = ModelConfig(**TINY, norm=norm)
    block = Block(cfg, cfg.layer_specs()[0])
    assert sum(isinstance(m, RMSNorm) for m in block.modules()) == n_norms
    assert Block.n_norms(cfg) == n_norms


def test_rmsnorm_computes_in_float32_and_returns_the_input_dtype():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(3, 8) * 5
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).sqrt())
    xb = x.bfloat16()
    out = norm.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())


# 7. validation


@pytest.mark.parametrize("key, value", [
    ("dim", 0), ("n_layers", -1), ("n_heads", 0), ("n_kv_heads", 0), ("ffn_hidden", 0), ("vocab_size", 0),
    ("n_heads", 5),  # does not divide dim 64
    ("n_heads", 64),  # head_dim 1 is odd
    ("n_kv_heads", 3),  # does not divide n_heads 4
    ("pattern", []),
    ("n_layers", 3),  # with pattern of length 2, below
    ("pattern", ["mamba"]), ("pattern", ["attention+kan"]), ("pattern", ["attention+mlp+mlp"]),
    ("ffn", "kan"),
    ("norm", "post"),
    ("norm_eps", 0.0), ("init_std", -0.02), ("rope_theta", 0.0),
])
def test_validate_names_the_bad_key(key, value):
    cfg = ModelConfig(pattern=["attention", "attention+mlp"], n_layers=2)
    setattr(cfg, key, value)
    with pytest.raises(ConfigValueError) as err:
        cfg.validate()
    assert err.value.key == key
    with pytest.raises(ConfigValueError):
        Transformer(cfg)


def test_unknown_layer_type_lists_the_known_ones():
    with pytest.raises(ConfigValueError, match="known: attention"):
        ModelConfig(pattern=["mamba"]).validate()


def test_every_flavor_is_valid():
    for cfg in FLAVORS.values():
        cfg.validate()


def test_layer_specs_tile_the_pattern():
    cfg = ModelConfig(n_layers=4, pattern=["attention", "attention+mlp"], ffn="mlp")
    assert cfg.layer_specs() == [LayerSpec("attention", "mlp")] * 4
    assert ModelConfig(n_layers=3).layer_specs() == [LayerSpec("attention", "mlp")] * 3


def test_registry_rejects_incomplete_and_duplicate_layer_types():
    class Incomplete(torch.nn.Module):
        @classmethod
        def num_params(cls, cfg):
            return 0

    with pytest.raises(TypeError, match="flops_per_token"):
        register_ffn("incomplete")(Incomplete)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention")(MIXERS["attention"])
    assert "incomplete" not in FFNS


# 8. tied embeddings, state_dict


def test_tied_head_uses_the_embedding_weight():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, tie_embeddings=True))
    assert model.output is None
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer(h)
        expected = model.norm(h) @ model.tok_embeddings.weight.T
        torch.testing.assert_close(model(tokens), expected)
        model.tok_embeddings.weight[tokens[0, 0]].zero_()
        assert torch.all(model(tokens)[:, :, tokens[0, 0]] == 0)


def test_state_dict_holds_parameters_only():
    model = Transformer(get_flavor("tiny"))
    model(torch.randint(0, 256, (1, 8)))  # builds the RoPE tables
    assert model.layers[0].mixer.rope.cos.shape[0] == 8
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    assert not any("rope" in key for key in model.state_dict())


# 9. initialisation


def test_init_is_deterministic_under_a_seed():
    def build(seed):
        torch.manual_seed(seed)
        return Transformer(get_flavor("tiny-peri")).state_dict()

    a, b, c = build(1), build(1), build(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mixer.wq.weight"], c["layers.0.mixer.wq.weight"])


def test_output_projections_are_initialised_smaller_by_sqrt_two_n_layers():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=8, n_kv_heads=8, ffn_hidden=512, vocab_size=256, init_std=0.02)
    model = Transformer(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    block = model.layers[3]
    for w in (block.mixer.wq, block.mixer.wk, block.mixer.wv, block.ffn.w1, block.ffn.w3, model.output):
        assert w.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for w in (block.mixer.wo, block.ffn.w2):
        assert w.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, RMSNorm))


# flavors and the table


def test_get_flavor_returns_a_copy_and_rejects_unknown_names():
    cfg = get_flavor("tiny")
    cfg.pattern.append("attention")
    cfg.dim = 1
    assert FLAVORS["tiny"].pattern == ["attention"] and FLAVORS["tiny"].dim == 64
    assert dataclasses.replace(get_flavor("tiny-peri"), norm="pre") == get_flavor("tiny")
    with pytest.raises(ConfigError, match="unknown model flavor 'huge'; known flavors: tiny, "):
        get_flavor("huge")


def test_table_lists_every_layer_and_the_totals():
    table = count_model(get_flavor("llama-7b"), seq_len=4096).table()
    assert sum(line.startswith(("0 ", "31 ")) for line in table.splitlines()) == 2
    assert "6.74B total" in table and "GFLOP" in table and "KiB" in table
    assert "1.24B total" in count_model(get_flavor("llama-1b"), seq_len=2048).table()
