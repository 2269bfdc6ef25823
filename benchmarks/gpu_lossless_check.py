"""Lossless mode on a GPU at a real model's layer shapes (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads) with random
weights: is greedy output still identical to full depth when the verify pass runs several rows through cuBLAS and
SDPA while full depth runs one? (On CPU the skinny-matmul kernel makes rows bitwise independent of the batch; on a
GPU nothing guarantees it.) Prints, per dtype and draft setting, how many prompts match and where the first
difference is.
    python benchmarks/gpu_lossless_check.py [--device cuda] [--tokens 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_exit_heads, make_tokenizer  # noqa: E402

from sedac_core.config import SedacConfig  # noqa: E402
from sedac_core.engine import GenerationRequest, SedacEngine  # noqa: E402
from sedac_core.models import ModelBundle  # noqa: E402

PROMPTS = ["Hello", "def add(a, b):", "The capital of France is", "Entropy 7", "1 2 3 4 5", "SEDAC exits early"]
SETTINGS = {
    "always-exit-drafts": dict(exit_draft_entropy=32.0, full_draft_entropy=0.0),
    "copied-drafts": dict(exit_draft_entropy=0.0, full_draft_entropy=0.0, lookup_tokens=6, max_draft_tokens=8),
    "mixed": dict(exit_draft_entropy=3.0, full_draft_entropy=4.0, max_draft_tokens=3),
}


def model(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.07)
    return m.to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        bundle = ModelBundle.from_model(model(dtype, args.device), make_tokenizer(), name="smollm2-shape-random")
        for name, opts in SETTINGS.items():
            config = SedacConfig()
            config.lossless = dataclasses.replace(config.lossless, **opts)
            engine = SedacEngine(bundle, config)
            engine.use_exit_heads(make_exit_heads(bundle, [8, 16, 22], scale=0.02), apply_calibration=False)
            same, first_diff, t_full, t_ll, accepted, rejected = 0, [], 0.0, 0.0, 0, 0
            for prompt in PROMPTS:
                outs = {}
                for mode in ("full", "lossless"):
                    engine.reset()
                    t0 = time.perf_counter()
                    r = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=args.tokens, mode=mode,
                                                          ignore_eos=True))
                    dt = time.perf_counter() - t0
                    outs[mode] = r.token_ids
                    if mode == "full":
                        t_full += dt
                    else:
                        t_ll += dt
                        drafts = [getattr(e, "draft", None) for e in r.events]
                        accepted += drafts.count("accepted")
                        rejected += drafts.count("rejected")
                if outs["full"] == outs["lossless"]:
                    same += 1
                else:
                    first_diff.append(next(i for i, (a, b) in enumerate(zip(outs["full"], outs["lossless"]))
                                           if a != b))
            print(f"{str(dtype).split('.')[-1]:9} {name:19} identical {same}/{len(PROMPTS)}"
                  f"{'' if not first_diff else f' (first difference at tokens {first_diff})'}; "
                  f"drafts accepted {accepted} rejected {rejected}; full {t_full:.2f} s, lossless {t_ll:.2f} s", flush=True)


if __name__ == "__main__":
    main()
