"""Layer, training-curve, collective and export checks.

Layers: the float64 reference model runs forward once with hooks that record each layer's
inputs; then every layer of the device copy (in the dtype) runs alone on those recorded
inputs, so that a wrong layer is named by itself and not by everything after it. Forward
outputs and the gradients of the layer's parameters and inputs are compared.

Training curve: N steps of the trainer's own step (AdamW with foreach=False, the recipe's lr,
clipping) on fixed batches, on the device (fp32 weights, autocast in the dtype, as
`stalwart train` runs) and in float64 on the CPU; the per-step losses are compared.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart.model import DeepSeekForCausalLM
from stalwart.model.moe import Router
from stalwart.verify.compare import DTYPES, Check, compare

# A layer chains a dozen ops in the dtype. With the device's routing replayed in the
# reference, healthy CPU runs of the tiny model stay within 0.4x (fp32, bf16) and 1x (fp16)
# of the dtype's rtol relative to the largest reference value (docs/verify.md); forward 4x
# and backward 8x leave a margin of 4x or more.
LAYER_SLACK = 4.0


def _layer_names(model: DeepSeekForCausalLM) -> list[str]:
    names = []
    for i in range(model.cfg.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}"]
    names += ["model.norm", "lm_head"]
    if model.mtp:
        names += [n for n, _ in model.named_modules() if n.startswith("mtp.") and n.count(".") == 1]
    known = dict(model.named_modules())
    return [n for n in names if n in known]


def _cast(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            return obj.detach().to(dtype).to(device).requires_grad_(obj.requires_grad or obj.dim() > 1)
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, device, dtype) for k, v in obj.items()}
    return obj


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    raise TypeError(f"no tensor in {type(out)}")


def _replay_routing(dev_mod: torch.nn.Module, ref_mod: torch.nn.Module) -> list:
    """Hooks that make the reference's routers take the experts the device's routers chose.

    In a low-precision dtype a near-tie between two experts may go either way; that is the
    dtype, not a bug, and it would swamp the comparison of the layer's arithmetic. Routing
    itself is checked as an op ("sigmoid+topk routing"); the training curve keeps it free.
    """
    chosen: list[torch.Tensor] = []

    def record(module, args, out):
        chosen.append(out[1].detach().cpu())

    def replay(module, args, out):
        _, idx, scores = out
        idx = chosen.pop(0).to(idx.device)
        weights = scores.gather(1, idx)
        if module.cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * module.cfg.routed_scaling_factor, idx, scores

    return ([m.register_forward_hook(record) for m in dev_mod.modules() if isinstance(m, Router)]
            + [m.register_forward_hook(replay) for m in ref_mod.modules() if isinstance(m, Router)])


def layer_checks(model: DeepSeekForCausalLM, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                 dtype: str, seed: int = 0, device_mode=None) -> list[Check]:
    mode = device_mode or contextlib.nullcontext()
    dt = DTYPES[dtype]
    # The reference holds the device's dtype-rounded weights, in float64: the check measures
    # the layer's arithmetic, not the rounding of its weights.
    reference = copy.deepcopy(model).to(dt).to(torch.float64).train()
    on_device = copy.deepcopy(model).to(device, dt).train()
    g = torch.Generator().manual_seed(seed)
    ids, labels = batch
    recorded: dict[str, tuple] = {}
    modules = dict(reference.named_modules())
    def record(name):
        def hook(module, args, kwargs):  # the first call's inputs (lm_head also serves the MTP)
            recorded.setdefault(name, (args, kwargs))
        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in _layer_names(reference)]
    with torch.no_grad():
        reference(ids, labels=labels)
    for h in hooks:
        h.remove()
    checks = []
    device_modules = dict(on_device.named_modules())
    for name, (args, kwargs) in recorded.items():
        ref_mod, dev_mod = modules[name], device_modules[name]
        # Both sides start from the same dtype-rounded inputs.
        dev_args, dev_kwargs = _cast(args, device, dt), _cast(kwargs, device, dt)
        ref_args, ref_kwargs = _cast(_cast(args, "cpu", dt), "cpu", torch.float64), \
            _cast(_cast(kwargs, "cpu", dt), "cpu", torch.float64)
        hooks = _replay_routing(dev_mod, ref_mod)
        with mode:
            out_d = _first_tensor(dev_mod(*dev_args, **dev_kwargs))
        out_r = _first_tensor(ref_mod(*ref_args, **ref_kwargs))
        for h in hooks:
            h.remove()
        checks.append(compare(f"layer {name}: forward", "layer", out_d, out_r, dtype, LAYER_SLACK))
        w = torch.randn(out_r.shape, generator=g, dtype=torch.float64)
        (out_d.float() * w.to(device, torch.float32)).sum().backward()
        (out_r * w).sum().backward()
        grads = [compare(f"layer {name}: grad {pname}", "layer", pd.grad, pr.grad, dtype, LAYER_SLACK * 2)
                 for (pname, pd), (_, pr) in zip(dev_mod.named_parameters(), ref_mod.named_parameters())
                 if pr.grad is not None and pd.grad is not None]
        if grads:  # one row per layer: a failing parameter, else the one nearest its bound
            worst = min(grads, key=lambda c: (c.passed, -(c.max_abs or 0) / (c.tolerance or 1)))
            worst.name = f"layer {name}: backward (worst parameter: {worst.name.rsplit('grad ', 1)[1]})"
            checks.append(worst)
        on_device.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    return checks


def loss_curve_check(model: DeepSeekForCausalLM, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device, dtype: str, lr: float = 3e-3,
                     device_mode=None) -> tuple[Check, list[float], list[float]]:
    """The same N training steps on the device and in float64 on the CPU."""
    curves = []
    for target, weights, autocast, mode in ((device, torch.float32, dtype != "fp32",
                                             device_mode or contextlib.nullcontext()),
                                            (torch.device("cpu"), torch.float64, False, contextlib.nullcontext())):
        m = copy.deepcopy(model).to(target, weights).train()
        opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                foreach=False)
        losses = []
        for x, y in batches:
            ctx = torch.autocast(device_type=target.type, dtype=DTYPES[dtype]) if autocast else contextlib.nullcontext()
            with ctx, mode:
                out = m(x.to(target), labels=y.to(target))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.update_router_biases()
            losses.append(float(out.lm_loss.detach()))
        curves.append(losses)
    got, want = torch.tensor(curves[0], dtype=torch.float64), torch.tensor(curves[1], dtype=torch.float64)
    # The loss itself, within 4x the dtype's rtol of the largest loss for 10 steps;
    # differences compound, so the bound grows linearly past that. Healthy CPU runs, 10
    # steps: 0.03x (fp32), 0.07x (bf16) and 0.4x (fp16) of the bound; routing flips included.
    check = compare(f"training curve: {len(batches)} steps, loss per step", "curve", got, want, dtype,
                    4 * max(1.0, len(batches) / 10))
    return check, curves[0], curves[1]


def _all_reduce_worker(rank: int, world: int, port: int, backend: str, device: str, dtype: str, out: str) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target = torch.device(device if device == "cpu" else f"{device.split(':')[0]}:{rank}")
        g = torch.Generator().manual_seed(rank)
        values = torch.randn(1000, generator=g, dtype=torch.float64).to(DTYPES[dtype])
        t = values.to(target)
        dist.all_reduce(t)
        if rank == 0:
            torch.save(t.cpu(), out)
    finally:
        dist.destroy_process_group()


def all_reduce_check(backend: str, device: torch.device, dtype: str, world: int) -> Check:
    """all_reduce(SUM) of `world` processes through `backend`, against the float64 sum."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sum.pt")
        mp.start_processes(_all_reduce_worker, args=(world, port, backend, device.type, dtype, out), nprocs=world,
                           start_method="spawn")
        got = torch.load(out, weights_only=True)
    want = sum(torch.randn(1000, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
               .to(DTYPES[dtype]).to(torch.float64) for r in range(world))
    return compare(f"all_reduce sum [{backend}, {world} processes]", "collective", got, want, dtype,
                   slack=float(world))
