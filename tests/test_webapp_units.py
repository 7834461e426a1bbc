"""Web-app pieces without a browser: idle workspaces, the index map's projection, rendering."""
from __future__ import annotations

import time

import numpy as np
import pytest

from webapp import callbacks, plots, render
from webapp.sessions import WorkspacePool


def test_idle_workspaces_are_removed_and_active_ones_kept(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path, idle_seconds=60)
    idle, busy = pool.tokens.new(), pool.tokens.new()
    pool.editor(idle)
    pool.editor(busy)
    idle_dir, busy_dir = tmp_path / pool.tokens.folder(idle), tmp_path / pool.tokens.folder(busy)
    (idle_dir / "last_used").write_text(str(time.time() - 3600))
    assert pool.sweep() == [idle_dir.name]
    assert not idle_dir.exists()
    assert (busy_dir / "ws" / "workspace.json").is_file()
    # The removed visitor comes back to a fresh, empty workspace.
    assert pool.editor(idle).edits() == []


def test_only_tokens_the_server_issued_reach_a_workspace(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path)
    token = pool.tokens.new()
    random_part, mac = token.split(".")
    for bad in ("", None, 12345, "short", "../../etc", "a" * 80, random_part, f"{random_part}.{'A' * 22}",
                token[:-1] + ("A" if token[-1] != "A" else "B"), token + "\n", token.upper()):
        with pytest.raises(ValueError, match="not issued by this server"):
            pool.editor(bad)
        assert callbacks.visitor_token(pool, bad) != bad     # the page gets a new one instead
    assert [p.name for p in tmp_path.iterdir()] == [".token-secret"]
    # The folder is a hash of the token: a listing of the tree gives away no usable token.
    pool.editor(token)
    (folder,) = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert folder == pool.tokens.folder(token) and random_part not in folder and mac not in folder
    assert callbacks.visitor_token(pool, token) == token
    # Tokens stay valid for a server restarted on the same folder, and only there.
    assert WorkspacePool(backbone, root=tmp_path).tokens.valid(token)
    assert not WorkspacePool(backbone, root=tmp_path / "elsewhere").tokens.valid(token)
    assert len({pool.tokens.new() for _ in range(1000)}) == 1000


def test_map_uses_pca_with_exact_radii_below_the_umap_threshold():
    rng = np.random.default_rng(1)
    pts = [{"edit_id": str(i), "key": rng.normal(size=16).tolist(), "block": i, "cluster": f"c{i}",
            "label": "x", "prompt": f"q{i}"} for i in range(3)]
    clusters = [{"id": f"c{i}", "center": p["key"], "radius": 0.5, "label": "x", "members": [p["edit_id"]]}
                for i, p in enumerate(pts)]
    fig = plots.index_map({"points": pts, "clusters": clusters}, [])
    assert fig.layout.meta["method"] == "PCA" and "PCA" in fig.layout.title.text
    circle = next(t for t in fig.data if t.name == "radius")
    centers = next(t for t in fig.data if t.name == "cluster center")
    xs, ys = np.array(circle.x), np.array(circle.y)
    r = np.hypot(xs - centers.x[0], ys - centers.y[0])
    assert r == pytest.approx(0.5, rel=0.02)      # an orthogonal projection keeps the radius


def test_map_switches_to_umap_with_enough_points():
    rng = np.random.default_rng(2)
    n = plots.UMAP_MIN_POINTS + 5
    pts = [{"edit_id": str(i), "key": rng.normal(size=16).tolist(), "block": i % 3, "cluster": "c0",
            "label": "x", "prompt": f"q{i}"} for i in range(n)]
    clusters = [{"id": "c0", "center": np.mean([p["key"] for p in pts], 0).tolist(), "radius": 1.0,
                 "label": "x", "members": [p["edit_id"] for p in pts]}]
    probes = [{"text": "p", "key": pts[0]["key"], "block": 0, "cluster": "c0"},
              {"text": "q", "key": rng.normal(size=16).tolist(), "block": None, "cluster": "c0"}]
    fig = plots.index_map({"points": pts, "clusters": clusters}, probes)
    assert fig.layout.meta == {"method": "UMAP", "points": n, "clusters": 1, "probes": 2}
    assert sum(len(t.x) for t in fig.data if t.name == plots.EDITS) == n


def test_diff_highlights_only_changed_words():
    new, old = render.diff_html("Jupiter is the largest planet.", "Neptune is the largest planet.")
    assert '<mark class="melo-diff">Jupiter</mark>' in new and '<mark class="melo-diff">Neptune</mark>' in old
    assert "is the largest planet." in new and "<mark" not in new.split("</mark>", 1)[1]


def test_routing_badge_says_which_model_answered_and_never_fills_the_bar_for_a_fired_radius_0():
    assert "original model" in render.routing_badge(None, 0.3, 0.2)
    assert "fix applied (block 4)" in render.routing_badge(4, 0.1, 0.2)
    assert "no edits yet" in render.routing_badge(None, None, None)
    assert "width:0%" in render.routing_badge(2, 0.0, 0.0)        # fired at radius 0: an empty bar
    assert "width:100%" in render.routing_badge(None, 0.3, 0.0)


def test_map_draws_no_circle_of_radius_0_and_probes_apart_from_blocks():
    rng = np.random.default_rng(3)
    pts = [{"edit_id": str(i), "key": rng.normal(size=16).tolist(), "block": i, "cluster": f"c{i}",
            "label": "x", "prompt": f"q{i}"} for i in range(4)]
    clusters = [{"id": f"c{i}", "center": p["key"], "radius": 0.0 if i == 0 else 0.5, "label": "x",
                 "members": [p["edit_id"]]} for i, p in enumerate(pts)]
    probes = [{"text": "p", "key": pts[1]["key"], "block": 1, "cluster": "c1", "distance": 0.0, "radius": 0.5}]
    fig = plots.index_map({"points": pts, "clusters": clusters}, probes)
    assert sum(1 for t in fig.data if (t.name or "").startswith("radius")) == 3
    probe = next(t for t in fig.data if t.name == plots.PROBE_FIRED)
    block_colours = set(next(t for t in fig.data if t.name == plots.EDITS).marker.color)
    assert probe.marker.color not in block_colours
    assert "distance 0.000 / radius 0.500" in probe.customdata[0] and probe.text == ("p",)


def test_probe_summary_counts_fixed_paraphrases_and_changed_unrelated_answers():
    from melo_engine.records import Answer

    def answer(block, text, base):
        return Answer(text, block, 0.1, 0.2, "c0", "e", base)
    kinds = ["paraphrase", "paraphrase", "paraphrase", "unrelated", "unrelated"]
    answers = [answer(0, "Jupiter.", "Saturn."), answer(0, "Jupiter.", "Jupiter."), answer(None, "Saturn.", "Saturn."),
               answer(None, "Paris.", "Paris."), answer(0, "Jupiter.", "Paris.")]
    text = render.probe_summary(kinds, answers)
    assert "**2 of 3** paraphrases got the fix" in text
    assert "**1 of 2** unrelated questions fired a block (should be 0; 1 of them answered differently)" in text
    # A block that fired counts even when its text came out the same as the original's.
    same = render.probe_summary(["unrelated"], [answer(0, "Paris.", "Paris.")])
    assert "**1 of 1** unrelated question fired a block (should be 0; 0 of them answered differently)" in same
    tsv = render.probe_tsv(kinds, ["a", "b", "c", "d", "e\tf"], answers).splitlines()
    assert len(tsv) == 6 and all(len(line.split("\t")) == 8 for line in tsv)


def test_workspaces_without_edits_go_in_minutes_and_open_ones_are_capped(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path, idle_seconds=3600, empty_idle_seconds=60, max_open=2)
    looked, edited, third, never = (pool.tokens.new() for _ in range(4))
    pool.editor(looked).ask("What is 2 + 2?")
    pool.editor(edited).edit("What is the capital of Switzerland?", "Bern.")
    with pytest.raises(ValueError, match="as many visitors as it can hold"):
        pool.editor(third)
    assert pool.existing(never) is None and not (tmp_path / pool.tokens.folder(never)).exists()
    ten_minutes_later = time.time() + 600
    assert pool.sweep(now=ten_minutes_later) == [pool.tokens.folder(looked)]   # the one with an edit stays
    assert pool.reader(never).ask("What is 2 + 2?").block is None          # read: no folder made
    with pytest.raises(ValueError):
        pool.reader(never).record("00000001")
    with pytest.raises(ValueError):
        with pool.writing(never) as ed:
            ed.train("", "x")                                                # a refused write: made, then gone
    assert pool.existing(never) is None and not (tmp_path / pool.tokens.folder(never)).exists()
    assert pool.editor(third).edits() == []                                      # room again
    assert [e["target"] for e in pool.editor(edited).edits()] == ["Bern."]
    # At the cap, a workspace that has rested is closed to make room (a crowd that only
    # looked cannot shut a visitor out); its files stay and it reopens with its edits.
    pool.close_after_seconds = 0
    fourth = pool.tokens.new()
    pool.editor(fourth).edit("What is the capital of Turkey?", "Ankara.")
    assert len(pool._editors) == 2 and pool.tokens.folder(third) not in pool._editors
    assert [e["target"] for e in pool.editor(edited).edits()] == ["Bern."]     # closed, then reopened


def test_a_refused_first_write_leaves_no_workspace_whoever_comes_meanwhile(backbone, tmp_path):
    """A visitor without a workspace whose first edit is refused keeps none, even when
    something else comes for it while the refused write removes it: a double click's second
    edit, or the page's own reads (its history, its map), which were seen to open, so make,
    the workspace again between their check and the removal. The others start at delays
    stepping across the first write's few milliseconds."""
    import threading

    pool = WorkspacePool(backbone, root=tmp_path)

    def refused(token):
        try:
            with pool.writing(token) as ed:
                ed.train("What is the capital of Turkey?", "")
        except ValueError:
            pass

    def reads(token):
        for _ in range(20):
            ed = pool.existing(token)
            try:
                assert ed is None or ed.edits() == []
            except ValueError:
                pass            # opened just before the removal: one line, said to the reader

    start = time.perf_counter()
    refused(pool.tokens.new())
    took = time.perf_counter() - start                  # one refused write, a few ms
    kept = []
    for k in range(160):
        token = pool.tokens.new()
        first = threading.Thread(target=refused, args=(token,))
        first.start()
        time.sleep(took * 2 * (k // 2) / 80)
        (refused if k % 2 else reads)(token)
        first.join()
        if (tmp_path / pool.tokens.folder(token)).exists() or pool.existing(token) is not None:
            kept.append(k)
    assert kept == []


def test_an_export_link_works_once_and_only_until_it_expires(tmp_path):
    import asyncio
    import concurrent.futures

    from starlette.requests import Request

    from webapp.downloads import Downloads

    downloads = Downloads(ttl_seconds=60)
    try:
        def fetch(ticket, cookie="melo_workspace=owner"):
            req = Request({"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", cookie.encode())],
                           "path_params": {"ticket": ticket}})
            # In a thread of its own: the browser tests' Playwright holds this thread's event loop.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, downloads.endpoint(req)).result()

        path = downloads.new_file("e.melo")
        path.write_bytes(b"edits")
        ticket = downloads.offer(path, owner="owner")
        assert len(ticket) >= 43 and fetch("not-a-ticket").status_code == 404
        for stranger in ("", "melo_workspace=other", "melo_workspace=owne"):   # bound to the asker's cookie
            assert fetch(ticket, stranger).status_code == 404
        assert fetch(ticket).status_code == 200                   # and the stranger did not spend it
        assert fetch(ticket).status_code == 404                   # spent
        late = downloads.new_file("late.melo")
        late.write_bytes(b"edits")
        expired = downloads.offer(late, owner="owner")
        downloads.forget_expired(now=time.time() + 61)
        assert fetch(expired).status_code == 404 and not late.exists()
    finally:
        downloads.close()
    assert not downloads.folder.exists()


def test_an_answer_the_engine_says_was_cut_ends_with_an_ellipsis():
    from melo_engine.records import Answer

    long = " ".join(["the painter who lived in Florence"] * 12)
    marked = render.with_ellipsis(Answer(long, None, 0.5, 0.2, None, base_text="Paris.", truncated=True))
    assert marked.text == long + " …" and marked.base_text == "Paris."
    both = render.with_ellipsis(Answer("Bern is", 0, 0.0, 0.2, "c0", "e", "Zurich is", truncated=True,
                                       base_truncated=True))
    assert (both.text, both.base_text) == ("Bern is …", "Zurich is …")
    short = render.with_ellipsis(Answer("Bern", 0, 0.0, 0.2, "c0", "e"))
    assert short.text == "Bern" and short.base_text is None


def _snapshot(n: int, seed: int = 4):
    rng = np.random.default_rng(seed)
    pts = [{"edit_id": str(i), "key": rng.normal(size=16).tolist(), "block": i, "cluster": f"c{i}",
            "label": f"answer {i}", "prompt": f"q{i}"} for i in range(n)]
    clusters = [{"id": f"c{i}", "center": p["key"], "radius": 0.5, "label": p["label"], "members": [p["edit_id"]]}
                for i, p in enumerate(pts)]
    return {"points": pts, "clusters": clusters}, rng


@pytest.mark.parametrize("n", [10, plots.UMAP_MIN_POINTS + 1])
def test_the_map_does_not_move_between_refreshes_or_with_new_probes(n):
    snap, rng = _snapshot(n)
    probes = [{"text": f"probe {i}", "key": rng.normal(size=16).tolist(), "block": None if i else 0,
               "cluster": "c0"} for i in range(3)]

    def edits_xy(fig):
        return [(t.x, t.y) for t in fig.data if t.name == plots.EDITS]
    first = plots.index_map(snap, [])
    assert edits_xy(plots.index_map(snap, [])) == edits_xy(first)
    with_probes = plots.index_map(snap, probes)
    assert edits_xy(with_probes) == edits_xy(first)
    # Both probe colours are in the legend, and every probe mark carries its label.
    names = {t.name: t for t in with_probes.data}
    assert names[plots.PROBE_FIRED].text == ("probe 0",) and names[plots.PROBE_NOT_FIRED].text == ("probe 1", "probe 2")
    assert names[plots.PROBE_FIRED].marker.color != names[plots.PROBE_NOT_FIRED].marker.color


def _label_boxes(xy, texts, sides, scale):
    from webapp import labels

    out = []
    for (x, y), t, side in zip(np.asarray(xy) * scale, texts, sides):
        w = labels.CHAR_PX * len(t)
        dx, dy = labels.SIDES[side](w)
        out.append((x + dx, y + dy, x + dx + w, y + dy + labels.LINE_PX))
    return out


def test_the_maps_labels_move_out_of_each_others_way():
    """Marks 10 px apart in a row: under each mark (plotly's one side for all) the labels
    overlap; the placer's labels overlap no other label and no mark."""
    from webapp import labels

    xy, texts, scale = [(i, 0.0) for i in range(6)], [f"c{10 + i}" for i in range(6)], 10.0
    crowded = _label_boxes(xy, texts, ["bottom center"] * 6, scale)
    assert any(labels._overlap(a, b) > 0 for a, b in zip(crowded, crowded[1:]))
    sides = labels.sides(np.asarray(xy), texts, np.asarray(xy), scale)
    boxes = _label_boxes(xy, texts, sides, scale)
    marks = [(x * scale - labels.MARK_PX, -labels.MARK_PX, x * scale + labels.MARK_PX, labels.MARK_PX) for x, _ in xy]
    assert all(labels._overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:] + marks)
    # On the map: a cluster's circle has its block's colour, and one legend entry hides every circle.
    snap, _ = _snapshot(10)
    circles = [t for t in plots.index_map(snap, []).data if (t.name or "").startswith("radius")]
    assert {t.legendgroup for t in circles} == {"radius"} and len({t.line.color for t in circles}) == 10


def test_the_distances_chart_names_its_marks_without_a_legend_on_its_axis_title():
    rows = [{"cluster": "c0", "answer": "x", "distance": 0.1, "radius": 0.5, "fires": True}]
    fig = plots.distance_bars("q", rows)
    assert fig.layout.showlegend is False and "red mark: the cluster's radius" in fig.layout.title.text


def test_history_names_how_each_edit_was_placed_and_keeps_deleted_ones_for_the_visit():
    edits = [{"id": "old", "prompt": "Capital of Australia?", "target": "Sydney", "status": "superseded",
              "superseded_by": "new", "action": "new", "cluster": "c1", "block": 0, "created": 0},
             {"id": "new", "prompt": "Capital of Australia?", "target": "Canberra", "status": "active",
              "action": "superseded", "cluster": "c3", "block": 1, "created": 0},
             {"id": "j", "prompt": "Australia's capital?", "target": "Canberra", "status": "active",
              "action": "joined", "cluster": "c3", "block": 2, "created": 0}]
    gone = [{"id": "d", "prompt": "Capital of Peru?", "target": "Lima", "created": 0, "seconds": 1.0,
             "deleted": time.time()}]
    rows = {r[0]: r for r in render.history_rows(edits, gone)}
    assert rows["new"][3:5] == ["active", "replaced old (c3)"]
    # The same corrected sentence again, now ending the answer: said, since the text is the same.
    again = [dict(edits[0], target="Canberra", prefix=""),
             dict(edits[1], prefix="", ends_answer=True)]
    assert render.history_rows(again)[0][4] == "replaced old, the same sentence now ending the answer (c3)"
    assert rows["old"][3:5] == ["superseded by new", "new (c1)"]
    assert rows["j"][4] == "joined (c3)" and rows["d"][3].startswith("deleted at")
    page = render.history_html(edits, gone)
    assert all(f"<b>{word}</b>" in page for word in ("new", "beside", "joined", "replaced", "superseded", "deleted"))


def test_the_side_effect_rows_beyond_the_first_fold_under_a_summary():
    from melo_engine.neighbours import Neighbour

    rows = [Neighbour(f"q{i}", 0.1, 0.5, True, "e") for i in range(render.SIDE_EFFECT_ROWS + 3)]
    page = render.side_effects_html("e", rows)
    folded = page.split("<details", 1)[1]
    assert "<summary" in folded and "and 3 more that get it" in folded and folded.count("<tr class=") == 3


def test_a_cut_off_last_sentence_is_offered_as_cut_off():
    text = "A spider has eight legs. However, when referring to the actual number of legs, it's actually the"
    assert [c[0][:40] for c in render.sentence_choices(text)] == [
        "The whole answer", "Sentence 1: A spider has eight legs.", "Sentence 2: However, when referring to t"]
    assert render.sentence_choices(text, cut=True)[2][0].startswith("Sentence 2 (cut off at the length limit): However")
    assert render.sentence_choices(text, cut=True)[1][0] == "Sentence 1: A spider has eight legs."


def test_the_summary_of_a_sentence_corrected_again_to_end_there_says_what_differs():
    from types import SimpleNamespace

    records = {"old": {"id": "old", "prompt": "q", "target": "Eight legs.", "prefix": ""},
               "new": {"id": "new", "prompt": "q", "target": "Eight legs.", "prefix": "", "ends_answer": True}}
    ed = SimpleNamespace(record=records.__getitem__)
    r = SimpleNamespace(edit_id="new", steps=3, seconds=0.5, action="superseded", superseded=["old"], forgotten=[],
                        moved=[], cluster="c1")
    assert "It differs only in where the answer stops: this one ends it there." in render.edit_summary(ed, r)
    records["new"] = dict(records["new"], target="Six legs.")
    assert "differs only" not in render.edit_summary(ed, r)


def test_the_side_effect_check_tells_the_fix_carrying_from_side_effects():
    """Rows the bank knows as phrasings of the edited question that get the fix are not
    side effects; other questions that get it are; rows it cannot place are said so."""
    from melo_engine.neighbours import Neighbour, phrasings_marked
    from melo_engine.refdata import phrasing_groups, same_question

    rows = phrasings_marked([Neighbour(q, d, 0.8, fires, "e" if fires else None) for q, d, fires in [
        ("Who painted the Mona Lisa?", 0.0, True), ("Which artist painted the Mona Lisa?", 0.2, True),
        ("The Mona Lisa was painted by whom?", 0.3, False), ("Which museum houses the Mona Lisa?", 0.6, True),
        ("Who painted The Scream?", 1.1, False), ("Who painted my kitchen?", 0.7, True)]], "Who painted the Mona Lisa ?")
    assert [r.same for r in rows] == [True, True, True, False, False, None]
    page = render.side_effects_html("e", rows)
    assert "would also answer 1 other question" in page and "1 question the check cannot place" in page
    assert "carries to 1 other phrasing" in page and "1 phrasing of the same question in the list does not get it" in page
    assert page.count('class="melo-carried"') == 2 and page.count('class="melo-fires"') == 2
    assert "(the edited question itself)" in page and "cannot show whether the fix carries" not in page
    # Known to the bank, but no other phrasing near it: said, so that "no other" is not read
    # as the fix carrying; a verifier's reason in plain words.
    alone = phrasings_marked([Neighbour("Who painted the Mona Lisa?", 0.0, 0.8, True, "e"),
                              Neighbour("Who painted The Scream?", 0.7, 0.8, False, None,
                                        rejected="another slot: scream / mona lisa (0.31)")], "Who painted the Mona Lisa?")
    page = render.side_effects_html("e", alone)
    assert "No other question near this edit would get it" in page and "No other phrasing of this question" in page
    assert "it asks about something else: scream / mona lisa (word similarity 0.31)" in page
    # An edited question the bank does not hold: nothing is guessed.
    unknown = phrasings_marked(rows, "Who made the Mona Lisa?")
    assert {r.same for r in unknown} == {None}
    assert "is not in the reference list" in render.side_effects_html("e", unknown)
    # Phrasings the reference list pairs, and a sibling bank's question with its paraphrases.
    groups = phrasing_groups()
    assert groups[same_question("Who wrote Hamlet?")] == groups[same_question("Who wrote the play Hamlet?")]
    assert groups[same_question("Who painted the Mona Lisa?")] != groups[same_question("Who painted The Scream?")]


def test_published_runs_and_key_figures_come_from_the_results_files(tmp_path):
    from webapp import published

    runs = published.benchmark_runs()
    assert runs and all(published.table_rows(published.benchmark_run(r)) for r in runs)
    with pytest.raises(ValueError):
        published.benchmark_run("../../etc/passwd")
    assert "% of zsRE's" in published.key_figures("sentence", True)
    assert published.key_figures("sentence", True, folder=tmp_path) == ""     # no file: no figures


def test_a_key_source_registered_at_run_time_is_offered_in_settings(tmp_path):
    from melo_engine.registry import KEY_SOURCES

    from webapp import api
    from webapp.downloads import Downloads
    from webapp.layout import build_demo

    class DummyKey:
        name, title, summary, why = "dummy", "Dummy (test)", "a made-up key", "It is only a test."

    KEY_SOURCES.register("dummy", DummyKey)
    downloads = Downloads()
    try:
        # The pool is used only once a visitor comes, but for the models it offers.
        pool = type("Pool", (), {"models": ["smollm2-135m-instruct"], "default_model": "smollm2-135m-instruct",
                                 "answer_concurrency": 2, "train_concurrency": 1})()
        demo = build_demo(pool, downloads)
        radio = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "key-source")
        assert ("Dummy (test)", "dummy") in radio.choices and "Dummy (test): a made-up key." in radio.info
        named = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility") == "public"}
        assert {n.lstrip("/") for n in api.NAMES} <= named
    finally:
        KEY_SOURCES.unregister("dummy")
        downloads.close()


def test_settings_are_drawn_disabled_and_enabled_with_the_visitors_own_values(backbone, tmp_path):
    """Until the page has the workspace's settings, an empty number box shows 0: a control
    changed or saved then would save the placeholder (or be overwritten when they arrive)."""
    from webapp.downloads import Downloads
    from webapp.layout import build_demo

    pool = WorkspacePool(backbone, root=tmp_path)
    downloads = Downloads()
    try:
        demo = build_demo(pool, downloads)
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        for elem in ("model-choice", "key-source", "prompt-mode", "radius", "save-settings"):
            assert by_id[elem].interactive is False, elem
    finally:
        downloads.close()
    token = pool.tokens.new()
    with pool.writing(token) as ed:
        ed.update_settings(init_radius=0.75, rank_per_block=3)
    shown = callbacks.settings_values(pool, token)
    assert all(u["interactive"] is True for u in shown)             # the save button too (the last)
    assert [u["value"] for u in shown[3:5]] == [0.75, 3]
    # A workspace that cannot be opened (here: the server at its cap) says so in one line.
    import gradio as gr

    pool.close(token)
    pool.max_open = 0
    with pytest.raises(gr.Error, match="your settings cannot be shown .*as many visitors"):
        callbacks.settings_values(pool, token)


def test_the_retention_chart_of_a_long_run_has_about_ten_ticks():
    from webapp import published

    fig = plots.retention_figure(published.benchmark_run("zsre-paper-1000-melo"))
    assert fig.layout.xaxis.dtick == 100      # not one per edit: the browser stalled on a thousand


@pytest.mark.solo
def test_the_benchmark_lane_runs_the_benchmark_command_in_a_process_that_stop_kills():
    """A visitor's benchmark is `python -m melo_engine.bench edits` in a child process of
    its own (lane.py): its JSON comes back; closing the run (Stop, or the page leaving)
    kills the child at once; one claim per visitor."""
    from webapp.lane import BenchmarkLane, Progress

    lane = BenchmarkLane(poll_seconds=0.2)
    steps = list(lane.run("visitor", 1, ["melo"]))
    assert isinstance(steps[0], Progress) and isinstance(steps[-1], dict)
    # The scoring after the last edit writes no progress of its own: the page says it scores.
    assert any(isinstance(s, Progress) and s.text == "melo: 1/1 edits, now scoring them" for s in steps)
    res = steps[-1]
    assert res["n"] == 1 and list(res["methods"]) == ["melo"] and res["methods"]["melo"]["edit_success"] == 1.0
    assert not lane.busy()
    run = lane.run("visitor", 20, ["melo", "grace"])
    next(run)
    [child] = lane._running.values()
    assert child.poll() is None
    run.close()
    assert child.poll() is not None and not lane.busy()
    # A run that arrives while another holds the lane waits its turn (one child at a time),
    # says so, and starts once the lane is free.
    first, second = lane.run("a", 20, ["melo"]), lane.run("b", 20, ["melo"])
    next(first)
    assert next(second).text == "1 run ahead of yours" and list(lane._running) == ["a"]
    # A short line: a run beyond MAX_WAITING waiting ones is refused in one line.
    from webapp.lane import MAX_WAITING
    waiting = [lane.run(f"w{i}", 1, ["melo"]) for i in range(MAX_WAITING - 1)]
    assert all(next(w).waiting for w in waiting)
    with pytest.raises(ValueError, match="runs waiting already"):
        next(lane.run("one too many", 1, ["melo"]))
    for w in waiting:
        w.close()
    first.close()
    assert next(second).text == "loading the model" and list(lane._running) == ["b"]
    second.close()
    assert not lane.busy() and not lane._turns and lane.seconds_left() is None
    lane._pace["x"] = (time.monotonic() - 60, 0.25)       # a quarter done in a minute: three to go
    assert lane.seconds_left() == pytest.approx(180, abs=2)
    del lane._pace["x"]
    lane.claim("visitor")
    with pytest.raises(ValueError, match="already queued or running"):
        lane.claim("visitor")
    lane.stop("visitor")              # Stop pressed while it waited: the claim is given back
    lane.claim("visitor")
    lane.release("visitor")
    # Stop while it runs kills the child; so does a run nobody pulls from any more.
    run = lane.run("visitor", 20, ["melo"])
    next(run)
    [child] = lane._running.values()
    lane.stop("visitor")
    assert child.poll() is not None
    assert not any(isinstance(step, dict) for step in run)     # ended quietly: no result, no error
    # Stop while waiting for the lane leaves the line quietly; before the run started, take says so.
    first, second = lane.run("a", 20, ["melo"]), lane.run("b", 20, ["melo"])
    next(first)
    assert next(second).waiting
    lane.stop("b")
    assert list(second) == [] and len(lane._turns) == 1
    first.close()
    lane.claim("c")
    lane.stop("c")
    assert lane.take("c") is False
    lane.claim("c")                   # a new claim forgets an earlier Stop
    assert lane.take("c") is True
    lane.release("c")
    lane.abandoned_seconds = 2
    run = lane.run("visitor", 20, ["melo"])
    next(run)
    [child] = lane._running.values()
    child.wait(timeout=30)            # nobody pulls: the watch kills it
    run.close()


def test_about_names_the_model_its_licence_and_how_questions_reach_it(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path)
    text = callbacks.key_info(pool, pool.tokens.new())
    assert "**Model: smollm2-135m-instruct** (Apache-2.0), on cpu" in text
    assert "as a user's turn of its chat template" in text

