"""The outer gradient's compression (compress.py): block scales, the error bound of each
width, the wire size the planner counts, and error feedback that keeps no bias."""

import pytest
import torch

from stalwart.compress import BLOCK, ErrorFeedback, chunk_ranges, decode, encode, exchange_sent, wire_bytes, wire_slice


@pytest.mark.parametrize("compression, levels", [("int8", 127), ("int4", 7), ("int2", 1)])
def test_each_width_rounds_to_the_nearest_level_of_its_block_scale(compression, levels):
    torch.manual_seed(0)
    x = torch.randn(3 * BLOCK + 17) * torch.linspace(0.01, 10, 3 * BLOCK + 17)  # blocks of very different scales
    wire = encode(x, compression)
    assert wire.dtype == torch.uint8 and wire.numel() == wire_bytes(x.numel(), compression)
    y = decode(wire, x.numel(), compression)
    padded = torch.zeros(4 * BLOCK)
    padded[:x.numel()] = x
    scale = padded.view(4, BLOCK).abs().amax(dim=1).repeat_interleave(BLOCK)[:x.numel()] / levels
    assert torch.all((y - x).abs() <= scale / 2 + 1e-6 * scale)  # half a level, no more
    assert torch.allclose(y.abs().view(-1)[:BLOCK].max(), x.abs()[:BLOCK].max())  # a block's largest value is exact


def test_sizes_on_the_wire_and_none_is_exact():
    n = 1_000_000
    assert wire_bytes(n, "none") == 4 * n
    blocks = -(-n // BLOCK)
    assert wire_bytes(n, "int8") == 4 * blocks + blocks * BLOCK
    assert wire_bytes(n, "int4") == 4 * blocks + blocks * BLOCK // 2
    assert wire_bytes(n, "int2") == 4 * blocks + blocks * BLOCK // 4
    assert 15 < wire_bytes(n, "none") / wire_bytes(n, "int2") < 16  # the fp32 scales cost 1/64 byte a value
    x = torch.randn(1000)
    assert torch.equal(decode(encode(x, "none"), 1000, "none"), x)
    zeros = decode(encode(torch.zeros(300), "int4"), 300, "int4")
    assert torch.equal(zeros, torch.zeros(300))  # an all-zero block has scale 0 and decodes to 0


def test_the_same_bytes_decode_to_the_same_values_everywhere():
    x = torch.randn(5000)
    a, b = encode(x, "int4"), encode(x.clone(), "int4")
    assert torch.equal(a, b) and torch.equal(decode(a, 5000, "int4"), decode(b.clone(), 5000, "int4"))


def test_error_feedback_keeps_the_sum_of_many_rounds_unbiased():
    torch.manual_seed(1)
    g = torch.randn(4 * BLOCK) * 0.01 + 0.003  # a steady small drift that int2 alone rounds away
    feedback, sent, plain = ErrorFeedback(), torch.zeros_like(g), torch.zeros_like(g)
    for _ in range(200):
        sent += decode(feedback.encode(g, "int2"), g.numel(), "int2")
        plain += decode(encode(g, "int2"), g.numel(), "int2")
    truth = 200 * g
    # What is sent over 200 rounds is the true sum up to one round's residual.
    assert (sent - truth).abs().max() <= feedback.residual.abs().max() + 1e-4
    assert (sent - truth).norm() < 0.05 * (plain - truth).norm()


@pytest.mark.parametrize("compression", ["none", "int8", "int4", "int2"])
def test_a_range_cut_from_the_wire_decodes_to_that_range_of_the_whole(compression):
    torch.manual_seed(2)
    numel = 10 * BLOCK + 33
    x = torch.randn(numel) * torch.linspace(0.1, 5, numel)
    wire = encode(x, compression)
    whole = decode(wire, numel, compression)
    for parts in (1, 3, 4, 11, 12):
        ranges = chunk_ranges(numel, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] and a[0] % BLOCK == 0 for a, b in zip(ranges, ranges[1:]))
        for lo, hi in ranges:
            piece = wire_slice(wire, numel, compression, lo, hi)
            assert piece.numel() == wire_bytes(hi - lo, compression)
            assert torch.equal(decode(piece, hi - lo, compression), whole[lo:hi])


def test_the_exchange_sends_about_two_payloads_a_group_from_three_groups_on():
    n = 10_000_000
    payload = wire_bytes(n, "int4")
    assert exchange_sent(n, "int4", 1) == 0 and exchange_sent(n, "int4", 2) == payload
    for groups in (3, 4, 8, 64):
        ring_allreduce = 2 * (groups - 1) / groups * payload
        assert ring_allreduce <= exchange_sent(n, "int4", groups) < 1.01 * ring_allreduce
