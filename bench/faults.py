"""Goodput under faults: 3 replica groups of the tiny model, one fault every 30 s, against
torchft's own fault-tolerant DDP run as its documentation shows (bench/torchft_ddp.py).

Each run trains the default recipe (the `tiny` DeepSeek-style model on 3-digit addition)
with 3 replica groups: stalwart as `stalwart train --replicas 3` (evaluation only at the
end), the baseline as three `torchrun --max-restarts` groups of bench/torchft_ddp.py under
a `torchft_lighthouse`. Once all three groups are in the quorum, the clock starts; every
--interval seconds the next group (1, 2, 0, ...) gets the fault, from this script:

- sigkill: SIGKILL to the group's training process (the supervisor, or torchrun, restarts it);
- sigstop: SIGSTOP, and SIGCONT 20 s later (a device that wedges, then comes back);
- nan: SIGUSR1, after which the group's device produces NaN in every step (stalwart:
  `nan-device@sigusr1`; the baseline multiplies its loss by NaN);
- lighthouse: SIGKILL to the Lighthouse (stalwart's supervisor restarts it on its address).

Measured over the window [first fault - interval, end], with stalwart's own accounting
(run/goodput.py) on both runs' metrics.jsonl:
- ETTR: each group's time in committed steps / (3 x window);
- token goodput: committed tokens / (tokens/s with all three groups x window);
- recovery: fault to the group's first committed step with all three groups in it (for
  sigstop this includes the 20 s the group is stopped; for a Lighthouse kill, the first
  such step after every group has its quorum back); a group not back by the end is
  unrecovered;
- non-finite: committed steps whose loss is not finite.

Run (from the repo root, .venv active); each run takes about --duration + --grace + 15 s:

    python bench/faults.py                                   # every setting, 3 repetitions
    python bench/faults.py --settings stalwart:sigkill --repeat 1 --duration 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stalwart.run.goodput import goodput_report

SETTINGS = ("stalwart:sigkill", "stalwart:sigstop", "stalwart:nan", "stalwart:lighthouse", "torchft-ddp:sigkill",
            "torchft-ddp:nan")
GROUPS = 3
STOP_S = 20.0  # how long a SIGSTOPped group stays stopped


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


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


class Stalwart:
    def __init__(self, run: Path, fault: str) -> None:
        self.run = run
        cmd = [sys.executable, "-m", "stalwart", "train", "--out", str(run), "--quiet", "--replicas", str(GROUPS),
               "--train.steps", "999999", "--eval.every", "0", "--eval.problems", "0",
               "--guards.nonfinite_restarts", "10"]
        inject = "nan-device@sigusr1" if fault == "nan" else ""
        self.procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "STALWART_INJECT": inject})]

    def victim(self, replica: int) -> int:
        return [e["pid"] for e in _jsonl(self.run / "events.jsonl")
                if e["event"] == "group_start" and e["replica"] == replica][-1]

    def lighthouse(self) -> int:
        return [e["pid"] for e in _jsonl(self.run / "events.jsonl") if e["event"] == "lighthouse_start"][-1]

    def stop(self) -> None:
        self.procs[0].send_signal(signal.SIGTERM)


class TorchftDDP:
    def __init__(self, run: Path, fault: str) -> None:
        from stalwart.data.sources import prepare_tokenizer
        from stalwart.recipes import recipe

        self.run = run
        run.mkdir(parents=True)
        cfg = recipe("default")
        prepare_tokenizer(cfg, run, reuse=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        lighthouse = Path(sys.executable).with_name("torchft_lighthouse")
        self.procs = [subprocess.Popen([str(lighthouse), "--min_replicas", "1", "--quorum_tick_ms", "100",
                                        "--join_timeout_ms", "10000", "--bind", f"127.0.0.1:{port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        time.sleep(1.0)
        threads = str(max(1, (os.cpu_count() or 1) // GROUPS))
        for replica in range(GROUPS):
            env = {**os.environ, "REPLICA_GROUP_ID": str(replica), "NUM_REPLICA_GROUPS": str(GROUPS),
                   "TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{port}", "BENCH_RUN_DIR": str(run),
                   "OMP_NUM_THREADS": threads}
            log = open(run / f"replica-{replica}.log", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
                 "1", "--max-restarts", "100", str(Path(__file__).with_name("torchft_ddp.py"))],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def victim(self, replica: int) -> int:
        workers = _children(self.procs[1 + replica].pid)  # torchrun's current worker process
        return workers[0] if workers else self.procs[1 + replica].pid

    def stop(self) -> None:
        for proc in self.procs[1:]:
            for worker in _children(proc.pid):
                os.kill(worker, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
        self.procs[0].kill()


def run_one(setting: str, args, root: Path) -> dict:
    system, fault = setting.split(":")
    run = root / setting.replace(":", "-")
    job = (Stalwart if system == "stalwart" else TorchftDDP)(run, fault)
    faults: list[tuple[float, int]] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(m.get("participants") == GROUPS
                                                 for m in _jsonl(run / "metrics.jsonl")):
            time.sleep(0.2)
        start, victim = time.time(), 1
        for k in range(int(args.duration // args.interval)):
            time.sleep(max(0.0, start + (k + 1) * args.interval - time.time()))
            if fault == "lighthouse":
                os.kill(job.lighthouse(), signal.SIGKILL)
            else:
                pid = job.victim(victim)
                os.kill(pid, {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP, "nan": signal.SIGUSR1}[fault])
                if fault == "sigstop":
                    time.sleep(STOP_S)
                    os.kill(pid, signal.SIGCONT)
            faults.append((time.time() - (STOP_S if fault == "sigstop" else 0.0), victim))
            victim = (victim + 1) % GROUPS
        time.sleep(args.grace)
        end = time.time()
    finally:
        job.stop()
        for proc in job.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    window_start = faults[0][0] - args.interval
    metrics = [m for m in _jsonl(run / "metrics.jsonl") if window_start < m["time"] <= end]
    events = [e for e in _jsonl(run / "events.jsonl") if window_start < e["time"] <= end]
    report = goodput_report(metrics, events, wall_s=end - window_start, groups=GROUPS, since=window_start)
    recoveries = []
    for k, (t, replica) in enumerate(faults):
        after = t
        if fault == "lighthouse":  # a step whose quorum came before the kill commits after it: not a recovery
            following = faults[k + 1][0] if k + 1 < len(faults) else end
            after = max([e["time"] for e in events if e["event"] == "lighthouse_back" and t < e["time"] < following],
                        default=t)
        back = next((m["time"] for m in metrics if m["time"] > after and m["participants"] == GROUPS
                     and (fault == "lighthouse" or m["replica"] == replica)), None)
        recoveries.append(round(back - t, 2) if back is not None else None)
    done = [r for r in recoveries if r is not None]
    return {"setting": setting, "ettr": report["ettr"], "token_goodput": report["token_goodput"],
            "faults": len(faults), "recoveries_s": recoveries, "recovered": len(done),
            "mean_recovery_s": round(statistics.fmean(done), 2) if done else None,
            "max_recovery_s": max(done) if done else None,
            "nonfinite_committed": sum(1 for m in metrics if not math.isfinite(m["loss"])),
            "window_s": round(end - window_start, 1)}


def _spread(values: list[float | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    mean = format(statistics.fmean(known), fmt)
    return f"{mean} ({format(min(known), fmt)}-{format(max(known), fmt)})" if len(known) > 1 else mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=15.0, help="seconds after the last fault")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep each run's directory under DIR (default: a temporary one)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            for rep in range(args.repeat):
                result = run_one(setting, args, Path(args.keep or tmp) / f"rep{rep}")
                results.setdefault(setting, []).append(result)
                print(json.dumps(result), flush=True)
    report = {"command": "python bench/faults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "cpus": os.cpu_count(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("\nmean (min-max) over repetitions")
    print("| setting | ETTR | token goodput | recovered | mean recovery | max recovery | non-finite committed |")
    print("|---|---|---|---|---|---|---|")
    for setting, runs in results.items():
        print(f"| {setting} | {_spread([r['ettr'] for r in runs], '.1%')} "
              f"| {_spread([r['token_goodput'] for r in runs], '.1%')} "
              f"| {sum(r['recovered'] for r in runs)}/{sum(r['faults'] for r in runs)} "
              f"| {_spread([r['mean_recovery_s'] for r in runs], '.1f')} s "
              f"| {_spread([r['max_recovery_s'] for r in runs], '.1f')} s "
              f"| {sum(r['nonfinite_committed'] for r in runs)} |")


if __name__ == "__main__":
    main()
