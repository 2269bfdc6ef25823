"""Entropy sparkline: one column per generated token (bar height = entropy in bits at exit), the tau_low and
tau_high levels drawn across it, O1 positions marked, and a legend line."""

from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style

from .colors import Palette
from .lines import Line, LinePanel, merged

BLOCKS = " ▁▂▃▄▅▆▇█"


class EntropySparkline(LinePanel):
    DEFAULT_CSS = """
    EntropySparkline { height: 1fr; min-height: 2; }
    """

    def build(self, width: int, height: int, palette: Palette) -> list[Line]:
        state = self.state
        style = self.styles_cache
        rows = max(0, height - 1)
        start, end = state.window(width)
        tokens = state.tokens[start:end]
        o1_keys = state.o1_token_keys()
        known = [_known(t.entropy_bits) for t in tokens]
        top = max([state.tau_high, *(h for h in known if h is not None), 1.0]) * 1.1
        low_row = _level_row(state.tau_low, top, rows)
        high_row = _level_row(state.tau_high, top, rows)
        # per column: eighths of a row filled from the bottom, and the bar's style
        o1_style = style(palette.hex("sedac-o1"), bold=True)
        select_bg = palette.hex("sedac-select")
        columns = []
        for col, (tok, h) in enumerate(zip(tokens, known)):
            eighths = round(h / top * rows * 8) if top > 0 and h is not None else 0
            is_o1 = tok.decision == "o1" or (tok.generation_id, tok.index) in o1_keys
            selected = state.selected == start + col
            color = palette.hex("sedac-o1") if is_o1 else palette.entropy_color(
                h, state.tau_low, state.tau_high).hex
            columns.append((eighths, is_o1, selected, style(color, select_bg if selected else None)))
        lines: list[Line] = []
        for r in range(rows):
            level = (rows - 1 - r) * 8  # eighths below this row
            mark_style = None
            if r == high_row or r == low_row:
                mark_style = style(palette.hex("sedac-tau-high" if r == high_row else "sedac-tau-low"))
            cells: list[tuple[str, Style | None]] = []
            for eighths, is_o1, selected, bar_style in columns:
                fill = max(0, min(8, eighths - level))
                if fill:
                    cells.append((BLOCKS[fill], bar_style))
                elif is_o1 and r == 0:
                    cells.append(("◆", o1_style))
                elif mark_style is not None:
                    cells.append(("╌", mark_style))
                elif selected:
                    cells.append(("│", style(select_bg)))
                else:
                    cells.append((" ", None))
            if mark_style is not None and len(tokens) < width:
                cells.append(("╌" * (width - len(tokens)), mark_style))
            lines.append(merged(cells))
        lines.append(self._legend(palette, width, [h for h in known if h is not None]))
        return lines

    def _legend(self, palette: Palette, width: int, known: list[float]) -> Line:
        state = self.state
        style = self.styles_cache
        legend = [Segment("╌", style(palette.hex("sedac-tau-low"))), Segment(f"tau_low {state.tau_low:.2f}  "),
                  Segment("╌", style(palette.hex("sedac-tau-high"))), Segment(f"tau_high {state.tau_high:.2f}")]
        if state.o1_events:
            legend += [Segment("  ◆", style(palette.hex("sedac-o1"))), Segment(f"O1×{len(state.o1_events)}")]
        if known and width >= 50:
            legend.append(Segment(f"  max {max(known):.2f} bits", style(dim=True)))
        return _crop(legend, width)


def _crop(line: Line, width: int) -> Line:
    """The line cut to `width` cells, ending in an ellipsis when it was longer."""
    total = sum(seg.cell_length for seg in line)
    if total <= width or width <= 0:
        return line
    out: Line = []
    room = width - 1
    for seg in line:
        if room <= 0:
            break
        text = seg.text[:room]
        out.append(Segment(text, seg.style))
        room -= len(text)
    out.append(Segment("…"))
    return out


def _known(value: float | None) -> float | None:
    """An entropy to draw: None for one never computed (and for a non-finite value from an old file)."""
    return value if value is not None and math.isfinite(value) else None


def _level_row(value: float, top: float, rows: int) -> int | None:
    """The chart row (0 = top) that a horizontal level falls into, or None when off the chart."""
    if rows <= 0 or top <= 0 or value <= 0 or value >= top:
        return None
    from_bottom = int(value / top * rows)  # 0 = the bottom row
    return rows - 1 - min(rows - 1, from_bottom)
