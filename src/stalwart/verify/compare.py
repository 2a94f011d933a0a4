"""Comparing a device's results with a float64 CPU reference, with dtype-aware tolerances.

The tolerances start from `torch.testing.assert_close`'s defaults for the dtype (fp32:
rtol 1.3e-6, atol 1e-5; bf16: 1.6e-2, 1e-5; fp16: 1e-3, 1e-5), applied norm-wise: a check
passes when max |out - ref| <= atol + rtol * slack * max |ref|. Elementwise ops use slack 1,
ops that sum many terms 2 (backward passes twice that); layers, the training curve and the
export have their own, each set from healthy CPU runs with a margin of 4x or more
(docs/verify.md). The reference sees the same inputs, rounded to the dtype first: what is
measured is the op, not the rounding of its inputs. bf16's rtol (1.6e-2) is four times its
rounding error, so a kernel that is off by a few percent fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCES = {"fp32": (1.3e-6, 1e-5), "bf16": (1.6e-2, 1e-5), "fp16": (1e-3, 1e-5)}


@dataclass
class Check:
    name: str  # e.g. "op softmax [last dim 1]: forward"
    kind: str  # op, layer, curve, collective, export
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def compare(name: str, kind: str, out: torch.Tensor, ref: torch.Tensor, dtype: str, slack: float = 1.0) -> Check:
    """One tensor against its float64 reference."""
    got = out.detach().to("cpu", torch.float64)
    want = ref.detach().to(torch.float64)
    notes = []
    if got.shape != want.shape:
        return Check(name, kind, False, notes=[f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"])
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        return Check(name, kind, False, notes=["non-finite values where the reference is finite"])
    diff = (got - want).abs()
    diff = torch.where(torch.isnan(diff) & torch.isnan(want), torch.zeros_like(diff), diff)
    scale = want.abs().max().item() if want.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    rtol, atol = TOLERANCES[dtype]
    bound = atol + rtol * slack * scale
    g, w = got.flatten(), want.flatten()
    denom = g.norm() * w.norm()
    cosine = float((g @ w) / denom) if denom > 0 else (1.0 if g.norm() == w.norm() else 0.0)
    passed = max_abs <= bound and not math.isnan(max_abs)
    return Check(name, kind, passed, max_abs=max_abs, max_rel=max_abs / scale if scale else max_abs,
                 cosine=cosine, tolerance=bound, notes=notes)
