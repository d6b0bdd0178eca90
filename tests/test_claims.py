"""The study's claim tables (analysis/claims.py) on runs made up so that the answers are known:
each size is judged with its own seed noise, the R1 and R2 verdicts are Holm-corrected as one
family, a comparator whose rate was never searched is shown but not judged, and the cells table
carries the facts a reader needs (steps, warm-up, validation tokens, seed orderings)."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from alcot.analysis.claims import claims
from alcot.analysis.token_multiple import holm

TEST = "final/eval/wiki.test/ppl"
SEEDS = (0, 1, 2)


def run(size, method, seed, ppl, tokens, lr=0.01, layers=2, depth=0.0, val_ppl=None):
    return {
        "run_id": f"{size}-{method}-{layers}-{tokens}-{lr}-{seed}",
        "trial": f"{size}{method}{seed}",
        "size": size,
        "method": method,
        "layers": layers,
        "lambda": 0.01,
        "beta": 1.0,
        "l_max": 3,
        "seed": seed,
        "lr": lr,
        "final/tokens_seen": tokens,
        "final/val/loss": math.log(val_ppl if val_ppl is not None else ppl / 0.75),
        "final/val/mean_depth": depth,
        "final/flops/realised": tokens * (2.0 if method == "adaptive" else 1.0),
        "final/flops/nominal": tokens * (1.5 if method == "adaptive" else 1.0),
        TEST: ppl,
        "steps": tokens / 1024,
        "warmup_frac": 0.02,
        "warmup_steps": np.nan,
        "eval_batches": 8,
        "batch_size": 8,
        "seq_len": 128,
    }


def made_up(noise: dict[str, float], ratio: float = 1.05) -> pd.DataFrame:
    """Two sizes; adaptive is ``ratio`` x vanilla's perplexity at equal tokens at both, with
    the seeds spread by ``noise[size]`` (log scale); looped (one seed, searched: it has a run
    at another rate) is 1.5x adaptive; vanilla-deep (one seed, one rate) is 1.1x adaptive.
    Vanilla's and looped's rates were searched (a run at another rate each)."""
    rows = []
    for size, sd in noise.items():
        base = 100.0 if size == "a" else 60.0
        for seed, eps in zip(SEEDS, (-sd, 0.0, sd), strict=True):
            rows.append(run(size, "vanilla", seed, base * math.exp(eps), 1000))
            rows.append(run(size, "vanilla", seed, 0.7 * base * math.exp(eps), 4000))
            rows.append(
                run(size, "adaptive", seed, ratio * base * math.exp(-eps), 1000, depth=1 + seed)
            )
        rows.append(run(size, "looped", 0, 1.5 * ratio * base, 1000, lr=0.003))
        rows.append(run(size, "looped", 0, 9.0 * base, 1000, lr=0.01))
        rows.append(run(size, "vanilla", 0, 2.0 * base, 4000, lr=0.1))  # vanilla's search
        rows.append(run(size, "vanilla-deep", 0, 1.1 * ratio * base, 1000, layers=8))
    return pd.DataFrame(rows)


def tables(runs: pd.DataFrame):
    empty = pd.DataFrame(columns=["run_id", "step0_loss", "depth"])
    study = SimpleNamespace(runs=runs, token_depth=lambda methods=("adaptive",): empty)
    return claims(study, n_boot=10)


def test_each_size_is_judged_with_its_own_seed_noise():
    c = tables(made_up({"a": 0.2, "b": 0.002}))
    r1 = c.tables["r1_equal_tokens"].set_index("size")
    # the pooled sd of log ppl over each size's seeded groups: each group's values are
    # (-sd, 0, sd) around its mean, so their sd is sd itself
    assert r1.loc["a", "seed sd"] == pytest.approx(0.2, rel=1e-9)
    assert r1.loc["b", "seed sd"] == pytest.approx(0.002, rel=1e-9)
    assert (r1["ratio"].round(9) == 1.05).all()
    # the same 5 % gap: noise at "a", a clear loss at "b"
    assert r1.loc["a", "verdict"] == "tie: no difference after Holm"
    assert r1.loc["b", "verdict"] == "vanilla lower"
    assert r1.loc["a", "ratio low"] < 1 < r1.loc["a", "ratio high"]
    assert "a 0.2 (6 dof); b 0.002 (6 dof)" in c.notes[0]  # 3 groups x 2 dof each


def test_r1_and_r2_are_holm_corrected_as_one_family_and_an_unsearched_rate_is_not_judged():
    c = tables(made_up({"a": 0.05, "b": 0.05}))
    r1, r2 = c.tables["r1_equal_tokens"], c.tables["r2_matched_compute"]
    deep = r2[r2["versus"] == "vanilla-deep"]
    assert len(deep) == 2 and not deep["versus rate searched"].any()
    assert (deep["verdict"] == "not judged: its learning rate was not searched").all()
    assert deep["p holm"].isna().all() and deep["p"].notna().all()
    judged = pd.concat([r1, r2[r2["versus"] != "vanilla-deep"]])
    assert len(judged) == 2 + 4  # R1 at two sizes; the isoFLOP vanilla and looped at two
    np.testing.assert_allclose(judged["p holm"], holm(judged["p"].tolist()))
    assert (judged["p holm"] >= judged["p"]).all()
    looped = r2[r2["versus"] == "looped"]
    assert (looped["verdict"] == "adaptive lower").all()  # 1.5x, far outside the noise
    assert (looped["versus ppl"].to_numpy() > looped["adaptive ppl"].to_numpy()).all()
    assert r2.columns[-1] == "verdict"
    # the realised and nominal FLOPs ratios of equal tokens: 2 and 1.5 by construction
    assert r1["realised FLOPs ratio"].round(9).tolist() == [2.0, 2.0]
    assert r1["nominal FLOPs ratio"].round(9).tolist() == [1.5, 1.5]


def test_without_any_search_every_comparator_is_judged():
    runs = made_up({"a": 0.05})
    runs = runs[np.isclose(runs["lr"], 0.01) | (runs["method"] == "looped")]
    runs = runs[~((runs["method"] == "looped") & np.isclose(runs["lr"], 0.01))]
    r2 = tables(runs).tables["r2_matched_compute"]
    assert not r2["verdict"].str.startswith("not judged").any()
    assert r2.loc[r2["versus"] == "vanilla-deep", "p holm"].notna().all()


def test_r1_without_any_seed_noise_is_not_judged():
    runs = made_up({"a": 0.05})
    runs = runs[runs["seed"] == 0]
    r1 = tables(runs).tables["r1_equal_tokens"]
    assert r1["verdict"].tolist() == ["no seed noise to judge"]
    assert r1["ratio low"].isna().all()


def test_cells_state_steps_warm_up_validation_tokens_and_seed_orderings():
    runs = made_up({"a": 0.05})
    # validation ranks adaptive's seeds in the opposite order of test
    ada = runs["method"] == "adaptive"
    runs.loc[ada, "final/val/loss"] = np.log([110.0, 120.0, 130.0])
    cells = tables(runs).tables["cells"]
    row = cells[(cells["method"] == "adaptive") & (cells["lr"] == 0.01)].iloc[0]
    assert row["runs"] == 3 and row["seeds"] == "0 1 2"
    assert row["validation tokens"] == 8 * 8 * 128
    assert row["steps"] == pytest.approx(1000 / 1024)
    assert row["warm-up steps"] == 1  # 2 % of under one step, at least one
    van = cells[(cells["method"] == "vanilla") & (cells["tokens"] == 4000)].iloc[0]
    assert van["warm-up steps"] == max(1, round(0.02 * 4000 / 1024))
    assert not row["same seed order on val and test"] and van["same seed order on val and test"]
    # adaptive's seeds run deeper (1, 2, 3) and score worse (exp(-eps) with eps -sd, 0, sd:
    # better): depth against test perplexity ranks exactly opposite
    assert row["spearman seed depth vs test ppl"] == pytest.approx(-1.0)
    assert cells.loc[cells["method"] != "adaptive", "lambda"].isna().all()
    val = math.exp(np.log([110.0, 120.0, 130.0]).mean())
    assert row["test / val"] == pytest.approx(math.exp(np.log(runs.loc[ada, TEST]).mean()) / val)


def test_cells_warm_up_follows_the_trainers_rule():
    """The cells' warm-up steps are what the trainer takes (model/trainer.py warmup_count):
    warmup_steps when set, at most the run's steps; else warmup_frac x steps; else none."""
    from alcot.model.trainer import TrainerConfig, warmup_count

    runs = made_up({"a": 0.05})
    cases = {"vanilla": (0.0, 25.0), "looped": (0.0, 0.0), "vanilla-deep": (0.02, 2.0)}
    for method, (frac, fixed) in cases.items():
        runs.loc[runs["method"] == method, ["warmup_frac", "warmup_steps", "steps"]] = (
            frac, fixed, 10
        )  # fmt: skip
    cells = tables(runs).tables["cells"]
    for method, (frac, fixed) in cases.items():
        got = cells.loc[cells["method"] == method, "warm-up steps"].unique().tolist()
        want = warmup_count(TrainerConfig(steps=10, warmup_frac=frac, warmup_steps=int(fixed)))
        assert got == [want], (method, got, want)
    assert sorted(cells.loc[cells["method"].isin(cases), "warm-up steps"].unique()) == [0, 2, 10]
