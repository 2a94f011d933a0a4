"""`stalwart report RUN_DIR`: draw a run's curves and summary from its files, into
RUN_DIR/report.png and RUN_DIR/report.md (stalwart/run/report.py). Every training run
writes them at its end; this redraws them, for a run still going or one that died."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "draw a run's curves and summary: RUN_DIR/report.png and RUN_DIR/report.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (what stalwart train --out names)")


def run(args: argparse.Namespace) -> int:
    from stalwart.run.report import write_report

    png, md = write_report(Path(args.run_dir))
    print(f"wrote {png} and {md}")
    return 0
