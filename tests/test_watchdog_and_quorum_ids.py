"""Two pieces of the replica-group protocol that a live job exercises only by chance: the
quorum ids torchft is given when a Lighthouse is started again or a step fails, and the
supervisor's watchdog while a group is still starting."""

import subprocess
import time
from types import SimpleNamespace

from stalwart.config import RunConfig, apply_overrides
from stalwart.replication.group import _UnrepeatedQuorumIds
from stalwart.replication.supervisor import GroupProcess, _watch_group
from stalwart.run.rundir import RunDir


class Lighthouse:
    """Quorum results as a Lighthouse hands them out: an id, the max step, who is behind."""

    def __init__(self) -> None:
        self.next = None

    def quorum(self, quorum_id: int, max_step: int, behind: int = 0, members: int = 2):
        self.next = SimpleNamespace(quorum_id=quorum_id, max_step=max_step, replica_world_size=members,
                                    max_world_size=members - behind)

    def _quorum(self, **kwargs):
        return self.next


def ids(client: _UnrepeatedQuorumIds, lighthouse: Lighthouse, *quorums) -> list[int]:
    seen = []
    for q in quorums:
        if q == "lost":
            client.lost()
            continue
        lighthouse.quorum(*q)
        seen.append(client._quorum().quorum_id)
    return seen


def test_a_restarted_lighthouse_repeating_an_id_gives_torchft_a_new_one():
    lighthouse = Lighthouse()
    client = _UnrepeatedQuorumIds(lighthouse)
    # Steps 10, 11 in quorum 2; the Lighthouse dies; the new one says 1 (one group), then 2.
    first, same, alone, both = ids(client, lighthouse, (2, 10), (2, 11), "lost", (1, 11), (2, 12))
    assert first == same  # a healthy step keeps the process group
    assert len({first, alone, both}) == 3  # neither repeated number reaches torchft as an old id


def test_a_failed_step_or_a_member_behind_gives_a_new_id_to_every_member():
    lighthouse = Lighthouse()
    a, b = _UnrepeatedQuorumIds(lighthouse), _UnrepeatedQuorumIds(lighthouse)
    steps = [(5, 20), (5, 21), (5, 21), (5, 22, 1), (5, 23)]  # 21 failed everywhere; then one heals
    seen_a, seen_b = ids(a, lighthouse, *steps), ids(b, lighthouse, *steps)
    assert seen_a == seen_b  # every member of a quorum is given the same id
    assert seen_a[0] == seen_a[1] and len({seen_a[1], seen_a[2], seen_a[3]}) == 3 and seen_a[4] == seen_a[3]
    # One member lost its quorum call (a timeout) while the others' step failed: agreed again.
    c = _UnrepeatedQuorumIds(lighthouse)
    ids(a, lighthouse, (7, 30)), ids(c, lighthouse, (7, 30))
    assert ids(a, lighthouse, (7, 30)) == ids(c, lighthouse, "lost", (7, 30))


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
