"""Everything a training process builds before its first step, in one `Job`.

Everything that can reject the input (device, data files, the split, the shape of a
torchrun launch, a job secret) is checked before the run directory is touched; then
config.json is written first, so that from there on the folder is a run `--resume` can
continue.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stalwart import checkpoint as ckpt
from stalwart.config import RunConfig
from stalwart.data.loader import PackedLoader
from stalwart.data.sources import documents, prepare_tokenizer
from stalwart.data.tasks import make_problem
from stalwart.device import (DeviceInfo, autocast_dtype, enable_determinism, resolve_device, seed_everything,
                             set_rng_state)
from stalwart.errors import ConfigError
from stalwart.fsutil import atomic_write_bytes
from stalwart.faults import arm_signal_faults, set_replica
from stalwart.guards import SpikeGuard
from stalwart.export.hf import load_folder_weights
from stalwart.model import DeepSeekForCausalLM
from stalwart.parallel.fsdp import Sharding, local_tensors
from stalwart.replication.group import (AGENT_FILE, LocalGroup, RanksGroup, TorchFTGroup, group_rank,
                                       join_ranks, torchrun_agent)
from stalwart.replication.protocol import start_together
from stalwart.run.rundir import RunDir
from stalwart.training.optim import build_optimizer
from stalwart.training.state import TrainState


@dataclass
class Replica:
    """Where this process sits in a replicated job: None for a single-process run."""
    replica: int
    lighthouse: str
    host: str
    secret: bytes


@dataclass
class Job:
    """One training process: its config, device, run directory, model, state and group."""
    cfg: RunConfig
    info: DeviceInfo
    run: RunDir
    tokenizer: Any
    model: DeepSeekForCausalLM
    forward: Callable[..., Any]  # the model, or its torch.compile'd form
    state: TrainState
    group: LocalGroup | RanksGroup | TorchFTGroup
    autocast: Callable[[], Any]
    compute_dtype: str
    quiet: bool
    ranks: RanksGroup | None  # this launch's ranks when there are several (a torchrun launch, a replica group's)
    params: list[torch.Tensor] = field(default_factory=list)
    moe_layers: list = field(default_factory=list)

    @property
    def replicated(self) -> bool:
        """Part of a job of replica groups (a Lighthouse), not one process or one torchrun."""
        return not isinstance(self.group, LocalGroup)

    @property
    def tokens_per_batch(self) -> int:
        """Tokens one rank trains per step."""
        return self.cfg.train.batch_size * self.cfg.data.seq_len * self.cfg.train.grad_accum

    def join_quorum(self) -> None:
        """The group's next quorum; a `heal` event when this group received a peer's state
        (with DiLoCo, the outer steps it now holds)."""
        t0 = time.perf_counter()
        self.group.start_step()
        if self.group.healed:
            outer = {} if self.state.outer is None else {"round": self.state.outer.rounds}
            self.run.event("heal", step=self.state.step, seconds=round(time.perf_counter() - t0, 3),
                           bytes=self.group.healed_bytes, bytes_in_place=self.group.healed_in_place, **outer)

    def load_latest_checkpoint(self) -> ckpt.LoadedCheckpoint | None:
        """The newest good checkpoint. In a torchrun launch (or a replica group of several
        ranks), the one rank 0 found, on every rank: ranks that each looked for themselves
        could load different ones (a stale listing on shared storage, a node that does not
        see the run directory), and a sharded load is a collective every rank must take
        part in with the same state."""
        group = self.ranks
        if group is None:
            return ckpt.load_latest(self.run.checkpoints, on_corrupt=self.on_corrupt)
        latest = ckpt.load_latest(self.run.checkpoints, on_corrupt=self.on_corrupt) if group.rank == 0 else None
        step = group.broadcast(-1 if latest is None else latest.step)
        if group.rank != 0 and step >= 0:
            try:
                latest = ckpt.load_checkpoint(self.run.checkpoints / ckpt.step_dir_name(step))
            except ckpt.CheckpointError:
                latest = None
        unreadable = [r for r, bad in enumerate(group.gather(int(step >= 0 and latest is None))) if bad]
        if unreadable:
            raise ConfigError(f"rank(s) {', '.join(map(str, unreadable))} cannot read checkpoint "
                              f"{ckpt.step_dir_name(step)} that rank 0 loads: every node must see the same run "
                              "directory (shared storage, or --checkpoint.dir)")
        return latest

    def on_corrupt(self, path: Path, msg: str) -> None:
        """A checkpoint that does not verify: reported, and the previous one used."""
        self.run.event("checkpoint_corrupt", path=str(path), error=msg)
        if not self.quiet:
            print(f"warning: {msg}; using the previous checkpoint", file=sys.stderr)


def autocast_for(cfg: RunConfig, info: DeviceInfo) -> tuple[Callable[[], Any], str]:
    if cfg.train.dtype == "fp32":
        dtype = None
    elif cfg.train.dtype == "bf16":
        if "bf16" not in info.dtypes:
            raise ConfigError(f"train.dtype bf16 is not supported on {info.device}")
        dtype = torch.bfloat16
    else:
        dtype = autocast_dtype(info)
    if dtype is None:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device_type=info.device.type, dtype=dtype)), "bf16"


def setup(cfg: RunConfig, out: Path, *, resume: bool, quiet: bool, replica: Replica | None) -> Job:
    info = resolve_device(None if cfg.train.device == "auto" else cfg.train.device)
    train_docs = documents(cfg.data, "train")  # reads (and so checks) user files
    if cfg.data.task != "files":  # an empty split must fail now, not at the first evaluation
        make_problem(cfg.data.task, "eval", 0, cfg.data.seed, cfg.data.min_digits, cfg.data.max_digits)
    rank, ranks = group_rank()
    if ranks != cfg.replicas.ranks_per_group and replica is not None:
        raise ConfigError(f"this group has {ranks} ranks (WORLD_SIZE) but replicas.ranks_per_group is "
                          f"{cfg.replicas.ranks_per_group}")
    autocast, compute_dtype = autocast_for(cfg, info)
    # Plain torchrun: the ranks' process group first, so that they all get past the checks
    # above before any of them writes.
    group = RanksGroup(info.backend, info.device) if replica is None and ranks > 1 else LocalGroup()
    fsdp, ep = _layout(cfg, ranks)
    if replica is not None and ranks > 1:  # a replica group's ranks meet first: the checkpoint, the shards
        join_ranks(info.backend, info.device)
    launch = group if isinstance(group, RanksGroup) else RanksGroup(info.backend, info.device) if ranks > 1 else None
    run = RunDir(out, replica=None if replica is None else replica.replica, checkpoints=cfg.checkpoint.dir,
                 rank=rank, ranks=ranks)
    set_replica(replica.replica if replica is not None else rank if ranks > 1 else None)  # faults' `:R`
    arm_signal_faults()
    run.create()
    if run.writer:
        run.write_config(cfg.to_json())
        if isinstance(group, RanksGroup):  # what tells torchrun's restart that this run is its own
            atomic_write_bytes(run.path / AGENT_FILE, torchrun_agent().encode())
    seed_everything(cfg.train.seed)
    enable_determinism(info)
    tokenizer = prepare_tokenizer(cfg, run.path, reuse=resume, docs=train_docs)

    # Built on the meta device, sharded there, and only then given memory and its initial
    # weights: a rank never holds more of the model than its shards (and one whole tensor).
    model = DeepSeekForCausalLM(cfg.model, device="meta")
    sharding = Sharding(model, ranks=ranks, fsdp=fsdp, ep=ep, device=info.device, bf16=compute_dtype == "bf16") \
        if fsdp > 1 or ep > 1 else None
    model.materialize(info.device, **({"place": sharding.place} if sharding else {}))
    g = cfg.guards
    shard, shards = (replica.replica * ranks + rank, cfg.replicas.count * ranks) if replica else (rank, ranks)
    state = TrainState(model, build_optimizer(model, cfg.optim),
                       PackedLoader(train_docs, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                                    seed=cfg.data.seed, shard=shard, num_shards=shards,
                                    eos_id=cfg.model.eos_token_id),
                       SpikeGuard(sigma=_spike_sigma(cfg), window=g.spike_window, min_history=g.spike_min_history,
                                  rollback_spikes=g.rollback_spikes, rollback_window=g.rollback_window),
                       sharding=sharding)
    job = Job(cfg, info, run, tokenizer, model, torch.compile(model) if cfg.train.compile else model, state,
              group, autocast, compute_dtype, quiet, launch,
              params=[p for p in model.parameters() if p.requires_grad], moe_layers=model.moe_layers())
    if replica is not None and cfg.replicas.strategy != "ddp":
        from stalwart.training.outer import OuterState

        state.outer = OuterState(model, cfg.replicas)
    _restore(job, resume=resume, replicated=replica is not None)
    if replica is not None:
        job.group = TorchFTGroup(
            cfg.replicas, replica=replica.replica, lighthouse=replica.lighthouse, host=replica.host,
            state_dict=lambda: state.state_dict(heal=True), load_state_dict=state.load_state_dict,
            # What a heal overwrites in place: the live tensors (DiLoCo's heal is a snapshot).
            heal_targets=(lambda: state.state_dict(heal=True)) if state.outer is None else None,
            changes=(lambda: state.changes) if state.outer is None else None, device=info.device,
            # DiLoCo: one more than the outer steps once there was one (training/outer.py), so
            # that a group restarted from a checkpoint counts as a live group would.
            step=state.step if state.outer is None else state.outer.rounds + 1 if state.outer.rounds else 0,
            secret=replica.secret, max_state_bytes=_max_state_bytes(state), backend=info.backend,
            torchft_log=run.logs / f"replica-{replica.replica}-rank-{rank}.torchft.log",
            on_quorum_retry=lambda error, waited: report_quorum_retry(run, state.step, cfg.replicas.lighthouse_grace_s,
                                                                      error, waited))
        start_together(run.logs, replica.replica)
    # What this process holds of the parameters (sharded: its shards; AdamW adds twice as much).
    held = sum(t.numel() * t.element_size() for t in local_tensors(list(model.parameters())))
    ranks_fields = {"pid": os.getpid(), "parameter_bytes": held}
    if isinstance(group, RanksGroup):  # one line for the launch: every rank's, in rank order
        ranks_fields = {"pids": group.gather(os.getpid()), "parameter_bytes": group.gather(held)}
    run.event("start", step=state.step, device=str(info.device), dtype=compute_dtype,
              parameters=sum(p.numel() for p in model.parameters()), **ranks_fields)
    return job


def _restore(job: Job, *, resume: bool, replicated: bool) -> None:
    """Partial checkpoints of a dead writer removed; on --resume, the newest good checkpoint
    loaded and (for one process) the run's files cut back to it."""
    run, state = job.run, job.state
    if not replicated and run.writer:  # with replica groups the writer cleans up, never a reader
        for partial in ckpt.remove_partial(run.checkpoints):
            run.event("checkpoint_partial_removed", path=str(partial))
    latest = job.load_latest_checkpoint() if resume else None
    if latest is None and job.cfg.model_from:  # a run's start: the folder's weights (a peer may heal them)
        _start_from_folder(job)
    if not resume:
        return
    if latest is not None:
        set_rng_state(job.info, state.load_checkpoint(latest)["rng"])
    if not replicated and run.writer:  # the supervisor repairs the files of a replicated run
        run.truncate_metrics(state.step)
        run.repair_events()
    run.event("resume", step=state.step, checkpoint=str(latest.path) if latest else None)


def _start_from_folder(job: Job) -> None:
    """`model.from`'s weights as the model's initial state, each rank keeping its part; DiLoCo's
    outer state starts from them too."""
    sharding = job.state.sharding
    load_folder_weights(job.model, Path(job.cfg.model_from), **({"place": sharding.place} if sharding else {}))
    if job.state.outer is not None:
        from stalwart.training.outer import OuterState

        job.state.outer = OuterState(job.model, job.cfg.replicas)


def _layout(cfg: RunConfig, ranks: int) -> tuple[int, int]:
    """The ranks of this launch (a plain torchrun launch, or one replica group) that shard
    one copy of the state, and those that split the experts (1: none)."""
    fsdp, ep = cfg.parallel.fsdp or ranks, cfg.parallel.ep
    for key, degree in (("fsdp", fsdp), ("ep", ep)):
        if ranks % degree:
            raise ConfigError(f"parallel.{key} {degree} must divide the launch's {ranks} rank{'s' if ranks > 1 else ''}")
    return fsdp, ep


def _spike_sigma(cfg: RunConfig) -> float:
    """DiLoCo's inner steps are guarded against non-finite values only: each outer step
    moves the weights, and the inner gradient norm with them, which a rolling bound over
    inner steps takes for spikes (measured: 97 of 800 inner steps skipped)."""
    return cfg.guards.spike_sigma if cfg.replicas.strategy == "ddp" else 0.0


def _max_state_bytes(state: TrainState) -> int:
    """The largest heal this rank accepts: its own weights and buffers (its shards) plus AdamW's two
    moments per parameter and DiLoCo's outer momentum (a peer's state has the same shapes),
    a quarter more, and 16 MiB for the plain values (guard window, data ledger, counters)."""
    weights = sum(t.numel() * t.element_size() for t in local_tensors(list(state.model.state_dict().values())))
    moments = (2 if state.outer is None else 3) * sum(p.numel() * p.element_size()
                                                      for p in local_tensors(list(state.model.parameters())))
    return (weights + moments) * 5 // 4 + (16 << 20)


def report_quorum_retry(run: RunDir, step: int, grace_s: float, error: BaseException | None, waited: float) -> None:
    """A group's wait for the Lighthouse (TorchFTGroup's on_quorum_retry): a beat, and the
    `quorum_retry` and `lighthouse_back` events the fault table reads."""
    run.beat()  # waiting for the Lighthouse is not a hang
    if error is None:
        run.event("lighthouse_back", step=step, waited_s=round(waited, 3))
    elif waited == 0.0:
        run.event("quorum_retry", step=step, grace_s=grace_s, error=str(error).splitlines()[0][:200])
