"""Checkpoints are atomic and checksummed: a killed or failed write, a flipped byte, a
truncated or missing file never becomes the checkpoint a run resumes from, and nothing but
plain data is ever unpickled. Real files throughout; disk full is a real small tmpfs."""

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stalwart.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_partial,
    save_checkpoint,
    verify_checkpoint,
)
from stalwart.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


def model_state(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(n, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g, dtype=torch.float64),
        "head.weight": torch.randn(8, n, generator=g).to(torch.bfloat16).t(),  # non-contiguous view
        "mask": torch.tensor([True, False, True]),
    }


def train_state(step: int = 0) -> dict:
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "step": step,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None}]},
        "loader": {"position": 17, "carry_ids": torch.arange(5)},
        "rng": {"torch": torch.get_rng_state(), "python": [py_version, list(py_internal), py_gauss]},
        "run": "demo",
    }


def assert_same(a, b):
    """Equal structure and values; tensors bit-equal with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def rewrite_manifest_entry(ckpt: Path, name: str) -> None:
    """Make the manifest agree with the file as it now is, so only a later check can catch it."""
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def test_round_trip_is_bit_exact_and_lists_every_file_in_the_manifest(tmp_path):
    state, tstate = model_state(), train_state(step=10)
    extra = {"config.json": b'{"hidden_size": 8}\n', "tokenizer.json": b"{}"}
    path = save_checkpoint(tmp_path, 10, state, tstate, keep=3, extra_files=extra)

    assert path == tmp_path / "step-000010"
    assert verify_checkpoint(path) == 10
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 10
    assert set(manifest["files"]) == {"model.safetensors", "train_state.pt", "config.json", "tokenizer.json"}
    for name, data in extra.items():
        assert (path / name).read_bytes() == data
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    loaded = load_checkpoint(path)
    assert loaded.step == 10 and loaded.path == path
    assert_same({k: v.contiguous() for k, v in state.items()}, loaded.model_state)
    assert_same(tstate, loaded.train_state)
    # The restored RNG states reproduce the same random numbers.
    torch.set_rng_state(loaded.train_state["rng"]["torch"])
    version, internal, gauss = loaded.train_state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    expect_torch, expect_py = torch.rand(3), random.random()
    torch.set_rng_state(tstate["rng"]["torch"])
    random.setstate((tstate["rng"]["python"][0], tuple(tstate["rng"]["python"][1]), tstate["rng"]["python"][2]))
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py


def test_keep_prunes_to_the_newest_and_saving_a_step_again_replaces_it(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model_state(step), train_state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000003"]

    # A resumed run re-runs step 4 and saves it again: the new content wins, nothing piles up.
    save_checkpoint(tmp_path, 4, model_state(40), train_state(40), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000003"]
    assert load_latest(tmp_path).train_state["step"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]  # no temp folders


def test_list_checkpoints_ignores_anything_but_step_folders(tmp_path):
    save_checkpoint(tmp_path, 12, model_state(), train_state(), keep=5)
    save_checkpoint(tmp_path, 3, model_state(), train_state(), keep=5)
    (tmp_path / "step-12").mkdir()
    (tmp_path / "step-000099").write_text("a file, not a folder")
    (tmp_path / ".step-000050.abc.tmp").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000012", "step-000003"]
    assert list_checkpoints(tmp_path / "missing") == []
    assert load_latest(tmp_path / "missing") is None


def flip_a_byte(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))


def truncate(path: Path) -> None:
    f = path / "train_state.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage, file, what", [
    (flip_a_byte, "model.safetensors", "SHA-256 mismatch"),
    (truncate, "train_state.pt", "bytes, manifest says"),
    (lambda p: (p / "MANIFEST.json").unlink(), "MANIFEST.json", "missing"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "missing"),
    (lambda p: (p / "MANIFEST.json").write_text("{not json"), "MANIFEST.json", "unreadable"),
], ids=["flipped-byte", "truncated", "no-manifest", "deleted-file", "garbled-manifest"])
def test_damaged_checkpoint_is_named_and_load_latest_falls_back_to_the_previous(tmp_path, damage, file, what):
    save_checkpoint(tmp_path, 5, model_state(5), train_state(5), keep=3)
    bad = save_checkpoint(tmp_path, 6, model_state(6), train_state(6), keep=3)
    damage(bad)

    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(bad)
    message = str(err.value)
    assert str(bad) in message and file in message and what in message and "\n" not in message
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)

    reported = []
    loaded = load_latest(tmp_path, on_corrupt=lambda p, m: reported.append((p, m)))
    assert loaded.step == 5 and loaded.train_state["step"] == 5
    assert reported == [(bad, message)]


def test_a_file_left_out_of_the_manifest_is_an_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, model_state(), train_state(), keep=1)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    del manifest["files"]["train_state.pt"]
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="train_state.pt not listed"):
        verify_checkpoint(path)


def test_no_good_checkpoint_gives_none_after_reporting_each(tmp_path):
    for step in (1, 2):
        (save_checkpoint(tmp_path, step, model_state(), train_state(), keep=2) / "MANIFEST.json").unlink()
    reported = []
    assert load_latest(tmp_path, on_corrupt=lambda p, m: reported.append(p.name)) is None
    assert reported == ["step-000002", "step-000001"]


def test_process_killed_mid_write_leaves_the_previous_checkpoint_newest(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from stalwart.checkpoint import save_checkpoint
        for step in (5, 7):
            save_checkpoint({str(tmp_path)!r}, step, {{"w": torch.full((256,), float(step))}}, {{"step": step}}, keep=3)
        print("survived")
    """)
    env = {**os.environ, "STALWART_INJECT": "kill-in-checkpoint@7",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "survived" not in proc.stdout

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005"]
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".step-000007.")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / "MANIFEST.json").exists()
    with pytest.raises(CheckpointError, match="MANIFEST.json missing"):
        verify_checkpoint(partial[0])

    latest = load_latest(tmp_path)
    assert latest.step == 5 and torch.equal(latest.model_state["w"], torch.full((256,), 5.0))
    assert remove_partial(tmp_path) == partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]
    assert remove_partial(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs, so the kernel itself says ENOSPC."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_raises_a_clear_error_and_keeps_the_previous_checkpoint(small_disk):
    root = small_disk / "checkpoints"
    first = save_checkpoint(root, 10, {"w": torch.ones(256)}, train_state(10), keep=3)

    with pytest.raises(UserError) as err:  # 512 KiB of weights on a 256 KiB disk
        save_checkpoint(root, 20, {"w": torch.ones(128 * 1024)}, train_state(20), keep=3)
    message = str(err.value)
    assert "No space left" in message and "step-000020" in message and str(root) in message
    assert "\n" not in message

    assert sorted(p.name for p in root.iterdir()) == ["step-000010"]  # no temp folder left
    assert list_checkpoints(root) == [first] and verify_checkpoint(first) == 10
    assert load_latest(root).step == 10


class Payload:
    """An arbitrary object: unpickling it must never construct it."""

    constructed = False

    def __reduce__(self):
        return (Payload._construct, ())

    @staticmethod
    def _construct():
        Payload.constructed = True
        return Payload()


def test_train_state_holding_an_arbitrary_object_is_refused_not_unpickled(tmp_path):
    path = save_checkpoint(tmp_path, 3, model_state(), train_state(), keep=2)
    torch.save({"step": 3, "evil": Payload()}, path / "train_state.pt")
    rewrite_manifest_entry(path, "train_state.pt")
    assert verify_checkpoint(path) == 3  # checksums agree: only the unpickling guard stands

    with pytest.raises(CheckpointError, match="train_state.pt not loadable as plain data"):
        load_checkpoint(path)
    assert not Payload.constructed

    # A raw pickle (not torch's zip format) is refused the same way.
    (path / "train_state.pt").write_bytes(pickle.dumps({"evil": Payload()}, protocol=2))
    rewrite_manifest_entry(path, "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(path)
    assert not Payload.constructed


def test_unsupported_state_is_refused_at_save_time_without_writing(tmp_path):
    with pytest.raises(TypeError, match=r"train_state\['evil'\]"):
        save_checkpoint(tmp_path, 1, model_state(), {"evil": Payload()}, keep=1)
    with pytest.raises(TypeError, match="not a plain tensor"):
        save_checkpoint(tmp_path, 1, {"w": [1.0]}, train_state(), keep=1)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, model_state(), train_state(), keep=1, extra_files={"MANIFEST.json": b""})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, model_state(), train_state(), keep=0)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_a_replaced_checkpoint_left_aside_by_a_kill_is_restored_not_deleted(tmp_path):
    root = tmp_path / "ckpt"
    path = save_checkpoint(root, 4, {"w": torch.ones(3)}, {"step": 4}, keep=2)
    aside = root / ".step-000004.old-12345"
    os.replace(path, aside)  # killed after the old folder moved aside, before the new one landed
    assert remove_partial(root) == []
    assert verify_checkpoint(root / "step-000004") == 4 and not aside.exists()


def test_a_sharded_checkpoint_round_trips_is_checksummed_and_refuses_a_state_it_does_not_match(tmp_path):
    # One process writing through torch.distributed.checkpoint (the path every rank of a
    # sharded launch takes; tests/test_torchrun.py runs it on real shards): safetensors
    # files, no pickle, every file in the manifest.
    from stalwart.checkpoint import read_sharded, save_sharded

    state = {k: v.contiguous() for k, v in model_state().items()}
    for step in (10, 20):
        path = save_sharded(tmp_path, step, state, {"step": step, "optimizer": {"state": {}}}, keep=3, rank=0,
                            share=lambda text: text)
    assert path == tmp_path / "step-000020"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["sharded"] is True and not (path / "model.safetensors").exists()
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"MANIFEST.json"}
    assert not [p for p in path.iterdir() if p.suffix not in (".safetensors", ".pt", ".json")]  # no .metadata pickle
    latest = load_latest(tmp_path)
    assert latest.sharded and latest.step == 20 and latest.train_state["step"] == 20
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    read_sharded(latest.path, into, collective=False)
    assert all(torch.equal(into[k], v) for k, v in state.items())
    # A state with a tensor the checkpoint lacks: one line naming the checkpoint.
    with pytest.raises(CheckpointError, match="does not match the run's state"):
        read_sharded(latest.path, {**into, "extra.weight": torch.zeros(2)}, collective=False)
    # A flipped byte in a shard: found by its checksum, and the previous checkpoint is used.
    shard = next(path.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    reported = []
    assert load_latest(tmp_path, on_corrupt=lambda p, msg: reported.append(msg)).step == 10
    assert len(reported) == 1 and "SHA-256 mismatch" in reported[0] and shard.name in reported[0]
