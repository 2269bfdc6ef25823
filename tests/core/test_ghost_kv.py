"""Ghost KV: shapes, fitting, profile round trip, engine fallback and toggling, FILL_GHOST entries."""

from __future__ import annotations

import pytest
import torch

from conftest import make_bundle
from sedac_core.cache import FILL_GHOST
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import Notice
from sedac_core.exits import ProfileError, collect_exit_data, split_by_prompt, train_exit_heads
from sedac_core.ghost_kv import GhostKV, fit_ghost_kv, reconstruction_error, required_layers

PROMPTS = [f"{w} {i}" for i, w in enumerate(["Hello", "Entropy", "capital", "def add", "SEDAC", "France"] * 2)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    bundle = make_bundle(request.param, layers=4, seed=3)
    data = collect_exit_data(bundle, PROMPTS, required_layers([1, 2], 4), max_new_tokens=16, batch_size=6)
    heads, _ = train_exit_heads(bundle, data, [1, 2])
    train, test = split_by_prompt(data)
    ghost = fit_ghost_kv(bundle, train, [1, 2], rank=8)
    return bundle, heads, ghost, test


def test_shapes_and_error(setup):
    bundle, _, ghost, test = setup
    k, v = ghost.predict(1, test.hidden[1])
    assert k.shape == v.shape == (len(test), 2, 2 * 16) and k.dtype == torch.float32
    err = reconstruction_error(bundle, ghost, test, 1)
    assert err[1]["ghost_k_rel_l2"] == 0.0  # the first skipped layer is projected exactly
    # fitted beats the untrained map (zero weights: the training mean only)
    blank = GhostKV(ghost.exit_layers, 4, 64, 2, 16, 8, ghost.eps, {e: torch.zeros_like(t) for e, t in ghost.trunk.items()},
                    ghost.head_w, ghost.head_b)
    err0 = reconstruction_error(bundle, blank, test, 1)
    assert sum(err[j]["ghost_k_rel_l2"] + err[j]["ghost_v_rel_l2"] for j in (2, 3)) < \
        sum(err0[j]["ghost_k_rel_l2"] + err0[j]["ghost_v_rel_l2"] for j in (2, 3))


def test_round_trip_and_corrupt(setup, tmp_path):
    _, _, ghost, test = setup
    ghost.save(tmp_path)
    back = GhostKV.load(tmp_path, hidden_size=64, num_layers=4)
    assert torch.allclose(back.predict(2, test.hidden[2])[0], ghost.predict(2, test.hidden[2])[0])
    (tmp_path / "ghost_kv.safetensors").write_bytes(b"junk")
    with pytest.raises(ProfileError, match="corrupt"):
        GhostKV.load(tmp_path)
    with pytest.raises(ProfileError, match="no Ghost KV"):
        GhostKV.load(tmp_path / "none")


def _engine(bundle, heads, monkeypatch, tmp_path, ghost=None, corrupt=False):
    heads.save(tmp_path)
    if ghost is not None:
        ghost.save(tmp_path)
    if corrupt:
        (tmp_path / "ghost_kv.json").write_text("{")
    monkeypatch.setattr("sedac_core.engine.find_profile", lambda fp: tmp_path)
    monkeypatch.setattr("sedac_core.engine.shipped_profile_dir", lambda fp: None)
    eng = SedacEngine(bundle)
    eng.config.sedac.enable_ghost_kv = True
    eng.config.sedac.kv_fill = eng.kv_fill = "propagate"
    eng.ghost_kv = None
    eng._load_ghost_kv()
    eng.set_thresholds(tau_low=19.0, tau_high=19.9)  # exits fire
    return eng


@pytest.mark.parametrize("corrupt", [False, True])
def test_fallback_with_notice(setup, monkeypatch, tmp_path, corrupt):
    bundle, heads, ghost, _ = setup
    eng = _engine(bundle, heads, monkeypatch, tmp_path, ghost=None if not corrupt else ghost, corrupt=corrupt)
    assert eng.kv_fill == "propagate" and not eng.features["ghost_kv"]
    res = eng.generate(GenerationRequest(prompt="Hello", max_new_tokens=4, mode="exit"))
    assert any(isinstance(e, Notice) and "sedac.kv_fill (propagate)" in e.message for e in res.events)


def test_toggle_and_fill_ghost(setup, monkeypatch, tmp_path):
    bundle, heads, ghost, _ = setup
    eng = _engine(bundle, heads, monkeypatch, tmp_path, ghost=ghost)
    assert eng.features["ghost_kv"] and eng.kv_fill == "ghost"
    assert eng.set_features(ghost_kv=False).enable_ghost_kv is False and eng.kv_fill == "propagate"
    assert eng.set_features(ghost_kv=True).enable_ghost_kv is True
    res = eng.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, mode="exit", ignore_eos=True))
    assert res.tokens == 6 and res.skip_ratio > 0
    assert bool((eng._cache.fill == FILL_GHOST).any())


def test_deferred_fill_is_the_default_and_ghost_kv_is_opt_in(setup, monkeypatch, tmp_path):
    """The deferred fill (the true K/V, computed with the next token) measured more accurate than Ghost KV at the
    same speed on the default model, so it is the default; enable_ghost_kv: true selects Ghost KV where a
    profile has one. A model without exit heads gets no Ghost KV notice (exit mode's own notice says it runs
    full depth)."""
    from sedac_core.config import SedacConfig

    bundle, heads, ghost, _ = setup
    heads.save(tmp_path)
    ghost.save(tmp_path)
    monkeypatch.setattr("sedac_core.engine.find_profile", lambda fp: tmp_path)
    monkeypatch.setattr("sedac_core.engine.shipped_profile_dir", lambda fp: None)
    assert SedacConfig().sedac.enable_ghost_kv is False and SedacConfig().sedac.kv_fill == "deferred"
    eng = SedacEngine(bundle)
    assert eng.kv_fill == "deferred" and eng.features["ghost_kv"]  # loaded, not selected
    assert eng.set_features(ghost_kv=True).enable_ghost_kv and eng.kv_fill == "ghost"
    assert not eng.set_features(ghost_kv=False).enable_ghost_kv and eng.kv_fill == "deferred"
    config = SedacConfig()
    config.sedac.enable_ghost_kv = True
    assert SedacEngine(bundle, config).kv_fill == "ghost"
    monkeypatch.setattr("sedac_core.engine.find_profile", lambda fp: None)
    bare = SedacEngine(bundle, config)
    assert bare.kv_fill == "deferred" and bare.ghost_notice == ""
    res = bare.generate(GenerationRequest(prompt="Hello", max_new_tokens=3, mode="exit"))
    notices = [e.message for e in res.events if isinstance(e, Notice)]
    assert len(notices) == 1 and "Ghost" not in notices[0]


def test_ghost_kv_toggled_during_an_exit_answer_applies_from_the_next_one(setup, monkeypatch, tmp_path):
    """Toggling Ghost KV while an exit-mode answer streams must not switch the fill under the rows that wait for
    theirs (deferred): the answer keeps its fill, leaves every layer's K/V written, and the next answer uses the
    new one."""
    from sedac_core.cache import FILL_COMPUTED
    from sedac_core.events import GenerationStart, TokenEvent

    bundle, heads, ghost, _ = setup
    eng = _engine(bundle, heads, monkeypatch, tmp_path, ghost=ghost)
    eng.set_features(ghost_kv=False)
    eng.kv_fill = eng.config.sedac.kv_fill = "deferred"
    request = GenerationRequest(prompt="Hello", max_new_tokens=12, mode="exit", ignore_eos=True)
    alone = eng.generate(request)
    assert any(t.exit_layer < 4 for t in alone.token_events)  # exits happen: rows wait for their upper layers
    eng.reset()
    events = []
    for event in eng.stream(request):
        events.append(event)
        if isinstance(event, TokenEvent) and event.index == 3:
            eng.set_features(ghost_kv=True)  # mid-answer
    assert [t.token_id for t in events if isinstance(t, TokenEvent)] == alone.token_ids
    n = eng._cache.length
    assert bool((eng._cache.fill[:, :n] == FILL_COMPUTED).all())  # the deferred rows were all completed
    assert next(e for e in events if isinstance(e, GenerationStart)).kv_fill == "deferred"
    nxt = eng.generate(request)
    assert next(e for e in nxt.events if isinstance(e, GenerationStart)).kv_fill == "ghost"
