"""Attention: DeepSeek's multi-head latent attention (MLA), plain attention for baselines,
rotary embeddings with YaRN, and a KV cache that holds MLA's compressed latent.

MLA (DeepSeek-V2 sec. 2.1, V3 sec. 2.1.1) caches per token only the normalised latent
c_kv (kv_lora_rank wide) and one rope key shared by all heads (qk_rope_head_dim wide),
instead of full per-head keys and values. When decoding one token we never expand the
latent: the key up-projection is absorbed into the query and the value up-projection into
the output, so a step costs O(heads x kv_lora_rank x cached tokens).

Rotary layout: DeepSeek's weights rotate interleaved pairs (x0, x1), (x2, x3), ...; we rotate
them the way transformers does with rope_interleave=True (even/odd slices, concatenated),
which gives the same attention scores as DeepSeek's complex multiply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stalwart.model.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 variance underflows.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope dims and the factor applied to cos/sin.

    Without scaling: theta^(-2i/d). With YaRN (arXiv 2309.00071): blend interpolated and
    extrapolated frequencies with a linear ramp between the correction dims for beta_fast
    and beta_slow, as DeepSeek-V3's inference code and transformers compute it.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if cfg.rope_scaling is None:
        return 1.0 / pos_freqs, 1.0
    s = cfg.rope_scaling

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if s.mscale and s.mscale_all_dim:
        attention_factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(s.factor)
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, factor: float, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, rope_dim/2) for integer positions (T,)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return (freqs.cos() * factor).to(dtype), (freqs.sin() * factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim; x is (..., T, rope_dim)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LayerCache:
    """One layer's cache, preallocated to max_len so that a decode step never copies it.

    MLA stores `latent` (B, max_len, kv_lora_rank) and `rope_key` (B, max_len, qk_rope_head_dim);
    plain attention stores full keys and values (B, heads, max_len, dim).
    """

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def write(self, start: int, parts: list[torch.Tensor], seq_dim: int, max_len: int) -> list[torch.Tensor]:
        if not self.tensors:
            for p in parts:
                shape = list(p.shape)
                shape[seq_dim] = max_len
                self.tensors.append(p.new_zeros(shape))
        end = start + parts[0].shape[seq_dim]
        if end > max_len:
            raise ValueError(f"KV cache holds {max_len} tokens, asked to write up to {end}")
        out = []
        for buf, p in zip(self.tensors, parts):
            buf.narrow(seq_dim, start, p.shape[seq_dim]).copy_(p)
            out.append(buf.narrow(seq_dim, 0, end))
        return out


class KVCache:
    """The cache of every layer plus how many positions are filled."""

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0
        # cos/sin for positions 0..max_len, computed once per generation instead of per step.
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors)

    def repeat(self, n: int) -> None:
        """Each row n times in a row (a prefilled prompt for n samples of it)."""
        for layer in self.layers:
            layer.tensors = [t.repeat_interleave(n, dim=0) for t in layer.tensors]


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask (q_len, k_len): query i (at absolute k_len - q_len + i) sees keys <= itself."""
    offset = k_len - q_len
    return torch.arange(k_len, device=device)[None, :] <= (torch.arange(q_len, device=device)[:, None] + offset)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, H = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = h
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, H, bias=False)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        cfg, B, T = self.cfg, x.shape[0], x.shape[1]
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, cfg.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)  # (B, T, dr): one rope key shared by all heads

        start = 0
        if cache is not None:
            start = cache.length
            latent, k_rope = cache.layers[layer_idx].write(start, [latent, k_rope], 1, cache.max_len)
        w_kv_b = self.kv_b_proj.weight.view(self.n_heads, dn + dv, r)
        if T == 1 and cache is not None:
            # Absorbed decode: q_nope W_UK attends to the latent directly; values come out in
            # latent space and go through W_UV once, per head. Batched matmuls over heads (the
            # per-head weights) or over rows (the cache), so that no operand is expanded: a
            # broadcasting matmul copied the whole cache once per head, every step (measured:
            # a third of a 64-row decode step's time).
            q_latent = torch.bmm(q_nope.squeeze(2).transpose(0, 1), w_kv_b[:, :dn]).transpose(0, 1)  # (B, h, r)
            scores = (torch.bmm(q_latent, latent.transpose(1, 2))
                      + torch.bmm(q_rope.squeeze(2), k_rope.transpose(1, 2))) * self.scale  # (B, h, S)
            probs = scores.float().softmax(-1).to(q.dtype)
            context = torch.bmm(probs, latent).transpose(0, 1)  # (h, B, r)
            out = torch.bmm(context, w_kv_b[:, dn:].transpose(1, 2)).transpose(0, 1).unsqueeze(2)  # (B, h, 1, dv)
        else:
            S = latent.shape[1]
            kv = self.kv_b_proj(latent).view(B, S, self.n_heads, dn + dv).transpose(1, 2)
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, S, dr)], dim=-1)
            q = torch.cat([q_nope, q_rope], dim=-1)
            if start == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, S, x.device),
                                                     scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * dv))


class MultiHeadAttention(nn.Module):
    """Plain attention for dense baselines; rope on the last qk_rope_head_dim dims of each head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, H, d = cfg.num_attention_heads, cfg.hidden_size, cfg.qk_head_dim
        self.n_heads = h
        self.q_proj = nn.Linear(H, h * d, bias=False)
        self.k_proj = nn.Linear(H, h * d, bias=False)
        self.v_proj = nn.Linear(H, h * cfg.v_head_dim, bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, H, bias=False)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        cfg, B, T = self.cfg, x.shape[0], x.shape[1]
        dn = cfg.qk_nope_head_dim

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        q = torch.cat([q[..., :dn], apply_rope(q[..., dn:], cos, sin)], dim=-1)
        k = torch.cat([k[..., :dn], apply_rope(k[..., dn:], cos, sin)], dim=-1)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.layers[layer_idx].write(start, [k, v], 2, cache.max_len)
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, k.shape[2], x.device),
                                                 scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else MultiHeadAttention(cfg)
