"""Lossless mode's drafter (self-speculative decoding, LayerSkip-style, with SEDAC's entropy-guided draft length).

A round starts from the last committed token. Where drafts that cost no layers exist, the round proposes them
and runs them all at full depth in one batched pass: the tokens that followed the last two tokens' earlier
occurrence in the context (prompt lookup), else what the model's own answers to the training prompts continued
with (Continuations); greedy rounds of own-text guesses also try the next most frequent first guesses as side
branches, checked in the same pass as a tree. On a memory-bound CPU that pass costs about one token for up to a
dozen rows (the weights are read once), so every guess the full model agrees with is a token nearly for free, and
a wrong one costs little.

Otherwise the exit heads draft: each row runs the shallow layers (1..E, the draft layer); while the exit head's
draft distribution there is confident (low entropy) the row stops at E and its draft feeds the next row. Otherwise
the row runs the remaining layers itself and drafts with a reduced head (the few thousand tokens the model itself
emits most) while that is confident; an uncertain row ends the round. Then one batched pass runs the remaining
layers for the rows that stopped at E, continuing from their hidden states and the cache, and the full LM head
scores every row at once.

Either way the engine walks the rows: a draft the full model agrees with is kept, and the first disagreement is
replaced by the full model's own token, so the output is the full model's. Every row's input is a real token and
every row is computed at every layer by the end of the round, so the cache it leaves is exact for those tokens;
the engine only rolls back its length past rejected rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import LosslessSection
from .entropy import token_stats
from .exits import ExitHeads, dedup_ids as _dedup, reduced_base_vocab

if TYPE_CHECKING:  # the engine imports this module; only type hints point back
    from .engine import SedacEngine

PROBE_MARGIN = 1.0  # bits: the exit head's probe must estimate an entropy this close to the threshold to try it
LOOKUP_KEY = 2  # prompt lookup matches this many trailing tokens
CONTINUATION_KEY = 3  # the model's own text is matched on up to this many trailing tokens (measured: 2-4 alike)
TREE_BRANCHES = 3  # greedy own-text rounds also try the 2nd and 3rd most frequent next tokens, as side branches
TREE_SIDE_TOKENS = 2  # of this many guesses each (a pass over ~12 rows costs about what one row costs)
_SPARE = 256  # room for tokens added to the draft vocabulary during a generation (every product reads it too)


@dataclass
class Block:
    """One speculation round. Row r's input sits at position start + r; its logits predict position
    start + r + 1, and its draft is the token it proposed there (None: it proposed nothing)."""

    start: int
    logits: torch.Tensor  # [rows, vocab], the full model's
    drafts: list[int | None] = field(default_factory=list)
    draft_layers: list[int] = field(default_factory=list)  # where each draft came from (draft layer or the top)
    draft_entropy: list[float] = field(default_factory=list)  # bits, of the draft distribution (nan: no head run)
    # sampling only: each draft's distribution as (token ids, probabilities), for the acceptance rule
    draft_dists: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    copied: int = 0  # drafts copied (from the context or the model's own text) rather than drafted by the layers
    source: str = ""  # where the copies came from: "context" or "own text"
    guesses: int = 0  # a tree round: every guess checked, side branches included (0: a linear round)

    @property
    def rows(self) -> int:
        return len(self.drafts)


class ReducedHead:
    """The LM head restricted to a reduced vocabulary: the model's own most frequent output tokens (from the exit
    heads' profile), then the rest in id order (BPE ids follow merge order, a rough frequency order of the
    tokenizer's corpus); per generation, plus the context's tokens (copying from the prompt is common) and every
    token committed since, less the tokens that may not be emitted. Lossless mode drafts with it; exit mode decides
    its exits with it (an entropy over a few thousand tokens instead of the whole vocabulary)."""

    def __init__(self, engine: "SedacEngine", size: int) -> None:
        a = engine.anatomy
        heads = engine.exit_heads
        self.anatomy = a
        self.base_vocab = reduced_base_vocab(heads.draft_vocab if heads is not None else None,
                                             a.lm_head_w.shape[0], size)
        self._ids = torch.empty(0, dtype=torch.int64)
        self._w = torch.empty(a.hidden_size, 0, dtype=engine.dtype, device=engine.device)
        self._n = 0
        self._in_vocab: set[int] = set()
        self._banned: frozenset[int] = frozenset()

    def begin(self, context_ids: list[int], banned: frozenset[int]) -> None:
        """A new generation: the base vocabulary plus the context's tokens, less the banned ones."""
        a = self.anatomy
        extra = [t for t in dict.fromkeys(context_ids) if 0 <= t < a.lm_head_w.shape[0]]
        ids = torch.cat([self.base_vocab, torch.tensor(extra, dtype=torch.int64)])
        ids = ids[~torch.isin(ids, torch.tensor(sorted(banned), dtype=torch.int64))] if banned else ids
        ids = _dedup(ids)
        n = len(ids)
        self._ids = torch.empty(n + _SPARE, dtype=torch.int64)
        self._ids[:n] = ids
        # input-major [hidden, capacity]: one-row products stream it fastest on CPU (see anatomy._fuse_linears)
        self._w = torch.zeros(a.hidden_size, n + _SPARE, dtype=a.lm_head_w.dtype, device=a.lm_head_w.device)
        self._w[:, :n] = a.lm_head_w[ids.to(a.lm_head_w.device)].t()
        self._n = n
        self._in_vocab = set(ids.tolist())
        self._banned = banned

    def observe(self, token_id: int) -> None:
        """A committed token: if the vocabulary lacks it, add it (the text may repeat it)."""
        if token_id in self._in_vocab or token_id in self._banned or self._n >= self._ids.shape[0]:
            return
        a = self.anatomy
        self._ids[self._n] = token_id
        self._w[:, self._n] = a.lm_head_w[token_id]
        self._n += 1
        self._in_vocab.add(token_id)

    @property
    def banned(self) -> frozenset[int]:
        """The tokens that may not be emitted in this generation."""
        return self._banned

    @property
    def ids(self) -> torch.Tensor:
        """The token ids of the current vocabulary, in the order of `logits`' columns."""
        return self._ids[: self._n]

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] (after the final norm) -> [rows, n] logits over `ids`. The product runs over the whole
        buffer (spare columns included) with the engine's matmul: a slice of it would not be contiguous, and
        torch's product on a strided weight reads it at half the speed of the skinny-matmul kernel."""
        return self.anatomy.linear(normed, self._w.t())[:, : self._n]

    def full_logits(self, reduced: torch.Tensor) -> torch.Tensor:
        """Reduced logits [n] as a full-vocabulary row: -inf outside the reduced vocabulary."""
        out = torch.full((self.anatomy.lm_head_w.shape[0],), float("-inf"), dtype=reduced.dtype,
                         device=reduced.device)
        out[self.ids.to(reduced.device)] = reduced
        return out


class Continuations:
    """What the model itself wrote next after each short run of tokens, in its own answers to the training prompts
    (the profile's draft text): for every run of 1..CONTINUATION_KEY tokens there, the token that most often
    followed (ties: the lower id). A chain of such guesses costs nothing to make, and the batched full-depth pass
    that checks it costs about one token whatever its length, so every guess the full model agrees with is a token
    almost for free."""

    def __init__(self, text: torch.Tensor, key: int = CONTINUATION_KEY) -> None:
        self.key = key
        counts: dict[tuple[int, ...], dict[int, int]] = {}
        seq: list[int] = []
        for t in text.tolist() + [-1]:
            if t < 0:
                for i in range(len(seq) - 1):
                    nxt = seq[i + 1]
                    for n in range(1, min(key, i + 1) + 1):
                        c = counts.setdefault(tuple(seq[i - n + 1 : i + 1]), {})
                        c[nxt] = c.get(nxt, 0) + 1
                seq = []
            else:
                seq.append(t)
        # per run: the followers most frequent first (ties: the lower id), at most TREE_BRANCHES of them
        self.options: dict[tuple[int, ...], tuple[int, ...]] = {
            k: tuple(sorted(c, key=lambda t: (-c[t], t))[:TREE_BRANCHES]) for k, c in counts.items()}

    def __len__(self) -> int:
        return len(self.options)

    def _followers(self, history: list[int]) -> tuple[int, ...]:
        """The followers of the longest run of trailing tokens seen in the text, most frequent first."""
        h = history[-self.key :]
        for n in range(min(self.key, len(h)), 0, -1):
            options = self.options.get(tuple(h[-n:]))
            if options is not None:
                return options
        return ()

    def first_options(self, history: list[int], banned: frozenset[int]) -> list[int]:
        """_followers less the tokens that may not be emitted (the candidate first guesses of a tree's branches)."""
        return [t for t in self._followers(history) if t not in banned]

    def chain(self, history: list[int], limit: int, banned: frozenset[int], eos: set[int] | frozenset[int]
              ) -> list[int]:
        """Up to `limit` guesses after `history`, each from the longest run of trailing tokens seen in the text;
        a banned guess ends the chain before it, an EOS after it."""
        h = history[-self.key :]
        out: list[int] = []
        while len(out) < limit:
            options = self._followers(h)
            if not options or options[0] in banned:
                break
            out.append(options[0])
            if options[0] in eos:
                break
            h = (h + [options[0]])[-self.key :]
        return out


def continuations_for(heads: ExitHeads | None) -> Continuations | None:
    """The heads' draft text as Continuations, built once per heads object (None: the profile has none)."""
    if heads is None or heads.draft_text is None or heads.draft_text.numel() == 0:
        return None
    built = getattr(heads, "_continuations", None)
    if built is None:
        built = Continuations(heads.draft_text)
        heads._continuations = built  # type: ignore[attr-defined]
    return built


class Drafter:
    """Makes Blocks for one engine (its exit heads, cache and anatomy)."""

    def __init__(self, engine: "SedacEngine", settings: LosslessSection) -> None:
        self.engine = engine
        self.settings = settings
        self.num_layers = engine.anatomy.num_layers
        self.draft_layer = self._pick_layer(settings.draft_layer)
        self.head = ReducedHead(engine, settings.draft_vocab_size)
        self.continuations = continuations_for(engine.exit_heads) if settings.own_text else None
        # a tree of guesses needs attention masks that layers with a sliding window do not take
        self._tree_ok = all(layer.window is None for layer in engine.anatomy.layers)
        self._history: list[int] = []  # the context and every committed token (for drafts copied from it)
        self._follower: dict[tuple[int, ...], int] = {}  # the last LOOKUP_KEY tokens -> where their follower sits
        self._follower1: dict[int, int] = {}  # a token -> where the token after its latest occurrence sits

    def _pick_layer(self, wanted: int) -> int:
        heads = self.engine.exit_heads
        L = self.num_layers
        if heads is None:
            return L
        if wanted:
            if wanted not in heads.layers:
                from .errors import ConfigError

                raise ConfigError(f"lossless.draft_layer is {wanted} but the exit heads are at layers "
                                  f"{', '.join(map(str, heads.layers))}; pick one of those (or 0 for the default)")
            return wanted
        chosen = (heads.meta.get("lossless") or {}).get("draft_layer")
        if chosen in heads.layers:
            return int(chosen)
        return min(heads.layers, key=lambda l: abs(l - 0.8 * L))  # measured best on the default model

    # -- the reduced draft head ------------------------------------------------------------------------------
    def begin(self, context_ids: list[int], banned: frozenset[int]) -> None:
        self.head.begin(context_ids, banned)
        self._history, self._follower, self._follower1 = [], {}, {}
        for t in context_ids:
            self._remember(t)

    def observe(self, token_id: int) -> None:
        self.head.observe(token_id)
        self._remember(token_id)

    def _remember(self, token_id: int) -> None:
        h = self._history
        if len(h) >= LOOKUP_KEY:
            self._follower[tuple(h[-LOOKUP_KEY:])] = len(h)
        if h:
            self._follower1[h[-1]] = len(h)
        h.append(int(token_id))

    def lookup(self, limit: int) -> tuple[list[int], str]:
        """Up to `limit` drafts that cost no layers, and where they come from: the tokens that followed the latest
        earlier occurrence of the last two tokens in the context ("context": prompt lookup), else what the model's
        own text continues with ("own text": see Continuations), else none (""). A banned token ends them before
        it, an EOS after it."""
        h = self._history
        if limit < 1 or not h:
            return [], ""
        j = self._follower.get(tuple(h[-LOOKUP_KEY:])) if len(h) > LOOKUP_KEY else None
        if j is not None and (out := self._copy_from(j, limit)):
            return out, "context"
        if self.continuations is not None:
            out = self.continuations.chain(h, limit, self.head.banned, self.engine._eos)
            if out:
                return out, "own text"
        return [], ""

    def _copy_from(self, j: int, limit: int) -> list[int]:
        """Up to `limit` tokens of the history from index j on; a banned token ends them before it, an EOS after."""
        out: list[int] = []
        for t in self._history[j : j + limit]:
            if t in self.head.banned:
                break
            out.append(t)
            if t in self.engine._eos:
                break
        return out

    def _draft(self, normed: torch.Tensor, temperature: float, generator: torch.Generator | None
               ) -> tuple[int, float, tuple[torch.Tensor, torch.Tensor] | None]:
        """Reduced-head draft from a normalised state [1, hidden]: (token, entropy in bits, distribution)."""
        logits = self.head.logits(normed)
        stats = token_stats(logits)
        entropy = float(stats.entropy_bits[0])
        ids = self.head.ids
        if temperature > 0 and generator is not None:
            probs = torch.softmax(logits[0].float() / temperature, dim=-1)
            choice = int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
            return int(ids[choice]), entropy, (ids.clone(), probs)
        return int(ids[int(stats.argmax[0])]), entropy, None

    # -- one round ---------------------------------------------------------------------------------------------
    def propose(self, token_id: int, pos: int, max_rows: int, *, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> Block:
        """Draft from `token_id` at position `pos` (the cache holds exactly 0..pos-1), verify, and return the
        full model's logits for every row. The cache then holds positions 0..pos+rows-1, all computed."""
        e = self.engine
        a = e.anatomy
        heads = e.exit_heads
        s = self.settings
        E, L = self.draft_layer, self.num_layers
        cache = e._prepare_cache(pos + max(1, min(max_rows, s.max_draft_tokens)))
        assert e._cos is not None and e._sin is not None
        eos = e._eos
        block = Block(start=pos, logits=torch.empty(0))
        limit = min(s.lookup_tokens, max_rows - 1, s.max_draft_tokens - 1)
        copied, source = self.lookup(limit)
        if copied and self._history[-1] == token_id:  # (lookup copies only when the history has tokens)
            block.source = source
            sampling = temperature > 0 and generator is not None
            if source == "own text" and not sampling and self._tree_ok:
                branches = self._side_branches(copied, limit)
                rows = 1 + sum(len(b) for b in branches)
                if len(branches) > 1 and pos + rows <= e.bundle.context_length:
                    e._prepare_cache(pos + rows)
                    return self._tree_block(block, token_id, branches)
            return self._copied_block(block, [token_id, *copied], sampling)
        states: list[torch.Tensor] = []  # per row: the top layer's output, or layer E's for rows that stopped there
        inputs: list[int] = []
        shallow_from: int | None = None
        tok = token_id
        for r in range(max(1, min(max_rows, s.max_draft_tokens))):
            p = pos + r
            cos, sin = e._cos[p : p + 1], e._sin[p : p + 1]
            x = a.embed(torch.tensor([[tok]], device=e.device))
            for layer in a.layers[:E]:
                x = a.layer_forward(layer, x, cache, p, cos, sin)
            inputs.append(tok)
            draft, entropy, dist, depth = None, float("nan"), None, L
            if E < L and heads is not None:
                normed = a.rms_norm(heads.translate(E, x[:, -1], a.linear), a.final_norm_w)
                if shallow_from is not None or float(heads.predicted_entropy(E, normed[0])) < (
                        s.exit_draft_entropy + PROBE_MARGIN):
                    cand, entropy, cand_dist = self._draft(normed, temperature, generator)
                    if entropy < s.exit_draft_entropy:
                        draft, dist, depth = cand, cand_dist, E
            if depth == E or shallow_from is not None:
                shallow_from = r if shallow_from is None else shallow_from
                depth = E
            else:
                for layer in a.layers[E:]:
                    x = a.layer_forward(layer, x, cache, p, cos, sin)
                if s.full_draft_entropy > 0:
                    cand, entropy, cand_dist = self._draft(a.rms_norm(x[:, -1], a.final_norm_w), temperature,
                                                           generator)
                    if entropy < s.full_draft_entropy:
                        draft, dist = cand, cand_dist
            states.append(x[:, -1])
            block.drafts.append(draft)
            block.draft_layers.append(depth)
            block.draft_entropy.append(entropy)
            block.draft_dists.append(dist)
            if draft is None or draft in eos:
                break
            tok = draft
        rows = len(inputs)
        if shallow_from is not None:  # verification: the remaining layers for the rows that stopped at E, at once
            n = rows - shallow_from
            start = pos + shallow_from
            x = torch.stack(states[shallow_from:], dim=1)  # [1, n, hidden]
            cos, sin = e._cos[start : start + n], e._sin[start : start + n]
            for layer in a.layers[E:]:
                x = a.layer_forward(layer, x, cache, start, cos, sin)
            states[shallow_from:] = list(x[0].unsqueeze(1))
        block.logits = a.logits(torch.cat(states, dim=0))  # [rows, vocab]: one LM-head pass for the round
        cache.length = pos + rows
        cache.token_ids[pos:] = inputs
        return block

    def _side_branches(self, main: list[int], limit: int) -> list[list[int]]:
        """The own-text chain `main`, plus short chains from the next most frequent first guesses, plus the tokens
        that followed the last token's latest earlier occurrence in the context (a one-token prompt lookup)."""
        c = self.continuations
        assert c is not None
        h = self._history
        banned, eos = self.head.banned, self.engine._eos
        limit = min(TREE_SIDE_TOKENS, limit)  # (`limit`: the most guesses a branch may hold this round)
        branches = [main]
        for first in c.first_options(h, banned):
            if first == main[0] or len(branches) >= TREE_BRANCHES:
                continue
            rest = [] if first in eos else c.chain([*h, first], limit - 1, banned, eos)
            branches.append([first, *rest])
        j = self._follower1.get(h[-1])
        copy = self._copy_from(j, limit) if j is not None else []
        if copy and all(copy[0] != b[0] for b in branches):
            branches.append(copy)
        return branches

    def _tree_block(self, block: Block, root: int, branches: list[list[int]]) -> Block:
        """Greedy rounds: several chains of guesses from one root, checked in one batched full-depth pass as a
        tree (each row attends to the cache and its own ancestors only, at its own depth's position). The path
        the full model agrees with is then moved to the slots right after the root, so the cache and the Block
        are those of a linear round that guessed just that path."""
        e = self.engine
        a = e.anatomy
        pos = block.start
        cache = e._cache
        assert cache is not None and e._cos is not None and e._sin is not None
        tokens, parent, depth = [root], [-1], [0]
        for branch in branches:
            up = 0
            for d, t in enumerate(branch, 1):
                tokens.append(t)
                parent.append(up)
                depth.append(d)
                up = len(tokens) - 1
        T = len(tokens)
        tree = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            j = i
            while j >= 0:
                tree[i, j] = True
                j = parent[j]
        mask = torch.cat([torch.ones(T, pos, dtype=torch.bool), tree], dim=1).to(e.device)
        at = torch.tensor(depth, device=e.device) + pos
        cos, sin = e._cos[at], e._sin[at]
        x = a.embed(torch.tensor([tokens], device=e.device))
        for layer in a.layers:
            x = a.layer_forward(layer, x, cache, pos, cos, sin, mask=mask)
        logits = a.logits(x[0])  # [T, vocab]
        # the full model's greedy path through the tree (as the engine will choose: banned tokens never)
        choice = logits
        if self.head.banned:
            choice = logits.clone()
            choice[:, sorted(self.head.banned)] = float("-inf")
        best = choice.argmax(dim=-1).tolist()
        path = [0]
        while True:
            child = next((i for i in range(T) if parent[i] == path[-1] and tokens[i] == best[path[-1]]), None)
            if child is None:
                break
            path.append(child)
        n = len(path)
        idx = torch.tensor(path, device=e.device) + pos
        for layer in range(a.num_layers):  # the path's K/V to slots pos..pos+n-1 (sources never lie below them)
            cache.keys[layer][:, :, pos : pos + n] = cache.keys[layer][:, :, idx]
            cache.values[layer][:, :, pos : pos + n] = cache.values[layer][:, :, idx]
        block.states = x[0][path]
        block.logits = logits[path]
        for r in range(n):
            block.drafts.append(tokens[path[r + 1]] if r + 1 < n else None)
            block.draft_layers.append(self.num_layers)
            block.draft_entropy.append(float("nan"))
            block.draft_dists.append(None)
        block.copied = n - 1
        block.guesses = T - 1
        cache.length = pos + n
        cache.token_ids[pos:] = [tokens[i] for i in path]
        return block

    def _copied_block(self, block: Block, inputs: list[int], sampling: bool) -> Block:
        """A round of drafts that cost no layers (copied from the context or guessed from the model's own text):
        every row runs at full depth in one batched pass (the weights are read once for all of them), so a guess
        the full model agrees with costs a fraction of a token."""
        e = self.engine
        a = e.anatomy
        pos, T = block.start, len(inputs)
        cache = e._cache
        assert cache is not None and e._cos is not None and e._sin is not None
        x = a.embed(torch.tensor([inputs], device=e.device))
        cos, sin = e._cos[pos : pos + T], e._sin[pos : pos + T]
        for layer in a.layers:
            x = a.layer_forward(layer, x, cache, pos, cos, sin)
        block.logits = a.logits(x[0])  # [T, vocab]
        for r in range(T):
            draft = inputs[r + 1] if r + 1 < T else None
            block.drafts.append(draft)
            block.draft_layers.append(self.num_layers)
            block.draft_entropy.append(float("nan"))
            # sampling: a copied draft is a point mass, which the acceptance rule handles like any draft
            block.draft_dists.append((torch.tensor([draft]), torch.ones(1)) if sampling and draft is not None
                                     else None)
        block.copied = T - 1
        cache.length = pos + T
        cache.token_ids[pos:] = inputs
        return block



def accept_sampled(target: torch.Tensor, draft: int, dist: tuple[torch.Tensor, torch.Tensor],
                   generator: torch.Generator) -> tuple[int, bool]:
    """Speculative sampling's rule: keep the draft with probability min(1, p(d) / q(d)); otherwise draw from the
    normalised residual max(0, p - q). `target` is the full model's sampling distribution p over the vocabulary,
    `dist` the draft's (ids, q). The committed token is then distributed exactly as p."""
    ids, q_sub = dist
    q = torch.zeros_like(target)
    q[ids.to(target.device)] = q_sub.to(target.dtype)
    p_d, q_d = float(target[draft]), float(q[draft])
    u = float(torch.rand(1, generator=generator))
    if q_d > 0 and u * q_d < p_d:
        return draft, True
    residual = (target - q).clamp_min(0)
    total = float(residual.sum())
    if total <= 0:  # p == q (numerically): any draw from p is right
        residual, total = target, float(target.sum())
    choice = torch.multinomial((residual / total).cpu(), 1, generator=generator)
    return int(choice.item()), False
