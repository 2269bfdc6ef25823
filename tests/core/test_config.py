"""The YAML config: the keys a SEDAC user knows load; unknown keys and bad values are errors naming the key."""

from __future__ import annotations

import pytest

from sedac_core.config import SedacConfig
from sedac_core.errors import ConfigError

SEED_README_CONFIG = """
model:
  model_name: "Qwen/Qwen2.5-7B-Instruct"
  num_hidden_layers: 28
sedac:
  auto_calibrate: true
  enable_ghost_kv: true
  enable_o1_reasoning: true
  adaptive_threshold: true
  entropy_threshold_base: 0.5
  entropy_threshold_min: 0.2
  o1_high_entropy_threshold: 4.5
performance:
  kernel_backend: "cuda"
  enable_flash_attention: true
"""


def test_seed_readme_keys_load(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(SEED_README_CONFIG)
    cfg = SedacConfig.load(p)
    assert cfg.model.model_name == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.sedac.enable_o1_reasoning is True
    assert cfg.tau_low == 0.5 and cfg.tau_high == 4.5
    assert cfg.performance.kernel_backend == "cuda"


def test_round_trip(tmp_path):
    cfg = SedacConfig()
    cfg.sedac.entropy_threshold_base = 0.8
    cfg.tui.keymap = {"tau_low_down": "ctrl+down"}
    cfg.save(tmp_path / "c.yaml")
    again = SedacConfig.load(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "text, match",
    [
        ("sedac:\n  entropy_treshold_base: 0.5\n", "unknown key 'sedac.entropy_treshold_base'"),
        ("turbo:\n  x: 1\n", "unknown section 'turbo'"),
        ("sedac:\n  o1_high_entropy_threshold: -1\n", "'sedac.o1_high_entropy_threshold' is -1.0, out of range"),
        ("performance:\n  kernel_backend: rocm\n", "'performance.kernel_backend' is 'rocm'; choose one of"),
        ("sedac:\n  enable_ghost_kv: maybe\n", "'sedac.enable_ghost_kv' must be true or false"),
        ("sedac:\n  entropy_threshold_base: 5\n  o1_high_entropy_threshold: 4\n", "must be below"),
        ("sedac:\n  entropy_threshold_min: 0.9\n", "entropy_threshold_min"),
        ("generation:\n  top_p: 0\n", "'generation.top_p' is 0.0, out of range"),
        ("sedac: [1, 2]\n", "section 'sedac' must be a mapping"),
        ("sedac:\n  mode: turbo\n", "'sedac.mode' is 'turbo'"),
        ("sedac:\n  kv_fill: ghost\n", "'sedac.kv_fill' is 'ghost'; choose one of: deferred, propagate"),
        ("lossless:\n  own_text: 2\n", "'lossless.own_text' must be true or false"),
        ("sedac: {bad\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        SedacConfig.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        SedacConfig.load(tmp_path / "nope.yaml")
