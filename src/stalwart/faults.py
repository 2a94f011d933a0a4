"""Deterministic fault injection, for tests and chaos runs: faults fire at a named point of
a named step, never after a sleep.

    STALWART_INJECT="kill@12,kill-in-checkpoint@20,nan-grad@7:1,flip-bit@9:2"

`kill@N` SIGKILLs the process at the start of step N (before any of its work);
`kill-in-exchange@N` SIGKILLs it after step N's forward and backward, right before its
exchange, while its peers wait in the collective; `kill-in-reduce@N` SIGKILLs a DiLoCo
group of three or more in the outer exchange sent at step N, between its reduce-scatter and
its all-gather (its peers hold its range of their payloads and wait for its reduced range); `kill-in-checkpoint@N` SIGKILLs it halfway through writing the checkpoint of step N, after
the weights are on disk and before the folder is renamed into place; `nan-grad@N` fills one
gradient with NaN after the backward pass of step N; `spike@N` multiplies that step's
gradients by 1000 (a loss-spike-like gradient norm); `flip-bit@N` flips one bit of one
weight after step N is committed (silent data corruption); `nan-weight@N` sets one weight
of the first decoder layer to NaN after step N is committed (every token passes through it,
so the loss is NaN from then on, until the group is healed); `nan-device@N` makes every
gradient of this process NaN from step N on (a device that keeps producing NaN); `slow@N`
makes every step from N on three times slower (a straggling device); `flip-bit-global@N`
flips the bit `flip-bit` flips, but in DiLoCo's global weights G, which a group holds from
one outer step to the next. In `stalwart rl`, `kill-in-generation@N`, `kill-in-scoring@N`
and `kill-in-update@N` SIGKILL a process after it sampled its first share of step N, after
it scored it, and after the backward pass of its first share at the last update, before
the exchange (with several updates, after the earlier ones were applied). Faults fire in a launch's first attempt only: a torchrun
restart (TORCHELASTIC_RESTART_COUNT > 0) has none, as the supervisor's restarts have none.

`grad-level@N` multiplies every gradient by 10 from step N on: the gradient norm settles at a
new level while the training itself goes on as before (AdamW's update does not change with
a constant scale of the gradients), as a norm does that moves with a phase of training.

`nan-device@sigusr1` arms the same fault for a signal instead of a step: the device starts
producing NaN at the first step after the process receives SIGUSR1, at a moment chosen from
outside (bench/faults.py sends it).

`nan-expert-grad@N` fills the gradient of the first MoE layer's routed experts with NaN
after the backward pass of step N; with expert parallelism, only the experts this rank
holds (a fault in one rank's share of a split tensor).

A `:R` suffix fires the fault only in replica group R (`set_replica`), or, in a plain
torchrun launch (no replica groups), only on rank R; without it the fault fires in every
process that reads the variable. The supervisor passes the variable
to a group's first process only: a restarted group runs clean.

Injection points are plain function calls that cost one set lookup when nothing is
injected.
"""

from __future__ import annotations

import functools
import os
import signal

import torch

from stalwart.errors import ConfigError

INJECT_ENV = "STALWART_INJECT"
POINTS = ("kill", "kill-in-exchange", "kill-in-reduce", "kill-in-checkpoint", "nan-grad", "nan-expert-grad",
          "nan-device", "spike", "grad-level", "flip-bit", "flip-bit-global", "nan-weight", "slow", "kill-in-generation", "kill-in-scoring", "kill-in-update")
_replica: int | None = None
_fired: set[tuple[str, int]] = set()  # each fault fires once per process, even if its step is retried
_nan_device = False  # `nan-device`, once fired, lasts
_grad_level = False  # `grad-level`, once fired, lasts
ON_SIGNAL = -1  # the "step" of a fault armed for SIGUSR1

def set_replica(replica: int | None) -> None:
    global _replica
    _replica = replica


@functools.cache
def _planned(spec: str) -> frozenset[tuple[str, int, int | None]]:
    planned = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, where = item.partition("@")
        step, _, replica = where.partition(":")
        on_signal = point == "nan-device" and step == "sigusr1"
        if point not in POINTS or not (step.isdigit() or on_signal) or (replica and not replica.isdigit()):
            raise ConfigError(f"{INJECT_ENV}: bad fault {item!r} (expected POINT@STEP or POINT@STEP:REPLICA, "
                              f"POINT one of {', '.join(POINTS)}; or nan-device@sigusr1)")
        planned.add((point, ON_SIGNAL if on_signal else int(step), int(replica) if replica else None))
    return frozenset(planned)


def arm_signal_faults() -> None:
    """Install the SIGUSR1 handler of `nan-device@sigusr1`, if this process has it planned."""
    spec = os.environ.get(INJECT_ENV)
    planned = _planned(spec) if spec else frozenset()
    if ("nan-device", ON_SIGNAL, None) in planned or ("nan-device", ON_SIGNAL, _replica) in planned:
        def start_nan(*_: object) -> None:
            global _nan_device
            _nan_device = True

        signal.signal(signal.SIGUSR1, start_nan)


def check_spec() -> None:
    """Reject a malformed STALWART_INJECT before anything starts."""
    _planned(os.environ.get(INJECT_ENV, ""))


def inject(point: str, step: int) -> bool:
    """Fire the fault planned for (point, step) in this process, if any: the kill points
    SIGKILL the process; the others return True for the caller to corrupt its own state."""
    spec = os.environ.get(INJECT_ENV)
    # A torchrun restart is not the launch the faults were planned for (the supervisor's
    # restarts get none either): a kill would otherwise repeat itself on every attempt.
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    planned = _planned(spec)
    if (point, step, None) not in planned and (_replica is None or (point, step, _replica) not in planned):
        return False
    if (point, step) in _fired:
        return False
    _fired.add((point, step))
    if point.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def corrupt_gradients(step: int, params: list[torch.Tensor], experts: torch.Tensor | None = None) -> None:
    """The gradient faults planned for this step: `nan-grad`, `nan-device`, `spike`,
    `grad-level`, and `nan-expert-grad` on `experts` (a routed-expert weight)."""
    global _nan_device, _grad_level
    _nan_device = inject("nan-device", step) or _nan_device
    _grad_level = inject("grad-level", step) or _grad_level
    if _grad_level:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(10.0)
    if inject("nan-grad", step) or _nan_device:
        params[0].grad.fill_(float("nan"))
    if inject("nan-expert-grad", step) and experts is not None and experts.grad is not None:
        _own(experts.grad).fill_(float("nan"))  # split: this rank's part
    if inject("spike", step):
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1000.0)


def corrupt_global(step: int, global_params: list[torch.Tensor]) -> None:
    """`flip-bit-global`: the flip of `flip-bit` in DiLoCo's global weights."""
    with torch.no_grad():
        if inject("flip-bit-global", step):
            bits = global_params[0].data.view(-1)[:1].view(torch.int32)
            bits ^= 1 << 22


def corrupt_weights(step: int, params: list[torch.Tensor]) -> None:
    """`flip-bit`: flip the highest mantissa bit of one fp32 weight (silent corruption);
    `nan-weight`: set one weight of the first decoder layer (params[1]) to NaN. Sharded,
    in this rank's own shard (one whose shard is empty has nothing to corrupt)."""
    with torch.no_grad():
        if inject("flip-bit", step):
            own = _own(params[0]).view(-1)
            if own.numel():
                own[:1].view(torch.int32).bitwise_xor_(1 << 22)
        if inject("nan-weight", step):
            own = _own(params[1]).view(-1)
            if own.numel():
                own[0] = float("nan")


def _own(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of `t`: its shard when `t` is sharded (a view), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t.data
