"""Visible progress: a rich bar (loss, tokens/s, ETA) on a terminal, plain log lines when
the output is a pipe or a file (CI logs, `| tee`), nothing when quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, first_step: int, *, quiet: bool = False, log_every: int = 10) -> None:
        self.total, self.first_step, self.quiet, self.log_every = total, first_step, quiet, log_every
        self.console = Console(stderr=True)
        self.live = not quiet and self.console.is_terminal
        self._bar: RichProgress | None = None
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.live:
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.first_step, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
                f"replicas {record.get('participants', 1)}")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif not self.quiet and (step % self.log_every == 0 or step == self.total):
            done = step - self.first_step
            elapsed = time.perf_counter() - self._started
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, step: int, result: Any) -> None:
        parts = [f"eval @ {step}:"]
        if result.loss is not None:
            parts.append(f"loss {result.loss:.4f}")
        if result.exact_match is not None:
            parts.append(f"exact match {result.exact_match:.1%}")
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(" ".join(parts))
        else:
            print(" ".join(parts), file=sys.stderr, flush=True)
