"""Sweep specs: one YAML over any config field, expanded into trials with content identities.

A sweep file::

    study: quickstart                 # the MLflow experiment (one per study)
    base: ../configs/train_adaptive.yaml   # a run config (path relative to this file) or inline
    grid:                             # cartesian product over dotted config paths
      model.size: [micro, tiny]
      model.method: [adaptive, vanilla]
      model.halting.lambda: [0.01, 0.1]
    zip:                              # axes that move together (equal lengths), crossed with grid
      train.lr: [3.0e-3, 2.0e-3]
      train.batch_size: [8, 16]
    include:                          # extra trials after the grid, each a mapping of fields
      - {model.size: tiny, model.method: vanilla, model.num_layers: 16}
    overrides:                        # extra settings for the trials that match `when`
      - when: {model.method: vanilla}  # the trial's value of a field (swept, base or default)
        set: {train.lr: 2.0e-3}
    budget: {tokens: 200000}          # or {flops: 1.0e13} (isoFLOP: tokens derived per size)
                                      # budget.tokens / budget.flops may also be a grid or zip
                                      # axis, an include key or an override's setting (a budget
                                      # per size: zip it with model.size)
    resources: {cpus: 1, gpus: 0, tensor_parallel: 1, pipeline_parallel: 1, data_parallel: 1}
    max_concurrent: 2
    retries: 1
    max_trials: 10000                 # refuse a grid that expands to more (a typo's 10^6)
    eval:                             # after each trial's training, as part of the trial
      texts: [held_out.txt]           # perplexity / bits per byte (paths relative to this file)
      tasks: [arc_easy, piqa]         # lm-eval tasks (local files under data_dir)
      data_dir: ${ALCOT_EVAL_DATA}
      limit: 500                      # also num_fewshot, batch_size
      tau: [0.05, 0.1, 0.3]           # test-time budgets: every tau x l_max combination
      l_max: [1, 3]
    search:                           # instead of (or on top of) the grid: an Optuna search
      sampler: tpe
      trials: 8
      objectives: [{metric: val/ppl, direction: minimize}]
      space: {model.halting.lambda: {low: 0.001, high: 1.0, log: true}}

Axes and overrides apply in order: the trial's axes (grid x zip, or one ``include`` entry), then
every matching override; a ``budget.*`` key among them replaces the sweep's ``budget`` for that
trial. Trials whose canonical configs coincide (vanilla crossed with several halting penalties) are
one trial: a trial's identity is the hash of its canonical resolved config, without paths or
tracking settings. Every error names the field and its line in the file, before anything runs.
The study name is also a folder under ``$ALCOT_HOME/runs``: names that could leave it are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alcot.common.typed import ConfigError, build
from alcot.model.config import count_parameters
from alcot.orchestrator.config import (
    RunConfig,
    apply_overrides,
    check_study_name,
    config_hash,
    set_values,
)
from alcot.orchestrator.sweeps.yaml_lines import load_with_lines

SAMPLERS = ("tpe", "random", "nsga2", "grid")
OBJECTIVE_METRICS = (
    "val/loss",
    "val/ppl",
    "val/mean_depth",
    "train/loss",
    "flops/realised",
    "flops/nominal",
)


class SweepError(ValueError):
    """A malformed sweep: ``where`` is ``file:line``, ``field`` the dotted path."""

    def __init__(self, where: str, field_path: str, message: str):
        self.where, self.field, self.message = where, field_path, message
        super().__init__(f"{where}: {field_path}: {message}")

    def __reduce__(self):
        return type(self), (self.where, self.field, self.message)


@dataclass
class Objective:
    metric: str
    direction: str = "minimize"

    def __post_init__(self):
        if self.metric not in OBJECTIVE_METRICS:
            raise ConfigError("metric", f"must be one of {list(OBJECTIVE_METRICS)}")
        if self.direction not in ("minimize", "maximize"):
            raise ConfigError("direction", "must be minimize or maximize")


@dataclass
class SearchSpec:
    trials: int = 8
    sampler: str = "tpe"
    objectives: list[Objective] = field(default_factory=lambda: [Objective("val/ppl")])
    space: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # an Optuna RDB URL; default: sqlite under $ALCOT_HOME/optuna
    seed: int = 0

    def __post_init__(self):
        if self.trials < 1:
            raise ConfigError("trials", f"must be >= 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"must be one of {list(SAMPLERS)}")
        if not self.objectives:
            raise ConfigError("objectives", "needs at least one objective")
        if not self.space:
            raise ConfigError("space", "is empty: name at least one field to search")


@dataclass
class TrainingBudget:
    tokens: int | None = None
    flops: float | None = None

    def __post_init__(self):
        if self.tokens is not None and self.flops is not None:
            raise ConfigError("tokens", "give tokens or flops, not both")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError("tokens", f"must be > 0, got {self.tokens}")
        if self.flops is not None and self.flops <= 0:
            raise ConfigError("flops", f"must be > 0, got {self.flops}")


@dataclass
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1

    def __post_init__(self):
        if self.cpus <= 0 or self.gpus < 0:
            raise ConfigError("cpus", "cpus must be > 0 and gpus >= 0")
        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def workers(self) -> int:
        """A trial's gang: tensor x pipeline x data-parallel processes."""
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


@dataclass
class EvalSection:
    """``eval:`` of a sweep: evaluation of each trial's final checkpoint, after its training,
    as part of the trial (``alcot eval`` with these settings; paths relative to the sweep file;
    ``tau`` / ``l_max`` lists are test-time budgets). Skipped when already done."""

    texts: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    tau: list[float] = field(default_factory=list)
    l_max: list[int] = field(default_factory=list)
    batch_size: int = 16

    def resolved(self, base: Path) -> dict:
        """As a plain dict with absolute paths (what a trial receives)."""
        d = dataclasses.asdict(self)
        d["texts"] = [str((base / p).resolve()) for p in self.texts]
        d["data_dir"] = str((base / self.data_dir).resolve()) if self.data_dir else None
        return d


@dataclass
class Override:
    when: dict[str, Any]
    set: dict[str, Any]


@dataclass
class SweepSpec:
    study: str
    base: Any = None  # a path (relative to the sweep file) or an inline run config
    grid: dict[str, Any] = field(default_factory=dict)
    zip: dict[str, Any] = field(default_factory=dict)
    include: list[dict[str, Any]] = field(default_factory=list)  # extra points after the grid
    overrides: list[Override] = field(default_factory=list)
    search: SearchSpec | None = None
    budget: TrainingBudget | None = None
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 2
    retries: int = 1
    tracking_uri: str | None = None
    eval: EvalSection | None = None  # evaluate each trial after training (alcot eval)
    max_trials: int = 10_000  # a guard against a grid that explodes (10^6 trials by a typo)

    def __post_init__(self):
        check_study_name(self.study, "study")
        if self.max_trials < 1:
            raise ConfigError("max_trials", f"must be >= 1, got {self.max_trials}")
        if self.max_concurrent < 1:
            raise ConfigError("max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        if self.retries < 0:
            raise ConfigError("retries", f"must be >= 0, got {self.retries}")


@dataclass
class Trial:
    config: RunConfig
    axes: dict[str, Any]  # the values this trial takes on the swept fields
    hash: str
    tokens: int
    est_flops: float  # nominal training FLOPs (an upper bound for adaptive: full depth)

    @property
    def short(self) -> str:
        return self.hash[:10]


@dataclass
class Sweep:
    spec: SweepSpec
    path: Path
    base: dict
    trials: list[Trial]  # empty for a pure search (trials are drawn while it runs)
    lines: dict[str, int]
    text: str

    @property
    def sweep_id(self) -> str:
        blob = json.dumps(
            {
                "study": self.spec.study,
                "trials": sorted(t.hash for t in self.trials),
                "search": dataclasses.asdict(self.spec.search) if self.spec.search else None,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- loading
def _where(path: Path, lines: dict[str, int], field_path: str) -> str:
    """``file:line`` of the best match for ``field_path`` among the recorded keys."""
    if field_path in lines:
        return f"{path}:{lines[field_path]}"
    candidates = [k for k in lines if k.endswith(field_path) or field_path.startswith(k)]
    if candidates:
        best = max(candidates, key=len)
        return f"{path}:{lines[best]}"
    return str(path)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, path: Path, lines: dict[str, int], where: str = "") -> Any:
    """Replace ``${VAR}`` in string values by the environment's value (unset: an error)."""
    if isinstance(node, dict):
        return {
            k: _expand_env(v, path, lines, f"{where}.{k}" if where else str(k))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_env(v, path, lines, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        missing = [m for m in _ENV.findall(node) if m not in os.environ]
        if missing:
            raise SweepError(
                _where(path, lines, where), where, f"environment variable {missing[0]} is not set"
            )
        return _ENV.sub(lambda m: os.environ[m.group(1)], node)
    return node


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Parse, validate and expand a sweep file. ``overrides`` (``dotted.key=value``) apply to
    the base config of every trial. Raises :class:`SweepError`."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(str(path), "<file>", "sweep file not found")
    try:
        raw, lines, text = load_with_lines(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SweepError(
            where, "<yaml>", f"not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if not isinstance(raw, dict):
        raise SweepError(str(path), "<top>", "the top level must be a mapping")
    base_node = raw.get("base")
    raw = _expand_env({k: v for k, v in raw.items() if k != "base"}, path, lines)
    if isinstance(base_node, str):  # a path may name a variable; an inline base waits for --set
        base_node = _expand_env(base_node, path, lines, "base")
    if base_node is not None:
        raw["base"] = base_node

    try:
        spec = build(SweepSpec, raw, "")
    except ConfigError as err:
        raise SweepError(_where(path, lines, err.field), err.field, err.message) from None

    base = _load_base(spec, path, lines)
    if overrides:  # before variables are expanded: --set data.path=... replaces ${VAR}
        items = [o[len("base.") :] if o.startswith("base.") else o for o in overrides]
        try:
            base = apply_overrides(base, items)
        except ConfigError as err:
            raise SweepError("--set", err.field, err.message) from None
    base = _expand_env(base, path, lines, "base")
    if overrides:
        try:
            RunConfig.from_dict(base)
        except ConfigError as err:
            raise SweepError("--set", err.field, err.message) from None
    for section in ("grid", "zip"):
        for axis, values in getattr(spec, section).items():
            key = f"{section}.{axis}"
            if not isinstance(values, list):
                raise SweepError(_where(path, lines, key), key, "must be a list of values")
            if not values:
                raise SweepError(_where(path, lines, key), key, "is an empty list")
    shared = set(spec.grid) & set(spec.zip)
    if shared:
        axis = sorted(shared)[0]
        raise SweepError(_where(path, lines, f"zip.{axis}"), f"zip.{axis}", "is also a grid axis")
    lengths = {len(v) for v in spec.zip.values()}
    if len(lengths) > 1:
        key = f"zip.{next(iter(spec.zip))}"
        raise SweepError(_where(path, lines, key), "zip", f"axes have different lengths {lengths}")
    for i, point in enumerate(spec.include):
        key = f"include[{i}]"
        if not isinstance(point, dict) or not point:
            raise SweepError(_where(path, lines, key), key, "must be a non-empty mapping of fields")
    if not spec.grid and not spec.zip and not spec.include and spec.search is None:
        raise SweepError(_where(path, lines, "grid"), "grid", "is empty and there is no search")
    count = (
        math.prod(len(v) for v in spec.grid.values()) * (lengths.pop() if lengths else 1)
        if spec.grid or spec.zip
        else 0
    ) + len(spec.include)
    if count > spec.max_trials:
        raise SweepError(
            _where(path, lines, "grid"),
            "grid",
            f"expands to {count:,} trials, more than max_trials ({spec.max_trials:,}); "
            "shrink the grid, or set `max_trials:` in the sweep file if you mean it",
        )
    _check_when(spec, path, lines)
    if spec.eval is not None:
        _check_eval(spec.eval, path, lines)
    if spec.search is not None:
        _check_space(spec.search, base, path, lines)

    points = _grid_points(spec)
    trials, seen = [], set()
    for axes in points:
        trial = make_trial(spec, base, axes, path, lines)
        if trial.hash not in seen:  # canonical duplicates (vanilla x lambda) are one trial
            seen.add(trial.hash)
            trials.append(trial)
    return Sweep(spec, path, base, trials, lines, text)


def _check_eval(section: EvalSection, path: Path, lines: dict[str, int]) -> None:
    """The eval section's files and tasks exist, before anything runs."""
    from alcot.orchestrator.evaluation.suite import check_spec, spec_from_section

    try:
        check_spec(spec_from_section(section.resolved(path.parent)))
    except ConfigError as err:
        raise SweepError(_where(path, lines, "eval"), f"eval ({err.field})", err.message) from None


def _load_base(spec: SweepSpec, path: Path, lines: dict[str, int]) -> dict:
    if spec.base is None:
        return {}
    if isinstance(spec.base, dict):
        return spec.base
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        if not base_path.is_file():
            raise SweepError(_where(path, lines, "base"), "base", f"{base_path} not found")
        data = yaml.safe_load(base_path.read_text()) or {}
        if not isinstance(data, dict):
            raise SweepError(_where(path, lines, "base"), "base", "must hold a mapping")
        return data
    raise SweepError(_where(path, lines, "base"), "base", "must be a path or a mapping")


_MISSING = object()


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


@functools.cache
def _defaults() -> dict:
    """The default run config as a tree (read only)."""
    return RunConfig().to_dict()


def _check_when(spec: SweepSpec, path: Path, lines: dict[str, int]) -> None:
    """Every ``overrides[].when`` key names a swept axis or a config field: a typo would make
    the override match nothing, silently."""
    axes = set(spec.grid) | set(spec.zip) | set(spec.search.space if spec.search else ())
    axes |= {key for point in spec.include for key in point}
    defaults = _defaults()
    for i, ov in enumerate(spec.overrides):
        for key in ov.when:
            if key in axes or isinstance(_lookup(defaults, key), dict):
                if key not in axes:
                    raise SweepError(
                        _where(path, lines, f"overrides[{i}].when.{key}"),
                        f"overrides[{i}].when.{key}",
                        "is a section, not a field",
                    )
                continue
            if _lookup(defaults, key) is _MISSING:
                raise SweepError(
                    _where(path, lines, f"overrides[{i}].when"),
                    f"overrides[{i}].when.{key}",
                    "is not a config field (nor a swept axis): the override would match nothing",
                )


def _matches(when: dict[str, Any], raw: dict, defaults: dict) -> bool:
    """Whether a trial (its raw config: base + axes) takes every value of ``when``; a field
    the config does not set has its default."""
    for key, want in when.items():
        value = _lookup(raw, key)
        if value is _MISSING:
            value = _lookup(defaults, key)
        if value != want:
            return False
    return True


def _grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """grid x zip, then the ``include`` entries."""
    if not spec.grid and not spec.zip:
        return [dict(p) for p in spec.include]
    grid_axes = list(spec.grid)
    grid = [
        dict(zip(grid_axes, combo, strict=True))
        for combo in itertools.product(*(spec.grid[a] for a in grid_axes))
    ] or [{}]
    if spec.zip:
        n = len(next(iter(spec.zip.values())))
        zipped = [{a: spec.zip[a][i] for a in spec.zip} for i in range(n)]
    else:
        zipped = [{}]
    return [{**g, **z} for g in grid for z in zipped] + [dict(p) for p in spec.include]


BUDGET_KEYS = ("budget.tokens", "budget.flops")


def _split_budget(values: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its ``budget.*`` keys, which update ``budget`` (in place)."""
    rest = {}
    for key, value in values.items():
        if key == "budget" or key.startswith("budget."):
            if key not in BUDGET_KEYS:
                raise ConfigError(key, f"a per-trial budget is one of {list(BUDGET_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(key, f"must be a number > 0, got {value!r}")
            name = key.split(".", 1)[1]
            budget[name] = value
            budget.pop("flops" if name == "tokens" else "tokens", None)
        else:
            rest[key] = value
    return rest


def _set_items(axes: dict[str, Any]) -> list[tuple[list[str], Any]]:
    return [(k.split("."), v) for k, v in axes.items()]


def make_trial(
    spec: SweepSpec, base: dict, axes: dict[str, Any], path: Path, lines: dict[str, int]
) -> Trial:
    """The trial for one point: base + axes + matching overrides + budget, validated."""
    budget: dict[str, Any] = {}
    if spec.budget is not None:
        budget = {k: v for k, v in dataclasses.asdict(spec.budget).items() if v is not None}
    try:
        fields = _split_budget(axes, budget)
        raw = set_values(base, _set_items(fields))
        extra: dict[str, Any] = {}
        defaults = _defaults() if spec.overrides else {}
        for ov in spec.overrides:
            if _matches(ov.when, {**raw, "budget": dict(budget)}, defaults):
                extra.update(ov.set)
        if extra:
            raw = set_values(raw, _set_items(_split_budget(extra, budget)))
        cfg = RunConfig.from_dict(raw)
    except ConfigError as err:
        key = next(
            (
                f"{s}.{a}"
                for s in ("grid", "zip")
                for a in getattr(spec, s)
                if a == err.field or err.field.startswith(a + ".")
            ),
            None,
        )
        if key is None:
            key = next(
                (
                    f"include[{i}].{a}"
                    for i, p in enumerate(spec.include)
                    if p == axes
                    for a in p
                    if a == err.field or err.field.startswith(a + ".")
                ),
                None,
            )
        if key is None:
            key = next(
                (
                    f"search.space.{a}"
                    for a in (spec.search.space if spec.search else {})
                    if err.field.startswith(a)
                ),
                None,
            )
        if key is None:
            key = next(
                (
                    f"overrides[{i}]"
                    for i, ov in enumerate(spec.overrides)
                    if any(err.field.startswith(k) for k in ov.set)
                ),
                "base",
            )
        value = axes.get(err.field)
        msg = err.message
        if key.startswith(("grid", "zip")) and not err.field.startswith(key.split(".", 1)[1]):
            msg = f"{err.field}: {msg}"
        raise SweepError(
            _where(path, lines, key),
            key,
            msg + (f" (value {value!r})" if value is not None else ""),
        ) from None
    cfg = dataclasses.replace(
        cfg,
        model=cfg.model.canonical(),
        tracking=dataclasses.replace(
            cfg.tracking, experiment=spec.study, uri=spec.tracking_uri or cfg.tracking.uri
        ),
    )
    for key, field_name in (
        ("tensor_parallel", "tensor_parallel_size"),
        ("pipeline_parallel", "pipeline_parallel_size"),
    ):
        want = getattr(spec.resources, key)
        if want == getattr(cfg.model, field_name):
            continue
        try:
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, **{field_name: want})
            )
        except ConfigError as err:
            raise SweepError(
                _where(path, lines, f"resources.{key}"), f"resources.{key}", err.message
            ) from None
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    passes = cfg.model.planned_passes
    n = count_parameters(cfg.model)["non_embedding"]
    if budget:
        tokens = budget.get("tokens")
        if tokens is None:
            tokens = int(budget["flops"] / (6.0 * n * passes))
        steps = max(1, math.ceil(tokens / tokens_per_step))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    tokens = cfg.train.steps * tokens_per_step
    return Trial(cfg, axes, config_hash(cfg), tokens, 6.0 * n * tokens * passes)


def _check_space(search: SearchSpec, base: dict, path: Path, lines: dict[str, int]) -> None:
    for axis, dist in search.space.items():
        key = f"search.space.{axis}"
        where = _where(path, lines, key)
        if not isinstance(dist, dict) or not (
            {"choices"} <= set(dist) or {"low", "high"} <= set(dist)
        ):
            raise SweepError(where, key, "needs {low, high[, log]} or {choices: [...]}")
        unknown = set(dist) - {"low", "high", "log", "choices", "int"}
        if unknown:
            raise SweepError(where, f"{key}.{sorted(unknown)[0]}", "unknown key")
        if "low" in dist:
            lo, hi = dist["low"], dist["high"]
            if not all(isinstance(v, int | float) for v in (lo, hi)) or lo >= hi:
                raise SweepError(where, key, f"needs numbers with low < high, got {lo}, {hi}")
            if dist.get("log") and lo <= 0:
                raise SweepError(where, key, "a log scale needs low > 0")
            probe = lo
        else:
            if not dist["choices"]:
                raise SweepError(where, key, "choices is empty")
            probe = dist["choices"][0]
        try:  # the path must exist in the config schema
            RunConfig.from_dict(apply_overrides(base, [f"{axis}={json.dumps(probe)}"]))
        except ConfigError as err:
            raise SweepError(where, key, str(err)) from None
        if search.sampler == "grid" and "choices" not in dist:
            raise SweepError(
                where, key, "the grid sampler needs {choices: [...]} on every axis of the space"
            )
    if search.sampler == "grid":
        points = math.prod(len(d["choices"]) for d in search.space.values())
        if search.trials > points:
            key = "search.trials"
            raise SweepError(
                _where(path, lines, key),
                key,
                f"{search.trials} trials, but the grid has {points} points (each runs once)",
            )


def describe(trial: Trial) -> dict[str, Any]:
    m = trial.config.model
    return {
        "trial": trial.short,
        "size": m.size,
        "params": count_parameters(m)["non_embedding"],
        "method": m.method,
        "l_max": m.l_max,
        "lambda": m.halting.lambda_ if m.uses_router else None,
        "tokens": trial.tokens,
        "est_flops": trial.est_flops,
        "axes": trial.axes,
    }
