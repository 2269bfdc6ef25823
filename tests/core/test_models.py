"""Resolving model specs: local directories, hub ids from the local cache, GGUF files, and every bad input a user
can give getting a one-line error that names the problem and the fix."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_tiny_model, make_tokenizer
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.errors import ModelLoadError, UnsupportedArchitectureError
from sedac_core.models import default_model_path, ensure_converted, load_model, resolve_spec


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", seed=5).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_local_directory_loads_and_answers_like_the_original(tiny_model_dir):
    bundle = load_model(str(tiny_model_dir), local=True)
    assert bundle.num_layers == 4 and bundle.chat.has_template
    assert bundle.name == tiny_model_dir.name
    ours = SedacEngine(bundle).generate(GenerationRequest(prompt="Hi", max_new_tokens=8, ignore_eos=True))
    from conftest import make_bundle

    again = SedacEngine(make_bundle("llama", seed=5)).generate(
        GenerationRequest(prompt="Hi", max_new_tokens=8, ignore_eos=True))
    assert ours.token_ids == again.token_ids


def test_hub_id_resolves_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--sedac--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snap)
    (hub / "models--sedac--tiny-llama" / "refs").mkdir()
    (hub / "models--sedac--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    resolved = resolve_spec("sedac/tiny-llama", local=True)
    assert resolved.kind == "dir" and resolved.path == snap
    with pytest.raises(ModelLoadError, match="'sedac/missing' is not in the local Hugging Face cache and --local"):
        resolve_spec("sedac/missing", local=True)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model path does not exist: .*nope; check the path"):
        load_model(str(tmp_path / "nope"), local=True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./also-missing.gguf", local=True)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a model directory \\(no config.json\\)"):
        load_model(str(tmp_path), local=True)


def test_model_directory_without_weights(tiny_model_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(d), local=True)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'gpt2' is not supported.*llama"):
        load_model(str(tmp_path), local=True)


def test_file_that_is_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(p), local=True)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        load_model(str(other), local=True)


def test_truncated_gguf(tmp_path, monkeypatch):
    src = default_model_path()
    if src is None:
        pytest.skip("the default model package is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = tmp_path / "cut.gguf"
    with src.open("rb") as fh:
        p.write_bytes(fh.read(1 << 20))
    with pytest.raises(ModelLoadError, match="cannot read GGUF file .*cut.gguf .*re-download it"):
        load_model(str(p), local=True)
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-converted left in the cache


def test_converted_gguf_is_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    from sedac_core.models import converted_dir_for

    target = converted_dir_for(gguf)
    assert str(target).startswith(str(tmp_path / "sedac-chat" / "models"))
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_text("")
    assert ensure_converted(gguf) == target  # no conversion the second time
    gguf.write_bytes(b"GGUF" + b"\1" * 64)
    assert converted_dir_for(gguf) != target  # a changed file gets its own cache entry
