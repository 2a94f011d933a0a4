"""The healing transport admits only members of the job and streams the state without
pickle or copies: real HTTP servers on 127.0.0.1."""

import hashlib
import hmac
import http.client
import io
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from stalwart.errors import ConfigError
from stalwart.replication.transport import (
    SECRET_ENV,
    HealRefused,
    SafeHTTPTransport,
    job_secret,
    new_job_secret,
)

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
MAX = 1 << 20
SHORT = timedelta(seconds=0.5)  # how long a sender waits for a step to be staged before a 409
FETCH = timedelta(seconds=5)
STATE = {"w": torch.arange(12.0).reshape(3, 4), "ids": torch.tensor([3, 1, 2]), "step": 7, "n": -2,
         "nested": {"b": torch.ones(2, dtype=torch.bfloat16), "k": 5}}


@contextmanager
def transports(*specs):
    made = []
    try:
        for secret, max_bytes in specs:
            made.append(SafeHTTPTransport("127.0.0.1", SHORT, secret, max_bytes))
        yield made
    finally:
        for t in made:
            t.shutdown()


@contextmanager
def raw_server(respond):
    """A plain HTTP server that answers every GET with respond(handler): a peer that ignores the protocol."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            respond(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/checkpoint/"
    finally:
        server.shutdown()
        server.server_close()


def mac(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, dict):
            assert_same_state(got[k], v)
        elif isinstance(v, torch.Tensor):
            assert isinstance(got[k], torch.Tensor) and got[k].dtype == v.dtype and torch.equal(got[k], v)
        else:
            assert type(got[k]) is type(v) and got[k] == v


def _fetch(sender, step=7):
    """The raw body a member gets for `step` (trailer included)."""
    path = f"/checkpoint/{step}"
    req = urllib.request.Request(sender.metadata() + str(step),
                                 headers={"Authorization": f"Stalwart {mac(SECRET, f'GET {path}'.encode())}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def test_a_member_heals_and_the_state_round_trips_exactly():
    with transports((SECRET, MAX), (SECRET, MAX)) as (sender, receiver):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        got = receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert_same_state(got, STATE)
        size = receiver.bytes_received
        assert size > 12 * 4 + 3 * 8 + 2 * 2  # every tensor's bytes, a header and a trailer
        # The server thread counts after its write returns, which may be just after the receiver has read.
        deadline = time.monotonic() + 1
        while sender.bytes_sent != size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.bytes_sent == size
        sender.disallow_checkpoint()
        with pytest.raises(urllib.error.HTTPError, match="409"):  # a step not (or no longer) served
            receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert sender.bytes_sent == receiver.bytes_received == size


def test_a_heal_lands_in_the_receivers_own_tensors_and_a_broken_one_is_torn():
    own = {"w": torch.zeros(3, 4), "ids": torch.zeros(3, dtype=torch.int64), "step": 0, "n": 0,
           "nested": {"b": torch.zeros(2, dtype=torch.bfloat16), "k": 0}}
    places = {"w": own["w"].data_ptr(), "ids": own["ids"].data_ptr(), "b": own["nested"]["b"].data_ptr()}
    sender = SafeHTTPTransport("127.0.0.1", SHORT, SECRET, MAX)
    receiver = SafeHTTPTransport("127.0.0.1", SHORT, SECRET, MAX, targets=lambda: own)
    try:
        sender.send_checkpoint([1], 7, STATE, FETCH)
        got = receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert_same_state(got, STATE)
        # No tensor was allocated for the state: each arrived in the receiver's own.
        assert {"w": got["w"].data_ptr(), "ids": got["ids"].data_ptr(), "b": got["nested"]["b"].data_ptr()} == places
        assert torch.equal(own["w"], STATE["w"]) and not receiver.torn
        body = _fetch(sender)
    finally:
        sender.shutdown()
    # A stream that stops halfway through the tensors, after some landed in place: refused,
    # and the receiver knows its own state is now torn.
    try:
        with raw_server(_serve(body[:len(body) - 40], length=len(body))) as url:
            with pytest.raises(HealRefused, match="short"):
                receiver.recv_checkpoint(0, url, 7, FETCH)
        assert receiver.torn
    finally:
        receiver.shutdown()


def _stream_with_a_change_in_between(change) -> tuple[int, int]:
    """(bytes received, bytes declared) of a stream during which `change(sender)` runs."""
    # 64 MiB: far more than the socket buffers hold, so the server is still writing when
    # the change comes.
    big = {"w": torch.ones(16 << 20)}
    count = [0]
    sender = SafeHTTPTransport("127.0.0.1", SHORT, SECRET, 128 << 20, changes=lambda: count[0])
    try:
        sender.send_checkpoint([1], 7, big, FETCH)
        host, port = sender.metadata().split("//")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/checkpoint/7", headers={"Authorization": f"Stalwart {mac(SECRET, b'GET /checkpoint/7')}"})
        response = conn.getresponse()
        declared = int(response.headers["Content-Length"])
        got = len(response.read(4096))
        change(sender, count)
        while chunk := response.read1(1 << 20):
            got += len(chunk)
        conn.close()
        return got, declared
    finally:
        sender.shutdown()


def test_a_stream_that_a_change_overlapped_is_never_signed_and_one_merely_disallowed_finishes():
    # The replica counts a change (its optimizer steps, a rollback loads) before making it:
    # the stream ends without its trailer. A step whose vote only ended the serving
    # (torchft's should_commit) changed nothing: the stream in flight completes.
    got, declared = _stream_with_a_change_in_between(lambda sender, count: count.__setitem__(0, 1))
    assert got == declared - 32  # every byte but the trailer: no signature
    got, declared = _stream_with_a_change_in_between(lambda sender, count: sender.disallow_checkpoint())
    assert got == declared


def test_a_request_without_the_secret_gets_403_and_no_state():
    with transports((SECRET, MAX)) as (sender,):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        url = sender.metadata() + "7"
        forged = mac(OTHER, b"GET /checkpoint/7")
        for headers in ({}, {"Authorization": f"Stalwart {forged}"}, {"Authorization": "Stalwart nothex\u00e9"},
                        {"Authorization": f"Bearer {mac(SECRET, b'GET /checkpoint/7')}"},
                        {"Authorization": f"Stalwart {mac(SECRET, b'GET /checkpoint/8')}"}):  # another path's
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            assert e.value.code == 403, headers
            assert len(e.value.read()) < 1000  # an error page, not the state
        assert sender.bytes_sent == 0


def test_a_peer_with_another_secret_cannot_pull_the_state():
    with transports((SECRET, MAX), (OTHER, MAX)) as (sender, stranger):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        with pytest.raises(HealRefused, match="403.*STALWART_JOB_SECRET"):
            stranger.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert sender.bytes_sent == 0 and stranger.bytes_received == 0


def _mark():
    raise AssertionError("the unrestricted unpickler ran")


class _Evil:
    def __reduce__(self):
        return (_mark, ())


def _serve(body: bytes, length: int | None = None):
    def respond(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)
    return respond


@pytest.mark.parametrize("forgery", ["pickle", "stranger", "other-secret", "unsigned"])
def test_an_impostor_pushing_a_state_is_refused(forgery):
    # A torch.save pickle (never unpickled: _mark would raise); a whole state from a server
    # of another job (its header is refused before it is parsed, nothing is written); or a
    # member's header with a trailer that is another job's HMAC or garbage.
    with transports((SECRET, MAX)) as (sender,):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        body = _fetch(sender)
    if forgery == "stranger":
        with transports((OTHER, MAX)) as (stranger,):
            stranger.send_checkpoint([1], 7, STATE, FETCH)
            req = urllib.request.Request(stranger.metadata() + "7",
                                         headers={"Authorization": f"Stalwart {mac(OTHER, b'GET /checkpoint/7')}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
    if forgery == "pickle":
        buf = io.BytesIO()
        torch.save({"x": _Evil()}, buf)
        body = buf.getvalue()
    elif forgery == "other-secret":
        body = body[:-32] + hmac.new(OTHER, b"/checkpoint/7" + body[:-32], hashlib.sha256).digest()
    else:
        body = body[:-32] + bytes(32)
    own = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in STATE.items()}
    receiver = SafeHTTPTransport("127.0.0.1", SHORT, SECRET, MAX, targets=lambda: own)
    try:
        with raw_server(_serve(body)) as url:
            with pytest.raises(HealRefused, match="not a stalwart state" if forgery == "pickle" else "valid signature"):
                receiver.recv_checkpoint(0, url, 7, FETCH)
        assert receiver.bytes_received == 0
        # A stranger's header is never parsed, so nothing is written; a member's header with a
        # bad trailer had its tensors land in place: the receiver knows its state is torn.
        member_header = forgery in ("other-secret", "unsigned")
        assert receiver.torn == member_header
        assert torch.equal(own["w"], STATE["w"] if member_header else torch.zeros_like(STATE["w"]))
    finally:
        receiver.shutdown()


def test_an_impostor_with_its_own_secret_is_refused():
    # A whole SafeHTTPTransport under another secret: it refuses our request, we refuse it.
    with transports((OTHER, MAX), (SECRET, MAX)) as (impostor, receiver):
        impostor.send_checkpoint([1], 7, STATE, FETCH)
        with pytest.raises(HealRefused):
            receiver.recv_checkpoint(0, impostor.metadata(), 7, FETCH)
        assert receiver.bytes_received == 0 and impostor.bytes_sent == 0


def test_a_signed_answer_for_another_step_is_refused():
    with transports((SECRET, MAX), (SECRET, MAX)) as (sender, receiver):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        body = _fetch(sender)
        assert body[-32:] == hmac.new(SECRET, b"/checkpoint/7" + body[:-32], hashlib.sha256).digest()
        with raw_server(_serve(body)) as url:  # replayed as the answer for step 8
            with pytest.raises(HealRefused, match="valid signature"):
                receiver.recv_checkpoint(0, url, 8, FETCH)
        assert receiver.bytes_received == 0


def test_a_body_above_max_bytes_is_refused_even_from_a_member():
    with transports((SECRET, MAX), (SECRET, MAX)) as (sender, probe):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        size = len(_fetch(sender))
        with transports((SECRET, size - 1)) as (receiver,):
            with pytest.raises(HealRefused, match="above max_bytes"):
                receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
            assert receiver.bytes_received == 0


def test_a_body_without_content_length_is_refused():
    def respond(h):  # HTTP/1.0: the body runs to the end of the connection
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b"x" * 4096)

    with transports((SECRET, 1024)) as (receiver,), raw_server(respond) as url:
        with pytest.raises(HealRefused, match="Content-Length"):
            receiver.recv_checkpoint(0, url, 7, FETCH)
        assert receiver.bytes_received == 0


def test_only_http_metadata_is_fetched():
    with transports((SECRET, MAX)) as (receiver,):
        with pytest.raises(HealRefused, match="http://"):
            receiver.recv_checkpoint(0, "file:///etc/", 7, FETCH)


def test_constructor_rejects_a_short_secret_and_a_bad_bound():
    with pytest.raises(ValueError, match="16 bytes"):
        SafeHTTPTransport("127.0.0.1", SHORT, b"x" * 15, MAX)
    with pytest.raises(ValueError, match="max_bytes"):
        SafeHTTPTransport("127.0.0.1", SHORT, SECRET, 0)


def test_job_secret_reads_the_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert job_secret() is None
    fresh = new_job_secret()
    assert len(fresh) == 64 and fresh != new_job_secret()
    monkeypatch.setenv(SECRET_ENV, fresh)
    assert job_secret() == bytes.fromhex(fresh)


@pytest.mark.parametrize("value", ["", "ab" * 15, "zz" * 32, "abc" * 11, "0x" + "ab" * 16])
def test_job_secret_rejects_a_short_or_malformed_value(monkeypatch, value):
    monkeypatch.setenv(SECRET_ENV, value)
    with pytest.raises(ConfigError) as e:
        job_secret()
    message = str(e.value)
    assert SECRET_ENV in message and "\n" not in message
    assert not value or value not in message  # the secret is never echoed
