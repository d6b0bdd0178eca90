"""The run config: one YAML file with model, data, train and tracking sections.

``load_run_config(path, overrides)`` reads the YAML, applies ``--set dotted.key=value``
overrides (values parsed as YAML, so ``0.1``, ``true`` and ``[1, 2]`` have their types) and
validates everything before anything starts. Errors name the dotted key; the CLI turns them
into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alcot.data.config import DataConfig
from alcot.model.config import ModelConfig
from alcot.model.training import TrainerConfig
from alcot.model.typed import ConfigError, build, to_dict


def alcot_home() -> Path:
    """The project-local folder for the tracking store, token cache and runs."""
    return Path(os.environ.get("ALCOT_HOME", Path.cwd() / ".alcot")).expanduser().resolve()


@dataclass
class TrackingConfig:
    """Where runs are recorded. ``uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded default, a
    sqlite database ``$ALCOT_HOME/mlflow.db`` with artifacts in ``$ALCOT_HOME/mlartifacts``."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "alcot"
    run_name: str | None = None
    flush_seconds: float = 1.0  # metrics are sent in batches from a background thread
    log_model: bool = True  # a finished run's final weights as an MLflow model (mlflow_meta)

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "tracking") -> TrackingConfig:
        return build(cls, d, prefix)


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out_dir: str | None = None  # default: $ALCOT_HOME/runs/<config hash>

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> RunConfig:
        if isinstance(d, dict) and "vocab_size" in (d.get("model") or {}):
            raise ConfigError(
                "model.vocab_size", "is set from the tokenizer; set data.vocab_size instead"
            )
        cfg = build(cls, d, prefix)
        if cfg.data.seq_len > cfg.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds model.max_seq_len")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, "an override must look like dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for depth, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(keys[: depth + 1]), "is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(str(path), "config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(str(path), f"not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(str(path), "the top level must be a mapping")
    return RunConfig.from_dict(apply_overrides(raw, list(overrides)))


# Fields that say where things are stored or how they are watched, not what is trained: they
# do not change a run's identity.
_LOCATION_KEYS = {("out_dir",), ("tracking",), ("data", "cache_dir"), ("train", "threads")}


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    d["model"] = cfg.model.canonical().to_dict()
    for keys in _LOCATION_KEYS:
        node = d
        for k in keys[:-1]:
            node = node[k]
        node.pop(keys[-1], None)
    return d


def run_dir(cfg: RunConfig, home: Path | None = None) -> Path:
    """Where a run keeps its checkpoints and journal: ``out_dir``, or, by default,
    ``$ALCOT_HOME/runs/<experiment>/<config hash>`` (the same config in another study is
    trained there on its own)."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    home = home or alcot_home()
    return home / "runs" / cfg.tracking.experiment / config_hash(cfg)[:16]


def config_hash(cfg: RunConfig) -> str:
    """A content hash of what is trained (no paths, no tracking settings)."""
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
