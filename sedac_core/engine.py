"""SedacEngine: the decode loop. It drives the model one decoder layer at a time over a static KV cache (never
through `model.generate`), so that modes can exit, skip and verify per layer, and it reports every decision as
events. This file holds the full-depth mode; the other modes plug into the same loop."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .anatomy import Anatomy, apply_rope
from .cache import FILL_GHOST, FILL_PROPAGATED, StaticKVCache
from .calibration import AdaptiveThresholds
from .config import AUTO_MODE, MODES, SedacConfig
from .entropy import entropy_bits, set_backend, token_stats
from .kernels import select_kernels
from .errors import ConfigError, PromptTooLongError, SedacError
from .events import (
    Event,
    EventBus,
    GenerationEnd,
    GenerationStart,
    ModeChange,
    Notice,
    SessionStart,
    ThresholdChange,
    TokenEvent,
)
from .exits import ExitHeads, ProfileError, find_profile, shipped_profile_dir, user_profile_dir
from .ghost_kv import GhostKV
from .matmul import matmul_linear
from .models import ModelBundle
from .policy import EXIT, ExitPolicy
from .reasoning import Reasoner
from .speculative import Block, Drafter, accept_sampled

TAU_GAP = 0.05  # tau_low stays at least this far below tau_high
TAU_MAX = 20.0
MANUAL_SOURCES = ("user", "api")  # threshold changes that pause adaptation: a person's choice wins
TOP_K_SHOWN = 5
MAX_PENDING = 8  # deferred KV fill: exited rows that may wait for their upper layers (one pass takes up to 16 rows)


@dataclass
class GenerationRequest:
    prompt: str | None = None  # one user message (formatted with the chat template)
    messages: list[dict[str, str]] | None = None  # or a whole conversation
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    mode: str | None = None  # None: the engine's current mode
    trace: bool = False  # entropy at every layer (a full LM head per layer: slow)
    raw_prompt: bool = False  # `prompt` is plain text to continue: no chat template (text completions)
    forced_tokens: list[int] | None = None  # teacher forcing (bench agreement): feed these, report own choices
    ignore_eos: bool = False  # never choose EOS: exactly max_new_tokens (benchmarks, parity tests)
    o1: bool | None = None  # O1 deep reasoning for this request; None: the engine's setting

    def conversation(self) -> list[dict[str, str]]:
        if self.messages:
            msgs = [dict(m) for m in self.messages]
        elif self.prompt is not None:
            msgs = [{"role": "user", "content": self.prompt}]
        else:
            raise SedacError("nothing to generate from: give a prompt or messages")
        if self.system is not None and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": self.system})
        return msgs

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature is {self.temperature}; it must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p is {self.top_p}; it must be in (0, 1]")


@dataclass
class GenerationResult:
    generated_text: str
    tokens: int
    token_ids: list[int]
    tok_per_s: float
    skip_ratio: float
    avg_exit_layer: float
    mode: str
    stop_reason: str
    elapsed_s: float
    prompt_tokens: int
    events: list[Event] = field(default_factory=list)

    @property
    def token_events(self) -> list[TokenEvent]:
        """The output tokens (lossless mode's rejected drafts are events too, but not output)."""
        return [e for e in self.events if isinstance(e, TokenEvent) and e.draft != "rejected"]

    def to_json(self) -> dict:
        return {
            "generated_text": self.generated_text,
            "tokens": self.tokens,
            "tok_per_s": round(self.tok_per_s, 3),
            "skip_ratio": round(self.skip_ratio, 4),
            "avg_exit_layer": round(self.avg_exit_layer, 3),
            "mode": self.mode,
            "stop_reason": self.stop_reason,
            "elapsed_s": round(self.elapsed_s, 4),
            "prompt_tokens": self.prompt_tokens,
        }


class _TextStream:
    """Incremental detokenisation: the text each new token adds, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        if text.startswith(self.text):
            delta = text[len(self.text):]
        else:  # a tokenizer that rewrote earlier text (rare): send the difference from the common prefix
            common = 0
            while common < min(len(text), len(self.text)) and text[common] == self.text[common]:
                common += 1
            delta = text[common:]
        self.text = text
        return delta


class SedacEngine:
    def __init__(self, bundle: ModelBundle, config: SedacConfig | None = None, bus: EventBus | None = None) -> None:
        self.bundle = bundle
        self.config = config or SedacConfig()
        self.bus = bus or EventBus()
        self.anatomy = Anatomy(bundle.model)
        self.num_layers = self.anatomy.num_layers
        self.device = bundle.device
        self.dtype = bundle.dtype
        # held for a whole generation, and by whatever swaps what a generation reads (exit heads, Ghost KV,
        # calibration): a swap waits for the generation boundary. Re-entrant: recalibrate holds it across its
        # measurement and the swap.
        self._lock = threading.RLock()
        self._settings_lock = threading.Lock()
        self._tau_low = self.config.tau_low
        self._tau_high = self.config.tau_high
        self._tau_floor = self.config.sedac.entropy_threshold_min  # calibration may lower it
        self._mode = self.config.sedac.mode
        self._generation_id = 0
        self._cache: StaticKVCache | None = None
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._eos = bundle.eos_token_ids
        set_backend(self.config.performance.kernel_backend)  # the fused statistics kernel (or torch), per config
        self._select_matmul()  # starts the skinny-matmul kernel's build in the background (first start only)
        self._seen_prompts: list[str] = []  # this session's user messages (re-calibration data)
        self.exit_heads: ExitHeads | None = None
        self._decision_head: Any = None  # speculative.ReducedHead when the calibration's exit signal is "reduced"
        self._check_layers: frozenset[int] = frozenset()
        self._gate_margins: dict[int, float] = {}  # checked layer -> the calibrated gate margin (bits)
        self.exit_gate = bool(self.config.sedac.exit_gate)  # use the gate (where calibration gave margins)
        # exit mode's running counts (benchmarks read them): checks run (translator + decision head), gate
        # estimates computed, and checks the gate spared
        self.exit_checks = self.gate_estimates = self.gate_skips = 0
        self._gated: list[int] = []  # the current token's layers whose check the gate spared
        # how skipped layers get K/V at an exited position (sedac.kv_fill): "deferred" (the true K/V, computed
        # later: the exited rows ride along with the next token's pass through the layers they skipped, which on a
        # memory-bound CPU costs little) or "propagate" (CALM's state propagation); or "ghost" (Ghost KV: a learned
        # predictor, when the profile has one; sedac.enable_ghost_kv selects it); or "oracle" (run them at once:
        # the reference for what a fill costs in quality, never faster)
        self.kv_fill = self.config.sedac.kv_fill
        self._fill = self.kv_fill  # the fill of the generation in progress (kv_fill may change for the next one)
        # deferred fill: exited positions whose upper layers have not run yet, oldest first, as
        # (position, hidden state [1, 1, H] after `depth` layers, depth); their depths never increase along the list
        self._pending: list[tuple[int, torch.Tensor, int]] = []
        self.policy = ExitPolicy()
        self.reasoner = Reasoner.from_config(self.config.o1)  # O1 deep reasoning: the config's `o1` section
        self._o1 = bool(self.config.sedac.enable_o1_reasoning)
        # sedac.adaptive_threshold: running percentiles of this session's final entropy move the thresholds
        self._adaptive = AdaptiveThresholds() if self.config.sedac.adaptive_threshold else None
        self._tau_low_source = "config"  # who set tau_low last (a target-agreement calibration pins it)
        self.profile_dir = None
        self.profile_notice = ""
        self._drafter: Drafter | None = None
        self._drafter_key: tuple | None = None
        self._load_profile()
        self.ghost_kv: GhostKV | None = None
        self.ghost_notice = ""  # why Ghost KV was asked for but is off; shown once, at the next exit generation
        self._load_ghost_kv()
        self._mode = self.resolve_mode(self._mode)

    def _load_profile(self) -> None:
        """Exit heads (and their calibration) from the model's profile; without one, exit mode runs full depth."""
        directory = find_profile(self.bundle.fingerprint)
        if directory is None:
            self.profile_notice = (f"no exit heads for {self.bundle.name}: exit mode runs at full depth; "
                                   "train them with `sedac-chat train`")
            return
        try:
            heads = ExitHeads.load(directory, hidden_size=self.anatomy.hidden_size)
        except ProfileError as exc:
            self.profile_notice = f"{exc}; exit mode runs at full depth"
            return
        self.use_exit_heads(heads)
        self.profile_dir = directory

    def _load_ghost_kv(self) -> None:
        """Ghost KV from the profile, next to the exit heads (else the shipped one); `sedac.enable_ghost_kv` makes
        it the KV fill. Asked for but missing or corrupt: propagation, with a notice."""
        wanted = bool(self.config.sedac.enable_ghost_kv)
        if self.profile_dir is None:  # no exit heads: exit mode runs full depth (profile_notice says so), no fill
            return
        a = self.anatomy
        # the user's own (`sedac-chat train --ghost-kv` writes there), then next to the exit heads, then shipped
        fp = self.bundle.fingerprint
        dirs = [user_profile_dir(fp), self.profile_dir, shipped_profile_dir(fp)]
        directory = next((d for d in dirs if d is not None and (d / "ghost_kv.json").is_file()), self.profile_dir)
        try:
            ghost = GhostKV.load(directory, hidden_size=a.hidden_size, num_layers=a.num_layers,
                                 num_kv_heads=a.num_kv_heads, head_dim=a.head_dim)
        except ProfileError as exc:
            if wanted:
                self.ghost_notice = f"{exc}; the skipped layers' K/V are filled by sedac.kv_fill ({self.kv_fill})"
            return
        self.use_ghost_kv(ghost, select=wanted)

    def use_ghost_kv(self, ghost: GhostKV | None, select: bool = True) -> None:
        """Install (or remove) a Ghost KV; with `select`, make it the KV fill (from the next generation: waits for
        one in progress)."""
        with self._lock:
            self._use_ghost_kv(ghost, select)

    def _use_ghost_kv(self, ghost: GhostKV | None, select: bool) -> None:
        self.ghost_kv = None if ghost is None else ghost.to(self.device, self.dtype)
        if ghost is None and self.kv_fill == "ghost":
            self.kv_fill = self.config.sedac.kv_fill
        elif ghost is not None and select:
            self.kv_fill = "ghost"
            self.ghost_notice = ""

    def use_exit_heads(self, heads: ExitHeads | None, apply_calibration: bool = True) -> None:
        """Install (or remove) exit heads; apply their calibrated thresholds when auto_calibrate is on. Waits for a
        generation in progress: it keeps the heads, gate and decision head it began with."""
        with self._lock:
            self._use_exit_heads(heads, apply_calibration)

    def _use_exit_heads(self, heads: ExitHeads | None, apply_calibration: bool) -> None:
        if heads is None:
            self.exit_heads = None
            self._decision_head = None
            return
        self.exit_heads = heads.to(self.device, self.dtype)
        self.profile_notice = ""
        cal = heads.meta.get("calibration") or {}
        self.policy = ExitPolicy(min_layer=int(cal.get("min_layer", 1)),
                                 layer_offsets={int(k): float(v) for k, v in cal.get("layer_offsets", {}).items()})
        # the exit signal: the entropy over a reduced vocabulary (calibrations since the "reduced" signal), else
        # the probe's estimate; and the layers worth checking (calibration drops those whose exits don't pay)
        wanted = cal.get("check_layers")
        self._check_layers = frozenset(int(l) for l in (heads.layers if wanted is None else wanted))
        self._decision_head = None
        self._gate_margins = {}
        if cal.get("signal") == "reduced":
            self._gate_margins = {int(l): float(m) for l, m in (cal.get("gate_margins") or {}).items()
                                  if int(l) in heads.gate_w}
            from .calibration import DECISION_VOCAB_SIZE
            from .speculative import ReducedHead

            self._decision_head = ReducedHead(self, int(cal.get("decision_vocab_size") or DECISION_VOCAB_SIZE))
        # K/V projections of every layer, for filling skipped layers (views: no copies)
        a = self.anatomy
        self._kv_proj = [(layer.qkv_w[a.q_size:], None if layer.qkv_b is None else layer.qkv_b[a.q_size:])
                         for layer in a.layers]
        if apply_calibration and self.config.sedac.auto_calibrate and "tau_low" in cal:
            self._tau_floor = min(self._tau_floor, float(cal.get("entropy_threshold_min", cal["tau_low"])))
            self.set_thresholds(tau_low=float(cal["tau_low"]), tau_high=float(cal.get("tau_high", self._tau_high)),
                                source="calibration")

    # -- controls (thread-safe; applied from the next token) --------------------------------------------------
    @property
    def available_modes(self) -> tuple[str, ...]:
        return MODES

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def gate_margins(self) -> dict[int, float]:
        """The exit gate's calibrated margins (bits) per checked layer; empty: every token is checked."""
        return dict(self._gate_margins)

    @property
    def tau_low(self) -> float:
        return self._tau_low

    @property
    def tau_high(self) -> float:
        return self._tau_high

    @property
    def features(self) -> dict[str, bool]:
        """Which optional features this engine can run (the UI disables toggles for the others)."""
        return {"o1": True, "ghost_kv": self.ghost_kv is not None}

    @property
    def o1_threshold(self) -> float:
        """The entropy (bits) above which O1 thinks: `o1.trigger_entropy` when set, else tau_high."""
        fixed = self.config.o1.trigger_entropy
        return self._tau_high if fixed is None else float(fixed)

    def set_thresholds(self, tau_low: float | None = None, tau_high: float | None = None,
                       source: str = "user") -> ThresholdChange:
        event = self._apply_thresholds(tau_low, tau_high, source)
        assert event is not None
        return event

    def _apply_thresholds(self, tau_low: float | None, tau_high: float | None, source: str,
                          percentiles: dict[str, float] | None = None) -> ThresholdChange | None:
        floor = self._tau_floor
        with self._settings_lock:
            if source == "adaptive" and (self._adaptive is None or self._adaptive.paused):
                return None  # a manual change landed first (or adaptation was turned off): it wins
            if source in MANUAL_SOURCES and self._adaptive is not None:
                self._adaptive.paused = True
            if tau_low is not None:
                self._tau_low_source = source
            hi = self._tau_high if tau_high is None else float(tau_high)
            lo = self._tau_low if tau_low is None else float(tau_low)
            hi = min(max(hi, floor + TAU_GAP), TAU_MAX)
            lo = min(max(lo, floor), hi - TAU_GAP)
            self._tau_low, self._tau_high = round(lo, 4), round(hi, 4)
            event = ThresholdChange(tau_low=self._tau_low, tau_high=self._tau_high, source=source, time=time.time(),
                                    percentiles=percentiles)
        self.bus.publish(event)
        return event

    @property
    def adaptive_paused(self) -> bool | None:
        """None: adaptive thresholds are off; True: paused by a manual change; False: adapting."""
        return None if self._adaptive is None else self._adaptive.paused

    @property
    def adaptive_moves_tau_low(self) -> bool:
        """Whether adaptation moves tau_low too (to P50), or only tau_high (to P90). A tau_low set by hand (user,
        api) or by a target-agreement calibration stays where it was put; one from the config's defaults or a
        percentile calibration follows the session."""
        if self._tau_low_source in MANUAL_SOURCES:
            return False
        if self._tau_low_source == "calibration":
            cal = (self.exit_heads.meta.get("calibration") or {}) if self.exit_heads is not None else {}
            return cal.get("method") == "percentile"
        return True

    def set_adaptive(self, enabled: bool) -> None:
        """Turn adaptive thresholds on (resuming after a manual change, keeping what was observed) or off."""
        with self._settings_lock:
            if not enabled:
                self._adaptive = None
            elif self._adaptive is None:
                self._adaptive = AdaptiveThresholds()
            else:
                self._adaptive.paused = False

    def _adapt(self, entropy_bits: float) -> ThresholdChange | None:
        """After a token: feed its final entropy to the running percentiles; every N tokens, move tau_high to P90
        and, unless a target-agreement calibration set it, tau_low to P50 (calibration.AdaptiveThresholds)."""
        adaptive = self._adaptive
        if adaptive is None:
            return None
        adaptive.observe(entropy_bits)
        update = adaptive.propose(self._tau_low, self._tau_high, move_tau_low=self.adaptive_moves_tau_low)
        if update is None:
            return None
        lo = update.tau_low
        hi = update.tau_high if lo is not None else max(update.tau_high, self._tau_low + TAU_GAP)
        return self._apply_thresholds(lo, hi, "adaptive", update.percentiles)

    def resolve_mode(self, mode: str) -> str:
        """A mode name as the engine runs it: "auto" is lossless where this model has exit heads to draft with
        (the full model's output, faster), else full depth."""
        if mode == AUTO_MODE:
            return "lossless" if self.exit_heads is not None else "full"
        return mode

    def set_mode(self, mode: str) -> ModeChange:
        mode = self.resolve_mode(mode)
        if mode not in self.available_modes:
            raise ConfigError(f"unknown mode '{mode}'; available modes: {', '.join(self.available_modes)}")
        with self._settings_lock:
            self._mode = mode
        return self._publish_mode()

    def set_features(self, o1: bool | None = None, ghost_kv: bool | None = None) -> ModeChange:
        for name, wanted in (("o1", o1), ("ghost_kv", ghost_kv)):
            if wanted and not self.features[name]:
                raise SedacError(f"{name} is not available in this engine yet; it stays off")
        if o1 is not None:
            with self._settings_lock:
                self._o1 = bool(o1)
        if ghost_kv is not None and (ghost_kv or self.kv_fill == "ghost"):
            self.kv_fill = "ghost" if ghost_kv else self.config.sedac.kv_fill
        return self._publish_mode()

    def _publish_mode(self) -> ModeChange:
        event = ModeChange(mode=self._mode, enable_o1_reasoning=self._o1, enable_ghost_kv=self.kv_fill == "ghost",
                           time=time.time())
        self.bus.publish(event)
        return event

    def session_header(self, app_version: str = "") -> SessionStart:
        cfg = self.config.to_dict()
        cfg["sedac"]["entropy_threshold_base"] = self._tau_low
        cfg["sedac"]["o1_high_entropy_threshold"] = self._tau_high
        cfg["sedac"]["mode"] = self._mode
        cfg["sedac"]["enable_o1_reasoning"] = self._o1
        cfg["sedac"]["enable_ghost_kv"] = self.kv_fill == "ghost"
        return SessionStart(model=self.bundle.name, num_layers=self.num_layers, config=cfg, created=time.time(),
                            app_version=app_version)

    def recalibrate(self, prompts: list[str] | None = None, *, target_agreement: float | None = None,
                    max_tokens: int = 1500) -> ThresholdChange:
        """Re-fit tau_low (and per-layer offsets) for the installed exit heads on this session's prompts (or the
        given ones; the shipped calibration prompts when there are none) and apply them from the next token."""
        from .calibration import calibrate_heads
        from .exits import collect_exit_data, load_prompts

        if self.exit_heads is None:
            raise SedacError(self.profile_notice or "no exit heads to calibrate; run `sedac-chat train`")
        texts = list(prompts or self._seen_prompts) or load_prompts(shipped="calibration")
        heads = self.exit_heads
        target = target_agreement or float(heads.meta.get("calibration", {}).get("target_agreement") or 0.98)
        with self._lock:  # no generation runs until the new heads and thresholds are in, all together
            data = collect_exit_data(self.bundle, texts, heads.layers, max_tokens=max_tokens, batch_size=8)
            cal = calibrate_heads(self.bundle, heads.to("cpu", torch.float32), data, target_agreement=target)
            heads.meta["calibration"] = cal.to_meta()
            self._use_exit_heads(heads, apply_calibration=False)
            self._tau_floor = min(self._tau_floor, cal.entropy_threshold_min)
            return self.set_thresholds(tau_low=cal.tau_low, tau_high=cal.tau_high, source="calibration")

    def reset(self) -> None:
        """Forget the cached prefix (the next generation prefills from scratch)."""
        if self._cache is not None:
            self._cache.truncate(0)
        self._pending = []

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> GenerationResult:
        events = list(self.stream(request, cancel))
        end = events[-1]
        assert isinstance(end, GenerationEnd)
        return self._result(events, end)

    def stream(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Event]:
        request.validate()
        mode = self.resolve_mode(request.mode or self._mode)
        if mode not in self.available_modes:
            raise ConfigError(f"unknown mode '{mode}'; available modes: {', '.join(self.available_modes)}")
        if request.raw_prompt:
            if request.prompt is None:
                raise SedacError("raw_prompt needs a prompt (plain text), not messages")
            prompt_ids = list(self.bundle.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            last_user = request.prompt
        else:
            conversation = request.conversation()
            prompt_ids = self.bundle.chat.encode(conversation)
            last_user = next((m["content"] for m in reversed(conversation) if m.get("role") == "user"), None)
        if not prompt_ids:
            raise SedacError("the prompt is empty (no tokens); give some text")
        if last_user and request.forced_tokens is None:
            self._seen_prompts.append(last_user)
        ctx = self.bundle.context_length
        if len(prompt_ids) >= ctx:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens but {self.bundle.name}'s context window is {ctx}; "
                "shorten the prompt (or start a new conversation)"
            )
        with self._lock:
            self._select_matmul()
            with torch.inference_mode():
                yield from self._decode(request, mode, prompt_ids, cancel)

    def settle_kernels(self) -> None:
        """Wait for the skinny-matmul kernel's build (when the config wants it) and use it from now on. Benchmarks
        call this first, so that no timed run mixes torch's matmuls with the kernel's."""
        if self.config.performance.matmul_kernel:
            matmul_linear(wait=True)
        select_kernels(wait=True)
        self._select_matmul()

    def _select_matmul(self) -> None:
        """The weight matmuls' implementation for the next generation: the skinny-matmul kernel once it is built
        (CPU, `performance.matmul_kernel`), else F.linear. Chosen per generation, never inside one, so a response is
        computed with one arithmetic throughout (the two differ by float rounding). The statistics kernel switches in
        here too, once its background build is done."""
        select_kernels()
        if self.config.performance.matmul_kernel and self.anatomy.input_major and self.device.type == "cpu":
            self.anatomy.linear = matmul_linear()
        else:
            self.anatomy.linear = F.linear

    def _prepare_cache(self, needed: int) -> StaticKVCache:
        a = self.anatomy
        if self._cache is None:
            self._cache = StaticKVCache(a.num_layers, a.num_kv_heads, a.head_dim, capacity=needed,
                                        max_capacity=self.bundle.context_length, dtype=self.dtype, device=self.device)
        cache = self._cache
        cache.ensure_capacity(needed)
        if self._cos is None or self._cos.shape[0] < cache.capacity:
            self._cos, self._sin = a.rope_tables(cache.capacity, self.device, self.dtype)
        return cache

    def _run_with_pending(self, x: torch.Tensor, pos: int, layers: Any, on_layer: Any = None) -> tuple[
            torch.Tensor, int, int]:
        """Run `layers` on the rows x (positions start..pos, start = pos for one new token), letting every pending
        exited row join at the first layer it has not run: rows join in front (they are older), so each layer
        runs one batch of contiguous positions. `on_layer(depth, x)` may return True to stop after that layer.
        Returns (x, start, depth reached); rows that joined leave self._pending."""
        a = self.anatomy
        cache = self._cache
        assert cache is not None and self._cos is not None and self._sin is not None
        start = pos - x.shape[1] + 1
        depth = layers[0].index if layers else a.num_layers
        for layer in layers:
            joining = [q for q in self._pending if q[2] == layer.index]
            if joining:
                self._pending = [q for q in self._pending if q[2] != layer.index]
                x = torch.cat([q[1] for q in joining] + [x], dim=1)
                start = joining[0][0]
            x = a.layer_forward(layer, x, cache, start, self._cos[start : pos + 1], self._sin[start : pos + 1])
            depth = layer.index + 1
            if on_layer is not None and on_layer(depth, x):
                break
        return x, start, depth

    def complete_pending(self) -> None:
        """Deferred fill: run every pending exited row through the layers it skipped, in one batched pass per
        layer, so the cache holds the true K/V everywhere (end of a generation, or before O1 reads the cache)."""
        if not self._pending:
            return
        a = self.anatomy
        first = self._pending[-1]  # the newest: the shallowest
        pos = first[0]
        x = first[1]
        self._pending = self._pending[:-1]
        self._run_with_pending(x, pos, a.layers[first[2]:])
        self._pending = []

    def _forward_exit(self, token_id: int, pos: int) -> tuple[torch.Tensor, int, dict[int, float]]:
        """One token with early exit: at each checked layer the exit signal estimates the exit's entropy
        (_exit_estimate); the first below tau_low exits, and the skipped layers' K/V at this position are filled
        by the KV fill: propagation, Ghost KV, the oracle's full run, or (deferred) later, with the next token."""
        self._gated = []
        if self._fill == "deferred":
            return self._forward_exit_deferred(token_id, pos)
        a = self.anatomy
        cache = self._cache
        assert self.exit_heads is not None and cache is not None and self._cos is not None and self._sin is not None
        x = a.embed(torch.tensor([[token_id]], device=self.device))
        cos = self._cos[pos : pos + 1]
        sin = self._sin[pos : pos + 1]
        checked = self._check_layers
        tau_low = self._tau_low
        estimates: dict[int, float] = {}
        for layer in a.layers:
            x = a.layer_forward(layer, x, cache, pos, cos, sin)
            depth = layer.index + 1
            if depth not in checked or depth < self.policy.min_layer or self._gated_out(depth, x[:, -1], tau_low,
                                                                                         estimates):
                continue
            est, reduced, normed = self._exit_estimate(depth, x[:, -1])
            estimates[depth] = est
            if self.policy.decide(depth, est, tau_low) == EXIT and depth < self.num_layers:
                logits = self._exit_logits(reduced, normed)
                if self._fill == "oracle":  # reference only: the skipped layers run anyway for their true K/V
                    for rest in a.layers[depth:]:
                        x = a.layer_forward(rest, x, cache, pos, cos, sin)
                    cache.length = pos + 1
                elif self._fill == "ghost" and self.ghost_kv is not None and depth in self.ghost_kv.trunk:
                    self._fill_ghost(x, depth, pos, cos, sin)
                else:
                    self._fill_skipped(x, depth, pos, cos, sin)
                cache.token_ids[pos:] = [token_id]
                return logits, depth, estimates
        cache.length = pos + 1
        cache.token_ids[pos:] = [token_id]
        return a.logits(x[:, -1])[0], self.num_layers, estimates

    def _gated_out(self, depth: int, state: torch.Tensor, tau_low: float, estimates: dict[int, float]) -> bool:
        """The gate: where calibration gave this layer a margin, a row whose gate estimate (one dot product with
        the raw state [1, H]) is at or above the layer's threshold + the margin skips the check here, its estimate
        recorded as the layer's entropy."""
        margin = self._gate_margins.get(depth)
        if margin is None or not self.exit_gate:
            return False
        assert self.exit_heads is not None
        est = float(self.exit_heads.gate_estimate(depth, state[0]))
        self.gate_estimates += 1
        if est < self.policy.threshold(depth, tau_low) + margin:
            return False
        estimates[depth] = est
        self.gate_skips += 1
        self._gated.append(depth)
        return True

    def _exit_estimate(self, depth: int, state: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        """The exit signal at a checked layer for one row's state [1, H]: (estimated entropy in bits, the reduced
        logits when the signal is "reduced", the normalised translated state)."""
        a = self.anatomy
        heads = self.exit_heads
        assert heads is not None
        self.exit_checks += 1
        normed = a.rms_norm(heads.translate(depth, state, a.linear), a.final_norm_w)
        if self._decision_head is not None:  # the entropy over the reduced vocabulary; its argmax is the exit token
            reduced = self._decision_head.logits(normed)[0]
            return float(entropy_bits(reduced)), reduced, normed  # the fused kernel: 12 us for ~4k logits
        return float(heads.predicted_entropy(depth, normed[0])), None, normed

    def _exit_logits(self, reduced: torch.Tensor | None, normed: torch.Tensor) -> torch.Tensor:
        a = self.anatomy
        if reduced is not None:
            return self._decision_head.full_logits(reduced)
        return torch.nn.functional.linear(normed, a.lm_head_w, a.lm_head_b)[0]

    def _forward_exit_deferred(self, token_id: int, pos: int) -> tuple[torch.Tensor, int, dict[int, float]]:
        """Early exit with the deferred fill: as _forward_exit, but an exited token's skipped layers are not
        filled now; its state waits in self._pending and joins the next token's pass at the first layer it has
        not run (true K/V, written before any later token reads them). At most MAX_PENDING rows wait: then the
        token runs full depth, which completes them all."""
        a = self.anatomy
        cache = self._cache
        assert cache is not None
        checked = self._check_layers if len(self._pending) < MAX_PENDING else frozenset()
        estimates: dict[int, float] = {}
        exit_at: list = []

        def check(depth: int, x: torch.Tensor) -> bool:
            if depth not in checked or depth < self.policy.min_layer or depth >= self.num_layers:
                return False
            if self._gated_out(depth, x[:, -1], self._tau_low, estimates):
                return False
            est, reduced, normed = self._exit_estimate(depth, x[:, -1])
            estimates[depth] = est
            if self.policy.decide(depth, est, self._tau_low) == EXIT:
                exit_at.append(self._exit_logits(reduced, normed))
                return True
            return False

        x = a.embed(torch.tensor([[token_id]], device=self.device))
        x, start, depth = self._run_with_pending(x, pos, a.layers, check)
        cache.length = pos + 1
        cache.token_ids[pos:] = [token_id]
        if exit_at:  # every row of this pass stopped at `depth`: they wait for the layers above it
            self._pending += [(start + i, x[:, i : i + 1], depth) for i in range(x.shape[1])]
            return exit_at[0], depth, estimates
        return a.logits(x[:, -1])[0], self.num_layers, estimates

    def _fill_ghost(self, x: torch.Tensor, depth: int, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Ghost KV fill: the first skipped layer's input is the exit state itself, so its K/V are projected
        exactly; the layers above get the predicted pre-RoPE K/V (then k-norm and RoPE, as computed ones get)."""
        a = self.anatomy
        cache = self._cache
        ghost = self.ghost_kv
        assert cache is not None and ghost is not None
        h = x[:, -1]
        first = a.layers[depth]
        kv_w, kv_b = self._kv_proj[depth]
        kv = torch.nn.functional.linear(a.rms_norm(h, first.in_norm), kv_w, kv_b)  # [1, 2 * kv]
        k_pred, v_pred = ghost.predict(depth, h)  # [1, n_pred, kv]
        k = torch.cat((kv[:, None, : a.kv_size], k_pred), 1)
        v = torch.cat((kv[:, None, a.kv_size :], v_pred), 1)
        n = k.shape[1]
        k = k.view(n, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)  # [n_skip, kv_heads, 1, head_dim]
        v = v.view(n, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if first.k_norm is not None:
            k = torch.cat([a.rms_norm(k[i : i + 1], layer.k_norm) for i, layer in enumerate(a.layers[depth:])])
        k = apply_rope(k, cos, sin)
        for i, layer in enumerate(a.layers[depth:]):
            cache.write(layer.index, pos, k[i : i + 1], v[i : i + 1], FILL_GHOST)
        cache.length = pos + 1

    def _fill_skipped(self, x: torch.Tensor, depth: int, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        a = self.anatomy
        cache = self._cache
        assert cache is not None
        h = x
        for layer in a.layers[depth:]:
            kv_w, kv_b = self._kv_proj[layer.index]
            kv = torch.nn.functional.linear(a.rms_norm(h, layer.in_norm), kv_w, kv_b)
            k, v = kv.view(1, 1, 2 * a.num_kv_heads, a.head_dim).transpose(1, 2).split(a.num_kv_heads, dim=1)
            if layer.k_norm is not None:
                k = a.rms_norm(k, layer.k_norm)
            k = apply_rope(k, cos, sin)
            cache.write(layer.index, pos, k, v, FILL_PROPAGATED)
        cache.length = pos + 1

    def _forward(self, ids: list[int], start: int, trace: bool) -> tuple[torch.Tensor, dict[int, float] | None]:
        """Run all layers on tokens `ids` at positions start.. ; return the last position's logits."""
        a = self.anatomy
        cache = self._cache
        assert cache is not None and self._cos is not None and self._sin is not None
        T = len(ids)
        x = a.embed(torch.tensor([ids], device=self.device))
        cos = self._cos[start : start + T]
        sin = self._sin[start : start + T]
        layer_entropies: dict[int, float] | None = {} if trace else None
        for layer in a.layers:
            x = a.layer_forward(layer, x, cache, start, cos, sin)
            if layer_entropies is not None:
                layer_entropies[layer.index + 1] = float(entropy_bits(a.logits(x[:, -1])).item())
        cache.length = start + T
        cache.token_ids[start:] = ids
        return a.logits(x[:, -1])[0], layer_entropies

    def _decode(self, req: GenerationRequest, mode: str, prompt_ids: list[int],
                cancel: threading.Event | None) -> Iterator[Event]:
        t_start = time.perf_counter()
        ctx = self.bundle.context_length
        max_new = min(req.max_new_tokens, ctx - len(prompt_ids))
        cache = self._prepare_cache(len(prompt_ids) + max_new)
        if self._pending:  # left by an interrupted generation: finish the rows the cache still holds
            self._pending = [q for q in self._pending if q[0] < cache.length]
            self.complete_pending()
        reuse = cache.common_prefix(prompt_ids)
        reuse = min(reuse, len(prompt_ids) - 1)  # always run at least the last prompt token
        cache.truncate(reuse)
        self._generation_id += 1
        gid = self._generation_id
        # what decides this generation's path is read once, here: a control changed while it runs (mode, O1,
        # Ghost KV) applies from the next one; thresholds apply from the next token
        self._fill = self.kv_fill
        forced = req.forced_tokens
        use_o1 = (self._o1 if req.o1 is None else req.o1) and forced is None
        yield self._emit(GenerationStart(
            generation_id=gid, mode=mode, prompt_tokens=len(prompt_ids), max_new_tokens=max_new,
            tau_low=self._tau_low, tau_high=self._tau_high, temperature=req.temperature, top_p=req.top_p,
            seed=req.seed, num_layers=self.num_layers, time=time.time(), o1=use_o1, kv_fill=self._fill,
        ))
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % (2**63)))
        stops = tuple(req.stop) + (() if req.raw_prompt else self.bundle.chat.stop_strings)
        text = _TextStream(self.bundle.tokenizer)
        token_ids: list[int] = []
        exit_layers: list[int] = []
        stop_reason = "max_tokens"
        pos = len(prompt_ids)
        use_exit = mode == "exit" and self.exit_heads is not None
        if mode == "exit" and self.exit_heads is None:
            yield self._emit(Notice(message=self.profile_notice, time=time.time()))
        if use_exit and self.ghost_notice:  # Ghost KV asked for but unavailable: say so once
            yield self._emit(Notice(message=self.ghost_notice, time=time.time()))
            self.ghost_notice = ""
        if forced is not None:
            max_new = min(max_new, len(forced))
        cur_exit = self.num_layers  # the depth at which the current logits were produced
        o1_budget = self.reasoner.begin()
        # lossless: rounds of drafts verified at full depth (teacher forcing has nothing to draft: full depth)
        drafter = self._lossless_drafter(mode, forced is None)
        if mode == "lossless" and drafter is None and forced is None:
            yield self._emit(Notice(message=self.lossless_notice, time=time.time()))
        block: Block | None = None  # the current round; `row` is the row whose logits are being consumed
        row = 0
        drafted = accepted = rounds = 0
        looked_up = {"context": [0, 0], "own text": [0, 0]}  # copied drafts by source: [drafted, accepted]
        banned = frozenset(self._eos) if req.ignore_eos else frozenset()
        if drafter is not None:
            drafter.begin(prompt_ids, banned)
        decision_head = self._decision_head if use_exit else None
        if decision_head is not None:
            decision_head.begin(prompt_ids, banned)
        t0 = time.perf_counter()
        logits, layer_ent = self._forward(prompt_ids[reuse:], reuse, req.trace)
        gated: tuple[int, ...] = ()  # the layers whose exit check the gate spared, for the token `logits` gives
        prefill_s = time.perf_counter() - t0
        step_ms = prefill_s * 1000
        for index in range(max_new):
            stats = token_stats(logits.unsqueeze(0), self._tau_low, self._tau_high)
            argmax = int(stats.argmax[0])
            if req.ignore_eos and self._eos:  # like generate(min_new_tokens=...): EOS is never chosen
                logits[list(self._eos)] = float("-inf")
                argmax = int(logits.argmax())
            o1 = None
            row_draft = block.drafts[row] if block is not None else None
            o1_at = self.o1_threshold  # read per token: tau_high can change live
            if use_o1 and block is not None and self.reasoner.policy.should_trigger(
                    o1_budget, index, float(stats.entropy_bits[0]), float(stats.varentropy[0]), o1_at):
                cache.truncate(pos)  # O1 rolls out from here: drop the round's later rows first
                block = None
            if use_o1 and self._pending:  # O1's rollouts read the cache: it must hold every layer's K/V first
                self.complete_pending()
            if use_o1:  # O1: think harder at an uncertain position, before committing a token
                o1 = self.reasoner.maybe_think(
                    self, o1_budget, logits, stats, pos=pos, index=index, generation_id=gid,
                    tau_high=o1_at, banned=frozenset(self._eos) if req.ignore_eos else frozenset())
            draft_dist = block.draft_dists[row] if block is not None else None
            if o1 is not None:
                token_id = o1[0]
                yield self._emit(o1[1])
            elif row_draft is not None and draft_dist is not None and generator is not None:
                token_id, _ = accept_sampled(self._target_probs(logits, req), row_draft, draft_dist, generator)
            else:
                token_id = self._choose(logits, req, generator, argmax)
            draft_state = None
            if drafter is not None and forced is None:
                draft_state = "accepted" if row_draft is not None and token_id == row_draft else "verified"
                if block is not None and draft_state == "accepted":
                    cur_exit = block.draft_layers[row]
                    accepted += 1
                    if row < block.copied:
                        looked_up[block.source][1] += 1
                if row_draft is not None and draft_state != "accepted" and block is not None:
                    # the full model disagreed: the draft is shown in the heatmap, never in the text. A guess
                    # copied from text ran no head, so it has no entropy (NaN in the block): null in the event
                    guess_entropy = block.draft_entropy[row]
                    yield self._emit(TokenEvent(
                        generation_id=gid, index=index, token_id=row_draft, text="",
                        exit_layer=block.draft_layers[row], num_layers=self.num_layers,
                        entropy_bits=guess_entropy if math.isfinite(guess_entropy) else None, confidence=0.0,
                        decision="exit" if block.draft_layers[row] < self.num_layers else "full",
                        draft="rejected", top_tokens=(), time_ms=0.0, position=pos))
            probs_top = torch.topk(logits.float(), k=min(TOP_K_SHOWN, logits.shape[-1]))
            lse = float(stats.logsumexp[0])
            top_tokens = tuple(
                (self.bundle.tokenizer.decode([int(i)]), round(float(torch.exp(v - lse)), 6))
                for v, i in zip(probs_top.values, probs_top.indices)
            )
            shown = len(text.text)
            delta = text.push(token_id)
            token_ids.append(token_id)
            exit_layers.append(cur_exit)
            is_eos = token_id in self._eos and forced is None
            stop_at = self._find_stop(text.text, stops, shown) if stops and not is_eos else -1
            if stop_at >= 0:
                delta = text.text[shown:stop_at]
            elif is_eos or index == max_new - 1 or (cancel is not None and cancel.is_set()):
                # the last token: also send any incomplete UTF-8 tail the stream was holding back
                tail = self.bundle.tokenizer.decode(token_ids, skip_special_tokens=True)
                if tail.startswith(text.text) and len(tail) > len(text.text):
                    delta += tail[len(text.text):]
            yield self._emit(TokenEvent(
                generation_id=gid, index=index, token_id=token_id, text=delta, exit_layer=cur_exit,
                num_layers=self.num_layers, entropy_bits=float(stats.entropy_bits[0]),
                confidence=float(stats.max_prob[0]),
                decision="o1" if o1 is not None else "exit" if cur_exit < self.num_layers else "full",
                draft=draft_state, layer_entropies=layer_ent, gated_layers=gated,
                top_tokens=top_tokens, time_ms=step_ms, position=pos,
            ))
            # adaptive thresholds learn from real generations only (teacher forcing is a measurement); in exit mode
            # an exited token's entropy is its exit head's, the tuned-lens estimate of the final one
            if forced is None and (change := self._adapt(float(stats.entropy_bits[0]))) is not None:
                yield change  # already published; applies from the next token
            if is_eos:
                stop_reason = "eos"
                break
            if stop_at >= 0:
                stop_reason = "stop_string"
                break
            if cancel is not None and cancel.is_set():
                stop_reason = "cancelled"
                break
            if index == max_new - 1:
                stop_reason = "max_tokens" if max_new == req.max_new_tokens else "context_full"
                break
            next_id = forced[index] if forced is not None else token_id
            t0 = time.perf_counter()
            if drafter is not None:
                drafter.observe(token_id)
                if block is not None and draft_state == "accepted" and row + 1 < block.rows:
                    row += 1  # the draft was right: the round already holds the next token's logits
                else:
                    cache.truncate(pos)  # rows past this position were drafted on another token
                    block = drafter.propose(next_id, pos, max_new - index - 1, temperature=req.temperature,
                                            generator=generator)
                    row = 0
                    rounds += 1
                    drafted += block.guesses or sum(d is not None for d in block.drafts)
                    if block.copied or block.guesses:
                        looked_up[block.source][0] += block.guesses or block.copied
                logits, layer_ent = block.logits[row], None
                cur_exit = self.num_layers
            elif use_exit:
                if decision_head is not None:
                    decision_head.observe(next_id)
                logits, cur_exit, layer_ent = self._forward_exit(next_id, pos)
                gated = tuple(self._gated)
            else:
                logits, layer_ent = self._forward([next_id], pos, req.trace)
            step_ms = (time.perf_counter() - t0) * 1000
            pos += 1
        if drafter is not None:
            cache.truncate(pos)  # as full decoding leaves it: the last token is not fed yet
        self.complete_pending()  # deferred fill: the cache holds every layer's K/V for the next turn
        elapsed = time.perf_counter() - t_start
        final_text = self.bundle.tokenizer.decode(token_ids, skip_special_tokens=True)
        if stop_reason == "stop_string":
            final_text = final_text[: self._find_stop(final_text, stops, 0)]
        n = len(token_ids)
        avg_exit = sum(exit_layers) / n if n else 0.0
        yield self._emit(GenerationEnd(
            generation_id=gid, tokens=n, tok_per_s=n / elapsed if elapsed > 0 else 0.0,
            skip_ratio=1.0 - avg_exit / self.num_layers if n else 0.0, avg_exit_layer=avg_exit,
            stop_reason=stop_reason, text=final_text, elapsed_s=elapsed, prefill_s=prefill_s,
            o1_triggers=o1_budget.triggers, time=time.time(), drafted=drafted, accepted=accepted, rounds=rounds,
            copied=looked_up["context"][0], copied_accepted=looked_up["context"][1],
            own_text=looked_up["own text"][0], own_text_accepted=looked_up["own text"][1],
        ))

    @staticmethod
    def _find_stop(text: str, stops: tuple[str, ...], shown: int) -> int:
        """Where the first stop string starts in `text`, looking only where new text could complete one."""
        hits = [at for s in stops if (at := text.find(s, max(0, shown - len(s) + 1))) != -1]
        return min(hits) if hits else -1

    def _choose(self, logits: torch.Tensor, req: GenerationRequest, generator: torch.Generator | None,
                argmax: int) -> int:
        if req.temperature <= 0 or generator is None:
            return argmax
        z = logits.float() / req.temperature
        probs = torch.softmax(z, dim=-1)
        if req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            # normalised on the logits' device, then to the CPU generator (a CPU tensor over a CUDA scalar fails)
            choice = torch.multinomial((sorted_p / sorted_p.sum()).cpu(), 1, generator=generator)
            return int(order[choice.to(order.device)].item())
        return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())

    def _target_probs(self, logits: torch.Tensor, req: GenerationRequest) -> torch.Tensor:
        """The distribution `_choose` samples from (temperature, then top-p), as a dense vector."""
        probs = torch.softmax(logits.float() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
            probs = probs / probs.sum()
        return probs

    def _lossless_drafter(self, mode: str, enabled: bool) -> Drafter | None:
        """The drafter for lossless mode (None: another mode, or no exit heads to draft with)."""
        if mode != "lossless" or not enabled or self.exit_heads is None:
            return None
        key = (id(self.exit_heads), repr(self.config.lossless))
        if self._drafter is None or self._drafter_key != key:
            self._drafter = Drafter(self, self.config.lossless)
            self._drafter_key = key
        return self._drafter

    @property
    def lossless_notice(self) -> str:
        return ((self.profile_notice or "no exit heads loaded").split(";")[0]
                + "; lossless mode drafts with them, so it runs at full depth (same output, no speed-up)")

    def _emit(self, event: Event) -> Event:
        self.bus.publish(event)
        return event

    def _result(self, events: list[Event], end: GenerationEnd) -> GenerationResult:
        toks = [e for e in events if isinstance(e, TokenEvent) and e.draft != "rejected"]
        start = next(e for e in events if isinstance(e, GenerationStart))
        return GenerationResult(
            generated_text=end.text, tokens=end.tokens, token_ids=[t.token_id for t in toks],
            tok_per_s=end.tok_per_s, skip_ratio=end.skip_ratio, avg_exit_layer=end.avg_exit_layer, mode=start.mode,
            stop_reason=end.stop_reason, elapsed_s=end.elapsed_s, prompt_tokens=start.prompt_tokens, events=events,
        )
