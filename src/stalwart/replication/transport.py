"""Live healing over HTTP without pickle: torchft's CheckpointTransport, serving a peer's
state as `torch.save` bytes that the receiver opens with `torch.load(weights_only=True)`.

torchft's own HTTPTransport and PGTransport run the unrestricted unpickler on what arrives
from the network (torch's loader with weights_only off, and pickle); a replica that anyone
on the network can reach must not run arbitrary code from a request. The state here is
tensors, numbers, strings, lists and dicts (the same contract as a checkpoint's
train_state), which the restricted unpickler accepts and nothing else.

Protocol: `send_checkpoint` (called on a healthy replica inside the quorum, when some peer
is behind) snapshots the state into bytes and serves it at GET /checkpoint/STEP until
`disallow_checkpoint` (called in should_commit). The receiver's quorum-time
`recv_checkpoint` fetches it; with a synchronous quorum the sender cannot pass the step's
allreduce before the receiver has its state, so the snapshot is always there in time.

Membership: all groups of a job share one secret (`STALWART_JOB_SECRET`, see `job_secret`).
A request carries `Authorization: Stalwart HMAC(secret, "GET " + path)`; without it the
server answers 403 and serves nothing. A response carries `X-Stalwart-Signature:
HMAC(secret, path + body)`; the receiver checks it before it unpickles anything, so a peer
without the secret can neither pull this replica's state nor push one into it. The receiver
also refuses a body whose Content-Length is missing or above `max_bytes` and never reads
more than that, so a peer cannot make it allocate without bound. This is authentication and
integrity, not confidentiality: the state crosses the network in clear, and someone who
records a request can replay it for the same step while that step is served.

Assumption: the state fits in host memory twice on the sender (live + snapshot) and on the
receiver (bytes + loaded state); the secret reaches every group by a channel the job trusts
(the launcher's environment).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import threading
import urllib.error
import urllib.request
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
SIGNATURE_HEADER = "X-Stalwart-Signature"


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


def state_to_bytes(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_to_cpu(state), buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()  # serialized right away: no copy needed on the CPU
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _request_mac(secret: bytes, path: str) -> str:
    return hmac.new(secret, b"GET " + path.encode("latin-1"), hashlib.sha256).hexdigest()


def _body_mac(secret: bytes, path: str, body: bytes) -> str:
    mac = hmac.new(secret, path.encode("latin-1"), hashlib.sha256)
    mac.update(body)  # not path + body: that would copy the whole state
    return mac.hexdigest()


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
    """

    def __init__(self, host: str, timeout: timedelta, secret: bytes, max_bytes: int) -> None:
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
        self._ready = threading.Condition()
        self._served: tuple[int, bytes] | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.refused: HealRefused | None = None  # a peer said this process is not a member (403)
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
                                              and transport._served[0] == step,
                                              timeout=transport._timeout.total_seconds())
                    served = transport._served
                if served is None or served[0] != step:
                    self.send_error(409, f"not serving step {parts[1]}")
                    return
                body = served[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header(SIGNATURE_HEADER, _body_mac(transport._secret, self.path, body))
                self.end_headers()
                self.wfile.write(body)
                transport.bytes_sent += len(body)

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

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        data = state_to_bytes(state_dict)
        if len(data) > self._max_bytes:
            # Peers with the same max_bytes will refuse it; say so here, where the cause is visible.
            log.warning("heal server: state for step %d is %d bytes, above max_bytes=%d: peers will refuse it",
                        step, len(data), self._max_bytes)
        with self._ready:
            self._served = (step, data)
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
        with response:
            data = self._read_body(response, metadata)
            if not _same(_body_mac(self._secret, path, data), response.headers.get(SIGNATURE_HEADER)):
                raise HealRefused(f"peer {metadata} sent a state without a valid {SIGNATURE_HEADER}: "
                                  f"it is not a member of this job (or {SECRET_ENV} differs)")
        self.bytes_received += len(data)
        return state_from_bytes(data)  # only now, once the bytes are known to come from a member

    def _read_body(self, response: Any, metadata: str) -> bytes:
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
        data = response.read(length + 1)  # at most max_bytes + 1; http.client also stops at Content-Length
        if len(data) != length:
            raise HealRefused(f"peer {metadata} sent {len(data)} bytes, not the {length} it declared")
        return data

    def shutdown(self, wait: bool = True) -> None:
        self._server.shutdown()
        self._server.server_close()


def _credential(headers: Any) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token if scheme == AUTH_SCHEME else None
