"""Theme-driven colours for the panels: entropy bands (easy / medium / hard) and the cell kinds of the heatmap.
Each theme may override the `sedac-*` variables; the defaults below fill in for themes that do not."""

from __future__ import annotations

import math
from typing import Mapping

from rich.style import Style
from textual.color import Color

DEFAULTS: dict[str, str] = {
    "sedac-easy": "#4EBF71",
    "sedac-mid": "#E5C07B",
    "sedac-hard": "#E06C75",
    "sedac-computed": "#5C6370",
    "sedac-skip": "#2C313A",
    "sedac-o1": "#C678DD",
    "sedac-exit": "#FFFFFF",
    "sedac-accepted": "#4EBF71",
    "sedac-rejected": "#E06C75",
    "sedac-select": "#61AFEF",
    "sedac-tau-low": "#4EBF71",
    "sedac-tau-high": "#E06C75",
}


class Palette:
    """Resolved colours of the current theme, with the entropy colour scale."""

    def __init__(self, variables: Mapping[str, str] | None) -> None:
        variables = variables or {}
        self._colors: dict[str, Color] = {}
        for name, default in DEFAULTS.items():
            self._colors[name] = _parse(variables.get(name), default)
        self._hex = {name: color.hex for name, color in self._colors.items()}
        self.foreground = _parse(variables.get("foreground"), "#E0E0E0")
        self.background = _parse(variables.get("background"), "#121212")

    def color(self, name: str) -> Color:
        return self._colors[name]

    def hex(self, name: str) -> str:
        return self._hex[name]

    def style(self, name: str, **kwargs: object) -> Style:
        return Style(color=self._colors[name].rich_color, **kwargs)  # type: ignore[arg-type]

    def entropy_color(self, entropy_bits: float | None, tau_low: float, tau_high: float) -> Color:
        """Easy below tau_low, hard at or above tau_high, a blend through the medium colour in between; an entropy
        that was not computed (None, or a non-finite value from an old file) gets the plain 'computed' colour."""
        easy, mid, hard = self._colors["sedac-easy"], self._colors["sedac-mid"], self._colors["sedac-hard"]
        if entropy_bits is None or not math.isfinite(entropy_bits):
            return self._colors["sedac-computed"]
        if not (math.isfinite(tau_low) and math.isfinite(tau_high)):
            return mid
        if entropy_bits <= tau_low:
            return easy
        if entropy_bits >= tau_high or tau_high <= tau_low:
            return hard
        t = (entropy_bits - tau_low) / (tau_high - tau_low)
        return easy.blend(mid, t * 2) if t < 0.5 else mid.blend(hard, (t - 0.5) * 2)


def _parse(value: str | None, default: str) -> Color:
    for candidate in (value, default):
        if not candidate:
            continue
        try:
            return Color.parse(candidate)
        except Exception:  # a theme variable may be a CSS expression Color cannot parse; fall back
            continue
    return Color.parse(default)


_PALETTES: dict[tuple, Palette] = {}


def palette_for(variables: Mapping[str, str] | None) -> Palette:
    """The Palette of a theme's variables, built once per distinct set (the panels ask on every repaint)."""
    key = tuple(sorted((variables or {}).items()))
    palette = _PALETTES.get(key)
    if palette is None:
        if len(_PALETTES) > 32:
            _PALETTES.clear()
        palette = _PALETTES[key] = Palette(variables)
    return palette


def widget_palette(widget: object) -> Palette:
    """The palette of the app a widget is mounted in; the defaults for one rendered on its own (tests, exports)."""
    from textual._context import NoActiveAppError

    try:
        variables = widget.app.theme_variables  # type: ignore[attr-defined]
    except NoActiveAppError:
        variables = None
    return palette_for(variables)
