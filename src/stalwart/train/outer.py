"""DiLoCo (Douillard et al. 2023): replica groups that train on their own for H inner steps
and then take one outer step together (`replicas.strategy diloco`).

A round, on every group:

    start   the global state G: the weights and MoE routing biases of the last outer step
    inner   `replicas.inner_steps` AdamW steps on its own data shard, with no quorum and no
            collective (train/step.py with a LocalGroup)
    sync    a quorum (a group that is behind, a restarted one, heals here: to G, the outer
            optimizer and the data ledger, never to a peer's mid-round weights, and it
            contributes nothing to the round it missed); then one all-gather of every
            group's payload:

                [ header: replica, step, tokens trained, contributed, non-finite, shard,
                  loader position
                  | routing biases (fp32) | pseudo-gradient G - local, compressed ]

            every group decodes every payload in replica order and sums in fp32: the same
            bytes in the same order, so the outer step is bit-identical everywhere. The
            token-weighted mean pseudo-gradient takes an outer SGD step with Nesterov
            momentum on G (defaults lr 0.7, momentum 0.9); the biases become the
            token-weighted mean of the groups' biases; the local weights become the new G.

A group whose inner step is not finite (NaN weights, a device producing NaN) goes to the
sync at once; its payload is flagged and left out, the outer step gives it G like every
group, and its AdamW moments start again; non-finite again in the next round, the process
exits (EXIT_NONFINITE) and the supervisor restarts it. An all-gather that fails (a peer died during the round or the
exchange) keeps the payload; after the next quorum it is sent again among the survivors,
so no survivor's inner work is lost. The bytes each group sends are counted as the ring
all-gather sends them: (participants - 1) x payload bytes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stalwart.compress import ErrorFeedback, decode, encode, wire_bytes
from stalwart.config import ReplicasConfig
from stalwart.errors import first_line
from stalwart.faults import inject
from stalwart.train.recovery import NonFiniteAfterHeal, Partitioned

if TYPE_CHECKING:
    from stalwart.train.recovery import Recovery
    from stalwart.train.setup import Job

HEADER = ("replica", "step", "tokens", "contributed", "nonfinite", "shard", "position", "start", "skip")  # int64 each


@dataclass
class Payload:
    """One group's contribution to an outer step, as sent."""
    wire: torch.Tensor  # uint8
    round: int  # the outer step it is for
    version: int  # the train state's version it was computed on
    sends: int = 0  # exchanges attempted with it

    def valid_for(self, round_: int, version: int) -> bool:
        return self.round == round_ and self.version == version


@dataclass
class OuterResult:
    committed: bool
    step: int  # the job's step after it: the furthest contributor's inner steps
    contributors: list[int]  # replicas whose pseudo-gradient is in the step
    nonfinite: list[int]  # replicas whose payload was left out
    tokens: int  # tokens of the contributors' inner steps this round
    positions: dict[int, dict[str, int]]  # {shard: loader position} of the contributors
    bytes_sent: int
    mean_delta: torch.Tensor | None = None  # the token-weighted mean pseudo-gradient
    mean_biases: torch.Tensor | None = None


class OuterState:
    """The global state G, the outer optimizer over it and the error-feedback residual."""

    def __init__(self, model: torch.nn.Module, cfg: ReplicasConfig) -> None:
        self.cfg = cfg
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.local = [p for p in model.parameters() if p.requires_grad]
        self.biases = [m.gate.e_score_correction_bias for m in model.moe_layers()]
        self.global_params = [torch.nn.Parameter(p.detach().clone()) for p in self.local]
        self.global_biases = [b.detach().clone() for b in self.biases]
        self.optimizer = torch.optim.SGD(self.global_params, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                         nesterov=True, foreach=False)
        self.feedback = ErrorFeedback() if cfg.error_feedback else None
        self.rounds = 0
        self.synced = {"step": 0, "tokens_seen": 0}  # the job's progress at the last outer step
        self.numel = sum(p.numel() for p in self.local)

    # -- what a heal and a checkpoint carry ----------------------------------------------

    def global_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with G in place of the local weights and biases."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, g in zip(self.names, self.global_params):
            state[name] = g.detach().clone()
        for i, name in enumerate(k for k in state if k.endswith("e_score_correction_bias")):
            state[name] = self.global_biases[i].clone()
        return state

    def progress(self) -> dict[str, int]:
        """The step and tokens of the last outer step (what a heal or checkpoint carries)."""
        return dict(self.synced)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rounds": self.rounds}

    def global_tensors(self) -> list[torch.Tensor]:
        momentum = [self.optimizer.state[g]["momentum_buffer"] for g in self.global_params
                    if self.optimizer.state[g].get("momentum_buffer") is not None]
        return [g.detach() for g in self.global_params] + self.global_biases + momentum

    def load_state_dict(self, state: dict[str, Any] | None, *, step: int, tokens_seen: int) -> None:
        """After the model itself was loaded with a G: take it as G, with the outer optimizer
        (None: a state without one, a DDP checkpoint, starts a fresh one)."""
        self.snapshot()
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.rounds = int(state["rounds"])
        self.synced = {"step": step, "tokens_seen": tokens_seen}
        if self.feedback is not None:
            self.feedback = ErrorFeedback()  # the residual is this process's own: it starts again

    def snapshot(self) -> None:
        """G := the model's current weights and biases."""
        with torch.no_grad():
            for g, p in zip(self.global_params, self.local):
                g.copy_(p)
            for g, b in zip(self.global_biases, self.biases):
                g.copy_(b)

    # -- one outer step ------------------------------------------------------------------

    def payload_bytes(self) -> int:
        return 8 * len(HEADER) + 4 * sum(b.numel() for b in self.biases) + wire_bytes(self.numel, self.cfg.compression)

    def pack(self, *, replica: int, step: int, tokens: int, shard: int, position: dict[str, int], contribute: bool,
             nonfinite: bool, version: int) -> Payload:
        """This group's payload for outer step `rounds + 1`: its pseudo-gradient G - local,
        compressed (with error feedback when on), or nothing but its header. `nonfinite`:
        the round ended on a non-finite inner step (the payload is flagged either way when
        its own values are not finite)."""
        delta = torch.cat([(g.detach() - p.detach()).reshape(-1) for g, p in zip(self.global_params, self.local)])
        biases = torch.cat([b.detach().float().reshape(-1) for b in self.biases]) if self.biases else torch.zeros(0)
        finite = not nonfinite and bool(torch.isfinite(delta).all()) and bool(torch.isfinite(biases).all())
        contribute = contribute and finite
        if contribute:
            body = self._encode(delta)
        else:
            body = torch.zeros(wire_bytes(self.numel, self.cfg.compression), dtype=torch.uint8)
            biases = torch.zeros_like(biases)
        header = torch.tensor([replica, step, tokens if contribute else 0, int(contribute), int(not finite), shard,
                               position["position"], position["start"], position["skip"]], dtype=torch.int64)
        wire = torch.cat([header.view(torch.uint8), biases.contiguous().view(torch.uint8), body])
        return Payload(wire, self.rounds + 1, version)

    def _encode(self, delta: torch.Tensor) -> torch.Tensor:
        if self.feedback is not None and self.cfg.compression != "none":
            return self.feedback.encode(delta, self.cfg.compression)
        return encode(delta, self.cfg.compression)

    def combine(self, gathered: list[torch.Tensor]) -> OuterResult:
        """Decode every participant's payload in replica order and average those that
        contributed finite values, weighted by their tokens (nothing is changed yet)."""
        n_bias = sum(b.numel() for b in self.biases)
        head = 8 * len(HEADER)
        parts = []
        for wire in gathered:
            header = dict(zip(HEADER, wire[:head].view(torch.int64).tolist()))
            parts.append((header, wire))
        parts.sort(key=lambda part: part[0]["replica"])
        total = torch.zeros(self.numel, dtype=torch.float32)
        bias_total = torch.zeros(n_bias, dtype=torch.float32)
        tokens, step, contributors, nonfinite, positions = 0, 0, [], [], {}
        for header, wire in parts:
            if header["nonfinite"]:
                nonfinite.append(header["replica"])
            if not header["contributed"]:
                continue
            delta = decode(wire[head + 4 * n_bias:], self.numel, self.cfg.compression)
            biases = wire[head:head + 4 * n_bias].view(torch.float32)
            if not (torch.isfinite(delta).all() and torch.isfinite(biases).all()):
                nonfinite.append(header["replica"])
                continue
            weight = header["tokens"]
            total += delta * weight
            bias_total += biases * weight
            tokens += weight
            step = max(step, header["step"])
            contributors.append(header["replica"])
            positions[header["shard"]] = {k: header[k] for k in ("position", "start", "skip")}
        bytes_sent = (len(gathered) - 1) * int(gathered[0].numel())
        if not contributors:
            return OuterResult(False, self.synced["step"], [], nonfinite, 0, {}, bytes_sent)
        return OuterResult(True, step, contributors, nonfinite, tokens, positions, bytes_sent,
                           mean_delta=total / tokens, mean_biases=bias_total / tokens)

    def apply(self, result: OuterResult) -> None:
        """The outer step: G moves, and the local weights and biases become G."""
        mean_delta, mean_biases = result.mean_delta, result.mean_biases
        offset = 0
        for g in self.global_params:
            n = g.numel()
            g.grad = mean_delta[offset:offset + n].view_as(g).clone()
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        with torch.no_grad():
            for g, b in zip(self.global_biases, self.biases):
                n = g.numel()
                g.copy_(mean_biases[offset:offset + n].view_as(g))
                b.copy_(g)
                offset += n
            for g, p in zip(self.global_params, self.local):
                p.copy_(g)
        self.rounds += 1
        self.synced = {"step": result.step, "tokens_seen": self.synced["tokens_seen"] + result.tokens}


class Rounds:
    """What the training loop does at the end of a DiLoCo round: the quorum, the exchange
    (sent again after a failure), the outer step, its metrics, and the checkpoint when due.
    A (re)started group starts with a sync: it joins the round in progress there."""

    def __init__(self, job: Job, recovery: Recovery) -> None:
        self.job, self.recovery = job, recovery
        self.outer: OuterState = job.state.outer
        self.due = True
        self.kept: Payload | None = None
        self.nonfinite = False  # this round ended on a non-finite inner step
        self.nonfinite_in_row = 0

    def inner_done(self, step: int, *, nonfinite: bool) -> None:
        """After an inner step: the round ends after inner_steps, and at the last step. An
        inner step whose values were not finite ends this group's round at once: what it
        trained since G is lost, and it waits at the sync for the others' outer step."""
        synced = self.outer.synced["step"]
        self.nonfinite = self.nonfinite or nonfinite
        self.due = (self.nonfinite or step - synced >= self.job.cfg.replicas.inner_steps
                    or step >= self.job.cfg.train.steps)

    def sync(self) -> OuterResult | None:
        """One attempt; None when the exchange failed (it is tried again, `due` stays)."""
        job, state, group, outer = self.job, self.job.state, self.job.group, self.outer
        t0 = time.perf_counter()
        job.join_quorum(round=outer.rounds)
        t_exchange = time.perf_counter()
        round_, synced = outer.rounds + 1, outer.synced["step"]
        payload = self.kept if self.kept is not None and self.kept.valid_for(round_, state.version) else None
        if payload is None:
            payload = outer.pack(replica=group.replica, step=state.step,
                                 tokens=state.tokens_seen - outer.synced["tokens_seen"], shard=state.loader.shard,
                                 position=state.loader.state_dict(), contribute=state.step > synced,
                                 nonfinite=self.nonfinite, version=state.version)
        payload.sends += 1
        inject("kill-in-exchange", state.step)
        gathered = group.allgather_across_groups(payload.wire)
        result = outer.combine(gathered) if gathered is not None else None
        if result is None or not group.should_commit(True):
            error = group.error()
            self.kept = payload
            self.recovery.failed_in_row += 1
            reason = first_line(error)
            job.run.event("step_failed", step=state.step, round=round_, participants=group.participants,
                          seconds=round(time.perf_counter() - t0, 3), error=reason)
            limit = job.cfg.replicas.max_failed_steps
            if self.recovery.failed_in_row >= limit and not group.is_lowest:
                raise Partitioned(f"{self.recovery.failed_in_row} outer exchanges in a row failed "
                                  f"(replicas.max_failed_steps {limit}); last: {reason}")
            return None
        self.kept, self.due, self.nonfinite, self.recovery.failed_in_row = None, False, False, 0
        if result.committed:
            if group.replica not in result.contributors and state.step > synced:
                job.run.event("work_discarded", from_step=synced, to_step=state.step,
                              reason="left out of the outer step")
            outer.apply(result)
            state.step, state.tokens_seen = result.step, outer.synced["tokens_seen"]
            state.record_shards(result.positions)
            state.rewind_loader()
            if self.recovery.clock.due(state.step, job.cfg.train.steps) and group.is_lowest and job.run.writer:
                self.recovery.save(state.step)
        # torchft's step: one more than the outer steps once a group has synced, so that a
        # group that has not (a restart, at its checkpoint's count) is behind and heals,
        # and torchft's first-quorum sync (init_sync, at step 0) happens once only.
        group.set_step(outer.rounds + 1)
        self._left_out(group.replica in result.nonfinite, round_)
        record = {"step": state.step, "round": round_, "outer": result.committed, "bytes_sent": result.bytes_sent,
                  "sync_s": round(time.perf_counter() - t_exchange, 4), "participants": group.participants,
                  "contributors": result.contributors, "tokens": state.tokens_seen, "time": round(time.time(), 4)}
        if payload.sends > 1:
            record["sends"] = payload.sends
        if job.cfg.train.trace_data:
            record["data"] = {str(k): ":".join(str(v) for v in p.values()) for k, p in sorted(result.positions.items())}
        job.run.append_metrics(record)
        return result

    def _left_out(self, left_out: bool, round_: int) -> None:
        """A group whose pseudo-gradient was not finite holds G now (the outer step set it),
        but its AdamW moments may hold the NaN: they start again. Twice in a row: its device
        is suspect, the process exits (EXIT_NONFINITE) and is restarted."""
        if not left_out:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        self.job.run.event("step_corrupt", step=self.job.state.step, cause="nonfinite",
                           reason="pseudo-gradient not finite", round=round_)
        if self.nonfinite_in_row > 1:
            raise NonFiniteAfterHeal(f"pseudo-gradient not finite in {self.nonfinite_in_row} rounds in a row")
        self.job.state.optimizer.state = defaultdict(dict)
