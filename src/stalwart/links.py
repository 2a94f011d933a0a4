"""Test hosts joined by real rate-limited links, for tests and benchmarks on one machine.

`Hosts(n, rate_mbit)` makes n network namespaces, each joined to a switch (a bridge in a
namespace of its own) by a veth pair whose two ends are shaped with `tc tbf`: every host
has an uplink and a downlink of `rate_mbit`, like a machine on a switch port of that speed.
Processes started with `Hosts.popen` run inside a host and reach the others at their
addresses; the veth counters say what each link really carried. Everything is removed on
exit (an exception, Ctrl-C or SIGTERM), the processes left in a namespace included.

Needs root and iproute2 (`ip`, `tc`); `unavailable()` says why not where they are missing.
The kernel here has tbf but not netem, so latency is not shaped: the modelled-time mode of
bench/slow_links.py covers it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from dataclasses import dataclass

SUBNET = "10.78.0"
NOWHERE = "02:00:00:00:00:01"  # a locally administered MAC that no host has (set_path)


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    dev: str  # the host's end of its veth pair
    ip: str


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def unavailable() -> str | None:
    """Why test hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"stw-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except OSError as e:
        return f"cannot create network namespaces here: {e}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _exit_on_sigterm() -> signal.Handlers | None:
    """While hosts exist, SIGTERM (a `timeout`, a scheduler's cancel) unwinds the process
    like Ctrl-C does, so that `with Hosts(...)` removes them; SIGKILL still leaves them
    (`ip netns list`, prefix stw-). Returns the handler to put back, or None where the
    handler is not ours to change (a thread, a handler the program set)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, unwind)


class Hosts:
    """n hosts on a switch, each link shaped to rate_mbit each way (see the module doc)."""

    def __init__(self, n: int, rate_mbit: float, *, burst_kb: int = 64, mtu: int = 1500) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"between 1 and 200 hosts, got {n}")
        self.rate_mbit, self.burst_kb, self.mtu = rate_mbit, burst_kb, mtu
        tag = uuid.uuid4().hex[:6]
        self.switch = f"stw-sw-{tag}"
        self.hosts = [Host(i, f"stw-{i}-{tag}", f"h{i}{tag}", f"{SUBNET}.{i + 1}") for i in range(n)]
        self._tag = tag
        self._sigterm: signal.Handlers | None = None

    def __enter__(self) -> Hosts:
        self._sigterm = _exit_on_sigterm()
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)

    def _create(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            port = f"p{h.index}{self._tag}"
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.dev, "mtu", str(self.mtu), "type", "veth", "peer", "name", port, "mtu", str(self.mtu))
            _ip("link", "set", h.dev, "netns", h.netns)
            _ip("link", "set", port, "netns", sw)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.dev)
            _ip("-n", h.netns, "link", "set", h.dev, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            # Uplink (the host's egress) and downlink (the switch port's egress).
            self._shape(h.netns, h.dev)
            self._shape(sw, port)

    def _shape(self, netns: str, dev: str) -> None:
        _ip("netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
            f"{self.rate_mbit}mbit", "burst", f"{self.burst_kb}kb", "latency", "50ms")

    def remove(self) -> None:
        """Kill what still runs inside the hosts and delete every namespace (idempotent)."""
        for netns in [h.netns for h in self.hosts] + [self.switch]:
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)

    # -- using them ---------------------------------------------------------------------

    def popen(self, index: int, args: list[str], *, env: dict[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen:
        """Start `args` inside host `index`; GLOO_SOCKET_IFNAME is its link, so that gloo
        uses it and not whatever the shared hostname resolves to."""
        h = self.hosts[index]
        env = {**(os.environ if env is None else env), "GLOO_SOCKET_IFNAME": h.dev}
        return subprocess.Popen(["ip", "netns", "exec", h.netns, *args], env=env, **kwargs)

    def counters(self, index: int) -> dict[str, int]:
        """Bytes host `index`'s link carried so far: tx (sent) and rx (received), Ethernet
        frames as the veth counts them."""
        h = self.hosts[index]
        stats = json.loads(_ip("-n", h.netns, "-j", "-s", "link", "show", "dev", h.dev))[0]["stats64"]
        return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}

    def set_path(self, a: int, b: int, up: bool) -> None:
        """Cut the path between hosts a and b, or restore it. Cut, each sends its frames for
        the other to a MAC address no switch port has (a permanent neighbour entry), so they
        vanish with no error coming back, as in a partitioned network, while both still
        reach every other host; restored, the entries go and ARP finds the peer again."""
        for src, dst in ((a, b), (b, a)):
            h, peer = self.hosts[src], self.hosts[dst]
            if up:
                _ip("-n", h.netns, "neigh", "del", peer.ip, "dev", h.dev)
            else:
                _ip("-n", h.netns, "neigh", "replace", peer.ip, "lladdr", NOWHERE, "dev", h.dev, "nud", "permanent")

    def set_link(self, index: int, up: bool) -> None:
        """Take host `index`'s only link down or bring it back."""
        h = self.hosts[index]
        _ip("-n", h.netns, "link", "set", h.dev, "up" if up else "down")
