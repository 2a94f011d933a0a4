"""`stalwart rl`: GRPO with verifiable rewards on a trained model, in one process or as
replica groups (docs/design.md, "RL on replica groups").

Each step draws `rl.prompts` problems of the task's train split (problem numbers (step - 1)
x P ...: a pure function of the step), cut into `replicas.count` shares (rl/shares.py).
Each share samples `rl.group_size` completions of each of its problems from one prefill of
its prompt (sampling.generate, seeded by train.seed, the step and the share), scores them
(exact match of the final answer, plus `rl.format_reward` for giving one), and differentiates
the clipped objective (rl/objective.py) with the log-probabilities of the policy that
sampled as the ratio's denominator; the shares' gradients are added in share order and
`rl.updates` optimizer steps taken. A group computes its quorum's part of the shares; when a
group dies, the survivors compute its shares again, from the same weights and seeds.

A checkpoint holds the weights, AdamW's state and the step; everything a step does is drawn
from the step's number, so a run resumed from a checkpoint, or one whose groups died and
were healed, repeats the uninterrupted run's steps exactly (tested: the same rewards and
losses, step for step).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stalwart.checkpoint import load_latest, remove_partial, save_checkpoint
from stalwart.config import RunConfig
from stalwart.data.tasks import Problem, extract_answer, is_correct, make_problem
from stalwart.data.tokenizer import decode, encode, save_tokenizer
from stalwart.errors import UserError, first_line
from stalwart.export.hf import TORCH_DTYPES, save_hf_folder
from stalwart.fsutil import writer_alive, writer_tag
from stalwart.faults import arm_signal_faults, corrupt_gradients, corrupt_weights, inject, set_replica
from stalwart.guards import fingerprint, odd_ones_out
from stalwart.model import DeepSeekForCausalLM
from stalwart.model_source import load_model_state, open_model
from stalwart.rl.objective import group_advantages, informative, policy_loss
from stalwart.rl.routing import mismatch, sampled_routing
from stalwart.rl.routing import replay as replay_routing
from stalwart.rl.shares import ShareExchange, share_bounds, share_seed, shares_of
from stalwart.replication.group import LocalGroup
from stalwart.replication.protocol import supervised
from stalwart.run.report import write_report_after_training
from stalwart.run.rundir import RunDir
from stalwart.sampling import generate
from stalwart.training.evaluate import exact_match
from stalwart.training.optim import build_optimizer, lr_at
from stalwart.training.recovery import NonFiniteAfterHeal, Partitioned, Stalled
from stalwart.training.setup import Replica, report_quorum_retry


PASS_BATCH = 32  # problems sampled together for pass@k
FINAL_CLAIM = "final.claim"  # in RUN_DIR/logs: the group that evaluates and exports (its writer_tag)


@dataclass
class Rollouts:
    """One step's samples: P problems x G completions, in a row per problem."""

    prompt_ids: list[list[int]]  # per completion
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    routing: list[torch.Tensor] | None  # per completion, the sampler's experts (rl/routing.py)
    rewards: torch.Tensor  # (P, G)
    correct: torch.Tensor  # (P, G) bool


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
    routing_differ: int  # expert choices unlike the sampler's (rl/routing.py) ...
    routing_compared: int  # ... of so many (0: no routing was recorded)

    @property
    def routing_mismatch(self) -> float | None:
        return self.routing_differ / self.routing_compared if self.routing_compared else None


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
    return Scores(logp, entropies, mask.to(device), differ, compared)


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


@dataclass
class Share:
    """One share of a step (rl/shares.py), sampled and scored by this group."""

    step: int
    number: int
    first: int  # its first completion's place in the step
    batch: Batch
    generation_s: float
    scoring_s: float


def make_share(cfg: RunConfig, model, tokenizer, reference, step: int, share: int) -> Share:
    d, rl = cfg.data, cfg.rl
    numbers = share_bounds(rl.prompts, cfg.replicas.count, share)
    problems = [make_problem(d.task, "train", (step - 1) * rl.prompts + i, d.seed, d.min_digits, d.max_digits)
                for i in numbers]
    t0 = time.perf_counter()
    r = sample(cfg, model, tokenizer, problems, share_seed(cfg.train.seed, step, share))
    inject("kill-in-generation", step)
    t1 = time.perf_counter()
    batch = score(cfg, model, r, reference, model.cfg.pad_token_id)
    inject("kill-in-scoring", step)
    return Share(step, share, numbers.start * rl.group_size, batch, t1 - t0, time.perf_counter() - t1)


def policy_sums(scores: Scores, r: Rollouts) -> dict[str, float]:
    """The sampling policy as the trainer sees it: entropy, and how far its log-probabilities
    and routing are from the sampler's for the same tokens (sums over the share's tokens)."""
    sampler = torch.zeros_like(scores.logp)
    for i, lp in enumerate(r.sampler_logprobs):
        sampler[i, :len(lp)] = torch.tensor(lp)
    logp, mask = scores.logp.detach(), scores.mask
    return {"policy_entropy": float((scores.entropy * mask).sum()), "policy_tokens": float(mask.sum()),
            "policy_gap": float(((sampler - logp).abs() * mask).sum()),
            "policy_routing_differ": scores.routing_differ, "policy_routing_compared": scores.routing_compared}


def share_gradient(cfg: RunConfig, model, share: Share, update: int, pad_id: int) -> dict[str, float]:
    """The share's objective at `update` (0, 1, ...): its weighted loss's gradient in the
    parameters' .grad (none if no token counts), and its sums (rl/shares.py)."""
    rl, batch = cfg.rl, share.batch
    r = batch.rollouts
    first = batch.old is None and update == 0  # one update: this forward is the sampling policy's
    scores = completion_logprobs(model, r, pad_id, replay=rl.routing_replay, entropy=first)
    old_logp = batch.old.logp if batch.old is not None else scores.logp.detach()
    mask = scores.mask & batch.keep[:, None]
    out = policy_loss(scores.logp, old_logp, batch.advantages, mask, loss=rl.loss, clip_low=rl.clip_low,
                      clip_high=rl.clip_high, ref_logp=batch.ref_logp, kl_coef=rl.kl_coef, max_len=rl.max_new_tokens)
    model.zero_grad(set_to_none=True)
    if out.weight > 0 and mask.any():
        (out.loss * out.weight).backward()
    sums = {"weight": out.weight if mask.any() else 0.0, "weighted_loss": out.loss.item() * out.weight,
            "clipped": out.clipped, "kl": out.kl_sum, "tokens": out.tokens,
            "routing_differ": scores.routing_differ, "routing_compared": scores.routing_compared}
    if update == 0:
        sums |= policy_sums(batch.old if batch.old is not None else scores, r)
    return sums


class RLState:
    """What a checkpoint holds and a healing peer receives: the weights, AdamW's state and
    the committed steps. `changes` goes up before the served tensors change in place."""

    def __init__(self, model: DeepSeekForCausalLM, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, self.step, self.changes = model, optimizer, 0, 0
        self.params = [p for p in model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any], where: Path = Path("peer")) -> None:
        self.changes += 1
        load_model_state(self.model, state["model"], where)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def snapshot(self) -> dict[str, Any]:
        """A copy to go back to (a step of several updates whose exchange failed midway)."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.changes += 1
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))

    def fingerprint(self) -> int:
        """Of the weights and AdamW's state (guards.fingerprint)."""
        tensors = list(self.model.state_dict().values())
        for per_param in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return fingerprint(tensors)


@dataclass
class StepResult:
    committed: bool
    record: dict[str, Any] | None = None
    error: str | None = None
    skipped: int | None = None  # committed after so many updates: the next one's gradients were not finite
    odd: list[int] = field(default_factory=list)  # groups whose fingerprint is outside the majority
    nonfinite: list[int] = field(default_factory=list)  # groups whose own values were not finite
    rollback: bool = False  # fingerprints differ with no majority: every group goes back to its checkpoint


def rl_step(cfg: RunConfig, state: RLState, group, tokenizer, reference, cached: dict[int, Share],
            tick: Callable[[], None]) -> StepResult:
    """One attempt at the next step, after its quorum: this group's shares (those `cached`
    from a failed attempt at the same step are reused: the weights are still those they were
    made with), rl.updates exchanges of every share's gradient, the commit vote, the update.
    The last update is applied only once the vote said yes; with several, the earlier ones
    are undone if the step fails after them."""
    model, rl, R = state.model, cfg.rl, cfg.replicas.count
    step, pad_id = state.step + 1, model.cfg.pad_token_id
    t0 = time.perf_counter()
    mine = shares_of(group.participant, group.participants, R)
    reused = sum(cached[s].generation_s + cached[s].scoring_s for s in mine if s in cached)
    for s in mine:
        if s not in cached:
            cached[s] = make_share(cfg, model, tokenizer, reference, step, s)
            tick()
    t1 = time.perf_counter()
    lr = lr_at(step, cfg.train.steps, cfg.optim)
    for param_group in state.optimizer.param_groups:
        param_group["lr"] = lr
    snapshot = state.snapshot() if rl.updates > 1 and group.heals else None
    every = cfg.guards.fingerprint_every
    check = group.heals and bool(every and step % every == 0 or checkpoint_due(cfg, step))
    first = last = None  # the first and the last finite update's exchanges make the record
    applied, apply_last, grad_norm, skipped = 0, False, 0.0, None

    def failed(error: str) -> StepResult:
        if applied:
            state.restore(snapshot)
        return StepResult(False, error=error)

    for u in range(rl.updates):
        exchange = ShareExchange(state.params, R, rl.prompts * rl.group_size)
        if check and u == 0:  # the state the step starts from, before a checkpoint among others
            exchange.put_fingerprint(group.replica, state.fingerprint())
        for s in mine:
            r = cached[s].batch.rollouts
            sums = share_gradient(cfg, model, cached[s], u, pad_id)
            corrupt_gradients(step, state.params)  # `nan-grad`, `nan-device` (faults.py)
            if group.heals and not _finite(sums, state.params):  # a peer's state can replace this group's
                exchange.put_nonfinite(group.replica)
                break
            exchange.put(s, sums, cached[s].first, {"reward": r.rewards.reshape(-1), "correct": r.correct.reshape(-1),
                                                    "length": torch.tensor([len(c) for c in r.completion_ids])},
                         replica=group.replica)
            if u == rl.updates - 1:
                inject("kill-in-update", step)
            tick()
        model.zero_grad(set_to_none=True)
        if not group.allreduce_sum(exchange.buffer):
            error = first_line(group.error())
            group.should_commit(False, error)
            return failed(error)
        bad = exchange.nonfinite_groups()
        if bad and len(bad) < group.participants:  # the others' values are fine: the bad ones heal
            error = f"the own values of groups {bad} are not finite"
            group.should_commit(False, error)
            return replace(failed(error), nonfinite=bad)
        if bad:  # nobody's are: every group skips the step alike
            skipped = applied
            break
        if exchange.unclaimed():
            error = f"shares {exchange.unclaimed()} of step {step} did not have exactly one contributor"
            group.should_commit(False, error)
            return failed(error)
        if u == 0 and check:
            odd, majority = odd_ones_out(exchange.fingerprints())
            if odd:
                error = f"fingerprints of groups {odd} differ from the majority's" if majority else \
                    "the groups' fingerprints differ with no majority"
                group.should_commit(False, error)
                return StepResult(False, error=error, odd=odd if majority else [], rollback=not majority)
        first = first or exchange
        if not exchange.finite():  # every group sees the same sums: all skip alike
            skipped = applied
            break
        last = exchange
        if exchange.sums()["weight"] <= 0:  # no token counts (dapo: every group's rewards equal)
            break
        exchange.set_gradients()
        norm = float(torch.nn.utils.clip_grad_norm_(state.params, cfg.optim.grad_clip or float("inf")))
        grad_norm = norm if u == 0 else grad_norm
        if u == rl.updates - 1:
            apply_last = True
            break
        state.changes += 1
        state.optimizer.step()
        applied += 1
        model.zero_grad(set_to_none=True)
    if not group.should_commit(True):
        return failed(first_line(group.error()))
    if apply_last:
        state.changes += 1
        state.optimizer.step()
    model.zero_grad(set_to_none=True)
    state.step = step
    seconds = time.perf_counter() - t0 + reused
    if first is None:  # every group's own values were not finite: nothing to report but the skip
        return StepResult(True, {"lr": lr, "step_s": round(seconds, 4), "participants": group.participants},
                          skipped=0)
    record = step_record(cfg, first, last or first, grad_norm=grad_norm, lr=lr, seconds=seconds,
                         times={"generation_s": sum(cached[s].generation_s for s in mine),
                                "scoring_s": sum(cached[s].scoring_s for s in mine),
                                "update_s": time.perf_counter() - t1}, participants=group.participants)
    fingerprints = first.fingerprints()
    if fingerprints:  # alike in every group (else the step failed): the state the step started from
        record["fingerprint"] = f"{next(iter(fingerprints.values())):016x}"
    return StepResult(True, record, skipped=skipped)


def _finite(sums: dict[str, float], params: list[torch.Tensor]) -> bool:
    return all(math.isfinite(v) for v in sums.values()) and \
        all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def step_record(cfg: RunConfig, first: ShareExchange, last: ShareExchange, *, grad_norm: float, lr: float,
                seconds: float, times: dict[str, float], participants: int) -> dict[str, Any]:
    """A committed step's metrics, from what every group holds alike (the first and the
    last update's exchanges), and this group's own times."""
    rl = cfg.rl
    sums = first.sums()
    rewards, correct, lengths = (first.slots(name) for name in ("reward", "correct", "length"))
    tokens = sums["tokens"]
    record = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
              "accuracy": float(correct.mean()),
              "zero_variance_groups": 1 - float(informative(rewards.view(rl.prompts, rl.group_size)).float().mean()),
              "completion_length": float(lengths.mean()),
              "sampler_logprob_gap": sums["policy_gap"] / max(sums["policy_tokens"], 1.0),
              "entropy": sums["policy_entropy"] / max(sums["policy_tokens"], 1.0)}
    if sums["policy_routing_compared"]:
        record["routing_mismatch"] = sums["policy_routing_differ"] / sums["policy_routing_compared"]
    record |= {"loss": sums["weighted_loss"] / sums["weight"] if sums["weight"] else 0.0, "grad_norm": grad_norm,
               "clip_fraction": sums["clipped"] / max(tokens, 1.0), "kl": sums["kl"] / max(tokens, 1.0)}
    if rl.updates > 1 and last is not first:
        end = last.sums()
        record["clip_fraction_last"] = end["clipped"] / max(end["tokens"], 1.0)
        if end["routing_compared"]:
            record["routing_mismatch_last"] = end["routing_differ"] / end["routing_compared"]
    record = {k: round(v, 6) if math.isfinite(v) else None for k, v in record.items()}
    record["completion_length"] = round(record["completion_length"], 3)
    completion_tokens = float(lengths.sum())
    return {**record, **{k: round(v, 4) for k, v in times.items()}, "lr": lr, "step_s": round(seconds, 4),
            "tokens_per_s": round(completion_tokens / seconds, 1) if seconds > 0 else None,
            "participants": participants, "shares": first.computed_by()}


def pass_at_k(cfg: RunConfig, model, tokenizer, problems: list[Problem], seed: int,
              tick: Callable[[], None] = lambda: None) -> float | None:
    """The share of problems with a correct answer among k samples at the sampler's
    temperature (sampled PASS_BATCH problems at a time, `tick` after each)."""
    if not problems:
        return None
    solved = 0
    for start in range(0, len(problems), PASS_BATCH):
        r = sample(cfg, model, tokenizer, problems[start:start + PASS_BATCH], seed + start, samples=cfg.rl.pass_k)
        solved += int(r.correct.any(dim=1).sum())
        tick()
    return round(solved / len(problems), 4)


def eval_problems(cfg: RunConfig) -> list[Problem]:
    d = cfg.data
    return [make_problem(d.task, "eval", i, d.seed, d.min_digits, d.max_digits) for i in range(cfg.eval.problems)]


def evaluate(cfg: RunConfig, model, tokenizer, tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Greedy exact match and pass@k on the eval split; `tick` between batches (a group's
    liveness beat: a long evaluation is not a hang)."""
    problems = eval_problems(cfg)
    accuracy, _ = exact_match(model, tokenizer, problems, tick=tick)
    return {"eval_exact_match": accuracy,
            f"pass_at_{cfg.rl.pass_k}": pass_at_k(cfg, model, tokenizer, problems, seed=cfg.train.seed + 1, tick=tick)}


def prepare_run(cfg: RunConfig, run: RunDir, model: DeepSeekForCausalLM | None = None, tokenizer=None) -> None:
    """What a run needs before its first step, done once by the job's first process (a
    single run's, or the supervisor of replica groups): the start model's tokenizer in the
    run directory, and its evaluation before RL (the step-0 `eval` event, which the summary
    reads)."""
    if model is None:
        model, tokenizer = open_model(cfg.rl.start)
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise UserError(f"{cfg.rl.start}: its tokenizer has more tokens than its model's vocabulary")
    save_tokenizer(tokenizer, run.path, model_max_length=model.cfg.max_position_embeddings,
                   bos_id=model.cfg.bos_token_id, eos_id=model.cfg.eos_token_id, pad_id=model.cfg.pad_token_id)
    if before_rl(run) is None:
        run.event("eval", step=0, **evaluate(cfg, model.eval(), tokenizer))
    (run.logs / FINAL_CLAIM).unlink(missing_ok=True)  # a finished run's, resumed


def before_rl(run: RunDir) -> dict[str, Any] | None:
    """The start model's evaluation, from the run's step-0 `eval` event."""
    found = [e for e in run.read_events() if e["event"] == "eval" and e.get("step") == 0]
    return None if not found else {k: v for k, v in found[-1].items() if k not in ("time", "event", "step", "replica")}


def train_rl(cfg: RunConfig, out: Path, *, resume: bool = False, quiet: bool = False,
             replica: Replica | None = None) -> dict[str, Any]:
    """The whole RL run, or (`replica`) one replica group's part of it; its summary (also
    RUN_DIR/summary.json, written by the lowest group)."""
    run = RunDir(out, replica=None if replica is None else replica.replica, checkpoints=cfg.checkpoint.dir)
    run.create()
    set_replica(None if replica is None else replica.replica)  # faults' `:R`
    arm_signal_faults()
    model, tokenizer = open_model(cfg.rl.start)
    if replica is None:  # a supervisor prepares its groups' run
        run.write_config(cfg.to_json())
        prepare_run(cfg, run, model, tokenizer)
    reference = open_model(cfg.rl.start)[0].eval().requires_grad_(False) if cfg.rl.kl_coef else None
    state = RLState(model, build_optimizer(model, cfg.optim))
    started = time.perf_counter()
    latest = load_latest(run.checkpoints) if resume else None
    if latest is not None:
        state.load_state_dict({"model": latest.model_state, **latest.train_state}, latest.path)
    if replica is None and resume:
        run.truncate_metrics(state.step)
        run.repair_events()
    run.event("start", mode="rl", start=cfg.rl.start, step=state.step)  # every launch, as a training process's
    if latest is not None:
        run.event("resume", step=state.step)
    group = LocalGroup() if replica is None else _replica_group(cfg, replica, state, run)
    # Eval mode throughout, gradients and all: the model's training mode only counts the
    # experts' loads and adds the balance loss (model/moe.py), and RL keeps the routing bias
    # as the start left it and has no balance loss.
    model.eval()
    cached: dict[int, Share] = {}  # this group's shares of the step being attempted
    failed_in_row = skipped_in_row = 0
    try:
        while state.step < cfg.train.steps:  # no quorum after the last step: each group ends on its own
            run.beat()
            _join_quorum(group, run, state)
            if state.step >= cfg.train.steps:  # healed to the end
                break
            if not cached or group.healed or next(iter(cached.values())).step != state.step + 1:
                cached = {}
            result = rl_step(cfg, state, group, tokenizer, reference, cached, tick=run.beat)
            if not result.committed:
                failed_in_row += 1
                run.event("step_failed", step=state.step + 1, participants=group.participants, error=result.error)
                _after_failure(cfg, run, state, group, result)
                if failed_in_row >= cfg.replicas.max_failed_steps and group.participant != 0:
                    raise Partitioned(f"{failed_in_row} steps in a row failed (replicas.max_failed_steps "
                                      f"{cfg.replicas.max_failed_steps}); last: {result.error}")
                continue
            failed_in_row, cached = 0, {}
            step, record = state.step, result.record
            skipped_in_row = skipped_in_row + 1 if result.skipped is not None else 0
            if result.skipped is not None:
                run.event("step_skipped", step=step, guard="nonfinite",
                          reason=f"the shares' gradients are not finite at update {result.skipped + 1}: the step "
                                 f"commits with {result.skipped} update(s)")
                if skipped_in_row >= 3 * cfg.guards.max_uncommitted_steps:  # never spin
                    raise Stalled(f"{skipped_in_row} steps in a row had gradients that are not finite in every "
                                  "group (3 x guards.max_uncommitted_steps)")
            run.append_metrics({"step": step, "time": round(time.time(), 3), **record})
            if not quiet and replica is None and "reward_mean" in record and (step % cfg.train.log_every == 0
                                                                               or step == cfg.train.steps):
                print(f"rl step {step}/{cfg.train.steps}  reward {record['reward_mean']:.3f}  accuracy "
                      f"{record['accuracy']:.1%}  loss {record['loss']}  {record['step_s']:.2f}s",
                      file=sys.stderr, flush=True)
            if group.is_lowest and checkpoint_due(cfg, step):
                if replica is not None:  # a writer that died mid-save left its folder
                    remove_partial(run.checkpoints, dead_writers_only=True)
                save_checkpoint(run.checkpoints, step, model.state_dict(),
                                {"step": step, "optimizer": state.optimizer.state_dict()}, keep=cfg.checkpoint.keep)
                run.event("checkpoint", step=step)
            corrupt_weights(step, state.params)  # `flip-bit`, `nan-weight` (faults.py)
        group.finish()
    finally:
        group.shutdown()
    if replica is not None and not _claim_final(run):  # one group evaluates, exports and summarises
        return {"steps": state.step}
    after = evaluate(cfg, model.eval(), tokenizer, tick=run.beat)
    run.event("eval", step=state.step, **after)
    export = save_hf_folder(model, tokenizer, run.export, dtype=TORCH_DTYPES[cfg.export.dtype], replace=True)
    before = before_rl(run) or {}
    summary = {"steps": state.step, "wall_s": round(time.perf_counter() - started, 3),
               **{f"{k}_before": v for k, v in before.items()}, **after, "export": str(export),
               "loss": cfg.rl.loss, "group_size": cfg.rl.group_size}
    run.write_summary(summary)
    if cfg.train.report and not supervised():  # a supervisor reports on its groups' run
        write_report_after_training(run)
    return summary


def checkpoint_due(cfg: RunConfig, step: int) -> bool:
    """Every group's own answer (a fixed clock): whether `step` is checkpointed."""
    return step % cfg.checkpoint.every == 0 or step == cfg.train.steps


def _after_failure(cfg: RunConfig, run: RunDir, state: RLState, group, result: StepResult) -> None:
    """A step whose fingerprints differed: a group outside the majority heals at the next
    quorum; with no majority, every group goes back to the newest checkpoint (written when
    the fingerprints last agreed: they are compared before each)."""
    if group.replica in result.nonfinite:
        run.event("step_corrupt", step=state.step + 1, cause="nonfinite", reason="own loss or gradients not finite",
                  healed_before=group.healed)
        if group.healed:  # healed at this step's quorum and not finite again: the device, not the state
            raise NonFiniteAfterHeal(f"own values not finite at step {state.step + 1}, right after a heal")
        group.force_heal()
    if result.odd:
        if group.is_lowest:
            run.event("sdc_detected", step=state.step + 1, replicas=result.odd, resolved=True)
        if group.replica in result.odd:
            group.force_heal()
    if not result.rollback:
        return
    latest = load_latest(run.checkpoints)
    if latest is None:
        raise Stalled("the groups' fingerprints differ with no majority, and there is no checkpoint to go back to")
    before = state.step
    state.load_state_dict({"model": latest.model_state, **latest.train_state}, latest.path)
    group.set_step(state.step)
    if group.is_lowest:
        run.event("rollback", from_step=before, to_step=state.step, reason=result.error)


def _claim_final(run: RunDir) -> bool:
    """Whether this group evaluates and exports the finished run: the first to claim it,
    or one that finds the claimant dead (it died mid-export; its restart comes here again)."""
    claim = run.logs / FINAL_CLAIM
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if writer_alive(claim.read_text().strip()) is not False:
                return False
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(writer_tag())
        return True
    return False


def _join_quorum(group, run: RunDir, state: RLState) -> None:
    """The step's quorum; a `heal` event when this group received a peer's state."""
    t0 = time.perf_counter()
    group.start_step()
    if group.healed:
        run.event("heal", step=state.step, seconds=round(time.perf_counter() - t0, 3), bytes=group.healed_bytes)


def _replica_group(cfg: RunConfig, replica: Replica, state: RLState, run: RunDir):
    """This process as one replica group under torchft: a heal brings a peer's weights,
    AdamW state and step (replication/group.py)."""
    from stalwart.replication.group import TorchFTGroup
    from stalwart.replication.protocol import start_together

    weights = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in state.params)
    group = TorchFTGroup(
        cfg.replicas, replica=replica.replica, lighthouse=replica.lighthouse, host=replica.host,
        state_dict=state.state_dict, load_state_dict=state.load_state_dict, changes=lambda: state.changes,
        step=state.step, secret=replica.secret, max_state_bytes=(weights + moments) * 5 // 4 + (16 << 20),
        torchft_log=run.logs / f"replica-{replica.replica}.torchft.log",
        on_quorum_retry=lambda error, waited: report_quorum_retry(run, state.step, cfg.replicas.lighthouse_grace_s,
                                                                  error, waited))
    start_together(run.logs, replica.replica)
    return group


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
        # A step's exchange waits for the slowest group's sampling: 60 s, not training's 5 s.
        replicas=dataclasses.replace(base.replicas, timeout_s=60.0),
        rl=dataclasses.replace(base.rl, start=str(path.resolve())))
    cfg = apply_overrides(cfg, settings)
    check_rl_config(cfg)
    return cfg


def check_rl_config(cfg: RunConfig) -> None:
    """What an RL run cannot do, as one line (the rest is config.py's)."""
    if cfg.data.task == "files":
        raise UserError("stalwart rl needs a task with a scorer (data.task addition or multiplication); "
                        "user files have no verifiable answers")
    if cfg.rl.prompts < cfg.replicas.count:
        raise UserError(f"rl.prompts {cfg.rl.prompts} must be at least replicas.count {cfg.replicas.count}: "
                        "each replica group's share of a step holds at least one prompt")
    if cfg.replicas.ranks_per_group != 1 or cfg.replicas.strategy != "ddp":
        raise UserError("stalwart rl runs replica groups of one rank each, exchanging every step "
                        "(replicas.ranks_per_group 1, replicas.strategy ddp)")
