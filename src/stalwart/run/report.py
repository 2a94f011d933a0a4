"""A run's report, drawn from its files: RUN_DIR/report.png and RUN_DIR/report.md.

`stalwart report RUN_DIR` writes them, and so does every training run at its end: the
process that writes the final summary.json (a single process, rank 0 of a torchrun launch,
the supervisor of replica groups), exactly one per run directory. Everything comes from
metrics.jsonl, events.jsonl and summary.json (a torn last line is skipped), so a report
can be drawn of a run that is still going, or that died.

The figure has six panels over the step: train loss (each group's, and the eval loss),
eval exact match, learning rate, gradient norm, tokens/s and the replica groups in each step
(DiLoCo: in each outer step). A panel whose metric the run did not record says so. Vertical
lines mark faults (red: a group that crashed or hung, a skipped or corrupt step, a lost
Lighthouse), heals (green) and rollbacks (orange), each at its step (or the last step
committed before it). A line breaks where its group was out of the job, and a step redone
after a rollback starts a new segment, drawn over the one it replaced.

An RL run (`stalwart rl`, records with a reward) gets its own nine panels instead: the
reward (mean and standard deviation over samples), the samples' accuracy with the eval
exact match and pass@k before and after, the share of groups with zero reward variance,
completion length, entropy, KL to the reference, the clip fraction, the routing mismatch and
sampler-trainer log-probability gap (rl/routing.py), and each step's time split into
generation, scoring and update.

Cost, measured on 2 shared CPU cores with matplotlib's import: 0.5 s for a run of a few
hundred steps, 1.7 s for 100,000 steps and 200 markers (each line thinned to MAX_POINTS).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stalwart.errors import UserError, first_line
from stalwart.fsutil import atomic_write_bytes
from stalwart.run.rundir import RunDir

PNG, MARKDOWN = "report.png", "report.md"
# Events that mark a fault: a group that exited (crash, signal, non-finite restart) or hung,
# a step a guard skipped or found corrupt, corruption found by fingerprints, a Lighthouse
# that died, a checkpoint that did not verify.
FAULT_EVENTS = ("group_exit", "group_hung", "step_skipped", "step_corrupt", "nonfinite_group", "sdc_detected",
                "lighthouse_exit", "checkpoint_corrupt")
MARKER_STYLE = {"fault": ("tab:red", "--"), "heal": ("tab:green", ":"), "rollback": ("tab:orange", "-")}
MAX_POINTS = 4000  # per line: more adds nothing a 15-inch figure can show, and costs time
MAX_LISTED = 20  # events listed one by one in report.md

Record = dict[str, Any]


@dataclass
class RunRecords:
    """What a report is drawn from."""
    path: Path
    steps: list[Record]  # committed training steps (records with a loss), in time order
    rounds: list[Record]  # DiLoCo's outer steps
    evals: list[Record]  # `eval` events
    events: list[Record]
    summary: dict[str, Any]
    configured_steps: int | None

    @functools.cached_property
    def by_group(self) -> dict[int | None, list[Record]]:
        """Each replica group's steps (None: a process of no group), in group order."""
        groups: dict[int | None, list[Record]] = {}
        for r in self.steps:
            groups.setdefault(r.get("replica"), []).append(r)
        return dict(sorted(groups.items(), key=lambda item: -1 if item[0] is None else item[0]))


    def one_record_per_step(self) -> RunRecords:
        """These records with one per step, the last written: an RL step's metrics are the
        job's, alike in every group's record (rl/shares.py), but for the writer's own times."""
        last = {r["step"]: r for r in self.steps}
        return dataclasses.replace(self, steps=sorted(last.values(), key=lambda r: r.get("time", 0)))


@dataclass
class Marker:
    step: int
    kind: str  # fault, heal or rollback
    event: Record


def read_run(path: Path) -> RunRecords:
    """The run directory's records; one line (UserError) when it is none or has no step yet."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a run directory (it has no config.json)")
    run = RunDir(path)
    metrics = run.read_metrics()
    steps = sorted((r for r in metrics if _number(r.get("loss")) and isinstance(r.get("step"), int)),
                   key=lambda r: r.get("time", 0))
    if not steps:
        raise UserError(f"{path} has no committed step in metrics.jsonl yet: nothing to report")
    events = sorted((e for e in run.read_events() if "event" in e), key=lambda e: e.get("time", 0))
    return RunRecords(path, steps, [r for r in metrics if "round" in r],
                      [e for e in events if e["event"] == "eval" and "step" in e], events, run.read_summary(),
                      _configured_steps(path / "config.json"))


def _configured_steps(config: Path) -> int | None:
    try:
        steps = json.loads(config.read_text(encoding="utf-8"))["train"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def markers(data: RunRecords) -> list[Marker]:
    """Faults, heals (not the first sync at step 0) and rollbacks, each at its own step, or
    (the supervisor's events, a rollback) at the last step committed before it."""
    times = [r.get("time", 0) for r in data.steps]
    found = []
    for e in data.events:
        kind = e["event"]
        if kind in FAULT_EVENTS:
            what = "fault"
        elif kind == "heal" and e.get("step", 0) > 0:
            what = "heal"
        elif kind == "rollback":
            what = "rollback"
        else:
            continue
        at = bisect.bisect_right(times, e.get("time", 0))
        step = e["step"] if isinstance(e.get("step"), int) else data.steps[at - 1]["step"] if at else 0
        found.append(Marker(step, what, e))
    return found


def write_report(path: Path) -> tuple[Path, Path]:
    """RUN_DIR/report.png and RUN_DIR/report.md, each written atomically."""
    data = read_run(path)
    found = markers(data)
    png, md = data.path / PNG, data.path / MARKDOWN
    atomic_write_bytes(png, draw(data, found))
    atomic_write_bytes(md, summary_markdown(data, found).encode())
    return png, md


def write_report_after_training(run: RunDir) -> None:
    """The end of a training run: the report, or one `report_failed` event and a warning
    (a finished run does not fail for its report)."""
    try:
        write_report(run.path)
    except Exception as e:  # noqa: BLE001 (matplotlib's errors are many; the run is done either way)
        line = f"{type(e).__name__}: {first_line(e)}"
        run.event("report_failed", error=line)
        print(f"warning: no report written ({line}); try: stalwart report {run.path}", file=sys.stderr, flush=True)


def is_rl(data: RunRecords) -> bool:
    return any("reward_mean" in r for r in data.steps)


def draw(data: RunRecords, found: list[Marker]) -> bytes:
    """The six panels (an RL run: nine) as PNG bytes (matplotlib's Agg renderer, no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if is_rl(data):
        return _draw_rl(data, found)
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).flatten()
    fig.suptitle(f"{data.path.resolve().name}: {data.steps[-1]['step']} steps")
    _plot_loss(axes[0], data)
    _plot_points(axes[1], "eval exact match", [(e["step"], e.get("eval_exact_match")) for e in data.evals])
    if axes[1].has_data():
        axes[1].set_ylim(-0.02, 1.02)
    for ax, key, title in ((axes[2], "lr", "learning rate"), (axes[3], "grad_norm", "gradient norm"),
                           (axes[4], "tokens_per_s", "tokens/s")):
        _plot_by_group(ax, data, key, title)
    if axes[3].has_data():
        axes[3].set_yscale("log")
    _plot_participants(axes[5], data)
    for ax in axes:
        _mark(ax, found)
    for ax in axes[3:]:
        ax.set_xlabel("step")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    _marker_legend(axes[0], found)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


# RL panels after the reward and the accuracy: (title, [(metric, label), ...]).
RL_PANELS = (("groups with zero reward variance", [("zero_variance_groups", "share")]),
             ("completion length (tokens)", [("completion_length", "mean")]),
             ("entropy (nats per token)", [("entropy", "sampling policy")]),
             ("KL to the reference (k3)", [("kl", "first update")]),
             ("clip fraction", [("clip_fraction", "first update"), ("clip_fraction_last", "last update")]),
             ("routing and log-probability mismatch", [("routing_mismatch", "experts unlike the sampler's"),
                                                       ("routing_mismatch_last", "the same at the last update"),
                                                       ("sampler_logprob_gap", "|sampler - trainer| log-prob")]))
RL_TIMES = (("generation_s", "generation"), ("scoring_s", "scoring"), ("update_s", "update"))


def _draw_rl(data: RunRecords, found: list[Marker]) -> bytes:
    from matplotlib.figure import Figure

    data = data.one_record_per_step()
    fig = Figure(figsize=(15, 11), layout="constrained")
    axes = fig.subplots(3, 3, sharex=True).flatten()
    fig.suptitle(f"{data.path.resolve().name}: {data.steps[-1]['step']} RL steps")
    steps = data.steps
    axes[0].set_title("reward (mean and std over samples)")
    points = [(r["step"], r["reward_mean"], r.get("reward_std", 0)) for r in steps if _number(r.get("reward_mean"))]
    x, mean, std = zip(*points)
    axes[0].plot(x, mean, linewidth=1)
    axes[0].fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    _plot_keys(axes[1], data, "exact match", [("accuracy", "samples")])
    pass_key = _pass_key(data)
    for key, style, label in (("eval_exact_match", "o-", "eval, greedy"),
                              (pass_key, "s--", f"eval, pass@{(pass_key or '_').rsplit('_', 1)[-1]}")):
        evals = [(e["step"], e[key]) for e in data.evals if key and _number(e.get(key))]
        if evals:
            axes[1].plot(*zip(*evals), style, markersize=4, linewidth=1, label=label)
    axes[1].legend(fontsize=8, loc="lower left")
    axes[1].set_ylim(-0.02, 1.02)
    for ax, (title, keys) in zip(axes[2:8], RL_PANELS):
        _plot_keys(ax, data, title, keys)
    ax = axes[8]
    ax.set_title("time per step (s)")
    present = [(k, label) for k, label in RL_TIMES if any(_number(r.get(k)) for r in steps)]  # older runs lack some
    if present:
        ax.stackplot([r["step"] for r in steps], *([r.get(k) or 0 for r in steps] for k, _ in present),
                     labels=[label for _, label in present], alpha=0.8)
        ax.legend(fontsize=8, loc="upper left")
    else:
        _not_recorded(ax)
    for ax in axes:
        _mark(ax, found)
    for ax in axes[6:]:
        ax.set_xlabel("RL step")
    _marker_legend(axes[0], found)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _pass_key(data: RunRecords) -> str | None:
    return next((k for e in data.evals for k in e if k.startswith("pass_at_")), None)


def _plot_keys(ax, data: RunRecords, title: str, keys: list[tuple[str, str]]) -> None:
    """One line per metric, over the steps of a single process."""
    ax.set_title(title)
    for key, label in keys:
        points = [(r["step"], r[key]) for r in data.steps if _number(r.get(key))]
        for j, segment in enumerate(_segments(points)):
            ax.plot(*zip(*segment), color=f"C{keys.index((key, label))}", linewidth=1, label=None if j else label)
    if not ax.has_data():
        _not_recorded(ax)
    elif len(keys) > 1:
        ax.legend(fontsize=8, loc="upper right")


def _plot_loss(ax, data: RunRecords) -> None:
    _plot_by_group(ax, data, "loss", "loss")
    evals = [(e["step"], e["eval_loss"]) for e in data.evals if _number(e.get("eval_loss"))]
    if evals:
        ax.plot(*zip(*evals), "o-", color="black", markersize=3, linewidth=1, label="eval")
        ax.legend(fontsize=8, loc="upper right")


def _plot_by_group(ax, data: RunRecords, key: str, title: str) -> None:
    """One line per replica group (one for a single process); a step that goes back (a
    rollback's redo) starts a new segment of the same colour."""
    ax.set_title(title)
    several = len(data.by_group) > 1
    for i, (group, steps) in enumerate(data.by_group.items()):
        points = [(r["step"], r[key]) for r in steps if _number(r.get(key))]
        colour = f"C{i % 10}"
        for j, segment in enumerate(_segments(points)):
            label = (f"group {group}" if several else "train") if j == 0 else None
            ax.plot(*zip(*segment), color=colour, linewidth=1, label=label)
    if not ax.has_data():
        _not_recorded(ax)
    elif several:
        ax.legend(fontsize=8, loc="upper right")


def _plot_points(ax, title: str, points: list[tuple[int, Any]]) -> None:
    ax.set_title(title)
    points = [(s, v) for s, v in points if _number(v)]
    if points:
        ax.plot(*zip(*points), "o-", markersize=3, linewidth=1)
    else:
        _not_recorded(ax)


def _plot_participants(ax, data: RunRecords) -> None:
    """The groups in each step, once a step (every group records the same count); DiLoCo's
    inner steps are each group's own, so its outer steps count the groups."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title("replica groups in the step")
    points = []
    for r in data.rounds or data.steps:
        if _number(r.get("participants")) and (not points or points[-1][0] != r["step"]):
            points.append((r["step"], r["participants"]))
    for segment in _segments(points, gaps=False):  # DiLoCo's rounds are steps apart
        ax.plot(*zip(*segment), drawstyle="steps-post", color="C0", linewidth=1)
    if not points:
        _not_recorded(ax)
        return
    ax.set_ylim(0, max(v for _, v in points) + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _not_recorded(ax) -> None:
    ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="grey")


def _mark(ax, found: list[Marker]) -> None:
    """A vertical line across the panel at each marker's step: one collection per kind, not
    one artist per line (measured: 1,200 axvlines cost 0.8 s to add, more to lay out)."""
    from matplotlib.collections import LineCollection

    for kind, (colour, line) in MARKER_STYLE.items():
        steps = [m.step for m in found if m.kind == kind]
        if steps:
            lines = LineCollection([[(s, 0), (s, 1)] for s in steps], transform=ax.get_xaxis_transform(),
                                   colors=colour, linestyles=line, linewidths=0.9, alpha=0.7)
            ax.add_collection(lines, autolim=False)


def _marker_legend(ax, found: list[Marker]) -> None:
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D

    kinds = [k for k in MARKER_STYLE if any(m.kind == k for m in found)]
    if kinds:  # a second legend beside the lines' own (ax.legend would replace that one)
        handles = [Line2D([], [], color=MARKER_STYLE[k][0], linestyle=MARKER_STYLE[k][1]) for k in kinds]
        ax.add_artist(Legend(ax, handles, kinds, fontsize=8, loc="lower left"))


def _segments(points: list[tuple[int, float]], *, gaps: bool = True) -> list[list[tuple[int, float]]]:
    """Runs of consecutive steps, each thinned: a step that goes back (a rollback's redo) or
    (`gaps`) jumps (a group that was out of the job) starts a new one, so no line bridges a gap."""
    segments: list[list[tuple[int, float]]] = []
    for point in points:
        if not segments or point[0] <= segments[-1][-1][0] or gaps and point[0] != segments[-1][-1][0] + 1:
            segments.append([])
        segments[-1].append(point)
    return [_thin(segment) for segment in segments]


def _thin(points: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Every k-th point (and the last) when there are more than MAX_POINTS."""
    if len(points) <= MAX_POINTS:
        return points
    k = -(-len(points) // MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def summary_markdown(data: RunRecords, found: list[Marker]) -> str:
    """A short summary of the run, with the figure."""
    s, steps = data.summary, data.steps
    last = max(r["step"] for r in steps)
    of = f" of {data.configured_steps}" if data.configured_steps else ""
    best = min(steps, key=lambda r: r["loss"])
    tokens = s.get("tokens") or steps[-1].get("tokens", 0)
    rows = [("steps", f"{last}{of}"), *([("tokens", f"{tokens:,}")] if tokens else []),
            ("wall time", _wall_time(data))]
    if is_rl(data):  # a policy loss: its lowest value means nothing
        rows.append(("policy loss", f"{steps[0]['loss']:.4f} at step {steps[0]['step']}, final {steps[-1]['loss']:.4f}"))
    else:
        rows.append(("train loss", f"{steps[0]['loss']:.4f} at step {steps[0]['step']}, final "
                                   f"{steps[-1]['loss']:.4f}, best {best['loss']:.4f} at step {best['step']}"))
    rows += _eval_rows(data) + (_rl_rows(data) if is_rl(data) else [])
    rates = [r["tokens_per_s"] for r in steps if _number(r.get("tokens_per_s"))]
    if rates:
        rows.append(("tokens/s", f"{statistics.median(rates):,.0f} (median of steps)"))
    if s.get("ettr") is not None:
        rows.append(("goodput" + (" (last launch)" if _resumed(data) else ""), f"ETTR {s['ettr']:.1%}, token goodput "
                                f"{'n/a' if s.get('token_goodput') is None else format(s['token_goodput'], '.1%')}"))
    counts = {k: sum(m.kind == k for m in found) for k in MARKER_STYLE}
    restarts = sum(e["event"] == "group_restart" for e in data.events)
    rows.append(("faults", f"{counts['fault']} faults, {counts['heal']} heals, {counts['rollback']} rollbacks, "
                           f"{restarts} restarts"))
    lines = [f"# {data.path.resolve().name}", "", f"![curves]({PNG})", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if found:
        lines += ["", "## Faults, heals and rollbacks", ""]
        lines += [f"- step {m.step}: {_describe(m.event)}" for m in found[:MAX_LISTED]]
        if len(found) > MAX_LISTED:
            lines.append(f"- ... and {len(found) - MAX_LISTED} more (events.jsonl)")
    lines += ["", "Drawn from metrics.jsonl, events.jsonl and summary.json by `stalwart report`.", ""]
    return "\n".join(lines)


def _eval_rows(data: RunRecords) -> list[tuple[str, str]]:
    rows = []
    losses = [e for e in data.evals if _number(e.get("eval_loss"))]
    if losses:
        best = min(losses, key=lambda e: e["eval_loss"])
        rows.append(("eval loss", f"final {losses[-1]['eval_loss']:.4f} at step {losses[-1]['step']}, "
                                  f"best {best['eval_loss']:.4f} at step {best['step']}"))
    matches = [e for e in data.evals if _number(e.get("eval_exact_match"))]
    if matches:
        best = max(matches, key=lambda e: e["eval_exact_match"])
        rows.append(("eval exact match", f"final {matches[-1]['eval_exact_match']:.1%} at step "
                                         f"{matches[-1]['step']}, best {best['eval_exact_match']:.1%}"))
    return rows


def _rl_rows(data: RunRecords) -> list[tuple[str, str]]:
    """The reward over the first and the last tenth of the steps, pass@k before and after,
    and where the time went (every group's)."""
    steps = [r for r in data.one_record_per_step().steps if _number(r.get("reward_mean"))]
    tenth = max(1, len(steps) // 10)
    first, last = (statistics.fmean(r["reward_mean"] for r in part) for part in (steps[:tenth], steps[-tenth:]))
    rows = [("reward", f"{first:.3f} over the first {tenth} steps, {last:.3f} over the last {tenth}")]
    key = _pass_key(data)
    passes = [e for e in data.evals if key and _number(e.get(key))]
    if passes:
        rows.append((key.replace("_", " ").replace("pass at ", "pass@"),
                     " then ".join(f"{e[key]:.1%} at step {e['step']}" for e in passes)))
    totals = {label: sum(r[k] for r in data.steps if _number(r.get(k))) for k, label in RL_TIMES
              if any(_number(r.get(k)) for r in data.steps)}
    spent = sum(totals.values())
    if spent:
        rows.append(("time split", ", ".join(f"{label} {t / spent:.0%}" for label, t in totals.items())))
    return rows


def _wall_time(data: RunRecords) -> str:
    """summary.json's (the last launch's); for a resumed run, also the span of its steps."""
    span = data.steps[-1].get("time", 0) - data.steps[0].get("time", 0)
    launch = data.summary.get("wall_s")
    if launch is None:
        return f"{_duration(span)} from the first step to the last"
    if not _resumed(data):
        return _duration(launch)
    return f"{_duration(launch)} (last launch), {_duration(span)} from the first step to the last"


def _resumed(data: RunRecords) -> bool:
    """More than one launch: a supervisor's job_start each, else a process's start (a
    supervisor's groups write one at every restart)."""
    kinds = [e["event"] for e in data.events]
    return (kinds.count("job_start") if "job_start" in kinds else kinds.count("start")) > 1


def _describe(event: Record) -> str:
    details = [f"{k} {event[k]}" for k in ("replica", "replicas", "guard", "cause", "returncode", "signal",
                                           "from_step", "to_step") if event.get(k) is not None]
    reason = event.get("reason")
    return event["event"] + (f" ({', '.join(details)})" if details else "") + (f": {reason}" if reason else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
