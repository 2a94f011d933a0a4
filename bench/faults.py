"""Goodput under crashes: 3 replica groups of the tiny model, one group SIGKILLed every
30 s for 3 minutes, with stalwart's settings and with torchft's default settings.

Each configuration runs the default recipe (the `tiny` DeepSeek-style model on 3-digit
addition) as `stalwart train --replicas 3` in a subprocess, with evaluation only at the end
(it would otherwise count as non-training time in both runs alike). Once all three groups
are in the quorum, the clock starts; every --interval seconds the next group (1, 2, 0, 1,
...) receives SIGKILL from this script, and the supervisor restarts it. After --duration
seconds (plus --grace for the last recovery) the job is stopped.

Measured from the run directory, over the window [first kill - interval, end]:
- ETTR: the merged time inside committed steps (metrics.jsonl; any group) / window length;
- recovery: from this script's kill to the killed group back in the quorum with healed
  state: its first committed step after its `heal` event (goodput.back_in_quorum); a group
  not back by the end counts as unrecovered;
- group utilisation: committed (step, group) pairs / (3 x steps): the share of the three
  groups' steps that went into the model (a group left out of a quorum, or healing, adds
  nothing to it).

The baseline is the same job with `--replicas.torchft_defaults true`: torchft's Manager
(timeout and quorum timeout 60 s) and Lighthouse (its default join and heartbeat timeouts).

Run (from the repo root, .venv active):

    python bench/faults.py                       # both configurations, about 7 minutes
    python bench/faults.py --duration 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stalwart.run.goodput import back_in_quorum, merged_length


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def run_one(name: str, extra: list[str], args, root: Path) -> dict:
    run = root / name
    cmd = [sys.executable, "-m", "stalwart", "train", "--out", str(run), "--quiet", "--replicas", "3",
           "--train.steps", "999999", "--eval.every", "0", "--eval.problems", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "STALWART_INJECT": ""})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(m.get("participants") == 3 for m in _jsonl(run / "metrics.jsonl")):
            time.sleep(0.2)
        kills = []
        start = time.time()
        victim = 1
        for k in range(int(args.duration // args.interval)):
            time.sleep(max(0.0, start + (k + 1) * args.interval - time.time()))
            pid = [e["pid"] for e in _jsonl(run / "events.jsonl")
                   if e["event"] == "group_start" and e["replica"] == victim][-1]
            os.kill(pid, signal.SIGKILL)
            kills.append((time.time(), victim))
            victim = (victim + 1) % 3
        time.sleep(args.grace)
        end = time.time()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    window_start = kills[0][0] - args.interval
    metrics, events = _jsonl(run / "metrics.jsonl"), _jsonl(run / "events.jsonl")
    committed = [(max(m["time"] - m["step_s"], window_start), min(m["time"], end)) for m in metrics
                 if m["time"] > window_start and m["time"] - m["step_s"] < end]
    recoveries = []
    for t, replica in kills:
        back = back_in_quorum(metrics, events, replica, t)
        recoveries.append(round(back - t, 2) if back is not None else None)
    in_window = [m for m in metrics if window_start < m["time"] <= end]
    steps = [m["step"] for m in in_window]
    # Committed group-steps / (3 x steps): how much of the three groups' work went into the model.
    group_steps = len({(m["step"], m["replica"]) for m in in_window})
    done = [r for r in recoveries if r is not None]
    return {"name": name, "ettr": round(merged_length(committed) / (end - window_start), 4),
            "kills": len(kills), "recoveries_s": recoveries, "recovered": len(done),
            "mean_recovery_s": round(statistics.fmean(done), 2) if done else None,
            "max_recovery_s": max(done) if done else None,
            "steps_in_window": (max(steps) - min(steps) + 1) if steps else 0,
            "group_utilisation": round(group_steps / (3 * len(set(steps))), 4) if steps else None,
            "window_s": round(end - window_start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=15.0, help="seconds after the last kill")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("stalwart", []), ("torchft-defaults", ["--replicas.torchft_defaults", "true"])):
            results.append(run_one(name, extra, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    report = {"command": "python bench/faults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "cpus": os.cpu_count(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("| settings | ETTR | group utilisation | kills | recovered | mean recovery | max recovery | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['ettr']:.1%} | {r['group_utilisation']:.1%} | {r['kills']} | {r['recovered']} "
              f"| {r['mean_recovery_s']} s | {r['max_recovery_s']} s | {r['steps_in_window']} |")


if __name__ == "__main__":
    main()
