"""Hugging Face Llama folders to and from stratagem: export a checkpoint, import a folder.

Why: a model trained here is evaluated and served with the Hugging Face tools, and a Llama from
the Hub is sampled or evaluated here. A stratagem model is a Llama when every layer is
``attention`` + ``mlp`` with pre-norm: RMSNorm, RoPE, SwiGLU, no biases, the same shapes. Other layer
types have no Llama counterpart and are refused, naming the layer.

Besides renaming, one thing differs: RoPE. stratagem rotates consecutive channel pairs (2i, 2i+1)
of a head (`model.rope`), Hugging Face's Llama the pairs (i, i + head_dim / 2) ("rotate_half"),
pair i by the same angle in both. Export therefore reorders the rows of wq and wk within each head,
stratagem channel 2i to channel i and 2i + 1 to i + head_dim / 2: queries and keys come out of RoPE
as the same vectors with their channels reordered alike, so their dot products, hence attention,
do not change. Import applies the inverse order.

Export reads a checkpoint directory (``step-N``): its ``meta.json`` gives the config, and DCP
loads only the model's tensors (not the optimizer's). It writes ``config.json`` (LlamaConfig's
fields; ``max_position_embeddings`` is the run's ``data.seq_len``; the special token ids are left
null: the checkpoint does not know its tokenizer) and ``model.safetensors``.

Import reads ``config.json`` and ``model.safetensors`` (or the shards a
``model.safetensors.index.json`` lists), refuses what a stratagem model cannot express (RoPE
scaling, biases, another activation or head size), and writes a model folder: ``model.toml``, a
config holding the ``[model]`` section (copy it into a run's config, or pass the file to
``stratagem model``), and ``weights.safetensors``, the `Transformer`'s state dict, which
`load_imported` loads (e.g. for `model.generate`). It is not a training checkpoint:
``run.init_from`` continues another run's optimizer and data position, which a Hugging Face
folder does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from stratagem.errors import CheckpointError, ConfigValueError, StratagemError
from stratagem.model.config import ModelConfig
from stratagem.model.transformer import Transformer

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
MODEL_CONFIG, MODEL_WEIGHTS = "model.toml", "weights.safetensors"
DTYPES = ("float32", "bfloat16", "float16")
# A layer's parameters: stratagem name -> Hugging Face name (under model.layers.<i>.).
LAYER_NAMES = {
    "mixer_norm.weight": "input_layernorm.weight",
    "mixer.wq.weight": "self_attn.q_proj.weight",
    "mixer.wk.weight": "self_attn.k_proj.weight",
    "mixer.wv.weight": "self_attn.v_proj.weight",
    "mixer.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
ROTATED = ("mixer.wq.weight", "mixer.wk.weight")  # rows reordered for RoPE's channel pairs


class ConversionError(StratagemError):
    """A model or folder that cannot be converted to or from a Hugging Face Llama."""


# ---- shared -------------------------------------------------------------------------------------

def check_llama(cfg: ModelConfig) -> None:
    """ConversionError unless every layer is attention + mlp with pre-norm (a Llama)."""
    for i, spec in enumerate(cfg.layer_specs()):
        for kind, name, llama in (("mixer", spec.mixer, "attention"), ("ffn", spec.ffn, "mlp")):
            if name != llama:
                raise ConversionError(f"layer {i} has the {kind} {name!r}, which a Llama does not have "
                                      f"(its layers are 'attention' + 'mlp')")
    if cfg.norm != "pre":
        raise ConversionError(f"model.norm = {cfg.norm!r}: a Llama normalises only the sublayers' inputs ('pre')")


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Every parameter of the model: stratagem name -> Hugging Face name."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in LAYER_NAMES.items()})
    return names


def _rope_order(head_dim: int) -> torch.Tensor:
    """Hugging Face channel j of a head is stratagem channel ``order[j]`` (see the module docstring)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _reorder_heads(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    return weight.view(-1, head_dim, weight.shape[1])[:, order].reshape(weight.shape)


def _check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not an empty directory; choose a new or empty one")


# ---- export -------------------------------------------------------------------------------------

def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """Write the model of ``checkpoint`` (a ``step-N`` directory) to ``out`` as a Hugging Face Llama
    folder with tensors of ``dtype``; returns its config.json. ``out`` must be new or empty."""
    from safetensors.torch import save_file

    from stratagem.launcher.config import build_config
    from stratagem.train.checkpoint import Checkpointer

    checkpoint, out = Path(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint directory (<run>/checkpoints/step-N with DCP's "
                              f".metadata and meta.json)")
    config = build_config(Checkpointer.read_meta(checkpoint)["config"], source=str(checkpoint / "meta.json"))
    cfg = config.model
    check_llama(cfg)
    _check_new_folder(out)
    head_dim, order, names = cfg.head_dim, _rope_order(cfg.head_dim), hf_names(cfg)
    tensors = {}
    for ours, tensor in _checkpoint_model(checkpoint, cfg).items():
        if ours.endswith(ROTATED):
            tensor = _reorder_heads(tensor, head_dim, order)
        tensors[names[ours]] = tensor.to(getattr(torch, dtype)).contiguous()
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers, "head_dim": head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": config.data.seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": dtype,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    return hf_config


def _checkpoint_model(checkpoint: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint, loaded by DCP into a state dict shaped by ``cfg``."""
    from stratagem.train.checkpoint import _single_process_quietly

    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    state = {name: torch.empty_like(tensor, device="cpu") for name, tensor in shapes.items()}
    try:
        with _single_process_quietly():
            dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{checkpoint}: cannot load its model ({reason})") from None
    return state


# ---- import -------------------------------------------------------------------------------------

def import_hf(folder: str | Path, out: str | Path) -> ModelConfig:
    """Convert the Hugging Face Llama ``folder`` into the model folder ``out`` (``model.toml`` and
    ``weights.safetensors``, see the module docstring); returns its config. ``out`` must be new or empty."""
    from safetensors.torch import save_file

    from stratagem.launcher.config import dump_toml

    out = Path(out)
    _check_new_folder(out)
    cfg, state = read_hf(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / MODEL_WEIGHTS))
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "pattern", "ffn", "norm",
            "norm_eps", "tie_embeddings", "rope_theta", "init_std")
    section = {key: getattr(cfg, key) for key in keys}
    (out / MODEL_CONFIG).write_text(f"# imported from {Path(folder).resolve()}\n" + dump_toml({"model": section}))
    return cfg


def load_imported(folder: str | Path) -> Transformer:
    """The `Transformer` of a model folder `import_hf` wrote."""
    from safetensors.torch import load_file

    from stratagem.launcher.config import load_config

    folder = Path(folder)
    model = Transformer(load_config(str(folder / MODEL_CONFIG)).model)
    model.load_state_dict(load_file(folder / MODEL_WEIGHTS))
    return model


def read_hf(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The stratagem config and state dict of a Hugging Face Llama folder."""
    folder = Path(folder)
    cfg = _model_config(folder / HF_CONFIG)
    theirs = _hf_tensors(folder)
    names = hf_names(cfg)
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    unexpected = sorted(set(theirs) - set(names.values()))
    if unexpected:
        raise ConversionError(f"{folder}: holds the tensor {unexpected[0]!r}, which a stratagem Llama of this "
                              f"config.json does not have")
    order = torch.argsort(_rope_order(cfg.head_dim))
    state = {}
    for ours, name in names.items():
        if name not in theirs:
            raise ConversionError(f"{folder}: lacks the tensor {name!r}")
        tensor = theirs[name]
        if tensor.shape != shapes[ours].shape:
            raise ConversionError(f"{folder}: {name} has shape {list(tensor.shape)}, config.json implies "
                                  f"{list(shapes[ours].shape)}")
        state[ours] = _reorder_heads(tensor, cfg.head_dim, order) if ours.endswith(ROTATED) else tensor
    return cfg, state


def _model_config(path: Path) -> ModelConfig:
    """The ModelConfig of a Llama config.json; ConversionError naming the first field it cannot express."""
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable config.json ({e})") from None
    required = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "rope_scaling": None}
    for key, value in required.items():
        if hf.get(key, value) != value:
            raise ConversionError(f"{path}: {key} = {hf[key]!r}: stratagem's Llama has {key} = {value!r}")
    try:
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
        cfg = ModelConfig(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
                          n_kv_heads=hf.get("num_key_value_heads", heads), ffn_hidden=hf["intermediate_size"],
                          vocab_size=hf["vocab_size"], pattern=["attention"], ffn="mlp", norm="pre",
                          norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                          rope_theta=hf.get("rope_theta", 10000.0), init_std=hf.get("initializer_range", 0.02))
        cfg.validate()
    except KeyError as e:
        raise ConversionError(f"{path}: lacks {e.args[0]!r}") from None
    except ConfigValueError as e:
        raise ConversionError(f"{path}: gives model.{e}") from None
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise ConversionError(f"{path}: head_dim = {hf['head_dim']}, but stratagem's heads have hidden_size / "
                              f"num_attention_heads = {cfg.head_dim} channels")
    return cfg


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, or of every shard ``model.safetensors.index.json`` lists."""
    from safetensors.torch import load_file

    if (folder / HF_WEIGHTS).is_file():
        return load_file(folder / HF_WEIGHTS)
    if not (folder / HF_INDEX).is_file():
        raise ConversionError(f"{folder}: has no {HF_WEIGHTS} or {HF_INDEX} (weights are read from safetensors)")
    shards = sorted(set(json.loads((folder / HF_INDEX).read_text())["weight_map"].values()))
    return {name: tensor for shard in shards for name, tensor in load_file(folder / shard).items()}
