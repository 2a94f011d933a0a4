"""Where a model comes from: a Hugging Face folder on disk, or a named preset initialised
at random (with a tokenizer trained on the built-in default corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stalwart.errors import ConfigError, ModelFileError
from stalwart.export.hf import is_hf_folder, load_hf_folder
from stalwart.model import PRESETS, DeepSeekForCausalLM, parameter_counts, preset
from stalwart.run.rundir import checkpoints_dir

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
    """A stalwart run directory: its config.json is a run's (sections), not a model's."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("checkpoint"), dict)


def load_run(path: Path) -> tuple[DeepSeekForCausalLM, Any]:
    """The newest checkpoint of a run directory that verifies (a corrupt one is skipped)."""
    import sys

    from stalwart.checkpoint import load_latest, read_sharded
    from stalwart.config import read_run_config
    from stalwart.data.tokenizer import load_tokenizer

    cfg = read_run_config(path / "config.json")
    latest = load_latest(checkpoints_dir(path, cfg.checkpoint.dir), on_corrupt=lambda p, msg: print(
        f"warning: {msg}; using the previous checkpoint", file=sys.stderr))
    if latest is None:
        raise ModelFileError(f"{path} has no good checkpoint yet")
    model = DeepSeekForCausalLM(cfg.model, device="meta")
    model.to_empty(device="cpu")  # memory for the checkpoint's tensors, no initial weights drawn
    model.reset_buffers()
    if latest.sharded:  # written by a sharded run: every shard read here, into whole tensors
        read_sharded(latest.path, {f"model.{k}": v for k, v in model.state_dict().items()}, collective=False)
    else:
        load_model_state(model, latest.model_state, latest.path)
    return model, load_tokenizer(path)


def load_model_state(model: DeepSeekForCausalLM, state: dict, where: Path) -> None:
    """Load a checkpoint's weights; a shape or name mismatch is a one-line ModelFileError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelFileError(f"{where} does not match the run's model config: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None


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
