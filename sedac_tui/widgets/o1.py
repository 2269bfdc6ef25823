"""The O1 list: every position where high-entropy deep reasoning triggered, with the candidates it weighed and
the token it chose."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from .colors import widget_palette
from .state import ViewState


class O1List(Widget):
    DEFAULT_CSS = """
    O1List { height: auto; max-height: 12; }
    """

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def render(self) -> Text:
        state = self.state
        palette = widget_palette(self)
        out = Text(overflow="ellipsis", no_wrap=True)
        if not state.o1_events:
            hint = "O1 reasoning on; none triggered yet" if state.enable_o1_reasoning else "O1 reasoning off"
            out.append(f"{hint} (tau_high {state.tau_high:.2f})", Style(dim=True))
            return out
        height = max(1, self.size.height or 6)
        events = state.o1_events[-height:]
        for i, ev in enumerate(events):
            chosen = next((c for c in ev.candidates if c.get("token_id") == ev.choice), None)
            out.append("◆ ", palette.style("sedac-o1", bold=True))
            out.append(f"#{ev.index} H={ev.entropy_bits:.2f} ")
            if chosen is not None:
                out.append(f"→{_show(chosen.get('text', ''))} ", Style(bold=True))
            others = [c for c in ev.candidates if c is not chosen]
            out.append(
                " ".join(f"{_show(c.get('text', ''))}:{float(c.get('score', 0.0)):.2f}" for c in others[:4]),
                Style(dim=True),
            )
            if i < len(events) - 1:
                out.append("\n")
        return out


def _show(text: str) -> str:
    return repr(text)[1:-1] if text.strip() != text or not text else text
