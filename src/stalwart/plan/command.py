"""`stalwart plan`: its flags, the run they describe, and the tables it prints.

A single plan needs --model, --tokens, --accelerator and --devices. `--compare` plans a
DeepSeek-R2-class run (COMPARE_DEFAULTS; each flag overrides) on several fleets.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from stalwart.errors import ConfigError
from stalwart.plan.catalog import accelerator, load_catalog
from stalwart.plan.estimate import (GROUP_RESTART_S, KERNEL_EFFICIENCY, RESTART_S, STRATEGIES, Parallelism, RunSpec,
                                    estimate)

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
# The --compare scenario: a DeepSeek-R2-class model (plan/shapes.py) on 30T tokens, twice
# DeepSeek-V3's data (an assumption), at V3's sequence length and batch, with V3's
# parallelism (PP16 with two chunks per stage, EP64, all-to-alls overlapped as DualPipe
# does), on 4096 devices of each fleet.
COMPARE_DEFAULTS = {"model": "deepseek-r2-class", "tokens": 30e12, "devices": 4096, "seq_len": 4096,
                    "batch_tokens": 15360 * 4096, "tp": 1, "pp": 16, "ep": 64, "virtual_stages": 2, "overlap": 1.0}
SINGLE_DEFAULTS = {"seq_len": 4096, "batch_tokens": 16 * 2**20, "tp": 1, "pp": 1, "ep": 1, "virtual_stages": 1,
                   "overlap": 0.0}


def quantity(text: str) -> float:
    """'14.8T', '500B', '63M', '1e12' -> a positive number."""
    raw = text.strip()
    scale = _SUFFIXES.get(raw[-1:].upper(), 1.0)
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
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
    run.add_argument("--batch-tokens", type=quantity, help="tokens per optimizer step (default 16M)")
    run.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="GEMM precision (default bf16)")
    fleet = p.add_argument_group("the fleet")
    fleet.add_argument("--accelerator", help="catalog key, e.g. H800 (see --list)")
    fleet.add_argument("--devices", type=int, help="devices in the fleet")
    fleet.add_argument("--catalog", type=Path, metavar="FILE", help="add or replace catalog entries")
    fleet.add_argument("--list", action="store_true", help="print the catalog with its sources and exit")
    par = p.add_argument_group("parallelism and replication")
    for name, what in (("tp", "tensor-parallel ranks"), ("pp", "pipeline stages"),
                       ("ep", "expert-parallel ranks, taken from the data-parallel ones"),
                       ("virtual-stages", "interleaved chunks per pipeline stage")):
        par.add_argument(f"--{name}", type=int, help=f"{what} (default 1)")
    par.add_argument("--strategy", choices=STRATEGIES, default="sync",
                     help="sync: a failure restarts the job from its checkpoint; replicas: stalwart's replica "
                          "groups heal live; diloco: replica groups that synchronise every H steps (default sync)")
    par.add_argument("--diloco-h", type=int, default=100, help="DiLoCo inner steps per outer step (default 100)")
    par.add_argument("--diloco-bits", type=int, default=16, help="bits per outer-gradient value: 4, 8, 16, 32")
    perf = p.add_argument_group("speed, failures and cost")
    perf.add_argument("--mfu", type=float, help="achieved model FLOPs utilisation, 0-1 (default: the roofline's)")
    perf.add_argument("--overlap", type=float, help="share of compute under which TP/EP/PP traffic hides, 0-1")
    perf.add_argument("--kernel-efficiency", type=float, default=KERNEL_EFFICIENCY,
                      help=f"share of peak the kernels reach (default {KERNEL_EFFICIENCY}, fitted to Llama 3.1 405B)")
    perf.add_argument("--price", type=float, default=2.0, help="price per device-hour (default 2.0)")
    perf.add_argument("--mtbf-hours", type=float, help="per-device MTBF (default: the catalog's)")
    perf.add_argument("--checkpoint-s", type=float, help="blocking cost of one checkpoint (default: state / write rate)")
    perf.add_argument("--checkpoint-interval-s", type=float, help="fixed interval (default: Young/Daly)")
    perf.add_argument("--checkpoint-write-gb-s", type=float, default=1.0,
                      help="per-device checkpoint write bandwidth (default 1.0)")
    perf.add_argument("--restart-s", type=float, default=RESTART_S,
                      help=f"a whole job's restart, for --strategy sync (default {RESTART_S:g})")
    perf.add_argument("--group-restart-s", type=float, default=GROUP_RESTART_S,
                      help=f"a replica group's restart before its heal (default {GROUP_RESTART_S:g})")
    perf.add_argument("--from-run", type=Path, metavar="RUN_DIR",
                      help="take step time, checkpoint cost and recovery time measured in a stalwart run")
    perf.add_argument("--run-accelerator", metavar="KEY",
                      help="the catalog device the --from-run run used: its throughput becomes the MFU")
    out = p.add_argument_group("output")
    out.add_argument("--compare", action="store_true",
                     help="a DeepSeek-R2-class run on H800, H20 and Ascend 910C fleets, with sensitivity to MTBF "
                          "and scale-out bandwidth")
    out.add_argument("--fleets", help="with --compare: catalog keys, comma-separated")
    out.add_argument("--png", type=Path, default=Path("plan-compare.png"),
                     help="with --compare: the figure (default plan-compare.png)")
    out.add_argument("--json", action="store_true", help="machine-readable output")


def build_spec(args: argparse.Namespace, catalog: dict) -> tuple[RunSpec, dict | None]:
    defaults = COMPARE_DEFAULTS if args.compare else SINGLE_DEFAULTS

    def given(name: str):
        value = getattr(args, name)
        return defaults.get(name) if value is None else value

    missing = [flag for flag, name in (("--model", "model"), ("--tokens", "tokens"),
                                       ("--accelerator", "accelerator"), ("--devices", "devices"))
               if given(name) is None and not (args.compare and name == "accelerator")]
    if missing:
        raise ConfigError(f"a plan needs {', '.join(missing)} (or --compare for the built-in scenario)")
    measured = None
    overrides = {"group_restart_s": args.group_restart_s, "checkpoint_s": args.checkpoint_s,
               "checkpoint_write_gb_s": args.checkpoint_write_gb_s, "mfu": args.mfu}
    if args.run_accelerator and not args.from_run:
        raise ConfigError("--run-accelerator needs --from-run")
    if args.from_run:
        from stalwart.plan.measured import measure_run

        run_device = accelerator(catalog, args.run_accelerator) if args.run_accelerator else None
        measured = measure_run(args.from_run, run_device)
        if measured["checkpoint_write_gb_s"] and args.checkpoint_s is None:
            overrides["checkpoint_write_gb_s"] = measured["checkpoint_write_gb_s"]
        if measured["recover_s"] and args.group_restart_s == GROUP_RESTART_S:
            overrides["group_restart_s"] = measured["recover_s"]
        if measured["mfu"] and args.mfu is None:
            overrides["mfu"] = min(measured["mfu"], 1.0)
    from stalwart.plan.shapes import model_shape

    key = args.accelerator or "H800"  # --compare replaces it with each fleet
    spec = RunSpec(
        shape=model_shape(given("model")), tokens=given("tokens"), accelerator=accelerator(catalog, key),
        devices=given("devices"), seq_len=given("seq_len"), batch_tokens=given("batch_tokens"),
        parallel=Parallelism(tp=given("tp"), pp=given("pp"), ep=given("ep"), virtual_stages=given("virtual_stages"),
                             strategy=args.strategy, diloco_h=args.diloco_h, diloco_bits=args.diloco_bits),
        precision=args.precision, overlap=given("overlap"), kernel_efficiency=args.kernel_efficiency,
        price_per_hour=args.price, mtbf_hours=args.mtbf_hours, checkpoint_interval_s=args.checkpoint_interval_s,
        restart_s=args.restart_s, **overrides)
    return spec, measured


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    if args.list:
        return _print_catalog(catalog, args.json)
    spec, measured = build_spec(args, catalog)
    if args.compare:
        from stalwart.plan.compare import COMPARE_FLEETS, compare, save_png

        keys = [k.strip() for k in args.fleets.split(",") if k.strip()] if args.fleets else list(COMPARE_FLEETS)
        if not keys:
            raise ConfigError("--fleets is empty")
        result = compare(spec, [accelerator(catalog, k) for k in keys])
        result["png"] = str(save_png(result, args.png))
        if measured:
            result["measured"] = measured
        _emit(result, args.json, _print_compare)
        return 0
    result = estimate(spec)
    if measured:
        result["measured"] = measured
    _emit(result, args.json, _print_plan)
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


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "never"
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


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
        ("memory per device", f"{mem['state_gb'] + mem['activation_gb']:.0f} of {mem['hbm_gb']:g} GB"),
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
                                    f"{_num(m['flops_per_s_per_device'], 'FLOP/s')} per device"))
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
