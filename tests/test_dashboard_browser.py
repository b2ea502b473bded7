"""`kdarena dashboard` served for real (`streamlit run` on 127.0.0.1) and driven in headless Chromium.

The browser is Debian's `chromium` (/usr/bin/chromium; `.ci/run` installs
it) through Python Playwright; Playwright's own browser download does not
work here. A missing Chromium fails the test rather than skipping it.
Set KDARENA_DASHBOARD_SCREENSHOT=PATH to also save the leaderboard
screenshot there (the README's dashboard/leaderboard.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, wait_http

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# what works as root in a container: no sandbox, no GPU, nothing phoning home
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PLOT_POINT = '[data-testid="stPlotlyChart"] .scatterlayer .point'
TABLE_ROWS = '[data-testid="stDataFrame"] table tbody tr'
WAIT_MS = 120_000  # first page of a fresh server: imports MLflow and plotly, reads the store


@pytest.fixture(scope="module")
def server(swept_store: dict, tmp_path_factory: pytest.TempPathFactory):
    """The dashboard on a free port of 127.0.0.1, started the way a user starts it; stopped after the module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("dashboard") / "server.log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kdarena.cli", "dashboard", "--port", str(port),
                                 "--tracking-uri", swept_store["tracking_uri"]],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=swept_store["work"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/_stcore/health", proc, log_path, "kdarena dashboard", timeout=90)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1050}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def _rows(page) -> list[str]:
    return page.locator(TABLE_ROWS).all_inner_texts()


def _wait_rows(page, n: int) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('{TABLE_ROWS}').length === {n}")


def _pick(page, label: str, option: str) -> None:
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_leaderboard_plot_filter_and_click_through(server: str, page, tmp_path: Path):
    page.goto(server)
    page.wait_for_selector(PLOT_POINT)  # the scatter is drawn
    page.wait_for_selector(TABLE_ROWS, state="attached")  # the grid's accessible table: in the DOM, not painted
    before = _rows(page)
    assert len(before) >= 2 and any("kd" in r for r in before) and any("baseline" in r for r in before)
    assert page.get_by_role("link", name="Sweeps").count() and page.get_by_role("link", name="Run").count()

    _pick(page, "Method", "baseline")
    _wait_rows(page, sum("baseline" in r for r in before))
    after = _rows(page)
    assert after != before and all("baseline" in r for r in after)
    page.wait_for_timeout(500)  # the chart redraws with the table
    page.screenshot(path=str(tmp_path / "leaderboard-filtered.png"))

    _pick(page, "Method", "All")
    _wait_rows(page, len(before))
    page.wait_for_timeout(1000)  # let plotly settle before a click on a marker
    shot = tmp_path / "leaderboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("KDARENA_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["KDARENA_DASHBOARD_SCREENSHOT"])

    marker = page.locator(PLOT_POINT).first.bounding_box()
    page.mouse.click(marker["x"] + marker["width"] / 2, marker["y"] + marker["height"] / 2)
    page.wait_for_url("**/run?run=*")  # a click on a student opens its run
    page.wait_for_selector('[data-testid="stDownloadButton"]')
    assert "Learning curves" in page.inner_text("body")


def test_run_page_downloads_the_runs_config(server: str, page, swept_store: dict, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from kdarena.leaderboards import board as lb_board

    from kdarena.leaderboards import runs as lb_runs

    board = lb_board.leaderboard(lb_runs.load_runs(swept_store["tracking_uri"]))
    run_id = board["run_id"].iloc[0]
    artifact_uri = MlflowClient(swept_store["tracking_uri"]).get_run(run_id).info.artifact_uri
    page.goto(f"{server}/run?run={run_id}")
    button = page.get_by_role("button", name="Download config.yaml")
    button.wait_for()
    with page.expect_download() as download:
        button.click()
    saved = tmp_path / "config.yaml"
    download.value.save_as(saved)
    assert saved.read_bytes() == (Path(artifact_uri.removeprefix("file://")) / "config.yaml").read_bytes()


def test_sweeps_page_draws_its_charts(server: str, page):
    page.goto(f"{server}/sweeps")
    page.wait_for_selector('[data-testid="stPlotlyChart"] .parcoords')  # the last chart on the page
    assert page.locator('[data-testid="stPlotlyChart"]').count() >= 3  # history, val_acc per method, parallel
    text = page.inner_text("body")
    assert "Optimisation history" in text and "diverged" in text and "Parameter importances" in text
