"""A step's prompts cut into shares, and the one buffer that carries them between replica
groups (docs/design.md, "RL on replica groups").

Each step's `rl.prompts` problems are cut into `replicas.count` shares, share s holding
problems [s P / R, (s + 1) P / R). A share is sampled as its own batch, seeded by the step
and its number (`share_seed`), then scored and differentiated on its own: what it gives
depends on the weights and its number only, never on which group computes it or with
whom. In a quorum of n groups, the group in place p takes the shares s with s mod n = p
(`shares_of`); the share of a group that died is taken by a survivor at the next quorum,
with the same seed, and so gives the same completions.

The buffer has a region per share for what overlaps between shares (its gradients, their
has-gradient flags, its sums) and a slot per completion for what does not (reward,
correctness, length); each has exactly one contributor, counted in a slot per share (and
named in another: the replica group that computed it). Slots per replica group carry,
at the steps that check them, the fingerprint of the group's weights and AdamW state, and
whether the group's own values were not finite (it then sends none of its shares).
The sum over the participants is therefore exact (x + 0 is x), and every group then adds
the shares' regions in share order: the update is bit-identical whoever computed which
share. The price: the buffer holds R gradients.
"""

from __future__ import annotations

import zlib

import torch

# A share's sums: the objective's (rl/objective.py), then the sampling policy's (entropy,
# sampler log-probability gap and routing, from the first forward of the step).
SUMS = ("weight", "weighted_loss", "clipped", "kl", "tokens", "routing_differ", "routing_compared",
        "policy_entropy", "policy_gap", "policy_tokens", "policy_routing_differ", "policy_routing_compared")
SLOTS = ("reward", "correct", "length")  # per completion
_CHUNK = 1 << 21  # a fingerprint (< 2^61) travels as three float32-exact 21-bit chunks


def share_seed(seed: int, step: int, share: int) -> int:
    return zlib.crc32(f"rl:{seed}:{step}:{share}".encode())


def share_bounds(prompts: int, shares: int, share: int) -> range:
    """The step's problem indices in `share`."""
    return range(share * prompts // shares, (share + 1) * prompts // shares)


def shares_of(participant: int, participants: int, shares: int) -> list[int]:
    """The shares the group in place `participant` of a quorum of `participants` computes."""
    return [s for s in range(shares) if s % participants == participant]


class ShareExchange:
    """One update's buffer for `shares` shares of a step of `completions` completions."""

    def __init__(self, params: list[torch.Tensor], shares: int, completions: int) -> None:
        self.params, self.shares, self.completions = params, shares, completions  # a share per replica group
        self.numel = sum(p.numel() for p in params)
        self.region = self.numel + len(params) + len(SUMS)
        self.buffer = torch.zeros(shares * self.region + len(SLOTS) * completions + 7 * shares)

    def _share(self, share: int) -> torch.Tensor:
        return self.buffer[share * self.region:(share + 1) * self.region]

    def _slots(self, name: str) -> torch.Tensor:
        start = self.shares * self.region + SLOTS.index(name) * self.completions
        return self.buffer[start:start + self.completions]

    def _fingerprint_slot(self, replica: int) -> torch.Tensor:
        start = self.shares * self.region + len(SLOTS) * self.completions + 4 * replica
        return self.buffer[start:start + 4]

    def put_fingerprint(self, replica: int, value: int) -> None:
        """Group `replica`'s fingerprint (guards.fingerprint)."""
        slot = self._fingerprint_slot(replica)
        slot[0] = 1.0
        for i in range(3):
            value, slot[1 + i] = divmod(value, _CHUNK)

    def fingerprints(self) -> dict[int, int]:
        """{replica: fingerprint} of the groups that sent one (after the sum)."""
        found = {}
        for replica in range(self.shares):
            flag, *chunks = (int(v) for v in self._fingerprint_slot(replica).tolist())
            if flag:
                found[replica] = sum(c * _CHUNK**i for i, c in enumerate(chunks))
        return found

    def _nonfinite(self) -> torch.Tensor:
        end = self.buffer.numel() - 2 * self.shares
        return self.buffer[end - self.shares:end]

    def put_nonfinite(self, replica: int) -> None:
        """Group `replica`'s own values were not finite: it sends none of its shares."""
        self._nonfinite()[replica] = 1.0

    def nonfinite_groups(self) -> list[int]:
        return [r for r, flag in enumerate(self._nonfinite().tolist()) if flag]

    def _contributors(self) -> torch.Tensor:
        return self.buffer[self.buffer.numel() - 2 * self.shares:self.buffer.numel() - self.shares]

    def _computed_by(self) -> torch.Tensor:
        return self.buffer[self.buffer.numel() - self.shares:]

    def put(self, share: int, sums: dict[str, float], first: int, slots: dict[str, torch.Tensor], *,
            replica: int = 0) -> None:
        """This group's (`replica`'s) `share`: the parameters' .grad (the share's weighted
        loss's), its `sums`, and its completions' `slots` from completion `first` on."""
        region = self._share(share)
        offset = 0
        for i, p in enumerate(self.params):
            n = p.numel()
            if p.grad is not None:
                region[offset:offset + n] = p.grad.reshape(-1)
                region[self.numel + i] = 1.0
            offset += n
        for name, value in sums.items():
            region[self.numel + len(self.params) + SUMS.index(name)] = value
        for name, values in slots.items():
            self._slots(name)[first:first + values.numel()] = values.float()
        self._contributors()[share] = 1.0
        self._computed_by()[share] = replica

    def unclaimed(self) -> list[int]:
        """Shares that no participant, or more than one, contributed (after the sum)."""
        return [s for s, n in enumerate(self._contributors().tolist()) if n != 1.0]

    def set_gradients(self) -> None:
        """The shares' gradients, added in share order and divided by their total weight,
        into the parameters' .grad; None where no share had one (AdamW then skips it)."""
        weight = self.sums()["weight"]
        total = self._share(0)[:self.numel].clone()
        for s in range(1, self.shares):
            total += self._share(s)[:self.numel]
        total = total / weight + 0.0  # + 0.0: the same zero (+0) whoever summed
        flags = sum(self._share(s)[self.numel:self.numel + len(self.params)] for s in range(self.shares)).tolist()
        offset = 0
        for p, flag in zip(self.params, flags):
            n = p.numel()
            p.grad = total[offset:offset + n].view_as(p).to(p.dtype) if flag > 0 else None
            offset += n

    def sums(self) -> dict[str, float]:
        """Each sum over the shares, added in share order."""
        base = self.numel + len(self.params)
        total = [0.0] * len(SUMS)
        for s in range(self.shares):
            for i, value in enumerate(self._share(s)[base:base + len(SUMS)].tolist()):
                total[i] += value
        return dict(zip(SUMS, total))

    def computed_by(self) -> list[int]:
        """The replica group that computed each share."""
        return [int(r) for r in self._computed_by().tolist()]

    def slots(self, name: str) -> torch.Tensor:
        return self._slots(name).clone()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.buffer).all())
