"""The training loop: one process, one device; what `stalwart train` runs.

Each step: draw grad_accum micro-batches from the resumable loader, forward (bf16 autocast
where the device has it) with the MTP and balance losses, backward, clip, AdamW, then move
the MoE routing biases from the step's expert load. Metrics go to metrics.jsonl every step;
evaluation and checkpoints run at their intervals and at the end.

Determinism: with the same seed and config, the per-step losses are bit-identical, and
a run killed at any moment and resumed from its last checkpoint repeats them exactly:
the checkpoint holds weights, optimizer, loader position and every RNG state, and
nothing in a step depends on wall-clock time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stalwart import checkpoint as ckpt
from stalwart.config import RunConfig
from stalwart.data.loader import PackedLoader, TaskDocuments, TextDocuments
from stalwart.data.tasks import make_problem
from stalwart.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from stalwart.device import (DeviceInfo, autocast_dtype, enable_determinism, resolve_device, rng_state,
                             seed_everything, set_rng_state)
from stalwart.errors import ConfigError
from stalwart.export.hf import save_hf_folder
from stalwart.faults import corrupt_gradients, corrupt_weights, inject, set_replica
from stalwart.goodput import CheckpointClock, goodput_report
from stalwart.guards import (NONFINITE, OK, ROLLBACK, SPIKE, SpikeGuard, StragglerTracker, Verdict, odd_ones_out)
from stalwart.model import DeepSeekForCausalLM
from stalwart.replication.group import LocalGroup, TorchFTGroup, group_rank, start_together
from stalwart.train.evaluate import EvalResult, eval_loss, exact_match
from stalwart.train.optim import build_optimizer, lr_at
from stalwart.train.exchange import step_exchange
from stalwart.train.progress import Progress
from stalwart.train.rundir import RunDir
from stalwart.train.state import Trainer


@dataclass
class TrainResult:
    summary: dict[str, Any]
    samples: list[tuple[str, str, bool]] = field(default_factory=list)


def documents(cfg: RunConfig, split: str):
    d = cfg.data
    if d.task == "files":
        return TextDocuments(d.files, split)
    return TaskDocuments(d.task, split, d.seed, d.min_digits, d.max_digits)


def prepare_tokenizer(cfg: RunConfig, run: RunDir, resume: bool, docs):
    if resume and run.tokenizer_path.exists():
        return load_tokenizer(run.path)
    n = min(cfg.data.tokenizer_documents, len(docs) or cfg.data.tokenizer_documents)
    tok = train_tokenizer(("".join(docs.document(i)) for i in range(n)), cfg.model.vocab_size)
    save_tokenizer(tok, run.path, model_max_length=cfg.model.max_position_embeddings)
    return tok


def _autocast(cfg: RunConfig, info: DeviceInfo):
    if cfg.train.dtype == "fp32":
        dtype = None
    elif cfg.train.dtype == "bf16":
        if "bf16" not in info.dtypes:
            raise ConfigError(f"train.dtype bf16 is not supported on {info.device}")
        dtype = torch.bfloat16
    else:
        dtype = autocast_dtype(info)
    if dtype is None:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device_type=info.device.type, dtype=dtype)), "bf16"


def _imbalance(loads: list[torch.Tensor]) -> float | None:
    """Mean over MoE layers of max expert load / mean expert load (1.0 is perfect balance)."""
    ratios = [float(load.max() / load.mean()) for load in loads if load.sum() > 0]
    return sum(ratios) / len(ratios) if ratios else None


class Excluded(Exception):
    """This replica group was reported as a straggler and guards.exclude_stragglers is on."""


def _one_line(error: BaseException | None) -> str | None:
    return None if error is None else (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _rollback(run: RunDir, trainer: Trainer, group, on_corrupt, step: int, *, report: bool) -> None:
    """Repeated spikes: weights and optimizer from the last good checkpoint; the loader keeps
    its position, so the batches since that checkpoint (the offending ones) are skipped."""
    t = time.perf_counter()
    latest = ckpt.load_latest(run.checkpoints, on_corrupt=on_corrupt)
    if latest is None:
        if report:
            run.event("rollback_unavailable", step=step, reason="no checkpoint yet")
        return
    trainer.load_checkpoint(latest, loader=False)
    group.set_step(trainer.step)
    if report:
        run.event("rollback", from_step=step - 1, to_step=trainer.step, checkpoint=str(latest.path),
                  seconds=round(time.perf_counter() - t, 3))


def _check_fingerprints(run: RunDir, trainer: Trainer, group, step: int) -> None:
    """Compare this group's parameter + optimizer fingerprint with every participant's; a
    group outside the majority heals from a peer at the next quorum."""
    n = group.num_replicas
    slots = torch.zeros(2 * n, dtype=torch.int64)
    slots[group.replica], slots[n + group.replica] = trainer.fingerprint(), 1
    if not group.allreduce_across_groups(slots):
        return  # a peer left mid-exchange: the next check compares again
    values = slots.tolist()
    prints = {r: values[r] for r in range(n) if values[n + r]}
    odd, resolved = odd_ones_out(prints)
    if not odd:
        return
    if group.is_lowest:
        run.event("sdc_detected", step=step, replicas=odd, resolved=resolved,
                  fingerprints={str(r): f"{v:016x}" for r, v in prints.items()})
    if resolved and group.replica in odd:
        group.force_heal()


@dataclass
class Replica:
    """Where this process sits in a replicated job: None for a single-process run."""
    replica: int
    lighthouse: str
    host: str


def train(cfg: RunConfig, out: Path, *, resume: bool = False, quiet: bool = False,
          replica: Replica | None = None) -> TrainResult:
    # Everything that can reject the input happens before the run directory exists.
    info = resolve_device(None if cfg.train.device == "auto" else cfg.train.device)
    train_docs = documents(cfg, "train")  # reads (and so checks) user files
    if cfg.data.task != "files":  # an empty split must fail now, not at the first evaluation
        make_problem(cfg.data.task, "eval", 0, cfg.data.seed, cfg.data.min_digits, cfg.data.max_digits)
    rank, ranks = group_rank()
    if replica is None and ranks > 1:
        raise ConfigError("several ranks (torchrun) train as a replica group: pass --lighthouse URL --replica-id ID")
    if ranks != cfg.replicas.ranks_per_group and replica is not None:
        raise ConfigError(f"this group has {ranks} ranks (WORLD_SIZE) but replicas.ranks_per_group is "
                          f"{cfg.replicas.ranks_per_group}")
    run = RunDir(out, replica=None if replica is None else replica.replica, checkpoints=cfg.checkpoint.dir,
                 rank=rank, ranks=ranks)
    set_replica(None if replica is None else replica.replica)
    run.create()
    # config.json first: from here on the folder is a run that --resume can continue.
    run.write_config(cfg.to_json())
    seed_everything(cfg.train.seed)
    enable_determinism(info)
    tokenizer = prepare_tokenizer(cfg, run, resume, train_docs)

    model = DeepSeekForCausalLM(cfg.model).to(info.device)
    forward = torch.compile(model) if cfg.train.compile else model
    g = cfg.guards
    trainer = Trainer(model, build_optimizer(model, cfg.optim),
                      PackedLoader(train_docs, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                                   seed=cfg.data.seed, shard=replica.replica * ranks + rank if replica else 0,
                                   num_shards=cfg.replicas.count * ranks if replica else 1),
                      SpikeGuard(sigma=g.spike_sigma, window=g.spike_window, min_history=g.spike_min_history,
                                 rollback_spikes=g.rollback_spikes, rollback_window=g.rollback_window))
    optimizer = trainer.optimizer
    autocast, compute_dtype = _autocast(cfg, info)
    record: dict[str, Any] = {}  # the last step's metrics

    def on_corrupt(path: Path, msg: str) -> None:
        run.event("checkpoint_corrupt", path=str(path), error=msg)
        if not quiet:
            print(f"warning: {msg}; using the previous checkpoint", file=sys.stderr)

    if replica is None:  # a replica group never cleans up: another group may be saving right now
        for partial in ckpt.remove_partial(run.checkpoints):
            run.event("checkpoint_partial_removed", path=str(partial))
    if resume:
        latest = ckpt.load_latest(run.checkpoints, on_corrupt=on_corrupt)
        if latest is not None:
            set_rng_state(info, trainer.load_checkpoint(latest)["rng"])
        if replica is None:  # the supervisor repairs the files of a replicated run
            run.truncate_metrics(trainer.step)
            run.repair_events()
            done = run.read_metrics()
            record = done[-1] if done else {}
        run.event("resume", step=trainer.step, checkpoint=str(latest.path) if latest else None)
    group: LocalGroup | TorchFTGroup = LocalGroup() if replica is None else TorchFTGroup(
        cfg.replicas, replica=replica.replica, lighthouse=replica.lighthouse, host=replica.host,
        state_dict=trainer.state_dict, load_state_dict=trainer.load_state_dict, step=trainer.step,
        backend=info.backend)
    if replica is not None:
        start_together(run.path / "logs", replica.replica)
    run.event("start", step=trainer.step, device=str(info.device), dtype=compute_dtype,
              parameters=sum(p.numel() for p in model.parameters()), pid=os.getpid())

    total = cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    progress = Progress(total, trainer.step, quiet=quiet, log_every=cfg.train.log_every)
    first_step, first_tokens = trainer.step, trainer.tokens_seen
    started, started_at, step_time = time.perf_counter(), time.time(), 0.0
    last = EvalResult(None, None, [])
    params = [p for p in model.parameters() if p.requires_grad]
    moe_layers = model.moe_layers()
    stragglers = StragglerTracker(factor=g.straggler_factor, patience=g.straggler_patience)
    checkpoints = CheckpointClock(cfg.checkpoint)
    members: tuple[int, ...] = ()
    slowed = False  # the `slow` fault, once fired, lasts
    model.train()
    try:
        with progress:
            while trainer.step < total:
                inject("kill", trainer.step + 1)
                run.beat()
                t0 = time.perf_counter()
                group.start_step()
                if group.healed:
                    run.event("heal", step=trainer.step, seconds=round(time.perf_counter() - t0, 3),
                              bytes=group.transport.bytes_received)
                if trainer.step >= total:
                    break
                step = trainer.step + 1
                lr = lr_at(step, total, cfg.optim)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                losses = torch.zeros(3)  # loss, lm_loss, mtp_loss: summed over micro-batches
                for _ in range(cfg.train.grad_accum):
                    x, y = trainer.loader.next_batch()
                    with autocast():
                        out = forward(x.to(info.device), labels=y.to(info.device))
                    (out.loss / cfg.train.grad_accum).backward()
                    losses += torch.stack([out.loss.detach().float().cpu(), out.lm_loss.detach().float().cpu(),
                                           torch.tensor(0.0) if out.mtp_loss is None else
                                           out.mtp_loss.detach().float().cpu()]) / cfg.train.grad_accum
                    del out  # the logits (B x T x vocab) must not live on into the next forward
                corrupt_gradients(step, params)
                slowed = slowed or inject("slow", step)
                if slowed:
                    time.sleep(2 * (time.perf_counter() - t0))
                compute_s = time.perf_counter() - t0

                # One collective per step: gradients, losses, expert loads and per-group timing.
                exchange = step_exchange(params, losses, moe_layers, group, compute_s)
                collective_ok = group.allreduce_sum(exchange.buffer)
                error = group.error()  # why the collective failed, before the vote adds its own
                n = max(group.contributors, 1)  # processes whose gradients are in the sum
                verdict = Verdict(OK)
                grad_norm = float("nan")
                if collective_ok:
                    exchange.unpack_gradients(params, n)
                    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                    loss, lm_loss, mtp_loss = (exchange.losses() / n).tolist()
                    verdict = trainer.guard.check(step, lm_loss, grad_norm)
                committed = group.should_commit(verdict.commit, verdict.reason)
                imbalance = None
                if committed:
                    optimizer.step()
                    loads = exchange.expert_loads(len(moe_layers))
                    imbalance = _imbalance(loads)
                    for moe, load in zip(moe_layers, loads):
                        moe.update_bias(load)
                    trainer.step, trainer.tokens_seen = step, trainer.tokens_seen + tokens_per_step * n
                    trainer.guard.accept(lm_loss, grad_norm)
                else:
                    for moe in moe_layers:
                        moe.expert_load.zero_()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                timings = exchange.compute_times() if collective_ok else {}
                if collective_ok and set(timings) != set(members):
                    if group.is_lowest and members:
                        run.event("quorum", step=step, replicas=sorted(timings), participants=group.participants)
                    members = tuple(sorted(timings))

                if committed:
                    step_time += dt
                    record = {"step": step, "loss": lm_loss, "total_loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_step * n / dt, "step_s": dt,
                              "tokens": trainer.tokens_seen, "participants": group.participants,
                              "time": round(time.time(), 4)}
                    if model.mtp:
                        record["mtp_loss"] = mtp_loss
                    if imbalance is not None:
                        record["expert_imbalance"] = imbalance
                    run.append_metrics(record)
                    progress.update(step, record)
                    corrupt_weights(step, params)
                elif not collective_ok:
                    run.event("step_failed", step=step, seconds=round(dt, 3), participants=group.participants,
                              error=_one_line(error))
                    continue
                elif verdict.kind in (NONFINITE, SPIKE, ROLLBACK):  # every replica: each shows its state
                    run.event("step_skipped", step=step, guard=verdict.kind, reason=verdict.reason,
                              fingerprint=f"{trainer.fingerprint():016x}")
                if verdict.kind == ROLLBACK:
                    _rollback(run, trainer, group, on_corrupt, step, report=group.is_lowest)
                    continue
                if not committed:
                    continue

                for slow in stragglers.observe(timings):
                    if group.is_lowest:
                        run.event("straggler", step=step, replica=slow, compute_s=round(timings[slow], 4),
                                  median_s=round(statistics.median(timings.values()), 4),
                                  excluded=g.exclude_stragglers)
                    if slow == group.replica and g.exclude_stragglers:
                        raise Excluded(f"replica {slow} is a straggler")
                if g.fingerprint_every and step % g.fingerprint_every == 0 and n > 1:
                    _check_fingerprints(run, trainer, group, step)
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == total:
                    last = evaluate(cfg, model, tokenizer, info, tick=run.beat)
                    if group.is_lowest:
                        run.event("eval", step=step, eval_loss=last.loss, eval_exact_match=last.exact_match)
                    progress.note(step, last)
                if group.is_lowest and checkpoints.due(step, total):
                    t = time.perf_counter()
                    state = trainer.state_dict()
                    path = ckpt.save_checkpoint(run.checkpoints, step, state.pop("model"), {
                        **state, "rng": rng_state(info)}, keep=cfg.checkpoint.keep)
                    cost = checkpoints.saved(time.perf_counter() - t)
                    run.event("checkpoint", step=step, path=str(path), cost_s=round(cost, 4),
                              **checkpoints.describe())
        if replica is not None:
            run.event("finish", step=trainer.step, fingerprint=f"{trainer.fingerprint():016x}", every_rank=True)
    finally:
        group.shutdown()

    if trainer.step == first_step:  # resumed a finished run: nothing trained, report its final state
        last = evaluate(cfg, model, tokenizer, info)
    wall = time.perf_counter() - started
    if not group.is_lowest:  # one group (the lowest live one) exports and reports
        return TrainResult({"steps": trainer.step}, last.samples)
    export: Path | None = None
    if cfg.model.attention == "mla":
        export = save_hf_folder(model.cpu(), tokenizer, run.export, replace=True)
        run.event("export", path=str(export))
    else:
        run.event("export_skipped", reason="plain attention has no deepseek_v3 form")
    summary = {
        "steps": trainer.step, "tokens": trainer.tokens_seen, "wall_s": round(wall, 3),
        "tokens_per_s": round((trainer.tokens_seen - first_tokens) / step_time, 1) if step_time else None,
        "final_train_loss": record.get("loss"), "eval_loss": last.loss, "eval_exact_match": last.exact_match,
        "replicas": cfg.replicas.count, "device": str(info.device), "dtype": compute_dtype,
        "export": str(export) if export else None, "recipe": cfg.recipe,
    }
    summary.update(goodput_report(run.read_metrics(), run.read_events(), wall_s=wall, since=started_at))
    run.write_summary(summary)
    return TrainResult(summary, last.samples)


def evaluate(cfg: RunConfig, model: DeepSeekForCausalLM, tokenizer, info: DeviceInfo,
             tick: Callable[[], None] = lambda: None) -> EvalResult:
    loss = None
    eval_docs = documents(cfg, "eval") if cfg.eval.batches else None
    # A task's eval split is unbounded (len 0); user files may have no held-out document.
    if eval_docs is not None and (cfg.data.task != "files" or len(eval_docs)):
        loader = PackedLoader(eval_docs, tokenizer, seq_len=cfg.data.seq_len,
                              batch_size=cfg.train.batch_size, seed=cfg.data.seed)
        loss = eval_loss(model, loader, cfg.eval.batches, info.device, tick)
    accuracy, samples = None, []
    if cfg.data.task != "files" and cfg.eval.problems:
        d = cfg.data
        problems = [make_problem(d.task, "eval", i, d.seed, d.min_digits, d.max_digits)
                    for i in range(cfg.eval.problems)]
        accuracy, samples = exact_match(model, tokenizer, problems, tick=tick)
    return EvalResult(loss, accuracy, samples)
