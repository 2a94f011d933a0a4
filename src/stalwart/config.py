"""The typed run configuration: one frozen dataclass per component, validated on load, and
`--section.key value` overrides from the command line.

Every error names the field (`train.steps must be >= 1, got 0`), so a user can fix it
from the message alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart.compress import COMPRESSIONS
from stalwart.data.tasks import TASKS
from stalwart.errors import ConfigError, UserError
from stalwart.fields import check_fields
from stalwart.model import ModelConfig, preset
from stalwart.model.config import validate as validate_model


@dataclass(frozen=True)
class DataConfig:
    task: str = "addition"  # a generated task (data/tasks.py), or "files" for data.files
    # when task is "files": .txt, .jsonl, .parquet files, saved datasets, folders (data/files.py)
    files: tuple[str, ...] = ()
    format: str = "text"  # text: documents; chat: conversations, trained on the answers (data/chat.py)
    field: str = ""  # the record field read: "" is text's "text", chat's "messages"
    min_digits: int = 3  # operand width, drawn in [min_digits, max_digits]
    max_digits: int = 3  # see min_digits
    seq_len: int = 128  # tokens per training sequence
    seed: int = 0  # the generated problems' and the epoch order's seed
    tokenizer_documents: int = 4000  # documents the BPE tokenizer is trained on
    tokenizer: str = ""  # a tokenizer.json (or a folder with one) to use instead of training one

    @property
    def record_field(self) -> str:
        return self.field or ("messages" if self.format == "chat" else "text")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak AdamW learning rate, after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only (not norms or the router)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500  # optimizer steps of the run
    batch_size: int = 32  # sequences per micro-batch and data shard (a step trains grad_accum of them)
    grad_accum: int = 1  # micro-batches accumulated per step
    seed: int = 0  # the initial weights and every other random draw of training
    device: str = "auto"  # auto, cpu, cuda[:N], npu[:N], xpu[:N], mps
    dtype: str = "auto"  # auto (bf16 autocast where the device has it, else fp32), fp32, bf16
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # steps between progress lines (metrics.jsonl has every step)
    # Data provenance: each metrics record lists the loader position ("position:start:skip")
    # of every data shard whose batch the step trained, so that a run can be audited for
    # batches trained twice or skipped.
    trace_data: bool = False
    report: bool = True  # write report.png and report.md at the end (`stalwart report` draws them any time)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 250  # steps between evaluations (and at the end); 0: only at the end
    problems: int = 200  # held-out problems scored by exact match
    batches: int = 4  # held-out batches for the eval loss


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and at the end)
    keep: int = 3  # checkpoints kept (the newest)
    # > 0: checkpoint at the Young/Daly interval sqrt(2 * C * MTBF) - C, with C the measured
    # cost of the last checkpoint; `every` is then only the interval until C is known.
    mtbf_s: float = 0.0
    # "": RUN_DIR/checkpoints. Groups on several machines with their own RUN_DIRs point this
    # at one shared folder, so that a rollback or a restart finds the checkpoints anywhere.
    dir: str = ""


STRATEGIES = ("ddp", "diloco", "streaming")


@dataclass(frozen=True)
class ReplicasConfig:
    """Replica groups on torchft (replication/). Timeouts bound how long a dead or hung group
    can hold up the others; see replication/group.py for what each one covers."""
    count: int = 1  # replica groups; 1 trains in this process without torchft
    ranks_per_group: int = 1  # processes per group (torchrun), each on its own data shard
    min_replicas: int = 1  # fewer live groups than this: steps are not committed
    timeout_s: float = 5.0  # collectives, the commit vote and a heal's state transfer
    # One quorum attempt; a failed one (Lighthouse unreachable, too few groups) is retried
    # until lighthouse_grace_s is spent. It bounds how long an outage goes unnoticed.
    quorum_timeout_s: float = 5.0
    # The Lighthouse drops a group silent this long (torchft heartbeats every 0.1 s from a
    # thread of its own, busy Python or not): a group that died mid-step holds up its
    # peers' next quorum until then, unless join_timeout_s ends the wait first.
    heartbeat_timeout_s: float = 1.0
    # The Lighthouse waits this long for late joiners of a quorum. A group that has just
    # served or received a heal arrives up to a second late: below that, it misses the next
    # quorum and heals again, and the next donor after it (measured: 0.5 s cascades).
    join_timeout_s: float = 1.0
    max_restarts: int = 10  # per group, by the supervisor; then the group stays down
    restart_backoff_s: float = 0.5  # first restart delay, doubled per restart of the same group (max 8 s)
    # The supervisor kills and restarts a group with no progress (step, eval batch) this long;
    # keep it above quorum_timeout_s, which a healthy group may spend waiting for a quorum.
    hang_timeout_s: float = 90.0
    # A group that has not beaten once since it was started (imports, model, checkpoint
    # load, the wait for the other groups) is killed and restarted after this long instead.
    start_timeout_s: float = 300.0
    # One rank per group: the supervisor keeps a process with the training stack imported,
    # so a restart skips the interpreter and import start (seconds on a busy host).
    warm_spare: bool = True
    torchft_defaults: bool = False  # use torchft's own timeouts (60 s) instead: the benchmark baseline
    # A Lighthouse that cannot be reached: groups keep their process and retry the quorum
    # this long before they give up (a restarted Lighthouse on the same address lets them on).
    lighthouse_grace_s: float = 60.0
    # In the quorum but every collective fails (a partition of the data plane): after this
    # many consecutive failed steps the group leaves the job and rejoins (and heals) later.
    max_failed_steps: int = 8
    # A group that committed this many steps since its last restart has its restart budget
    # (max_restarts) refilled: a fault a day for a month is not a crash loop.
    restart_refill_steps: int = 500
    # How the groups combine their work (training/outer.py): ddp sums gradients every step;
    # diloco trains inner_steps local AdamW steps, then takes one outer Nesterov step on the
    # groups' averaged pseudo-gradient (Douillard et al. 2023: lr 0.7, momentum 0.9).
    strategy: str = "ddp"  # ddp: gradients summed every step; diloco, streaming: an outer step per round
    inner_steps: int | str = 50  # diloco, streaming: inner steps per round; auto: as many as fit in round_s
    # inner_steps auto: a round's time budget in seconds (streaming: of all fragments'
    # rounds together), so that groups of different speeds arrive at the sync together.
    round_s: float = 10.0
    outer_lr: float = 0.7  # DiLoCo's outer Nesterov learning rate
    outer_momentum: float = 0.9  # DiLoCo's outer Nesterov momentum
    compression: str = "none"  # none, int8, int4, int2: the outer gradient on the wire (compress.py)
    error_feedback: bool = False  # carry what compression lost into the next round
    # streaming (Streaming DiLoCo, Douillard et al. 2025): the model in `fragments` fragments,
    # strided across depth; one fragment's outer step every inner_steps / fragments steps,
    # its exchange overlapped by `overlap_steps` inner steps (tau) and the result mixed in
    # as mixing x local + (1 - mixing) x global (alpha).
    fragments: int = 2  # streaming: fragments of the model, strided across depth
    overlap_steps: int = 1  # streaming: inner steps an exchange overlaps (tau)
    mixing: float = 0.5  # streaming: weight of the local fragment in the merge (alpha)
@dataclass(frozen=True)
class GuardsConfig:
    """guards.py: what makes a step or a replica bad."""
    spike_sigma: float = 6.0  # 0 disables spike detection (OLMo-core: 6 sigma)
    spike_window: int = 128  # accepted steps in the rolling window (OLMo-core: 128)
    spike_min_history: int = 50  # accepted steps before spikes are judged (early training is noisy)
    rollback_spikes: int = 3  # this many spikes within rollback_window steps roll back; 0: never
    rollback_window: int = 50  # see rollback_spikes
    fingerprint_every: int = 10  # steps between cross-replica fingerprint checks; 0: never
    straggler_factor: float = 2.0  # compute time above factor x median is slow; 0: no tracking
    straggler_patience: int = 20  # consecutive slow steps before a group is reported
    exclude_stragglers: bool = False  # a reported straggler leaves the job
    # Consecutive steps without a commit before escalating: a fingerprint check at this
    # many, a rollback to the last checkpoint at twice as many, a stop (exit code 1) at three times.
    max_uncommitted_steps: int = 20
    # A group whose own values are not finite again right after a heal is restarted; after
    # this many such restarts the supervisor abandons it.
    nonfinite_restarts: int = 2


@dataclass(frozen=True)
class ParallelConfig:
    """parallel/: how the ranks of one torchrun launch (or of one replica group) share the model."""
    # Ranks that shard one copy of parameters, gradients and optimizer state (FSDP2);
    # 0: every rank of the launch or group, 1: none (plain data parallelism). Across
    # replica groups, each rank exchanges its shards with the same rank of the others (HSDP).
    fsdp: int = 0
    # Ranks that split the routed experts of every MoE layer (expert parallelism, tokens
    # sent to their experts with all_to_all); 1: every rank holds every expert.
    ep: int = 1


RL_LOSSES = ("grpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class RLConfig:
    """`stalwart rl` (rl/): GRPO on the task's verifiable rewards; train.steps counts RL steps."""
    start: str = ""  # the model it starts from (--from): a run directory or a model folder, absolute
    group_size: int = 8  # G completions sampled per prompt
    prompts: int = 8  # prompts per step
    max_new_tokens: int = 64  # the longest completion
    temperature: float = 1.0  # of the sampler
    loss: str = "grpo"  # grpo, dr_grpo or dapo (rl/objective.py)
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # (DAPO's clip-higher: 0.28)
    kl_coef: float = 0.0  # weight of the KL penalty to the starting model; 0: none, no reference kept
    updates: int = 1  # optimizer steps on each batch of rollouts
    format_reward: float = 0.1  # reward for ending with a final answer ("so N"), right or not
    pass_k: int = 8  # pass@k measured before and after, on the eval problems
    routing_replay: bool = False  # score completions with the experts the sampler chose (rl/routing.py)


EXPORT_DTYPES = ("bf16", "fp32")
DATA_FORMATS = ("text", "chat")
TRACKERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class ExportConfig:
    """The Hugging Face folder written at the end of training (RUN_DIR/export)."""
    dtype: str = "bf16"  # bf16 (what serving engines load) or fp32; the router stays fp32 in both
    # Above this, numbered files with model.safetensors.index.json: transformers' default
    # max_shard_size (5GB, export/hf.py MAX_SHARD_BYTES).
    max_shard_gb: float = 5.0


@dataclass(frozen=True)
class RunConfig:
    recipe: str = "default"
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    # Where metrics go besides metrics.jsonl (`--track tensorboard,wandb`): optional sinks.
    track: tuple[str, ...] = ()
    # `model.from`: a DeepSeek-V3-format folder whose config is the model's and whose weights
    # the run starts from (continued pre-training, fine-tuning); "": random initial weights.
    model_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["track"] = list(self.track)  # a JSON list, as config.json holds it (from_dict wants one)
        source = raw.pop("model_from")
        if source:  # kept in the model section, under the key the command line names it by
            raw["model"]["from"] = source
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError("a run config must be a JSON object")
        sections = {f.name for f in dataclasses.fields(RunConfig)} - {"model_from"}
        unknown = sorted(set(raw) - sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(RunConfig):
            if f.name not in raw:
                continue
            if f.name == "recipe":
                kwargs["recipe"] = raw["recipe"]
            elif f.name == "track":
                if not isinstance(raw["track"], list) or not all(isinstance(t, str) for t in raw["track"]):
                    raise ConfigError(f"track must be a list of sink names, got {raw['track']!r}")
                kwargs["track"] = tuple(raw["track"])
            elif f.name == "model":
                if not isinstance(raw["model"], dict):
                    raise ConfigError("config section model must be an object")
                model = dict(raw["model"])
                source = model.pop("from", "")
                if not isinstance(source, str):
                    raise ConfigError(f"model.from must be a folder path, got {source!r}")
                kwargs["model"], kwargs["model_from"] = ModelConfig.from_dict(model), source
            else:
                kwargs[f.name] = _section(f.name, SECTION_TYPES[f.name], raw[f.name])
        return validate(RunConfig(**kwargs))


MAX_STEPS = 999_999  # checkpoint folders are step-NNNNNN

# What --resume may change: how long, how often, where. Anything else (model shape, data,
# optimizer) would not continue the same run.
# replicas.count and replicas.ranks_per_group fix the data shards (the data ledger has one
# position per shard), so a resumed run keeps them.
RESUMABLE_OVERRIDES = ("train.steps", "train.log_every", "train.device", "train.compile", "train.trace_data",
                       "train.report",
                       "eval.every", "eval.problems", "eval.batches", "checkpoint.every", "checkpoint.keep",
                       "checkpoint.mtbf_s", "checkpoint.dir",
                       *(f"replicas.{f.name}" for f in dataclasses.fields(ReplicasConfig)
                         if f.name not in ("count", "ranks_per_group", "strategy", "fragments")),
                       *(f"guards.{f.name}" for f in dataclasses.fields(GuardsConfig)),
                       # any layout loads any checkpoint, whole or sharded (DCP reshards: checkpoint.py)
                       *(f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)),
                       *(f"export.{f.name}" for f in dataclasses.fields(ExportConfig)))

SECTION_TYPES = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
                 "checkpoint": CheckpointConfig, "replicas": ReplicasConfig, "guards": GuardsConfig,
                 "parallel": ParallelConfig, "export": ExportConfig, "rl": RLConfig}


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name} must be an object")
    check_fields(name, cls, raw)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def parse_value(name: str, type_name: str, text: str) -> Any:
    """A command-line string as the field's type."""
    try:
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
        if type_name == "int | str":
            return int(text) if text.lstrip("-").isdigit() else text
        if type_name == "int | None":
            return None if text.lower() in ("none", "null") else int(text)
        if type_name == "bool":
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_name == "tuple[str, ...]":
            return tuple(p for p in text.split(",") if p)
        if type_name == "RopeScaling | None":
            return None if text.lower() in ("none", "null") else json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"--{name} expects {type_name}, got {text!r}") from None
    return text


def read_run_config(path: Path) -> RunConfig:
    """RUN_DIR/config.json as a validated RunConfig; any problem is one UserError line."""
    try:
        return RunConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"{path} not found: {Path(path).parent} is not a run directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply {"section.key": value} overrides, each the command line's text (parsed as the
    field's type) or a typed value (a config file's); names and types are checked. `model.from`
    FOLDER comes first (kept as an absolute path): the folder's model config (with the special
    ids of its tokenizer, or of data.tokenizer's when given) replaces the recipe's, its
    tokenizer is the run's unless data.tokenizer is given, and the other model.* overrides
    apply on top, as long as the folder's weights still fit the model. The folder a run
    already starts from is not read again (a resume, a restart)."""
    raw = cfg.to_dict()
    folder = None
    already = bool(cfg.model_from) and Path(overrides.get("model.from", "")).resolve() == Path(cfg.model_from)
    if "model.from" in overrides and not already:
        from stalwart.data.tokenizer import load_tokenizer
        from stalwart.export.hf import folder_config

        source = Path(overrides["model.from"]).resolve()
        if not source.is_dir():
            raise ConfigError(f"model.from {overrides['model.from']} is not a model folder")
        other = overrides.get("data.tokenizer")
        folder = folder_config(source, None if other else load_tokenizer(source))
        raw["model"] = {**dataclasses.asdict(folder), "from": str(source)}
        raw["data"]["tokenizer"] = str(source)
    for name, text in ((k, v) for k, v in overrides.items() if k != "model.from"):
        section, _, key = name.partition(".")
        if section not in SECTION_TYPES and section != "model" or not key:
            raise ConfigError(f"unknown config key {name} (sections: model, {', '.join(SECTION_TYPES)})")
        cls = ModelConfig if section == "model" else SECTION_TYPES[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(f"unknown config key {name} (known in {section}: {', '.join(fields)})")
        raw[section][key] = parse_value(name, fields[key].type, text) if isinstance(text, str) else text
    result = RunConfig.from_dict(raw)
    if folder is not None:
        _check_fits(result.model, folder, result.model_from)
    return result


def _check_fits(model: ModelConfig, folder: ModelConfig, source: str) -> None:
    """Refuse model.* overrides that change a tensor's shape: the folder's weights load only
    into its own shapes."""
    from stalwart.model import DeepSeekForCausalLM

    ours = DeepSeekForCausalLM(model, device="meta").state_dict()
    theirs = DeepSeekForCausalLM(folder, device="meta").state_dict()
    for name in sorted(ours.keys() | theirs.keys()):
        want = tuple(theirs[name].shape) if name in theirs else None
        got = tuple(ours[name].shape) if name in ours else None
        if want != got:
            raise ConfigError(f"model.from {source}: the model.* overrides make {name} {got or 'absent'} where the "
                              f"folder has {want or 'none'}; its weights load only into its own shapes")


def validate(cfg: RunConfig) -> RunConfig:
    validate_model(cfg.model)
    d, o, t, e, c = cfg.data, cfg.optim, cfg.train, cfg.eval, cfg.checkpoint

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(d.task in TASKS + ("files",), f"data.task must be one of {', '.join(TASKS + ('files',))}, got {d.task!r}")
    need(d.task != "files" or bool(d.files), "data.files must list at least one file when data.task is 'files'")
    need(d.task == "files" or not d.files, f"data.files is read only when data.task is 'files' (it is {d.task!r})")
    need(d.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}")
    need(d.task == "files" or (d.format, d.field) == ("text", ""),
         f"data.format and data.field apply to data.task files (it is {d.task!r})")
    need(1 <= d.min_digits <= d.max_digits <= 18, f"data.min_digits and data.max_digits must satisfy "
         f"1 <= min <= max <= 18, got {d.min_digits} and {d.max_digits}")
    need(2 <= d.seq_len <= cfg.model.max_position_embeddings,
         f"data.seq_len must be in 2..model.max_position_embeddings ({cfg.model.max_position_embeddings}), "
         f"got {d.seq_len}")
    need(d.tokenizer_documents >= 1, f"data.tokenizer_documents must be >= 1, got {d.tokenizer_documents}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, "
         f"{o.beta2}")
    need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    need(1 <= t.steps <= MAX_STEPS, f"train.steps must be in 1..{MAX_STEPS}, got {t.steps}")
    for name, seed in (("train.seed", t.seed), ("data.seed", d.seed)):
        need(0 <= seed < 2**63, f"{name} must be in 0..2^63-1, got {seed}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(e.every >= 0, f"eval.every must be >= 0, got {e.every}")
    need(e.problems >= 0 and e.batches >= 0, "eval.problems and eval.batches must be >= 0")
    need(c.every >= 1, f"checkpoint.every must be >= 1, got {c.every}")
    need(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    need(c.mtbf_s >= 0, f"checkpoint.mtbf_s must be >= 0, got {c.mtbf_s}")
    r, g = cfg.replicas, cfg.guards
    need(1 <= r.count <= 64, f"replicas.count must be in 1..64, got {r.count}")
    need(1 <= r.ranks_per_group <= 64, f"replicas.ranks_per_group must be in 1..64, got {r.ranks_per_group}")
    need(1 <= r.min_replicas <= r.count, f"replicas.min_replicas must be in 1..replicas.count ({r.count}), "
         f"got {r.min_replicas}")
    for name in ("timeout_s", "quorum_timeout_s", "heartbeat_timeout_s", "join_timeout_s", "hang_timeout_s",
                 "start_timeout_s"):
        need(getattr(r, name) > 0, f"replicas.{name} must be > 0, got {getattr(r, name)}")
    need(r.max_restarts >= 0, f"replicas.max_restarts must be >= 0, got {r.max_restarts}")
    need(r.restart_backoff_s >= 0, f"replicas.restart_backoff_s must be >= 0, got {r.restart_backoff_s}")
    need(r.lighthouse_grace_s >= 0, f"replicas.lighthouse_grace_s must be >= 0, got {r.lighthouse_grace_s}")
    need(r.max_failed_steps >= 1, f"replicas.max_failed_steps must be >= 1, got {r.max_failed_steps}")
    need(r.restart_refill_steps >= 1, f"replicas.restart_refill_steps must be >= 1, got {r.restart_refill_steps}")
    need(r.strategy in STRATEGIES, f"replicas.strategy must be one of {', '.join(STRATEGIES)}, got {r.strategy!r}")
    auto = r.inner_steps == "auto"
    need(auto or isinstance(r.inner_steps, int) and r.inner_steps >= 1,
         f"replicas.inner_steps must be >= 1 or auto, got {r.inner_steps!r}")
    need(r.round_s > 0, f"replicas.round_s must be > 0, got {r.round_s}")
    need(auto or r.round_s == ReplicasConfig.round_s, "replicas.round_s applies to replicas.inner_steps auto only")
    need(r.round_s < r.lighthouse_grace_s, f"replicas.round_s ({r.round_s}) must be below replicas.lighthouse_grace_s "
         f"({r.lighthouse_grace_s}): a group early at the sync waits in quorum attempts that long at most")
    need(r.compression in COMPRESSIONS,
         f"replicas.compression must be one of {', '.join(COMPRESSIONS)}, got {r.compression!r}")
    need(not r.error_feedback or r.compression != "none",
         "replicas.error_feedback needs replicas.compression int8, int4 or int2 (nothing is lost without it)")
    need(r.outer_lr > 0 and 0 <= r.outer_momentum < 1,
         f"replicas.outer_lr must be > 0 and replicas.outer_momentum in [0, 1), got {r.outer_lr} and "
         f"{r.outer_momentum}")
    if r.strategy == "streaming":
        layers = cfg.model.num_hidden_layers
        need(1 <= r.fragments <= layers and (auto or r.inner_steps % r.fragments == 0),
             f"replicas.fragments must divide replicas.inner_steps ({r.inner_steps}) and be at most the model's "
             f"{layers} layers, got {r.fragments}")
        most = None if auto else r.inner_steps // r.fragments - 1
        need(0 <= r.overlap_steps and (most is None or r.overlap_steps <= most),
             f"replicas.overlap_steps must be in 0..{most} (an exchange ends before the next fragment's starts), "
             f"got {r.overlap_steps}")
        need(0 <= r.mixing < 1, f"replicas.mixing must be in [0, 1), got {r.mixing}")
    else:
        streaming_keys = [f"replicas.{k}" for k in ("fragments", "overlap_steps", "mixing")
                          if getattr(r, k) != getattr(ReplicasConfig, k)]
        need(not streaming_keys, f"{', '.join(streaming_keys)} apply to replicas.strategy streaming only")
    need(r.strategy == "ddp" or r.ranks_per_group == 1 or r.inner_steps != "auto",
         f"replicas.inner_steps auto times each round on its own clock, which the {r.ranks_per_group} ranks of a "
         "group would not share: give replicas.inner_steps a number")
    need(0 <= cfg.parallel.fsdp <= 1024, f"parallel.fsdp must be in 0..1024 (0: every rank), got {cfg.parallel.fsdp}")
    need(cfg.parallel.fsdp <= 1 or r.count == 1 or r.ranks_per_group % cfg.parallel.fsdp == 0,
         f"parallel.fsdp {cfg.parallel.fsdp} must divide replicas.ranks_per_group {r.ranks_per_group} (it shards "
         "the ranks of each group)")
    e = cfg.parallel.ep
    need(1 <= e <= 1024, f"parallel.ep must be in 1..1024, got {e}")
    need(e == 1 or cfg.model.is_moe, f"parallel.ep {e} splits routed experts, and this model has none")
    need(e == 1 or not cfg.model.is_moe or cfg.model.n_routed_experts % e == 0,
         f"parallel.ep {e} must divide the model's {cfg.model.n_routed_experts} routed experts")
    need(e == 1 or r.count == 1 or r.ranks_per_group % e == 0,
         f"parallel.ep {e} must divide replicas.ranks_per_group {r.ranks_per_group} (it splits the experts over "
         "the ranks of each group)")
    need(e == 1 or not cfg.train.compile, f"parallel.ep {e} is not supported with train.compile (its token "
         "dispatch is not tested compiled): leave train.compile off")
    rl = cfg.rl
    need(rl.group_size >= 2, f"rl.group_size must be >= 2 (advantages are relative to the group), got {rl.group_size}")
    need(rl.prompts >= 1 and rl.updates >= 1 and rl.max_new_tokens >= 1 and rl.pass_k >= 1,
         "rl.prompts, rl.updates, rl.max_new_tokens and rl.pass_k must be >= 1")
    need(rl.loss in RL_LOSSES, f"rl.loss must be one of {', '.join(RL_LOSSES)}, got {rl.loss!r}")
    need(rl.temperature > 0, f"rl.temperature must be > 0, got {rl.temperature}")
    need(0 <= rl.clip_low < 1 and rl.clip_high >= 0, f"rl.clip_low must be in [0, 1) and rl.clip_high >= 0, "
         f"got {rl.clip_low} and {rl.clip_high}")
    need(rl.kl_coef >= 0 and rl.format_reward >= 0, "rl.kl_coef and rl.format_reward must be >= 0")
    need(cfg.export.dtype in EXPORT_DTYPES, f"export.dtype must be bf16 or fp32, got {cfg.export.dtype!r}")
    need(cfg.export.max_shard_gb > 0, f"export.max_shard_gb must be > 0, got {cfg.export.max_shard_gb}")
    unknown = [t for t in cfg.track if t not in TRACKERS]
    need(not unknown, f"track: unknown tracking sink {', '.join(unknown)} (known: {', '.join(TRACKERS)})")
    need(g.spike_sigma >= 0, f"guards.spike_sigma must be >= 0, got {g.spike_sigma}")
    need(g.spike_window >= 2 and 2 <= g.spike_min_history <= g.spike_window,
         f"guards.spike_window and guards.spike_min_history must satisfy 2 <= min_history <= window, "
         f"got {g.spike_window} and {g.spike_min_history}")
    need(g.rollback_spikes >= 0 and g.rollback_window >= 1, "guards.rollback_spikes must be >= 0 and "
         "guards.rollback_window >= 1")
    need(g.fingerprint_every >= 0, f"guards.fingerprint_every must be >= 0, got {g.fingerprint_every}")
    need(g.straggler_factor == 0 or g.straggler_factor > 1,
         f"guards.straggler_factor must be 0 (off) or > 1, got {g.straggler_factor}")
    need(g.straggler_patience >= 1, f"guards.straggler_patience must be >= 1, got {g.straggler_patience}")
    need(g.max_uncommitted_steps >= 1, f"guards.max_uncommitted_steps must be >= 1, got {g.max_uncommitted_steps}")
    need(g.nonfinite_restarts >= 0, f"guards.nonfinite_restarts must be >= 0, got {g.nonfinite_restarts}")
    return cfg
