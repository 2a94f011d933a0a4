"""Export to a Hugging Face deepseek_v3 folder: transformers loads it with identical logits,
and stalwart reads back what it or transformers wrote."""

import datetime
import json
import multiprocessing
import socket
import subprocess
import weakref

import pytest
import torch
from safetensors import safe_open

from stalwart.data import chat
from stalwart.data.tokenizer import default_corpus, train_tokenizer
from stalwart.errors import ConfigError, ModelFileError, UserError
from stalwart.export.hf import load_hf_folder, save_hf_folder, to_hf_state_dict
from stalwart.sampling import generate
from stalwart.model import DeepSeekForCausalLM, ModelConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(default_corpus(), VOCAB)


def config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256,
                initializer_range=0.1)
    base.update(changes)
    return ModelConfig.from_dict(base)


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(cfg).eval()
    with torch.no_grad():  # a trained-looking bias, so that the export must carry it
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


CONFIGS = {
    "moe-grouped-several-per-token": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                                          routed_scaling_factor=2.5),
    "no-q-lora": dict(q_lora_rank=None),
    "yarn-rope-scaling": dict(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 32,
                                            "mscale": 1.0, "mscale_all_dim": 1.0}),
    "yarn-mscale-differs": dict(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64,
                                              "mscale": 0.707, "mscale_all_dim": 0.5}, norm_topk_prob=False),
    "mtp-two-shared-experts": dict(num_nextn_predict_layers=1, n_shared_experts=2, first_k_dense_replace=0),
    "dense": dict(n_routed_experts=0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_the_export_with_identical_logits(name, tokenizer, tmp_path):
    model = random_model(config(**CONFIGS[name]))
    save_hf_folder(model, tokenizer, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["moe-grouped-several-per-token", "mtp-two-shared-experts", "dense"])
def test_reimported_export_is_the_same_model(name, tokenizer, tmp_path):
    model = random_model(config(**CONFIGS[name]))
    save_hf_folder(model, tokenizer, tmp_path / "hf")
    back, tok = load_hf_folder(tmp_path / "hf")
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok.to_str() == tokenizer.to_str()


def test_folder_saved_by_transformers_loads_into_stalwart(tokenizer, tmp_path):
    model = random_model(config(**CONFIGS["moe-grouped-several-per-token"]))
    save_hf_folder(model, tokenizer, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "theirs")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    back, _ = load_hf_folder(tmp_path / "theirs")
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_layout_on_disk_is_deepseeks(tokenizer, tmp_path):
    cfg = config(num_nextn_predict_layers=1)
    save_hf_folder(random_model(cfg), tokenizer, tmp_path / "hf", dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["num_nextn_predict_layers"] == 1
    assert raw["topk_method"] == "noaux_tc" and raw["scoring_func"] == "sigmoid"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        # Routed experts one tensor each; router bias and weight stay fp32 in a bf16 export.
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    # MTP as DeepSeek's release stores it: layer index num_hidden_layers.
    mtp = {n for n in names if n.startswith("model.layers.3.")}
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.3.{part}" in mtp
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (tmp_path / "hf" / f).is_file()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == raw["eos_token_id"] and tok.bos_token_id == raw["bos_token_id"]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The config.json keys that the serving engines' DeepSeek-V3 model code reads (every
# `config.X` and `getattr(config, "X", ...)` of the main model and its MoE, attention and
# MTP loading), each with what its value must be there. Read from
#   vLLM:   vllm/model_executor/models/deepseek_v2.py (its DeepseekV3ForCausalLM is
#           DeepseekV2ForCausalLM), vllm-project/vllm commit b863fe5bf4e19680572603b4e166faefc5725551;
#   SGLang: python/sglang/srt/models/deepseek_v2.py, sgl-project/sglang commit
#           3e4a39ee73308590c5c753108bdcb8d333f7f1c6.
# Left out: keys only quantized checkpoints, DeepSeek-V3.2's indexer or Llama-4 scaling read.
READ_BY_BOTH = {
    "architectures": lambda v: v == ["DeepseekV3ForCausalLM"],  # vLLM's registry, SGLang's EntryClass
    "hidden_size": _int, "intermediate_size": _int, "num_hidden_layers": _int, "num_attention_heads": _int,
    "vocab_size": _int, "max_position_embeddings": _int, "rms_norm_eps": _number,
    "q_lora_rank": lambda v: v is None or _int(v), "kv_lora_rank": _int, "qk_nope_head_dim": _int,
    "qk_rope_head_dim": _int, "v_head_dim": _int,
    "n_routed_experts": _int, "n_shared_experts": _int, "num_experts_per_tok": _int,
    "moe_intermediate_size": _int, "first_k_dense_replace": _int, "moe_layer_freq": lambda v: v == 1,
    "n_group": _int, "topk_group": _int, "routed_scaling_factor": _number,
    "norm_topk_prob": lambda v: isinstance(v, bool),
    "topk_method": lambda v: v == "noaux_tc",  # both make e_score_correction_bias only for noaux_tc
    "hidden_act": lambda v: v == "silu",  # both refuse any other
    "num_nextn_predict_layers": _int,  # the MTP layers to skip, or to load as the draft model
}
READ_BY_VLLM = {
    "model_type": lambda v: v == "deepseek_v3",  # "deepseek" would make it plain attention
    "num_key_value_heads": _int,
    "scoring_func": lambda v: v == "sigmoid",  # its default is softmax
    "rope_parameters": lambda v: isinstance(v, dict) and v.get("rope_type") in ("default", "yarn"),
}
READ_BY_SGLANG = {"rope_theta": _number, "pad_token_id": _int}
# YaRN's numbers: vLLM reads them from rope_parameters, SGLang from rope_scaling.
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# Present, either engine would take the folder for something else: DeepSeek-V3.2's sparse
# attention (index_topk), a quantized checkpoint, Llama-4 attention scaling.
ABSENT = ("index_topk", "quantization_config", "llama_4_scaling")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_config_carries_every_key_vllm_and_sglang_read(name, tokenizer, tmp_path):
    cfg = config(**CONFIGS[name])
    save_hf_folder(random_model(cfg), tokenizer, tmp_path / "hf", dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, ok in {**READ_BY_BOTH, **READ_BY_VLLM, **READ_BY_SGLANG}.items():
        assert key in raw and ok(raw[key]), (key, raw.get(key))
    assert not [key for key in ABSENT if key in raw]
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"  # --dtype auto: transformers 4's key and 5's
    if cfg.rope_scaling is None:
        assert "rope_scaling" not in raw and raw["rope_parameters"]["rope_type"] == "default"
    else:
        assert raw["rope_scaling"]["type"] == raw["rope_parameters"]["rope_type"] == "yarn"
        for key in YARN_KEYS:
            assert _number(raw["rope_scaling"][key]) and raw["rope_scaling"][key] == raw["rope_parameters"][key], key
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == raw["eos_token_id"]  # where engines stop


def test_the_exported_chat_template_renders_the_instruction_format_the_model_trains_on(tokenizer, tmp_path):
    save_hf_folder(random_model(config(n_routed_experts=0)), tokenizer, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"},
                    {"role": "user", "content": "And 5+5?"}, {"role": "assistant", "content": "10"}]
    turns = chat.turns(conversation)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert rendered == "".join(prompt + answer + tok.eos_token for prompt, answer in turns)
    # What a chat endpoint sends for the next answer: the last user turn and "Assistant: ".
    asking = tok.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    assert asking == turns[0][0] + turns[0][1] + tok.eos_token + turns[1][0]
    assert asking.endswith(chat.prompt_text("And 5+5?"))
    first = tok.apply_chat_template(conversation[1:2], tokenize=False, add_generation_prompt=True)
    assert first == chat.prompt_text("What is 12+30?")


def test_a_bf16_export_rounds_each_weight_once_and_transformers_generates_from_it_as_stalwart_does(
        tokenizer, tmp_path):
    model = random_model(config(**CONFIGS["mtp-two-shared-experts"]))
    save_hf_folder(model, tokenizer, tmp_path / "hf", dtype=torch.bfloat16)
    back, _ = load_hf_folder(tmp_path / "hf")  # upcast to fp32, exactly
    kept = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # the router stays fp32
    ours = back.state_dict()
    for name, t in model.state_dict().items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], t if name.endswith(kept) else t.to(torch.bfloat16).float()), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=2)[0, 8:].tolist()
    assert generate(back, prompt.tolist(), max_new_tokens=24, eos_token_id=-1)[0] == expected
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert auto.dtype == torch.bfloat16  # the folder's own dtype, as engines' --dtype auto takes it


def test_plain_attention_model_refuses_to_export(tokenizer, tmp_path):
    cfg = config(attention="mha", n_routed_experts=0, v_head_dim=24)
    with pytest.raises(ConfigError, match="MLA"):
        save_hf_folder(random_model(cfg), tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_never_leaves_a_half_written_folder(tokenizer, tmp_path, monkeypatch):
    import stalwart.export.hf as hf_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_module, "save_tokenizer", full_disk)  # fails after the weights are written
    with pytest.raises(OSError):
        save_hf_folder(random_model(config()), tokenizer, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json not found"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "corrupt or truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "not found"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "hidden_size": 96})), "shape"),
])
def test_damaged_folder_is_a_model_file_error(damage, message, tokenizer, tmp_path):
    save_hf_folder(random_model(config()), tokenizer, tmp_path / "hf")
    damage(tmp_path / "hf")
    with pytest.raises(ModelFileError, match=message):
        load_hf_folder(tmp_path / "hf")


def test_an_export_above_the_shard_size_is_numbered_files_with_an_index_that_both_sides_load(tokenizer, tmp_path):
    model = random_model(config(**CONFIGS["moe-grouped-several-per-token"]))
    total = sum(t.numel() * 4 for t in to_hf_state_dict(model).values())
    save_hf_folder(model, tokenizer, tmp_path / "hf", max_shard_bytes=total // 3)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) >= 3 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and index["metadata"]["total_size"] == total
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    for f in files:  # no file above the limit unless one tensor alone is
        with safe_open(str(tmp_path / "hf" / f), "pt") as st:
            sizes = [st.get_tensor(k).numel() * 4 for k in st.keys()]
        assert sum(sizes) <= total // 3 or len(sizes) == 1
    back, _ = load_hf_folder(tmp_path / "hf")
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def _export_rank(rank: int, port: int, cfg: ModelConfig, tokenizer, targets: dict, max_bytes: int, results) -> None:
    """One of two gloo ranks: the model built on meta, FSDP2-sharded over both, exported to
    each of `targets` with rank 0 writing; reports (rank, target, outcome, the most bytes of
    gathered tensors rank 0 held at once)."""
    from stalwart.parallel.fsdp import Sharding

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        model = DeepSeekForCausalLM(cfg, device="meta")
        sharding = Sharding(model, ranks=2, fsdp=2, ep=1, device=torch.device("cpu"), bf16=False)
        torch.manual_seed(0)
        model.materialize("cpu", place=sharding.place)
        live: list[tuple[weakref.ref, int]] = []
        peak = 0

        def gather(t: torch.Tensor) -> torch.Tensor | None:
            nonlocal peak
            whole = sharding.full(t)
            if whole is not None and whole is not t:  # a plain tensor of the model is not a copy
                live.append((weakref.ref(whole), whole.numel() * whole.element_size()))
                peak = max(peak, sum(n for ref, n in live if ref() is not None))
            return whole

        for name, target in targets.items():
            try:
                save_hf_folder(model, tokenizer, target, max_shard_bytes=max_bytes, gather=gather, writer=rank == 0)
                results.put((rank, name, "written" if rank == 0 else "gathered", peak))
            except OSError as e:
                results.put((rank, name, f"errno {e.errno}", peak))
            except UserError as e:
                results.put((rank, name, str(e), peak))
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_model_exports_file_by_file_as_the_whole_one_does_and_no_failure_of_the_writer_hangs_a_rank(
        tokenizer, tmp_path):
    # Two FSDP2 ranks export one model to numbered files, each file's tensors gathered as it is
    # written: the files are byte for byte those of the same model exported whole, and the
    # writer never held more than half the model's gathered tensors at once. Then the writer
    # fails, and keeps taking part in the gathers so that both ranks come back: a file is where
    # the folder should be (before any file is written), and a real 256 KiB tmpfs fills
    # (ENOSPC while writing; no folder is left behind).
    cfg = config(**CONFIGS["moe-grouped-several-per-token"])
    torch.manual_seed(0)
    whole = DeepSeekForCausalLM(cfg)
    total = sum(t.numel() * 4 for t in to_hf_state_dict(whole).values())
    save_hf_folder(whole, tokenizer, tmp_path / "whole", max_shard_bytes=total // 4)
    (tmp_path / "in the way").write_text("not a folder")
    targets = {"sharded": tmp_path / "sharded", "file in the way": tmp_path / "in the way"}
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode == 0:
        targets["full disk"] = disk / "hf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    ranks = [fork.Process(target=_export_rank, args=(r, port, cfg, tokenizer, targets, total // 4, results))
             for r in range(2)]
    try:
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=120)
        assert [process.exitcode for process in ranks] == [0, 0]
        outcomes = {(rank, name): (outcome, peak) for rank, name, outcome, peak in
                    (results.get(timeout=5) for _ in range(2 * len(targets)))}
    finally:
        for process in ranks:
            process.kill()
        if mounted.returncode == 0:
            subprocess.run(["umount", str(disk)], check=True)
    files = sorted(f.name for f in (tmp_path / "whole").iterdir())
    assert len([f for f in files if f.startswith("model-")]) >= 4
    assert sorted(f.name for f in (tmp_path / "sharded").iterdir()) == files
    for name in files:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert outcomes[0, "sharded"][0] == "written" and outcomes[1, "sharded"][0] == "gathered"
    assert 0 < outcomes[0, "sharded"][1] <= total // 2
    assert "exists and is not a folder" in outcomes[0, "file in the way"][0]
    assert outcomes[1, "file in the way"][0] == "gathered"
    if "full disk" not in targets:
        pytest.skip("the full-disk half needs a tmpfs mount (root); the file-by-file export passed")
    assert outcomes[0, "full disk"][0] == "errno 28" and outcomes[1, "full disk"][0] == "gathered"
    assert not (disk / "hf").exists()
