"""`stalwart export`: write a Hugging Face model folder (model_type deepseek_v3).

SRC is a model folder (a run's export, or another Hugging Face folder) or a preset name,
which is randomly initialised from --seed. The folder is written atomically in --dtype and
refuses to replace an existing OUT without --force; transformers can load the result.
"""

from __future__ import annotations

import argparse

from stalwart.commands.common import _seed

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HELP = "write a Hugging Face model folder (deepseek_v3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="model folder, or a preset name for a randomly initialised model")
    p.add_argument("out", help="folder to write (created atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=_seed, default=0, help="initialisation seed when SRC is a preset")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")


def run(args: argparse.Namespace) -> int:
    from stalwart.export.hf import TORCH_DTYPES, save_hf_folder
    from stalwart.model_source import open_model

    model, tokenizer = open_model(args.src, seed=args.seed)
    out = save_hf_folder(model, tokenizer, args.out, dtype=TORCH_DTYPES[args.dtype], replace=args.force)
    if args.json:
        import json

        files = sorted(p.name for p in out.iterdir())
        print(json.dumps({"source": args.src, "out": str(out), "dtype": DTYPES[args.dtype], "files": files,
                          "bytes": sum((out / f).stat().st_size for f in files)}))
    else:
        print(f"exported {args.src} -> {out} ({DTYPES[args.dtype]})")
    return 0
