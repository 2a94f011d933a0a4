"""`stalwart plan`: its flags, the run they describe, and the tables it prints.

A single plan needs --model, --tokens, --accelerator and --devices. `--compare` plans a
DeepSeek-R2-class run (COMPARE_DEFAULTS; each flag overrides) on several fleets.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from stalwart.compress import COMPRESSIONS
from stalwart.errors import ConfigError
from stalwart.plan.catalog import accelerator, load_catalog
from stalwart.plan.compare import COMPARE_FLEETS, COMPARE_STRATEGIES
from stalwart.plan.estimate import (ACTIVATION_BYTES, CHECKPOINT_WRITE_GB_S, GROUP_RESTART_S, KERNEL_EFFICIENCY,
                                    RECOMPUTE, RESTART_S, STRATEGIES,
                                    Parallelism, RunSpec, estimate)

HELP = "how a run would go on a fleet: time, cost, ETTR and the bottleneck"
DESCRIPTION = ("Model a training run's compute, communication and failures on a fleet from "
               "the accelerator catalog (docs/plan.md).")

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
# The --compare scenario: a DeepSeek-R2-class model (plan/shapes.py) on 30T tokens, twice
# DeepSeek-V3's data (an assumption), at V3's sequence length and batch, with V3's
# parallelism (PP16 with two chunks per stage, EP64, all-to-alls overlapped as DualPipe
# does), on 4096 devices of each fleet. Any flag given replaces its value.
COMPARE_DEFAULTS = {"model": "deepseek-r2-class", "tokens": 30e12, "devices": 4096, "seq_len": 4096,
                    "batch_tokens": 15360 * 4096, "pp": 16, "ep": 64, "virtual_stages": 2, "overlap": 1.0}
# Flags that become RunSpec / Parallelism fields of the same name; unset ones keep the
# dataclass's default (or COMPARE_DEFAULTS' with --compare).
_SPEC_FLAGS = ("tokens", "devices", "seq_len", "batch_tokens", "precision", "weights", "recompute",
               "activation_dtype", "micro_batch", "mfu", "overlap",
               "kernel_efficiency",
               "mtbf_hours", "checkpoint_s", "checkpoint_interval_s", "checkpoint_write_gb_s", "restart_s",
               "group_restart_s")
_PARALLEL_FLAGS = ("tp", "pp", "ep", "fsdp", "virtual_stages", "strategy", "diloco_h", "diloco_compression")


def number(text: str) -> float:
    """A finite float: NaN and infinity would travel silently into every figure."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def quantity(text: str) -> float:
    """'14.8T', '500B', '63M', '1e12' -> a positive number."""
    raw = text.strip()
    scale = _SUFFIXES.get(raw[-1:].upper(), 1.0)
    try:
        value = number(raw[:-1] if scale != 1.0 else raw) * scale
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 14.8T, 500B, 63M)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("the run")
    run.add_argument("--model", help="preset (tiny, deepseek-v3, llama3.1-405b, deepseek-r2-class, ...), model "
                                     "folder, run directory, or a JSON file of shape fields")
    run.add_argument("--tokens", type=quantity, help="training tokens, e.g. 14.8T")
    run.add_argument("--seq-len", type=int, help="sequence length (default 4096)")
    run.add_argument("--batch-tokens", type=quantity,
                     help="tokens per optimizer step (default 16,777,216: 2048 sequences of 8192)")
    run.add_argument("--precision", choices=("bf16", "fp8"),
                     help="GEMM precision for the roofline (default bf16; MFU is always against the BF16 peak)")
    run.add_argument("--weights", choices=("bf16", "fp32"),
                     help="the weights as held: bf16 with an fp32 master copy in the optimizer (default; "
                          "Megatron, DeepSeek-V3), or fp32 computed in bf16 by autocast (stalwart's own training)")
    run.add_argument("--recompute", choices=RECOMPUTE,
                     help="activations for the backward pass: full (default: recomputed, a layer's input kept) "
                          "or none: every layer's saved tensors kept (stalwart's own training)")
    run.add_argument("--activation-dtype", choices=tuple(ACTIVATION_BYTES),
                     help="activations and FSDP's gathered weights: bf16 (default, autocast) or fp32")
    run.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    fleet = p.add_argument_group("the fleet")
    fleet.add_argument("--accelerator", help="catalog key, e.g. H800 (see --list)")
    fleet.add_argument("--devices", type=int, help="devices in the fleet")
    fleet.add_argument("--catalog", type=Path, metavar="FILE", help="add or replace catalog entries")
    fleet.add_argument("--list", action="store_true", help="print the catalog with its sources and exit")
    par = p.add_argument_group("parallelism and replication")
    for name, what in (("tp", "tensor-parallel ranks"), ("pp", "pipeline stages"),
                       ("ep", "expert-parallel ranks, taken from the data-parallel ones"),
                       ("fsdp", "data-parallel ranks sharding weights, gradients and optimizer state (FSDP2; "
                                "its traffic is counted as data parallelism's)"),
                       ("virtual-stages", "interleaved chunks per pipeline stage")):
        par.add_argument(f"--{name}", type=int, help=f"{what} (default 1)")
    par.add_argument("--strategy", choices=STRATEGIES,
                     help="sync: a failure restarts the job from its checkpoint; replicas: stalwart's replica "
                          "groups heal live; diloco: replica groups that synchronise every H steps (default sync)")
    par.add_argument("--diloco-h", type=int, help="DiLoCo inner steps per outer step (default 100)")
    par.add_argument("--diloco-compression", choices=COMPRESSIONS,
                     help="the outer gradient on the wire, as training's --replicas.compression (default none: fp32)")
    perf = p.add_argument_group("speed, failures and cost")
    perf.add_argument("--mfu", type=number, help="achieved model FLOPs utilisation, 0-1 (default: the roofline's)")
    perf.add_argument("--overlap", type=number, help="share of compute under which TP/EP/PP traffic hides, 0-1")
    perf.add_argument("--kernel-efficiency", type=number,
                      help=f"share of peak the kernels reach (default {KERNEL_EFFICIENCY}, fitted to Llama 3.1 405B)")
    perf.add_argument("--price", type=number, help="price per device-hour (default 2.0)")
    perf.add_argument("--mtbf-hours", type=number, help="per-device MTBF (default: the catalog's)")
    perf.add_argument("--checkpoint-s", type=number, help="blocking cost of one checkpoint (default: state / write rate)")
    perf.add_argument("--checkpoint-interval-s", type=number, help="fixed interval (default: Young/Daly)")
    perf.add_argument("--checkpoint-write-gb-s", type=number,
                      help=f"per-device checkpoint write bandwidth (default {CHECKPOINT_WRITE_GB_S:g})")
    perf.add_argument("--restart-s", type=number,
                      help=f"a whole job's restart, for --strategy sync (default {RESTART_S:g})")
    perf.add_argument("--group-restart-s", type=number,
                      help=f"a replica group's restart before its heal (default {GROUP_RESTART_S:g})")
    perf.add_argument("--from-run", type=Path, metavar="RUN_DIR",
                      help="take checkpoint cost and recovery time measured in a stalwart run (and its "
                           "throughput as the MFU, with --run-accelerator)")
    perf.add_argument("--run-accelerator", metavar="KEY",
                      help="the catalog device the --from-run run used: its throughput becomes the MFU")
    out = p.add_argument_group("output")
    out.add_argument("--compare", action="store_true",
                     help="a DeepSeek-R2-class run on H800, H20 and Ascend 910C fleets, as a restarting job and as "
                          "replica groups (and --strategy's), with sensitivity to MTBF and scale-out bandwidth")
    out.add_argument("--fleets", help="with --compare: catalog keys, comma-separated")
    out.add_argument("--png", type=Path, default=Path("plan-compare.png"),
                     help="with --compare: the figure (default plan-compare.png)")
    out.add_argument("--json", action="store_true", help="machine-readable output")


def _from_run(args: argparse.Namespace, catalog: dict, given: dict) -> dict:
    """Measured figures of --from-run into `given` where the user did not set them; says what
    was used and what was not, and why."""
    from stalwart.plan.measured import measure_run

    run_device = accelerator(catalog, args.run_accelerator) if args.run_accelerator else None
    measured = measure_run(args.from_run, run_device)
    used, unused = [], []
    if measured["mfu"] is None:
        unused.append("throughput: no --run-accelerator to take it as an MFU")
    elif "mfu" in given:
        unused.append("throughput: --mfu given")
    else:
        given["mfu"] = min(measured["mfu"], 1.0)
        used.append(f"MFU {measured['mfu']:.3g} against {measured['mfu_against']}")
    if measured["checkpoint_write_gb_s"] is None:
        unused.append("checkpoint cost: the run wrote no checkpoint that is still on disk")
    elif "checkpoint_s" in given or "checkpoint_write_gb_s" in given:
        unused.append("checkpoint cost: --checkpoint-s or --checkpoint-write-gb-s given")
    else:
        given["checkpoint_write_gb_s"] = measured["checkpoint_write_gb_s"]
        used.append(f"checkpoint write rate {measured['checkpoint_write_gb_s']:.3g} GB/s")
    strategy = given.get("strategy", "sync")
    if measured["recover_s"] is None:
        unused.append("recovery: the run recorded none (no fault in a replicated run)")
    elif strategy == "sync":
        unused.append("recovery: a replica group's; --strategy sync restarts the whole job (--restart-s)")
    elif "group_restart_s" in given:
        unused.append("recovery: --group-restart-s given")
    else:
        given["group_restart_s"] = measured["recover_s"]
        used.append(f"group restart {measured['recover_s']:.3g} s")
    outer = measured.get("outer")
    if outer is not None:  # a DiLoCo run: its H and compression, unless given
        if strategy != "diloco":
            unused.append(f"outer exchange: a {outer['strategy']} run; --strategy {strategy} does not exchange so")
        else:
            for flag, key in (("diloco_h", "inner_steps"), ("diloco_compression", "compression")):
                if flag in given:
                    unused.append(f"{key}: --{flag.replace('_', '-')} given")
                elif outer[key] == "auto":
                    unused.append("inner_steps: auto in the run, a number of steps here (--diloco-h)")
                else:
                    given[flag] = outer[key]
                    used.append(f"{key} {outer[key]}")
            used.append(f"bytes per sync of the model measured {outer['bytes_per_sync']:.4g}, modelled "
                        f"{outer['modelled_bytes_per_sync']:.4g}")
    return {**measured, "used": used, "not_used": unused}


def build_spec(args: argparse.Namespace, catalog: dict) -> tuple[RunSpec, dict | None]:
    """The run the flags describe, and what --from-run measured (or None)."""
    from stalwart.plan.shapes import model_shape

    given = {name: getattr(args, name) for name in ("model", *_SPEC_FLAGS, *_PARALLEL_FLAGS)
             if getattr(args, name) is not None}
    if args.compare:
        if args.accelerator:
            raise ConfigError("--compare plans each of --fleets; --accelerator is for a single plan")
        given = {**COMPARE_DEFAULTS, **given}
    missing = [flag for flag, name in (("--model", "model"), ("--tokens", "tokens"), ("--devices", "devices"))
               if name not in given]
    if not args.compare and not args.accelerator:
        missing.insert(2, "--accelerator")
    if missing:
        raise ConfigError(f"a plan needs {', '.join(missing)} (or --compare for the built-in scenario)")
    if args.run_accelerator and not args.from_run:
        raise ConfigError("--run-accelerator needs --from-run")
    measured = _from_run(args, catalog, given) if args.from_run else None
    parallel = Parallelism(**{k: given[k] for k in _PARALLEL_FLAGS if k in given})
    device = accelerator(catalog, args.accelerator or COMPARE_FLEETS[0])  # --compare replaces it per fleet
    price = {} if args.price is None else {"price_per_hour": args.price}
    spec = RunSpec(shape=model_shape(given["model"]), accelerator=device, parallel=parallel, **price,
                   **{k: given[k] for k in _SPEC_FLAGS if k in given})
    return spec, measured


def _fleets(text: str | None, catalog: dict) -> list:
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(COMPARE_FLEETS)
    if not keys:
        raise ConfigError("--fleets is empty")
    devices = [accelerator(catalog, k) for k in keys]
    return list({device.key: device for device in devices}.values())  # each fleet once


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    if args.list:
        return _print_catalog(catalog, args.json)
    if not args.compare and args.fleets:
        raise ConfigError("--fleets needs --compare")
    spec, measured = build_spec(args, catalog)
    if args.compare:
        from stalwart.plan.compare import compare, save_png

        folder = args.png.parent
        if not folder.is_dir():
            raise ConfigError(f"--png {args.png}: the folder {folder} does not exist")
        strategies = tuple(dict.fromkeys((*COMPARE_STRATEGIES, spec.parallel.strategy)))
        result = compare(spec, _fleets(args.fleets, catalog), strategies)
        result["png"] = str(save_png(result, args.png))
    else:
        result = estimate(spec)
    if measured:
        result["measured"] = measured
    _emit(result, args.json, _print_compare if args.compare else _print_plan)
    return 0


def _emit(result: dict, as_json: bool, printer) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        printer(result)


def _console():
    """Tables at 120 columns when piped (rich would squeeze them into 80), else the terminal's."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def _num(value: float | None) -> str:
    """A count: 14.8T tokens, 2.76M device-hours, 671B parameters."""
    if value is None:
        return "never"
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _percent(share: float) -> str:
    return f"{share:.1%}" if share >= 0.001 else f"{share * 100:.2g}%"


def _shares(r: dict) -> str:
    """'compute 76%, scale-out 21%, failures 3%': the bottleneck first."""
    if r["time_shares"] is None:
        return "failures (never finishes)"
    ordered = sorted(r["time_shares"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.0%}" for k, v in ordered if v >= 0.005)


def _print_plan(r: dict) -> None:
    from rich.table import Table

    p, f, st, mem = r["parallelism"], r["failures"], r["step"], r["memory"]
    table = Table(title=f"plan: {r['model']} on {r['devices']} x {r['accelerator']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    par = f"TP{p['tp']} PP{p['pp']} EP{p['ep']} DP{p['dp']}, {p['strategy']}"
    if p["strategy"] != "sync":
        par += f" ({p['replica_groups']} groups of {p['group_devices']})"
    rows = [
        ("parameters (total / active)", f"{_num(r['params_total'])} / {_num(r['params_active'])}"),
        ("tokens, steps", f"{_num(r['tokens'])}, {r['steps']:,} of {_num(r['batch_tokens'])}"),
        ("training FLOPs", f"{r['training_flops']:.3e}"),
        ("parallelism", par),
        ("MFU", f"{_percent(r['mfu'])} (" + ("roofline" if r["mfu_source"] == "roofline" else
                                            f"{r['mfu_source']}; the roofline gives {_percent(r['mfu_roofline'])}")
                + ")"),
        ("step", f"{r['step_s']:.2f}s: compute {st['compute_s']:.2f}s, bubble {st['bubble_s']:.2f}s, exposed "
                 f"scale-up {st['exposed_scale_up_s']:.2f}s, scale-out {st['exposed_scale_out_s']:.2f}s"),
        ("memory per device", f"{mem['peak_gb']:.0f} of {mem['hbm_gb']:g} GB at its peak: state {mem['state_gb']:.0f}, "
                              f"activations {mem['activation_gb']:.0f}"
                              + (f", FSDP's gathered layers {mem['gathered_gb']:.0f}" if mem["gathered_gb"] else "")
                              + (f"; the exchange's buffer {mem['exchange_gb']:.0f}" if mem["exchange_gb"] else "")),
        ("failures", f"MTBF {f['mtbf_job_s'] / 3600:.2f}h for the job"
                     + ("" if f["expected"] is None else f", ~{_num(f['expected'])} expected")),
        ("checkpoint", f"{f['checkpoint_s']:.1f}s every {f['checkpoint_interval_s'] / 60:.1f} min "
                       f"({f['checkpoint_rule']})"),
        ("per failure", f"recover {f['recover_s']:.0f}s, lost {f['lost_per_failure_s']:.0f}s"),
        ("time", "never finishes" if r["days"] is None else f"{r['days']:.1f} days"),
        ("device-hours", _num(r["device_hours"])),
        ("cost", "-" if r["cost"] is None else f"{r['cost']:,.0f} at {r['price_per_hour']:g}/device-hour"),
        ("ETTR", f"{r['ettr']:.1%}"),
        ("where the time goes", _shares(r)),
    ]
    if "measured" in r:
        m = r["measured"]
        rows.append(("measured in", f"{m['run']}: step {m['step_s']:.3f}s, "
                                    f"{m['flops_per_s_per_device'] / 1e9:.3g} GFLOP/s per device"))
        rows.append(("taken from it", "; ".join(m["used"]) or "nothing"))
        rows.append(("not taken", "; ".join(m["not_used"]) or "-"))
    for name, value in rows:
        table.add_row(name, value)
    console = _console()
    console.print(table)
    for warning in r["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _print_compare(result: dict) -> None:
    from rich.table import Table

    console = _console()
    first = result["plans"][0]
    table = Table(title=f"{first['model']}: {_num(first['tokens'])} tokens on {first['devices']} devices")
    for column in ("fleet", "strategy", "MFU", "days", "dev-hours", "cost", "ETTR", "where the time goes", "fits"):
        table.add_column(column, justify="left" if column in ("fleet", "strategy", "where the time goes") else "right",
                         no_wrap=True)
    for r in result["plans"]:
        table.add_row(r["accelerator"], r["parallelism"]["strategy"], _percent(r["mfu"]),
                      "never" if r["days"] is None else f"{r['days']:.0f}", _num(r["device_hours"]),
                      "-" if r["cost"] is None else f"{r['cost'] / 1e6:.1f}M", f"{r['ettr']:.1%}",
                      _shares(r), "yes" if r["memory"]["fits"] else "NO")
    console.print(table)
    for metric, title in (("mtbf", "MTBF"), ("scale_out", "scale-out bandwidth")):
        table = Table(title=f"sensitivity to {title}: days / ETTR at each factor")
        table.add_column("fleet")
        table.add_column("strategy")
        for factor in result["factors"]:
            table.add_column(f"x{factor:g}", justify="right")
        for key in dict.fromkeys((s["accelerator"], s["strategy"]) for s in result["sensitivity"]):
            cells = [s for s in result["sensitivity"] if (s["accelerator"], s["strategy"]) == key]
            table.add_row(*key, *("never" if c[f"{metric}_days"] is None else
                                  f"{c[f'{metric}_days']:.0f} / {c[f'{metric}_ettr']:.0%}" for c in cells))
        console.print(table)
    console.print(f"figure: {result['png']}")


def _print_catalog(catalog: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps({k: {"name": a.name, **{f: getattr(a, f) for f in a.sources}, "sources": a.sources}
                          for k, a in catalog.items()}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="accelerator catalog (sources: --list --json)")
    for column in ("key", "BF16 TF", "FP8 TF", "HBM GB", "HBM TB/s", "up GB/s", "domain", "out GB/s", "MTBF h"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for key, a in catalog.items():
        table.add_row(key, f"{a.bf16_tflops:g}", "-" if a.fp8_tflops is None else f"{a.fp8_tflops:g}",
                      f"{a.hbm_gb:g}", f"{a.hbm_tb_s:g}", f"{a.scale_up_gb_s:g}", str(a.scale_up_domain),
                      f"{a.scale_out_gb_s:g}", f"{a.mtbf_hours:g}")
    _console().print(table)
    return 0
