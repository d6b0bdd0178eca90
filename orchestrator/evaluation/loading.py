"""Loading a finished run for evaluation: its config, tokenizer and weights (``load_run``).

What a run leaves and evaluation reads: the run folder's ``config.yaml`` (the resolved config,
the vocabulary included), ``checkpoints/step_*/tp<r>.pt`` (the weights; tensor-parallel shards
are gathered) and ``tokenizer.json`` (training copies the token cache's tokenizer there; for
older folders it is found again in the token cache from the data settings). A run is named by
its folder, one of its checkpoint folders, or its MLflow run id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from alcot.common.typed import ConfigError
from alcot.model import checkpoints
from alcot.orchestrator.config import RunConfig, alcot_home
from alcot.orchestrator.evaluation.budgets import TestTimeBudget


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig  # as trained (model.vocab_size from the tokenizer)
    checkpoint: checkpoints.CheckpointInfo
    model: object  # AlcotModel (tensor_parallel_size 1)
    tokenizer: object  # tokenizers.Tokenizer
    eos_id: int
    trained: TestTimeBudget = None  # type: ignore[assignment]

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def resolve_target(target: str | Path) -> tuple[Path, checkpoints.CheckpointInfo]:
    """(run folder, checkpoint) for a run folder, a checkpoint folder or an MLflow run id."""
    path = Path(str(target)).expanduser()
    if path.exists():
        path = path.resolve()
        if path.name.startswith(checkpoints.PREFIX) and (path / "meta.json").exists():
            try:
                info = checkpoints.verify(path)
            except ValueError as err:
                raise ConfigError("RUN", str(err)) from None
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            return run_dir, info
        if (path / "config.yaml").exists():
            info = checkpoints.latest_valid(path / "checkpoints")
            if info is None:
                raise ConfigError("RUN", f"{path} has no (valid) checkpoint under checkpoints/")
            return path, info
        raise ConfigError(
            "RUN", f"{path} is neither a run folder (with config.yaml) nor a checkpoint folder"
        )
    return resolve_target(_run_dir_of_mlflow_run(str(target)))


def _run_dir_of_mlflow_run(run_id: str) -> Path:
    import os

    from alcot.orchestrator.tracking.stores import open_client, resolve_uri

    uri, _ = resolve_uri(os.environ.get("MLFLOW_TRACKING_URI"), alcot_home())
    try:
        run = open_client(uri).get_run(run_id)
    except Exception as err:  # noqa: BLE001 - any failure means: not a run we can find
        raise ConfigError(
            "RUN",
            f"{run_id!r} is not a path, and no MLflow run with that id was found in {uri} "
            f"({type(err).__name__})",
        ) from None
    out = run.data.tags.get("alcot.out_dir")
    if not out or not Path(out).exists():
        raise ConfigError("RUN", f"MLflow run {run_id} names no run folder here ({out!r})")
    return Path(out)


def read_run_config(path: Path) -> RunConfig:
    """A run folder's ``config.yaml`` (whose model.vocab_size training set) as a RunConfig."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError("RUN", f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError("RUN", f"{path} is not a run config")
    raw["model"] = dict(raw["model"])
    vocab = raw["model"].pop("vocab_size", None)
    cfg = RunConfig.from_dict(raw)
    if vocab is None:
        raise ConfigError("RUN", f"{path} has no model.vocab_size (not written by training)")
    model = dataclasses.replace(cfg.model, vocab_size=int(vocab))
    return dataclasses.replace(cfg, model=model)


def find_tokenizer(run_dir: Path, cfg: RunConfig) -> Path:
    """The run's tokenizer: its folder's copy, else the token cache entry of its data."""
    own = run_dir / "tokenizer.json"
    if own.exists():
        return own
    from alcot.data.preparation import prepare

    try:
        data = prepare(cfg.data, cfg.data.cache_dir or alcot_home() / "cache", log=lambda *_: None)
    except ConfigError as err:
        raise ConfigError(
            "RUN", f"{run_dir} has no tokenizer.json and its data cannot be read again ({err})"
        ) from None
    if data.tokenizer_path is None:  # megatron data named without its tokenizer
        raise ConfigError("RUN", f"{run_dir} has no tokenizer.json: name data.tokenizer")
    return data.tokenizer_path


def _load_weights(info: checkpoints.CheckpointInfo, model) -> dict:
    """The checkpoint's model state with tensor-parallel shards gathered into full tensors and
    pipeline stages joined (one-process names)."""
    from alcot.model.layouts import full_model_state

    try:
        return full_model_state(info.path, model)
    except ValueError as err:
        raise ConfigError("RUN", str(err)) from None


def load_run(target: str | Path, config: str | Path | None = None, threads: int = 0) -> LoadedRun:
    """Build the model of a run (or checkpoint) and load its weights and tokenizer.

    ``config`` reads the model from another ``config.yaml`` (e.g. to pair a copied checkpoint
    folder with its run's config); a checkpoint that does not fit it is an error."""
    run_dir, info = resolve_target(target)
    cfg_path = Path(config) if config else run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError("RUN", f"{cfg_path} does not exist (the run's config)")
    cfg = read_run_config(cfg_path)
    trained_tp = cfg.model.tensor_parallel_size
    trained_pp = cfg.model.pipeline_parallel_size
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, tensor_parallel_size=1, pipeline_parallel_size=1),
    )
    tok_path = find_tokenizer(run_dir, cfg)
    from alcot.data.tokenizer import EOS, load_tokenizer

    tokenizer = load_tokenizer(tok_path)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ConfigError("RUN", f"{tok_path} has no {EOS!r} token")
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(
            "RUN",
            f"{tok_path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocabulary ({cfg.model.vocab_size})",
        )

    from alcot.model import init_parallel
    from alcot.model.network import AlcotModel

    if threads:
        torch.set_num_threads(threads)
    init_parallel(1)
    torch.manual_seed(0)
    model = AlcotModel(cfg.model)
    state = _load_weights(info, model)
    from alcot.model.layouts import saved_layout

    saved_tp, saved_pp, _ = saved_layout(info.path)
    if (saved_tp, saved_pp) != (trained_tp, trained_pp):
        raise ConfigError(
            "RUN",
            f"{info.path} has {saved_tp} tensor-parallel x {saved_pp} pipeline shards but "
            f"{cfg_path} says model.tensor_parallel_size={trained_tp}, "
            f"model.pipeline_parallel_size={trained_pp}",
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).split("\n\t")[1:2] or [str(err)[:300]]
        raise ConfigError(
            "RUN",
            f"checkpoint {info.path} does not fit the model of {cfg_path} (size "
            f"{cfg.model.size!r}, method {cfg.model.method!r}, hidden {cfg.model.hidden_size}, "
            f"{cfg.model.num_layers} layers): {first[0].strip()}",
        ) from None
    model.eval()
    loaded = LoadedRun(run_dir, cfg, info, model, tokenizer, eos)
    loaded.trained = TestTimeBudget(cfg.model.halting.tau, cfg.model.l_max)
    return loaded
