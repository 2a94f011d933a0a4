"""Memory and step time of sharding on 2 ranks: data parallel, FSDP2, FSDP2 + expert parallelism.

One plain torchrun launch of 2 ranks per layout (`--parallel.fsdp 1`; `0`; `0 --parallel.ep 2`)
trains the smoke recipe widened to a DeepSeek-style MoE of about 60M parameters (MODEL
below: MLA, 16 routed experts of which 2 per token, one shared, MTP) in fp32 for --steps
steps of 4 x 64 tokens per rank, checkpointing once at the end, no evaluation. Measured per
rank:

- state: the parameter bytes the rank holds (the run's `start` event, exact) and AdamW's two
  fp32 moments of them;
- setup peak: the process's peak RSS (VmHWM) when its `start` event is written, i.e. after the
  model was built and sharded: every rank builds the whole model before sharding it;
- at start: its RSS at that moment (runtime, libraries and the sharded model);
- training peak: VmHWM reset (/proc/PID/clear_refs 5) right after that and read until the
  last step's metrics are written: the resident memory training needs, runtime and
  libraries included (the final checkpoint and export come after, and are left out);
- step time: the median `step_s` of steps 3..N (the first two warm up).

Each layout runs --repeat times, one launch after another, in an order that rotates every
repetition; memory is given as the mean over repetitions and ranks, step time as the median
with the min-max over repetitions. Run from the repo root with .venv active:

    python bench/sharding.py                 # 3 repetitions, about 4 minutes on 2 CPU cores
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

LAYOUTS = {"data parallel": ["--parallel.fsdp", "1"], "FSDP2": ["--parallel.fsdp", "0"],
           "FSDP2 + EP 2": ["--parallel.fsdp", "0", "--parallel.ep", "2"]}
MODEL = ["--model.hidden_size", "512", "--model.num_hidden_layers", "4", "--model.num_attention_heads", "8",
         "--model.q_lora_rank", "128", "--model.kv_lora_rank", "128", "--model.qk_nope_head_dim", "64",
         "--model.qk_rope_head_dim", "32", "--model.v_head_dim", "64", "--model.intermediate_size", "1536",
         "--model.n_routed_experts", "16", "--model.moe_intermediate_size", "512", "--model.n_group", "4",
         "--model.topk_group", "2"]
MIB = 1 << 20


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_layout(name: str, steps: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "stalwart",
           "train", "--recipe", "smoke", "--quiet", "--out", str(out), "--train.steps", str(steps),
           "--checkpoint.every", str(steps), "--eval.problems", "0", "--eval.batches", "0", *MODEL, *LAYOUTS[name]]
    launch = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    events = out / "events.jsonl"
    start = None
    while start is None and launch.poll() is None:
        start = next((e for e in _jsonl(events) if e["event"] == "start"), None)
        time.sleep(0.02)
    if start is None:
        raise SystemExit(f"{name}: the launch ended before it started: {launch.stderr.read()[-2000:]}")
    pids = start["pids"]
    setup_peak = [_status_kib(pid, "VmHWM") or 0 for pid in pids]
    at_start = [_status_kib(pid, "VmRSS") or 0 for pid in pids]
    for pid in pids:  # from here on, VmHWM is the peak while training
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    peak = [0 for _ in pids]
    metrics = out / "metrics.jsonl"
    while launch.poll() is None and not any(m["step"] == steps for m in _jsonl(metrics)):
        for i, pid in enumerate(pids):
            peak[i] = max(peak[i], _status_kib(pid, "VmHWM") or 0)
        time.sleep(0.05)
    launch.wait()
    if launch.returncode != 0:
        raise SystemExit(f"{name}: exit {launch.returncode}: {launch.stderr.read()[-2000:]}")
    step_s = [m["step_s"] for m in _jsonl(out / "metrics.jsonl")][2:]
    return {"parameters": start["parameters"], "parameter_bytes": start["parameter_bytes"],
            "setup_peak_mib": [k / 1024 for k in setup_peak], "at_start_mib": [k / 1024 for k in at_start],
            "training_peak_mib": [k / 1024 for k in peak],
            "step_s": statistics.median(step_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = list(LAYOUTS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(run_layout(name, args.steps, Path(tmp) / f"{r}-{name.replace(' ', '_')}"))
                print(f"repetition {r + 1}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    first = results[names[0]][0]
    print(f"{first['parameters'] / 1e6:.1f}M parameters, 2 ranks, {args.steps} steps, {args.repeat} repetitions\n")
    print("| layout | parameters held per rank | + AdamW moments | setup peak RSS | RSS at start | training peak RSS "
          "| step time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        runs = results[name]
        held = statistics.mean(b for run in runs for b in run["parameter_bytes"])
        mib = {key: statistics.mean(m for run in runs for m in run[key])
               for key in ("setup_peak_mib", "at_start_mib", "training_peak_mib")}
        times = [run["step_s"] for run in runs]
        print(f"| {name} | {held / MIB:.0f} MiB | {3 * held / MIB:.0f} MiB | {mib['setup_peak_mib']:.0f} MiB "
              f"| {mib['at_start_mib']:.0f} MiB | {mib['training_peak_mib']:.0f} MiB "
              f"| {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
