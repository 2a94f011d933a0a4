"""How much of the wall time trained the model, and what each fault cost.

ETTR (effective training time ratio) = time inside committed steps / wall time. A step
that failed (a peer died mid-collective), was skipped by a guard, or was later undone by a
rollback is not committed time. With several replica groups the committed intervals of
all groups are merged: the job is productive while any group is in a step that commits.

Per fault (from events.jsonl):
- `detect_s`: fault to the first step attempt that reacted to it (a failed step, or a
  commit without the group);
- `recover_s`: fault to the group back in the quorum with healed state: its first committed
  step after its `heal` event;
- `steps_lost`: failed step attempts between the fault and its recovery, plus the steps a
  rollback undid.
A crash's time is when the supervisor saw the process end (it polls every 0.1 s).

Checkpoint interval: the Young/Daly rule, sqrt(2 C M) - C for measured cost C and
configured MTBF M (Young 1974; Daly 2006), else a fixed number of steps.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the planner uses this module without the model's imports (torch)
    from stalwart.config import CheckpointConfig


def young_daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Seconds between checkpoints that minimise expected lost work: sqrt(2 C M) - C, and
    never less than C itself."""
    if checkpoint_s <= 0 or mtbf_s <= 0:
        raise ValueError("checkpoint cost and MTBF must be > 0")
    return max(math.sqrt(2 * checkpoint_s * mtbf_s) - checkpoint_s, checkpoint_s)


class CheckpointClock:
    """When the lowest live group writes a checkpoint: every `every` steps, or (with
    mtbf_s > 0) at the Young/Daly interval once one checkpoint's cost has been measured."""

    def __init__(self, cfg: CheckpointConfig) -> None:
        self.every, self.mtbf_s = cfg.every, cfg.mtbf_s
        self.cost_s: float | None = None
        self.interval_s: float | None = None
        self._last = time.monotonic()

    def due(self, step: int, total: int) -> bool:
        if step == total:
            return True
        if self.mtbf_s <= 0 or self.interval_s is None:
            return step % self.every == 0
        return time.monotonic() - self._last >= self.interval_s

    def saved(self, cost_s: float | None) -> float | None:
        """A checkpoint was written now, at `cost_s` (None: by another group, at a cost
        this one did not measure; the interval stays as it was)."""
        if cost_s is not None:
            self.cost_s = cost_s
            if self.mtbf_s > 0:
                self.interval_s = young_daly_interval(max(cost_s, 1e-6), self.mtbf_s)
        self._last = time.monotonic()
        return cost_s

    def describe(self) -> dict[str, Any]:
        if self.mtbf_s > 0 and self.interval_s is not None:
            return {"rule": "young-daly", "mtbf_s": self.mtbf_s, "interval_s": round(self.interval_s, 3)}
        return {"rule": "fixed", "every_steps": self.every}


def merged_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def back_in_quorum(metrics: list[dict[str, Any]], events: list[dict[str, Any]], replica: int,
                   after: float) -> float | None:
    """When `replica` first committed a step after healing, following a fault at `after`."""
    heal = next((e["time"] for e in events if e["event"] == "heal" and e.get("replica") == replica
                 and e["time"] > after), None)
    if heal is None:
        return None
    return next((r["time"] for r in metrics if r.get("replica") == replica and r["time"] >= heal), None)


def goodput_report(metrics: list[dict[str, Any]], events: list[dict[str, Any]], *, wall_s: float,
                   since: float = 0.0) -> dict[str, Any]:
    """ETTR and the fault table of a run (records and events at or after `since` only)."""
    rollbacks = [e for e in events if e["event"] == "rollback" and e["time"] >= since]
    committed = []
    for r in metrics:
        if r.get("time", 0) < since or "step_s" not in r:
            continue
        undone = any(e["to_step"] < r["step"] <= e["from_step"] and r["time"] <= e["time"] for e in rollbacks)
        if not undone:
            committed.append((r["time"] - r["step_s"], r["time"]))
    productive = merged_length(committed)
    events = [e for e in events if e["time"] >= since]
    failed = [e for e in events if e["event"] == "step_failed"]
    faults = []
    for e in events:
        if e["event"] in ("group_exit", "group_hung"):
            t = e["time"]
            reacted = [f["time"] for f in failed if f["time"] >= t - 1.0]
            reacted += [r["time"] for r in metrics if r.get("time", 0) > t and r.get("replica") != e["replica"]][:1]
            heal = back_in_quorum(metrics, events, e["replica"], t)
            end = heal if heal is not None else math.inf
            faults.append({"kind": "crash" if e["event"] == "group_exit" else "hang", "replica": e["replica"],
                           "time": t, "detect_s": round(max(min(reacted) - t, 0.0), 3) if reacted else None,
                           "recover_s": round(heal - t, 3) if heal is not None else None,
                           "steps_lost": len({f["step"] for f in failed if t - 1.0 <= f["time"] <= end
                                              and f.get("replica") != e["replica"]})})
        elif e["event"] == "step_skipped" and not any(f.get("kind") == e["guard"] and f.get("step") == e["step"]
                                                      for f in faults):  # each replica reports it
            faults.append({"kind": e["guard"], "step": e["step"], "time": e["time"], "detect_s": 0.0,
                           "recover_s": 0.0, "steps_lost": 1})
        elif e["event"] == "rollback":
            faults.append({"kind": "rollback", "step": e["from_step"], "time": e["time"], "detect_s": 0.0,
                           "recover_s": e.get("seconds"), "steps_lost": e["from_step"] - e["to_step"]})
        elif e["event"] == "sdc_detected":
            faults.append({"kind": "sdc", "step": e["step"], "replicas": e["replicas"], "time": e["time"],
                           "detect_s": None, "recover_s": None, "steps_lost": 0})
    recoveries = [f["recover_s"] for f in faults if f["kind"] in ("crash", "hang") and f["recover_s"] is not None]
    ettr = round(productive / wall_s, 4) if wall_s > 0 else None
    return {"goodput": ettr, "ettr": ettr, "productive_s": round(productive, 3),
            "mean_recover_s": round(sum(recoveries) / len(recoveries), 3) if recoveries else None,
            "steps_lost": sum(f["steps_lost"] for f in faults), "faults": faults,
            "events": len(events)}
