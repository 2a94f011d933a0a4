"""`stalwart rl`: GRPO with verifiable rewards on a trained model, in one process.

Each step draws `rl.prompts` problems of the task's train split (problem numbers step x P
...: a pure function of the step), samples `rl.group_size` completions of each from one
prefill of its prompt (sampling.generate, seeded by train.seed and the step), scores them
(exact match of the final answer, plus `rl.format_reward` for giving one), and takes
`rl.updates` optimizer steps on the clipped objective (rl/objective.py) with the
log-probabilities of the policy that sampled as the ratio's denominator.

A checkpoint holds the weights, AdamW's state and the step; everything a step does is drawn
from the step's number, so a run resumed from a checkpoint repeats the uninterrupted run's
steps exactly (tested: the same rewards and losses, step for step).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stalwart.checkpoint import load_latest, save_checkpoint
from stalwart.config import RunConfig
from stalwart.data.tasks import Problem, extract_answer, is_correct, make_problem
from stalwart.data.tokenizer import decode, encode, save_tokenizer
from stalwart.errors import UserError
from stalwart.export.hf import TORCH_DTYPES, save_hf_folder
from stalwart.model import DeepSeekForCausalLM
from stalwart.model_source import load_model_state, open_model
from stalwart.rl.objective import group_advantages, informative, policy_loss
from stalwart.rl.routing import mismatch, sampled_routing
from stalwart.rl.routing import replay as replay_routing
from stalwart.run.report import write_report_after_training
from stalwart.run.rundir import RunDir
from stalwart.sampling import generate
from stalwart.training.evaluate import exact_match
from stalwart.training.optim import build_optimizer, lr_at


@dataclass
class Rollouts:
    """One step's samples: P problems x G completions, in a row per problem."""

    prompt_ids: list[list[int]]  # per completion
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    routing: list[torch.Tensor] | None  # per completion, the sampler's experts (rl/routing.py)
    rewards: torch.Tensor  # (P, G)
    correct: torch.Tensor  # (P, G) bool


def step_seed(seed: int, step: int) -> int:
    return zlib.crc32(f"rl:{seed}:{step}".encode())


def reward(problem: Problem, text: str, format_weight: float) -> tuple[float, bool]:
    """Exact match of the final answer (1 or 0), plus `format_weight` for giving one at all."""
    ok = is_correct(problem, text)
    return float(ok) + format_weight * (extract_answer(text) is not None), ok


def sample(cfg: RunConfig, model: DeepSeekForCausalLM, tokenizer, problems: list[Problem], seed: int,
           samples: int | None = None) -> Rollouts:
    """`samples` (rl.group_size by default) completions of each problem, scored; prompts of
    one length are generated together, from one prefill each."""
    rl, G = cfg.rl, samples or cfg.rl.group_size
    n = len(problems) * G
    completions: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    routing: list[torch.Tensor] | None = [torch.empty(0)] * n
    prompts = [encode(tokenizer, p.prompt) for p in problems]
    for length in sorted({len(ids) for ids in prompts}):
        rows = [i for i, ids in enumerate(prompts) if len(ids) == length]
        got: list[list[float]] = []
        with model.routing_tape() as tapes:
            outs = generate(model, [prompts[i] for i in rows], max_new_tokens=rl.max_new_tokens,
                            temperature=rl.temperature, seed=seed + length, samples=G, logprobs=got)
        experts = sampled_routing(tapes, length, G)
        for k, (out, lp) in enumerate(zip(outs, got)):
            row = rows[k // G] * G + k % G
            completions[row], logprobs[row] = out, lp
            if experts is None:
                routing = None
            elif routing is not None:
                routing[row] = experts[k]
    scored = [reward(problems[i // G], decode(tokenizer, c), rl.format_reward) for i, c in enumerate(completions)]
    rewards = torch.tensor([r for r, _ in scored]).view(len(problems), G)
    correct = torch.tensor([ok for _, ok in scored]).view(len(problems), G)
    return Rollouts([prompts[i // G] for i in range(n)], completions, logprobs, routing, rewards, correct)


@dataclass
class Scores:
    """The model's view of a batch of rollouts, each (N, T) per completion token."""

    logp: torch.Tensor
    entropy: torch.Tensor | None  # when asked for (a metric: no gradient)
    mask: torch.Tensor  # False past a completion's end
    routing_mismatch: float | None  # share of expert choices unlike the sampler's (rl/routing.py)


def completion_logprobs(model: DeepSeekForCausalLM, r: Rollouts, pad_id: int, replay: bool = False,
                        entropy: bool = False) -> Scores:
    """The model's log-probabilities (and with `entropy`, its entropies) of every completion
    token, from one forward per prompt length of the prompt + completion rows (completions
    padded after their end; prompts never padded, so that every row sees what the sampler
    saw). `replay`: with the experts the sampler chose (rl/routing.py)."""
    device = next(model.parameters()).device
    N, T = len(r.completion_ids), max(len(c) for c in r.completion_ids)
    logp = torch.zeros(N, T, device=device)
    entropies = torch.zeros(N, T, device=device) if entropy else None
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, c in enumerate(r.completion_ids):
        mask[i, :len(c)] = True
    differ = compared = 0
    for L in sorted({len(p) for p in r.prompt_ids}):
        index = [i for i, p in enumerate(r.prompt_ids) if len(p) == L]
        rows = torch.full((len(index), L + T), pad_id, dtype=torch.long)
        for k, i in enumerate(index):
            rows[k, :L] = torch.tensor(r.prompt_ids[i])
            rows[k, L:L + len(r.completion_ids[i])] = torch.tensor(r.completion_ids[i])
        rows = rows.to(device)
        sampled = None
        if r.routing is not None:
            sampled = replay_routing([r.routing[i] for i in index], L + T - 1, model.cfg.num_experts_per_tok)
        with model.routing_tape() as tapes:
            for layer, tape in enumerate(tapes):
                tape.replay = sampled[layer].to(device) if replay and sampled is not None else None
            logits = model(rows[:, :-1]).logits[:, L - 1:].float()  # position L - 1 predicts completion token 0
        if sampled is not None:  # compared where a scored token is predicted: L - 1 onwards, within its completion
            scored_positions = torch.zeros(len(index), L + T - 1, dtype=torch.bool)
            scored_positions[:, L - 1:] = mask[index]
            d, n = mismatch(sampled, torch.stack([t.chosen[0] for t in tapes]).cpu(), scored_positions.reshape(-1))
            differ, compared = differ + d, compared + n
        logp_all = logits.log_softmax(-1)
        picked = torch.tensor(index, device=device)
        logp = logp.index_put((picked,), logp_all.gather(-1, rows[:, L:, None]).squeeze(-1))
        if entropies is not None:
            with torch.no_grad():
                entropies = entropies.index_put((picked,), -(logp_all.exp() * logp_all).sum(-1))
    return Scores(logp, entropies, mask.to(device), differ / compared if compared else None)


@dataclass
class Batch:
    """Rollouts made ready for the update: advantages, the tokens that count, the
    log-probabilities of the reference and (with more than one update) of the policy that
    sampled; with one update, the first forward gives those, detached."""

    rollouts: Rollouts
    advantages: torch.Tensor  # (N,)
    keep: torch.Tensor  # (N,) completions that count (dapo leaves out groups of equal rewards)
    old: Scores | None
    ref_logp: torch.Tensor | None


def score(cfg: RunConfig, model, r: Rollouts, reference: DeepSeekForCausalLM | None, pad_id: int) -> Batch:
    """The update's fixed inputs: the group advantages and, with no gradient, the
    reference's log-probabilities and (rl.updates > 1) the sampling policy's, scored as the
    update scores (with the same routing choice)."""
    rl = cfg.rl
    device = next(model.parameters()).device
    advantages = group_advantages(r.rewards, rl.loss).reshape(-1).to(device)
    keep = informative(r.rewards)[:, None].expand_as(r.rewards).reshape(-1) if rl.loss == "dapo" else \
        torch.ones(r.rewards.numel(), dtype=torch.bool)
    with torch.no_grad():
        old = completion_logprobs(model, r, pad_id, replay=rl.routing_replay, entropy=True) if rl.updates > 1 \
            else None
        ref = completion_logprobs(reference, r, pad_id, replay=rl.routing_replay).logp if reference else None
    return Batch(r, advantages, keep.to(device), old, ref)


def policy_metrics(scores: Scores, r: Rollouts) -> dict[str, float]:
    """The sampling policy as the trainer sees it: entropy, and how far its log-probabilities
    and routing are from the sampler's for the same tokens."""
    sampler = torch.zeros_like(scores.logp)
    for i, lp in enumerate(r.sampler_logprobs):
        sampler[i, :len(lp)] = torch.tensor(lp)
    logp, mask = scores.logp.detach(), scores.mask
    tokens = mask.sum().clamp(min=1)
    metrics = {"sampler_logprob_gap": round(float(((sampler - logp).abs() * mask).sum() / tokens), 6),
               "entropy": round(float((scores.entropy * mask).sum() / tokens), 6)}
    if scores.routing_mismatch is not None:
        metrics["routing_mismatch"] = round(scores.routing_mismatch, 6)
    return metrics


def update(cfg: RunConfig, model, optimizer, batch: Batch, lr: float, pad_id: int) -> dict[str, float]:
    """rl.updates optimizer steps on one batch; the objective's metrics at the first and, with
    more than one, the clipping and the routing also at the last (after updates - 1 steps
    the policy has moved)."""
    rl, r = cfg.rl, batch.rollouts
    metrics = policy_metrics(batch.old, r) if batch.old is not None else {}
    old_logp = batch.old.logp if batch.old is not None else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    for u in range(rl.updates):
        scores = completion_logprobs(model, r, pad_id, replay=rl.routing_replay, entropy=old_logp is None)
        if old_logp is None:  # one update: the policy that sampled is the one being updated
            old_logp, metrics = scores.logp.detach(), policy_metrics(scores, r)
        mask = scores.mask & batch.keep[:, None]
        out = policy_loss(scores.logp, old_logp, batch.advantages, mask, loss=rl.loss, clip_low=rl.clip_low,
                          clip_high=rl.clip_high, ref_logp=batch.ref_logp, kl_coef=rl.kl_coef,
                          max_len=rl.max_new_tokens)
        optimizer.zero_grad(set_to_none=True)
        norm = torch.tensor(0.0)
        if mask.any():
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
        if u == 0:
            metrics |= {"loss": round(out.loss.item(), 6), "grad_norm": round(float(norm), 6),
                        "clip_fraction": round(out.clip_fraction, 6), "kl": round(out.kl, 6)}
        if u == rl.updates - 1 and u > 0:
            metrics["clip_fraction_last"] = round(out.clip_fraction, 6)
            if scores.routing_mismatch is not None:
                metrics["routing_mismatch_last"] = round(scores.routing_mismatch, 6)
    return metrics


def pass_at_k(cfg: RunConfig, model, tokenizer, problems: list[Problem], seed: int) -> float | None:
    """The share of problems with a correct answer among k samples at the sampler's temperature."""
    if not problems:
        return None
    r = sample(cfg, model, tokenizer, problems, seed, samples=cfg.rl.pass_k)
    return round(float(r.correct.any(dim=1).float().mean()), 4)


def eval_problems(cfg: RunConfig) -> list[Problem]:
    d = cfg.data
    return [make_problem(d.task, "eval", i, d.seed, d.min_digits, d.max_digits) for i in range(cfg.eval.problems)]


def evaluate(cfg: RunConfig, model, tokenizer) -> dict[str, Any]:
    problems = eval_problems(cfg)
    accuracy, _ = exact_match(model, tokenizer, problems)
    return {"eval_exact_match": accuracy,
            f"pass_at_{cfg.rl.pass_k}": pass_at_k(cfg, model, tokenizer, problems, seed=cfg.train.seed + 1)}


def train_rl(cfg: RunConfig, out: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """The whole RL run; its summary (also RUN_DIR/summary.json)."""
    run = RunDir(out, checkpoints=cfg.checkpoint.dir)
    run.create()
    run.write_config(cfg.to_json())
    model, tokenizer = open_model(cfg.rl.start)
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise UserError(f"{cfg.rl.start}: its tokenizer has more tokens than its model's vocabulary")
    save_tokenizer(tokenizer, run.path, model_max_length=model.cfg.max_position_embeddings,
                   bos_id=model.cfg.bos_token_id, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id)
    reference = None
    if cfg.rl.kl_coef:
        reference = open_model(cfg.rl.start)[0].eval().requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    step, started = 0, time.perf_counter()
    latest = load_latest(run.checkpoints) if resume else None
    if latest is not None:
        load_model_state(model, latest.model_state, latest.path)
        optimizer.load_state_dict(latest.train_state["optimizer"])
        step = int(latest.train_state["step"])
        before = latest.train_state["before"]
        run.truncate_metrics(step)
        run.repair_events()
    run.event("start", mode="rl", start=cfg.rl.start)  # every launch, as a training process's
    if latest is not None:
        run.event("resume", step=step)
    else:
        before = evaluate(cfg, model.eval(), tokenizer)
        run.event("eval", step=0, **before)
    # Eval mode throughout, gradients and all: the model's training mode only counts the
    # experts' loads and adds the balance loss (model/moe.py), and RL keeps the routing bias
    # as the start left it and has no balance loss.
    model.eval()
    d, P = cfg.data, cfg.rl.prompts
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        problems = [make_problem(d.task, "train", step * P + i, d.seed, d.min_digits, d.max_digits) for i in range(P)]
        r = sample(cfg, model, tokenizer, problems, step_seed(cfg.train.seed, step))
        t1 = time.perf_counter()
        batch = score(cfg, model, r, reference, model.cfg.pad_token_id)
        t2 = time.perf_counter()
        metrics = update(cfg, model, optimizer, batch, lr_at(step + 1, cfg.train.steps, cfg.optim),
                         model.cfg.pad_token_id)
        t3 = time.perf_counter()
        step += 1
        record = {"step": step, "time": round(time.time(), 3), "reward_mean": round(float(r.rewards.mean()), 6),
                  "reward_std": round(float(r.rewards.std()), 6), "accuracy": round(float(r.correct.float().mean()), 6),
                  "zero_variance_groups": round(1 - float(informative(r.rewards).float().mean()), 6),
                  "completion_length": round(sum(map(len, r.completion_ids)) / len(r.completion_ids), 3),
                  **metrics, "generation_s": round(t1 - t0, 4), "scoring_s": round(t2 - t1, 4),
                  "update_s": round(t3 - t2, 4),
                  "lr": lr_at(step, cfg.train.steps, cfg.optim)}
        run.append_metrics(record)
        if not quiet and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            print(f"rl step {step}/{cfg.train.steps}  reward {record['reward_mean']:.3f}  accuracy "
                  f"{record['accuracy']:.1%}  loss {record['loss']:.4f}  {t3 - t0:.2f}s", file=sys.stderr, flush=True)
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
            save_checkpoint(run.checkpoints, step, model.state_dict(),
                            {"step": step, "optimizer": optimizer.state_dict(), "before": before},
                            keep=cfg.checkpoint.keep)
            run.event("checkpoint", step=step)
    after = evaluate(cfg, model.eval(), tokenizer)
    run.event("eval", step=step, **after)
    export = save_hf_folder(model, tokenizer, run.export, dtype=TORCH_DTYPES[cfg.export.dtype], replace=True)
    summary = {"steps": step, "wall_s": round(time.perf_counter() - started, 3),
               **{f"{k}_before": v for k, v in before.items()}, **after, "export": str(export),
               "loss": cfg.rl.loss, "group_size": cfg.rl.group_size}
    run.write_summary(summary)
    if cfg.train.report:
        write_report_after_training(run)
    return summary


def rl_config(source: str, settings: dict[str, Any]) -> RunConfig:
    """The default RL run on the model at `source`, with `settings` ({"section.key": text}) on
    top: the held-out harder split (4-digit addition, one column more than the main job
    learns), a constant learning rate, 200 steps of 8 prompts x 8 samples."""
    from stalwart.config import apply_overrides
    from stalwart.recipes import recipe

    path = Path(source)
    if not path.exists():
        raise UserError(f"--from {source}: no such run directory or model folder")
    model, _ = open_model(str(path))  # refuses a run without a checkpoint, or a folder of another kind
    base = recipe("default")
    cfg = dataclasses.replace(
        base, recipe="rl", model=model.cfg,
        data=dataclasses.replace(base.data, task="addition", min_digits=4, max_digits=4),
        train=dataclasses.replace(base.train, steps=200, log_every=10),
        optim=dataclasses.replace(base.optim, lr=1e-4, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0),
        eval=dataclasses.replace(base.eval, every=0, problems=200, batches=0),
        checkpoint=dataclasses.replace(base.checkpoint, every=50, keep=2),
        rl=dataclasses.replace(base.rl, start=str(path.resolve())))
    cfg = apply_overrides(cfg, settings)
    if cfg.data.task == "files":
        raise UserError("stalwart rl needs a task with a scorer (data.task addition or multiplication); "
                        "user files have no verifiable answers")
    return cfg
