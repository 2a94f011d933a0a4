"""The experts a completion was sampled with, kept to compare with or to replay when scoring.

A MoE policy's log-probability of a token depends on which experts each layer routed every
earlier position to. The sampler routes step by step with its KV cache; the trainer scores
the whole completion in one forward, and after its first update with changed weights: near
ties between experts flip, and the ratio pi/pi_old then mixes a change of routing into the
change of policy. RL therefore keeps, for every completion, the experts each MoE layer of
the sampler chose at every position (`sampled_routing`), measures how often the trainer
chooses otherwise (`mismatch`, the share of expert choices not among the sampled ones) and,
with `rl.routing_replay`, scores with the sampled experts instead (`replay`), so that the
ratio sees the weights change and nothing else.

A completion's routing is a tensor (layers, positions, k): position p is the token fed at
p (the prompt's, then the completion's but its last), whose output predicts token p + 1.
"""

from __future__ import annotations

import torch

from stalwart.model.moe import RoutingTape


def sampled_routing(tapes: list[RoutingTape], prompt_length: int, samples: int) -> list[torch.Tensor] | None:
    """Each sampled row's routing (layers, positions, k) from the tapes of one generate call
    on prompts of `prompt_length` tokens: the prefill's choice (prompts x prompt_length, k),
    shared by a prompt's `samples` rows, then one (rows, k) per decode step. None for a
    model without MoE layers."""
    if not tapes:
        return None
    per_layer = []
    for tape in tapes:
        prefill, decode = tape.chosen[0], tape.chosen[1:]
        prompt = prefill.view(-1, prompt_length, prefill.shape[-1]).repeat_interleave(samples, dim=0)
        per_layer.append(torch.cat([prompt, *(step[:, None] for step in decode)], dim=1))
    return list(torch.stack(per_layer, dim=1).cpu().unbind(0))


def replay(routing: list[torch.Tensor], positions: int, k: int) -> torch.Tensor:
    """One layer-major stack (layers, rows x positions, k) of the given rows' sampled experts
    at positions 0..positions-1; positions the sampler never reached (padding after a
    completion that ended before the longest) get experts 0..k-1, which no scored token sees."""
    layers = routing[0].shape[0]
    out = torch.arange(k).expand(len(routing), layers, positions, k).clone()
    for i, r in enumerate(routing):
        n = min(positions, r.shape[1])
        out[i, :, :n] = r[:, :n]
    return out.transpose(0, 1).reshape(layers, len(routing) * positions, k)


def mismatch(sampled: torch.Tensor, scored: torch.Tensor, scored_positions: torch.Tensor) -> tuple[int, int]:
    """(expert choices that differ, choices compared) between the sampler's and the
    trainer's routing, both (layers, rows x positions, k), over the positions where
    `scored_positions` (rows x positions,) is True: those whose output predicts a scored
    token. A choice differs when the trainer's expert is not among the sampler's k."""
    a, b = sampled[:, scored_positions], scored[:, scored_positions]
    kept = (b[..., :, None] == a[..., None, :]).any(-1)  # (layers, positions, k): k x k, not k x experts
    return int(kept.numel() - kept.sum()), kept.numel()
