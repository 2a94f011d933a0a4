"""`stalwart generate`: sample text from a trained run or a Hugging Face model folder.

MODEL is a run directory (its newest good checkpoint) or a model folder. The prompt and its
continuation go to stdout; the token count and speed go to stderr, so the text can be piped.
--temperature 0 is greedy; with a temperature, --seed makes the sample repeatable.
"""

from __future__ import annotations

import argparse
import sys

from stalwart.commands.common import _seed
from stalwart.errors import UserError

HELP = "generate text from a run directory or a model folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory (its newest good checkpoint) or Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device")


def run(args: argparse.Namespace) -> int:
    import time

    from stalwart.data.tokenizer import decode, encode
    from stalwart.device import resolve_device
    from stalwart.generate import generate
    from stalwart.model_source import open_model

    info = resolve_device(args.device)
    model, tokenizer = open_model(args.model)
    model.to(info.device).eval()
    prompt = encode(tokenizer, args.prompt)
    if not prompt:
        raise UserError("--prompt is empty")
    start = time.perf_counter()
    new = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)[0]
    elapsed = time.perf_counter() - start
    print(args.prompt + decode(tokenizer, new), flush=True)
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s on {info.device}]",
          file=sys.stderr)
    return 0
