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

Assumption: the state fits in host memory twice on the sender (live + snapshot).
"""

from __future__ import annotations

import io
import logging
import threading
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torchft.checkpointing.transport import CheckpointTransport

log = logging.getLogger(__name__)


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


class SafeHTTPTransport(CheckpointTransport[Any]):
    """Serve this replica's state to healing peers; fetch a peer's state when healing.

    Args:
        host: the address peers use to reach this replica (and the one the server binds):
            127.0.0.1 for groups on one machine; this machine's address across machines.
        timeout: how long one fetch may take before the heal fails (and is retried at the
            next quorum).
    """

    def __init__(self, host: str, timeout: timedelta) -> None:
        self._host = host
        self._timeout = timeout
        self._ready = threading.Condition()
        self._served: tuple[int, bytes] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        transport = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or parts[0] != "checkpoint" or not parts[1].isdigit():
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
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(served[1])))
                self.end_headers()
                self.wfile.write(served[1])
                transport.bytes_sent += len(served[1])

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("heal server: " + format, *args)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="heal-server", daemon=True)
        self._thread.start()

    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_address[1]}/checkpoint/"

    def metadata(self) -> str:
        return self.address()

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        data = state_to_bytes(state_dict)
        with self._ready:
            self._served = (step, data)
            self._ready.notify_all()

    def disallow_checkpoint(self) -> None:
        with self._ready:
            self._served = None

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        with urllib.request.urlopen(f"{metadata}{step}", timeout=timeout.total_seconds()) as response:
            data = response.read()
        self.bytes_received += len(data)
        return state_from_bytes(data)

    def shutdown(self, wait: bool = True) -> None:
        self._server.shutdown()
        self._server.server_close()
