"""The training loop: what `stalwart train` runs in each process. Orchestration only:

    setup (training/setup.py) -> per step: quorum (and heal) -> integrity checks that are due
    (training/recovery.py) -> one step with one outcome (training/step.py) -> what the outcome
    does (recovery.py) -> after a commit: metrics, evaluation -> at the end: export, summary, report

A step whose collective failed keeps its forward and backward: after the next quorum it
is exchanged again among whoever is in it, unless this group's weights were replaced in
between (a heal, a rollback), so a peer's death costs the survivors the wait, not the work.

A checkpoint is written between steps, after the next quorum, once the groups'
fingerprints agree (recovery.py); the last one after a final quorum, so that a group that
was corrupt at the last step is healed first.

Determinism: with the same seed and config, the per-step losses are bit-identical, and
a run killed at any moment and resumed from its last checkpoint repeats them exactly:
the checkpoint holds weights, optimizer, the data ledger and every RNG state, and nothing
in a step depends on wall-clock time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stalwart.config import RunConfig
from stalwart.data.loader import PackedLoader
from stalwart.data.sources import documents
from stalwart.data.tasks import make_problem
from stalwart.device import DeviceInfo
from stalwart.export.hf import TORCH_DTYPES, save_hf_folder
from stalwart.faults import corrupt_global, corrupt_weights, inject
from stalwart.guards import NONFINITE
from stalwart.model import DeepSeekForCausalLM
from stalwart.replication.protocol import supervised
from stalwart.run.goodput import bytes_report, goodput_report, groups_of_run
from stalwart.run.progress import Progress
from stalwart.run.report import write_report_after_training
from stalwart.run.tracking import Tracker
from stalwart.training.evaluate import EvalResult, eval_loss, exact_match
from stalwart.training.outer import Rounds
from stalwart.training.recovery import Recovery
from stalwart.training.setup import Job, Replica, setup
from stalwart.training.step import COMMITTED, Computed, StepResult, slow_fault, train_step

__all__ = ["Replica", "TrainResult", "train", "evaluate"]


@dataclass
class TrainResult:
    summary: dict[str, Any]
    samples: list[tuple[str, str, bool]] = field(default_factory=list)


def train(cfg: RunConfig, out: Path, *, resume: bool = False, quiet: bool = False,
          replica: Replica | None = None) -> TrainResult:
    job = setup(cfg, out, resume=resume, quiet=quiet, replica=replica)
    state, group, run = job.state, job.group, job.run
    total = cfg.train.steps
    recovery = Recovery(job)
    progress = Progress(total, state.step, quiet=quiet or not run.writer, log_every=cfg.train.log_every)
    first_step, first_tokens = state.step, state.tokens_seen
    started, started_at, step_time = time.perf_counter(), time.time(), 0.0
    last = EvalResult(None, None, [])
    done = run.read_metrics() if resume and not job.replicated else []
    record: dict[str, Any] = done[-1] if done else {}  # the last committed step's metrics
    members: tuple[int, ...] = ()
    slowed = False
    kept: Computed | None = None  # a step whose exchange failed, sent again at the next quorum
    rounds = Rounds(job, recovery) if state.outer is not None else None
    # The sinks follow metrics.jsonl: this process's (a replica group's supervisor has them).
    tracker = Tracker(run, cfg.track if run.writer and not job.replicated else (), config=cfg.to_dict(),
                      first_step=state.step, quiet=quiet)
    job.model.train()
    try:
        with progress:
            while True:
                inject("kill", state.step + 1)
                run.beat()
                tracker.poll()
                if rounds is not None and rounds.due:  # DiLoCo: the round's quorum and outer step
                    before = state.outer.synced["step"]
                    synced = rounds.sync()
                    if synced is not None and not rounds.due and _eval_due(cfg, before, state.outer.synced["step"]):
                        last = _evaluate_and_report(job, progress, state.step)
                    continue
                action = "train" if rounds is not None else _quorum_and_checks(job, recovery)
                if action == "retry":
                    continue
                if state.step >= total:
                    break
                step = state.step + 1
                slowed = slow_fault(step, slowed)
                result = train_step(job, step, slowed=slowed, checkpoint_due=recovery.checkpoint_wanted(step),
                                    exclude_self=action == "exclude", inner=rounds is not None,
                                    kept=kept if kept is not None and kept.valid_for(step, state) else None)
                kept = result.kept
                if rounds is None:
                    members = _report_quorum(job, result, members)
                else:
                    rounds.inner_done(committed=result.outcome == COMMITTED, nonfinite=result.verdict.kind == NONFINITE,
                                      seconds=result.seconds)
                recovery.after_step(result, healed=group.healed and rounds is None)
                if result.outcome != COMMITTED:
                    continue
                step_time += result.seconds
                record = result.record
                run.append_metrics(record)
                progress.update(step, record)
                corrupt_weights(step, job.params)
                if state.outer is not None:
                    corrupt_global(step, state.outer.global_params)
                if rounds is None and _eval_due(cfg, step - 1, step):
                    last = _evaluate_and_report(job, progress, step)
        if rounds is not None:
            rounds.finish()
        if job.replicated:
            run.event("finish", step=state.step, fingerprint=f"{group.group_fingerprint(state.fingerprint()):016x}",
                      every_rank=True)
        if state.step == first_step:  # resumed a finished run: nothing trained, report its final state
            last = evaluate(cfg, job.model, job.tokenizer, job.info, sharded=state.sharding is not None)
        export = _export(job)  # sharded: collectives, before shutdown
        group.finish()
    finally:
        tracker.close()
        group.shutdown()

    if not group.is_lowest:  # one group (the lowest live one) exports and reports
        return TrainResult({"steps": state.step}, last.samples)
    summary = _summary(job, export, last, record, wall=time.perf_counter() - started, started_at=started_at,
                       tokens_per_s=round((state.tokens_seen - first_tokens) / step_time, 1) if step_time else None)
    run.write_summary(summary)
    if run.writer and not supervised() and job.cfg.train.report:  # the supervisor reports on its groups' run
        write_report_after_training(run)
    return TrainResult(summary, last.samples)


def _quorum_and_checks(job: Job, recovery: Recovery) -> str:
    """The step's quorum (a heal, when this group is behind), then the integrity checks due;
    returns recovery.before_step's action."""
    job.join_quorum()
    return recovery.before_step(healed=job.group.healed)


def _eval_due(cfg: RunConfig, before: int, after: int) -> bool:
    """Whether an evaluation falls in the steps (before, after]."""
    every = cfg.eval.every
    return after >= cfg.train.steps or bool(every and after // every > before // every)


def _evaluate_and_report(job: Job, progress: Progress, step: int) -> EvalResult:
    t0 = time.perf_counter()
    result = evaluate(job.cfg, job.model, job.tokenizer, job.info, tick=job.run.beat,
                      sharded=job.state.sharding is not None)
    if job.group.is_lowest:
        job.run.event("eval", step=step, eval_loss=result.loss, eval_exact_match=result.exact_match,
                      seconds=round(time.perf_counter() - t0, 3))
    progress.note(step, result)
    return result


def _report_quorum(job: Job, result: StepResult, members: tuple[int, ...]) -> tuple[int, ...]:
    """A `quorum` event when the set of groups in a working collective changes."""
    if not result.timings or set(result.timings) == set(members):
        return members
    if job.group.is_lowest and members:
        job.run.event("quorum", step=result.step, replicas=sorted(result.timings), participants=job.group.participants)
    return tuple(sorted(result.timings))


def _export(job: Job) -> Path | None:
    """The final model as a Hugging Face folder, written by the lowest group's rank 0, in
    `export.dtype` (bf16 by default: what serving engines load; the router stays fp32) and in
    files of at most `export.max_shard_gb`. A sharded model is gathered file by file as it is
    written: every rank of each group takes part (a collective, before the groups shut
    down); no rank holds the whole model."""
    cfg, run, sharding = job.cfg, job.run, job.state.sharding
    writer = job.group.is_lowest and run.writer
    if cfg.model.attention != "mla":
        if writer:
            run.event("export_skipped", reason="plain attention has no deepseek_v3 form")
        return None
    if sharding is None and not writer:
        return None
    export = save_hf_folder(job.model, job.tokenizer, run.export, dtype=TORCH_DTYPES[cfg.export.dtype], replace=True,
                            max_shard_bytes=int(cfg.export.max_shard_gb * 1e9), writer=writer,
                            gather=None if sharding is None else sharding.full)
    if writer:
        run.event("export", path=str(export), dtype=cfg.export.dtype)
    return export


def _summary(job: Job, export: Path | None, last: EvalResult, record: dict[str, Any], *, wall: float,
             started_at: float, tokens_per_s: float | None) -> dict[str, Any]:
    """The run's summary.json fields (the lowest group)."""
    cfg, run, state = job.cfg, job.run, job.state
    summary = {
        "steps": state.step, "tokens": state.tokens_seen, "wall_s": round(wall, 3), "tokens_per_s": tokens_per_s,
        "final_train_loss": record.get("loss"), "eval_loss": last.loss, "eval_exact_match": last.exact_match,
        "replicas": cfg.replicas.count, "device": str(job.info.device), "dtype": job.compute_dtype,
        "export": str(export) if export else None, "recipe": cfg.recipe,
    }
    metrics, events = run.read_metrics(), run.read_events()
    # Under a supervisor, the groups it runs write here; started on its own, this group alone.
    here = groups_of_run(events) if supervised() else 1
    summary.update(goodput_report(metrics, events, wall_s=wall, groups=here, job_groups=cfg.replicas.count,
                                  since=started_at, local_steps=cfg.replicas.strategy != "ddp"))
    summary.update(bytes_report(metrics, since=started_at))
    return summary


def evaluate(cfg: RunConfig, model: DeepSeekForCausalLM, tokenizer, info: DeviceInfo,
             tick: Callable[[], None] = lambda: None, sharded: bool = False) -> EvalResult:
    """Eval loss and exact match. `sharded` (FSDP2): every rank evaluates in step, each
    generation taking its full length, so no rank stops while another waits for it."""
    loss = None
    eval_docs = documents(cfg.data, "eval") if cfg.eval.batches else None
    # A task's eval split is unbounded (len 0); user files may have no held-out document.
    if eval_docs is not None and (cfg.data.task != "files" or len(eval_docs)):
        loader = PackedLoader(eval_docs, tokenizer, seq_len=cfg.data.seq_len,
                              batch_size=cfg.train.batch_size, seed=cfg.data.seed, eos_id=cfg.model.eos_token_id)
        loss = eval_loss(model, loader, cfg.eval.batches, info.device, tick)
    accuracy, samples = None, []
    if cfg.data.task != "files" and cfg.eval.problems:
        d = cfg.data
        problems = [make_problem(d.task, "eval", i, d.seed, d.min_digits, d.max_digits)
                    for i in range(cfg.eval.problems)]
        accuracy, samples = exact_match(model, tokenizer, problems, tick=tick, stop_early=not sharded)
    return EvalResult(loss, accuracy, samples)
