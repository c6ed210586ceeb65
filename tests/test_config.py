"""Config loading: strict keys and types, impossible values, overrides, one-line errors naming file, key, value."""

import subprocess
import sys

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.config import dump_toml, load_config, named_configs, parse_override

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_demo_config_loads_with_flavor_and_defaults():
    config = load_config("demo")
    assert config.flavor == "tiny"
    assert config.model.dim == 64 and config.data.seq_len == 128
    assert config.train.accumulation_steps(config.data.seq_len) * config.train.micro_batch_size * 128 == 4096


def test_overrides_apply_with_toml_types(tmp_path):
    config = load_config(write(tmp_path, "[model]\nflavor = 'tiny'\n"),
                         ["--model.dim=128", "--train.lr=1e-3", "--run.name=other",
                          "--model.tie_embeddings=true", "--model.pattern=attention,attention"])
    assert config.model.dim == 128 and config.train.lr == 1e-3 and config.run.name == "other"
    assert config.model.tie_embeddings is True and config.model.pattern == ["attention", "attention"]
    assert config.model.n_layers == 2  # the rest still comes from the flavor


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config("demo", ["--train.schedule=wsd", "--data.synthetic.order=1"])
    text = dump_toml(config.to_dict())
    again = load_config(write(tmp_path, text))
    assert again == config
    assert tomllib.loads(text)["model"]["flavor"] == "tiny"


def test_missing_file(tmp_path):
    message = error_of(str(tmp_path / "nope.toml"))
    assert "nope.toml" in message and "not found" in message


def test_unknown_named_config():
    message = error_of("no-such-config")
    assert "no-such-config" in message and "demo" in message


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[train]\nsteps = = 3\n")
    message = error_of(path)
    assert path in message and "invalid TOML" in message and "line 2" in message


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "[model]\ndimm = 64\n")
    message = error_of(path)
    assert path in message and "model.dimm" in message and "did you mean model.dim" in message


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[trian]\nsteps = 3\n")
    message = error_of(path)
    assert path in message and "'trian'" in message and "did you mean train" in message


def test_wrong_type(tmp_path):
    path = write(tmp_path, "[train]\nsteps = '300'\n")
    message = error_of(path)
    assert path in message and "train.steps = '300'" in message and "expected an integer" in message


def test_bool_is_not_an_integer(tmp_path):
    message = error_of(write(tmp_path, "[model]\nn_layers = true\n"))
    assert "model.n_layers = True" in message and "expected an integer" in message


def test_heads_not_dividing_width(tmp_path):
    path = write(tmp_path, "[model]\nflavor = 'tiny'\nn_heads = 5\n")
    message = error_of(path)
    assert path in message and "model.n_heads = 5" in message and "64" in message


def test_unknown_flavor(tmp_path):
    path = write(tmp_path, "[model]\nflavor = 'huge'\n")
    message = error_of(path)
    assert path in message and "'huge'" in message and "tiny" in message


def test_unknown_mixer_in_pattern(tmp_path):
    path = write(tmp_path, "[model]\npattern = ['attention', 'mamba']\n")
    message = error_of(path)
    assert path in message and "model.pattern" in message and "mamba" in message


def test_global_batch_not_a_multiple_of_micro_batches(tmp_path):
    path = write(tmp_path, "[train]\nglobal_batch_tokens = 1000\n")
    message = error_of(path)
    assert path in message and "train.global_batch_tokens = 1000" in message and "1024" in message


def test_vocab_smaller_than_data(tmp_path):
    message = error_of(write(tmp_path, "[model]\nvocab_size = 100\n"))
    assert "model.vocab_size = 100" in message and "128 tokens" in message


def test_impossible_schedule_values(tmp_path):
    message = error_of(write(tmp_path, "[train]\nsteps = 10\nwarmup_steps = 20\n"))
    assert "train.warmup_steps = 20" in message and "exceeds steps = 10" in message
    message = error_of(write(tmp_path, "[train]\nschedule = 'linear'\n"))
    assert "train.schedule = 'linear'" in message and "cosine" in message


def test_bad_synthetic_value_names_nested_key(tmp_path):
    message = error_of(write(tmp_path, "[data.synthetic]\nbranching = 1000\n"))
    assert "data.synthetic.branching = 1000" in message


def test_override_errors_name_the_override(tmp_path):
    message = error_of("demo", ["--model.n_heads=3"])
    assert "override --model.n_heads=3" in message and "model.n_heads = 3" in message
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_override("--model.dim")


def test_named_configs_are_package_data():
    assert "demo" in named_configs()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "[model]\nn_heads = 7\n")
    done = subprocess.run([sys.executable, "-m", "stratagem.launcher.cli", "train", path],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("stratagem: error: ")
    assert path in done.stderr and "model.n_heads = 7" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started or written
