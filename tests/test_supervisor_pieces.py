"""Pieces of the replica-group protocol that a live job exercises only by chance: the quorum
ids torchft is given when a Lighthouse is started again, the supervisor's watchdog while a
group is still starting, a warm spare that is not ready or keeps dying, and groups that
crash the same way at every start."""

import subprocess
import sys
import time
from types import SimpleNamespace

from stalwart.config import RunConfig, apply_overrides
from stalwart.replication.group import _UnrepeatedQuorumIds
from stalwart.replication.supervisor import (MAX_SPARE_DEATHS, GroupProcess, WarmSpare, _failing_the_same_way_at_start,
                                             _watch_group)
from stalwart.run.rundir import RunDir


class Lighthouse:
    """Quorum results as a Lighthouse hands them out: its id and the members' replica ids."""

    def __init__(self) -> None:
        self.next = None

    def _quorum(self, **kwargs):
        return self.next


def id_of(client: _UnrepeatedQuorumIds, lighthouse: Lighthouse, quorum_id: int, *members: str) -> int:
    lighthouse.next = SimpleNamespace(quorum_id=quorum_id, replica_ids=list(members))
    return client._quorum().quorum_id


def test_quorum_ids_name_the_membership_so_a_restarted_lighthouse_cannot_repeat_one():
    lighthouse = Lighthouse()
    a, b = _UnrepeatedQuorumIds(lighthouse), _UnrepeatedQuorumIds(lighthouse)
    old = id_of(a, lighthouse, 2, "replica0:u0", "replica1:u1")
    assert id_of(a, lighthouse, 2, "replica0:u0", "replica1:u1") == old  # the same quorum keeps its process group
    assert id_of(b, lighthouse, 2, "replica1:u1", "replica0:u0") == old  # every member, whatever the order
    # A Lighthouse started again says 2 for another membership (group 1 restarted: a new uuid) ...
    assert id_of(a, lighthouse, 2, "replica0:u0", "replica1:u9") != old
    # ... or 1 for the same processes: neither is taken for the old quorum.
    assert id_of(a, lighthouse, 1, "replica0:u0", "replica1:u1") != old


def test_the_watchdog_gives_a_starting_group_start_timeout_s_and_a_beating_one_hang_timeout_s(tmp_path):
    cfg = apply_overrides(RunConfig(), {"replicas.count": "2", "replicas.hang_timeout_s": "1",
                                        "replicas.start_timeout_s": "30"})
    run = RunDir(tmp_path / "run")
    run.create()
    g = GroupProcess(0, proc=subprocess.Popen(["sleep", "60"], start_new_session=True), token="t")
    try:
        g.last_progress = time.monotonic() - 5  # silent for 5 s, still starting
        assert _watch_group(run, cfg, g, time.monotonic(), spawn=None) is None
        assert g.proc is not None and g.proc.poll() is None
        g.beating = True  # once it has beaten, 5 s of silence is a hang
        proc = g.proc
        _watch_group(run, cfg, g, time.monotonic(), spawn=None)
        assert proc.wait(timeout=5) < 0 and g.proc is None
        hung = [e for e in run.read_events() if e["event"] == "group_hung"]
        assert len(hung) == 1 and hung[0]["starting"] is False
    finally:
        if g.proc is not None:
            g.proc.kill()


def test_a_spare_not_ready_is_not_handed_out_and_spares_that_keep_dying_are_given_up(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.logs.mkdir()
    # A "spare" that never finishes its imports (it never touches spare-PID.ready), then ones that die at once.
    spare = WarmSpare(run, [sys.executable, "-c", "import time; time.sleep(60)"], {}, enabled=True)
    spare.due = 0.0
    try:
        spare.poll(time.monotonic())
        assert spare.proc is not None and spare.take(1, run.logs / "replica-1.log") is None
        assert spare.proc.poll() is None  # still the spare, untouched
    finally:
        spare.stop()
    spare.args = [sys.executable, "-c", "pass"]
    for _ in range(MAX_SPARE_DEATHS):
        spare.due = 0.0
        spare.poll(time.monotonic())  # starts one
        spare.proc.wait(timeout=30)
        spare.poll(time.monotonic())  # finds it dead
    spare.due = 0.0
    spare.poll(time.monotonic())
    assert spare.proc is None  # given up: restarts start new processes
    found = run.read_events()
    assert [e["event"] for e in found].count("spare_start") == MAX_SPARE_DEATHS + 1  # the first, then 3 that died
    assert [e["event"] for e in found].count("spare_exit") == MAX_SPARE_DEATHS
    assert found[-1]["event"] == "spare_disabled" and not spare.enabled


def _crash(run: RunDir, cfg: RunConfig, g: GroupProcess, code: int, output: str) -> None:
    """One launch of group g that prints `output` and exits with `code`, as the supervisor sees it."""
    log = run.logs / f"replica-{g.replica}.log"
    g.log_offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as f:
        g.proc = subprocess.Popen([sys.executable, "-c", f"import sys; print({output!r}); sys.exit({code})"],
                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    g.proc.wait()
    assert _watch_group(run, cfg, g, time.monotonic(), spawn=None) is None


def test_only_a_groups_own_crashes_before_the_first_commit_stop_the_job_and_with_what_this_launch_said(tmp_path):
    cfg = apply_overrides(RunConfig(), {"replicas.count": "2"})
    run = RunDir(tmp_path / "run")
    run.create()
    run.logs.mkdir()
    (run.logs / "replica-0.log").write_text("stalwart train: error: a line of an earlier job\n")
    groups = {0: GroupProcess(0), 1: GroupProcess(1)}
    banner = "\n".join(["Traceback (most recent call last):", "  File x", "RuntimeError: device {} lost (pid {})",
                        "=" * 40, "Root Cause (first observed failure):", "  time: 2026-12-02_04:51:{}"])
    for pid in (11, 12, 13):
        _crash(run, cfg, groups[0], 1, banner.format(0, pid, pid))  # torchrun prints its banner last
    _crash(run, cfg, groups[1], 1, banner.format(1, 21, 1))
    _crash(run, cfg, groups[1], 5, "stalwart train: error: no quorum for 60 s")  # a lost Lighthouse: no count
    _crash(run, cfg, groups[1], 1, banner.format(1, 22, 2))
    assert [line for _, line in groups[0].start_errors] == [f"RuntimeError: device 0 lost (pid {p})" for p in (11, 12, 13)]
    assert _failing_the_same_way_at_start(run, groups) is None  # group 1 has crashed twice
    _crash(run, cfg, groups[1], 1, banner.format(1, 23, 3))
    stop = _failing_the_same_way_at_start(run, groups)
    assert "crashed 3 times before its first step with: RuntimeError: device 1 lost (pid 23)" in str(stop)
    # A group that committed a step in this job, or crashes that said nothing, never stop it.
    quiet = {r: GroupProcess(r) for r in (0, 1)}
    for g in quiet.values():
        for _ in range(3):
            _crash(run, cfg, g, 1, "")
    assert _failing_the_same_way_at_start(run, quiet) is None
    groups[0].committed_in_job = True
    assert _failing_the_same_way_at_start(run, groups) is None
