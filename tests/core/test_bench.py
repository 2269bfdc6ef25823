"""The benchmark harness runs end to end on a tiny model: alternating runs, ratios, agreement, JSON and plot."""

from __future__ import annotations

import json

from conftest import make_tiny_model, make_tokenizer
from sedac_core.bench import run_decode_bench


def _tiny_model_dir(tmp_path, arch: str, seed: int):
    d = tmp_path / "tiny"
    make_tiny_model(arch, seed=seed).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_bench_reports_every_mode(tmp_path):
    d = _tiny_model_dir(tmp_path, "llama", 4)
    lines = []
    report = run_decode_bench(model=str(d), local=True, max_new_tokens=10, n_prompts=2, rounds=2,
                              modes=["hf", "exit"], json_out=tmp_path / "b.json", plot_out=tmp_path / "b.png",
                              echo=lines.append)
    assert set(report["modes"]) == {"full", "exit"}  # hf is the baseline; full is added for speedup_vs_full
    full = report["modes"]["full"]
    assert full["exact_match"] == 1.0 and full["agreement"] == 1.0 and full["skip_ratio"] == 0.0
    assert full["speedup_vs_full"] > 0 and full["speedup_vs_hf"] > 0
    # no profile for this model: exit mode falls back to full depth, so it agrees exactly too
    assert report["modes"]["exit"]["exact_match"] == 1.0
    assert report["modes"]["exit"]["checks_per_token"] == 0.0  # (and so no exit checks ran)
    assert json.loads((tmp_path / "b.json").read_text())["max_new_tokens"] == 10
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert any("vs full" in line for line in lines)


def test_bench_reports_lossless_draft_kinds(tmp_path):
    d = _tiny_model_dir(tmp_path, "qwen2", 6)
    lines = []
    report = run_decode_bench(model=str(d), local=True, max_new_tokens=8, n_prompts=1, rounds=1,
                              modes=["lossless"], echo=lines.append)
    row = report["modes"]["lossless"]
    assert row["exact_match"] == 1.0
    # no exit heads for this model: lossless runs at full depth, nothing drafted, nothing copied
    assert row["copied_drafts"] == 0 and row["copied_acceptance"] == 0.0 and row["acceptance_rate"] == 0.0
    assert row["own_text_drafts"] == 0 and row["model_drafts"] == 0
    assert any("copied from the context" in line for line in lines)
