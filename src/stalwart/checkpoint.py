"""Atomic, checksummed checkpoints: a resumed run starts from the newest checkpoint that is
whole, never from a half-written or corrupted one.

    ROOT/step-000020/model.safetensors   model state dict (plain tensors)
                    /train_state.pt      optimizer, scheduler, loader and RNG state
                    /<extra files>       e.g. config.json, tokenizer.json
                    /MANIFEST.json       {"format": 1, "step": 20, "files": {name: {"sha256", "bytes"}}}

A sharded run (FSDP2, expert parallelism) writes no model.safetensors: every rank writes
its own shards of the weights and AdamW's moments with torch.distributed.checkpoint (DCP)
into safetensors files (`shard-NNNNN-model-00001-of-00001.safetensors`, torch's
HuggingFaceStorageWriter: each tensor's offsets in the file's header, no pickle and no
`.metadata` file), and rank 0 writes train_state.pt (the rest, moments left out) and the
manifest over every file ("sharded": true). Loading (`read_sharded`) reads into tensors of
any layout, plain or sharded: DCP's planner gives each rank the chunks that overlap its own
shards, so a checkpoint written on one layout resumes on another.

A checkpoint is built in a temporary sibling folder whose name starts with "." (so it is
never listed as a checkpoint), fsynced, and renamed into place; MANIFEST.json is written
last, so a folder without one was interrupted. Loading verifies every file's size and
SHA-256 first and falls back to the previous checkpoint when one is bad.

Assumptions:
- One writer per ROOT at a time (one process, or rank 0 of the lowest healthy replica
  group); readers may run at any time. A partial folder is named after its writer (host
  and pid), and `remove_partial(dead_writers_only=True)` leaves those of live writers (and
  of other hosts) alone, so a new writer never deletes a save in flight.
- ROOT is on a POSIX filesystem where rename is atomic and fsync is honoured; for a
  sharded checkpoint of several nodes, one they all see. Rank 0 reads every rank's file
  once to checksum it.
- The state fits in host memory twice (a sharded checkpoint: each rank's shards). Both
  files are serialized in memory and written
  from Python, because safetensors' and torch.save's native writers report a full disk
  as a generic SafetensorError / RuntimeError; written from Python it is an OSError
  (ENOSPC) that we can turn into a clear message, leaving the old checkpoints the newest.
- model_state holds no tensors sharing storage (safetensors refuses them): tied weights
  are saved once by the caller.
- train_state holds only tensors, bool, int, float, str, None, lists, tuples and dicts;
  it is loaded with `torch.load(weights_only=True)` and never unpickles anything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from stalwart import faults
from stalwart.errors import ModelFileError, UserError
from stalwart.fsutil import atomic_directory, atomic_write_bytes, atomic_write_json, writer_alive, writer_tag

FORMAT = 1
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
MANIFEST_FILE = "MANIFEST.json"
REQUIRED_FILES = (MODEL_FILE, TRAIN_STATE_FILE)
SHARD_FILE = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")  # DCP's HuggingFaceStorageWriter
_STEP_DIR = re.compile(r"step-(\d{6})")
# Temporary build folders (`.step-N.HOST-PID.XXXX.tmp`), a replaced one (`.step-N.old-HOST-PID`)
# and one being pruned (`.step-N.prune-HOST-PID`): all left over only when a process died
# mid-operation (or still being written by a live one).
_PARTIAL_DIR = re.compile(r"\.step-\d{6}\..*")
_PARTIAL_WRITER = re.compile(r"\.step-\d{6}\.(?:old-|prune-)?([A-Za-z0-9]+-\d+)(?:\..*)?")
_CHUNK = 1 << 20  # 1 MiB: hashing a multi-GB file in bounded memory


class CheckpointError(ModelFileError):
    """A checkpoint folder is incomplete or corrupt."""


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor] | None  # None: sharded, read with `read_sharded`
    train_state: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.model_state is None


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict, *,
                    keep: int, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ROOT/step-NNNNNN atomically (replacing one of the same step), then keep only the
    newest `keep` checkpoints (never the one just written, even after a rollback to an older
    step). A failed write (e.g. disk full) leaves no trace and raises UserError; the previous
    checkpoints stay the newest."""
    root = Path(root)
    if not 0 <= step <= 999_999:
        raise ValueError(f"checkpoint step {step} outside 0..999999")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not _is_plain_name(name) or name in (*REQUIRED_FILES, MANIFEST_FILE):
            raise ValueError(f"extra checkpoint file name {name!r} is reserved or not a plain file name")
    _check_train_state(train_state, "train_state")

    # Serialize before touching the disk, so that a bad state never creates a folder.
    files: dict[str, bytes | memoryview] = {MODEL_FILE: _serialize_model(model_state)}
    buffer = io.BytesIO()
    torch.save(train_state, buffer)
    files[TRAIN_STATE_FILE] = buffer.getbuffer()  # a view, not a second copy
    files.update(extra_files)

    target = root / step_dir_name(step)
    try:
        with atomic_directory(target, replace=True) as tmp:
            for name, data in files.items():
                atomic_write_bytes(tmp / name, data)
            faults.inject("kill-in-checkpoint", step)
            manifest = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                        for name, data in files.items()}
            atomic_write_json(tmp / MANIFEST_FILE, {"format": FORMAT, "step": step, "files": manifest})
    except OSError as e:
        raise UserError(f"checkpoint {target.name} not written: {e.strerror or e} ({root})") from e
    _prune(root, keep, protect=target)
    return target


def save_sharded(root: Path, step: int, tensors: dict[str, torch.Tensor], train_state: dict | None, *, keep: int,
                 rank: int, share: Callable[[str], str]) -> Path | None:
    """Write ROOT/step-NNNNNN as a sharded checkpoint: a collective of every rank, each
    passing its `tensors` (DTensors are written by the ranks that hold their shards, plain
    tensors once); rank 0 passes `train_state` and writes it, checksums every file and
    renames the folder into place, as `save_checkpoint` does. `share(text)` gives rank 0's
    text on every rank (the temporary folder's name). Returns the folder on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = Path(root)
    target = root / step_dir_name(step)
    if rank != 0:
        folder = share("")
        if not folder:
            raise UserError(f"checkpoint {target.name} not written: rank 0 could not make its folder ({root})")
        _write_shards(dcp, HuggingFaceStorageWriter, tensors, Path(folder), target)
        return None
    shared = False
    try:
        _check_train_state(train_state, "train_state")
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        with atomic_directory(target, replace=True) as tmp:
            share(str(tmp))
            shared = True
            _write_shards(dcp, HuggingFaceStorageWriter, tensors, tmp, target)
            atomic_write_bytes(tmp / TRAIN_STATE_FILE, buffer.getbuffer())
            faults.inject("kill-in-checkpoint", step)
            manifest = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
            atomic_write_json(tmp / MANIFEST_FILE, {"format": FORMAT, "step": step, "sharded": True, "files": manifest})
    except OSError as e:
        raise UserError(f"checkpoint {target.name} not written: {e.strerror or e} ({root})") from e
    finally:
        if not shared:  # the other ranks wait for the folder's name: tell them there is none
            share("")
    _prune(root, keep, protect=target)
    return target


def _write_shards(dcp: Any, writer: Any, tensors: dict[str, torch.Tensor], folder: Path, target: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(tensors, storage_writer=writer(str(folder), save_distributed=True))
    except (Exception, CheckpointException) as e:  # every rank's failure (a full disk on any of them) in one
        raise UserError(f"checkpoint {target.name} not written: {_dcp_failure(e)} ({target.parent})") from None


def _dcp_failure(e: BaseException) -> str:
    """What went wrong, in one line: DCP's CheckpointException holds each rank's exception."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (error, _) = next(iter(sorted(failures.items())))
        return f"rank {rank}: {_one_line(error)}"
    return _one_line(e)


def read_sharded(path: Path, targets: dict[str, torch.Tensor], *, collective: bool) -> None:
    """Fill `targets` in place from the sharded checkpoint at `path` (verified already):
    plain tensors whole, DTensors with this rank's shards. `collective`: every rank of the
    launch calls it (the targets are sharded over them); else this process reads alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # alone on purpose: not a warning for the user
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not collective)
    except (Exception, CheckpointException) as e:  # checksummed: it does not match, it is not damaged
        raise CheckpointError(f"checkpoint {path} does not match the run's state: {_dcp_failure(e)}") from None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ROOT, newest step first (whole or not: see verify_checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)  # zero-padded: name order is step order


def verify_checkpoint(path: Path) -> int:
    """Check the manifest and every file's size and SHA-256; return the step."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a folder")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} missing (write interrupted?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} unreadable: {_one_line(e)}") from None
    if not isinstance(manifest, dict):
        manifest = {}
    files, step = manifest.get("files"), manifest.get("step")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or type(step) is not int:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} is not a format-{FORMAT} manifest")
    named = _STEP_DIR.fullmatch(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} says step {step}, folder says {path.name}")
    sharded = manifest.get("sharded") is True
    for name in (TRAIN_STATE_FILE,) if sharded else REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {name} not listed in {MANIFEST_FILE}")
    if sharded and not any(SHARD_FILE.fullmatch(name) for name in files):
        raise CheckpointError(f"checkpoint {path}: no shard files listed in {MANIFEST_FILE}")
    for name, entry in files.items():
        if not (_is_plain_name(name) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and type(entry.get("bytes")) is int):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} has a bad entry for {name!r}")
        _verify_file(path, name, entry["bytes"], entry["sha256"])
    return step


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify, then load onto the CPU (a sharded checkpoint: its train state; its tensors
    are read into the caller's own with `read_sharded`). Train state is loaded with
    weights_only=True."""
    path = Path(path)
    step = verify_checkpoint(path)
    model_state = None
    if (path / MODEL_FILE).exists():
        try:
            model_state = safetensors.torch.load_file(path / MODEL_FILE, device="cpu")
        except Exception as e:  # checksummed, so a failure means it was written wrong, not damaged
            raise CheckpointError(f"checkpoint {path}: {MODEL_FILE} unreadable: {_one_line(e)}") from None
    try:
        train_state = torch.load(path / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # includes UnpicklingError for anything but plain data
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE_FILE} not loadable as plain data: "
                              f"{_one_line(e)}") from None
    if not isinstance(train_state, dict):
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE_FILE} holds a {type(train_state).__name__}, "
                              "not a dict")
    return LoadedCheckpoint(path=path, step=step, model_state=model_state, train_state=train_state)


def load_latest(root: Path, on_corrupt: Callable[[Path, str], None] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies and loads; each bad one on the way is reported to
    `on_corrupt(path, message)` and skipped. None when there is none (or ROOT is missing)."""
    for path in list_checkpoints(root):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            if on_corrupt is not None:
                on_corrupt(path, str(e))
    return None


def remove_partial(root: Path, *, dead_writers_only: bool = False) -> list[Path]:
    """Delete folders left by a save or prune that was killed midway; return them. With
    `dead_writers_only`, a folder whose writer still runs (or ran on another host) stays."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if _PARTIAL_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            if dead_writers_only:
                owner = _PARTIAL_WRITER.fullmatch(p.name)
                if owner is None or writer_alive(owner.group(1)) is not False:
                    continue
            # A kill between the two renames of a same-step replace leaves the old, complete
            # checkpoint as `.step-N.old-PID` and no `step-N`: put it back rather than lose it.
            original = root / p.name[1:].split(".")[0]
            if ".old-" in p.name and not original.exists():
                os.replace(p, original)
                continue
            shutil.rmtree(p)
            removed.append(p)
    return removed


def _serialize_model(model_state: dict[str, torch.Tensor]) -> bytes:
    tensors = {}
    for name, t in model_state.items():
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a plain tensor")
        tensors[name] = t.detach().cpu().contiguous()
    return safetensors.torch.save(tensors)


def _check_train_state(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, for anything weights_only=True would refuse at resume."""
    # Exact types: a numpy float is a float subclass, but weights_only refuses to unpickle it.
    if obj is None or type(obj) in (bool, int, float, str, torch.Tensor, torch.nn.Parameter):
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            _check_train_state(item, f"{where}[{i}]")
    elif type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int")
            _check_train_state(value, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__name__}; train state holds only tensors, numbers, "
                        "strings, None, lists, tuples and dicts")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_file(folder: Path, name: str, size: int, sha256: str) -> None:
    file = folder / name
    try:
        actual_size = file.stat().st_size
        if actual_size != size:
            raise CheckpointError(f"checkpoint {folder}: {name} has {actual_size} bytes, manifest says {size}")
        actual = _sha256(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder}: {name} missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {folder}: {name} unreadable: {e.strerror or e}") from None
    if actual != sha256:
        raise CheckpointError(f"checkpoint {folder}: {name} SHA-256 mismatch (manifest {sha256[:12]}…, "
                              f"file {actual[:12]}…)")


def _prune(root: Path, keep: int, protect: Path) -> None:
    # Rename before deleting: a prune killed midway leaves a dot-folder for remove_partial,
    # never a half-deleted step-N that looks like a checkpoint.
    for old in [p for p in list_checkpoints(root) if p != protect][keep - 1:]:
        doomed = old.with_name(f".{old.name}.prune-{writer_tag()}")
        if doomed.exists():  # left by an earlier prune that was killed
            shutil.rmtree(doomed)
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def _is_plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torch's weights_only refusal opens with advice to load unsafely; the reason is further down.
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return lines[0] if lines else type(e).__name__
