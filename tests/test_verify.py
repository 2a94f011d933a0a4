"""`stalwart verify` on the CPU: every check passes on a healthy backend, and a backend
with one wrong kernel (perturbed for some shapes only) is caught at exactly that op."""

import functools
import json
import subprocess
import sys

import pytest
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stalwart import cli
from stalwart.device import resolve_device
from stalwart.verify import run as verify_run
from stalwart.verify.run import verify


class SoftmaxWrongForSize1(TorchFunctionMode):
    """A buggy kernel: softmax over a last dimension of size 1 returns 0.9 instead of 1."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.softmax and args[0].shape[-1] == 1:
            out = out * 0.9
        return out


class MatmulWrongWhenNonContiguous(TorchFunctionMode):
    """A buggy kernel: linear reads a transposed input as if it were contiguous."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and not args[0].is_contiguous():
            args = (args[0].contiguous().view(args[0].shape) * 1.01, *args[1:])
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cpu():
    return resolve_device("cpu")


def failed(checks):
    return sorted({c.name.split(":")[0] for c in checks if not c.passed})


def test_every_check_passes_on_the_cpu_in_fp32(cpu):
    checks = verify(cpu, "fp32", "tiny", steps=5, collective=False)
    assert failed(checks) == []
    kinds = {c.kind for c in checks}
    assert kinds == {"op", "layer", "curve"}
    names = " ".join(c.name for c in checks)
    for op in ("linear", "softmax", "rms_norm", "rope", "silu", "sigmoid+topk routing", "index_add", "cross_entropy",
               "scaled_dot_product_attention", "adamw", "self_attn", "mlp", "training curve"):
        assert op in names, op


@pytest.mark.parametrize("mode, culprit", [(SoftmaxWrongForSize1, "softmax [size-1 dims]"),
                                           (MatmulWrongWhenNonContiguous, "linear [non-contiguous]")])
def test_a_kernel_wrong_for_some_shapes_is_named_and_nothing_else(cpu, mode, culprit):
    checks = verify(cpu, "fp32", "tiny", steps=3, collective=False, backend_mode=mode())
    assert failed(checks) == [culprit]


def test_cli_reports_json_and_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stalwart", "verify", "--device", "cpu", "--steps", "3", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["dtype"] == "fp32"
    assert any(c["kind"] == "collective" and c["passed"] for c in report["checks"])  # gloo, 2 processes
    for c in report["checks"]:
        assert {"name", "passed", "max_abs", "max_rel", "cosine"} <= set(c)


def test_bf16_on_the_cpu_passes_with_bf16_tolerances(cpu):
    if "bf16" not in cpu.dtypes:
        pytest.skip("this CPU does not compute bf16")
    assert failed(verify(cpu, "bf16", "tiny", steps=3, collective=False)) == []


def test_export_is_compared_with_the_cpu(tmp_path):
    out = tmp_path / "export"
    assert subprocess.run([sys.executable, "-m", "stalwart", "export", "tiny", str(out)], capture_output=True,
                          timeout=120).returncode == 0
    r = subprocess.run([sys.executable, "-m", "stalwart", "verify", "--export", str(out), "--device", "cpu",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)["checks"]
    assert {c["kind"] for c in checks} == {"export"} and all(c["passed"] for c in checks)


@pytest.mark.parametrize("argv, message", [(["--dtype", "fp8"], "invalid choice"),
                                           (["--steps", "-1"], "--steps must be >= 0"),
                                           (["--export", "/nonexistent"], "not a model folder"),
                                           (["--model", "nope"], "neither a model folder nor a preset")])
def test_bad_verify_input_is_one_line_and_exit_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "stalwart", "verify", *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr



def test_cli_exits_1_and_names_the_failing_op(monkeypatch, capsys):
    # The real suite, with the planted bug on its device side.
    monkeypatch.setattr(verify_run, "verify", functools.partial(verify, backend_mode=SoftmaxWrongForSize1()))
    code = cli.main(["verify", "--device", "cpu", "--steps", "2", "--no-collective"])
    out = capsys.readouterr().out
    assert code == 1
    assert "checks FAILED: softmax [size-1 dims]" in out.replace("\n", " ")
