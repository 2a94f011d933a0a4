"""The DeepSeek-style model: config validation, presets, MoE routing and balancing, MTP,
and the MLA KV cache."""

import pytest
import torch

from stalwart.errors import ConfigError
from stalwart.model import DeepSeekForCausalLM, KVCache, ModelConfig, RopeScaling, parameter_counts, preset
from stalwart.model.moe import MoE


def small(**changes) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                first_k_dense_replace=1, max_position_embeddings=128)
    base.update(changes)
    return ModelConfig.from_dict(base)


def test_deepseek_v3_preset_has_the_published_parameter_counts():
    counts = parameter_counts(preset("deepseek-v3"))  # on the meta device: no memory
    assert 660e9 < counts["total"] < 680e9  # 671B (arXiv 2412.19437)
    assert 36e9 < counts["activated"] < 38.5e9  # 37B activated
    assert 10e9 < counts["mtp"] < 15e9  # the 14B MTP module, less the shared embedding/head copies


def test_tiny_preset_is_between_one_and_five_million_parameters():
    counts = parameter_counts(preset("tiny"))
    assert 1e6 <= counts["total"] + counts["mtp"] <= 5e6
    assert counts["activated"] < counts["total"]


def test_small_preset_is_between_50_and_100_million_parameters_and_keeps_deepseek_v3s_features():
    cfg, counts = preset("small"), parameter_counts(preset("small"))
    assert 50e6 <= counts["total"] + counts["mtp"] <= 100e6  # 60.1M: bench/sharding.py's model
    assert cfg.attention == "mla" and cfg.q_lora_rank and cfg.n_routed_experts > cfg.num_experts_per_tok
    assert cfg.n_shared_experts and cfg.num_nextn_predict_layers and cfg.n_group > 1


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=9, n_group=2), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(attention="mha"), "v_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(attention="gqa"), "attention"),
    (dict(eos_token_id=300), "eos_token_id"),
])
def test_inconsistent_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        small(**changes)


def test_unknown_preset_and_unknown_field_are_config_errors():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="n_expertz"):
        ModelConfig.from_dict({"n_expertz": 3})


def test_forward_backward_reaches_every_parameter_including_mtp():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(small(num_nextn_predict_layers=1))
    ids = torch.randint(0, 300, (2, 12))
    out = model(ids, labels=ids.roll(-1, 1))
    assert out.logits.shape == (2, 12, 300)
    assert out.mtp_loss is not None and out.balance_loss is not None
    expected = out.lm_loss + model.cfg.mtp_loss_weight * out.mtp_loss + out.balance_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_moe_dispatch_equals_a_per_token_reference():
    torch.manual_seed(0)
    cfg = small(n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(2, 7, cfg.hidden_size)
    y, _ = moe.eval()(x)
    weights, idx, _ = moe.gate(x.reshape(-1, cfg.hidden_size))
    ref = []
    for t, token in enumerate(x.reshape(-1, cfg.hidden_size)):
        acc = moe.shared_experts(token)
        for w, e in zip(weights[t], idx[t]):
            ex = moe.experts
            h = torch.nn.functional.silu(ex.gate_proj[e] @ token) * (ex.up_proj[e] @ token)
            acc = acc + w * (ex.down_proj[e] @ h)
        ref.append(acc)
    torch.testing.assert_close(y.reshape(-1, cfg.hidden_size), torch.stack(ref), atol=1e-5, rtol=1e-5)


def test_correction_bias_chooses_experts_but_never_weights_them():
    torch.manual_seed(0)
    cfg = small(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.5)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    moe.gate.e_score_correction_bias[3] = 10.0  # expert 3 must now be chosen by every token
    weights, idx, scores = moe.gate(x)
    assert (idx == 3).any(-1).all()
    # The weight of each chosen expert is its sigmoid score (times the scaling factor), not score + bias.
    torch.testing.assert_close(weights, scores.gather(1, idx) * 2.5)


def test_group_limited_routing_masks_other_groups_with_minus_infinity():
    # Every bias-corrected score negative: masking unchosen groups with 0 would let them win.
    cfg = small(n_group=4, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    moe.gate.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(32, cfg.hidden_size)
    _, idx, scores = moe.gate(x)
    group_of = idx // (cfg.n_routed_experts // cfg.n_group)
    assert (group_of == group_of[:, :1]).all(), "both experts must come from the one chosen group"
    best_group = (scores - 5.0).view(32, 4, 2).topk(2, -1)[0].sum(-1).argmax(-1)
    assert torch.equal(group_of[:, 0], best_group)


def test_bias_update_moves_load_towards_balance_without_a_loss():
    torch.manual_seed(0)
    cfg = small(n_group=1, topk_group=1, num_experts_per_tok=1, bias_update_speed=0.01, seq_aux_loss_alpha=0.0)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    moe.gate.weight.data[0] += 0.5  # a router skewed towards expert 0
    x = torch.randn(4, 64, cfg.hidden_size)

    def imbalance() -> float:
        moe(x)
        load = moe.expert_load.clone()
        moe.update_bias()
        return float(load.max() / load.mean())

    first = imbalance()
    for _ in range(300):
        last = imbalance()
    assert first > 3.0 and last < 1.6, (first, last)
    assert moe.expert_load.sum() == 0  # the counter resets at each update


@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=None), dict(attention="mha", v_head_dim=24),
                                     dict(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32})])
def test_kv_cache_decoding_equals_the_full_forward(changes):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(small(initializer_range=0.1, **changes)).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.cfg.num_hidden_layers, 20)
        steps = [model(ids[:, :8], cache=cache).logits]  # prefill
        steps.append(model(ids[:, 8:12], cache=cache).logits)  # a chunk after the prefill
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_mla_cache_holds_the_latent_not_full_keys_and_values():
    cfg = small()
    model = DeepSeekForCausalLM(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers, 16)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    per_token = cache.nbytes() / 16 / cfg.num_hidden_layers / 4
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert per_token < cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def test_yarn_softmax_scale_includes_mscale_squared():
    cfg = small(rope_scaling={"factor": 40.0, "mscale_all_dim": 1.0})
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert cfg.softmax_scale == pytest.approx((16 + 8) ** -0.5 * m * m)
    assert isinstance(cfg.rope_scaling, RopeScaling)


def test_same_seed_same_initialisation():
    torch.manual_seed(7)
    a = DeepSeekForCausalLM(small()).state_dict()
    torch.manual_seed(7)
    b = DeepSeekForCausalLM(small()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_built_on_meta_holds_nothing_and_materializes_one_whole_tensor_at_a_time_as_a_built_one():
    # What a sharded rank does (training/setup.py): the model on the meta device, then its
    # weights drawn whole one at a time and handed to `place`, which keeps its part (here
    # all of it; the shards' own are checked by the multi-rank tests against one process).
    torch.manual_seed(7)
    built = DeepSeekForCausalLM(small())
    meta = DeepSeekForCausalLM(small(), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    seen: list[tuple[int, ...]] = []

    def place(param, whole):
        assert not whole.is_meta and whole.shape == param.shape
        seen.append(tuple(whole.shape))
        param.copy_(whole)

    torch.manual_seed(7)
    meta.materialize("cpu", place=place)
    assert seen == [tuple(p.shape) for p in built.parameters()]
    for (name, a), b in zip(built.named_parameters(), meta.parameters()):
        assert torch.equal(a, b), name
    want = dict(built.named_buffers())
    for name, buffer in meta.named_buffers():  # rope's frequencies, zero biases and loads
        assert torch.equal(buffer, want[name]), name
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens).logits, built(tokens).logits, rtol=0, atol=0)


def test_gathered_and_sorted_expert_dispatch_agree_in_value_and_gradient():
    torch.manual_seed(0)
    cfg = small(num_experts_per_tok=3, n_group=1, topk_group=1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(10, cfg.hidden_size, requires_grad=True)
    weights, idx, _ = moe.gate(x)
    results = []
    for path in (moe.experts._forward_gathered, moe.experts._forward_sorted):
        y = path(x, weights, idx)
        grads = torch.autograd.grad(y.square().sum(), [x, moe.experts.down_proj], retain_graph=True)
        results.append((y, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("raw, words", [
    ({"rope_scaling": {"factor": "x"}}, "model.rope_scaling.factor must be a finite number"),
    ({"rope_scaling": {"original_max_position_embeddings": 0}},
     "model.rope_scaling.original_max_position_embeddings must be > 0"),
    ({"initializer_range": -1.0}, "model.initializer_range must be > 0"),
    ({"mtp_loss_weight": float("nan")}, "model.mtp_loss_weight must be a finite number"),
    ({"rope_theta": 1.0}, "model.rope_theta must be > 1"),
    ({"rope_scaling": {"nope": 1}}, "unknown config key model.rope_scaling.nope"),
    ({"q_lora_rank": 1.5}, "model.q_lora_rank must be an integer or null"),
    ({"norm_topk_prob": "yes"}, "model.norm_topk_prob must be true or false"),
])
def test_wrong_types_in_a_model_config_name_the_field(raw, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        ModelConfig.from_dict(raw)


def test_a_batch_with_no_trained_position_has_zero_loss_not_nan():
    model = DeepSeekForCausalLM(small(num_nextn_predict_layers=1))
    ids = torch.randint(0, 300, (2, 6))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.lm_loss.item() == 0.0 and out.mtp_loss.item() == 0.0


def test_mtp_reads_the_input_tokens_even_where_labels_are_masked():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(small(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.0)).eval()
    ids = torch.randint(3, 300, (1, 10))
    labels = ids.roll(-1, 1)
    prompt_masked = labels.clone()
    prompt_masked[0, :3] = -100  # a 3-token prompt: not trained on
    targets_masked = labels.clone()
    targets_masked[0, 1:3] = -100  # the same MTP targets dropped, label 0 kept
    # Depth 1 predicts labels[:, 1:] from input_ids[:, 1:]: both maskings drop the same MTP
    # targets, and the MTP module's inputs never depend on which labels are masked.
    a = model(ids, labels=prompt_masked).mtp_loss
    b = model(ids, labels=targets_masked).mtp_loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
