"""Op checks: every op the model and the optimizer use, forward and backward, on the device
in the dtype, against float64 on the CPU; edge shapes (size-1 dimensions, non-contiguous
views, large magnitudes) included. Each op also runs twice to check that it is
deterministic, and is watched for results that come back on another device or warnings
that it fell back to the CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stalwart.model.attention import apply_rope
from stalwart.verify.compare import DTYPES, Check, compare

Inputs = Callable[[torch.Generator], list[torch.Tensor]]


@dataclass(frozen=True)
class OpCase:
    op: str  # the op as the report names it
    case: str  # basic, size-1 dims, non-contiguous, large magnitude
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: Inputs  # float64 (or integer) CPU tensors
    slack: float = 1.0  # see compare.py: 2 for ops that sum many terms, 1 for elementwise ones
    fp32_only: bool = False  # runs in fp32 whatever the dtype (optimizer state, routing)


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _linear(*shape, out=96, scale=1.0, transpose=False) -> Inputs:
    def make(g):
        x = _randn(g, *shape, scale=scale)
        if transpose:
            x = _randn(g, *shape[:-2], shape[-1], shape[-2], scale=scale).transpose(-1, -2)
        return [x, _randn(g, out, shape[-1], scale=shape[-1] ** -0.5), _randn(g, out, scale=0.1)]
    return make


def _one(*shape, scale=1.0, transpose=False) -> Inputs:
    def make(g):
        if transpose:
            return [_randn(g, *shape[:-2], shape[-1], shape[-2], scale=scale).transpose(-1, -2)]
        return [_randn(g, *shape, scale=scale)]
    return make


def _rms(*shape, scale=1.0) -> Inputs:
    return lambda g: [_randn(g, *shape, scale=scale), 1 + _randn(g, shape[-1], scale=0.1)]


def _rope(b, h, t, d) -> Inputs:
    def make(g):
        angles = torch.arange(t, dtype=torch.float64)[:, None] * (10000 ** (-torch.arange(0, d, 2) / d))[None]
        return [_randn(g, b, h, t, d), angles.cos(), angles.sin()]
    return make


def _routing(n, hidden, experts) -> Inputs:
    return lambda g: [_randn(g, n, hidden), _randn(g, experts, hidden, scale=hidden ** -0.5)]


def _dispatch(n, dim, rows) -> Inputs:
    return lambda g: [_randn(g, n, dim), torch.randint(0, rows, (n,), generator=g), _randn(g, rows, dim)]


def _xent(n, vocab, scale=1.0) -> Inputs:
    def make(g):
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[::5] = -100  # ignored positions, as prompts are
        return [_randn(g, n, vocab, scale=scale), labels]
    return make


def _attention(b, h, t, d) -> Inputs:
    return lambda g: [_randn(g, b, h, t, d), _randn(g, b, h, t, d), _randn(g, b, h, t, d)]


def _routing_fn(x, w, k=4):
    scores = F.linear(x.float() if x.dtype != torch.float64 else x,
                      w.float() if w.dtype != torch.float64 else w).sigmoid()
    values, idx = scores.topk(k, dim=-1)
    return values, idx


def _index_add(src, idx, base):
    return base.index_add(0, idx, src)


def _gather(src, idx, base):
    return base.index_select(0, idx) + src


def _gather_routing_weights(scores, idx):
    return scores.gather(1, idx)


def _scores_and_choice(n, experts, k) -> Inputs:
    def make(g):
        scores = _randn(g, n, experts)
        return [scores, scores.topk(k, dim=-1)[1]]
    return make


def _scatter_add(src, idx, base):
    return base.scatter_add(0, idx[:, None].expand_as(src), src)


def _xent_fn(logits, labels):
    return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, labels,
                           ignore_index=-100, reduction="sum") / (labels != -100).sum()


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _swiglu(a, b):
    return F.silu(a) * b


def op_cases() -> list[OpCase]:
    return [
        OpCase("linear", "basic", F.linear, _linear(4, 16, 64), slack=2),
        OpCase("linear", "size-1 dims", F.linear, _linear(1, 1, 64, out=1), slack=2),
        OpCase("linear", "non-contiguous", F.linear, _linear(4, 16, 64, transpose=True), slack=2),
        OpCase("linear", "large magnitude", F.linear, _linear(4, 16, 64, scale=1e3), slack=2),
        OpCase("matmul", "basic", torch.matmul, lambda g: [_randn(g, 2, 4, 16, 32), _randn(g, 2, 4, 32, 16)],
               slack=2),
        OpCase("matmul", "size-1 dims", torch.matmul, lambda g: [_randn(g, 1, 1, 1, 32), _randn(g, 1, 1, 32, 1)],
               slack=2),
        OpCase("softmax", "basic", lambda x: F.softmax(x, dim=-1), _one(4, 8, 128), slack=2),
        OpCase("softmax", "size-1 dims", lambda x: F.softmax(x, dim=-1), _one(4, 8, 1), slack=2),
        OpCase("softmax", "non-contiguous", lambda x: F.softmax(x, dim=-1), _one(4, 32, 16, transpose=True),
               slack=2),
        OpCase("softmax", "large magnitude", lambda x: F.softmax(x, dim=-1), _one(4, 8, 128, scale=50), slack=2),
        OpCase("rms_norm", "basic", lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6), _rms(4, 16, 64),
               slack=2),
        OpCase("rms_norm", "size-1 dims", lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6), _rms(1, 1, 1)),
        OpCase("rms_norm", "large magnitude", lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
               _rms(4, 16, 64, scale=1e4), slack=2),
        OpCase("rope", "basic", apply_rope, _rope(2, 4, 16, 32), slack=2),
        OpCase("rope", "size-1 dims", apply_rope, _rope(1, 1, 1, 2), slack=2),
        OpCase("silu", "basic", F.silu, _one(4, 16, 64), slack=2),
        OpCase("silu", "large magnitude", F.silu, _one(4, 16, 64, scale=1e3), slack=2),
        OpCase("swiglu", "basic", _swiglu, lambda g: [_randn(g, 4, 16, 64), _randn(g, 4, 16, 64)], slack=2),
        OpCase("sigmoid+topk routing", "basic", _routing_fn, _routing(64, 32, 16), slack=2),
        OpCase("index_add (expert combine)", "basic", _index_add, _dispatch(64, 32, 8), slack=2),
        OpCase("index_select (expert dispatch)", "basic", _gather, _dispatch(64, 32, 8)),
        OpCase("scatter_add", "basic", _scatter_add, _dispatch(64, 32, 8), slack=2),
        OpCase("gather (routing weights)", "basic", _gather_routing_weights, _scores_and_choice(64, 16, 4)),
        OpCase("cross_entropy", "basic", _xent_fn, _xent(64, 256), slack=2),
        OpCase("cross_entropy", "large magnitude", _xent_fn, _xent(64, 256, scale=100), slack=2),
        OpCase("scaled_dot_product_attention", "basic", _sdpa, _attention(2, 4, 16, 32), slack=2),
        OpCase("scaled_dot_product_attention", "size-1 dims", _sdpa, _attention(1, 1, 1, 32), slack=2),
    ]


def run_op_case(case: OpCase, device: torch.device, dtype: str, seed: int = 0,
                device_mode: contextlib.AbstractContextManager | None = None) -> list[Check]:
    """Forward, backward and determinism of one case; returns its checks. `device_mode`
    wraps the device side only (tests plant a buggy kernel with it)."""
    mode = device_mode or contextlib.nullcontext()
    g = torch.Generator().manual_seed(seed)
    raw = case.inputs(g)
    run_dtype = torch.float32 if case.fp32_only else DTYPES[dtype]
    label = f"{case.op} [{case.case}]"

    def prepare(t: torch.Tensor, target: torch.device, dt: torch.dtype) -> torch.Tensor:
        if not t.is_floating_point():
            return t.to(target)
        rounded = t.to(run_dtype)  # the reference sees the same rounded inputs
        return rounded.to(target, dt).detach().requires_grad_()

    dev_in = [prepare(t, device, run_dtype) for t in raw]
    ref_in = [prepare(t, torch.device("cpu"), torch.float64) for t in raw]
    checks: list[Check] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with mode:
            out = _as_tuple(case.fn(*dev_in))
            again = _as_tuple(case.fn(*[t.detach() for t in dev_in]))
    ref = _as_tuple(case.fn(*ref_in))
    notes = [str(w.message).splitlines()[0][:120] for w in seen if "fall" in str(w.message).lower()]
    for i, (o, r) in enumerate(zip(out, ref)):
        part = f"{label}: forward" + (f" output {i}" if len(out) > 1 else "")
        if o.device.type != device.type:
            checks.append(Check(part, "op", False, notes=[f"result on {o.device.type}, not {device.type}: "
                                                           "the op fell back"]))
            continue
        if not o.is_floating_point():
            same = torch.equal(o.cpu(), r)
            checks.append(Check(part, "op", same, max_abs=0.0 if same else float((o.cpu() != r).sum()),
                                notes=[] if same else ["integer results differ"]))
        else:
            checks.append(compare(part, "op", o, r, dtype if not case.fp32_only else "fp32", case.slack))
        if not torch.equal(o.detach(), again[i].detach()):
            checks[-1].notes.append("non-deterministic: the same input gave another result")
    if notes:
        checks[0].notes += notes
    # Backward: a fixed random weighting of the float outputs, the same on both sides.
    wg = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(r.shape, generator=wg, dtype=torch.float64) if r.is_floating_point() else None
               for r in ref]
    dev_loss = sum((o.float() * w.to(device, torch.float32)).sum() for o, w in zip(out, weights) if w is not None)
    ref_loss = sum((r * w).sum() for r, w in zip(ref, weights) if w is not None)
    dev_grads = torch.autograd.grad(dev_loss, [t for t in dev_in if t.requires_grad], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, [t for t in ref_in if t.requires_grad], allow_unused=True)
    for i, (dg, rg) in enumerate(zip(dev_grads, ref_grads)):
        if rg is None:
            continue
        if dg is None:
            checks.append(Check(f"{label}: backward input {i}", "op", False, notes=["no gradient"]))
            continue
        checks.append(compare(f"{label}: backward input {i}", "op", dg, rg,
                              dtype if not case.fp32_only else "fp32", case.slack * 2))
    return checks


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def adamw_check(device: torch.device, steps: int = 3, seed: int = 0, device_mode=None) -> list[Check]:
    """AdamW as the trainer builds it (foreach=False, fp32 master weights) for a few steps."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (1, 1)]
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    results = []
    for target, dt, mode in ((device, torch.float32, device_mode or contextlib.nullcontext()),
                             (torch.device("cpu"), torch.float64, contextlib.nullcontext())):
        params = [torch.nn.Parameter(p.to(torch.float32).to(target, dt)) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.to(torch.float32).to(target, dt)
            with mode:
                opt.step()
        results.append(params)
    return [compare(f"adamw [{s}]: {steps} steps", "op", d, r, "fp32", slack=2)
            for s, d, r in zip(("matrix", "vector", "size-1 dims"), *results)]
