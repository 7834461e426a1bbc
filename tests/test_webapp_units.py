"""Web-app pieces without a browser: idle workspaces, the index map's projection, rendering."""
from __future__ import annotations

import time

import numpy as np
import pytest

from webapp import callbacks, plots
from webapp.sessions import WorkspacePool


def test_idle_workspaces_are_removed_and_active_ones_kept(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path, idle_seconds=60)
    pool.editor("visitor-idle-0001")
    pool.editor("visitor-busy-0002")
    (tmp_path / "visitor-idle-0001" / "last_used").write_text(str(time.time() - 3600))
    assert pool.sweep() == ["visitor-idle-0001"]
    assert not (tmp_path / "visitor-idle-0001").exists()
    assert (tmp_path / "visitor-busy-0002" / "ws" / "workspace.json").is_file()
    # The removed visitor comes back to a fresh, empty workspace.
    assert pool.editor("visitor-idle-0001").edits() == []


def test_bad_visitor_tokens_are_refused(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path)
    for bad in ("", "short", "../../etc", "a" * 80):
        with pytest.raises(ValueError):
            pool.editor(bad)
    assert list(tmp_path.iterdir()) == []


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
    new, old = callbacks.diff_html("Jupiter is the largest planet.", "Neptune is the largest planet.")
    assert '<mark class="melo-new">Jupiter</mark>' in new and '<mark class="melo-old">Neptune</mark>' in old
    assert "is the largest planet." in new and "<mark" not in new.split("</mark>", 1)[1]


def test_routing_badge_says_none_or_block():
    assert "none: original model" in callbacks.routing_badge(None, 0.3, 0.2)
    assert "block 4" in callbacks.routing_badge(4, 0.1, 0.2)
    assert "index empty" in callbacks.routing_badge(None, None, None)


def test_workspaces_without_edits_go_in_minutes_and_open_ones_are_capped(backbone, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path, idle_seconds=3600, empty_idle_seconds=60, max_open=2)
    pool.editor("visitor-only-looked").ask("What is 2 + 2?")
    pool.editor("visitor-made-an-edit").edit("What is the capital of Switzerland?", "Bern.")
    with pytest.raises(ValueError, match="as many visitors as it can hold"):
        pool.editor("visitor-third-one")
    assert pool.existing("visitor-never-came") is None and not (tmp_path / "visitor-never-came").exists()
    ten_minutes_later = time.time() + 600
    assert pool.sweep(now=ten_minutes_later) == ["visitor-only-looked"]   # the one with an edit stays
    assert pool.editor("visitor-third-one").edits() == []                  # room again
    assert [e["target"] for e in pool.editor("visitor-made-an-edit").edits()] == ["Bern."]
