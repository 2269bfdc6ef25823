"""The chat app at the engine's speed? The same prompts decoded inside the running app (headless pilot, panels
shown, 120x40) and by the engine alone (as `sedac-chat ask` does), per mode, in one run: the two alternate prompt by
prompt in a balanced order (app, engine, engine, app, ...), on one engine object (same weights, kernels and profile),
each run from an empty cache. tok/s is the engine's own measure (GenerationEnd: tokens / elapsed, prefill included),
so both sides count the same thing; the ratio is the median of the per-prompt ratios app / engine.

    python benchmarks/bench_app.py [--modes full,exit,lossless] [--prompts 4] [--rounds 2] [--max-new-tokens 128]
        [--size 120x40] [--json OUT]

`--json` writes {"modes": {"full": {"app_tok_s": ..., "engine_tok_s": ..., "ratio": ...}, ...}, "setup": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sedac_core.bench import BENCH_PROMPTS
from sedac_core.config import SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.models import load_model

NO_PANELS = False


def engine_run(engine: SedacEngine, prompt: str, mode: str, max_new: int) -> tuple[float, int, str]:
    engine.reset()
    result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=max_new, mode=mode))
    return result.tok_per_s, result.tokens, result.generated_text


async def app_run(engine: SedacEngine, config: SedacConfig, prompt: str, size: tuple[int, int]
                  ) -> tuple[float, int, str]:
    from sedac_tui.app import SedacChatApp

    engine.reset()

    def factory(bus, progress):  # the shared engine, publishing on this app's bus
        engine.bus = bus
        return engine

    app = SedacChatApp(config=config, engine_factory=factory, record_path=None, cursor_blink=False)
    async with app.run_test(size=size) as pilot:
        deadline = time.monotonic() + 60
        while app.live is None:
            if time.monotonic() > deadline:
                raise SystemExit("the app did not pick up the engine within 60 s")
            await pilot.pause(0.01)
        if NO_PANELS:
            app.screen.add_class("-no-panels")
        app.query_one("#prompt").value = prompt
        await pilot.press("enter")
        deadline = time.monotonic() + 600
        while app.state.last_end is None or app.live.busy:
            if time.monotonic() > deadline:
                raise SystemExit("the app's answer did not finish within 600 s")
            # a plain sleep: the app runs on this loop; pilot.pause() would also wait for a screen refresh, which
            # adds the harness's own UI work to what is measured
            await asyncio.sleep(0.25)
        end = app.state.last_end
        await pilot.pause(0.2)  # let the last frames render before the app closes
    return end.tok_per_s, end.tokens, end.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--modes", default="full,exit,lossless")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="app/engine pairs per prompt (order alternates)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--size", default="120x40", help="terminal size of the headless app, COLSxROWS")
    ap.add_argument("--json", default=None, help="write the report here")
    a = ap.parse_args()
    cols, rows = (int(v) for v in a.size.lower().split("x"))
    torch.set_grad_enabled(False)
    config = SedacConfig()
    config.generation.max_new_tokens = a.max_new_tokens
    config.sedac.adaptive_threshold = False  # thresholds fixed for both sides: each run decides alike
    bundle = load_model(a.model or config.model.model_name, local=a.local or a.model is None)
    engine = SedacEngine(bundle, config)
    engine.settle_kernels()
    prompts = BENCH_PROMPTS[: a.prompts]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    report: dict = {"modes": {}, "setup": {
        "model": bundle.name, "prompts": len(prompts), "rounds": a.rounds, "max_new_tokens": a.max_new_tokens,
        "size": f"{cols}x{rows}", "threads": torch.get_num_threads(), "order": "balanced (ABBA per prompt)"}}
    for mode in modes:
        engine.set_mode(mode)
        engine_run(engine, prompts[0], mode, 8)  # warm-up, both sides
        asyncio.run(app_run(engine, config, prompts[0], (cols, rows)))
        app_tps: list[float] = []
        eng_tps: list[float] = []
        ratios: list[float] = []
        same = 0
        runs = 0
        for r in range(a.rounds):
            for i, prompt in enumerate(prompts):
                order = ("app", "engine") if (r + i) % 2 == 0 else ("engine", "app")
                got = {}
                for side in order:
                    if side == "app":
                        got[side] = asyncio.run(app_run(engine, config, prompt, (cols, rows)))
                    else:
                        got[side] = engine_run(engine, prompt, mode, a.max_new_tokens)
                app_tps.append(got["app"][0])
                eng_tps.append(got["engine"][0])
                ratios.append(got["app"][0] / got["engine"][0])
                same += got["app"][2] == got["engine"][2]
                runs += 1
                print(f"{mode:9s} prompt {i} round {r}: app {got['app'][0]:6.2f} tok/s ({got['app'][1]} tok)  "
                      f"engine {got['engine'][0]:6.2f} tok/s ({got['engine'][1]} tok)  "
                      f"ratio {ratios[-1]:.3f}", file=sys.stderr, flush=True)
        row = {"app_tok_s": round(statistics.median(app_tps), 3), "engine_tok_s": round(statistics.median(eng_tps), 3),
               "ratio": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
               "same_text": f"{same}/{runs}", "runs": runs}
        report["modes"][mode] = row
    print(f"\n{'mode':10s} {'app tok/s':>10s} {'engine tok/s':>13s} {'ratio':>7s} {'min':>7s} {'same text':>10s}")
    for mode, row in report["modes"].items():
        print(f"{mode:10s} {row['app_tok_s']:10.2f} {row['engine_tok_s']:13.2f} {row['ratio']:7.3f} "
              f"{row['ratio_min']:7.3f} {row['same_text']:>10s}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
