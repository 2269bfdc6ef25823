"""O1 deep reasoning: extra compute for the positions where the model is unsure. A trigger policy (final-layer
entropy above tau_high, optionally high varentropy, spacing and a per-response budget) decides when; a pluggable
strategy (Lookahead by default) decides which token to commit, and leaves the KV cache exactly as it found it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .entropy import token_stats
from .events import O1Event

if TYPE_CHECKING:  # the engine imports this module; only type hints point back
    from .config import O1Section
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
    batched_rollouts: bool = True  # the k branches in one batch per step (False: one after another, the reference)

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


@dataclass
class Branch:
    """One candidate's rollout: its tokens (the candidate first), the log-probability of each token (nats) and the
    entropy (bits) of each distribution the rollout was chosen from."""

    tokens: list[int]
    logps: list[float]
    entropies: list[float] = field(default_factory=list)


class Lookahead:
    """Roll out each of the top-k candidates greedily for m tokens, score each branch by its mean log-probability
    under the full model minus a penalty times its mean entropy, and commit the best branch's first token.

    Batched (the default): the k branches advance together, one forward pass of k rows per step, attending to the
    engine's cached prefix in place (Anatomy.branch_layer_forward) with their own K/V in scratch buffers; the
    engine's cache is never written. Sequential: each branch runs on the engine's cache in turn, which is rolled
    back to `pos` after each; k*m single-token passes. Both choose the same tokens and scores (up to float
    rounding); the sequential one stays as the reference the batched one is tested against."""

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
        firsts: list[tuple[float, int]] = []  # (log-prob, token) of the candidates worth a rollout
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            if firsts and math.exp(value) < settings.min_candidate_prob:
                break  # the argmax is always rolled out; negligible alternatives are not
            firsts.append((float(value), int(index)))
        m = max(1, min(settings.rollout_tokens, cache.max_capacity - pos - 1))
        rollout = _rollout_batched if settings.batched_rollouts else _rollout_sequential
        branches, passes = rollout(engine, pos, firsts, m, banned)
        tokenizer = engine.bundle.tokenizer
        candidates: list[dict[str, Any]] = []
        for (value, _), br in zip(firsts, branches):
            mean_lp = sum(br.logps) / len(br.logps)
            mean_h = sum(br.entropies) / len(br.entropies) if br.entropies else 0.0
            candidates.append({
                "token_id": br.tokens[0],
                "text": tokenizer.decode([br.tokens[0]]),
                "prob": round(math.exp(value), 6),
                "score": round(mean_lp - settings.entropy_penalty * mean_h, 6),
                "mean_logprob": round(mean_lp, 6),
                "mean_entropy_bits": round(mean_h, 6),
                "rollout": tokenizer.decode(br.tokens, skip_special_tokens=True),
            })
        best = max(candidates, key=lambda c: c["score"])  # ties: the earlier (more probable) candidate
        return Thought(token_id=int(best["token_id"]), candidates=candidates, extra_forward_passes=passes)


def _next_tokens(out: torch.Tensor, banned: frozenset[int]) -> tuple[list[int], list[float], list[float]]:
    """Logits [n, vocab] -> each row's greedy next token, its log-probability and the row's entropy (bits; of the
    unbanned distribution, as the trigger sees it)."""
    lp = torch.log_softmax(out.float(), dim=-1)
    if banned:
        lp[:, list(banned)] = float("-inf")
    entropies = token_stats(out).entropy_bits.tolist()
    nxt = lp.argmax(dim=-1)
    return nxt.tolist(), lp.gather(1, nxt[:, None])[:, 0].tolist(), [float(h) for h in entropies]


def _rollout_sequential(engine: "SedacEngine", pos: int, firsts: list[tuple[float, int]], m: int,
                        banned: frozenset[int]) -> tuple[list[Branch], int]:
    """Each branch in turn on the engine's cache (positions pos.. are written, then forgotten)."""
    cache = engine._prepare_cache(pos + m + 1)
    eos = set(engine._eos)
    branches: list[Branch] = []
    passes = 0
    for value, token in firsts:
        br = Branch([token], [value])
        try:
            while len(br.tokens) <= m and br.tokens[-1] not in eos:
                out, _ = engine._forward([br.tokens[-1]], pos + len(br.tokens) - 1, False)
                passes += 1
                nxt, lp, h = _next_tokens(out.unsqueeze(0), banned)
                br.entropies.append(h[0])
                br.logps.append(lp[0])
                br.tokens.append(nxt[0])
        finally:
            cache.truncate(pos)  # exact rollback: the next forward at pos rewrites what the branch wrote
        branches.append(br)
    return branches, passes


def _rollout_batched(engine: "SedacEngine", pos: int, firsts: list[tuple[float, int]], m: int,
                     banned: frozenset[int]) -> tuple[list[Branch], int]:
    """All branches together: step t feeds each live branch's last token at position pos + t as one row of a
    batch. A branch that reaches EOS leaves the batch. The engine's cache is only read."""
    a = engine.anatomy
    cache = engine._cache
    assert cache is not None
    cos, sin = engine._cos, engine._sin
    if cos is None or sin is None or cos.shape[0] < pos + m:  # rope tables only: the cache itself stays as it is
        cos, sin = a.rope_tables(pos + m, engine.device, engine.dtype)
    eos = set(engine._eos)
    branches = [Branch([token], [value]) for value, token in firsts]
    live = [i for i, br in enumerate(branches) if br.tokens[-1] not in eos]
    shape = (len(live), a.num_kv_heads, m, a.head_dim)
    scratch_k = [torch.empty(shape, dtype=engine.dtype, device=engine.device) for _ in a.layers]
    scratch_v = [torch.empty(shape, dtype=engine.dtype, device=engine.device) for _ in a.layers]
    prefix = [(cache.keys[i][:1, :, :pos], cache.values[i][:1, :, :pos]) for i in range(a.num_layers)]
    passes = 0
    for step in range(m):
        if not live:
            break
        ids = torch.tensor([[branches[i].tokens[-1]] for i in live], device=engine.device)
        x = a.embed(ids)
        c, s = cos[pos + step : pos + step + 1], sin[pos + step : pos + step + 1]
        for layer in a.layers:
            pk, pv = prefix[layer.index]
            x = a.branch_layer_forward(layer, x, pk, pv, scratch_k[layer.index], scratch_v[layer.index], step, c, s)
        passes += len(live)
        nxt, lp, h = _next_tokens(a.logits(x[:, -1]), banned)
        keep = []
        for row, i in enumerate(live):
            br = branches[i]
            br.entropies.append(h[row])
            br.logps.append(lp[row])
            br.tokens.append(nxt[row])
            if nxt[row] not in eos:
                keep.append(row)
        if len(keep) < len(live):  # drop finished branches from the batch (and their scratch rows)
            live = [live[row] for row in keep]
            if keep and step + 1 < m:
                index = torch.tensor(keep, device=engine.device)
                scratch_k = [t.index_select(0, index) for t in scratch_k]
                scratch_v = [t.index_select(0, index) for t in scratch_v]
    return branches, passes


STRATEGIES: dict[str, type] = {"lookahead": Lookahead}


class Reasoner:
    """The engine's O1 component: `begin()` a budget per response, then `maybe_think()` at every token."""

    def __init__(self, settings: O1Settings | None = None, strategy: Strategy | None = None) -> None:
        self.settings = settings or O1Settings()
        self.strategy: Strategy = strategy or Lookahead()
        self.policy = TriggerPolicy(self.settings)

    @classmethod
    def from_config(cls, section: "O1Section") -> "Reasoner":
        """The reasoner the config's `o1` section describes (validated there: the strategy name is known)."""
        settings = O1Settings(**{f.name: getattr(section, f.name) for f in fields(O1Settings)
                                 if hasattr(section, f.name)})
        return cls(settings, STRATEGIES[section.strategy]())

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
