"""Greedy generation speed of stalwart against transformers, on the same deepseek_v3 folder.

What it measures: wall-clock tokens/s of `stalwart.sampling.generate` (MLA latent KV cache,
absorbed decode) and of transformers' `DeepseekV3ForCausalLM.generate` (latent cache too, but
keys and values re-expanded from it at each step), both fp32, greedy, exactly --new-tokens new tokens per prompt (eos ignored), on
--batch equal-length prompts of --prompt-len tokens. Each side is warmed up once, then the
two run back to back --repeats times, interleaved, so that load from other users of a shared
machine falls on both alike; the median run of each is reported, with ours/transformers.
It also checks that the two greedy continuations are identical, and prints the KV-cache
bytes per token that each design needs (computed from the config, not measured).

Run (from the repo root, with .venv active and transformers installed: `pip install -e .[test]`):

    python bench/generate.py                          # tiny preset, seed 0, exported to a temp dir
    python bench/generate.py --batch 8 --new-tokens 256 --threads 2 --json out.json
    python bench/generate.py --model runs/demo-random --device cuda
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from stalwart.data.tokenizer import default_corpus, encode
from stalwart.device import DeviceInfo, resolve_device, synchronize
from stalwart.export.hf import load_hf_folder, save_hf_folder
from stalwart.sampling import generate
from stalwart.model import ModelConfig
from stalwart.model_source import random_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="deepseek_v3 folder (default: export --preset, seed 0, to a temp dir)")
    p.add_argument("--preset", default="tiny", help="preset exported when --model is not given")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    return p.parse_args(argv)


def make_prompts(tok, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` different windows of the built-in corpus, each `prompt_len` tokens long."""
    ids = encode(tok, " ".join(default_corpus()))
    need = batch * prompt_len
    ids = ids * (need // len(ids) + 1)  # the corpus is a few hundred tokens; repeat if short
    return [ids[b * prompt_len:(b + 1) * prompt_len] for b in range(batch)]


def kv_bytes_per_token(cfg: ModelConfig, element_size: int) -> dict[str, int]:
    """Cache bytes one token adds, summed over layers (the MTP layer is not run in decode).

    MLA caches the compressed latent plus the one rope key shared by all heads
    (DeepSeek-V2, arXiv 2405.04434, Table 1); a full cache, as plain multi-head attention
    with the same heads would keep, holds per-head keys (nope + rope) and values.
    transformers 5.x's DeepseekV3 also caches the latent, but re-expands it through
    kv_b_proj for the whole context at every step, which our absorbed decode avoids.
    """
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    full = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    ours = mla if cfg.attention == "mla" else full
    return {"ours": ours * cfg.num_hidden_layers * element_size,
            "full": full * cfg.num_hidden_layers * element_size}


def timed(fn, info: DeviceInfo) -> tuple[float, list[list[int]]]:
    synchronize(info)
    t0 = time.perf_counter()
    out = fn()
    synchronize(info)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers  # only the benchmark needs it

    # The load report lists the MTP layer as unexpected: transformers skips it by design
    # (see stalwart/export/hf.py), so it is noise here.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if args.threads:
        torch.set_num_threads(args.threads)
    info = resolve_device(args.device)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp) / args.preset
            save_hf_folder(*random_model(args.preset, 0), folder)
        ours, tok = load_hf_folder(folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, theirs = ours.to(info.device).eval(), theirs.to(info.device).eval()

    prompts = make_prompts(tok, args.batch, args.prompt_len)
    input_ids = torch.tensor(prompts, device=info.device)
    n = args.new_tokens

    def run_ours() -> list[list[int]]:
        return generate(ours, prompts, max_new_tokens=n, temperature=0.0, eos_token_id=-1)

    def run_theirs() -> list[list[int]]:
        out = theirs.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)
        return out[:, input_ids.shape[1]:].tolist()

    run_ours(), run_theirs()  # warm-up: allocator, kernel selection, transformers' lazy setup
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            seconds, outputs[name] = timed(fn, info)
            times[name].append(seconds)

    tokens = args.batch * n
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    ratio = tps["ours"] / tps["transformers"]
    a, b = outputs["ours"], outputs["transformers"]
    matched = a == b
    first_diff = next((i for i, (x, y) in enumerate(zip(sum(a, []), sum(b, []))) if x != y), None)

    console.print("$ " + shlex.join([Path(sys.executable).name] + sys.argv))
    console.print(f"device {info.kind} ({info.name}), threads {torch.get_num_threads()}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}")
    console.print(f"model {folder if args.model else f'{args.preset} (seed 0)'}: "
                  f"{sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters (MTP included, unused in decode)")
    table = Table(title=f"batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, "
                        f"{args.repeats} interleaved runs")
    table.add_column("implementation")
    for col in ("median s", "min s", "max s", "tokens/s"):
        table.add_column(col, justify="right")
    for name, ts in times.items():
        table.add_row(name, f"{statistics.median(ts):.3f}", f"{min(ts):.3f}", f"{max(ts):.3f}", f"{tps[name]:.0f}")
    console.print(table)
    console.print(f"ours / transformers: [bold]{ratio:.2f}x[/bold]")
    console.print("greedy outputs identical: " + ("yes" if matched else
                  f"[red]NO[/red] (first differing token at flat index {first_diff})"))

    element_size = next(ours.parameters()).element_size()
    kv = kv_bytes_per_token(ours.cfg, element_size)
    kv_table = Table(title=f"KV cache per token, {ours.cfg.num_hidden_layers} layers, {element_size}-byte floats")
    kv_table.add_column("cache")
    kv_table.add_column("bytes/token", justify="right")
    kv_table.add_column("vs full", justify="right")
    kv_table.add_row("ours (MLA latent + rope key)" if ours.cfg.attention == "mla" else "ours (full K/V)",
                     str(kv["ours"]), f"{kv['ours'] / kv['full']:.2f}x")
    kv_table.add_row("full per-head K/V (plain MHA)", str(kv["full"]), "1.00x")
    console.print(kv_table)

    if args.json:
        args.json.write_text(json.dumps({
            "command": sys.argv, "device": info.kind, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": n, "repeats": args.repeats,
            "seconds": times, "tokens_per_s": tps, "ratio": ratio, "greedy_match": matched,
            "kv_bytes_per_token": kv,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
