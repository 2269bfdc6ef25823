"""The help screen: every key the app answers to (after the user's keymap), what it does, and why an action is
unavailable where it is."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 84; max-width: 100%; height: auto; max-height: 100%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    HelpScreen Static { width: 100%; height: auto; }
    """

    BINDINGS = [Binding("escape,question_mark,q,f1", "dismiss", "Close", id="help_close")]

    def __init__(self, rows: list[tuple[str, str, str]], title: str = "SEDAC Chat keys") -> None:
        super().__init__()
        self.rows = rows
        self.title_text = title

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
        table.add_column("keys", style="bold", no_wrap=True)
        table.add_column("action")
        for keys, description, note in self.rows:
            desc = Text(description)
            if note:
                desc.append(f" ({note})", style="dim italic")
            table.add_row(keys, desc)
        with VerticalScroll() as scroll:
            scroll.border_title = self.title_text
            scroll.border_subtitle = "esc / ? close"
            yield Static(table)
