"""How much of the wall time trained the model, and what each fault cost.

- `ettr` (effective training time ratio): for each replica group, the time inside its
  steps that committed and stayed committed, from the end of the step's quorum to the
  commit; summed over the job's groups and divided by groups x wall time. Quorum waits,
  heals, failed and skipped steps, evaluation and checkpoints are not productive, nor are
  steps later undone by a rollback (every group's) or discarded by a heal (a group found
  corrupt: its steps since its state was last known good). A dead group adds nothing, so
  two dead groups of three show as a third of the time. A step sent again after its
  collective failed (training/step.py) counts its forward and backward once, plus the
  exchange that committed it: the failed exchange and the quorum after it are waiting.
- `token_goodput`: tokens of the committed steps that stayed committed, divided by what the
  job would have trained at full strength (the median tokens/s of its steps with every
  group in) over the wall time.

Per fault (from events.jsonl), timed from when the fault happened:
- crash: the supervisor saw the process end (it polls every 0.1 s); hang: the group's last
  sign of progress (the watchdog's `since`); stall: a hang that ended by itself (a group
  healed with no restart, corruption or start before it), from its last commit;
  nonfinite: the first step whose values were not finite; lighthouse: the last commit
  before the groups lost their quorum (or the Lighthouse's exit, when seen);
- `detect_s`: to the first step attempt that reacted to it (a failed step, or a commit
  without the group);
- `recover_s`: to the group back in the quorum with healed state: its first committed step
  after its `heal` (for a Lighthouse outage: the first commit after every group is back);
- `steps_lost`: failed step attempts between the fault and its recovery, plus the steps a
  rollback undid.

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


Record = dict[str, Any]


def goodput_report(metrics: list[Record], events: list[Record], *, wall_s: float, groups: int = 1,
                   job_groups: int | None = None, since: float = 0.0, local_steps: bool = False) -> dict[str, Any]:
    """ETTR, token goodput and the fault table of a run (records and events at or after
    `since` only). `groups`: the replica groups whose records this run directory holds
    (ETTR's divisor); `job_groups`: the job's (default `groups`), the participants of a
    step at full strength. `local_steps`: every group trains steps of its own (DiLoCo's
    inner steps): a group's step counts once an outer step took it in (`_taken_in`), every
    group's tokens count, and full strength is `groups` times a group's median rate; else
    a step is the job's (its tokens_per_s counts every group in it)."""
    metrics = [r for r in metrics if r.get("time", 0) >= since]
    taken = _taken_in(metrics) if local_steps else None
    steps = [r for r in metrics if "step_s" in r]
    events = [e for e in events if e["time"] >= since]
    kept = [r for r in steps if not _undone(r, events) and (taken is None or id(r) in taken)]
    productive = sum(r["step_s"] for r in kept)
    # The last time each step stayed (a group's own step with local steps).
    by_step = {(r.get("replica", 0), r["step"]) if local_steps else r["step"]: r
               for r in sorted(kept, key=lambda r: r["time"])}
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in by_step.values())
    full_strength = job_groups or groups
    full = [r["tokens_per_s"] for r in steps if local_steps or r.get("participants", 1) >= full_strength]
    full_rate = sorted(full)[len(full) // 2] * (groups if local_steps else 1) if full else None
    faults = fault_table(steps, events)
    recoveries = [f["recover_s"] for f in faults if f["kind"] in ("crash", "hang") and f["recover_s"] is not None]
    return {"ettr": round(productive / (groups * wall_s), 4) if wall_s > 0 else None,
            "token_goodput": round(tokens / (full_rate * wall_s), 4) if full_rate and wall_s > 0 else None,
            "productive_s": round(productive, 3),
            "mean_recover_s": round(sum(recoveries) / len(recoveries), 3) if recoveries else None,
            "steps_lost": sum(f["steps_lost"] for f in faults), "faults": faults, "events": len(events)}


def _taken_in(metrics: list[Record]) -> set[int]:
    """The inner steps (by id) whose group's next outer-step record, in time, names it among
    the contributors: those not taken in were lost (the group died mid-round and rejoined
    with nothing, or its round was left out), and so were those after its last one."""
    taken: set[int] = set()
    pending: dict[int, list[int]] = {}
    for r in sorted(metrics, key=lambda r: r.get("time", 0)):
        replica = r.get("replica", 0)
        if "step_s" in r:
            pending.setdefault(replica, []).append(id(r))
        elif "round" in r:
            done = pending.pop(replica, [])
            if replica in r.get("contributors", ()):
                taken.update(done)
    return taken


def groups_of_run(events: list[Record]) -> int:
    """How many replica groups write to a run directory: those its latest supervisor ran
    (`job_start`), else one (a single process, or a group started on its own)."""
    starts = [e for e in events if e["event"] == "job_start"]
    return len(starts[-1]["groups"]) if starts else 1


def bytes_report(metrics: list[Record], *, since: float = 0.0) -> dict[str, Any]:
    """What each group sent to the other groups (the logical bytes of its collectives,
    `bytes_sent` per record): `bytes_sent` the reporting job's total over its groups,
    with each group's total and the largest single synchronisation."""
    by_group: dict[str, int] = {}
    peak = 0
    for r in metrics:
        if r.get("time", 0) >= since and r.get("bytes_sent"):
            key = str(r.get("replica", 0))
            by_group[key] = by_group.get(key, 0) + int(r["bytes_sent"])
            peak = max(peak, int(r["bytes_sent"]))
    return {"bytes_sent": sum(by_group.values()), "bytes_sent_by_group": dict(sorted(by_group.items())),
            "bytes_sent_peak": peak}


def _undone(record: Record, events: list[Record]) -> bool:
    for e in events:
        if e["time"] < record["time"]:
            continue
        if e["event"] == "rollback" and e["to_step"] < record["step"] <= e["from_step"]:
            return True
        if e["event"] == "work_discarded" and e.get("replica") == record.get("replica") \
                and e["from_step"] < record["step"] <= e["to_step"]:
            return True
    return False


def back_in_quorum(metrics: list[Record], events: list[Record], replica: int, after: float) -> float | None:
    """When `replica` first committed a step after healing, following a fault at `after`."""
    heal = next((e["time"] for e in events if e["event"] == "heal" and e.get("replica") == replica
                 and e["time"] > after), None)
    if heal is None:
        return None
    return next((r["time"] for r in metrics if r.get("replica") == replica and r["time"] >= heal), None)


def fault_table(metrics: list[Record], events: list[Record]) -> list[Record]:
    faults = _group_faults(metrics, events) + _lighthouse_faults(metrics, events)
    for e in events:
        if e["event"] == "step_skipped" and not any(f.get("kind") == e["guard"] and f.get("step") == e["step"]
                                                    for f in faults):  # each replica reports it
            faults.append({"kind": e["guard"], "step": e["step"], "time": e["time"], "detect_s": 0.0,
                           "recover_s": 0.0, "steps_lost": 1})
        elif e["event"] == "rollback":
            faults.append({"kind": "rollback", "step": e["from_step"], "time": e["time"], "detect_s": 0.0,
                           "recover_s": e.get("seconds"), "steps_lost": e["from_step"] - e["to_step"]})
        elif e["event"] == "sdc_detected":
            back = [back_in_quorum(metrics, events, r, e["time"]) for r in e["replicas"]] if e["resolved"] else []
            faults.append({"kind": "sdc", "step": e["step"], "replicas": e["replicas"], "time": e["time"],
                           "detect_s": None, "steps_lost": 0,
                           "recover_s": round(max(back) - e["time"], 3) if back and None not in back else None})
    return sorted(faults, key=lambda f: f["time"])


def _group_faults(metrics: list[Record], events: list[Record]) -> list[Record]:
    """One group's faults: crash, hang (killed), stall (ended by itself), nonfinite."""
    failed = [e for e in events if e["event"] == "step_failed"]
    faults = []

    def fault(kind: str, replica: int, t: float, **extra: Any) -> None:
        reacted = [f["time"] for f in failed if f["time"] >= t - 1.0 and f.get("replica") != replica]
        reacted += [r["time"] for r in metrics if r["time"] > t and r.get("replica") != replica][:1]
        back = back_in_quorum(metrics, events, replica, t)
        end = back if back is not None else math.inf
        faults.append({"kind": kind, "replica": replica, "time": t, **extra,
                       "detect_s": round(max(min(reacted) - t, 0.0), 3) if reacted else None,
                       "recover_s": round(back - t, 3) if back is not None else None,
                       "steps_lost": len({f["step"] for f in failed if t - 1.0 <= f["time"] <= end
                                          and f.get("replica") != replica})})

    for e in events:
        kind = e["event"]
        if kind == "group_exit":
            fault({4: "nonfinite", 5: "partition"}.get(e["returncode"], "crash"), e["replica"], e["time"])
        elif kind == "group_hung":
            fault("hang", e["replica"], e.get("since", e["time"]))
        elif kind == "step_corrupt" and e.get("cause") == "nonfinite" and not e.get("healed_before") \
                and not _since_last_commit(metrics, events, e, ("step_corrupt",)):
            fault("nonfinite", e["replica"], e["time"], step=e["step"])
        elif kind == "heal" and e.get("step", 0) > 0 and not _since_last_commit(
                metrics, events, e, ("group_start", "group_exit", "group_hung", "step_corrupt", "sdc_detected", "work_discarded",
                                     "rollback")):
            last = max((r["time"] for r in metrics if r.get("replica") == e["replica"] and r["time"] < e["time"]),
                       default=None)
            if last is not None:
                fault("stall", e["replica"], last)
    return faults


def _since_last_commit(metrics: list[Record], events: list[Record], event: Record, kinds: tuple[str, ...]) -> bool:
    """Whether one of `kinds` concerns event's replica between its last commit and the event."""
    replica = event["replica"]
    last = max((r["time"] for r in metrics if r.get("replica") == replica and r["time"] < event["time"]), default=0.0)
    return any(e["event"] in kinds and last <= e["time"] < event["time"] and e is not event
               and (e.get("replica") == replica or replica in e.get("replicas", ()) or e["event"] == "rollback")
               for e in events)


def _lighthouse_faults(metrics: list[Record], events: list[Record]) -> list[Record]:
    """Lighthouse outages: each group's span from losing its quorum (`quorum_retry`) to
    getting it back (`lighthouse_back`); overlapping spans of several groups are one outage."""
    spans = []
    for e in events:
        if e["event"] == "quorum_retry":
            back = next((b["time"] for b in events if b["event"] == "lighthouse_back"
                         and b.get("replica") == e.get("replica") and b["time"] >= e["time"]), math.inf)
            spans.append([e["time"], back, {e.get("replica")}])
    outages: list[list] = []
    for span in sorted(spans, key=lambda x: x[0]):
        if outages and span[0] <= outages[-1][1]:
            outages[-1][1] = max(outages[-1][1], span[1])
            outages[-1][2] |= span[2]
        else:
            outages.append(span)
    faults = []
    for lost, back, groups in outages:
        exits = [x["time"] for x in events if x["event"] == "lighthouse_exit" and lost - 30 <= x["time"] <= lost]
        commits = [r["time"] for r in metrics if r["time"] <= lost]
        t = exits[-1] if exits else max(commits, default=lost)
        first = next((r["time"] for r in metrics if r["time"] > back), None)
        faults.append({"kind": "lighthouse", "time": t, "groups": sorted(g for g in groups if g is not None),
                       "detect_s": round(lost - t, 3), "recover_s": round(first - t, 3) if first else None,
                       "steps_lost": 0})
    return faults
