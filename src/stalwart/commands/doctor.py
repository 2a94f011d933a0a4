"""`stalwart doctor`: report what this machine offers a training run.

It resolves the device (--device, $STALWART_DEVICE or auto-detected) and prints the
accelerator, the collective backend, the dtypes that really compute on it and the versions of
the libraries that decide behaviour (torch, torchft, ...); --preset adds a preset's parameter
counts. The first thing to run on a new host (stalwart/doctor.py builds the report).
"""

from __future__ import annotations

import argparse

from stalwart.commands.common import model_info

HELP = "report the accelerator, collective backend, dtypes and versions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda[:N], npu[:N], xpu[:N], mps (default: auto, or $STALWART_DEVICE)")
    p.add_argument("--preset", help="also report a preset's parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from stalwart.device import resolve_device
    from stalwart.doctor import doctor_report, print_doctor

    report = doctor_report(resolve_device(args.device))
    if args.preset:
        report["preset"] = model_info(args.preset)
    print_doctor(report, args.json)
    return 0
