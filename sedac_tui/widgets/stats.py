"""The stats bar (model, mode, tau_low, tau_high, tok/s, skip ratio, average exit layer, session file) and the
replay bar (position, speed, paused, controls)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from .state import ViewState


class StatsBar(Widget):
    DEFAULT_CSS = """
    StatsBar { height: auto; padding: 0 1; }
    """

    def __init__(self, state: ViewState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.load_message = ""

    def render(self) -> Text:
        s = self.state
        key, val, sep = Style(dim=True), Style(bold=True), Text(" │ ", Style(dim=True))
        parts: list[Text] = []

        def item(label: str, value: str, value_style: Style = val) -> None:
            t = Text()
            t.append(label + " ", key)
            t.append(value, value_style)
            parts.append(t)

        if s.status == "loading":
            item("model", f"loading… {self.load_message}".strip(), Style(italic=True))
        elif s.status == "error" and not s.model:
            item("model", "failed to load", Style(bold=True, color="red"))
        else:
            item("model", f"{s.model or '?'} ({s.num_layers}L)" if s.num_layers else (s.model or "?"))
        pending = s.pending_settings()
        item("mode", s.running_label() + (f" → {pending} after this answer" if pending else ""))
        item("tau_low", f"{s.tau_low:.2f}")
        adaptive = s.threshold_source == "adaptive"
        item("tau_high", f"{s.tau_high:.2f}" + (" =P90" if adaptive else ""))
        if adaptive and s.percentiles:
            p = s.percentiles
            item("adaptive", f"P20 {p.get('p20', 0):.2f} P50 {p.get('p50', 0):.2f} over {int(p.get('n', 0))} tok")
        tps, skip, avg = s.tok_per_s, s.skip_ratio, s.avg_exit_layer
        item("tok/s", f"{tps:.1f}" if tps is not None else "–")
        item("skip", f"{skip:.0%}" if skip is not None else "–")
        item("avg exit", f"{avg:.1f}/{s.num_layers}" if avg is not None else "–")
        if s.status == "calibrating":
            item("re-calibrating", "prompts wait" if s.waiting_prompts else "…", Style(italic=True))
        if not s.status.startswith("replay"):
            item("session", s.session_file or "not recorded", Style() if s.session_file else Style(italic=True))
        return sep.join(parts)


class ReplayBar(Widget):
    DEFAULT_CSS = """
    ReplayBar { height: 1; padding: 0 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.position = 0
        self.total = 0
        self.tokens_shown = 0
        self.speed = 1.0
        self.paused = False
        self.finished = False
        self.file = ""

    def update_progress(self, *, position: int, total: int, tokens_shown: int, speed: float, paused: bool,
                        finished: bool) -> None:
        self.position, self.total, self.tokens_shown = position, total, tokens_shown
        self.speed, self.paused, self.finished = speed, paused, finished
        self.refresh()

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="ellipsis")
        state = "■ done" if self.finished else ("❚❚ paused" if self.paused else "▶ playing")
        out.append("REPLAY ", Style(bold=True, reverse=True))
        out.append(f" {state} ", Style(bold=True))
        width = 16
        frac = self.position / self.total if self.total else 1.0
        filled = int(round(frac * width))
        out.append("█" * filled + "░" * (width - filled))
        out.append(f" {self.position}/{self.total} events · {self.tokens_shown} tokens · {_speed(self.speed)}")
        out.append("   space pause · → step · +/- speed", Style(dim=True))
        if self.file:
            out.append(f" · {self.file}", Style(dim=True))
        return out


def _speed(speed: float) -> str:
    return "max speed" if speed == float("inf") else f"{speed:g}x"
