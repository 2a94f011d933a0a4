"""`stalwart train --config FILE`: the run's settings in a TOML file.

The file has the sections and keys of the command-line overrides (`[train]` `steps = 500`
is `--train.steps 500`), plus two top-level keys: `recipe`, the recipe it starts from
(`--recipe` wins), and `track`, a list of sinks (`--track` wins). Overrides on the command
line apply on top of the file. Paths in the file are taken as the command line takes them,
from the working directory; TOML has no null, so an optional key takes "none". Every key,
type and value is checked before anything is written; a bad one is named with the file and
its line (`run.toml:4: train.steps must be an integer, got 'five'`).

    recipe = "smoke"
    [train]
    steps = 200
    [data]
    task = "files"
    files = ["corpus/train.parquet"]
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stalwart.config import SECTION_TYPES
from stalwart.errors import ConfigError
from stalwart.fields import check_value
from stalwart.model import ModelConfig

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=")
TOP_LEVEL = {"recipe": "str", "track": "tuple[str, ...]"}


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    settings: dict[str, Any]  # {"train.steps": 200, "model.from": "folder", ...}
    recipe: str | None
    track: tuple[str, ...] | None
    lines: dict[str, int]  # where each key is, by dotted name

    def locate(self, error: ConfigError, overridden: set[str]) -> ConfigError:
        """`error` (a value refused once the whole config is put together) with the file
        and the line of the key it names first, when the file set that key and the command
        line did not."""
        mine = [k for k in (*self.settings, *(k for k in TOP_LEVEL if k in self.lines)) if k not in overridden]
        found = [(m.start(), k) for k in mine
                 if (m := re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", str(error)))]
        if not found:
            return error
        line = self.lines.get(min(found)[1])
        return ConfigError(f"{self.path}:{line}: {error}" if line else f"{self.path}: {error}")


def _key_lines(text: str) -> dict[str, int]:
    """The line where each table and `key =` of a TOML text first appears, by dotted name."""
    lines: dict[str, int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), start=1):
        if match := _TABLE.match(line):
            table = match[1]
            lines.setdefault(table, n)
        elif match := _KEY.match(line):
            lines.setdefault(f"{table}.{match[1]}" if table else match[1], n)
    return lines


def _fields(section: str) -> dict[str, str]:
    cls = ModelConfig if section == "model" else SECTION_TYPES[section]
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    return {**known, "from": "str"} if section == "model" else known


def read_config_file(path: str | Path) -> ConfigFile:
    """The file's settings, each key known and of its field's type; any problem is one
    ConfigError line naming the file (and the line, where there is one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    lines = _key_lines(text)

    def fail(name: str, message: str) -> ConfigError:
        line = lines.get(name) or lines.get(name.partition(".")[0])
        return ConfigError(f"{path}:{line}: {message}" if line else f"{path}: {message}")

    settings: dict[str, Any] = {}
    for section, body in raw.items():
        if section in TOP_LEVEL:
            try:
                check_value(section, TOP_LEVEL[section], body)
            except ConfigError as e:
                raise fail(section, str(e)) from None
            continue
        if section != "model" and section not in SECTION_TYPES or not isinstance(body, dict):
            raise fail(section, f"unknown config section {section} (sections: model, {', '.join(SECTION_TYPES)}; "
                                f"top-level keys: {', '.join(TOP_LEVEL)})")
        known = _fields(section)
        for key, value in body.items():
            name = f"{section}.{key}"
            if key not in known:
                raise fail(name, f"unknown config key {name} (known in {section}: {', '.join(known)})")
            if known[key].endswith(" | None") and value == "none":
                value = None
            try:
                check_value(name, known[key], value)
            except ConfigError as e:
                raise fail(name, str(e)) from None
            settings[name] = tuple(value) if isinstance(value, list) else value
    track = raw.get("track")
    if track is not None:  # as --track takes it: each sink once, ["none"] for none
        track = tuple(t for t in dict.fromkeys(track) if t != "none")
    return ConfigFile(path, settings, raw.get("recipe"), track, lines)
