"""The `stalwart` command: a thin layer of argument parsing over the library.

Each subcommand is a module with HELP, an optional DESCRIPTION, `add_arguments(parser)` and
`run(args) -> int` (stalwart/commands/, and stalwart/plan/command.py for `plan`); this file
only assembles the parser from them and turns errors into exit codes. Every user mistake
surfaces as one line on stderr and exit code 2 (errors.UserError); anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from stalwart.commands import config, doctor, export, generate, lighthouse, model_info, report, rl, train, verify
from stalwart.errors import EXIT_STOPPED, EXIT_USAGE, TrainingStopped, UserError
from stalwart.plan import command as plan

# (name, module) in the order `stalwart --help` lists them. Only `train` takes the
# --section.key VALUE overrides that argparse leaves over.
COMMANDS = (("train", train), ("rl", rl), ("lighthouse", lighthouse), ("verify", verify), ("plan", plan),
            ("doctor", doctor), ("model-info", model_info), ("export", export), ("generate", generate),
            ("report", report), ("config", config))
ACCEPTS_OVERRIDES = {"train", "rl"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the message already names the bad flag.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stalwart", description="Train DeepSeek-style models on imperfect fleets.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module in COMMANDS:
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(p)
        p.set_defaults(func=module.run)
        if name in ACCEPTS_OVERRIDES:
            p.set_defaults(accepts_overrides=True)
    return parser


def _exit_now(code: int) -> NoReturn:
    """End a torchrun rank, finished or stopped by an error it has reported, without the
    interpreter's teardown: its files are written and closed, but native threads left in the
    libraries (gloo's, the store's) now and then abort the process in their destructors
    (seen: SIGABRT "terminate called without an active exception", then SIGSEGV, after a
    clean finish and after a one-line error), which torchrun reports instead of the rank's
    own exit code."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    # torchft's Rust side (Lighthouse, Manager server) logs every quorum at INFO: several
    # lines a step, gigabytes over a long run. Warnings and errors only, unless asked for.
    os.environ.setdefault("RUST_LOG", "warn")
    code = _run(args)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_now(code)
    return code


def _run(args) -> int:
    """The command's exit code; a user error, a stop or an interrupt is its one line."""
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
