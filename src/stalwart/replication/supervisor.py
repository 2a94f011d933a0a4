"""The supervisor of `stalwart train --replicas N` and `stalwart rl --replicas N`: one
process that runs the Lighthouse (or uses the one given), spawns one process per replica
group, restarts a group that crashes or hangs, shows the job's progress, feeds the job's
tracking sinks (--track: from the groups' metrics.jsonl records), and writes the job's
summary and report. The contract
with the groups (exit codes, liveness, the supervisor watch) is replication/protocol.py.

- A restarted group starts from the latest checkpoint and heals from a live peer at its
  first quorum, so the job never restarts and the surviving groups never stop. Restarts
  back off (`restart_backoff_s`, doubled per restart of the same group, at most 8 s) up to
  `max_restarts` per group; a group that has committed `restart_refill_steps` steps since
  its last restart has its budget refilled.
- A group that made no progress for `hang_timeout_s` (SIGSTOP, a wedged device) is killed
  with its whole process group (every rank of a torchrun group) and restarted. Until its
  first beat (a process starting: imports, model, checkpoint) the limit is `start_timeout_s`.
- A restarted one-rank group is, where it can be, the warm spare (replicas.warm_spare): a
  process started ahead with the training stack imported, which becomes the group at once;
  a new spare is started SPARE_DELAY_S later, when the restarted group has healed.
- On one machine the Lighthouse is a child process, restarted on the same address when it
  dies; groups ride out the outage (replicas.lighthouse_grace_s).
- A group that exits with a usage error (bad input, a full disk) stops the job with that
  line (exit code 2); one that stalled stops it with exit code 1. Every group crashing 3
  times before the job's first commit with the same error (a bug, a broken install) stops
  it with that line and exit code 1. Never a restart loop.
- The supervisor's own death (any signal, SIGKILL included) ends its groups and its
  Lighthouse within a second or two: they watch it. `stalwart train --resume` continues.

Each group's output goes to RUN_DIR/logs/replica-R.log, the Lighthouse's to
RUN_DIR/logs/lighthouse.log. Events written here: job_start, group_start (with its pid),
group_exit, group_hung, group_restart, group_abandoned, group_excluded, group_error,
job_failing_at_start, restart_budget_refilled, spare_start, spare_exit, spare_disabled, lighthouse_start, lighthouse_exit, job_end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart import checkpoint as ckpt
from stalwart.config import RunConfig
from stalwart.data.sources import prepare_tokenizer
from stalwart.errors import EXIT_USAGE, TrainingStopped, UserError
from stalwart.faults import INJECT_ENV
from stalwart.replication.protocol import (EXIT_EXCLUDED, EXIT_NONFINITE, EXIT_ORPHANED, EXIT_PARTITIONED,
                                           EXIT_STALLED, GROUP_TOKEN_ENV, START_TOGETHER_ENV, SUPERVISOR_ENV,
                                           assign_spare, exit_path, process_stopped, processes_with_token,
                                           recorded_exit, spare_ready_path, supervisor_identity)
from stalwart.replication.transport import SECRET_ENV
from stalwart.run.goodput import goodput_report
from stalwart.run.progress import Progress
from stalwart.run.report import write_report_after_training
from stalwart.run.rundir import JsonlTail, RunDir
from stalwart.run.tracking import Tracker

POLL_S = 0.1
MAX_BACKOFF_S = 8.0
LIGHTHOUSE_START_S = 30.0
SPARE_DELAY_S = 10.0  # after the job's start or a spare's use: not while groups start or heal
START_FAILURES = 3  # launches of every group crashing the same way before the first commit: the job stops
NO_OUTPUT = "no output"
OWN_LINE = re.compile(r"^stalwart (train|rl): ")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")
MAX_SPARE_DEATHS = 3  # spares that die unused, in a row, before restarts go back to new processes


@dataclass
class GroupProcess:
    replica: int
    proc: subprocess.Popen | None = None
    token: str = ""  # GROUP_TOKEN_ENV of its current launch
    restarts: int = 0  # restarts since the budget was last refilled
    total_restarts: int = 0
    nonfinite_exits: int = 0
    restart_at: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    alive_at_launch: int | None = None  # the alive file's mtime (ns) when it was launched
    beating: bool = False  # its current launch has beaten at least once
    committed_since_start: int = 0
    committed_in_job: bool = False  # any launch of it committed a step in this job
    log_offset: int = 0  # the size of its log when its current launch began
    # (time, error line) of each launch that crashed before this job's first commit
    start_errors: list[tuple[float, str]] = field(default_factory=list)
    done: bool = False  # finished its steps, or gave up for good
    finished: bool = False  # exited 0: trained to the last step


class WarmSpare:
    """At most one `stalwart train --standby` process, started when due, handed to the next
    restarted group (replication/protocol.py)."""

    def __init__(self, run: RunDir, args: list[str], env: dict[str, str], enabled: bool) -> None:
        self.run, self.args, self.env, self.enabled = run, [*args, "--standby"], env, enabled
        self.log = run.logs / "spare.log"
        self.proc: subprocess.Popen | None = None
        self.token = ""
        self.launches = 0
        self.deaths = 0  # spares that died unused, in a row
        self.due = time.monotonic() + SPARE_DELAY_S

    def poll(self, now: float) -> None:
        """Start a spare when one is due; forget one that died (a later one replaces it)."""
        if not self.enabled:
            return
        if self.proc is not None and self.proc.poll() is not None:
            self.run.event("spare_exit", pid=self.proc.pid, returncode=self.proc.returncode)
            spare_ready_path(self.run.logs, self.proc.pid).unlink(missing_ok=True)
            self.proc, self.due, self.deaths = None, now + SPARE_DELAY_S, self.deaths + 1
            if self.deaths >= MAX_SPARE_DEATHS:  # restarts start new processes from here on
                self.enabled = False
                self.run.event("spare_disabled", reason=f"{self.deaths} spares in a row died unused")
                return
        if self.proc is None and now >= self.due:
            self.token = f"{os.getpid()}-spare-{self.launches}"
            self.launches += 1
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                             env={**self.env, GROUP_TOKEN_ENV: self.token}, start_new_session=True)
            self.run.event("spare_start", pid=self.proc.pid)

    def take(self, replica: int, log: Path) -> tuple[subprocess.Popen, str] | None:
        """The spare, now group `replica`, with its launch token; None if there is none that
        has finished its imports and runs (a stopped spare would leave the group silent)."""
        if self.proc is None or self.proc.poll() is not None or process_stopped(self.proc.pid) \
                or not spare_ready_path(self.run.logs, self.proc.pid).exists():
            return None
        proc, token, self.proc = self.proc, self.token, None
        try:
            assign_spare(proc.stdin, replica, log)
        except BrokenPipeError:  # it died just now
            _kill_group(proc, token)
            return None
        spare_ready_path(self.run.logs, proc.pid).unlink(missing_ok=True)
        self.due, self.deaths = time.monotonic() + SPARE_DELAY_S, 0
        return proc, token

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, self.token)
            self.proc = None


class LighthouseProcess:
    """`stalwart lighthouse` as a child on a fixed address, restarted when it dies."""

    def __init__(self, cfg: RunConfig, host: str, run: RunDir, env: dict[str, str]) -> None:
        r = cfg.replicas
        self.run, self.env = run, env
        self.bind = f"{host}:{_free_port(host)}"
        self.args = [sys.executable, "-m", "stalwart", "lighthouse", "--bind", self.bind,
                     "--min-replicas", str(r.min_replicas)]
        self.args += ["--torchft-defaults"] if r.torchft_defaults else \
            ["--join-timeout-s", str(r.join_timeout_s), "--heartbeat-timeout-s", str(r.heartbeat_timeout_s)]
        self.proc: subprocess.Popen | None = None
        self.next_start = 0.0
        self.start()
        _wait_for_port(self.bind, LIGHTHOUSE_START_S)

    @property
    def url(self) -> str:
        return f"http://{self.bind}"

    def start(self) -> None:
        self.next_start = time.monotonic() + 1.0  # a bind that fails (address still busy) is retried each second
        with open(self.run.logs / "lighthouse.log", "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        self.run.event("lighthouse_start", pid=self.proc.pid, address=self.url)

    def poll(self) -> None:
        """Restart it when it has died (the address may stay busy for a moment: retried)."""
        if self.proc is None or self.proc.poll() is None or time.monotonic() < self.next_start:
            return
        self.run.event("lighthouse_exit", pid=self.proc.pid, returncode=self.proc.returncode)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc)


def supervise(cfg: RunConfig, out: Path, *, resume: bool, quiet: bool, secret: str, lighthouse: str | None = None,
              groups: list[int] | None = None, host: str = "127.0.0.1", command: str = "train",
              prepare: Callable[[RunDir], None] | None = None) -> dict[str, Any]:
    """Run the job's groups, each `stalwart COMMAND --replica-id R` (train, or rl); `prepare`
    does what the run needs once before they start (train: the tokenizer)."""
    run = RunDir(out, checkpoints=cfg.checkpoint.dir)
    run.create()
    run.write_config(cfg.to_json())
    if prepare is None:
        prepare_tokenizer(cfg, run.path, reuse=resume)
    else:
        prepare(run)
    started_at, started = time.time(), time.monotonic()
    first_step = 0
    if resume:
        for partial in ckpt.remove_partial(run.checkpoints, dead_writers_only=True):
            run.event("checkpoint_partial_removed", path=str(partial))
        steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run.checkpoints)]
        first_step = max(steps, default=0)
        run.truncate_metrics(first_step)
        run.repair_events()
    run.logs.mkdir(exist_ok=True)
    for stale in run.logs.glob("replica-*.ready"):
        stale.unlink()
    env = {**os.environ, SUPERVISOR_ENV: supervisor_identity(), SECRET_ENV: secret}
    groups = list(range(cfg.replicas.count)) if groups is None else groups
    # Share the cores: N groups with all cores each would oversubscribe the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (len(groups) * cfg.replicas.ranks_per_group))))
    own_lighthouse = LighthouseProcess(cfg, host, run, env) if lighthouse is None else None
    lighthouse = own_lighthouse.url if own_lighthouse else lighthouse
    run.event("job_start", replicas=cfg.replicas.count, groups=groups, lighthouse=lighthouse, step=first_step)
    procs = {r: GroupProcess(r) for r in groups}

    launcher = [sys.executable]
    if cfg.replicas.ranks_per_group > 1:  # torchrun starts the group's ranks; we restart the group as a whole
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(cfg.replicas.ranks_per_group), "--max-restarts", "0"]
    train_args = [*launcher, "-m", "stalwart", command, "--out", str(run.path), "--quiet", "--lighthouse", lighthouse,
                  "--host", host]
    # Injected faults fire in a group's first process only: its restart (or the spare) runs clean.
    restart_env = {k: v for k, v in env.items() if k != INJECT_ENV}
    spare = WarmSpare(run, train_args, restart_env,
                      enabled=cfg.replicas.warm_spare and cfg.replicas.ranks_per_group == 1 and command == "train")

    def spawn(g: GroupProcess) -> None:
        exit_path(run.logs, g.replica).unlink(missing_ok=True)  # only this launch's ranks leave one
        log_path = _log_path(run, g.replica)
        g.log_offset = log_path.stat().st_size if log_path.exists() else 0  # this launch writes after it
        taken = spare.take(g.replica, log_path) if g.total_restarts else None
        if taken is not None:
            g.proc, g.token = taken
        else:
            # The first processes wait for each other before step 1 (a restart joins at once).
            group_env = {**env, START_TOGETHER_ENV: str(len(groups))} if g.total_restarts == 0 else dict(restart_env)
            g.token = f"{os.getpid()}-{g.replica}-{g.total_restarts}"
            group_env[GROUP_TOKEN_ENV] = g.token
            with open(log_path, "ab") as log:
                # Its own session: a hang kill or shutdown reaches every process of the group.
                g.proc = subprocess.Popen([*train_args, "--replica-id", str(g.replica)], stdout=log,
                                          stderr=subprocess.STDOUT, env=group_env, start_new_session=True)
        g.last_progress, g.restart_at, g.committed_since_start = time.monotonic(), None, 0
        g.alive_at_launch, g.beating = _mtime_ns(run.alive_path(g.replica)), False
        run.event("group_start", replica=g.replica, pid=g.proc.pid, restarts=g.total_restarts, spare=taken is not None)

    # Slurm and friends stop a job with SIGTERM: end the groups too, not orphan them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    progress = Progress(cfg.train.steps, first_step, quiet=quiet, log_every=cfg.train.log_every)
    tail = JsonlTail(run.metrics_path)
    tracker = Tracker(run, cfg.track, config=cfg.to_dict(), first_step=first_step, quiet=quiet)  # the job's one
    shown = first_step
    r = cfg.replicas
    stop: Exception | None = None
    try:
        with progress:
            for g in procs.values():
                spawn(g)
            while stop is None and not all(g.done for g in procs.values()):
                time.sleep(POLL_S)
                now = time.monotonic()
                if own_lighthouse is not None:
                    own_lighthouse.poll()
                spare.poll(now)
                for g in procs.values():  # each group touches its .alive file every step and eval batch
                    try:
                        beat_at = run.alive_path(g.replica).stat()
                    except FileNotFoundError:
                        continue
                    if g.beating or beat_at.st_mtime_ns != g.alive_at_launch:  # not the launch before's beat
                        g.beating = True
                        g.last_progress = max(g.last_progress, now - (time.time() - beat_at.st_mtime))
                for record in tail.read():
                    if "loss" not in record:  # a DiLoCo round's outer step, not a training step
                        continue
                    if record.get("replica") in procs:
                        _count_commit(run, procs[record["replica"]], r.restart_refill_steps)
                    if record.get("step", 0) > shown:
                        shown = record["step"]
                        progress.update(shown, record)
                for g in procs.values():
                    stop = stop or _watch_group(run, cfg, g, now, spawn)
                stop = stop or _failing_the_same_way_at_start(run, procs)
                tracker.poll()
    finally:
        tracker.close()
        spare.stop()
        for g in procs.values():
            if g.proc is not None:
                _kill_group(g.proc, g.token)
        if own_lighthouse is not None:
            own_lighthouse.stop()

    wall = time.monotonic() - started
    finished = sum(g.finished for g in procs.values())
    if stop is not None or not finished:
        run.event("job_end", ok=False, wall_s=round(wall, 3), reason=str(stop) if stop else "every group failed")
        if stop is not None:
            raise stop
        errors = sorted(e for g in procs.values() for e in g.start_errors)
        why = f" (the last before its first step: {errors[-1][1]})" if errors else ""
        raise UserError(f"every replica group failed{why}; see {run.path}/logs and events.jsonl, and continue "
                        f"with stalwart {command} --resume --out {run.path}")
    summary = run.read_summary()
    # An rl job's summary comes from one group of every machine (the final claim): without
    # one, the claimant died after its last step and was not restarted. A train job's comes
    # from the lowest group only, so a machine without it has none of its own.
    if not summary and command == "rl":
        run.event("job_end", ok=False, wall_s=round(wall, 3), reason="no group wrote the summary")
        raise TrainingStopped(f"the groups finished but none wrote {run.summary_path.name} (see {run.path}/logs); "
                              f"continue with stalwart {command} --resume --out {run.path}")
    summary.update(goodput_report(run.read_metrics(), run.read_events(), wall_s=wall, groups=len(groups),
                                  job_groups=cfg.replicas.count, since=started_at,
                                  local_steps=cfg.replicas.strategy != "ddp"))
    summary.update({"wall_s": round(wall, 3), "replicas": cfg.replicas.count,
                    "restarts": sum(g.total_restarts for g in procs.values()), "groups_finished": finished})
    run.write_summary(summary)
    run.event("job_end", ok=True, wall_s=round(wall, 3), ettr=summary["ettr"], steps_lost=summary["steps_lost"],
              mean_recover_s=summary["mean_recover_s"], restarts=summary["restarts"])
    if cfg.train.report:
        write_report_after_training(run)
    return summary


def _watch_group(run: RunDir, cfg: RunConfig, g: GroupProcess, now: float, spawn) -> Exception | None:
    """One look at one group: restart it when due, kill it when hung, act on its exit.
    Returns the error that stops the job, if its exit says so."""
    r = cfg.replicas
    if g.done:
        return None
    if g.proc is None:
        if g.restart_at is not None and now >= g.restart_at:
            g.restarts += 1
            g.total_restarts += 1
            run.event("group_restart", replica=g.replica, restarts=g.total_restarts)
            spawn(g)
        return None
    code = g.proc.poll()
    if code is None:
        if now - g.last_progress > (r.hang_timeout_s if g.beating else r.start_timeout_s):
            _kill_group(g.proc, g.token)
            run.event("group_hung", replica=g.replica, pid=g.proc.pid, silent_s=round(now - g.last_progress, 1),
                      since=round(time.time() - (now - g.last_progress), 3), starting=not g.beating)
            g.proc = None
            _schedule_restart(run, g, r)
        return None
    pid, proc, g.proc = g.proc.pid, g.proc, None
    _kill_group(proc, g.token)  # whatever it leaves behind (a rank torchrun did not stop) goes with it
    recorded = recorded_exit(run.logs, g.replica)  # a rank's own code, under torchrun's 1
    code = recorded if recorded is not None and code == 1 else code
    if code == 0:
        g.done = g.finished = True
    elif code == EXIT_EXCLUDED:
        g.done = True
        run.event("group_excluded", replica=g.replica)
    elif code in (EXIT_USAGE, EXIT_STALLED):
        g.done = True
        line = _last_error_line(_log_path(run, g.replica), g.log_offset)
        run.event("group_error", replica=g.replica, pid=pid, returncode=code, error=line)
        return (UserError if code == EXIT_USAGE else TrainingStopped)(f"replica group {g.replica} stopped the job: {line}")
    else:
        run.event("group_exit", replica=g.replica, returncode=code, pid=pid,
                  signal=signal.Signals(-code).name if code < 0 else None)
        if not g.committed_in_job and code not in (EXIT_PARTITIONED, EXIT_ORPHANED) and code > 0:
            # A crash of its own (not a lost peer or Lighthouse, not a signal from outside).
            g.start_errors.append((time.monotonic(), _last_error_line(_log_path(run, g.replica), g.log_offset)))
        if code == EXIT_NONFINITE:
            g.nonfinite_exits += 1
            if g.nonfinite_exits > cfg.guards.nonfinite_restarts:
                g.done = True
                run.event("group_abandoned", replica=g.replica, restarts=g.total_restarts,
                          reason=f"non-finite right after a heal {g.nonfinite_exits} times (guards.nonfinite_restarts)")
                return None
        _schedule_restart(run, g, r)
    return None


def _failing_the_same_way_at_start(run: RunDir, procs: dict[int, GroupProcess]) -> Exception | None:
    """Every group's last START_FAILURES launches crashed before the job's first commit with
    the same error (numbers aside): not a fault a restart gets past (a bug, a broken
    install), so the job stops with that line instead of spending every restart budget."""
    if any(g.committed_in_job or len(g.start_errors) < START_FAILURES for g in procs.values()):
        return None
    lines = [line for g in procs.values() for _, line in g.start_errors[-START_FAILURES:]]
    if len({re.sub(r"\d+", "N", line) for line in lines}) != 1 or lines[0] == NO_OUTPUT:
        return None
    run.event("job_failing_at_start", error=lines[-1], launches=sum(len(g.start_errors) for g in procs.values()))
    return TrainingStopped(f"every replica group crashed {START_FAILURES} times before its first step with: "
                           f"{lines[-1]} (see {_log_path(run, min(procs))})")


def _count_commit(run: RunDir, g: GroupProcess, refill_steps: int) -> None:
    g.committed_since_start += 1
    g.committed_in_job = True
    if g.restarts and g.committed_since_start >= refill_steps:
        run.event("restart_budget_refilled", replica=g.replica, restarts=g.restarts, steps=g.committed_since_start)
        g.restarts = 0


def _schedule_restart(run: RunDir, g: GroupProcess, r) -> None:
    if g.restarts >= r.max_restarts:
        g.done = True
        run.event("group_abandoned", replica=g.replica, restarts=g.total_restarts, reason="replicas.max_restarts")
        return
    delay = min(r.restart_backoff_s * 2 ** g.restarts, MAX_BACKOFF_S)
    g.restart_at = time.monotonic() + delay


def _kill_group(proc: subprocess.Popen, token: str | None = None) -> None:
    """SIGKILL a process, its process group, and every process that carries its launch's
    token (torchrun's ranks, in sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in processes_with_token(token) if token else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _log_path(run: RunDir, replica: int) -> Path:
    return run.logs / f"replica-{replica}.log"


def _last_error_line(log: Path, offset: int = 0) -> str:
    """What the launch that wrote `log` from `offset` on said last: its own one-line error
    (`stalwart train: error: ...`, or rl's), else the last exception line of a traceback (torchrun
    prints its banner after it), else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return NO_OUTPUT
    errors = [line for line in lines if OWN_LINE.match(line)]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    line = (errors or raised or lines or [NO_OUTPUT])[-1]
    return OWN_LINE.sub("", line, count=1).removeprefix("error: ")[:300]


def _wait_for_port(bind: str, timeout: float) -> None:
    host, _, port = bind.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise UserError(f"the Lighthouse did not start on {bind} within {timeout:.0f} s (see its log)")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
