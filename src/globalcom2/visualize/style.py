"""How the figure looks: its colours, its sizes (inches) and the names of the methods it draws."""

from __future__ import annotations

RANDOM_WEIGHTS_NOTE = (
    "Random weights (tiny demo model): the kept positions are meaningless; the counts and crop budgets are real."
)

# Colours (RGB 0-1 for the padding drawn into pixels, matplotlib colours for the rest).
PAD_FACE = (0.97, 0.97, 0.98)  # padding: near white, hatched (the same in the heat maps)
PAD_HATCH = (0.5, 0.5, 0.58)
TEXT = "0.1"
MUTED = "0.35"
NOTE = (0.72, 0.12, 0.08)
CMAP = "magma"
KEPT_RAMP = ((70, 140, 220), (250, 205, 110))  # the legend's kept-token swatch: a ramp between these (RGB 0-255)

# Layout (inches).
MARGIN = 0.35
GAP = 0.4  # between the thumbnail and the crops
THUMB = 2.6  # thumbnail panel side
VIEW_MAX = 2.5  # side of one crop, at most
CROPS_MAX_W, CROPS_MAX_H = 10.5, 6.3
MIN_W, MIN_W_HEAT = 6.8, 11.0  # width of the text block, at least
ROW_SPACE = 0.35
CBAR = 0.95  # room right of a heat map: gap, colour bar, its tick labels, gap to the next map

METHOD_TITLES = {
    "globalcom2": "GlobalCom2",
    "fastervlm": "FasterVLM",
    "random": "Random pruning",
    "pooling": "Pooling",
    "fastv": "FastV",
}


def method_title(method: str) -> str:
    """A method's name as the figure writes it (``"globalcom2+fastv"`` -> ``"GlobalCom2 + FastV"``)."""
    return " + ".join(METHOD_TITLES.get(part, part) for part in method.split("+"))
