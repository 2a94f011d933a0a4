"""Typed configuration of a DeepSeek-style decoder, its validation and the named presets.

Field names follow DeepSeek-V3's released config.json (and so transformers' DeepseekV3Config)
wherever the concept is the same, so that export is a rename, not a translation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from stalwart.errors import ConfigError
from stalwart.fields import check_fields, field_values


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension, as DeepSeek-V3/R1 ship it (type yarn, factor 40)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512  # embedding rows; at least the tokenizer's size
    hidden_size: int = 128  # the residual stream's width
    num_hidden_layers: int = 4  # decoder layers (MTP layers not counted)
    num_attention_heads: int = 4  # attention heads per layer
    # "mla": DeepSeek's multi-head latent attention; "mha": plain attention for baselines.
    attention: str = "mla"
    q_lora_rank: int | None = None  # the low-rank query's width (V3: 1536); none: a full-rank query projection
    kv_lora_rank: int = 64  # MLA: the compressed key-value latent's width
    qk_nope_head_dim: int = 32  # MLA: per-head query/key width without rotary position
    qk_rope_head_dim: int = 16  # MLA: per-head query/key width with rotary position (even)
    v_head_dim: int = 32  # per-head value width
    intermediate_size: int = 384  # dense FFN width
    # Mixture of experts; n_routed_experts == 0 makes every layer dense.
    n_routed_experts: int = 8  # routed experts per MoE layer; 0: every layer dense
    n_shared_experts: int = 1  # experts every token goes through
    num_experts_per_tok: int = 2  # routed experts chosen per token (top-k)
    moe_intermediate_size: int = 96  # one expert's FFN width
    n_group: int = 1  # expert groups for node-limited routing (V3: 8)
    topk_group: int = 1  # groups a token's experts may come from (V3: 4)
    routed_scaling_factor: float = 1.0  # scale of the routed experts' output (V3: 2.5)
    norm_topk_prob: bool = True  # normalise the chosen experts' weights to sum to 1
    first_k_dense_replace: int = 1  # the first k layers are dense, the rest MoE
    # Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): bias step gamma per update.
    bias_update_speed: float = 0.001  # gamma: the routing bias's step per update
    # Complementary sequence-wise balance loss weight alpha (V3 uses 0.0001).
    seq_aux_loss_alpha: float = 0.0001  # alpha of the sequence-wise balance loss
    # Multi-token prediction: number of extra depths (V3: 1) and loss weight lambda.
    num_nextn_predict_layers: int = 0  # MTP depths (V3: 1); 0: none
    mtp_loss_weight: float = 0.3  # MTP loss weight lambda
    max_position_embeddings: int = 512  # the longest sequence the model is built for
    rope_theta: float = 10000.0  # rotary position base
    rope_scaling: RopeScaling | None = None  # YaRN context extension (a table), or none
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    initializer_range: float = 0.02  # std of the normal initial weights
    bos_token_id: int = 0  # the tokenizer's beginning-of-sequence id
    eos_token_id: int = 1  # ends every document and stops generation
    pad_token_id: int = 2  # the padding id of batched generation
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 when YaRN is on (DeepSeek-V3 inference code)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        check_fields("model", ModelConfig, raw)
        if raw.get("rope_scaling") is not None:
            scaling = raw["rope_scaling"]
            if not isinstance(scaling, dict):
                raise ConfigError("model.rope_scaling must be an object or null")
            check_fields("model.rope_scaling", RopeScaling, scaling)
            raw["rope_scaling"] = RopeScaling(**scaling)
        return validate(ModelConfig(**raw))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (arXiv 2309.00071, eq. 22), as DeepSeek computes it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def validate(cfg: ModelConfig) -> ModelConfig:
    """Return cfg unchanged, or raise ConfigError naming the first inconsistent field."""
    check_fields("model", ModelConfig, field_values(cfg))
    if cfg.rope_scaling is not None:
        check_fields("model.rope_scaling", RopeScaling, field_values(cfg.rope_scaling))
    positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "qk_rope_head_dim", "v_head_dim"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.attention not in ("mla", "mha"):
        raise ConfigError(f"model.attention must be 'mla' or 'mha', got {cfg.attention!r}")
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim must be even (rotary pairs), got {cfg.qk_rope_head_dim}")
    if cfg.qk_nope_head_dim < 0:
        raise ConfigError(f"model.qk_nope_head_dim must be >= 0, got {cfg.qk_nope_head_dim}")
    if cfg.attention == "mla":
        if cfg.kv_lora_rank <= 0:
            raise ConfigError(f"model.kv_lora_rank must be positive for MLA, got {cfg.kv_lora_rank}")
        if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
            raise ConfigError(f"model.q_lora_rank must be positive or null, got {cfg.q_lora_rank}")
    elif cfg.qk_nope_head_dim + cfg.qk_rope_head_dim != cfg.v_head_dim:
        raise ConfigError("model.attention 'mha' needs qk_nope_head_dim + qk_rope_head_dim == v_head_dim, got "
                          f"{cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} != {cfg.v_head_dim}")
    if cfg.n_routed_experts < 0:
        raise ConfigError(f"model.n_routed_experts must be >= 0, got {cfg.n_routed_experts}")
    if cfg.is_moe:
        e, g = cfg.n_routed_experts, cfg.n_group
        if g <= 0 or e % g:
            raise ConfigError(f"model.n_routed_experts ({e}) must be divisible by model.n_group ({g})")
        if e // g < 2:
            raise ConfigError(f"model.n_group ({g}) leaves fewer than 2 experts per group; "
                              "group scores are the sum of each group's top-2 experts")
        if not 1 <= cfg.topk_group <= g:
            raise ConfigError(f"model.topk_group must be between 1 and n_group ({g}), got {cfg.topk_group}")
        if not 1 <= cfg.num_experts_per_tok <= cfg.topk_group * (e // g):
            raise ConfigError(f"model.num_experts_per_tok ({cfg.num_experts_per_tok}) must be between 1 and "
                              f"the experts in the chosen groups ({cfg.topk_group * (e // g)})")
        if cfg.moe_intermediate_size <= 0:
            raise ConfigError(f"model.moe_intermediate_size must be positive, got {cfg.moe_intermediate_size}")
        if cfg.n_shared_experts < 0:
            raise ConfigError(f"model.n_shared_experts must be >= 0, got {cfg.n_shared_experts}")
    if cfg.first_k_dense_replace < 0:
        raise ConfigError(f"model.first_k_dense_replace must be >= 0, got {cfg.first_k_dense_replace}")
    if cfg.num_nextn_predict_layers < 0:
        raise ConfigError(f"model.num_nextn_predict_layers must be >= 0, got {cfg.num_nextn_predict_layers}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not 0 <= getattr(cfg, name) < cfg.vocab_size:
            raise ConfigError(f"model.{name} must be inside the vocabulary (0..{cfg.vocab_size - 1})")
    for name in ("initializer_range", "rms_norm_eps", "routed_scaling_factor"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.rope_theta <= 1:
        raise ConfigError(f"model.rope_theta must be > 1, got {cfg.rope_theta}")
    s = cfg.rope_scaling
    if s is not None:
        if s.factor < 1:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {s.factor}")
        for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"model.rope_scaling.{name} must be > 0, got {getattr(s, name)}")
        if s.mscale < 0 or s.mscale_all_dim < 0:
            raise ConfigError("model.rope_scaling.mscale and mscale_all_dim must be >= 0")
    return cfg


def _tiny() -> ModelConfig:
    # ~2M parameters: small enough that 2 CPU cores train it in minutes, with DeepSeek-V3's
    # features on (MLA, grouped sigmoid routing with shared experts, MTP). The query is
    # full-rank, as in DeepSeek-V2-Lite, and the rope key 32 wide: with a 64-wide query
    # bottleneck and 16 rope dims the default job needed about twice the steps to learn
    # to copy digits from fixed distances (measured: 28% vs 99% exact match after 450-600 steps).
    return ModelConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        intermediate_size=384, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=96, n_group=2, topk_group=1, routed_scaling_factor=1.0,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=512,
    )


def _small() -> ModelConfig:
    # ~60M parameters, `tiny` widened (hidden 512, 16 routed experts, a 128-wide query and KV
    # bottleneck): large enough that parameters and AdamW's state are most of a process's
    # memory, small enough to train on 2 CPU cores; bench/sharding.py shards it.
    return dataclasses.replace(
        _tiny(), hidden_size=512, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, intermediate_size=1536, n_routed_experts=16, moe_intermediate_size=512,
        n_group=4, topk_group=2,
    )


def _tiny_dense() -> ModelConfig:
    # The dense baseline: same width and depth as `tiny`, plain attention, no experts.
    return dataclasses.replace(
        _tiny(), attention="mha", qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=0, num_nextn_predict_layers=0, intermediate_size=512,
    )


def _deepseek_v3() -> ModelConfig:
    # The published shape: arXiv 2412.19437 and deepseek-ai/DeepSeek-V3 config.json.
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=18432, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        first_k_dense_replace=3, num_nextn_predict_layers=1, max_position_embeddings=163840,
        rope_scaling=RopeScaling(), bias_update_speed=0.001, seq_aux_loss_alpha=0.0001,
    )


PRESETS = {"tiny": _tiny, "tiny-dense": _tiny_dense, "small": _small, "deepseek-v3": _deepseek_v3}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return validate(PRESETS[name]())
