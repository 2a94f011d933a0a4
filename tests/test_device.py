"""The device module on the machine the tests run on: real torch, no mocks."""

import json
import random

import pytest
import torch

from stalwart.device import (
    DEVICE_ENV,
    autocast_dtype,
    enable_determinism,
    memory_stats,
    resolve_device,
    seed_everything,
    synchronize,
)
from stalwart.doctor import doctor_report, print_doctor
from stalwart.errors import ConfigError


@pytest.fixture
def no_device_env(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)


def test_cpu_resolves_to_gloo_with_fp32_and_no_autocast(no_device_env):
    info = resolve_device("cpu")
    assert info.kind == "cpu"
    assert info.device == torch.device("cpu")
    assert info.backend == "gloo"
    assert "fp32" in info.dtypes
    assert info.count == 1 and info.name
    assert autocast_dtype(info) is None  # CPU trains in fp32


def test_auto_detect_returns_an_available_device(no_device_env):
    info = resolve_device()
    assert info.kind in ("npu", "cuda", "xpu", "mps", "cpu")
    torch.ones(2, device=info.device)  # the chosen device actually takes tensors
    if not torch.cuda.is_available():
        assert info.kind == "cpu"


def test_env_var_selects_device_and_explicit_argument_beats_it(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device().kind == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "tpu9")
    assert resolve_device("cpu").kind == "cpu"  # the bad env value is never read
    with pytest.raises(ConfigError, match="tpu9"):
        resolve_device()


def test_unknown_device_kind_is_a_config_error_naming_it(no_device_env):
    with pytest.raises(ConfigError, match="tpu9"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match="cuda:x"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_a_config_error_listing_what_exists(no_device_env):
    with pytest.raises(ConfigError, match=r"'cuda'.*not available.*found: .*cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_out_of_range_index_is_a_config_error(no_device_env):
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"cuda:{count}"):
        resolve_device(f"cuda:{count}")


def test_seed_everything_repeats_torch_and_python_random(no_device_env):
    seed_everything(1234)
    first = (torch.randn(8), random.random())
    seed_everything(1234)
    second = (torch.randn(8), random.random())
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]


def test_synchronize_memory_stats_and_determinism_run_on_resolved_device(no_device_env):
    info = resolve_device()
    synchronize(info)
    stats = memory_stats(info)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
    if info.kind == "cpu":
        assert stats["max_rss_bytes"] > 0
    was = torch.are_deterministic_algorithms_enabled()
    try:
        enable_determinism(info)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)  # do not leak into other tests


def test_doctor_report_has_every_key_and_the_running_torch_version(no_device_env):
    report = doctor_report(resolve_device("cpu"))
    expected = {
        "device", "kind", "name", "count", "backend", "dtypes",
        "torch", "torchft", "transformers", "python", "platform",
    }
    assert set(report) == expected
    assert report["torch"] == torch.__version__
    assert report["kind"] == "cpu" and report["backend"] == "gloo"


def test_print_doctor_json_output_parses_back_to_the_report(no_device_env, capsys):
    report = doctor_report(resolve_device("cpu"))
    print_doctor(report, as_json=True)
    assert json.loads(capsys.readouterr().out) == report


def test_print_doctor_table_shows_each_check(no_device_env, capsys):
    report = doctor_report(resolve_device("cpu"))
    print_doctor(report, as_json=False)
    out = capsys.readouterr().out
    for key in report:
        assert key in out
