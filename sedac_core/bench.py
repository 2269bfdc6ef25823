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
import torch.nn.functional as F

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


HF_EARLY_EXIT = "hf-early-exit"  # transformers' generate(assistant_early_exit=E), a bench-only mode


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_decode_bench(
    *,
    model: str | None = None,
    local: bool = False,
    max_new_tokens: int = 128,
    n_prompts: int = 4,
    rounds: int = 2,
    prompts: list[str] | None = None,
    modes: list[str] | None = None,
    json_out: Path | None = None,
    plot_out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    modes = [m for m in (modes or ["full"]) if m != "hf"]  # hf (generate) is always the baseline
    if "full" not in modes:
        modes.insert(0, "full")  # speedup_vs_full needs it
    hf_modes = [m for m in modes if m == HF_EARLY_EXIT]  # transformers' own runs, beside the engine's
    bundle = load_model(model, local=local, progress=echo)
    engine = SedacEngine(bundle)
    engine.settle_kernels()  # no timed run on torch's matmuls while the kernel builds
    engine.set_adaptive(False)  # every mode and round at the same thresholds
    prompts = (prompts or BENCH_PROMPTS)[: max(1, n_prompts)]
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

    # transformers' self-speculative early exit drafts with the first E layers (its LayerSkip support): the
    # same idea as lossless mode, without trained exits, for comparison in the same table
    early_exit_layer = max(1, round(0.8 * engine.num_layers))
    if engine.exit_heads is not None:
        from .speculative import Drafter

        early_exit_layer = Drafter(engine, engine.config.lossless).draft_layer

    def run_hf_early_exit(prompt: str) -> tuple[float, list[int], Any]:
        ids = torch.tensor([tokenizer_ids[prompt]], device=bundle.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    do_sample=False, assistant_early_exit=early_exit_layer)
        return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist(), None

    def run_mode(mode: str, prompt: str) -> tuple[float, list[int], Any]:
        if mode == HF_EARLY_EXIT:
            return run_hf_early_exit(prompt)
        engine.reset()  # no prefix reuse between runs: every run prefills its prompt like generate does
        t0 = time.perf_counter()
        result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, mode=mode,
                                                   ignore_eos=True))
        return time.perf_counter() - t0, result.token_ids, result

    def teacher_forced_agreement(mode: str, prompt: str, ref: list[int]) -> float:
        """Along the full model's greedy output: how often this mode picks the same next token given the same
        prefix (with its own KV fill in effect)."""
        engine.reset()
        res = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=len(ref), mode=mode,
                                                forced_tokens=ref, ignore_eos=True))
        return sum(a == b for a, b in zip(res.token_ids, ref)) / max(1, len(ref))

    # warm-up (first calls allocate and pick kernels)
    run_hf(prompts[0])
    for mode in modes:
        run_mode(mode, prompts[0])

    times: dict[str, list[float]] = {"hf": [], **{m: [] for m in modes}}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    ratios_full: dict[str, list[float]] = {m: [] for m in modes}
    exact: dict[str, list[bool]] = {m: [] for m in modes}
    agreement: dict[str, list[float]] = {m: [] for m in modes}
    exit_layers: dict[str, list[float]] = {m: [] for m in modes}
    checks: dict[str, int] = {m: 0 for m in modes}  # exit checks run in the timed runs (engine.exit_checks)
    # (drafted, accepted, rounds, copied, copied accepted, own text, own text accepted)
    drafts: dict[str, list[tuple[int, ...]]] = {m: [] for m in modes}
    for r in range(rounds):
        for prompt in prompts:
            order = ["hf", *modes] if r % 2 == 0 else [*modes, "hf"]
            got: dict[str, tuple[float, list[int], Any]] = {}
            for name in order:
                if name == "hf":
                    dt, ids = run_hf(prompt)
                    got[name] = (dt, ids, None)
                else:
                    before = engine.exit_checks
                    got[name] = run_mode(name, prompt)
                    checks[name] += engine.exit_checks - before
                times[name].append(got[name][0])
            ref = got["hf"][1]
            for m in modes:
                dt, ids, result = got[m]
                ratios[m].append(got["hf"][0] / dt)
                ratios_full[m].append(got["full"][0] / dt)
                # full mode is checked against generate; every other mode against full-depth greedy decoding
                exact[m].append(ids == (ref if m == "full" else got["full"][1]))
                if r == 0:
                    agreement[m].append(1.0 if m in ("full", "lossless", HF_EARLY_EXIT) and ids == ref
                                        else teacher_forced_agreement(m, prompt, ref)
                                        if m not in hf_modes else float("nan"))
                if result is None:  # transformers' run: no per-token information
                    exit_layers[m].append(float(engine.num_layers))
                    continue
                exit_layers[m].append(result.avg_exit_layer)
                end = result.events[-1]
                drafts[m].append((end.drafted, end.accepted, end.rounds, end.copied, end.copied_accepted,
                                  end.own_text, end.own_text_accepted))
            echo(f"round {r + 1} · {prompt[:40]!r}: " + ", ".join(
                f"{name} {max_new_tokens / got[name][0]:.1f} tok/s" for name in order))
    n_tokens = max_new_tokens
    report: dict[str, Any] = {
        "model": bundle.name,
        "num_layers": engine.num_layers,
        "device": str(bundle.device),
        "threads": torch.get_num_threads(),
        "matmul": "kernel" if engine.anatomy.linear is not F.linear else "torch",
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "rounds": rounds,
        "hf": {"tok_per_s": n_tokens * len(times["hf"]) / sum(times["hf"])},
        "modes": {},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tau_low": engine.tau_low,
        "tau_high": engine.tau_high,
        "profile": str(engine.profile_dir) if engine.profile_dir else None,
        "oracle_skip_ratio": (engine.exit_heads.meta.get("calibration", {}).get("oracle_skip_ratio")
                              if engine.exit_heads is not None else None),
    }
    for m in modes:
        report["modes"][m] = {
            "tok_per_s": round(n_tokens * len(times[m]) / sum(times[m]), 2),
            "speedup_vs_hf": round(statistics.median(ratios[m]), 3),
            "speedup_vs_hf_min": round(min(ratios[m]), 3),
            "speedup_vs_full": round(statistics.median(ratios_full[m]), 3),
            "exact_match": round(sum(exact[m]) / len(exact[m]), 3),
            "agreement": round(statistics.mean(agreement[m]), 4),
            "avg_exit_layer": round(statistics.mean(exit_layers[m]), 2),
            "skip_ratio": round(1 - statistics.mean(exit_layers[m]) / engine.num_layers, 4),
        }
        if m == "exit":  # what deciding cost: checks (translator + reduced head) per generated token
            report["modes"][m]["checks_per_token"] = round(checks[m] / (n_tokens * len(times[m])), 3)
        if m == "lossless":
            drafted, accepted, n_rounds, copied, copied_ok, own, own_ok = (sum(x[i] for x in drafts[m])
                                                                           for i in range(7))
            layers_drafted, layers_ok = drafted - copied - own, accepted - copied_ok - own_ok
            report["modes"][m].update(
                acceptance_rate=round(accepted / drafted, 4) if drafted else 0.0,
                copied_drafts=copied, copied_acceptance=round(copied_ok / copied, 4) if copied else 0.0,
                own_text_drafts=own, own_text_acceptance=round(own_ok / own, 4) if own else 0.0,
                own_text_accepted=own_ok,
                model_drafts=layers_drafted,
                model_draft_acceptance=round(layers_ok / layers_drafted, 4) if layers_drafted else 0.0,
                avg_draft_len=round(drafted / n_rounds, 3) if n_rounds else 0.0,
                tokens_per_round=round(n_tokens * len(drafts[m]) / n_rounds, 3) if n_rounds else 0.0,
                draft_layer=early_exit_layer)
        if m == HF_EARLY_EXIT:
            report["modes"][m].update(draft_layer=early_exit_layer, agreement=None, skip_ratio=None,
                                      avg_exit_layer=None)
    report["hf"]["tok_per_s"] = round(report["hf"]["tok_per_s"], 2)
    echo("")
    echo(f"{'mode':<10} {'tok/s':>8} {'vs HF':>7} {'vs full':>8} {'exact':>6} {'agree':>6} {'skip':>6} {'exit':>6}")
    echo(f"{'hf':<10} {report['hf']['tok_per_s']:>8.1f} {'1.00x':>7}")
    for m, row in report["modes"].items():
        quality = ("" if row["agreement"] is None else
                   f" {row['agreement']:>6.3f} {row['skip_ratio']:>6.3f} {row['avg_exit_layer']:>6.1f}")
        echo(f"{m:<10} {row['tok_per_s']:>8.1f} {row['speedup_vs_hf']:>6.2f}x {row['speedup_vs_full']:>7.2f}x "
             f"{row['exact_match']:>6.2f}{quality}")
        if "checks_per_token" in row:
            echo(f"{'':<10} {row['checks_per_token']:.2f} exit checks per token")
        if "acceptance_rate" in row:
            echo(f"{'':<10} drafts at layer {row['draft_layer']}: acceptance {row['acceptance_rate']:.3f}, "
                 f"{row['avg_draft_len']:.2f} drafted and {row['tokens_per_round']:.2f} tokens per verification")
            echo(f"{'':<10} of the drafts, {row['copied_drafts']} copied from the context (acceptance "
                 f"{row['copied_acceptance']:.3f}), {row['own_text_drafts']} guessed from the model's own text "
                 f"(acceptance {row['own_text_acceptance']:.3f}), {row['model_drafts']} drafted by the exit heads "
                 f"(acceptance {row['model_draft_acceptance']:.3f})")
    if report["oracle_skip_ratio"] is not None:
        echo(f"oracle skip ratio with these exit heads: {report['oracle_skip_ratio']:.3f} "
             f"(tau_low {report['tau_low']}, profile {report['profile']})")
    echo(f"engine matmuls: {report['matmul']} (sedac-chat info says why)")
    echo(f"peak RSS {report['peak_rss_mb']:.0f} MB (this process, HF and engine together)")
    if plot_out is not None:
        sweep = (engine.exit_heads.meta.get("calibration", {}).get("sweep") if engine.exit_heads is not None
                 else None)
        plot_tradeoff(report, sweep or [], plot_out)
        echo(f"wrote {plot_out}")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
        echo(f"wrote {json_out}")
    return report


def plot_tradeoff(report: dict[str, Any], sweep: list[dict[str, float]], out: Path) -> None:
    """Skip ratio vs agreement: the calibration sweep over tau_low (teacher-forced, held-out calibration data)
    and the modes measured in this run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import SedacError

        raise SedacError("--plot needs matplotlib: pip install matplotlib (or scripts/install.sh)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if sweep:
        ax.plot([r["agreement"] for r in sweep], [r["skip_ratio"] for r in sweep], "-", color="0.6",
                label="calibration sweep over tau_low")
    for mode, row in report["modes"].items():
        ax.scatter([row["agreement"]], [row["skip_ratio"]], s=50, zorder=3,
                   label=f"{mode}: {row['speedup_vs_full']:.2f}x vs full, {row['speedup_vs_hf']:.2f}x vs HF")
    ax.set_xlabel("agreement with the full model (teacher-forced)")
    ax.set_ylabel("skip ratio (layer computations skipped)")
    ax.set_title(f"{report['model']}: speed/quality trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
