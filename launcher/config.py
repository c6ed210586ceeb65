"""Typed run configuration: nested dataclasses loaded strictly from TOML plus `--section.key=value` overrides.

Every problem (missing or malformed file, unknown key, wrong type, impossible value, unknown
flavor) is raised as one `ConfigError` line naming the file (or the override), the key and the
value, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from stratagem.data.config import DataConfig
from stratagem.errors import ConfigError, ConfigValueError
from stratagem.model.config import ModelConfig
from stratagem.model.flavors import get_flavor
from stratagem.train.config import TrainConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = "runs"  # runs are written to <dir>/<name>/
    seed: int = 0  # model init and everything random in training
    # a checkpoint directory (<run>/checkpoints/step-N) of another run: a run without checkpoints of its own
    # starts from its weights, optimizer, data position and step N, continuing under this config (a decay branch)
    init_from: str = ""
    # a weights file (a safetensors state dict of this model, as `stratagem convert hf-import` writes): a run
    # without checkpoints of its own starts from these weights, with a fresh optimizer, data position and step 0
    init_weights: str = ""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigValueError("name", self.name, "must be a non-empty name without '/'")
        if self.init_from and self.init_weights:
            raise ConfigValueError("init_weights", self.init_weights, "a run starts from run.init_from (a checkpoint) "
                                                                      "or from weights, not both")


@dataclass
class LaunchConfig:
    """How `stratagem launch` runs a config: profile this machine, plan per layer, train."""

    ranks: int = 4  # local processes (ranks) to plan for and train on
    profile: str = ""  # the profile file; "" = profiles/<hostname>-<ranks>r-<model shape>.json
    calibrate: bool = True  # after training, refit the profile's corrections to the measured step time

    def validate(self) -> None:
        if self.ranks < 1:
            raise ConfigValueError("ranks", self.ranks, "must be at least 1")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    flavor: str = ""  # the model flavor the [model] section starts from ("" = ModelConfig defaults)

    def to_dict(self) -> dict:
        out = {"run": dataclasses.asdict(self.run), "model": {}, "data": dataclasses.asdict(self.data),
               "train": dataclasses.asdict(self.train), "launch": dataclasses.asdict(self.launch)}
        if self.flavor:
            out["model"]["flavor"] = self.flavor
        out["model"].update(dataclasses.asdict(self.model))
        return out


def named_configs() -> dict[str, Path]:
    """The ready-to-run configs shipped in the package's `configs/` folder, by name."""
    folder = resources.files("stratagem") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    known = named_configs()
    if name_or_path in known:
        return known[name_or_path]
    raise ConfigError(f"{name_or_path}: neither a config file nor a named config "
                      f"(named configs: {', '.join(sorted(known))})")


def load_config(name_or_path: str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a config file (or a named config; None means no file, only defaults) and apply overrides."""
    table: dict = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read: {err}") from None
    sources: dict[tuple[str, ...], str] = {}
    _mark_sources(table, (), source, sources)
    for override in overrides:
        keys, value = parse_override(override)
        _set_nested(table, keys, value, override)
        sources[keys] = f"override {override}"
    return build_config(table, source, sources)


def parse_override(text: str) -> tuple[tuple[str, ...], object]:
    """`--model.dim=128` -> (("model", "dim"), 128); values are read as TOML values, else as strings."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or not body.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    key, raw = body.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return tuple(key.split(".")), value


def _set_nested(table: dict, keys: tuple[str, ...], value: object, override: str) -> None:
    for key in keys[:-1]:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {override}: {key} is not a section")
    table[keys[-1]] = value


def _mark_sources(table: dict, prefix: tuple[str, ...], source: str, out: dict) -> None:
    for key, value in table.items():
        out[prefix + (key,)] = source
        if isinstance(value, dict):
            _mark_sources(value, prefix + (key,), source, out)


def build_config(table: dict, source: str = "defaults", sources: dict | None = None) -> Config:
    """Build and validate a Config from a parsed TOML table; `sources` maps key paths to their origin."""
    sources = sources or {}

    def where(keys: tuple[str, ...]) -> str:
        for i in range(len(keys), 0, -1):
            if keys[:i] in sources:
                return sources[keys[:i]]
        return source

    table = dict(table)
    model_table = table.pop("model", {})
    if not isinstance(model_table, dict):
        raise ConfigError(f"{where(('model',))}: model = {model_table!r}: expected a table")
    model_table = dict(model_table)
    flavor = model_table.pop("flavor", "")
    if not isinstance(flavor, str):
        raise ConfigError(f"{where(('model', 'flavor'))}: model.flavor = {flavor!r}: expected a string")
    try:
        base_model = get_flavor(flavor) if flavor else ModelConfig()
    except ConfigError as err:
        raise ConfigError(f"{where(('model', 'flavor'))}: model.flavor: {err}") from None

    run = _build(RunConfig, table.pop("run", {}), ("run",), where)
    data = _build(DataConfig, table.pop("data", {}), ("data",), where)
    train = _build(TrainConfig, table.pop("train", {}), ("train",), where)
    launch = _build(LaunchConfig, table.pop("launch", {}), ("launch",), where)
    model = _build(ModelConfig, model_table, ("model",), where, base=base_model)
    for key in table:
        raise ConfigError(f"{where((key,))}: unknown section or key {key!r}"
                          f"{_suggest(key, ['run', 'model', 'data', 'train', 'launch'])}")
    config = Config(run=run, model=model, data=data, train=train, launch=launch, flavor=flavor)
    _validate(config, where)
    return config


def _validate(config: Config, where) -> None:
    sections = {"run": config.run, "model": config.model, "data": config.data,
                "data.synthetic": config.data.synthetic, "data.mds": config.data.mds, "train": config.train,
                "launch": config.launch}
    for name, section in sections.items():
        try:
            section.validate()
        except ConfigValueError as err:
            keys = tuple(name.split(".")) + tuple(err.key.split("."))  # "moe.top_k" -> model.moe.top_k
            raise ConfigError(f"{where(keys)}: {'.'.join(keys)} = {err.value!r}: {err.reason}") from None
    try:
        config.train.accumulation_steps(config.data.seq_len)
    except ConfigValueError as err:
        raise ConfigError(f"{where(('train', err.key))}: train.{err.key} = {err.value!r}: {err.reason}") from None
    if config.data.kind == "synthetic":  # prepared streams are checked against their tokenizer at start
        check_vocab(config, config.data.synthetic.vocab_size, where(("model", "vocab_size")))


def check_vocab(config: Config, data_vocab: int, source: str) -> None:
    if config.model.vocab_size < data_vocab:
        raise ConfigError(f"{source}: model.vocab_size = {config.model.vocab_size}: "
                          f"smaller than the data's vocabulary ({data_vocab} tokens)")


def _build(cls, table, keys: tuple[str, ...], where, base=None):
    """Strictly build dataclass `cls` from `table`: unknown keys and wrong types raise ConfigError."""
    dotted = ".".join(keys)
    if not isinstance(table, dict):
        raise ConfigError(f"{where(keys)}: {dotted} = {table!r}: expected a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{where(keys + (key,))}: unknown key {dotted}.{key}"
                              f"{_suggest(key, names, prefix=dotted + '.')}")
        hint = hints[key]
        item = _list_item_type(hint)
        if dataclasses.is_dataclass(hint):
            nested_base = getattr(base, key) if base is not None else None
            values[key] = _build(hint, value, keys + (key,), where, base=nested_base)
        elif item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{where(keys + (key,))}: {dotted}.{key} = {value!r}: expected an array of "
                                  f"tables ([[{dotted}.{key}]])")
            values[key] = [_build(item, entry, keys + (f"{key}[{i}]",), where) for i, entry in enumerate(value)]
        else:
            values[key] = _coerce(value, hint, f"{where(keys + (key,))}: {dotted}.{key}")
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where(keys)}: {dotted}: missing key {missing[0]!r}")
    return cls(**values)


def _list_item_type(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def _coerce(value, hint, label: str):
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{label} = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{label} = {value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{label} = {value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{label} = {value!r}: expected a string")
    if _list_item_type(hint) is str:
        if isinstance(value, str):  # "gla,gla,attention" on the command line
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{label} = {value!r}: expected a list of strings")
    if _list_item_type(hint) is int:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{label} = {value!r}: expected a list of integers")
    raise TypeError(f"unsupported config field type {hint!r} for {label}")  # a bug in a dataclass


def _suggest(key: str, names: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def dump_toml(table: dict) -> str:
    """Write a nested dict of scalars, lists and tables as TOML (what the resolved config needs)."""
    lines: list[str] = []

    def is_tables(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    def emit(tbl: dict, header: str, prefix: str) -> None:
        scalars = {k: v for k, v in tbl.items() if not isinstance(v, dict) and not is_tables(v)}
        if header:
            lines.append(header)
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if header or scalars:
            lines.append("")
        for key, value in tbl.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                emit(value, f"[{name}]", name)
            elif is_tables(value):
                for entry in value:
                    emit(entry, f"[[{name}]]", name)

    emit(table, "", "")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
