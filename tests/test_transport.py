"""The healing transport admits only members of the job: real HTTP servers on 127.0.0.1."""

import hashlib
import hmac
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
    state_to_bytes,
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


def test_a_member_heals_and_the_state_round_trips_exactly():
    with transports((SECRET, MAX), (SECRET, MAX)) as (sender, receiver):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        got = receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert_same_state(got, STATE)
        size = len(state_to_bytes(STATE))
        assert receiver.bytes_received == size
        # The server thread counts after its write returns, which may be just after the receiver has read.
        deadline = time.monotonic() + 1
        while sender.bytes_sent != size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.bytes_sent == size
        sender.disallow_checkpoint()
        with pytest.raises(urllib.error.HTTPError, match="409"):  # a step not (or no longer) served
            receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert sender.bytes_sent == receiver.bytes_received == size


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


def _serve(body: bytes, signature: str | None):
    def respond(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        if signature is not None:
            h.send_header("X-Stalwart-Signature", signature)
        h.end_headers()
        h.wfile.write(body)
    return respond


@pytest.mark.parametrize("signed_with", [None, OTHER, b"garbage"], ids=["unsigned", "other-secret", "malformed"])
def test_an_impostor_pushing_a_state_is_refused_before_unpickling(signed_with):
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    body = buf.getvalue()
    # Unsigned, signed with another job's secret, or a malformed signature. A weights_only load
    # would raise UnpicklingError; HealRefused shows the check came first.
    signature = None if signed_with is None else ("zz" if signed_with == b"garbage"
                                                  else mac(signed_with, b"/checkpoint/7" + body))
    with transports((SECRET, MAX)) as (receiver,), raw_server(_serve(body, signature)) as url:
        with pytest.raises(HealRefused, match="X-Stalwart-Signature"):
            receiver.recv_checkpoint(0, url, 7, FETCH)
        assert receiver.bytes_received == 0


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
        req = urllib.request.Request(sender.metadata() + "7",
                                     headers={"Authorization": f"Stalwart {mac(SECRET, b'GET /checkpoint/7')}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body, signature = r.read(), r.headers["X-Stalwart-Signature"]
        assert signature == mac(SECRET, b"/checkpoint/7" + body)
        with raw_server(_serve(body, signature)) as url:  # replayed as the answer for step 8
            with pytest.raises(HealRefused, match="X-Stalwart-Signature"):
                receiver.recv_checkpoint(0, url, 8, FETCH)
        assert receiver.bytes_received == 0


def test_a_body_above_max_bytes_is_refused_even_from_a_member():
    size = len(state_to_bytes(STATE))
    with transports((SECRET, MAX), (SECRET, size - 1)) as (sender, receiver):
        sender.send_checkpoint([1], 7, STATE, FETCH)
        with pytest.raises(HealRefused, match="above max_bytes"):
            receiver.recv_checkpoint(0, sender.metadata(), 7, FETCH)
        assert receiver.bytes_received == 0


def test_a_body_without_content_length_is_refused():
    def respond(h):  # HTTP/1.0: the body runs to the end of the connection
        h.send_response(200)
        h.send_header("X-Stalwart-Signature", "00")
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
