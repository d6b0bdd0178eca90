"""``alcot generate``: text from a run with each token's executed latent depth.

Every token after the first is shown with the latent steps the model ran at the position before
it, i.e. the depth it spent *predicting* that token (the pairing the depth diagnostics use), and
the probability the step-0 prediction (an ordinary one-pass forward) gave it, next to the
probability of the model's final (mixed) prediction. For methods without per-token depth
(vanilla, looped, pause, PonderLM) every position runs the same number of passes, and the
step-0 probability is the first pass's only for the latent methods (adaptive, fixed, vanilla).

Output: the terminal, coloured by depth (ANSI 256 colours), and with ``--html FILE`` a
self-contained page shading each token by its depth (hover: depth and probabilities).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alcot.common.typed import ConfigError

# background colours (ANSI 256) from light to dark for depth 0 .. l_max
_ANSI = [255, 153, 117, 75, 33, 27, 21, 19, 17]


@dataclass
class TokenView:
    text: str
    depth: int | None  # latent steps spent predicting it (None: the first token)
    p_step0: float | None
    p_final: float | None
    generated: bool


@dataclass
class DepthView:
    prompt: str
    tokens: list[TokenView]
    l_max: int
    method: str
    budget: str

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "method": self.method,
            "budget": self.budget,
            "l_max": self.l_max,
            "tokens": [t.__dict__ for t in self.tokens],
        }

    @property
    def completion(self) -> str:
        return "".join(t.text for t in self.tokens if t.generated)


def check_prompt(loaded, ids: list[int], max_new: int, what: str) -> None:
    ctx = loaded.seq_len
    if not ids:
        raise ConfigError("--prompt", f"{what} is empty")
    if len(ids) > ctx:
        raise ConfigError(
            "--prompt",
            f"{what} is {len(ids)} tokens, longer than the model's context of {ctx} tokens",
        )
    if len(ids) + max_new > loaded.model.cfg.max_seq_len:
        raise ConfigError(
            "--max-new-tokens",
            f"{what} ({len(ids)} tokens) + {max_new} new tokens exceed model.max_seq_len "
            f"{loaded.model.cfg.max_seq_len}",
        )


@torch.no_grad()
def step0_and_final(loaded, tokens: torch.Tensor):
    """Per position t: log-probs [s, V] of the step-0 prediction and of the final one."""
    model = loaded.model
    if model.cfg.method in ("adaptive", "fixed", "vanilla"):
        out, trace = model.latent_forward(tokens, return_logits=True, keep_states=True)
        h0 = trace.hidden[0]  # [s, 1, h]
        step0 = torch.log_softmax(model._gather_vocab(model._logits(h0))[:, 0].float(), -1)
    else:
        out = model(tokens, return_logits=True)
        step0 = None
    final = torch.log_softmax(out.logits[0].float(), -1)
    return (final if step0 is None else step0), final, out.depth[0]


def generate_view(
    loaded,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    what: str = "the prompt",
) -> DepthView:
    from alcot.model.generate import generate

    ids = loaded.encode(prompt)
    check_prompt(loaded, ids, max_new_tokens, what)
    gen_rng = torch.Generator().manual_seed(seed)
    g = generate(
        loaded.model,
        torch.tensor([ids], dtype=torch.long),
        max_new_tokens,
        temperature=temperature,
        generator=gen_rng,
    )
    seq = g.tokens[0].tolist()
    depth = g.depth[0].tolist()
    step0, final, _ = step0_and_final(loaded, g.tokens)
    views = []
    for t, tok in enumerate(seq):
        text = loaded.decode([tok])
        if t == 0:
            views.append(TokenView(text, None, None, None, False))
            continue
        views.append(
            TokenView(
                text,
                int(depth[t - 1]),
                float(step0[t - 1, tok].exp()),
                float(final[t - 1, tok].exp()),
                t >= len(ids),
            )
        )
    cfg = loaded.model.cfg
    budget = f"tau={cfg.halting.tau:g}, l_max={cfg.l_max}"
    return DepthView(prompt, views, cfg.l_max, cfg.method, budget)


def ansi(view: DepthView) -> str:
    """The text with a background colour per depth, and a legend."""
    scale = _ANSI[: view.l_max + 1] if view.l_max + 1 <= len(_ANSI) else _ANSI
    out = []
    for t in view.tokens:
        if t.depth is None:
            out.append(t.text)
            continue
        colour = scale[min(t.depth, len(scale) - 1)]
        fg = 16 if colour in (255, 153, 117) else 231
        style = f"\x1b[48;5;{colour}m\x1b[38;5;{fg}m" + ("\x1b[1m" if t.generated else "")
        out.append(f"{style}{t.text}\x1b[0m")
    legend = " ".join(
        f"\x1b[48;5;{scale[min(k, len(scale) - 1)]}m\x1b[38;5;{16 if k < 3 else 231}m {k} \x1b[0m"
        for k in range(view.l_max + 1)
    )
    return (
        "".join(out)
        + f"\n\nlatent steps spent predicting each token ({view.method}, {view.budget}): "
        + legend
        + "  (bold: generated)"
    )


def html_page(views: list[DepthView], title: str) -> str:
    """A self-contained page: each token shaded by its depth, hover for the numbers."""
    blocks = []
    for v in views:
        spans = []
        for t in v.tokens:
            text = html.escape(t.text).replace("\n", "<br>")
            if t.depth is None:
                spans.append(f'<span class="tok">{text}</span>')
                continue
            alpha = 0.08 + 0.82 * (t.depth / v.l_max if v.l_max else 0.0)
            tip = (
                f"depth {t.depth} of {v.l_max} | step-0 p = {t.p_step0:.4f} | "
                f"final p = {t.p_final:.4f}"
            )
            cls = "tok gen" if t.generated else "tok"
            spans.append(
                f'<span class="{cls}" style="background: rgba(33, 87, 196, {alpha:.3f})" '
                f'title="{html.escape(tip)}" data-depth="{t.depth}" '
                f'data-p0="{t.p_step0:.6f}">{text}</span>'
            )
        mean = [t.depth for t in v.tokens if t.depth is not None]
        avg = sum(mean) / len(mean) if mean else 0.0
        blocks.append(
            f"<section><h2>{html.escape(v.method)} ({html.escape(v.budget)}), mean depth "
            f"{avg:.2f}</h2><p class='text'>{''.join(spans)}</p></section>"
        )
    legend = "".join(
        f'<span class="tok" style="background: rgba(33, 87, 196, '
        f'{0.08 + 0.82 * (k / max(views[0].l_max, 1)):.3f})">&nbsp;{k}&nbsp;</span> '
        for k in range(views[0].l_max + 1)
    )
    data = html.escape(json.dumps([v.to_dict() for v in views]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; }}
.text {{ font-family: ui-monospace, monospace; line-height: 1.9; white-space: pre-wrap; }}
.tok {{ border-radius: 3px; padding: 1px 0; }}
.gen {{ font-weight: bold; text-decoration: underline dotted; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each token is shaded by the latent steps the model ran to predict it (darker: more).
Hover a token for its depth and the probability the step-0 (one-pass) prediction and the final
prediction gave it. Bold: generated. Depth: {legend}</p>
{"".join(blocks)}
<script type="application/json" id="data">{data}</script>
</body></html>
"""


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if prompt is not None:
        return [prompt]
    path = Path(prompt_file).expanduser()
    if not path.is_file():
        raise ConfigError("--prompt-file", f"{path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("--prompt-file", f"{path} is not valid UTF-8 ({err.reason})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("--prompt-file", f"{path} has no prompts (one per line)")
    return prompts
