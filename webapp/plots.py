"""The index map: edit keys, cluster centers and radii, and probe queries, in two dimensions;
and the true distances of one question, which the map cannot promise.

With few points UMAP is not meaningful, so below UMAP_MIN_POINTS we use PCA and say so.
Radii: the projection of a ball of radius r under PCA is a disk of radius r, so the circles
have the true radii, but a point drawn inside one can still lie outside it in the key
space (projection only shortens distances): the map says so, and `distance_bars` shows the
true distances. UMAP bends space; there each circle is scaled by how much UMAP stretched
the distances from that center to its own members and to the nearest other centers (an
approximation, labelled as such).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import plotly.graph_objects as go

from . import labels

UMAP_MIN_POINTS = 15
PROBE_COLOR = "#111111"      # probes in black (a block fired) and grey (none did): no block has those colours
PROBE_GREY = "#999999"
EDITS = "edit (colour: its block)"
PROBE_FIRED, PROBE_NOT_FIRED = "probe: fix applied", "probe: original model"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _pca(vectors: np.ndarray):
    """The 2-D PCA of `vectors` as a function of other rows; each axis points the way its
    largest loading is positive, so the same snapshot always draws the same way round."""
    mean = vectors.mean(0)
    if len(vectors) < 2:
        return lambda x: np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    axes = vt[:2] * np.sign(vt[:2][np.arange(len(vt[:2])), np.abs(vt[:2]).argmax(1)])[:, None]
    return lambda x: np.pad((np.asarray(x) - mean) @ axes.T, ((0, 0), (0, 2 - len(axes))))


def projection(vectors: np.ndarray, seed: int = 0):
    """A 2-D projection fitted once on `vectors` (a snapshot's keys and centers): (its
    coordinates, a function placing other rows such as probes on the same map, the method).
    The fit depends on the snapshot alone (fixed seed), so a refresh, or new probes, do not
    move the map."""
    if len(vectors) >= UMAP_MIN_POINTS:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(vectors) - 1), min_dist=0.1,
                            random_state=seed, n_jobs=1)
        coords = reducer.fit_transform(vectors)
        return coords, lambda x: reducer.transform(np.asarray(x, dtype=np.float32)) if len(x) else np.zeros((0, 2)), "UMAP"
    place = _pca(vectors)
    return place(vectors), place, "PCA"


def project(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates for the rows of `vectors`, and the method used."""
    coords, _, method = projection(vectors, seed)
    return coords, method


def warm_up(delay_seconds: float = 0.0) -> None:
    """Run UMAP once on random data: its first call compiles code (numba) for many seconds,
    which would otherwise land on the first visitor whose index reaches UMAP_MIN_POINTS.
    Meant for a background thread: waits `delay_seconds`, then runs at the lowest priority."""
    time.sleep(delay_seconds)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)   # this thread only (Linux)
    except (AttributeError, OSError):
        pass
    project(np.random.default_rng(0).normal(size=(UMAP_MIN_POINTS + 5, 8)).astype(np.float32))


def _short(text: str, width: int = 22) -> str:
    """A label short enough to sit beside a mark (the whole text is in its hover)."""
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _circle(cx: float, cy: float, r: float, n: int = 48):
    t = np.linspace(0, 2 * np.pi, n)
    return cx + r * np.cos(t), cy + r * np.sin(t)


def index_map(snapshot: dict, probes: list[dict] | None = None) -> go.Figure:
    """Plotly figure of an `index_snapshot()`, with optional probes [{text, key, cluster, block}]."""
    probes = probes or []
    points, clusters = snapshot["points"], snapshot["clusters"]
    fig = go.Figure()
    if not points and not probes:
        fig.add_annotation(text="No edits yet: apply one and it appears here.", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=420, xaxis_visible=False, yaxis_visible=False, template="plotly_white")
        return fig

    base = [p["key"] for p in points] + [c["center"] for c in clusters]
    # Fitted on the snapshot alone, so refreshes and new probes do not move it; but one or
    # two edits span no plane, and the probes would all fall on them: then they join the fit.
    with_probes = len(points) < 3
    fitted = base + ([q["key"] for q in probes] if with_probes else [])
    coords, place, method = projection(np.asarray(fitted, dtype=np.float32))
    if with_probes:
        coords, Q = coords[: len(base)], coords[len(base):]
    else:
        Q = place(np.asarray([q["key"] for q in probes], dtype=np.float32)) if probes else np.zeros((0, 2))
    coords, Q = np.asarray(coords, dtype=float), np.asarray(Q, dtype=float)
    P = coords[: len(points)]
    C = coords[len(points):]
    if method == "UMAP":
        # UMAP embeds a center as one more point, often away from the edits it stands for:
        # draw it at the mean of its members' positions instead.
        for i, c in enumerate(clusters):
            members = [k for k, p in enumerate(points) if p["cluster"] == c["id"]]
            if members:
                C[i] = P[members].mean(0)
    high = np.asarray(base, dtype=np.float32)
    Ph, Ch = high[: len(points)], high[len(points):]

    # Radii, drawn first so the markers sit on top; each in its edits' block colour, so that
    # where circles cross one can still tell whose is whose, and all in one legend group: a
    # click on "radius" hides them all when they hide the points.
    block_of = {p["cluster"]: p["block"] for p in points}
    radius_in_legend = False
    extent = [np.vstack([P, C, Q]) if len(P) + len(C) + len(Q) else np.zeros((1, 2))]
    for i, c in enumerate(clusters):
        scale = 1.0
        if method == "UMAP":
            others = [j for j in range(len(clusters)) if j != i]
            members = [k for k, p in enumerate(points) if p["cluster"] == c["id"]]
            hd = [np.linalg.norm(Ph[k] - Ch[i]) for k in members] + [np.linalg.norm(Ch[j] - Ch[i]) for j in others]
            ld = [np.linalg.norm(P[k] - C[i]) for k in members] + [np.linalg.norm(C[j] - C[i]) for j in others]
            ratios = [l / h for h, l in zip(hd, ld) if h > 1e-6]
            scale = float(np.median(ratios)) if ratios else 0.0
        if c["radius"] * scale <= 0:
            continue       # a cluster shrunk to its point: no circle (its center says radius 0)
        x, y = _circle(C[i, 0], C[i, 1], c["radius"] * scale)
        extent.append(np.stack([x, y], 1))
        colour = PALETTE[block_of[c["id"]] % len(PALETTE)] if c["id"] in block_of else "#777777"
        fig.add_trace(go.Scatter(x=x.tolist(), y=y.tolist(), mode="lines", line=dict(color=colour, width=1, dash="dot"),
                                 opacity=0.55, hoverinfo="skip", showlegend=not radius_in_legend, legendgroup="radius",
                                 name="radius" + (" (approx.)" if method == "UMAP" else "")))
        radius_in_legend = True

    # Each label on the side of its mark where it covers the fewest others (webapp/labels.py).
    fired_first = [k for k, q in enumerate(probes) if q.get("block") is not None] + \
                  [k for k, q in enumerate(probes) if q.get("block") is None]
    span = np.vstack(extent)
    scale = labels.pixels_per_unit(*(1.1 * (span.max(0) - span.min(0))))
    placed = labels.sides(np.vstack([C, Q[fired_first]]) if len(C) + len(Q) else np.zeros((0, 2)),
                          [c["id"] for c in clusters] + [_short(probes[k]["text"]) for k in fired_first],
                          np.vstack([P, C, Q]) if len(P) + len(C) + len(Q) else np.zeros((0, 2)), scale)
    center_sides = placed[: len(C)]
    probe_side = dict(zip(fired_first, placed[len(C):]))

    if points:      # one legend entry for every edit: ten blocks would be ten entries
        fig.add_trace(go.Scatter(
            x=P[:, 0].tolist(), y=P[:, 1].tolist(), mode="markers", name=EDITS,
            marker=dict(size=11, color=[PALETTE[p["block"] % len(PALETTE)] for p in points],
                        line=dict(width=1, color="white")),
            text=[f"{p['prompt']}<br>→ {p['label']}<br>block {p['block']}, cluster {p['cluster']}" for p in points],
            hovertemplate="%{text}<extra></extra>"))
    if clusters:
        fig.add_trace(go.Scatter(
            x=C[:, 0].tolist(), y=C[:, 1].tolist(), mode="markers+text", name="cluster center",
            marker=dict(symbol="diamond-open", size=14, color="#333", line=dict(width=2)),
            # named as History and the distances name them; none where there is no room
            text=[c["id"] if side else "" for c, side in zip(clusters, center_sides)],
            textposition=[side or "bottom center" for side in center_sides],
            textfont=dict(size=10, color="#555"),
            customdata=[f"cluster {c['id']}: “{c['label']}”<br>radius {c['radius']:.3f}"
                  + (" (fires only for this exact question)" if c["radius"] <= 0 else "")
                  + f", {len(c['members'])} edit(s)" for c in clusters],
            hovertemplate="%{customdata}<extra></extra>"))
    center_of = {c["id"]: C[i] for i, c in enumerate(clusters)}
    for k, q in enumerate(probes):
        if q.get("block") is not None and q.get("cluster") in center_of:
            cx, cy = center_of[q["cluster"]]
            fig.add_trace(go.Scatter(x=[float(Q[k, 0]), float(cx)], y=[float(Q[k, 1]), float(cy)], mode="lines",
                                     showlegend=False, legendgroup=PROBE_FIRED, line=dict(color=PROBE_COLOR, width=1.5, dash="dash"),
                                     hoverinfo="skip"))
    for fired, name, colour in [(True, PROBE_FIRED, PROBE_COLOR), (False, PROBE_NOT_FIRED, PROBE_GREY)]:
        idx = [k for k, q in enumerate(probes) if (q.get("block") is not None) == fired]
        if not idx:
            continue
        fig.add_trace(go.Scatter(
            x=Q[idx, 0].tolist(), y=Q[idx, 1].tolist(), mode="markers+text", name=name, legendgroup=name,
            marker=dict(symbol="x", size=12, color=colour), textposition=[probe_side[k] or "top center" for k in idx],
            text=[_short(probes[k]["text"]) if probe_side[k] else "" for k in idx], textfont=dict(size=10, color=colour),
            customdata=[f"probe: {probes[k]['text']}<br>" + (f"fix applied: block {probes[k]['block']}" if fired else "original model")
                  + (f"<br>distance {probes[k]['distance']:.3f} / radius {probes[k]['radius']:.3f}"
                     if probes[k].get("distance") is not None else "") for k in idx],
            hovertemplate="%{customdata}<extra></extra>"))
    note = (f"A 2-D projection ({method}): a point drawn inside a circle can lie outside it in the key "
            f"space; the true distances are beside the map")
    fig.update_layout(title=dict(text=f"Index: {len(points)} edit{'s' * (len(points) != 1)}, {len(clusters)} "
                                      f"cluster{'s' * (len(clusters) != 1)}.<br><sup>{note}</sup>",
                                 font=dict(size=13)),
                      height=480, template="plotly_white", legend=dict(orientation="h", y=-0.12),
                      margin=dict(l=20, r=20, t=50, b=20))
    fig.update_yaxes(scaleanchor="x", scaleratio=1, visible=False)
    fig.update_xaxes(visible=False)
    fig.layout.meta = {"method": method, "points": len(points), "clusters": len(clusters), "probes": len(probes)}
    return fig


def distance_bars(question: str, rows: list[dict]) -> go.Figure:
    """True key distances from one question to its nearest clusters, each against that
    cluster's radius (the fix fires when the bar ends before the radius mark)."""
    fig = go.Figure()
    if not rows:
        fig.add_annotation(text="No edits yet.", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=300, xaxis_visible=False, yaxis_visible=False, template="plotly_white")
        return fig
    height = 160 + 34 * len(rows)
    names = [f"{r['cluster']}: {r['answer'][:28]}{'…' if len(r['answer']) > 28 else ''}" for r in rows][::-1]
    top = 1.15 * max(max(r["distance"], r["radius"]) for r in rows)
    rows = rows[::-1]
    fig.add_trace(go.Bar(x=[r["distance"] for r in rows], y=names, orientation="h", name="distance",
                         marker_color=["#2c6fbb" if r["fires"] else "#b0b0b0" for r in rows],
                         hovertemplate="distance %{x:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[r["radius"] for r in rows], y=names, mode="markers", name="radius",
                             marker=dict(symbol="line-ns-open", size=22, line=dict(width=3, color="#c0392b")),
                             hovertemplate="radius %{x:.3f}<extra></extra>"))
    # No legend: the subtitle names the bars and the mark (a legend under a chart of one or
    # two rows lands on its axis title).
    fig.update_layout(title=dict(text=f"True distances from “{question[:60]}”<br><sup>bars: key distance, blue where "
                                      f"this cluster's fix applies; red mark: the cluster's radius</sup>",
                                 font=dict(size=13)),
                      height=height, template="plotly_white", barmode="overlay", showlegend=False,
                      margin=dict(l=10, r=10, t=60, b=50), xaxis=dict(title="key distance", range=[0, top]),
                      yaxis=dict(automargin=True))
    return fig


def losses_figure(losses: list[float]):
    fig = go.Figure(go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines+markers"))
    fig.update_layout(height=220, template="plotly_white", margin=dict(l=40, r=10, t=30, b=30),
                      title=dict(text="training loss per step", font=dict(size=12)),
                      xaxis_title="step", yaxis_title="loss")
    return fig


def retention_figure(res: dict):
    fig = go.Figure()
    # Distinct dashes: methods that keep every edit draw the same line at 1.0.
    dashes = {"melo": "solid", "grace": "dash", "lora": "dot"}
    last = max((c["edits"] for m in res["methods"].values() for c in m["retention_curve"]), default=1)
    for name, m in res["methods"].items():
        curve = m["retention_curve"]
        fig.add_trace(go.Scatter(x=[c["edits"] for c in curve], y=[c["retention"] for c in curve],
                                 mode="lines+markers", name=name,
                                 line=dict(dash=dashes.get(name, "solid"), width=4 if name == "melo" else 2)))
    fig.update_layout(height=320, template="plotly_white", margin=dict(l=40, r=10, t=40, b=40),
                      title=dict(text="retention of all earlier edits", font=dict(size=13)),
                      xaxis_title="edits made", yaxis_title="retention (token accuracy)", yaxis_range=[0, 1.05],
                      # Whole edits only, about ten ticks: a tick per edit of a 1000-edit run
                      # kept the browser busy for minutes.
                      xaxis=dict(tickmode="linear", tick0=0, dtick=max(1, -(-last // 10))))
    return fig


def frontier(study: dict, default: tuple[int, str, str] = (10, "mean_user", "cosine")) -> go.Figure:
    """Generality against routing locality for every key setting of a key study
    (`python -m melo_engine.bench layers --json`). Keys over the whole question (mean_user)
    are coloured by layer; last-token keys are grey; the engine's default is drawn thick."""
    fig = go.Figure()
    dashes = {"cosine": "solid", "l2": "dash", "standardized": "dot"}
    layers = sorted({f["layer"] for f in study["frontier"]})
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for f in study["frontier"]:
        curve = f["curve"]
        is_default = (f["layer"], f["reduction"], f["distance"]) == default
        colour = palette[layers.index(f["layer"]) % len(palette)] if f["reduction"] == "mean_user" else "#bbbbbb"
        name = f"L{f['layer']} {f['reduction']} {f['distance']}" + (" (default)" if is_default else "")
        fig.add_trace(go.Scatter(
            x=[c["locality"] for c in curve], y=[c["generality"] for c in curve], mode="lines+markers",
            name=name, showlegend=f["reduction"] == "mean_user",
            line=dict(color="black" if is_default else colour, dash=dashes.get(f["distance"], "solid"),
                      width=5 if is_default else 1.5),
            marker=dict(size=4), hovertemplate=name + "<br>locality %{x}<br>generality %{y}<extra></extra>"))
    fig.update_layout(
        template="plotly_white", width=1000, height=620, margin=dict(l=60, r=10, t=60, b=50),
        title=dict(text=(f"Key study, {study['edits']} zsRE edits: generality against routing locality "
                         "(grey: last-token keys; solid cosine, dashed L2, dotted standardized)"),
                   font=dict(size=14)),
        xaxis=dict(title="routing locality (share of held-out questions that fire no edit)", autorange="reversed"),
        yaxis=dict(title="generality (paraphrase routed to its own edit)", rangemode="tozero"),
        legend=dict(font=dict(size=10)))
    return fig


def label_bars(c) -> go.Figure:
    """A classifier's answer for one text (classifier/editor.Classified): each label's
    probability as a bar, the chosen label's bar full colour. With the unedited classifier's
    probabilities beside them (after an edit, or where a block fired) the bars come in pairs:
    grey the original classifier, blue with the edits (the colours of the page's badges)."""
    labels = list(c.probabilities)[::-1]          # top to bottom in the labels' order
    now = [c.probabilities[k] for k in labels]
    pairs = c.base_probabilities is not None and c.block is not None
    fig = go.Figure()
    if pairs:
        fig.add_trace(go.Bar(x=[c.base_probabilities[k] for k in labels], y=labels, orientation="h",
                             name=f"original classifier: {c.base_label}", marker_color="#b0b0b0",
                             hovertemplate="%{y}: %{x:.1%} (original)<extra></extra>"))
    colour = "#2c6fbb" if c.block is not None else "#7f8c8d"
    fig.add_trace(go.Bar(x=now, y=labels, orientation="h",
                         name=f"with your edits: {c.label}" if pairs else c.label,
                         marker=dict(color=colour, opacity=[1.0 if k == c.label else 0.45 for k in labels]),
                         text=[f"{p:.0%}" if p >= 0.01 else "" for p in now], textposition="outside",
                         hovertemplate="%{y}: %{x:.1%}<extra></extra>"))
    who = f"block {c.block} fired" if c.block is not None else "original classifier (no block fired)"
    fig.update_layout(
        title=dict(text=f"Predicted: <b>{c.label}</b> ({c.probabilities[c.label]:.0%})<br><sup>{who}</sup>",
                   font=dict(size=13)),
        height=140 + 26 * len(labels) + (40 if pairs else 0),
        template="plotly_white", barmode="group", showlegend=pairs,
        legend=dict(orientation="h", y=-0.12), margin=dict(l=10, r=30, t=60, b=30),
        xaxis=dict(title="probability", range=[0, 1.12], tickformat=".0%"), yaxis=dict(automargin=True))
    fig.layout.meta = {"label": c.label, "base_label": c.base_label, "block": c.block, "pairs": pairs}
    return fig
