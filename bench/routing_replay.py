"""What routing replay changes when GRPO takes several updates per batch of rollouts.

`stalwart rl` from the same model, the same steps and seeds, with `rl.routing_replay`
false and true in turns (--repeats seeds, seed r on both), each with `--updates` optimizer
steps per batch. Reported per setting, as the median over the steps of each run and then
the median (min-max) over runs:

- routing_mismatch: the share of expert choices, at the positions whose output is scored,
  that differ from the sampler's before the first update (the same weights: kernels only);
- routing_mismatch_last: the same at the last update, after updates - 1 optimizer steps
  (what the ratio pi / pi_old mixes in without replay; with replay, the routing used is the
  sampler's and this is what it would have been);
- clip_fraction_last: the share of tokens whose ratio was clipped at the last update;
- the reward over the last half of the steps.

Run (from the repo root, .venv active; RUN_DIR: the main job's run):

    OMP_NUM_THREADS=2 python bench/routing_replay.py --from RUN_DIR --steps 20 --repeats 3 \\
        --data.min_digits 3 --data.max_digits 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from stalwart.commands.train import parse_overrides
from stalwart.errors import UserError
from stalwart.rl.loop import rl_config, train_rl

METRICS = ("routing_mismatch", "routing_mismatch_last", "clip_fraction_last", "sampler_logprob_gap")


def run(source: Path, settings: dict[str, str], out: Path) -> dict[str, float]:
    """One `stalwart rl` run; the median of each metric over its steps, and its last half's reward."""
    train_rl(rl_config(str(source), settings), out, quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {k: statistics.median(r[k] for r in records) for k in METRICS}
    result["reward_last_half"] = statistics.fmean(r["reward_mean"] for r in records[len(records) // 2:])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", type=Path, required=True, help="run directory or model folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--updates", type=int, default=4, help="rl.updates: optimizer steps per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args, extra = p.parse_known_args(argv)
    try:
        settings = parse_overrides(extra)
        if args.updates < 2:
            raise UserError(f"--updates must be at least 2 (the routing moves between updates), got {args.updates}")
        if not args.source.exists():
            raise UserError(f"--from {args.source}: no such run directory or model folder")
        torch.set_num_threads(args.threads)
        results: dict[str, list[dict[str, float]]] = {"false": [], "true": []}
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            for r in range(args.repeats):
                for replay in results:
                    results[replay].append(run(args.source, settings | {
                        "train.steps": str(args.steps), "train.seed": str(r), "rl.updates": str(args.updates),
                        "rl.routing_replay": replay, "eval.problems": "0", "train.report": "false"},
                        Path(tmp) / f"{replay}-{r}"))
    except UserError as e:
        print(f"bench/routing_replay.py: error: {e}", file=sys.stderr)
        return 2
    print(f"$ python bench/routing_replay.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"\n{args.steps} steps, rl.updates {args.updates}, {args.repeats} seeds; median over steps, then "
          "median (min-max) over seeds\n")
    keys = (*METRICS, "reward_last_half")
    print("| routing_replay | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for replay, runs in results.items():
        cells = []
        for k in keys:
            values = [x[k] for x in runs]
            cells.append(f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        print(f"| {replay} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
