"""The `stalwart` command as a user runs it: real processes, real files, exit codes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jobs import in_process


def stalwart(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stalwart", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_doctor_json_reports_device_backend_and_versions():
    r = stalwart("doctor", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["kind"] == "cpu" and report["backend"] == "gloo"
    assert report["torchft"] == "0.2.0" and "fp32" in report["dtypes"]


def test_doctor_table_names_each_check():
    r = stalwart("doctor")
    assert r.returncode == 0, r.stderr
    for word in ("device", "backend", "dtypes", "torch", "torchft"):
        assert word in r.stdout


def test_model_info_reports_deepseek_v3_at_671b_total_37b_activated():
    r = stalwart("model-info", "deepseek-v3", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert round(info["total"] / 1e9) == 671 and round(info["activated"] / 1e9) in (37, 38)


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """One `stalwart export tiny` folder; a test that changes it works on its own copy."""
    folder = tmp_path_factory.mktemp("exported") / "m"
    r = stalwart("export", "tiny", str(folder))
    assert r.returncode == 0, r.stderr
    return folder


def test_export_then_generate_from_the_folder(exported_tiny, tmp_path):
    assert json.loads((exported_tiny / "config.json").read_text())["model_type"] == "deepseek_v3"
    written = json.loads(in_process("export", "tiny", str(tmp_path / "bf16"), "--dtype", "bf16", "--json").stdout)
    assert written["dtype"] == "bfloat16" and "model.safetensors" in written["files"] and written["bytes"] > 0
    r = stalwart("generate", str(exported_tiny), "--prompt", "12+34=", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("12+34=")
    assert "tokens/s" in r.stderr
    sampled = [stalwart("generate", str(exported_tiny), "--prompt", "a", "--temperature", "1",
                        "--seed", "9", "--max-new-tokens", "12").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["export", "giant", "OUT"], "neither a model folder nor a preset"),
    (["model-info", "giant"], "unknown preset 'giant'"),
    (["export", "deepseek-v3", "OUT"], "too large"),
    (["doctor", "--device", "tpu"], "unknown device 'tpu'"),
    (["generate", "missing-folder", "--prompt", "x"], "neither a model folder"),
    (["generate", "tiny", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "tiny", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["export", "tiny", "OUT", "--dtype", "fp8"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(in_process(*args))
    assert words in line
    assert not (tmp_path / "OUT").exists()


def test_corrupt_model_folder_is_one_clear_line(exported_tiny, tmp_path):
    shutil.copytree(exported_tiny, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_line_error(stalwart("generate", str(tmp_path / "m"), "--prompt", "x"))
    assert "model.safetensors is corrupt or truncated" in line


def test_export_refuses_to_overwrite_without_force(tmp_path):
    assert stalwart("export", "tiny", str(tmp_path / "m"), "--seed", "1").returncode == 0
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert "--force" in one_line_error(stalwart("export", "tiny", str(tmp_path / "m"), "--seed", "2"))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert stalwart("export", "tiny", str(tmp_path / "m"), "--seed", "2", "--force").returncode == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or old folder left behind


@pytest.mark.parametrize("change, words", [
    ({"n_group": 3}, "n_routed_experts (8) must be divisible by model.n_group (3)"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim must be even"),
    ({"num_experts_per_tok": 20}, "num_experts_per_tok"),
    ({"hidden_size": "wide"}, "hidden_size must be an integer"),
])
def test_inconsistent_model_config_is_one_clear_line(change, words, exported_tiny, tmp_path):
    shutil.copytree(exported_tiny, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    for args in (["generate", str(tmp_path / "m"), "--prompt", "x"], ["model-info", str(tmp_path / "m")]):
        assert words in one_line_error(in_process(*args))


def test_a_folder_of_another_architecture_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                                 "architectures": ["LlamaForCausalLM"]}))
    for args in (["generate", "llama", "--prompt", "x"], ["model-info", "llama"], ["verify", "--export", "llama"],
                 ["export", "llama", "OUT"]):
        assert "model_type 'llama', expected 'deepseek_v3'" in one_line_error(in_process(*args)), args
    assert not (tmp_path / "OUT").exists()
