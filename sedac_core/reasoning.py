"""O1 deep reasoning: extra compute for the positions where the model is unsure. A trigger policy (final-layer
entropy above tau_high, optionally high varentropy, spacing and a per-response budget) decides when; a pluggable
strategy (Lookahead by default) decides which token to commit, and leaves the KV cache exactly as it found it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .entropy import token_stats
from .events import O1Event

if TYPE_CHECKING:  # the engine imports this module; only type hints point back
    from .engine import SedacEngine

LN2 = math.log(2.0)


@dataclass
class O1Settings:
    """How O1 triggers and how hard it thinks. Entropies are in bits."""

    min_varentropy: float | None = None  # also require varentropy (bits^2) above this (Entropix-style); None: off
    min_spacing: int = 4  # at least this many tokens between two triggers of one response
    max_triggers: int = 2  # per response
    max_extra_passes: int = 24  # per response: forward passes spent on rollouts (~1 per token at 24 tokens)
    top_k: int = 3  # candidates rolled out
    rollout_tokens: int = 4  # m: forward passes per candidate (greedy continuation)
    entropy_penalty: float = 0.1  # score = mean log-prob (nats) - penalty * mean entropy (bits) of the rollout
    min_candidate_prob: float = 0.02  # candidates below this probability are not worth a rollout

    def passes_per_trigger(self) -> int:
        return self.top_k * self.rollout_tokens


@dataclass
class O1Budget:
    """One response's O1 state: what the trigger policy has spent so far."""

    triggers: int = 0
    extra_passes: int = 0
    last_index: int | None = None


class TriggerPolicy:
    """When to think: entropy above tau_high (and varentropy above its minimum, when set), not too soon after the
    previous trigger, and only while the response's budget lasts."""

    def __init__(self, settings: O1Settings) -> None:
        self.settings = settings

    def should_trigger(self, budget: O1Budget, index: int, entropy_bits: float, varentropy: float,
                       tau_high: float) -> bool:
        s = self.settings
        if not entropy_bits > tau_high:  # NaN never triggers
            return False
        if s.min_varentropy is not None and not varentropy > s.min_varentropy:
            return False
        if budget.last_index is not None and index - budget.last_index < s.min_spacing:
            return False
        if budget.triggers >= s.max_triggers:
            return False
        return budget.extra_passes + s.passes_per_trigger() <= s.max_extra_passes

    @staticmethod
    def record(budget: O1Budget, index: int, passes: int) -> None:
        budget.triggers += 1
        budget.extra_passes += passes
        budget.last_index = index


@dataclass
class Thought:
    """What a strategy decided at one position."""

    token_id: int
    candidates: list[dict[str, Any]] = field(default_factory=list)  # {token_id, text, prob, score, rollout}
    extra_forward_passes: int = 0


class Strategy(Protocol):
    name: str

    def think(self, engine: "SedacEngine", logits: torch.Tensor, pos: int, settings: O1Settings,
              banned: frozenset[int] = frozenset()) -> Thought:
        """Choose the token at position `pos` (the cache holds exactly positions 0..pos-1 and must do so again
        on return)."""
        ...


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


class Lookahead:
    """Roll out each of the top-k candidates greedily for m tokens on the engine's cache, score each branch by its
    mean log-probability under the full model minus a penalty times its mean entropy, commit the best branch's
    first token, and roll the cache back to `pos` after every branch."""

    name = "lookahead"

    def think(self, engine: "SedacEngine", logits: torch.Tensor, pos: int, settings: O1Settings,
              banned: frozenset[int] = frozenset()) -> Thought:
        cache = engine._cache
        assert cache is not None and cache.length == pos, "the cache must end at the current position"
        logp0 = _logprobs(logits)
        if banned:
            logp0 = logp0.clone()
            logp0[list(banned)] = float("-inf")
        k = max(1, min(settings.top_k, logits.shape[-1]))
        top = torch.topk(logp0, k)
        m = max(1, min(settings.rollout_tokens, cache.max_capacity - pos - 1))
        engine._prepare_cache(pos + m + 1)
        eos = set(engine._eos)
        tokenizer = engine.bundle.tokenizer
        candidates: list[dict[str, Any]] = []
        passes = 0
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            if candidates and math.exp(value) < settings.min_candidate_prob:
                break  # the argmax is always rolled out; negligible alternatives are not
            rollout = [int(index)]
            logps = [float(value)]
            entropies: list[float] = []
            try:
                while len(rollout) <= m and rollout[-1] not in eos:
                    out, _ = engine._forward([rollout[-1]], pos + len(rollout) - 1, False)
                    passes += 1
                    lp = _logprobs(out)
                    if banned:
                        lp[list(banned)] = float("-inf")
                    stats = token_stats(out.unsqueeze(0))
                    entropies.append(float(stats.entropy_bits[0]))
                    nxt = int(lp.argmax())
                    logps.append(float(lp[nxt]))
                    rollout.append(nxt)
            finally:
                cache.truncate(pos)  # exact rollback: the next forward at pos rewrites what the branch wrote
            mean_lp = sum(logps) / len(logps)
            mean_h = sum(entropies) / len(entropies) if entropies else 0.0
            candidates.append({
                "token_id": rollout[0],
                "text": tokenizer.decode([rollout[0]]),
                "prob": round(math.exp(float(value)), 6),
                "score": round(mean_lp - settings.entropy_penalty * mean_h, 6),
                "mean_logprob": round(mean_lp, 6),
                "mean_entropy_bits": round(mean_h, 6),
                "rollout": tokenizer.decode(rollout, skip_special_tokens=True),
            })
        best = max(candidates, key=lambda c: c["score"])  # ties: the earlier (more probable) candidate
        return Thought(token_id=int(best["token_id"]), candidates=candidates, extra_forward_passes=passes)


STRATEGIES: dict[str, type] = {"lookahead": Lookahead}


class Reasoner:
    """The engine's O1 component: `begin()` a budget per response, then `maybe_think()` at every token."""

    def __init__(self, settings: O1Settings | None = None, strategy: Strategy | None = None) -> None:
        self.settings = settings or O1Settings()
        self.strategy: Strategy = strategy or Lookahead()
        self.policy = TriggerPolicy(self.settings)

    def begin(self) -> O1Budget:
        return O1Budget()

    def maybe_think(self, engine: "SedacEngine", budget: O1Budget, logits: torch.Tensor, stats: Any, *,
                    pos: int, index: int, generation_id: int, tau_high: float,
                    banned: frozenset[int] = frozenset()) -> tuple[int, O1Event] | None:
        """None when this position does not trigger; else the token to commit and the event describing why."""
        entropy = float(stats.entropy_bits[0])
        varentropy = float(stats.varentropy[0])
        if not self.policy.should_trigger(budget, index, entropy, varentropy, tau_high):
            return None
        t0 = time.perf_counter()
        thought = self.strategy.think(engine, logits, pos, self.settings, banned)
        self.policy.record(budget, index, thought.extra_forward_passes)
        event = O1Event(
            generation_id=generation_id, index=index, entropy_bits=entropy, varentropy=varentropy,
            candidates=tuple(thought.candidates), choice=thought.token_id,
            extra_forward_passes=thought.extra_forward_passes, time_ms=(time.perf_counter() - t0) * 1000,
        )
        return thought.token_id, event
