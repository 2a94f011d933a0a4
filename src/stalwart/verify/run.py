"""Run the verify suite and report it."""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from stalwart.device import DeviceInfo
from stalwart.errors import ConfigError
from stalwart.verify.compare import DTYPES, Check, compare
from stalwart.verify.model_checks import all_reduce_check, layer_checks, loss_curve_check

# The whole exported model against fp32 on the CPU, routing not replayed (a near-tie may pick
# another expert in a low-precision dtype). Healthy CPU: fp32 logits equal; bf16 and fp16
# within 0.11x and 0.18x of this bound.
EXPORT_SLACK = 8.0
from stalwart.verify.ops import adamw_check, op_cases, run_op_case


def verify(info: DeviceInfo, dtype: str, model_spec: str = "tiny", steps: int = 10, collective: bool = True,
           backend_mode: contextlib.AbstractContextManager | None = None) -> list[Check]:
    """Every check on `info.device` in `dtype`. `backend_mode` (tests) wraps only the device
    side's computations, as a buggy backend would: e.g. a TorchFunctionMode that perturbs
    one op for some shapes. The float64 references never run under it."""
    from stalwart.data.loader import PackedLoader, TaskDocuments
    from stalwart.data.tokenizer import default_corpus, train_tokenizer
    from stalwart.model_source import open_model

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype not in info.dtypes:
        raise ConfigError(f"{info.device} does not compute {dtype} (it has {', '.join(info.dtypes)})")
    device = info.device
    checks: list[Check] = []
    torch.manual_seed(0)
    model, tokenizer = open_model(model_spec)
    model = model.float()
    tokenizer = tokenizer or train_tokenizer(default_corpus(), model.cfg.vocab_size)
    for case in op_cases():
        checks += run_op_case(case, device, dtype, device_mode=backend_mode)
    checks += adamw_check(device, device_mode=backend_mode)
    if collective:
        world = 2 if info.kind == "cpu" else min(2, info.count)
        checks.append(all_reduce_check(info.backend, device, dtype, world))
    loader = PackedLoader(TaskDocuments("addition", "train", 0, 3, 3), tokenizer, seq_len=64, batch_size=4)
    batches = [loader.next_batch() for _ in range(max(steps, 1))]
    checks += layer_checks(model, batches[0], device, dtype, device_mode=backend_mode)
    if steps:
        checks.append(loss_curve_check(model, batches[:steps], device, dtype, device_mode=backend_mode)[0])
    return checks


def verify_export(folder: Path, info: DeviceInfo, dtype: str, prompts: list[str] | None = None,
                  max_new_tokens: int = 24) -> list[Check]:
    """An exported Hugging Face folder on the device in `dtype` against fp32 on the CPU:
    logits on the prompts, and greedy generations token by token. Both sides start from the
    folder's weights (a bf16 export's upcast exactly), so fp32 on the device must match."""
    from stalwart.data.tokenizer import decode, encode
    from stalwart.export.hf import load_hf_folder
    from stalwart.sampling import generate

    reference, tokenizer = load_hf_folder(folder)
    reference = reference.float().eval()
    on_device = copy.deepcopy(reference).to(info.device, DTYPES[dtype]).eval()
    prompts = prompts or ["123+456=", "907+88=", "5+5=", "Hello"]
    checks = []
    ids = [encode(tokenizer, p) for p in prompts]
    with torch.no_grad():
        for p, x in zip(prompts, ids):
            t = torch.tensor([x])
            got = on_device(t.to(info.device)).logits
            want = reference(t).logits
            checks.append(compare(f"export logits [{p!r}]", "export", got, want.double(), dtype, EXPORT_SLACK))
    got = [generate(on_device, [x], max_new_tokens=max_new_tokens)[0] for x in ids]
    want = [generate(reference, [x], max_new_tokens=max_new_tokens)[0] for x in ids]
    for p, a, b in zip(prompts, got, want):
        same = sum(x == y for x, y in zip(a, b)) / max(len(b), 1)
        c = Check(f"export greedy generation [{p!r}]", "export", a == b or dtype != "fp32", max_abs=None,
                  notes=[] if a == b else [f"{same:.0%} of tokens equal: {decode(tokenizer, a)!r} vs "
                                           f"{decode(tokenizer, b)!r}"])
        checks.append(c)
    return checks


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
