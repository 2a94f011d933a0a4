"""Type checks for the fields of the typed configs (model, run sections), with messages
that name the field: `train.steps must be an integer, got 'five'`.

Field types are read from the dataclasses' annotations (strings, under
`from __future__ import annotations`); types not listed here (nested dataclasses) are
checked by their own section.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any

from stalwart.errors import ConfigError

_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | str": (lambda v: isinstance(v, (int, str)) and not isinstance(v, bool), "an integer or a string"),
    "tuple[str, ...]": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
                        "a list of strings"),
}


def check_value(name: str, type_name: str, value: Any) -> None:
    base = type_name.removesuffix(" | None")
    optional = base != type_name
    if optional and value is None or base not in _CHECKS:
        return
    ok, what = _CHECKS[base]
    if not ok(value):
        raise ConfigError(f"{name} must be {what}{' or null' if optional else ''}, got {value!r}")


def check_fields(prefix: str, cls: type, values: dict[str, Any]) -> None:
    """Every key is a field of `cls` and every value has the field's type."""
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}.{key} (known: {', '.join(known)})")
        check_value(f"{prefix}.{key}", known[key], value)


def field_values(obj: Any) -> dict[str, Any]:
    """A dataclass instance's fields, one level deep (nested dataclasses stay objects)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


_FIELD = re.compile(r"^    (\w+): [^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def field_help(cls: type) -> dict[str, str]:
    """One line of help for each field of a config dataclass, from the comments in its
    source (the one place they are written): the field's own trailing comment, else the
    first sentence of the comment lines just above it. A field without either is absent."""
    helps: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and (match[2] or above):
            helps[match[1]] = match[2] or re.split(r"(?<!\bal)\.\s", " ".join(above))[0].rstrip(".")
        above = []
    return helps
