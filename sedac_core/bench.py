"""The benchmark harness behind `sedac-chat bench`: tokens/s of each mode against Hugging Face `generate` on the
same model and prompts, measured alternately in one run (A, B, A, B...), and agreement with the full model."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .engine import GenerationRequest, SedacEngine
from .models import load_model

BENCH_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "What are the main differences between Python and JavaScript?",
    "Give me five tips for staying productive when working from home.",
    "Describe the water cycle in simple terms.",
    "Write a poem about the ocean at night.",
    "What is the capital of France, and what is it famous for?",
    "How do I make a cup of tea?",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_decode_bench(
    *,
    model: str | None = None,
    local: bool = False,
    max_new_tokens: int = 128,
    n_prompts: int = 4,
    rounds: int = 2,
    modes: list[str] | None = None,
    json_out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    modes = modes or ["full"]
    bundle = load_model(model, local=local, progress=echo)
    engine = SedacEngine(bundle)
    prompts = BENCH_PROMPTS[: max(1, n_prompts)]
    # the baseline is transformers' own model, loaded separately: the engine re-lays its copy's weights
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(bundle.model_dir, dtype=bundle.dtype).to(bundle.device).eval()
    tokenizer_ids = {p: bundle.chat.encode([{"role": "user", "content": p}]) for p in prompts}

    def run_hf(prompt: str) -> tuple[float, list[int]]:
        ids = torch.tensor([tokenizer_ids[prompt]], device=bundle.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    do_sample=False)
        return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()

    def run_mode(mode: str, prompt: str) -> tuple[float, list[int], Any]:
        engine.reset()  # no prefix reuse between runs: every run prefills its prompt like generate does
        t0 = time.perf_counter()
        result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, mode=mode,
                                                   ignore_eos=True))
        return time.perf_counter() - t0, result.token_ids, result

    # warm-up (first calls allocate and pick kernels)
    run_hf(prompts[0])
    for mode in modes:
        run_mode(mode, prompts[0])

    times: dict[str, list[float]] = {"hf": [], **{m: [] for m in modes}}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    exact: dict[str, list[bool]] = {m: [] for m in modes}
    agreement: dict[str, list[float]] = {m: [] for m in modes}
    exit_layers: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for prompt in prompts:
            order = ["hf", *modes] if r % 2 == 0 else [*modes, "hf"]
            got: dict[str, tuple[float, list[int], Any]] = {}
            for name in order:
                if name == "hf":
                    dt, ids = run_hf(prompt)
                    got[name] = (dt, ids, None)
                else:
                    got[name] = run_mode(name, prompt)
                times[name].append(got[name][0])
            ref = got["hf"][1]
            for m in modes:
                dt, ids, result = got[m]
                ratios[m].append(got["hf"][0] / dt)
                exact[m].append(ids == ref)
                agreement[m].append(sum(a == b for a, b in zip(ids, ref)) / max(1, len(ref)))
                exit_layers[m].append(result.avg_exit_layer)
            echo(f"round {r + 1} · {prompt[:40]!r}: " + ", ".join(
                f"{name} {max_new_tokens / got[name][0]:.1f} tok/s" for name in order))
    n_tokens = max_new_tokens
    report: dict[str, Any] = {
        "model": bundle.name,
        "num_layers": engine.num_layers,
        "device": str(bundle.device),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "rounds": rounds,
        "hf": {"tok_per_s": n_tokens * len(times["hf"]) / sum(times["hf"])},
        "modes": {},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    for m in modes:
        report["modes"][m] = {
            "tok_per_s": round(n_tokens * len(times[m]) / sum(times[m]), 2),
            "speedup_vs_hf": round(statistics.median(ratios[m]), 3),
            "speedup_vs_hf_min": round(min(ratios[m]), 3),
            "exact_match": round(sum(exact[m]) / len(exact[m]), 3),
            "token_agreement": round(statistics.mean(agreement[m]), 4),
            "avg_exit_layer": round(statistics.mean(exit_layers[m]), 2),
            "skip_ratio": round(1 - statistics.mean(exit_layers[m]) / engine.num_layers, 4),
        }
    report["hf"]["tok_per_s"] = round(report["hf"]["tok_per_s"], 2)
    echo("")
    echo(f"{'mode':<10} {'tok/s':>8} {'vs HF':>7} {'exact':>6} {'agree':>6} {'exit':>6}")
    echo(f"{'hf':<10} {report['hf']['tok_per_s']:>8.1f} {'1.00x':>7}")
    for m, row in report["modes"].items():
        echo(f"{m:<10} {row['tok_per_s']:>8.1f} {row['speedup_vs_hf']:>6.2f}x {row['exact_match']:>6.2f} "
             f"{row['token_agreement']:>6.3f} {row['avg_exit_layer']:>6.1f}")
    echo(f"peak RSS {report['peak_rss_mb']:.0f} MB (this process, HF and engine together)")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
        echo(f"wrote {json_out}")
    return report
