"""The engine on a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs it on a lent device): every mode
generates on the GPU with the CUDA statistics kernel, lossless greedy output equals full depth there too, and full
depth on the GPU gives the CPU's tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import make_bundle, make_exit_heads
from sedac_core import kernels
from sedac_core.config import SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import TokenEvent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = ["Hello", "def add(a, b):", "The capital of France is"]


def _engine(device: str, layers: int = 6) -> SedacEngine:
    bundle = make_bundle("llama", layers=layers, seed=3)
    bundle.model.to(device)
    engine = SedacEngine(bundle, SedacConfig())
    engine.use_exit_heads(make_exit_heads(bundle, [2, layers - 2], scale=0.05), apply_calibration=False)
    return engine


def _run(engine: SedacEngine, prompt: str, mode: str, n: int = 24, **kw):
    engine.reset()
    return engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, mode=mode, ignore_eos=True, **kw))


def test_cuda_kernel_is_the_active_backend():
    assert kernels.active_backend("auto")[0] == "cuda"


@pytest.mark.parametrize("mode", ["full", "exit", "lossless"])
def test_every_mode_generates_on_the_gpu(mode):
    engine = _engine("cuda")
    assert engine.device.type == "cuda"
    for prompt in PROMPTS:
        result = _run(engine, prompt, mode)
        tokens = [e for e in result.events if isinstance(e, TokenEvent)]
        assert len(result.token_ids) == 24 and tokens
        assert all(1 <= t.exit_layer <= engine.num_layers for t in tokens)
    result = _run(engine, PROMPTS[0], mode, o1=True)
    assert len(result.token_ids) == 24


@pytest.mark.parametrize("mode", ["full", "exit", "lossless"])
def test_sampling_on_the_gpu_is_seeded(mode):
    """temperature and top-p (the CPU generator draws from probabilities computed on the GPU)."""
    engine = _engine("cuda")
    a = _run(engine, PROMPTS[0], mode, temperature=0.8, top_p=0.9, seed=7).token_ids
    b = _run(engine, PROMPTS[0], mode, temperature=0.8, top_p=0.9, seed=7).token_ids
    assert a == b and len(a) == 24


def test_lossless_equals_full_depth_on_the_gpu():
    engine = _engine("cuda")
    for prompt in PROMPTS:
        assert _run(engine, prompt, "lossless").token_ids == _run(engine, prompt, "full").token_ids, prompt


def test_full_depth_on_the_gpu_follows_the_cpu():
    """fp32 on both: the same greedy tokens, unless a near-tie flips (reported, at most one prompt)."""
    cpu, gpu = _engine("cpu"), _engine("cuda")
    same = [_run(cpu, p, "full").token_ids == _run(gpu, p, "full").token_ids for p in PROMPTS]
    assert sum(same) >= len(PROMPTS) - 1, same
