"""The training state that moves: what a checkpoint saves, what a healing replica group
receives from a peer, and what the silent-corruption check fingerprints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stalwart import checkpoint as ckpt
from stalwart.data.loader import PackedLoader
from stalwart.guards import SpikeGuard, fingerprint
from stalwart.model import DeepSeekForCausalLM
from stalwart.model_source import load_model_state


class Trainer:
    """The training state that checkpoints save and that a healing replica receives."""

    def __init__(self, model: DeepSeekForCausalLM, optimizer: torch.optim.Optimizer, loader: PackedLoader,
                 guard: SpikeGuard) -> None:
        self.model, self.optimizer, self.loader, self.guard = model, optimizer, loader, guard
        self.step, self.tokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(), "guard": self.guard.state_dict(),
                "step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_model_state(self.model, state["model"], Path("peer"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])

    def load_checkpoint(self, latest: ckpt.LoadedCheckpoint, *, loader: bool = True) -> dict[str, Any]:
        """Weights, optimizer and counters from a checkpoint (and the loader position unless a
        rollback keeps reading past the offending batches); returns its train state."""
        load_model_state(self.model, latest.model_state, latest.path)
        state = latest.train_state
        self.optimizer.load_state_dict(state["optimizer"])
        if loader:
            self.loader.load_state_dict(state["loader"])
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        self.step, self.tokens_seen = latest.step, int(state["tokens_seen"])
        return state

    def fingerprint(self) -> int:
        tensors = list(self.model.state_dict().values())
        for per_param in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return fingerprint(tensors)
