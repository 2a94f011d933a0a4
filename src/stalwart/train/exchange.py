"""The one buffer a replicated step all-reduces (a sum over the participants):

    [ gradients | has-gradient flag per parameter | loss, lm_loss, mtp_loss
      | expert load per MoE layer | compute seconds per replica slot | member flag per slot ]

One collective per step instead of one per statistic; and because every replica then holds
the same numbers, every guard reaches the same verdict. A job of one process has nothing to
exchange: `LocalExchange` answers the same questions from the step's own tensors, without
copying the gradients (that copy cost ~4% of a CPU step of the tiny model). A parameter that got no gradient
on any participant (an expert no token was routed to) keeps grad None, as it would in one
process, so AdamW skips it rather than decaying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepExchange:
    buffer: torch.Tensor
    num_params: int
    grad_numel: int
    num_layers: int
    num_experts: int
    num_slots: int

    @classmethod
    def pack(cls, params: list[torch.Tensor], losses: torch.Tensor, moe_layers: list, group,
             compute_s: float) -> StepExchange:
        device = params[0].device
        grads = [torch.zeros(p.numel(), device=device) if p.grad is None else p.grad.reshape(-1).float()
                 for p in params]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        loads = [m.expert_load.float() for m in moe_layers]
        slots = torch.zeros(2 * group.num_replicas, device=device)
        slots[group.replica] = compute_s
        slots[group.num_replicas + group.replica] = 1.0
        buffer = torch.cat([*grads, has_grad, losses.to(device), *loads, slots])
        return cls(buffer, len(params), sum(g.numel() for g in grads), len(loads),
                   loads[0].numel() if loads else 0, group.num_replicas)

    def unpack_gradients(self, params: list[torch.Tensor], participants: int) -> None:
        flags = self.buffer[self.grad_numel:self.grad_numel + self.num_params].tolist()
        offset = 0
        for p, flag in zip(params, flags):
            n = p.numel()
            if flag > 0:
                p.grad = (self.buffer[offset:offset + n] / participants).view_as(p).to(p.dtype)
            else:
                p.grad = None
            offset += n

    def _tail(self, start: int, length: int) -> torch.Tensor:
        base = self.grad_numel + self.num_params + start
        return self.buffer[base:base + length]

    def losses(self) -> torch.Tensor:
        return self._tail(0, 3).double().cpu()

    def expert_loads(self, num_layers: int) -> list[torch.Tensor]:
        loads = self._tail(3, self.num_layers * self.num_experts)
        return list(loads.view(self.num_layers, self.num_experts)) if self.num_layers else []

    def compute_times(self) -> dict[int, float]:
        """{replica: seconds of forward and backward (mean over its ranks)} for every
        participant of the step."""
        slots = self._tail(3 + self.num_layers * self.num_experts, 2 * self.num_slots).cpu().tolist()
        n = self.num_slots
        return {r: slots[r] / slots[n + r] for r in range(n) if slots[n + r] > 0}


class LocalExchange:
    """The same accessors for a job without peers: nothing is copied or summed."""

    buffer = None

    def __init__(self, losses: torch.Tensor, moe_layers: list, compute_s: float) -> None:
        self._losses, self._compute_s = losses, compute_s
        self._loads = [m.expert_load.float() for m in moe_layers]

    def unpack_gradients(self, params: list[torch.Tensor], participants: int) -> None:
        pass

    def losses(self) -> torch.Tensor:
        return self._losses.double()

    def expert_loads(self, num_layers: int) -> list[torch.Tensor]:
        return self._loads

    def compute_times(self) -> dict[int, float]:
        return {0: self._compute_s}


def step_exchange(params: list[torch.Tensor], losses: torch.Tensor, moe_layers: list, group,
                  compute_s: float) -> StepExchange | LocalExchange:
    if group.num_replicas == 1 and group.contributors == 1:
        return LocalExchange(losses, moe_layers, compute_s)
    return StepExchange.pack(params, losses, moe_layers, group, compute_s)
