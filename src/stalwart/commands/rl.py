"""`stalwart rl`: post-train a model with GRPO on the task's verifiable rewards (rl/loop.py).

--from is a run directory (its newest good checkpoint) or a model folder; with no other
option it runs the default: 4-digit addition, one column more than the main job learns,
scored by exact match. --section.key VALUE overrides any field (`rl.*`: rl/objective.py's
losses, the group size, the KL coefficient, updates per batch). --resume continues a run.
--replicas N runs it as N replica groups under a supervisor (as `stalwart train --replicas`);
--lighthouse URL with --replica-id makes this process one group of a job whose groups run
on several machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stalwart.errors import UserError

HELP = "post-train with GRPO (grpo, dr_grpo, dapo) on verifiable rewards"
RESUMABLE = ("train.steps", "train.log_every", "checkpoint.every", "checkpoint.keep", "eval.problems")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", help="run directory or model folder to start from")
    p.add_argument("--out", help="run directory (default: runs/rl-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON on stdout")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="replica groups on torchft (replicas.count): a Lighthouse on loopback and one process per "
                        "group, restarted and healed when it crashes or hangs")
    p.add_argument("--lighthouse", metavar="URL", help="an existing Lighthouse (see `stalwart lighthouse`)")
    p.add_argument("--replica-id", type=int, metavar="ID",
                   help="with --lighthouse and --out: this process is replica group ID, without a supervisor")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address peers reach this machine's groups at (default 127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    from stalwart.api import check_out
    from stalwart.commands.train import parse_overrides
    from stalwart.config import apply_overrides, read_run_config
    from stalwart.faults import check_spec
    from stalwart.rl.loop import check_rl_config, prepare_run, rl_config, train_rl

    check_spec()
    settings = parse_overrides(args.overrides)
    if args.replicas is not None:
        settings["replicas.count"] = str(args.replicas)
    if args.replica_id is not None:
        if not (args.lighthouse and args.out):
            raise UserError("--replica-id needs --lighthouse URL and --out RUN_DIR")
        return _group(args, settings)
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR")
        fixed = sorted(set(settings) - set(RESUMABLE))
        if fixed:
            raise UserError(f"--resume cannot change {', '.join(fixed)} (it may change: {', '.join(RESUMABLE)})")
        cfg = apply_overrides(read_run_config(Path(args.out) / "config.json"), settings)
        check_rl_config(cfg)
    else:
        if not args.source:
            raise UserError("--from RUN_DIR|FOLDER is required: the trained model to start from")
        cfg = rl_config(args.source, settings)
    out = Path(args.out or time.strftime("runs/rl-%Y%m%d-%H%M%S"))
    check_out(out, resume=args.resume)
    if cfg.replicas.count > 1 or args.lighthouse:
        from stalwart.commands.train import lighthouse_url
        from stalwart.replication.supervisor import supervise
        from stalwart.replication.transport import SECRET_ENV, job_secret, new_job_secret

        secret = job_secret()
        if secret is None and args.lighthouse:
            raise UserError(f"{SECRET_ENV} is not set: groups on several machines must share one job secret "
                            "(export the same 64 hex digits on every machine)")
        summary = supervise(cfg, out, resume=args.resume, quiet=args.quiet, host=args.host,
                            secret=secret.hex() if secret else new_job_secret(), command="rl",
                            lighthouse=lighthouse_url(args.lighthouse) if args.lighthouse else None,
                            prepare=lambda run: prepare_run(cfg, run))
    else:
        summary = train_rl(cfg, out, resume=args.resume, quiet=args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        k = cfg.rl.pass_k
        print(f"run: {out}\nexact match {summary['eval_exact_match_before']:.1%} -> {summary['eval_exact_match']:.1%}, "
              f"pass@{k} {summary[f'pass_at_{k}_before']:.1%} -> {summary[f'pass_at_{k}']:.1%}", file=sys.stderr)
    return 0


def _group(args: argparse.Namespace, settings: dict[str, str]) -> int:
    """One replica group's process; its exit code tells the supervisor what to do
    (replication/protocol.py). It continues the run's config.json (a supervisor wrote it),
    or on a machine of its own, writes it from --from."""
    import os

    from stalwart.commands.train import group_exit, lighthouse_url
    from stalwart.config import apply_overrides, read_run_config
    from stalwart.replication import protocol
    from stalwart.replication.group import HealTorn, LighthouseLost
    from stalwart.replication.transport import SECRET_ENV, job_secret
    from stalwart.rl.loop import check_rl_config, prepare_run, rl_config, train_rl
    from stalwart.run.rundir import RunDir
    from stalwart.training.recovery import NonFiniteAfterHeal, Partitioned, Stalled
    from stalwart.training.setup import Replica

    out = Path(args.out)
    config = out / "config.json"
    cfg = apply_overrides(read_run_config(config), settings) if config.exists() else \
        rl_config(args.source, settings) if args.source else None
    if cfg is None:
        raise UserError(f"--replica-id: {out} holds no run yet; give --from RUN_DIR|FOLDER")
    check_rl_config(cfg)
    if not 0 <= args.replica_id < cfg.replicas.count:
        raise UserError(f"--replica-id {args.replica_id} is not in 0..{cfg.replicas.count - 1} "
                        f"(replicas.count {cfg.replicas.count})")
    secret = job_secret()
    if secret is None:
        raise UserError(f"{SECRET_ENV} is not set: every group of a job needs the job's secret (the supervisor "
                        "sets it; on several machines export the same 64 hex digits everywhere)")
    protocol.watch_supervisor(lambda: os._exit(protocol.EXIT_ORPHANED))
    resume = config.exists()
    if not resume:  # no supervisor prepared the run: this machine's first group does
        run = RunDir(out)
        run.create()
        run.write_config(cfg.to_json())
        prepare_run(cfg, run)
    try:
        train_rl(cfg, out, resume=resume, quiet=True,
                 replica=Replica(args.replica_id, lighthouse_url(args.lighthouse), args.host, secret))
    except Stalled as e:
        return group_exit(e, protocol.EXIT_STALLED, "stopping the job", command="rl")
    except NonFiniteAfterHeal as e:
        return group_exit(e, protocol.EXIT_NONFINITE, "asking for a restart", command="rl")
    except (Partitioned, LighthouseLost, HealTorn) as e:
        return group_exit(e, protocol.EXIT_PARTITIONED, "leaving the job to rejoin later", command="rl")
    return 0
