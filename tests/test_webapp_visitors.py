"""The web app in a real browser with several visitors at once, and what a visitor sees
without making an edit (Debian chromium through Playwright; helpers in test_webapp_browser)."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from test_webapp_browser import LONG, answer_text, ask, fresh_page, open_page, shot, tab


def test_two_browsers_keep_separate_workspaces(app_server, browser, example_edits):
    url, _ = app_server
    a = browser.new_context()
    b = browser.new_context()
    try:
        pa, pb = open_page(a, url), open_page(b, url)
        e = example_edits[9]
        pa.locator("#question textarea").fill(e["prompt"])
        pa.locator("#target textarea").fill(e["target"])
        pa.locator("#edit-btn").click()
        pa.wait_for_selector("#after .melo-after", timeout=LONG)
        assert ask(pa, e["prompt"]) == (e["target"], pa.locator("#answer .melo-badge").inner_text())
        text, badge = ask(pb, e["prompt"])
        assert badge == "original model" and text != e["target"]
        # A reload keeps the same workspace (the token lives in the browser).
        pa.reload()
        pa.wait_for_selector("#question textarea", timeout=LONG)
        assert ask(pa, e["prompt"])[0] == e["target"]
    finally:
        a.close()
        b.close()


@pytest.mark.solo
def test_an_edit_does_not_wait_for_another_visitors_benchmark_and_shows_its_queue_place(app_server, browser):
    """Visitor A runs a benchmark (its own low-priority process, webapp/lane.py). C's edit
    trains; B's edit waits behind C's (the suite's app has one training worker), and B sees it: the button
    says it waits and a queue place shows in a box tall enough to read. B's edit is made
    while A's benchmark is still under way; A's Stop ends the run and its process."""
    url, _ = app_server
    with fresh_page(browser, url) as a, fresh_page(browser, url) as b, fresh_page(browser, url) as c:
        tab(a, "Benchmark")
        a.locator("#bench-n input").fill("20")
        a.locator("#bench-btn").click()
        a.wait_for_function("() => /Running in the benchmark lane/.test("
                            "document.querySelector('#bench-status').innerText)", timeout=LONG)
        c.locator("#question textarea").fill("What is the capital of Australia?")
        c.locator("#target textarea").fill("Canberra is the capital of Australia.")
        b.locator("#question textarea").fill("What is the capital of Turkey?")
        b.locator("#target textarea").fill("Ankara is the capital of Turkey.")
        c.locator("#edit-btn").click()
        b.locator("#edit-btn").click()
        b.wait_for_function("() => document.querySelector('#edit-btn').innerText.startsWith('Waiting')", timeout=LONG)
        b.wait_for_function("() => /queue/i.test(document.querySelector('#edit-summary').innerText)", timeout=LONG)
        place = b.locator("#edit-summary")
        assert place.bounding_box()["height"] >= 40, place.bounding_box()
        shot(b, "edit_waiting")
        b.wait_for_selector("#after .melo-after", timeout=LONG)
        assert answer_text(b, "#after .melo-after") == "Ankara is the capital of Turkey."
        assert lane_children(), "the benchmark ended before the edit: nothing was shown"
        assert "Running in the benchmark lane" in a.locator("#bench-status").inner_text()
        shot(a, "benchmark_running")
        a.locator("#bench-stop").click()
        a.wait_for_function("() => /Stopped/.test(document.querySelector('#bench-status').innerText)", timeout=LONG)
        deadline = time.time() + 30
        while lane_children() and time.time() < deadline:
            time.sleep(0.5)
        assert not lane_children()


def test_a_busy_benchmark_lane_and_a_second_run_of_the_same_visitor_are_said_on_the_page(app_server, browser):
    """A runs a benchmark. A second tab of A (the same workspace) pressing Run is refused in
    one line on the page; B pressing Run is told in its status box its place in the lane's
    line. Both Stops end everything, and B's (while waiting) leaves no error on the page."""
    url, _ = app_server
    a = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        first, second = open_page(a, url), open_page(a, url)
        with fresh_page(browser, url) as b:
            tab(first, "Benchmark")
            first.locator("#bench-n input").fill("20")
            first.locator("#bench-btn").click()
            first.wait_for_function("() => /Running in the benchmark lane/.test("
                                    "document.querySelector('#bench-status').innerText)", timeout=LONG)
            tab(second, "Benchmark")
            second.locator("#bench-btn").click()
            second.get_by_text("your benchmark is already queued or running").first.wait_for(timeout=LONG)
            tab(b, "Benchmark")
            b.locator("#bench-btn").click()
            b.wait_for_function("() => /Waiting for the benchmark lane: 1 run ahead of yours/.test("
                                "document.querySelector('#bench-status').innerText)", timeout=LONG)
            assert b.locator("#bench-status").bounding_box()["height"] >= 40
            shot(b, "benchmark_lane_busy")
            # Stop while waiting: its place is given back, with no "Error" left on the page (it
            # was, while the run waited in gradio's queue).
            b.locator("#bench-stop").click()
            b.wait_for_function("() => /Stopped/.test(document.querySelector('#bench-status').innerText)",
                                timeout=LONG)
            b.wait_for_timeout(2000)
            assert b.locator("#bench-status .error").count() == 0 and "Error" not in b.locator("#bench-status").inner_text()
            first.locator("#bench-stop").click()
            first.wait_for_function("() => /Stopped/.test(document.querySelector('#bench-status').innerText)",
                                    timeout=LONG)
        deadline = time.time() + 30
        while lane_children() and time.time() < deadline:
            time.sleep(0.5)
        assert not lane_children()
    finally:
        a.close()


def lane_children() -> list[str]:
    """The benchmark lane's child processes (their progress file is in the lane's own
    temporary folder: a benchmark started by hand is not one of them), by pid."""
    out = subprocess.run(["pgrep", "-f", "melo_engine.bench edits .*--progress .*/melo-bench-"],
                         capture_output=True, text=True)
    return out.stdout.split()


def test_show_distances_with_an_empty_box_gives_one_notice(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "Index map")
        page.locator("#dist-btn").click()
        page.get_by_text("type a question").first.wait_for(timeout=LONG)
        page.wait_for_timeout(1500)
        assert page.get_by_text("type a question").count() == 1
        assert page.locator("#dist-plot .error, .toast-body.error").count() == 0


def test_published_results_are_shown_without_running_anything(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "Benchmark")
        page.wait_for_function("""() => { const p = document.querySelector('#published-plot .js-plotly-plot');
            return p && p.data && p.data.length >= 1; }""", timeout=LONG)
        # The largest MELO run comes first (there are two of 1000 edits: the radius router's and
        # the verifier's); its caption names the file its figures come from.
        assert re.search(r"zsre-paper-1000-melo[-\w]*\.json", page.locator("#published-caption").inner_text())
        assert "melo" in page.locator("#published-table").inner_text()
        page.locator("#published-run input").click()
        page.get_by_role("option", name="zsre-paper-1000-grace").click()
        page.wait_for_selector("#published-caption :text('zsre-paper-1000-grace.json')", timeout=LONG)
        assert "grace" in page.locator("#published-table").inner_text()


def test_a_question_list_loaded_in_settings_joins_every_side_effect_check(app_server, browser, tmp_path):
    """Settings loads a visitor's own questions into the probe bank; an edit's side-effect
    check then names the loaded paraphrase that gets the fix. Loading it again adds nothing.
    The list is the visitor's: another visitor's check of the same edit does not name it."""
    from test_webapp_browser import _edit

    url, _ = app_server
    mine = tmp_path / "class-questions.txt"
    # (not a question of the bundled reference lists, which every check runs over)
    mine.write_text("In degrees Celsius, at what temperature does mercury boil?\nHow do you say thank you in Finnish?\n")
    with fresh_page(browser, url) as page:
        tab(page, "Settings")
        page.locator("#probe-file input[type=file]").set_input_files(str(mine))
        page.get_by_text("Added 2 questions").first.wait_for(timeout=LONG)
        page.locator("#probe-file input[type=file]").set_input_files(str(mine))
        page.get_by_text("Added 0 questions (2 already there)").first.wait_for(timeout=LONG)
        _edit(page, "What is the boiling point of mercury in degrees Celsius?", "Mercury boils at 356.7 degrees Celsius.")
        page.wait_for_function("() => document.querySelector('#side-effects').innerText.includes('In degrees Celsius, at what')",
                               timeout=LONG)
        assert "thank you in Finnish" not in page.locator("#side-effects").inner_text()
    with fresh_page(browser, url) as other:
        _edit(other, "What is the boiling point of mercury in degrees Celsius?", "Mercury boils at 356.7 degrees Celsius.")
        # textContent, not innerText: the heading is drawn in capitals by CSS.
        other.wait_for_function("() => document.querySelector('#side-effects').textContent.includes('Side-effect check for edit')",
                                timeout=LONG)
        assert "In degrees Celsius, at what" not in other.locator("#side-effects").inner_text()
