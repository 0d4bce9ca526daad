"""The views of a film that holds several side by side.

More than a third of the UNIFESP arm radiographs are such composites (two or three views of one part on one
film, sometimes a 2 x 2 grid), while every MURA image is a single view. A network trained on both learns "one view:
MURA, so forearm or humerus" on top of the anatomy; training on each view alone as well takes that cue away.

A divider is a straight edge that crosses (nearly) the whole film, with exposed film on both sides: a collimation
border of a single view has unexposed background on one side, and an anatomical edge is neither straight nor that long.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

EDGE_STEP = 24.0  # grey levels across three pixels that count as an edge
DIVIDER_COVERAGE = 0.8  # share of the lines a divider must cross
MIN_VIEW_SHARE = 0.2  # of the film's width (height): narrower pieces are not views
EXPOSED_LEVEL = 48.0  # grey level above the unexposed background
MIN_EXPOSED = 0.2  # share of exposed pixels each side of a divider needs
MAX_GAP_EXPOSED = 0.02  # share of exposed pixels in a column of the gap between two views

Box = tuple[int, int, int, int]  # left, top, right, bottom


def divider(film: np.ndarray, min_width: int) -> int | None:
    """The column that divides ``film`` (a float grey array) into two views, or None: the strongest straight line
    (an edge that crosses the lines, or a gap of unexposed film) with exposed film on both sides."""
    width = film.shape[1]
    if width < 2 * min_width:
        return None
    exposed = film > EXPOSED_LEVEL
    edge = np.zeros(width)
    edge[1:-1] = (np.abs(film[:, 2:] - film[:, :-2]) > EDGE_STEP).mean(0)
    gap = exposed.mean(0) <= MAX_GAP_EXPOSED
    strength = np.maximum(edge, gap)[min_width : width - min_width + 1]
    for column in min_width + np.argsort(-strength, kind="stable"):
        if strength[column - min_width] < DIVIDER_COVERAGE:
            return None
        if min(exposed[:, :column].mean(), exposed[:, column:].mean()) >= MIN_EXPOSED:
            return int(column)
    return None


def panel_boxes(image: Image.Image) -> list[Box]:
    """The boxes of the views ``image`` holds, side by side or stacked: one box (the whole image) for a single view."""
    film = np.asarray(image.convert("L"), dtype=np.float32)
    min_width, min_height = (max(2, round(n * MIN_VIEW_SHARE)) for n in image.size)

    def split(box: Box) -> list[Box]:
        left, top, right, bottom = box
        piece = film[top:bottom, left:right]
        if (x := divider(piece, min_width)) is not None:
            return split((left, top, left + x, bottom)) + split((left + x, top, right, bottom))
        if (y := divider(piece.T, min_height)) is not None:
            return split((left, top, right, top + y)) + split((left, top + y, right, bottom))
        return [box]

    return split((0, 0, *image.size))
