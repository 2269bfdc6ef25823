"""SedacChatApp: the layout, the key bindings and the wiring of an event source (a live engine or a replayed session)
to the widgets; plus the entry points the CLI calls (run_chat, run_replay) and the theme files loader."""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from textual import events, on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.theme import BUILTIN_THEMES, Theme
from textual.widgets import Footer, Input

from sedac_core.config import SedacConfig
from sedac_core.errors import ConfigError, SedacError
from sedac_core.events import (
    ErrorEvent,
    Event,
    EventBus,
    GenerationEnd,
    GenerationStart,
    ModeChange,
    Notice,
    O1Event,
    SessionStart,
    ThresholdChange,
    TokenEvent,
    UserMessage,
)
from sedac_core.paths import bundled_dir
from sedac_core.session import Session, SessionRecorder, read_session

from .sources import LiveSource, ReplayProgress, ReplaySource, SourceFinished
from .widgets import (
    Conversation,
    EntropySparkline,
    ExitHeatmap,
    HelpScreen,
    O1List,
    ReplayBar,
    StatsBar,
    TokenInspector,
    ViewState,
)
from .widgets.colors import DEFAULTS as PANEL_COLOR_DEFAULTS

log = logging.getLogger(__name__)

DEFAULT_THEME = "sedac-dark"
THEMES_DIR = bundled_dir(__file__, "themes", "_themes", f"{DEFAULT_THEME}.yaml")
TEXT_RATE = 10  # streamed text: screen updates per second at most
PANEL_RATE = 4  # the panels and the stats bar: repaints per second at most while tokens stream
TAU_LOW_STEP = 0.1
TAU_HIGH_STEP = 0.25
THEME_SUFFIXES = (".yaml", ".yml")

EngineFactory = Callable[[EventBus, Callable[[str], None]], Any]


# --------------------------------------------------------------------------------------------------------------
# themes


def _user_themes_dir(config_dir: Path | None) -> Path:
    if config_dir is None:
        from sedac_core.paths import config_dir as default_config_dir

        config_dir = default_config_dir()
    return Path(config_dir) / "themes"


def load_theme_file(path: Path) -> Theme:
    """A theme file is YAML with Textual `Theme` fields (name, primary, background, ..., variables)."""
    import dataclasses

    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"theme file {path}: cannot read it ({exc.__class__.__name__}); fix or remove it") from None
    if not isinstance(data, dict) or "primary" not in data:
        raise ConfigError(f"theme file {path}: expected a mapping with at least 'primary' (and usually 'name')")
    known = {f.name for f in dataclasses.fields(Theme)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"theme file {path}: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    data.setdefault("name", path.stem)
    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"theme file {path}: 'variables' must map variable names to colours")
    data["variables"] = {str(k): str(v) for k, v in variables.items()}
    try:
        return Theme(**data)
    except TypeError as exc:
        raise ConfigError(f"theme file {path}: {exc}") from None


def load_themes(config_dir: Path | None = None) -> tuple[dict[str, Theme], dict[str, ConfigError]]:
    """The app's themes (themes/) then the user's ($XDG_CONFIG_HOME/sedac-chat/themes/, which may override them);
    broken files are returned as errors by file stem rather than stopping the app."""
    themes: dict[str, Theme] = {}
    errors: dict[str, ConfigError] = {}
    for folder in (THEMES_DIR, _user_themes_dir(config_dir)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix not in THEME_SUFFIXES:
                continue
            try:
                theme = load_theme_file(path)
            except ConfigError as exc:
                errors[path.stem] = exc
                continue
            themes[theme.name] = theme
    return themes, errors


def available_themes(config_dir: Path | None = None) -> list[str]:
    """SEDAC's themes and the user's first, then Textual's built-in ones."""
    themes, _ = load_themes(config_dir)
    return list(themes) + [name for name in BUILTIN_THEMES if name not in themes]


def resolve_theme(name: str | None, config_dir: Path | None = None) -> str:
    name = name or DEFAULT_THEME
    themes, errors = load_themes(config_dir)
    if name in themes or name in BUILTIN_THEMES:
        return name
    if name in errors:
        raise errors[name]
    if name == DEFAULT_THEME:  # the themes/ folder is missing (e.g. a non-editable install): don't refuse to start
        return "textual-dark"
    names = list(themes) + [n for n in BUILTIN_THEMES if n not in themes]
    raise ConfigError(f"unknown theme '{name}'; available themes: {', '.join(names)}")


# --------------------------------------------------------------------------------------------------------------
# messages from the worker threads


class EventsAvailable(Message):
    """Something is waiting in the app's inbox. Coalesces: one drain handles a whole burst of tokens."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsAvailable)


@dataclass(frozen=True)
class LoadProgress:
    text: str


@dataclass(frozen=True)
class ModelReady:
    engine: Any


@dataclass(frozen=True)
class ModelFailed:
    error: str


@dataclass(frozen=True)
class CalibrationFinished:
    error: str | None = None


# --------------------------------------------------------------------------------------------------------------
# bindings. The rule a person can rely on: typing always types. In live chat every printable key goes to the prompt,
# wherever the focus is; actions live on function keys, ctrl combinations and the palette (ctrl+p), so they work
# while typing and while an answer streams. Replay has no prompt, so there single keys act as well. Every action has
# an id: config tui.keymap remaps it.

THRESHOLDS = Binding.Group("thresholds")

BINDINGS: list[Binding] = [
    Binding("f1", "help", "Help", id="help"),
    Binding("escape", "cancel", "Stop", id="cancel"),
    Binding("f2", "inspector", "Inspect", id="inspector"),
    Binding("f3", "calibrate", "Re-calibrate", show=False, id="calibrate"),
    Binding("f4", "cycle_mode", "Mode", id="cycle_mode"),
    Binding("f5", "tau_low(-1)", "Lower tau_low", id="tau_low_down", group=Binding.Group("tau_low")),
    Binding("f6", "tau_low(1)", "Raise tau_low", id="tau_low_up", group=Binding.Group("tau_low")),
    Binding("f7", "tau_high(-1)", "Lower tau_high", id="tau_high_down", group=Binding.Group("tau_high")),
    Binding("f8", "tau_high(1)", "Raise tau_high", id="tau_high_up", group=Binding.Group("tau_high")),
    Binding("f9", "toggle_o1", "O1 reasoning", show=False, id="toggle_o1"),
    Binding("f10", "toggle_ghost_kv", "Ghost KV", show=False, id="toggle_ghost_kv"),
    Binding("ctrl+g", "resume_adaptive", "Resume adaptive thresholds", show=False, id="resume_adaptive"),
    Binding("f12", "toggle_panels", "Panels", show=False, id="toggle_panels"),
    Binding("ctrl+t", "cycle_theme", "Theme", show=False, id="cycle_theme"),
    Binding("ctrl+s", "save_theme", "Save theme to config", show=False, id="save_theme"),
    # replay only: there is no prompt, so single keys are free
    Binding("space", "replay_pause", "Pause", id="replay_pause"),
    Binding("right", "replay_step", "Step", id="replay_step"),
    Binding("plus,equals_sign", "replay_speed(1)", "Faster", show=False, id="replay_faster"),
    Binding("minus", "replay_speed(-1)", "Slower", show=False, id="replay_slower"),
    Binding("i", "replay_key('inspector')", "Inspect", show=False, id="replay_inspector"),
    Binding("p", "replay_key('toggle_panels')", "Panels", show=False, id="replay_panels"),
    Binding("t", "replay_key('cycle_theme')", "Theme", show=False, id="replay_theme"),
    Binding("question_mark", "replay_key('help')", "Help", show=False, id="replay_help"),
]
LIVE_ONLY = {"tau_low", "tau_high", "cycle_mode", "toggle_o1", "toggle_ghost_kv", "calibrate", "resume_adaptive"}
REPLAY_ONLY = {"replay_pause", "replay_step", "replay_speed", "replay_key"}
BINDING_IDS = [b.id for b in BINDINGS if b.id] + ["app.quit", "app.command_palette"]


def check_keymap(keymap: dict[str, str]) -> None:
    unknown = [k for k in keymap if k not in BINDING_IDS and k not in ("quit", "command_palette")]
    if unknown:
        raise ConfigError(f"tui.keymap: unknown binding id(s) {', '.join(unknown)}; known ids: {', '.join(BINDING_IDS)}")


class SedacChatApp(App[None]):
    """One app for both live chat (pass `engine_factory`) and replay (pass `session`)."""

    CSS_PATH = "app.tcss"
    TITLE = "SEDAC Chat"
    BINDINGS = BINDINGS  # type: ignore[assignment]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]

    def __init__(
        self,
        *,
        config: SedacConfig | None = None,
        engine_factory: EngineFactory | None = None,
        session: Session | None = None,
        speed: float = 1.0,
        replay_paused: bool = False,
        record_path: Path | None = None,
        theme: str | None = None,
        config_dir: Path | None = None,
        cursor_blink: bool = True,
        max_gap_s: float = 2.0,
    ) -> None:
        if (engine_factory is None) == (session is None):
            raise ValueError("pass exactly one of engine_factory (live chat) or session (replay)")
        self.config = config or SedacConfig()
        self._engine_factory = engine_factory
        self._session = session
        self._speed = speed
        self._replay_paused = replay_paused
        self._max_gap_s = max_gap_s
        self._record_path = record_path
        self._config_dir = config_dir
        self._cursor_blink = cursor_blink
        self.replay_mode = session is not None
        super().__init__()
        self._sedac_themes, self._theme_errors = load_themes(config_dir)
        for t in self._sedac_themes.values():
            self.register_theme(t)
        self.theme = resolve_theme(theme or self.config.tui.theme, config_dir)
        self.bus = EventBus()
        self.state = ViewState(tau_low=self.config.tau_low, tau_high=self.config.tau_high,
                               mode=self.config.sedac.mode,
                               enable_o1_reasoning=self.config.sedac.enable_o1_reasoning,
                               enable_ghost_kv=self.config.sedac.enable_ghost_kv)
        self.engine: Any = None
        self.live: LiveSource | None = None
        self.replay: ReplaySource | None = None
        self.recorder: SessionRecorder | None = None
        self.history: list[dict[str, str]] = []
        self.pending_prompts: list[str] = []
        self._unrecorded: list[Event] = []
        self._inbox: collections.deque[object] = collections.deque()
        self._unsubscribe = self.bus.subscribe(self._deliver)
        self._turn_ended = False
        self._unshown: list[str] = []  # streamed text not yet on screen (drawn at the next frame)
        self._panels_dirty = False
        self._draw_timer: Any = None
        self._last_draw = 0.0
        self._last_panels = 0.0
        self._panels: dict[str, Any] | None = None  # the widgets _refresh_panels repaints, found once
        self._o1_drawn: tuple | None = None
        self._loader: threading.Thread | None = None
        self._focus_before_inspector: Any = None
        self._main_screen: Screen | None = None
        if self.config.tui.keymap:
            check_keymap(self.config.tui.keymap)

    # -- layout -------------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield ReplayBar(id="replay-bar")
            yield StatsBar(self.state, id="stats")
        with Horizontal(id="body"):
            with Vertical(id="chat"):
                yield Conversation(id="conversation")
                with Container(id="inspector-box", classes="panel") as box:
                    box.border_title = "token inspector"
                    yield TokenInspector(self.state, id="inspector")
                prompt = Input(
                    placeholder="replay: input disabled" if self.replay_mode
                    else "Ask something… (Enter: send · Esc: stop · F1: keys)",
                    id="prompt",
                    disabled=self.replay_mode,
                    select_on_focus=False,  # focus comes back with a typed key: selecting would let it replace the text
                )
                prompt.cursor_blink = self._cursor_blink
                yield prompt
            with Vertical(id="panels"):
                with Container(id="spark-box", classes="panel") as box:
                    box.border_title = "entropy (bits) per token"
                    yield EntropySparkline(self.state, id="sparkline")
                with Container(id="heat-box", classes="panel") as box:
                    box.border_title = "exit layers"
                    box.border_subtitle = "◆ exit ░ skipped ✓/✗ draft"
                    yield ExitHeatmap(self.state, id="heatmap")
                with Container(id="o1-box", classes="panel") as box:
                    box.border_title = "O1 reasoning"
                    yield O1List(self.state, id="o1-list")
        yield Footer()

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(PANEL_COLOR_DEFAULTS)

    def on_mount(self) -> None:
        self._main_screen = self.screen
        if self.config.tui.keymap:
            self.set_keymap(dict(self.config.tui.keymap))
        for name, error in self._theme_errors.items():
            self.notify(str(error), title=f"theme {name} skipped", severity="warning")
        if self.replay_mode:
            self.screen.add_class("-replay")
            self.sub_title = "replay"
            self._start_replay()
        else:
            self.query_one("#prompt", Input).focus()
            self._start_loading()

    # -- a crash: one line and a non-zero exit, never a screenful of traceback ---------------------------------
    crash: str | None = None  # "Type: message" of the error that stopped the app
    crash_log: Path | None = None  # where its full traceback was written

    def _handle_exception(self, error: Exception) -> None:
        """Textual's hook for an unhandled exception (it then exits). Keep the traceback in a file and the one line
        for the CLI (run_chat / run_replay raise AppCrashed with it after the app has closed)."""
        if self.crash is None:
            self.crash = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
            self.crash_log = _write_crash_log(error)
        super()._handle_exception(error)

    def _print_error_renderables(self) -> None:
        if self.crash is not None:  # the CLI prints the one line instead of Textual's traceback
            self._exit_renderables.clear()
            return
        super()._print_error_renderables()

    async def on_unmount(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop worker threads and close the recording (safe to call twice)."""
        if self.live is not None:
            self.live.close()
        if self.replay is not None:
            self.replay.close()
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        self._unsubscribe()

    # -- the inbox: every thread hands its events/messages here, the UI drains it ----------------------------------
    def _deliver(self, item: object) -> None:
        """Thread-safe: queue the item and wake the UI (bursts collapse into one EventsAvailable)."""
        self._inbox.append(item)
        self.post_message(EventsAvailable())

    async def on_events_available(self, _message: EventsAvailable) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, TokenEvent):  # the hot path: state now, screen at the next frame
                self.state.apply(item)
                if item.text:
                    self._unshown.append(item.text)
                self._panels_dirty = True
                continue
            if isinstance(item, (GenerationStart, GenerationEnd, ErrorEvent, Notice, UserMessage, SourceFinished)):
                await self._draw_pending(force=True)  # what streamed so far goes on screen before the transcript
            self._panels_dirty |= await self._handle(item)
        self._schedule_draw()

    def _schedule_draw(self) -> None:
        """Streamed text goes on screen at most TEXT_RATE times a second and the panels at most PANEL_RATE times:
        the first change after a quiet spell at once, the rest of a burst when its frame is due. Drawn per token,
        the panels and the transcript took more of the two cores than decoding did (and, in one process, the
        interpreter lock from the decoding thread)."""
        if self._draw_timer is not None:
            return
        due = []
        if self._unshown:
            due.append(self._last_draw + 1.0 / TEXT_RATE)
        if self._panels_dirty:
            due.append(self._last_panels + 1.0 / PANEL_RATE)
        if due:
            delay = max(0.001, min(due) - time.monotonic())  # (a 0 s timer divides by 0)
            self._draw_timer = self.set_timer(delay, self._draw_pending)

    @property
    def drawn(self) -> bool:
        """Whether everything that arrived is on screen (no frame pending)."""
        return not self._inbox and not self._unshown and not self._panels_dirty and self._draw_timer is None

    async def _draw_pending(self, force: bool = False) -> None:
        if self._draw_timer is not None:
            self._draw_timer.stop()
            self._draw_timer = None
        if not self.query("#conversation"):  # shutting down: the widgets are gone
            return
        now = time.monotonic()
        if self._unshown:
            self._last_draw = now
            text = "".join(self._unshown)
            self._unshown.clear()
            await self.query_one(Conversation).append(text)
        if self._panels_dirty and (force or now - self._last_panels >= 1.0 / PANEL_RATE - 0.002):
            self._panels_dirty = False
            self._last_panels = now
            self._refresh_panels()
        self._schedule_draw()

    async def _handle(self, item: object) -> bool:
        conversation = self.query_one(Conversation)
        if isinstance(item, Event):
            if isinstance(item, UserMessage):
                await conversation.add_user(item.text)
                return False
            self.state.apply(item)
            if isinstance(item, SessionStart):
                return True
            if isinstance(item, GenerationStart):
                self.state.status = "generating" if not self.replay_mode else "replay"
                self._turn_ended = False
                await conversation.start_answer()
            elif isinstance(item, TokenEvent):
                await conversation.append(item.text)
            elif isinstance(item, GenerationEnd):
                text = item.text or conversation.answer_text
                await conversation.finish_answer(item, item.text or None)
                if not self.replay_mode:
                    self.history.append({"role": "assistant", "content": text})
                    self._turn_ended = True
            elif isinstance(item, ErrorEvent):
                await conversation.finish_answer(None)
                await conversation.add_notice(item.message, error=True)
            elif isinstance(item, Notice):
                await conversation.add_notice(item.message)
            elif isinstance(item, (ThresholdChange, ModeChange, O1Event)):
                pass
            return True
        if isinstance(item, SourceFinished):
            return await self._finished(item)
        if isinstance(item, ReplayProgress):
            self.query_one(ReplayBar).update_progress(
                position=item.position, total=item.total, tokens_shown=item.tokens_shown, speed=item.speed,
                paused=item.paused, finished=item.finished)
            return False
        if isinstance(item, LoadProgress):
            stats = self.query_one(StatsBar)
            stats.load_message = item.text
            stats.refresh()
            return False
        if isinstance(item, ModelReady):
            await self._model_ready(item.engine)
            return True
        if isinstance(item, CalibrationFinished):
            self.state.status = "ready"
            if item.error is None:
                self.notify(f"re-calibrated: tau_low {self.state.tau_low:.2f}, tau_high {self.state.tau_high:.2f}")
            self._send_next()
            return True
        if isinstance(item, ModelFailed):
            self.state.status = "error"
            await conversation.add_notice(f"the model failed to load: {item.error}", error=True)
            if self.pending_prompts:
                await conversation.add_notice(f"{len(self.pending_prompts)} waiting prompt(s) cannot be answered")
            return True
        return False

    async def _finished(self, item: SourceFinished) -> bool:
        conversation = self.query_one(Conversation)
        if item.kind == "replay":
            self.state.status = "replay-done"
            await conversation.add_notice(self._replay_summary())
            return True
        if conversation.streaming:  # cancelled or failed before generation_end
            await conversation.finish_answer(None)
        if not self._turn_ended and self.history and self.history[-1]["role"] == "user":
            if item.error is not None:
                self.history.pop()  # the turn failed: don't send it again with the next prompt
        self.state.status = "ready"
        self.state.running = None
        self._send_next()
        return True

    def _refresh_panels(self) -> None:
        """Repaint what the state may have changed: the stats and the two charts always, the inspector while it is
        open, the O1 list when its events or threshold moved."""
        if self._panels is None:
            found = {w.id: w for w in self.query("#stats, #sparkline, #heatmap, #o1-list, #inspector")}
            if len(found) < 5:  # (shutting down)
                return
            self._panels = found
        p = self._panels
        for name in ("stats", "sparkline", "heatmap"):
            p[name].refresh()
        if self.screen.has_class("-inspecting") or self._main_screen_inspecting():
            p["inspector"].refresh()
        o1_key = (len(self.state.o1_events), self.state.tau_high, self.state.enable_o1_reasoning, self.theme)
        if o1_key != self._o1_drawn:
            self._o1_drawn = o1_key
            p["o1-list"].refresh()

    def _main_screen_inspecting(self) -> bool:
        return self._main_screen is not None and self._main_screen.has_class("-inspecting")

    # -- live: loading, sending, recording ---------------------------------------------------------------------
    def _start_loading(self) -> None:
        assert self._engine_factory is not None
        self.state.status = "loading"
        factory = self._engine_factory

        def load() -> None:
            try:
                engine = factory(self.bus, lambda text: self._deliver(LoadProgress(str(text))))
            except SedacError as exc:
                self._deliver(ModelFailed(str(exc)))
            except Exception as exc:  # show anything, keep the app alive
                log.exception("model load failed")
                self._deliver(ModelFailed(f"{type(exc).__name__}: {exc}"))
            else:
                self._deliver(ModelReady(engine))

        self._loader = threading.Thread(target=load, name="sedac-load-model", daemon=True)
        self._loader.start()

    async def _model_ready(self, engine: Any) -> None:
        self.engine = engine
        self.live = LiveSource(engine, self._deliver)
        header = engine.session_header()
        self.state.apply_header(header)
        self.state.mode = engine.mode
        self.state.tau_low, self.state.tau_high = engine.tau_low, engine.tau_high
        self.state.num_layers = engine.num_layers
        self.state.status = "ready"
        self._open_recorder(header)
        self._send_next()

    def _open_recorder(self, header: SessionStart) -> None:
        if self._record_path is None:
            self.state.session_file = None
            return
        try:
            self.recorder = SessionRecorder(self._record_path, header)
        except SedacError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            self.call_later(self.query_one(Conversation).add_notice, f"not recording: {exc}", error=True)
            return
        for event in self._unrecorded:  # messages typed while the model loaded
            self.recorder.write(event)
        self._unrecorded.clear()
        self.recorder.attach(self.bus)
        self.state.session_file = _display_path(self._record_path)

    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.clear()
        if not text or self.replay_mode:
            return
        message = UserMessage(text=text, time=_now())
        if self.recorder is None and self._record_path is not None:
            self._unrecorded.append(message)
        self.bus.publish(message)
        self.pending_prompts.append(text)
        self.state.waiting_prompts = len(self.pending_prompts)
        if self.live is None:
            if self.state.status == "error":
                self.notify("the model failed to load; this prompt cannot be answered", severity="error")
            else:
                self.notify("the model is still loading; your prompt will be sent once it is ready")
            return
        self._send_next()

    def _send_next(self) -> None:
        if self.live is None or self.live.busy or not self.pending_prompts or self.state.status == "calibrating":
            return
        text = self.pending_prompts.pop(0)
        self.state.waiting_prompts = len(self.pending_prompts)
        self.history.append({"role": "user", "content": text})
        self._turn_ended = False
        gen = self.config.generation
        from sedac_core.engine import GenerationRequest

        request = GenerationRequest(messages=list(self.history), system=gen.system_prompt,
                                    max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                    top_p=gen.top_p, seed=gen.seed)
        self.state.status = "generating"
        self.live.start(request)

    # -- actions ------------------------------------------------------------------------------------------------
    def on_key(self, event: events.Key) -> None:
        """Typing always types: a printable key that reached the app (the focus is outside the prompt, and nothing
        there used the key) goes to the prompt, and the focus with it."""
        if self.replay_mode or not event.is_printable or event.character is None:
            return
        if self.screen is not self._main_screen:  # an overlay (help, palette) keeps its own keys
            return
        prompt = self.query_one("#prompt", Input)
        if prompt.disabled:
            return
        event.stop()
        event.prevent_default()
        prompt.focus()
        prompt.insert_text_at_cursor(event.character)

    def action_replay_key(self, action: str) -> None:
        self.run_action(action)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in LIVE_ONLY and self.replay_mode:
            return False
        if action in REPLAY_ONLY and not self.replay_mode:
            return False
        if action == "cancel" and self.replay_mode and not self.screen.has_class("-inspecting"):
            return False
        return True

    def _need_engine(self) -> bool:
        if self.live is None:
            self.notify("the model is still loading" if self.state.status != "error" else "no model is loaded",
                        severity="warning")
            return False
        return True

    def _control(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except SedacError as exc:
            self.notify(str(exc), severity="warning")

    def action_tau_low(self, direction: int) -> None:
        if self._need_engine():
            assert self.live is not None
            value = round(self.engine.tau_low + direction * TAU_LOW_STEP, 4)
            self._control(lambda: self.live.set_thresholds(tau_low=value))  # type: ignore[union-attr]

    def action_tau_high(self, direction: int) -> None:
        if self._need_engine():
            assert self.live is not None
            value = round(self.engine.tau_high + direction * TAU_HIGH_STEP, 4)
            self._control(lambda: self.live.set_thresholds(tau_high=value))  # type: ignore[union-attr]

    def action_cycle_mode(self) -> None:
        if not self._need_engine():
            return
        modes = tuple(self.engine.available_modes)
        if len(modes) <= 1:
            self.notify(f"only the '{self.engine.mode}' mode is available with this engine", severity="warning")
            return
        current = self.engine.mode
        nxt = modes[(modes.index(current) + 1) % len(modes)] if current in modes else modes[0]
        self._control(lambda: self.live.set_mode(nxt))  # type: ignore[union-attr]

    def feature_unavailable(self, feature: str) -> str | None:
        """Why a feature toggle cannot work now, or None when it can."""
        if self.replay_mode:
            return "replay: the recorded session decides"
        if self.engine is None:
            return "the model is still loading"
        features = getattr(self.engine, "features", None) or {}
        if not features.get(feature, False):
            return "not implemented by this engine yet"
        return None

    def _toggle(self, feature: str, label: str) -> None:
        why = self.feature_unavailable(feature)
        if why is not None:
            self.notify(f"{label} is unavailable: {why}", severity="warning")
            return
        if feature == "o1":
            value = not self.state.enable_o1_reasoning
            self._control(lambda: self.live.set_features(o1=value))  # type: ignore[union-attr]
        else:
            value = not self.state.enable_ghost_kv
            self._control(lambda: self.live.set_features(ghost_kv=value))  # type: ignore[union-attr]

    def action_toggle_o1(self) -> None:
        self._toggle("o1", "O1 reasoning")

    def action_toggle_ghost_kv(self) -> None:
        self._toggle("ghost_kv", "Ghost KV")

    def adaptive_unavailable(self) -> str | None:
        """Why the adaptive thresholds cannot be resumed now, or None when they can (or already run)."""
        if self.replay_mode:
            return "replay: the recorded session decides"
        if self.engine is None:
            return "the model is still loading"
        if not callable(getattr(self.engine, "set_adaptive", None)):
            return "not implemented by this engine yet"
        if getattr(self.engine, "adaptive_paused", None) is None:
            return "off in the config (sedac.adaptive_threshold)"
        return None

    def action_resume_adaptive(self) -> None:
        """After a threshold set by hand (which pauses adaptation): let tau_high follow the session's P90 again."""
        why = self.adaptive_unavailable()
        if why is not None:
            self.notify(f"adaptive thresholds are unavailable: {why}", severity="warning")
            return
        if self.engine.adaptive_paused is False:
            self.notify("adaptive thresholds are already on")
            return
        self._control(lambda: self.live.resume_adaptive())  # type: ignore[union-attr]
        if getattr(self.engine, "adaptive_moves_tau_low", False):
            self.notify("adaptive thresholds resumed: tau_high follows this session's P90 and tau_low its P50 "
                        "again (every 32 tokens)")
        else:
            self.notify(f"adaptive thresholds resumed: tau_high follows this session's P90 again (every 32 tokens); "
                        f"tau_low stays at {self.engine.tau_low:.2f}, where it was set")

    def calibrate_unavailable(self) -> str | None:
        if self.engine is None:
            return "the model is still loading"
        if not callable(getattr(self.engine, "recalibrate", None)):
            return "auto-calibration has not landed in this engine yet"
        return None

    def action_calibrate(self) -> None:
        why = self.calibrate_unavailable()
        if why is not None:
            self.notify(f"re-calibration is unavailable: {why}", severity="warning")
            return
        if self.live is not None and self.live.busy:
            self.notify("wait for the generation to finish before re-calibrating", severity="warning")
            return
        if self.state.status == "calibrating":
            self.notify("re-calibration is already running")
            return
        engine = self.engine

        def run() -> None:
            error = None
            try:
                engine.recalibrate()
            except Exception as exc:  # noqa: BLE001 - shown in the conversation; the chat goes on
                error = f"re-calibration failed: {exc}"
                self.bus.publish(ErrorEvent(message=error, where="calibration", time=_now()))
            self._deliver(CalibrationFinished(error))

        # prompts sent meanwhile wait (the engine would hold them anyway, and the app would look stuck generating)
        self.state.status = "calibrating"
        self._refresh_panels()
        threading.Thread(target=run, name="sedac-calibrate", daemon=True).start()
        self.notify("re-calibrating thresholds on this session's data… prompts you send meanwhile wait")

    def theme_cycle(self) -> list[str]:
        return list(self._sedac_themes) or [DEFAULT_THEME]

    def action_cycle_theme(self) -> None:
        names = self.theme_cycle()
        nxt = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
        self.theme = nxt
        self._refresh_panels()

    def user_config_path(self) -> Path:
        if self._config_dir is not None:
            return Path(self._config_dir) / "config.yaml"
        from sedac_core.paths import config_dir

        return config_dir() / "config.yaml"

    def action_save_theme(self) -> None:
        """Make the current theme the default: tui.theme in the user's config.yaml (created if missing)."""
        path = self.user_config_path()
        try:
            saved = SedacConfig.load(path) if path.is_file() else SedacConfig()
            saved.tui.theme = self.theme
            saved.save(path)
        except (SedacError, OSError) as exc:
            self.notify(f"could not save the theme: {exc}", severity="error")
            return
        self.config.tui.theme = self.theme
        self.notify(f"theme '{self.theme}' saved to {_display_path(path)}")

    def action_inspector(self) -> None:
        """Open the inspector (the focus moves into it), focus it again if typing took the focus away, or close it
        (the focus goes back where it was before it opened)."""
        screen = self.screen
        inspector = self.query_one(TokenInspector)
        if screen.has_class("-inspecting") and self.focused is not inspector and not self.replay_mode:
            inspector.focus()
            return
        if screen.has_class("-inspecting"):
            screen.remove_class("-inspecting")
            self.state.selected = None
            back = self._focus_before_inspector
            self._focus_before_inspector = None
            if back is not None and back.is_attached and back.focusable:
                back.focus()
            else:
                self.set_focus(None)
        else:
            self._focus_before_inspector = self.focused
            screen.add_class("-inspecting")
            if self.state.tokens:
                self.state.selected = len(self.state.tokens) - 1
            inspector.focus()
        self.refresh_bindings()
        self._refresh_panels()

    @on(TokenInspector.Moved)
    def _inspector_moved(self) -> None:
        self._refresh_panels()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_rows()))

    def action_cancel(self) -> None:
        if self.live is not None and self.live.cancel():
            self.notify("stopping at the next token…", timeout=2)
            return
        if self.screen.has_class("-inspecting"):
            if self.focused is not self.query_one(TokenInspector):
                self.query_one(TokenInspector).focus()
            self.action_inspector()

    def action_toggle_panels(self) -> None:
        self.screen.toggle_class("-no-panels")

    def action_replay_pause(self) -> None:
        if self.replay is not None:
            self.replay.toggle_pause()

    def action_replay_step(self) -> None:
        if self.replay is not None:
            self.replay.step()

    def action_replay_speed(self, direction: int) -> None:
        if self.replay is not None:
            self.replay.faster() if direction > 0 else self.replay.slower()

    # -- help and palette ---------------------------------------------------------------------------------------
    def _keys_for(self, binding: Binding) -> str:
        keys = self._keymap.get(binding.id, binding.key) if binding.id else binding.key
        return ", ".join(self.get_key_display(Binding(k.strip(), "")) for k in keys.split(","))

    def _unavailable_note(self, action: str) -> str:
        name = action.split("(")[0]
        if name in LIVE_ONLY and self.replay_mode:
            return "live chat only"
        if name in REPLAY_ONLY and not self.replay_mode:
            return "replay only"
        if name == "toggle_o1":
            return self.feature_unavailable("o1") or ""
        if name == "toggle_ghost_kv":
            return self.feature_unavailable("ghost_kv") or ""
        if name == "calibrate":
            return self.calibrate_unavailable() or ""
        if name == "resume_adaptive":
            return self.adaptive_unavailable() or ""
        if name == "cycle_mode" and self.engine is not None and len(tuple(self.engine.available_modes)) <= 1:
            return f"only '{self.engine.mode}' available"
        return ""

    def help_rows(self) -> list[tuple[str, str, str]]:
        rows = []
        if self.replay_mode:
            rows.append(("", "Replay: no prompt, so single keys act too", ""))
        else:
            rows.append(("", "Typing always types: every printable key goes to the prompt, wherever the focus is. "
                             "Actions are on function keys and ctrl, and all of them are in the palette (ctrl+p).", ""))
        for b in BINDINGS:
            note = self._unavailable_note(b.action)
            if note in ("live chat only", "replay only"):
                continue
            rows.append((self._keys_for(b), b.description, note))
        rows.append(("ctrl+p", "Command palette (every action)", ""))
        rows.append(("ctrl+q", "Quit", ""))
        rows.append(("←/→ home/end", "In the inspector: move along the tokens (Esc or F2 closes it)", ""))
        if not self.replay_mode:
            rows.append(("Enter", "Send the prompt (sent while an answer streams, it waits its turn)", ""))
        return rows

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in BINDINGS:
            note = self._unavailable_note(binding.action)
            if note in ("live chat only", "replay only"):
                continue
            help_text = f"keys: {self._keys_for(binding)}" + (f" · unavailable: {note}" if note else "")
            yield SystemCommand(binding.description, help_text,
                                lambda action=binding.action: self.call_later(self.run_action, action))

    # -- replay -------------------------------------------------------------------------------------------------
    def _start_replay(self) -> None:
        assert self._session is not None
        self.state.status = "replay"
        bar = self.query_one(ReplayBar)
        bar.file = self._session.path.name if self._session.path else ""
        self.replay = ReplaySource(self._session, self.bus, self._deliver, speed=self._speed,
                                   paused=self._replay_paused, max_gap_s=self._max_gap_s)
        self.replay.start()

    def _replay_summary(self) -> str:
        s = self.state
        gens = s.generations
        parts = [f"replay finished: {gens} generation{'s' if gens != 1 else ''}", f"{len(s.tokens)} tokens"]
        if s.tokens:
            parts.append(f"avg exit layer {sum(t.exit_layer for t in s.tokens) / len(s.tokens):.1f}/{s.num_layers}")
        if s.o1_events:
            parts.append(f"O1×{len(s.o1_events)}")
        if s.last_end is not None:
            parts.append(f"last {s.last_end.tok_per_s:.1f} tok/s")
        return " · ".join(parts)


def _now() -> float:
    import time

    return time.time()


def _display_path(path: Path | str | None) -> str:
    if path is None:
        return ""
    p = Path(path)
    try:
        return "~/" + str(p.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(p)


def _write_crash_log(error: BaseException) -> Path | None:
    import traceback

    from sedac_core.paths import cache_dir

    try:
        path = cache_dir() / "crash.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        path.write_text(f"sedac-chat crashed at {stamp}\n{text}", encoding="utf-8")
        return path
    except OSError:
        return None


def _raise_if_crashed(app: SedacChatApp, session_file: Path | None) -> None:
    from sedac_core.errors import AppCrashed

    if app.crash is None:
        return
    details = f"; the traceback is in {_display_path(app.crash_log)}" if app.crash_log else ""
    kept = f"; the session so far is in {_display_path(session_file)}" if session_file is not None else ""
    raise AppCrashed(f"the app stopped on an unexpected error ({app.crash}){details}{kept}; please report it")


def default_record_path() -> Path:
    from sedac_core.paths import sessions_dir

    folder = sessions_dir()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stamp}.jsonl"
    n = 1
    while path.exists():
        path = folder / f"{stamp}-{n}.jsonl"
        n += 1
    return path


def check_recordable(path: Path) -> None:
    """Fail before the UI opens when a recording could not be written (the recorder opens only once the model has
    loaded, because the header names the model)."""
    import os

    from sedac_core.errors import SessionFileError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SessionFileError(
            f"cannot record to {path}: {exc.strerror}; choose a writable path with --record or pass --no-record"
        ) from None
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SessionFileError(f"cannot record to {path}: not writable; choose a writable path with --record "
                               "or pass --no-record")


# --------------------------------------------------------------------------------------------------------------
# entry points for the CLI


def engine_factory_for(model: str | None, local: bool, config: SedacConfig) -> EngineFactory:
    def factory(bus: EventBus, progress: Callable[[str], None]) -> Any:
        from sedac_core.engine import SedacEngine
        from sedac_core.models import load_model

        bundle = load_model(model if model is not None else config.model.model_name,
                            local=local or config.model.local, device=config.model.device,
                            dtype=config.model.dtype, progress=progress)
        progress("preparing the engine…")
        return SedacEngine(bundle, config, bus)

    return factory


def run_chat(*, model: str | None, local: bool, config: SedacConfig, record: Path | None, no_record: bool,
             theme: str | None) -> None:
    """Open the chat app at once; the model loads in the background."""
    theme_name = resolve_theme(theme or config.tui.theme)
    check_keymap(config.tui.keymap)
    record_path = None if no_record else (Path(record) if record is not None else default_record_path())
    if record_path is not None:
        check_recordable(record_path)
    app = SedacChatApp(config=config, engine_factory=engine_factory_for(model, local, config),
                       record_path=record_path, theme=theme_name)
    app.run()
    _raise_if_crashed(app, record_path if app.state.session_file else None)


def run_replay(path: Path, *, speed: float, theme: str | None, config: SedacConfig) -> None:
    """Replay a recorded session. A missing or malformed file raises SessionFileError before any UI opens."""
    session = read_session(path)
    theme_name = resolve_theme(theme or config.tui.theme)
    check_keymap(config.tui.keymap)
    app = SedacChatApp(config=config, session=session, speed=speed, theme=theme_name)
    app.run()
    _raise_if_crashed(app, None)
