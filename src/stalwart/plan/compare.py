"""One run on several fleets, and how its time and ETTR move with MTBF and with scale-out
bandwidth: `stalwart plan --compare`, as JSON and as a PNG.

Each fleet is planned with each replication strategy (a classic job that restarts from its
checkpoint, stalwart's replica groups, and any other asked for); the sensitivity multiplies one input of the
device (its MTBF, or its scale-out bandwidth) by each factor and plans again. With a given
MFU the step time does not depend on the links, so the bandwidth sweep then only moves the
heals: use the roofline (no --mfu) to compare fleets.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from stalwart.fsutil import atomic_write_bytes
from stalwart.plan.catalog import Accelerator
from stalwart.plan.estimate import RunSpec, estimate

COMPARE_FLEETS = ("H800", "H20", "Ascend910C")
COMPARE_STRATEGIES = ("sync", "replicas")
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _with(spec: RunSpec, accelerator: Accelerator, strategy: str) -> RunSpec:
    return dataclasses.replace(spec, accelerator=accelerator,
                               parallel=dataclasses.replace(spec.parallel, strategy=strategy))


def compare(base: RunSpec, fleets: list[Accelerator], strategies: tuple[str, ...] = COMPARE_STRATEGIES) -> dict:
    plans, sensitivity = [], []
    for accelerator in fleets:
        for strategy in strategies:
            spec = _with(base, accelerator, strategy)
            plans.append(estimate(spec))
            mtbf = spec.mtbf_hours or accelerator.mtbf_hours
            for factor in FACTORS:
                by_mtbf = estimate(dataclasses.replace(spec, mtbf_hours=mtbf * factor))
                by_link = estimate(dataclasses.replace(spec, accelerator=accelerator.scaled(scale_out_gb_s=factor)))
                sensitivity.append({"accelerator": accelerator.key, "strategy": strategy, "factor": factor,
                                    "mtbf_days": by_mtbf["days"], "mtbf_ettr": by_mtbf["ettr"],
                                    "scale_out_days": by_link["days"], "scale_out_ettr": by_link["ettr"]})
    return {"plans": plans, "factors": list(FACTORS), "sensitivity": sensitivity}


def save_png(result: dict, path: Path) -> Path:
    """Four panels: days and ETTR against the MTBF factor and the scale-out factor; one
    colour per fleet, one line style per strategy (solid: sync restarts, dashed: replica
    groups, dotted: a third). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    panels = [(axes[0][0], "mtbf_days", "days"), (axes[1][0], "mtbf_ettr", "ETTR"),
              (axes[0][1], "scale_out_days", "days"), (axes[1][1], "scale_out_ettr", "ETTR")]
    fleets = list(dict.fromkeys(r["accelerator"] for r in result["sensitivity"]))
    strategies = list(dict.fromkeys(r["strategy"] for r in result["sensitivity"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in panels:
        for i, fleet in enumerate(fleets):
            for j, strategy in enumerate(strategies):
                rows = [r for r in result["sensitivity"] if r["accelerator"] == fleet and r["strategy"] == strategy]
                points = [(r["factor"], r[key]) for r in rows if r[key] is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", color=colours[i % len(colours)],
                            linestyle=("-", "--", ":")[j % 3], label=f"{fleet} {strategy}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["factors"], [f"x{f:g}" for f in result["factors"]])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if label == "days":
            ax.set_yscale("log")
    axes[1][0].set_xlabel("MTBF x (catalog value = 1)")
    axes[1][1].set_xlabel("scale-out bandwidth x (catalog value = 1)")
    first = result["plans"][0]
    fig.suptitle(f"{first['model']}: {first['tokens'] / 1e12:.3g}T tokens on {first['devices']} devices per fleet "
                 "(solid: sync restarts, dashed: replica groups)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
