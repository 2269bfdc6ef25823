"""Exit-layer heatmap: one column per recent token, one row per decoder layer (or per group of layers when the
panel is shorter than the model is deep). Cells are coloured by the entropy seen at that layer when it was checked;
the exit layer is marked; skipped layers, drafts accepted/rejected and O1 positions are drawn distinctly."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from sedac_core.events import TokenEvent

from .colors import Palette
from .state import ViewState

EXIT_MARK = "◆"
SKIPPED = "░"
COMPUTED = "█"


class ExitHeatmap(Widget):
    DEFAULT_CSS = """
    ExitHeatmap { height: 1fr; min-height: 3; }
    """

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.refresh())

    def layer_rows(self, rows: int) -> list[tuple[int, int]]:
        """Split layers 1..num_layers into at most `rows` contiguous [first, last] groups, shallow first."""
        layers = max(1, self.state.num_layers)
        rows = max(1, min(rows, layers))
        groups = []
        for r in range(rows):
            first = r * layers // rows + 1
            last = (r + 1) * layers // rows
            groups.append((first, last))
        return groups

    def render(self) -> Text:
        state = self.state
        palette = Palette(self.app.theme_variables)
        width, height = self.content_size.width, self.content_size.height
        out = Text(no_wrap=True, overflow="crop")
        if state.num_layers <= 0:
            out.append("waiting for the model...", Style(dim=True))
            return out
        groups = self.layer_rows(max(1, height - 1))
        gutter = len(f"L{state.num_layers}") + 1
        columns = max(1, width - gutter)
        start, end = state.window(columns)
        tokens = state.tokens[start:end]
        o1_keys = state.o1_token_keys()
        # header row: draft outcome / O1 / selection
        out.append(" " * gutter)
        for col, tok in enumerate(tokens):
            out.append(*_header_cell(tok, (tok.generation_id, tok.index) in o1_keys, state.selected == start + col,
                                     palette))
        out.append("\n")
        for r, (first, last) in enumerate(groups):
            label = f"L{first}" if r == 0 or r == len(groups) - 1 or first == last else ""
            if r == len(groups) - 1:
                label = f"L{last}"
            out.append(label.rjust(gutter - 1) + " ", Style(dim=True))
            for col, tok in enumerate(tokens):
                out.append(*_cell(tok, first, last, state, palette, selected=state.selected == start + col))
            if r < len(groups) - 1:
                out.append("\n")
        return out


def _header_cell(tok: TokenEvent, is_o1: bool, selected: bool, palette: Palette) -> tuple[str, Style]:
    if is_o1 or tok.decision == "o1":
        return "◆", palette.style("sedac-o1", bold=True)
    if tok.draft == "accepted":
        return "✓", palette.style("sedac-accepted", bold=True)
    if tok.draft == "rejected":
        return "✗", palette.style("sedac-rejected", bold=True)
    if tok.draft == "verified":
        return "•", palette.style("sedac-computed")
    if selected:
        return "▾", palette.style("sedac-select", bold=True)
    return " ", Style()


def _cell(tok: TokenEvent, first: int, last: int, state: ViewState, palette: Palette,
          selected: bool) -> tuple[str, Style]:
    exit_layer = tok.exit_layer or state.num_layers
    bg = palette.color("sedac-select").rich_color if selected else None
    if first > exit_layer:  # every layer of this row was skipped for this token
        return SKIPPED, Style(color=palette.color("sedac-skip").rich_color, bgcolor=bg)
    known = [v for k, v in (tok.layer_entropies or {}).items() if first <= int(k) <= min(last, exit_layer)]
    if first <= exit_layer <= last:
        color = palette.entropy_color(tok.entropy_bits, state.tau_low, state.tau_high)
        style = Style(color=palette.color("sedac-exit").rich_color, bgcolor=color.rich_color, bold=True,
                      underline=selected)
        if tok.draft == "rejected":
            style += Style(strike=True, dim=True)
        return EXIT_MARK, style
    if known:
        color = palette.entropy_color(sum(known) / len(known), state.tau_low, state.tau_high)
    else:
        color = palette.color("sedac-computed")
    style = Style(color=color.rich_color, bgcolor=bg)
    if tok.draft == "rejected":
        style += Style(dim=True)
    return COMPUTED, style
