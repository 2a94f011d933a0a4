"""Live healing over HTTP without pickle, streamed tensor by tensor: torchft's
CheckpointTransport, serving a peer's state (in a sharded group: this rank's shards, to
the same rank of the healing group) in a framed format that holds nothing but JSON and raw
tensor bytes.

torchft's own HTTPTransport and PGTransport run the unrestricted unpickler on what arrives
from the network (torch's loader with weights_only off, and pickle); a replica that anyone
on the network can reach must not run arbitrary code from a request. Nothing here is
unpickled at all: the state is tensors, numbers, strings, lists, tuples and dicts (the
same contract as a checkpoint's train_state).

Body: an 8-byte little-endian header length, the JSON header (`stalwart-heal/1`: the
structure, each tensor as its index; each tensor's dtype and shape), the HMAC of what came
so far, every tensor's bytes in order, and the HMAC of the whole body (the trailer).

Protocol: `send_checkpoint` (called on a healthy replica inside the quorum, when some peer
is behind) stages the state's structure and references to its live tensors, copying
nothing, and serves it at GET /checkpoint/STEP until `disallow_checkpoint` (torchft's
should_commit, and the group before its next quorum). The server writes each tensor from
its own memory in chunks. With a synchronous quorum the live tensors do not change before
the receiver has them: the sender's weights move only after a step whose all-reduce the
receiver takes part in. For whatever else may happen (the step ends without the receiver,
a rollback), the replica counts every change before it makes it (`changes`): a stream
whose count moved while it was written closes without its trailer, so a state that may
have changed under the stream is never accepted, and one that did not change finishes. The receiver's `recv_checkpoint` reads each tensor straight into its own
tensor of the same place, dtype and shape (`targets`: what it would send itself) and
allocates only for those it lacks, so neither side holds a second copy of the state.

Membership: all groups of a job share one secret (`STALWART_JOB_SECRET`, see `job_secret`).
A request carries `Authorization: Stalwart HMAC(secret, "GET " + path)`; without it the
server answers 403 and serves nothing. The body's two MACs are HMAC(secret, path + body so
far): the header is parsed only once its MAC verifies, and a state is used only once the
trailer does, so a peer without the secret can neither pull this replica's state nor push
one into it. The receiver refuses a body whose Content-Length is
missing, above `max_bytes` or not what its header describes, and never reads more.

What reading into its own tensors costs: a stream that breaks or does not verify after the
first tensor was written leaves this replica's state part old, part new (`torn`); the
group then leaves the job and is restarted (replication/group.py), and so reloads its
checkpoint and heals again. A peer without the secret writes nothing: its header does not
verify. One that recorded a member's answer can replay its header for the same step with
other tensor bytes and so force that restart, never its state. This is authentication and
integrity, not confidentiality: the state crosses the network in clear, and someone who
records a request can replay it for the same step while that step is served.

Assumption: the secret reaches every group by a channel the job trusts (the launcher's
environment).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torchft.checkpointing.transport import CheckpointTransport

from stalwart.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_ENV = "STALWART_JOB_SECRET"
MIN_SECRET_BYTES = 16
AUTH_SCHEME = "Stalwart"


class HealRefused(Exception):
    """A heal was refused: the peer is not a member of the job, or its answer is not acceptable."""


def job_secret() -> bytes | None:
    """The job's secret from `STALWART_JOB_SECRET` (hex), or None when the variable is unset.

    A value that is set but empty, not hex, or shorter than 32 hex digits (16 bytes) raises
    ConfigError; the message never repeats the value.
    """
    raw = os.environ.get(SECRET_ENV)
    if raw is None:
        return None
    value = raw.strip()
    if not re.fullmatch(r"[0-9a-fA-F]*", value) or len(value) % 2:
        raise ConfigError(f"{SECRET_ENV} must be an even number of hex digits (make one with new_job_secret())")
    if len(value) < 2 * MIN_SECRET_BYTES:
        raise ConfigError(f"{SECRET_ENV} must be at least {2 * MIN_SECRET_BYTES} hex digits, got {len(value)}")
    return bytes.fromhex(value)


def new_job_secret() -> str:
    """A fresh job secret, as the hex string to put in `STALWART_JOB_SECRET` for every group."""
    return secrets.token_hex(32)


FORMAT = "stalwart-heal/1"
CHUNK_BYTES = 4 << 20  # what one write or read moves (through a bounce buffer for device tensors)
MAX_HEADER_BYTES = 64 << 20
MAC_BYTES = 32
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


class _Staged:
    """A state as it is served: its header and references to its tensors (no copy), and the
    replica's count of changes when it was staged."""

    def __init__(self, step: int, state: Any, changes: int | None, receivers: int = 1) -> None:
        self.step, self.changes = step, changes
        self.unanswered = receivers  # peers that are to fetch it and have not had it whole
        self.tensors: list[torch.Tensor] = []
        tree = _encode(state, self.tensors)
        specs = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in self.tensors]
        self.header = json.dumps({"format": FORMAT, "tree": tree, "tensors": specs}).encode()
        self.length = 8 + len(self.header) + MAC_BYTES + sum(_nbytes(t) for t in self.tensors) + MAC_BYTES


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES.values():
            raise TypeError(f"a heal cannot carry a {value.dtype} tensor")
        tensors.append(value.detach())
        return {"t": len(tensors) - 1}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError("a heal's dict keys are str or int")
        return {"d": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"l" if isinstance(value, list) else "u": [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise TypeError(f"a heal cannot carry a {type(value).__name__}")


def _decode(node: Any, tensors: list[torch.Tensor]) -> Any:
    """The state from a header's tree; anything but the forms `_encode` writes is an error."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("malformed node")
    (kind, body), = node.items()
    if kind == "t" and isinstance(body, int) and not isinstance(body, bool) and 0 <= body < len(tensors):
        return tensors[body]
    if kind == "d" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
        return {k: _decode(v, tensors) for k, v in body}
    if kind in ("l", "u") and isinstance(body, list):
        items = [_decode(v, tensors) for v in body]
        return items if kind == "l" else tuple(items)
    if kind == "v" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"malformed node {kind!r}")


def _paths(value: Any, prefix: tuple = ()) -> dict[tuple, torch.Tensor]:
    """{place in the state: tensor} for every tensor of a state."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    found: dict[tuple, torch.Tensor] = {}
    for k, v in items:
        found.update(_paths(v, (*prefix, k)))
    return found


def _tensor_paths(node: Any, prefix: tuple = ()) -> dict[int, tuple]:
    """{tensor index: place in the state} from a header's tree (already decoded once)."""
    kind, body = next(iter(node.items()))
    if kind == "t":
        return {body: prefix}
    items = body if kind == "d" else enumerate(body) if kind in ("l", "u") else ()
    found: dict[int, tuple] = {}
    for k, v in items:
        found.update(_tensor_paths(v, (*prefix, k)))
    return found


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _byte_chunks(t: torch.Tensor):
    """A tensor's bytes, CHUNK_BYTES at a time, from its own memory on the CPU."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), CHUNK_BYTES):
        part = flat[start:start + CHUNK_BYTES]
        yield memoryview(part.numpy()) if part.device.type == "cpu" else memoryview(part.cpu().numpy())


def _request_mac(secret: bytes, path: str) -> str:
    return hmac.new(secret, b"GET " + path.encode("latin-1"), hashlib.sha256).hexdigest()


def _body_mac(secret: bytes, path: str) -> Any:
    """The running HMAC of a body served at `path`: after the header (checked before the
    header is parsed), and at the end (the trailer, once every byte is in)."""
    return hmac.new(secret, path.encode("latin-1"), hashlib.sha256)


def _same(expected: str, got: str | None) -> bool:
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header is whatever the peer sent.
    return got is not None and hmac.compare_digest(expected.encode(), got.strip().encode("latin-1", "replace"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A heal goes to the address the quorum named, and nowhere else: a 3xx is an error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class SafeHTTPTransport(CheckpointTransport[Any]):
    """Serve this replica's state to healing peers; fetch a peer's state when healing.

    Args:
        host: the address peers use to reach this replica (and the one the server binds):
            127.0.0.1 for groups on one machine; this machine's address across machines.
        timeout: how long one fetch may take before the heal fails (and is retried at the
            next quorum); also how long the server waits on an idle connection.
        secret: the job's secret, the same in every group (at least 16 bytes; `job_secret`).
        max_bytes: the largest state body this replica accepts when it heals.
        targets: this replica's own state in the form it would send (the tensors a heal
            overwrites in place); None, or a callable that returns None: every received
            tensor is allocated.
        changes: a count the replica raises before it changes any served tensor in place
            (None: what it serves is a snapshot). A stream is signed only if the count did not
            move while it was written; a disallowed state is no longer served to new
            requests, but a stream of it already under way finishes.
    """

    def __init__(self, host: str, timeout: timedelta, secret: bytes, max_bytes: int,
                 targets: Callable[[], Any] | None = None, changes: Callable[[], int] | None = None) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self._host = host
        self._timeout = timeout
        self._secret = bytes(secret)
        self._max_bytes = max_bytes
        self._targets = targets
        self._changes = changes
        self._ready = threading.Condition()
        self._served: _Staged | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_in_place = 0  # of those, read straight into this replica's own tensors
        self._streaming = 0  # answers being written now (shutdown waits for them)
        self.refused: HealRefused | None = None  # a peer said this process is not a member (403)
        self.torn = False  # a heal failed after writing into this replica's own tensors
        transport = self

        class Handler(BaseHTTPRequestHandler):
            # A connection that does not send its request in time is dropped, so a stranger
            # cannot hold server threads; cleared below for a member, since a socket timeout
            # also bounds sendall's total time, and a large state may take longer.
            timeout = transport._timeout.total_seconds()

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                # Membership first: a stranger learns nothing and cannot hold a thread in the wait.
                if not _same(_request_mac(transport._secret, self.path), _credential(self.headers)):
                    log.warning("heal server: refused %s from %s: no valid job credential (is %s the same in "
                                "every group?)", self.path[:64], self.client_address[0], SECRET_ENV)
                    self.send_error(403, "not a member of this job")
                    return
                self.connection.settimeout(None)
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or parts[0] != "checkpoint" or not re.fullmatch(r"[0-9]+", parts[1]):
                    self.send_error(404, "expected /checkpoint/STEP")
                    return
                step = int(parts[1])
                # A healing peer may ask before this replica's quorum thread has staged the
                # state: wait for it, as long as a fetch may take.
                with transport._ready:
                    transport._ready.wait_for(lambda: transport._served is not None
                                              and transport._served.step == step,
                                              timeout=transport._timeout.total_seconds())
                    staged = transport._served
                if staged is None or staged.step != step:
                    self.send_error(409, f"not serving step {parts[1]}")
                    return
                with transport._ready:
                    transport._streaming += 1
                whole = False
                try:
                    whole = self._stream(staged, step)
                finally:
                    with transport._ready:
                        transport._streaming -= 1
                        staged.unanswered -= int(whole)
                        transport._ready.notify_all()

            def _stream(self, staged: _Staged, step: int) -> bool:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(staged.length))
                self.end_headers()
                mac = _body_mac(transport._secret, self.path)
                for piece in (len(staged.header).to_bytes(8, "little"), staged.header):
                    self.wfile.write(piece)
                    mac.update(piece)
                header_mac = mac.copy().digest()
                self.wfile.write(header_mac)
                mac.update(header_mac)
                for t in staged.tensors:
                    for chunk in _byte_chunks(t):
                        self.wfile.write(chunk)
                        mac.update(chunk)
                if not transport._unchanged(staged):  # a tensor may have changed under the stream
                    log.warning("heal server: the state of step %d changed while it was sent; closing without "
                                "its signature", step)
                    self.close_connection = True
                    return False
                self.wfile.write(mac.digest())
                transport.bytes_sent += staged.length
                return True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("heal server: " + format, *args)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        # A short poll so that shutdown() returns within 0.1 s rather than 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="heal-server", daemon=True)
        self._thread.start()

    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_address[1]}/checkpoint/"

    def metadata(self) -> str:
        return self.address()

    def _unchanged(self, staged: _Staged) -> bool:
        """Whether no served tensor can have changed since `staged` was staged (read after
        the last byte is written: a change is counted before it is made)."""
        if self._changes is None:
            return True
        return self._changes() == staged.changes

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        staged = _Staged(step, state_dict, None if self._changes is None else self._changes(), len(dst_ranks))
        if staged.length > self._max_bytes:
            # Peers with the same max_bytes will refuse it; say so here, where the cause is visible.
            log.warning("heal server: state for step %d is %d bytes, above max_bytes=%d: peers will refuse it",
                        step, staged.length, self._max_bytes)
        with self._ready:
            self._served = staged
            self._ready.notify_all()

    def disallow_checkpoint(self) -> None:
        with self._ready:
            self._served = None

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        if not metadata.startswith("http://"):  # urllib would also open file:, ftp: and data: URLs
            raise HealRefused(f"peer metadata {metadata[:64]!r} is not an http:// address")
        request = urllib.request.Request(f"{metadata}{step}")
        path = request.selector  # exactly what goes on the request line, and what the server signs
        request.add_header("Authorization", f"{AUTH_SCHEME} {_request_mac(self._secret, path)}")
        try:
            response = self._opener.open(request, timeout=timeout.total_seconds())
        except urllib.error.HTTPError as e:
            if e.code == 403:
                e.close()
                self.refused = HealRefused(f"peer {metadata} refused the heal (HTTP 403): it does not share this "
                                           f"job's secret ({SECRET_ENV} differs)")
                raise self.refused from None
            raise
        own = self._targets() if self._targets is not None else None
        with response:
            length = self._body_length(response, metadata)
            state = _Reader(response, length, _body_mac(self._secret, path), metadata).read_state(
                {} if own is None else _paths(own), self)
        self.bytes_received += length
        return state

    def _body_length(self, response: Any, metadata: str) -> int:
        if response.status != 200:
            raise HealRefused(f"peer {metadata} answered HTTP {response.status}, not 200")
        if response.headers.get("Transfer-Encoding") is not None:
            raise HealRefused(f"peer {metadata} sent a body without a fixed length (Transfer-Encoding)")
        lengths = set(response.headers.get_all("Content-Length") or [])
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", next(iter(lengths)).strip()):
            raise HealRefused(f"peer {metadata} sent a body without one valid Content-Length")
        length = int(next(iter(lengths)).strip())
        if length > self._max_bytes:
            raise HealRefused(f"peer {metadata} offers a {length}-byte state, above max_bytes={self._max_bytes}")
        return length

    def shutdown(self, wait: bool = True) -> None:
        """Stop serving, once the peers the staged state is for have had it and no answer is
        being written (for at most as long as a fetch may take): a group that ends right
        after a quorum still heals the peers it serves there."""
        with self._ready:
            self._ready.wait_for(lambda: self._streaming == 0 and (self._served is None or self._served.unanswered <= 0),
                                 timeout=self._timeout.total_seconds())
            self._served = None
        self._server.shutdown()
        self._server.server_close()


class _Reader:
    """One body read as it arrives: never more than its declared length, every byte into
    the running MAC, the state used only once the trailer verifies."""

    def __init__(self, response: Any, length: int, mac: Any, peer: str) -> None:
        self._response, self._left, self._mac, self._peer = response, length, mac, peer

    def _into(self, view: memoryview) -> None:
        if len(view) > self._left:
            raise HealRefused(f"peer {self._peer} sent a body whose header describes more than its Content-Length")
        done = 0
        while done < len(view):
            n = self._response.readinto(view[done:])
            if not n:
                raise HealRefused(f"peer {self._peer} closed the stream {self._left - done} bytes short")
            done += n
        self._left -= len(view)
        self._mac.update(view)

    def _bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        self._into(memoryview(buf))
        return bytes(buf)

    def read_state(self, targets: dict[tuple, torch.Tensor], transport: SafeHTTPTransport) -> Any:
        size = int.from_bytes(self._bytes(8), "little")
        if size > min(MAX_HEADER_BYTES, self._left - MAC_BYTES):
            raise HealRefused(f"peer {self._peer} sent a {size}-byte header: not a stalwart state")
        raw = self._bytes(size)
        expected = self._mac.copy().hexdigest()
        if not _same(expected, self._bytes(MAC_BYTES).hex()):  # a stranger's header is never parsed
            raise HealRefused(f"peer {self._peer} sent a state without a valid signature: it is not a member of "
                              f"this job (or {SECRET_ENV} differs)")
        try:
            header = json.loads(raw)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format') if isinstance(header, dict) else None!r}")
            specs = [(_DTYPES[dtype], tuple(int(n) for n in shape)) for dtype, shape in header["tensors"]]
            if any(n < 0 for _, shape in specs for n in shape):
                raise ValueError("a negative dimension")
            tree = header["tree"]
            _decode(tree, [torch.empty(0)] * len(specs))  # the structure is sound before any byte lands
            places = _tensor_paths(tree)
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
            raise HealRefused(f"peer {self._peer} sent a body that is not a stalwart state ({e})") from None
        need = sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for dtype, shape in specs)
        if need + MAC_BYTES != self._left:
            raise HealRefused(f"peer {self._peer} sent a body whose length does not match its header")
        tensors, in_place = [], 0
        for i, (dtype, shape) in enumerate(specs):
            own = targets.get(places.get(i))
            fits = own is not None and own.dtype == dtype and tuple(own.shape) == shape and own.is_contiguous()
            tensor = own if fits else torch.empty(shape, dtype=dtype)
            transport.torn = transport.torn or (fits and tensor.numel() > 0)
            self._fill(tensor)
            tensors.append(tensor)
            in_place += _nbytes(tensor) if fits else 0
        if not _same(self._mac.hexdigest(), self._bytes(MAC_BYTES).hex()):
            raise HealRefused(f"peer {self._peer} sent a state without a valid signature: it is not a member of "
                              f"this job (or {SECRET_ENV} differs)")
        transport.torn = False  # whole and verified: what was written in place is the peer's state
        transport.bytes_in_place += in_place
        return _decode(tree, tensors)

    def _fill(self, tensor: torch.Tensor) -> None:
        flat = tensor.reshape(-1).view(torch.uint8)
        if tensor.device.type == "cpu":
            for start in range(0, flat.numel(), CHUNK_BYTES):
                self._into(memoryview(flat[start:start + CHUNK_BYTES].numpy()))
            return
        bounce = torch.empty(min(CHUNK_BYTES, flat.numel()), dtype=torch.uint8)
        for start in range(0, flat.numel(), CHUNK_BYTES):
            part = bounce[:min(CHUNK_BYTES, flat.numel() - start)]
            self._into(memoryview(part.numpy()))
            flat[start:start + part.numel()].copy_(part)


def _credential(headers: Any) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token if scheme == AUTH_SCHEME else None
