"""The README's two-machine recipe, run for real: two network namespaces joined by a veth
pair with a rate-limited link (tc tbf), a `stalwart lighthouse` in one, and one replica
group in each, each with its own run directory (nothing shared but the network)."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.slow
SECRET = "5a" * 32  # the job secret every machine exports


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root and iproute2 (ip, tc) to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    a, b = f"stw-a-{tag}", f"stw-b-{tag}"
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {e}")
    try:
        for ns, dev, addr in ((a, f"va{tag}", "10.77.0.1"), (b, f"vb{tag}", "10.77.0.2")):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # A 100 Mbit/s link each way (the kernel here has tbf, not netem).
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit",
                "burst", "64kb", "latency", "50ms")
        yield {"a": (a, f"va{tag}", "10.77.0.1"), "b": (b, f"vb{tag}", "10.77.0.2")}
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str, dev: str, *args: str, output=subprocess.PIPE) -> subprocess.Popen:
    # GLOO_SOCKET_IFNAME: gloo must use the link between the hosts, not the hostname's address.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": dev, "STALWART_JOB_SECRET": SECRET}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "stalwart", *args],
                            stdout=output, stderr=output, text=True, env=env)


def test_two_hosts_train_one_model_over_a_rate_limited_link(two_hosts, tmp_path):
    (ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b) = two_hosts["a"], two_hosts["b"]
    lighthouse = _in(ns_a, dev_a, "lighthouse", "--bind", f"{ip_a}:29510", "--min-replicas", "2",
                     output=subprocess.DEVNULL)  # nobody reads it: a full pipe would block it
    procs = []
    try:
        time.sleep(0.5)  # the lighthouse binds before the first group asks for a quorum
        common = ["train", "--recipe", "smoke", "--quiet", "--replicas", "2", "--train.steps", "30",
                  "--lighthouse", f"http://{ip_a}:29510", "--eval.problems", "0", "--replicas.min_replicas", "2"]
        # Host A: a supervisor for its group (examples/slurm); host B: a bare group process.
        procs = [_in(ns_a, dev_a, *common, "--groups", "0", "--host", ip_a, "--out", str(tmp_path / "host-a")),
                 _in(ns_b, dev_b, *common, "--replica-id", "1", "--host", ip_b, "--out", str(tmp_path / "host-b"))]
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in [lighthouse, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_a_link_down_for_20s_costs_no_group_its_process_and_the_cut_off_group_heals(two_hosts, tmp_path):
    (ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b) = two_hosts["a"], two_hosts["b"]
    lighthouse = _in(ns_a, dev_a, "lighthouse", "--bind", f"{ip_a}:29510", "--heartbeat-timeout-s", "1",
                     output=subprocess.DEVNULL)
    procs = []
    try:
        time.sleep(0.5)
        common = ["train", "--recipe", "smoke", "--quiet", "--replicas", "2", "--train.steps", "800",
                  "--lighthouse", f"http://{ip_a}:29510", "--eval.problems", "0", "--replicas.timeout_s", "3",
                  "--replicas.quorum_timeout_s", "3", "--replicas.heartbeat_timeout_s", "1"]
        procs = [_in(ns_a, dev_a, *common, "--groups", "0", "--host", ip_a, "--out", str(tmp_path / "host-a")),
                 _in(ns_b, dev_b, *common, "--replica-id", "1", "--host", ip_b, "--out", str(tmp_path / "host-b"))]
        deadline = time.monotonic() + 120
        metrics_a = tmp_path / "host-a" / "metrics.jsonl"
        while time.monotonic() < deadline and not [r for r in _events(metrics_a) if r["participants"] == 2
                                                   and r["step"] >= 10]:
            time.sleep(0.2)
        _sh("ip", "-n", ns_a, "link", "set", dev_a, "down")  # the only link between the hosts
        down = time.time()
        time.sleep(20)
        _sh("ip", "-n", ns_a, "link", "set", dev_a, "up")
        up = time.time()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in [lighthouse, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
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
