"""`stalwart config show`: every key a run takes, with its type, its value in the recipe
(and --config file) given, and one line of help, read from the config classes' own
comments. The keys are those of `--section.key VALUE` and of a `--config` TOML file."""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = "list every config key with its type, default and help"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("show",))
    p.add_argument("--recipe", help="the recipe whose values are shown (default: default)")
    p.add_argument("--config", metavar="FILE", help="a TOML config file applied on top of the recipe")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def rows(cfg) -> list[dict]:
    """One row per key: section.key, type, value in `cfg`, help."""
    from stalwart.config import SECTION_TYPES
    from stalwart.fields import field_help
    from stalwart.model import ModelConfig

    out = []
    for section, cls in {"model": ModelConfig, **SECTION_TYPES}.items():
        helps, values = field_help(cls), getattr(cfg, section)
        for f in dataclasses.fields(cls):
            value = getattr(values, f.name)
            value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            out.append({"key": f"{section}.{f.name}", "type": f.type, "value": value, "help": helps.get(f.name, "")})
        if section == "model":
            out.append({"key": "model.from", "type": "str", "value": cfg.model_from,
                        "help": "a DeepSeek-V3-format folder: its config is the model's, its weights the start"})
    out.append({"key": "track", "type": "tuple[str, ...]", "value": cfg.track,
                "help": "tensorboard and/or wandb, besides metrics.jsonl (--track; top level in a file)"})
    return out


def run(args: argparse.Namespace) -> int:
    from stalwart.api import run_config
    from stalwart.config_file import read_config_file
    from stalwart.errors import ConfigError

    given = read_config_file(args.config) if args.config else None
    try:  # what `stalwart train` with these arguments would run
        cfg = run_config(args.recipe or (given.recipe if given else None), given.settings if given else {},
                         track=given.track if given else None)
    except ConfigError as e:
        raise given.locate(e, {"recipe"} if args.recipe else set()) if given else e from None
    table = rows(cfg)
    if args.json:
        print(json.dumps(table, indent=2, default=list))
        return 0
    width = max(len(r["key"]) for r in table)
    kinds = max(len(r["type"]) for r in table)
    for r in table:
        print(f"{r['key']:<{width}}  {r['type']:<{kinds}}  {json.dumps(r['value'], default=list):<12}  {r['help']}")
    return 0
