"""How a training run would go on a fleet: its FLOPs, a step's time (given an MFU, or from a
roofline of compute against memory against communication), and the time failures cost.

Assumptions, each a parameter of `RunSpec` (docs/plan.md walks through them):

- Parallelism: `tp x pp x dp` devices; experts sharded over `ep` of the data-parallel
  ranks (ep divides dp), as DeepSeek-V3 trains (PP16, EP64 across nodes, ZeRO-1 DP). Ranks
  are placed tensor-parallel innermost, then expert-parallel, then pipeline stages: a
  collective stays on the scale-up link while the ranks it spans fit in one domain.
- A step (roofline): compute = FLOPs / (peak x kernel_efficiency); memory = weights read
  three times per micro-batch plus the optimizer's pass, over HBM bandwidth; the larger of
  the two, plus the pipeline bubble (pp-1)/(v m) for m micro-batches of one sequence and v
  virtual stages. Tensor-parallel all-reduces, expert all-to-alls (dispatch and combine,
  forward and backward) and pipeline sends hide under `overlap` x compute; the
  data-parallel gradient all-reduce (bf16, ring) hides under the backward pass (2/3 of
  compute). What does not hide is added to the step.
- Failures: devices fail independently, each at its MTBF. `sync`: any failure stops the
  whole job, which restarts from its last checkpoint (restart + half an interval lost),
  checkpoints every Young/Daly interval. `replicas` (stalwart's replica groups): a failure
  costs everyone the step in flight and its group the restart plus a heal of its state
  from a peer over the scale-out link, while the other groups train on. `diloco`: as
  replicas, plus the failed group's local steps since the last outer synchronisation;
  groups exchange (compressed) outer gradients every H steps instead of gradients every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stalwart.errors import ConfigError
from stalwart.goodput import young_daly_interval
from stalwart.plan.catalog import Accelerator

if TYPE_CHECKING:  # shapes import the model (torch); the CLI's flags must not
    from stalwart.plan.shapes import ModelShape

STRATEGIES = ("sync", "replicas", "diloco")
# The share of peak the model's kernels reach when nothing waits on a link: fitted so that
# the roofline gives Llama 3.1 405B its reported 38-43% MFU (40%) under the parallelism
# the Llama 3 paper describes (TP8, PP16, DP128, interleaved pipeline); see
# tests/test_plan.py::test_roofline_reproduces_llama_mfu_and_says_what_it_gives_deepseek.
KERNEL_EFFICIENCY = 0.55
# Assumptions, overridable per run (docs/plan.md): a classic job's restart (detect,
# reschedule, reload the checkpoint); a replica group's restart before its heal (process
# and communicator start, spare device assigned); per-device checkpoint write bandwidth.
RESTART_S = 600.0
GROUP_RESTART_S = 60.0
CHECKPOINT_WRITE_GB_S = 1.0
# Bytes per parameter: bf16 weights; fp32 gradients; fp32 master copy and Adam's two moments.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12
DILOCO_BYTES = 8  # the outer Nesterov momentum and the last synchronised weights, fp32
DILOCO_BITS = (4, 8, 16, 32)


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    virtual_stages: int = 1  # interleaved pipeline chunks per stage (v)
    strategy: str = "sync"
    diloco_h: int = 100  # inner steps between outer synchronisations
    diloco_bits: int = 16  # bits per outer-gradient value on the wire


@dataclass(frozen=True)
class RunSpec:
    shape: ModelShape
    tokens: float
    accelerator: Accelerator
    devices: int
    seq_len: int = 4096
    batch_tokens: float = 16 * 2**20
    parallel: Parallelism = field(default_factory=Parallelism)
    precision: str = "bf16"  # the GEMMs' precision: bf16, or fp8 where the device has it
    mfu: float | None = None  # None: the roofline's estimate
    overlap: float = 0.0  # share of compute under which TP/EP/PP traffic can hide
    kernel_efficiency: float = KERNEL_EFFICIENCY
    price_per_hour: float = 2.0  # per device-hour
    mtbf_hours: float | None = None  # per device; None: the catalog's
    checkpoint_s: float | None = None  # blocking cost of one checkpoint; None: bytes / write bandwidth
    checkpoint_interval_s: float | None = None  # None: Young/Daly
    checkpoint_write_gb_s: float = CHECKPOINT_WRITE_GB_S  # per device, when checkpoint_s is None
    restart_s: float = RESTART_S
    group_restart_s: float = GROUP_RESTART_S


def check(spec: RunSpec) -> None:
    """Raise ConfigError naming the first inconsistent input."""
    p, s, a = spec.parallel, spec.shape, spec.accelerator
    for name, value in (("devices", spec.devices), ("tp", p.tp), ("pp", p.pp), ("ep", p.ep),
                        ("virtual-stages", p.virtual_stages), ("seq-len", spec.seq_len), ("diloco-h", p.diloco_h)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    if not spec.tokens > 0:
        raise ConfigError(f"tokens must be positive, got {spec.tokens:g}")
    if p.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {p.strategy!r} (known: {', '.join(STRATEGIES)})")
    if spec.devices % (p.tp * p.pp):
        raise ConfigError(f"tp x pp = {p.tp} x {p.pp} = {p.tp * p.pp} does not divide the fleet of {spec.devices} "
                          f"{a.key}")
    dp = spec.devices // (p.tp * p.pp)
    if dp % p.ep:
        raise ConfigError(f"ep {p.ep} does not divide the data-parallel degree {dp} (= devices / (tp x pp))")
    if s.heads % p.tp:
        raise ConfigError(f"tp {p.tp} does not divide the model's {s.heads} attention heads")
    if p.pp * p.virtual_stages > s.layers:
        raise ConfigError(f"pp x virtual-stages = {p.pp * p.virtual_stages} exceeds the model's {s.layers} layers")
    if p.ep > 1 and not s.is_moe:
        raise ConfigError(f"ep {p.ep} needs a mixture-of-experts model; {s.name} is dense")
    if s.is_moe and s.experts % p.ep:
        raise ConfigError(f"ep {p.ep} does not divide the model's {s.experts} routed experts")
    if spec.batch_tokens < dp * spec.seq_len:
        raise ConfigError(f"batch of {spec.batch_tokens:g} tokens is less than one {spec.seq_len}-token sequence "
                          f"for each of the {dp} data-parallel ranks")
    if p.strategy != "sync" and dp // p.ep < 2:
        raise ConfigError(f"strategy {p.strategy} needs at least 2 replica groups; dp / ep = {dp // p.ep}")
    if p.diloco_bits not in DILOCO_BITS:
        raise ConfigError(f"diloco-bits must be one of {', '.join(map(str, DILOCO_BITS))}, got {p.diloco_bits}")
    if spec.precision not in ("bf16", "fp8"):
        raise ConfigError(f"precision must be bf16 or fp8, got {spec.precision!r}")
    if spec.precision == "fp8" and a.fp8_tflops is None:
        raise ConfigError(f"{a.key} has no FP8 (the catalog's fp8_tflops is null); use --precision bf16")
    if spec.mfu is not None and not 0 < spec.mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {spec.mfu:g}")
    if not 0 <= spec.overlap <= 1:
        raise ConfigError(f"overlap must be in [0, 1], got {spec.overlap:g}")
    if not 0 < spec.kernel_efficiency <= 1:
        raise ConfigError(f"kernel-efficiency must be in (0, 1], got {spec.kernel_efficiency:g}")
    for name, value in (("price", spec.price_per_hour), ("restart-s", spec.restart_s),
                        ("group-restart-s", spec.group_restart_s)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value:g}")
    for name, value in (("mtbf-hours", spec.mtbf_hours), ("checkpoint-s", spec.checkpoint_s),
                        ("checkpoint-interval-s", spec.checkpoint_interval_s),
                        ("checkpoint-write-gb-s", spec.checkpoint_write_gb_s)):
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value:g}")


def _place(nbytes: float, span: int, domain: int) -> tuple[float, float]:
    """(scale-up, scale-out) bytes of a collective over `span` consecutive ranks: all on the
    scale-up link while they fit in one domain, else all but the domain's own share leaves it."""
    off = 0.0 if span <= domain else 1.0 - domain / span
    return nbytes * (1 - off), nbytes * off


def estimate(spec: RunSpec) -> dict:
    """The plan, as the JSON `stalwart plan --json` prints."""
    check(spec)
    s, a, p = spec.shape, spec.accelerator, spec.parallel
    dp = spec.devices // (p.tp * p.pp)
    groups = dp // p.ep
    group_devices = p.tp * p.pp * p.ep
    flops_per_token = s.flops_per_token(spec.seq_len)
    steps = math.ceil(spec.tokens / spec.batch_tokens)
    tokens = steps * spec.batch_tokens
    flops_device = flops_per_token * spec.batch_tokens / spec.devices  # per step

    # Memory per device: parameters, their gradients and optimizer state, and activations.
    dense = s.dense_params / (p.tp * p.pp)
    experts = s.expert_params / (p.pp * p.ep)
    params = dense + experts
    if p.strategy == "sync":  # ZeRO-1: optimizer state sharded over the ranks holding a copy
        optimizer = OPTIMIZER_BYTES * (dense / dp + experts / groups)
    else:  # a replica group holds its whole state, so that it can heal a peer
        optimizer = OPTIMIZER_BYTES * (dense / p.ep + experts)
    optimizer += DILOCO_BYTES * params if p.strategy == "diloco" else 0
    state_bytes = (WEIGHT_BYTES + GRAD_BYTES) * params + optimizer
    micro = spec.batch_tokens / (dp * spec.seq_len)  # micro-batches of one sequence per step
    # Full recomputation: a layer's input per micro-batch in flight (up to pp of them on the
    # first stage), plus one layer's working set (~34 bytes per token and hidden unit,
    # Korthikanti et al. 2022), split over tensor-parallel ranks.
    layers_stage = s.layers / p.pp
    activation_bytes = (min(p.pp, micro) * layers_stage * 2 + 34) * spec.seq_len * s.hidden / p.tp
    checkpoint_bytes = state_bytes - GRAD_BYTES * params

    # A step on the roofline.
    peak = (a.fp8_tflops if spec.precision == "fp8" else a.bf16_tflops) * 1e12
    compute_s = flops_device / (peak * spec.kernel_efficiency)
    hbm_bytes = 3 * WEIGHT_BYTES * params * micro + 32 * params
    memory_s = hbm_bytes / (a.hbm_tb_s * 1e12)
    local_s = max(compute_s, memory_s)
    bubble_s = local_s * (p.pp - 1) / (p.virtual_stages * micro)
    tokens_rank = spec.batch_tokens / dp
    domain = a.scale_up_domain
    # Bytes each device sends per step, as (scale-up, scale-out): model-parallel traffic
    # (tensor, expert, pipeline) and gradient traffic (data-parallel or DiLoCo's).
    tp_bytes = layers_stage * 4 * 2 * (p.tp - 1) / p.tp * tokens_rank * s.hidden * WEIGHT_BYTES
    model = [_place(tp_bytes, p.tp, domain)]
    if s.is_moe and p.ep > 1:
        ep_bytes = (s.moe_layers / p.pp) * 4 * tokens_rank / p.tp * s.experts_per_token * s.hidden * \
            WEIGHT_BYTES * (p.ep - 1) / p.ep
        model.append(_place(ep_bytes, p.tp * p.ep, domain))
    if p.pp > 1:  # stage neighbours are tp x ep ranks apart
        pp_bytes = micro * 2 * spec.seq_len * s.hidden * WEIGHT_BYTES / p.tp
        model.append((pp_bytes, 0.0) if p.tp * p.ep * p.pp <= domain else (0.0, pp_bytes))
    up, out = (sum(pair) for pair in zip(*model))
    outer_s = 0.0
    if p.strategy == "diloco":
        # Inside a group: dense gradients over its ep ranks, every step. Across groups: the
        # outer gradient of the whole shard, every H steps, compressed, not overlapped.
        up_dp, out_dp = _place(2 * (p.ep - 1) / p.ep * dense * WEIGHT_BYTES, p.tp * p.ep, domain)
        outer = 2 * (groups - 1) / groups * params * p.diloco_bits / 8 / p.diloco_h
        link = a.scale_up_gb_s if spec.devices <= domain else a.scale_out_gb_s
        outer_s = outer / (link * 1e9)
    else:
        grads = 2 * (dp - 1) / dp * dense * WEIGHT_BYTES + 2 * (groups - 1) / groups * experts * WEIGHT_BYTES
        up_dp, out_dp = _place(grads, spec.devices, domain)
    up_s, out_s = up / (a.scale_up_gb_s * 1e9), out / (a.scale_out_gb_s * 1e9)
    up_dp_s, out_dp_s = up_dp / (a.scale_up_gb_s * 1e9), out_dp / (a.scale_out_gb_s * 1e9)
    backward = 2 / 3 * local_s
    exposed_up = max(0.0, up_s - spec.overlap * local_s) + max(0.0, up_dp_s - backward)
    exposed_out = max(0.0, out_s - spec.overlap * local_s) + max(0.0, out_dp_s - backward) + outer_s
    roofline_s = local_s + bubble_s + exposed_up + exposed_out
    bf16_peak = a.bf16_tflops * 1e12
    mfu_roofline = flops_device / (bf16_peak * roofline_s)
    mfu = spec.mfu if spec.mfu is not None else mfu_roofline
    step_s = flops_device / (bf16_peak * mfu)
    scale = step_s / roofline_s  # a given MFU stretches the roofline's parts alike

    # Failures.
    mtbf_device_s = (spec.mtbf_hours or a.mtbf_hours) * 3600
    mtbf_job_s = mtbf_device_s / spec.devices
    checkpoint_s = spec.checkpoint_s or checkpoint_bytes / (spec.checkpoint_write_gb_s * 1e9)
    interval_s = spec.checkpoint_interval_s or young_daly_interval(checkpoint_s, mtbf_job_s)
    productive_s = steps * step_s
    with_checkpoints_s = productive_s * (1 + checkpoint_s / interval_s)
    heal_s = checkpoint_bytes / (a.scale_out_gb_s * 1e9)
    if p.strategy == "sync":
        recover_s = spec.restart_s
        lost_per_failure_s = spec.restart_s + (interval_s + checkpoint_s) / 2
        lost_share = lost_per_failure_s / mtbf_job_s  # of wall time
    else:
        recover_s = spec.group_restart_s + heal_s
        # Per failure: everyone loses the step in flight; the group's share of the fleet is
        # out for its recovery (and, with DiLoCo, its local steps since the last sync).
        group_lost_s = recover_s + (p.diloco_h * step_s / 2 if p.strategy == "diloco" else 0.0)
        lost_per_failure_s = step_s + group_devices / spec.devices * group_lost_s
        lost_share = lost_per_failure_s / mtbf_job_s
    warnings = []
    if lost_share >= 1:
        wall_s = None
        warnings.append(f"failures outpace recovery: a failure every {mtbf_job_s:.0f}s costs "
                        f"{lost_per_failure_s:.0f}s; the run never finishes")
    else:
        wall_s = with_checkpoints_s / (1 - lost_share)
    memory_gb = (state_bytes + activation_bytes) / 1e9
    if memory_gb > a.hbm_gb:
        warnings.append(f"does not fit: {memory_gb:.0f} GB per device (state and activations) "
                        f"against {a.hbm_gb:g} GB of HBM; raise tp, pp or ep")
    ettr = productive_s / wall_s if wall_s else 0.0
    # Where the wall time goes, per step: the bottleneck is the largest part.
    parts = {"compute": (local_s + bubble_s) * scale, "scale-up": exposed_up * scale,
             "scale-out": exposed_out * scale,
             "failures": (wall_s - productive_s) / steps if wall_s else math.inf}
    bottleneck = max(parts, key=lambda k: parts[k])
    shares = {k: v * steps / wall_s for k, v in parts.items()} if wall_s else None
    hours = wall_s * spec.devices / 3600 if wall_s else None
    return {
        "model": s.name, "accelerator": a.key, "devices": spec.devices,
        "parallelism": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": dp, "virtual_stages": p.virtual_stages,
                        "strategy": p.strategy, "replica_groups": groups, "group_devices": group_devices,
                        **({"diloco_h": p.diloco_h, "diloco_bits": p.diloco_bits} if p.strategy == "diloco" else {})},
        "precision": spec.precision,
        "tokens": tokens, "seq_len": spec.seq_len, "batch_tokens": spec.batch_tokens, "steps": steps,
        "params_total": s.total, "params_active": s.active,
        "flops_per_token": flops_per_token, "training_flops": flops_per_token * tokens,
        "mfu": mfu, "mfu_source": "given" if spec.mfu is not None else "roofline", "mfu_roofline": mfu_roofline,
        "step_s": step_s,
        "step": {"compute_s": compute_s * scale, "memory_s": memory_s * scale, "bubble_s": bubble_s * scale,
                 "scale_up_s": (up_s + up_dp_s) * scale, "scale_out_s": (out_s + out_dp_s + outer_s) * scale,
                 "exposed_scale_up_s": exposed_up * scale, "exposed_scale_out_s": exposed_out * scale},
        "memory": {"state_gb": state_bytes / 1e9, "activation_gb": activation_bytes / 1e9, "hbm_gb": a.hbm_gb,
                   "fits": memory_gb <= a.hbm_gb},
        "failures": {"mtbf_device_hours": mtbf_device_s / 3600, "mtbf_job_s": mtbf_job_s,
                     "expected": wall_s / mtbf_job_s if wall_s else None,
                     "checkpoint_gb": checkpoint_bytes / 1e9, "checkpoint_s": checkpoint_s,
                     "checkpoint_interval_s": interval_s,
                     "checkpoint_rule": "given" if spec.checkpoint_interval_s else "young-daly",
                     "recover_s": recover_s, "lost_per_failure_s": lost_per_failure_s,
                     "lost_s": wall_s - with_checkpoints_s if wall_s else None,
                     "checkpointing_s": with_checkpoints_s - productive_s},
        "productive_s": productive_s, "wall_s": wall_s, "days": wall_s / 86400 if wall_s else None,
        "device_hours": hours, "price_per_hour": spec.price_per_hour,
        "cost": hours * spec.price_per_hour if hours else None,
        "ettr": ettr, "bottleneck": bottleneck, "time_shares": shares, "warnings": warnings,
    }
