"""Exit-layer heatmap: one column per recent token, one row per decoder layer (or per group of layers when the
panel is shorter than the model is deep). Cells are coloured by the entropy seen at that layer when it was checked;
the exit layer is marked; skipped layers, drafts accepted/rejected and O1 positions are drawn distinctly."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style

from sedac_core.events import TokenEvent

from .colors import Palette
from .lines import Line, LinePanel, StyleCache, merged
from .state import ViewState

Cell = tuple[str, "Style | None"]

EXIT_MARK = "◆"
SKIPPED = "░"
COMPUTED = "█"


class ExitHeatmap(LinePanel):
    DEFAULT_CSS = """
    ExitHeatmap { height: 1fr; min-height: 3; }
    """

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(state, **kwargs)
        self._columns: dict[tuple, list[Cell]] = {}
        self._columns_context: tuple | None = None

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

    def build(self, width: int, height: int, palette: Palette) -> list[Line]:
        state = self.state
        style = self.styles_cache
        if state.num_layers <= 0:
            return [[Segment("waiting for the model...", style(dim=True))]]
        groups = tuple(self.layer_rows(max(1, height - 1)))
        gutter = len(f"L{state.num_layers}") + 1
        columns = max(1, width - gutter)
        start, end = state.window(columns)
        tokens = state.tokens[start:end]
        o1_keys = state.o1_token_keys()
        selected = state.selected
        # a token's column (header cell, then one cell per row) depends on the token and on what is drawn around
        # it: computed once per token while those stay the same (a repaint then only lays out cached cells)
        context = (groups, state.tau_low, state.tau_high, state.num_layers, id(palette))
        cache = self._columns if self._columns_context == context else {}
        cols = []
        for col, tok in enumerate(tokens):
            key = (id(tok), (tok.generation_id, tok.index) in o1_keys, selected == start + col)
            column = cache.get(key)
            if column is None:
                column = [_header_cell(tok, key[1], key[2], palette, style)]
                column += [_cell(tok, first, last, state, palette, style, selected=key[2]) for first, last in groups]
                cache[key] = column
            cols.append(column)
        if len(cache) > 4 * columns:  # tokens scrolled out of the window
            keep = {(id(t), (t.generation_id, t.index) in o1_keys, selected == start + c) for c, t in enumerate(tokens)}
            cache = {k: v for k, v in cache.items() if k in keep}
        self._columns, self._columns_context = cache, context
        lines = [merged([column[0] for column in cols], [Segment(" " * gutter)])]
        label_style = style(dim=True)
        for r, (first, last) in enumerate(groups, start=1):
            label = f"L{first}" if r == 1 or first == last else ""
            if r == len(groups):
                label = f"L{last}"
            lines.append(merged([column[r] for column in cols], [Segment(label.rjust(gutter - 1) + " ", label_style)]))
        return lines


def _header_cell(tok: TokenEvent, is_o1: bool, selected: bool, palette: Palette, style: StyleCache) -> Cell:
    if is_o1 or tok.decision == "o1":
        return ("◆", style(palette.hex("sedac-o1"), bold=True))
    if tok.draft == "accepted":
        return ("✓", style(palette.hex("sedac-accepted"), bold=True))
    if tok.draft == "rejected":
        return ("✗", style(palette.hex("sedac-rejected"), bold=True))
    if tok.draft == "verified":
        return ("•", style(palette.hex("sedac-computed")))
    if selected:
        return ("▾", style(palette.hex("sedac-select"), bold=True))
    return (" ", None)


def _cell(tok: TokenEvent, first: int, last: int, state: ViewState, palette: Palette, style: StyleCache,
          selected: bool) -> Cell:
    exit_layer = tok.exit_layer or state.num_layers
    bg = palette.hex("sedac-select") if selected else None
    if first > exit_layer:  # every layer of this row was skipped for this token
        return (SKIPPED, style(palette.hex("sedac-skip"), bg))
    rejected = tok.draft == "rejected"
    if first <= exit_layer <= last:
        color = palette.entropy_color(tok.entropy_bits, state.tau_low, state.tau_high)
        return (EXIT_MARK, style(palette.hex("sedac-exit"), color.hex, bold=True, underline=selected,
                                 strike=rejected, dim=rejected))
    known = [v for k, v in (tok.layer_entropies or {}).items() if first <= int(k) <= min(last, exit_layer)]
    if known:
        color = palette.entropy_color(sum(known) / len(known), state.tau_low, state.tau_high).hex
    else:
        color = palette.hex("sedac-computed")
    return (COMPUTED, style(color, bg, dim=rejected))
