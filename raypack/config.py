"""Typed run configuration: YAML files in jobs/ plus dotted `key=value` overrides.

Every field is declared once, with its type, default and help text; `--help`,
`raypack config --fields` and every error message come from these declarations.
Unknown keys and wrong types are errors that name the key and list the valid ones.
The same override mechanism serves the CLI and (later) Ray Tune: a trial is just a
list of overrides.

    cfg = load_config("jobs/quickstart.yaml", ["pack.window=1000", "data.max_seq_len=2048"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raypack.data.formats import FORMATS
from raypack.data.pack import ATTENTIONS, STRATEGIES
from raypack.data.synth import PRESETS
from raypack.data.tokenize import OVERLENGTH_POLICIES


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SynthConfig:
    """Synthetic data, used when `data.sources` is empty."""

    preset: str = _field("opensource-1.2m", "length distribution to imitate", tuple(PRESETS))
    num_samples: int = _field(2000, "number of conversations to synthesise")
    seed: int = _field(0, "seed of the synthetic data")


@dataclass
class DataConfig:
    """What goes in and how it is tokenized."""

    sources: list[str] = _field([], "JSON/JSONL/Parquet files or globs; empty means synthesise (see synth)")
    format: str = _field("auto", "input format, or auto to detect per file", ("auto",) + FORMATS)
    strict: bool = _field(False, "raise on the first invalid row instead of counting and setting it aside")
    tokenizer: str = _field("tiny", "tokenizer: 'tiny' (offline, bundled), a local path or a hub id")
    template: str = _field("auto", "auto: the tokenizer's chat template if it has one, else the built-in "
                           "Llama-3 template; builtin: always the built-in one", ("auto", "builtin"))
    max_seq_len: int = _field(4096, "maximum tokens per row (the paper: 4096)")
    overlength: str = _field("truncate", "what to do with samples longer than max_seq_len",
                             OVERLENGTH_POLICIES)
    hf_split: str = _field("train", "split to load for sources given as hf:<dataset id>")
    val_fraction: float = _field(0.1, "share of conversations held out for validation, the same for "
                                 "every arm (the paper: 10%)")
    val_count: int = _field(0, "if > 0, hold out exactly this many conversations instead of val_fraction")


@dataclass
class PackConfig:
    """The arms of the study and how their rows are built."""

    arms: list[str] = _field(["padding", "random-cross", "greedy-cross", "bfd-isolated", "bfd-cross"],
                             "arms as 'padding' or '<strategy>-<attention>', strategy in "
                             f"{'/'.join(s for s in STRATEGIES if s != 'padding')}, "
                             f"attention in {'/'.join(ATTENTIONS)}")
    window: int = _field(0, "samples packed together (the paper: 1000); 0 packs the whole dataset at once")
    micro_batch_size: int = _field(2, "rows per micro-batch, used to count padding at collation")


@dataclass
class PrepareConfig:
    """How `raypack prepare` runs on Ray Data and where it writes."""

    output_dir: str = _field("prepared", "root of prepared datasets (local path or s3://, gs://)")
    num_tokenizer_actors: int = _field(2, "tokenizer actors (each loads the tokenizer once)")
    actor_num_cpus: float = _field(0.5, "CPUs reserved per tokenizer actor; keep the pool below the "
                                   "cluster's CPUs so read tasks are never starved")
    tokenize_batch_size: int = _field(256, "conversations per tokenizer call")
    pack_num_cpus: float = _field(0.5, "CPUs reserved per arm's packing task")
    rows_per_shard: int = _field(20000, "packed rows per Parquet shard")
    reuse: bool = _field(True, "reuse tokenized and packed outputs whose config hash matches")


@dataclass
class Config:
    """A raypack run."""

    name: str = _field("raypack", "run name, used in output paths")
    output_dir: str = _field("out", "folder for this run's outputs")
    seed: int = _field(0, "global seed")
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


def parse_arm(arm: str) -> tuple[str, str | None]:
    """'bfd-isolated' -> ('bfd', 'isolated'); 'padding' -> ('padding', None)."""
    strategy, _, attention = arm.partition("-")
    if strategy == "padding" and not attention:
        return "padding", None
    if strategy not in STRATEGIES or strategy == "padding" or attention not in ATTENTIONS:
        packed = [f"{s}-{a}" for s in STRATEGIES if s != "padding" for a in ATTENTIONS]
        raise ConfigError(f"pack.arms: unknown arm {arm!r}; valid arms: padding, {', '.join(packed)}")
    return strategy, attention


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` pairs in a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (for example pack.window=1000)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return data


def validate(cfg: Config) -> Config:
    """Checks that span fields; single fields are checked by their declarations."""
    for arm in cfg.pack.arms:
        parse_arm(arm)
    if len(set(cfg.pack.arms)) != len(cfg.pack.arms):
        raise ConfigError(f"pack.arms: duplicate arm in {cfg.pack.arms}")
    for key, value in (("data.max_seq_len", cfg.data.max_seq_len), ("pack.micro_batch_size",
                       cfg.pack.micro_batch_size), ("synth.num_samples", cfg.synth.num_samples)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.data.val_count < 0:
        raise ConfigError(f"data.val_count: must be >= 0, got {cfg.data.val_count}")
    for key, value in (("prepare.num_tokenizer_actors", cfg.prepare.num_tokenizer_actors),
                       ("prepare.tokenize_batch_size", cfg.prepare.tokenize_batch_size),
                       ("prepare.rows_per_shard", cfg.prepare.rows_per_shard)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.pack.window < 0:
        raise ConfigError(f"pack.window: must be >= 0 (0 packs everything at once), got {cfg.pack.window}")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    return validate(from_dict(Config, data))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, to save beside every output."""
    return dataclasses.asdict(cfg)


def describe_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  ({tp.__doc__.strip()})")
            lines += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        name = getattr(tp, "__name__", str(tp))
        lines.append(f"  {prefix}{f.name} ({name}{extra}, default {default!r}): {f.metadata['help']}")
    return lines
