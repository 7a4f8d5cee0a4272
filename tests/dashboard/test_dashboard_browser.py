"""`align dashboard` in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

On a finished tiny pipeline's runs directory (tests/dashboard/conftest.py: real stages, few steps) plus an
interrupted and a failed run: every run is listed with its state, the curves draw what metrics.jsonl holds,
the evaluation report opens with its tables and plots, the side-by-side view filters, the sampled completions
show.  Screenshots of each view go to the test's temporary directory (and to $DASHBOARD_SCREENSHOTS when set:
docs/images/ is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def first_existing(paths) -> str | None:
    return next((p for p in paths if Path(p).is_file()), shutil.which(Path(paths[0]).name))


def browser_or_skip():
    """Skip without selenium or chromium, except under CI (it installs them): there a missing one fails."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if first_existing(CHROMIUM) is None or first_existing(CHROMEDRIVER) is None:
        missing.append("chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail("the browser test needs " + " and ".join(missing))
        pytest.skip("needs " + " and ".join(missing))


@pytest.fixture(scope="module")
def server(tiny_runs):
    """The dashboard over the runs directory, served by uvicorn on a free loopback port in a thread."""
    import uvicorn

    from alignment.dashboard.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(tiny_runs), host="127.0.0.1", port=port, log_level="warning")
    serving = uvicorn.Server(config)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not serving.started:
        assert time.time() < deadline, "the dashboard did not start within 30 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    serving.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = first_existing(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(first_existing(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(browser, css: str, count: int = 1, timeout: float = 30):
    """The elements matching `css` once there are at least `count` of them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, css)) >= count)
    return browser.find_elements(By.CSS_SELECTOR, css)


def screenshot(browser, tmp_path: Path, name: str) -> Path:
    """A full-page picture: the window is stretched to the page's height first."""
    height = browser.execute_script("return Math.max(document.body.scrollHeight, 1000)")
    browser.set_window_size(1400, min(height + 40, 2400))  # a long report: its top, tables and plots
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} is (almost) empty"
    keep = os.environ.get("DASHBOARD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    browser.set_window_size(1400, 1000)
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_overview_lists_every_run_with_its_state(browser, server, tiny_runs, tmp_path):
    browser.get(server + "/#/")
    rows = wait_for(browser, "#runs tr[data-run]", count=6)
    states = {row.get_attribute("data-run"): row.get_attribute("data-state") for row in rows}
    assert states == {"tiny/sft": "finished", "tiny/ppo": "finished", "tiny/dpo": "finished",
                      "tiny/best_of_n": "finished", "ppo_interrupted": "resumable", "dpo_failed": "failed"}
    interrupted = next(row for row in rows if row.get_attribute("data-run") == "ppo_interrupted")
    assert "resumable from checkpoint-4" in interrupted.text  # options.save_steps=2 of 4 steps: the last one
    assert interrupted.find_element("css selector", ".state").text == "resumable"
    pipeline = wait_for(browser, "[data-pipeline='tiny']")[0]
    assert pipeline.find_element("css selector", ".state").text == "finished"
    assert [s.text.split()[0] for s in pipeline.find_elements("css selector", ".stage")] == \
        ["sft", "ppo", "dpo", "best_of_n"]
    assert "tiny/eval" in pipeline.text
    screenshot(browser, tmp_path, "overview")


def series_on_page(browser) -> dict:
    """{panel title: {series label: {step: value}}} from the page's uPlot charts (what is drawn)."""
    return browser.execute_script("""
        const out = {};
        for (const chart of charts) {
          const title = chart.root.parentElement.dataset.panel, lines = {};
          chart.series.slice(1).forEach((s, i) => {
            const points = {};
            chart.data[0].forEach((step, j) => { const v = chart.data[i + 1][j]; if (v !== null) points[step] = v; });
            lines[s.label] = points;
          });
          out[title] = lines;
        }
        return out;""")


def test_curves_draw_what_metrics_jsonl_holds(browser, server, tiny_runs, tmp_path):
    browser.get(server + "/#/run?p=tiny/ppo")
    panels = wait_for(browser, ".panel canvas", count=4)
    drawn = series_on_page(browser)
    assert {"Reward", "KL to reference (per sequence)", "Held-out accuracy"} <= set(drawn), drawn.keys()
    logged = records(tiny_runs / "tiny" / "ppo")
    for title in ("Reward", "KL to reference (per sequence)", "Held-out accuracy"):
        ((key, points),) = drawn[title].items()
        want = {str(r["step"]): r[key] for r in logged if isinstance(r.get(key), (int, float))}
        assert len(want) >= 2 and points == pytest.approx(want), (title, key)
    # the canvases hold pixels, not only an empty frame
    inked = browser.execute_script("""
        return [...document.querySelectorAll('.panel canvas')].map(c => {
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
          for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; });""")
    assert len(inked) == len(panels) and min(inked) > 500, inked
    screenshot(browser, tmp_path, "curves")

    # several runs in one chart: the overview's ticks
    browser.get(server + "/#/run?p=tiny/sft&p=tiny/dpo")
    wait_for(browser, ".panel canvas", count=1)
    loss = series_on_page(browser)["Loss"]
    assert set(loss) == {"tiny/sft: loss", "tiny/dpo: loss"}
    assert loss["tiny/dpo: loss"] == pytest.approx(
        {str(r["step"]): r["loss"] for r in records(tiny_runs / "tiny" / "dpo") if "loss" in r})
    screenshot(browser, tmp_path, "curves_of_two_runs")


def test_the_interrupted_run_shows_as_resumable_in_its_own_view(browser, server, tiny_runs):
    browser.get(server + "/#/run?p=ppo_interrupted")
    header = wait_for(browser, "div[data-run='ppo_interrupted'] .state")[0]
    assert header.text == "resumable"
    assert "resumable from checkpoint-4" in browser.find_element("css selector", "div[data-run]").text


def test_curves_grow_as_the_run_writes_metrics_jsonl(browser, server, tiny_runs):
    """Live: a line appended to metrics.jsonl (as a training run appends one per step) is drawn within seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    log = tiny_runs / "ppo_interrupted" / "metrics.jsonl"
    before = log.read_text()
    browser.get(server + "/#/run?p=ppo_interrupted")
    wait_for(browser, ".panel canvas", count=4)
    assert "5" not in series_on_page(browser)["Reward"]["reward/total"]
    try:
        with log.open("a") as handle:
            handle.write(json.dumps({"step": 5, "time": time.time(), "reward/total": 0.75, "objective/score": 0.75}) + "\n")
        WebDriverWait(browser, 15).until(
            lambda b: series_on_page(b).get("Reward", {}).get("reward/total", {}).get("5") == 0.75)
    finally:
        log.write_text(before)


def test_report_opens_with_its_tables_and_plots(browser, server, tiny_runs, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/#/report?p=tiny/eval")
    frame = wait_for(browser, "iframe#report")[0]
    browser.switch_to.frame(frame)
    try:
        wait_for(browser, "table")
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td")]
        assert "Greedy accuracy" in cells
        images = browser.find_elements(By.CSS_SELECTOR, "img")
        assert len(images) == 2 and all(i.get_attribute("src").startswith("data:image/png") for i in images)
        assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 300 for i in images)
    finally:
        browser.switch_to.default_content()
    screenshot(browser, tmp_path, "report")

    # the report.html the pipeline's evaluation wrote beside report.md: one file, opened from the disk
    page = tiny_runs / "tiny" / "eval" / "report.html"
    assert (page.parent / "report.md").is_file()
    browser.get(page.as_uri())
    images = wait_for(browser, "img", count=2)
    assert all(i.get_attribute("src").startswith("data:image/png;base64,") for i in images)
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) > 300
               for i in images)
    assert "Greedy accuracy" in [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td")]


def test_side_by_side_filters_right_and_wrong(browser, server, tiny_runs, tmp_path):
    from selenium.webdriver.support.ui import Select

    report = json.loads((tiny_runs / "tiny" / "eval" / "report.json").read_text())
    samples = {name: report["checkpoints"][name]["samples"] for name in ("sft", "ppo", "dpo")}
    total = len(samples["sft"])
    browser.get(server + "/#/compare?p=tiny/eval")
    rows = wait_for(browser, "#side-by-side tr[data-row]", count=total)
    assert len(rows) == total
    first = rows[0].find_elements("css selector", "td")
    assert first[3].text.rstrip(" ✓✗") == samples["sft"][0]["completion"].strip()
    assert [c.get_attribute("data-checkpoint") for c in first[3:]] == ["sft", "ppo", "dpo"]

    def shown() -> list[int]:
        return [int(r.get_attribute("data-row")) for r in
                browser.find_elements("css selector", "#side-by-side tr[data-row]")]

    Select(browser.find_element("css selector", "select[data-filter='dpo']")).select_by_value("right")
    Select(browser.find_element("css selector", "select[data-filter='sft']")).select_by_value("wrong")
    want = [i + 1 for i in range(total) if samples["dpo"][i]["correct"] and not samples["sft"][i]["correct"]]
    assert shown() == want
    assert browser.find_element("css selector", "#shown").text == f"{len(want)} of {total} prompts shown"
    Select(browser.find_element("css selector", "select[data-filter='dpo']")).select_by_value("any")
    sft_wrong = [i + 1 for i in range(total) if not samples["sft"][i]["correct"]]
    assert shown() == sft_wrong and 0 < len(sft_wrong) < total  # both kinds are there: the filter tells them apart
    browser.find_element("css selector", "[data-preset='ppo>sft']").click()  # quick filter: ppo right, sft wrong
    assert shown() == [i + 1 for i in range(total) if samples["ppo"][i]["correct"] and not samples["sft"][i]["correct"]]
    Select(browser.find_element("css selector", "select[data-filter='ppo']")).select_by_value("any")
    Select(browser.find_element("css selector", "select[data-filter='sft']")).select_by_value("right")
    assert shown() == [i + 1 for i in range(total) if samples["sft"][i]["correct"]]
    screenshot(browser, tmp_path, "side_by_side")


def test_sampled_completions_per_step(browser, server, tiny_runs, tmp_path):
    logged = [json.loads(line) for line in (tiny_runs / "tiny" / "best_of_n" / "samples.jsonl").read_text().splitlines()]
    browser.get(server + "/#/samples?p=tiny/best_of_n")
    rows = wait_for(browser, "#samples tr", count=len(logged) + 1)
    assert len(rows) == len(logged) + 1  # the header and every sample
    cells = rows[1].find_elements("css selector", "td")
    assert cells[2].text == logged[0]["completion"][0]["content"].strip()  # conversational: the assistant message
    screenshot(browser, tmp_path, "samples")
