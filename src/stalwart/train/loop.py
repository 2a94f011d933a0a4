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
from stalwart.faults import inject
from stalwart.model import DeepSeekForCausalLM
from stalwart.model_source import load_model_state
from stalwart.train.evaluate import EvalResult, eval_loss, exact_match
from stalwart.train.optim import build_optimizer, lr_at
from stalwart.train.progress import Progress
from stalwart.train.rundir import RunDir


@dataclass
class TrainResult:
    summary: dict[str, Any]
    samples: list[tuple[str, str, bool]] = field(default_factory=list)


def documents(cfg: RunConfig, split: str):
    d = cfg.data
    if d.task == "files":
        return TextDocuments(d.files, split)
    return TaskDocuments(d.task, split, d.seed, d.min_digits, d.max_digits)


def _tokenizer(cfg: RunConfig, run: RunDir, resume: bool, docs):
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


def expert_imbalance(model: DeepSeekForCausalLM) -> float | None:
    """Mean over MoE layers of max expert load / mean expert load (1.0 is perfect balance)."""
    ratios = [float(m.expert_load.max() / m.expert_load.mean()) for m in model.moe_layers()
              if m.expert_load.sum() > 0]
    return sum(ratios) / len(ratios) if ratios else None


def train(cfg: RunConfig, out: Path, *, resume: bool = False, quiet: bool = False) -> TrainResult:
    # Everything that can reject the input happens before the run directory exists.
    info = resolve_device(None if cfg.train.device == "auto" else cfg.train.device)
    train_docs = documents(cfg, "train")  # reads (and so checks) user files
    if cfg.data.task != "files":  # an empty split must fail now, not at the first evaluation
        make_problem(cfg.data.task, "eval", 0, cfg.data.seed, cfg.data.min_digits, cfg.data.max_digits)
    run = RunDir(out)
    run.create()
    # config.json first: from here on the folder is a run that --resume can continue.
    run.write_config(cfg.to_json())
    seed_everything(cfg.train.seed)
    enable_determinism(info)
    tokenizer = _tokenizer(cfg, run, resume, train_docs)

    model = DeepSeekForCausalLM(cfg.model).to(info.device)
    forward = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(model, cfg.optim)
    loader = PackedLoader(train_docs, tokenizer, seq_len=cfg.data.seq_len,
                          batch_size=cfg.train.batch_size, seed=cfg.data.seed)
    autocast, compute_dtype = _autocast(cfg, info)
    step, tokens_seen = 0, 0
    record: dict[str, Any] = {}  # the last step's metrics

    for partial in ckpt.remove_partial(run.checkpoints):
        run.event("checkpoint_partial_removed", path=str(partial))
    if resume:
        latest = ckpt.load_latest(run.checkpoints, on_corrupt=lambda p, msg: (
            run.event("checkpoint_corrupt", path=str(p), error=msg),
            None if quiet else print(f"warning: {msg}; using the previous checkpoint", file=sys.stderr)))
        if latest is not None:
            load_model_state(model, latest.model_state, latest.path)
            state = latest.train_state
            optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            set_rng_state(info, state["rng"])
            step, tokens_seen = latest.step, int(state["tokens_seen"])
        run.truncate_metrics(step)
        run.repair_events()
        done = run.read_metrics()
        record = done[-1] if done else {}
        run.event("resume", step=step, checkpoint=str(latest.path) if latest else None)
    run.event("start", step=step, device=str(info.device), dtype=compute_dtype,
              parameters=sum(p.numel() for p in model.parameters()))

    total = cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    progress = Progress(total, step, quiet=quiet, log_every=cfg.train.log_every)
    first_step = step
    started, step_time, last = time.perf_counter(), 0.0, EvalResult(None, None, [])
    model.train()
    with progress:
        while step < total:
            step += 1
            inject("kill", step)
            t0 = time.perf_counter()
            lr = lr_at(step, total, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
            for _ in range(cfg.train.grad_accum):
                x, y = loader.next_batch()
                with autocast():
                    out = forward(x.to(info.device), labels=y.to(info.device))
                (out.loss / cfg.train.grad_accum).backward()
                loss_sum["loss"] += float(out.loss.detach()) / cfg.train.grad_accum
                loss_sum["lm_loss"] += float(out.lm_loss.detach()) / cfg.train.grad_accum
                if out.mtp_loss is not None:
                    loss_sum["mtp_loss"] += float(out.mtp_loss.detach()) / cfg.train.grad_accum
                del out  # the logits (B x T x vocab) must not live on into the next forward
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            imbalance = expert_imbalance(model)
            model.update_router_biases()
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            step_time += dt
            record = {"step": step, "loss": loss_sum["lm_loss"], "total_loss": loss_sum["loss"],
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt, "step_s": dt,
                      "tokens": tokens_seen, "participants": 1, "time": round(time.time(), 4)}
            if model.mtp:
                record["mtp_loss"] = loss_sum["mtp_loss"]
            if imbalance is not None:
                record["expert_imbalance"] = imbalance
            run.append_metrics(record)
            progress.update(step, record)

            if (cfg.eval.every and step % cfg.eval.every == 0) or step == total:
                last = evaluate(cfg, model, tokenizer, info)
                run.event("eval", step=step, eval_loss=last.loss, eval_exact_match=last.exact_match)
                progress.note(step, last)
            if step % cfg.checkpoint.every == 0 or step == total:
                path = ckpt.save_checkpoint(run.checkpoints, step, model.state_dict(), {
                    "step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict(), "rng": rng_state(info)}, keep=cfg.checkpoint.keep)
                run.event("checkpoint", step=step, path=str(path))

    if step == first_step:  # resumed a finished run: nothing trained, report its final state
        last = evaluate(cfg, model, tokenizer, info)
    wall = time.perf_counter() - started
    export: Path | None = None
    if cfg.model.attention == "mla":
        export = save_hf_folder(model.cpu(), tokenizer, run.export, replace=True)
        run.event("export", path=str(export))
    else:
        run.event("export_skipped", reason="plain attention has no deepseek_v3 form")
    events = run.read_events()
    summary = {
        "steps": step, "tokens": tokens_seen, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens_per_step * (step - first_step) / step_time, 1) if step_time else None,
        "final_train_loss": record.get("loss"), "eval_loss": last.loss, "eval_exact_match": last.exact_match,
        "replicas": 1, "goodput": round(step_time / wall, 4) if wall else None,
        "events": len(events), "device": str(info.device), "dtype": compute_dtype,
        "export": str(export) if export else None, "recipe": cfg.recipe,
    }
    run.write_summary(summary)
    return TrainResult(summary, last.samples)


def evaluate(cfg: RunConfig, model: DeepSeekForCausalLM, tokenizer, info: DeviceInfo) -> EvalResult:
    loss = None
    eval_docs = documents(cfg, "eval") if cfg.eval.batches else None
    # A task's eval split is unbounded (len 0); user files may have no held-out document.
    if eval_docs is not None and (cfg.data.task != "files" or len(eval_docs)):
        loader = PackedLoader(eval_docs, tokenizer, seq_len=cfg.data.seq_len,
                              batch_size=cfg.train.batch_size, seed=cfg.data.seed)
        loss = eval_loss(model, loader, cfg.eval.batches, info.device)
    accuracy, samples = None, []
    if cfg.data.task != "files" and cfg.eval.problems:
        d = cfg.data
        problems = [make_problem(d.task, "eval", i, d.seed, d.min_digits, d.max_digits)
                    for i in range(cfg.eval.problems)]
        accuracy, samples = exact_match(model, tokenizer, problems)
    return EvalResult(loss, accuracy, samples)
