"""Token inspector: move along the generated tokens and see the selected one's exit layer, per-layer entropies
and top candidates."""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widget import Widget

from .colors import widget_palette
from .state import ViewState


class TokenInspector(Widget, can_focus=True):
    DEFAULT_CSS = """
    TokenInspector { height: auto; max-height: 16; padding: 0 1; }
    """

    BINDINGS = [
        Binding("left", "move(-1)", "Prev token", id="inspector_prev"),
        Binding("right", "move(1)", "Next token", id="inspector_next"),
        Binding("home", "move_to(0)", "First", show=False, id="inspector_first"),
        Binding("end", "move_to(-1)", "Last", show=False, id="inspector_last"),
    ]

    class Moved(Message):
        """The selection changed: the panels should redraw to show it."""

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def action_move(self, step: int) -> None:
        n = len(self.state.tokens)
        if not n:
            return
        current = self.state.selected if self.state.selected is not None else n - 1
        self.state.selected = max(0, min(n - 1, current + step))
        self.post_message(self.Moved())

    def action_move_to(self, index: int) -> None:
        n = len(self.state.tokens)
        if n:
            self.state.selected = index % n
            self.post_message(self.Moved())

    def render(self) -> Text:
        state = self.state
        palette = widget_palette(self)
        out = Text(overflow="ellipsis", no_wrap=True)
        if not state.tokens:
            out.append("no tokens yet · ←/→ move along tokens", Style(dim=True))
            return out
        idx = state.selected if state.selected is not None else len(state.tokens) - 1
        tok = state.tokens[idx]
        num_layers = tok.num_layers or state.num_layers
        out.append(f"token {idx + 1}/{len(state.tokens)} ", Style(bold=True))
        out.append(repr(tok.text), Style(bold=True, color=palette.color("sedac-select").rich_color))
        out.append(f"  id {tok.token_id}  gen {tok.generation_id} #{tok.index}\n", Style(dim=True))
        out.append(f"exit layer {tok.exit_layer}/{num_layers} · {tok.decision}")
        if tok.draft:
            out.append(f" · draft {tok.draft}")
        h = tok.entropy_bits
        out.append(f" · H {h:.2f} bits" if h is not None and math.isfinite(h) else " · H not computed (a guess)")
        out.append(f" · conf {tok.confidence:.2f}")
        if tok.time_ms:
            out.append(f" · {tok.time_ms:.1f} ms")
        out.append("\n")
        entropies = dict(sorted((int(k), float(v)) for k, v in (tok.layer_entropies or {}).items()))
        if entropies:
            top = max(max(entropies.values()), state.tau_high, 1.0)
            bar_width = 20
            for layer, h in entropies.items():
                filled = int(round(h / top * bar_width))
                color = palette.entropy_color(h, state.tau_low, state.tau_high).rich_color
                out.append(f"L{layer:<3}", Style(dim=True))
                out.append("█" * filled, Style(color=color))
                out.append(" " * (bar_width - filled))
                out.append(f" {h:.2f}" + ("  ◆ exit" if layer == tok.exit_layer else "")
                           + ("  (gate: not checked)" if layer in tok.gated_layers else "") + "\n")
        else:
            out.append("per-layer entropies: not traced for this token\n", Style(dim=True))
        if tok.top_tokens:
            out.append("top: ", Style(dim=True))
            out.append("  ".join(f"{t!r} {p:.2f}" for t, p in tok.top_tokens[:5]))
            out.append("\n")
        o1 = state.o1_at(tok)
        if o1 is not None:
            out.append("O1: ", palette.style("sedac-o1", bold=True))
            out.append(", ".join(f"{c.get('text', '')!r} {float(c.get('score', 0)):.2f}" for c in o1.candidates))
            out.append("\n")
        out.append("←/→ move · home/end · F2 or Esc close", Style(dim=True))
        return out
