"""Where the map's labels go: each label on the side of its mark where it covers the fewest
other marks and labels.

Plotly puts every text label at one fixed side of its marker and never moves one out of
another's way, so ten edits near each other ("c7" under "c2", a probe's question across a
cluster's name) became unreadable. Plotly does take one position per point, so we choose it:
greedily, label by label, among eight sides, the one whose box overlaps least with the
markers and the labels already placed; a label with no free side is left out (its hover
still says it). The boxes are estimated in pixels from the data's
span and the chart's size (the browser lays the text out, not us), which is close enough to
tell "free" from "on top of another label".
"""
from __future__ import annotations

import numpy as np

CHAR_PX, LINE_PX, MARK_PX = 6.0, 13.0, 7.0     # a 10 px label's character and line; a marker's half-size
MARK_WEIGHT = 5.0
# Plotly's names for the sides, in order of preference (under the mark first: the clusters'
# names sat there before), each with the box's lower-left corner relative to the mark, as a
# function of the label's width w (pixels, y upwards).
SIDES = {
    "bottom center": lambda w: (-w / 2, -MARK_PX - LINE_PX),
    "top center": lambda w: (-w / 2, MARK_PX),
    "middle right": lambda w: (MARK_PX, -LINE_PX / 2),
    "middle left": lambda w: (-MARK_PX - w, -LINE_PX / 2),
    "bottom right": lambda w: (MARK_PX * 0.7, -MARK_PX * 0.7 - LINE_PX),
    "top right": lambda w: (MARK_PX * 0.7, MARK_PX * 0.7),
    "bottom left": lambda w: (-MARK_PX * 0.7 - w, -MARK_PX * 0.7 - LINE_PX),
    "top left": lambda w: (-MARK_PX * 0.7 - w, MARK_PX * 0.7),
}


def _overlap(a, b) -> float:
    """The area two boxes (x0, y0, x1, y1) share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def pixels_per_unit(span_x: float, span_y: float, width: float = 700, height: float = 320) -> float:
    """The scale of a chart whose axes keep one unit the same length both ways (the map's
    `scaleanchor`): the longer span, relative to its side, sets it."""
    return 1.0 / max(span_x / width, span_y / height, 1e-9)


def sides(labelled: np.ndarray, texts: list[str], marks: np.ndarray, scale: float,
          crowded: float = 0.1) -> list[str | None]:
    """A plotly textposition for each of `labelled` (n x 2, data units) with its text,
    avoiding `marks` (every marker on the chart, m x 2) and each other; `scale` pixels per
    unit. None where every side would cover more than `crowded` of the label's own box: that
    label is better left out (its mark's hover still says it) than drawn over another."""
    px = np.asarray(labelled, dtype=float).reshape(-1, 2) * scale
    # A label across a mark hides the mark: that costs more than touching another label.
    marked = [(x - MARK_PX, y - MARK_PX, x + MARK_PX, y + MARK_PX)
              for x, y in np.asarray(marks, dtype=float).reshape(-1, 2) * scale]
    placed, chosen = [], []
    for (x, y), text in zip(px, texts):
        w = CHAR_PX * len(str(text))
        best, best_cost = None, None
        for rank, (side, corner) in enumerate(SIDES.items()):
            dx, dy = corner(w)
            box = (x + dx, y + dy, x + dx + w, y + dy + LINE_PX)
            cost = MARK_WEIGHT * sum(_overlap(box, o) for o in marked) + sum(_overlap(box, o) for o in placed)
            # A side further down the list costs a little more, so ties keep the usual place.
            if best_cost is None or cost + rank * 0.5 < best_cost[0] + best_cost[1] * 0.5:
                best, best_cost, best_box = side, (cost, rank), box
        if best_cost[0] > crowded * w * LINE_PX:
            chosen.append(None)
            continue
        chosen.append(best)
        placed.append(best_box)
    return chosen
