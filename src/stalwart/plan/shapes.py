"""The shape of a model as the planner needs it: parameter counts and the few dimensions
that set its FLOPs, its communication and its memory.

A shape comes from one of our model presets (counted exactly on the meta device), from a
model folder or run directory, from a JSON file of `ModelShape` fields, or from the
planning shapes below, which are published models we cannot build but must plan for.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from stalwart.errors import ConfigError
from stalwart.fields import check_fields
from stalwart.model import ModelConfig, parameter_counts
from stalwart.model.config import PRESETS, preset


@dataclass(frozen=True)
class ModelShape:
    name: str
    total: float  # parameters of the main model, embedding and head included
    active: float  # parameters one token passes through (all of a dense model)
    layers: int
    hidden: int
    heads: int
    qk_head_dim: int
    v_head_dim: int
    vocab: int
    experts: int = 0  # routed experts per MoE layer; 0: dense
    experts_per_token: int = 0
    expert_params: float = 0.0  # all routed experts of all layers (what expert parallelism shards)
    moe_layers: int = 0
    mtp_active: float = 0.0  # multi-token prediction: parameters a token passes through
    mtp_layers: int = 0  # multi-token prediction: decoder layers (they attend too)
    mtp_params: float = 0.0  # multi-token prediction: parameters held (not in `total`, as DeepSeek counts)
    mtp_expert_params: float = 0.0  # of mtp_params, its MoE layers' routed experts (expert parallelism shards them)
    # The feed-forward width a token passes through, averaged over the layers (a MoE layer:
    # its chosen and shared experts'); 0: estimated from the parameters (ffn_active_width).
    ffn_width: float = 0.0
    # The largest decoder layer's parameters, and of those outside its routed experts (what
    # FSDP gathers at once); 0: the average layer's.
    layer_params: float = 0.0
    layer_dense_params: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def dense_params(self) -> float:
        """Everything but the routed experts: replicated across expert-parallel ranks."""
        return self.total - self.expert_params

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per activated weight (forward 2, backward 4), the
        embedding lookup excluded (it multiplies nothing), plus attention's scores and
        weighted values: 2 FLOPs per multiply-add over the seq_len/2 earlier positions a
        token sees on average, times 3 for the backward pass. The causal half is what a
        causal attention kernel computes; PaLM's and Megatron-LM's formulas count the whole
        score matrix. tests/test_plan.py checks both terms against torch's FLOP counter
        on our model."""
        weights = self.active - self.vocab * self.hidden + self.mtp_active
        attention = 3 * (self.layers + self.mtp_layers) * self.heads * (self.qk_head_dim + self.v_head_dim) * seq_len
        return 6 * weights + attention

    @property
    def ffn_active_width(self) -> float:
        """ffn_width, or where a shape does not give it, what the activated parameters of a
        layer leave after attention's four projections (an estimate)."""
        if self.ffn_width:
            return self.ffn_width
        per_layer = (self.active - 2 * self.vocab * self.hidden) / self.layers
        attention = 2 * self.hidden * self.heads * (self.qk_head_dim + self.v_head_dim)
        return max(float(self.hidden), (per_layer - attention) / (3 * self.hidden))

    def stored_layer_elements(self) -> float:
        """Elements per token that one decoder layer keeps for its backward pass without
        recomputation, as stalwart's model computes it: its two norms' inputs and outputs
        (4 h), attention's projections, queries, keys, values and output (4 h + 2 heads (qk +
        v)), the feed-forward's input, gate, up, activation and product (4 ffn + h), and a MoE
        layer's router and the rows it sends each chosen expert (experts + 3 k h).
        tests/test_plan.py checks it against autograd's saved tensors of our model."""
        h = self.hidden
        moe_share = self.moe_layers / self.layers
        attention = 4 * h + 2 * self.heads * (self.qk_head_dim + self.v_head_dim)
        ffn = 4 * self.ffn_active_width + h + moe_share * (self.experts + 3 * self.experts_per_token * h)
        return 4 * h + attention + ffn

    def stored_head_elements(self) -> float:
        """The same for what follows the layers: the final norm (2 h); each output head's
        input (h); each MTP depth's layer, its norms and projection (7 h)."""
        h, heads = self.hidden, 1 + self.mtp_layers
        return 2 * h + heads * h + self.mtp_layers * (self.stored_layer_elements() + 7 * h)

    def stored_log_prob_elements(self) -> float:
        """Each output head's log-probabilities per token (vocab), which the loss keeps in fp32."""
        return (1 + self.mtp_layers) * self.vocab

    def largest_layer(self, *, experts: bool) -> float:
        """The parameters of the largest decoder layer, its routed experts counted or not."""
        given = self.layer_params if experts else self.layer_dense_params
        if given:
            return given
        embeddings = 2 * self.vocab * self.hidden
        return (self.dense_params - embeddings) / self.layers + \
            (self.expert_params / max(self.moe_layers, 1) if experts else 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_model_config(name: str, cfg: ModelConfig) -> ModelShape:
    from stalwart.model import DeepSeekForCausalLM
    from stalwart.model.moe import RoutedExperts

    counts = parameter_counts(cfg)
    layers = DeepSeekForCausalLM(cfg, device="meta").model.layers
    experts_of = [sum(p.numel() for m in layer.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
                  for layer in layers]
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    moe_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    mtp_active = 0.0
    if cfg.num_nextn_predict_layers:
        # The MTP block's own layer (MoE: only the chosen experts) and its projection, plus
        # the shared output head, which it multiplies again.
        idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert if cfg.is_moe else 0
        per_depth = counts["mtp"] / cfg.num_nextn_predict_layers - idle
        mtp_active = cfg.num_nextn_predict_layers * (per_depth + cfg.vocab_size * cfg.hidden_size)
    return ModelShape(
        name=name, total=counts["total"], active=counts["activated"], layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, heads=cfg.num_attention_heads, qk_head_dim=cfg.qk_head_dim,
        v_head_dim=cfg.v_head_dim, vocab=cfg.vocab_size, experts=cfg.n_routed_experts,
        experts_per_token=cfg.num_experts_per_tok if cfg.is_moe else 0,
        expert_params=moe_layers * cfg.n_routed_experts * per_expert, moe_layers=moe_layers,
        mtp_active=mtp_active, mtp_layers=cfg.num_nextn_predict_layers, mtp_params=counts["mtp"],
        mtp_expert_params=cfg.num_nextn_predict_layers * cfg.n_routed_experts * per_expert if cfg.is_moe else 0.0,
        ffn_width=sum((cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
                      if cfg.is_moe_layer(i) else cfg.intermediate_size
                      for i in range(cfg.num_hidden_layers)) / cfg.num_hidden_layers,
        layer_params=max(sizes), layer_dense_params=max(n - e for n, e in zip(sizes, experts_of)))


def _llama31_405b() -> ModelShape:
    # Llama 3 paper (arXiv 2407.21783) table 3 and the released config: 126 layers, model
    # dimension 16384, FFN 53248, 128 heads of 128 (8 key/value heads), vocabulary 128256,
    # untied embedding and head. Counted: 405.8B.
    layers, hidden, ffn, heads, kv_heads, head_dim, vocab = 126, 16384, 53248, 128, 8, 128, 128256
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn + 2 * hidden
    total = layers * per_layer + 2 * vocab * hidden + hidden
    return ModelShape(name="llama3.1-405b", total=total, active=total, layers=layers, hidden=hidden, heads=heads,
                      qk_head_dim=head_dim, v_head_dim=head_dim, vocab=vocab)


def _deepseek_r2_class() -> ModelShape:
    # A planning assumption, not a released model: DeepSeek-V3's architecture grown to about
    # 1.2T total and 78B activated parameters (the size reported for a successor in 2025
    # press, unconfirmed): hidden 8192, 76 layers, 320 routed experts (a multiple of EP64),
    # 15 per token. Counted: 1199B total, 78.6B activated.
    cfg = preset("deepseek-v3").replace(hidden_size=8192, intermediate_size=24576, num_hidden_layers=76,
                                        n_routed_experts=320, num_experts_per_tok=15)
    return from_model_config("deepseek-r2-class", cfg)


PLANNING_SHAPES = {"llama3.1-405b": _llama31_405b, "deepseek-r2-class": _deepseek_r2_class}


def shape_names() -> list[str]:
    return [*PRESETS, *PLANNING_SHAPES]


def model_shape(spec: str) -> ModelShape:
    """A preset or planning shape by name, a model folder or run directory, or a JSON file
    of ModelShape fields."""
    if spec in PRESETS:
        return from_model_config(spec, preset(spec))
    if spec in PLANNING_SHAPES:
        return PLANNING_SHAPES[spec]()
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"unknown model {spec!r}: not a preset ({', '.join(shape_names())}) nor a path")
    if path.is_dir():
        return _shape_of_folder(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a model shape must be a JSON object of ModelShape fields")
    return shape_from_dict(raw, str(path))


def shape_from_dict(raw: dict, where: str) -> ModelShape:
    raw = {"name": Path(where).stem, **raw}
    check_fields("shape", ModelShape, raw)
    required = [f.name for f in dataclasses.fields(ModelShape) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{where}: the model shape lacks {', '.join(missing)}")
    shape = ModelShape(**raw)
    for name in ("total", "active", "layers", "hidden", "heads", "qk_head_dim", "v_head_dim", "vocab"):
        if getattr(shape, name) <= 0:
            raise ConfigError(f"{where}: shape.{name} must be positive, got {getattr(shape, name)}")
    for name in ("experts", "experts_per_token", "expert_params", "moe_layers", "mtp_active", "mtp_layers",
                 "mtp_params", "mtp_expert_params", "ffn_width", "layer_params", "layer_dense_params"):
        if getattr(shape, name) < 0:
            raise ConfigError(f"{where}: shape.{name} must be >= 0, got {getattr(shape, name)}")
    if shape.active > shape.total:
        raise ConfigError(f"{where}: shape.active ({shape.active:g}) exceeds shape.total ({shape.total:g})")
    if shape.vocab * shape.hidden >= shape.active:
        raise ConfigError(f"{where}: the embedding (vocab x hidden = {shape.vocab * shape.hidden:g}) must be part of "
                          f"shape.active ({shape.active:g})")
    if shape.expert_params >= shape.total:
        raise ConfigError(f"{where}: shape.expert_params must be below shape.total")
    if shape.experts and not (shape.expert_params and 1 <= shape.experts_per_token <= shape.experts
                              and 1 <= shape.moe_layers <= shape.layers):
        raise ConfigError(f"{where}: a mixture of experts needs expert_params > 0, 1 <= experts_per_token <= "
                          "experts and 1 <= moe_layers <= layers")
    if not shape.experts and (shape.expert_params or shape.experts_per_token or shape.moe_layers):
        raise ConfigError(f"{where}: expert_params, experts_per_token and moe_layers need experts > 0")
    return shape


def _shape_of_folder(path: Path) -> ModelShape:
    """A Hugging Face model folder (an export) or a stalwart run directory."""
    config = path / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json: not a model folder or run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):  # a run directory
        return from_model_config(path.name, ModelConfig.from_dict({k: v for k, v in raw["model"].items()
                                                                 if k != "from"}))
    from stalwart.export.hf import read_hf_config

    return from_model_config(path.name, read_hf_config(path))
