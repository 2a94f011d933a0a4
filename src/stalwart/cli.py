"""The `stalwart` command: a thin layer of argument parsing over the library.

Every user mistake surfaces as one line on stderr and exit code 2 (errors.UserError);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from stalwart.errors import EXIT_STOPPED, EXIT_USAGE, TrainingStopped, UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the message already names the bad flag.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in 0..2^63-1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stalwart", description="Train DeepSeek-style models on imperfect fleets.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (no arguments: the default job, about 5 minutes on 2 CPU cores)",
                       description="Train from a recipe; override any field with --section.key VALUE "
                                   "(sections: model, data, optim, train, eval, checkpoint, replicas, guards).")
    p.add_argument("--recipe", help="default (the default), dense-baseline, multiplication, smoke")
    p.add_argument("--out", help="run directory (default: runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="replica groups on torchft (replicas.count): a Lighthouse on loopback and one process "
                        "per group, restarted when it crashes or hangs")
    p.add_argument("--lighthouse", metavar="URL", help="an existing Lighthouse (see `stalwart lighthouse`)")
    p.add_argument("--replica-id", type=int, metavar="ID",
                   help="with --lighthouse: this process is replica group ID (0..N-1), without a supervisor")
    p.add_argument("--groups", metavar="IDS", help="with --lighthouse: supervise only these groups (e.g. 0,1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address peers reach this machine's groups at (default 127.0.0.1)")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("lighthouse", help="run a torchft Lighthouse for replica groups on several machines")
    p.add_argument("--bind", default="127.0.0.1:29510", help="HOST:PORT to listen on (default 127.0.0.1:29510)")
    p.add_argument("--min-replicas", type=int, default=1, help="groups needed for a quorum (default 1)")
    p.add_argument("--join-timeout-s", type=float, default=1.0)
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--torchft-defaults", action="store_true", help="torchft's own timeouts (the benchmark baseline)")
    p.set_defaults(func=cmd_lighthouse)

    p = sub.add_parser("verify", help="check a device's ops, layers and a training curve against float64 on the CPU",
                       description="Run every op the model and optimizer use, each layer, the collective and "
                                   "an N-step training curve on --device in --dtype, against a float64 CPU "
                                   "reference. Exit code 1 when any check fails.")
    p.add_argument("--device", help="cpu, cuda[:N], npu[:N], xpu[:N], mps (default: auto, or $STALWART_DEVICE)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--model", default="tiny", help="preset, model folder or run directory (default: tiny)")
    p.add_argument("--steps", type=int, default=10, help="training-curve steps (default 10; 0 skips it)")
    p.add_argument("--export", metavar="DIR", help="instead: compare an exported model on --device with the CPU")
    p.add_argument("--no-collective", action="store_true", help="skip the all_reduce check (no extra processes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("plan", help="how a run would go on a fleet: time, cost, ETTR and the bottleneck",
                       description="Model a training run's compute, communication and failures on a fleet from "
                                   "the accelerator catalog (docs/plan.md).")
    from stalwart.plan.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("doctor", help="report the accelerator, collective backend, dtypes and versions")
    p.add_argument("--device", help="cpu, cuda[:N], npu[:N], xpu[:N], mps (default: auto, or $STALWART_DEVICE)")
    p.add_argument("--preset", help="also report a preset's parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("model-info", help="parameter counts and shape of a preset or model folder")
    p.add_argument("model", help="preset name or model folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("export", help="write a Hugging Face model folder (deepseek_v3)")
    p.add_argument("src", help="model folder, or a preset name for a randomly initialised model")
    p.add_argument("out", help="folder to write (created atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=_seed, default=0, help="initialisation seed when SRC is a preset")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text from a run directory or a model folder")
    p.add_argument("model", help="run directory (its newest good checkpoint) or Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)
    return parser


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


def cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from stalwart.faults import check_spec
    from stalwart.train.loop import TrainResult

    check_spec()

    from stalwart.config import RESUMABLE_OVERRIDES, apply_overrides, read_run_config
    from stalwart.recipes import recipe
    from stalwart.train.loop import train

    overrides = parse_overrides(args.overrides)
    if args.replicas is not None:
        overrides["replicas.count"] = str(args.replicas)
    if args.replica_id is not None and not args.lighthouse:
        raise UserError("--replica-id needs --lighthouse URL")
    if args.replica_id is not None and args.groups:
        raise UserError("--replica-id and --groups exclude each other")
    joining = args.replica_id is not None and args.out and (Path(args.out) / "config.json").exists()
    if joining:  # a (re)started group of a running job continues the run's own config
        args.resume = True
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR")
        if args.recipe:
            raise UserError("--resume continues the run's own config; --recipe does not apply")
        fixed = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
        if fixed:
            raise UserError(f"--resume cannot change {', '.join(fixed)} (it may change: "
                            f"{', '.join(RESUMABLE_OVERRIDES)})")
        cfg = read_run_config(Path(args.out) / "config.json")
    else:
        cfg = recipe(args.recipe or "default")
    cfg = apply_overrides(cfg, overrides)
    out = Path(args.out or f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory")
    if not args.resume and (out / "config.json").exists():
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if args.replica_id is not None:
        if not 0 <= args.replica_id < cfg.replicas.count:
            raise UserError(f"--replica-id {args.replica_id} is not in 0..{cfg.replicas.count - 1} "
                            f"(--replicas {cfg.replicas.count})")
        return _train_group(cfg, out, args)
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
                            lighthouse=_lighthouse_url(args.lighthouse) if args.lighthouse else None)
        if not args.quiet:
            print_train_summary(out, TrainResult(summary))
        return 0
    result = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if not args.quiet:
        print_train_summary(out, result)
    return 0


def _train_group(cfg, out, args: argparse.Namespace) -> int:
    """One replica group's process; its exit code tells the supervisor what to do
    (replication/protocol.py)."""
    import os

    from stalwart.replication import protocol
    from stalwart.replication.group import LighthouseLost
    from stalwart.replication.transport import SECRET_ENV, job_secret
    from stalwart.train.loop import Replica, train
    from stalwart.train.recovery import Excluded, NonFiniteAfterHeal, Partitioned, Stalled

    lighthouse = _lighthouse_url(args.lighthouse)
    secret = job_secret()
    if secret is None:
        raise UserError(f"{SECRET_ENV} is not set: every group of a job needs the job's secret (the supervisor "
                        "sets it; on several machines export the same 64 hex digits everywhere)")
    protocol.watch_supervisor(lambda: os._exit(protocol.EXIT_ORPHANED))
    try:
        train(cfg, out, resume=args.resume, quiet=args.quiet,
              replica=Replica(args.replica_id, lighthouse, args.host, secret))
    except Excluded as e:
        return _group_exit(e, protocol.EXIT_EXCLUDED, "leaving the job (guards.exclude_stragglers)")
    except NonFiniteAfterHeal as e:
        return _group_exit(e, protocol.EXIT_NONFINITE, "asking for a restart")
    except (Partitioned, LighthouseLost) as e:
        return _group_exit(e, protocol.EXIT_PARTITIONED, "leaving the job to rejoin later")
    except Stalled as e:
        return _group_exit(e, protocol.EXIT_STALLED, "stopping the job")
    return 0


def _group_exit(error: Exception, code: int, what: str) -> int:
    print(f"stalwart train: {error}; {what}", file=sys.stderr, flush=True)
    return code


def _lighthouse_url(text: str) -> str:
    url = text if "://" in text else f"http://{text}"
    host, _, port = url.split("://", 1)[1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--lighthouse {text!r} is not HOST:PORT or http://HOST:PORT")
    return url


def _group_list(text: str, count: int) -> list[int]:
    try:
        groups = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--groups {text!r} is not a comma-separated list of group ids") from None
    if not groups or not all(0 <= g < count for g in groups):
        raise UserError(f"--groups {text!r}: ids must be in 0..{count - 1} (--replicas {count})")
    return groups


def cmd_lighthouse(args: argparse.Namespace) -> int:
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


def print_train_summary(out, result) -> None:
    s = result.summary
    lines = [f"run: {out}"]
    if s["eval_exact_match"] is not None:
        lines.append(f"held-out exact match: {s['eval_exact_match']:.1%}")
    if s["eval_loss"] is not None and s["final_train_loss"] is not None:
        lines.append(f"eval loss: {s['eval_loss']:.4f}   final train loss: {s['final_train_loss']:.4f}")
    if s["tokens_per_s"]:
        lines.append(f"throughput: {s['tokens_per_s']:,.0f} tokens/s on {s['device']} ({s['dtype']}), "
                     f"{s['steps']} steps in {s['wall_s']:.0f}s")
    lines.append(f"files: {out}/metrics.jsonl, {out}/summary.json, checkpoints in {out}/checkpoints"
                 + (f", Hugging Face export in {s['export']}" if s["export"] else ""))
    if result.samples:
        prompt, generated, ok = result.samples[0]
        lines.append(f"sample: {prompt}{generated}   [{'correct' if ok else 'wrong'}]")
    lines.append(f"try: stalwart generate {out} --prompt \"{result.samples[0][0] if result.samples else 'Hello'}\"")
    print("\n".join(lines))


def cmd_verify(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from stalwart.device import resolve_device
    from stalwart.verify.run import verify, verify_export

    info = resolve_device(args.device)
    if args.steps < 0:
        raise UserError(f"--steps must be >= 0, got {args.steps}")
    start = time.perf_counter()
    if args.export:
        if not (Path(args.export) / "config.json").is_file():
            raise UserError(f"--export {args.export} is not a model folder (no config.json)")
        checks = verify_export(Path(args.export), info, args.dtype)
    else:
        checks = verify(info, args.dtype, args.model, steps=args.steps, collective=not args.no_collective)
    seconds = time.perf_counter() - start
    failed = [c for c in checks if not c.passed]
    if args.json:
        print(json.dumps({"device": str(info.device), "name": info.name, "dtype": args.dtype,
                          "passed": not failed, "seconds": round(seconds, 2),
                          "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"stalwart verify: {info.device} ({info.name}), {args.dtype} vs float64 on the CPU")
        for col, justify in (("check", "left"), ("result", "left"), ("max abs err", "right"),
                             ("max rel err", "right"), ("cosine", "right"), ("tolerance", "right"),
                             ("notes", "left")):
            table.add_column(col, justify=justify)

        def num(v):
            return "" if v is None else f"{v:.2e}"
        for c in checks:
            table.add_row(escape(c.name), "pass" if c.passed else "[bold red]FAIL", num(c.max_abs), num(c.max_rel),
                          "" if c.cosine is None else f"{c.cosine:.6f}", num(c.tolerance), escape("; ".join(c.notes)))
        console = Console()
        if not console.is_terminal:  # a log file: full names, not an 80-column squeeze
            console = Console(width=200)
        console.print(table)
        verdict = (f"{len(checks) - len(failed)}/{len(checks)} checks passed in {seconds:.1f}s" if not failed else
                   f"{len(failed)} of {len(checks)} checks FAILED: {', '.join(sorted({c.name.split(':')[0] for c in failed}))}")
        console.print(escape(verdict))
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from stalwart.plan.command import run

    return run(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from stalwart.device import resolve_device
    from stalwart.doctor import doctor_report, print_doctor

    report = doctor_report(resolve_device(args.device))
    if args.preset:
        report["preset"] = _model_info(args.preset)
    print_doctor(report, args.json)
    return 0


def _model_info(spec: str) -> dict:
    from pathlib import Path

    from stalwart.export.hf import read_hf_config
    from stalwart.model import parameter_counts, preset

    cfg = read_hf_config(Path(spec)) if Path(spec).exists() else preset(spec)
    counts = parameter_counts(cfg)
    return {"model": spec, **counts,
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "attention": cfg.attention,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "mtp_depth": cfg.num_nextn_predict_layers, "vocab_size": cfg.vocab_size}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_model_info(args: argparse.Namespace) -> int:
    info = _model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model {args.model}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in info.items():
        shown = _human(value) if key in ("total", "activated", "mtp") else str(value)
        table.add_row(key, shown)
    Console().print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from stalwart.export.hf import save_hf_folder
    from stalwart.model_source import open_model

    model, tokenizer = open_model(args.src, seed=args.seed)
    out = save_hf_folder(model, tokenizer, args.out, dtype=getattr(torch, DTYPES[args.dtype]), replace=args.force)
    print(f"exported {args.src} -> {out} ({DTYPES[args.dtype]})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from stalwart.data.tokenizer import decode, encode
    from stalwart.device import resolve_device
    from stalwart.generate import generate
    from stalwart.model_source import open_model

    info = resolve_device(args.device)
    model, tokenizer = open_model(args.model)
    model.to(info.device).eval()
    prompt = encode(tokenizer, args.prompt)
    if not prompt:
        raise UserError("--prompt is empty")
    start = time.perf_counter()
    new = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)[0]
    elapsed = time.perf_counter() - start
    print(args.prompt + decode(tokenizer, new), flush=True)
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s on {info.device}]",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args)
    except UserError as e:
        print(f"stalwart {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:
        print(f"stalwart {args.command}: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except OSError as e:
        # A path the user gave that cannot be read or written (a file where a folder should
        # be, no permission, a full disk): the environment's problem, not a bug.
        where = f": {e.filename}" if e.filename else ""
        print(f"stalwart {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"stalwart {args.command}: interrupted", file=sys.stderr)
        return 130
