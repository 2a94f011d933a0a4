"""Guards, goodput accounting and the healing transport, in one process."""

import math
import os
import subprocess
import sys

import pytest
import torch

from stalwart.run.goodput import CheckpointClock, goodput_report, groups_of_run, young_daly_interval
from stalwart.guards import NONFINITE, OK, REBASED, ROLLBACK, SPIKE, SpikeGuard, StragglerTracker, fingerprint, odd_ones_out
from stalwart.config import CheckpointConfig
from jobs import in_process


def guard(**kw) -> SpikeGuard:
    args = {"sigma": 6.0, "window": 16, "min_history": 8, "rollback_spikes": 3, "rollback_window": 10} | kw
    return SpikeGuard(**args)


def warm(g: SpikeGuard, n: int = 10) -> None:
    for i in range(n):
        g.accept(2.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2))


def test_non_finite_loss_or_grad_norm_is_rejected_and_never_enters_the_window():
    g = guard()
    warm(g)
    before = g.state_dict()
    assert g.check(11, float("nan"), 1.0).kind == NONFINITE
    assert g.check(11, 2.0, float("inf")).kind == NONFINITE
    assert g.state_dict() == before  # nothing recorded: the next bound is the same
    assert g.check(12, 2.01, 1.0).kind == OK


def test_spike_is_skipped_only_after_enough_history_and_does_not_widen_the_bound():
    g = guard()
    warm(g, 5)
    assert g.check(6, 50.0, 1.0).kind == OK  # 5 < min_history: not judged yet
    warm(g, 10)
    verdict = g.check(20, 50.0, 1.0)
    assert verdict.kind == SPIKE and "loss" in verdict.reason
    assert g.check(21, 2.0, 40.0).kind == SPIKE  # the grad norm alone spiking counts too
    assert max(g.history["loss"]) < 3  # the spikes were not accepted


def test_repeated_spikes_within_the_window_ask_for_a_rollback():
    g = guard(rollback_spikes=3, rollback_window=10)
    warm(g)
    assert g.check(20, 50.0, 1.0).kind == SPIKE
    assert g.check(35, 50.0, 1.0).kind == SPIKE  # 15 steps later: the first one has aged out
    assert g.check(38, 50.0, 1.0).kind == SPIKE
    assert g.check(40, 50.0, 1.0).kind == ROLLBACK
    assert g.check(41, 50.0, 1.0).kind == SPIKE  # the count starts again after a rollback


def _roll_back(g: SpikeGuard, checkpoint: dict) -> None:
    """What Recovery.rollback does to the guard: the checkpoint's state, and the rollback's step."""
    asked = g.asked_rollback_at
    g.load_state_dict(checkpoint)
    g.rolled_back_at, g.asked_rollback_at = asked, None


def test_a_grad_norm_that_spikes_again_after_its_rollback_is_taken_as_its_new_level():
    g = guard(rollback_spikes=2, rollback_window=10)
    warm(g)
    checkpoint = g.state_dict()
    checkpoint["rolled_back_at"] = -500  # an older rollback's, saved with the checkpoint: not this one's
    assert [g.check(s, 2.0, 8.0).kind for s in (20, 21)] == [SPIKE, ROLLBACK]
    _roll_back(g, checkpoint)  # the state of the checkpoint, the steps again
    assert g.check(19, 2.01, 1.0).kind == OK
    g.accept(2.01, 1.0)
    assert g.check(20, 2.0, 8.0).kind == SPIKE  # on fresh data from the restored weights
    verdict = g.check(21, 2.0, 8.2)
    assert verdict.kind == REBASED and verdict.commit and "new level" in verdict.reason
    assert g.history["grad_norm"] == [] and len(g.history["loss"]) == 11  # the loss's window is kept
    for step in range(22, 40):  # the new level is normal now, and judged again once warm
        g.accept(2.0, 8.0 + 0.1 * (step % 2))
    assert g.check(40, 2.0, 8.1).kind == OK and g.check(40, 2.0, 80.0).kind == SPIKE
    # A heal carries it, set or not, so that a healed group judges the next spike as its peers do.
    healed = guard(rollback_spikes=2, rollback_window=10)
    healed.load_state_dict(checkpoint)
    assert healed.rolled_back_at == -500
    healed.load_state_dict(g.state_dict())  # g's was cleared by the rebase
    assert healed.rolled_back_at is None


def test_spikes_with_no_checkpoint_to_roll_back_to_are_never_taken_as_a_level():
    g = guard(rollback_spikes=2, rollback_window=10)
    warm(g)
    assert [g.check(s, 2.0, 8.0).kind for s in (20, 21)] == [SPIKE, ROLLBACK]
    g.asked_rollback_at = None  # Recovery.rollback found no checkpoint: nothing was rolled back
    assert [g.check(s, 2.0, 8.0).kind for s in (22, 23)] == [SPIKE, ROLLBACK]


def test_a_loss_that_comes_back_or_a_grad_norm_that_spikes_much_later_rolls_back_again():
    g = guard(rollback_spikes=2, rollback_window=10)
    warm(g)
    checkpoint = g.state_dict()
    assert [g.check(s, 50.0, 1.0).kind for s in (20, 21)] == [SPIKE, ROLLBACK]
    _roll_back(g, checkpoint)
    assert [g.check(s, 50.0, 1.0).kind for s in (20, 21)] == [SPIKE, ROLLBACK]  # divergence: never rebased
    h = guard(rollback_spikes=2, rollback_window=10)
    warm(h)
    assert [h.check(s, 2.0, 8.0).kind for s in (20, 21)] == [SPIKE, ROLLBACK]
    _roll_back(h, h.state_dict())
    assert [h.check(s, 2.0, 8.0).kind for s in (40, 41)] == [SPIKE, ROLLBACK]  # 20 steps on: a new event


def test_guard_state_round_trips():
    g = guard()
    warm(g)
    g.check(20, 50.0, 1.0)
    h = guard()
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()


def test_fingerprint_changes_with_any_single_bit():
    torch.manual_seed(0)
    tensors = [torch.randn(64, 32), torch.randn(7).to(torch.bfloat16), torch.tensor(3.0)]
    reference = fingerprint(tensors)
    assert fingerprint([t.clone() for t in tensors]) == reference
    for bit in (0, 13, 22, 30, 31):
        flipped = [t.clone() for t in tensors]
        flipped[0].view(-1)[17:18].view(torch.int32).bitwise_xor_(1 << bit)
        assert fingerprint(flipped) != reference, bit
    swapped = [tensors[1], tensors[0], tensors[2]]
    assert fingerprint(swapped) != reference


def test_odd_ones_out_needs_a_strict_majority():
    assert odd_ones_out({0: 5, 1: 5, 2: 5}) == ([], True)
    assert odd_ones_out({0: 5, 1: 5, 2: 6}) == ([2], True)
    assert odd_ones_out({0: 5, 1: 6}) == ([0, 1], False)  # two replicas: nobody is known good


def test_straggler_is_reported_after_patience_consecutive_slow_steps():
    t = StragglerTracker(factor=2.0, patience=3)
    slow = {0: 1.0, 1: 1.1, 2: 3.0}
    assert t.observe(slow) == [] and t.observe(slow) == []
    assert t.observe({0: 1.0, 1: 1.1, 2: 1.0}) == []  # a normal step resets the count
    assert [t.observe(slow) for _ in range(3)] == [[], [], [2]]


def test_young_daly_interval_matches_the_formula():
    assert young_daly_interval(10, 3600) == pytest.approx(math.sqrt(2 * 10 * 3600) - 10)
    assert young_daly_interval(10, 10) == 10  # never shorter than a checkpoint
    with pytest.raises(ValueError):
        young_daly_interval(0, 10)


def test_checkpoint_clock_uses_fixed_steps_until_the_cost_is_measured():
    clock = CheckpointClock(CheckpointConfig(every=5, mtbf_s=3600))
    assert clock.due(5, 100) and not clock.due(6, 100) and clock.due(100, 100)
    clock.saved(2.0)
    assert clock.interval_s == pytest.approx(math.sqrt(2 * 2.0 * 3600) - 2.0)
    assert not clock.due(10, 100)  # the interval is now ~118 s of wall time
    assert clock.describe()["rule"] == "young-daly"


def _records(steps, replicas, *, start=10.0, participants=None):
    return [{"step": s, "time": start + s, "step_s": 1.0, "replica": r, "tokens_per_s": 100.0,
             "participants": participants or len(replicas)} for s in steps for r in replicas]


def test_ettr_sums_each_groups_committed_time_and_leaves_out_rolled_back_steps():
    events = [{"event": "rollback", "time": 15.5, "from_step": 5, "to_step": 3, "seconds": 0.1}]
    report = goodput_report(_records(range(1, 6), (0, 1)), events, wall_s=10.0, groups=2)
    # Steps 1..3 of both groups count (2 x 3 s of 2 x 10 s); 4 and 5 were undone by the rollback.
    assert report["productive_s"] == pytest.approx(6.0) and report["ettr"] == pytest.approx(0.3)
    assert report["token_goodput"] == pytest.approx(0.3)  # 3 steps x 100 tokens of 10 s x 100 tokens/s
    assert report["faults"][0]["kind"] == "rollback" and report["steps_lost"] == 2


def test_two_dead_groups_of_three_show_in_ettr_and_token_goodput():
    full = _records(range(1, 4), (0, 1, 2))
    alone = [dict(r, tokens_per_s=100.0 / 3) for r in _records(range(4, 10), (0,), participants=1)]
    report = goodput_report(full + alone, [], wall_s=9.0, groups=3)
    assert report["ettr"] == pytest.approx((3 * 3 + 6) / 27, abs=1e-4)
    assert report["token_goodput"] == pytest.approx((3 * 100 + 6 * 100 / 3) / 900, abs=1e-4)


def _outer(step, replica, contributors, at):
    return {"step": step, "round": step // 5, "replica": replica, "contributors": contributors, "time": at}


def test_diloco_goodput_counts_every_groups_inner_steps_that_an_outer_step_took_in():
    # Two groups, inner steps 1..10 each (participants 1, 100 tokens/s), outer steps at 5 and
    # 10. Group 1 died after its step 7 and rejoined at step 10 with nothing to give: its
    # steps 6 and 7 were lost, and its round to step 5 was left out of the outer step.
    inner = _records(range(1, 11), (0,), participants=1) + _records(range(1, 8), (1,), participants=1)
    outer = [_outer(5, 0, [0], 15.5), _outer(5, 1, [0], 15.5), _outer(10, 0, [0], 20.5), _outer(10, 1, [0], 20.5)]
    report = goodput_report(inner + outer, [], wall_s=10.0, groups=2, local_steps=True)
    assert report["productive_s"] == pytest.approx(10.0) and report["ettr"] == pytest.approx(10 / 20)
    assert report["token_goodput"] == pytest.approx(10 * 100 / (2 * 100 * 10))  # group 0's steps only
    # Each group's own step 1 is a step of its own: both count once taken in.
    both = _records(range(1, 6), (0, 1), participants=1) + [_outer(5, 0, [0, 1], 15.5), _outer(5, 1, [0, 1], 15.5)]
    assert goodput_report(both, [], wall_s=5.0, groups=2, local_steps=True)["token_goodput"] == pytest.approx(1.0)


def test_a_host_with_one_group_of_two_rates_its_tokens_against_the_whole_job_at_full_strength():
    # DDP across two hosts: this host's group trained steps 1..4 with the other in (200
    # tokens/s for the job) and 5..10 alone (100 tokens/s) while the other was down.
    steps = [dict(r, tokens_per_s=200.0) for r in _records(range(1, 5), (0,), participants=2)] + \
        _records(range(5, 11), (0,), participants=1)
    report = goodput_report(steps, [], wall_s=10.0, groups=1, job_groups=2)
    assert report["ettr"] == pytest.approx(1.0)  # its own group never stopped
    assert report["token_goodput"] == pytest.approx((4 * 200 + 6 * 100) / (200 * 10))  # the job lost 30%


def test_a_run_directory_holds_the_groups_its_latest_supervisor_ran_else_one():
    assert groups_of_run([]) == 1  # a single process, or a group started on its own with --replica-id
    starts = [{"event": "job_start", "time": 1.0, "groups": [0, 1, 2]}, {"event": "job_start", "time": 2.0, "groups": [0]}]
    assert groups_of_run(starts[:1]) == 3 and groups_of_run(starts) == 1  # resumed with --groups 0


def test_a_heal_after_corruption_discards_that_groups_steps_since_it_was_last_known_good():
    events = [{"event": "work_discarded", "time": 16.5, "replica": 1, "from_step": 3, "to_step": 6}]
    report = goodput_report(_records(range(1, 7), (0, 1)), events, wall_s=10.0, groups=2)
    assert report["productive_s"] == pytest.approx(6 + 3)  # group 1's steps 4..6 are not productive


def test_a_hang_is_timed_from_when_the_group_stopped_and_one_that_ended_by_itself_counts_too():
    metrics = _records(range(1, 4), (0, 1)) + _records(range(4, 9), (0,), participants=1) + \
        _records(range(9, 11), (0, 1))
    events = [{"event": "step_failed", "time": 13.8, "step": 4, "replica": 0},
              {"event": "heal", "time": 18.5, "replica": 1, "step": 8}]  # SIGSTOP, then SIGCONT: no restart
    (stall,) = goodput_report(metrics, events, wall_s=20.0, groups=2)["faults"]
    assert stall["kind"] == "stall" and stall["time"] == 13.0  # its last commit
    assert stall["detect_s"] == pytest.approx(0.8) and stall["recover_s"] == pytest.approx(19.0 - 13.0)
    hung = [{"event": "group_hung", "time": 17.0, "since": 13.2, "replica": 1},
            {"event": "group_start", "time": 17.6, "replica": 1}, {"event": "heal", "time": 18.5, "replica": 1, "step": 8}]
    (hang,) = goodput_report(metrics, events[:1] + hung, wall_s=20.0, groups=2)["faults"]
    assert hang["kind"] == "hang" and hang["time"] == 13.2 and hang["recover_s"] == pytest.approx(19.0 - 13.2)


def test_a_lighthouse_outage_is_one_fault_from_the_last_commit_to_every_group_back():
    metrics = _records(range(1, 4), (0, 1)) + _records(range(8, 10), (0, 1))
    events = [{"event": "quorum_retry", "time": 13.5, "replica": 0}, {"event": "quorum_retry", "time": 13.6, "replica": 1},
              {"event": "lighthouse_back", "time": 17.2, "replica": 1},
              {"event": "lighthouse_back", "time": 17.4, "replica": 0}]
    (outage,) = goodput_report(metrics, events, wall_s=20.0, groups=2)["faults"]
    assert outage["kind"] == "lighthouse" and outage["groups"] == [0, 1] and outage["time"] == 13.0
    assert outage["recover_s"] == pytest.approx(18.0 - 13.0)


def test_crash_recovery_time_is_fault_to_the_first_commit_after_the_heal():
    metrics = [{"step": 1, "time": 1.0, "step_s": 0.5, "replica": 0, "tokens_per_s": 10.0},
               {"step": 2, "time": 2.5, "step_s": 0.5, "replica": 0, "tokens_per_s": 10.0},
               {"step": 3, "time": 5.4, "step_s": 0.4, "replica": 1, "tokens_per_s": 10.0}]
    events = [{"event": "group_exit", "time": 2.0, "replica": 1, "returncode": -9},
              {"event": "step_failed", "time": 2.2, "step": 2, "replica": 0},
              {"event": "heal", "time": 5.0, "replica": 1, "step": 2}]
    (fault,) = goodput_report(metrics, events, wall_s=6.0)["faults"]
    assert fault["kind"] == "crash" and fault["recover_s"] == pytest.approx(3.4)
    assert fault["detect_s"] == pytest.approx(0.2)
    assert fault["steps_lost"] == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--replica-id", "0"], "--replica-id needs --lighthouse"),
    (["train", "--lighthouse", "nonsense", "--replica-id", "0"], "is not HOST:PORT"),
    (["train", "--lighthouse", "127.0.0.1:1", "--replica-id", "5", "--replicas", "2"], "not in 0..1"),
    (["train", "--replicas", "0"], "replicas.count must be in 1..64"),
    (["train", "--replicas", "2", "--replicas.min_replicas", "3"], "replicas.min_replicas must be in"),
    (["train", "--guards.straggler_factor", "0.5"], "guards.straggler_factor"),
    (["train", "--replicas", "2", "--replicas.lighthouse_grace_s", "-1"], "replicas.lighthouse_grace_s must be >= 0"),
    (["train", "--guards.max_uncommitted_steps", "0"], "guards.max_uncommitted_steps must be >= 1"),
    (["train", "--lighthouse", "127.0.0.1:1", "--replica-id", "0", "--replicas", "2"], "STALWART_JOB_SECRET is not set"),
    (["train", "--lighthouse", "127.0.0.1:1", "--groups", "0", "--replicas", "2"], "STALWART_JOB_SECRET is not set"),
    (["lighthouse", "--bind", "nope"], "is not HOST:PORT"),
    (["train", "--standby"], "--standby needs --lighthouse URL and --out RUN_DIR"),
    (["train", "--replicas", "2", "--replicas.start_timeout_s", "0"], "replicas.start_timeout_s must be > 0"),
    (["train", "--replicas", "2", "--replicas.strategy", "gossip"], "replicas.strategy must be one of ddp, diloco"),
    (["train", "--replicas", "2", "--replicas.strategy", "diloco", "--replicas.inner_steps", "0"],
     "replicas.inner_steps must be >= 1 or auto, got 0"),
    (["train", "--replicas", "2", "--replicas.compression", "int3"], "replicas.compression must be one of none, int8"),
    (["train", "--replicas", "2", "--replicas.error_feedback", "true"], "replicas.error_feedback needs"),
    (["train", "--replicas", "2", "--replicas.strategy", "diloco", "--replicas.ranks_per_group", "2",
      "--replicas.inner_steps", "auto"], "replicas.inner_steps auto times each round on its own clock"),
    (["train", "--replicas", "2", "--replicas.outer_momentum", "1"], "replicas.outer_momentum in [0, 1)"),
    (["train", "--replicas", "2", "--replicas.strategy", "streaming", "--replicas.fragments", "3"],
     "replicas.fragments must divide replicas.inner_steps (50)"),
    (["train", "--replicas", "2", "--replicas.strategy", "streaming", "--replicas.fragments", "8",
      "--replicas.inner_steps", "64"], "be at most the model's 4 layers, got 8"),
    (["train", "--replicas", "2", "--replicas.strategy", "streaming", "--replicas.overlap_steps", "25"],
     "replicas.overlap_steps must be in 0..24"),
    (["train", "--replicas", "2", "--replicas.strategy", "streaming", "--replicas.mixing", "1"],
     "replicas.mixing must be in [0, 1)"),
    (["train", "--replicas", "2", "--replicas.strategy", "diloco", "--replicas.fragments", "4"],
     "replicas.fragments apply to replicas.strategy streaming only"),
    (["train", "--replicas", "2", "--replicas.strategy", "diloco", "--replicas.inner_steps", "fast"],
     "replicas.inner_steps must be >= 1 or auto, got 'fast'"),
    (["train", "--replicas", "2", "--replicas.strategy", "diloco", "--replicas.round_s", "5"],
     "replicas.round_s applies to replicas.inner_steps auto only"),
    (["train", "--replicas", "2", "--parallel.fsdp", "2"], "parallel.fsdp 2 must divide replicas.ranks_per_group 1"),
    (["train", "--parallel.fsdp", "-1"], "parallel.fsdp must be in 0..1024"),
    (["train", "--parallel.ep", "3"], "parallel.ep 3 must divide the model's 8 routed experts"),
    (["train", "--parallel.ep", "2", "--model.n_routed_experts", "0"], "parallel.ep 2 splits routed experts, and "
     "this model has none"),
    (["train", "--replicas", "2", "--parallel.ep", "2"], "parallel.ep 2 must divide replicas.ranks_per_group 1"),
    (["train", "--parallel.ep", "2"], "parallel.ep 2 must divide the launch's 1 rank"),
    (["train", "--parallel.ep", "2", "--train.compile", "true"], "parallel.ep 2 is not supported with train.compile"),
])
def test_bad_replication_input_is_one_line_and_exit_2(argv, message, tmp_path):
    r = in_process(*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "train" else []))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r").exists()


def test_a_malformed_job_secret_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(tmp_path / "r"), "--replicas", "2",
                        "--lighthouse", "127.0.0.1:1", "--replica-id", "1"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "STALWART_JOB_SECRET": "abc123"})
    assert r.returncode == 2 and "STALWART_JOB_SECRET" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "abc123" not in r.stderr and not (tmp_path / "r").exists()


def test_bad_fault_spec_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "STALWART_INJECT": "nan@x"})
    assert r.returncode == 2 and "STALWART_INJECT" in r.stderr and len(r.stderr.strip().splitlines()) == 1
