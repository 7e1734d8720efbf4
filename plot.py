"""A picture of one train.py run, or of several overlaid (a rule comparison), from their metrics.jsonl (paper §7).

    python plot.py runs/type_aware-s0-20260101-000000 --out run.png
    python plot.py runs/type_aware-s0-* runs/entropy-s0-* --out rules.png

Against the step: the loss (Eq. 9) and the mean reverse KL δ over all response tokens; the kept fraction; each
quadrant's share of the kept tokens beside its share of all response tokens (§4: what the rule keeps against
what there is); the reward of the rollouts and the held-out accuracy; tokens per second and peak memory.
Needs matplotlib.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tip


@dataclass
class PlotConfig:
    out: str = tip.arg("run.png", "the picture to write (.png, .pdf, .svg)")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise tip.InputError(f"{run_dir} has no metrics.jsonl: pass a run folder train.py wrote (runs/NAME)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(lines: list[dict], field: str) -> tuple[list[int], list[float]]:
    """The steps where `field` was logged with a number, and the numbers (skipped steps have no loss)."""
    points = [(line["step"], line[field]) for line in lines if isinstance(line.get(field), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


PANELS = [  # title, [(field, label, line style)]
    ("loss and mean reverse KL", [("loss", "loss", "-"), ("mean_reverse_kl", "mean δ", ":")]),
    ("kept fraction", [("kept_fraction", "kept", "-")]),
    ("quadrant shares: kept (solid), all (dotted)",
     [(f"q{q}_share_kept", f"Q{q} kept", "-") for q in range(1, 5)]
     + [(f"q{q}_share", f"Q{q} all", ":") for q in range(1, 5)]),
    ("reward and held-out accuracy", [("reward", "reward", "-"), ("held_out_accuracy", "held-out", "o--")]),
    ("tokens per second", [("tokens_per_second", "tokens/s", "-")]),
    ("peak memory (GiB)", [("peak_memory_gb", "peak", "-")]),
]


def plot(run_dirs: list[str], out: str | Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Draws the runs into `out`; returns each panel's curves as drawn, {title: {label: (steps, values)}}."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no screen needed
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, fields) in zip(axes.flat, PANELS):
        for r, (name, lines) in enumerate(runs.items()):
            for i, (field, label, style) in enumerate(fields):
                steps, values = series(lines, field)
                if steps:  # quadrants: one color per quadrant; elsewhere one per run
                    color = colors[(i % 4 if field.startswith("q") else r) % len(colors)]
                    alpha = 1.0 if len(runs) == 1 or not field.startswith("q") else 1.0 - 0.5 * r / len(runs)
                    ax.plot(steps, values, style, color=color, alpha=alpha, markersize=3,
                            label=label if len(runs) == 1 else f"{name}: {label}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(", ".join(runs))
    fig.savefig(out, dpi=110)
    curves = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                               for line in ax.lines} for ax in axes.flat}
    plt.close(fig)
    return curves


def main(argv: list[str] | None = None) -> None:
    parser = tip.flag_parser(PlotConfig, __doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", help="run folders (each with metrics.jsonl)")
    args = parser.parse_args(argv)
    config = PlotConfig(**tip.given_flags(args, PlotConfig))
    run_dirs = args.run_dirs
    if not run_dirs:
        parser.error("pass one run folder or more: python plot.py runs/NAME [runs/OTHER ...] --out FILE.png")
    try:
        plot(run_dirs, config.out)
    except tip.InputError as error:
        parser.error(str(error))
    print(f"wrote {config.out}")


if __name__ == "__main__":
    sys.exit(main())
