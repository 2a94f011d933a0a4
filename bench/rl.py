"""GRPO step time and reward curve of `stalwart rl` against TRL's GRPOTrainer, same start.

Both sides start from the same weights: the --from model (a run directory's newest good
checkpoint, or a model folder) written once as an fp32 deepseek_v3 folder, which stalwart
loads as its own model and TRL as transformers' `DeepseekV3ForCausalLM` (their logits on
the first prompt are compared and printed). Both run on the CPU, as `stalwart rl` does,
fp32, in this process and with the same torch threads.

The stalwart side is `stalwart rl` in-process (rl_config + train_rl, as commands/rl.py
runs it) with its defaults and any --section.key VALUE overrides, eval.problems 0 (no
evaluation before or after). The TRL side is a GRPOConfig derived from that RunConfig
(`trl_arguments`): rl.prompts P prompts x rl.group_size G completions per optimizer step,
one step per batch of rollouts, the same problems in the same order (shuffling off; the
order each reward call receives is checked), the same reward function
(stalwart.rl.loop.reward on the decoded completion), sampler temperature, completion
length, AdamW lr / betas / eps / weight decay, constant schedule, grad clip, loss and
clipping. What TRL cannot match is listed in the output under "differences"; settings
with no TRL counterpart (a non-constant lr, routing replay) are refused.

What it measures, per side and repeat, over steps 2..--steps (step 1 is warm-up):
- step time: stalwart's generation_s + scoring_s + update_s from metrics.jsonl; TRL's
  time from on_step_begin to on_step_end (generation, rewards, loss, backward, clip,
  AdamW step); median, min and max over the steps;
- generation time: stalwart's generation_s (sampling, decoding and rewards), TRL's
  `_generate_single_turn` (transformers' generate); median over the steps;
- tokens/s: completion tokens generated (eos included, as both count them) per second of
  step time;
- the reward curve: the mean reward of each step's P x G completions.
The sides run in turns (stalwart, TRL, stalwart, ...), --repeats times; repeat r uses seed
--seed + r on both sides, so the repeats also show the seed noise of the reward curves.
Reported: the speed-up TRL / stalwart of the median step times (median, min and max over
repeats), the ratio of tokens/s (completion lengths differ between the sides' samples),
and each side's mean reward over the last half of the steps with its spread across
repeats; the curves agree when the two differ by at most two standard errors (with one
repeat, the standard error of the last half's per-step rewards stands in).

Run (from the repo root, .venv active, TRL installed: `pip install -e .[rl-bench]`):

    python bench/rl.py --steps 5 --repeats 1                  # smoke model, built into a temp dir
    python bench/rl.py --from runs/main --steps 20 --repeats 3 --out rl.json
    python bench/rl.py --from runs/main --rl.group_size 16 --optim.lr 5e-5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stalwart.commands.train import parse_overrides
from stalwart.config import RunConfig
from stalwart.data.tasks import Problem, make_problem
from stalwart.data.tokenizer import encode
from stalwart.errors import UserError
from stalwart.export.hf import load_hf_folder, save_hf_folder
from stalwart.model_source import open_model
from stalwart.rl.loop import reward, rl_config, train_rl

SIDES = ("stalwart", "TRL")
WARMUP_STEPS = 1  # excluded from the step times: allocator, kernel choice, TRL's lazy setup
# The model built when --from is not given: the smoke recipe on 1-digit addition (~15 s),
# trained with RL on the same task: at temperature 1 it is right about one time in eight,
# so groups differ and the curves can move (on 2 digits it is never right).
SMOKE_TRAIN = ["--recipe", "smoke", "--quiet", "--train.steps", "300", "--data.min_digits", "1",
               "--data.max_digits", "1", "--eval.problems", "0"]
SMOKE_RL = {"data.min_digits": "1", "data.max_digits": "1"}
# Set by the benchmark on the stalwart side; --section.key overrides cannot change them.
FIXED = ("train.steps", "train.seed", "eval.problems", "train.report")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE overrides `stalwart rl`'s config; "
                                       "the TRL side follows it.")
    add = p.add_argument
    add("--from", dest="source", type=Path, help="run directory or model folder (default: the smoke model, "
                                                 "trained into a temp dir)")
    add("--steps", type=int, default=20, help="RL steps per run (the first is warm-up)")
    add("--repeats", type=int, default=3, help="runs per side, in turns")
    add("--seed", type=int, default=0, help="train.seed of repeat 0 (repeat r: seed + r), both sides")
    add("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    add("--out", type=Path, metavar="FILE", help="also write the results here as JSON")
    args, extra = p.parse_known_args(argv)
    settings = parse_overrides(extra)
    if args.steps < WARMUP_STEPS + 1:
        raise UserError(f"--steps must be at least {WARMUP_STEPS + 1} (step 1 is warm-up), got {args.steps}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    fixed = sorted(set(settings) & set(FIXED))
    if fixed:
        raise UserError(f"the benchmark sets {', '.join(fixed)} itself (use --steps and --seed)")
    if args.source is not None and not args.source.exists():
        raise UserError(f"--from {args.source}: no such run directory or model folder")
    if args.out is not None and not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: no folder {args.out.parent}")
    return args, settings


def require_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError("TRL is not installed: pip install -e .[rl-bench]") from None


# --- the common start -------------------------------------------------------------------

def build_smoke_model(tmp: Path) -> Path:
    """Train the smoke recipe into tmp/sft with `stalwart train` in a child process."""
    out = tmp / "sft"
    done = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(out), *SMOKE_TRAIN],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"building the smoke model with `stalwart train` failed: {last}")
    return out


def write_start(source: Path, tmp: Path) -> Path:
    """The model at `source` as an fp32 deepseek_v3 folder that both sides load: a run
    directory's checkpoint is fp32 while its export is bf16, so neither side may take a
    different copy."""
    model, tokenizer = open_model(str(source))
    return save_hf_folder(model, tokenizer, tmp / "start", dtype=torch.float32)


def logit_gap(folder: Path, prompt: str) -> float:
    """Max |logit difference| of stalwart's and transformers' models of `folder` on one prompt."""
    from transformers import AutoModelForCausalLM

    ours, tokenizer = load_hf_folder(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([encode(tokenizer, prompt)])
    with torch.no_grad():
        return float((ours.eval()(ids).logits - theirs.eval()(input_ids=ids).logits).abs().max())


def train_problems(cfg: RunConfig, steps: int) -> list[Problem]:
    """The problems stalwart's step s draws (numbers s*P .. s*P+P-1 of the train split), in order."""
    d, n = cfg.data, steps * cfg.rl.prompts
    return [make_problem(d.task, "train", i, d.seed, d.min_digits, d.max_digits) for i in range(n)]


# --- stalwart's side --------------------------------------------------------------------

@dataclass
class Run:
    """One side's run: per step, its time and what it generated."""

    side: str
    repeat: int
    seed: int
    step_s: list[float] = field(default_factory=list)
    generation_s: list[float] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    order_matched: bool | None = None  # TRL: every reward call got its step's problems, each G times in a row


def stalwart_config(start: Path, settings: dict[str, str], steps: int, seed: int) -> RunConfig:
    return rl_config(str(start), settings | {"train.steps": str(steps), "train.seed": str(seed),
                                             "eval.problems": "0", "train.report": "false"})


def run_stalwart(cfg: RunConfig, out: Path, repeat: int) -> Run:
    train_rl(cfg, out, quiet=True)
    run = Run("stalwart", repeat, cfg.train.seed)
    n = cfg.rl.prompts * cfg.rl.group_size
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        run.step_s.append(m["generation_s"] + m["scoring_s"] + m["update_s"])
        run.generation_s.append(m["generation_s"])
        run.reward_mean.append(m["reward_mean"])
        run.accuracy.append(m["accuracy"])
        run.completion_tokens.append(round(m["completion_length"] * n))
    return run


# --- TRL's side -------------------------------------------------------------------------

def check_mappable(cfg: RunConfig) -> None:
    """Refuse settings that TRL's GRPOTrainer has no counterpart for."""
    o, rl = cfg.optim, cfg.rl
    if o.warmup_steps or o.min_lr_ratio != 1.0:
        raise UserError("the benchmark compares at a constant learning rate "
                        "(optim.warmup_steps 0 and optim.min_lr_ratio 1, `stalwart rl`'s default)")
    if rl.routing_replay:
        raise UserError("TRL has no routing replay: leave rl.routing_replay off")
    if rl.updates != 1:  # TRL's num_iterations reuses a generation for that many of its max_steps
        raise UserError("the benchmark compares one update per batch of rollouts (rl.updates 1): TRL counts "
                        "each of num_iterations as a step, so the two would do different work per step")
    if rl.temperature <= 0:
        raise UserError("GRPO samples: rl.temperature must be > 0")


def trl_arguments(cfg: RunConfig, steps: int, output_dir: Path) -> dict[str, Any]:
    """GRPOConfig's arguments for the run `cfg` describes (see the module docstring)."""
    rl, o = cfg.rl, cfg.optim
    return {
        "output_dir": str(output_dir),
        # one optimizer step per generation batch of P prompts x G completions
        "per_device_train_batch_size": rl.prompts * rl.group_size, "gradient_accumulation_steps": 1,
        "steps_per_generation": 1, "num_generations": rl.group_size, "num_iterations": rl.updates,
        "max_steps": steps, "seed": cfg.train.seed, "shuffle_dataset": False,
        # sampling: plain temperature sampling, no top-k / top-p, the same longest completion
        "max_completion_length": rl.max_new_tokens, "temperature": rl.temperature, "top_p": 1.0, "top_k": 0,
        # the objective (rl/objective.py): grpo, dr_grpo or dapo, clipped ratio, k3 KL
        "loss_type": rl.loss, "scale_rewards": "none" if rl.loss == "dr_grpo" else "group",
        "epsilon": rl.clip_low, "epsilon_high": rl.clip_high, "beta": rl.kl_coef,
        "mask_truncated_completions": False, "router_aux_loss_coef": 0.0,
        # AdamW (training/optim.py), constant lr, no warmup, the same clip
        "optim": "adamw_torch", "learning_rate": o.lr, "adam_beta1": o.beta1, "adam_beta2": o.beta2,
        "adam_epsilon": o.eps, "weight_decay": o.weight_decay, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "max_grad_norm": o.grad_clip,
        # fp32 on the CPU as `stalwart rl`, no recomputation, nothing written or reported
        "use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False,
        "logging_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0, "remove_unused_columns": False, "log_completions": False,
    }


def differences(cfg: RunConfig) -> list[str]:
    """What the TRL side does differently from stalwart's, though configured alike."""
    rl = cfg.rl
    out = [
        "sampling: stalwart prefills each prompt once and samples its G completions from that cache "
        "(sampling.generate); TRL repeats each prompt G times and calls transformers' generate on the batch",
        "random streams: stalwart seeds its sampler from train.seed and the step, TRL from torch's global "
        "generator (set_seed(seed)); with the same seed the two draw different completions, so the curves "
        "can agree only within seed noise",
    ]
    if rl.loss == "dapo":
        out.append("dapo: stalwart averages over the tokens of groups whose rewards differ; TRL divides by every "
                   "completion token of the batch (zero-variance groups add tokens, no loss)")
    if cfg.optim.weight_decay:
        out.append("weight decay: stalwart decays matrices other than the router's; TRL every parameter but "
                   "biases and norms")
    return out


def step_timer():
    """A TrainerCallback that records the time of each optimizer step, on_step_begin to
    on_step_end, in its `seconds`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def reward_function(problems: list[Problem], format_weight: float, run: Run, group_size: int):
    """TRL's reward function: stalwart's reward of each completion against its problem (the
    dataset's `problem` column is its number); records each call's mean reward, accuracy
    and tokens on `run`, and whether the problems came in stalwart's order."""
    def stalwart_reward(completions: list[str], completion_ids: list[list[int]], problem: list[int],
                        **kwargs) -> list[float]:
        scored = [reward(problems[i], text, format_weight) for i, text in zip(problem, completions)]
        step = len(run.reward_mean)
        prompts = len(problem) // group_size
        expected = [step * prompts + k // group_size for k in range(len(problem))]
        run.order_matched = (run.order_matched is not False) and problem == expected
        run.reward_mean.append(sum(r for r, _ in scored) / len(scored))
        run.accuracy.append(sum(ok for _, ok in scored) / len(scored))
        run.completion_tokens.append(sum(map(len, completion_ids)))
        return [r for r, _ in scored]

    return stalwart_reward


def run_trl(start: Path, cfg: RunConfig, steps: int, workdir: Path, repeat: int) -> Run:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    run = Run("TRL", repeat, cfg.train.seed)
    problems = train_problems(cfg, steps)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "problem": list(range(len(problems)))})
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(start, padding_side="left")
    timer = step_timer()
    trainer = GRPOTrainer(
        model=model, args=GRPOConfig(**trl_arguments(cfg, steps, workdir)), train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=reward_function(problems, cfg.rl.format_reward, run, cfg.rl.group_size),
        callbacks=[timer])
    generate = trainer._generate_single_turn  # timed: the generation share of TRL's step

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            run.generation_s.append(time.perf_counter() - t0)

    trainer._generate_single_turn = timed_generate
    trainer.train()
    run.step_s = timer.seconds
    return run


# --- results ----------------------------------------------------------------------------

def timed(values: list[float]) -> list[float]:
    return values[WARMUP_STEPS:]


def last_half(values: list[float]) -> list[float]:
    return values[len(values) // 2:]


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def tokens_per_s(run: Run) -> float:
    """Completion tokens generated per second of step time, over the timed steps."""
    return sum(timed(run.completion_tokens)) / sum(timed(run.step_s))


def reward_stderr(runs: list[Run]) -> float:
    """The standard error of a side's last-half mean reward: from its spread across repeats
    (seeds), or with one repeat from that of the last half's per-step rewards."""
    if len(runs) > 1:
        return spread([statistics.fmean(last_half(r.reward_mean)) for r in runs]) / math.sqrt(len(runs))
    rewards = last_half(runs[0].reward_mean)
    return spread(rewards) / math.sqrt(len(rewards))


def side_summary(runs: list[Run]) -> dict[str, Any]:
    """A side's numbers over its repeats: step-time medians and tokens/s per repeat, the
    pooled timed steps' min and max, and the last-half reward per repeat."""
    medians = [statistics.median(timed(r.step_s)) for r in runs]
    pooled = [s for r in runs for s in timed(r.step_s)]
    rewards = [statistics.fmean(last_half(r.reward_mean)) for r in runs]
    return {
        "step_s_median_per_repeat": medians, "step_s_median": statistics.median(medians),
        "step_s_min": min(pooled), "step_s_max": max(pooled),
        "generation_s_median": statistics.median(g for r in runs for g in timed(r.generation_s)),
        "tokens_per_s_per_repeat": [tokens_per_s(r) for r in runs],
        "tokens_per_s": statistics.median(tokens_per_s(r) for r in runs),
        "last_half_reward_per_repeat": rewards, "last_half_reward_mean": statistics.fmean(rewards),
        "last_half_reward_spread": spread(rewards), "last_half_reward_stderr": reward_stderr(runs),
        "last_half_accuracy_mean": statistics.fmean(statistics.fmean(last_half(r.accuracy)) for r in runs),
    }


def agreement(ours: dict[str, Any], theirs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Whether the last-half mean rewards differ by at most two standard errors of the
    difference (or, where neither moved at all, by no more than rounding)."""
    diff = ours["last_half_reward_mean"] - theirs["last_half_reward_mean"]
    tolerance = 2 * math.hypot(ours["last_half_reward_stderr"], theirs["last_half_reward_stderr"])
    noise = "repeats (seeds)" if repeats > 1 else "per-step rewards of the one repeat"
    if tolerance == 0:
        noise += "; no spread at all: every completion may have scored alike, and the curves carry no signal"
    return {"difference": diff, "tolerance": tolerance, "agree": abs(diff) <= max(tolerance, 1e-9),
            "noise_from": noise}


def summarize(runs: list[Run], repeats: int) -> dict[str, Any]:
    sides = {side: side_summary([r for r in runs if r.side == side]) for side in SIDES}
    ours, theirs = sides["stalwart"], sides["TRL"]
    ratios = [t / s for s, t in zip(ours["step_s_median_per_repeat"], theirs["step_s_median_per_repeat"])]
    token_ratios = [s / t for s, t in zip(ours["tokens_per_s_per_repeat"], theirs["tokens_per_s_per_repeat"])]
    return {"sides": sides, "speedup_per_repeat": ratios, "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "tokens_per_s_ratio_per_repeat": token_ratios, "tokens_per_s_ratio_median": statistics.median(token_ratios),
            "reward_agreement": agreement(ours, theirs, repeats)}


def print_report(header: list[str], summary: dict[str, Any], runs: list[Run], diffs: list[str]) -> None:
    for line in header:
        print(line)
    print()
    print("| implementation | step s (median) | step s (min) | step s (max) | generation s (median) | "
          "completion tok/s | reward, last half (± sd over repeats) | accuracy, last half |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side in SIDES:
        s = summary["sides"][side]
        noise = f"± {s['last_half_reward_spread']:.3f}" if len(s["step_s_median_per_repeat"]) > 1 else "(1 repeat)"
        print(f"| {side} | {s['step_s_median']:.3f} | {s['step_s_min']:.3f} | {s['step_s_max']:.3f} | "
              f"{s['generation_s_median']:.3f} | {s['tokens_per_s']:.0f} | "
              f"{s['last_half_reward_mean']:.3f} {noise} | "
              f"{s['last_half_accuracy_mean']:.1%} |")
    print()
    print(f"speed-up, TRL step s / stalwart step s: **{summary['speedup_median']:.2f}x** "
          f"(min {summary['speedup_min']:.2f}x, max {summary['speedup_max']:.2f}x over "
          f"{len(summary['speedup_per_repeat'])} repeats); completion tok/s, stalwart / TRL: "
          f"{summary['tokens_per_s_ratio_median']:.2f}x (median of repeats)")
    a = summary["reward_agreement"]
    print(f"reward curves, last half: stalwart - TRL = {a['difference']:+.3f}, tolerance ±{a['tolerance']:.3f} "
          f"(2 standard errors, noise from {a['noise_from']}): " + ("agree" if a["agree"] else "**DIFFER**"))
    print()
    steps = len(runs[0].reward_mean)
    print("| step | " + " | ".join(f"{side} reward (mean of repeats)" for side in SIDES) + " |")
    print("|---:|" + "---:|" * len(SIDES))
    for i in range(steps):
        means = [statistics.fmean(r.reward_mean[i] for r in runs if r.side == side) for side in SIDES]
        print(f"| {i + 1} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    print()
    print("differences TRL could not match:")
    for d in diffs:
        print(f"- {d}")


def run_in_turns(start: Path, cfg: RunConfig, args: argparse.Namespace, tmp: Path) -> list[Run]:
    """stalwart, TRL, stalwart, TRL, ...: --repeats runs of each, repeat r with seed --seed + r."""
    runs: list[Run] = []
    for r in range(args.repeats):
        seeded = replace(cfg, train=replace(cfg.train, seed=args.seed + r))
        runs.append(run_stalwart(seeded, tmp / f"stalwart-{r}", r))
        with contextlib.redirect_stdout(sys.stderr):  # TRL's prints (its train summary) stay off the report
            runs.append(run_trl(start, seeded, args.steps, tmp / f"trl-{r}", r))
        if not runs[-1].order_matched:
            raise UserError("TRL did not give the reward function stalwart's problems in stalwart's order")
    return runs


def describe(args: argparse.Namespace, cfg: RunConfig, gap: float, transformers_version: str,
             trl_version: str) -> list[str]:
    """The report's header: the command, the versions, the start and the run's shape."""
    rl, d = cfg.rl, cfg.data
    return [
        "$ " + shlex.join([Path(sys.executable).name] + sys.argv),
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, CPU, fp32), transformers "
        f"{transformers_version}, trl {trl_version}, stalwart {importlib.metadata.version('stalwart')}",
        f"start: {args.source or 'smoke model (built)'}; logits stalwart vs transformers on the first prompt: "
        f"max |diff| {gap:.2e}",
        f"task {d.task}, {d.min_digits}-{d.max_digits} digits; {args.steps} steps of {rl.prompts} prompts x "
        f"{rl.group_size} completions, at most {rl.max_new_tokens} tokens, temperature {rl.temperature}; "
        f"loss {rl.loss}, lr {cfg.optim.lr}, kl {rl.kl_coef}; {args.repeats} repeats in turns, "
        f"step 1 excluded from times; prompts in TRL in stalwart's order (shuffle_dataset False, checked)",
    ]


def main(argv: list[str] | None = None) -> int:
    try:
        args, settings = parse_args(argv)
        require_trl()
        return benchmark(args, settings)
    except UserError as e:
        print(f"bench/rl.py: error: {e}", file=sys.stderr)
        return 2


def benchmark(args: argparse.Namespace, settings: dict[str, str]) -> int:
    import transformers
    import trl

    transformers.logging.set_verbosity_error()  # the load report lists the MTP layer it skips, by design
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as name:
        tmp = Path(name)
        source = args.source
        if source is None:
            source, settings = build_smoke_model(tmp), SMOKE_RL | settings
        start = write_start(source, tmp)
        cfg = stalwart_config(start, settings, args.steps, args.seed)
        check_mappable(cfg)
        gap = logit_gap(start, train_problems(cfg, 1)[0].prompt)
        runs = run_in_turns(start, cfg, args, tmp)
    summary = summarize(runs, args.repeats)
    diffs = differences(cfg)
    print_report(describe(args, cfg, gap, transformers.__version__, trl.__version__), summary, runs, diffs)
    rl, d = cfg.rl, cfg.data
    trl_args = trl_arguments(cfg, args.steps, Path("TMP"))
    if args.out:
        args.out.write_text(json.dumps({
            "command": sys.argv, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "trl": trl.__version__,
            "source": str(args.source) if args.source else None, "settings": settings, "steps": args.steps,
            "repeats": args.repeats, "seed": args.seed, "logit_gap": gap,
            "stalwart_config": {"data": {"task": d.task, "min_digits": d.min_digits, "max_digits": d.max_digits},
                                "rl": asdict(rl), "optim": asdict(cfg.optim)},
            "trl_config": {k: v for k, v in trl_args.items() if k != "output_dir"}, "differences": diffs,
            "summary": summary, "runs": [asdict(r) for r in runs],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
