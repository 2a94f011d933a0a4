"""The README's two-machine recipe, run for real: two test hosts (stalwart/links.py: network
namespaces on a switch, each link rate-limited with tc tbf), a `stalwart lighthouse` on
one, and one replica group on each, each with its own run directory (nothing shared but
the network)."""

import json
import os
import subprocess
import sys
import time

import pytest

from jobs import stop_all, wait_for
from stalwart.links import Hosts, unavailable

pytestmark = pytest.mark.slow
SECRET = "5a" * 32  # the job secret every machine exports


@pytest.fixture
def two_hosts():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Hosts(2, rate_mbit=100) as hosts:
        yield hosts


def _in(hosts: Hosts, index: int, *args: str, output=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_JOB_SECRET": SECRET}
    return hosts.popen(index, [sys.executable, "-m", "stalwart", *args], env=env, stdout=output, stderr=output,
                       text=True)


def _train_on_two_hosts(hosts: Hosts, tmp_path, *args: str) -> None:
    """The recipe: a Lighthouse (minimum 2) on host A; host A's group under a supervisor
    (examples/slurm), host B's a bare group process; both must exit 0."""
    ip_a, ip_b = (h.ip for h in hosts.hosts)
    lighthouse = _in(hosts, 0, "lighthouse", "--bind", f"{ip_a}:29510", "--min-replicas", "2",
                     output=subprocess.DEVNULL)  # nobody reads it: a full pipe would block it
    procs = []
    try:
        time.sleep(0.5)  # the lighthouse binds before the first group asks for a quorum
        common = ["train", "--recipe", "smoke", "--quiet", "--train.report", "false", "--replicas", "2", "--lighthouse", f"http://{ip_a}:29510",
                  "--eval.problems", "0", "--replicas.min_replicas", "2", *args]
        procs = [_in(hosts, 0, *common, "--groups", "0", "--host", ip_a, "--out", str(tmp_path / "host-a")),
                 _in(hosts, 1, *common, "--replica-id", "1", "--host", ip_b, "--out", str(tmp_path / "host-b"))]
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        stop_all(lighthouse, *procs)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err


def test_two_hosts_train_one_model_over_a_rate_limited_link(two_hosts, tmp_path):
    _train_on_two_hosts(two_hosts, tmp_path, "--train.steps", "30")
    finish = {}
    for host in ("host-a", "host-b"):
        events = [json.loads(line) for line in (tmp_path / host / "events.jsonl").read_text().splitlines()]
        finish.update({e["replica"]: e["fingerprint"] for e in events if e["event"] == "finish"})
        records = [json.loads(line) for line in (tmp_path / host / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 30 and all(r["participants"] == 2 for r in records)
    assert sorted(finish) == [0, 1] and finish[0] == finish[1]  # one model, trained across the link
    assert (tmp_path / "host-a" / "summary.json").exists()  # the lowest group reports, the other not
    assert not (tmp_path / "host-b" / "summary.json").exists()


def _events(path) -> list[dict]:
    """The records of a JSONL file so far (a line still being written is left for later)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records




def test_a_link_down_for_10s_costs_no_group_its_process_and_the_cut_off_group_heals(two_hosts, tmp_path):
    ip_a, ip_b = (h.ip for h in two_hosts.hosts)
    lighthouse = _in(two_hosts, 0, "lighthouse", "--bind", f"{ip_a}:29510", "--heartbeat-timeout-s", "1",
                     output=subprocess.DEVNULL)
    procs = []
    try:
        time.sleep(0.5)
        # Enough steps that host A, training alone at 35-50 steps/s through the 10 s outage,
        # is still training when the link is back (with 800 steps and a 20 s outage it had
        # finished, and B had no one to heal from); few more, since the two groups take only
        # about 7 steps/s together across the link.
        common = ["train", "--recipe", "smoke", "--quiet", "--train.report", "false", "--replicas", "2", "--train.steps", "600",
                  "--lighthouse", f"http://{ip_a}:29510", "--eval.problems", "0", "--replicas.timeout_s", "3",
                  "--replicas.quorum_timeout_s", "3", "--replicas.heartbeat_timeout_s", "1"]
        procs = [_in(two_hosts, 0, *common, "--groups", "0", "--host", ip_a, "--out", str(tmp_path / "host-a")),
                 _in(two_hosts, 1, *common, "--replica-id", "1", "--host", ip_b, "--out", str(tmp_path / "host-b"))]
        metrics_a = tmp_path / "host-a" / "metrics.jsonl"
        wait_for(lambda: [r for r in _events(metrics_a) if r["participants"] == 2 and r["step"] >= 10], 120,
                 "both groups at step 10")
        two_hosts.set_link(0, up=False)  # host A's only link
        down = time.time()
        time.sleep(10)
        two_hosts.set_link(0, up=True)
        up = time.time()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        stop_all(lighthouse, *procs)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err  # host B's bare group kept its process through the outage
    events_a, events_b = _events(tmp_path / "host-a" / "events.jsonl"), _events(tmp_path / "host-b" / "events.jsonl")
    assert not [e for e in events_a if e["event"] in ("group_exit", "group_restart")]
    assert [e for e in events_b if e["event"] == "quorum_retry" and down < e["time"] < up]  # it waited, and retried
    assert [e for e in events_b if e["event"] == "heal" and e["time"] > up]  # and healed once the link was back
    alone = [r for r in _events(metrics_a) if down + 5 < r["time"] < up]
    assert alone and all(r["participants"] == 1 for r in alone)  # host A trained on alone meanwhile
    finish = {e["replica"]: e["fingerprint"] for e in events_a + events_b if e["event"] == "finish"}
    assert sorted(finish) == [0, 1] and finish[0] == finish[1]


def test_a_partition_between_diloco_groups_that_still_reach_the_lighthouse_ends_in_one_model(tmp_path):
    """Hosts A and B run one DiLoCo group each under a supervisor of their own; the
    Lighthouse is on host C. The path A-B is cut (silently: frames vanish) while both still
    reach C: their outer exchanges fail, B leaves after replicas.max_failed_steps and is
    restarted, its restart fails too, A (the lowest) keeps its process and takes outer steps
    alone; once the path is back B heals and both finish with one G."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    with Hosts(3, rate_mbit=100) as hosts:
        ip_a, ip_b, ip_c = (h.ip for h in hosts.hosts)
        lighthouse = _in(hosts, 2, "lighthouse", "--bind", f"{ip_c}:29510", "--heartbeat-timeout-s", "1",
                         output=subprocess.DEVNULL)
        procs = []
        try:
            time.sleep(0.5)
            common = ["train", "--recipe", "smoke", "--quiet", "--train.report", "false", "--replicas", "2", "--train.steps", "300",
                      "--checkpoint.every", "300", "--lighthouse", f"http://{ip_c}:29510", "--eval.problems", "0",
                      "--replicas.strategy", "diloco", "--replicas.inner_steps", "5", "--replicas.timeout_s", "3",
                      "--replicas.quorum_timeout_s", "3", "--replicas.heartbeat_timeout_s", "1",
                      "--replicas.max_failed_steps", "2"]
            procs = [_in(hosts, 0, *common, "--groups", "0", "--host", ip_a, "--out", str(a)),
                     _in(hosts, 1, *common, "--groups", "1", "--host", ip_b, "--out", str(b))]
            wait_for(lambda: [r for r in _events(a / "metrics.jsonl")
                              if r.get("outer") and r["participants"] == 2 and r["step"] >= 20], 120,
                     "an outer step of both groups")
            hosts.set_path(0, 1, up=False)
            cut = time.time()

            def restart_failed_and_a_went_alone() -> bool:
                found = _events(b / "events.jsonl")
                starts = [e["time"] for e in found if e["event"] == "start"]
                return len(starts) >= 2 and any(e["event"] == "step_failed" and e["time"] > starts[1] for e in found) \
                    and any(r.get("outer") and r["time"] > cut for r in _events(a / "metrics.jsonl"))

            wait_for(restart_failed_and_a_went_alone, 90, "B left, its restart failed, A took an outer step alone")
            hosts.set_path(0, 1, up=True)
            back = time.time()
            results = [p.communicate(timeout=300) for p in procs]
        finally:
            stop_all(lighthouse, *procs)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    found_a, found_b = _events(a / "events.jsonl"), _events(b / "events.jsonl")
    assert not [e for e in found_a if e["event"] in ("group_exit", "group_restart")]  # A kept its process
    left = [e for e in found_b if e["event"] == "group_exit"]
    assert left and cut < left[0]["time"] < back and all(e["returncode"] == 5 for e in left)  # EXIT_PARTITIONED
    assert [e for e in found_b if e["event"] == "heal" and e["time"] > back]
    during = [r for r in _events(a / "metrics.jsonl") if r.get("outer") is not None and cut < r["time"] < back]
    assert during and all(r["participants"] == 1 and r["contributors"] == [0] for r in during)
    finish = {e["replica"]: e["fingerprint"] for e in found_a + found_b if e["event"] == "finish"}
    assert sorted(finish) == [0, 1] and finish[0] == finish[1]


def test_diloco_over_a_10mbit_link_carries_the_bytes_it_counts(tmp_path):
    """What each host's link really carried (its veth counters) against the bytes the groups
    say they sent: the outer exchanges and the heal, within 10% (the rest is TCP/IP framing,
    heartbeats, quorums)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Hosts(2, rate_mbit=10) as hosts:
        before = [hosts.counters(i) for i in (0, 1)]
        _train_on_two_hosts(hosts, tmp_path, "--train.steps", "60", "--replicas.strategy", "diloco",
                            "--replicas.inner_steps", "10", "--replicas.compression", "int8")
        carried = [hosts.counters(i)["tx"] - before[i]["tx"] for i in (0, 1)]
    counted = []
    heals = {}
    for i, host in enumerate(("host-a", "host-b")):
        records = [m for m in _events(tmp_path / host / "metrics.jsonl") if "round" in m]
        # The first sync (step 0: the heal, nothing to contribute) sends a payload of zeros too.
        assert [m["round"] for m in records if m["outer"]] == list(range(1, 7))
        assert all(m["contributors"] == [0, 1] for m in records if m["outer"])
        counted.append(sum(m["bytes_sent"] for m in records))
        heals[i] = sum(e["bytes"] for e in _events(tmp_path / host / "events.jsonl") if e["event"] == "heal")
    # With two hosts, whatever one host healed, the other one sent.
    counted = [counted[0] + heals[1], counted[1] + heals[0]]
    assert min(counted) > 6 * 300_000  # six int8 outer gradients of the smoke model at least
    for real, logical in zip(carried, counted):
        assert abs(real - logical) <= 0.1 * logical, (carried, counted)


def test_a_sigterm_to_the_process_holding_test_hosts_removes_them_and_what_runs_in_them():
    """A benchmark stopped by `timeout` (SIGTERM) leaves no namespace and no process behind."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    script = ("import subprocess, sys, time\n"
              "from stalwart.links import Hosts\n"
              "with Hosts(2, rate_mbit=10) as hosts:\n"
              "    child = hosts.popen(1, [sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "    print(hosts.switch, *(h.netns for h in hosts.hosts), child.pid, flush=True)\n"
              "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        *names, child = holder.stdout.readline().split()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in listed for name in names)
        holder.send_signal(15)
        assert holder.wait(timeout=30) == 128 + 15
    finally:
        if holder.poll() is None:
            holder.kill()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [name for name in names if name in listed]
    assert not _running(int(child))  # the process inside was killed too


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; init reaps it
