"""How a training run would go on a fleet: its FLOPs, a step's time (given an MFU, or from a
roofline of compute against memory against communication), and the time failures cost.

Assumptions, each a parameter of `RunSpec` (docs/plan.md walks through them):

- Parallelism: `tp x pp x dp` devices; experts sharded over `ep` of the data-parallel
  ranks (ep divides dp), as DeepSeek-V3 trains (PP16, EP64 across nodes, ZeRO-1 DP). Ranks
  are numbered tensor-parallel innermost, then expert-parallel, then pipeline stage, then
  the rest of data-parallel; the share of a collective's peers outside a rank's scale-up
  domain is the share of its bytes that crosses the scale-out link.
- A step (roofline): compute = FLOPs / (peak x kernel_efficiency) (the fitted efficiency
  absorbs what the FLOP count leaves out: recomputation, norms, imbalance); memory =
  weights read three times per micro-batch plus the optimizer's pass, over HBM bandwidth;
  the larger of the two, plus the pipeline bubble (pp-1)/(v m) for m micro-batches of one
  sequence and v virtual stages. Tensor-parallel all-reduces, expert all-to-alls (dispatch
  and combine, forward and backward) and pipeline sends hide under `overlap` x compute; the
  gradient all-reduce (bf16, ring) hides under the backward pass (2/3 of compute); a link
  hides at most one compute time in all. What does not hide is added to the step.
- Failures: devices fail independently, each at its MTBF. `sync`: any failure stops the
  whole job, which restarts from its last checkpoint (restart + half an interval lost),
  checkpoints every Young/Daly interval. `replicas` (stalwart's replica groups): a failure
  costs everyone the step in flight and its group the restart plus a heal of its state
  from a peer over the scale-out link, while the other groups train on. `diloco`: as
  replicas, plus the failed group's local steps since the last outer synchronisation;
  groups exchange (compressed) outer gradients every H steps instead of gradients every step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stalwart.compress import COMPRESSIONS, exchange_sent
from stalwart.errors import ConfigError
from stalwart.run.goodput import young_daly_interval
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
# RunSpec.weights: what the weights and the optimizer hold, in bytes per parameter. bf16:
# bf16 weights, an fp32 master copy beside the moments (Megatron, DeepSeek-V3); fp32: fp32
# weights that autocast computes with in bf16, no master copy (stalwart's own training).
WEIGHTS = {"bf16": (WEIGHT_BYTES, OPTIMIZER_BYTES), "fp32": (4, 8)}
# The optimizer's pass over HBM: it reads the bf16 weights, fp32 master, gradients and
# moments (2 + 4 + 4 + 8) and writes weights, master and moments back (2 + 4 + 8).
OPTIMIZER_PASS_BYTES = 32
DILOCO_BYTES = 8  # the outer Nesterov momentum and the last synchronised weights, fp32
ACTIVATION_BYTES = {"bf16": 2, "fp32": 4}
RECOMPUTE = ("full", "none")


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    fsdp: int = 1  # data-parallel ranks that shard weights, gradients and optimizer state (FSDP2, ZeRO-3)
    virtual_stages: int = 1  # interleaved pipeline chunks per stage (v)
    strategy: str = "sync"
    diloco_h: int = 100  # inner steps between outer synchronisations
    diloco_compression: str = "none"  # the outer gradient on the wire, as --replicas.compression


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
    weights: str = "bf16"  # the weights as held (WEIGHTS)
    recompute: str = "full"  # activations kept for the backward pass: full recomputation, or none (all stored)
    activation_dtype: str = "bf16"  # activations and FSDP's gathered weights: bf16 (autocast), or fp32
    micro_batch: int = 1  # sequences per micro-batch
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


# Ranges that keep every figure finite; each value outside one is refused by name.
_RANGES = {"tokens": (1.0, 1e18), "mfu": (1e-9, 1.0), "overlap": (0.0, 1.0), "kernel-efficiency": (1e-3, 1.0),
           "price": (0.0, 1e6), "mtbf-hours": (1e-3, 1e9), "checkpoint-s": (1e-6, 1e7),
           "checkpoint-interval-s": (1e-6, 1e9), "checkpoint-write-gb-s": (1e-6, 1e6), "restart-s": (0.0, 1e7),
           "group-restart-s": (0.0, 1e7)}


def validate_run_spec(spec: RunSpec) -> None:
    """Raise ConfigError naming the first inconsistent input."""
    p, s, a = spec.parallel, spec.shape, spec.accelerator
    for name, value in (("devices", spec.devices), ("tp", p.tp), ("pp", p.pp), ("ep", p.ep), ("fsdp", p.fsdp),
                        ("virtual-stages", p.virtual_stages), ("seq-len", spec.seq_len), ("diloco-h", p.diloco_h),
                        ("micro-batch", spec.micro_batch)):
        if not isinstance(value, int) or not 1 <= value <= 10**8:
            raise ConfigError(f"{name} must be a whole number from 1 to 10^8, got {value!r}")
    for name, value in (("tokens", spec.tokens), ("mfu", spec.mfu), ("overlap", spec.overlap),
                        ("kernel-efficiency", spec.kernel_efficiency), ("price", spec.price_per_hour),
                        ("mtbf-hours", spec.mtbf_hours), ("checkpoint-s", spec.checkpoint_s),
                        ("checkpoint-interval-s", spec.checkpoint_interval_s),
                        ("checkpoint-write-gb-s", spec.checkpoint_write_gb_s), ("restart-s", spec.restart_s),
                        ("group-restart-s", spec.group_restart_s)):
        low, high = _RANGES[name]
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value:.4g}")
    if p.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {p.strategy!r} (known: {', '.join(STRATEGIES)})")
    if spec.devices % (p.tp * p.pp):
        raise ConfigError(f"tp x pp = {p.tp} x {p.pp} = {p.tp * p.pp} does not divide the fleet of {spec.devices} "
                          f"{a.key}")
    dp = spec.devices // (p.tp * p.pp)
    if dp % p.ep:
        raise ConfigError(f"ep {p.ep} does not divide the data-parallel degree {dp} (= devices / (tp x pp))")
    if dp % p.fsdp:
        raise ConfigError(f"fsdp {p.fsdp} does not divide the data-parallel degree {dp} (= devices / (tp x pp))")
    if max(p.ep, p.fsdp) % min(p.ep, p.fsdp):
        raise ConfigError(f"of ep {p.ep} and fsdp {p.fsdp} one must divide the other (both shard one group's ranks)")
    if spec.weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {spec.weights!r}")
    if spec.recompute not in RECOMPUTE:
        raise ConfigError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {spec.recompute!r}")
    if spec.activation_dtype not in ACTIVATION_BYTES:
        raise ConfigError(f"activation-dtype must be one of {', '.join(ACTIVATION_BYTES)}, "
                          f"got {spec.activation_dtype!r}")
    if s.heads % p.tp:
        raise ConfigError(f"tp {p.tp} does not divide the model's {s.heads} attention heads")
    if p.pp * p.virtual_stages > s.layers:
        raise ConfigError(f"pp x virtual-stages = {p.pp * p.virtual_stages} exceeds the model's {s.layers} layers")
    if p.virtual_stages > 1 and p.pp == 1:
        raise ConfigError("virtual-stages needs a pipeline (pp > 1)")
    if p.ep > 1 and not s.is_moe:
        raise ConfigError(f"ep {p.ep} needs a mixture-of-experts model; {s.name} is dense")
    if s.is_moe and s.experts % p.ep:
        raise ConfigError(f"ep {p.ep} does not divide the model's {s.experts} routed experts")
    if spec.batch_tokens < dp * spec.seq_len * spec.micro_batch:
        raise ConfigError(f"batch of {spec.batch_tokens:.4g} tokens is less than one micro-batch of "
                          f"{spec.micro_batch} {spec.seq_len}-token sequence(s) for each of the {dp} data-parallel ranks")
    if spec.batch_tokens > 1e12:
        raise ConfigError(f"batch-tokens must be at most 1e12, got {spec.batch_tokens:.4g}")
    if p.strategy != "sync" and dp // max(p.ep, p.fsdp) < 2:
        raise ConfigError(f"strategy {p.strategy} needs at least 2 replica groups; dp / max(ep, fsdp) = "
                          f"{dp // max(p.ep, p.fsdp)}")
    if p.diloco_compression not in COMPRESSIONS:
        raise ConfigError(f"diloco-compression must be one of {', '.join(COMPRESSIONS)}, got {p.diloco_compression!r}")
    if spec.precision not in ("bf16", "fp8"):
        raise ConfigError(f"precision must be bf16 or fp8, got {spec.precision!r}")
    if spec.precision == "fp8" and a.fp8_tflops is None:
        raise ConfigError(f"{a.key} has no FP8 (the catalog's fp8_tflops is null); use --precision bf16")
    if spec.checkpoint_s and spec.checkpoint_interval_s and spec.checkpoint_interval_s < spec.checkpoint_s:
        raise ConfigError(f"checkpoint-interval-s ({spec.checkpoint_interval_s:g}) is shorter than one checkpoint "
                          f"({spec.checkpoint_s:g} s)")


def off_domain_share(dims: list[tuple[int, int]], domain: int) -> float:
    """The share of a collective's peers outside rank 0's scale-up domain. `dims` are the
    (count, stride) of the rank dimensions the collective spans; the domain holds ranks
    0..domain-1. For an all-to-all this is the share of bytes that leaves the domain; for a
    ring or a pipeline it approximates the share of hops that do."""
    total = math.prod(count for count, _ in dims)
    if total <= 1:
        return 0.0
    # Only positions below `domain` can be inside: enumerate those of each dimension.
    ranges = [[i * stride for i in range(min(count, -(-domain // stride)))] for count, stride in dims]
    inside = sum(1 for offsets in itertools.product(*ranges) if sum(offsets) < domain)
    return 1.0 - inside / total


@dataclass(frozen=True)
class _Layout:
    """The degrees and per-device shares that follow from a spec."""

    dp: int
    groups: int  # data-parallel copies of the experts (dp / ep)
    group_devices: int  # a replica group's devices: tp x pp x max(ep, fsdp)
    micro: float  # micro-batches (of spec.micro_batch sequences) per data-parallel rank and step
    tokens_rank: float  # tokens through one rank per step
    layers_stage: float
    dense: float  # parameters per device outside the routed experts, before FSDP shards them
    experts: float  # routed-expert parameters per device (expert parallelism splits them; FSDP does not)

    @property
    def params(self) -> float:
        return self.dense + self.experts


def _layout(spec: RunSpec) -> _Layout:
    s, p = spec.shape, spec.parallel
    dp = spec.devices // (p.tp * p.pp)
    return _Layout(dp=dp, groups=dp // p.ep, group_devices=p.tp * p.pp * max(p.ep, p.fsdp),
                   micro=spec.batch_tokens / (dp * spec.seq_len * spec.micro_batch),
                   tokens_rank=spec.batch_tokens / dp,
                   # MTP's parameters count with the dense ones (its layer sits on the last stage),
                   # its routed experts with the experts.
                   layers_stage=s.layers / p.pp,
                   dense=(s.dense_params + s.mtp_params - s.mtp_expert_params) / (p.tp * p.pp),
                   experts=(s.expert_params + s.mtp_expert_params) / (p.pp * p.ep))


def _memory(spec: RunSpec, lay: _Layout) -> dict:
    """Bytes per device: training state, activations, and what a checkpoint or heal moves."""
    p, s = spec.parallel, spec.shape
    weight_bytes, optimizer_bytes = WEIGHTS[spec.weights]
    # FSDP shards the weights and gradients too; the experts only without expert parallelism,
    # which splits them instead (as stalwart's training does: parallel/fsdp.py).
    held = lay.dense / p.fsdp + lay.experts / (p.fsdp if p.ep == 1 else 1)
    if p.fsdp > 1:  # FSDP (HSDP across its copies): the optimizer state is sharded as the weights are
        optimizer = optimizer_bytes * held
    elif p.strategy == "sync":  # ZeRO-1: optimizer state sharded over the ranks holding a copy
        optimizer = optimizer_bytes * (lay.dense / lay.dp + lay.experts / lay.groups)
    else:  # a replica group holds its whole state, so that it can heal a peer
        optimizer = optimizer_bytes * (lay.dense / max(p.ep, p.fsdp) + lay.experts / (p.fsdp if p.ep == 1 else 1))
    if p.strategy == "diloco":
        optimizer += DILOCO_BYTES * held
    state = (weight_bytes + GRAD_BYTES) * held + optimizer
    element = ACTIVATION_BYTES[spec.activation_dtype]
    tokens, in_flight = spec.micro_batch * spec.seq_len, min(p.pp, lay.micro)  # up to pp micro-batches on stage 1
    if spec.recompute == "full":
        # A layer's input per micro-batch in flight, plus one layer's working set (~17
        # elements per token and hidden unit, Korthikanti et al. 2022).
        activations = (in_flight * lay.layers_stage + 17) * tokens * s.hidden * element
    else:  # every layer's saved tensors, and (one stage) the output heads', log-probabilities in fp32
        heads = s.stored_head_elements() * element + s.stored_log_prob_elements() * 4 if p.pp == 1 else 0.0
        activations = (in_flight * lay.layers_stage * s.stored_layer_elements() * element + heads) * tokens
    activations /= p.tp  # split over tensor-parallel ranks (sequence parallelism outside attention)
    gathered = _gathered(spec, element)
    # Replica groups: after the backward pass (its activations and gathered layers freed), the
    # step's exchange packs what crosses groups (the gradients, or with FSDP the shards) into
    # one fp32 buffer beside them (training/exchange.py).
    exchange = GRAD_BYTES * held if p.strategy == "replicas" else 0.0
    return {"state": state, "activations": activations, "gathered": gathered, "exchange": exchange,
            "peak": state + max(activations + gathered, exchange), "checkpoint": state - GRAD_BYTES * held}


def _gathered(spec: RunSpec, element: int) -> float:
    """FSDP's transient bytes beyond the shards (0 without FSDP), as stalwart wraps the model
    (parallel/fsdp.py): the largest decoder layer gathered whole in the compute dtype, the next
    one prefetched, and its whole fp32 gradient before the reduce-scatter; the root's
    parameters, gathered for the whole step, and their whole gradient. The root is the
    embedding, head, final norm and MTP; with a pipeline, the first stage's embedding or the
    last stage's rest, whichever is larger. Experts that expert parallelism splits are never
    gathered."""
    p, s = spec.parallel, spec.shape
    if p.fsdp == 1:
        return 0.0
    layer = s.largest_layer(experts=p.ep == 1)
    embedding = s.vocab * s.hidden
    last = embedding + s.hidden + s.mtp_params - (s.mtp_expert_params if p.ep > 1 else 0.0)  # head, norm, MTP
    root = embedding + last if p.pp == 1 else max(embedding, last)
    return (layer * (2 * element + GRAD_BYTES) + root * (element + GRAD_BYTES)) / p.tp


def _step(spec: RunSpec, lay: _Layout) -> dict:
    """One step on the roofline, in seconds per device."""
    s, a, p = spec.shape, spec.accelerator, spec.parallel
    flops = spec.shape.flops_per_token(spec.seq_len) * spec.batch_tokens / spec.devices
    peak = (a.fp8_tflops if spec.precision == "fp8" else a.bf16_tflops) * 1e12
    compute = flops / (peak * spec.kernel_efficiency)
    memory = (3 * WEIGHT_BYTES * lay.params * lay.micro + OPTIMIZER_PASS_BYTES * lay.params) / (a.hbm_tb_s * 1e12)
    local = max(compute, memory)
    bubble = local * (p.pp - 1) / (p.virtual_stages * lay.micro)
    domain, stage_stride = a.scale_up_domain, p.tp * p.ep * p.pp

    def split(nbytes: float, dims: list[tuple[int, int]]) -> tuple[float, float]:
        off = off_domain_share(dims, domain)
        return nbytes * (1 - off), nbytes * off

    # Model-parallel traffic: tensor-parallel all-reduces (2 forward, 2 backward per layer),
    # expert all-to-alls (dispatch and combine, forward and backward), pipeline sends (one
    # per chunk boundary, forward and backward).
    traffic = [split(lay.layers_stage * 4 * 2 * (p.tp - 1) / p.tp * lay.tokens_rank * s.hidden * WEIGHT_BYTES,
                     [(p.tp, 1)])]
    if s.is_moe and p.ep > 1:
        traffic.append(split((s.moe_layers / p.pp) * 4 * lay.tokens_rank / p.tp * s.experts_per_token * s.hidden
                             * WEIGHT_BYTES * (p.ep - 1) / p.ep, [(p.ep, p.tp)]))
    if p.pp > 1:
        traffic.append(split(lay.micro * p.virtual_stages * 2 * spec.micro_batch * spec.seq_len * s.hidden
                             * WEIGHT_BYTES / p.tp,
                             [(p.pp, p.tp * p.ep)]))
    model_up, model_out = (sum(pair) for pair in zip(*traffic))
    # Gradient traffic (ring all-reduce, bf16): dense gradients over all data-parallel
    # ranks, expert gradients over the groups. DiLoCo: dense gradients over a group's ep
    # ranks every step; the whole shard's outer gradient across groups every H steps,
    # compressed and not overlapped.
    groups_dims = [(lay.groups, stage_stride)]
    outer_s = 0.0
    if p.strategy == "diloco":
        grad_up, grad_out = split(2 * (p.ep - 1) / p.ep * lay.dense * WEIGHT_BYTES, [(p.ep, p.tp)])
        outer_up, outer_out = split(exchange_sent(lay.params, p.diloco_compression, lay.groups)
                                    / p.diloco_h, groups_dims)
        outer_s = outer_up / (a.scale_up_gb_s * 1e9) + outer_out / (a.scale_out_gb_s * 1e9)
    else:
        dense_up, dense_out = split(2 * (lay.dp - 1) / lay.dp * lay.dense * WEIGHT_BYTES,
                                    [(p.ep, p.tp), (lay.groups, stage_stride)])
        expert_up, expert_out = split(2 * (lay.groups - 1) / lay.groups * lay.experts * WEIGHT_BYTES, groups_dims)
        grad_up, grad_out = dense_up + expert_up, dense_out + expert_out

    def exposed(model_bytes: float, grad_bytes: float, gb_s: float) -> tuple[float, float]:
        busy_model, busy_grad = model_bytes / (gb_s * 1e9), grad_bytes / (gb_s * 1e9)
        each = max(0.0, busy_model - spec.overlap * local) + max(0.0, busy_grad - 2 / 3 * local)
        return busy_model + busy_grad, max(each, busy_model + busy_grad - local)

    up_s, exposed_up = exposed(model_up, grad_up, a.scale_up_gb_s)
    out_s, exposed_out = exposed(model_out, grad_out, a.scale_out_gb_s)
    return {"flops": flops, "compute_s": compute, "memory_s": memory, "local_s": local, "bubble_s": bubble,
            "scale_up_s": up_s, "scale_out_s": out_s + outer_s, "exposed_scale_up_s": exposed_up,
            "exposed_scale_out_s": exposed_out + outer_s,
            "roofline_s": local + bubble + exposed_up + exposed_out + outer_s}


def _failures(spec: RunSpec, lay: _Layout, step_s: float, checkpoint_bytes: float) -> dict:
    """Checkpoint cost and interval, and what each failure costs, as a share of wall time."""
    p, a = spec.parallel, spec.accelerator
    mtbf_job_s = (spec.mtbf_hours or a.mtbf_hours) * 3600 / spec.devices
    checkpoint_s = spec.checkpoint_s or checkpoint_bytes / (spec.checkpoint_write_gb_s * 1e9)
    interval_s = spec.checkpoint_interval_s or young_daly_interval(checkpoint_s, mtbf_job_s)
    if p.strategy == "sync":
        recover_s = spec.restart_s
        lost_per_failure_s = spec.restart_s + (interval_s + checkpoint_s) / 2
    else:
        recover_s = spec.group_restart_s + checkpoint_bytes / (a.scale_out_gb_s * 1e9)  # restart, then heal
        # Per failure: everyone loses the step in flight; the group's share of the fleet is
        # out for its recovery (and, with DiLoCo, its local steps since the last sync).
        group_lost_s = recover_s + (p.diloco_h * step_s / 2 if p.strategy == "diloco" else 0.0)
        lost_per_failure_s = step_s + lay.group_devices / spec.devices * group_lost_s
    return {"mtbf_device_hours": mtbf_job_s * spec.devices / 3600, "mtbf_job_s": mtbf_job_s,
            "checkpoint_gb": checkpoint_bytes / 1e9, "checkpoint_s": checkpoint_s, "checkpoint_interval_s": interval_s,
            "checkpoint_rule": "given" if spec.checkpoint_interval_s else "young-daly", "recover_s": recover_s,
            "lost_per_failure_s": lost_per_failure_s, "lost_share": lost_per_failure_s / mtbf_job_s}


def estimate(spec: RunSpec) -> dict:
    """The plan, as the JSON `stalwart plan --json` prints."""
    validate_run_spec(spec)
    shape, device, par = spec.shape, spec.accelerator, spec.parallel
    lay = _layout(spec)
    steps = math.ceil(spec.tokens / spec.batch_tokens)
    memory = _memory(spec, lay)
    step = _step(spec, lay)
    bf16_peak = device.bf16_tflops * 1e12
    mfu_roofline = step["flops"] / (bf16_peak * step["roofline_s"])
    mfu = spec.mfu if spec.mfu is not None else mfu_roofline
    step_s = step["flops"] / (bf16_peak * mfu)
    scale = step_s / step["roofline_s"]  # a given MFU stretches the roofline's parts alike
    failures = _failures(spec, lay, step_s, memory["checkpoint"])

    productive_s = steps * step_s
    with_checkpoints_s = productive_s * (1 + failures["checkpoint_s"] / failures["checkpoint_interval_s"])
    warnings = []
    if spec.tokens < spec.batch_tokens:
        warnings.append(f"{spec.tokens:.4g} tokens are less than one batch: planned as one step")
    if lay.micro != int(lay.micro):
        warnings.append(f"{lay.micro:.3g} micro-batches per data-parallel rank: batch-tokens is not a multiple of "
                        f"dp x seq-len ({lay.dp} x {spec.seq_len})")
    if failures["lost_share"] >= 1:
        wall_s = None
        warnings.append(f"failures outpace recovery: a failure every {failures['mtbf_job_s']:.4g}s costs "
                        f"{failures['lost_per_failure_s']:.4g}s; the run never finishes")
    else:
        wall_s = with_checkpoints_s / (1 - failures["lost_share"])
    memory_gb = memory["peak"] / 1e9
    if memory_gb > device.hbm_gb:
        warnings.append(f"does not fit: {memory_gb:.0f} GB per device at its peak (state, activations, buffers) "
                        f"against {device.hbm_gb:g} GB of HBM; raise tp, pp or ep")
    # Where the wall time goes, per step: the bottleneck is the largest part.
    parts = {"compute": (step["local_s"] + step["bubble_s"]) * scale,
             "scale-up": step["exposed_scale_up_s"] * scale, "scale-out": step["exposed_scale_out_s"] * scale,
             "failures": (wall_s - productive_s) / steps if wall_s else math.inf}
    hours = wall_s * spec.devices / 3600 if wall_s else None
    failures.update(expected=wall_s / failures["mtbf_job_s"] if wall_s else None,
                    lost_s=wall_s - with_checkpoints_s if wall_s else None,
                    checkpointing_s=with_checkpoints_s - productive_s)
    return {
        "model": shape.name, "accelerator": device.key, "devices": spec.devices,
        "parallelism": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "fsdp": par.fsdp, "dp": lay.dp,
                        "virtual_stages": par.virtual_stages,
                        "strategy": par.strategy, "replica_groups": lay.groups, "group_devices": lay.group_devices,
                        **({"diloco_h": par.diloco_h, "diloco_compression": par.diloco_compression}
                           if par.strategy == "diloco" else {})},
        "precision": spec.precision, "weights": spec.weights, "recompute": spec.recompute,
        "activation_dtype": spec.activation_dtype, "micro_batch": spec.micro_batch,
        "tokens": steps * spec.batch_tokens, "seq_len": spec.seq_len, "batch_tokens": spec.batch_tokens,
        "steps": steps, "params_total": shape.total, "params_active": shape.active,
        "flops_per_token": shape.flops_per_token(spec.seq_len),
        "training_flops": shape.flops_per_token(spec.seq_len) * steps * spec.batch_tokens,
        "mfu": mfu, "mfu_source": "given" if spec.mfu is not None else "roofline", "mfu_roofline": mfu_roofline,
        "step_s": step_s,
        "step": {k: step[k] * scale for k in ("compute_s", "memory_s", "bubble_s", "scale_up_s", "scale_out_s",
                                              "exposed_scale_up_s", "exposed_scale_out_s")},
        "memory": {"state_gb": memory["state"] / 1e9, "activation_gb": memory["activations"] / 1e9,
                   "gathered_gb": memory["gathered"] / 1e9, "exchange_gb": memory["exchange"] / 1e9,
                   "peak_gb": memory_gb,
                   "hbm_gb": device.hbm_gb, "fits": memory_gb <= device.hbm_gb},
        "failures": failures,
        "productive_s": productive_s, "wall_s": wall_s, "days": wall_s / 86400 if wall_s else None,
        "device_hours": hours, "price_per_hour": spec.price_per_hour,
        "cost": hours * spec.price_per_hour if hours else None,
        "ettr": productive_s / wall_s if wall_s else 0.0, "bottleneck": max(parts, key=lambda k: parts[k]),
        "time_shares": {k: v * steps / wall_s for k, v in parts.items()} if wall_s else None,
        "warnings": warnings,
    }
