"""stalwart: train DeepSeek-style language models on imperfect fleets.

The package is layered as docs/design.md describes: `device` is the only module that knows
accelerators, `model` knows nothing of replicas, `export` maps to Hugging Face names.
"""

from stalwart.api import generate, load, train  # the Python API (docs/api.md); torch is imported on first use

__all__ = ["generate", "load", "train"]
__version__ = "0.1.0"
