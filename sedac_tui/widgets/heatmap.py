"""Exit-layer heatmap: one column per recent token, one row per decoder layer (or per group of layers when the
panel is shorter than the model is deep). Cells are coloured by the entropy seen at that layer when it was checked;
the exit layer is marked; skipped layers, drafts accepted/rejected and O1 positions are drawn distinctly."""

from __future__ import annotations

from rich.segment import Segment

from sedac_core.events import TokenEvent

from .colors import Palette
from .lines import Line, LinePanel, StyleCache
from .state import ViewState

EXIT_MARK = "◆"
SKIPPED = "░"
COMPUTED = "█"


class ExitHeatmap(LinePanel):
    DEFAULT_CSS = """
    ExitHeatmap { height: 1fr; min-height: 3; }
    """

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
        groups = self.layer_rows(max(1, height - 1))
        gutter = len(f"L{state.num_layers}") + 1
        columns = max(1, width - gutter)
        start, end = state.window(columns)
        tokens = state.tokens[start:end]
        o1_keys = state.o1_token_keys()
        selected = state.selected
        header: Line = [Segment(" " * gutter)]
        for col, tok in enumerate(tokens):
            header.append(_header_cell(tok, (tok.generation_id, tok.index) in o1_keys, selected == start + col,
                                       palette, style))
        lines = [header]
        label_style = style(dim=True)
        for r, (first, last) in enumerate(groups):
            label = f"L{first}" if r == 0 or first == last else ""
            if r == len(groups) - 1:
                label = f"L{last}"
            line: Line = [Segment(label.rjust(gutter - 1) + " ", label_style)]
            for col, tok in enumerate(tokens):
                line.append(_cell(tok, first, last, state, palette, style, selected=selected == start + col))
            lines.append(line)
        return lines


def _header_cell(tok: TokenEvent, is_o1: bool, selected: bool, palette: Palette, style: StyleCache) -> Segment:
    if is_o1 or tok.decision == "o1":
        return Segment("◆", style(palette.hex("sedac-o1"), bold=True))
    if tok.draft == "accepted":
        return Segment("✓", style(palette.hex("sedac-accepted"), bold=True))
    if tok.draft == "rejected":
        return Segment("✗", style(palette.hex("sedac-rejected"), bold=True))
    if tok.draft == "verified":
        return Segment("•", style(palette.hex("sedac-computed")))
    if selected:
        return Segment("▾", style(palette.hex("sedac-select"), bold=True))
    return Segment(" ")


def _cell(tok: TokenEvent, first: int, last: int, state: ViewState, palette: Palette, style: StyleCache,
          selected: bool) -> Segment:
    exit_layer = tok.exit_layer or state.num_layers
    bg = palette.hex("sedac-select") if selected else None
    if first > exit_layer:  # every layer of this row was skipped for this token
        return Segment(SKIPPED, style(palette.hex("sedac-skip"), bg))
    rejected = tok.draft == "rejected"
    if first <= exit_layer <= last:
        color = palette.entropy_color(tok.entropy_bits, state.tau_low, state.tau_high)
        return Segment(EXIT_MARK, style(palette.hex("sedac-exit"), color.hex, bold=True, underline=selected,
                                        strike=rejected, dim=rejected))
    known = [v for k, v in (tok.layer_entropies or {}).items() if first <= int(k) <= min(last, exit_layer)]
    if known:
        color = palette.entropy_color(sum(known) / len(known), state.tau_low, state.tau_high).hex
    else:
        color = palette.hex("sedac-computed")
    return Segment(COMPUTED, style(color, bg, dim=rejected))
