"""`stalwart doctor`: what this machine offers, before anyone trusts it with a run.

Reports the resolved device (kind, name, count, collective backend, dtypes that really
compute) and the versions of the libraries that decide behaviour. The report is a plain
dict so the CLI can print it as a table for people or as JSON for scripts and bug reports.
It only reads; it never changes the device or the environment.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from stalwart.device import DeviceInfo


def _version(package: str) -> str:
    # Read the installed distribution's metadata rather than importing the package:
    # importing transformers takes seconds and the training path never needs it.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def doctor_report(info: DeviceInfo) -> dict[str, Any]:
    """The facts `stalwart doctor` prints; keys are part of its JSON interface."""
    return {
        "device": str(info.device),
        "kind": info.kind,
        "name": info.name,
        "count": info.count,
        "backend": info.backend,
        "dtypes": list(info.dtypes),
        "torch": torch.__version__,
        "torchft": _version("torchft"),
        "transformers": _version("transformers"),  # optional: only the export tests need it
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_doctor(report: dict[str, Any], as_json: bool) -> None:
    """Print `report` as a two-column table, or as indented JSON when `as_json`."""
    if as_json:
        # Plain print, not rich: rich would wrap long lines and colour the output.
        print(json.dumps(report, indent=2))
        return
    table = Table(title="stalwart doctor")
    table.add_column("check")
    table.add_column("value")
    for key, value in report.items():
        shown = ", ".join(value) if isinstance(value, list) else str(value)
        table.add_row(key, shown)
    Console().print(table)
