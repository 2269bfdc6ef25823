"""What `sedac.adaptive_threshold` does on a model: the running P20/P50/P90 of the final entropy over a session,
next to the calibrated thresholds, and what following P50 with tau_low would cost (teacher-forced agreement and
skip ratio of exit mode along the full model's greedy output), and how far an exited token's reported entropy
(its exit head's) is from the final one.

    python benchmarks/bench_adaptive.py --prompts 6 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json

from sedac_core.bench import BENCH_PROMPTS
from sedac_core.calibration import OnlinePercentiles
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import ThresholdChange, TokenEvent
from sedac_core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    engine = SedacEngine(load_model(a.model))
    calibrated = (engine.tau_low, engine.tau_high)
    prompts = BENCH_PROMPTS[: a.prompts]

    # 1. a session in full mode with adaptation on (the default config): the thresholds it publishes
    refs, full_entropy, changes = [], [], []
    for p in prompts:
        res = engine.generate(GenerationRequest(prompt=p, max_new_tokens=a.max_new_tokens, ignore_eos=True))
        refs.append(res.token_ids)
        full_entropy.append([t.entropy_bits for t in res.token_events])
        changes += [e for e in res.events if isinstance(e, ThresholdChange)]
    print(f"calibrated tau_low {calibrated[0]}, tau_high {calibrated[1]}")
    for c in changes:
        print(f"  adaptive change: tau_low {c.tau_low} tau_high {c.tau_high} {json.dumps(c.percentiles)}")
    final = changes[-1].percentiles if changes else {}

    # 2. exit mode, teacher-forced along the full output, at the calibrated tau_low and at tau_low = P50
    engine.set_adaptive(False)
    rows = []
    for name, tau_low in (("calibrated", calibrated[0]), ("P50", final.get("p50", calibrated[0]))):
        engine.set_thresholds(tau_low=tau_low, tau_high=calibrated[1], source="config")
        agree = skipped = total = 0
        diffs, mixed = [], OnlinePercentiles(100_000)
        for ref, ent in zip(refs, full_entropy):
            engine.reset()
            res = engine.generate(GenerationRequest(prompt=prompts[refs.index(ref)], max_new_tokens=len(ref),
                                                    mode="exit", forced_tokens=ref, ignore_eos=True))
            for t, want, h in zip(res.token_events, ref, ent):
                agree += t.token_id == want
                skipped += t.num_layers - t.exit_layer
                total += t.num_layers
                mixed.add(t.entropy_bits)
                if t.exit_layer < t.num_layers:
                    diffs.append(t.entropy_bits - h)
        n = sum(len(r) for r in refs)
        p = mixed.percentiles((0.2, 0.5, 0.9))
        rows.append({
            "tau_low": name, "value": round(tau_low, 4), "agreement": round(agree / n, 4),
            "skip_ratio": round(skipped / total, 4), "exited": len(diffs),
            "exit_minus_final_bits_mean": round(sum(diffs) / len(diffs), 4) if diffs else None,
            "exit_minus_final_bits_mean_abs": round(sum(map(abs, diffs)) / len(diffs), 4) if diffs else None,
            "reported_p20_p50_p90": [round(x, 4) for x in p],
        })
    full = OnlinePercentiles(100_000)
    for ent in full_entropy:
        for h in ent:
            full.add(h)
    print("final-entropy P20/P50/P90 over all tokens:", [round(x, 4) for x in full.percentiles((0.2, 0.5, 0.9))])
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
