"""Atomic file and directory writes: a reader sees the old content or the new, never half.

Files: write a temporary sibling, fsync it, rename over the target, fsync the folder.
Folders: build a temporary sibling folder, fsync everything, rename it into place. The
temporary names carry their writer (`writer_tag`: host and pid), so that a cleaner can tell
a folder left by a dead writer from one that a live writer is still filling.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stalwart.errors import UserError


def writer_tag() -> str:
    """HOST-PID of this process, safe in a file name."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{os.getpid()}"


def writer_alive(tag: str) -> bool | None:
    """Whether the writer named by a `writer_tag` still runs; None when it ran on another
    host (nobody here can tell)."""
    host, _, pid = tag.rpartition("-")
    if host != writer_tag().rpartition("-")[0] or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the result is an ordinary file, readable as the umask allows.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target` in one rename.

    An existing non-empty `target` is an error unless `replace`; then the old folder is
    removed only after the new one is in place. On any failure the temporary folder is
    deleted and `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not replace:
        raise UserError(f"{target} already exists and is not empty (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{writer_tag()}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{writer_tag()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
