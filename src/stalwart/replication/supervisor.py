"""The supervisor of `stalwart train --replicas N`: one process that starts a Lighthouse
(or uses the one given), spawns one process per replica group, restarts a group that
crashes or hangs, shows the job's progress, and writes the job's summary.

A restarted group starts from the latest checkpoint and heals from a live peer at its
first quorum, so the job never restarts and the surviving groups never stop. Restarts
back off (`restart_backoff_s`, doubled per restart of the same group, at most 8 s) up to
`max_restarts` per group; a group that made no progress (no step, no evaluation batch: its
RUN_DIR/logs/replica-R.alive file is touched at each) for `hang_timeout_s` (SIGSTOP, a
wedged device) is killed and restarted like a crashed one.

Each group's output goes to RUN_DIR/logs/replica-R.log. Events written here: group_start
(with its pid), group_exit, group_hung, group_restart, group_abandoned, group_excluded,
job_end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart import checkpoint as ckpt
from stalwart.config import RunConfig
from stalwart.errors import UserError
from stalwart.faults import INJECT_ENV
from stalwart.replication.group import START_TOGETHER_ENV
from stalwart.goodput import goodput_report
from stalwart.train.progress import Progress
from stalwart.train.rundir import RunDir

EXIT_EXCLUDED = 3  # a group that left the job as a straggler: not restarted
POLL_S = 0.1
MAX_BACKOFF_S = 8.0


@dataclass
class GroupProcess:
    replica: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    done: bool = False  # finished its steps, or gave up for good
    finished: bool = False  # exited 0: trained to the last step


def start_lighthouse(cfg: RunConfig, bind: str):
    """A torchft Lighthouse with this run's quorum settings; returns the server."""
    from torchft.coordination import LighthouseServer

    r = cfg.replicas
    if r.torchft_defaults:
        return LighthouseServer(bind=bind, min_replicas=r.min_replicas)
    return LighthouseServer(bind=bind, min_replicas=r.min_replicas, join_timeout_ms=int(r.join_timeout_s * 1000),
                            quorum_tick_ms=50, heartbeat_timeout_ms=int(r.heartbeat_timeout_s * 1000))


def supervise(cfg: RunConfig, out: Path, *, resume: bool, quiet: bool, lighthouse: str | None = None,
              groups: list[int] | None = None, host: str = "127.0.0.1") -> dict[str, Any]:
    from stalwart.train.loop import documents, prepare_tokenizer

    run = RunDir(out, checkpoints=cfg.checkpoint.dir)
    run.create()
    run.write_config(cfg.to_json())
    prepare_tokenizer(cfg, run, resume, documents(cfg, "train"))
    started_at, started = time.time(), time.monotonic()
    first_step = 0
    if resume:
        for partial in ckpt.remove_partial(run.checkpoints):
            run.event("checkpoint_partial_removed", path=str(partial))
        steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run.checkpoints)]
        first_step = max(steps, default=0)
        run.truncate_metrics(first_step)
        run.repair_events()
    server = None
    if lighthouse is None:
        server = start_lighthouse(cfg, bind=f"{host}:0")
        # address() names the machine's hostname; peers here must use the bound address.
        lighthouse = f"http://{host}:{server.address().rsplit(':', 1)[1]}"
    groups = list(range(cfg.replicas.count)) if groups is None else groups
    run.event("job_start", replicas=cfg.replicas.count, groups=groups, lighthouse=lighthouse, step=first_step)
    (run.path / "logs").mkdir(exist_ok=True)
    for stale in (run.path / "logs").glob("replica-*.ready"):
        stale.unlink()
    procs = {r: GroupProcess(r) for r in groups}
    env = dict(os.environ)
    # Share the cores: N groups with all cores each would oversubscribe the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (len(groups) * cfg.replicas.ranks_per_group))))

    def spawn(g: GroupProcess) -> None:
        launcher = [sys.executable]
        if cfg.replicas.ranks_per_group > 1:  # torchrun starts the group's ranks; we restart the group as a whole
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.replicas.ranks_per_group),
                         "--max-restarts", "0"]
        args = [*launcher, "-m", "stalwart", "train", "--out", str(run.path), "--quiet",
                "--lighthouse", lighthouse, "--replica-id", str(g.replica), "--host", host]
        log = open(run.path / "logs" / f"replica-{g.replica}.log", "ab")
        # Injected faults fire in a group's first process only: its restart runs clean. The
        # first processes wait for each other before step 1 (a restart joins at once).
        group_env = {**env, START_TOGETHER_ENV: str(len(groups))} if g.restarts == 0 else \
            {k: v for k, v in env.items() if k != INJECT_ENV}
        g.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=group_env, start_new_session=True)
        log.close()
        g.last_progress, g.restart_at = time.monotonic(), None
        run.event("group_start", replica=g.replica, pid=g.proc.pid, restarts=g.restarts)

    # Slurm and friends stop a job with SIGTERM: end the groups too, not orphan them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    progress = Progress(cfg.train.steps, first_step, quiet=quiet, log_every=cfg.train.log_every)
    tail = _MetricsTail(run.metrics_path)
    shown = first_step
    r = cfg.replicas
    try:
        with progress:
            for g in procs.values():
                spawn(g)
            while not all(g.done for g in procs.values()):
                time.sleep(POLL_S)
                now = time.monotonic()
                for g in procs.values():  # each group touches its .alive file every step and eval batch
                    try:
                        beat = time.time() - run.alive_path(g.replica).stat().st_mtime
                        g.last_progress = max(g.last_progress, now - beat)
                    except FileNotFoundError:
                        pass
                for record in tail.read():
                    if record.get("step", 0) > shown:
                        shown = record["step"]
                        progress.update(shown, record)
                for g in procs.values():
                    if g.done:
                        continue
                    if g.proc is None:
                        if g.restart_at is not None and now >= g.restart_at:
                            g.restarts += 1
                            run.event("group_restart", replica=g.replica, restarts=g.restarts)
                            spawn(g)
                        continue
                    code = g.proc.poll()
                    if code is None and now - g.last_progress > r.hang_timeout_s:
                        g.proc.kill()
                        g.proc.wait()
                        run.event("group_hung", replica=g.replica, pid=g.proc.pid,
                                  silent_s=round(now - g.last_progress, 1))
                        g.proc = None
                        _schedule_restart(run, g, r)
                        continue
                    if code is None:
                        continue
                    g.proc = None
                    if code == 0:
                        g.done = g.finished = True
                    elif code == EXIT_EXCLUDED:
                        g.done = True
                        run.event("group_excluded", replica=g.replica)
                    else:
                        run.event("group_exit", replica=g.replica, returncode=code,
                                  signal=signal.Signals(-code).name if code < 0 else None)
                        _schedule_restart(run, g, r)
    finally:
        for g in procs.values():
            if g.proc is not None and g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait()
        if server is not None:
            server.shutdown()

    wall = time.monotonic() - started
    finished = sum(g.finished for g in procs.values())
    if not finished:
        run.event("job_end", ok=False, wall_s=round(wall, 3))
        raise UserError(f"every replica group failed; see {run.path}/logs and events.jsonl, and continue with "
                        f"stalwart train --resume --out {run.path}")
    summary = run.read_summary()
    summary.update(goodput_report(run.read_metrics(), run.read_events(), wall_s=wall, since=started_at))
    summary.update({"wall_s": round(wall, 3), "replicas": cfg.replicas.count,
                    "restarts": sum(g.restarts for g in procs.values()), "groups_finished": finished})
    run.write_summary(summary)
    run.event("job_end", ok=True, wall_s=round(wall, 3), ettr=summary["ettr"], steps_lost=summary["steps_lost"],
              mean_recover_s=summary["mean_recover_s"], restarts=summary["restarts"])
    return summary


def _schedule_restart(run: RunDir, g: GroupProcess, r) -> None:
    if g.restarts >= r.max_restarts:
        g.done = True
        run.event("group_abandoned", replica=g.replica, restarts=g.restarts)
        return
    delay = min(r.restart_backoff_s * 2 ** g.restarts, MAX_BACKOFF_S)
    g.restart_at = time.monotonic() + delay


class _MetricsTail:
    """New complete lines of metrics.jsonl since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        import json

        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

