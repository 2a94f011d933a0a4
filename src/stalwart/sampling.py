"""Autoregressive generation with the MLA latent KV cache: greedy, temperature, top-p.

The prompt is run once (prefill) into a preallocated cache; each new token is then one
forward of length 1, which MLA computes in latent space (see model/attention.py).
Sampling draws from a seeded torch.Generator, so `--seed` repeats a generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch

from stalwart.errors import UserError
from stalwart.model import DeepSeekForCausalLM, KVCache


# Below this temperature, logits / T overflows to inf and sampling is greedy anyway.
GREEDY_BELOW = 1e-5


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: DeepSeekForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | None = None, stop_early: bool = True, samples: int = 1,
             logprobs: list[list[float]] | None = None) -> list[list[int]]:
    """Continue equal-length prompts; returns only the new tokens of each, cut after eos.
    `samples` > 1: that many continuations of each prompt, in a row (prompt 0's first), from
    one prefill of the prompt. `stop_early` False: always max_new_tokens forward passes, even
    when every prompt has ended (the same result), so that ranks whose forward passes are
    collectives (FSDP2) take as many whatever each one generates. `logprobs`, a list, receives
    each row's log-probability (at temperature 1) of every token it returns, as the sampler
    computed it (decode with the cache)."""
    if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise UserError("generate needs one or more non-empty prompts of equal token length")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    cfg = model.cfg
    device = next(model.parameters()).device
    total = len(prompts[0]) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise UserError(f"prompt plus new tokens ({total}) exceed the model's "
                        f"max_position_embeddings ({cfg.max_position_embeddings})")
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(cfg.num_hidden_layers, total)
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    rows = len(prompts) * samples
    out = torch.empty(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    picked: list[torch.Tensor] = []
    try:
        for step in range(max_new_tokens):
            logits = model(ids, cache=cache).logits[:, -1]
            if step == 0 and samples > 1:  # the prompts' one prefill, shared by their samples
                cache.repeat(samples)
                logits = logits.repeat_interleave(samples, dim=0)
            ids = sample_next(logits, temperature, top_p, generator)
            if logprobs is not None:
                picked.append(logits.float().log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1))
            out = torch.cat([out, ids[:, None]], dim=1)
            done |= ids == eos
            if stop_early and bool(done.all()):
                break
            ids = ids[:, None]
    finally:
        model.train(was_training)
    result = []
    for row in out.tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    if logprobs is not None:
        table = torch.stack(picked, dim=1).tolist() if picked else [[] for _ in result]
        logprobs.extend(values[:len(row)] for values, row in zip(table, result))
    return result
