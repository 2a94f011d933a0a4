"""Which accelerator we run on, and everything that depends on it.

This is the only module in stalwart that touches a vendor namespace (`torch.cuda`,
`torch.npu`/`torch_npu`, `torch.xpu`, `torch.mps`, `torch.backends`); a test fails if any
other file does. Everything else asks this module for a `DeviceInfo` and uses the plain
`torch.device` in it, so the training loop runs unchanged on CPU, CUDA, Ascend NPU, XPU
or MPS (docs/design.md, "Layers").

Assumptions:
- One process drives one device. Under `torchrun` (the ranks of one launch, or of one replica group),
  a request without an index picks `LOCAL_RANK`, as torchrun's own examples do.
- Ascend support comes from the optional `torch_npu` package. It is imported lazily and
  only its absence (or a broken native library) is tolerated; it is probed *before*
  CUDA, because `torch_npu.contrib.transfer_to_npu` patches `torch.cuda` so that CUDA
  looks available on an NPU host.
- What a backend claims and what it does can differ (`stalwart verify` exists because of it), so
  dtype support is probed by computing in it, not only read from a flag.
"""

from __future__ import annotations

import functools
import os
import platform
import random
import re
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from stalwart.errors import ConfigError

DEVICE_ENV = "STALWART_DEVICE"

# Auto-detection order; NPU first for the transfer_to_npu reason in the module docstring.
KINDS = ("npu", "cuda", "xpu", "mps", "cpu")

_SPEC = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<index>\d+))?$")


@dataclass(frozen=True)
class DeviceInfo:
    """The resolved device and what it can do."""

    kind: str  # one of KINDS
    device: torch.device  # with an explicit index for accelerators, e.g. cuda:0
    count: int  # devices of this kind visible to the process (1 for cpu)
    name: str  # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    backend: str  # torch.distributed backend for collectives: gloo, nccl, hccl, xccl
    dtypes: tuple[str, ...]  # subset of ("fp32", "bf16", "fp16") that really compute here


@functools.cache
def _torch_npu() -> ModuleType | None:
    """Import torch_npu once if it is installed; it registers `torch.npu` and hccl."""
    try:
        import torch_npu  # noqa: F401  (imported for its side effect of registering "npu")
    except (ImportError, OSError):
        # OSError: the wheel is installed but the CANN driver libraries are not, which is
        # the normal state of a CPU or CUDA box that shares an environment with Ascend ones.
        return None
    return getattr(torch, "npu", None)


def _accelerator_module(kind: str) -> ModuleType | None:
    """`torch.<kind>` for an accelerator kind, or None where this torch build lacks it."""
    if kind == "npu":
        return _torch_npu()
    return getattr(torch, kind, None) if kind in ("cuda", "xpu", "mps") else None


def _count(kind: str) -> int:
    """How many devices of `kind` this process can use (0 if none)."""
    if kind == "cpu":
        return 1
    if kind == "mps":
        # torch.backends.mps is the check that also covers "built without MPS".
        return 1 if torch.backends.mps.is_available() else 0
    module = _accelerator_module(kind)
    if module is None or not module.is_available():
        return 0
    return module.device_count()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux; platform.processor() is the portable, vaguer answer
    return platform.processor() or "cpu"


def _name(kind: str, device: torch.device) -> str:
    if kind == "cpu":
        return _cpu_name()
    if kind == "mps":
        return f"Apple MPS ({platform.machine()})"
    module = _accelerator_module(kind)
    assert module is not None  # _count() already said the kind is present
    return str(module.get_device_name(device.index))


def _collective_backend(kind: str) -> str:
    # torch keeps the device → backend table (cpu→gloo, cuda→nccl, xpu→xccl, and
    # npu→hccl once torch_npu registers it), so we never hard-code vendor backends.
    # gloo is the fallback for kinds absent from the map: it runs anywhere via the CPU.
    if not torch.distributed.is_available():
        return "gloo"
    return torch.distributed.Backend.default_device_backend_map.get(kind, "gloo")


def _computes(device: torch.device, dtype: torch.dtype) -> bool:
    """True if a tiny product-and-sum in `dtype` runs on `device` and gives the right answer.

    Elementwise + reduction, not a matmul: a matmul would initialise cuBLAS now, and torch
    reads CUBLAS_WORKSPACE_CONFIG once at that moment, before enable_determinism can set it.
    """
    try:
        a = torch.full((4, 4), 2.0, dtype=dtype, device=device)
        out = (a * a).sum(dim=0).float().cpu()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    # Every entry is exactly 16 in any float format; anything else is a broken kernel.
    return bool(torch.all(out == 16.0))


def _supported_dtypes(kind: str, device: torch.device) -> tuple[str, ...]:
    dtypes = ["fp32"]
    bf16_ok = _computes(device, torch.bfloat16)
    if kind in ("cuda", "xpu"):
        # Pre-Ampere GPUs run bf16 only by emulation: it "works" but is slower than fp32,
        # so it does not count as supported for choosing an autocast dtype.
        is_bf16_supported = _accelerator_module(kind).is_bf16_supported
        try:
            native = is_bf16_supported(including_emulation=False)
        except TypeError:  # builds whose check predates the emulation flag
            native = is_bf16_supported()
        bf16_ok = bf16_ok and native
    if bf16_ok:
        dtypes.append("bf16")
    if _computes(device, torch.float16):
        dtypes.append("fp16")
    return tuple(dtypes)


def use_device(device: torch.device) -> None:
    """Make `device` the current one of its kind: what torch.distributed and FSDP2 allocate
    on when they are not told (torchrun's ranks each drive cuda:LOCAL_RANK, not cuda:0)."""
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)


def resolve_device(requested: str | None = None) -> DeviceInfo:
    """Pick the device: `requested` (from --device), else $STALWART_DEVICE, else the first
    available of npu, cuda, xpu, mps, cpu.

    Raises ConfigError (one line, naming the device) for an unknown kind, a kind that this
    machine lacks, or an index past the last device.
    """
    where = ""  # an explicit --device needs no provenance; the environment variable does
    if not requested:
        requested, where = os.environ.get(DEVICE_ENV) or None, f" (from {DEVICE_ENV})"
    if not requested:
        kind = next(k for k in KINDS if _count(k) > 0)  # cpu always counts, so one is found
        index = None
    else:
        spec = requested.strip().lower()
        match = _SPEC.match(spec)
        if match is None or match["kind"] not in KINDS:
            raise ConfigError(
                f"unknown device '{requested}'{where}: "
                f"expected one of {', '.join(KINDS)}, optionally with :INDEX"
            )
        kind = match["kind"]
        index = int(match["index"]) if match["index"] is not None else None

    count = _count(kind)
    if count == 0:
        raise ConfigError(
            f"device '{requested}'{where} is not available on this machine "
            f"(found: {', '.join(k for k in KINDS if _count(k) > 0)})"
        )
    if kind == "cpu":
        device = torch.device("cpu")  # one logical CPU device; an index means nothing
    else:
        if index is None:
            # Under torchrun each rank owns the device at its LOCAL_RANK; elsewhere device 0.
            index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= count:
            raise ConfigError(
                f"device '{requested or kind}'{where} is out of range: "
                f"this machine has {count} {kind} device(s), index {index} requested"
            )
        device = torch.device(kind, index)

    return DeviceInfo(
        kind=kind,
        device=device,
        count=count,
        name=_name(kind, device),
        backend=_collective_backend(kind),
        dtypes=_supported_dtypes(kind, device),
    )


def autocast_dtype(info: DeviceInfo) -> torch.dtype | None:
    """The mixed-precision dtype for this device, or None for plain fp32.

    bf16 only: fp16 would need loss scaling, which the loop does not do. CPU trains in
    fp32 because CPU bf16 autocast is slower than fp32 on most cores and changes numerics
    we compare against.
    """
    if info.kind != "cpu" and "bf16" in info.dtypes:
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and every accelerator RNG present, for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes 32-bit seeds
    torch.manual_seed(seed)
    # torch.manual_seed already seeds known accelerators in recent versions; seeding them
    # explicitly keeps that true for out-of-tree backends (torch_npu) and older torch.
    for kind in ("cuda", "npu", "xpu"):
        if _count(kind) > 0:
            _accelerator_module(kind).manual_seed_all(seed)
    if _count("mps") > 0:
        torch.mps.manual_seed(seed)


def rng_state(info: DeviceInfo) -> dict:
    """Every RNG state a training step may draw from, as plain tensors and lists (so that a
    checkpoint holding it loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    module = _accelerator_module(info.kind)
    if module is not None and info.kind != "mps" and _count(info.kind) > 0:
        state["device"] = module.get_rng_state(info.device)
    return state


def set_rng_state(info: DeviceInfo, state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    module = _accelerator_module(info.kind)
    if "device" in state and module is not None and info.kind != "mps":
        module.set_rng_state(state["device"], info.device)


def synchronize(info: DeviceInfo) -> None:
    """Wait for queued kernels on the device; needed before reading a wall clock."""
    if info.kind == "cpu":
        return  # CPU ops are synchronous
    if info.kind == "mps":
        torch.mps.synchronize()
    else:
        _accelerator_module(info.kind).synchronize(info.device)


def memory_stats(info: DeviceInfo) -> dict[str, int]:
    """Memory in bytes: device allocated/reserved/peak where the backend reports it,
    and the process's peak resident set size (host memory) everywhere it can be read."""
    stats: dict[str, int] = {}
    if info.kind == "mps":
        stats["allocated_bytes"] = int(torch.mps.current_allocated_memory())
        stats["reserved_bytes"] = int(torch.mps.driver_allocated_memory())
    elif info.kind != "cpu":
        module = _accelerator_module(info.kind)
        stats["allocated_bytes"] = int(module.memory_allocated(info.device))
        stats["reserved_bytes"] = int(module.memory_reserved(info.device))
        stats["peak_allocated_bytes"] = int(module.max_memory_allocated(info.device))
    try:
        import resource  # POSIX only
    except ImportError:
        return stats
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # getrusage(2): ru_maxrss is in kilobytes on Linux but in bytes on macOS.
    stats["max_rss_bytes"] = int(max_rss if platform.system() == "Darwin" else max_rss * 1024)
    return stats


def enable_determinism(info: DeviceInfo) -> None:
    """Make kernels deterministic (same seed, same config, same loss curve).

    warn_only: an op with no deterministic kernel warns instead of stopping the run.
    Call it right after resolve_device, before any model code: torch reads
    CUBLAS_WORKSPACE_CONFIG at the first matmul, Ascend's HCCL reads HCCL_DETERMINISTIC
    when the process group starts.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    if info.kind == "cuda":
        # ":4096:8" is the value the CUDA docs give for deterministic cuBLAS (CUDA >= 10.2);
        # setdefault keeps a user's explicit choice.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels per run
    elif info.kind == "npu":
        # Deterministic AllReduce/ReduceScatter/Reduce on Ascend (CANN env var reference).
        os.environ.setdefault("HCCL_DETERMINISTIC", "true")
