"""`stalwart generate`: sample text from a trained run or a Hugging Face model folder.

MODEL is a run directory (its newest good checkpoint) or a model folder. The prompt and its
continuation go to stdout; the token count and speed go to stderr, so the text can be piped
(--json: one object with both on stdout). --temperature 0 is greedy; with a temperature,
--seed makes the sample repeatable. --chat renders the prompt as a user message, as the
model saw conversations in training (data/chat.py).
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
    p.add_argument("--chat", action="store_true", help="the prompt is a user message of a conversation")
    p.add_argument("--json", action="store_true", help="print one JSON object: prompt, completion, tokens, speed")


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from stalwart.api import load
    from stalwart.data.chat import prompt_text
    from stalwart.data.tokenizer import decode, encode
    from stalwart.sampling import generate

    model = load(args.model, device=args.device)
    text = prompt_text(args.prompt) if args.chat else args.prompt
    prompt = encode(model.tokenizer, text)
    if not prompt:
        raise UserError("--prompt is empty")
    start = time.perf_counter()
    new = generate(model.module, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)[0]
    elapsed = time.perf_counter() - start
    completion, speed = decode(model.tokenizer, new), len(new) / max(elapsed, 1e-9)
    if args.json:
        print(json.dumps({"prompt": text, "completion": completion, "tokens": len(new), "seconds": round(elapsed, 3),
                          "tokens_per_s": round(speed, 1), "device": str(model.device)}))
        return 0
    print(text + completion, flush=True)
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {speed:.1f} tokens/s on {model.device}]", file=sys.stderr)
    return 0
