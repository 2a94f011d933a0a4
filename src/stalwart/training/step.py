"""One training step, which ends in exactly one outcome (docs/design.md, "The step"):

    committed  the collective succeeded, the guards passed, the vote said yes: the update
               is applied, the counters and the data ledger advance
    failed     the collective broke (a peer died, hung or is unreachable) or the vote said
               no: nothing changes; a broken collective keeps the step's forward and
               backward (`Computed`), which the next attempt sends again, else this
               shard's batch is drawn again
    skipped    a guard voted the step down everywhere (a non-finite sum, a spike): nothing
               changes, the batch counts as read (it is the offending data)
    rollback   repeated spikes: every group goes back to the last checkpoint
    corrupt    this group's own loss or gradients are not finite while the others' are: it
               contributed nothing, votes no, and heals from a healthy peer at the next
               quorum

`outcome_of` is the whole mapping from what a step saw to its outcome; recovery.py acts
on it. The step itself never sleeps, retries or escalates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stalwart.errors import first_line
from stalwart.faults import corrupt_gradients, inject
from stalwart.guards import NONFINITE, OK, ROLLBACK, Verdict
from stalwart.parallel.experts import clip_gradients
from stalwart.replication.group import LocalGroup, group_rank
from stalwart.training.exchange import step_exchange
from stalwart.training.optim import lr_at
from stalwart.training.setup import Job
from stalwart.training.state import TrainState

COMMITTED, FAILED, SKIPPED, ROLLED_BACK, CORRUPT = "committed", "failed", "skipped", "rollback", "corrupt"
INNER_GROUP = LocalGroup()  # a DiLoCo inner step's view: nobody else takes part
SDC = "sdc"  # the verdict on a group that trains a step without contributing, its fingerprint being odd


@dataclass
class StepResult:
    outcome: str
    step: int
    seconds: float
    verdict: Verdict = Verdict(OK)
    record: dict[str, Any] | None = None  # a committed step's metrics
    timings: dict[int, float] = field(default_factory=dict)  # {replica: compute seconds} when the collective worked
    nonfinite: list[int] = field(default_factory=list)  # replicas whose own values were not finite
    error: str | None = None  # why the collective failed
    kept: Computed | None = None  # a step whose collective failed, to be sent again


def outcome_of(*, collective_ok: bool, own_finite: bool, healthy: int, verdict: Verdict, voted: bool) -> str:
    """The outcome of a step from the collective's result, whether this group's own values
    were finite, how many ranks contributed finite values, the guards' verdict on the sum
    and this group's commit vote."""
    if not collective_ok:
        return FAILED
    if not own_finite:
        return CORRUPT if healthy else SKIPPED
    if verdict.kind == ROLLBACK:
        return ROLLED_BACK
    if not verdict.commit:
        return SKIPPED
    return COMMITTED if voted else FAILED


@dataclass
class Computed:
    """A step's forward and backward: what its exchange sends, the gradients being in the
    parameters' .grad. When the exchange fails (a peer died or hung) the step is kept: the
    next quorum sends it again instead of computing it again, as long as this group's
    weights were not replaced in between (a heal, a rollback)."""
    step: int
    losses: torch.Tensor  # loss, lm_loss, mtp_loss: means over the micro-batches
    loads: list[torch.Tensor]  # tokens routed to each expert, per MoE layer
    position: dict[str, int]  # this shard's loader position after the step's batch
    compute_s: float
    version: int  # the train state's version it was computed on
    sends: int = 0  # exchanges attempted with it

    def valid_for(self, step: int, state: TrainState) -> bool:
        return self.step == step and self.version == state.version


def compute(job: Job, step: int, *, slowed: bool) -> Computed:
    """Forward and backward of this shard's next batch (grad_accum micro-batches)."""
    cfg, state = job.cfg, job.state
    t0 = time.perf_counter()
    for moe in job.moe_layers:
        moe.expert_load.zero_()
    losses = torch.zeros(3)
    for _ in range(cfg.train.grad_accum):
        x, y = state.loader.next_batch()
        with job.autocast():
            out = job.forward(x.to(job.info.device), labels=y.to(job.info.device))
        (out.loss / cfg.train.grad_accum).backward()
        losses += torch.stack([out.loss.detach().float().cpu(), out.lm_loss.detach().float().cpu(),
                               torch.tensor(0.0) if out.mtp_loss is None else
                               out.mtp_loss.detach().float().cpu()]) / cfg.train.grad_accum
        del out  # the logits (B x T x vocab) must not live on into the next forward
    corrupt_gradients(step, job.params, job.moe_layers[0].experts.gate_proj if job.moe_layers else None)
    if slowed:
        time.sleep(2 * (time.perf_counter() - t0))
    return Computed(step, losses, [m.expert_load.float().clone() for m in job.moe_layers], state.loader.state_dict(),
                    time.perf_counter() - t0, state.version)


def train_step(job: Job, step: int, *, slowed: bool = False, checkpoint_due: bool = False,
               exclude_self: bool = False, kept: Computed | None = None, inner: bool = False) -> StepResult:
    """Forward and backward (or a step `kept` from a failed exchange), one exchange, the
    guards, the vote, and the update if committed. `exclude_self`: this group's state is
    known bad (a fingerprint outside the majority); it takes part in the collective without
    contributing and heals afterwards.

    A kept step's `step_s` is its compute plus this exchange: the failed exchange's wait is
    not work. `inner`: a DiLoCo inner step, this group's alone (among its own ranks, as a
    plain torchrun launch's step), whose batch the data ledger records only with the outer
    step (training/outer.py)."""
    cfg, state = job.cfg, job.state
    group = (job.ranks or INNER_GROUP) if inner else job.group
    across_groups = job.replicated and not inner
    t0 = time.perf_counter()
    lr = lr_at(step, cfg.train.steps, cfg.optim)
    for param_group in state.optimizer.param_groups:
        param_group["lr"] = lr
    work = kept if kept is not None else compute(job, step, slowed=slowed)
    work.sends += 1
    if not inner:
        inject("kill-in-exchange", step)
    experts = state.sharding.experts if state.sharding is not None else None
    if experts is not None and across_groups:  # sent across groups as shards: first the group's mean
        experts.reduce_gradients(group_rank()[1])  # never twice: only groups of one rank keep a step
    exchanged, across = _exchanged(job, across_groups)
    exchange = step_exchange(exchanged, work.losses, work.loads, group, work.compute_s, shard=state.loader.shard,
                             num_shards=state.loader.num_shards, position=work.position,
                             checkpoint_due=checkpoint_due, contribute=not exclude_self, device=job.info.device,
                             across=across)
    collective_ok = group.allreduce_sum(exchange.buffer, across_only=exchange.across_only)
    error = group.error()  # why the collective failed, before the vote adds its own
    verdict, grad_norm, healthy = Verdict(OK), float("nan"), 0
    positions: dict[int, dict[str, int]] = {}
    if collective_ok:
        positions = exchange.shard_positions()
        healthy = len(positions)  # ranks whose finite gradients are in the sum
        if exchange.own_finite and healthy:
            # Shards: each group's is a mean over its ranks, which contribute together.
            exchange.unpack_gradients(exchanged, healthy, groups=healthy // group_rank()[1])
            if experts is not None and not across_groups:
                experts.reduce_gradients(healthy)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = clip_gradients(job.params, clip)
            loss, lm_loss, mtp_loss = (exchange.losses() / healthy).tolist()
            verdict = state.guard.check(step, lm_loss, grad_norm)
        elif not healthy:
            verdict = Verdict(NONFINITE, "no participant has finite values")
    if not exchange.own_finite and healthy:  # this group's own state is the problem, not the sum
        verdict = Verdict(SDC, "fingerprint outside the majority") if exclude_self else \
            Verdict(NONFINITE, "own loss or gradients not finite")
    voted = group.should_commit(verdict.commit and exchange.own_finite, verdict.reason)
    outcome = outcome_of(collective_ok=collective_ok, own_finite=exchange.own_finite, healthy=healthy,
                         verdict=verdict, voted=voted)
    # Kept: a step whose collective failed (the sum has not touched .grad) on finite values of
    # its own, in a group of one rank (ranks of one group must agree on what they send).
    keep = outcome == FAILED and not collective_ok and exchange.own_finite and group_rank()[1] == 1
    computed_before = kept.compute_s if kept is not None else 0.0
    record = None
    if outcome == COMMITTED:
        state.changes += 1  # before the weights, moments and biases change in place
        state.optimizer.step()
        loads = exchange.expert_loads(len(job.moe_layers))
        imbalance = _imbalance(loads)  # before the bias update, which resets the counts
        for moe, load in zip(job.moe_layers, loads):
            moe.update_bias(load)
        state.step, state.tokens_seen = step, state.tokens_seen + job.tokens_per_batch * healthy
        state.uncommitted, state.checkpoint_due = 0, exchange.checkpoint_due()
        state.guard.accept(lm_loss, grad_norm)
        seconds = time.perf_counter() - t0 + computed_before
        record = {"step": step, "loss": lm_loss, "total_loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": job.tokens_per_batch * healthy / seconds, "step_s": seconds,
                  "tokens": state.tokens_seen, "participants": group.participants, "time": round(time.time(), 4)}
        if job.model.mtp:
            record["mtp_loss"] = mtp_loss
        if work.sends > 1:
            record["sends"] = work.sends
        if exchange.buffer is not None and group.participants > 1:  # a ring all-reduce's share
            n = group.participants
            record["bytes_sent"] = 2 * (n - 1) * exchange.buffer.numel() * exchange.buffer.element_size() // n
        if cfg.train.trace_data:
            record["data"] = {str(k): ":".join(str(v) for v in p.values()) for k, p in sorted(positions.items())}
        if imbalance is not None:
            record["expert_imbalance"] = imbalance
    else:
        for moe in job.moe_layers:
            moe.expert_load.zero_()
        if outcome in (SKIPPED, ROLLED_BACK):
            state.uncommitted += 1
    if not keep:
        state.optimizer.zero_grad(set_to_none=True)
    if not inner:  # an inner step's loader reads on; the outer step records where it got to
        if outcome != FAILED:
            state.record_shards(positions)  # every contributing shard's batch is consumed
        state.rewind_loader()  # this shard's batch again, unless it was consumed
    return StepResult(outcome, step, time.perf_counter() - t0 + computed_before, verdict, record,
                      exchange.compute_times() if collective_ok else {},
                      exchange.nonfinite_replicas() if collective_ok else [],
                      first_line(error),
                      kept=work if keep else None)


def _exchanged(job: Job, across_groups: bool) -> tuple[list[torch.Tensor], int]:
    """The parameters whose gradients the step's exchange carries, and how many of them, at
    the front, are shards that a replica group sends across groups only.

    Not sharded: every parameter. Within one launch (a plain torchrun launch, a DiLoCo
    inner step of a group's ranks): FSDP2's backward pass reduced its parameters over every rank already, and expert parallelism reduces the experts
    after the exchange; the rest go in. A sharded replica group: its shards (FSDP2's and the
    experts', each the mean over the group's ranks), then the rest."""
    sharding = job.state.sharding
    if sharding is None:
        return job.params, 0
    dense = sharding.data_parallel(job.params)  # all but the experts that expert parallelism splits
    rest = [] if sharding.fsdp else dense
    if not across_groups:
        return rest, 0
    shards = (sharding.experts.params if sharding.experts is not None else []) + (dense if sharding.fsdp else [])
    return shards + rest, len(shards)


def _imbalance(loads: list[torch.Tensor]) -> float | None:
    """Mean over MoE layers of max expert load / mean expert load (1.0 is perfect balance)."""
    ratios = [float(load.max() / load.mean()) for load in loads if load.sum() > 0]
    return sum(ratios) / len(ratios) if ratios else None


def slow_fault(step: int, slowed: bool) -> bool:
    """The `slow` fault, once fired, lasts."""
    return slowed or inject("slow", step)
