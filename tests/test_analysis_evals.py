"""The evaluation section of the study report, from the eval/ metrics runs carry."""

import pandas as pd

from alcot.analysis import evals


def runs_frame() -> pd.DataFrame:
    rows = []
    for i, (method, flops) in enumerate([("adaptive", 2e12), ("vanilla", 1e12)]):
        row = {
            "run_id": f"run{i}",
            "method": method,
            "size": "tiny",
            "tau": 0.1 if method == "adaptive" else float("nan"),
            "l_max": 3 if method == "adaptive" else 0,
            "final/flops/realised": flops,
        }
        budgets = [(0.1, 3), (0.5, 3), (0.1, 1)] if method == "adaptive" else [(0.1, 0)]
        for j, (tau, l_max) in enumerate(budgets):
            key = f"final/eval/budget/tau_{tau:g}_lmax_{l_max}"
            row[f"{key}/flops_per_token"] = 1e6 * (l_max + 1) / (1 + j)
            row[f"{key}/val/ppl"] = 20.0 + j
            row[f"{key}/val/flops_per_token"] = 1e6 * (l_max + 1) / (1 + j)
            row[f"{key}/alcot_arc_easy/acc"] = 0.3 + 0.01 * i - 0.001 * j
            row[f"{key}/alcot_arc_easy/acc_stderr"] = 0.05
        rows.append(row)
    return pd.DataFrame(rows)


def test_points_accuracy_and_test_time_curve(tmp_path):
    pts = evals.eval_points(runs_frame())
    trained = pts[pts["trained"]]
    assert set(trained["run_id"]) == {"run0", "run1"}
    assert len(trained[(trained["run_id"] == "run0") & (trained["metric"] == "ppl")]) == 1

    acc = evals.accuracy_table(pts)
    assert list(acc["train_flops"]) == [1e12, 2e12]
    assert acc["alcot_arc_easy acc"].tolist() == [0.31, 0.3]

    curve, what, metric = evals.test_time_curve(pts)
    assert (what, metric) == ("val", "ppl")
    adaptive = curve[curve["run_id"] == "run0"]
    assert sorted(zip(adaptive["tau"], adaptive["l_max"], strict=True)) == [
        (0.1, 1),
        (0.1, 3),
        (0.5, 3),
    ]
    assert len(curve[curve["run_id"] == "run1"]) == 1  # vanilla: one point for comparison
    for fig in (evals.test_time_figure(curve, what, metric), evals.accuracy_vs_flops_figure(pts)):
        fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_nothing_without_eval_metrics():
    frame = runs_frame()[["run_id", "method", "size", "tau", "l_max", "final/flops/realised"]]
    assert evals.eval_points(frame).empty
