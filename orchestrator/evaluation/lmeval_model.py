"""An alcot run as an lm-eval language model (``lm_eval --model alcot --model_args run=RUN``).

``run`` is a run folder, a checkpoint folder or an MLflow run id; ``tau`` and ``l_max`` set
test-time halting; ``config`` reads the model from another ``config.yaml``. Scoring
(``loglikelihood``, ``loglikelihood_rolling``) runs batches of right-padded sequences through
the model's forward; ``generate_until`` goes through the cached latent decoder
(:func:`alcot.model.generate.generate`), batching requests whose contexts have equal length.

The harness's own CLI finds this model through
``alcot.orchestrator.evaluation.lmeval_plugin`` (installed by ``scripts/install.sh`` as a
``.pth`` hook that registers the name when lm-eval loads its registry); in Python, importing
this module registers it.
"""

from __future__ import annotations

# lm-eval loads its built-in models only into an empty registry: load them before ours
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from alcot.orchestrator.evaluation.budgets import apply_budget, budgets
from alcot.orchestrator.evaluation.loading import load_run
from alcot.orchestrator.evaluation.scoring import Stats, score_continuations


@register_model("alcot")
class AlcotHarnessLM(TemplateLM):
    backend = "causal"

    def __init__(
        self,
        run: str | None = None,
        loaded=None,
        tau: float | None = None,
        l_max: int | None = None,
        config: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int = 256,
        threads: int = 0,
        **_ignored,  # device, max_batch_size, ... passed by the harness's CLI
    ) -> None:
        super().__init__()
        if loaded is None:
            if run is None:
                raise ValueError("model_args needs run=<run folder, checkpoint or MLflow id>")
            loaded = load_run(str(run), config, threads=int(threads or 0))
            if tau is not None or l_max is not None:
                (b,) = budgets(
                    loaded,
                    [float(tau)] if tau is not None else [],
                    [int(l_max)] if l_max is not None else [],
                )
                apply_budget(loaded, b)
        self.loaded = loaded
        self.batch_size_per_gpu = _batch(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.stats = Stats()

    # ------------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.loaded.eos_id

    @property
    def max_length(self) -> int:
        return self.loaded.seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.run_dir / "tokenizer.json")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.loaded.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.loaded.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = score_continuations(self.loaded, pairs, self.batch_size_per_gpu, self.stats)
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            ids = self.tok_encode(text)
            for w in get_rolling_token_windows(
                ids, self.eot_token_id, self.max_length, context_len=1
            ):
                ctx, cont = make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores, strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from alcot.model.generate import generate

        model = self.loaded.model
        limit = model.cfg.max_seq_len
        todo = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            n_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            keep = max(1, min(self.max_length, limit - n_new))
            todo.append((i, ids[-keep:], n_new, until))
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list] = {}
        for item in todo:
            groups.setdefault((len(item[1]), item[2]), []).append(item)
        for (_, n_new), items in sorted(groups.items()):
            for start in range(0, len(items), self.batch_size_per_gpu):
                chunk = items[start : start + self.batch_size_per_gpu]
                prompt = torch.tensor([it[1] for it in chunk], dtype=torch.long)
                s0 = prompt.shape[1]

                def done(tokens, chunk=chunk, s0=s0):
                    return all(
                        any(u in self.tok_decode(row[s0:].tolist()) for u in it[3])
                        for row, it in zip(tokens, chunk, strict=True)
                    )

                gen = generate(model, prompt, n_new, stop=done)
                for row, (i, _, _, until) in zip(gen.tokens, chunk, strict=True):
                    text = self.tok_decode(row[s0:].tolist())
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


def _batch(value) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return 16
    return max(1, int(value))
