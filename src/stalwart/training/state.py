"""The training state that moves: what a checkpoint saves, what a healing replica group
receives from a peer, and what the silent-corruption check fingerprints.

The data ledger (`shards`) is the position of every data shard of the job as of the last
step whose exchange succeeded: each replicated step carries every contributing rank's
loader position (training/exchange.py), and every group records all of them. A group that
heals, restarts or resumes takes its own shard's position from the ledger, never a peer's
loader: no batch is trained twice and none is skipped (docs/design.md, "Data").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stalwart import checkpoint as ckpt
from stalwart.data.loader import PackedLoader
from stalwart.errors import ConfigError
from stalwart.guards import SpikeGuard, fingerprint
from stalwart.model import DeepSeekForCausalLM
from stalwart.model_source import load_model_state
from stalwart.parallel.fsdp import Sharding, local_tensors

if TYPE_CHECKING:
    from stalwart.training.outer import OuterState


class TrainState:
    """Weights, optimizer, this shard's loader, the spike guard, the data ledger and the
    counters of one process."""

    def __init__(self, model: DeepSeekForCausalLM, optimizer: torch.optim.Optimizer, loader: PackedLoader,
                 guard: SpikeGuard, sharding: Sharding | None = None) -> None:
        self.model, self.optimizer, self.loader, self.guard = model, optimizer, loader, guard
        self.sharding = sharding  # FSDP2 (parallel/fsdp.py): weights and moments are this rank's shards
        self.step, self.tokens_seen = 0, 0
        # Identical on every participant (they follow from the same sums) and carried by a
        # heal, so that every group takes the same extra collectives at the same points:
        self.uncommitted = 0  # consecutive step attempts a guard voted down everywhere
        self.checkpoint_due = False  # the committed step is to be checkpointed
        self.shards: list[dict[str, int]] = [loader.state_dict() for _ in range(loader.num_shards)]
        # This process's own count of the times weights and optimizer were replaced (a heal,
        # a checkpoint loaded): gradients computed before a replacement are void.
        self.version = 0
        # Raised before any in-place change of what a heal serves (a committed step, a load),
        # so that the heal server never signs a stream that overlapped one (replication/transport.py).
        self.changes = 0
        self.outer: OuterState | None = None  # DiLoCo's global state (training/outer.py)

    def state_dict(self, *, heal: bool = False) -> dict[str, Any]:
        """With DiLoCo, the global state of the last outer step, never this group's mid-round
        weights: a group that heals from it takes part in the outer step as the others do.

        Sharded (a heal only: checkpoints take `checkpoint_parts`): this rank's own shards and
        their layout, which the same rank of a healing peer receives. A heal's
        tensors are the live ones, streamed without a copy (replication/transport.py):
        with DDP they change only after a step the healing peer takes part in. DiLoCo's
        inner steps may run while a heal is served (its exchange overlaps them), so there a
        heal is a snapshot."""
        state = {"model": self.model.state_dict() if self.outer is None else self.outer.global_model_state(self.model),
                 "optimizer": self.optimizer.state_dict(), "shards": [dict(s) for s in self.shards],
                 "guard": self.guard.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
                 "uncommitted": self.uncommitted, "checkpoint_due": self.checkpoint_due}
        if self.outer is not None:
            state.update(self.outer.progress())
            state["outer"] = self.outer.state_dict()
        if self.sharding is not None:  # a sharded checkpoint is `checkpoint_parts`
            assert heal, "a sharded state is checkpointed with checkpoint_parts"
            state["model"], state["optimizer"] = self.sharding.parts(state["model"]), \
                self.sharding.parts(state["optimizer"])
            state["layout"] = dict(self.sharding.layout)
        return _snapshot(state) if heal and self.outer is not None else state

    def checkpoint_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A sharded checkpoint (checkpoint.save_sharded): the tensors each rank writes its
        shards of (the model's, and AdamW's moments as `optimizer.INDEX.NAME`; with DiLoCo,
        G as the model and the outer momentum), and the train state rank 0 writes (the rest;
        `moments` names what was left out of it)."""
        model = self.model.state_dict() if self.outer is None else self.outer.global_model_state(self.model)
        state = {"model": model, "optimizer": self.optimizer.state_dict(),
                 "shards": [dict(s) for s in self.shards], "guard": self.guard.state_dict(), "step": self.step,
                 "tokens_seen": self.tokens_seen, "uncommitted": self.uncommitted,
                 "checkpoint_due": self.checkpoint_due}
        tensors = {f"model.{name}": t for name, t in state.pop("model").items()}
        optimizer, kept, moments = state["optimizer"], {}, {}
        for index, per_param in optimizer["state"].items():
            split = {k for k, v in per_param.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            tensors.update({f"optimizer.{index}.{k}": per_param[k] for k in sorted(split)})
            kept[index] = {k: v for k, v in per_param.items() if k not in split}
            moments[index] = sorted(split)
        state["optimizer"], state["moments"] = {**optimizer, "state": kept}, moments
        if self.outer is not None:
            momenta, state["outer"] = self.outer.checkpoint_parts()
            state.update(self.outer.progress())
            tensors.update(momenta)
        return tensors, state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A healthy peer's state (a heal, `state_dict(heal=True)` of the same rank of its
        group): its weights, optimizer and ledger; this shard's loader goes to the ledger's
        position for it."""
        layout = state.get("layout")
        mine = None if self.sharding is None else self.sharding.layout
        if layout != mine:
            raise ConfigError(f"a peer sent the state of layout {layout} to a rank of layout {mine}: every group "
                              "must shard alike (the same parallel.* and replicas.ranks_per_group)")
        self._replace()
        self._load_weights(state["model"], state["optimizer"], Path("peer"), parts=layout is not None)
        self.guard.load_state_dict(state["guard"])
        self._load_ledger(state["shards"], "a peer's state")
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.uncommitted, self.checkpoint_due = int(state["uncommitted"]), bool(state["checkpoint_due"])
        self._load_outer(state)

    def load_checkpoint(self, latest: ckpt.LoadedCheckpoint, *, data: bool = True) -> dict[str, Any]:
        """Weights, optimizer and counters from a checkpoint, and the ledger unless a
        rollback keeps reading past the offending batches; returns its train state."""
        self._replace()
        state = latest.train_state
        if latest.sharded:
            self._read_shards(latest.path, state)
        else:
            self._load_weights(latest.model_state, state["optimizer"], latest.path)
        if data:
            self._load_ledger(state["shards"], f"checkpoint {latest.path}")
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        self.step, self.tokens_seen = latest.step, int(state["tokens_seen"])
        self.checkpoint_due = False
        self._load_outer(state, whole=not latest.sharded)
        return state

    def _load_weights(self, model: dict[str, torch.Tensor], optimizer: dict[str, Any], where: Path, *,
                      parts: bool = False) -> None:
        """Whole weights and optimizer state, cut to this rank's shards when sharded; or
        (`parts`) this rank's shards already."""
        if self.sharding is not None:
            model, optimizer = self.sharding.model_state(self.model, model, parts=parts), \
                self.sharding.optimizer_state(self.optimizer, optimizer, parts=parts)
        load_model_state(self.model, model, where)
        self.optimizer.load_state_dict(optimizer)

    def _read_shards(self, path: Path, state: dict[str, Any]) -> None:
        """Weights and AdamW's moments from a sharded checkpoint, read into this process's
        own tensors in whatever layout it has (every rank takes part when it is sharded)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        moments = {int(i): {name: torch.zeros_like(params[int(i)]) for name in names}
                   for i, names in state["moments"].items()}
        targets = {f"model.{name}": t for name, t in self.model.state_dict().items()}
        targets.update({f"optimizer.{i}.{name}": t for i, per_param in moments.items() for name, t in per_param.items()})
        momenta = self.outer.momentum_targets(state["outer"]) if self.outer is not None and "outer" in state else {}
        ckpt.read_sharded(path, {**targets, **momenta}, collective=self.sharding is not None)
        if momenta:
            state["outer"] = self.outer.with_momenta(state["outer"], momenta)
        optimizer = state["optimizer"]
        self.optimizer.load_state_dict({**optimizer, "state": {
            int(i): {**per_param, **moments.get(int(i), {})} for i, per_param in optimizer["state"].items()}})

    def _replace(self) -> None:
        """The weights are about to be replaced: gradients computed on them are void (and
        freed before the new state arrives)."""
        self.version += 1
        self.changes += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _load_outer(self, state: dict[str, Any], *, whole: bool = False) -> None:
        """The model was just loaded with a global state: DiLoCo takes it as G (a state
        without an outer optimizer, a DDP checkpoint, starts a fresh one). `whole`: from a
        whole checkpoint (its outer momentum is cut to this rank's shards)."""
        if self.outer is not None:
            self.outer.load_state_dict(state.get("outer"), step=self.step, tokens_seen=self.tokens_seen,
                                       whole=whole and self.sharding is not None)

    def _load_ledger(self, shards: list[dict[str, Any]], source: str) -> None:
        if len(shards) != self.loader.num_shards:
            raise ConfigError(f"{source} has {len(shards)} data shards but this job has {self.loader.num_shards} "
                              f"(the ranks of a launch, or replicas.count x replicas.ranks_per_group, cannot change on --resume)")
        self.shards = [{k: int(v) for k, v in s.items()} for s in shards]
        self.rewind_loader()

    def rewind_loader(self) -> None:
        """This shard's loader back to the ledger: the batch of a step that did not count is
        drawn again."""
        own = self.shards[self.loader.shard]
        if self.loader.state_dict() != own:
            self.loader.load_state_dict(own)

    def record_shards(self, positions: dict[int, dict[str, int]]) -> None:
        """The positions of the shards that took part in a step whose exchange succeeded."""
        for shard, position in positions.items():
            self.shards[shard] = position

    def fingerprint(self) -> int:
        """Of weights and optimizer state; with DiLoCo, of what every group must agree on:
        the global state and the outer optimizer (inner weights and AdamW are each group's own)."""
        if self.outer is not None:
            return fingerprint(self.outer.global_tensors())
        tensors = list(self.model.state_dict().values())
        for per_param in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return fingerprint(local_tensors(tensors))  # sharded: of this rank's shards


def _snapshot(value: Any) -> Any:
    """`value` with every tensor copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value
