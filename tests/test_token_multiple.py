"""The token multiple G of the study (analysis/token_multiple.py), on runs made up so that the
answer is known: vanilla's log perplexity is a line in log tokens, each seed shifted."""

import math

import numpy as np
import pandas as pd
import pytest

from alcot.analysis.token_multiple import token_multiples

SCORE = "final/eval/wiki.test/ppl"


def run(size, layers, method, tokens, seed, ppl, flops_per_token, lr=0.01, lam=0.01):
    return {
        "size": size,
        "layers": layers,
        "method": method,
        "lambda": lam,
        "lr": lr,
        "seed": seed,
        "params": 1000 * layers,
        "final/tokens_seen": tokens,
        "final/flops/realised": flops_per_token * tokens,
        SCORE: ppl,
    }


def study(g_true: dict[str, float], r_true: float, noise=(0.0, 0.01, -0.01)) -> pd.DataFrame:
    rows = []
    for size, layers in (("a", 2), ("b", 4)):
        d = 1000 * layers * 5
        for seed, eps in enumerate(noise):
            a, b = 6.0 + eps, -0.3  # log ppl = a + b log tokens
            for mult in (1.0, 1.5, 2.0):
                t = d * mult
                rows.append(run(size, layers, "vanilla", t, seed, math.exp(a + b * math.log(t)), 6))
            target = d * g_true[size] * math.exp(0.02 * (seed - 1))  # the seeds spread G
            ppl = math.exp(a + b * math.log(target))
            rows.append(run(size, layers, "adaptive", d, seed, ppl, 6 * r_true))
        # a learning-rate search's other point (seed 0 only) is left out of the arm
        rows.append(run(size, layers, "adaptive", d, 0, 1e6, 6 * r_true, lr=0.03))
    return pd.DataFrame(rows)


def test_g_is_recovered_with_its_interval_and_the_verdict_follows_g_against_r():
    t = token_multiples(study({"a": 1.8, "b": 1.2}, r_true=1.5), SCORE)
    assert list(t["size"]) == ["a", "b"] and (t["seeds"] == 3).all()
    g = dict(zip(t["size"], t["G"], strict=True))
    assert g["a"] == pytest.approx(1.8, rel=1e-6) and g["b"] == pytest.approx(1.2, rel=1e-6)
    assert (t["G_low"] < t["G"]).all() and (t["G"] < t["G_high"]).all()
    assert t["R"].round(6).tolist() == [1.5, 1.5]
    assert t["verdict"].tolist() == ["G > R: wins at equal realised compute", "G < R: loses"]
    assert (t["p_holm"] >= t["p"]).all() and not t["extrapolated"].any()


def test_a_g_within_noise_of_r_is_inconclusive_and_outside_vanillas_tokens_flagged():
    t = token_multiples(study({"a": 1.5, "b": 0.9}, r_true=1.5, noise=(0.0, 0.2, -0.2)), SCORE)
    assert t.loc[t["size"] == "a", "verdict"].item() == "inconclusive"
    assert t.loc[t["size"] == "b", "extrapolated"].item()


def test_a_study_without_vanilla_at_three_token_counts_has_no_table():
    s = study({"a": 1.5, "b": 1.5}, 1.0)
    s = s[~np.isclose(s["final/tokens_seen"] / (1000 * s["layers"] * 5), 2.0)]
    assert token_multiples(s, SCORE).empty


def test_a_vanilla_marked_deep_by_the_claims_is_its_sizes_vanilla():
    s = study({"a": 1.8, "b": 1.2}, r_true=1.5)
    s.loc[(s["method"] == "vanilla") & (s["layers"] == 4), "method"] = "vanilla-deep"
    assert token_multiples(s, SCORE)["size"].tolist() == ["a", "b"]
