"""The DeepSeek-style model: typed config and presets, MLA attention, DeepSeekMoE, MTP."""

from stalwart.model.attention import KVCache
from stalwart.model.config import ModelConfig, RopeScaling, preset, PRESETS
from stalwart.model.transformer import DeepSeekForCausalLM, CausalLMOutput, IGNORE_INDEX, parameter_counts

__all__ = ["KVCache", "ModelConfig", "RopeScaling", "preset", "PRESETS", "DeepSeekForCausalLM",
           "CausalLMOutput", "IGNORE_INDEX", "parameter_counts"]
