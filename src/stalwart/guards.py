"""Guards that keep bad steps and bad replicas out of the committed weights.

Every guard decides from numbers that are identical on all replicas (the all-reduced loss
and gradients, the exchanged fingerprints), so every replica reaches the same verdict and
the commit vote agrees without another round trip.

- Non-finite: a NaN or Inf in the loss or in any gradient of any replica makes the
  all-reduced values non-finite everywhere; the step is committed nowhere.
- Spikes: a loss or gradient norm more than `sigma` standard deviations above the mean of
  a rolling window of accepted steps is skipped (OLMo-core skips at 6 sigma over 128
  steps). Only finite, accepted values enter the window: a NaN once poisoned OLMo's
  window, and a spike that entered it would widen the bound for the next one.
  `rollback_spikes` spikes within `rollback_window` steps mean the run is diverging, not
  seeing one bad batch: roll back to the last good checkpoint and keep reading data from
  after the offending batches (PaLM restarted ~100 steps earlier and skipped 200-500
  batches). If the gradient norm's spikes come back after that rollback, on fresh data
  from the restored weights, before the run is `rollback_window` steps past where they
  first rolled it back, and
  the loss is within its own bound, the batches were not the cause: the norm has moved to
  a new level as training went on (a phase of training, a larger share of clipped steps).
  The guard takes it as the new normal (REBASED: the step commits, the norm's window
  starts again from it) instead of rolling back forever. A loss that comes back above its
  bound is divergence: it rolls back again, and the stall rungs stop the run.
- Silent data corruption: `fingerprint` is an exact checksum of parameters and optimizer
  state; replicas that differ from the majority are healed from a good peer.
- Stragglers: a replica whose compute time stays above `factor` x the median for
  `patience` consecutive steps is reported (and optionally excluded).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

OK, NONFINITE, SPIKE, ROLLBACK, REBASED = "ok", "nonfinite", "spike", "rollback", "rebased"


@dataclass(frozen=True)
class Verdict:
    kind: str  # OK, NONFINITE, SPIKE, ROLLBACK or REBASED (commits: a new level taken)
    reason: str = ""

    @property
    def commit(self) -> bool:
        return self.kind in (OK, REBASED)


class SpikeGuard:
    def __init__(self, *, sigma: float, window: int, min_history: int, rollback_spikes: int,
                 rollback_window: int) -> None:
        self.sigma, self.window, self.min_history = sigma, window, min_history
        self.rollback_spikes, self.rollback_window = rollback_spikes, rollback_window
        self.history: dict[str, list[float]] = {"loss": [], "grad_norm": []}
        self.spike_steps: list[int] = []
        # The step at which the gradient norm's spikes last asked for a rollback, and the
        # one of the last rollback they caused (Recovery.rollback sets it once the
        # checkpoint is loaded: the checkpoint's own is older).
        self.asked_rollback_at: int | None = None
        self.rolled_back_at: int | None = None

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        values = {"loss": loss, "grad_norm": grad_norm}
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        if bad:
            return Verdict(NONFINITE, f"non-finite {' and '.join(bad)}")
        if self.sigma <= 0:
            return Verdict(OK)
        for name, value in values.items():
            bound = self._bound(self.history[name])
            if bound is not None and value > bound:
                self.spike_steps = [s for s in self.spike_steps if s > step - self.rollback_window] + [step]
                reason = f"{name} {value:.4g} above the rolling bound {bound:.4g}"
                if self.rollback_spikes and len(self.spike_steps) >= self.rollback_spikes:
                    self.spike_steps = []
                    if name == "grad_norm" and self._came_back(step):
                        self.rolled_back_at, self.history[name] = None, []
                        return Verdict(REBASED, f"{reason} again after a rollback, on fresh data: taken as its "
                                                "new level")
                    self.asked_rollback_at = step if name == "grad_norm" else None
                    return Verdict(ROLLBACK, f"{self.rollback_spikes} spikes within {self.rollback_window} "
                                             f"steps; last: {reason}")
                return Verdict(SPIKE, reason)
        return Verdict(OK)

    def _came_back(self, step: int) -> bool:
        """Whether the gradient norm's spikes caused a rollback that the run has not yet
        gone rollback_window steps past (its steps are counted again from the checkpoint)."""
        return self.rolled_back_at is not None and step <= self.rolled_back_at + self.rollback_window

    def accept(self, loss: float, grad_norm: float) -> None:
        """Record a committed step's values (never a skipped or non-finite one)."""
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            self.history[name] = (self.history[name] + [value])[-self.window:]

    def _bound(self, values: list[float]) -> float | None:
        if len(values) < self.min_history:
            return None
        # Plain float arithmetic: statistics.pstdev is exact (fractions) and costs milliseconds
        # per call, a visible share of a small model's step.
        mean = sum(values) / len(values)
        variance = sum((v - mean) ** 2 for v in values) / len(values)
        # A floor on the spread: a flat window (std ~ 0) must not flag rounding noise.
        std = max(math.sqrt(variance), 0.01 * abs(mean), 1e-8)
        return mean + self.sigma * std

    def state_dict(self) -> dict:
        return {"loss": list(self.history["loss"]), "grad_norm": list(self.history["grad_norm"]),
                "spike_steps": list(self.spike_steps), "rolled_back_at": self.rolled_back_at}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's or a peer's state (a heal: every group then judges the next spike
        alike)."""
        self.history = {"loss": [float(v) for v in state["loss"]],
                        "grad_norm": [float(v) for v in state["grad_norm"]]}
        self.spike_steps = [int(s) for s in state["spike_steps"]]
        at = state.get("rolled_back_at")
        self.rolled_back_at = None if at is None else int(at)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MERSENNE_61 = 2**61 - 1


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """An exact checksum (< 2^61) of the tensors' bits, in order: any single flipped bit
    changes it. Sums the raw bit patterns as integers (one pass, no float rounding, the
    same on every device) and chains the per-tensor sums positionally."""
    total = 0
    for t in tensors:
        bits = t.detach().contiguous().view(-1).view(_INT_VIEW[t.element_size()])
        s = int(bits.sum(dtype=torch.int64)) % _MERSENNE_61
        total = (total * 1_000_003 + s + t.numel()) % _MERSENNE_61
    return total


def odd_ones_out(fingerprints: dict[int, int]) -> tuple[list[int], bool]:
    """Replicas whose fingerprint differs from the strict majority's; (all, False) when no
    fingerprint has a strict majority (then nobody is known good)."""
    if len(set(fingerprints.values())) <= 1:
        return [], True
    value, count = Counter(fingerprints.values()).most_common(1)[0]
    if count * 2 <= len(fingerprints):
        return sorted(fingerprints), False
    return sorted(r for r, v in fingerprints.items() if v != value), True


class StragglerTracker:
    def __init__(self, *, factor: float, patience: int) -> None:
        self.factor, self.patience = factor, patience
        self.slow_for: dict[int, int] = {}

    def observe(self, compute_s: dict[int, float]) -> list[int]:
        """Per-replica compute time of one step; returns replicas that just became stragglers."""
        if self.factor <= 0 or len(compute_s) < 2:
            return []
        median = statistics.median(compute_s.values())
        flagged = []
        for replica, seconds in compute_s.items():
            slow = seconds > self.factor * median
            self.slow_for[replica] = self.slow_for.get(replica, 0) + 1 if slow else 0
            if self.slow_for[replica] == self.patience:
                flagged.append(replica)
        return flagged

