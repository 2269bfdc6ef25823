"""The full-depth engine on tiny random Llama and Qwen2 models: parity with transformers' generate, sampling,
stopping, cancelling, tracing, thresholds and prefix reuse."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_bundle
from sedac_core.config import SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.errors import ConfigError, PromptTooLongError, SedacError
from sedac_core.events import GenerationEnd, GenerationStart, ThresholdChange, TokenEvent

PROMPTS = ["Hello there", "The capital of France is", "def add(a, b):", "Entropy measures 1 2 3"]


def hf_greedy(bundle, prompt: str, n: int) -> list[int]:
    ids = bundle.chat.encode([{"role": "user", "content": prompt}])
    out = bundle.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_is_token_identical_to_generate(arch):
    reference = make_bundle(arch, seed=3)  # an untouched copy: the engine re-lays its model's weights
    engine = SedacEngine(make_bundle(arch, seed=3))
    for prompt in PROMPTS:
        ref = hf_greedy(reference, prompt, 72)
        result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=72, ignore_eos=True))
        assert result.tokens == 72
        assert result.token_ids == ref, prompt
        assert len(set(ref)) > 10  # a real sequence, not one token repeated


def test_events_describe_every_token(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    seen = []
    engine.bus.subscribe(seen.append)
    events = list(engine.stream(GenerationRequest(prompt="Hello", max_new_tokens=12, ignore_eos=True)))
    assert events == seen  # everything yielded was also published
    assert isinstance(events[0], GenerationStart) and isinstance(events[-1], GenerationEnd)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.index for t in tokens] == list(range(12))
    for t in tokens:
        assert t.exit_layer == t.num_layers == 4
        assert 0.0 <= t.entropy_bits <= 9.0  # <= log2(400)
        assert 0.0 < t.confidence <= 1.0
        assert t.layer_entropies is None  # no trace by default
        assert len(t.top_tokens) == 5 and t.top_tokens[0][1] == pytest.approx(t.confidence, rel=1e-4)
        assert t.time_ms > 0
    end = events[-1]
    assert end.tokens == 12 and end.stop_reason == "max_tokens"
    assert end.skip_ratio == 0.0 and end.avg_exit_layer == 4.0
    assert end.text == "".join(t.text for t in tokens)


def test_trace_records_entropy_at_every_layer(tiny_qwen2_bundle):
    engine = SedacEngine(tiny_qwen2_bundle)
    result = engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=3, trace=True, ignore_eos=True))
    for t in result.token_events:
        assert sorted(t.layer_entropies) == [1, 2, 3, 4]
        assert t.layer_entropies[4] == pytest.approx(t.entropy_bits, abs=1e-3)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    req = dict(prompt="Hello", max_new_tokens=24, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = engine.generate(GenerationRequest(seed=7, **req)).token_ids
    b = engine.generate(GenerationRequest(seed=7, **req)).token_ids
    c = engine.generate(GenerationRequest(seed=8, **req)).token_ids
    greedy = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=24, ignore_eos=True)).token_ids
    assert a == b
    assert a != c
    assert a != greedy


def test_top_p_small_is_greedy(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    greedy = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=16, ignore_eos=True)).token_ids
    nucleus = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=16, temperature=1.0, top_p=1e-6,
                                                seed=1, ignore_eos=True)).token_ids
    assert nucleus == greedy


def test_stops_at_eos():
    bundle = make_bundle("llama", seed=3)
    eos = bundle.tokenizer.eos_token_id
    with torch.no_grad():  # make EOS overwhelmingly likely at every step
        bundle.model.lm_head.weight[eos] = bundle.model.lm_head.weight[eos] * 0 + 5.0
    engine = SedacEngine(bundle)
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=20))
    assert result.stop_reason == "eos"
    assert result.token_ids[-1] == eos


def test_stop_string_truncates_the_text(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    full = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=30, ignore_eos=True))
    stop = full.generated_text[5:8]
    assert stop and full.generated_text.find(stop) >= 5
    cut = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=30, stop=(stop,), ignore_eos=True))
    assert cut.stop_reason == "stop_string"
    assert cut.generated_text == full.generated_text[: full.generated_text.find(stop)]


def test_cancel_stops_at_the_next_token(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    cancel = threading.Event()
    tokens = []
    for ev in engine.stream(GenerationRequest(prompt="Hello", max_new_tokens=200, ignore_eos=True), cancel):
        if isinstance(ev, TokenEvent):
            tokens.append(ev)
            if len(tokens) == 5:
                cancel.set()
        last = ev
    assert isinstance(last, GenerationEnd) and last.stop_reason == "cancelled"
    assert len(tokens) == 5 and last.tokens == 5


def test_prefix_reuse_gives_the_same_answer(tiny_qwen2_bundle):
    """A second turn reuses the cached conversation prefix; the answer must equal a fresh engine's."""
    convo = [{"role": "user", "content": "Hello"}]
    engine = SedacEngine(tiny_qwen2_bundle)
    first = engine.generate(GenerationRequest(messages=convo, max_new_tokens=10, ignore_eos=True))
    convo2 = convo + [{"role": "assistant", "content": first.generated_text}, {"role": "user", "content": "More"}]
    reused = engine.generate(GenerationRequest(messages=convo2, max_new_tokens=20, ignore_eos=True))
    fresh = SedacEngine(tiny_qwen2_bundle).generate(GenerationRequest(messages=convo2, max_new_tokens=20,
                                                                      ignore_eos=True))
    assert reused.token_ids == fresh.token_ids


def test_prompt_longer_than_context_is_a_clear_error(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    with pytest.raises(PromptTooLongError, match="context window is 512"):
        list(engine.stream(GenerationRequest(prompt="Hello " * 600, max_new_tokens=5)))


def test_generation_stops_when_the_context_is_full(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    n_prompt = len(tiny_llama_bundle.chat.encode([{"role": "user", "content": "x " * 240}]))
    result = engine.generate(GenerationRequest(prompt="x " * 240, max_new_tokens=1000, ignore_eos=True))
    assert result.stop_reason == "context_full"
    assert n_prompt + result.tokens == 512


def test_thresholds_clamp_and_publish(tiny_llama_bundle):
    cfg = SedacConfig()
    engine = SedacEngine(tiny_llama_bundle, cfg)
    seen = []
    engine.bus.subscribe(seen.append)
    ev = engine.set_thresholds(tau_low=-3.0)
    assert ev.tau_low == cfg.sedac.entropy_threshold_min  # clamped to the configured floor
    ev = engine.set_thresholds(tau_low=99.0)
    assert ev.tau_low == pytest.approx(engine.tau_high - 0.05)
    ev = engine.set_thresholds(tau_high=1.0)
    assert engine.tau_high == 1.0 and engine.tau_low < 1.0
    assert all(isinstance(e, ThresholdChange) for e in seen) and len(seen) == 3
    start = engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=2)).events[0]
    assert start.tau_high == 1.0  # applies to the next generation's tokens


def test_unknown_mode_is_a_clear_error(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    with pytest.raises(ConfigError, match="unknown mode 'turbo'"):
        engine.set_mode("turbo")
    with pytest.raises(ConfigError, match="available modes"):
        list(engine.stream(GenerationRequest(prompt="Hi", mode="turbo")))
    with pytest.raises(SedacError):
        engine.set_features(ghost_kv=True)  # not built yet (O1 is: tests/core/test_reasoning.py)


def test_bad_request_values_are_errors(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(ConfigError):
            list(engine.stream(GenerationRequest(prompt="Hi", **bad)))


def test_base_model_without_chat_template_gets_plain_prompt():
    bundle = make_bundle("llama", chat_template=None)
    assert not bundle.chat.has_template
    engine = SedacEngine(bundle)
    result = engine.generate(GenerationRequest(prompt="The capital of France is", max_new_tokens=5,
                                               ignore_eos=True))
    assert result.tokens == 5
    assert result.prompt_tokens == len(bundle.tokenizer("The capital of France is")["input_ids"])
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    assert bundle.chat.plain_text(convo).endswith("User: ?\nAssistant:")


def test_raw_prompt_skips_the_chat_template(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    raw = engine.generate(GenerationRequest(prompt="The capital of France is", raw_prompt=True, max_new_tokens=4,
                                            ignore_eos=True))
    assert raw.prompt_tokens == len(tiny_llama_bundle.tokenizer("The capital of France is")["input_ids"])
    chat = engine.generate(GenerationRequest(prompt="The capital of France is", max_new_tokens=4, ignore_eos=True))
    assert chat.prompt_tokens > raw.prompt_tokens


def test_empty_raw_prompt_is_a_clear_error(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    with pytest.raises(SedacError, match="the prompt is empty"):
        list(engine.stream(GenerationRequest(prompt="", raw_prompt=True)))


def test_streamed_text_adds_up_to_the_final_text():
    engine = SedacEngine(make_bundle("qwen2", seed=9))
    for prompt in PROMPTS:
        result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=30, ignore_eos=True))
        assert "".join(t.text for t in result.token_events) == result.generated_text
