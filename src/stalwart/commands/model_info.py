"""`stalwart model-info`: the parameter counts and shape of a preset or a model folder.

It reads the configuration only (no weights): total, activated and multi-token-prediction
parameters, layers, hidden size, attention, experts and vocabulary, as a table or --json.
Useful to check a preset or an exported folder before training or planning with it.
"""

from __future__ import annotations

import argparse
import json

from stalwart.commands.common import model_info

HELP = "parameter counts and shape of a preset or model folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name or model folder")
    p.add_argument("--json", action="store_true")


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model)
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
