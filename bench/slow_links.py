"""DDP against DiLoCo against Streaming DiLoCo over a real rate-limited link.

Each setting trains the default recipe (the `tiny` DeepSeek-style model, 3-digit addition)
with N replica groups, one test host each (stalwart/links.py: network namespaces on a
switch, every host's link shaped to --rate-mbit each way with tc tbf), the Lighthouse on
host 0, the same number of steps, so the same tokens, per group:

- ddp: its loss per step does not depend on the link, so its curve comes from an
  unthrottled run (`stalwart train --replicas N`, as its users would start it); its time
  per step over the link is measured on the hosts over --ddp-link-steps steps, and its
  wall time over the link is its steps x that time;
- diloco, streaming: trained over the link, with compression none, or int4 (int2) with
  error feedback (the `-int4` (`-int2`) settings; int2 only when asked for); H =
  --inner-steps, streaming with --fragments, tau 1 and alpha 0.5; the outer optimizer
  stalwart's defaults (lr 0.7, Nesterov momentum 0.9) or --outer-lr / --outer-momentum
  (another H or outer optimizer is labelled in the table and cached apart);
- --spike-sigma: the spike guard's sigma for every run (DDP's label and cache say so;
  DiLoCo's inner steps are guarded against non-finite values only, whatever it is).

Reported per setting, mean and min-max over seeds: bytes the groups sent (metrics.jsonl),
final eval loss, exact match on 200 held-out problems (from the export), compute
utilisation (each group's inner-step compute over its wall time, the mean over groups),
wall time, and training wall time to DDP's final eval loss (the first evaluation at or
below it, every --eval-every steps; the evaluations' own time left out, as DDP's time over
the link has none). The modelled time (the compute measured; each blocking exchange
= bytes / bandwidth + latency x hops, minus the compute it overlaps) is printed next to the
measured wall time on the real link, for the settings trained on it.

Run as root from the repo root (.venv active); results are cached per run in --out, so an
interrupted sweep resumes:

    python bench/slow_links.py                                    # the full sweep
    python bench/slow_links.py --groups 2 --seeds 0 --settings diloco-int4
    python bench/slow_links.py --report docs/img                  # table and PNG plots
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stalwart.config import ReplicasConfig
from stalwart.links import Hosts, unavailable

SETTINGS = ("ddp", "diloco", "diloco-int4", "diloco-int2", "streaming", "streaming-int4", "streaming-int2")
SWEEP = ("ddp", "diloco", "diloco-int4", "streaming", "streaming-int4")  # what a bare run measures
PORT = 29510


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _strategy_args(setting: str, a: argparse.Namespace) -> list[str]:
    if setting == "ddp":
        return []
    strategy, _, compression = setting.partition("-")
    args = ["--replicas.strategy", strategy, "--replicas.inner_steps", str(a.inner_steps),
            "--replicas.outer_lr", str(a.outer_lr), "--replicas.outer_momentum", str(a.outer_momentum)]
    if strategy == "streaming":
        args += ["--replicas.fragments", str(a.fragments)]
    if compression:
        args += ["--replicas.compression", compression, "--replicas.error_feedback", "true"]
    return args


def _common(groups: int, seed: int, steps: int, eval_every: int) -> list[str]:
    # timeout_s 120: over 10 Mbit/s the default model's 8 MB all-reduce (DDP) or fp32
    # all-gather takes ~7 s, past the 5 s default, which then fails every step. An fp32
    # export: the exact match is the trained model's, as docs/benchmarks.md records it.
    return ["--quiet", "--replicas", str(groups), "--train.steps", str(steps), "--train.seed", str(seed),
            "--data.seed", str(seed), "--eval.every", str(eval_every), "--eval.problems", "0",
            "--checkpoint.every", str(steps), "--replicas.timeout_s", "120", "--export.dtype", "fp32"]


def _wait_for_port(netns_hosts: Hosts, ip: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(('{ip}', {PORT}), timeout=1).close()"
    while time.monotonic() < deadline:
        if netns_hosts.popen(0, [sys.executable, "-c", probe], stderr=subprocess.DEVNULL).wait() == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Lighthouse did not start on {ip}:{PORT}")


def train_on_hosts(args: list[str], groups: int, rate_mbit: float, out: Path, timeout: float) -> dict:
    """One job over `groups` test hosts: a Lighthouse on host 0, group i alone on host i.
    Returns the wall time and what each host's link carried."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_JOB_SECRET": secrets.token_hex(32)}
    with Hosts(groups, rate_mbit) as hosts:
        ip0 = hosts.hosts[0].ip
        lighthouse = hosts.popen(0, [sys.executable, "-m", "stalwart", "lighthouse", "--bind", f"{ip0}:{PORT}",
                                     "--min-replicas", str(groups)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _wait_for_port(hosts, ip0)
        before = [hosts.counters(i) for i in range(groups)]
        t0 = time.time()
        procs = [hosts.popen(i, [sys.executable, "-m", "stalwart", "train", *args, "--replicas.min_replicas",
                                 str(groups), "--lighthouse", f"http://{ip0}:{PORT}", "--replica-id", str(i),
                                 "--host", h.ip, "--out", str(out / f"host-{i}")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i, h in enumerate(hosts.hosts)]
        try:
            errors = [p.communicate(timeout=timeout)[1] for p in procs]
        finally:
            for p in [lighthouse, *procs]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        wall = time.time() - t0
        carried = [hosts.counters(i)["tx"] - before[i]["tx"] for i in range(groups)]
    for i, (p, err) in enumerate(zip(procs, errors)):
        if p.returncode != 0:
            raise RuntimeError(f"group {i} exited {p.returncode}: {err.strip().splitlines()[-1:]}")
    return {"wall_s": wall, "carried": carried}


def train_locally(args: list[str], out: Path, timeout: float) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "stalwart", "train", *args, "--out", str(out / "host-0")],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"stalwart train exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": time.time() - t0}


def exact_match_of(export: Path, seed: int, problems: int = 200) -> float:
    from stalwart.config import DataConfig
    from stalwart.data.tasks import make_problem
    from stalwart.export.hf import load_hf_folder
    from stalwart.training.evaluate import exact_match

    model, tokenizer = load_hf_folder(export)
    d = DataConfig()
    cases = [make_problem(d.task, "eval", i, seed, d.min_digits, d.max_digits) for i in range(problems)]
    accuracy, _ = exact_match(model.eval(), tokenizer, cases)
    return accuracy


def utilisation(run: Path, groups: int) -> float:
    """Mean over groups of inner-step compute seconds over the group's training wall time
    (its first record to its last)."""
    shares = []
    for i in range(groups):
        records = _jsonl(run / f"host-{i}" / "metrics.jsonl")
        steps = [r for r in records if "loss" in r]
        if len(records) < 2:
            continue
        span = records[-1]["time"] - records[0]["time"] + steps[0]["step_s"]
        shares.append(sum(r["step_s"] for r in steps) / span)
    return statistics.mean(shares)


def modelled_wall_s(run: Path, rate_mbit: float, latency_s: float, overlap_steps: int) -> float:
    """Group 0's wall time with its compute as measured and each exchange as the link would
    take it: (participants - 1) x payload at the rate plus latency per hop, less the
    compute of the inner steps it overlaps."""
    records = _jsonl(run / "host-0" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    compute = sum(r["step_s"] for r in steps)
    step_s = compute / len(steps)
    comm = 0.0
    for r in records:
        if "round" not in r:
            continue
        hops = max(r["participants"] - 1, 0)
        seconds = r["bytes_sent"] * 8 / (rate_mbit * 1e6) + latency_s * hops
        hidden = overlap_steps * step_s if r["step"] < steps[-1]["step"] and "fragment" in r else 0.0
        comm += max(seconds - hidden, 0.0)
    return compute + comm


def _variant(a: argparse.Namespace) -> tuple[str, str]:
    """How a DiLoCo or streaming run departs from the defaults (H 50, stalwart's outer
    optimizer): its label in the table ('' for none) and its cache directory's suffix."""
    default, label, tag = ReplicasConfig(), [], ""
    if a.inner_steps != default.inner_steps:
        label.append(f"H {a.inner_steps}")
        tag += f"-h{a.inner_steps}"
    if (a.outer_lr, a.outer_momentum) != (default.outer_lr, default.outer_momentum):
        label.append(f"outer lr {a.outer_lr:g} momentum {a.outer_momentum:g}")
        tag += f"-lr{a.outer_lr:g}-m{a.outer_momentum:g}"
    return ", ".join(label), tag


def one_run(setting: str, groups: int, seed: int, a: argparse.Namespace) -> dict:
    variant, tag = ("", "") if setting == "ddp" else _variant(a)
    if setting == "ddp" and a.spike_sigma is not None:  # DiLoCo's inner steps have no spike guard anyway
        variant, tag = f"spike guard sigma {a.spike_sigma:g}", f"-sigma{a.spike_sigma:g}"
    out = a.out / f"{setting}{tag}-g{groups}-s{seed}"
    cached = out / "result.json"
    if cached.exists():
        return json.loads(cached.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = _common(groups, seed, a.steps, a.eval_every) + _strategy_args(setting, a)
    if a.spike_sigma is not None:
        args += ["--guards.spike_sigma", str(a.spike_sigma)]
    timeout = 6 * 3600
    if setting == "ddp":
        run = train_locally(args, out, timeout)
        train_on_hosts(_common(groups, seed, a.ddp_link_steps, 0), groups, a.rate_mbit, out / "link", timeout)
        steps = [r for r in _jsonl(out / "link" / "host-0" / "metrics.jsonl") if "loss" in r][5:]  # past warm-up
        step_over_link = statistics.mean(r["step_s"] for r in steps)
        wall_over_link = a.steps * step_over_link
    else:
        run = train_on_hosts(args, groups, a.rate_mbit, out, timeout)
        step_over_link = None
        wall_over_link = run["wall_s"]
    summary = json.loads((out / "host-0" / "summary.json").read_text())
    evals = [e for e in _jsonl(out / "host-0" / "events.jsonl") if e["event"] == "eval" and e["eval_loss"] is not None]
    metrics = [m for i in range(groups) for m in _jsonl(out / f"host-{i}" / "metrics.jsonl")]
    result = {
        "setting": setting, "variant": variant, "groups": groups, "seed": seed, "steps": a.steps, "rate_mbit": a.rate_mbit,
        "bytes_sent": sum(int(m.get("bytes_sent", 0)) for m in metrics),
        "eval_loss": summary["eval_loss"], "eval_curve": [(e["step"], e["eval_loss"]) for e in evals],
        "exact_match": exact_match_of(out / "host-0" / "export", seed),
        "wall_s": run["wall_s"], "wall_over_link_s": wall_over_link, "step_over_link_s": step_over_link,
        "utilisation": None if setting == "ddp" else utilisation(out, groups),
        "carried": run.get("carried"),
        "modelled_wall_s": None if setting == "ddp" else
        modelled_wall_s(out, a.rate_mbit, 0.0, 1 if setting.startswith("streaming") else 0),
        "first_record_time": min(m["time"] for m in metrics),
        "eval_times": [(e["step"], e["time"], e["seconds"]) for e in evals],
    }
    cached.write_text(json.dumps(result, indent=1))
    return result


def _training_clock(result: dict) -> list[float]:
    """Training wall time at each evaluation: DDP from its step and time per step over the
    link (measured without evaluations), the others from the clock less the time spent in
    evaluations up to then, as DDP's."""
    if result["step_over_link_s"] is not None:
        return [step * result["step_over_link_s"] for step, _ in result["eval_curve"]]
    clock, evaluating = [], 0.0
    for _, at, seconds in result["eval_times"]:
        evaluating += seconds
        clock.append(at - result["first_record_time"] - evaluating)
    return clock


def _time_to(result: dict, target: float) -> float | None:
    """Training wall time to the first evaluation at or below `target`."""
    for (_, loss), at in zip(result["eval_curve"], _training_clock(result)):
        if loss <= target * (1 + 1e-9):
            return at
    return None


def _by_variant(results: list[dict], groups: int) -> list[tuple[str, list[dict]]]:
    """The runs with `groups` groups, by setting and variant (SETTINGS order): each one's
    label in the table and plots, and its runs (one a seed)."""
    found = sorted({(r["setting"], r["variant"]) for r in results if r["groups"] == groups},
                   key=lambda v: (SETTINGS.index(v[0]), v[1]))
    return [(f"{setting}, {variant}" if variant else setting,
             [r for r in results if r["groups"] == groups and (r["setting"], r["variant"]) == (setting, variant)])
            for setting, variant in found]


def report(results: list[dict], img: Path | None) -> str:
    def spread(values: list[float], fmt: str) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = statistics.mean(values)
        return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else f"{mean:{fmt}}"

    lines = ["| groups | setting | bytes sent | vs DDP | eval loss | exact match | utilisation | wall over link "
             "| to DDP's loss | modelled / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for groups in sorted({r["groups"] for r in results}):
        ddp = [r for r in results if r["groups"] == groups and r["setting"] == "ddp"]
        for label, rows in _by_variant(results, groups):
            ratio = [statistics.mean(d["bytes_sent"] for d in ddp) / r["bytes_sent"] for r in rows] if ddp else []
            to_target = []  # None: this seed never reached its DDP twin's loss
            for r in rows:
                twin = next((d for d in ddp if d["seed"] == r["seed"]), None)
                if twin is not None:
                    to_target.append(_time_to(r, twin["eval_loss"]))
            never = to_target.count(None)
            reached = spread(to_target, '.0f') + " s" if never < len(to_target) else "never"
            if 0 < never < len(to_target):
                reached += f" ({never} of {len(to_target)} seeds never)"
            modelled = [r["modelled_wall_s"] / r["wall_over_link_s"] for r in rows if r["modelled_wall_s"]]
            lines.append(f"| {groups} | {label} | {spread([r['bytes_sent'] / 1e6 for r in rows], '.1f')} MB "
                         f"| {spread(ratio, '.0f')}x | {spread([r['eval_loss'] for r in rows], '.4f')} "
                         f"| {spread([r['exact_match'] for r in rows], '.3f')} "
                         f"| {spread([r['utilisation'] for r in rows], '.1%')} "
                         f"| {spread([r['wall_over_link_s'] for r in rows], '.0f')} s "
                         f"| {reached if to_target else '-'} | {spread(modelled, '.2f')} |")
    if img is not None:
        _plots(results, img)
    return "\n".join(lines)


def _plots(results: list[dict], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    for groups in sorted({r["groups"] for r in results}):
        fig, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        for label, rows in _by_variant(results, groups):
            r = min(rows, key=lambda r: r["seed"])
            steps = [s for s, _ in r["eval_curve"]]
            losses = [loss for _, loss in r["eval_curve"]]
            per_step_bytes = r["bytes_sent"] / r["steps"]
            by_bytes.plot([s * per_step_bytes / 1e6 for s in steps], losses, marker="o", label=label)
            by_time.plot(_training_clock(r), losses, marker="o", label=label)
        by_bytes.set(xscale="log", xlabel="MB sent by all groups", ylabel="eval loss",
                     title=f"{groups} groups: loss against bytes")
        by_time.set(xscale="log", xlabel=f"training wall seconds over {results[0]['rate_mbit']:g} Mbit/s",
                    ylabel="eval loss", title=f"{groups} groups: loss against wall time")
        by_bytes.legend()
        fig.tight_layout()
        fig.savefig(img / f"slow_links_{groups}_groups.png", dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SWEEP), choices=SETTINGS)
    p.add_argument("--groups", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--inner-steps", type=int, default=ReplicasConfig().inner_steps)
    p.add_argument("--fragments", type=int, default=2)
    p.add_argument("--outer-lr", type=float, default=ReplicasConfig().outer_lr)
    p.add_argument("--outer-momentum", type=float, default=ReplicasConfig().outer_momentum)
    p.add_argument("--spike-sigma", type=float, help="guards.spike_sigma for every run (0: no spike guard, as "
                   "DiLoCo's inner steps; default the recipe's)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rate-mbit", type=float, default=10.0)
    p.add_argument("--ddp-link-steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("bench-results/slow_links"))
    p.add_argument("--report", type=Path, metavar="IMG_DIR", help="only print the table of the cached runs and "
                   "write the plots to IMG_DIR")
    a = p.parse_args()
    if a.report is None:
        reason = unavailable()
        if reason:
            sys.exit(f"bench/slow_links.py: {reason}")
        for groups in a.groups:
            for seed in a.seeds:
                for setting in a.settings:
                    t = time.time()
                    r = one_run(setting, groups, seed, a)
                    print(f"{setting} groups={groups} seed={seed}: eval {r['eval_loss']:.4f}, "
                          f"{r['bytes_sent'] / 1e6:.1f} MB, {time.time() - t:.0f} s", flush=True)
    # Every run cached in --out: the DDP baseline of an earlier invocation included.
    print(report([json.loads(p.read_text()) for p in sorted(a.out.glob("*/result.json"))], a.report))


if __name__ == "__main__":
    main()
