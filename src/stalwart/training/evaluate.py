"""Evaluation: loss on held-out batches, and exact match of generated final answers.

Generation uses the model's KV cache (stalwart.sampling), greedy, with prompts grouped by
token length so that each group decodes as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stalwart.data.loader import PackedLoader
from stalwart.data.tasks import Problem, is_correct
from stalwart.data.tokenizer import decode, encode
from stalwart.sampling import generate
from stalwart.model import DeepSeekForCausalLM


@dataclass
class EvalResult:
    loss: float | None
    exact_match: float | None
    samples: list[tuple[str, str, bool]]  # (prompt, generated, correct) for the first few


@torch.no_grad()
def eval_loss(model: DeepSeekForCausalLM, loader: PackedLoader, batches: int, device: torch.device,
              tick: Callable[[], None] = lambda: None) -> float | None:
    """Mean next-token loss over `batches` held-out batches; `tick()` after each (liveness)."""
    if batches == 0:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = loader.next_batch()
        total += float(model(x.to(device), labels=y.to(device)).lm_loss)
        tick()
    model.train(was_training)
    return total / batches


def exact_match(model: DeepSeekForCausalLM, tokenizer, problems: list[Problem], batch_size: int = 64,
                tick: Callable[[], None] = lambda: None,
                stop_early: bool = True) -> tuple[float | None, list[tuple[str, str, bool]]]:
    if not problems:
        return None, []
    # Room for the longest reference solution and its eos: a longer generation is wrong anyway.
    max_new_tokens = max(len(encode(tokenizer, p.solution)) for p in problems) + 1
    by_length: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for i, p in enumerate(problems):
        ids = encode(tokenizer, p.prompt)
        by_length[len(ids)].append((i, ids))
    generated: dict[int, str] = {}
    limit = model.cfg.max_position_embeddings
    for length, items in sorted(by_length.items()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            outs = generate(model, [ids for _, ids in chunk], max_new_tokens=min(max_new_tokens, limit - length),
                            stop_early=stop_early)
            for (i, _), out in zip(chunk, outs):
                generated[i] = decode(tokenizer, out)
            tick()
    results = [(p.prompt, generated[i], is_correct(p, generated[i])) for i, p in enumerate(problems)]
    return sum(ok for *_, ok in results) / len(results), results[:8]
