"""DiLoCo (Douillard et al. 2023) and Streaming DiLoCo (Douillard et al. 2025): replica
groups that train on their own and take outer steps together (`replicas.strategy diloco`
or `streaming`).

A round, on every group:

    start   the global state G: the weights and MoE routing biases of the last outer steps
    inner   AdamW steps on its own data shard, with no quorum and no collective
            (training/step.py with a LocalGroup)
    sync    a quorum (a group that is behind, a restarted one, heals here: to G, the outer
            optimizer and the data ledger, never to a peer's mid-round weights, and it
            contributes nothing to the round it joins); then the exchange of every
            group's payload for the round's fragment (`Exchange`: an all-gather for two
            groups, a reduce-scatter and an all-gather from three on):

                [ header: replica, step, tokens, contributed, non-finite, fingerprint of
                  G, norm, and each rank's data shard and loader position | the fragment's
                  routing biases (fp32) | the fragment's pseudo-gradient G - local, compressed ]

            who takes part is decided from the headers; every group decodes the same
            bytes in replica order and sums in fp32, so the outer step is bit-identical
            everywhere. The
            token-weighted mean pseudo-gradient takes an outer SGD step with Nesterov
            momentum on the fragment of G (defaults lr 0.7, momentum 0.9); its biases become
            the token-weighted mean of the groups' biases; the local fragment becomes
            mixing x local + (1 - mixing) x G.

diloco has one fragment (the whole model), a sync every inner_steps and no overlap or
mixing: the local weights become G. streaming splits the model into `fragments` fragments
strided across depth (layer l in fragment l mod F; the embedding with the first, the final
norm, head and MTP with the last); round r syncs fragment (r - 1) mod F, one round every
inner_steps / F steps, so each fragment syncs every inner_steps steps, staggered. Its
exchange runs in the background while `overlap_steps` more inner steps train
(tau), and the outer step is mixed in after them (alpha = `mixing`). A round is decided
by the round number every group shares after the quorum, so a group that heals there
sends what the others send. At the last step every fragment syncs once more with no
overlap and no mixing: every group ends with G.

A group whose inner step is not finite (NaN weights, a device producing NaN) goes to the
next sync at once (streaming: its step jumps to the next round's, so its payload has the
others' size); its payload is flagged and left out, its local weights become G and its
AdamW moments start again; non-finite again in the next round, the process exits
(EXIT_NONFINITE) and the supervisor restarts it. An exchange that fails (a peer died
during the round or the exchange) keeps the payload; after the next quorum it is sent
again among the survivors, so no survivor's inner work is lost. The bytes each group sends
are counted as its collectives send them (compress.exchange_sent).

A group of several ranks (FSDP2, expert parallelism): everything above is of each rank's
own shards, exchanged with the same rank of the other groups; the header is the whole
group's, agreed among its ranks before it is sent (`pack`), so that every rank of every
group decides the same outer step. The group's inner steps are among its ranks.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stalwart.checkpoint import step_dir_name
from stalwart.compress import ErrorFeedback, chunk_ranges, decode, encode, wire_bytes, wire_slice
from stalwart.config import ReplicasConfig
from stalwart.errors import first_line
from stalwart.faults import inject
from stalwart.guards import fingerprint, odd_ones_out
from stalwart.parallel.fsdp import Sharding, local_part
from stalwart.replication.group import Gather, HealTorn, group_rank
from stalwart.training.recovery import NonFiniteAfterHeal, Partitioned

if TYPE_CHECKING:
    from stalwart.training.recovery import Recovery
    from stalwart.training.setup import Job

# A payload's header, int64 each: the group's (norm: the float64 bits of the norm of its whole
# pseudo-gradient, over all its ranks' shards), then RANK_FIELDS for each of its ranks.
HEADER = ("replica", "step", "tokens", "new_tokens", "contributed", "nonfinite", "fingerprint", "norm")
RANK_FIELDS = ("shard", "position", "start", "skip")  # a rank's data shard and its loader position
# A pseudo-gradient whose norm per token is this many times the round's lower median is a
# spike (a weight corrupted during the round): left out. Honest groups differ by far less,
# speeds and rounds cut short by a heal included (Adam's steps have about one size).
OUTER_SPIKE = 10.0


def _header(wire: torch.Tensor) -> dict[str, Any]:
    """A payload's group fields, and `positions`: {shard: loader position} of its ranks."""
    values = wire[:8 * len(HEADER)].view(torch.int64)
    header = dict(zip(HEADER, values.tolist()))
    header["norm"] = float(values[HEADER.index("norm"):][:1].view(torch.float64))
    ranks = wire[8 * len(HEADER):].view(torch.int64).view(-1, len(RANK_FIELDS)).tolist()
    header["positions"] = {rank[0]: dict(zip(RANK_FIELDS[1:], rank[1:])) for rank in ranks}
    return header


def fragment_of(name: str, fragments: int) -> int:
    """The fragment a parameter or buffer belongs to: strided across depth."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) % fragments
    return 0 if name.startswith("model.embed_tokens.") else fragments - 1


@dataclass
class Fragment:
    params: list[int]  # indices into OuterState.local
    biases: list[int]  # indices into OuterState.biases
    numel: int
    bias_numel: int


@dataclass
class Payload:
    """One group's contribution to an outer step, as sent."""
    wire: torch.Tensor  # uint8
    round: int  # the outer step it is for
    fragment: int
    version: int  # the train state's version it was computed on
    trained: int  # this process's trained tokens when it was packed
    sends: int = 0  # exchanges attempted with it

    def valid_for(self, round_: int, version: int) -> bool:
        return self.round == round_ and self.version == version


@dataclass
class Pending:
    """An exchange in flight (streaming trains overlap_steps inner steps meanwhile)."""
    payload: Payload
    exchange: Exchange
    step: int  # the step it was sent at
    started: float  # perf_counter at the quorum
    blocked_s: float  # time spent in the quorum and sending, not training


@dataclass
class OuterResult:
    committed: bool
    step: int  # the furthest participant's step
    fragment: int
    contributors: list[int]  # replicas whose pseudo-gradient is in the step
    nonfinite: list[int]  # replicas whose payload was not finite (left out)
    tokens: int  # tokens the contributors trained since their last contribution (the job's count)
    positions: dict[int, dict[str, int]]  # {shard: loader position} of the contributors
    bytes_sent: int
    odd: list[int] = field(default_factory=list)  # replicas whose G differs from the majority's (left out)
    agreed: bool = True  # a strict majority of the participants hold the same G
    spiked: list[int] = field(default_factory=list)  # replicas whose pseudo-gradient is a spike (left out)
    weights: dict[int, int] = field(default_factory=dict)  # {contributor: tokens}: its weight in the mean
    mean_delta: torch.Tensor | None = None  # the token-weighted mean pseudo-gradient of the fragment
    mean_biases: torch.Tensor | None = None
    owner_residual: Any = None  # a reduce-scatter owner's new error-feedback residual (OuterState.encode_mean)


class OuterState:
    """The global state G, the outer optimizer over it, and this process's own bookkeeping:
    the tokens it trained, since when each local fragment has trained on from G, and the
    error-feedback residuals."""

    def __init__(self, model: torch.nn.Module, cfg: ReplicasConfig) -> None:
        from stalwart.model.moe import MoE

        self.cfg = cfg
        count = cfg.fragments if cfg.strategy == "streaming" else 1
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # Sharded (FSDP2, expert parallelism): this rank's shards, which the same rank of
        # every group holds alike; G, the outer momentum and the exchange are of them.
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.local = [local_part(p) for p in self.params]  # views: writing to one writes the parameter
        self.header_bytes = 8 * (len(HEADER) + len(RANK_FIELDS) * cfg.ranks_per_group)
        moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.bias_names = [f"{name}.gate.e_score_correction_bias" for name, _ in moes]
        self.biases = [m.gate.e_score_correction_bias for _, m in moes]
        self.fragments = []
        for f in range(count):
            params = [i for i, n in enumerate(self.names) if fragment_of(n, count) == f]
            biases = [i for i, n in enumerate(self.bias_names) if fragment_of(n, count) == f]
            self.fragments.append(Fragment(params, biases, sum(self.local[i].numel() for i in params),
                                           sum(self.biases[i].numel() for i in biases)))
        self.global_params = [torch.nn.Parameter(p.detach().clone()) for p in self.local]
        self.global_biases = [b.detach().clone() for b in self.biases]
        # Nesterov needs a momentum: outer_momentum 0 is plain SGD (lr 1: the groups' mean).
        self.optimizer = torch.optim.SGD(self.global_params, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                         nesterov=cfg.outer_momentum > 0, foreach=False)
        self.feedback = [ErrorFeedback() for _ in self.fragments] if cfg.error_feedback else None
        self.owner_feedback = [None] * count if cfg.error_feedback else None  # a reduce-scatter owner's
        self.rounds = 0
        self.synced = {"step": 0, "tokens_seen": 0}  # the job's progress at the last outer step
        self.synced_at = [0] * count  # the step of each fragment's last outer step
        self.trained = 0  # tokens this process trained in inner steps
        self.base = [0] * count  # `trained` when each local fragment was last set from G
        self.counted = 0  # `trained` at this process's last contribution

    def fragment_for(self, round_: int) -> int:
        return (round_ - 1) % len(self.fragments)

    # -- what a heal and a checkpoint carry ----------------------------------------------

    def global_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with G in place of the local weights and biases (sharded
        as the model's parameters are)."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, g, p in zip(self.names, self.global_params, self.params):
            state[name] = Sharding.from_part(g.detach().clone(), p)
        for name, g in zip(self.bias_names, self.global_biases):
            state[name] = g.clone()
        return state

    def progress(self) -> dict[str, int]:
        """The step and tokens of the last outer step (what a heal or checkpoint carries)."""
        return dict(self.synced)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rounds": self.rounds, "synced_at": list(self.synced_at)}

    def checkpoint_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """For a sharded checkpoint: the outer momentum, sharded as its parameter is
        (`outer.INDEX.momentum_buffer`), and the rest of `state_dict()`, which names them."""
        state = self.state_dict()
        optimizer, tensors = state["optimizer"], {}
        for index, per_param in optimizer["state"].items():
            tensors[f"outer.{index}.momentum_buffer"] = Sharding.from_part(per_param["momentum_buffer"],
                                                                           self.params[int(index)])
        state["optimizer"] = {**optimizer, "state": {}}
        state["momenta"] = sorted(int(i) for i in optimizer["state"])
        return tensors, state

    def momentum_targets(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Where a sharded checkpoint's outer momentum is read to (`checkpoint_parts`)."""
        return {f"outer.{i}.momentum_buffer": torch.zeros_like(self.params[i]) for i in state.get("momenta", [])}

    @staticmethod
    def with_momenta(state: dict[str, Any], read: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`checkpoint_parts`' state with the momentum read into `read` (this rank's shards)."""
        momenta = {i: {"momentum_buffer": local_part(read[f"outer.{i}.momentum_buffer"])} for i in state["momenta"]}
        return {**state, "optimizer": {**state["optimizer"], "state": momenta}}

    def global_tensors(self) -> list[torch.Tensor]:
        momentum = [self.optimizer.state[g]["momentum_buffer"] for g in self.global_params
                    if self.optimizer.state[g].get("momentum_buffer") is not None]
        return [g.detach() for g in self.global_params] + self.global_biases + momentum

    def load_state_dict(self, state: dict[str, Any] | None, *, step: int, tokens_seen: int,
                        whole: bool = False) -> None:
        """After the model itself was loaded with a G: take it as G, with the outer optimizer
        (None: a state without one, a DDP checkpoint, starts a fresh one). `whole`: its
        momentum is whole (a whole checkpoint), and is cut to this rank's shards (a
        collective when sharded: every rank loads it)."""
        self.snapshot()
        self.synced_at = [step] * len(self.fragments)
        if state is not None:
            optimizer = state["optimizer"]
            if whole:
                optimizer = {**optimizer, "state": {i: {**per, "momentum_buffer": local_part(Sharding.local(
                    per["momentum_buffer"], self.params[int(i)]))} for i, per in optimizer["state"].items()}}
            self.optimizer.load_state_dict(optimizer)
            self.rounds = int(state["rounds"])
            self.synced_at = [int(v) for v in state.get("synced_at", self.synced_at)]
        self.synced = {"step": step, "tokens_seen": tokens_seen}
        self.base, self.counted = [self.trained] * len(self.fragments), self.trained
        if self.feedback is not None:  # the residuals are this process's own: they start again
            self.feedback = [ErrorFeedback() for _ in self.fragments]
            self.owner_feedback = [None] * len(self.fragments)

    def snapshot(self) -> None:
        """G := the model's current weights and biases."""
        with torch.no_grad():
            for g, p in zip(self.global_params, self.local):
                g.copy_(p)
            for g, b in zip(self.global_biases, self.biases):
                g.copy_(b)

    def reset_local(self) -> None:
        """The local weights and biases := G (what this process trained since is dropped,
        and what compression lost of it)."""
        with torch.no_grad():
            for g, p in zip(self.global_params, self.local):
                p.copy_(g)
            for g, b in zip(self.global_biases, self.biases):
                b.copy_(g)
        self.base, self.counted = [self.trained] * len(self.fragments), self.trained
        if self.feedback is not None:  # its own residuals; an owner's is of the groups' mean, and stays
            self.feedback = [ErrorFeedback() for _ in self.fragments]

    # -- one outer step ------------------------------------------------------------------

    def pack(self, fragment: int, *, replica: int, step: int, shard: int, position: dict[str, int],
             nonfinite: bool, version: int, round_: int, ranks: Any = None) -> Payload:
        """This group's payload for outer step `round_`: the fragment's pseudo-gradient
        G - local, compressed (with error feedback when on), or nothing but its header when
        it trained nothing on the fragment since it was last set from G. `nonfinite`: this
        group's round ended on a non-finite inner step (its payload is flagged either way
        when its own values are not finite).

        `ranks` (the replica group, with several ranks): each rank sends its own shards, to
        the same rank of the other groups, under one header for the whole group (its ranks
        agree on it: finite on all of them, one norm from all their shards, one fingerprint,
        every rank's data position), so that every rank of every group decides alike. The
        norm sums each rank's squares, a value held by several ranks once per rank: every
        group shards alike, so the spike bound (a ratio between groups) is unaffected."""
        f = self.fragments[fragment]
        # On the CPU: the wire goes over gloo, and is decoded there.
        delta = torch.cat([(self.global_params[i].detach() - self.local[i].detach()).reshape(-1).float().cpu()
                           for i in f.params]) if f.params else torch.zeros(0)
        biases = torch.cat([self.biases[i].detach().float().reshape(-1).cpu() for i in f.biases]) if f.biases \
            else torch.zeros(0)
        finite = not nonfinite and bool(torch.isfinite(delta).all()) and bool(torch.isfinite(biases).all())
        if ranks is not None:
            finite = ranks.every_rank(finite)
        tokens = self.trained - self.base[fragment]
        contribute = tokens > 0 and finite
        norm = 0.0
        if contribute:
            body = self._encode(delta, fragment)
            squares = float(decode(body, f.numel, self.cfg.compression).square().sum())  # what the others decode
            norm = math.sqrt(squares if ranks is None else ranks.sum_over_ranks(squares))
            contribute = finite = math.isfinite(norm)
        if not contribute:
            body = torch.zeros(wire_bytes(f.numel, self.cfg.compression), dtype=torch.uint8)
            biases = torch.zeros_like(biases)
        new_tokens = self.trained - self.counted
        own = fingerprint(self.global_tensors())
        mine = [shard, position["position"], position["start"], position["skip"]]
        header = torch.tensor([replica, step, tokens if contribute else 0, new_tokens if contribute else 0,
                               int(contribute), int(not finite), own if ranks is None else ranks.group_fingerprint(own),
                               0, *(mine if ranks is None else ranks.gather_over_ranks(mine))], dtype=torch.int64)
        at = HEADER.index("norm")
        header[at:at + 1] = torch.tensor([norm], dtype=torch.float64).view(torch.int64)
        wire = torch.cat([header.view(torch.uint8), biases.contiguous().view(torch.uint8), body])
        return Payload(wire, round_, fragment, version, self.trained)

    def _encode(self, delta: torch.Tensor, fragment: int) -> torch.Tensor:
        if self.feedback is not None:
            return self.feedback[fragment].encode(delta, self.cfg.compression)
        return encode(delta, self.cfg.compression)

    def prefix_bytes(self, fragment: int) -> int:
        """The bytes before a payload's body: its header and the fragment's biases."""
        return self.header_bytes + 4 * self.fragments[fragment].bias_numel

    def combine(self, gathered: list[torch.Tensor], fragment: int) -> OuterResult:
        """The outer step from every participant's whole payload (an all-gather's): decide
        from the headers, then the token-weighted mean of the contributors' pseudo-gradients
        (nothing is changed yet)."""
        f = self.fragments[fragment]
        result = self.decide(gathered, fragment, (len(gathered) - 1) * int(gathered[0].numel()))  # a ring's
        if result.committed:
            result.mean_delta = self.mean_range(gathered, result, fragment, 0, f.numel)
        return result

    def decide(self, received: list[torch.Tensor], fragment: int, bytes_sent: int) -> OuterResult:
        """Who takes part in the outer step, from what every participant sent (each
        message starts with its payload's header and biases), and the mean of the biases.
        Left out: payloads that are not finite, those of a group whose G differs from the
        majority's (its pseudo-gradient is against another G), and spikes (OUTER_SPIKE).
        Every participant decides the same from the same headers."""
        f = self.fragments[fragment]
        head = self.header_bytes
        headers = sorted((_header(wire[:head]) for wire in received), key=lambda header: header["replica"])
        step = max(header["step"] for header in headers)
        odd, agreed = odd_ones_out({header["replica"]: header["fingerprint"] for header in headers})
        if not agreed:
            return OuterResult(False, step, fragment, [], [], 0, {}, bytes_sent, odd=odd, agreed=False)
        nonfinite = [header["replica"] for header in headers if header["nonfinite"]]
        decided = [header for header in headers if header["contributed"] and header["replica"] not in odd]
        per_token = sorted(header["norm"] / header["tokens"] for header in decided)
        bound = OUTER_SPIKE * per_token[(len(per_token) - 1) // 2] if len(per_token) > 1 else float("inf")
        spiked = [header["replica"] for header in decided if header["norm"] / header["tokens"] > bound]
        chosen = [header for header in decided if header["replica"] not in spiked]
        if not chosen:
            return OuterResult(False, step, fragment, [], nonfinite, 0, {}, bytes_sent, odd=odd, spiked=spiked)
        weights = {header["replica"]: header["tokens"] for header in chosen}
        bias_total = torch.zeros(f.bias_numel, dtype=torch.float32)
        for wire in sorted(received, key=lambda wire: _header(wire[:head])["replica"]):
            replica = _header(wire[:head])["replica"]
            if replica in weights:
                bias_total += wire[head:head + 4 * f.bias_numel].view(torch.float32) * weights[replica]
        positions = {shard: position for header in chosen for shard, position in header["positions"].items()}
        return OuterResult(True, step, fragment, sorted(weights), nonfinite,
                           sum(header["new_tokens"] for header in chosen), positions, bytes_sent, odd=odd,
                           spiked=spiked, weights=weights, mean_biases=bias_total / sum(weights.values()))

    def mean_range(self, received: list[torch.Tensor], result: OuterResult, fragment: int, lo: int,
                   hi: int) -> torch.Tensor:
        """The token-weighted mean of the contributors' pseudo-gradients over values lo..hi,
        summed in fp32 in replica order. Each message's body is the wire form of those values
        (of all of them, from an all-gather; of a reduce-scatter's range otherwise)."""
        head, prefix = self.header_bytes, self.prefix_bytes(fragment)
        total = torch.zeros(hi - lo, dtype=torch.float32)
        for wire in sorted(received, key=lambda wire: _header(wire[:head])["replica"]):
            weight = result.weights.get(_header(wire[:head])["replica"])
            if weight is not None:
                total += decode(wire[prefix:], hi - lo, self.cfg.compression) * weight
        return total / sum(result.weights.values())

    def encode_mean(self, mean: torch.Tensor, fragment: int, key: tuple[int, int]) -> tuple[torch.Tensor, Any]:
        """A reduce-scatter's reduced range, compressed to go back to every participant.
        With error feedback, its owner keeps what compression lost of it for the next
        round whose range is the same (`key`: participants and this one's place); the
        residual is returned, taken only when the step is applied."""
        if self.owner_feedback is None:
            return encode(mean, self.cfg.compression), None
        kept = self.owner_feedback[fragment]
        target = mean + kept[1] if kept is not None and kept[0] == key else mean
        wire = encode(target, self.cfg.compression)
        return wire, (key, target - decode(wire, target.numel(), self.cfg.compression))

    def apply(self, result: OuterResult, sent: Payload, *, mixing: float, contributed: bool) -> None:
        """The outer step on the fragment (when anyone contributed): G moves; the local
        fragment becomes mixing x local + (1 - mixing) x G, or G when this group did not
        contribute (`sent`: what it sent). The job's token count adds what the contributors
        trained since they last contributed."""
        f = self.fragments[result.fragment]
        if result.committed and self.owner_feedback is not None:
            self.owner_feedback[result.fragment] = result.owner_residual
        if result.committed:
            offset = 0
            for i in f.params:
                g = self.global_params[i]
                g.grad = result.mean_delta[offset:offset + g.numel()].view_as(g).to(g.device, g.dtype)
                offset += g.numel()
            self.optimizer.step()  # parameters without a gradient (other fragments) do not move
            self.optimizer.zero_grad(set_to_none=True)
            offset = 0
            for i in f.biases:
                g = self.global_biases[i]
                g.copy_(result.mean_biases[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        keep = mixing if contributed else 0.0
        with torch.no_grad():
            for i in f.params:
                self.local[i].mul_(keep).add_(self.global_params[i].detach(), alpha=1 - keep)
            for i in f.biases:
                self.biases[i].mul_(keep).add_(self.global_biases[i], alpha=1 - keep)
        self.base[result.fragment] = self.trained
        if contributed:
            self.counted = sent.trained  # what it trained during an overlap counts with its next payload
        self.rounds += 1
        self.synced_at[result.fragment] = result.step
        self.synced = {"step": result.step, "tokens_seen": self.synced["tokens_seen"] + result.tokens}


class Exchange:
    """One outer exchange in flight, among the quorum's participants; `wait()` gives the
    outer step decided (nothing changed yet), or None if a collective failed.

    Two participants or fewer: one all-gather of the whole payloads, on the backend's
    threads, and `OuterState.combine`. More: a reduce-scatter then an all-gather, on a
    thread of its own (the caller may train on meanwhile): participant k receives every
    payload's header, biases and range k of its body (an all-to-all), decides from the
    headers as every participant does, reduces its range to the token-weighted mean, and
    sends it back compressed in an all-gather; everyone decodes the same ranges. Each
    group sends about 2 (n - 1) / n payloads instead of n - 1 (compress.exchange_sent).
    The mean is compressed a second time: with error feedback its owner keeps what that
    lost for the next round in which it owns the same range. Every group checks that the
    decoded mean is finite (each range was reduced by one owner only)."""

    def __init__(self, outer: OuterState, payload: Payload, group: Any, step: int) -> None:
        self.outer, self.payload, self.group, self.step = outer, payload, group, step
        self.participants, self.me = group.participants, group.participant
        self._result: OuterResult | None = None
        self._error: BaseException | None = None  # not a collective's failure: a fault of this process
        self.failure: BaseException | None = None  # why it failed when its collectives did not
        self._gather: Gather | None = None
        self._thread: threading.Thread | None = None
        if self.participants <= 2:
            self._gather = group.allgather_across_groups(payload.wire)
        else:
            self._thread = threading.Thread(target=self._reduce_scatter, name="outer-exchange", daemon=True)
            self._thread.start()

    def wait(self) -> OuterResult | None:
        if self._gather is not None:
            gathered = self._gather.wait()
            return None if gathered is None else self.outer.combine(gathered, self.payload.fragment)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def _reduce_scatter(self) -> None:
        try:
            self._result = self._reduce_scatter_steps()
        except BaseException as error:  # noqa: BLE001 (raised again in wait, on the training thread)
            self._error = error

    def _reduce_scatter_steps(self) -> OuterResult | None:
        outer, payload, group, n, me = self.outer, self.payload, self.group, self.participants, self.me
        fragment, compression = payload.fragment, outer.cfg.compression
        numel = outer.fragments[fragment].numel
        prefix = outer.prefix_bytes(fragment)
        head, body = payload.wire[:prefix], payload.wire[prefix:]
        ranges = chunk_ranges(numel, n)
        sizes = [wire_bytes(hi - lo, compression) for lo, hi in ranges]
        messages = [torch.cat([head, wire_slice(body, numel, compression, lo, hi)]) for lo, hi in ranges]
        received = group.alltoall_across_groups(messages, [prefix + sizes[me]] * n).wait()
        if received is None:
            return None
        inject("kill-in-reduce", self.step)
        sent = sum(prefix + size for k, size in enumerate(sizes) if k != me)
        result = outer.decide(received, fragment, sent)
        if result.committed:
            lo, hi = ranges[me]
            mean, result.owner_residual = outer.encode_mean(outer.mean_range(received, result, fragment, lo, hi),
                                                            fragment, (n, me))
            padded = torch.zeros(max(sizes), dtype=torch.uint8)
            padded[:mean.numel()] = mean
            reduced = group.allgather_across_groups(padded).wait()
            if reduced is None:
                return None
            result.mean_delta = torch.cat([decode(wire[:size], hi - lo, compression) for wire, size, (lo, hi) in
                                           zip(reduced, sizes, ranges)])
            # Each range was reduced once, by its owner: a fault there would reach every G
            # alike, where fingerprints cannot see it. Every group checks the same bytes.
            if not bool(torch.isfinite(result.mean_delta).all()):
                self.failure = ValueError("a reduced range of the outer step is not finite")
                return None
            result.bytes_sent += (n - 1) * max(sizes)
        return result


class Rounds:
    """What the training loop does between inner steps: the quorum, the exchange (sent
    again after a failure, finished after the overlap), the outer step, its metrics, and
    the checkpoint when due. A (re)started group starts with a sync: it joins the round in
    progress there."""

    def __init__(self, job: Job, recovery: Recovery) -> None:
        self.job, self.recovery = job, recovery
        self.outer: OuterState = job.state.outer
        r = job.cfg.replicas
        streaming = r.strategy == "streaming"
        fragments = len(self.outer.fragments)
        # Between two rounds: inner_steps / fragments steps, or with inner_steps auto,
        # round_s / fragments seconds of training, whatever this group's speed.
        self.auto = r.inner_steps == "auto"
        self.interval = 0 if self.auto else r.inner_steps // fragments
        self.budget_s = r.round_s / fragments
        self.round_started = time.perf_counter()
        self.round_mark = self.outer.trained  # `trained` when this round's inner steps began
        self.last_step_s = 0.0
        self.overlap = r.overlap_steps if streaming else 0
        self.mixing = r.mixing if streaming else 0.0
        self.joining = True  # the first sync of this process
        self.resend = False  # the last exchange failed: its payload goes again after a quorum
        self.kept: Payload | None = None
        self.pending: Pending | None = None
        self.sent_at = self.outer.synced["step"]  # the step of the last round this group sent
        self.nonfinite = False  # this round ended on a non-finite inner step
        self.left_out_in_row = 0  # rounds in a row this group was left out (not finite, a spike)
        self.force_heal = False  # this group's G is not the majority's: heal at the next quorum

    @property
    def due(self) -> bool:
        """Whether the loop syncs before the next inner step."""
        step, total = self.job.state.step, self.job.cfg.train.steps
        if self.pending is not None:
            return step >= self.pending.step + self.overlap or step >= total
        if step >= total and min(self.outer.synced_at) >= total:
            return False  # finished (a finished run resumed, too)
        if self.joining or self.resend or self.nonfinite:
            return True
        if step >= total:
            return min(self.outer.synced_at) < total  # every fragment syncs once at the end
        if self.auto:  # the round's time is up, give or take half a step, and it trained
            return (self.outer.trained > self.round_mark
                    and time.perf_counter() - self.round_started + self.last_step_s / 2 >= self.budget_s)
        return step - max(self.sent_at, self.outer.synced["step"]) >= self.interval

    def inner_done(self, *, committed: bool, nonfinite: bool, seconds: float) -> None:
        """After an inner step. One whose values were not finite ends this group's round:
        what it trained since G is lost, and it goes to the next sync at once (streaming:
        skipping to that round's step, so that it arrives when the others do)."""
        self.last_step_s = seconds
        if committed:  # a group's inner step is committed on all its ranks or none
            self.outer.trained += self.job.tokens_per_batch * group_rank()[1]
        if nonfinite and not self.nonfinite:
            self.nonfinite = True
            state = self.job.state
            if self.interval and len(self.outer.fragments) > 1:
                state.step = min((state.step // self.interval + 1) * self.interval, self.job.cfg.train.steps)

    def sync(self) -> OuterResult | None:
        """Finish the exchange in flight, or start the next one (and finish it at once
        unless it overlaps inner steps); None when nothing was applied."""
        if self.pending is not None:
            return self._finish()
        job, state, group, outer = self.job, self.job.state, self.job.group, self.outer
        self._wait_for_round_end()
        t0 = time.perf_counter()
        job.join_quorum()
        self._ranks_alike()
        round_ = outer.rounds + 1
        reuse = group.every_rank(self.kept is not None and self.kept.valid_for(round_, state.version))
        payload = self.kept if reuse else None
        if payload is None:
            payload = outer.pack(outer.fragment_for(round_), replica=group.replica, step=state.step,
                                 shard=state.loader.shard, position=state.loader.state_dict(),
                                 nonfinite=self.nonfinite, version=state.version, round_=round_, ranks=group)
        # The payload carries the flag; a non-finite step during the overlap sets it again.
        flagged, self.nonfinite = self.nonfinite, False
        payload.sends += 1
        inject("kill-in-exchange", state.step)
        self.pending = Pending(payload, Exchange(outer, payload, group, state.step), state.step, t0, time.perf_counter() - t0)
        overlaps = (self.overlap and payload.sends == 1 and not (self.joining or group.healed or flagged)
                    and state.step < job.cfg.train.steps)
        if payload.sends == 1:  # a payload sent again keeps its round's place in the schedule
            self.sent_at = state.step
        self.joining, self.resend = False, False
        result = None if overlaps else self._finish()
        self.round_started, self.round_mark = time.perf_counter(), outer.trained  # the next round starts now
        return result

    def _ranks_alike(self) -> None:
        """The ranks of a group must hold one round's state, or their payloads' headers
        (and the collectives that agree on them) differ. torchft heals each rank on its own:
        at its step 0 only the ranks whose group is not their donor's heal, which is
        harmless while every group holds the same state (a job's start) and not once one
        has trained (every group's first exchange failed and one restarted). Then the group
        restarts (HealTorn) and heals whole."""
        outer = self.outer
        mine = [self.job.state.step, outer.rounds, outer.trained, outer.counted, *outer.base]
        every = self.job.group.gather_over_ranks(mine)
        if any(every[i:i + len(mine)] != mine for i in range(0, len(every), len(mine))):
            raise HealTorn("the ranks of this group hold different rounds' states after a quorum "
                           "(a heal reached some of them only)")

    def _wait_for_round_end(self) -> None:
        """inner_steps auto: a group that goes to the sync early (it reached train.steps, or
        its inner step was not finite) waits for the round's time, when the others come."""
        if not self.auto or self.joining or self.resend:
            return
        while (left := self.budget_s - (time.perf_counter() - self.round_started)) > 0:
            self.job.run.beat()
            time.sleep(min(left, 0.1))

    def finish(self) -> None:
        """After the last round: one more quorum, at which a group found outside the
        majority in that round heals (it must not export or report its G), then the last
        checkpoint, by the lowest group."""
        job, group, step = self.job, self.job.group, self.outer.synced["step"]
        job.join_quorum()
        group.set_step(self.outer.rounds + 1)
        if group.participant == 0 and self._rank0(not (job.run.checkpoints / step_dir_name(step)).exists()):
            self.recovery.save(step)  # by all of the lowest group's ranks: a sharded checkpoint takes them all

    def _rank0(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank of this group (its checkpoint clock, what it sees
        on disk): its ranks checkpoint together or not at all."""
        ranks = self.job.ranks
        return flag if ranks is None else bool(ranks.broadcast(int(flag)))

    def _finish(self) -> OuterResult | None:
        job, state, group, outer = self.job, self.job.state, self.job.group, self.outer
        pending, self.pending = self.pending, None
        t = time.perf_counter()
        result = pending.exchange.wait()
        error = group.error() or pending.exchange.failure  # why it failed, before the vote adds its own
        # The vote even after a failure: torchft counts the failed commit, so the next
        # quorum reconfigures the process group (a group whose heal failed never joined
        # the collective, and its peers' counters are one ahead of its own).
        if not group.should_commit(result is not None, "the exchange failed") or result is None:
            return self._failed(pending, error)
        blocked = pending.blocked_s + time.perf_counter() - t
        self.kept, self.recovery.failed_in_row = None, 0
        total = job.cfg.train.steps
        final = result.step >= total
        if not result.agreed:
            self._disagreed(result)
        elif result.committed or final:  # at the end a round counts even when nobody trained
            self._apply(result, pending.payload, final=final)
        # torchft's step: one more than the outer steps once a group has synced, so that a
        # group that has not (a restart, at its checkpoint's count) is behind and heals,
        # and torchft's first-quorum sync (init_sync, at step 0) happens once only.
        group.set_step(outer.rounds + 1)
        self._left_out(result, pending.payload.round)
        state.tokens_seen = outer.synced["tokens_seen"] + outer.trained - outer.counted
        record = {"step": state.step, "round": pending.payload.round, "outer": result.committed,
                  "bytes_sent": result.bytes_sent, "sync_s": round(blocked, 4),
                  "exchange_s": round(time.perf_counter() - pending.started, 4), "participants": group.participants,
                  "contributors": result.contributors, "tokens": state.tokens_seen, "time": round(time.time(), 4)}
        if len(outer.fragments) > 1:
            record["fragment"] = result.fragment
        if pending.payload.sends > 1:
            record["sends"] = pending.payload.sends
        if job.cfg.train.trace_data:
            record["data"] = {str(k): ":".join(str(v) for v in p.values()) for k, p in sorted(result.positions.items())}
        job.run.append_metrics(record)
        return result

    def _apply(self, result: OuterResult, sent: Payload, *, final: bool) -> None:
        job, state, group, outer = self.job, self.job.state, self.job.group, self.outer
        contributed = group.replica in result.contributors
        own = outer.trained - outer.base[result.fragment]
        if not contributed and own > 0:
            job.run.event("work_discarded", from_step=outer.synced_at[result.fragment], to_step=state.step,
                          reason="left out of the outer step")
        outer.apply(result, sent, mixing=0.0 if final else self.mixing, contributed=contributed)
        state.step = max(state.step, result.step)
        state.record_shards(result.positions)
        if not contributed:
            state.rewind_loader()  # its batches since its last contribution are drawn again
        if not final and group.participant == 0 and group.replica not in result.odd \
                and self._rank0(self.recovery.clock.due(outer.synced["step"], job.cfg.train.steps)):
            self.recovery.save(outer.synced["step"])  # the last one: finish(); sharded, by every rank

    def _disagreed(self, result: OuterResult) -> None:
        """The groups' G differ and no strict majority holds one (two groups, a tie): nobody
        is known good. The lowest group goes back to its newest checkpoint, the last G they
        agreed on (without one it keeps its own), and every other group heals from it: one
        source, even where only the lowest group's machine has the checkpoints."""
        job, state, group = self.job, self.job.state, self.job.group
        job.run.event("step_corrupt", step=state.step, cause="sdc", reason="global weights differ with no majority",
                      replicas=result.odd)
        if group.participant != 0:  # every rank of the lowest group rolls back
            self.force_heal = True
        elif self.recovery.rollback(state.step, data=True, reason="global weights differ with no majority"):
            self.sent_at, self.nonfinite = self.outer.synced["step"], False

    def _failed(self, pending: Pending, error: BaseException | None) -> None:
        job, state, group = self.job, self.job.state, self.job.group
        self.kept, self.resend = pending.payload, True
        self.recovery.failed_in_row += 1
        reason = first_line(error)
        job.run.event("step_failed", step=state.step, round=pending.payload.round, participants=group.participants,
                      seconds=round(time.perf_counter() - pending.started, 3), error=reason)
        limit = job.cfg.replicas.max_failed_steps
        if self.recovery.failed_in_row >= limit and group.participant != 0:
            raise Partitioned(f"{self.recovery.failed_in_row} outer exchanges in a row failed "
                              f"(replicas.max_failed_steps {limit}); last: {reason}")

    def _left_out(self, result: OuterResult, round_: int) -> None:
        """What a group left out of the outer step does. Its G differs from the majority's:
        it heals at the next quorum. Its pseudo-gradient was a spike or not finite: its local
        weights become G and its AdamW moments (which may hold the fault) start again; not
        finite twice in a row, its device is suspect: the process exits (EXIT_NONFINITE) and
        is restarted."""
        job, me = self.job, self.job.group.replica
        if me in result.odd and result.agreed:
            job.run.event("step_corrupt", step=job.state.step, cause="sdc", round=round_,
                          reason="global weights differ from the majority's")
            self.force_heal = True
        if self.force_heal:
            job.group.set_step(0)  # behind every peer: the next quorum heals it
            self.force_heal = False
            return
        if me not in result.nonfinite and me not in result.spiked:
            self.left_out_in_row = 0
            return
        cause = "spike" if me in result.spiked else "nonfinite"
        what = "a spike" if cause == "spike" else "not finite"
        job.run.event("step_corrupt", step=job.state.step, cause=cause, round=round_, reason=f"pseudo-gradient {what}")
        self.left_out_in_row += 1
        if self.left_out_in_row > 1:
            raise NonFiniteAfterHeal(f"pseudo-gradient left out (last: {what}) in {self.left_out_in_row} rounds "
                                     "in a row")
        self.outer.reset_local()
        job.state.optimizer.state = defaultdict(dict)
        self.nonfinite = False  # what a step during the overlap saw is gone with the local weights
