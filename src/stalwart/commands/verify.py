"""`stalwart verify`: check that a device computes what the model needs, against float64 on the CPU.

It runs every op the model and optimizer use, each layer, the collective and a short training
curve on --device in --dtype and compares each with a float64 CPU reference (or, with
--export, an exported model on the device with the CPU), printing one row per check. Exit
code 1 when any check fails, so a new backend can be qualified before a run (docs/verify.md).
"""

from __future__ import annotations

import argparse
import json

from stalwart.errors import UserError

HELP = "check a device's ops, layers and a training curve against float64 on the CPU"
DESCRIPTION = ("Run every op the model and optimizer use, each layer, the collective and "
               "an N-step training curve on --device in --dtype, against a float64 CPU "
               "reference. Exit code 1 when any check fails.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda[:N], npu[:N], xpu[:N], mps (default: auto, or $STALWART_DEVICE)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--model", default="tiny", help="preset, model folder or run directory (default: tiny)")
    p.add_argument("--steps", type=int, default=10, help="training-curve steps (default 10; 0 skips it)")
    p.add_argument("--export", metavar="DIR", help="instead: compare an exported model on --device with the CPU")
    p.add_argument("--no-collective", action="store_true", help="skip the all_reduce check (no extra processes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
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
