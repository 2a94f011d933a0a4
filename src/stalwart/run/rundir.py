"""The run directory contract (docs/design.md): config.json, metrics.jsonl, events.jsonl,
summary.json, checkpoints/, tokenizer.json, export/.

metrics.jsonl and events.jsonl are appended one line per record and flushed; a process
killed mid-line leaves a partial last line, which `truncate_metrics` drops on resume along
with the steps the resumed run will redo.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from stalwart.fsutil import atomic_write_bytes, atomic_write_json


def checkpoints_dir(run: Path, setting: str = "") -> Path:
    """Where a run keeps its checkpoints: `checkpoint.dir` when it is set, else RUN/checkpoints."""
    return Path(setting) if setting else Path(run) / "checkpoints"


class RunDir:
    def __init__(self, path: Path, replica: int | None = None, checkpoints: str = "", rank: int = 0,
                 ranks: int = 1) -> None:
        """`replica`: this process's replica group; its records and events are tagged with it
        (several groups append to the same files, one whole line per write). With several
        ranks per group only rank 0 writes, except events sent with every_rank=True.
        `checkpoints`: another folder for them (checkpoint.dir), e.g. one machines share."""
        self.path = Path(path)
        self.replica = replica
        self.writer = rank == 0
        self._tag = ({} if replica is None else {"replica": replica}) | ({"rank": rank} if ranks > 1 else {})
        self.checkpoints = checkpoints_dir(self.path, checkpoints)
        self.export = self.path / "export"
        self.logs = self.path / "logs"  # per-group output, liveness files, torchft's own log
        self.metrics_path = self.path / "metrics.jsonl"
        self.events_path = self.path / "events.jsonl"
        self.config_path = self.path / "config.json"
        self.summary_path = self.path / "summary.json"
        self.tokenizer_path = self.path / "tokenizer.json"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if self.replica is not None:
            self.logs.mkdir(exist_ok=True)

    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.config_path, text.encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.writer:
            _append(self.metrics_path, {**record, **self._tag})

    def event(self, kind: str, *, every_rank: bool = False, **fields: Any) -> None:
        if self.writer or every_rank:
            _append(self.events_path, {"time": round(time.time(), 3), "event": kind, **self._tag, **fields})

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def alive_path(self, replica: int) -> Path:
        return self.logs / f"replica-{replica}.alive"

    def beat(self) -> None:
        """Tell the supervisor this group is making progress (a step, an eval batch)."""
        if self.replica is not None and self.writer:
            path = self.alive_path(self.replica)
            try:
                os.utime(path)
            except FileNotFoundError:
                path.parent.mkdir(exist_ok=True)
                path.touch()

    def read_summary(self) -> dict[str, Any]:
        try:
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def read_events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.events_path)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only complete records of steps <= last_step (atomically rewritten)."""
        _rewrite(self.metrics_path, [r for r in self.read_metrics() if r.get("step", 0) <= last_step])


    def repair_events(self) -> None:
        """Drop a partial last line left by a killed process, so appends stay parseable."""
        if self.events_path.exists():
            _rewrite(self.events_path, self.read_events())


class JsonlTail:
    """The complete lines appended to a JSONL file since the last `read` (a partial last line
    waits for its end). Starts at the file's end as it is now: what a follower has not seen."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line a killed process left partial
        return records


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _append(path: Path, record: dict[str, Any]) -> None:
    # One os.write of the whole line on an O_APPEND file: lines from several processes never
    # interleave (a local POSIX filesystem appends each write atomically at the end).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial line from a killed process
    return records
