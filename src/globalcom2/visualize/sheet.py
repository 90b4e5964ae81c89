"""Drawing machinery: text measured with matplotlib's Agg renderer, everything placed in inches
from the top left, the Figure built once its height is known (no pyplot, no backend switch).

matplotlib is imported only when something is measured or built, so that importing
:mod:`globalcom2.visualize` works without it.
"""

from __future__ import annotations

from typing import Any, Callable

from ..core.geometry import CropGeometry
from ..picture import wrap_words
from .style import PAD_FACE, PAD_HATCH, TEXT

__all__ = ["_Sheet", "_Type", "_bare", "_crop_lines", "_hatch_rect"]


class _Type:
    """Text measurement (in inches) with matplotlib's own renderer, so that wrapping is exact."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import RendererAgg
        from matplotlib.font_manager import FontProperties

        self._renderer = RendererAgg(10, 10, 72)  # 72 dpi: pixels are points
        self._props = FontProperties

    def width(self, text: str, size: float, weight: str = "normal") -> float:
        """Width of one line of ``text`` in inches, at ``size`` points."""
        prop = self._props(size=size, weight=weight)
        w, _, _ = self._renderer.get_text_width_height_descent(text, prop, ismath=False)
        return w / 72 * 1.03  # a little slack for hinting at other resolutions

    @staticmethod
    def line(size: float) -> float:
        """Line height in inches."""
        return size * 1.32 / 72

    def wrap(self, text: str, width: float, size: float, weight: str = "normal") -> list[str]:
        """Greedy word wrap to at most ``width`` inches per line (a longer word stays whole)."""
        return wrap_words(text, lambda line: self.width(line, size, weight) > width)


class _Sheet:
    """Collects drawing steps at inch positions (from the top left); builds the Figure at the end,
    when its height is known."""

    def __init__(self, width: float) -> None:
        self.width = width
        self.height = 0.0
        self.steps: list[Callable[[Any], None]] = []

    def rect(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Figure fractions of a box whose top-left corner is (x, y) inches from the top left."""
        return (x / self.width, (self.height - y - h) / self.height, w / self.width, h / self.height)

    def axes(self, x: float, y: float, w: float, h: float, setup: Callable[[Any], None]) -> None:
        """An axes of ``w`` x ``h`` inches at (x, y), handed to ``setup`` once the figure exists."""
        self.steps.append(lambda fig: setup(fig.add_axes(self.rect(x, y, w, h))))

    def text(self, x: float, y: float, text: str, **kw: Any) -> None:
        """Text whose top (``va='top'``) left corner is at (x, y) inches (``ha`` may change x's role)."""
        kw.setdefault("va", "top")
        kw.setdefault("ha", "left")
        kw.setdefault("color", TEXT)
        self.steps.append(lambda fig: fig.text(x / self.width, 1 - y / self.height, text, **kw))

    def build(self, height: float) -> Any:
        """The Figure, ``height`` inches high, with every step drawn in the order it was added."""
        from matplotlib.figure import Figure

        self.height = height
        fig = Figure(figsize=(self.width, height), facecolor="white")
        for step in self.steps:
            step(fig)
        return fig


def _bare(ax: Any) -> None:
    """A panel without ticks, framed in dark grey."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.3")
        spine.set_linewidth(0.8)


def _hatch_rect(ax: Any, x: float, y: float, w: float, h: float, zorder: float = 2) -> None:
    """Padding: a hatched rectangle at (x, y), ``w`` x ``h`` in data units."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, facecolor=PAD_FACE, edgecolor=PAD_HATCH, hatch="///", linewidth=0, zorder=zorder))


def _crop_lines(ax: Any, geom: CropGeometry, unit: float, color: str = "white", lw: float = 1.6) -> None:
    """The lines between the crops, one crop being ``unit`` data units wide and high."""
    for r in range(1, geom.grid_h):
        ax.axhline(r * unit - 0.5, color=color, lw=lw, zorder=4)
    for c in range(1, geom.grid_w):
        ax.axvline(c * unit - 0.5, color=color, lw=lw, zorder=4)
