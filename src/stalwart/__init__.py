"""stalwart: train DeepSeek-style language models on imperfect fleets.

The package is layered as docs/design.md describes: `device` is the only module that knows
accelerators, `model` knows nothing of replicas, `export` maps to Hugging Face names.
"""

__version__ = "0.1.0"
