"""The one buffer a replicated step all-reduces (a sum over the participants):

    [ gradients | has-gradient flag per parameter | loss, lm_loss, mtp_loss
      | expert load per MoE layer | per replica slot: compute seconds, member, non-finite
      | checkpoint due | per data shard: contributed, loader position ]

One collective per step instead of one per statistic; and because every replica then holds
the same numbers, every guard reaches the same verdict.

Which gradients go in is the caller's choice (training/step.py): every parameter's, summed
over every rank, in a job that is not sharded; none of FSDP2's in a plain torchrun launch,
whose backward pass reduced them already. In a sharded replica group the first `across`
parameters are this rank's shards (FSDP2's, and the experts' under expert parallelism),
each gradient already the mean over its group's ranks: they are summed with the same rank
of the other groups only (`across_only`, replication/group.py) and divided by the groups
that contributed; the rest are summed over every rank. A group with shards contributes all
of them or none (`every_rank`).

A rank whose own loss or gradients are not finite (a device producing NaN, NaN weights or
optimizer state) in a job of replica groups contributes nothing but its flags: its gradients, losses and expert loads
are left out of the sum, so the healthy participants still commit and the bad group heals
from them (training/step.py). Each contributing rank writes its loader position into its
shard's slot (integers split into two exactly representable float32 halves), which is how
every group keeps the job's data ledger (training/state.py). The lowest group's checkpoint
clock sets "checkpoint due", so that every group agrees on which steps are checkpointed
(the check before a checkpoint is a collective: all must take part).

A job of one process has nothing to exchange: `LocalExchange` answers the same questions
from the step's own tensors, without copying the gradients (that copy cost ~4% of a CPU
step of the tiny model). A parameter that got no gradient on any participant (an expert no
token was routed to) keeps grad None, as it would in one process, so AdamW skips it rather
than decaying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stalwart.data.loader import LOADER_STATE
from stalwart.parallel import is_dtensor
from stalwart.parallel.fsdp import local_part

_HALF = 1 << 24  # float32 holds every integer below 2**24 exactly
_SHARD_SLOT = 1 + 2 * len(LOADER_STATE)  # contributed flag, then (high, low) per position field


@dataclass
class StepExchange:
    buffer: torch.Tensor
    num_params: int
    grad_numel: int
    num_layers: int
    num_experts: int
    num_slots: int
    num_shards: int
    own_finite: bool
    across: int = 0  # the first `across` parameters are shards, summed across groups only
    across_only: int = 0  # ... which is the buffer's front up to here

    @classmethod
    def pack(cls, params: list[torch.Tensor], losses: torch.Tensor, loads: list[torch.Tensor], group, compute_s: float,
             *, shard: int, num_shards: int, position: dict[str, int], checkpoint_due: bool, contribute: bool,
             device: torch.device, across: int = 0) -> StepExchange:
        grads = [torch.zeros(local_part(p).numel(), device=device) if p.grad is None else
                 local_part(p.grad).reshape(-1).float() for p in params]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        n = group.num_replicas
        slots = torch.zeros(3 * n + 1 + _SHARD_SLOT * num_shards, device=device)
        buffer = torch.cat([*grads, has_grad, losses.to(device), *loads, slots])
        grad_numel = sum(g.numel() for g in grads)
        values = buffer[:grad_numel + len(params) + 3]
        # Without a peer group to heal from (plain torchrun), a rank's non-finite values go
        # into the sum: every rank sees it and the guard skips the step, as in one process.
        own_finite = contribute and (not group.heals or bool(torch.isfinite(values).all()))
        if across:  # each shard is a mean over the group's ranks: all of them or none
            own_finite = group.every_rank(own_finite)
        tail = buffer[buffer.numel() - slots.numel():]
        tail[group.replica] = compute_s
        tail[n + group.replica] = 1.0
        tail[3 * n] = float(checkpoint_due)
        if own_finite:
            base = 3 * n + 1 + _SHARD_SLOT * shard
            ledger = tail[base:base + _SHARD_SLOT]
            ledger[0] = 1.0
            for i, name in enumerate(LOADER_STATE):
                ledger[1 + 2 * i], ledger[2 + 2 * i] = divmod(position[name], _HALF)
        else:  # contribute nothing but the flags: the others' sum stays finite
            buffer[:buffer.numel() - slots.numel()] = 0.0
            tail[2 * n + group.replica] = 1.0
        return cls(buffer, len(params), grad_numel, len(loads), loads[0].numel() if loads else 0, n, num_shards,
                   own_finite, across, sum(g.numel() for g in grads[:across]))

    def unpack_gradients(self, params: list[torch.Tensor], contributors: int, groups: int = 1) -> None:
        """The summed gradients into the params' .grad (a sharded parameter's: into its
        shard), divided by the `contributors` (ranks), the shards by the `groups`."""
        flags = self.buffer[self.grad_numel:self.grad_numel + self.num_params].tolist()
        offset = 0
        for i, (p, flag) in enumerate(zip(params, flags)):
            n = local_part(p).numel()
            mean = self.buffer[offset:offset + n] / (groups if i < self.across else contributors)
            if flag <= 0:
                p.grad = None
            elif is_dtensor(p):
                if p.grad is None:  # no gradient on this group, some on another
                    p.grad = torch.zeros_like(p)
                shard = local_part(p.grad)
                shard.copy_(mean.view_as(shard))
            else:
                p.grad = mean.view_as(p).to(p.dtype)
            offset += n

    def _tail(self, start: int, length: int) -> torch.Tensor:
        base = self.grad_numel + self.num_params + start
        return self.buffer[base:base + length]

    def losses(self) -> torch.Tensor:
        return self._tail(0, 3).double().cpu()

    def expert_loads(self, num_layers: int) -> list[torch.Tensor]:
        loads = self._tail(3, self.num_layers * self.num_experts)
        return list(loads.view(self.num_layers, self.num_experts)) if self.num_layers else []

    def _slots(self) -> list[float]:
        start = 3 + self.num_layers * self.num_experts
        return self._tail(start, 3 * self.num_slots + 1 + _SHARD_SLOT * self.num_shards).cpu().tolist()

    def compute_times(self) -> dict[int, float]:
        """{replica: seconds of forward and backward (mean over its ranks)} for every
        participant of the step."""
        slots, n = self._slots(), self.num_slots
        return {r: slots[r] / slots[n + r] for r in range(n) if slots[n + r] > 0}

    def nonfinite_replicas(self) -> list[int]:
        """Replica groups with at least one rank whose own values were not finite."""
        slots, n = self._slots(), self.num_slots
        return [r for r in range(n) if slots[2 * n + r] > 0]

    def checkpoint_due(self) -> bool:
        return self._slots()[3 * self.num_slots] > 0

    def shard_positions(self) -> dict[int, dict[str, int]]:
        """{shard: loader position after this step's batch} for every contributing rank."""
        slots, base = self._slots(), 3 * self.num_slots + 1
        positions = {}
        for shard in range(self.num_shards):
            slot = slots[base + _SHARD_SLOT * shard:base + _SHARD_SLOT * (shard + 1)]
            if slot[0] > 0:
                positions[shard] = {name: int(slot[1 + 2 * i]) * _HALF + int(slot[2 + 2 * i])
                                    for i, name in enumerate(LOADER_STATE)}
        return positions


class LocalExchange:
    """The same accessors for a job without peers: nothing is copied or summed."""

    buffer = None
    own_finite = True  # a lone process's non-finite values are the guard's verdict, not a heal
    across_only = 0

    def __init__(self, losses: torch.Tensor, loads: list[torch.Tensor], compute_s: float, *, shard: int,
                 position: dict[str, int], checkpoint_due: bool) -> None:
        self._losses, self._compute_s, self._loads = losses, compute_s, loads
        self._shard, self._position, self._checkpoint_due = shard, position, checkpoint_due

    def unpack_gradients(self, params: list[torch.Tensor], contributors: int, groups: int = 1) -> None:
        pass

    def losses(self) -> torch.Tensor:
        return self._losses.double()

    def expert_loads(self, num_layers: int) -> list[torch.Tensor]:
        return self._loads

    def compute_times(self) -> dict[int, float]:
        return {0: self._compute_s}

    def nonfinite_replicas(self) -> list[int]:
        return []

    def checkpoint_due(self) -> bool:
        return self._checkpoint_due

    def shard_positions(self) -> dict[int, dict[str, int]]:
        return {self._shard: self._position}


def step_exchange(params: list[torch.Tensor], losses: torch.Tensor, loads: list[torch.Tensor], group,
                  compute_s: float, *, shard: int, num_shards: int, position: dict[str, int], checkpoint_due: bool,
                  device: torch.device, contribute: bool = True, across: int = 0) -> StepExchange | LocalExchange:
    """The exchange of one step's gradients (params' .grad), losses and expert `loads`;
    `position` is this shard's loader position after the step's batch. `contribute` False:
    this group's state is known bad; it joins the collective with its flags only, like a
    rank whose values are not finite. `across`: the first so many params are shards (above)."""
    if group.num_replicas == 1 and group.contributors == 1:
        return LocalExchange(losses, loads, compute_s, shard=shard, position=position, checkpoint_due=checkpoint_due)
    return StepExchange.pack(params, losses, loads, group, compute_s, shard=shard, num_shards=num_shards,
                             position=position, checkpoint_due=checkpoint_due, contribute=contribute,
                             device=device, across=across)
