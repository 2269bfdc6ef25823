"""What the exit gate buys: exit mode with the calibrated gate against exit mode checking every token, beside full
depth, in one run (the three alternate prompt by prompt, the two exit runs in turns first). Per setting: tokens/s
and its ratio to full depth, exit checks and gate estimates per generated token, and, teacher-forced along the full
model's greedy output, the agreement and skip ratio.

    python benchmarks/bench_gate.py --prompts 8 --max-new-tokens 128 --rounds 1 [--tau-low 1.1]
        [--no-gate-tau-low 0.95] [--json OUT]

Without --no-gate-tau-low both settings run at one tau_low; with it, each can run at its own calibration (the
gate's calibration moves tau_low: `sedac-chat calibrate` prints both).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sedac_core.bench import BENCH_PROMPTS
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.models import load_model

SETTINGS = ("gate", "no gate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--local", action="store_true", help="the model spec is local (no hub)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tau-low", type=float, default=None, help="exit threshold (bits; default: the calibrated one)")
    ap.add_argument("--no-gate-tau-low", type=float, default=None,
                    help="exit threshold for the run without the gate (default: the same as with it)")
    ap.add_argument("--json", default=None, help="write the report here")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    from sedac_core.config import SedacConfig

    engine = SedacEngine(load_model(a.model or SedacConfig().model.model_name, local=a.local or a.model is None))
    if engine.exit_heads is None:
        raise SystemExit(engine.profile_notice or "no exit heads for this model; run `sedac-chat train`")
    if not engine.gate_margins:
        raise SystemExit("the profile's calibration has no gate margins: run `sedac-chat calibrate` (after `train`)")
    engine.set_adaptive(False)
    taus = {"gate": a.tau_low if a.tau_low is not None else engine.tau_low}
    taus["no gate"] = a.no_gate_tau_low if a.no_gate_tau_low is not None else taus["gate"]
    engine.set_thresholds(tau_high=max(engine.tau_high, *taus.values()) + 1.0, source="user")
    prompts = BENCH_PROMPTS[: a.prompts]
    rows = {name: {"time": 0.0, "tokens": 0, "checks": 0, "gates": 0, "agree": 0, "skipped": 0, "layers": 0,
                   "forced": 0} for name in ("full", *SETTINGS)}

    def run(name: str, prompt: str, forced: list[int] | None = None):  # noqa: ANN202
        engine.exit_gate = name == "gate"
        if name in taus:
            engine.set_thresholds(tau_low=taus[name], source="user")
        engine.reset()
        engine.exit_checks = engine.gate_estimates = 0
        req = GenerationRequest(prompt=prompt, max_new_tokens=a.max_new_tokens, ignore_eos=True,
                                mode="full" if name == "full" else "exit", forced_tokens=forced)
        t0 = time.perf_counter()
        res = engine.generate(req)
        return res, time.perf_counter() - t0

    for r in range(a.rounds):
        for i, prompt in enumerate(prompts):
            ref, dt = run("full", prompt)
            rows["full"]["time"] += dt
            rows["full"]["tokens"] += len(ref.token_ids)
            order = SETTINGS if (i + r) % 2 == 0 else SETTINGS[::-1]
            for name in order:
                res, dt = run(name, prompt)
                row = rows[name]
                row["time"] += dt
                row["tokens"] += len(res.token_ids)
                row["checks"] += engine.exit_checks
                row["gates"] += engine.gate_estimates
            if r == 0:  # teacher-forced quality (deterministic: once)
                for name in SETTINGS:
                    res, _ = run(name, prompt, forced=ref.token_ids)
                    row = rows[name]
                    row["forced"] += len(ref.token_ids)
                    for t, want in zip(res.token_events, ref.token_ids):
                        row["agree"] += t.token_id == want
                        row["skipped"] += t.num_layers - t.exit_layer
                        row["layers"] += t.num_layers
    full_rate = rows["full"]["tokens"] / rows["full"]["time"]
    report = {"tau_low": taus, "gate_margins": engine.gate_margins, "prompts": len(prompts),
              "max_new_tokens": a.max_new_tokens, "rounds": a.rounds, "settings": {}}
    for name, row in rows.items():
        rate = row["tokens"] / row["time"]
        out = {"tok_per_s": round(rate, 2), "speedup_vs_full": round(rate / full_rate, 4)}
        if name != "full":
            n = row["tokens"]
            out.update(tau_low=taus[name], checks_per_token=round(row["checks"] / n, 3),
                       gates_per_token=round(row["gates"] / n, 3), agreement=round(row["agree"] / row["forced"], 4),
                       skip_ratio=round(row["skipped"] / row["layers"], 4))
        report["settings"][name] = out
        print(f"{name:8s} " + "  ".join(f"{k} {v}" for k, v in out.items()))
    ratio = report["settings"]["gate"]["tok_per_s"] / report["settings"]["no gate"]["tok_per_s"]
    print(f"gate vs no gate: {ratio:.3f}x (tau_low {taus['gate']} / {taus['no gate']})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
