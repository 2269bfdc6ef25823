"""Lossless mode (self-speculative decoding): greedy output identical to full depth whatever the drafts are, exact
cache rollback, draft events, the sampling acceptance rule, and the fallbacks."""

from __future__ import annotations

import json
import dataclasses

import pytest
import torch

from conftest import make_bundle, make_exit_heads
from sedac_core.cache import FILL_COMPUTED
from sedac_core.config import ConfigError, LosslessSection, SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import GenerationEnd, Notice, TokenEvent
from sedac_core.speculative import Continuations, accept_sampled

PROMPTS = ["Hello", "def add(a, b):", "The capital of France is", "Entropy 7"]


def _engine(arch="llama", layers=6, seed=3, heads_scale=0.0, **lossless) -> SedacEngine:
    bundle = make_bundle(arch, layers=layers, seed=seed)
    config = SedacConfig()
    config.lossless = dataclasses.replace(config.lossless, **lossless)
    engine = SedacEngine(bundle, config)
    engine.use_exit_heads(make_exit_heads(bundle, [2, layers - 2], scale=heads_scale), apply_calibration=False)
    return engine


def _pair(engine, prompt, n, **kw):
    engine.reset()
    full = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="full", **kw))
    engine.reset()
    lossless = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="lossless", **kw))
    return full, lossless


SETTINGS = {
    # drafts at the exit layer all the time (noisy heads: many rejections, whole drafts rejected)
    "always-exit": dict(exit_draft_entropy=32.0, full_draft_entropy=0.0, heads_scale=0.5),
    # drafts at full depth over the whole vocabulary: every draft is accepted
    "full-depth": dict(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=400, lookup_tokens=0),
    # full-depth drafts over a tiny vocabulary: the full model's token is often outside it
    "small-vocab": dict(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=16),
    # mixed: exits where confident, full depth elsewhere, short drafts
    "mixed": dict(exit_draft_entropy=3.0, full_draft_entropy=4.0, max_draft_tokens=3, heads_scale=0.05),
    "no-drafts": dict(exit_draft_entropy=0.0, full_draft_entropy=0.0, lookup_tokens=0),
    # only drafts copied from the context (prompt lookup), up to 6 at a time
    "copied": dict(exit_draft_entropy=0.0, full_draft_entropy=0.0, lookup_tokens=6, max_draft_tokens=8),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_greedy_output_is_identical_to_full_depth(arch, setting):
    opts = dict(SETTINGS[setting])
    engine = _engine(arch, heads_scale=opts.pop("heads_scale", 0.0), **opts)
    for prompt, n in zip(PROMPTS[:3] if arch == "llama" else PROMPTS[1:3], (5, 17, 33)):
        full, lossless = _pair(engine, prompt, n, ignore_eos=True)
        assert lossless.token_ids == full.token_ids, (setting, prompt)
        assert lossless.generated_text == full.generated_text
        end = lossless.events[-1]
        assert isinstance(end, GenerationEnd) and end.tokens == n
        assert end.accepted == sum(t.draft == "accepted" for t in lossless.token_events)
        assert end.drafted >= end.accepted
        assert all(t.draft in ("accepted", "verified") for t in lossless.token_events)
        if setting == "no-drafts":
            assert end.drafted == 0 and end.rounds == n - 1
        if setting == "full-depth":
            assert end.accepted == end.drafted > 0  # a full-vocabulary draft at full depth is the full model's


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_round_drafts_at_most_max_draft_tokens(k):
    engine = _engine(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=400, max_draft_tokens=k)
    full, lossless = _pair(engine, "Hello", 25, ignore_eos=True)
    end = lossless.events[-1]
    assert lossless.token_ids == full.token_ids
    assert end.drafted <= k * end.rounds  # every draft is accepted here, so only the cap ends a round
    assert end.rounds == -(-24 // k)  # 24 tokens after the prefill's, k per verification pass


def test_rejected_drafts_are_events_but_never_output():
    engine = _engine(exit_draft_entropy=32.0, full_draft_entropy=0.0, heads_scale=0.5)
    full, lossless = _pair(engine, "Hello", 30, ignore_eos=True)
    rejected = [e for e in lossless.events if isinstance(e, TokenEvent) and e.draft == "rejected"]
    assert rejected, "noisy heads should have drafts the full model rejects"
    draft_layer = engine._lossless_drafter("lossless", True).draft_layer
    assert draft_layer == 4  # the head nearest 80% of the depth, by default
    assert all(e.text == "" and e.exit_layer == draft_layer for e in rejected)
    assert lossless.token_ids == full.token_ids
    # every rejected draft is followed by the verified token at the same index
    events = [e for e in lossless.events if isinstance(e, TokenEvent)]
    for i, e in enumerate(events):
        if e.draft == "rejected":
            nxt = events[i + 1]
            assert nxt.index == e.index and nxt.draft == "verified" and nxt.token_id != e.token_id


def test_eos_inside_a_draft_stops_like_full_depth():
    engine = _engine(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=400, max_draft_tokens=8)
    engine.reset()
    ref = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, mode="full", ignore_eos=True))
    stop_token = ref.token_ids[13]
    first = ref.token_ids.index(stop_token)
    engine._eos = frozenset({stop_token})  # pretend this token is EOS: it now falls inside a draft
    full, lossless = _pair(engine, "Hello", 40)
    assert full.stop_reason == lossless.stop_reason == "eos"
    assert lossless.token_ids == full.token_ids == ref.token_ids[: first + 1]
    assert engine._cache.length == len(engine._cache.token_ids)


@pytest.mark.parametrize("n", [1, 2, 3, 9])
def test_max_tokens_inside_a_draft(n):
    engine = _engine(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=400, max_draft_tokens=8)
    full, lossless = _pair(engine, "The capital of France is", n, ignore_eos=True)
    assert lossless.token_ids == full.token_ids and len(lossless.token_ids) == n
    assert lossless.stop_reason == "max_tokens"


@pytest.mark.parametrize("setting", ["always-exit", "small-vocab"])
def test_cache_rollback_leaves_the_cache_as_full_decoding_does(setting):
    opts = dict(SETTINGS[setting])
    engine = _engine(heads_scale=opts.pop("heads_scale", 0.0), **opts)
    full, _ = _pair(engine, "def add(a, b):", 33, ignore_eos=True)
    engine.reset()
    full = engine.generate(GenerationRequest(prompt="def add(a, b):", max_new_tokens=33, mode="full", ignore_eos=True))
    want = engine._cache
    snapshot = (want.length, list(want.token_ids), [k[:, :, : want.length].clone() for k in want.keys],
                [v[:, :, : want.length].clone() for v in want.values])
    engine.reset()
    engine.generate(GenerationRequest(prompt="def add(a, b):", max_new_tokens=33, mode="lossless", ignore_eos=True))
    got = engine._cache
    assert got.length == snapshot[0] and got.token_ids == snapshot[1]
    assert bool((got.fill[:, : got.length] == FILL_COMPUTED).all())
    for layer in range(got.num_layers):
        torch.testing.assert_close(got.keys[layer][:, :, : got.length], snapshot[2][layer], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.values[layer][:, :, : got.length], snapshot[3][layer], rtol=1e-4, atol=1e-5)
    # and the next turn reuses that prefix and continues exactly like full decoding would
    follow = engine.generate(GenerationRequest(prompt="def add(a, b):", max_new_tokens=12, mode="lossless",
                                               ignore_eos=True))
    assert follow.token_ids == full.token_ids[:12]


def test_acceptance_rule_samples_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    ids = torch.tensor([0, 1, 2])
    q = torch.tensor([0.2, 0.2, 0.6])
    counts = torch.zeros(4)
    trials = 20000
    kept = 0
    for _ in range(trials):
        d = int(ids[torch.multinomial(q, 1, generator=g)])
        tok, ok = accept_sampled(p, d, (ids, q), g)
        counts[tok] += 1
        kept += ok
    freq = counts / trials
    assert torch.allclose(freq, p, atol=0.015), freq
    # the acceptance rate is sum(min(p, q)) = 0.2 + 0.2 + 0.2
    assert kept / trials == pytest.approx(0.6, abs=0.015)


def _sampled_twice(engine, prompt: str, **sampling):
    """The same seeded lossless request twice on a fresh cache: both answers must be the same 30 tokens."""
    req = dict(prompt=prompt, max_new_tokens=30, mode="lossless", ignore_eos=True, **sampling)
    engine.reset()
    a = engine.generate(GenerationRequest(**req))
    engine.reset()
    b = engine.generate(GenerationRequest(**req))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    return a


def test_sampling_in_lossless_mode_is_seeded_and_valid():
    engine = _engine(exit_draft_entropy=3.0, full_draft_entropy=32.0, draft_vocab_size=400)
    a = _sampled_twice(engine, "Hello", temperature=0.8, top_p=0.9, seed=5)
    assert a.events[-1].accepted > 0


def test_a_guessed_draft_keeps_sampling_distributed_as_the_full_model():
    """A copied or own-text draft is a point mass: kept with probability p(d), else replaced by a draw from p
    without d, so the committed token is distributed exactly as p."""
    target = torch.tensor([0.1, 0.5, 0.15, 0.25])
    gen = torch.Generator().manual_seed(0)
    trials = 40_000
    counts = torch.zeros(4)
    kept = 0
    for _ in range(trials):
        token, accepted = accept_sampled(target, 3, (torch.tensor([3]), torch.ones(1)), gen)
        counts[token] += 1
        kept += accepted
    assert kept / trials == pytest.approx(0.25, abs=0.01)
    torch.testing.assert_close(counts / trials, target, atol=0.01, rtol=0)


def test_sampling_with_own_text_guesses_is_seeded_and_valid():
    a = _sampled_twice(_own_text_engine("llama"), "Tell me more", temperature=0.7, seed=3)
    end = a.events[-1]
    assert end.own_text > 0 and end.accepted == sum(t.draft == "accepted" for t in a.token_events)


def test_without_exit_heads_lossless_runs_full_depth_with_a_notice(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    full, lossless = _pair(engine, "Hello", 10, ignore_eos=True)
    assert lossless.token_ids == full.token_ids
    notices = [e for e in lossless.events if isinstance(e, Notice)]
    assert notices and "lossless" in notices[0].message and "full depth" in notices[0].message


def test_o1_in_lossless_mode_matches_o1_in_full_mode():
    engine = _engine(exit_draft_entropy=0.0, full_draft_entropy=32.0, draft_vocab_size=400)
    engine.set_thresholds(tau_high=0.5, tau_low=0.2)
    full, lossless = _pair(engine, "Entropy 7", 24, ignore_eos=True, o1=True)
    assert lossless.events[-1].o1_triggers == full.events[-1].o1_triggers > 0
    assert lossless.token_ids == full.token_ids


def test_lossless_settings_are_validated():
    with pytest.raises(ConfigError, match="lossless.max_draft_tokens"):
        SedacConfig.from_dict({"lossless": {"max_draft_tokens": 0}})
    with pytest.raises(ConfigError, match="unknown key 'lossless.draft_len'"):
        SedacConfig.from_dict({"lossless": {"draft_len": 3}})
    engine = _engine(draft_layer=3)  # the heads sit at layers 2 and 4
    with pytest.raises(ConfigError, match="lossless.draft_layer is 3 .* 2, 4"):
        engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=3, mode="lossless"))
    assert LosslessSection().draft_layer == 0


def test_pipeline_api_runs_lossless():
    from sedac_core.pipeline import create_pipeline

    engine = _engine(exit_draft_entropy=1.0, full_draft_entropy=32.0, draft_vocab_size=400)
    pipe = create_pipeline(engine.bundle, config=engine.config)
    pipe.engine.use_exit_heads(engine.exit_heads, apply_calibration=False)
    full = pipe("Hello", max_new_tokens=12, mode="full", ignore_eos=True)
    lossless = pipe("Hello", max_new_tokens=12, mode="lossless", ignore_eos=True)
    assert lossless.mode == "lossless" and lossless.token_ids == full.token_ids
    assert lossless.events[-1].rounds >= 1


def test_drafts_copied_from_the_context_are_verified_in_one_pass():
    """Prompt lookup: after a token pair seen before, the tokens that followed it are proposed at once, run at
    full depth in one batched pass, and kept while the full model agrees: identical output, fewer passes."""
    bundle = make_bundle("llama", layers=6, seed=3)
    with torch.no_grad():  # no layer writes to the residual: the next token is a function of the current one,
        for layer in bundle.model.model.layers:  # so greedy text soon cycles, and copies from it come true
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    config = SedacConfig()
    config.lossless = dataclasses.replace(config.lossless, exit_draft_entropy=0.0, full_draft_entropy=0.0,
                                          lookup_tokens=6, max_draft_tokens=8)
    engine = SedacEngine(bundle, config)
    engine.use_exit_heads(make_exit_heads(bundle, [2, 4], scale=0.0), apply_calibration=False)
    full, lossless = _pair(engine, "Hello", 60, ignore_eos=True)
    assert lossless.token_ids == full.token_ids
    end = lossless.events[-1]
    assert end.accepted > 10 and end.rounds < 50  # rounds that committed several tokens
    assert end.copied == end.drafted and end.copied_accepted == end.accepted  # only copies in this setting
    engine.config.lossless = dataclasses.replace(config.lossless, lookup_tokens=0)
    engine.reset()
    plain = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=60, mode="lossless", ignore_eos=True))
    assert plain.events[-1].drafted == 0 and plain.token_ids == full.token_ids


def test_lookup_copies_what_followed_the_last_pair():
    engine = _engine(lookup_tokens=3)
    drafter = engine._lossless_drafter("lossless", True)
    drafter.begin([5, 6, 7, 8, 9, 5, 6], frozenset())
    assert drafter.lookup(3) == ([7, 8, 9], "context") and drafter.lookup(1) == ([7], "context")
    drafter.observe(7)  # (6, 7) was followed by 8 earlier
    assert drafter.lookup(3) == ([8, 9, 5], "context")
    drafter.begin([5, 6, 7, 8, 5, 6], frozenset({8}))  # a banned token ends the copy
    assert drafter.lookup(3) == ([7], "context")
    drafter.begin([1, 2, 3], frozenset())
    assert drafter.lookup(3) == ([], "")  # the last pair never occurred before (and no own text to guess from)


def test_continuations_follow_the_longest_seen_run():
    text = torch.tensor([1, 2, 3, 4, -1, 9, 2, 3, 5, -1, 7, 3, 6, -1, 7, 3, 6, -1, 8, 3, 5, 8, 3, 5], dtype=torch.int32)
    c = Continuations(text, key=3)
    # after (9, 2, 3): 5 (the 3-token run); after (1, 2, 3): 4; after (x, 2, 3): 4 vs 5 tie -> the lower id
    assert c.chain([9, 2, 3], 1, frozenset(), set()) == [5]
    assert c.chain([1, 2, 3], 1, frozenset(), set()) == [4]
    assert c.chain([0, 2, 3], 1, frozenset(), set()) == [4]
    # after a lone 3: 5 (three times) beats 6 (twice) and 4 (once)
    assert c.chain([0, 0, 3], 1, frozenset(), set()) == [5]
    # a chain feeds its guesses back: 8 3 -> 5, then (8, 3, 5) -> 8, (3, 5, 8) -> 3 ...
    assert c.chain([8, 3], 4, frozenset(), set()) == [5, 8, 3, 5]
    # answers never run on into the next one: 4 ended its answer, so nothing follows it
    assert c.chain([3, 4], 3, frozenset(), set()) == []
    # a banned guess ends the chain before it, an EOS after it
    assert c.chain([8, 3], 4, frozenset({8}), set()) == [5]
    assert c.chain([8, 3], 4, frozenset(), {8}) == [5, 8]
    assert c.chain([], 3, frozenset(), set()) == [] and c.chain([42], 3, frozenset(), set()) == []


def _own_text_engine(arch: str, own_text: bool = True) -> SedacEngine:
    """An engine whose exit heads carry, as their draft text, the model's own greedy answers to other prompts
    and some unrelated tokens: its guesses are sometimes right and often wrong."""
    engine = _engine(arch, exit_draft_entropy=0.0, full_draft_entropy=0.0, lookup_tokens=6, own_text=own_text)
    parts = []
    for prompt in ("Tell me more", "abc abc abc", "The capital of Spain is"):
        engine.reset()
        out = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=40, mode="full", ignore_eos=True))
        parts += [*out.token_ids, -1]
    parts += torch.randint(0, 300, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.exit_heads.draft_text = torch.tensor(parts, dtype=torch.int32)
    engine.reset()
    return engine


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_guesses_from_the_models_own_text_keep_the_output_identical(arch):
    engine = _own_text_engine(arch)
    for prompt, n in (("Tell me more", 30), ("Hello", 25), ("The capital of France is", 40)):
        full, lossless = _pair(engine, prompt, n, ignore_eos=True)
        assert lossless.token_ids == full.token_ids, prompt
        end = lossless.events[-1]
        assert end.own_text > 0 and end.copied + end.own_text == end.drafted  # no exit-head drafts here
        assert end.accepted == sum(t.draft == "accepted" for t in lossless.token_events)
        if prompt == "Tell me more":  # the text holds this very answer: its guesses come true
            assert end.own_text_accepted > 10 and end.rounds < n / 2
    engine.config.lossless = dataclasses.replace(engine.config.lossless, own_text=False)
    full, lossless = _pair(engine, "Tell me more", 30, ignore_eos=True)
    assert lossless.token_ids == full.token_ids and lossless.events[-1].own_text == 0


def test_profile_without_draft_text_has_no_own_text_guesses():
    engine = _engine(lookup_tokens=3)
    assert engine.exit_heads.draft_text is None
    drafter = engine._lossless_drafter("lossless", True)
    assert drafter.continuations is None




def test_continuations_offer_the_next_most_frequent_first_guesses():
    text = torch.tensor([5, 1, -1, 5, 2, -1, 5, 2, -1, 5, 3, -1, 5, 3, -1, 5, 3, -1, 5, 4, -1, 9, 5, 7], dtype=torch.int32)
    c = Continuations(text, key=3)
    assert c.first_options([0, 5], frozenset()) == [3, 2, 1]  # most frequent first, ties by id, at most three
    assert c.first_options([9, 5], frozenset()) == [7]  # the longest matching run decides
    assert c.first_options([0, 5], frozenset({3})) == [2, 1] and c.first_options([0, 8], frozenset()) == []


def test_a_tree_round_keeps_the_side_branch_the_full_model_agrees_with():
    """Greedy own-text rounds check side branches (the 2nd and 3rd most frequent first guesses) in the same pass,
    as a tree. Here the most frequent guess is always wrong and the second always right: every round keeps a
    side-branch token, the output is full decoding's, and the cache holds exactly what full decoding leaves."""
    engine = _engine("llama", exit_draft_entropy=0.0, full_draft_entropy=0.0, lookup_tokens=4)
    prompt, n = "The capital of France is", 30
    engine.reset()
    full = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="full", ignore_eos=True))
    want = engine._cache
    snapshot = (want.length, list(want.token_ids), [k[:, :, : want.length].clone() for k in want.keys])
    y = engine.bundle.chat.encode([{"role": "user", "content": prompt}]) + full.token_ids
    text = list(y) + [-1]  # the true continuations, once
    for i in range(3, len(y)):  # a wrong follower of every run of 1-3 tokens, twice
        text += [*y[i - 3 : i], (y[i] + 1) % 400, -1] * 2
    engine.exit_heads.draft_text = torch.tensor(text, dtype=torch.int32)
    engine.reset()
    lossless = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="lossless", ignore_eos=True))
    assert lossless.token_ids == full.token_ids
    end = lossless.events[-1]
    assert end.own_text_accepted >= n // 3 and end.rounds <= n * 2 // 3  # side branches were kept
    got = engine._cache
    assert got.length == snapshot[0] and got.token_ids == snapshot[1]
    for layer in range(got.num_layers):
        torch.testing.assert_close(got.keys[layer][:, :, : got.length], snapshot[2][layer], rtol=1e-4, atol=1e-5)


def test_side_branches_add_what_followed_the_last_token_in_the_context():
    engine = _engine("llama", lookup_tokens=4)
    engine.exit_heads.draft_text = torch.tensor([7, 1, 2, -1, 7, 3, -1, 7, 3, -1], dtype=torch.int32)
    drafter = engine._lossless_drafter("lossless", True)
    drafter.begin([7, 9, 8, 5, 7], frozenset())  # the last 7 was followed by 9, 8 earlier in the context
    main = drafter.continuations.chain(drafter._history, 4, frozenset(), set())
    assert main[0] == 3
    assert drafter._side_branches(main, 4) == [main, [1, 2], [9, 8]]
    assert drafter._side_branches(main, 1) == [main, [1], [9]]  # no branch longer than the round allows
    drafter.begin([7, 3, 8, 5, 7], frozenset())  # a context follower already tried as a first guess adds nothing
    assert drafter._side_branches(main, 4) == [main, [1, 2]]
    drafter.begin([7, 9, 8, 5, 7], frozenset({9}))  # a banned token is never proposed
    assert drafter._side_branches(main, 4) == [main, [1, 2]]


def test_rejected_guesses_have_no_entropy_and_record_as_strict_json(tmp_path):
    """A guess copied from text ran no head: its rejected-draft event says entropy null (never NaN), and the
    session file that records it is strict JSON that reads back (the app crashed on the NaN before)."""
    from sedac_core.session import SessionRecorder, read_session

    engine = _own_text_engine("llama")
    path = tmp_path / "lossless.jsonl"
    with SessionRecorder(path, engine.session_header()).attach(engine.bus):
        out = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=30, mode="lossless",
                                                ignore_eos=True))
    rejected = [e for e in out.events if isinstance(e, TokenEvent) and e.draft == "rejected"]
    assert rejected and any(e.entropy_bits is None for e in rejected)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the session file"))
    replayed = [e for e in read_session(path).events if isinstance(e, TokenEvent)]
    assert [e.entropy_bits for e in replayed] == [e.entropy_bits for e in out.events if isinstance(e, TokenEvent)]
