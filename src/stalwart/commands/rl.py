"""`stalwart rl`: post-train a model with GRPO on the task's verifiable rewards (rl/loop.py).

--from is a run directory (its newest good checkpoint) or a model folder; with no other
option it runs the default: 4-digit addition, one column more than the main job learns,
scored by exact match. --section.key VALUE overrides any field (`rl.*`: rl/objective.py's
losses, the group size, the KL coefficient, updates per batch). --resume continues a run.
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


def run(args: argparse.Namespace) -> int:
    from stalwart.api import check_out
    from stalwart.commands.train import parse_overrides
    from stalwart.config import apply_overrides, read_run_config
    from stalwart.rl.loop import rl_config, train_rl

    settings = parse_overrides(args.overrides)
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR")
        fixed = sorted(set(settings) - set(RESUMABLE))
        if fixed:
            raise UserError(f"--resume cannot change {', '.join(fixed)} (it may change: {', '.join(RESUMABLE)})")
        cfg = apply_overrides(read_run_config(Path(args.out) / "config.json"), settings)
    else:
        if not args.source:
            raise UserError("--from RUN_DIR|FOLDER is required: the trained model to start from")
        cfg = rl_config(args.source, settings)
    out = Path(args.out or time.strftime("runs/rl-%Y%m%d-%H%M%S"))
    check_out(out, resume=args.resume)
    summary = train_rl(cfg, out, resume=args.resume, quiet=args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        k = cfg.rl.pass_k
        print(f"run: {out}\nexact match {summary['eval_exact_match_before']:.1%} -> {summary['eval_exact_match']:.1%}, "
              f"pass@{k} {summary[f'pass_at_{k}_before']:.1%} -> {summary[f'pass_at_{k}']:.1%}", file=sys.stderr)
    return 0
