"""Deterministic fault injection, for tests and chaos runs: faults fire at a named point of
a named step, never after a sleep.

    STALWART_INJECT="kill@12,kill-in-checkpoint@20"

`kill@N` SIGKILLs the process at the start of step N (before any of its work);
`kill-in-checkpoint@N` SIGKILLs it halfway through writing the checkpoint of step N, after
the weights are on disk and before the folder is renamed into place. Injection points are
plain function calls that cost one set lookup when nothing is injected.
"""

from __future__ import annotations

import functools
import os
import signal

from stalwart.errors import ConfigError

INJECT_ENV = "STALWART_INJECT"
POINTS = ("kill", "kill-in-checkpoint")


@functools.cache
def _planned(spec: str) -> frozenset[tuple[str, int]]:
    planned = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, step = item.partition("@")
        if point not in POINTS or not step.isdigit():
            raise ConfigError(f"{INJECT_ENV}: bad fault {item!r} (expected POINT@STEP, POINT one of {', '.join(POINTS)})")
        planned.add((point, int(step)))
    return frozenset(planned)


def inject(point: str, step: int) -> None:
    """Fire the fault planned for (point, step), if any."""
    spec = os.environ.get(INJECT_ENV)
    if spec and (point, step) in _planned(spec):
        os.kill(os.getpid(), signal.SIGKILL)
