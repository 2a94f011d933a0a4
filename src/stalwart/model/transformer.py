"""The DeepSeek-style decoder: embeddings, layers (MLA + dense FFN or MoE), final norm,
output head, and optional multi-token prediction (MTP, DeepSeek-V3 sec. 2.2).

Parameter names follow transformers' DeepseekV3ForCausalLM (`model.layers.N.self_attn...`)
so that export is a rename of the experts and MTP only. The model knows nothing of
devices, replicas or checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stalwart.model.attention import KVCache, RMSNorm, build_attention, rope_cos_sin, rope_inv_freq
from stalwart.model.config import ModelConfig
from stalwart.model.moe import DenseMLP, MoE, RoutingTape

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + balance_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, self.layer_idx)
        out = self.mlp(self.post_attention_layernorm(h))
        if isinstance(out, tuple):
            out, aux = out
            return h + out, aux
        return h + out, None


class MTPModule(nn.Module):
    """Predicts token i+k+1 from depth k-1's hidden state at i and the embedding of token i+k.

    h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), one decoder layer, then the shared
    output head behind its own norm. Embedding and head are shared with the main model
    (V3 sec. 2.2); the export writes copies where DeepSeek's release stores them.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DecoderLayer(cfg, layer_idx)
        self.head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, device: torch.device | str = "cpu") -> None:
        """The model with its initial weights on `device`; on "meta", its shapes only, which
        `materialize` gives values once the model is where it will train (sharded, say)."""
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):  # no memory, and no random numbers drawn by the layers' own init
            self.model = DecoderModel(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + i)
                                     for i in range(cfg.num_nextn_predict_layers))
        inv_freq, self.rope_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if torch.device(device).type != "meta":
            self.materialize(device)

    @torch.no_grad()
    def materialize(self, device: torch.device | str,
                    place: Callable[[nn.Parameter, torch.Tensor], None] = lambda p, whole: p.copy_(whole)) -> None:
        """Memory on `device` for every parameter and buffer, and the initial weights in it.

        Each weight is drawn whole, one at a time in name order, from the global CPU
        generator, and handed to `place(param, whole)`, which keeps what this process holds of
        it (the whole, by default; a shard of a sharded model, parallel/fsdp.py): a model split
        over ranks starts from the same weights as one whole model on any device, and no
        process ever holds more than its part and one whole tensor.
        """
        self.to_empty(device=device)
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            whole = torch.empty(p.shape, dtype=p.dtype)
            if name.endswith("norm.weight"):
                whole.fill_(1.0)
            else:
                whole.normal_(0.0, std)
            place(p, whole)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The buffers no state dict carries: rope's frequencies and the experts' loads (a
        model whose parameters were assigned from a state dict needs them too)."""
        device = self.lm_head.weight.device
        self.inv_freq = rope_inv_freq(self.cfg)[0].to(device)
        for moe in self.moe_layers():
            moe.expert_load = torch.zeros(moe.expert_load.shape, device=device)

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, self.rope_factor, positions, dtype)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @contextmanager
    def routing_tape(self) -> Iterator[list[RoutingTape]]:
        """A tape on each MoE layer of the main stack, in depth order, for the duration."""
        layers = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        tapes = [RoutingTape() for _ in layers]
        for moe, tape in zip(layers, tapes):
            moe.tape = tape
        try:
            yield tapes
        finally:
            for moe in layers:
                moe.tape = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> CausalLMOutput:
        """input_ids (B, T); labels (B, T) are the next tokens (IGNORE_INDEX where none).

        With a cache, positions continue from cache.length and the cache advances by T.
        """
        T = input_ids.shape[1]
        h = self.model.embed_tokens(input_ids)
        if cache is None:
            cos, sin = self.rope_cos_sin(torch.arange(T, device=h.device), h.dtype)
        else:
            if cache.rope is None:
                cache.rope = self.rope_cos_sin(torch.arange(cache.max_len, device=h.device), h.dtype)
            cos, sin = (t[cache.length:cache.length + T] for t in cache.rope)
        balance: list[torch.Tensor] = []
        for layer in self.model.layers:
            h, aux = layer(h, cos, sin, cache)
            if aux is not None:
                balance.append(aux)
        if cache is not None:
            cache.length += T
        h = self.model.norm(h)
        logits = self.lm_head(h)
        if labels is None:
            return CausalLMOutput(logits=logits)

        out = CausalLMOutput(logits=logits, lm_loss=_cross_entropy(logits, labels))
        loss = out.lm_loss
        if self.mtp:
            out.mtp_loss, mtp_balance = self._mtp_loss(h, input_ids, labels, cos, sin)
            balance += mtp_balance
            loss = loss + self.cfg.mtp_loss_weight * out.mtp_loss
        if balance:
            out.balance_loss = torch.stack(balance).sum()
            loss = loss + out.balance_loss
        out.loss = loss
        return out

    def _mtp_loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean over MTP depths of the cross-entropy of predicting k+1 tokens ahead."""
        losses, balance = [], []
        for k, mtp in enumerate(self.mtp, start=1):
            T = labels.shape[1] - k
            if T <= 0:
                break
            # Depth k at position i reads token i+k (an input, trained on or not) and predicts
            # token i+k+1, which is labels[:, i+k].
            emb = self.model.embed_tokens(input_ids[:, k:k + T])
            h = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h[:, :T])], dim=-1))
            h, aux = mtp.layer(h, cos[:T], sin[:T])
            if aux is not None:
                balance.append(aux)
            losses.append(_cross_entropy(self.lm_head(mtp.head_norm(h)), labels[:, k:k + T]))
        if not losses:
            return labels.new_zeros((), dtype=torch.float32), balance
        return torch.stack(losses).mean(), balance

    @torch.no_grad()
    def update_router_biases(self) -> None:
        for moe in self.moe_layers():
            moe.update_bias()


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the trained positions; 0 (not NaN) when a batch has none."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token activated parameters, counted on the meta device (no memory).

    `total` and `activated` are the main model's (embedding and head included); MTP is
    reported apart, as DeepSeek reports 671B + 14B.
    """
    model = DeepSeekForCausalLM(cfg, device="meta")
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    moe_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert if cfg.is_moe else 0
    return {"total": total, "activated": total - idle, "mtp": mtp}
