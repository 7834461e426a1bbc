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
    assert sum(len(t.x) for t in fig.data if (t.name or "").startswith("edit, block")) == n


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
    probe = next(t for t in fig.data if t.name == "probe query")
    block_colours = {t.marker.color for t in fig.data if (t.name or "").startswith("edit, block")}
    assert not set(probe.marker.color) & block_colours
    assert "distance 0.000 / radius 0.500" in probe.text[0]


def test_probe_summary_counts_fixed_paraphrases_and_changed_unrelated_answers():
    from melo_engine.editor import Answer

    def answer(block, text, base):
        return Answer(text, block, 0.1, 0.2, "c0", "e", base)
    kinds = ["paraphrase", "paraphrase", "paraphrase", "unrelated", "unrelated"]
    answers = [answer(0, "Jupiter.", "Saturn."), answer(0, "Jupiter.", "Jupiter."), answer(None, "Saturn.", "Saturn."),
               answer(None, "Paris.", "Paris."), answer(0, "Jupiter.", "Paris.")]
    text = render.probe_summary(kinds, answers)
    assert "**2 of 3** paraphrases got the fix" in text and "**1 of 2** unrelated answers changed (should be 0)" in text
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
    assert pool.editor(third).edits() == []                                      # room again
    assert [e["target"] for e in pool.editor(edited).edits()] == ["Bern."]


def test_an_export_link_works_once_and_only_until_it_expires(tmp_path):
    import asyncio
    import concurrent.futures

    from starlette.requests import Request

    from webapp.downloads import Downloads

    downloads = Downloads(ttl_seconds=60)
    try:
        def fetch(ticket):
            req = Request({"type": "http", "method": "GET", "path": "/", "headers": [],
                           "path_params": {"ticket": ticket}})
            # In a thread of its own: the browser tests' Playwright holds this thread's event loop.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, downloads.endpoint(req)).result()

        path = downloads.new_file("e.melo")
        path.write_bytes(b"edits")
        ticket = downloads.offer(path)
        assert len(ticket) >= 43 and fetch("not-a-ticket").status_code == 404
        assert fetch(ticket).status_code == 200
        assert fetch(ticket).status_code == 404                   # spent
        late = downloads.new_file("late.melo")
        late.write_bytes(b"edits")
        expired = downloads.offer(late)
        downloads.forget_expired(now=time.time() + 61)
        assert fetch(expired).status_code == 404 and not late.exists()
    finally:
        downloads.close()
    assert not downloads.folder.exists()


def test_an_answer_cut_at_the_length_limit_ends_with_an_ellipsis(backbone, tmp_path):
    from melo_engine.editor import Answer

    pool = WorkspacePool(backbone, root=tmp_path)
    ed = pool.editor(pool.tokens.new())
    long = " ".join(["the painter who lived in Florence"] * 12)      # far beyond 48 tokens
    marked = render.with_ellipsis(ed, Answer(long, None, 0.5, 0.2, None, base_text="Paris."))
    assert marked.text == long + " …" and marked.base_text == "Paris."
    short = render.with_ellipsis(ed, Answer("Bern", 0, 0.0, 0.2, "c0", "e"))
    assert short.text == "Bern" and short.base_text is None
