"""The contract between the supervisor and its replica-group processes, in one place.

- **Launch**: a group is `stalwart train --out RUN_DIR --lighthouse URL --replica-id R`;
  joining is resuming: it loads the newest checkpoint and heals from a live peer.
- **Warm spare** (replicas.warm_spare, one rank per group): the supervisor keeps one
  `stalwart train --out RUN_DIR --lighthouse URL --standby` process that has imported the
  training stack, touched RUN_DIR/logs/spare-PID.ready, and waits on its stdin. A restart
  (only of a spare that is ready and not stopped) writes it one line, `R LOG`: it becomes
  group R (exactly as a launch with --replica-id R) and writes to LOG. End of input (the
  supervisor is gone) ends it.
- **Start together**: the first processes of a job wait for each other before step 1
  (`START_TOGETHER_ENV`), so no group trains the first steps alone.
- **Liveness**: rank 0 of a group touches RUN_DIR/logs/replica-R.alive at every step
  attempt, quorum retry and evaluation batch; a group silent for replicas.hang_timeout_s
  is killed and restarted. Every process of one launch of a group carries the same
  `GROUP_TOKEN_ENV` in its environment, and a kill reaches all of them: torchrun starts its
  ranks in sessions of their own, so a process group or a session would miss them.
- **Supervisor watch**: every process of a group (and a Lighthouse the supervisor runs)
  exits within `WATCH_PERIOD_S` of the supervisor's death, whatever signal killed it
  (`SUPERVISOR_ENV` names the supervisor's pid and start time, so a reused pid is no
  supervisor).
- **Exit codes** (a group of several ranks runs under torchrun, which exits 1 when any rank
  fails: the first rank to exit with one of these codes also leaves it in
  `logs/replica-R.exit`, and the supervisor reads it): 0 finished; `EXIT_USAGE` (2) bad input or a full disk: the job stops
  with that line; `EXIT_EXCLUDED` left as a straggler: not restarted; `EXIT_NONFINITE`
  non-finite again right after a heal: restarted until guards.nonfinite_restarts, then
  abandoned; `EXIT_PARTITIONED` every collective failed replicas.max_failed_steps times in
  a row, the Lighthouse was lost, or a heal broke off halfway: restarted (it rejoins and
  heals); `EXIT_STALLED` no commit for 3 x
  guards.max_uncommitted_steps: the job stops with exit code 1; anything else is a crash:
  restarted with backoff.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from stalwart.errors import EXIT_USAGE

START_TOGETHER_ENV = "STALWART_START_TOGETHER"  # set by the supervisor for a job's first processes
START_TOGETHER_TIMEOUT_S = 120.0
SUPERVISOR_ENV = "STALWART_SUPERVISOR"  # "PID:START_TIME" of the supervising process
GROUP_TOKEN_ENV = "STALWART_GROUP_TOKEN"  # the same in every process of one launch of a group
WATCH_PERIOD_S = 1.0

EXIT_EXCLUDED = 3
EXIT_NONFINITE = 4
EXIT_PARTITIONED = 5
EXIT_STALLED = 6
EXIT_ORPHANED = 7  # the supervisor is gone: nobody reads this code, it only marks the log
__all__ = ["EXIT_USAGE", "EXIT_EXCLUDED", "EXIT_NONFINITE", "EXIT_PARTITIONED", "EXIT_STALLED", "EXIT_ORPHANED"]


def exit_path(logs: Path, replica: int) -> Path:
    """Where a rank of a group of several ranks leaves its exit code: torchrun exits 1 when
    any rank fails, whatever the rank's code was."""
    return logs / f"replica-{replica}.exit"


def record_exit(logs: Path, replica: int, code: int) -> None:
    """The first rank of the group to exit with a code of this protocol (or 2) leaves it."""
    try:
        fd = os.open(exit_path(logs, replica), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(code))


def recorded_exit(logs: Path, replica: int) -> int | None:
    """The code a rank of the group left (and the record removed), or None."""
    path = exit_path(logs, replica)
    try:
        text = path.read_text().strip()
        path.unlink()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def start_together(logs: Path, replica: int) -> None:
    """At a job's start, wait (up to START_TOGETHER_TIMEOUT_S) until every group the
    supervisor started is ready for its first quorum, so that no group trains the first
    steps alone and the others begin by healing from it."""
    groups = int(os.environ.pop(START_TOGETHER_ENV, "0") or 0)
    if groups <= 1:
        return
    (logs / f"replica-{replica}.ready").touch()
    deadline = time.monotonic() + START_TOGETHER_TIMEOUT_S
    while len(list(logs.glob("replica-*.ready"))) < groups and time.monotonic() < deadline:
        time.sleep(0.05)


def assign_spare(stdin, replica: int, log: Path) -> None:
    """Make the spare whose stdin this is group `replica`, writing to `log`."""
    stdin.write(f"{replica} {log}\n".encode())
    stdin.close()


def spare_ready_path(logs: Path, pid: int) -> Path:
    return logs / f"spare-{pid}.ready"


def await_assignment(logs: Path) -> int | None:
    """In a spare whose imports are done: say so (spare-PID.ready), block until the
    supervisor names the group this process becomes, send stdout and stderr to that group's
    log, and return the group; None if the supervisor went away first."""
    spare_ready_path(logs, os.getpid()).touch()
    line = sys.stdin.readline()
    if not line.strip():
        return None
    replica, log = line.rstrip("\n").split(" ", 1)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return int(replica)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... (raises OSError if gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_stopped(pid: int) -> bool:
    """True if `pid` is stopped (SIGSTOP) or traced; False if it runs or /proc cannot tell."""
    try:
        return _stat_fields(pid)[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def process_identity(pid: int) -> str | None:
    """"PID:START_TIME" of a live process (the start time from /proc, so that a pid the
    kernel hands out again is not mistaken for the old process); None if it is gone."""
    try:
        fields = _stat_fields(pid)
        if fields[0] == "Z":  # a zombie is dead
            return None
        return f"{pid}:{fields[19]}"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    except OSError:  # no /proc (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return f"{pid}:0"


def supervisor_identity() -> str:
    return process_identity(os.getpid()) or f"{os.getpid()}:0"


def supervised() -> bool:
    """Whether a supervisor started this process."""
    return bool(os.environ.get(SUPERVISOR_ENV))


def watch_supervisor(on_lost) -> None:
    """If a supervisor started this process, call `on_lost()` from a daemon thread once it
    is gone (checked every WATCH_PERIOD_S)."""
    identity = os.environ.get(SUPERVISOR_ENV)
    if not identity:
        return
    pid = int(identity.split(":")[0])

    def watch() -> None:
        while process_identity(pid) == identity:
            time.sleep(WATCH_PERIOD_S)
        on_lost()

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def processes_with_token(token: str) -> list[int]:
    """Pids of the processes whose environment holds GROUP_TOKEN_ENV=token (Linux /proc;
    elsewhere none are found and a kill reaches the launcher's process group only)."""
    needle = f"{GROUP_TOKEN_ENV}={token}".encode()
    found = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found
