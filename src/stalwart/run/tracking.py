"""Optional tracking sinks beside metrics.jsonl: `stalwart train --track tensorboard,wandb`.

metrics.jsonl and events.jsonl stay the source of truth. A `Tracker` follows those two
files (the lines appended since it last looked) and forwards their numbers to its sinks, so
a single process, rank 0 of a torchrun launch and the supervisor of replica groups (which
reads its groups' records) feed the sinks the same way, and exactly one process per run
directory does: a replica group's own process never tracks.

- What is logged: every numeric field of a metrics record (loss, lr, grad_norm,
  tokens_per_s, participants, ...) under its own name, and `eval_loss` and
  `eval_exact_match` from the `eval` events, at the record's step.
- Each name gets a step once, the first time it is committed: both sinks want steps that
  only grow (wandb drops any other), so a step redone after a rollback, or another group's
  record of a step already logged, is in metrics.jsonl and the report but not logged again.
  A resumed run logs from the step after its checkpoint, and TensorBoard hides what the
  run before logged past it (`purge_step`).
- A sink whose package is missing is refused before anything starts (`require_sinks`: one
  line). One that fails later, when it opens or while logging, is dropped with one
  `track_failed` event and one warning: tracking never stops training.

TensorBoard writes event files to RUN_DIR/tensorboard (torch.utils.tensorboard). wandb runs
in offline mode unless WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*`
uploads it later), under RUN_DIR/wandb, in project WANDB_PROJECT (default "stalwart"),
named after the run directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from stalwart.errors import UserError, first_line
from stalwart.run.rundir import JsonlTail, RunDir

TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> what pip installs
NOT_SCALARS = {"step", "time", "replica", "rank"}  # where and when a record is, not what it measured
EVAL_FIELDS = ("eval_loss", "eval_exact_match")
TB_FLUSH_S = 10  # TensorBoard's own default is 120 s: too long to watch a short run


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require_sinks(names: Iterable[str]) -> None:
    """Refuse, in one line, a sink whose package is not installed."""
    for name in names:
        try:
            _import(name)
        except ImportError:
            raise UserError(f"--track {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}") \
                from None


def _import(name: str) -> Any:
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard, or raises ImportError

        return SummaryWriter
    import wandb

    return wandb


class TensorBoardSink:
    def __init__(self, run_dir: Path, first_step: int) -> None:
        summary_writer = _import("tensorboard")
        self.writer = summary_writer(str(run_dir / TENSORBOARD_DIR), flush_secs=TB_FLUSH_S,
                                     purge_step=first_step + 1 if first_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()  # flushes


class WandbSink:
    def __init__(self, run_dir: Path, config: dict[str, Any], quiet: bool) -> None:
        wandb = _import("wandb")
        # console "off": wandb would otherwise wrap this process's stdout and stderr (the
        # progress bar, a group's log lines).
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(run_dir),
                              project=os.environ.get("WANDB_PROJECT", "stalwart"), name=run_dir.resolve().name,
                              config=config, settings=wandb.Settings(console="off", silent=quiet))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Forwards what a run directory's files hold to the sinks named (none: does nothing).
    Made after the run's files are repaired or cut back (a resume), so it follows from
    their end; `first_step`: the step the run starts from."""

    def __init__(self, run: RunDir, sinks: Iterable[str], *, config: dict[str, Any], first_step: int = 0,
                 quiet: bool = False) -> None:
        self.run, self.quiet = run, quiet
        self.last: dict[str, int] = {}  # the last step logged under each name
        self.first_step = first_step
        self.metrics, self.events = JsonlTail(run.metrics_path), JsonlTail(run.events_path)
        self.sinks: dict[str, Sink] = {}
        for name in sinks:
            try:
                self.sinks[name] = TensorBoardSink(run.path, first_step) if name == "tensorboard" else \
                    WandbSink(run.path, config, quiet)
            except Exception as e:  # noqa: BLE001 (a sink never stops training: wandb.init's errors are many)
                self._report_failure(name, "open", e)

    def poll(self) -> None:
        """Forward the records and evaluations appended since the last poll."""
        if not self.sinks:
            return
        for record in self.metrics.read():
            self._log(record)
        for event in self.events.read():
            if event.get("event") == "eval" and "step" in event:
                self._log({"step": event["step"], **{k: event[k] for k in EVAL_FIELDS if k in event}})

    def close(self) -> None:
        """The last records, then every sink closed (flushed); never raises."""
        try:
            self.poll()
        except Exception as e:  # noqa: BLE001 (the files are the run's; a bad line is no reason to lose the sinks)
            self._report_failure("tracker", "read", e)
        for name, sink in list(self.sinks.items()):
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                self._report_failure(name, "close", e)
        self.sinks.clear()

    def _log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        scalars = {k: float(v) for k, v in record.items() if k not in NOT_SCALARS and _is_number(v)
                   and self.last.get(k, self.first_step) < step}
        if not scalars:
            return
        self.last.update(dict.fromkeys(scalars, step))
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(scalars, step)
            except Exception as e:  # noqa: BLE001 (whatever the sink raises, training goes on without it)
                del self.sinks[name]
                self._report_failure(name, "log", e)
                try:
                    sink.close()
                except Exception:  # noqa: BLE001
                    pass

    def _report_failure(self, sink: str, what: str, error: BaseException) -> None:
        line = f"{type(error).__name__}: {first_line(error)}"
        self.run.event("track_failed", sink=sink, stage=what, error=line)
        print(f"warning: --track {sink} failed ({what}) and is off for the rest of the run: {line}",
              file=sys.stderr, flush=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
