"""The KV-fill bench (`bench --kv-fill`) and `train --ghost-kv` on tiny models: reconstruction metrics (the oracle
is exact, propagation is not), the probe leaves decoding untouched, the CLI paths and their one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_bundle, make_tiny_model, make_tokenizer
from sedac_core.bench_kv import ReconstructionProbe, kv_error, parse_kv_fills, run_kv_fill_bench
from sedac_core.config import SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.errors import ConfigError
from sedac_core.exits import ExitHeads, collect_exit_data, train_exit_heads
from sedac_core.ghost_kv import GhostKV, fit_ghost_kv, required_layers
from sedac_tui.cli import app

PROMPTS = [f"{w} {i}" for i, w in enumerate(["Hello", "Entropy", "capital", "def add", "SEDAC", "France"] * 2)]
runner = CliRunner()


def _still_config() -> SedacConfig:
    cfg = SedacConfig()
    cfg.sedac.adaptive_threshold = False  # thresholds stay where the test puts them
    return cfg


@pytest.fixture(scope="module")
def engine():
    bundle = make_bundle("llama", layers=4, seed=3)
    data = collect_exit_data(bundle, PROMPTS, required_layers([1, 2], 4), max_new_tokens=16, batch_size=6)
    heads, _ = train_exit_heads(bundle, data, [1, 2])
    eng = SedacEngine(bundle, _still_config())
    eng.use_exit_heads(heads)
    eng.use_ghost_kv(fit_ghost_kv(bundle, data, [1, 2], rank=8), select=False)
    return eng


def test_parse_kv_fills():
    assert parse_kv_fills(" propagate, oracle ") == ["propagate", "oracle"]
    for bad, match in (("propagate,turbo", "unknown KV fill 'turbo'"), (",", "empty"), ("ghost,ghost", "twice")):
        with pytest.raises(ConfigError, match=match):
            parse_kv_fills(bad)


def test_kv_error():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert kv_error(t, t) == pytest.approx((1.0, 0.0))
    cos, rel = kv_error(-t, t)
    assert cos == pytest.approx(-1.0) and rel == pytest.approx(2.0)


def test_reconstruction_per_fill(engine, tmp_path):
    lines: list[str] = []
    report = run_kv_fill_bench(engine, PROMPTS[:2], ["propagate", "ghost", "deferred", "oracle"], max_new_tokens=8,
                               rounds=2, tau_low=19.0, json_out=tmp_path / "kv.json", echo=lines.append)
    fills = report["fills"]
    assert json.loads((tmp_path / "kv.json").read_text())["fills"].keys() == fills.keys()
    assert engine.kv_fill == "deferred"  # restored (the default fill)
    for f in fills:
        assert fills[f]["exited_positions"] > 0 and fills[f]["skip_ratio"] > 0
    oracle = fills["oracle"]
    assert oracle["reconstruction"]["k_cos"] == pytest.approx(1.0, abs=1e-4)
    assert oracle["reconstruction"]["v_rel_l2"] == pytest.approx(0.0, abs=1e-4)
    # the oracle fill leaves the cache exact: its output is full depth's whenever the exit heads agree
    assert oracle["agreement"] >= fills["propagate"]["agreement"] - 1e-9
    # the deferred fill computes the true K/V too, only later: the oracle's agreement, nothing to reconstruct
    assert fills["deferred"]["agreement"] == pytest.approx(oracle["agreement"])
    assert fills["deferred"]["reconstruction"] is None
    for f in ("propagate", "ghost"):
        rec = fills[f]["reconstruction"]
        assert rec["k_rel_l2"] > 0.01 and rec["v_cos"] < 0.999
        # the first skipped layer's input is the exit state: both fills project it exactly
        first = fills[f]["reconstruction_per_layer"]["1"]
        assert first["k_cos"] == pytest.approx(1.0, abs=1e-4) and first["v_rel_l2"] == pytest.approx(0.0, abs=1e-4)
        assert set(fills[f]["reconstruction_per_layer"]) <= {"1", "2", "3"}
    assert report["fill_macs_per_exited_token"]["ghost"]["1"] > 0
    assert any("teacher-forced ghost" in line for line in lines)


def test_probe_does_not_change_decoding(engine):
    engine.set_thresholds(tau_low=19.0, tau_high=19.9)
    request = lambda: GenerationRequest(prompt="Hello", max_new_tokens=10, mode="exit", ignore_eos=True)  # noqa: E731
    engine.kv_fill = "ghost"
    try:
        engine.reset()
        plain = engine.generate(request()).token_ids
        engine.reset()
        with ReconstructionProbe(engine) as probe:
            probed = engine.generate(request()).token_ids
    finally:
        engine.kv_fill = "propagate"
    assert probed == plain and probe.stats.exited_positions > 0
    assert "_forward_exit" not in vars(engine)  # unwrapped


# -- CLI --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, match", [
    (["bench", "--kv-fill", "propagate,turbo"], "unknown KV fill 'turbo'"),
    (["bench", "--kv-fill", "ghost", "--tau-low", "-1"], "--tau-low is -1.0"),
    (["bench", "--tau-low", "0.5"], "--tau-low only applies to the KV-fill bench"),
    (["train", "--ghost-kv", "--rank", "0"], "--rank is 0"),
])
def test_cli_bad_input_one_line_exit_2(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_train_ghost_kv_then_bench(tmp_path, monkeypatch):
    from sedac_core.models import load_model

    model_dir = tmp_path / "tiny"
    make_tiny_model("qwen2", layers=4, seed=5).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    profiles = tmp_path / "profiles"
    for where in ("sedac_core.exits.user_profile_dir", "sedac_core.engine.user_profile_dir"):
        monkeypatch.setattr(where, lambda fp: profiles / fp)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--model", str(model_dir), "--local", "--prompts", str(prompts)]

    r = runner.invoke(app, ["train", "--ghost-kv", *common])
    assert r.exit_code == 2 and "run `sedac-chat train` first" in r.output  # no exit heads yet

    bundle = load_model(str(model_dir), local=True)
    target = profiles / bundle.fingerprint
    # exit heads that always exit at the first checked layer (identity translator, probe says 0 bits): no training
    eye = {l: torch.eye(64) for l in (1, 2)}
    ExitHeads([1, 2], 64, eye, {l: torch.zeros(64) for l in (1, 2)}, {l: torch.zeros(64) for l in (1, 2)},
              {1: 0.0, 2: 0.0}).save(target)

    r = runner.invoke(app, ["train", "--ghost-kv", *common, "--rank", "8", "--tokens", "50", "--max-new-tokens",
                            "12", "--batch-size", "6"])
    assert r.exit_code == 0, r.output
    assert "held-out ghost" in r.output and "held-out propagate" in r.output and str(target) in r.output
    ghost = GhostKV.load(target, hidden_size=64, num_layers=4, num_kv_heads=2, head_dim=16)
    assert ghost.rank == 8 and ghost.exit_layers == [1, 2] and ghost.meta["fingerprint"] == bundle.fingerprint
    assert not list(target.glob(".*.tmp"))  # written atomically: no temporary files left
    cfg = _still_config()
    cfg.sedac.enable_ghost_kv = True
    eng = SedacEngine(load_model(str(model_dir), local=True), cfg)
    assert eng.kv_fill == "ghost" and eng.ghost_kv is not None and eng.ghost_kv.rank == 8

    out = tmp_path / "kv.json"
    r = runner.invoke(app, ["bench", "--model", str(model_dir), "--local", "--kv-fill", "propagate,ghost,oracle",
                            "--tau-low", "0.5", "-n", "5", "--n-prompts", "1", "--rounds", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert list(report["fills"]) == ["propagate", "ghost", "oracle"] and report["tau_low"] == 0.5
    assert report["fills"]["ghost"]["avg_exit_layer"] == 1.6  # (4 + 4 x 1) / 5: the first token is full depth
    assert report["fills"]["oracle"]["reconstruction"]["k_rel_l2"] == pytest.approx(0.0, abs=1e-4)
    assert "K cos/relL2" in r.output and "oracle V" in r.output  # both rich tables
