"""`python bench/memory_probe.py ARGS...` runs `stalwart train ARGS...` (under torchrun too)
with the memory of one step traced, as a GPU's `max_memory_allocated` would trace it: what
the step allocates through torch's CPU allocator, from torch's profiler (profile_memory),
on top of what the rank holds when the step begins.

Environment: BENCH_PROFILE_STEP (the step to trace), BENCH_PROFILE_DIR (where each rank
writes rank-R.json). Per rank:

- held_bytes: the tensors the rank holds as the step begins: its parameters (its shards),
  AdamW's moments, the buffers (gradients are freed after every step);
- peak_step_bytes: the most the step had allocated beyond that at any moment;
- peak_bytes: their sum, the rank's peak over the step.

Buffers the communication libraries allocate themselves (gloo's) are not torch tensors
and are not counted; neither are the step's own profiler records.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import stalwart.training.loop as loop
from stalwart.cli import main
from stalwart.parallel.fsdp import local_part

STEP, OUT = int(os.environ["BENCH_PROFILE_STEP"]), Path(os.environ["BENCH_PROFILE_DIR"])
_train_step = loop.train_step


def _held_bytes(job) -> int:
    tensors = {id(t): t for t in job.model.parameters()}
    tensors.update({id(t): t for t in job.model.buffers()})
    for per_param in job.state.optimizer.state.values():
        tensors.update({id(t): t for t in per_param.values() if isinstance(t, torch.Tensor)})
    return sum(local_part(t).numel() * local_part(t).element_size() for t in tensors.values())


def _peak_allocated(prof) -> int:
    """The highest running total of the CPU allocator's bytes during the trace (from its start)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *totals])


def _traced_step(job, step, **kwargs):
    if step != STEP:
        return _train_step(job, step, **kwargs)
    held = _held_bytes(job)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = _train_step(job, step, **kwargs)
    peak = _peak_allocated(prof)
    OUT.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (OUT / f"rank-{rank}.json").write_text(json.dumps(
        {"step": step, "held_bytes": held, "peak_step_bytes": peak, "peak_bytes": held + peak}))
    return result


if __name__ == "__main__":
    loop.train_step = _traced_step
    raise SystemExit(main(["train", *sys.argv[1:]]))
