"""Evaluation of a finished run: perplexity on any text, downstream tasks through lm-eval, and
test-time halting budgets (``alcot eval``).

What a run leaves and evaluation reads: the run folder's ``config.yaml`` (the resolved config,
the vocabulary included), ``checkpoints/step_*/tp<r>.pt`` (the weights; tensor-parallel shards
are gathered) and ``tokenizer.json`` (training copies the token cache's tokenizer there; for
older folders it is found again in the token cache from the data settings). A run is named by
its folder, one of its checkpoint folders, or its MLflow run id.

A *budget* is a test-time setting of the halting rule: ``tau`` (pruning threshold on the reach)
and ``l_max`` (the most latent steps). Evaluating one checkpoint at several budgets gives the
test-time compute curve: quality against the inference FLOPs per token actually spent.

Every input is checked before anything is computed or recorded: a bad one is a
:class:`ConfigError` naming it (exit code 2 in the CLI) and nothing reaches MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from alcot.model import checkpoints
from alcot.model.typed import ConfigError

from .config import RunConfig, alcot_home

TEXT_SUFFIXES_JSONL = (".jsonl", ".json")


# ------------------------------------------------------------------------------ loading a run
@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig  # as trained (model.vocab_size from the tokenizer)
    checkpoint: checkpoints.CheckpointInfo
    model: object  # AlcotModel (tensor_parallel_size 1)
    tokenizer: object  # tokenizers.Tokenizer
    eos_id: int
    trained: Budget = None  # type: ignore[assignment]

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

    from .tracking import open_client, resolve_uri

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
    from alcot.model.reshard import full_model_state

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
    from alcot.model.reshard import saved_layout

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
    loaded.trained = Budget(cfg.model.halting.tau, cfg.model.l_max)
    return loaded


# ------------------------------------------------------------------------------ budgets
@dataclass(frozen=True)
class Budget:
    tau: float
    l_max: int

    @property
    def label(self) -> str:
        return f"tau={self.tau:g},l_max={self.l_max}"

    @property
    def key(self) -> str:
        """A form MLflow metric names accept."""
        return f"tau_{self.tau:g}_lmax_{self.l_max}"


def budgets(loaded: LoadedRun, taus: Sequence[float] = (), l_maxes: Sequence[int] = ()):
    """Every combination of the given test-time values (the trained ones where none given),
    checked against what the method can change after training."""
    cfg = loaded.cfg.model
    taus = list(taus) or [cfg.halting.tau]
    l_maxes = list(l_maxes) or [cfg.l_max]
    for t in taus:
        if not 0.0 < float(t) < 1.0:
            raise ConfigError("--tau", f"must be in (0, 1), got {t}")
    for lm in l_maxes:
        if int(lm) != lm or lm < 0:
            raise ConfigError("--l-max", f"must be an integer >= 0, got {lm}")
        lm = int(lm)
        if lm == cfg.l_max:
            continue
        if cfg.method == "vanilla":
            raise ConfigError("--l-max", "a vanilla model has no latent steps (l_max is 0)")
        if cfg.method == "pause":
            raise ConfigError(
                "--l-max", f"a pause model has exactly {cfg.l_max} trained pause tokens"
            )
        if cfg.method == "mor" and lm > cfg.l_max:
            raise ConfigError(
                "--l-max", f"Mixture-of-Recursions has {cfg.l_max} trained recursion routers"
            )
        if cfg.method in ("looped", "ponder", "fixed", "mor") and lm < 1:
            raise ConfigError("--l-max", f"method {cfg.method!r} needs l_max >= 1")
        if cfg.uses_router and cfg.halting.router == "per_step" and lm > cfg.l_max:
            raise ConfigError(
                "--l-max",
                f"the per-step router has {cfg.l_max} trained steps; l_max {lm} needs more",
            )
    if not cfg.uses_router:  # tau only steers a router: one budget per l_max elsewhere
        taus = [cfg.halting.tau]
    out = []
    for lm in l_maxes:
        for t in taus:
            b = Budget(float(t), int(lm))
            if b not in out:
                out.append(b)
    return out


def apply_budget(loaded: LoadedRun, budget: Budget) -> None:
    """Set the model's halting to ``budget`` (only ``adaptive`` has a tau to change)."""
    base = loaded.cfg.model
    halting = dataclasses.replace(base.halting, tau=budget.tau)
    loaded.model.cfg = dataclasses.replace(base, l_max=budget.l_max, halting=halting)


# ------------------------------------------------------------------------------ scoring
@dataclass
class Stats:
    """What the forwards of one budget cost: realised inference FLOPs over positions run."""

    flops: float = 0.0
    positions: int = 0
    depth: list[int] = field(default_factory=list)  # histogram of executed latent steps

    def add(self, out, valid: torch.Tensor | None = None) -> None:
        self.flops += float(out.flops["realised"])
        self.positions += int(out.flops["tokens"])
        d = out.depth if valid is None else out.depth[valid]
        hist = torch.bincount(d.flatten().cpu(), minlength=len(self.depth)).tolist()
        self.depth = [a + b for a, b in zip(self.depth + [0] * len(hist), hist, strict=False)]

    def summary(self) -> dict:
        total = sum(self.depth)
        frac = [c / total for c in self.depth] if total else []
        return {
            "flops_per_token": self.flops / self.positions if self.positions else 0.0,
            "mean_depth": sum(k * f for k, f in enumerate(frac)),
            "depth_fraction": frac,
            "positions": self.positions,
        }


@torch.no_grad()
def forward_logprobs(model, rows: list[list[int]], pad: int, stats: Stats | None):
    """Log-probabilities [b, s, V] of right-padded ``rows`` (causal: padding after a row's
    tokens changes nothing before it; latent halting is per token)."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    out = model(x, return_logits=True)
    if stats is not None:
        stats.add(out, valid)
    return torch.log_softmax(out.logits.float(), dim=-1)


def score_continuations(
    loaded: LoadedRun,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    stats: Stats | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy continuation) for each
    (context ids, continuation ids); contexts are cut from the left to the model's context. A
    continuation longer than the context is scored in pieces of the context's length, each with
    as much of what precedes it as fits (as a sliding-window perplexity would score it)."""
    window = loaded.seq_len
    prepared, owner = [], []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("an empty continuation has no likelihood")
        seq = list(ctx) + list(cont)
        for a in range(len(ctx), len(seq), window):
            piece = seq[a : a + window]
            whole = seq[: a + len(piece)][-(window + 1) :]
            prepared.append((whole[:-1], piece))
            owner.append(i)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prepared[i][0] for i in idx]
        logp = forward_logprobs(loaded.model, rows, loaded.eos_id, stats)
        for j, i in enumerate(idx):
            inp, cont = prepared[i]
            n = len(cont)
            lp = logp[j, len(inp) - n : len(inp)]
            target = torch.tensor(cont, dtype=torch.long)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = (total, greedy)
    combined = [(0.0, True)] * len(requests)
    for i, (lp, greedy) in zip(owner, results, strict=True):
        combined[i] = (combined[i][0] + lp, combined[i][1] and greedy)
    return combined


# ------------------------------------------------------------------------------ text perplexity
def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of a UTF-8 text file (one document) or a jsonl file (one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("--text", f"{path} does not exist")
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 20]:
        raise ConfigError("--text", f"{path} looks binary (it has NUL bytes), not UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            "--text", f"{path} is not valid UTF-8 (byte {err.start}, line {line}): convert it"
        ) from None
    if path.suffix.lower() not in TEXT_SUFFIXES_JSONL:
        if not text.strip():
            raise ConfigError("--text", f"{path} is empty")
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError("--text", f"{path}:{lineno}: not JSON ({err})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise ConfigError("--text-field", f"{path}:{lineno} has no text field {text_field!r}")
        if rec[text_field].strip():
            docs.append(rec[text_field])
    if not docs:
        raise ConfigError("--text", f"{path} has no documents")
    return docs


def token_stream(loaded: LoadedRun, docs: Iterable[str]) -> tuple[list[int], int]:
    """Documents tokenised and joined by the end-of-text token, as training packs them; and
    their UTF-8 byte count."""
    ids: list[int] = []
    n_bytes = 0
    for enc, doc in zip(loaded.tokenizer.encode_batch(list(docs)), docs, strict=True):
        ids.extend(enc.ids)
        ids.append(loaded.eos_id)
        n_bytes += len(doc.encode("utf-8"))
    return ids, n_bytes


def sliding_nll(
    loaded: LoadedRun,
    ids: Sequence[int],
    stride: int | None = None,
    batch_size: int = 8,
    stats: Stats | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of every token after the first,
    in windows of the model's context moved by ``stride`` (default: the context, i.e. disjoint
    windows exactly as training's validation reads them). Each token is scored once, with as
    much preceding context as its window holds."""
    window = loaded.seq_len
    stride = stride or window
    if not 1 <= stride <= window:
        raise ConfigError("--stride", f"must be in [1, {window}], got {stride}")
    n = len(ids)
    if n < 2:
        raise ConfigError("--text", "fewer than two tokens: nothing to score")
    pieces = []  # (inputs, targets, score from index)
    scored_to = 0  # targets ids[1 : scored_to + 1] are done
    begin = 0
    while scored_to < n - 1:
        end = min(begin + window, n - 1)
        inputs = list(ids[begin:end])
        targets = list(ids[begin + 1 : end + 1])
        first_new = scored_to - begin  # targets before this index were scored already
        pieces.append((inputs, targets, max(first_new, 0)))
        scored_to = end
        begin += stride
    nll, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start : start + batch_size]
        logp = forward_logprobs(loaded.model, [p[0] for p in chunk], loaded.eos_id, stats)
        for j, (inputs, targets, skip) in enumerate(chunk):
            t = torch.tensor(targets[skip:], dtype=torch.long)
            lp = logp[j, skip : len(inputs)].gather(-1, t[:, None])
            nll -= float(lp.double().sum())
            count += len(t)
    return nll, count


def text_metrics(loaded: LoadedRun, path: Path, stride=None, batch_size=8, text_field="text"):
    """Perplexity per token and bits per byte of one file, with what the forwards cost."""
    docs = read_documents(path, text_field)
    ids, n_bytes = token_stream(loaded, docs)
    stats = Stats()
    nll, count = sliding_nll(loaded, ids, stride, batch_size, stats)
    return {
        "ppl": math.exp(min(nll / count, 50.0)),
        "loss": nll / count,
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": count,
        "bytes": n_bytes,
        "documents": len(docs),
        **{k: v for k, v in stats.summary().items() if k != "positions"},
    }


def corpus_name(path: Path) -> str:
    """A metric-safe name for a text file (its stem)."""
    import re

    return re.sub(r"[^\w.\-]", "_", Path(path).stem) or "text"


# ------------------------------------------------------------------------------ a whole eval
@dataclass
class EvalSpec:
    texts: list[Path] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    taus: list[float] = field(default_factory=list)
    l_maxes: list[int] = field(default_factory=list)
    batch_size: int = 16
    stride: int | None = None
    text_field: str = "text"
    seed: int = 1234

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["texts"] = [str(p) for p in self.texts]
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        return d

    def key(self) -> str:
        """Identity of what is evaluated (for skipping work already done)."""
        import hashlib

        d = self.to_dict()
        d.pop("batch_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_spec(spec: EvalSpec) -> None:
    """Everything about the inputs that can be checked without a model."""
    if not spec.texts and not spec.tasks:
        raise ConfigError("eval", "nothing to evaluate: give --text FILE and/or --tasks NAMES")
    for p in spec.texts:
        read_documents(p, spec.text_field)  # existence, UTF-8, fields
    if spec.tasks:
        from .lmeval_tasks import check_tasks

        check_tasks(spec.tasks, spec.data_dir)
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError("--limit", f"must be >= 1, got {spec.limit}")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise ConfigError("--num-fewshot", f"must be >= 0, got {spec.num_fewshot}")


def run_eval(loaded: LoadedRun, spec: EvalSpec, log=print) -> dict:
    """Evaluate ``loaded`` at every budget of ``spec``; returns the result document."""
    check_spec(spec)
    todo = budgets(loaded, spec.taus, spec.l_maxes)
    result = {
        "run_dir": str(loaded.run_dir),
        "checkpoint": str(loaded.checkpoint.path),
        "step": loaded.checkpoint.step,
        "method": loaded.cfg.model.method,
        "size": loaded.cfg.model.size,
        "trained": dataclasses.asdict(loaded.trained),
        "spec": spec.to_dict(),
        "spec_key": spec.key(),
        "time": time.time(),
        "budgets": [],
    }
    for b in todo:
        apply_budget(loaded, b)
        entry: dict = {"tau": b.tau, "l_max": b.l_max, "label": b.label, "corpora": {}}
        stats = Stats()
        for path in spec.texts:
            log(f"[{b.label}] perplexity of {path}")
            m = text_metrics(loaded, path, spec.stride, spec.batch_size, spec.text_field)
            entry["corpora"][corpus_name(path)] = m
            stats.flops += m["flops_per_token"] * m["tokens"]
            stats.positions += m["tokens"]
        if spec.tasks:
            from .lmeval_tasks import evaluate_tasks

            log(f"[{b.label}] lm-eval tasks {', '.join(spec.tasks)}")
            tasks, task_stats = evaluate_tasks(loaded, spec)
            entry["tasks"] = tasks
            stats.flops += task_stats.flops
            stats.positions += task_stats.positions
            entry["task_cost"] = task_stats.summary()
        entry["flops_per_token"] = stats.flops / stats.positions if stats.positions else 0.0
        result["budgets"].append(entry)
    apply_budget(loaded, loaded.trained)
    return result


def metrics_of(result: dict) -> dict[str, float]:
    """MLflow metrics: ``eval/<task>/<metric>`` and ``eval/<corpus>/ppl`` (and bits per byte,
    FLOPs per token, mean depth) at the trained budget, and the same under
    ``eval/budget/<tau_..._lmax_...>/`` for every budget evaluated. ``flops_per_token`` is over
    everything this evaluation ran; ``<corpus>/flops_per_token`` and ``tasks/flops_per_token``
    (the lm-eval forwards) are per part."""
    trained = Budget(**result["trained"])
    out: dict[str, float] = {}
    for entry in result["budgets"]:
        b = Budget(entry["tau"], entry["l_max"])
        flat = {"flops_per_token": entry["flops_per_token"]}
        for name, m in entry["corpora"].items():
            for k in ("ppl", "bits_per_byte", "flops_per_token", "mean_depth"):
                flat[f"{name}/{k}"] = m[k]
        for task, ms in entry.get("tasks", {}).items():
            for k, v in ms.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    flat[f"{task}/{k}"] = float(v)
        if "task_cost" in entry:  # what the lm-eval tasks' forwards spent, all tasks together
            flat["tasks/flops_per_token"] = entry["task_cost"]["flops_per_token"]
            flat["tasks/mean_depth"] = entry["task_cost"]["mean_depth"]
        for k, v in flat.items():
            out[f"eval/budget/{b.key}/{k}"] = v
            if b == trained:
                out[f"eval/{k}"] = v
    return out


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def table(result: dict) -> str:
    """The results as a fixed-width table: one row per (budget, corpus or task metric)."""
    rows = [("budget", "what", "metric", "value", "± stderr")]
    for entry in result["budgets"]:
        rows.append((entry["label"], "all", "FLOPs/token", f"{entry['flops_per_token']:.4g}", ""))
        for name, m in entry["corpora"].items():
            rows.append((entry["label"], name, "ppl", f"{m['ppl']:.3f}", ""))
            rows.append((entry["label"], name, "bits/byte", f"{m['bits_per_byte']:.4f}", ""))
            rows.append((entry["label"], name, "mean depth", f"{m['mean_depth']:.3f}", ""))
        for task, ms in entry.get("tasks", {}).items():
            for k, v in ms.items():
                if k.endswith("_stderr") or not isinstance(v, int | float):
                    continue
                err = ms.get(f"{k}_stderr")
                err_s = _num(err) if isinstance(err, int | float) else ""
                rows.append((entry["label"], task, k, _num(v), err_s))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tracker(loaded: LoadedRun, log):
    """A Tracker on the run folder's own MLflow run (None when it was never tracked)."""
    from .tracking import folder_tracker

    return folder_tracker(loaded.run_dir, log=log)


def log_artifacts(loaded: LoadedRun, paths: list[Path], artifact_path: str, log=print) -> None:
    """Copy ``paths`` into the run folder (``<artifact_path>/``) and log them to its run."""
    import shutil

    from .lease import Lease
    from .tracking import read_status

    dest = loaded.run_dir / artifact_path
    dest.mkdir(exist_ok=True)
    kept = []
    for p in paths:
        target = dest / Path(p).name
        if Path(p).resolve() != target.resolve():
            shutil.copyfile(p, target)
        kept.append(target)
    with Lease(loaded.run_dir, label="logging artifacts") as _:
        tracker = _tracker(loaded, log)
        if tracker is None:
            log(f"{loaded.run_dir} was not tracked in MLflow: files kept in {dest}")
            return
        for p in kept:
            tracker.log_artifact(p, artifact_path)
        tracker.finish(read_status(loaded.run_dir))
        log(f"logged {len(kept)} files to MLflow run {tracker.run_id} ({artifact_path}/)")


def record(loaded: LoadedRun, result: dict, log=print) -> Path:
    """Keep the result in the run folder (``eval/<time>-<key>.json``) and deliver it to the
    run's MLflow entry through the folder's journal (metrics at the checkpoint's step, the
    JSON as an artifact under ``eval/``). Returns the JSON's path."""
    return keep_result(
        loaded, result, "eval", result["spec_key"], metrics_of(result), "evaluation", log, True
    )


def keep_result(
    loaded: LoadedRun,
    result: dict,
    folder: str,
    name: str,
    metrics: dict[str, float],
    label: str,
    log=print,
    artifact: bool = False,
) -> Path:
    """Keep ``result`` (with its ``time`` and ``step``) as ``<folder>/<time>-<name>.json`` in
    the run folder, written whole or not at all, then, holding the folder's lease (``label``
    names the holder), deliver ``metrics`` at the result's step to the run's MLflow entry
    through the folder's journal, with the JSON as an artifact under ``<folder>/`` when
    ``artifact``. A folder never tracked keeps the file only. Returns the JSON's path."""
    from .lease import Lease
    from .tracking import read_record, read_status

    out = loaded.run_dir / folder
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(result["time"]))
    path = out / f"{stamp}-{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    if read_record(loaded.run_dir) is None:
        log(f"{loaded.run_dir} was not tracked in MLflow: results kept in {path}")
        return path
    claim = Lease(loaded.run_dir, label=label)
    claim.acquire(log=log)
    try:
        tracker = _tracker(loaded, log)
        tracker.on_metrics(result["step"], metrics)
        if artifact:
            tracker.log_artifact(path, folder)
        tracker.finish(read_status(loaded.run_dir))
        if tracker.run_id:
            log(f"results logged to MLflow run {tracker.run_id} (and kept in {path})")
    finally:
        claim.release()
    return path


# ------------------------------------------------------------------------------ inside sweeps
def spec_from_section(section: dict) -> EvalSpec:
    """An :class:`EvalSpec` from a sweep's ``eval:`` section (paths already absolute)."""
    d = dict(section)
    return EvalSpec(
        texts=[Path(p) for p in d.get("texts") or []],
        tasks=list(d.get("tasks") or []),
        data_dir=Path(d["data_dir"]) if d.get("data_dir") else None,
        num_fewshot=d.get("num_fewshot"),
        limit=d.get("limit"),
        taus=[float(t) for t in d.get("tau") or []],
        l_maxes=[int(k) for k in d.get("l_max") or []],
        batch_size=int(d.get("batch_size") or 16),
    )


def done_before(run_dir: Path, spec: EvalSpec) -> Path | None:
    """The result file of an earlier evaluation of the run's newest checkpoint with the same
    spec, if there is one."""
    info = checkpoints.latest_valid(Path(run_dir) / "checkpoints")
    if info is None:
        return None
    for path in sorted((Path(run_dir) / "eval").glob(f"*-{spec.key()}.json"), reverse=True):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if old.get("step") == info.step and old.get("spec_key") == spec.key():
            return path
    return None


def evaluate_trial(run_dir: Path, section: dict, log=print) -> Path:
    """A sweep trial's evaluation after its training: skipped when the same evaluation of the
    same checkpoint is already in the run folder (a resubmitted sweep)."""
    spec = spec_from_section(section)
    before = done_before(run_dir, spec)
    if before is not None:
        log(f"evaluation already done: {before}")
        return before
    loaded = load_run(run_dir)
    result = run_eval(loaded, spec, log=log)
    log(table(result))
    return record(loaded, result, log=log)
