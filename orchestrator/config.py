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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alcot.common.typed import ConfigError, build, to_dict
from alcot.data.config import DataConfig
from alcot.model.config import ModelConfig, TrainerConfig


def alcot_home() -> Path:
    """The project-local folder for the tracking store, token cache and runs."""
    return Path(os.environ.get("ALCOT_HOME", Path.cwd() / ".alcot")).expanduser().resolve()


_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@ -]*")


def check_study_name(name: str, field_path: str) -> str:
    """A study (MLflow experiment) name is also a folder under ``$ALCOT_HOME/runs``: it must stay
    there. Parts separated by ``/`` (nested folders) each start with a letter, digit or ``_``
    and hold no path tricks (``..``, ``.``, empty parts, absolute paths, backslashes)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(field_path, "needs a name")
    parts = name.split("/")
    bad = next((p for p in parts if not _NAME_PART.fullmatch(p) or p.endswith(".")), None)
    if bad is not None or len(name) > 200:
        raise ConfigError(
            field_path,
            f"{name!r} cannot name a study: its run folders live under $ALCOT_HOME/runs/<name>, "
            "so each '/'-separated part must start with a letter, digit or '_', use only "
            "letters, digits and _.+=@- or spaces, and not end with '.' (no '..', '.', empty "
            "parts or absolute paths)",
        )
    return name


def study_slug(name: str) -> str:
    """The study name as one file name (for files beside others, like Optuna's storage)."""
    return name.replace("/", "__")


def check_uri_credentials(uri: str | None, field_path: str) -> None:
    """A tracking URI must not carry a password (``https://user:pw@host``, ``postgresql://u:pw@``):
    alcot records the URI (run params, ``tracking.json``, the Ray job's environment), so the
    password would be too. MLflow takes it from ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``); PostgreSQL from ``PGPASSWORD`` or
    ``~/.pgpass``."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri).password if uri else None
    except ValueError:
        return
    if password:
        raise ConfigError(
            field_path,
            "holds a password: it would be recorded with every run; put it in "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (PGPASSWORD for a database)",
        )


@dataclass
class TrackingConfig:
    """Where runs are recorded. ``uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded default, a
    sqlite database ``$ALCOT_HOME/mlflow.db`` with artifacts in ``$ALCOT_HOME/mlartifacts``."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "alcot"
    run_name: str | None = None
    # metrics are sent in batches from a background thread, one request per interval: every
    # second, a tracking server collapsed under 64 trials (docs/cluster.md, under load)
    flush_seconds: float = 5.0
    log_model: bool = True  # a finished run's final weights as an MLflow model (mlflow_meta)

    def __post_init__(self):
        check_study_name(self.experiment, "tracking.experiment")
        check_uri_credentials(self.uri, "tracking.uri")

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
    """``raw`` with ``dotted.key=value`` strings applied (values parsed as YAML); a copy."""
    return set_values(raw, [parse_override(item) for item in overrides])


def set_values(raw: dict, items) -> dict:
    """``raw`` with each ``(keys, value)`` of ``items`` set (``keys`` a dotted path split into
    its parts, sections created as needed); a deep copy, ``raw`` is left alone."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for keys, value in items:
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
_LOCATION_KEYS = {
    ("out_dir",),
    ("tracking",),
    ("data", "cache_dir"),
    ("train", "threads"),
    # how the token files are made, not what they hold
    ("data", "workers"),
    ("data", "shard_tokens"),
    ("data", "manifest"),
}


# Fields added after runs were recorded, at the value that reproduces the older behaviour: left
# out of the identity at that value, so existing trials keep their hashes (and are not re-run).
_LATER_FIELDS = {
    ("data", "encoding"): "utf-8",
    ("data", "tokenizer_sample"): 100_000_000,
    ("data", "weights"): None,
    ("model", "attention_kernel"): "auto",
    ("model", "recompute"): "none",
    ("model", "recompute_method"): "uniform",
    ("model", "recompute_num_layers"): 1,
    # the router's recipe (docs/study/router.md): off at these values
    ("model", "halting", "gate_floor"): 0.0,
    ("model", "halting", "router_warmup_frac"): 0.0,
    ("model", "halting", "lambda_warmup_frac"): 0.0,
    ("model", "halting", "router_lr_scale"): 1.0,
    ("train", "warmup_steps"): 0,
}

# The model fields of the parallel layout (left out of a run's identity).
LAYOUT_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size")

# Halting defaults changed since runs were recorded, at their former values: a model without a
# router (where halting cannot matter) keeps the identity it had.
_FORMER_HALTING = {"init_continue": 0.9}


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    d["model"] = cfg.model.canonical().to_dict()
    if d["data"].get("vocab_size") is None:  # a given tokenizer's own size: recorded as before
        d["data"]["vocab_size"] = 2048
    for keys in _LOCATION_KEYS | set(_LATER_FIELDS):
        node = d
        for k in keys[:-1]:
            node = node[k]
        if keys in _LOCATION_KEYS or node.get(keys[-1]) == _LATER_FIELDS[keys]:
            node.pop(keys[-1], None)
        elif keys[:2] == ("model", "halting") and not cfg.model.uses_router:
            node.pop(keys[-1], None)  # halting does not matter here, whatever its defaults
    if not cfg.model.uses_router:  # nor a default changed since: older identities stay
        d["model"]["halting"].update(_FORMER_HALTING)
    # The parallel layout is how a run is computed, not what is trained: the same run at TP = 2
    # or with another pipeline split is the same trial (its checkpoints reshard across layouts;
    # data parallelism was never part of the config). Set to 1 rather than dropped, so that the
    # identities recorded at TP = PP = 1 stay what they were.
    for key in LAYOUT_FIELDS:
        d["model"][key] = 1
    return d


def run_dir(cfg: RunConfig, home: Path | None = None, h: str | None = None) -> Path:
    """Where a run keeps its checkpoints and journal: ``out_dir``, or, by default,
    ``$ALCOT_HOME/runs/<experiment>/<config hash>`` (the same config in another study is
    trained there on its own). ``h``: the config hash, when the caller has it."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    runs = (home or alcot_home()) / "runs"
    folder = runs / cfg.tracking.experiment / (h or config_hash(cfg))[:16]
    # check_study_name makes this hold; a lexical check, no file system access
    if not os.path.normpath(folder).startswith(os.path.normpath(runs) + os.sep):
        raise ConfigError("tracking.experiment", f"{folder} is outside {runs}")
    return folder


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
