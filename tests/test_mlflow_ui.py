"""The MLflow UI as a user sees it after ``alcot ui``, in a real headless Chromium (Debian's
``chromium``, driven by Playwright): the experiment opens in the training-runs view, the trials
have readable names, key settings and final metrics as columns, their dataset with its digest,
the code version and their logged model; the saved view's Chart tab draws the scaling study's
charts (perplexity against log10 FLOPs, the Pareto scatter, parallel coordinates). Screenshots
go to ``$ALCOT_TEST_ARTIFACTS/ui`` (CI keeps them) or the test's temp folder."""

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import home_at
from services import ROOT, free_port, require, wait_for

BIN = Path(sys.executable).parent

SWEEP = """
study: uitest
base:
  seed: 0
  model: {size: micro, method: adaptive, l_max: 2}
  data: {builtin_documents: 600, vocab_size: 512, seq_len: 32}
  train: {batch_size: 8, lr: 0.01, eval_every: 10, eval_batches: 2, checkpoint_every: 10}
  tracking: {flush_seconds: 0.2}
grid:
  model.method: [adaptive, vanilla]
budget: {tokens: 5120}
"""


def _store(home: Path, tmp: Path):
    """A sweep's runs as ``run_sweep`` records them (a parent run, one nested run per trial),
    trained in this process instead of on Ray."""
    from alcot.orchestrator.sweeps.parent_runs import open_parent
    from alcot.orchestrator.sweeps.spec import load_sweep
    from alcot.orchestrator.training_run import run_training

    path = tmp / "sweep.yaml"
    path.write_text(textwrap.dedent(SWEEP))
    sweep = load_sweep(path)
    opened = open_parent(sweep, home, "sweep")
    client, parent = opened.client, opened.run_id
    outcomes = {}
    for t in sweep.trials:
        tags = {"mlflow.parentRunId": parent, "alcot.sweep_id": sweep.sweep_id}
        out = run_training(t.config, progress=False, log=lambda *a: None, extra_tags=tags)
        assert out.result.status == "finished"
        outcomes[t.config.model.method] = client.get_run(out.run_id)
    opened.close("FINISHED")
    return outcomes


def _shots() -> Path:
    base = os.environ.get("ALCOT_TEST_ARTIFACTS")
    return Path(base) / "ui" if base else None


@pytest.mark.slow
def test_alcot_ui_in_a_real_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require("chromium", chromium is not None, "apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("playwright", False, "pip install playwright")
    shots = _shots() or tmp_path / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    with home_at(home):
        runs = _store(home, tmp_path)
    adaptive, vanilla = runs["adaptive"], runs["vanilla"]
    ppl = adaptive.data.metrics["val/ppl"]
    commit = adaptive.data.tags["mlflow.source.git.commit"]

    port = free_port()
    log = tmp_path / "ui.log"
    env = dict(os.environ, ALCOT_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen(
        [str(BIN / "alcot"), "ui", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 180, "alcot ui", ui, log)
        # `alcot ui` names each experiment with the address of its saved view
        printed = re.search(r"uitest: (http://\S+)", log.read_text())
        assert printed, log.read_text()
        view_url = printed.group(1)
        home_url = re.search(r"MLflow UI for \S+ at (http://\S+)", log.read_text()).group(1)
        assert home_url.endswith("#/experiments?workflowType=machine_learning")
        assert "viewStateShareKey=alcot-runs" in view_url
        charts_url = re.search(r"uitest charts: (http://\S+)", log.read_text()).group(1)
        assert charts_url == view_url + "&compareRunsMode=CHART"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                _check_pages(browser, home_url, view_url, adaptive, vanilla, ppl, commit, shots)
                _check_charts(browser, charts_url, (adaptive, vanilla), shots)
            finally:
                browser.close()
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(30)
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "1-experiments.png",
        "2-alcot-view.png",
        "3-experiment-clicked.png",
        "4-run-page.png",
        "5-charts.png",
    ]


def _text(page) -> str:
    return page.inner_text("body")


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant side panel that narrows the table; close it if shown."""
    panel = page.get_by_text("MLflow Assistant")
    if panel.count():
        buttons = page.locator("button[aria-label='Close']")
        if buttons.count():
            buttons.last.click()


def _check_pages(browser, home_url, view_url, adaptive, vanilla, ppl, commit, shots):
    page = browser.new_page(viewport={"width": 2400, "height": 1000})
    # 1. the experiments list at the address `alcot ui` prints: the study is there
    page.goto(home_url)
    page.get_by_text("uitest").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "1-experiments.png"))

    # 2. the study's address `alcot ui` prints: the training-runs view (not the GenAI traces
    # overview), every trial by name, sorted by val/ppl, key settings and final metrics shown
    page.goto(view_url)
    page.get_by_text(adaptive.info.run_name).first.wait_for(timeout=60_000)
    time.sleep(2)
    _close_assistant(page)
    time.sleep(1)
    page.screenshot(path=str(shots / "2-alcot-view.png"))
    text = _text(page)
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    assert "matching runs" in text and "Token Usage" not in text  # runs, not traces usage
    assert adaptive.info.run_name in text and vanilla.info.run_name in text
    assert re.match(r"adaptive-micro-lam0\.01-L2-[0-9a-f]{6}$", adaptive.info.run_name)
    for column in ("val/ppl", "val/mean_depth", "flops/realised", "model.halting.lambda"):
        assert column in text, column
    assert repr(ppl)[:5] in text  # the adaptive run's final validation perplexity
    digest = adaptive.inputs.dataset_inputs[0].dataset.digest
    assert f"alcot-builtin ({digest[:20]}" in text  # Dataset column: corpus and digest
    assert "Sort: val/ppl" in text

    # 3. a user who picks "Model training" once (the browser keeps it) and clicks the study
    # in the list gets the runs view too, trials nested under the sweep's parent run
    first = browser.new_page(viewport={"width": 2400, "height": 1000})  # a first-time visitor
    first.goto(home_url.split("?")[0])  # the plain address: MLflow starts in GenAI mode
    first.get_by_text("uitest").first.wait_for(timeout=60_000)
    first.get_by_text("Model training").first.click()
    time.sleep(3)  # the switch re-renders the list
    first.locator("a", has_text="uitest").first.click()
    first.get_by_text("sweep-").first.wait_for(timeout=60_000)
    time.sleep(1)
    _close_assistant(first)
    first.screenshot(path=str(shots / "3-experiment-clicked.png"))
    text = _text(first)
    assert "matching runs" in text and "Token Usage" not in text, page.url

    # 4. a trial's page: description, source with the commit, dataset, the logged model
    page.goto(view_url)
    page.get_by_text(adaptive.info.run_name).first.click()
    page.get_by_text("About this run").first.wait_for(timeout=60_000)
    time.sleep(2)
    _close_assistant(page)
    page.screenshot(path=str(shots / "4-run-page.png"), full_page=True)
    text = _text(page)
    assert "alcot training run" in text and "model.halting.lambda" in text
    assert commit[:7] in text  # Source: the code version
    assert "Logged models (1)" in text
    assert f"final val/ppl = {ppl:.4g}" in text.replace("`", "")


# What each chart of the saved view drew: Plotly's own figure state of its line and scatter
# charts (x-axis title, trace kind, points) and the axis labels of the parallel coordinates
# chart (MLflow draws that one with d3's parcoords).
_CHARTS_JS = """() => ({
  plots: Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
    xtitle: gd._fullLayout && gd._fullLayout.xaxis && gd._fullLayout.xaxis.title
      ? String(gd._fullLayout.xaxis.title.text || '') : '',
    traces: (gd.data || []).map(d => ({mode: d.mode || '',
      x: (d.x || []).filter(v => v !== null && v !== undefined)})),
  })),
  parallel: Array.from(document.querySelectorAll('.parcoords .label'))
    .map(e => e.textContent || ''),
})"""


def _check_charts(browser, charts_url, runs, shots):
    """5. the saved view's Chart tab: the scaling study's three charts, drawn from the runs."""
    from alcot.orchestrator.tracking.metadata import FLOPS_LOG_METRIC, PARALLEL_PARAMS, PPL_METRIC

    final = {round(math.log10(r.data.metrics["flops/realised"]), 6) for r in runs}
    page = browser.new_page(viewport={"width": 2400, "height": 1400})
    page.goto(charts_url)
    page.get_by_text("Scaling study").first.wait_for(timeout=60_000)
    _close_assistant(page)

    def drawn_as_configured():
        drawn = page.evaluate(_CHARTS_JS)
        on_flops = [p for p in drawn["plots"] if p["xtitle"] == FLOPS_LOG_METRIC]
        lines = [t for p in on_flops for t in p["traces"] if "lines" in t["mode"] and t["x"]]
        dots = [t for p in on_flops for t in p["traces"] if t["mode"] == "markers"]
        return drawn, lines, dots

    deadline = time.time() + 90
    while True:  # the charts fetch the metric histories after the cards are shown
        drawn, lines, dots = drawn_as_configured()
        if lines and dots and len(drawn["parallel"]) >= 4:
            break
        if time.time() > deadline:
            page.screenshot(path=str(shots / "5-charts.png"), full_page=True)
            pytest.fail(f"the saved view's charts were not drawn as configured: {drawn}")
        time.sleep(2)
    time.sleep(1)
    page.screenshot(path=str(shots / "5-charts.png"), full_page=True)
    # perplexity against log10 FLOPs: a line per trial through its evaluations (steps 10, 20),
    # ending at the trial's final FLOPs
    assert all(len(t["x"]) == 2 for t in lines), lines
    assert {round(max(t["x"]), 6) for t in lines} == final, (lines, final)
    # the Pareto view: one point per trial at its final FLOPs
    assert {round(x, 6) for t in dots for x in t["x"]} == final, (dots, final)
    # parallel coordinates over size, method, lambda and perplexity (long labels are shortened)
    labels = " ".join(drawn["parallel"])
    for key in (*PARALLEL_PARAMS, PPL_METRIC):
        assert key[:5] in labels and key[-5:] in labels, (key, drawn["parallel"])
    page.close()
