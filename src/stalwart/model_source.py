"""Where a model comes from: a Hugging Face folder on disk, or a named preset initialised
at random (with a tokenizer trained on the built-in default corpus)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stalwart.errors import ConfigError, ModelFileError
from stalwart.export.hf import is_hf_folder, load_hf_folder
from stalwart.model import PRESETS, DeepSeekForCausalLM, parameter_counts, preset

# Initialising more than this on the host is never what a user of `export tiny` meant;
# the published shapes are for `model-info` (counted on the meta device).
MAX_RANDOM_INIT_PARAMS = 2_000_000_000


def random_model(name: str, seed: int = 0) -> tuple[DeepSeekForCausalLM, Any]:
    from stalwart.data.tokenizer import default_corpus, train_tokenizer

    cfg = preset(name)
    total = parameter_counts(cfg)["total"]
    if total > MAX_RANDOM_INIT_PARAMS:
        raise ConfigError(f"preset {name!r} has {total / 1e9:.0f}B parameters: too large to initialise "
                          "here (use `stalwart model-info` to inspect it)")
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(cfg), train_tokenizer(default_corpus(), cfg.vocab_size)


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def load_run(path: Path) -> tuple[DeepSeekForCausalLM, Any]:
    """The newest checkpoint of a run directory that verifies (a corrupt one is skipped)."""
    import json

    from stalwart.checkpoint import load_latest
    from stalwart.config import RunConfig
    from stalwart.data.tokenizer import load_tokenizer

    try:
        cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    latest = load_latest(path / "checkpoints")
    if latest is None:
        raise ModelFileError(f"{path} has no good checkpoint yet")
    model = DeepSeekForCausalLM(cfg.model)
    model.load_state_dict(latest.model_state)
    return model, load_tokenizer(path)


def open_model(spec: str, seed: int = 0) -> tuple[DeepSeekForCausalLM, Any]:
    """`spec` is a run directory, a model folder, or a preset name for a random model."""
    path = Path(spec)
    if path.exists() and is_run_dir(path):
        return load_run(path)
    if path.exists():
        if not is_hf_folder(path):
            raise ModelFileError(f"{path} is not a model folder (no config.json)")
        return load_hf_folder(path)
    if spec in PRESETS:
        return random_model(spec, seed)
    raise ModelFileError(f"{spec!r} is neither a model folder nor a preset ({', '.join(PRESETS)})")
