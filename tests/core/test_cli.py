"""The `sedac-chat` command line: ask (text and --json), info, config, --help, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model, make_tokenizer
from sedac_core.session import read_session
from sedac_tui.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen2")
    make_tiny_model("qwen2", seed=2).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_ask_json(tiny_dir, tmp_path):
    rec = tmp_path / "s.jsonl"
    r = runner.invoke(app, ["ask", "Hello", "--model", str(tiny_dir), "--local", "--max-new-tokens", "7", "--json",
                            "--record", str(rec)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("generated_text", "tokens", "tok_per_s", "skip_ratio", "avg_exit_layer", "mode"):
        assert key in data
    assert data["mode"] == "full" and data["skip_ratio"] == 0.0 and data["avg_exit_layer"] == 4.0
    assert 1 <= data["tokens"] <= 7
    session = read_session(rec)
    assert session.events[0].text == "Hello"
    assert session.events[-1].tokens == data["tokens"]


def test_ask_text_prints_answer_and_stats(tiny_dir):
    r = runner.invoke(app, ["ask", "Hello", "-m", str(tiny_dir), "--local", "-n", "5", "--temperature", "0.8",
                            "--seed", "3", "--system", "Be brief."])
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert "tok/s" in last and "avg exit layer 4.0/4" in last and "mode full" in last


@pytest.mark.parametrize(
    "args, match",
    [
        (["ask", "hi", "--model", "/no/such/model", "--local"], "model path does not exist"),
        (["ask", "hi", "--mode", "turbo"], "unknown mode 'turbo'; available modes: auto, full"),
        (["ask", "hi", "--config", "/no/such.yaml"], "config file not found"),
        (["replay", "/no/such/session.jsonl"], "session file not found"),
        (["replay", "x.jsonl", "--speed", "0"], "--speed is 0.0"),
        (["bench", "--o1", "--o1-split", "train"], "unknown O1 eval split 'train'"),
        (["calibrate", "--signal", "vibes"], "unknown --signal 'vibes'; use reduced or probe"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert match in r.output
    assert "Traceback" not in r.output


def test_bad_config_key_exits_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sedac:\n  entropy_threshold_bse: 1\n")
    r = runner.invoke(app, ["ask", "hi", "--config", str(p)])
    assert r.exit_code == 2 and "unknown key 'sedac.entropy_threshold_bse'" in r.output


def test_prompt_too_long_exits_2(tiny_dir):
    r = runner.invoke(app, ["ask", "word " * 700, "--model", str(tiny_dir), "--local"])
    assert r.exit_code == 2 and "context window is 512" in r.output


def test_info_json():
    r = runner.invoke(app, ["info", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("torch", "transformers", "device", "kernel_backend", "matmul_kernel", "default_model", "cache_dir"):
        assert key in data


def test_config_prints_yaml_that_loads(tmp_path):
    out = tmp_path / "c.yaml"
    r = runner.invoke(app, ["config", "--write", str(out)])
    assert r.exit_code == 0
    from sedac_core.config import SedacConfig

    assert SedacConfig.load(out) == SedacConfig()
    shown = runner.invoke(app, ["config"]).stdout
    assert "\no1:\n  strategy: lookahead\n  top_k: 3\n" in shown and "o1_high_entropy_threshold" in shown


@pytest.mark.parametrize("cmd", [[], ["ask"], ["replay"], ["info"], ["bench"], ["config"]])
def test_help_on_every_command(cmd):
    r = runner.invoke(app, cmd + ["--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_real_process_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sedac_tui", "ask", "hi", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "not a model directory" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ask_lossless_without_a_profile_says_so_and_answers_like_full(tiny_dir):
    args = ["ask", "Hello", "--model", str(tiny_dir), "--local", "--max-new-tokens", "6", "--json"]
    full = runner.invoke(app, args)
    lossless = runner.invoke(app, [*args, "--mode", "lossless"])
    assert lossless.exit_code == 0, lossless.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (full, lossless))
    assert b["mode"] == "lossless" and b["generated_text"] == a["generated_text"]
    assert "lossless mode drafts with them" in lossless.output
