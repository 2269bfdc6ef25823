"""Entropy sparkline: one column per generated token (bar height = entropy in bits at exit), the tau_low and
tau_high levels drawn across it, O1 positions marked, and a legend line."""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from .colors import Palette
from .state import ViewState

BLOCKS = " ▁▂▃▄▅▆▇█"


class EntropySparkline(Widget):
    DEFAULT_CSS = """
    EntropySparkline { height: 1fr; min-height: 2; }
    """

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.refresh())

    def render(self) -> Text:
        state = self.state
        palette = Palette(self.app.theme_variables)
        width, height = self.content_size.width, self.content_size.height
        rows = max(0, height - 1)
        start, end = state.window(width)
        tokens = state.tokens[start:end]
        o1_keys = state.o1_token_keys()
        entropies = [h for h in (_known(t.entropy_bits) for t in tokens) if h is not None]
        top = max([state.tau_high, *entropies, 1.0]) * 1.1
        low_row = _level_row(state.tau_low, top, rows)
        high_row = _level_row(state.tau_high, top, rows)
        out = Text(no_wrap=True, overflow="crop")
        for r in range(rows):
            level = (rows - 1 - r) * 8  # eighths below this row
            if r == high_row or r == low_row:
                mark_style = palette.style("sedac-tau-high" if r == high_row else "sedac-tau-low", dim=False)
            else:
                mark_style = None
            for col, tok in enumerate(tokens):
                idx = start + col
                h = _known(tok.entropy_bits)
                eighths = round(h / top * rows * 8) if top > 0 and h is not None else 0
                fill = max(0, min(8, eighths - level))
                is_o1 = (tok.generation_id, tok.index) in o1_keys or tok.decision == "o1"
                selected = state.selected == idx
                if fill == 0:
                    if is_o1 and r == 0:
                        out.append("◆", palette.style("sedac-o1", bold=True))
                    elif mark_style is not None:
                        out.append("╌", mark_style)
                    elif selected:
                        out.append("│", palette.style("sedac-select"))
                    else:
                        out.append(" ")
                    continue
                name_color = palette.color("sedac-o1") if is_o1 else palette.entropy_color(
                    tok.entropy_bits, state.tau_low, state.tau_high
                )
                style = Style(color=name_color.rich_color)
                if selected:
                    style += Style(bgcolor=palette.color("sedac-select").rich_color)
                out.append(BLOCKS[fill], style)
            if mark_style is not None and len(tokens) < width:
                out.append("╌" * (width - len(tokens)), mark_style)
            out.append("\n")
        out.append_text(self._legend(palette, width, tokens))
        return out

    def _legend(self, palette: Palette, width: int, tokens: list) -> Text:
        state = self.state
        legend = Text(no_wrap=True, overflow="ellipsis")
        legend.append("╌", palette.style("sedac-tau-low"))
        legend.append(f"tau_low {state.tau_low:.2f}  ")
        legend.append("╌", palette.style("sedac-tau-high"))
        legend.append(f"tau_high {state.tau_high:.2f}")
        if state.o1_events:
            legend.append("  ◆", palette.style("sedac-o1"))
            legend.append(f"O1×{len(state.o1_events)}")
        known = [h for h in (_known(t.entropy_bits) for t in tokens) if h is not None]
        if known and width >= 50:
            legend.append(f"  max {max(known):.2f} bits", Style(dim=True))
        return legend


def _known(value: float | None) -> float | None:
    """An entropy to draw: None for one never computed (and for a non-finite value from an old file)."""
    return value if value is not None and math.isfinite(value) else None


def _level_row(value: float, top: float, rows: int) -> int | None:
    """The chart row (0 = top) that a horizontal level falls into, or None when off the chart."""
    if rows <= 0 or top <= 0 or value <= 0 or value >= top:
        return None
    from_bottom = int(value / top * rows)  # 0 = the bottom row
    return rows - 1 - min(rows - 1, from_bottom)
