"""`stalwart lighthouse`: run a torchft Lighthouse for replica groups on several machines.

The Lighthouse forms each step's quorum of replica groups. `stalwart train --replicas N`
starts its own on loopback; a job across machines runs this on one host and passes
`--lighthouse http://HOST:PORT` to `stalwart train` on every machine. It runs until stopped,
or until the supervisor that started it dies.
"""

from __future__ import annotations

import argparse

from stalwart.errors import UserError

HELP = "run a torchft Lighthouse for replica groups on several machines"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default="127.0.0.1:29510", help="HOST:PORT to listen on (default 127.0.0.1:29510)")
    p.add_argument("--min-replicas", type=int, default=1, help="groups needed for a quorum (default 1)")
    p.add_argument("--join-timeout-s", type=float, default=1.0)
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--torchft-defaults", action="store_true", help="torchft's own timeouts (the benchmark baseline)")


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from torchft.coordination import LighthouseServer

    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--bind {args.bind!r} is not HOST:PORT")
    if args.min_replicas < 1 or args.join_timeout_s <= 0 or args.heartbeat_timeout_s <= 0:
        raise UserError("--min-replicas must be >= 1 and the timeouts > 0")
    from stalwart.replication.protocol import watch_supervisor

    timing = {} if args.torchft_defaults else {
        "join_timeout_ms": int(args.join_timeout_s * 1000), "quorum_tick_ms": 50,
        "heartbeat_timeout_ms": int(args.heartbeat_timeout_s * 1000)}
    try:
        server = LighthouseServer(bind=args.bind, min_replicas=args.min_replicas, **timing)
    except RuntimeError as e:
        raise UserError(f"cannot start the Lighthouse on {args.bind}: {str(e).splitlines()[0]}") from None
    print(f"lighthouse listening on {args.bind} (min {args.min_replicas} replica groups); pass "
          f"--lighthouse http://{args.bind} to `stalwart train`", flush=True)
    watch_supervisor(lambda: os._exit(0))  # run by a supervisor: it ends with it
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
