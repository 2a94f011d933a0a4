"""The GRPO family's objective: group-relative advantages and the clipped policy ratio.

For each prompt, G completions are sampled and scored. Their advantages are relative to
the group (no value model, DeepSeekMath sec. 4.1):

    grpo, dapo   A_i = (r_i - mean(r)) / (std(r) + eps)     (std with Bessel's correction, as TRL)
    dr_grpo      A_i =  r_i - mean(r)                       (Dr. GRPO: no std normalisation)

Each completion token t of sample i has the ratio rho = exp(logp - logp_old) of the policy
being updated to the one that sampled, and the clipped surrogate

    l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it,
    k3   = exp(logp_ref - logp) - (logp_ref - logp) - 1     (the KL estimator DeepSeekMath uses)

averaged in the variant's own way:

    grpo     the mean over each completion's tokens, then over completions (length-normalised);
    dr_grpo  the sum over all tokens divided by completions x the longest allowed length;
    dapo     the mean over all tokens of the batch; groups whose rewards are all equal
             carry no signal and are left out (`informative`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSSES = ("grpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, loss: str) -> torch.Tensor:
    """rewards (P, G), G samples of each of P prompts -> advantages (P, G)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if loss == "dr_grpo":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)


def informative(rewards: torch.Tensor) -> torch.Tensor:
    """(P,) whether a group's rewards differ: one whose rewards are all equal teaches nothing."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference), >= 0 and unbiased (Schulman's k3)."""
    diff = ref_logp - logp
    return diff.exp() - diff - 1


@dataclass(frozen=True)
class Objective:
    """The loss, and the sums its metrics come from: a batch cut into shares (rl/shares.py)
    adds them up share by share, `weight * loss` included, and divides once."""

    loss: torch.Tensor  # the scalar to minimise
    weight: float  # what `loss` averages over: completions (grpo, dr_grpo) or tokens (dapo)
    clipped: float  # completion tokens whose ratio was clipped
    kl_sum: float  # k3 summed over completion tokens (0 without a reference)
    tokens: float  # completion tokens that count

    @property
    def clip_fraction(self) -> float:
        return self.clipped / max(self.tokens, 1.0)

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.tokens, 1.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss: str, clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0, max_len: int | None = None) -> Objective:
    """logp, old_logp, ref_logp, mask: (N, T) per completion token (mask False past its end);
    advantages: (N,). max_len (dr_grpo): the completion length allowed, T by default."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    mask = mask.to(logp.dtype)
    ratio = (logp - old_logp).exp()
    a = advantages[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        kl = k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
    tokens = float(mask.sum())
    if loss == "grpo":
        value = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss == "dr_grpo":
        value = (per_token * mask).sum() / (logp.shape[0] * (max_len or logp.shape[1]))
    else:
        value = (per_token * mask).sum() / max(tokens, 1.0)
    was_clipped = (clipped < unclipped).to(logp.dtype)  # min took the clipped term
    return Objective(value, tokens if loss == "dapo" else float(logp.shape[0]), float((was_clipped * mask).sum()),
                     float((kl.detach() * mask).sum()), tokens)
