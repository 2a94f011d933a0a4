"""Verifiable reasoning problems with worked solutions: the embedded default data.

Each problem is a prompt, a step-by-step solution and a final answer that an exact-match
scorer checks. Generation is a pure function of (task, split, seed, index), so a loader
can resume or shard by index alone, and train and eval never share a problem: a problem
belongs to the eval split exactly when a hash of its operands falls in a fixed 1/64 slice.

Formats (digits are single tokens, see data/tokenizer.py):

    addition        "357+068=" -> "7+8+0=15,5+6+1=12,3+0+1=04,so 425" then eos
    multiplication  "47*36=" -> "47*6=282,47*30=1410,282+1410=1692,so 1692" then eos

Addition works right to left one column at a time, carrying into the next column's sum;
the answer is then read back from the columns. Operands are zero-padded to the problem's
width and every step has the same shape, so each digit the model must read sits at a
fixed distance from where it is needed: that is what lets a 2M-parameter model learn it
in minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from stalwart.errors import ConfigError

TASKS = ("addition", "multiplication")
EVAL_SLICE = 64  # one problem in 64 is held out for evaluation
MAX_DRAWS = 20_000  # a split this rare is as good as empty (1-digit multiplication has no eval pair)
ANSWER_MARK = "so "
_ANSWER = re.compile(r"so (-?\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str  # the worked steps and the final answer, without eos
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.solution


def _is_eval(task: str, a: int, b: int) -> bool:
    digest = hashlib.sha256(f"{task}:{a}:{b}".encode()).digest()
    return digest[0] % EVAL_SLICE == 0


def _operands(task: str, rng: random.Random, width: int) -> tuple[int, int]:
    if task == "addition":  # uniform over all width-digit strings, leading zeros included
        return rng.randrange(10**width), rng.randrange(10**width)
    low = 0 if width == 1 else 10 ** (width - 1)
    return rng.randint(low, 10**width - 1), rng.randint(low, 10**width - 1)


def addition(a: int, b: int, width: int) -> Problem:
    """Operands zero-padded to `width` digits; every column step has the same shape
    (x+y+carry=two digits), so each digit the model needs sits at a fixed distance."""
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry = [], 0
    for x, y in zip(map(int, xs), map(int, ys)):
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    answer = str(a + b)
    return Problem(f"{xs[::-1]}+{ys[::-1]}=", ",".join(steps) + f",{ANSWER_MARK}{answer}", answer)


def multiplication(a: int, b: int, width: int) -> Problem:
    partials = [(int(d) * 10**i) for i, d in enumerate(str(b)[::-1]) if d != "0"] or [0]
    steps = [f"{a}*{p}={a * p}" for p in partials]
    running = a * partials[0]
    for p in partials[1:]:
        steps.append(f"{running}+{a * p}={running + a * p}")
        running += a * p
    answer = str(a * b)
    return Problem(f"{a}*{b}=", ",".join(steps) + f",{ANSWER_MARK}{answer}", answer)


_BUILDERS = {"addition": addition, "multiplication": multiplication}


def make_problem(task: str, split: str, index: int, seed: int, min_digits: int, max_digits: int) -> Problem:
    """Problem number `index` of a split; the same arguments always give the same problem."""
    if task not in _BUILDERS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    if not 1 <= min_digits <= max_digits:
        raise ConfigError(f"data.min_digits and data.max_digits must satisfy 1 <= min <= max, "
                          f"got {min_digits} and {max_digits}")
    rng = random.Random(f"{task}:{split}:{seed}:{index}")
    want_eval = split == "eval"
    for _ in range(MAX_DRAWS):  # rejection sampling into the split; 1/64 of draws are eval problems
        # Widths weighted by how many problems each has: uniform over all problems, so a
        # 1-digit width does not fill a third of the eval set with its hundred pairs.
        width = rng.choices(range(min_digits, max_digits + 1),
                            weights=[100**w for w in range(min_digits, max_digits + 1)])[0]
        a, b = _operands(task, rng, width)
        if _is_eval(task, a, b) == want_eval:
            return _BUILDERS[task](a, b, width)
    raise ConfigError(f"{task} with {min_digits}-{max_digits} digit operands has (almost) no {split} problems: "
                      "use more digits")


def extract_answer(generated: str) -> str | None:
    """The final answer in a generated solution, or None if it never gave one."""
    found = _ANSWER.findall(generated)
    return found[-1] if found else None


def is_correct(problem: Problem, generated: str) -> bool:
    """Exact match of the final answer (the worked steps may differ)."""
    return extract_answer(generated) == problem.answer
