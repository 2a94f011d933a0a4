"""DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeek-V3 sec. 2.1.2).

Routing: sigmoid affinities s; the choice uses s + b, where b is a per-expert bias moved
after every step towards balance (aux-loss-free balancing: b_i += gamma * sign(mean load
- load_i)); the *weights* use s alone, so the bias decides who computes, never how much
they count. Experts are chosen inside the topk_group best of n_group groups (a group's
score is the sum of its two best experts); non-chosen groups are masked with -inf, as
DeepSeek does (masking with 0 lets a masked group win when every score is negative).

Dispatch sorts the (token, expert) pairs by expert and runs each expert once on its
contiguous slice: a Python loop over experts, never over tokens. A decode step, with only
a few pairs, gathers each pair's expert weights and runs three batched matmuls instead.
With expert parallelism (parallel/experts.py) the experts' weights are split over ranks
and `RoutedExperts.parallel` sends each pair to the rank that holds its expert.

A `RoutingTape` on a layer (DeepSeekForCausalLM.routing_tape) records the experts its
router picks in every forward and, when given a choice to replay, routes to those experts
instead: RL scores a completion with the routing it was sampled with (rl/routing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stalwart.model.config import ModelConfig


# Below this many (token, expert) pairs, copying each pair's expert weights is cheaper than
# sorting and a Python loop over experts (measured with bench/generate.py: decode steps).
GATHER_MAX_ASSIGNMENTS = 64


class DenseMLP(nn.Module):
    """SwiGLU feed-forward (also the shared experts, which are one wider SwiGLU)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Routing is computed in fp32 whatever the activation dtype (transformers keeps
        # gate.weight and the bias in fp32 for the same reason: near-ties flip in bf16).
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> (weights (N, k), expert ids (N, k), sigmoid scores (N, E)).
        `replay` (N, k): route to these experts instead of the ones the scores choose."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        idx = self.choose(scores) if replay is None else replay
        weights = scores.gather(1, idx)
        if self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.cfg.routed_scaling_factor, idx, scores

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The experts (N, k) that sigmoid scores (N, E) choose: the top k of scores + bias
        inside the topk_group best groups."""
        cfg = self.cfg
        E, G = cfg.n_routed_experts, cfg.n_group
        for_choice = scores + self.e_score_correction_bias
        if G > 1:
            group_scores = for_choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1], True)
            keep = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            for_choice = for_choice.masked_fill(~keep, float("-inf"))
        return for_choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]


@dataclass
class RoutingTape:
    """One MoE layer's routing, forward by forward: `chosen` gets the experts (N, k) its
    router chose in each forward (whether or not they were replayed); while `replay` is
    set (N, k), the layer routes to those experts instead, weighted by its own scores."""

    chosen: list[torch.Tensor] = field(default_factory=list)
    replay: torch.Tensor | None = None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked (E, out, in) weights; export splits them per expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, inter, H))
        self.up_proj = nn.Parameter(torch.empty(E, inter, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))
        self.parallel = None  # expert parallelism's dispatch, when the weights are split over ranks

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel.forward(self, x, weights, idx)
        if idx.numel() <= GATHER_MAX_ASSIGNMENTS:
            return self._forward_gathered(x, weights, idx)
        return self._forward_sorted(x, weights, idx)

    def _forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Few (token, expert) pairs (decoding): gather each pair's weights, three batched matmuls."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (N*k, 1, H)
        def pick(w: torch.Tensor) -> torch.Tensor:  # (N*k, in, out); index_select beats w[flat] here
            return w.index_select(0, flat).transpose(1, 2)

        h = F.silu(xs @ pick(self.gate_proj)) * (xs @ pick(self.up_proj))
        y = (h @ pick(self.down_proj)).view(N, k, -1)
        return (y * weights.unsqueeze(-1).to(x.dtype)).sum(1)

    def _forward_sorted(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Many pairs (training, prefill): sort by expert, one matmul chain per expert's slice."""
        E, k = self.gate_proj.shape[0], idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat, minlength=E).tolist()  # the one host sync per layer
        y = run_grouped(x[token_of], counts, self.gate_proj, self.up_proj, self.down_proj)
        y = y * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y)


def run_grouped(rows: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (counts[e] rows for expert e, in order) through their experts.
    The result always depends on `rows`, even when there are none, so that a backward pass
    reaches whatever produced them (expert parallelism's all-to-all, which every rank must
    join)."""
    outs = []
    for e, chunk in enumerate(rows.split(counts)):
        if chunk.shape[0] or (e == len(counts) - 1 and not outs):
            h = F.silu(chunk @ gate[e].T) * (chunk @ up[e].T)
            outs.append(h @ down[e].T)
    return torch.cat(outs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # Tokens routed to each expert since the last bias update (not saved: it is a
        # per-step statistic; the bias it produces is saved with the weights).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.tape: RoutingTape | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output and, in training, the sequence-wise balance loss (else None)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        tape = self.tape
        weights, idx, scores = self.gate(flat, None if tape is None else tape.replay)
        if tape is not None:
            tape.chosen.append(idx.detach() if tape.replay is None else self.gate.choose(scores.detach()))
        y = self.experts(flat, weights, idx).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        aux = None
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(idx.reshape(-1), minlength=self.cfg.n_routed_experts)
            if self.cfg.seq_aux_loss_alpha > 0:
                aux = self.sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1))
        return y, aux

    def sequence_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence (V3 eqs. 17-20), averaged over the batch."""
        E, k, T = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok, scores.shape[1]
        chosen = torch.zeros_like(scores).scatter_(-1, idx, 1.0)
        f = chosen.sum(1) * (E / (k * T))
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.cfg.seq_aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """b_i += gamma * sign(mean load - load_i), then reset the counter.

        `load` lets a caller pass the load summed over data-parallel replicas, so that
        every replica moves its bias identically.
        """
        load = self.expert_load if load is None else load
        if load.sum() > 0:
            self.gate.e_score_correction_bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)
        self.expert_load.zero_()
