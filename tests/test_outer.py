"""The outer step of DiLoCo and Streaming DiLoCo (training/outer.py) in one process: the
fragments partition the model strided across depth, and one round's outer step moves
exactly its fragment of G by Nesterov SGD on the token-weighted mean pseudo-gradient and
mixes it into the local weights."""

import dataclasses
import threading

import pytest
import torch

from stalwart.config import ReplicasConfig
from stalwart.model import DeepSeekForCausalLM
from stalwart.recipes import recipe
from stalwart.compress import chunk_ranges, exchange_sent, wire_bytes
from stalwart.replication.group import Gather
from stalwart.training.outer import Exchange, OuterState, fragment_of

POSITION = {"position": 0, "start": 0, "skip": 0}


def _model():
    torch.manual_seed(0)
    return DeepSeekForCausalLM(recipe("default").model)  # 4 decoder layers, MoE from layer 1


def test_fragments_are_strided_across_depth_and_cover_every_parameter_once():
    assert [fragment_of(f"model.layers.{i}.mlp.gate.weight", 2) for i in range(4)] == [0, 1, 0, 1]
    assert fragment_of("model.embed_tokens.weight", 3) == 0
    assert fragment_of("lm_head.weight", 3) == fragment_of("mtp.0.layer.mlp.gate.weight", 3) == 2
    model = _model()
    outer = OuterState(model, ReplicasConfig(count=2, strategy="streaming", fragments=2))
    indices = sorted(i for f in outer.fragments for i in f.params)
    assert indices == list(range(len(outer.local)))
    assert sum(f.numel for f in outer.fragments) == sum(p.numel() for p in outer.local)
    assert sorted(i for f in outer.fragments for i in f.biases) == list(range(len(outer.biases)))
    assert all(f.biases for f in outer.fragments)  # each fragment has MoE layers, and their biases


def test_one_round_moves_only_its_fragment_by_nesterov_sgd_and_mixes_it_in():
    model = _model()
    cfg = ReplicasConfig(count=2, strategy="streaming", fragments=2, mixing=0.25, outer_lr=0.7, outer_momentum=0.9)
    outer = OuterState(model, cfg)
    g0 = [g.detach().clone() for g in outer.global_params]
    with torch.no_grad():  # this group's inner steps: every local weight moves
        for p in outer.local:
            p.add_(torch.randn_like(p) * 0.01)
    local = [p.detach().clone() for p in outer.local]
    outer.trained += 1024
    ours = outer.pack(1, replica=0, step=5, shard=0, position=POSITION, nonfinite=False, version=0, round_=2)
    # A second group's payload for the same round: the same fragment, twice the tokens.
    theirs_state = OuterState(_model(), cfg)
    with torch.no_grad():
        for p in theirs_state.local:
            p.add_(0.02)
    theirs_state.trained += 2048
    theirs = theirs_state.pack(1, replica=1, step=5, shard=1, position=POSITION, nonfinite=False, version=0, round_=2)
    result = outer.combine([theirs.wire, ours.wire], 1)
    assert result.committed and result.contributors == [0, 1] and result.tokens == 3072
    outer.apply(result, ours, mixing=cfg.mixing, contributed=True)
    fragment = set(outer.fragments[1].params)
    for i, (g, before, p, was) in enumerate(zip(outer.global_params, g0, outer.local, local)):
        if i not in fragment:  # the other fragment: neither G nor the local weights moved
            assert torch.equal(g.detach(), before) and torch.equal(p.detach(), was)
            continue
        mean = ((before - was) * 1024 + (before - (before + 0.02)) * 2048) / 3072
        # Nesterov SGD's first step from zero momentum: G - lr (1 + momentum) mean.
        expected = before - 0.7 * (1 + 0.9) * mean
        torch.testing.assert_close(g.detach(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.detach(), 0.25 * was + 0.75 * expected, rtol=0, atol=1e-6)
    assert outer.rounds == 1 and outer.synced_at == [0, 5] and outer.synced == {"step": 5, "tokens_seen": 3072}


def test_a_group_that_trained_nothing_on_a_fragment_sends_only_its_header():
    model = _model()
    outer = OuterState(model, ReplicasConfig(count=2, strategy="streaming", fragments=2))
    payload = outer.pack(0, replica=1, step=0, shard=1, position=POSITION, nonfinite=False, version=0, round_=1)
    trained = _group(ReplicasConfig(count=2, strategy="streaming", fragments=2), 0.01)
    sent = trained.pack(0, replica=0, step=0, shard=0, position=POSITION, nonfinite=False, version=0, round_=1)
    assert payload.wire.numel() == sent.wire.numel()  # the same size as everyone's
    result = outer.combine([payload.wire], 0)
    assert not result.committed and result.contributors == []
    # The whole model over all fragments is about one DiLoCo payload (plus a header each).
    other = trained.pack(1, replica=0, step=0, shard=0, position=POSITION, nonfinite=False, version=0, round_=2)
    diloco = _group(dataclasses.replace(ReplicasConfig(count=2), strategy="diloco"), 0.01)
    whole = diloco.pack(0, replica=0, step=0, shard=0, position=POSITION, nonfinite=False, version=0, round_=1)
    assert sent.wire.numel() + other.wire.numel() == whole.wire.numel() + trained.header_bytes


def _group(cfg, shift, tokens=1024):
    """A group's OuterState after inner steps that moved every local weight by `shift`."""
    outer = OuterState(_model(), cfg)
    with torch.no_grad():
        for p in outer.local:
            p.add_(shift)
    outer.trained += tokens
    return outer


def test_a_spiking_pseudo_gradient_and_a_group_with_another_g_are_left_out():
    cfg = ReplicasConfig(count=4, strategy="diloco")
    groups = [_group(cfg, 0.01), _group(cfg, 0.012), _group(cfg, 0.011), _group(cfg, 0.01)]
    with torch.no_grad():
        groups[1].local[0].view(-1)[0] += 1e4  # a weight corrupted during group 1's round
        bits = groups[3].global_params[0].data.view(-1)[:1].view(torch.int32)
        bits ^= 1 << 22  # a flipped bit in group 3's G
    wires = [g.pack(0, replica=i, step=10, shard=i, position=POSITION, nonfinite=False, version=0, round_=1).wire
             for i, g in enumerate(groups)]
    result = groups[0].combine(wires, 0)
    assert result.agreed and result.odd == [3] and result.spiked == [1]
    assert result.committed and result.contributors == [0, 2]
    # Two groups with different G: no majority, nobody is known good.
    tie = groups[0].combine([wires[0], wires[3]], 0)
    assert not tie.agreed and not tie.committed and tie.odd == [0, 3]
    # A group healed late in the round (a quarter of the tokens, a quarter of the drift) is no spike.
    late = _group(cfg, 0.0025, tokens=256)
    wire = late.pack(0, replica=1, step=10, shard=1, position=POSITION, nonfinite=False, version=0, round_=1).wire
    assert groups[0].combine([wires[0], wire], 0).contributors == [0, 1]


def test_outer_momentum_0_and_lr_1_make_g_the_token_weighted_mean_of_the_groups():
    cfg = ReplicasConfig(count=2, strategy="diloco", outer_lr=1.0, outer_momentum=0.0)
    ours, theirs = _group(cfg, 0.01, tokens=1024), _group(cfg, 0.04, tokens=3072)
    start = [g.detach().clone() for g in ours.global_params]
    sent = ours.pack(0, replica=0, step=10, shard=0, position=POSITION, nonfinite=False, version=0, round_=1)
    wire = theirs.pack(0, replica=1, step=10, shard=1, position=POSITION, nonfinite=False, version=0, round_=1).wire
    ours.apply(ours.combine([sent.wire, wire], 0), sent, mixing=0.0, contributed=True)
    for g, before, p in zip(ours.global_params, start, ours.local):
        torch.testing.assert_close(g.detach(), before + (0.01 * 1024 + 0.04 * 3072) / 4096, rtol=0, atol=1e-6)
        assert torch.equal(p.detach(), g.detach())


class _Links:
    """The collectives of `n` participants in memory, each call returning when every
    participant has made it (the arithmetic of the exchange; test_diloco runs it over gloo)."""

    def __init__(self, n):
        self.n, self.barrier, self.box = n, threading.Barrier(n), {}

    def member(self, me):
        links = self

        class Member:
            participants, participant = links.n, me

            def alltoall_across_groups(self, inputs, sizes):
                return Gather(None, links.swap(me, inputs, lambda sent, j: sent[j][me]), lambda error: None)

            def allgather_across_groups(self, payload):
                return Gather(None, links.swap(me, payload, lambda sent, j: sent[j].clone()), lambda error: None)

        return Member()

    def swap(self, me, value, pick):
        self.box[me] = value
        self.barrier.wait()
        out = [pick(self.box, j) for j in range(self.n)]
        self.barrier.wait()
        return out


def _exchange(groups, payloads):
    links = _Links(len(groups))
    exchanges = [Exchange(g, p, links.member(i), 10) for i, (g, p) in enumerate(zip(groups, payloads))]
    return [e.wait() for e in exchanges], exchanges


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_from_three_groups_a_reduce_scatter_gives_every_group_the_same_step_for_fewer_bytes(compression):
    cfg = ReplicasConfig(count=4, strategy="diloco", compression=compression, error_feedback=compression != "none")
    groups = [_group(cfg, 0.01 * (i + 1), tokens=1024 * (i + 1)) for i in range(4)]
    with torch.no_grad():
        groups[2].local[0].view(-1)[0] += 1e4  # a spike: left out by every owner alike
    payloads = [g.pack(0, replica=i, step=10, shard=i, position=POSITION, nonfinite=False, version=0, round_=1)
                for i, g in enumerate(groups)]
    results, _ = _exchange(groups, payloads)
    whole = groups[0].combine([p.wire for p in payloads], 0)  # the all-gather's step
    for result in results:
        assert result.committed and result.contributors == [0, 1, 3] and result.spiked == [2]
        assert torch.equal(result.mean_delta, results[0].mean_delta)  # bit-identical on every group
        assert torch.equal(result.mean_biases, whole.mean_biases)
    if compression == "none":
        assert torch.equal(results[0].mean_delta, whole.mean_delta)  # the same sums in the same order
    else:  # the mean compressed once more: within half an int4 level of its block
        error = (results[0].mean_delta - whole.mean_delta).abs().max()
        assert 0 < error <= whole.mean_delta.abs().max() / 7 / 2 * 1.001
    numel, prefix = groups[0].fragments[0].numel, groups[0].prefix_bytes(0)
    assert results[0].bytes_sent == exchange_sent(numel, compression, 4) + 3 * prefix
    assert all(r.bytes_sent < 0.51 * whole.bytes_sent for r in results)  # 1.5 payloads a group, not 3
    # Error feedback: each owner keeps what compressing its range of the mean lost, once applied.
    if compression != "none":
        for g, p, r in zip(groups, payloads, results):
            g.apply(r, p, mixing=0.0, contributed=True)
            key, residual = g.owner_feedback[0]
            assert key == (4, groups.index(g)) and residual.abs().max() > 0


def test_a_reduce_scatter_among_groups_that_all_sit_out_applies_nothing():
    cfg = ReplicasConfig(count=3, strategy="diloco", compression="int4")
    groups = [OuterState(_model(), cfg) for _ in range(3)]  # nothing trained
    payloads = [g.pack(0, replica=i, step=0, shard=i, position=POSITION, nonfinite=False, version=0, round_=1)
                for i, g in enumerate(groups)]
    results, _ = _exchange(groups, payloads)
    assert all(not r.committed and r.mean_delta is None for r in results)
    numel, prefix = groups[0].fragments[0].numel, groups[0].prefix_bytes(0)
    sizes = [prefix + wire_bytes(hi - lo, "int4") for lo, hi in chunk_ranges(numel, 3)]
    assert [r.bytes_sent for r in results] == [sum(sizes) - sizes[k] for k in range(3)]  # no all-gather after it


def test_a_reduced_range_that_is_not_finite_fails_the_round_on_every_group():
    cfg = ReplicasConfig(count=3, strategy="diloco", compression="int4", error_feedback=True)
    groups = [_group(cfg, 0.01 * (i + 1)) for i in range(3)]
    payloads = [g.pack(0, replica=i, step=10, shard=i, position=POSITION, nonfinite=False, version=0, round_=1)
                for i, g in enumerate(groups)]
    lo, hi = chunk_ranges(groups[1].fragments[0].numel, 3)[1]
    groups[1].owner_feedback[0] = ((3, 1), torch.full((hi - lo,), float("nan")))  # a fault in owner 1's reduction
    results, exchanges = _exchange(groups, payloads)
    assert results == [None, None, None]  # sent again after the next quorum, never applied
    assert all("not finite" in str(e.failure) for e in exchanges)
