"""The routing decision: given a checked layer's (estimated) exit entropy and the live thresholds, continue, exit,
or (at full depth) escalate to O1 reasoning."""

from __future__ import annotations

from dataclasses import dataclass, field

CONTINUE = "continue"
EXIT = "exit"
ESCALATE = "escalate"


@dataclass
class ExitPolicy:
    """Exit at the first checked layer >= min_layer whose estimated exit entropy is below tau_low (+ that
    layer's calibrated offset: calibration may make deep layers, whose exits agree more often, looser)."""

    min_layer: int = 1
    layer_offsets: dict[int, float] = field(default_factory=dict)

    def threshold(self, layer: int, tau_low: float) -> float:
        """The layer's exit threshold: tau_low plus its calibrated offset."""
        return tau_low + self.layer_offsets.get(layer, 0.0)

    def decide(self, layer: int, entropy_bits: float, tau_low: float) -> str:
        if layer < self.min_layer:
            return CONTINUE
        return EXIT if entropy_bits < self.threshold(layer, tau_low) else CONTINUE

    @staticmethod
    def final(entropy_bits: float, tau_high: float) -> str:
        """At full depth: escalate (O1) above tau_high, else just continue with the argmax/sample."""
        return ESCALATE if entropy_bits > tau_high else CONTINUE
