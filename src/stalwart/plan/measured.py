"""Measured figures from a stalwart run directory, to extrapolate a larger run from.

- step time and throughput: metrics.jsonl (the median committed step after a warm-up), as
  FLOP/s per device with the planner's own FLOP count for the run's model;
- checkpoint cost: the median `cost_s` of the `checkpoint` events, and the bytes of the
  newest checkpoint on disk, which give a write bandwidth;
- recovery: summary.json's `mean_recover_s` (fault to the group back in the quorum with
  healed state), where the run had faults.

How they carry over (docs/plan.md): the write bandwidth sets the checkpoint cost of the
planned state; the recovery time becomes the group restart time, to which the planner adds
the heal of the planned state over the fleet's scale-out link (the run's own heal, a few
MB over loopback, stays in it); the throughput is an MFU only against a catalog device the
run was on (`run_accelerator`). A small model's checkpoint is mostly fixed latency, so its
write bandwidth understates a large one's: measure with a model of the target's size per
device where it matters.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from stalwart.compress import exchange_sent
from stalwart.config import read_run_config
from stalwart.errors import ConfigError, UserError
from stalwart.plan.catalog import Accelerator
from stalwart.plan.shapes import from_model_config
from stalwart.run.rundir import RunDir

WARMUP_STEPS = 5  # the first steps include compilation, allocation and the quorum's start


def measure_run(path: Path, run_accelerator: Accelerator | None = None) -> dict:
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise ConfigError(f"--from-run {path}: not a folder")
    try:
        cfg = read_run_config(run.config_path)
    except UserError:
        raise ConfigError(f"--from-run {path}: not a stalwart run directory (its config.json is missing or not a "
                          "run's configuration)") from None
    records = [m for m in run.read_metrics()
               if m.get("step", 0) > WARMUP_STEPS and m.get("step_s", 0) > 0 and m.get("tokens_per_s", 0) > 0]
    if not records:
        raise ConfigError(f"--from-run {path}: metrics.jsonl has no timed step after the first {WARMUP_STEPS}")
    summary = run.read_summary()  # {} when missing or unreadable: then no recovery was measured
    shape = from_model_config(run.path.name, cfg.model)
    ranks = cfg.replicas.ranks_per_group
    per_device = [m["tokens_per_s"] / (max(m.get("participants", 1), 1) * ranks) for m in records]
    tokens_per_s_device = statistics.median(per_device)
    flops_per_s = shape.flops_per_token(cfg.data.seq_len) * tokens_per_s_device
    measured = {"run": str(run.path), "model": shape.name, "device": summary.get("device"),
                "step_s": statistics.median(m["step_s"] for m in records),
                "tokens_per_s_per_device": tokens_per_s_device, "flops_per_s_per_device": flops_per_s,
                "mfu": None, "checkpoint_s": None, "checkpoint_bytes": None, "checkpoint_write_gb_s": None,
                "recover_s": summary.get("mean_recover_s")}
    if run_accelerator is not None:
        measured["mfu"] = flops_per_s / (run_accelerator.bf16_tflops * 1e12)
        measured["mfu_against"] = run_accelerator.key
    if cfg.replicas.strategy != "ddp":
        measured["outer"] = _outer_rounds(run, cfg, shape.total + shape.mtp_params)
    saves = [e for e in run.read_events() if e.get("event") == "checkpoint" and e.get("cost_s")]
    if saves:
        measured["checkpoint_s"] = statistics.median(e["cost_s"] for e in saves)
        for event in reversed(saves):
            folder = Path(event.get("path", ""))
            if folder.is_dir():
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                measured["checkpoint_bytes"] = size
                measured["checkpoint_write_gb_s"] = size / measured["checkpoint_s"] / 1e9
                break
    return measured


def _outer_rounds(run: RunDir, cfg, params: float) -> dict | None:
    """A DiLoCo run's outer exchanges: the bytes a group sent to exchange the whole model
    once (one round; streaming: one round per fragment), against what the planner's model
    of the exchange (the training path's own formula) gives for this model and this many
    groups; and its compute utilisation (inner-step compute over each group's time from
    its first record to its last, the mean over groups), which the plan reports."""
    records = run.read_metrics()
    rounds = [m for m in records if m.get("outer") and m.get("bytes_sent")]
    if not rounds:
        return None
    participants = statistics.median(m["participants"] for m in rounds)
    shares = []
    for replica in sorted({m.get("replica", 0) for m in records}):
        mine = [m for m in records if m.get("replica", 0) == replica]
        inner = [m for m in mine if "loss" in m]
        span = mine[-1]["time"] - mine[0]["time"]
        if inner and span > 0:
            shares.append(min(sum(m["step_s"] for m in inner) / span, 1.0))
    r = cfg.replicas
    fragments = r.fragments if r.strategy == "streaming" else 1  # rounds to exchange the whole model once
    return {"strategy": r.strategy, "compression": r.compression, "inner_steps": r.inner_steps, "rounds": len(rounds),
            "bytes_per_sync": statistics.mean(m["bytes_sent"] for m in rounds) * fragments,
            "modelled_bytes_per_sync": exchange_sent(params, r.compression, round(participants)),
            "utilisation": statistics.mean(shares) if shares else None}
