"""Expert parallelism inside one torchrun launch or replica group (`parallel.ep`): the
routed experts of every MoE layer split over `ep` ranks.

The launch's ranks form groups of `ep` consecutive ranks; rank j of a group holds experts
[j E / ep, (j + 1) E / ep) of every MoE layer, stored as a DTensor sharded on the expert
dimension (replicated across the groups when the launch has more ranks than `ep`), so that
checkpoints, fingerprints and the export see the whole tensors as they do with FSDP
(parallel/fsdp.py). Everything else (attention, shared experts, router, embeddings) stays
data parallel or FSDP-sharded, and every rank trains on its own batch.

Each MoE layer's forward, on every rank of a group:

1. route its own tokens (the router is whole on every rank);
2. send each (token, expert) pair to the rank holding the expert, with `all_to_all`
   (first the counts per expert, then the rows);
3. run its experts on what it received, grouped by expert;
4. send the results back with the reverse `all_to_all` and combine them with the routing
   weights, as without expert parallelism.

The backward pass runs the same two exchanges the other way, so an expert's gradient is
the sum over the group's batches. `reduce_gradients` adds the other groups' (one
all-reduce over the ranks that hold the same experts) and divides by the ranks that
contributed, which is the data-parallel mean. Expert loads are counted per global expert
from each rank's own routing and summed in the step's exchange, so the aux-loss-free bias
moves on the global load, the same on every rank.

Every rank of a group must run the same number of MoE forwards (and backwards): the
exchanges are collectives. Training does; evaluation generates in lockstep, as with FSDP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from stalwart.model.moe import RoutedExperts, run_grouped
from stalwart.parallel import is_dtensor

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return out, None, None, None


class ExpertParallel:
    """The experts of every MoE layer of `model` split over groups of `ep` ranks."""

    def __init__(self, model: torch.nn.Module, *, ranks: int, ep: int, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        self.ep = ep
        if ep == ranks:
            self.mesh = init_device_mesh(device.type, (ep,), mesh_dim_names=("ep",))
            placements = [Shard(0)]
            self.replicas = None
        else:
            self.mesh = init_device_mesh(device.type, (ranks // ep, ep), mesh_dim_names=("ep_replicate", "ep"))
            placements = [Replicate(), Shard(0)]
            self.replicas = self.mesh.get_group("ep_replicate")
        self.group = self.mesh.get_group("ep")
        self.params: list[torch.nn.Parameter] = []
        for experts in (m for m in model.modules() if isinstance(m, RoutedExperts)):
            for name in EXPERT_WEIGHTS:
                whole = getattr(experts, name)
                sharded = torch.nn.Parameter(distribute_tensor(whole.detach(), self.mesh, placements))
                setattr(experts, name, sharded)
                self.params.append(sharded)
            experts.parallel = self

    def forward(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), the routing weights and global expert ids (N, k) -> (N, hidden)."""
        # Cast where FSDP's mixed precision gave the activations another dtype than these
        # weights, which it does not hold.
        gate, up, down = (getattr(experts, name).to_local().to(x.dtype) for name in EXPERT_WEIGHTS)
        local, k = gate.shape[0], idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # by expert, and so by the rank that holds it
        token_of = order // k
        counts = torch.bincount(flat, minlength=local * self.ep)
        received = torch.empty_like(counts)  # [source rank][my expert]: rows it sends me
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, local)
        send, receive = counts.view(self.ep, local).sum(1).tolist(), received.sum(1).tolist()
        rows = _AllToAll.apply(x[token_of], send, receive, self.group)
        # The rows come by source rank, then by expert: group them by expert for the matmuls.
        expert_of = torch.arange(local, device=x.device).repeat(self.ep).repeat_interleave(received.reshape(-1))
        by_expert = expert_of.argsort(stable=True)
        out = run_grouped(rows[by_expert], received.sum(0).tolist(), gate, up, down)
        out = out[by_expert.argsort()]  # back to the order they came in
        y = _AllToAll.apply(out, receive, send, self.group) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y)

    @torch.no_grad()
    def reduce_gradients(self, contributors: int) -> None:
        """Each expert's gradient as the mean over every rank's batch: the sum over the
        other groups added (the backward pass summed this group's), divided by the ranks
        that contributed."""
        for p in self.params:
            if p.grad is None:
                # Not reached in training: every rank's backward passes through the exchanges,
                # which give each local expert weight a gradient (zero rows included). Were
                # it reached, a zero is what the other groups' sum needs; unlike data
                # parallelism's None, AdamW then decays these experts this step.
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            if self.replicas is not None:
                dist.all_reduce(local, group=self.replicas)
            local.div_(contributors)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over gradients that may be split over different
    meshes (FSDP's and expert parallelism's) or whole: the norm over every rank's part of
    every gradient, the same on every rank. Non-finite: reported, nothing scaled."""
    from stalwart.parallel.fsdp import whole_value

    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if is_dtensor(p.grad) else None, []).append(p)
    if len(by_mesh) <= 1:
        return whole_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = math.sqrt(sum(whole_value(torch.nn.utils.get_total_norm([p.grad for p in group])) ** 2
                          for group in by_mesh.values()))
    scale = max_norm / (total + 1e-6)
    if math.isfinite(total) and scale < 1:
        for group in by_mesh.values():
            torch._foreach_mul_([p.grad for p in group], scale)
    return total
