"""Early exit: routing decisions, exit-head training, profiles, calibration, and the engine's exit mode."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_bundle
from sedac_core.calibration import LayerStats, calibrate, oracle_skip_ratio, simulate
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import Notice, TokenEvent
from sedac_core.exits import (ExitData, ExitHeads, ProfileError, collect_exit_data, default_exit_layers, exit_stats,
                              split_by_prompt, train_exit_heads)
from sedac_core.policy import CONTINUE, ESCALATE, EXIT, ExitPolicy

PROMPTS = [f"{w} {i}" for i, w in enumerate(["Hello", "Entropy", "capital", "def add", "SEDAC", "France", "Rome",
                                               "token", "model", "numbers"] * 2)]


def test_policy_decisions():
    p = ExitPolicy(min_layer=3, layer_offsets={5: 0.5})
    assert p.decide(2, 0.0, 1.0) == CONTINUE  # below the minimum layer
    assert p.decide(3, 0.9, 1.0) == EXIT
    assert p.decide(3, 1.1, 1.0) == CONTINUE
    assert p.decide(5, 1.4, 1.0) == EXIT  # the layer's calibrated offset loosens it
    assert ExitPolicy.final(5.0, 4.5) == ESCALATE and ExitPolicy.final(4.0, 4.5) == CONTINUE


def test_default_exit_layers_are_inside_the_stack():
    assert default_exit_layers(30) == [10, 14, 18, 21, 24, 27]
    assert all(1 <= l < 4 for l in default_exit_layers(4))


@pytest.fixture(scope="module")
def trained():
    bundle = make_bundle("llama", layers=4, seed=11)
    layers = [1, 2, 3]
    data = collect_exit_data(bundle, PROMPTS, layers, max_new_tokens=24, batch_size=8)
    heads, report = train_exit_heads(bundle, data, layers)
    return bundle, data, heads, report


@torch.no_grad()
def _kl_to_final(bundle, hidden, final_hidden):
    m = bundle.model
    lp = torch.log_softmax(m.lm_head(m.model.norm(hidden)), -1)
    lq = torch.log_softmax(m.lm_head(m.model.norm(final_hidden)), -1)
    return float(torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="batchmean"))


def test_training_reduces_held_out_kl(trained):
    bundle, data, heads, report = trained
    _, test = split_by_prompt(data)
    assert len(test) > 20 and report["held_out_tokens"] == len(test)
    with torch.no_grad():
        for l in heads.layers:
            lens = _kl_to_final(bundle, test.hidden[l], test.final_hidden)  # the untrained logit lens
            tuned = _kl_to_final(bundle, heads.translate(l, test.hidden[l]), test.final_hidden)
            assert tuned < lens, l
    stats = exit_stats(heads, test, bundle)
    assert float(stats[3]["agree"].float().mean()) > float(stats[1]["agree"].float().mean())
    # the draft text: every prompt's answer tokens in order, each ended by -1
    groups = torch.unique(data.group)
    assert heads.draft_text.dtype == torch.int32 and len(heads.draft_text) == len(data) + len(groups)
    first = heads.draft_text[: int((data.group == groups[0]).sum())]
    assert torch.equal(first.long(), data.final_token[data.group == groups[0]]) and heads.draft_text[-1] == -1


def test_kl_refinement_in_bfloat16_lowers_the_kl_as_float32_does(trained):
    """The KL epochs may run their LM-head matmuls in bfloat16 (about twice as fast on a CPU with bf16 units): the
    translator they reach lowers the KL to the final layer's distribution as the float32 one does."""
    from sedac_core.errors import SedacError
    from sedac_core.exits import _lm_head_parts, fit_translator, kl_matmul_dtype, refine_translator_kl

    bundle, data, _, _ = trained
    lm_head, norm_w, eps = _lm_head_parts(bundle)
    assert kl_matmul_dtype(lm_head, "float32") == torch.float32
    assert kl_matmul_dtype(lm_head, "bfloat16") == torch.bfloat16
    assert kl_matmul_dtype(lm_head, "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(SedacError, match="unknown KL precision 'fp16'"):
        kl_matmul_dtype(lm_head, "fp16")
    h, final = data.hidden[1], data.final_hidden
    w, b = fit_translator(h, final)
    kl = lambda w, b: _kl_to_final(bundle, h @ w + b, final)  # noqa: E731
    start = kl(w, b)
    got = {dt: kl(*refine_translator_kl(w, b, h, final, lm_head, norm_w, eps, epochs=10, batch=32, lr=3e-3,
                                        matmul_dtype=dt)) for dt in (torch.float32, torch.bfloat16)}
    assert got[torch.float32] < 0.9 * start and got[torch.bfloat16] < 0.9 * start
    assert got[torch.bfloat16] == pytest.approx(got[torch.float32], rel=0.02)


def test_profile_round_trip_and_corruption(trained, tmp_path):
    _, _, heads, _ = trained
    heads.meta["calibration"] = {"tau_low": 0.3}
    heads.save(tmp_path / "p")
    again = ExitHeads.load(tmp_path / "p", hidden_size=64)
    assert again.layers == heads.layers and again.meta["calibration"]["tau_low"] == 0.3
    assert torch.equal(again.draft_text, heads.draft_text) and torch.equal(again.draft_vocab, heads.draft_vocab)
    mode = lambda name: (tmp_path / "p" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("exit_heads.safetensors") == mode("exit_heads.json")  # shareable like the json, not 0600
    for l in heads.layers:
        assert torch.equal(again.translator_w[l], heads.translator_w[l])
        assert again.probe_b[l] == pytest.approx(heads.probe_b[l])
    with pytest.raises(ProfileError, match="hidden size 64, not 128"):
        ExitHeads.load(tmp_path / "p", hidden_size=128)
    (tmp_path / "p" / "exit_heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProfileError, match="corrupt exit-head profile .*sedac-chat train"):
        ExitHeads.load(tmp_path / "p")
    with pytest.raises(ProfileError, match="no exit heads"):
        ExitHeads.load(tmp_path / "missing")


def test_missing_profile_falls_back_to_full_depth_with_a_notice(tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    assert engine.exit_heads is None and "sedac-chat train" in engine.profile_notice
    events = list(engine.stream(GenerationRequest(prompt="Hi", max_new_tokens=4, mode="exit", ignore_eos=True)))
    notices = [e for e in events if isinstance(e, Notice)]
    assert notices and "full depth" in notices[0].message
    assert all(e.exit_layer == 4 for e in events if isinstance(e, TokenEvent))


def test_exit_mode_that_never_fires_equals_full_mode(trained):
    bundle, _, heads, _ = trained
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    engine._tau_floor = -100.0
    engine.set_thresholds(tau_low=-50.0)
    req = dict(prompt="Hello", max_new_tokens=40, ignore_eos=True)
    full = engine.generate(GenerationRequest(mode="full", **req))
    never = engine.generate(GenerationRequest(mode="exit", **req))
    assert never.token_ids == full.token_ids
    assert never.avg_exit_layer == 4.0
    # but the probes ran and their estimates are reported per checked layer
    assert sorted(never.token_events[1].layer_entropies) == heads.layers


def test_exit_mode_that_always_fires_skips_and_fills_the_cache(trained):
    bundle, _, heads, _ = trained
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    engine.kv_fill = "propagate"  # (the deferred fill, the default, caps waiting rows: see below)
    engine.set_thresholds(tau_high=20.0)
    engine.set_thresholds(tau_low=19.0)
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=20, mode="exit", ignore_eos=True))
    toks = result.token_events
    assert toks[0].exit_layer == 4  # the first token comes from the (full-depth) prefill
    assert all(t.exit_layer == 1 and t.decision == "exit" for t in toks[1:])
    assert result.skip_ratio == pytest.approx(1 - (4 + 19 * 1) / (20 * 4))
    from sedac_core.cache import FILL_COMPUTED, FILL_PROPAGATED

    cache = engine._cache
    pos = toks[5].position - 1  # the input position whose forward exited
    assert int(cache.fill[0, pos]) == FILL_COMPUTED
    assert all(int(cache.fill[j, pos]) == FILL_PROPAGATED for j in range(1, 4))
    # a later full-depth run does not inherit propagated entries through prefix reuse
    follow = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=20, mode="full", ignore_eos=True))
    fresh = SedacEngine(make_bundle("llama", layers=4, seed=11)).generate(
        GenerationRequest(prompt="Hello", max_new_tokens=20, mode="full", ignore_eos=True))
    assert follow.token_ids == fresh.token_ids


def _synthetic_stats(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for l, quality in ((10, 0.3), (20, 0.6), (28, 0.9)):
        predicted = torch.rand(n, generator=g) * 4
        p_agree = torch.clamp(1.05 - predicted / 4 * (1.2 - quality), 0, 1)  # low signal -> agrees more
        agree = torch.rand(n, generator=g) < p_agree
        stats[l] = LayerStats(predicted=predicted, agree=agree)
    return stats


@pytest.mark.parametrize("target", [0.9, 0.95, 0.98])
def test_calibration_meets_its_target(target):
    stats = _synthetic_stats()
    final_entropy = torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 6
    cal = calibrate(stats, final_entropy, 30, target_agreement=target)
    assert cal.agreement >= target
    assert cal.skip_ratio > 0
    # the threshold is the loosest that meets the target: a bit looser misses it
    looser = simulate(stats, 30, cal.tau_low + 0.1)[0]
    assert looser < target or cal.tau_low >= max(float(s.predicted.max()) for s in stats.values()) - 0.1
    # on fresh data from the same distribution it holds up (within sampling noise)
    held = simulate(_synthetic_stats(seed=5), 30, cal.tau_low)[0]
    assert held >= target - 0.02
    assert cal.oracle_skip_ratio >= cal.skip_ratio
    assert cal.tau_high == pytest.approx(float(torch.quantile(final_entropy, 0.9)), abs=1e-3)


def test_percentile_calibration():
    stats = _synthetic_stats()
    cal = calibrate(stats, torch.linspace(0, 10, 1001), 30, target_agreement=None)
    signal = torch.cat([s.predicted for s in stats.values()])
    assert cal.method == "percentile"
    assert cal.tau_low == pytest.approx(float(torch.quantile(signal, 0.5)), abs=1e-3)
    assert cal.entropy_threshold_min == pytest.approx(float(torch.quantile(signal, 0.2)), abs=1e-3)
    assert cal.tau_high == pytest.approx(9.0, abs=1e-2)


def test_oracle_is_the_ceiling():
    stats = {1: LayerStats(torch.zeros(4), torch.tensor([True, False, False, False])),
             2: LayerStats(torch.zeros(4), torch.tensor([False, True, False, False]))}
    assert oracle_skip_ratio(stats, 4) == pytest.approx(1 - (1 + 2 + 4 + 4) / 16)


def test_per_layer_offsets_skip_more_at_the_same_target():
    stats = _synthetic_stats()
    fe = torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 6
    plain = calibrate(stats, fe, 30, target_agreement=0.95, per_layer=False)
    tuned = calibrate(stats, fe, 30, target_agreement=0.95)
    assert tuned.agreement >= 0.95
    assert tuned.skip_ratio >= plain.skip_ratio
    agreement, skip = simulate(stats, 30, tuned.tau_low, offsets=tuned.layer_offsets)
    assert agreement == pytest.approx(tuned.agreement, abs=1e-3) and skip == pytest.approx(tuned.skip_ratio, abs=1e-3)


def test_recalibrate_on_the_session_prompts(trained):
    bundle, _, heads, _ = trained
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    seen = []
    engine.bus.subscribe(seen.append)
    for p in PROMPTS[:6]:
        engine.generate(GenerationRequest(prompt=p, max_new_tokens=4))
    change = engine.recalibrate(target_agreement=0.9, max_tokens=120)
    assert change.source == "calibration" and change in seen
    cal = engine.exit_heads.meta["calibration"]
    assert cal["target_agreement"] == 0.9 and cal["agreement"] >= 0.9
    assert engine.tau_low == pytest.approx(min(cal["tau_low"], engine.tau_high - 0.05))


def test_recalibrate_without_heads_is_a_clear_error(tiny_llama_bundle):
    from sedac_core.errors import SedacError

    with pytest.raises(SedacError, match="sedac-chat train"):
        SedacEngine(tiny_llama_bundle).recalibrate()


def test_collect_progress_follows_the_token_budget():
    """With a token budget that ends the run early, the bar still reaches the end, and never goes back."""
    bundle = make_bundle("llama", layers=4, seed=1)
    seen: list[float] = []
    data = collect_exit_data(bundle, PROMPTS, [2], max_new_tokens=8, batch_size=2, max_tokens=20,
                             progress=lambda message, done: seen.append(done))
    assert len(data) >= 20 and len(seen) < len(PROMPTS) // 2  # stopped early, at the budget
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_sampled_answers_add_varied_text_from_the_same_prompts():
    """--samples: more training rows from the same prompts, seeded (a rerun collects the same data), grouped by
    prompt so that a held-out split never sees a prompt it trained on."""
    bundle = make_bundle("llama", layers=4, seed=1)
    greedy = collect_exit_data(bundle, PROMPTS[:6], [2], max_new_tokens=10, batch_size=3)
    sampled = collect_exit_data(bundle, PROMPTS[:6], [2], max_new_tokens=10, batch_size=3, samples=2,
                                temperature=1.0)
    again = collect_exit_data(bundle, PROMPTS[:6], [2], max_new_tokens=10, batch_size=3, samples=2,
                              temperature=1.0)
    assert len(sampled) > len(greedy)
    assert torch.equal(sampled.final_token, again.final_token) and torch.equal(sampled.hidden[2], again.hidden[2])
    assert set(sampled.group.tolist()) == set(greedy.group.tolist()) == set(range(6))
    # the greedy answers come first in each batch, exactly as without samples
    first = sampled.group[: (greedy.group < 3).sum()]
    assert torch.equal(first, greedy.group[greedy.group < 3])
    train, test = split_by_prompt(sampled)
    assert not set(train.group.tolist()) & set(test.group.tolist())


def test_cli_train_keeps_collected_data_and_reuses_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from conftest import make_tiny_model, make_tokenizer
    from sedac_tui.cli import app

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", layers=4, seed=3).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    monkeypatch.setattr("sedac_core.exits.user_profile_dir", lambda fp: tmp_path / "profiles" / fp)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    data = tmp_path / "collected.pt"
    args = ["train", "--model", str(model_dir), "--local", "--prompts", str(prompts), "--tokens", "200",
            "--max-new-tokens", "8", "--batch-size", "5", "--samples", "1", "--data", str(data),
            "--out", str(tmp_path / "out")]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert data.exists() and "reusing" not in first.output
    profile = ExitHeads.load(tmp_path / "out")
    meta = profile.meta["training"]
    assert meta["samples_per_prompt"] == 1 and meta["tokens"] >= 200
    assert "2 epochs full-vocabulary KL" in meta["fit"] and profile.meta["kl_matmul_dtype"] in meta["fit"]
    # the collected answers are lossless mode's draft text: every token, plus one end mark per prompt
    assert profile.draft_text is not None and len(profile.draft_text) > meta["tokens"]
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and f"reusing {meta['tokens']} collected tokens" in second.output
    # fewer exit layers than were collected: reused too
    fewer = runner.invoke(app, [*args, "--layers", "2"])
    assert fewer.exit_code == 0 and "reusing" in fewer.output
    assert ExitHeads.load(tmp_path / "out").layers == [2]
    # other collection options: collected again, not reused
    third = runner.invoke(app, [*args[:-4], "--samples", "0", "--data", str(data), "--out", str(tmp_path / "o2")])
    assert third.exit_code == 0 and "reusing" not in third.output
    for bad_args, match in ((["--samples", "-1"], "--samples is -1"), (["--kl-epochs", "-2"], "--kl-epochs is -2"),
                            (["--kl-precision", "fp16"], "unknown --kl-precision 'fp16'"),
                            (["--layers", "2,x"], "not a list of layer numbers"),
                            (["--layers", "0,2"], "must lie between 1 and 3")):
        bad = runner.invoke(app, ["train", "--model", str(model_dir), "--local", *bad_args])
        assert bad.exit_code == 2 and match in bad.output, bad.output
        lines = bad.output.strip().splitlines()  # (after the model's loading lines, for the range check)
        assert lines[-1].startswith("error:") and sum("error" in line for line in lines) == 1
        assert "Traceback" not in bad.output


def test_reduced_signal_exits_pick_among_the_reduced_vocabulary(trained):
    """With a "reduced" calibration, the exit signal is the entropy over a few ids (the profile's draft vocabulary
    plus the prompt's tokens) and an exited token is their argmax: the engine's exits equal a manual computation."""
    import copy

    from sedac_core.exits import reduced_base_vocab
    from sedac_core.speculative import ReducedHead

    bundle, _, heads, _ = trained
    heads = copy.deepcopy(heads)
    heads.meta["calibration"] = {"tau_low": 0.1, "signal": "reduced", "decision_vocab_size": 24,
                                 "check_layers": [2]}
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    engine.kv_fill = "propagate"  # every token exits: no full-depth token to complete waiting rows
    assert isinstance(engine._decision_head, ReducedHead) and engine._check_layers == {2}
    engine.set_thresholds(tau_high=30.0)
    engine.set_thresholds(tau_low=29.0)  # every token exits at layer 2, the only checked layer
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=12, mode="exit", ignore_eos=True))
    toks = result.token_events
    assert all(t.exit_layer == 2 and t.decision == "exit" for t in toks[1:])
    prompt_ids = bundle.chat.encode([{"role": "user", "content": "Hello"}])
    allowed = set(reduced_base_vocab(heads.draft_vocab, 400, 24).tolist()) | set(prompt_ids)
    assert all(t.token_id in allowed for t in toks[1:])
    # the second token, by hand: full-depth prefill gave the first; run layers 1-2 on it, translate, reduced head
    a = engine.anatomy
    fresh = SedacEngine(make_bundle("llama", layers=4, seed=11))
    first = fresh.generate(GenerationRequest(prompt="Hello", max_new_tokens=1, mode="full", ignore_eos=True))
    assert first.token_ids[0] == toks[0].token_id
    ids = prompt_ids + [toks[0].token_id]
    with torch.no_grad():
        hidden = fresh.bundle.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, -1]
        normed = a.rms_norm(heads.translate(2, hidden[None]), a.final_norm_w)
        vocab = torch.tensor(sorted(allowed | {toks[0].token_id}))
        want = int(vocab[(normed @ a.lm_head_w[vocab].T).argmax()])
    assert toks[1].token_id == want


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_exited_tokens_report_a_finite_entropy_with_every_backend(trained, backend):
    """An exited token's logits are -inf outside the reduced vocabulary; its event's entropy (the sparkline, O1's
    trigger) must be a number whichever backend computes it, including the torch fallback, and the same number."""
    import copy
    import math

    from sedac_core import entropy

    bundle, _, heads, _ = trained
    heads = copy.deepcopy(heads)
    heads.meta["calibration"] = {"tau_low": 0.1, "signal": "reduced", "decision_vocab_size": 24, "check_layers": [2]}
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    engine.set_thresholds(tau_high=30.0)
    engine.set_thresholds(tau_low=29.0)  # every token exits at layer 2
    runs = {}
    try:
        for name in ("cpp", backend):
            entropy.set_backend(name)
            engine.reset()
            result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=8, mode="exit", ignore_eos=True))
            runs[name] = [t.entropy_bits for t in result.token_events if t.exit_layer == 2]
    finally:
        entropy.set_backend("auto")
    assert len(runs[backend]) >= 6 and all(math.isfinite(e) for e in runs[backend])
    assert runs[backend] == pytest.approx(runs["cpp"], abs=1e-4)


def test_calibration_keeps_only_the_layers_whose_exits_pay():
    from sedac_core.calibration import CHECK_COST_LAYERS, LM_HEAD_LAYERS, choose_check_layers, exit_rates

    n = 1000
    # layer 2 almost never confident (its check would cost more than it saves), layer 6 often
    stats = {2: LayerStats(predicted=torch.where(torch.arange(n) < 5, 0.0, 9.0), agree=torch.arange(n) < 5),
             6: LayerStats(predicted=torch.where(torch.arange(n) % 2 == 0, 0.0, 9.0),
                           agree=torch.ones(n, dtype=torch.bool))}
    rates = exit_rates(stats, tau_low=1.0)
    assert rates[2] == pytest.approx(0.005) and rates[6] == pytest.approx(0.5, abs=0.01)
    assert 0.005 * (8 - 2 + LM_HEAD_LAYERS) < CHECK_COST_LAYERS  # the premise: layer 2 does not pay for its check
    assert choose_check_layers(stats, 8, tau_low=1.0) == [6]
    cal = calibrate(stats, torch.rand(n) * 5, 8, target_agreement=0.98, prune_checks=True)
    assert cal.check_layers == [6] and cal.to_meta()["check_layers"] == [6]
    assert calibrate(stats, torch.rand(n) * 5, 8, target_agreement=0.98).check_layers is None


def _exit_run(engine, fill, tau_low, n=24, **kw):
    engine.kv_fill = fill
    engine.set_thresholds(tau_high=20.0)
    engine.set_thresholds(tau_low=tau_low)
    engine.reset()
    return engine.generate(GenerationRequest(prompt="Hello there", max_new_tokens=n, mode="exit", ignore_eos=True,
                                             **kw))


@pytest.fixture(scope="module")
def trained_qwen2():
    bundle = make_bundle("qwen2", layers=4, seed=5)
    data = collect_exit_data(bundle, PROMPTS, [1, 2, 3], max_new_tokens=24, batch_size=8)
    heads, report = train_exit_heads(bundle, data, [1, 2, 3])
    return bundle, data, heads, report


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
# tau_low 6.5 mixes exits at every checked layer with full-depth tokens on both tiny models (their untrained
# vocabulary of 400 keeps entropies high); 0: no exits; (much higher, every check exits: the MAX_PENDING test)
@pytest.mark.parametrize("tau_low", [0.0, 6.5])
def test_deferred_fill_decodes_exactly_as_the_true_kv(request, arch, tau_low):
    """The deferred fill runs an exited token's skipped layers later, batched with the next token: the cache
    ends up with the true K/V, so decoding (tokens and exit layers) is the oracle fill's, and the cache is too."""
    from sedac_core.cache import FILL_COMPUTED

    bundle, _, heads, _ = request.getfixturevalue("trained" if arch == "llama" else "trained_qwen2")
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    oracle = _exit_run(engine, "oracle", tau_low)
    keys = [k.clone() for k in engine._cache.keys]
    length = engine._cache.length
    deferred = _exit_run(engine, "deferred", tau_low)
    assert deferred.token_ids == oracle.token_ids
    layers = [t.exit_layer for t in deferred.token_events]
    assert layers == [t.exit_layer for t in oracle.token_events]
    if tau_low > 0:  # exits at more than one layer, and full-depth tokens between them
        assert len(set(layers) - {4}) >= 2 and layers[1:].count(4) >= 3
    cache = engine._cache
    assert cache.length == length and not engine._pending  # every waiting row was completed at the end
    assert bool((cache.fill[:, :length] == FILL_COMPUTED).all())
    for k_oracle, k in zip(keys, cache.keys):
        torch.testing.assert_close(k[:, :, :length], k_oracle[:, :, :length], atol=1e-5, rtol=1e-5)


def test_deferred_fill_makes_at_most_max_pending_rows_wait(trained):
    from sedac_core.engine import MAX_PENDING

    bundle, _, heads, _ = trained
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    result = _exit_run(engine, "deferred", 19.0, n=30)  # every check says exit
    layers = [t.exit_layer for t in result.token_events[1:]]
    # runs of MAX_PENDING exits, then one full-depth token that completes them
    assert layers[: MAX_PENDING + 1] == [1] * MAX_PENDING + [4]
    assert max(len(run) for run in "".join("e" if l == 1 else "f" for l in layers).split("f")) == MAX_PENDING
    assert result.skip_ratio > 0.5
    # the next turn reuses the prefix: the cache is exact, so a full-depth answer is a fresh engine's
    follow = engine.generate(GenerationRequest(prompt="Hello there", max_new_tokens=12, mode="full",
                                               ignore_eos=True))
    fresh = SedacEngine(make_bundle("llama", layers=4, seed=11)).generate(
        GenerationRequest(prompt="Hello there", max_new_tokens=12, mode="full", ignore_eos=True))
    assert follow.token_ids == fresh.token_ids


def test_deferred_fill_with_o1_matches_the_true_kv(trained):
    bundle, _, heads, _ = trained
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    runs = {}
    for fill in ("oracle", "deferred"):
        engine.kv_fill = fill
        engine.set_thresholds(tau_high=20.0)
        engine.set_thresholds(tau_low=6.5)
        engine.set_thresholds(tau_high=7.0)  # O1 where the final entropy is above this: some positions
        engine.reset()
        runs[fill] = engine.generate(GenerationRequest(prompt="Hello there", max_new_tokens=24, mode="exit",
                                                       ignore_eos=True, o1=True))
    oracle, deferred = runs["oracle"], runs["deferred"]
    assert deferred.token_ids == oracle.token_ids
    assert any(t.decision == "exit" for t in deferred.token_events)
    assert deferred.events[-1].o1_triggers > 0


def test_cli_train_and_calibrate_take_recorded_sessions(tmp_path, monkeypatch):
    """`train --sessions` / `calibrate --sessions`: the user messages of recorded sessions are collected on (train:
    first, then the prompts); a damaged session file is a one-line error before the model loads."""
    from typer.testing import CliRunner

    import sedac_core.exits as exits_mod
    from conftest import make_tiny_model, make_tokenizer
    from sedac_core.events import SessionStart, UserMessage
    from sedac_core.session import SessionRecorder
    from sedac_tui.cli import app

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", layers=4, seed=3).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    monkeypatch.setattr("sedac_core.exits.user_profile_dir", lambda fp: tmp_path / "profiles" / fp)
    session = tmp_path / "s.jsonl"
    with SessionRecorder(session, SessionStart(model="tiny", num_layers=4)) as rec:
        for text in ("my own question", "   ", "another one of mine"):
            rec.write(UserMessage(text=text))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:4]))
    seen: list[list[str]] = []
    real = exits_mod.collect_exit_data
    monkeypatch.setattr(exits_mod, "collect_exit_data", lambda bundle, texts, *a, **k: (
        seen.append(list(texts)), real(bundle, texts, *a, **k))[1])
    runner = CliRunner()
    common = ["--model", str(model_dir), "--local", "--sessions", str(session), "--prompts", str(prompts)]
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", *common, "--tokens", "40", "--max-new-tokens", "6", "--batch-size", "3",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert seen[-1] == ["my own question", "another one of mine", *PROMPTS[:4]]
    assert ExitHeads.load(out).meta["training"]["sessions"] == [str(session)]
    monkeypatch.setattr("sedac_core.exits.find_profile", lambda fp: out)
    r = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--local", "--sessions", str(session),
                            "--tokens", "30"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == ["my own question", "another one of mine"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    for command in ("train", "calibrate"):
        r = runner.invoke(app, [command, *common[:3], "--sessions", str(broken)])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines() == [r.output.strip().splitlines()[-1]]  # nothing loaded before it
        assert str(broken) in r.output and r.output.startswith("error:")


def test_calibration_sees_the_reduced_vocabulary_the_engine_decides_over(trained):
    """The engine decides exits over the reduced vocabulary plus the context's tokens (the prompt and every token
    fed since); calibration data keeps that context, so the calibrated signal is the one the engine computes."""
    import copy

    from sedac_core.exits import reduced_base_vocab

    bundle, _, heads, _ = trained
    heads = copy.deepcopy(heads)
    heads.meta["calibration"] = {"tau_low": -1.0, "signal": "reduced", "decision_vocab_size": 24,
                                 "check_layers": [1, 2, 3]}
    engine = SedacEngine(bundle)
    engine.use_exit_heads(heads, apply_calibration=False)
    engine.set_thresholds(tau_low=-1.0, tau_high=30.0)  # never exits: full depth, every checked layer reported
    prompt = PROMPTS[3]
    # (EOS allowed: with ignore_eos the engine's reduced vocabulary leaves it out, the collected answers do not)
    result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=16, mode="exit"))
    toks = result.token_events
    assert len(toks) > 8
    data = collect_exit_data(bundle, [prompt], [1, 2, 3], max_new_tokens=16)
    assert data.final_token.tolist()[: len(toks)] == [t.token_id for t in toks]
    assert data.first.tolist() == [True] + [False] * (len(data) - 1)
    assert data.prompt_ids == {0: bundle.chat.encode([{"role": "user", "content": prompt}])}
    vocab = reduced_base_vocab(heads.draft_vocab, 400, 24)
    masks = data.context_masks(vocab, 400, 0, len(data))
    context = set(data.prompt_ids[0]) | set(data.final_token[:3].tolist())
    assert set(torch.nonzero(masks[3])[:, 0].tolist()) == set(vocab.tolist()) | context
    assert torch.equal(data.context_masks(vocab, 400, 5, 9), masks[5:9])  # a batch that starts mid-answer
    stats = exit_stats(heads, data, bundle, decision_vocab=vocab)
    for layer in (1, 2, 3):  # the first token comes from the prefill: no exit check
        engine_signal = torch.tensor([t.layer_entropies[layer] for t in toks[1:]])
        assert torch.allclose(stats[layer]["predicted"][1 : len(toks)], engine_signal, atol=1e-3)
    plain = exit_stats(heads, ExitData(data.hidden, data.final_hidden, data.final_token, data.final_entropy,
                                       data.group), bundle, decision_vocab=vocab)
    assert not torch.allclose(plain[2]["predicted"][1:], stats[2]["predicted"][1:], atol=1e-3)


def test_entropy_of_masked_logits_is_the_entropy_over_the_kept_tokens():
    from sedac_core.entropy import entropy_bits

    z = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(4, 50, generator=torch.Generator().manual_seed(1)) > 0.6
    keep[:, 0] = True
    masked = entropy_bits(z.masked_fill(~keep, float("-inf")))
    assert torch.allclose(masked, torch.stack([entropy_bits(z[i][keep[i]]) for i in range(4)]), atol=1e-5)
    assert entropy_bits(torch.tensor([0.0, float("-inf")])) == 0.0  # one token left: certain


# -- the gate: a dot product with the raw hidden state that spares a token far from exiting its check ------------


def test_training_fits_a_gate_for_every_exit_layer(trained):
    bundle, data, heads, report = trained
    assert sorted(heads.gate_w) == heads.layers and sorted(heads.gate_b) == heads.layers
    assert sorted(report["gate_corr"]) == heads.layers
    assert all(heads.gate_w[l].shape == (64,) for l in heads.layers)


def test_gate_learns_to_estimate_the_exit_signal_from_the_raw_state():
    """fit_gates: least squares from the hidden state to the signal; on held-out rows it tracks it."""
    from sedac_core.exits import fit_gates

    g = torch.Generator().manual_seed(0)
    n, h = 3000, 32
    hidden = torch.randn(n, h, generator=g) * 2
    true_w = torch.randn(h, generator=g) * 0.3
    signal = (hidden @ true_w + 3.0 + 0.3 * torch.randn(n, generator=g)).clamp(min=0)  # entropies are >= 0
    data = ExitData({5: hidden}, hidden, torch.zeros(n, dtype=torch.long), signal, torch.arange(n) // 30)
    heads = ExitHeads([5], h, {5: torch.eye(h)}, {5: torch.zeros(h)}, {5: torch.zeros(h)}, {5: 0.0})
    train, test = split_by_prompt(data)
    fit_gates(heads, train, {5: signal[torch.isin(data.group, torch.unique(train.group))]})
    est = heads.gate_estimate(5, test.hidden[5])
    assert float(torch.corrcoef(torch.stack([est, test.final_entropy]))[0, 1]) > 0.95
    assert abs(float((est - test.final_entropy).mean())) < 0.1  # no bias: the margin means bits


def test_profile_round_trip_keeps_the_gate_and_loads_older_profiles_without_one(trained, tmp_path):
    import copy

    _, _, heads, _ = trained
    heads.save(tmp_path / "p")
    again = ExitHeads.load(tmp_path / "p")
    for l in heads.layers:
        assert torch.equal(again.gate_w[l], heads.gate_w[l]) and again.gate_b[l] == pytest.approx(heads.gate_b[l])
    old = copy.deepcopy(heads)
    old.gate_w, old.gate_b = {}, {}
    old.meta.pop("gate_bias", None)
    old.save(tmp_path / "old")
    loaded = ExitHeads.load(tmp_path / "old")
    assert loaded.gate_w == {} and loaded.gate_b == {}


def _gated_stats(noise, n=6000, seed=0):
    stats = _synthetic_stats(n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for st in stats.values():
        st.gate = st.predicted + noise * torch.randn(n, generator=g)
    return stats


def test_calibrated_gate_spares_checks_and_keeps_the_target():
    from sedac_core.calibration import route

    fe = torch.rand(6000, generator=torch.Generator().manual_seed(1)) * 6
    plain = calibrate(_synthetic_stats(n=6000), fe, 30, target_agreement=0.95)
    gated = calibrate(_gated_stats(0.3), fe, 30, target_agreement=0.95)
    assert plain.gate_margins == {} and set(gated.gate_margins) == {10, 20, 28}
    assert gated.agreement >= 0.95
    assert gated.checks_per_token < 0.8 * plain.checks_per_token  # most far-off tokens skip their checks
    held = _gated_stats(0.3, seed=7)
    r = route(held, 30, gated.tau_low, offsets=gated.layer_offsets, margins=gated.gate_margins)
    assert r.agreement >= 0.95 - 0.02  # on fresh data too
    ungated = route(held, 30, plain.tau_low, offsets=plain.layer_offsets)
    assert r.net_saving > ungated.net_saving  # it pays: fewer checks for about the same exits
    assert gated.to_meta()["gate_margins"] == {str(l): m for l, m in gated.gate_margins.items()}


def test_a_gate_that_knows_nothing_is_not_used():
    fe = torch.rand(6000, generator=torch.Generator().manual_seed(1)) * 6
    stats = _gated_stats(0.0)
    for st in stats.values():
        st.gate = torch.rand(6000, generator=torch.Generator().manual_seed(3)) * 4  # unrelated to the signal
    cal = calibrate(stats, fe, 30, target_agreement=0.95)
    assert cal.gate_margins == {} and cal.agreement >= 0.95


@pytest.mark.parametrize("fill", ["propagate", "deferred"])
def test_engine_gate_skips_checks_and_otherwise_changes_nothing(trained, fill):
    """A row whose gate estimate is at or above the layer's threshold + margin is not checked there (the reduced
    head does not run; its estimate is reported); with a margin no row reaches, decoding is as without a gate."""
    import copy

    bundle, _, heads, _ = trained
    heads = copy.deepcopy(heads)
    base = {"tau_low": 6.5, "signal": "reduced", "decision_vocab_size": 24, "check_layers": [1, 2, 3]}
    runs = {}
    for name, margins in (("none", {}), ("open", {1: 1e4, 2: 1e4, 3: 1e4}), ("shut", {1: -1e4, 2: -1e4, 3: -1e4})):
        heads.meta["calibration"] = dict(base, gate_margins={str(l): m for l, m in margins.items()})
        engine = SedacEngine(bundle)
        engine.use_exit_heads(heads, apply_calibration=False)
        calls = []
        inner = engine._decision_head.logits
        engine._decision_head.logits = lambda x, inner=inner: calls.append(1) or inner(x)
        runs[name] = (_exit_run(engine, fill, 6.5), len(calls))
        assert engine.exit_checks == len(calls)  # the engine counts what ran (benchmarks read it)
        assert engine.gate_estimates == (0 if name == "none" else engine.gate_skips + engine.exit_checks)
        assert engine.gate_skips == (engine.gate_estimates if name == "shut" else 0)
    (none, none_calls), (open_, open_calls), (shut, shut_calls) = runs["none"], runs["open"], runs["shut"]
    assert open_.token_ids == none.token_ids and open_calls == none_calls > 0
    assert any(t.exit_layer < 4 for t in none.token_events)  # (the premise: some rows exit without a gate)
    assert shut_calls == 0 and all(t.exit_layer == 4 for t in shut.token_events)
    full = SedacEngine(bundle).generate(GenerationRequest(prompt="Hello there", max_new_tokens=24, mode="full",
                                                          ignore_eos=True))
    assert shut.token_ids == full.token_ids
    # a gated-out layer reports the gate's estimate, and says so
    tok = shut.token_events[3]
    assert sorted(tok.layer_entropies) == [1, 2, 3] and tok.gated_layers == (1, 2, 3)
    assert all(t.gated_layers == () for t in none.token_events + open_.token_events)
    assert shut.token_events[0].gated_layers == ()  # (the first token comes from the prefill: no checks)
    from sedac_core.events import Event

    assert Event.from_json(json.loads(json.dumps(tok.to_json()))) == tok  # recorded and replayed as it was
    ids = bundle.chat.encode([{"role": "user", "content": "Hello there"}]) + shut.token_ids[:3]
    with torch.no_grad():
        hidden = bundle.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for l in (1, 2, 3):
        assert tok.layer_entropies[l] == pytest.approx(float(heads.gate_estimate(l, hidden[l][0, -1])), abs=1e-3)


def test_calibrate_and_train_say_what_the_gate_does(trained, capsys):
    import copy

    from sedac_core.calibration import Calibration
    from sedac_tui.cli import _echo_gate

    _, _, heads, _ = trained
    cal = Calibration(tau_low=1.1, tau_high=5.0, entropy_threshold_min=1.1, method="target_agreement",
                      target_agreement=0.98, min_layer=1, agreement=0.981, skip_ratio=0.099, oracle_skip_ratio=0.3,
                      signal="reduced", gate_margins={24: 1.58, 14: 1.81}, checks_per_token=1.3985)
    _echo_gate(cal, heads)
    assert capsys.readouterr().out == "gate: 1.40 checks per token (margins in bits: 14: +1.81, 24: +1.58)\n"
    old = copy.deepcopy(heads)
    old.gate_w, old.gate_b = {}, {}
    cal.gate_margins = {}
    _echo_gate(cal, old)
    assert "no exit gate in this profile" in capsys.readouterr().out
    _echo_gate(cal, heads)  # a gate that does not pay: calibration left it out
    assert capsys.readouterr().out.startswith("gate: not used")
