"""Sharding inside one torchrun launch (a plain one, or one replica group): FSDP2
(`parallel.fsdp`) shards parameters, gradients and AdamW's moments over the ranks, expert
parallelism (`parallel.ep`, parallel/experts.py) splits the routed experts; either, both
or neither.

`torch.distributed.fsdp.fully_shard` wraps each decoder layer and then the whole model,
on a mesh of the launch's ranks: `parallel.fsdp` ranks share one copy of the state (0:
all of them); with fewer than all, the launch is `ranks / fsdp` such copies, each
sharded `fsdp` ways (HSDP: gradients are reduced within a copy and averaged across
copies). Parameters stay fp32; with a bf16 compute dtype they are gathered in bf16 and
gradients reduced in fp32 (`MixedPrecisionPolicy`), except the MoE router's, which is
sharded on its own and computes in fp32 as it does without sharding (near-ties flip in
bf16). The backward pass reduce-scatters the gradients itself, averaged over every rank,
so the step's exchange carries only its statistics (training/exchange.py). With expert
parallelism the experts' weights are left out of FSDP: they are split already, and
their gradients are reduced by `ExpertParallel.reduce_gradients`.

Checkpoints of a sharded run are sharded (checkpoint.py, `save_sharded` and
`read_sharded`: each rank writes and reads its own shards, resharding on load), so a run
may resume on another layout; a whole checkpoint loads into a sharded run by `local`, which
cuts each tensor to this rank's shard. `full` gathers every sharded tensor whole to rank 0,
one at a time: the export calls it tensor by tensor as it writes each file
(export/hf.py). `place` cuts the initial weights, drawn whole, to this rank's part.

A heal moves shards, never whole tensors: rank i of a healing replica group receives
`parts` (rank i's shards, as they are) from rank i of a peer group of the same `layout`,
and `from_part` makes them its own without any collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from stalwart.parallel import is_dtensor
from stalwart.parallel.experts import ExpertParallel

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class Sharding:
    """The mesh a model was sharded on, and the conversions between whole and sharded state."""

    def __init__(self, model: torch.nn.Module, *, ranks: int, fsdp: int, ep: int, device: torch.device,
                 bf16: bool) -> None:
        self.rank = torch.distributed.get_rank()
        # What a peer's shards must have been cut with to be this rank's (a heal).
        self.layout = {"ranks": ranks, "rank": self.rank, "fsdp": fsdp, "ep": ep}
        self.experts = ExpertParallel(model, ranks=ranks, ep=ep, device=device) if ep > 1 else None
        self.fsdp = fsdp > 1  # the backward pass reduces the (other) gradients
        if self.fsdp:
            self._fully_shard(model, ranks=ranks, fsdp=fsdp, device=device, bf16=bf16)

    def _fully_shard(self, model: torch.nn.Module, *, ranks: int, fsdp: int, device: torch.device,
                     bf16: bool) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        ignored = set(self.experts.params) if self.experts is not None else None
        if fsdp == ranks:
            self.mesh = init_device_mesh(device.type, (fsdp,), mesh_dim_names=("shard",))
        else:
            self.mesh = init_device_mesh(device.type, (ranks // fsdp, fsdp), mesh_dim_names=("replicate", "shard"))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        router = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # the router stays fp32, as without sharding (model/moe.py)
                fully_shard(layer.mlp.gate, mesh=self.mesh, mp_policy=router)
            fully_shard(layer, mesh=self.mesh, mp_policy=policy, ignored_params=ignored)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, ignored_params=ignored)

    def data_parallel(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """`params` but the experts' that expert parallelism splits: those whose gradients
        are averaged over every rank (by the step's exchange, or by FSDP's backward)."""
        held = set() if self.experts is None else {id(p) for p in self.experts.params}
        return [p for p in params if id(p) not in held]

    def full(self, value: Any) -> Any:
        """`value` (a tensor, or dicts and lists of them) with every sharded tensor whole, on
        the CPU of rank 0 (the writer); the other ranks get None in their place. A
        collective: every rank calls it with the same structure. One tensor at a time is
        gathered, so no rank ever holds the whole state beside its shards but rank 0."""
        def whole(t: DTensor) -> torch.Tensor | None:
            gathered = t.full_tensor()  # every rank takes part
            return gathered.cpu() if self.rank == 0 else None

        return _map_sharded(value, whole)

    @staticmethod
    def place(param: torch.Tensor, whole: torch.Tensor) -> None:
        """Copy into `param` what this rank holds of `whole`, the same on every rank (the
        initial weights, `DeepSeekForCausalLM.materialize`): cut where `whole` is (the CPU),
        with no communication, so that only this rank's part reaches its device."""
        if is_dtensor(param):
            whole = _cut(whole, param.device_mesh, param.placements)
        local_part(param).copy_(whole)

    @staticmethod
    def local(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor as `like` holds it: this rank's shard when `like` is sharded (a
        collective: rank 0's tensor is scattered)."""
        if is_dtensor(like):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements)
        return whole

    @staticmethod
    def parts(value: Any) -> Any:
        """`value` (a tensor, or dicts and lists of them) with every sharded tensor replaced by
        this rank's shard, as it is (no copy): what a heal sends to the same rank of a peer."""
        return _map_sharded(value, lambda t: t.to_local().detach())

    @staticmethod
    def from_part(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's shard as the sharded tensor `like` is (no communication)."""
        if not is_dtensor(like):
            return part
        if part.shape != like.to_local().shape:
            raise ValueError(f"a shard of shape {tuple(part.shape)} where this rank holds {tuple(like.to_local().shape)}")
        return type(like).from_local(part.to(like.device, like.dtype), like.device_mesh, like.placements,
                                  run_check=False, shape=like.shape, stride=like.stride())

    def model_state(self, model: torch.nn.Module, given: dict[str, torch.Tensor], *,
                    parts: bool = False) -> dict[str, torch.Tensor]:
        """A whole state (or, `parts`, this rank's shards of one) as the model holds it."""
        current, cut = model.state_dict(), self.from_part if parts else self.local
        return {k: cut(v, current[k]) if k in current else v for k, v in given.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer, given: dict[str, Any], *,
                        parts: bool = False) -> dict[str, Any]:
        """optimizer.state_dict()'s form (states keyed by parameter index), whole or (`parts`)
        this rank's shards, with every moment as its parameter is held."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cut = self.from_part if parts else self.local
        state = {}
        for index, per_param in given["state"].items():
            param = params[int(index)]
            state[index] = {k: cut(v, param) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                            for k, v in per_param.items()}
        return {**given, "state": state}


def _cut(whole: torch.Tensor, mesh: Any, placements: tuple) -> torch.Tensor:
    """This rank's part of `whole` as a DTensor with `placements` on `mesh` holds it: Shard
    dimensions split as torch.chunk splits them (as DTensor and FSDP2 do, an empty part past
    the last chunk), Replicate ones kept whole."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if not all(type(p) in (Shard, Replicate) for p in placements):  # any other: DTensor's own cut
        return distribute_tensor(whole, mesh, placements, src_data_rank=None).to_local()
    coordinate = mesh.get_coordinate()
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(whole, mesh.size(dim), dim=placement.dim)
            index = coordinate[dim]
            whole = chunks[index] if index < len(chunks) else whole.narrow(placement.dim, 0, 0)
    return whole


def _map_sharded(value: Any, fn: Callable[[DTensor], Any]) -> Any:
    """`value` (a tensor, or dicts and lists of them) with fn(t) for every sharded tensor t."""
    if is_dtensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_sharded(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_sharded(v, fn) for v in value]
    return value


def whole_value(t: torch.Tensor) -> float:
    """A scalar tensor's value (a sharded gradient's norm is a DTensor)."""
    return float(t.full_tensor() if is_dtensor(t) else t)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: its shard when sharded (a view: writing to it writes the
    shard), else the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor (a fingerprint of what this rank holds)."""
    return [local_part(t) for t in tensors]
