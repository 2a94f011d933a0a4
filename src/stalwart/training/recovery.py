"""What each step outcome does (training/step.py), and the integrity checks between steps.

    committed  stragglers observed (and excluded when configured)
    failed     reported; replicas.max_failed_steps in a row while others hold the quorum
               (a partition of the data plane): this group leaves (EXIT_PARTITIONED), is
               restarted, rejoins and heals
    skipped    reported with this group's fingerprint; guards.max_uncommitted_steps (M)
               in a row: fingerprints compared; 2M: rollback to the last checkpoint; 3M: stop
    rollback   every group loads the last checkpoint and reads on past the offending data
    corrupt    reported; this group heals at the next quorum; corrupt again in the step right
               after a heal: the process exits (EXIT_NONFINITE) and is restarted

Before a step, after its quorum (so that every participant holds the same state and
takes part): every guards.fingerprint_every steps, while steps are being skipped, and
immediately before every checkpoint, the groups compare fingerprints of weights and
optimizer state. A group outside a strict majority trains that step without contributing
and heals; with no majority (two groups, a tie) every group rolls back to the newest
checkpoint, the last state on which the fingerprints agreed. The checkpoint is written by
the lowest group of the majority, so a corrupt group never writes one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from stalwart import checkpoint as ckpt
from stalwart.device import rng_state
from stalwart.errors import TrainingStopped
from stalwart.guards import NONFINITE, REBASED, StragglerTracker, odd_ones_out
from stalwart.run.goodput import CheckpointClock
from stalwart.training.setup import Job
from stalwart.training.step import COMMITTED, CORRUPT, FAILED, ROLLED_BACK, SKIPPED, StepResult


class Excluded(Exception):
    """This replica group was reported as a straggler and guards.exclude_stragglers is on."""


class NonFiniteAfterHeal(Exception):
    """This group's own values are not finite right after a heal: its device is suspect."""


class Partitioned(Exception):
    """Every collective failed replicas.max_failed_steps times in a row."""


class Stalled(TrainingStopped):
    """No step committed for 3 x guards.max_uncommitted_steps attempts, after fingerprint
    checks and a rollback did not help: the run stops (exit code 1)."""


@dataclass(frozen=True)
class FingerprintCheck:
    prints: dict[int, int]  # {replica: fingerprint} of every participant
    odd: list[int]  # replicas outside the strict majority (all of them when there is none)
    resolved: bool  # a strict majority exists

    @property
    def writer(self) -> int | None:
        """The lowest replica of the majority: the one that may write a checkpoint."""
        return min(r for r in self.prints if r not in self.odd) if self.resolved else None


def compare_fingerprints(job: Job) -> FingerprintCheck | None:
    """Every participant's fingerprint of weights and optimizer state, each group's over all
    its ranks (one collective across groups); None when a peer left during the exchange."""
    if not job.replicated:  # nobody to compare with
        return FingerprintCheck({0: 0}, [], True)
    mine = job.group.group_fingerprint(job.state.fingerprint())  # a group's ranks hold different shards
    n = job.group.num_replicas
    slots = torch.zeros(2 * n, dtype=torch.int64)
    slots[job.group.replica], slots[n + job.group.replica] = mine, 1
    if not job.group.allreduce_across_groups(slots):
        return None
    values = slots.tolist()
    prints = {r: values[r] for r in range(n) if values[n + r]}
    odd, resolved = odd_ones_out(prints)
    return FingerprintCheck(prints, odd, resolved)


class Recovery:
    def __init__(self, job: Job) -> None:
        self.job = job
        g = job.cfg.guards
        self.stragglers = StragglerTracker(factor=g.straggler_factor, patience=g.straggler_patience)
        self.clock = CheckpointClock(job.cfg.checkpoint)
        self.failed_in_row = 0
        self.agreed_step = job.state.step  # the last step at which this group's state was known good

    # -- between steps -------------------------------------------------------------------

    def checks_due(self) -> bool:
        """From the train state alone, so that every participant agrees."""
        s, k, m = self.job.state, self.job.cfg.guards.fingerprint_every, self.job.cfg.guards.max_uncommitted_steps
        if s.checkpoint_due or (s.uncommitted and s.uncommitted == m):
            return True
        if not k or not self.job.replicated:
            return False
        return (s.uncommitted % k == 0) if s.uncommitted else (s.step > 0 and s.step % k == 0)

    def before_step(self, *, healed: bool) -> str:
        """Run the integrity checks that are due. Returns "train", "exclude" (train this
        step without contributing: this group heals after it) or "retry" (no step now:
        the checks' collective failed, or every group rolled back)."""
        job, state = self.job, self.job.state
        if healed:
            self.agreed_step = state.step
        if not self.checks_due():
            return "train"
        step = state.step
        check = compare_fingerprints(job)
        if check is None:
            return "retry"
        if state.uncommitted == job.cfg.guards.max_uncommitted_steps and job.group.is_lowest:
            job.run.event("stall", step=step, uncommitted=state.uncommitted, rung="fingerprints",
                          agree=not check.odd)
        if check.odd and job.group.replica == (check.writer if check.resolved else min(check.prints)):
            job.run.event("sdc_detected", step=step, replicas=check.odd, resolved=check.resolved,
                          fingerprints={str(r): f"{v:016x}" for r, v in check.prints.items()})
        if not check.resolved:
            self.rollback(step, data=True, reason="fingerprints differ with no majority")
            return "retry"
        if state.checkpoint_due:
            # Sharded, every rank gathers the state for the writer.
            if check.writer == job.group.replica and (job.run.writer or state.sharding is not None):
                self.save(step)
            else:
                self.clock.saved(None)
            state.checkpoint_due = False
        if job.group.replica in check.odd:
            # What this group committed since its state was last known good is lost with the heal.
            job.run.event("work_discarded", from_step=self.agreed_step, to_step=step, reason="fingerprint")
            job.group.force_heal()
            return "exclude"
        self.agreed_step = step
        return "train"

    def checkpoint_wanted(self, step: int) -> bool:
        """Whether this group asks for the step about to run to be checkpointed: the lowest
        group's clock decides for all (the exchange carries its answer)."""
        return self.job.group.is_lowest and self.clock.due(step, self.job.cfg.train.steps)

    def save(self, step: int) -> None:
        """Checkpoint the committed `step`: whole, by the writer; sharded, by every rank of
        the launch (each its own shards, the writer the rest)."""
        job = self.job
        t = time.perf_counter()
        if job.run.writer:
            for partial in ckpt.remove_partial(job.run.checkpoints, dead_writers_only=True):
                job.run.event("checkpoint_partial_removed", path=str(partial))
        keep = job.cfg.checkpoint.keep
        if job.state.sharding is not None:
            tensors, state = job.state.checkpoint_parts()
            path = ckpt.save_sharded(job.run.checkpoints, step, tensors,
                                     {**state, "rng": rng_state(job.info)} if job.run.writer else None, keep=keep,
                                     rank=job.ranks.rank, share=job.ranks.broadcast_text)
            if not job.run.writer:
                return
        else:
            if not job.run.writer:
                return
            state = job.state.state_dict()
            path = ckpt.save_checkpoint(job.run.checkpoints, step, state.pop("model"),
                                        {**state, "rng": rng_state(job.info)}, keep=keep)
        cost = self.clock.saved(time.perf_counter() - t)
        job.run.event("checkpoint", step=step, path=str(path), cost_s=round(cost, 4), **self.clock.describe())

    def rollback(self, from_step: int, *, data: bool, reason: str) -> bool:
        """Every group to the newest good checkpoint: weights, optimizer and counters; with
        `data` the ledger too (the data since is trained again), else the loaders read on
        past the offending batches."""
        job, guard = self.job, self.job.state.guard
        t = time.perf_counter()
        asked, guard.asked_rollback_at = guard.asked_rollback_at, None  # a grad-norm spike's rollback
        latest = job.load_latest_checkpoint()
        if latest is None:
            if job.group.is_lowest:
                job.run.event("rollback_unavailable", step=from_step, reason=f"{reason}; no checkpoint yet")
            return False
        job.state.load_checkpoint(latest, data=data)
        guard.rolled_back_at = asked  # not the checkpoint's: this rollback's (None for any other cause)
        job.group.set_step(job.state.step)
        if job.group.is_lowest:
            job.run.event("rollback", from_step=from_step, to_step=job.state.step, checkpoint=str(latest.path),
                          reason=reason, data_replayed=data, seconds=round(time.perf_counter() - t, 3))
        return True

    # -- after a step --------------------------------------------------------------------

    def after_step(self, result: StepResult, *, healed: bool) -> None:
        job, state, g = self.job, self.job.state, self.job.cfg.guards
        self.failed_in_row = self.failed_in_row + 1 if result.outcome == FAILED else 0
        if result.nonfinite and job.group.is_lowest:
            job.run.event("nonfinite_group", step=result.step, replicas=result.nonfinite)
        if result.outcome == COMMITTED:
            self._observe_stragglers(result)
            if result.verdict.kind == REBASED and job.group.is_lowest:
                job.run.event("spike_rebased", step=result.step, reason=result.verdict.reason)
        elif result.outcome == FAILED:
            job.run.event("step_failed", step=result.step, seconds=round(result.seconds, 3),
                          participants=job.group.participants, error=result.error)
            r = job.cfg.replicas
            # The lowest group stays (every rank of it: ranks of one group leave together).
            if job.replicated and self.failed_in_row >= r.max_failed_steps and job.group.participant != 0:
                raise Partitioned(f"{self.failed_in_row} collectives in a row failed (replicas.max_failed_steps "
                                  f"{r.max_failed_steps}); last: {result.error}")
        elif result.outcome == CORRUPT:
            job.run.event("step_corrupt", step=result.step, cause=result.verdict.kind, reason=result.verdict.reason,
                          healed_before=healed)
            if healed and result.verdict.kind == NONFINITE:
                raise NonFiniteAfterHeal(f"own values not finite at step {result.step}, right after a heal")
        elif result.outcome in (SKIPPED, ROLLED_BACK):
            job.run.event("step_skipped", step=result.step, guard=result.verdict.kind, reason=result.verdict.reason,
                          fingerprint=f"{state.fingerprint():016x}")
            if result.outcome == ROLLED_BACK:
                self.rollback(result.step - 1, data=False, reason=result.verdict.reason)
            m = g.max_uncommitted_steps
            if state.uncommitted == 2 * m:
                if job.group.is_lowest:
                    job.run.event("stall", step=result.step, uncommitted=state.uncommitted, rung="rollback")
                self.rollback(result.step - 1, data=False, reason=f"{state.uncommitted} steps without a commit")
            elif state.uncommitted >= 3 * m:
                job.run.event("stalled", step=result.step, uncommitted=state.uncommitted, reason=result.verdict.reason)
                raise Stalled(f"no step committed in {state.uncommitted} attempts after a fingerprint check and a "
                              f"rollback (guards.max_uncommitted_steps {m}); last: {result.verdict.reason}")

    def _observe_stragglers(self, result: StepResult) -> None:
        job, g = self.job, self.job.cfg.guards
        for slow in self.stragglers.observe(result.timings):
            if job.group.is_lowest:
                job.run.event("straggler", step=result.step, replica=slow, compute_s=round(result.timings[slow], 4),
                              median_s=round(statistics.median(result.timings.values()), 4),
                              excluded=g.exclude_stragglers)
            if slow == job.group.replica and g.exclude_stragglers:
                raise Excluded(f"replica {slow} is a straggler")
