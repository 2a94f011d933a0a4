"""Memory, step time and cross-group bytes of sharding: data parallel, FSDP2 and FSDP2 + expert parallelism on 1, 2 and 4 ranks, against `stalwart plan`.

One plain torchrun launch per layout (LAYOUTS: ranks, `--parallel.fsdp`, `--parallel.ep`)
trains the smoke recipe with the `small` preset's model, a DeepSeek-style MoE of 60.1M parameters (MODEL
below: MLA, 16 routed experts of which 2 per token, one shared, MTP) in fp32 for --steps
steps of 4 x 64 tokens per rank, checkpointing once at the end, no evaluation. Measured per
rank:

- state: the parameter bytes the rank holds (the run's `start` event, exact), and with
  their gradients and AdamW's two fp32 moments (4 x);
- setup peak: the process's peak RSS (VmHWM) when its `start` event is written, i.e. after the
  model was built (on the meta device), sharded and given its weights;
- training peak RSS: VmHWM reset (/proc/PID/clear_refs 5) right after that and read until
  step N-1's metrics are written (the traced last step, the final checkpoint and the export
  are left out); RSS also counts the runtime (torch, libraries, gloo) and what the allocator
  keeps of freed memory;
- allocated peak: the last step traced by bench/memory_probe.py, which runs the same
  `stalwart train` with torch's profiler around that step: the tensors the rank holds as it
  begins (parameters, AdamW's moments, buffers) plus the most the step allocates beyond them
  at any moment, as a GPU's `max_memory_allocated` counts;
- step time: the median `step_s` of steps 3..N-1 (the first two warm up; the last is traced),
  and tokens/s per rank.

`stalwart plan --model RUN_DIR --weights fp32 --fsdp F --ep E --recompute none
--activation-dtype fp32 --micro-batch 4` (the run's own model and how it trains: the same
ranks, sequence and batch, nothing recomputed) predicts state, activations and FSDP's
gathered layers per device, against the allocated peak. The data-parallel layout is planned
as `--strategy replicas` (every rank holds the whole optimizer state, as stalwart's data
parallelism does; the planner's `sync` assumes ZeRO-1).

Cross-group bytes: two replica groups of 2 ranks each with FSDP2 inside (HSDP) against two
groups of one rank (the flat exchange), --steps steps: the median `bytes_sent` per rank and
step, from metrics.jsonl.

Each layout runs --repeat times, one launch after another, in an order that rotates every
repetition; memory is given as the mean over repetitions and ranks, step time as the median
with the min-max over repetitions. Run from the repo root with .venv active:

    python bench/sharding.py                 # 3 repetitions, about 15 minutes on 2 CPU cores
    python bench/sharding.py --repeat 1 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {"1 rank": (1, 1, 1), "data parallel, 2 ranks": (2, 1, 1), "FSDP2, 2 ranks": (2, 2, 1),
           "FSDP2 + EP 2, 2 ranks": (2, 2, 2), "FSDP2, 4 ranks": (4, 4, 1),
           "FSDP2 + EP 2, 4 ranks": (4, 4, 2)}  # ranks, parallel.fsdp, parallel.ep
def _small_preset_overrides() -> list[str]:
    """The `small` preset's shape as overrides of the smoke recipe's model (which keeps its
    own sequence length)."""
    import dataclasses

    from stalwart.model import preset
    from stalwart.recipes import smoke

    small, base = dataclasses.asdict(preset("small")), dataclasses.asdict(smoke().model)
    return [arg for key in small if small[key] != base[key] and key != "max_position_embeddings"
            for arg in (f"--model.{key}", str(small[key]))]


MODEL = _small_preset_overrides()
MIB = 1 << 20


def _jsonl(path: Path) -> list[dict]:
    """The complete records of a file the job may be appending to (a torn last line waits)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


PROBE = str(Path(__file__).with_name("memory_probe.py"))


def _train_args(out: Path, steps: int) -> list[str]:
    return ["--recipe", "smoke", "--quiet", "--out", str(out), "--train.steps", str(steps),
            "--checkpoint.every", str(steps), "--eval.problems", "0", "--eval.batches", "0", *MODEL]


class LaunchFailed(Exception):
    """A launch that did not finish; its ranks' own lines (not torchrun's report) say why."""

    def __init__(self, what: str, log: Path) -> None:
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith(("  ", "[", "=", "-", "Traceback", "torch.distributed"))]
        super().__init__(f"{what}: " + " | ".join(lines[-12:]))


def run_layout(name: str, steps: int, out: Path) -> dict:
    ranks, fsdp, ep = LAYOUTS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_PROFILE_STEP": str(steps),
           "BENCH_PROFILE_DIR": str(out / "memory")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), PROBE,
           *_train_args(out, steps), "--parallel.fsdp", str(fsdp), "--parallel.ep", str(ep)]
    log = out.with_suffix(".stderr")  # beside the run, which a launch may remove
    with open(log, "w") as stderr:
        launch = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
    events = out / "events.jsonl"
    start = None
    while start is None and launch.poll() is None:
        start = next((e for e in _jsonl(events) if e["event"] == "start"), None)
        time.sleep(0.02)
    if start is None:
        raise LaunchFailed(f"{name}: the launch ended before it started", log)
    pids = start["pids"] if "pids" in start else [start["pid"]]
    held = start["parameter_bytes"] if isinstance(start["parameter_bytes"], list) else [start["parameter_bytes"]]
    setup_peak = [_status_kib(pid, "VmHWM") or 0 for pid in pids]
    for pid in pids:  # from here on, VmHWM is the peak while training
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    peak = [0 for _ in pids]
    metrics = out / "metrics.jsonl"
    while launch.poll() is None and not any(m["step"] == steps - 1 for m in _jsonl(metrics)):
        for i, pid in enumerate(pids):
            peak[i] = max(peak[i], _status_kib(pid, "VmHWM") or 0)
        time.sleep(0.05)
    launch.wait()
    if launch.returncode != 0:
        raise LaunchFailed(f"{name}: exit {launch.returncode}", log)
    step_s = [m["step_s"] for m in _jsonl(out / "metrics.jsonl")][2:-1]
    traced = [json.loads((out / "memory" / f"rank-{r}.json").read_text()) for r in range(ranks)]
    return {"parameters": start["parameters"], "parameter_bytes": held,
            "setup_peak_mib": [k / 1024 for k in setup_peak], "training_peak_mib": [k / 1024 for k in peak],
            "allocated_peak_mib": [t["peak_bytes"] / MIB for t in traced],
            "step_s": statistics.median(step_s), "plan": plan_layout(name, out)}


def plan_layout(name: str, run: Path) -> dict:
    """What `stalwart plan` predicts per device for this layout on the run's own model."""
    ranks, fsdp, ep = LAYOUTS[name]
    cmd = [sys.executable, "-m", "stalwart", "plan", "--model", str(run), "--tokens", "1M", "--accelerator", "H100",
           "--devices", str(ranks), "--fsdp", str(fsdp), "--ep", str(ep), "--weights", "fp32", "--seq-len", "64",
           "--batch-tokens", str(4 * 64 * ranks), "--recompute", "none", "--activation-dtype", "fp32",
           "--micro-batch", "4", "--json", *(["--strategy", "replicas"] if ranks > 1 and fsdp == ep == 1 else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    memory = json.loads(r.stdout)["memory"]
    return {f"{key}_mib": memory[f"{key}_gb"] * 1e9 / MIB for key in ("state", "activation", "gathered", "exchange",
                                                                        "peak")}


def cross_group_bytes(ranks_per_group: int, steps: int, out: Path) -> int:
    """Median bytes one rank sends the other group per step: two replica groups of
    `ranks_per_group` ranks (FSDP2 over them when more than one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stalwart", "train", *_train_args(out, steps), "--replicas", "2",
           "--replicas.ranks_per_group",
           str(ranks_per_group), "--guards.fingerprint_every", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"replica groups of {ranks_per_group}: exit {r.returncode}: {r.stderr[-2000:]}")
    return int(statistics.median(m["bytes_sent"] for m in _jsonl(out / "metrics.jsonl") if "bytes_sent" in m))


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(v for run in runs for v in run[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = list(LAYOUTS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                folder = Path(tmp) / f"{r}-{name.replace(' ', '_').replace(',', '')}"
                try:
                    results[name].append(run_layout(name, args.steps, folder))
                except LaunchFailed as e:  # reported with the results, and that repetition left out
                    failures.append(f"repetition {r + 1}: {e}")
                    print(failures[-1], file=sys.stderr, flush=True)
                    continue
                print(f"repetition {r + 1}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)
        exchanged = {ranks: cross_group_bytes(ranks, args.steps, Path(tmp) / f"groups-{ranks}") for ranks in (1, 2)}
    first = results[names[0]][0]
    print(f"{first['parameters'] / 1e6:.1f}M parameters ({4 * first['parameters'] / MIB:.0f} MiB in fp32), "
          f"{args.steps} steps, {args.repeat} repetitions\n")
    print("| layout | parameters held per rank | + gradients, AdamW moments | plan: state | setup peak RSS "
          "| training peak RSS | allocated peak | plan: peak | step time "
          "| tokens/s per rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        runs = results[name]
        held = statistics.mean(b for run in runs for b in run["parameter_bytes"])
        plan = runs[0]["plan"]
        times = [run["step_s"] for run in runs]
        predicted = plan["peak_mib"]
        allocated = [v for run in runs for v in run["allocated_peak_mib"]]
        print(f"| {name} | {held / MIB:.0f} MiB | {4 * held / MIB:.0f} MiB | {plan['state_mib']:.0f} MiB "
              f"| {_mean(runs, 'setup_peak_mib'):.0f} MiB | {_mean(runs, 'training_peak_mib'):.0f} MiB "
              f"| {statistics.mean(allocated):.0f} MiB ({min(allocated):.0f}-{max(allocated):.0f}) "
              f"| {predicted:.0f} MiB ({predicted / statistics.mean(allocated) - 1:+.0%}) "
              f"| {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}) "
              f"| {4 * 64 / statistics.median(times):.0f} |")
    print(f"\nbytes per rank and step across two replica groups: flat (1 rank a group) {exchanged[1]:,}; "
          f"HSDP (2 ranks a group, FSDP2) {exchanged[2]:,} ({exchanged[2] / exchanged[1]:.2f}x)")
    for failure in failures:
        print(f"\nfailed launch, left out: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"layouts": results, "bytes_per_rank": exchanged, "failures": failures},
                                        indent=1))


if __name__ == "__main__":
    main()
