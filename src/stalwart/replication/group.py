"""One replica group's view of the job: the training loop talks to a `Group`, and the group
hides whether peers exist.

`LocalGroup` is the whole job in one process (`stalwart train`, replicas.count 1).
`RanksGroup` is the whole job in the ranks of one torchrun launch, with no Lighthouse
(`torchrun --nproc-per-node N -m stalwart train`, one or several nodes): plain data
parallelism, whose collectives go through torch.distributed on the device's backend; a
rank that dies takes the job with it, and torchrun's own restart (`--max-restarts`)
resumes it from the last checkpoint.
`TorchFTGroup` is one replica group coordinated by torchft's Manager and the Lighthouse:

- `start_step` runs the quorum synchronously (use_async_quorum=False): a group that is
  behind the most advanced participant receives its full state (weights, optimizer, loader,
  guards, counters) from a peer before the step, over `SafeHTTPTransport`, and so takes
  part in that very step. Healing is torchft's: a group is healed when its step is behind.
- `allreduce_sum` sums one flat float buffer (gradients and step statistics) over the
  participants; a peer that dies or hangs makes it fail within `timeout_s`, the step is
  then not committed, and the next quorum is formed without that peer (the Lighthouse
  drops a group that has not heartbeated for `heartbeat_timeout_s`).
- `should_commit(ok)` is the commit vote, taken among the ranks of this group (torchft's
  vote is per group; groups agree because their verdicts come from the same sums): a
  guard's rejection, or this group's own non-finite values, is reported to the Manager as
  an error, so the group votes no, stays at its step, and is behind (so healed) at the next
  quorum.
- A Lighthouse that cannot be reached makes the quorum fail; the group keeps its process
  and retries for `lighthouse_grace_s` (torchft 0.2.0 keeps the failed quorum future and
  would raise it again: it is dropped before each retry), beating its liveness file so the
  supervisor does not take the wait for a hang. A Lighthouse started again numbers its
  quorums from the start: `_UnrepeatedQuorumIds` gives torchft ids that name the
  membership, so a repeated number is not taken for an old quorum.

Timeouts (ReplicasConfig): a dead peer costs one failed step plus the Lighthouse's
heartbeat timeout; a hung peer (SIGSTOP) costs up to `timeout_s` more, the time a
collective waits before giving up on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from stalwart.config import ReplicasConfig
from stalwart.device import use_device
from stalwart.errors import ConfigError, first_line


QUORUM_RETRY_S = 0.5


class GuardRejected(Exception):
    """A guard voted the step down: every replica reaches the same verdict."""


class LighthouseLost(Exception):
    """No quorum for longer than replicas.lighthouse_grace_s."""


class HealTorn(Exception):
    """A heal failed after part of this group's state was overwritten, or on some of its
    ranks only: the group restarts (from its checkpoint) and heals again."""


class Gather:
    """An all-gather in flight (DiLoCo's exchange): `wait()` gives every participant's
    payload in quorum order, or None if the collective failed (the error reported to the
    Manager, as its allreduce does). The caller may train on while it is in flight."""

    def __init__(self, work: Any, out: list[torch.Tensor] | None, on_error: Callable[[BaseException], None],
                 finish: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
        self._work, self._out, self._on_error, self._finish = work, out, on_error, finish

    def wait(self) -> list[torch.Tensor] | None:
        if self._work is not None:
            try:
                self._work.wait()
            except Exception as error:  # noqa: BLE001 (gloo raises RuntimeError, DistBackendError, ...)
                self._on_error(error)
                self._out = None
            self._work = None
            if self._out is not None and self._finish is not None:
                self._out = self._finish(self._out)
        return self._out


class LocalGroup:
    """No peers: every step commits unless a guard rejects it."""

    replica = 0
    num_replicas = 1
    participants = 1
    participant = 0  # this group's place among the participants
    contributors = 1
    rank = 0
    is_lowest = True
    healed = False
    healed_bytes = 0
    healed_in_place = 0
    heals = False  # whether a rank whose own values are not finite can be healed from a peer

    def start_step(self) -> None:
        pass

    def allreduce_sum(self, buffer: torch.Tensor | None, *, across_only: int = 0) -> bool:
        return True

    def allreduce_across_groups(self, values: torch.Tensor) -> bool:
        return True

    def every_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank of this group."""
        return flag

    def group_fingerprint(self, own: int) -> int:
        """One fingerprint for the whole group from each rank's own (the same on its ranks)."""
        return own

    def allgather_across_groups(self, payload: torch.Tensor) -> Gather:
        return Gather(None, [payload], lambda error: None)

    def should_commit(self, ok: bool, reason: str = "") -> bool:
        return ok

    def error(self) -> BaseException | None:
        return None

    def force_heal(self) -> None:
        raise RuntimeError("a single replica has no peer to heal from")

    def set_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


AGENT_FILE = "torchrun_agent"  # in the run directory: the torchrun agent whose launch runs it


def torchrun_agent() -> str:
    """Names the torchrun agent of this rank (host and pid): the same across the restarts
    it makes, another for any other launch."""
    import socket

    return f"{socket.gethostname()}:{os.getppid()}"


class RanksGroup(LocalGroup):
    """The ranks of one torchrun launch, and nothing else: every rank takes part in every
    step, so a step's only outcomes are commit or a guard's skip, and nobody heals (there
    is no peer group to heal from). A rank's own non-finite values go into the sum as they
    are, so that every rank sees the non-finite sum and skips the step, as one process
    would (training/exchange.py). Constructing one waits for every rank (the first also
    creates torch.distributed's process group from torchrun's environment)."""

    heals = False

    def __init__(self, backend: str, device: torch.device) -> None:
        import torch.distributed as dist

        join_ranks(backend, device)
        self._dist, self._device = dist, device
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.contributors = self.ranks
        self.is_lowest = self.rank == 0
        self.broadcast(0)  # every rank is here

    def allreduce_sum(self, buffer: torch.Tensor | None, *, across_only: int = 0) -> bool:
        if buffer is not None:
            self._dist.all_reduce(buffer)
        return True

    def broadcast(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        self._dist.broadcast(t, src=0)
        return int(t.item())

    def largest(self, value: int) -> int:
        """The largest of the ranks' `value`s, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text`, on every rank."""
        data = text.encode()
        size = self.broadcast(len(data))
        t = torch.zeros(size, dtype=torch.uint8, device=self._device)
        if self.rank == 0 and data:
            t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._dist.broadcast(t, src=0)
        return bytes(t.cpu().tolist()).decode()

    def gather(self, value: int) -> list[int]:
        """Every rank's `value`, in rank order, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        out = [torch.empty_like(t) for _ in range(self.ranks)]
        self._dist.all_gather(out, t)
        return [int(v.item()) for v in out]

    def finish(self) -> None:
        """A run that ended well: every rank past its last collective (the export's gathers)
        before any rank closes its connections in `shutdown`."""
        self._dist.barrier()

    def shutdown(self) -> None:
        self._dist.destroy_process_group()


class TorchFTGroup:
    """One replica group (one rank) under torchft.

    Several ranks per group (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT): the ranks of a
    group sum the step buffer among themselves first (torch.distributed, the device's
    backend), then each rank sums it with the same rank of the other groups through torchft,
    so every rank of every group ends with the total. A sharded group (FSDP2) has reduced
    its gradients among its ranks in the backward pass already: the front of the buffer
    (`across_only`, this rank's gradient shards) is summed across groups only, so that what
    crosses groups per rank falls with the group's ranks (HSDP). torchft heals each rank
    from the same rank of a healthy group.

    Args:
        replica: this group's index, 0..num_replicas-1 (its data shard and its slot).
        lighthouse: the Lighthouse address, http://HOST:PORT.
        host: the address peers reach this group's servers at (127.0.0.1 on one machine).
        state_dict / load_state_dict: the training state that a healing peer receives.
        heal_targets: this group's own tensors that a heal overwrites in place (None: a heal
            allocates what it receives).
        changes: a count that goes up before any served tensor changes in place (None: the
            served state is a snapshot): a stream that overlapped a change is never signed.
        device: where this group's ranks keep what they exchange among themselves.
        step: the committed step this group starts from (0, or a checkpoint's).
        secret / max_state_bytes: the job secret and the largest state a heal accepts
            (replication/transport.py).
        torchft_log: where torchft's own warnings and errors go (with tracebacks); what
            they mean reaches the run's events as one line (step_failed, heal, ...).
    """

    def __init__(self, cfg: ReplicasConfig, *, replica: int, lighthouse: str, host: str,
                 state_dict: Callable[[], Any], load_state_dict: Callable[[Any], None], step: int,
                 secret: bytes, max_state_bytes: int, torchft_log: Path, backend: str = "gloo",
                 device: torch.device | None = None, heal_targets: Callable[[], Any] | None = None,
                 changes: Callable[[], int] | None = None,
                 on_quorum_retry: Callable[[BaseException | None, float], None] = lambda error, waited: None) -> None:
        from torch.distributed import TCPStore
        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo

        from stalwart.replication.transport import SafeHTTPTransport

        _log_torchft_to(torchft_log)
        self.replica, self.num_replicas = replica, cfg.count
        self.healed = False  # in the last start_step, this group received a peer's state
        self.healed_bytes = 0  # ... and how many bytes it was
        self.healed_in_place = 0  # ... and how many of them landed in this rank's own tensors
        self._refused_state: ConfigError | None = None  # a peer's state this group could not load
        self._device = device or torch.device("cpu")
        defaults = cfg.torchft_defaults
        timeout = timedelta(seconds=60 if defaults else cfg.timeout_s)
        quorum_timeout = timedelta(seconds=60 if defaults else cfg.quorum_timeout_s)
        self.rank, self.ranks = group_rank()
        if self.ranks > 1:  # torchrun's store serves the group; ranks also talk among themselves
            import torch.distributed as dist

            join_ranks(backend, None)  # setup joined them already (timeouts: join_ranks)
            self._intra = dist
            store_addr, store_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:  # one rank: this process is its group's store
            self._intra = None
            self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = host, self._store.port
        # torchft 0.2.0 serves the state registered under "default" inside its own dict:
        # the tensors a heal brings have these places.
        targets = None if heal_targets is None else lambda: {"user": {"default": heal_targets()}}
        self.transport = SafeHTTPTransport(host, timeout, secret=secret, max_bytes=max_state_bytes,
                                           targets=targets, changes=changes)
        self.grace_s, self._on_quorum_retry = cfg.lighthouse_grace_s, on_quorum_retry

        def heal(state: Any) -> None:
            try:
                load_state_dict(state)
            except Exception as error:  # noqa: BLE001 (torchft would take it for a failed quorum and retry)
                self._refused_state = ConfigError(f"the state a peer sent cannot be loaded: {first_line(error)}")
                raise
            self.healed = True

        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), load_state_dict=heal, state_dict=state_dict,
            min_replica_size=cfg.min_replicas, use_async_quorum=False, timeout=timeout,
            quorum_timeout=quorum_timeout, connect_timeout=timedelta(seconds=10 if not defaults else 60),
            rank=self.rank, world_size=self.ranks, store_addr=store_addr, store_port=store_port,
            lighthouse_addr=lighthouse,
            replica_id=f"replica{replica}", hostname=host, checkpoint_transport=self.transport,
            init_sync=True)
        self.manager._client = _UnrepeatedQuorumIds(self.manager._client)
        self.set_step(step)
        self.participants = self.contributors = self.participant = 0
        self.is_lowest = False
        self.heals = True

    def set_step(self, step: int) -> None:
        """Align torchft's step with ours (after loading a checkpoint or rolling back)."""
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})

    def start_step(self) -> None:
        self.healed = False
        # A state staged at an earlier quorum is not served on: the next quorum stages anew.
        self.transport.disallow_checkpoint()
        received, in_place, lost_at = self.transport.bytes_received, self.transport.bytes_in_place, None
        while True:
            try:
                self.manager.start_quorum()
                break
            except Exception as error:  # noqa: BLE001 (torchft's client raises TimeoutError, RuntimeError, ...)
                if self._refused_state is not None:
                    raise self._refused_state from None
                now = time.monotonic()
                lost_at = lost_at or now
                if now - lost_at > self.grace_s:
                    raise LighthouseLost(f"no quorum for {now - lost_at:.0f} s (replicas.lighthouse_grace_s "
                                         f"{self.grace_s:g}): {str(error).splitlines()[0][:200]}") from error
                self._on_quorum_retry(error, now - lost_at)
                self.manager._quorum_future = None
                time.sleep(QUORUM_RETRY_S)
        if lost_at is not None:
            self._on_quorum_retry(None, time.monotonic() - lost_at)
        self.healed_bytes = self.transport.bytes_received - received  # this quorum's heal
        self.healed_in_place = self.transport.bytes_in_place - in_place
        if self.transport.refused is not None:  # this group's secret is not the job's: retrying cannot help
            raise ConfigError(str(self.transport.refused))
        if self.transport.torn:  # no later quorum can be trusted to bring a whole state
            raise HealTorn("a heal broke off after it had begun to overwrite this group's state in place")
        if self._intra is not None:
            # torchft heals each rank on its own, and the ranks of a group that was behind must
            # all have healed (at step 0 it syncs every group, some of its ranks from one peer
            # and some from another: the same state, so which ranks heal may differ).
            step = self.manager.current_step()
            alike = torch.tensor([step, -step], dtype=torch.int64, device=self._device)
            self._intra.all_reduce(alike, op=self._intra.ReduceOp.MIN)
            if int(alike[0]) != -int(alike[1]):
                raise HealTorn(f"the ranks of this group left the quorum at steps {int(alike[0])} to "
                               f"{-int(alike[1])}: a heal failed on some of them")
        self.participants = self.manager.num_participants()
        self.contributors = self.participants * self.ranks
        # The lowest live group's rank 0 writes checkpoints, the summary and the export.
        self.participant = self.manager.participating_rank()  # this group's place in the collectives
        self.is_lowest = self.participant == 0 and self.rank == 0

    def allreduce_sum(self, buffer: torch.Tensor, *, across_only: int = 0) -> bool:
        """Sum `buffer` over the participants in place, its first `across_only` values over
        the same rank of every group only; False if the collective failed."""
        if self._intra is not None:
            self._intra.all_reduce(buffer[across_only:])
        return self.allreduce_across_groups(buffer)

    def every_rank(self, flag: bool) -> bool:
        if self._intra is None:
            return flag
        t = torch.tensor([int(flag)], device=self._device)
        self._intra.all_reduce(t, op=self._intra.ReduceOp.MIN)
        return bool(t.item())

    def group_fingerprint(self, own: int) -> int:
        """A hash of every rank's fingerprint in rank order: a group with one odd rank is odd
        as a whole, so its ranks decide alike (to heal, or not)."""
        if self._intra is None:
            return own
        every = self.gather_over_ranks([own])
        digest = hashlib.blake2b(b"".join(v.to_bytes(8, "big", signed=True) for v in every), digest_size=8)
        return int.from_bytes(digest.digest(), "big") >> 3  # below 2^61, as a rank's own

    def gather_over_ranks(self, values: list[int]) -> list[int]:
        """Every rank's `values` (int64, as many on each), in rank order, on every rank of this group."""
        if self._intra is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device)
        every = [torch.empty_like(t) for _ in range(self.ranks)]
        self._intra.all_gather(every, t)
        return [int(v) for part in every for v in part.tolist()]

    def sum_over_ranks(self, value: float) -> float:
        """The sum of the ranks' `value`s (float64), on every rank of this group."""
        if self._intra is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        self._intra.all_reduce(t)
        return float(t.item())

    def allreduce_across_groups(self, values: torch.Tensor) -> bool:
        """Sum over the same rank of every participating group; False if it failed on any
        rank of this group (the peer of one rank may die while another's finished): the
        ranks of a group go on alike."""
        from torch.distributed import ReduceOp

        self.manager.allreduce(values, reduce_op=ReduceOp.SUM).wait()
        return self.every_rank(self.manager.errored() is None)

    def allgather_across_groups(self, payload: torch.Tensor) -> Gather:
        """Start an all-gather of `payload` (the same size everywhere) over the quorum's
        participants: wait() gives every participant's, in participant order. torchft's
        Manager has no all-gather of its own: this is its process group's, which runs on
        gloo's (or the device backend's) own threads."""
        from torch.distributed.distributed_c10d import AllgatherOptions

        out = [torch.empty_like(payload) for _ in range(self.manager.num_participants())]
        return self._start(lambda pg: pg.allgather([out], [payload], AllgatherOptions()), out)

    def alltoall_across_groups(self, inputs: list[torch.Tensor], sizes: list[int]) -> Gather:
        """Start an all-to-all of uint8 tensors over the participants: inputs[k] goes to
        participant k, and wait() gives what each participant sent this one (sizes[j] bytes
        from participant j), in participant order."""
        from torch.distributed.distributed_c10d import AllToAllOptions

        out = torch.empty(sum(sizes), dtype=torch.uint8)
        send = torch.cat(inputs)
        return self._start(lambda pg: pg.alltoall_base(out, send, list(sizes), [int(t.numel()) for t in inputs],
                                                       AllToAllOptions()), [out],
                           finish=lambda done: [part.clone() for part in done[0].split(sizes)])  # each aligned

    def _start(self, collective: Callable[[Any], Any], out: list[torch.Tensor],
               finish: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> Gather:
        """A collective on the quorum's process group, started (its failure is reported to
        the Manager, as its allreduce's is)."""
        if self.manager.errored() is not None:
            return Gather(None, None, self.manager.report_error)
        self.manager.wait_quorum()
        try:
            work = collective(self.manager._pg)
        except Exception as error:  # noqa: BLE001
            self.manager.report_error(error)
            return Gather(None, None, self.manager.report_error)
        return Gather(work, out, self.manager.report_error, finish)

    def should_commit(self, ok: bool, reason: str = "") -> bool:
        if not ok:
            self.manager.report_error(GuardRejected(reason))
        return self.manager.should_commit()

    def error(self) -> BaseException | None:
        errored = self.manager.errored()
        return None if errored is None else errored.original_exception

    def force_heal(self) -> None:
        """Mark this group's state as bad: it is behind at the next quorum, so torchft heals
        it from a peer that is up to date."""
        self.set_step(max(self.manager.current_step() - 1, 0))

    def finish(self) -> None:
        """As RanksGroup.finish, among this group's ranks."""
        if self._intra is not None:
            self._intra.barrier()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
        self.transport.shutdown()
        if self._intra is not None:
            self._intra.destroy_process_group()


class _UnrepeatedQuorumIds:
    """torchft's ManagerClient, with a quorum id that names the quorum's exact membership.

    torchft reconfigures its process group only when the quorum id changes, and names the
    store keys of a configuration after the id. A Lighthouse started again numbers its
    quorums 1, 2, ... afresh, so its ids repeat its predecessor's for another membership: a
    member keeps a process group of the old quorum (a collective that waits for a peer
    that is not there) or reads the keys of an old configuration. The id given to torchft
    is therefore a hash of the Lighthouse's id and the members' replica ids (each process
    has its own uuid): the same for every member of a quorum, whoever asks, and new
    whenever the membership is. A failed step needs nothing here: the Lighthouse itself
    gives a new id after a commit failure."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _quorum(self, **kwargs: Any) -> Any:
        result = self._client._quorum(**kwargs)
        members = ",".join(sorted(result.replica_ids))
        digest = hashlib.blake2b(f"{result.quorum_id}|{members}".encode(), digest_size=7).digest()
        return _Renumbered(result, int.from_bytes(digest, "big"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Renumbered:
    """A torchft QuorumResult with another quorum id."""

    def __init__(self, result: Any, quorum_id: int) -> None:
        self._result, self.quorum_id = result, quorum_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)


def _log_torchft_to(path: Path) -> None:
    """torchft logs every failed collective and heal with a traceback: to its own file, not
    to the group's output, where a user looks for one line."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING if name == "torchft" else logging.ERROR)
        logger.propagate = False
        logger.handlers = [handler]


def join_ranks(backend: str, device: torch.device | None) -> None:
    """torch.distributed's process group of this launch's ranks, from torchrun's environment
    (once; the first call creates it). Returns when every rank has joined.

    Its collectives wait torch's default timeout, not replicas.timeout_s: the ranks of a
    launch meet again after whatever one of them does alone (a checkpoint written, a heal
    of a larger shard, a collective across groups that waits its own timeout). A rank that
    dies ends its launch through torchrun; one that hangs, through the supervisor's
    watchdog (replicas.hang_timeout_s)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device is not None:
        use_device(device)  # FSDP2 and the backend allocate on the current device
    dist.init_process_group(backend)


def group_rank() -> tuple[int, int]:
    """(rank, ranks) of this process inside its replica group: torchrun's RANK and
    WORLD_SIZE, or (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
