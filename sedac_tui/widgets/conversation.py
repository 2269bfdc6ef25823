"""The conversation: user messages, assistant answers streamed as Markdown while tokens arrive (then rendered
once in full so code fences come out right), notices and errors."""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from sedac_core.events import GenerationEnd


class UserBubble(Static):
    DEFAULT_CSS = """
    UserBubble {
        margin: 1 0 0 4; padding: 0 1; background: $boost; border-left: thick $primary;
    }
    """


class AssistantBubble(Markdown):
    DEFAULT_CSS = """
    AssistantBubble { margin: 1 0 0 0; padding: 0 1; border-left: thick $secondary; background: transparent; }
    AssistantBubble > MarkdownBlock:last-child { margin-bottom: 0; }
    """


class MessageFooter(Static):
    DEFAULT_CSS = """
    MessageFooter { color: $text-muted; padding: 0 1 0 2; }
    """


class NoticeLine(Static):
    DEFAULT_CSS = """
    NoticeLine { color: $text-muted; margin: 1 0 0 0; padding: 0 1; text-style: italic; }
    NoticeLine.-error { color: $text-error; background: $error-muted; text-style: bold; }
    """


class Conversation(VerticalScroll):
    """The scrolling transcript. All methods run on the UI loop."""

    DEFAULT_CSS = """
    Conversation { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._bubble: AssistantBubble | None = None
        self._stream: MarkdownStream | None = None
        self._streamed: list[str] = []

    def on_mount(self) -> None:
        self.anchor()

    async def add_user(self, text: str, *, pending: bool = False) -> UserBubble:
        bubble = UserBubble(Text(text), classes="-pending" if pending else None)
        await self.mount(bubble)
        return bubble

    async def add_notice(self, message: str, *, error: bool = False) -> NoticeLine:
        line = NoticeLine(Text(("error: " if error else "") + message), classes="-error" if error else None)
        await self.mount(line)
        return line

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    async def start_answer(self) -> None:
        await self.finish_answer(None)
        self._bubble = AssistantBubble("")
        self._streamed = []
        await self.mount(self._bubble)
        self._stream = Markdown.get_stream(self._bubble)

    async def append(self, fragment: str) -> None:
        if self._stream is None:
            await self.start_answer()
        assert self._stream is not None
        self._streamed.append(fragment)
        await self._stream.write(fragment)

    async def finish_answer(self, end: GenerationEnd | None, text: str | None = None) -> None:
        """Stop streaming and render the whole answer once (the streamed fragments, or `text` when given)."""
        if self._stream is None or self._bubble is None:
            return
        stream, bubble = self._stream, self._bubble
        self._stream = None
        self._bubble = None
        await stream.stop()
        full = text if text else "".join(self._streamed)
        await bubble.update(full)
        if end is not None:
            await self.mount(MessageFooter(Text(_summary(end))))

    @property
    def answer_text(self) -> str:
        return "".join(self._streamed)


def _summary(end: GenerationEnd) -> str:
    why = {"eos": "done", "max_tokens": "max tokens", "stop_string": "stop string"}.get(end.stop_reason,
                                                                                          end.stop_reason)
    parts = [f"{end.tokens} tokens", f"{end.tok_per_s:.1f} tok/s", f"skip {end.skip_ratio:.0%}",
             f"avg exit {end.avg_exit_layer:.1f}"]
    if end.o1_triggers:
        parts.append(f"O1×{end.o1_triggers}")
    if why:
        parts.append(why)
    return " · ".join(parts)
