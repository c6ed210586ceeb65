"""`model.huggingface`: a stratagem checkpoint exported to a Hugging Face Llama folder gives the same
logits in transformers, imports back to the same weights, and other models are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from stratagem.launcher.cli import main
from stratagem.launcher.config import build_config
from stratagem.model import Transformer
from stratagem.model.huggingface import ConversionError, export_hf, import_hf, load_imported, read_hf
from stratagem.train.checkpoint import Checkpointer, TrainState

SEQ_LEN = 32
SHAPE = dict(dim=64, n_layers=2, n_heads=4, ffn_hidden=96, vocab_size=160, init_std=0.1, rope_theta=500.0,
             norm_eps=1e-5)
TOLERANCE = 2e-5  # float32; measured differences are below 5e-6


def checkpoint(tmp_path, **model) -> tuple[Transformer, object]:
    """A randomly initialised model saved as step 3 of a run, with an optimizer as training saves it."""
    config = build_config({"model": {**SHAPE, **model}, "data": {"seq_len": SEQ_LEN}})
    torch.manual_seed(0)
    net = Transformer(config.model)
    optimizer = torch.optim.AdamW(net.parameters())
    path = Checkpointer(tmp_path / "checkpoints").save(3, net, optimizer, TrainState(3, {}, {}), config.to_dict())
    return net, path


def tokens(vocab_size: int = SHAPE["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def hf_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # float32
    with torch.no_grad():
        return model(tokens()).logits


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("n_kv_heads, tied", [(4, False), (2, True)], ids=["mha", "gqa-tied"])
def test_export_gives_transformers_the_same_logits_and_import_the_same_weights(tmp_path, n_kv_heads, tied):
    net, path = checkpoint(tmp_path, n_kv_heads=n_kv_heads, tie_embeddings=tied)
    hf_config = export_hf(path, tmp_path / "hf")
    assert hf_config["num_key_value_heads"] == n_kv_heads and hf_config["tie_word_embeddings"] == tied
    assert hf_config["max_position_embeddings"] == SEQ_LEN and hf_config["architectures"] == ["LlamaForCausalLM"]
    with torch.no_grad():
        ours = net(tokens())
    difference = (hf_logits(tmp_path / "hf") - ours).abs().max().item()
    print(f"max |logits difference| stratagem vs transformers ({n_kv_heads} kv heads): {difference:.2e}")
    assert difference < TOLERANCE

    cfg = import_hf(tmp_path / "hf", tmp_path / "back")
    assert cfg == net.cfg
    back = load_imported(tmp_path / "back")
    original = net.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(tensor, original[name]) for name, tensor in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(tokens()), ours)


def test_a_transformers_llama_imports_with_its_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=160, rope_theta=500.0, rms_norm_eps=1e-5,
                         initializer_range=0.1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    cfg, state = read_hf(tmp_path / "hf")
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (2, False, 500.0)
    net = Transformer(cfg)
    net.load_state_dict(state)
    with torch.no_grad():
        difference = (net(tokens()) - hf_logits(tmp_path / "hf")).abs().max().item()
    print(f"max |logits difference| imported vs transformers: {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("model, expected", [
    ({"pattern": ["attention", "gla"]}, "layer 1 has the mixer 'gla', which a Llama does not have"),
    ({"pattern": ["attention+moe"]}, "layer 0 has the ffn 'moe', which a Llama does not have"),
    ({"norm": "peri"}, "model.norm = 'peri': a Llama normalises only the sublayers' inputs ('pre')"),
])
def test_other_models_are_refused_naming_the_layer(tmp_path, capsys, model, expected):
    _, path = checkpoint(tmp_path, **model)
    with pytest.raises(ConversionError) as error:
        export_hf(path, tmp_path / "hf")
    assert one_line(error).startswith(expected)
    assert main(["convert", "hf-export", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith(f"stratagem: error: {expected}")
    assert not (tmp_path / "hf").exists()


def test_bad_folders_are_refused_in_one_line_without_writing(tmp_path, capsys):
    _, path = checkpoint(tmp_path)
    export_hf(path, tmp_path / "hf")
    with pytest.raises(ConversionError, match="hf: exists and is not an empty directory"):
        export_hf(path, tmp_path / "hf")
    for key, value, expected in [("rope_scaling", {"rope_type": "llama3", "factor": 8.0},
                                  "rope_scaling = {'rope_type': 'llama3', 'factor': 8.0}: stratagem's Llama has "
                                  "rope_scaling = None"),
                                 ("model_type", "mistral", "model_type = 'mistral'"),
                                 ("head_dim", 8, "head_dim = 8, but stratagem's heads have"),
                                 ("num_key_value_heads", 3, "gives model.n_kv_heads = 3: does not divide")]:
        edited = shutil.copytree(tmp_path / "hf", tmp_path / f"edited-{key}")
        hf_config = json.loads((edited / "config.json").read_text())
        (edited / "config.json").write_text(json.dumps({**hf_config, key: value}))
        with pytest.raises(ConversionError) as error:
            import_hf(edited, tmp_path / "out")
        assert one_line(error).startswith(f"{edited / 'config.json'}: {expected}")
    assert not (tmp_path / "out").exists()
    assert main(["convert", "hf-import", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"stratagem: error: {tmp_path / 'missing' / 'config.json'}: "
                                              f"not a readable config.json")
    assert main(["convert", "hf-import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
    assert "model.toml: the [model] section (2 layers, dim 64" in capsys.readouterr().out
    assert main(["convert", "hf-export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def imported_run_config(tmp_path, folder, **run):
    """A config training the model of an `import_hf` folder (its [model] section) on the synthetic corpus."""
    from stratagem.launcher.config import load_config

    model = {key: value for key, value in dataclasses.asdict(load_config(str(folder / "model.toml")).model).items()
             if value is not None}
    return build_config({"model": model, "data": {"seq_len": SEQ_LEN},
                         "train": {"micro_batch_size": 4, "global_batch_tokens": 4 * SEQ_LEN, "steps": 1,
                                   "warmup_steps": 0, "eval_every": 0},
                         "run": {"dir": str(tmp_path), **run}})


def test_a_run_starts_from_imported_weights(tmp_path):
    """`stratagem convert hf-import`, then a run with run.init_weights: its first step's loss is the
    imported model's loss on that step's batch, not a freshly initialised model's."""
    from stratagem.data.pipeline import build_train_batches
    from stratagem.train.engine import loss_fn
    from stratagem.train.loop import train

    net, path = checkpoint(tmp_path, n_kv_heads=2)
    export_hf(path, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    config = imported_run_config(tmp_path, tmp_path / "imported", name="from-hf",
                                 init_weights=str(tmp_path / "imported" / "weights.safetensors"), seed=5)
    batch = build_train_batches(config.data, 4, 1, config.run.seed).next_step()[0]
    with torch.no_grad():
        expected = loss_fn(net, batch).item()
    first = train(config).loss
    assert first == pytest.approx(expected, rel=1e-6)
    fresh = train(imported_run_config(tmp_path, tmp_path / "imported", name="fresh", seed=5)).loss
    assert abs(fresh - expected) > 1e-3  # the weights made the difference


@pytest.mark.parametrize("change, expected", [
    (lambda weights: weights.pop("norm.weight"), "has no tensor norm.weight, which the model has"),
    (lambda weights: weights.update(extra=torch.zeros(1)), "has a tensor extra, which the model does not have"),
    (lambda weights: weights.update({"norm.weight": torch.zeros(3)}), "norm.weight has shape (3,), the model's is (64,)"),
])
def test_weights_that_do_not_fit_the_model_are_refused_before_any_work(tmp_path, change, expected):
    from safetensors.torch import save_file

    from stratagem.errors import CheckpointError
    from stratagem.train.loop import train

    net, _ = checkpoint(tmp_path)
    weights = dict(net.state_dict())
    change(weights)
    save_file(weights, tmp_path / "w.safetensors")
    config = build_config({"model": SHAPE, "data": {"seq_len": SEQ_LEN},
                           "train": {"micro_batch_size": 4, "global_batch_tokens": 4 * SEQ_LEN, "steps": 1,
                                     "warmup_steps": 0},
                           "run": {"dir": str(tmp_path), "name": "bad", "init_weights": str(tmp_path / "w.safetensors")}})
    with pytest.raises(CheckpointError) as info:
        train(config)
    assert one_line(info) == f"run.init_weights = {str(tmp_path / 'w.safetensors')!r}: {expected}"
    assert not (tmp_path / "bad").exists()
