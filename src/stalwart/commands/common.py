"""Helpers that more than one command uses: the --seed type and a model's parameter summary."""

from __future__ import annotations

import argparse


# argparse names a type function in its message ("invalid _seed value: 'x'"), so the name stays.
def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in 0..2^63-1, got {text}")
    return value


def model_info(spec: str) -> dict:
    """Parameter counts and shape of a preset or model folder (`model-info`, `doctor --preset`)."""
    from pathlib import Path

    from stalwart.export.hf import read_hf_config
    from stalwart.model import parameter_counts, preset

    cfg = read_hf_config(Path(spec)) if Path(spec).exists() else preset(spec)
    counts = parameter_counts(cfg)
    return {"model": spec, **counts,
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "attention": cfg.attention,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "mtp_depth": cfg.num_nextn_predict_layers, "vocab_size": cfg.vocab_size}
