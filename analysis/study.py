"""The study's report: the analysis report of ``alcot analyze`` plus the claims
(:mod:`alcot.analysis.claims`), as CSV tables, ``claims.md`` and figures, in one folder
(:func:`build`), and the same from a portable export (:func:`rebuild`, through
:mod:`alcot.analysis.study_export`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .claims import Claims, claims, mark_variants, ordered_sizes, own_rates, test_corpus
from .load import Study
from .study_export import import_runs


def write_claims(c: Claims, out_dir: Path) -> list[Path]:
    """Each table as ``tables/<name>.csv`` and all of them in ``claims.md``, with four
    significant digits (what the report shows), so a rebuild compares byte for byte: the
    bootstrap's refits on another machine or thread count differ past that (seen in the 5th
    digit of an interval's bound)."""
    from .report import Doc

    folder = Path(out_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):
        old.unlink()
    written = []
    doc = Doc()
    doc.h(1, "Claims R1-R5: tables")
    doc.items(c.notes)
    for name, df in c.tables.items():
        path = folder / f"{name}.csv"
        df.to_csv(path, index=False, float_format="%.4g", lineterminator="\n")
        written.append(path)
        doc.h(2, name)
        doc.table(df)
    md = Path(out_dir) / "claims.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    written.append(md)
    return written


def training_curves_figure(study: Study, flops: str = "realised"):
    """Validation loss against training tokens and against compute, one panel per size,
    one line per run, coloured by method: the training curves behind the verdicts."""
    import matplotlib.pyplot as plt

    from .curves import run_curves
    from .plots import colour

    c = run_curves(study, flops)
    sizes = ordered_sizes(c["size"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.4 * len(sizes), 6.4), squeeze=False)
    for j, size in enumerate(sizes):
        sub = c[c["size"] == size]
        for _, g in sub.groupby("run_id"):
            method = g["method"].iloc[0]
            for i, x in enumerate(("tokens", "flops")):
                axes[i][j].plot(
                    g[x], g["val_loss"], "-", color=colour(method), lw=1, alpha=0.8, label=method
                )
        for i, x in enumerate(("tokens", f"{flops} FLOPs")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_xlabel(f"training {x}")
            ax.set_ylabel("validation loss")
            ax.set_title(size, fontsize=10)
    uniq = {}
    for ax in axes[0]:
        for h, name in zip(*ax.get_legend_handles_labels(), strict=True):
            uniq.setdefault(name, h)
    fig.legend(list(uniq.values()), list(uniq.keys()), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig


def build(
    study: Study,
    out_dir: str | Path,
    flops: str = "realised",
    points: str = "envelope",
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    log=print,
):
    """The whole study report in ``out_dir``: ``report.md`` / ``report.html`` and plots
    (``alcot analyze``'s, with the larger vanilla as its own method and the target of the
    compute ratios set to vanilla's best validation perplexity), the claims tables and
    ``claims.md``, and the training-curves figure. Returns (Report, Claims)."""
    from . import plots
    from .report import build_report

    out_dir = Path(out_dir)
    mark_variants(study)
    main = at_method_rates(study)
    van = main.curves.merge(main.runs[["run_id", "method"]], on="run_id")
    van = van[van["method"] == "vanilla"]
    target = float(van["val_ppl"].min()) if not van.empty else None
    report = build_report(
        main,
        out_dir,
        flops=flops,
        points=points,
        n_boot=n_boot,
        level=level,
        target_ppl=target,
        seed=seed,
        log=log,
    )
    c = claims(study, report.scaling, level=level, seed=seed)
    write_claims(c, out_dir)
    report.figures.extend(
        plots.save(training_curves_figure(main, flops), out_dir, "training_curves")
    )
    report.figures.extend(write_token_multiple(study, out_dir, level))
    return report, c


def write_token_multiple(study: Study, out_dir: Path, level: float) -> list[Path]:
    """``tables/token_multiple.csv`` and its figure, for a study with vanilla at three or more
    token counts per size (sweeps/study_tokens.yaml; :mod:`alcot.analysis.token_multiple`);
    nothing for other studies."""
    from . import plots
    from .token_multiple import token_multiple_figure, token_multiples

    corpus = test_corpus(study.runs)
    if corpus is None:
        return []
    table = token_multiples(study.runs, f"final/eval/{corpus}/ppl", level)
    if table.empty:
        return []
    folder = out_dir / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(
        folder / "token_multiple.csv", index=False, float_format="%.4g", lineterminator="\n"
    )
    return plots.save(token_multiple_figure(table), out_dir, "token_multiple")


def at_method_rates(study: Study) -> Study:
    """The study without the learning-rate search's other points: each method's runs at its
    own rate (the one most of its runs use, as in :func:`claims`). The analysis report, its
    fits and the curves are drawn from these; the search shows in ``diag_learning_rate``."""
    import dataclasses

    r = study.runs
    _, keep = own_rates(r)
    if keep.all():
        return study
    ids = set(r.loc[keep, "run_id"])
    dropped = int((~keep).sum())
    return dataclasses.replace(
        study,
        runs=r[keep].reset_index(drop=True),
        all_runs=study.all_runs[study.all_runs["run_id"].isin(ids)].reset_index(drop=True),
        curves=study.curves[study.curves["run_id"].isin(ids)].reset_index(drop=True),
        notes=[
            *study.notes,
            f"{dropped} run(s) of the learning-rate search at other rates than their method's "
            "are left out of this report (they are in the claims' diag_learning_rate table)",
        ],
        _token_depth={},
    )


def rebuild(export: str | Path, out_dir: str | Path, log=print, **kwargs):
    """Import ``export`` into a fresh temporary sqlite MLflow store and :func:`build` the
    report from it. Returns (Report, Claims)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        name = import_runs(export, uri, f"{tmp}/mlartifacts")
        study = Study.load(name, uri=uri)
        study.uri = uri
        return build(study, out_dir, log=log, **kwargs)
