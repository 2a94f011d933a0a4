"""The accelerator catalog: what each device can compute, hold and move, with a source for
every number (`accelerators.json`, shipped with the package).

Users add or override entries with a file of the same form (`stalwart plan --catalog
FILE`): an object `{"accelerators": {KEY: {...}}}` whose entries have the same fields,
each `{"value": ..., "source": "..."}`. Names are matched without regard to case.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from stalwart.errors import ConfigError

CATALOG_FILE = Path(__file__).with_name("accelerators.json")
# Field: may the value be null (a chip without FP8)?
FIELDS = {"bf16_tflops": False, "fp8_tflops": True, "hbm_gb": False, "hbm_tb_s": False, "scale_up_gb_s": False,
          "scale_up_domain": False, "scale_out_gb_s": False, "mtbf_hours": False}


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    bf16_tflops: float
    fp8_tflops: float | None
    hbm_gb: float
    hbm_tb_s: float
    scale_up_gb_s: float  # one direction, per device
    scale_up_domain: int
    scale_out_gb_s: float  # one direction, per device
    mtbf_hours: float  # per device
    sources: dict[str, str]

    def scaled(self, **factors: float) -> Accelerator:
        """This device with some fields multiplied (for sensitivity studies)."""
        return dataclasses.replace(self, **{k: getattr(self, k) * f for k, f in factors.items()})


def _entry(key: str, raw: object, where: str) -> Accelerator:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: accelerator {key!r} must be an object")
    unknown = set(raw) - set(FIELDS) - {"name"}
    if unknown:
        raise ConfigError(f"{where}: accelerator {key!r} has unknown field {sorted(unknown)[0]!r} "
                          f"(known: name, {', '.join(FIELDS)})")
    values, sources = {}, {}
    for field, nullable in FIELDS.items():
        item = raw.get(field)
        if not isinstance(item, dict) or "value" not in item or not isinstance(item.get("source"), str):
            raise ConfigError(f"{where}: {key}.{field} must be {{\"value\": ..., \"source\": \"...\"}}")
        value = item["value"]
        if value is None and nullable:
            values[field] = None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e12:
            raise ConfigError(f"{where}: {key}.{field} must be a positive number below 1e12, got {value!r}")
        else:
            values[field] = value
        sources[field] = item["source"]
    if values["scale_up_domain"] != int(values["scale_up_domain"]):
        raise ConfigError(f"{where}: {key}.scale_up_domain must be a whole number of devices")
    values["scale_up_domain"] = int(values["scale_up_domain"])
    return Accelerator(key=key, name=str(raw.get("name", key)), sources=sources, **values)


def _read(path: Path) -> dict[str, Accelerator]:
    if Path(path).is_dir():
        raise ConfigError(f"catalog {path} is a folder; --catalog takes a JSON file")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"catalog {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"catalog {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("accelerators"), dict):
        raise ConfigError(f"catalog {path} must be an object with an \"accelerators\" object")
    return {key: _entry(key, entry, str(path)) for key, entry in raw["accelerators"].items()}


def load_catalog(extra: Path | None = None) -> dict[str, Accelerator]:
    """The shipped catalog, with the entries of `extra` added or replacing ours."""
    catalog = _read(CATALOG_FILE)
    if extra is not None:
        for key, entry in _read(extra).items():
            catalog = {k: v for k, v in catalog.items() if k.lower() != key.lower()}
            catalog[key] = entry
    return catalog


def accelerator(catalog: dict[str, Accelerator], name: str) -> Accelerator:
    for key, entry in catalog.items():
        if key.lower() == name.lower():
            return entry
    raise ConfigError(f"unknown accelerator {name!r} (known: {', '.join(catalog)}; add one with --catalog FILE)")
