"""O1 deep reasoning on tiny models: the trigger policy on crafted distributions, exact cache rollback after a
lookahead (the output equals a fresh run forced to make the same choices), batched rollouts equal to sequential
ones, branch scoring on a model built so the better branch is known, the engine controls, the `o1` config section,
the eval's dev/test split, and O1 events through a recorded session."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_bundle
from sedac_core.config import O1_STRATEGIES, SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.errors import ConfigError
from sedac_core.entropy import token_stats
from sedac_core.events import Event, GenerationEnd, ModeChange, O1Event
from sedac_core.o1_eval import EvalItem, load_eval_items, paired_bootstrap_ci
from sedac_core.reasoning import STRATEGIES, Lookahead, O1Budget, O1Settings, Reasoner, Thought, TriggerPolicy
from sedac_core.session import SessionRecorder, read_session

V = 400


def _logits_with_entropy(kind: str) -> torch.Tensor:
    if kind == "uniform":  # log2(400) = 8.64 bits
        return torch.zeros(V)
    if kind == "peaked":  # ~0 bits
        z = torch.zeros(V)
        z[7] = 30.0
        return z
    if kind == "two-way":  # 1 bit, varentropy ~0 (both outcomes equally surprising)
        z = torch.full((V,), -1e9)
        z[3] = z[5] = 0.0
        return z
    raise ValueError(kind)


class _FixedChoice:
    """A strategy that always picks one token and reports a fixed cost (the policy under test, not the search)."""

    name = "fixed"

    def __init__(self, token: int, passes: int) -> None:
        self.token, self.passes = token, passes

    def think(self, engine, logits, pos, settings, banned=frozenset()):
        return Thought(token_id=self.token, candidates=[{"token_id": self.token, "score": 0.0}],
                       extra_forward_passes=self.passes)


# -- trigger policy ------------------------------------------------------------------------------------------------
def test_trigger_threshold_on_crafted_distributions():
    policy = TriggerPolicy(O1Settings())
    for kind, tau, expected in [("uniform", 8.0, True), ("uniform", 8.7, False), ("peaked", 0.5, False),
                                ("two-way", 0.99, True), ("two-way", 1.01, False)]:
        s = token_stats(_logits_with_entropy(kind).unsqueeze(0))
        got = policy.should_trigger(O1Budget(), 0, float(s.entropy_bits[0]), float(s.varentropy[0]), tau)
        assert got is expected, (kind, tau)
    assert not policy.should_trigger(O1Budget(), 0, float("nan"), 1.0, 0.0)


def test_varentropy_condition():
    policy = TriggerPolicy(O1Settings(min_varentropy=0.5))
    two_way = token_stats(_logits_with_entropy("two-way").unsqueeze(0))  # 1 bit, varentropy 0
    skewed = torch.full((V,), -1e9)
    skewed[:50] = torch.linspace(0, -8, 50)  # several candidates of different surprisal: varentropy > 0.5
    sk = token_stats(skewed.unsqueeze(0))
    assert float(two_way.varentropy[0]) < 1e-3 and float(sk.varentropy[0]) > 0.5
    assert not policy.should_trigger(O1Budget(), 0, float(two_way.entropy_bits[0]), float(two_way.varentropy[0]), 0.5)
    assert policy.should_trigger(O1Budget(), 0, float(sk.entropy_bits[0]), float(sk.varentropy[0]), 0.5)


def test_spacing_and_budgets():
    s = O1Settings(min_spacing=3, max_triggers=2, max_extra_passes=100, top_k=2, rollout_tokens=2)
    policy = TriggerPolicy(s)
    budget = O1Budget()
    fired = []
    for index in range(12):
        if policy.should_trigger(budget, index, 9.0, 1.0, 5.0):
            policy.record(budget, index, s.passes_per_trigger())
            fired.append(index)
    assert fired == [0, 3]  # spacing 3, then the trigger budget is spent
    assert budget.extra_passes == 8
    # the pass budget binds first: 4 passes per trigger, 9 allowed -> 2 triggers
    s2 = O1Settings(min_spacing=1, max_triggers=10, max_extra_passes=9, top_k=2, rollout_tokens=2)
    policy2, budget2 = TriggerPolicy(s2), O1Budget()
    fired2 = []
    for index in range(10):
        if policy2.should_trigger(budget2, index, 9.0, 1.0, 5.0):
            policy2.record(budget2, index, s2.passes_per_trigger())
            fired2.append(index)
    assert fired2 == [0, 1]


def test_engine_triggers_follow_the_policy(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    engine.reasoner = Reasoner(O1Settings(min_spacing=5, max_triggers=3), strategy=_FixedChoice(42, 6))
    engine.set_thresholds(tau_high=1.0)  # the tiny random model is always above this
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=16, ignore_eos=True, o1=True))
    o1 = [e for e in result.events if isinstance(e, O1Event)]
    assert [e.index for e in o1] == [0, 5, 10]
    assert all(e.choice == 42 and e.extra_forward_passes == 6 for e in o1)
    tokens = result.token_events
    assert [t.index for t in tokens if t.decision == "o1"] == [0, 5, 10]
    assert all(tokens[i].token_id == 42 for i in (0, 5, 10))
    assert result.events[-1].o1_triggers == 3
    # the event comes right before its token
    i = result.events.index(o1[0])
    assert result.events[i + 1].index == 0 and result.events[i + 1].decision == "o1"
    # above every entropy: no trigger
    engine.set_thresholds(tau_high=19.0)
    quiet = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=8, ignore_eos=True, o1=True))
    assert quiet.events[-1].o1_triggers == 0


def test_o1_trigger_entropy_overrides_tau_high(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    engine.reasoner = Reasoner(O1Settings(min_spacing=5, max_triggers=3), strategy=_FixedChoice(42, 6))
    req = lambda: GenerationRequest(prompt="Hello", max_new_tokens=12, ignore_eos=True, o1=True)  # noqa: E731
    engine.set_thresholds(tau_high=19.0)  # above every entropy of the tiny model
    engine.config.o1.trigger_entropy = 1.0  # O1's own trigger: below every entropy
    assert engine.o1_threshold == 1.0
    assert engine.generate(req()).events[-1].o1_triggers == 3
    engine.set_thresholds(tau_high=1.0)
    engine.config.o1.trigger_entropy = 19.0
    assert engine.generate(req()).events[-1].o1_triggers == 0
    engine.config.o1.trigger_entropy = None  # null: tau_high again, live
    assert engine.o1_threshold == engine.tau_high == 1.0
    assert engine.generate(req()).events[-1].o1_triggers == 3


# -- engine controls -----------------------------------------------------------------------------------------------
def test_o1_is_off_by_default_and_toggles(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    engine.set_thresholds(tau_high=1.0)
    assert engine.features["o1"] is True
    off = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, ignore_eos=True))
    assert off.events[-1].o1_triggers == 0
    seen = []
    engine.bus.subscribe(seen.append)
    change = engine.set_features(o1=True)
    assert isinstance(change, ModeChange) and change.enable_o1_reasoning is True and seen[-1] == change
    on = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, ignore_eos=True))
    assert on.events[-1].o1_triggers >= 1
    assert engine.session_header().config["sedac"]["enable_o1_reasoning"] is True
    forced_off = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, ignore_eos=True, o1=False))
    assert forced_off.events[-1].o1_triggers == 0
    assert engine.set_features(o1=False).enable_o1_reasoning is False


# -- exact rollback ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_output_after_triggers_equals_a_fresh_forced_run(arch):
    engine = SedacEngine(make_bundle(arch, seed=1))
    engine.reasoner = Reasoner(O1Settings(min_spacing=2, max_triggers=4, max_extra_passes=100, top_k=3,
                                          rollout_tokens=3, min_candidate_prob=0.0))
    engine.set_thresholds(tau_high=1.0)
    req = dict(prompt="The capital of France is", max_new_tokens=14, ignore_eos=True)
    engine.reset()
    with_o1 = engine.generate(GenerationRequest(o1=True, **req))
    o1 = [e for e in with_o1.events if isinstance(e, O1Event)]
    assert len(o1) == 4 and all(e.extra_forward_passes == 9 for e in o1)
    toks = with_o1.token_events
    assert any(e.choice != e.candidates[0]["token_id"] for e in o1), "no trigger changed the greedy choice"
    # a fresh run fed the same tokens (no O1) sees exactly the same distributions at every position
    engine.reset()
    fresh = engine.generate(GenerationRequest(o1=False, forced_tokens=with_o1.token_ids, **req)).token_events
    assert len(fresh) == len(toks)
    for a, b in zip(toks, fresh):
        assert a.entropy_bits == b.entropy_bits and a.top_tokens == b.top_tokens, a.index
    # and where O1 did not trigger, the O1 run chose exactly the fresh run's greedy token
    triggered = {e.index for e in o1}
    for a, b in zip(toks, fresh):
        if a.index not in triggered:
            assert a.token_id == b.token_id


@pytest.mark.parametrize("batched", [True, False])
def test_lookahead_leaves_the_cache_bit_identical(tiny_qwen2_bundle, batched):
    engine = SedacEngine(tiny_qwen2_bundle)
    with torch.inference_mode():
        ids = engine.bundle.chat.encode([{"role": "user", "content": "Hello there"}])
        cache = engine._prepare_cache(len(ids) + 8)
        logits, _ = engine._forward(ids, 0, False)
        pos = cache.length
        keys = [k[:, :, :pos].clone() for k in cache.keys]
        values = [v[:, :, :pos].clone() for v in cache.values]
        fill, token_ids = cache.fill[:, :pos].clone(), list(cache.token_ids)
        thought = Lookahead().think(engine, logits, pos, O1Settings(top_k=3, rollout_tokens=4,
                                                                    min_candidate_prob=0.0, batched_rollouts=batched),
                                        banned=frozenset(engine._eos))  # EOS would end its rollout early
        assert thought.extra_forward_passes == 12 and len(thought.candidates) == 3
        assert cache.length == pos and cache.token_ids == token_ids
        assert torch.equal(cache.fill[:, :pos], fill) and not cache.fill[:, pos:].any()
        assert all(torch.equal(k[:, :, :pos], k0) for k, k0 in zip(cache.keys, keys))
        assert all(torch.equal(v[:, :, :pos], v0) for v, v0 in zip(cache.values, values))
        # the next step after the rollback equals a fresh run's
        after, _ = engine._forward([thought.token_id], pos, False)
        engine.reset()
        engine._forward(ids, 0, False)
        fresh, _ = engine._forward([thought.token_id], pos, False)
        assert torch.equal(after, fresh)


# -- branch scoring on a model where the better branch is known ---------------------------------------------------
P_DIM, A, B, C, D, E = 0, 100, 101, 102, 103, 104


def _bigram_engine() -> tuple[SedacEngine, list[int]]:
    """A tiny Llama whose layers are identities (o_proj and down_proj zeroed), so the next-token distribution
    depends only on the current token: a bigram model we write by hand. After the prompt's last token: A (p=0.5)
    or B (p=0.4). After A the model knows nothing (uniform); after B it continues confidently B C D E C ...
    Greedy takes A; a lookahead that sees one token ahead must take B."""
    bundle = make_bundle("llama", seed=5)
    model = bundle.model
    prompt_ids = list(bundle.tokenizer("Hello there", add_special_tokens=True)["input_ids"])
    last = prompt_ids[-1]
    assert last not in (A, B, C, D, E)
    dims = {last: 0, A: 1, B: 2, C: 3, D: 4, E: 5}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, :6] = 0.0  # every other token reads nothing from the hand-written columns: uniform next token
        for tok, dim in dims.items():
            emb[tok].zero_()
            emb[tok, dim] = 1.0  # after the final RMSNorm: 8.0 on that dimension (sqrt(hidden=64))
        w = model.lm_head.weight
        w.zero_()
        # after the prompt: p(A) = 0.5, p(B) = 0.4, the other 398 tokens share 0.1
        w[A, 0] = math.log(1990.0) / 8
        w[B, 0] = math.log(1592.0) / 8
        for src, dst in ((B, C), (C, D), (D, E), (E, C)):
            w[dst, dims[src]] = 3.0  # logit 24 against 0: near certain
    return SedacEngine(bundle), prompt_ids


def test_lookahead_prefers_the_confident_branch():
    engine, prompt_ids = _bigram_engine()
    settings = O1Settings(top_k=2, rollout_tokens=3, entropy_penalty=0.1)
    with torch.inference_mode():
        engine._prepare_cache(len(prompt_ids) + 8)
        logits, _ = engine._forward(prompt_ids, 0, False)
        probs = torch.softmax(logits, -1)
        assert int(logits.argmax()) == A
        assert float(probs[A]) == pytest.approx(0.5, abs=1e-3) and float(probs[B]) == pytest.approx(0.4, abs=1e-3)
        thought = Lookahead().think(engine, logits, len(prompt_ids), settings)
    by_token = {c["token_id"]: c for c in thought.candidates}
    assert thought.token_id == B
    assert by_token[A]["mean_entropy_bits"] == pytest.approx(math.log2(V), abs=1e-3)
    assert by_token[B]["mean_entropy_bits"] < 1e-3
    # score = mean log-prob of [candidate, 3 greedy tokens] - 0.1 * mean entropy of the 3 rollout steps
    assert by_token[B]["score"] == pytest.approx(math.log(0.4) / 4, abs=1e-3)
    assert by_token[A]["score"] == pytest.approx((math.log(0.5) + 3 * math.log(1 / V)) / 4 - 0.1 * math.log2(V),
                                                 abs=1e-3)
    assert thought.extra_forward_passes == 6


def test_engine_commits_the_better_branch_and_continues_from_it():
    engine, _ = _bigram_engine()
    engine.reasoner = Reasoner(O1Settings(top_k=2, rollout_tokens=3, max_triggers=1))
    engine.set_thresholds(tau_high=2.0)  # the fork after the prompt has 2.2 bits
    req = dict(prompt="Hello there", raw_prompt=True, max_new_tokens=6, ignore_eos=True)
    greedy = engine.generate(GenerationRequest(o1=False, **req))
    assert greedy.token_ids[0] == A
    result = engine.generate(GenerationRequest(o1=True, **req))
    assert result.token_ids == [B, C, D, E, C, D]
    (event,) = [e for e in result.events if isinstance(e, O1Event)]
    assert event.index == 0 and event.choice == B and event.entropy_bits == pytest.approx(2.22, abs=0.01)
    assert [c["token_id"] for c in event.candidates] == [A, B]


# -- events --------------------------------------------------------------------------------------------------------
def test_o1_events_serialise_and_replay(tmp_path, tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    engine.set_thresholds(tau_high=1.0)
    path = tmp_path / "o1.jsonl"
    with SessionRecorder(path, engine.session_header()).attach(engine.bus):
        result = engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=10, ignore_eos=True, o1=True))
    live = [e for e in result.events if isinstance(e, O1Event)]
    assert live and all(len(e.candidates) >= 1 and "rollout" in e.candidates[0] for e in live)
    for e in live:
        assert Event.from_json(e.to_json()) == e
    session = read_session(path)
    replayed = [e for e in session.events if isinstance(e, O1Event)]
    assert replayed == live
    end = [e for e in session.events if isinstance(e, GenerationEnd)][-1]
    assert end.o1_triggers == len(live)
    assert [t.decision for t in session.events if t.type == "token"].count("o1") == len(live)


# -- eval set and scoring ------------------------------------------------------------------------------------------
def test_eval_set_and_scoring_rules():
    items = load_eval_items()
    assert len(items) == 200 and len({i.id for i in items}) == 200  # dev + test
    assert {i.kind for i in items} == {"arith", "count", "capital", "fact"}
    six_seven = EvalItem(id="x", kind="arith", question="What is 6 * 7?", answers=("42", "forty-two"), rule="number")
    assert six_seven.score("6 * 7 = 42")
    assert six_seven.score("The answer is 42.")
    assert not six_seven.score("6 * 7 = 24, not 42")  # the first number after '=' is the answer
    assert not six_seven.score("6 times 7")
    cap = EvalItem(id="y", kind="capital", question="What is the capital of Italy?", answers=("Rome",))
    assert cap.score("The capital of Italy is Rome.") and not cap.score("Romeo")
    lo, hi = paired_bootstrap_ci([False] * 10, [True] * 10)
    assert lo == hi == 1.0


def test_eval_splits_are_disjoint_and_tuning_never_sees_test():
    dev, test = load_eval_items(split="dev"), load_eval_items(split="test")
    assert len(dev) == len(test) == 100
    assert not {i.id for i in dev} & {i.id for i in test}
    assert not {i.question.lower() for i in dev} & {i.question.lower() for i in test}
    assert {i.kind for i in test} == {"arith", "count", "capital", "fact"}
    assert len(load_eval_items(split="all")) == len(load_eval_items()) == 200
    with pytest.raises(ConfigError, match="unknown O1 eval split 'train'"):
        load_eval_items(split="train")
    for item in test:  # the number rule skips the question's operands: an answer must not be one of them
        if item.kind == "arith":
            assert not item.score(item.question), item.id


# -- batched rollouts ----------------------------------------------------------------------------------------------
def _prefilled(engine: SedacEngine, text: str) -> tuple[torch.Tensor, int]:
    ids = engine.bundle.chat.encode([{"role": "user", "content": text}])
    engine._prepare_cache(len(ids) + 8)
    logits, _ = engine._forward(ids, 0, False)
    return logits, len(ids)


def _same_thoughts(seq: Thought, bat: Thought) -> None:
    assert bat.token_id == seq.token_id and bat.extra_forward_passes == seq.extra_forward_passes
    assert len(bat.candidates) == len(seq.candidates)
    for a, b in zip(seq.candidates, bat.candidates):
        assert (a["token_id"], a["rollout"], a["prob"]) == (b["token_id"], b["rollout"], b["prob"])
        for key in ("score", "mean_logprob", "mean_entropy_bits"):
            assert b[key] == pytest.approx(a[key], abs=2e-5), key


@pytest.mark.parametrize("arch, window", [("llama", None), ("qwen2", None), ("qwen2", 12), ("llama", 3)])
def test_batched_rollouts_equal_sequential(arch, window):
    engine = SedacEngine(make_bundle(arch, seed=2))
    if window is not None:  # sliding-window layers (Mistral/Qwen2 style): the prefix, then the branch, is cut
        for layer in engine.anatomy.layers[::2]:
            layer.window = window
    with torch.inference_mode():
        logits, pos = _prefilled(engine, "The capital of France is")
        cache = engine._cache
        before = ([k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.fill.clone(),
                  cache.length, list(cache.token_ids), cache.capacity)
        thoughts = {}
        for batched in (True, False):
            s = O1Settings(top_k=4, rollout_tokens=6, min_candidate_prob=0.0, batched_rollouts=batched)
            thoughts[batched] = Lookahead().think(engine, logits, pos, s)
            if batched:  # the batched rollout only reads the cache: every buffer, fill kind and length as before
                assert all(torch.equal(k, k0) for k, k0 in zip(cache.keys, before[0]))
                assert all(torch.equal(v, v0) for v, v0 in zip(cache.values, before[1]))
                assert torch.equal(cache.fill, before[2])
                assert (cache.length, cache.token_ids, cache.capacity) == before[3:]
    assert thoughts[True].extra_forward_passes == 24
    _same_thoughts(thoughts[False], thoughts[True])


def test_batched_rollouts_drop_branches_that_end():
    """A branch that reaches EOS leaves the batch; the others go on, as in the sequential rollouts."""
    engine, prompt_ids = _bigram_engine()
    (eos,) = engine._eos
    with torch.no_grad():  # B -> C -> EOS now: B's rollout ends after two steps
        w = engine.bundle.model.lm_head.weight
        w[D, 3] = 0.0
        w[eos, 3] = 3.0
    thoughts = {}
    with torch.inference_mode():
        engine._prepare_cache(len(prompt_ids) + 8)
        logits, _ = engine._forward(prompt_ids, 0, False)
        for batched in (True, False):
            s = O1Settings(top_k=3, rollout_tokens=4, min_candidate_prob=0.0, batched_rollouts=batched)
            thoughts[batched] = Lookahead().think(engine, logits, len(prompt_ids), s)
    by_token = {c["token_id"]: c for c in thoughts[True].candidates}
    assert by_token[B]["rollout"] == engine.bundle.tokenizer.decode([B, C], skip_special_tokens=True)
    assert thoughts[True].extra_forward_passes == 4 + 2 + 4
    _same_thoughts(thoughts[False], thoughts[True])


def test_engine_output_is_the_same_with_batched_and_sequential_rollouts():
    engine = SedacEngine(make_bundle("llama", seed=1))
    engine.reasoner = Reasoner(O1Settings(min_spacing=2, max_triggers=4, max_extra_passes=100, top_k=3,
                                          rollout_tokens=3, min_candidate_prob=0.0))
    engine.set_thresholds(tau_high=1.0)
    req = dict(prompt="The capital of France is", max_new_tokens=14, ignore_eos=True, o1=True)
    runs = {}
    for batched in (True, False):
        engine.reasoner.settings.batched_rollouts = batched
        engine.reset()
        runs[batched] = engine.generate(GenerationRequest(**req))
    assert runs[True].token_ids == runs[False].token_ids
    o1 = {b: [e for e in r.events if isinstance(e, O1Event)] for b, r in runs.items()}
    assert len(o1[True]) == 4 and [e.choice for e in o1[True]] == [e.choice for e in o1[False]]


# -- the o1 config section -----------------------------------------------------------------------------------------
def test_o1_config_section_reaches_the_engine(tmp_path, tiny_llama_bundle):
    p = tmp_path / "c.yaml"
    p.write_text("sedac:\n  enable_o1_reasoning: true\no1:\n  top_k: 2\n  rollout_tokens: 5\n"
                 "  entropy_penalty: 0.3\n  min_spacing: 6\n  max_triggers: 3\n  max_extra_passes: 30\n"
                 "  min_varentropy: 1.5\n  strategy: lookahead\n")
    cfg = SedacConfig.load(p)
    engine = SedacEngine(tiny_llama_bundle, cfg)
    s = engine.reasoner.settings
    assert (s.top_k, s.rollout_tokens, s.entropy_penalty, s.min_spacing, s.max_triggers, s.max_extra_passes,
            s.min_varentropy) == (2, 5, 0.3, 6, 3, 30, 1.5)
    assert isinstance(engine.reasoner.strategy, Lookahead)
    assert engine.session_header().config["o1"]["top_k"] == 2
    defaults = SedacEngine(tiny_llama_bundle).reasoner.settings
    assert vars(defaults) == vars(O1Settings())  # the config's defaults are the reasoner's
    assert set(STRATEGIES) == set(O1_STRATEGIES)


@pytest.mark.parametrize(
    "text, match",
    [
        ("o1:\n  top_k: 0\n", "'o1.top_k' is 0, out of range"),
        ("o1:\n  rollout_tokens: 2.5\n", "'o1.rollout_tokens' must be an integer"),
        ("o1:\n  strategy: mcts\n", "'o1.strategy' is 'mcts'; choose one of: lookahead"),
        ("o1:\n  min_varentropy: lots\n", "'o1.min_varentropy' must be a number or null"),
        ("o1:\n  min_varentropy: -1\n", "'o1.min_varentropy' is -1, out of range"),
        ("o1:\n  entropy_penalty: -0.1\n", "'o1.entropy_penalty' is -0.1, out of range"),
        ("o1:\n  min_spacing: 0\n", "'o1.min_spacing' is 0, out of range"),
        ("o1:\n  top_k: 5\n  rollout_tokens: 8\n", "o1.top_k \\* o1.rollout_tokens = 40 passes"),
        ("o1:\n  k: 3\n", "unknown key 'o1.k'"),
        ("o1:\n  trigger_entropy: 0\n", "'o1.trigger_entropy' is 0, out of range"),
        ("o1:\n  trigger_entropy: high\n", "'o1.trigger_entropy' must be a number of bits or null"),
    ],
)
def test_bad_o1_config_names_the_key(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        SedacConfig.load(p)


def test_tune_o1_sets_the_o1_trigger_and_reports_every_point(tiny_llama_bundle):
    from sedac_core.o1_eval import tune_o1

    engine = SedacEngine(tiny_llama_bundle)
    items = load_eval_items(split="dev")[:3]
    tau_high = engine.tau_high
    report = tune_o1(engine, items, tau_highs=(1.0, 19.0), top_k_rollouts=((2, 2),), max_new_tokens=4,
                     echo=lambda s: None)
    assert [(p["tau_high"], p["top_k"], p["rollout_tokens"]) for p in report["points"]][:2] == [
        (1.0, 3, 4), (19.0, 3, 4)]
    assert len(report["points"]) == 3 and report["n"] == 3
    quiet = report["points"][1]
    assert quiet["triggers_per_response"] == 0 and quiet["diff"] == 0  # 19 bits: O1 never fires
    assert engine.o1_threshold == report["best"]["tau_high"]  # left at the pick
    assert engine.tau_high == tau_high  # the heatmap's tau_high is not O1's knob
