"""`stalwart train`: train a model from a recipe, alone or as replica groups on torchft.

With no arguments it runs the default job; --section.key VALUE overrides any recipe field.
--replicas N supervises N replica groups under a Lighthouse on loopback; --lighthouse URL
joins groups on several machines to an existing one, and --replica-id makes this process one
group of such a job (what the supervisor launches). --track sends the metrics to TensorBoard
or wandb too (stalwart/run/tracking.py). The summary of a finished run is printed here too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stalwart.errors import EXIT_USAGE, ConfigError, UserError
from stalwart.run.rundir import checkpoints_dir

HELP = "train a model (no arguments: the default job, about 5 minutes on 2 CPU cores)"
SECTIONS = ("model", "data", "optim", "train", "eval", "checkpoint", "replicas", "guards", "parallel", "export",
            "rl")
DESCRIPTION = (f"Train from a recipe and an optional --config FILE (TOML); override any field with --section.key "
               f"VALUE. Sections: {', '.join(SECTIONS)}. `stalwart config show` lists every key with its type, "
               "default and help.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="default (the default), dense-baseline, multiplication, smoke")
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings (`stalwart config show` lists every "
                                                    "key); --section.key overrides apply on top")
    p.add_argument("--out", help="run directory (default: runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the run's summary (summary.json) as JSON on stdout")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="replica groups on torchft (replicas.count): a Lighthouse on loopback and one process "
                        "per group, restarted when it crashes or hangs")
    p.add_argument("--lighthouse", metavar="URL", help="an existing Lighthouse (see `stalwart lighthouse`)")
    p.add_argument("--replica-id", type=int, metavar="ID",
                   help="with --lighthouse: this process is replica group ID (0..N-1), without a supervisor")
    p.add_argument("--standby", action="store_true",
                   help="with --lighthouse and --out: a warm spare for the supervisor, which names on stdin the group "
                        "it becomes")
    p.add_argument("--groups", metavar="IDS", help="with --lighthouse: supervise only these groups (e.g. 0,1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address peers reach this machine's groups at (default 127.0.0.1)")
    p.add_argument("--track", metavar="SINKS",
                   help="also send the metrics to tensorboard (RUN_DIR/tensorboard) and/or wandb (offline unless "
                        "WANDB_MODE says otherwise), comma-separated; none: stop a resumed run's tracking")


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """["--train.steps", "10", "--data.seq_len=64"] -> {"train.steps": "10", "data.seq_len": "64"}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            raise UserError(f"unrecognised argument {token!r} (overrides look like --section.key VALUE)")
        if "=" in token:
            key, value = token[2:].split("=", 1)
        elif i + 1 < len(extra):
            key, value = token[2:], extra[i + 1]
            i += 1
        else:
            raise UserError(f"{token} needs a value")
        overrides[key] = value
        i += 1
    return overrides


def run(args: argparse.Namespace) -> int:
    import faulthandler

    from stalwart.faults import check_spec
    from stalwart.training.loop import TrainResult

    # A fatal signal in native code (SIGSEGV, SIGABRT from a library's abort, SIGBUS) prints
    # every thread's Python stack to stderr (a group's: logs/replica-R.log) before the process
    # dies; a stderr that is no file (the command run inside another program) has none.
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        pass
    check_spec()

    from stalwart.api import check_out, run_config
    from stalwart.config_file import read_config_file
    from stalwart.run.tracking import require_sinks
    from stalwart.training.loop import train

    given = read_config_file(args.config) if args.config else None
    typed = parse_overrides(args.overrides)  # the command line's, on top of the file's
    overrides = {**(given.settings if given else {}), **typed}
    recipe_name = args.recipe or (given.recipe if given else None)
    if args.track is not None and args.replica_id is not None:
        raise UserError("--track is for a run's one tracking process (alone, rank 0, or the supervisor "
                        "with --replicas or --groups): a group process (--replica-id) does not track")
    track = _sinks(args.track) if args.track is not None else given.track if given else None
    if args.standby:
        if not (args.lighthouse and args.out) or args.replica_id is not None:
            raise UserError("--standby needs --lighthouse URL and --out RUN_DIR, and no --replica-id")
        args.replica_id = _standby(Path(args.out) / "logs")
        if args.replica_id is None:
            return 0
    if args.replicas is not None:
        overrides["replicas.count"] = typed["replicas.count"] = str(args.replicas)
    if args.replica_id is not None and not args.lighthouse:
        raise UserError("--replica-id needs --lighthouse URL")
    if args.replica_id is not None and args.groups:
        raise UserError("--replica-id and --groups exclude each other")
    launch = _join_torchrun(args, overrides)
    joining = args.replica_id is not None and args.out and (Path(args.out) / "config.json").exists()
    restarted = launch is not None and launch.restarted
    if joining or restarted:  # a (re)started group, or torchrun's restart, continues the run's own config
        args.resume = True
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN_DIR")
    try:
        cfg = run_config(recipe_name, overrides, resume_from=Path(args.out) if args.resume else None, track=track)
    except ConfigError as e:
        raise given.locate(e, set(typed) | ({"recipe"} if args.recipe else set())) if given else e from None
    if args.replica_id is None:  # who tracks: this process, or the supervisor it is; never a group's
        require_sinks(cfg.track)
    if launch is not None and (cfg.replicas.count > 1 or args.lighthouse):
        raise UserError("replica groups start their own ranks (replicas.ranks_per_group): run --replicas or "
                        "--lighthouse without torchrun, or torchrun without them for one data-parallel job")
    started = time.time() if launch is None else launch.started  # every rank names the same folder
    out = Path(args.out or f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")
    check_out(out, resume=args.resume)
    if args.replica_id is not None:
        if not 0 <= args.replica_id < cfg.replicas.count:
            raise UserError(f"--replica-id {args.replica_id} is not in 0..{cfg.replicas.count - 1} "
                            f"(--replicas {cfg.replicas.count})")
        return _relay_exit(lambda: _train_group(cfg, out, args), out / "logs", args.replica_id)
    if cfg.replicas.count > 1 or args.lighthouse:
        from stalwart.replication.supervisor import supervise
        from stalwart.replication.transport import SECRET_ENV, job_secret, new_job_secret

        secret = job_secret()
        if secret is None and args.lighthouse:
            raise UserError(f"{SECRET_ENV} is not set: groups on several machines must share one job secret "
                            "(export the same 64 hex digits on every machine)")
        groups = _group_list(args.groups, cfg.replicas.count) if args.groups else None
        summary = supervise(cfg, out, resume=args.resume, quiet=args.quiet, groups=groups, host=args.host,
                            secret=secret.hex() if secret else new_job_secret(),
                            lighthouse=lighthouse_url(args.lighthouse) if args.lighthouse else None)
        _report(args, out, TrainResult(summary), cfg.checkpoint.dir)
        return 0
    result = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if "eval_loss" in result.summary:  # rank 0 of a torchrun launch reports
        _report(args, out, result, cfg.checkpoint.dir)
    return 0


def _report(args: argparse.Namespace, out: Path, result, checkpoint_dir: str) -> None:
    """The finished run's summary: as JSON on stdout (--json), else in words unless --quiet."""
    if args.json:
        import json

        print(json.dumps(result.summary, indent=2))
    elif not args.quiet:
        print_train_summary(out, result, checkpoint_dir)


@dataclass
class _TorchrunLaunch:
    started: float  # rank 0's clock
    restarted: bool  # torchrun's --max-restarts started again the launch that made --out


def _join_torchrun(args: argparse.Namespace, overrides: dict[str, str]) -> _TorchrunLaunch | None:
    """For one rank of a plain torchrun launch (WORLD_SIZE > 1, no replica group): the
    ranks' process group (setup uses it), and what every rank must agree on before the run
    directory is chosen. torchrun restarts the ranks of a failed node with
    TORCHELASTIC_RESTART_COUNT > 0, but those of the other nodes with their count as it
    was: any rank's count makes the launch a restart. It resumes --out only if the agent of
    one of its ranks started the run there (AGENT_FILE; ranks may move between nodes at a
    re-rendezvous): a launch refused because --out held another run is not resumed into
    that run when torchrun restarts it."""
    from stalwart.device import resolve_device
    from stalwart.replication.group import AGENT_FILE, RanksGroup, group_rank, torchrun_agent

    if group_rank()[1] == 1 or args.replica_id is not None or args.standby:
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and not args.out:
        raise UserError("torchrun --max-restarts needs --out RUN_DIR: a restart must find the run it continues")
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Measured: 2 of 3 restarts failed to connect, none with the store apart.
        raise UserError("torchrun --max-restarts shares its store with the ranks, and a restarted rank can read "
                        "the addresses of the attempt before (pytorch/pytorch#135712): export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
    device = overrides.get("train.device", "auto")
    info = resolve_device(None if device == "auto" else device)
    group = RanksGroup(info.backend, info.device)
    agent = Path(args.out or ".") / AGENT_FILE
    ours = agent.is_file() and agent.read_text() == torchrun_agent()  # any node: ranks move at a re-rendezvous
    restarted = group.largest(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))) > 0 and group.largest(ours) > 0
    return _TorchrunLaunch(started=group.broadcast(int(time.time())), restarted=restarted)


def _train_group(cfg, out, args: argparse.Namespace) -> int:
    """One replica group's process; its exit code tells the supervisor what to do
    (replication/protocol.py)."""
    from stalwart.replication import protocol
    from stalwart.replication.group import HealTorn, LighthouseLost
    from stalwart.replication.transport import SECRET_ENV, job_secret
    from stalwart.training.loop import Replica, train
    from stalwart.training.recovery import Excluded, NonFiniteAfterHeal, Partitioned, Stalled

    lighthouse = lighthouse_url(args.lighthouse)
    secret = job_secret()
    if secret is None:
        raise UserError(f"{SECRET_ENV} is not set: every group of a job needs the job's secret (the supervisor "
                        "sets it; on several machines export the same 64 hex digits everywhere)")
    protocol.watch_supervisor(lambda: os._exit(protocol.EXIT_ORPHANED))
    try:
        train(cfg, out, resume=args.resume, quiet=args.quiet,
              replica=Replica(args.replica_id, lighthouse, args.host, secret))
    except Excluded as e:
        return group_exit(e, protocol.EXIT_EXCLUDED, "leaving the job (guards.exclude_stragglers)")
    except NonFiniteAfterHeal as e:
        return group_exit(e, protocol.EXIT_NONFINITE, "asking for a restart")
    except (Partitioned, LighthouseLost, HealTorn) as e:
        return group_exit(e, protocol.EXIT_PARTITIONED, "leaving the job to rejoin later")
    except Stalled as e:
        return group_exit(e, protocol.EXIT_STALLED, "stopping the job")
    return 0


def _standby(logs: Path) -> int | None:
    """A warm spare: pay the import cost now, then wait for the group this process becomes."""
    import torch._dynamo  # noqa: F401 (imported by the optimizer's constructor: ~1 s)
    import torchft.manager  # noqa: F401 (what a group's start imports: the cost a restart saves)
    import torchft.process_group  # noqa: F401

    import stalwart.training.loop  # noqa: F401
    from stalwart.replication.protocol import await_assignment

    return await_assignment(logs)


def _relay_exit(train_group: Callable[[], int], logs: Path, replica: int) -> int:
    """A group's exit code, also left for the supervisor by a rank of a group of several
    (torchrun's own code is 1 whichever way a rank ended: replication/protocol.py)."""
    from stalwart.replication import protocol

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        code = train_group()
    except UserError:
        if several:
            protocol.record_exit(logs, replica, EXIT_USAGE)  # what cli.py makes of it
        raise
    if code and several:
        protocol.record_exit(logs, replica, code)
    return code


def group_exit(error: Exception, code: int, what: str, command: str = "train") -> int:
    print(f"stalwart {command}: {error}; {what}", file=sys.stderr, flush=True)
    return code


def lighthouse_url(text: str) -> str:
    url = text if "://" in text else f"http://{text}"
    host, _, port = url.split("://", 1)[1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--lighthouse {text!r} is not HOST:PORT or http://HOST:PORT")
    return url


def _sinks(text: str) -> tuple[str, ...]:
    """--track "tensorboard,wandb" -> ("tensorboard", "wandb"); "none" -> () (validate names them)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    return () if names == ("none",) else names


def _group_list(text: str, count: int) -> list[int]:
    try:
        groups = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--groups {text!r} is not a comma-separated list of group ids") from None
    if not groups or not all(0 <= g < count for g in groups):
        raise UserError(f"--groups {text!r}: ids must be in 0..{count - 1} (--replicas {count})")
    return groups


def print_train_summary(out, result, checkpoint_dir: str = "") -> None:
    s = result.summary
    lines = [f"run: {out}"]
    if s["eval_exact_match"] is not None:
        lines.append(f"held-out exact match: {s['eval_exact_match']:.1%}")
    if s["eval_loss"] is not None and s["final_train_loss"] is not None:
        lines.append(f"eval loss: {s['eval_loss']:.4f}   final train loss: {s['final_train_loss']:.4f}")
    if s["tokens_per_s"]:
        lines.append(f"throughput: {s['tokens_per_s']:,.0f} tokens/s on {s['device']} ({s['dtype']}), "
                     f"{s['steps']} steps in {s['wall_s']:.0f}s")
    report = f", {out}/report.md" if (Path(out) / "report.md").exists() else ""
    lines.append(f"files: {out}/metrics.jsonl, {out}/summary.json{report}, checkpoints in "
                 f"{checkpoints_dir(out, checkpoint_dir)}"
                 + (f", Hugging Face export in {s['export']}" if s["export"] else ""))
    if result.samples:
        prompt, generated, ok = result.samples[0]
        lines.append(f"sample: {prompt}{generated}   [{'correct' if ok else 'wrong'}]")
    lines.append(f"try: stalwart generate {out} --prompt \"{result.samples[0][0] if result.samples else 'Hello'}\"")
    print("\n".join(lines))
