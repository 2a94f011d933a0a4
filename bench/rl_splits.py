"""Which held-out splits give GRPO a signal from a model: greedy exact match and pass@k.

GRPO learns only from groups whose rewards differ, so the split it trains on must be one
the model sometimes solves when sampled (pass@k > 0) and mostly fails greedily. This
measures, for a model, each candidate split's greedy exact match and pass@k (k samples at
`stalwart rl`'s temperature and completion length):

- addition, 3 digits: the main job's own held-out problems;
- addition, 3 digits with every column carrying, and with at least two carries;
- addition, 4 digits (`stalwart rl`'s default split);
- addition, 3 digits with the shorter operand not zero-padded ("737+42=");
- addition, 4-digit plus 3-digit operand, padded to 4.

Run (from the repo root, .venv active; RUN_DIR: the main job's run):

    OMP_NUM_THREADS=2 python bench/rl_splits.py --from RUN_DIR --problems 200
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from stalwart.data.tasks import Problem, addition, make_problem
from stalwart.errors import UserError
from stalwart.model_source import open_model
from stalwart.rl.loop import pass_at_k, rl_config
from stalwart.training.evaluate import exact_match


def carries(problem: Problem) -> int:
    """Columns that carry into the next, from the worked steps ("x+y+c=TU": T is the carry)."""
    return sum(step.split("=")[1][0] == "1" for step in problem.solution.split(",")[:-1])


def unpadded(a: int, b: int) -> Problem:
    p = addition(a, b, 3)
    return Problem(f"{a}+{b}=", p.solution, p.answer)


def splits(n: int) -> dict[str, Callable[[], list[Problem]]]:
    held_out = [make_problem("addition", "eval", i, 0, 3, 3) for i in range(20 * n)]
    rng = random.Random(5)
    return {
        "addition, 3 digits (held out)": lambda: held_out[:n],
        "3 digits, every column carries": lambda: [p for p in held_out if carries(p) == 3][:n],
        "3 digits, two carries or more": lambda: [p for p in held_out if carries(p) >= 2][:n],
        "addition, 4 digits (held out)": lambda: [make_problem("addition", "eval", i, 0, 4, 4) for i in range(n)],
        "3 digits, shorter operand unpadded": lambda: [unpadded(rng.randrange(100, 1000), rng.randrange(10, 100))
                                                       for _ in range(n)],
        "4-digit + 3-digit, padded to 4": lambda: [addition(rng.randrange(1000, 10000), rng.randrange(100, 1000), 4)
                                                   for _ in range(n)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", type=Path, required=True, help="run directory or model folder")
    p.add_argument("--problems", type=int, default=200, help="problems per split")
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@k")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    try:
        if not args.source.exists():
            raise UserError(f"--from {args.source}: no such run directory or model folder")
        torch.set_num_threads(args.threads)
        model, tokenizer = open_model(str(args.source))
        cfg = rl_config(str(args.source), {"rl.pass_k": str(args.k)})
    except UserError as e:
        print(f"bench/rl_splits.py: error: {e}", file=sys.stderr)
        return 2
    model.eval()
    print(f"$ python bench/rl_splits.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(f"| split | problems | greedy exact match | pass@{args.k} (temperature {cfg.rl.temperature}) |")
    print("|---|---:|---:|---:|")
    for name, make in splits(args.problems).items():
        problems = make()
        accuracy, _ = exact_match(model, tokenizer, problems)
        passed = pass_at_k(cfg, model, tokenizer, problems, seed=cfg.train.seed + 1)
        print(f"| {name} | {len(problems)} | {accuracy:.1%} | {passed:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
