"""Shared fixtures: tiny random Llama and Qwen2 models with a small byte-level BPE tokenizer, built in seconds."""

from __future__ import annotations

import functools

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Entropy measures how uncertain the model is about the next token.",
    "Hello! How can I help you today? 1 2 3 4 5 6 7 8 9 10",
    "SEDAC exits early when the next token is easy, and thinks harder when it is hard.",
]


@pytest.fixture(scope="session", autouse=True)
def _matmul_kernel_settled():
    """Engines pick the skinny-matmul kernel once its background build is done; build it up front (seconds when
    cached, about a minute on a clean machine) so every test sees one arithmetic, not a switch halfway through.
    A build that has not finished in 15 minutes is abandoned: the whole session then runs on torch's matmuls."""
    import warnings

    from sedac_core.matmul import GEMM

    if GEMM.enabled and not GEMM.wait(timeout=900) and GEMM._result is None:  # (SEDAC_MATMUL_TORCH=1: off)
        GEMM.set_enabled(False)
        warnings.warn("the matmul kernel build did not finish in 15 minutes; the tests run on torch's matmuls")
    from sedac_core.kernels import select_kernels

    select_kernels(wait=True)  # the statistics kernel too: no switch partway through the run
    yield


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def make_tiny_model(arch: str = "llama", *, layers: int = 4, seed: int = 0, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size or 400,  # = the test tokenizer's size
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    # the default init (std 0.02) makes a tiny model repeat one token forever; a wider one gives varied text, so
    # parity tests compare real sequences. Biases (Qwen2's q/k/v) get values too, so they are exercised.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def make_bundle(arch: str = "llama", *, layers: int = 4, seed: int = 0, chat_template: str | None = CHATML):
    from sedac_core.models import ModelBundle

    return ModelBundle.from_model(make_tiny_model(arch, layers=layers, seed=seed), make_tokenizer(chat_template),
                                  name=f"tiny-{arch}")


def make_exit_heads(bundle, layers, *, scale: float = 0.0, seed: int = 0):
    """Exit heads without training: translators near the identity (scale > 0 adds noise, so drafts go wrong),
    probes that always estimate a low entropy, and a draft vocabulary in reverse id order."""
    from sedac_core.exits import ExitHeads

    h = bundle.model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    return ExitHeads(
        layers=list(layers), hidden_size=h,
        translator_w={l: torch.eye(h) + scale * torch.randn(h, h, generator=g) for l in layers},
        translator_b={l: torch.zeros(h) for l in layers},
        probe_w={l: torch.zeros(h) for l in layers}, probe_b={l: -5.0 for l in layers},
        draft_vocab=torch.arange(bundle.model.config.vocab_size).flip(0))


@pytest.fixture
def tiny_llama_bundle():
    return make_bundle("llama")


@pytest.fixture
def tiny_qwen2_bundle():
    return make_bundle("qwen2")
