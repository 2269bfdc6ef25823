"""A panel drawn line by line (Textual's Line API) from segments with cached styles.

Why: the heatmap and the sparkline are grids of single cells, each with its own colour. Returned from `render()` as
Rich Text, every repaint converts a span per cell into Textual's Content and back into strips, which cost the UI
thread more than the model's decoding did (the app ran at ~0.4x the engine). Built as segments with styles reused
across cells and repaints, and drawn once per repaint, a panel costs a fraction of that."""

from __future__ import annotations

from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.strip import Strip
from textual.widget import Widget

from .colors import Palette, widget_palette
from .state import ViewState

Line = list[Segment]


class StyleCache:
    """rich Styles by their arguments: a grid of cells uses a handful of distinct styles, built once."""

    def __init__(self) -> None:
        self._styles: dict[tuple, Style] = {}

    def __call__(self, color: Any = None, bgcolor: Any = None, **flags: bool) -> Style:
        key = (color, bgcolor, *sorted(flags.items()))
        style = self._styles.get(key)
        if style is None:
            if len(self._styles) > 4096:
                self._styles.clear()
            style = self._styles[key] = Style(color=color, bgcolor=bgcolor, **flags)
        return style


def merged(cells: list[tuple[str, Style | None]], lead: list[Segment] | None = None) -> Line:
    """Cells (text, style) as segments, neighbours of one style joined: a row of like cells becomes one segment,
    and every strip operation downstream (crop, style, colour filter) runs per segment."""
    line: Line = list(lead or [])
    run: list[str] = []
    run_style: Style | None = None
    for text, style in cells:
        if style is not run_style and run:
            line.append(Segment("".join(run), run_style))
            run = []
        run_style = style
        run.append(text)
    if run:
        line.append(Segment("".join(run), run_style))
    return line


class LinePanel(Widget):
    """Subclasses implement `build(width, height, palette) -> list[Line]`; the lines are built once per repaint."""

    def __init__(self, state: ViewState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.styles_cache = StyleCache()
        self._strips: list[Strip] | None = None
        self._built_for: Size | None = None

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.refresh())

    @property
    def palette(self) -> Palette:
        return widget_palette(self)

    def build(self, width: int, height: int, palette: Palette) -> list[Line]:
        raise NotImplementedError

    def refresh(self, *regions: Any, **kwargs: Any) -> "LinePanel":
        self._strips = None  # anything that repaints the panel rebuilds it from the state
        super().refresh(*regions, **kwargs)
        return self

    def render_line(self, y: int) -> Strip:
        size = self.content_size
        if self._strips is None or self._built_for != size:
            base = self.rich_style
            self._strips = [Strip(line).apply_style(base)
                            for line in self.build(size.width, size.height, self.palette)]
            self._built_for = size
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(size.width, self.rich_style)

    def plain(self) -> str:
        """The panel as plain text (tests, and a user's copy of what the panel shows)."""
        size = self.content_size
        return "\n".join("".join(seg.text for seg in line)
                         for line in self.build(size.width, size.height, self.palette))
