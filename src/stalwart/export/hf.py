"""Hugging Face model folders: the state-dict adapter between stalwart and `deepseek_v3`.

A folder holds config.json (`model_type: deepseek_v3`, every field transformers and the
serving engines read: tests/test_export_hf.py lists vLLM's and SGLang's),
generation_config.json, model.safetensors with transformers' weight names (above 5 GB,
numbered files and model.safetensors.index.json, as transformers shards them), and the
tokenizer files with the instruction format's chat template. docs/serving.md says how
transformers, vLLM and SGLang serve it. Differences from our in-memory layout, and nothing
else:

- routed experts are stacked (E, out, in) in memory and one tensor per expert on disk,
  `mlp.experts.{e}.{gate,up,down}_proj.weight`, as DeepSeek's release stores them;
- MTP module i is stored as layer `num_hidden_layers + i` (enorm, hnorm, eh_proj, the
  decoder layer, shared_head.norm, and copies of embed_tokens and shared_head.head), as
  DeepSeek's release stores layer 61; transformers skips it when loading;
- the router's `e_score_correction_bias` and weight stay fp32 whatever the export dtype.

Reading accepts the same layout, and also transformers' fused in-memory experts
(`gate_up_proj`, `down_proj`) in case a folder was saved without conversion.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from stalwart.data.tokenizer import declared_special_ids, load_tokenizer, save_tokenizer
from stalwart.errors import ConfigError, ModelFileError
from stalwart.fsutil import atomic_directory, atomic_write_bytes, atomic_write_json
from stalwart.model import DeepSeekForCausalLM, ModelConfig, RopeScaling

WEIGHTS_FILE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
# The names `export.dtype` and `stalwart export --dtype` take, as torch dtypes.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_FILE = "config.json"
# Fields of ours that deepseek_v3 has no name for; kept so that a re-import trains the same.
TRAINING_FIELDS = ("bias_update_speed", "seq_aux_loss_alpha", "mtp_loss_weight")
_EXPERT = re.compile(r"^(.*mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    if cfg.attention != "mla":
        raise ConfigError("only MLA models export as deepseek_v3 (model.attention is 'mha')")
    dense = not cfg.is_moe
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        # A dense model is a deepseek_v3 whose every layer is below first_k_dense_replace.
        "first_k_dense_replace": cfg.num_hidden_layers if dense else cfg.first_k_dense_replace,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "rope_theta": cfg.rope_theta,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        # transformers 4 and the engines built on it read torch_dtype, transformers 5 dtype.
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "stalwart": {name: getattr(cfg, name) for name in TRAINING_FIELDS},
    }
    if dense:  # transformers reads the layer kind from first_k_dense_replace alone
        out["stalwart"]["first_k_dense_replace"] = cfg.first_k_dense_replace
    # rope_scaling is DeepSeek's own key (read by vLLM/SGLang); rope_parameters is
    # transformers 5's. Both carry the same numbers.
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = dataclasses.asdict(cfg.rope_scaling)
        out["rope_scaling"] = {"type": "yarn", **s}
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **s}
    out["rope_parameters"] = rope
    return out


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ModelFileError("config.json is not a JSON object")
    if not isinstance(raw.get("stalwart", {}), dict):
        raise ModelFileError("config.json: the 'stalwart' entry must be an object")
    if raw.get("model_type") != "deepseek_v3":
        raise ModelFileError(f"config.json has model_type {raw.get('model_type')!r}, expected 'deepseek_v3'")
    try:
        layers = raw["num_hidden_layers"]
        dense = not raw.get("n_routed_experts") or raw.get("first_k_dense_replace", 0) >= layers
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        kwargs = {k: raw[k] for k in fields if k in raw and k not in ("rope_scaling", "attention")}
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        kind = rope.get("type") or rope.get("rope_type") or "default"
        if kind == "yarn":
            names = {f.name for f in dataclasses.fields(RopeScaling)}
            kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k in names}
        elif kind != "default":
            raise ModelFileError(f"config.json: rope type {kind!r} is not supported (default or yarn)")
        if "rope_theta" not in raw and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if dense:
            kwargs["n_routed_experts"] = 0
        kwargs.update(raw.get("stalwart", {}))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = kwargs[name][0]
            if kwargs.get(name) is None:
                kwargs.pop(name, None)
    except (KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"config.json is incomplete or malformed: {e}") from None
    return ModelConfig.from_dict(kwargs)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of the folder, made only when written: `source` (row `index` of it for a
    routed expert) in `dtype`."""
    name: str
    source: torch.Tensor
    index: int | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        shape = self.source.shape[1:] if self.index is not None else self.source.shape
        return math.prod(shape) * self.dtype.itemsize

    def tensor(self, whole: torch.Tensor | None = None) -> torch.Tensor:
        """The folder's tensor, from `whole` (the source made whole, for a sharded one)."""
        t = self.source if whole is None else whole
        t = t if self.index is None else t[self.index]
        return t.detach().to("cpu", self.dtype).clone().contiguous()


def _hf_entries(model: DeepSeekForCausalLM, dtype: torch.dtype) -> list[_Entry]:
    """Every tensor of the folder, in file order, none of them copied yet."""
    cfg = model.cfg
    out: list[_Entry] = []

    def put(name: str, t: torch.Tensor, index: int | None = None) -> None:
        out.append(_Entry(name, t, index, torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype))

    def put_module(prefix: str, module: torch.nn.Module) -> None:
        for name, t in module.state_dict().items():
            m = _EXPERT.match(name)
            if m:
                for e in range(t.shape[0]):
                    put(f"{prefix}{m[1]}.{e}.{m[2]}.weight", t, e)
            else:
                put(prefix + name, t)

    put_module("model.", model.model)
    put("lm_head.weight", model.lm_head.weight)
    for i, mtp in enumerate(model.mtp):
        p = f"model.layers.{cfg.num_hidden_layers + i}."
        put_module(p, mtp.layer)
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            put(p + name, mtp.get_parameter(name))
        put(p + "shared_head.norm.weight", mtp.head_norm.weight)
        put(p + "embed_tokens.weight", model.model.embed_tokens.weight)
        put(p + "shared_head.head.weight", model.lm_head.weight)
    return out


def to_hf_state_dict(model: DeepSeekForCausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The folder's tensors by name, all in memory (the export writes them file by file)."""
    return {e.name: e.tensor() for e in _hf_entries(model, dtype)}


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive runs of entries of at most `max_bytes` each (a larger tensor alone)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def from_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF names to ours; raise ModelFileError naming any missing or misshapen tensor."""
    return dict(_our_tensors(cfg, tensors))


def _our_tensors(cfg: ModelConfig, tensors: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of our model's state dict by our name, made from the folder's `tensors` (a
    dict, or a `_FolderTensors` that reads one at a time) only when its turn comes."""
    expected = DeepSeekForCausalLM(cfg, device="meta").state_dict()
    L = cfg.num_hidden_layers
    for name, ref in expected.items():
        hf = name
        m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
        if m:
            rest = m[2].removeprefix("layer.").replace("head_norm.", "shared_head.norm.")
            hf = f"model.layers.{L + int(m[1])}.{rest}"
        em = _EXPERT.match(hf)
        if em:
            t = _stack_experts(tensors, em[1], em[2], ref.shape[0])
        elif hf in tensors:
            t = tensors[hf]
        else:
            raise ModelFileError(f"{WEIGHTS_FILE} lacks tensor {hf}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ModelFileError(f"{WEIGHTS_FILE}: {hf} has shape {tuple(t.shape)}, config says {tuple(ref.shape)}")
        yield name, t


class _FolderTensors:
    """A folder's tensors by name, each read from its file when asked for (safetensors maps
    the files; nothing is held beyond the tensor returned)."""

    def __init__(self, path: Path) -> None:
        self._files: dict[str, Path] = {}
        for f in _weight_files(path):
            for name in _names_in(f):
                self._files[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor | None:
        return self[name] if name in self else None

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self._files[name]), "pt") as st:
                return st.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{self._files[name]} is corrupt or truncated: {e}") from None


def _stack_experts(tensors: dict[str, torch.Tensor], prefix: str, proj: str, n: int) -> torch.Tensor:
    per_expert = [f"{prefix}.{e}.{proj}.weight" for e in range(n)]
    if all(k in tensors for k in per_expert):
        return torch.stack([tensors[k] for k in per_expert])
    if proj == "down_proj" and f"{prefix}.down_proj" in tensors:
        return tensors[f"{prefix}.down_proj"]
    if f"{prefix}.gate_up_proj" in tensors:
        gate, up = tensors[f"{prefix}.gate_up_proj"].chunk(2, dim=1)
        return gate if proj == "gate_proj" else up
    raise ModelFileError(f"{WEIGHTS_FILE} lacks tensor {per_expert[0]}")


def save_hf_folder(model: DeepSeekForCausalLM, tokenizer: Any, out: Path, *, dtype: torch.dtype = torch.float32,
                   replace: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                   gather: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   writer: bool = True) -> Path | None:
    """Write the HF folder atomically: it appears complete or not at all. Weights above
    `max_shard_bytes` go to model-0000i-of-0000n.safetensors files with
    model.safetensors.index.json, as transformers writes them. One file's tensors at a time
    are made and copied, so the export never holds the model twice.

    A sharded model (parallel/fsdp.py) is written by every rank of its mesh calling this
    with `gather` (a sharded tensor whole on the writer, None elsewhere: a collective) and
    only one `writer`: each file's tensors are gathered as the file is written, so the
    writer holds one file (and the stacked experts it draws on) at a time, never the whole
    model. Whatever fails on the writer (the folder, a write, a full disk), it goes on
    gathering before it raises, so that no rank waits forever. The other ranks return None."""
    cfg = model.cfg
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, model only {cfg.vocab_size}")
    entries = _hf_entries(model, dtype)
    shards = _shards(entries, max_shard_bytes)
    files = (_file_tensors(shard, gather, make=writer) for shard in shards)  # the gathers happen here
    if not writer:
        for _ in files:
            pass
        return None
    names = [WEIGHTS_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    try:
        with atomic_directory(out, replace=replace) as tmp:
            for name, tensors in zip(names, files):
                # Serialised in memory and written by us: safetensors' own writer reports a
                # full disk as a SafetensorError rather than an OSError.
                atomic_write_bytes(tmp / name, save(tensors, metadata={"format": "pt"}))
                del tensors
            if len(shards) > 1:
                atomic_write_json(tmp / f"{WEIGHTS_FILE}.index.json", {
                    "metadata": {"total_size": sum(e.nbytes for e in entries)},
                    "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}})
            atomic_write_json(tmp / CONFIG_FILE, hf_config(cfg, dtype))
            atomic_write_json(tmp / "generation_config.json", {
                "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                "pad_token_id": cfg.pad_token_id, "do_sample": False})
            save_tokenizer(tokenizer, tmp, model_max_length=cfg.max_position_embeddings, bos_id=cfg.bos_token_id,
                           eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    finally:
        if gather is not None:  # after a failure: the gathers the other ranks are waiting for
            for _ in files:
                pass
    return Path(out)


def _file_tensors(shard: list[_Entry], gather: Callable[[torch.Tensor], torch.Tensor | None] | None, *,
                  make: bool = True) -> dict[str, torch.Tensor]:
    """One file's tensors by name (`make` False: none, only the gathers); with `gather`, each
    source made whole once for the file (a collective, in the same order on every rank)."""
    if gather is None:
        return {e.name: e.tensor() for e in shard} if make else {}
    wholes: dict[int, torch.Tensor | None] = {}
    for e in shard:
        if id(e.source) not in wholes:
            wholes[id(e.source)] = gather(e.source)
    if not make:
        return {}
    return {e.name: e.tensor(wholes[id(e.source)]) for e in shard if wholes[id(e.source)] is not None}


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(path: Path, tokenizer: Any = None) -> ModelConfig:
    """The model config of an HF folder; a missing or malformed file is a ModelFileError.
    With the folder's `tokenizer`: the bos / eos / pad ids config.json does not give are the
    ones the tokenizer's own config declares, and a tokenizer larger than the model's
    vocabulary is refused."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"{path} is not a folder")
    config_path = path / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{config_path} not found: not a model folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_path} is not valid JSON: {e}") from None
    quantized = raw.get("quantization_config") if isinstance(raw, dict) else None
    if quantized:
        method = quantized.get("quant_method", "quantized") if isinstance(quantized, dict) else "quantized"
        raise ModelFileError(f"{path}: its weights are {method} (quantization_config); stalwart reads fp32, bf16 or "
                             "fp16 weights: dequantize the folder first")
    cfg = config_from_hf(raw)
    if tokenizer is None:
        return cfg
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ModelFileError(f"{path}: its tokenizer has {tokenizer.get_vocab_size()} tokens, the model's "
                             f"vocabulary only {cfg.vocab_size}")
    given = {**raw, **raw.get("stalwart", {})} if isinstance(raw, dict) else {}
    declared = {k: v for k, v in declared_special_ids(path, tokenizer).items() if given.get(k) is None}
    return cfg.replace(**declared) if declared else cfg


def folder_config(path: Path, tokenizer: Any) -> ModelConfig:
    """The model config of an HF folder as its weights are: read_hf_config's, without MTP when
    the weights have none (transformers drops the MTP layer when it loads and re-saves a
    folder; the main model is complete without it)."""
    cfg = read_hf_config(path, tokenizer)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(name.startswith(mtp_prefix) for name in _weight_names(path)):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return cfg


def load_hf_folder(path: Path) -> tuple[DeepSeekForCausalLM, Any]:
    """Load an HF deepseek_v3 folder (ours or transformers', with its own tokenizer) into our
    model, on CPU, in fp32 whatever the folder's dtype: upcasting a bf16 or fp16 folder is
    exact, so `generate` computes with exactly the weights the folder holds (in fp32, which
    every CPU kernel supports), and `verify --export` takes it as its reference for a device
    copy in the dtype under test."""
    path = Path(path)
    read_hf_config(path)  # a folder of another architecture is named as such, whatever else it lacks
    tokenizer = load_tokenizer(path)
    cfg = folder_config(path, tokenizer)
    model = DeepSeekForCausalLM(cfg, device="meta")  # the file's tensors become the weights: one copy
    model.load_state_dict({k: v.float() for k, v in from_hf_state_dict(cfg, _load_weights(path)).items()},
                          strict=True, assign=True)
    model.reset_buffers()
    return model, tokenizer


@torch.no_grad()
def load_folder_weights(model: DeepSeekForCausalLM, path: Path,
                        place: Callable[[torch.Tensor, torch.Tensor], None] = lambda t, whole: t.copy_(whole)) -> None:
    """An HF folder's weights (and router biases) into `model` as its initial state
    (`model.from`), read one tensor at a time: each whole tensor handed to `place`, which keeps
    this process's part of it (the whole by default; a shard: `Sharding.place`). The model's
    config must be the folder's; a tensor that is missing or of another shape is a
    ModelFileError."""
    targets = model.state_dict(keep_vars=True)
    loaded = set()
    for name, whole in _our_tensors(model.cfg, _FolderTensors(Path(path))):
        place(targets[name], whole.to(targets[name].dtype))
        loaded.add(name)
    if loaded != set(targets):
        raise ModelFileError(f"{path}: no tensor for {', '.join(sorted(set(targets) - loaded)[:3])}")


def _weight_files(path: Path) -> list[Path]:
    index = path / f"{WEIGHTS_FILE}.index.json"
    files = [path / WEIGHTS_FILE]
    if not files[0].exists() and index.exists():
        try:
            files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(f"{index} is malformed: {e}") from None
    return files


def _weight_names(path: Path) -> list[str]:
    """The tensor names of a folder's weights, read from the files' headers only."""
    return [name for f in _weight_files(path) for name in _names_in(f)]


def _names_in(f: Path) -> list[str]:
    try:
        with safe_open(str(f), "pt") as st:
            return list(st.keys())
    except FileNotFoundError:
        raise ModelFileError(f"{f} not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{f} is corrupt or truncated: {e}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            tensors.update(load_file(str(f)))
        except FileNotFoundError:
            raise ModelFileError(f"{f} not found") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{f} is corrupt or truncated: {e}") from None
    return tensors
