"""SedacConfig: the settings a SEDAC user knows (model, sedac, o1, performance, generation, tui), loaded from and
saved to YAML, validated with errors that name the offending key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODES = ("full", "exit", "lossless")
# "auto": the fastest mode that keeps the full model's answer: lossless where the model has a profile to draft with
# (exit heads), else full depth
AUTO_MODE = "auto"
CONFIG_MODES = (AUTO_MODE, *MODES)
KERNEL_BACKENDS = ("auto", "cuda", "cpp", "torch")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
O1_STRATEGIES = ("lookahead",)  # the names reasoning.STRATEGIES registers (a test keeps the two in step)


@dataclass
class ModelSection:
    model_name: str | None = None  # None: the embedded default model
    local: bool = False  # never touch the network when resolving a hub id
    device: str = "auto"
    dtype: str = "auto"
    num_hidden_layers: int | None = None  # informational (the seed README has it); checked against the model

    def validate(self) -> None:
        _choice("model.device", self.device, DEVICES, allow_prefix="cuda:")
        _choice("model.dtype", self.dtype, DTYPES)
        if self.num_hidden_layers is not None:
            _range("model.num_hidden_layers", self.num_hidden_layers, 1, 10_000)


KV_FILLS = ("deferred", "propagate")


@dataclass
class SedacSection:
    mode: str = AUTO_MODE
    auto_calibrate: bool = True
    # how an exited token's skipped layers get their K/V: "deferred" (the true K/V, computed with the next
    # token's pass) or "propagate" (CALM's state propagation); enable_ghost_kv: true puts Ghost KV in their place
    kv_fill: str = "deferred"
    enable_ghost_kv: bool = False
    # exit mode: a token whose calibrated gate (one dot product per checked layer) puts it far from exiting skips
    # that layer's check; false checks every token at every checked layer
    exit_gate: bool = True
    enable_o1_reasoning: bool = False
    adaptive_threshold: bool = True
    # tau_low: tokens whose exit entropy (bits) is below it may exit early
    entropy_threshold_base: float = 0.5
    # the floor tau_low may never go below (keyboard tweaks and calibration clamp to it)
    entropy_threshold_min: float = 0.2
    # tau_high: final-layer entropy above it triggers O1 deep reasoning
    o1_high_entropy_threshold: float = 4.5

    def validate(self) -> None:
        _choice("sedac.mode", self.mode, CONFIG_MODES)
        _choice("sedac.kv_fill", self.kv_fill, KV_FILLS)
        for name in ("entropy_threshold_base", "entropy_threshold_min", "o1_high_entropy_threshold"):
            _range(f"sedac.{name}", getattr(self, name), 0.0, 32.0)
        if self.entropy_threshold_min > self.entropy_threshold_base:
            raise ConfigError(
                f"sedac.entropy_threshold_min ({self.entropy_threshold_min}) is above sedac.entropy_threshold_base "
                f"({self.entropy_threshold_base}); set the minimum at or below the base threshold"
            )
        if self.entropy_threshold_base >= self.o1_high_entropy_threshold:
            raise ConfigError(
                f"sedac.entropy_threshold_base ({self.entropy_threshold_base}) must be below "
                f"sedac.o1_high_entropy_threshold ({self.o1_high_entropy_threshold}); lower tau_low or raise tau_high"
            )


@dataclass
class O1Section:
    """How O1 deep reasoning triggers and how hard it thinks. Whether it runs is `sedac.enable_o1_reasoning`;
    its trigger threshold (tau_high, final-layer entropy in bits) is `sedac.o1_high_entropy_threshold`."""

    strategy: str = "lookahead"
    top_k: int = 3  # k: candidates rolled out at a trigger
    rollout_tokens: int = 4  # m: greedy tokens each candidate is rolled out for
    entropy_penalty: float = 0.1  # branch score = mean log-prob (nats) - penalty * mean entropy (bits)
    min_candidate_prob: float = 0.02  # candidates below this probability are not rolled out (the argmax always is)
    min_spacing: int = 4  # at least this many tokens between two triggers of one response
    max_triggers: int = 2  # per response
    max_extra_passes: int = 24  # per response: token forward passes spent on rollouts
    min_varentropy: float | None = None  # also require varentropy (bits^2) above this; null: entropy alone
    # the trigger's entropy (bits); null: tau_high (calibrated P90, live-settable). 3.0 was the dev split's pick
    trigger_entropy: float | None = None

    def validate(self) -> None:
        _choice("o1.strategy", self.strategy, O1_STRATEGIES)
        _range("o1.top_k", self.top_k, 1, 64)
        _range("o1.rollout_tokens", self.rollout_tokens, 1, 256)
        _range("o1.entropy_penalty", self.entropy_penalty, 0.0, 100.0)
        _range("o1.min_candidate_prob", self.min_candidate_prob, 0.0, 1.0)
        _range("o1.min_spacing", self.min_spacing, 1, 1_000_000)
        _range("o1.max_triggers", self.max_triggers, 0, 1_000_000)
        _range("o1.max_extra_passes", self.max_extra_passes, 0, 100_000_000)
        if self.min_varentropy is not None:
            if isinstance(self.min_varentropy, bool) or not isinstance(self.min_varentropy, (int, float)):
                raise ConfigError(f"'o1.min_varentropy' must be a number or null, got {self.min_varentropy!r}")
            _range("o1.min_varentropy", self.min_varentropy, 0.0, 1024.0)
        if self.trigger_entropy is not None:
            if isinstance(self.trigger_entropy, bool) or not isinstance(self.trigger_entropy, (int, float)):
                raise ConfigError(f"'o1.trigger_entropy' must be a number of bits or null, got {self.trigger_entropy!r}")
            _range("o1.trigger_entropy", self.trigger_entropy, 0.0, 64.0, low_open=True)
        if self.top_k * self.rollout_tokens > self.max_extra_passes and self.max_triggers > 0:
            raise ConfigError(
                f"one O1 trigger costs o1.top_k * o1.rollout_tokens = {self.top_k * self.rollout_tokens} passes, "
                f"more than o1.max_extra_passes ({self.max_extra_passes}): O1 could never trigger; raise "
                "max_extra_passes or lower top_k/rollout_tokens"
            )


@dataclass
class LosslessSection:
    """Lossless mode (self-speculative decoding): what the drafts are made of. Whatever these are, greedy output
    is the full model's; they only change the speed."""

    draft_layer: int = 0  # the exit layer that drafts; 0: the profile's choice (measured for the shipped model)
    max_draft_tokens: int = 8  # most tokens drafted before one verification pass
    draft_vocab_size: int = 4096  # drafts are picked among this many of the model's most frequent output tokens
    # keep drafting at the exit layer while the draft distribution's entropy (bits) stays below this
    exit_draft_entropy: float = 0.5
    # else run the token at full depth and draft it with the reduced head while its entropy stays below this;
    # 0 turns full-depth drafting off (a token that cannot exit then ends the draft)
    full_draft_entropy: float = 1.5
    # drafts that cost no layers, verified in one batched full-depth pass: where the last two tokens occurred
    # before, up to this many of the tokens that followed them (prompt lookup), else (own_text) what the model's
    # own answers to the training prompts continued with; 0 turns both off
    lookup_tokens: int = 4
    own_text: bool = True

    def validate(self) -> None:
        _range("lossless.draft_layer", self.draft_layer, 0, 10_000)
        _range("lossless.max_draft_tokens", self.max_draft_tokens, 1, 64)
        _range("lossless.draft_vocab_size", self.draft_vocab_size, 16, 10_000_000)
        _range("lossless.exit_draft_entropy", self.exit_draft_entropy, 0.0, 32.0)
        _range("lossless.full_draft_entropy", self.full_draft_entropy, 0.0, 32.0)
        _range("lossless.lookup_tokens", self.lookup_tokens, 0, 63)


@dataclass
class PerformanceSection:
    kernel_backend: str = "auto"
    enable_flash_attention: bool = True  # uses torch's SDPA, which picks flash kernels where it can
    # CPU: the model's matmuls on ext/'s skinny-matmul kernel (built in the background on first start; torch's
    # until it is ready); false keeps torch's everywhere
    matmul_kernel: bool = True

    def validate(self) -> None:
        _choice("performance.kernel_backend", self.kernel_backend, KERNEL_BACKENDS)


@dataclass
class GenerationSection:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None

    def validate(self) -> None:
        _range("generation.max_new_tokens", self.max_new_tokens, 1, 1_000_000)
        _range("generation.temperature", self.temperature, 0.0, 100.0)
        _range("generation.top_p", self.top_p, 0.0, 1.0, low_open=True)


@dataclass
class TuiSection:
    theme: str = "sedac-dark"
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys, e.g. {"tau_low_down": "ctrl+down"}

    def validate(self) -> None:
        if not isinstance(self.keymap, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.keymap.items()
        ):
            raise ConfigError("tui.keymap must map binding ids to key names, e.g. {tau_low_down: 'ctrl+down'}")


@dataclass
class SedacConfig:
    model: ModelSection = field(default_factory=ModelSection)
    sedac: SedacSection = field(default_factory=SedacSection)
    o1: O1Section = field(default_factory=O1Section)
    lossless: LosslessSection = field(default_factory=LosslessSection)
    performance: PerformanceSection = field(default_factory=PerformanceSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    tui: TuiSection = field(default_factory=TuiSection)

    # -- convenience names used everywhere the thresholds travel ------------------------------------
    @property
    def tau_low(self) -> float:
        return self.sedac.entropy_threshold_base

    @property
    def tau_high(self) -> float:
        return self.sedac.o1_high_entropy_threshold

    def validate(self) -> "SedacConfig":
        for f in fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "SedacConfig":
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections (model, sedac, ...)")
        sections = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in sections:
                raise ConfigError(
                    f"{source}: unknown section '{name}'; known sections: {', '.join(sections)}"
                )
            section_cls = sections[name].default_factory  # type: ignore[misc]
            kwargs[name] = _build_section(section_cls, name, value, source)
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path) -> "SedacConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}; fix the syntax or start from `sedac-chat config`") from None
        return cls.from_dict(data, source=str(p))

    def save(self, path: str | Path) -> None:
        import yaml

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _build_section(section_cls: type, name: str, value: Any, source: str) -> Any:
    if value is None:
        return section_cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys")
    known = {f.name: f for f in fields(section_cls)}
    defaults = section_cls()
    kwargs = {}
    for key, v in value.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'; known keys in '{name}': {', '.join(known)}")
        kwargs[key] = _coerce(f"{name}.{key}", v, getattr(defaults, key), source)
    return section_cls(**kwargs)


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...], allow_prefix: str | None = None) -> None:
    if value in choices or (allow_prefix and isinstance(value, str) and value.startswith(allow_prefix)):
        return
    raise ConfigError(f"'{key}' is {value!r}; choose one of: {', '.join(choices)}")


def _range(key: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if value is None:
        return
    bad = value <= low if low_open else value < low
    if bad or value > high:
        lo = "(" if low_open else "["
        raise ConfigError(f"'{key}' is {value}, out of range {lo}{low}, {high}]; pick a value inside it")
