"""Generation with the MLA latent cache: greedy equals transformers' greedy on the same folder
(ours, and one transformers wrote with a tokenizer of its own); sampling is seeded; eos stops."""

import json

import pytest
import torch

from stalwart.data.tokenizer import default_corpus, train_tokenizer
from stalwart.errors import UserError
from stalwart.export.hf import load_hf_folder, save_hf_folder
from stalwart.sampling import generate, sample_next
from stalwart.model import DeepSeekForCausalLM, ModelConfig
from jobs import foreign_tokenizer, in_process

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def export_random(tmp_path, **changes):
    cfg = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
               first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.2,
               num_nextn_predict_layers=1)
    cfg.update(changes)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(ModelConfig.from_dict(cfg))
    save_hf_folder(model, train_tokenizer(default_corpus(), 320), tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=None, rope_scaling={"factor": 4.0,
                                                  "original_max_position_embeddings": 64})])
def test_greedy_output_equals_transformers_greedy(tmp_path, changes):
    folder = export_random(tmp_path, **changes)
    ours, _ = load_hf_folder(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None,
                           pad_token_id=2)[0, 10:].tolist()
    got = generate(ours, prompt.tolist(), max_new_tokens=40, eos_token_id=-1)[0]
    assert got == expected


def test_batched_generation_equals_one_prompt_at_a_time(tmp_path):
    model, _ = load_hf_folder(export_random(tmp_path))
    prompts = torch.randint(3, 320, (3, 6), generator=torch.Generator().manual_seed(2)).tolist()
    batched = generate(model, prompts, max_new_tokens=12, eos_token_id=-1)
    assert batched == [generate(model, [p], max_new_tokens=12, eos_token_id=-1)[0] for p in prompts]


def test_sampling_repeats_with_the_same_seed_and_differs_with_another(tmp_path):
    model, _ = load_hf_folder(export_random(tmp_path, initializer_range=0.02))
    run = lambda seed: generate(model, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, top_p=0.95,
                                seed=seed, eos_token_id=-1)[0]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.8: tokens 2 and 3 are never drawn
    assert int(sample_next(logits, 1.0, 1e-6, g)) == 0  # a tiny top_p is greedy


def test_generation_stops_after_eos(tmp_path):
    model, _ = load_hf_folder(export_random(tmp_path))
    free = generate(model, [[5, 6, 7]], max_new_tokens=20, eos_token_id=-1)[0]
    stopped = generate(model, [[5, 6, 7]], max_new_tokens=20, eos_token_id=free[3])[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_too_long_a_generation_is_a_user_error(tmp_path):
    model, _ = load_hf_folder(export_random(tmp_path))
    with pytest.raises(UserError, match="max_position_embeddings"):
        generate(model, [[5] * 200], max_new_tokens=100)


def test_bad_temperature_is_a_user_error_and_a_tiny_one_is_greedy(tmp_path):
    model, _ = load_hf_folder(export_random(tmp_path))
    with pytest.raises(UserError, match="temperature must be a finite number"):
        generate(model, [[5, 6]], max_new_tokens=2, temperature=float("nan"))
    greedy = generate(model, [[5, 6]], max_new_tokens=8, eos_token_id=-1)
    assert generate(model, [[5, 6]], max_new_tokens=8, temperature=1e-45, seed=1, eos_token_id=-1) == greedy


def test_generation_without_stopping_early_gives_the_same_result():
    import torch

    from stalwart.sampling import generate
    from stalwart.model import DeepSeekForCausalLM
    from stalwart.recipes import recipe

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(recipe("smoke").model)
    prompts = [[5, 6, 7], [8, 9, 10]]
    eos = generate(model, prompts, max_new_tokens=6)[0][1]  # a token the model does emit: it ends the first row
    kept = generate(model, prompts, max_new_tokens=6, eos_token_id=eos)
    assert generate(model, prompts, max_new_tokens=6, eos_token_id=eos, stop_early=False) == kept
    assert kept[0][-1] == eos


def transformers_folder(folder, *, pad_in_config: bool) -> None:
    """A DeepSeek-V3 folder as transformers writes it, with a tokenizer of its own: special
    tokens <unk>, <s>, </s>, <pad> at ids 0-3 (not stalwart's), named in its
    tokenizer_config.json; config.json gives bos 1 and eos 2, and pad 3 or (`pad_in_config`
    False) none, so that the tokenizer's config must say it."""
    tok = foreign_tokenizer()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(folder)
    config = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=3 if pad_in_config else None)
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(folder)


@pytest.mark.parametrize("pad_in_config", [True, False])
def test_a_folder_transformers_wrote_with_its_own_tokenizer_generates_as_transformers_does(tmp_path, pad_in_config):
    import subprocess
    import sys

    transformers_folder(tmp_path / "hf", pad_in_config=pad_in_config)
    model, tokenizer = load_hf_folder(tmp_path / "hf")
    cfg = model.cfg
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 3)  # pad from the tokenizer's config
    r = subprocess.run([sys.executable, "-m", "stalwart", "generate", str(tmp_path / "hf"), "--prompt",
                        "The quick brown", "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tokenizer("The quick brown", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = theirs.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=3)
    assert r.stdout.rstrip("\n") == "The quick brown" + hf_tokenizer.decode(out[0, ids.shape[1]:],
                                                                            skip_special_tokens=True)
    info = subprocess.run([sys.executable, "-m", "stalwart", "model-info", str(tmp_path / "hf"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    if pad_in_config:  # `verify --export` takes the same folder, its tokenizer included
        checked = in_process("verify", "--export", str(tmp_path / "hf"), "--device", "cpu", "--json")
        assert checked.returncode == 0, checked.stderr
        checks = json.loads(checked.stdout)["checks"]
        assert checks and all(c["passed"] for c in checks)
    # Exported again, the folder names its own special tokens at the config's ids.
    save_hf_folder(model, tokenizer, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert (saved["bos_token"], saved["eos_token"], saved["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").eos_token_id == 2


def test_samples_of_a_prompt_share_its_prefill_and_report_the_samplers_log_probabilities():
    from stalwart.recipes import recipe

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(recipe("smoke").model)
    prompts = [[5, 6, 7], [8, 9, 10]]
    assert generate(model, prompts, max_new_tokens=6, samples=3) == \
        generate(model, [prompts[0]] * 3 + [prompts[1]] * 3, max_new_tokens=6)
    logprobs = []
    outs = generate(model, prompts, max_new_tokens=5, temperature=1.0, seed=4, samples=2, logprobs=logprobs)
    assert len(outs) == len(logprobs) == 4
    row = torch.tensor([prompts[1] + outs[3]])
    with torch.no_grad():
        full = model(row[:, :-1]).logits.log_softmax(-1)[0, len(prompts[1]) - 1:]
    expected = full.gather(-1, row[0, len(prompts[1]):, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(logprobs[3]), expected, atol=1e-5)
