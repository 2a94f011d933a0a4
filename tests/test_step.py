"""The step state machine in one process: the mapping from what a step saw to its outcome,
the exchange buffer (non-finite ranks left out, the data ledger, the checkpoint flag),
the loader's three-integer position, a step sent again after its collective failed, and the
escalation of a run that never commits."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from stalwart.config import apply_overrides
from stalwart.data.loader import PackedLoader, TaskDocuments, text_of
from stalwart.data.tokenizer import train_tokenizer
from stalwart.guards import NONFINITE, OK, ROLLBACK, SPIKE, Verdict
from stalwart.training.exchange import StepExchange
from stalwart.recipes import recipe
from stalwart.replication.group import LocalGroup
from stalwart.training.setup import setup
from stalwart.training.step import COMMITTED, CORRUPT, FAILED, ROLLED_BACK, SKIPPED, outcome_of, train_step

GOOD, SPIKED, BACK, NAN = Verdict(OK), Verdict(SPIKE, "s"), Verdict(ROLLBACK, "r"), Verdict(NONFINITE, "n")


@pytest.mark.parametrize("collective_ok, own_finite, healthy, verdict, voted, outcome", [
    (False, True, 0, GOOD, False, FAILED),        # a peer died mid-collective
    (False, False, 0, GOOD, False, FAILED),       # broken collective wins over everything
    (True, True, 3, GOOD, True, COMMITTED),
    (True, True, 3, GOOD, False, FAILED),         # the vote failed (too few replicas, an error)
    (True, True, 3, SPIKED, False, SKIPPED),      # a guard voted it down everywhere
    (True, True, 3, NAN, False, SKIPPED),
    (True, True, 3, BACK, False, ROLLED_BACK),
    (True, False, 2, GOOD, False, CORRUPT),       # own values bad, others fine: heal from them
    (True, False, 2, SPIKED, False, CORRUPT),
    (True, False, 0, NAN, False, SKIPPED),        # nobody has finite values: nobody to heal from
])
def test_outcome_of_maps_every_case(collective_ok, own_finite, healthy, verdict, voted, outcome):
    assert outcome_of(collective_ok=collective_ok, own_finite=own_finite, healthy=healthy, verdict=verdict,
                      voted=voted) == outcome


def _pack(replica: int, grad: float, *, shard: int, position: dict, due: bool = False, contribute: bool = True,
          heals: bool = True):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), grad)
    group = SimpleNamespace(num_replicas=3, replica=replica, heals=heals)
    return StepExchange.pack([p], torch.tensor([grad, grad, 0.0]), [], group, 0.5, shard=shard, num_shards=3,
                             position=position, checkpoint_due=due, contribute=contribute, device=torch.device("cpu")), p


def test_exchange_leaves_non_finite_ranks_out_and_carries_the_ledger():
    big = {"position": 3 * 2**24 + 64, "start": 2**24 + 128, "skip": 17}  # beyond float32's exact integers
    parts = [_pack(0, 1.0, shard=0, position=big, due=True), _pack(1, float("nan"), shard=1, position=big),
             _pack(2, 3.0, shard=2, position={"position": 128, "start": 64, "skip": 5})]
    assert [x.own_finite for x, _ in parts] == [True, False, True]
    total = sum(x.buffer for x, _ in parts)  # what the all-reduce computes
    result, param = parts[0]
    result.buffer.copy_(total)
    assert torch.isfinite(result.buffer).all()
    positions = result.shard_positions()
    assert positions == {0: big, 2: {"position": 128, "start": 64, "skip": 5}}  # shard 1 did not count
    result.unpack_gradients([param], len(positions))
    assert torch.equal(param.grad, torch.full((4,), 2.0))  # (1 + 3) / 2: the NaN group is not in the mean
    assert result.nonfinite_replicas() == [1] and sorted(result.compute_times()) == [0, 1, 2]
    assert result.checkpoint_due()


def test_without_a_peer_group_to_heal_from_a_ranks_nan_goes_into_the_sum():
    # Plain torchrun (RanksGroup): every rank sees the non-finite sum, and the guard skips the step.
    ranks = [_pack(0, 1.0, shard=0, position={"position": 64, "start": 0, "skip": 0}, heals=False),
             _pack(0, float("nan"), shard=1, position={"position": 64, "start": 0, "skip": 0}, heals=False)]
    assert [x.own_finite for x, _ in ranks] == [True, True]
    result, param = ranks[0]
    result.buffer.copy_(sum(x.buffer for x, _ in ranks))
    assert sorted(result.shard_positions()) == [0, 1] and result.nonfinite_replicas() == []
    result.unpack_gradients([param], 2)
    assert torch.isnan(param.grad).all()


def test_a_group_known_bad_contributes_only_its_flags():
    x, _ = _pack(1, 5.0, shard=1, position={"position": 0, "start": 0, "skip": 0}, contribute=False)
    assert not x.own_finite and x.shard_positions() == {} and x.nonfinite_replicas() == [1]


@pytest.fixture(scope="module")
def tokenizer():
    docs = TaskDocuments("addition", "train", 0, 1, 3)
    return train_tokenizer((text_of(docs.document(i)) for i in range(300)), 512)


def test_every_loader_position_restores_the_same_batches(tokenizer):
    docs = TaskDocuments("addition", "train", 0, 1, 3)
    loader = PackedLoader(docs, tokenizer, seq_len=16, batch_size=3, shard=1, num_shards=2)
    states, batches = [], []
    for _ in range(40):
        states.append(loader.state_dict())
        batches.append(loader.next_batch())
    assert set(states[-1]) == {"position", "start", "skip"} and all(isinstance(v, int) for v in states[-1].values())
    for i in (0, 7, 23, 39):
        other = PackedLoader(docs, tokenizer, seq_len=16, batch_size=3, shard=1, num_shards=2)
        other.load_state_dict(states[i])
        for expected in batches[i:i + 2]:
            got = other.next_batch()
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _train(out, *extra, inject=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_INJECT": inject}
    return subprocess.run([sys.executable, "-m", "stalwart", "train", "--recipe", "smoke", "--quiet", "--out",
                           str(out), "--eval.problems", "0", *extra], capture_output=True, text=True, timeout=180,
                          env=env)


def test_a_run_that_never_commits_escalates_to_a_rollback_then_stops_with_exit_1(tmp_path):
    # A device that produces NaN from step 8 on: every step is skipped. After 4 skips the
    # fingerprints are compared, after 8 the run rolls back to its checkpoint, after 12 it stops.
    r = _train(tmp_path / "r", "--train.steps", "40", "--guards.max_uncommitted_steps", "4",
               "--checkpoint.every", "5", inject="nan-device@8")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopped" in lines[0] and "no step committed in 12 attempts" in lines[0], r.stderr
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("step_skipped") == 12  # bounded: it never spins
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["to_step"] == 5 and "without a commit" in rollback["reason"]
    assert kinds[-1] == "stalled"


class _BreakingGroup(LocalGroup):
    """One group with a slot for a peer that never sends: the exchange is packed as in a
    replicated job; `break_next` makes the next collective fail half-way (having already
    summed into the buffer, as gloo does)."""

    num_replicas = 2

    def __init__(self) -> None:
        self.break_next, self._error = False, None

    def allreduce_sum(self, buffer: torch.Tensor, *, across_only: int = 0) -> bool:
        self._error = RuntimeError("Connection closed by peer") if self.break_next else None
        self.break_next = False
        if self._error is not None:
            buffer.mul_(3.0)
        return self._error is None

    def error(self):
        return self._error


def _job(out):
    cfg = apply_overrides(recipe("smoke"), {"train.steps": "4", "eval.problems": "0", "eval.batches": "0"})
    job = setup(cfg, out, resume=False, quiet=True, replica=None)
    job.group = _BreakingGroup()
    return job


def test_a_step_whose_collective_failed_is_sent_again_and_commits_exactly_what_a_fresh_step_would(tmp_path):
    kept_job, fresh_job = _job(tmp_path / "kept"), _job(tmp_path / "fresh")
    kept_job.group.break_next = True
    failed = train_step(kept_job, 1)
    assert failed.outcome == FAILED and "closed by peer" in failed.error
    assert failed.kept is not None and failed.kept.valid_for(1, kept_job.state)
    assert kept_job.state.loader.state_dict() == fresh_job.state.loader.state_dict()  # nothing consumed yet
    resent, fresh = train_step(kept_job, 1, kept=failed.kept), train_step(fresh_job, 1)
    assert resent.outcome == fresh.outcome == COMMITTED
    assert resent.record["sends"] == 2 and "sends" not in fresh.record
    assert resent.record["loss"] == fresh.record["loss"] and resent.record["grad_norm"] == fresh.record["grad_norm"]
    for ours, theirs in zip(kept_job.state.state_dict()["model"].values(), fresh_job.state.state_dict()["model"].values()):
        assert torch.equal(ours, theirs)  # the same update, bit for bit, without a second forward
    assert kept_job.state.shards == fresh_job.state.shards  # the batch is consumed once
    # Its compute counts once, in the step that committed; the failed exchange's wait not at all.
    assert resent.record["step_s"] >= failed.kept.compute_s > 0
    # Weights replaced in between (a heal): the kept step is void and the next one computes afresh.
    kept_job.group.break_next = True
    again = train_step(kept_job, 2)
    kept_job.state.load_state_dict(copy.deepcopy(fresh_job.state.state_dict()))  # a heal receives a copy
    assert again.kept is not None and not again.kept.valid_for(2, kept_job.state)
    assert all(p.grad is None for p in kept_job.params)  # freed with the replacement
    assert train_step(kept_job, 2).outcome == train_step(fresh_job, 2).outcome == COMMITTED
    for ours, theirs in zip(kept_job.state.state_dict()["model"].values(), fresh_job.state.state_dict()["model"].values()):
        assert torch.equal(ours, theirs)  # the void step's gradients did not leak into the fresh one
