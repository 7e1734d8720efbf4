"""The paper's rule tables at toy scale (Tables 3–6, 8): every rule at several kept ratios, with seeds, on a
built-in world (§3–4); --report measures the world's own pair instead (its accuracies, the quadrants of §4, the
tokens of its known mistake).

    python benchmarks/study.py --world toy --jobs 2     # the full grid below, 3 seeds, 300 steps each
    python benchmarks/study.py --world facts --jobs 2
    python benchmarks/study.py --quick                  # 4 rules x 2 seeds x 60 steps: ~15 min on 2 cores
    python benchmarks/study.py --world toy --report     # the pair: accuracies, quadrants, mistakes (world.json)
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from world_measures import ROOT, measure_model, world_report
import tip  # noqa: E402  (world_measures has put the project on the path)
import train  # noqa: E402
import worlds  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One row of the table: a rule at a kept ratio with a loss; `exclude_mistakes` is the exclusion control."""
    rule: str
    ratio: float
    loss: str = "reverse_kl"
    exclude_mistakes: bool = False

    @property
    def name(self) -> str:
        return f"{self.rule}-{self.ratio:g}-{self.loss}" + ("-excluded" if self.exclude_mistakes else "")


RULE_GRID = [Setting("all", 1.0), Setting("entropy", 0.5), Setting("entropy", 0.2), Setting("entropy", 0.1),
             Setting("entropy_top", 0.5), Setting("entropy_top", 0.2), Setting("q3", 0.2), Setting("q3", 0.1),
             Setting("type_aware", 0.5), Setting("type_aware", 0.2), Setting("type_aware_bottom", 0.5),
             Setting("divergence", 0.5), Setting("divergence", 0.1), Setting("random", 0.5), Setting("random", 0.2)]
LOSS_GRID = [Setting(rule, ratio, loss) for rule, ratio in (("all", 1.0), ("type_aware", 0.5), ("q3", 0.1))
             for loss in ("forward_kl", "jsd")]
CONTROL = [Setting("all", 1.0, exclude_mistakes=True)]
QUICK = [Setting("all", 1.0), Setting("entropy", 0.2), Setting("type_aware", 0.2), Setting("q3", 0.2)]


def parse_setting(text: str) -> Setting:
    """"rule:ratio[:loss][:excluded]", e.g. "q3:0.1" or "all:1:reverse_kl:excluded"."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4 or (len(parts) == 4 and parts[3] != "excluded"):
        raise ValueError("write rule:ratio[:loss][:excluded], e.g. q3:0.1")
    return Setting(parts[0], float(parts[1]), parts[2] if len(parts) > 2 else "reverse_kl", len(parts) == 4)


# ---------------------------------------------------------------- one run

# A run is train.py on a built-in world (toy preset) with one rule, kept ratio ρ, loss and seed (the seed changes
# the rollouts and the selection draws, not the starting student); its final student is then measured: mean@k on
# every held-out split, the reverse KL to the teacher on its own test rollouts, and what it still does at the
# world's known-mistake tokens. From train.py's metrics come the kept tokens, the share of them that are mistake
# tokens, and every --track-every steps the mistake tokens' quadrants and kept share. `all` with
# --exclude-mistakes is the exclusion control (never trained on the mistake tokens). A run's result is one JSON
# file under <out>/runs/, written once the run is complete, so a stopped study resumes where it stopped. The
# study writes <out>/study.json, <out>/study.md (mean ± std over seeds) and <out>/study.png.

def train_arguments(setting: Setting, seed: int, args, run_dir: Path) -> list[str]:
    argv = ["--prompts", args.world, "--rule", setting.rule, "--ratio", f"{setting.ratio:g}", "--divergence",
            setting.loss, "--seed", str(seed), "--steps", str(args.steps), "--out-dir", str(run_dir.parent),
            "--run-name", run_dir.name, "--save-every", "0", "--eval-problems", "0"]
    return argv + (["--exclude-mistakes"] if setting.exclude_mistakes else []) + \
        (["--world-dir", args.world_dir] if args.world_dir else [])


def tracked(rows: list[dict], every: int) -> list[dict]:
    """train.py's metrics in windows of `every` steps: the known-mistake tokens per step, the share of them the
    rule kept, and their quadrants (token-weighted); the kept fraction and the rollout reward."""
    windows = []
    for start in range(0, len(rows), every):
        part = [r for r in rows[start:start + every] if not r["skipped"]]
        mistakes = sum(r.get("mistake_tokens", 0) for r in part)
        window = {"steps": [start + 1, start + len(rows[start:start + every])],
                  "kept_fraction": statistics.fmean(r["kept_fraction"] for r in part) if part else None,
                  "reward": statistics.fmean(r["reward"] for r in part if r["reward"] is not None) if part else None,
                  "mistake_tokens_per_step": mistakes / max(1, len(part))}
        if mistakes:
            window["mistake_kept_share"] = sum(r["mistake_kept"] for r in part) / mistakes
            window.update({f"mistake_q{q}_share": sum(r[f"mistake_q{q}_share"] * r["mistake_tokens"] for r in part)
                           / mistakes for q in range(1, 5)})
        windows.append(window)
    return windows


def run_one(setting: Setting, seed: int, args) -> dict:
    """Train one run, measure it, write <out>/runs/<name>.json (atomically) and delete its training folder."""
    name = f"{setting.name}-s{seed}"
    run_dir = Path(args.work_dir) / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped half-way starts again: it is complete or absent
    start = time.time()
    train.main(train_arguments(setting, seed, args, run_dir))
    train_seconds = time.time() - start
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [line for line in lines if "kept_tokens" in line]  # the steps, not the held-out evaluations
    response_tokens = sum(r["response_tokens"] for r in rows)
    kept, mistakes = sum(r["kept_tokens"] for r in rows), sum(r.get("mistake_tokens", 0) for r in rows)
    result = {"run": name, "setting": asdict(setting), "seed": seed, "steps": len(rows), "world": args.world,
              "command": "python train.py " + " ".join(train_arguments(setting, seed, args, run_dir)),
              "kept_tokens": kept, "kept_fraction": kept / max(1, response_tokens),
              "mistake_tokens": mistakes, "mistake_kept_share": sum(r.get("mistake_kept", 0) for r in rows) / mistakes
              if mistakes else None,
              "kept_that_are_mistakes": sum(r.get("mistake_kept", 0) for r in rows) / max(1, kept),
              "skipped_steps": sum(bool(r["skipped"]) for r in rows),
              "peak_memory_gb": max(r["peak_memory_gb"] for r in rows), "train_seconds": train_seconds,
              "track": tracked(rows, args.track_every)}
    start = time.time()
    result.update(measure_model(args.world, args.world_dir, run_dir / "final", args.samples, seed))
    result["measure_seconds"] = time.time() - start
    tip.write_json(Path(args.out) / "runs" / f"{name}.json", result)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- the study

def launch(setting: Setting, seed: int, args, threads: int) -> None:
    """One run in a process of its own (its own peak memory, `threads` torch threads)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps([asdict(setting), seed]),
               *sys_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"run {setting.name}-s{seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def sys_args(args) -> list[str]:
    """This study's options, for the run processes."""
    return ["--world", args.world, "--steps", str(args.steps), "--samples", str(args.samples), "--out", args.out,
            "--work-dir", args.work_dir, "--track-every", str(args.track_every)] + \
        (["--world-dir", args.world_dir] if args.world_dir else [])


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], settings: list[Setting]) -> list[dict]:
    """One row per setting: mean and std over seeds of every measured number."""
    rows = []
    for setting in settings:
        group = [r for r in runs if Setting(**r["setting"]) == setting]
        if not group:
            continue
        row = {"setting": asdict(setting), "name": setting.name, "seeds": sorted(r["seed"] for r in group)}
        values = {"kept_fraction": [r["kept_fraction"] for r in group],
                  **{f"accuracy_{split}": [r["accuracy"][split] for r in group] for split in group[0]["accuracy"]},
                  "held_out_reverse_kl": [r["held_out_reverse_kl"] for r in group],
                  "mistake_kept_share": [r["mistake_kept_share"] for r in group],
                  "kept_that_are_mistakes": [r["kept_that_are_mistakes"] for r in group],
                  "mistakes_per_rollout_after": [r.get("mistakes", {}).get("per_rollout") for r in group],
                  "mistakes_not_teacher_choice_after": [r.get("mistakes", {}).get("not_teacher_choice") for r in group],
                  "mistakes_below_median_h_after": [r.get("mistakes", {}).get("below_median_h") for r in group],
                  "peak_memory_gb": [r["peak_memory_gb"] for r in group],
                  "minutes": [(r["train_seconds"] + r["measure_seconds"]) / 60 for r in group]}
        for key, vals in values.items():
            row[key], row[f"{key}_std"] = mean_std(vals)
        rows.append(row)
    return rows


def markdown(rows: list[dict], splits: list[str]) -> str:
    def cell(row, key, scale=100.0, digits=1):
        mean, std = row.get(key), row.get(f"{key}_std")
        return "-" if mean is None else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    head = ["rule", "ρ", "loss", "seeds", "kept %"] + [f"{s} acc %" for s in splits] + [
        "held-out KL", "mistakes kept %", "kept that are mistakes %", "mistakes / rollout after",
        "mistake tokens not the teacher's choice after %", "peak GB", "min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row["setting"]
        rule = s["rule"] + (" (mistakes excluded)" if s["exclude_mistakes"] else "")
        lines.append("| " + " | ".join(
            [rule, f"{s['ratio']:g}", s["loss"], str(len(row["seeds"])), cell(row, "kept_fraction")]
            + [cell(row, f"accuracy_{split}") for split in splits]
            + [cell(row, "held_out_reverse_kl", 1, 4), cell(row, "mistake_kept_share"),
               cell(row, "kept_that_are_mistakes"), cell(row, "mistakes_per_rollout_after", 1, 2),
               cell(row, "mistakes_not_teacher_choice_after"),
               f"{row['peak_memory_gb']:.2f}", f"{row['minutes']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, world: str, splits: list[str]) -> bool:
    """Accuracy on each held-out split against the kept fraction, a line per rule (reverse KL), error bars over
    seeds; the other losses and the exclusion control as single points. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), sharex=True)
    for axis, split in zip(axes, splits):
        lines: dict[str, list[dict]] = {}
        for row in rows:
            s = row["setting"]
            label = s["rule"] + ("" if s["loss"] == "reverse_kl" else f" ({s['loss']})") + \
                (" (mistakes excluded)" if s["exclude_mistakes"] else "")
            lines.setdefault(label, []).append(row)
        for label, group in sorted(lines.items()):
            group.sort(key=lambda r: r["kept_fraction"])
            x = [r["kept_fraction"] for r in group]
            y = [100 * r[f"accuracy_{split}"] for r in group]
            err = [100 * r[f"accuracy_{split}_std"] for r in group]
            style = "-o" if "(" not in label else "s" if "excluded" not in label else "X"
            axis.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label, markersize=5)
        axis.set_title(f"{world} world: {split} split")
        axis.set_xlabel("kept fraction of response tokens")
        axis.set_ylabel("mean@k accuracy (%)")
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    tip.write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return True


def write_outputs(args, settings: list[Setting]) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "runs").glob("*.json"))]
    runs = [r for r in runs if r["world"] == args.world and r["steps"] == args.steps]
    rows = summarize(runs, settings)
    if not rows:
        return rows
    splits = list(runs[0]["accuracy"])
    table = markdown(rows, splits)
    out = Path(args.out)
    tip.write_json(out / "study.json", {"world": args.world, "steps": args.steps, "samples": args.samples,
                                        "command": "python benchmarks/study.py " + " ".join(sys.argv[1:]),
                                        "rows": rows, "runs": runs})
    tip.write_atomically(out / "study.md", lambda tmp: tmp.write_text(table))
    plot(rows, out / "study.png", args.world, splits)
    print(table)
    return rows


# ---------------------------------------------------------------- command line

@dataclass
class StudyFlags:
    world: str = tip.arg("toy", "the built-in world to study", list(worlds.WORLDS))
    settings: list[str] = tip.arg([], "rule:ratio[:loss][:excluded] settings to run instead of the full grid (e.g. "
                                  "q3:0.1 all:1:jsd); empty = the full grid (--quick: 4 rules)")
    quick: bool = tip.arg(False, "4 rules x 2 seeds x 60 steps, mean@2 (about 15 min on 2 cores)")
    seeds: int = tip.arg(0, "seeds 0..n-1 per setting (0 = 3; --quick 2)")
    steps: int = tip.arg(0, "optimizer steps per run (0 = 300; --quick 60)")
    samples: int = tip.arg(0, "samples per held-out problem, mean@k (0 = 4; --quick 2)")
    jobs: int = tip.arg(1, "runs at once, each in a process of its own")
    threads: int = tip.arg(0, "torch threads per run (0: the cores divided by --jobs); --report: torch threads "
                           "(0: torch's default; on a CPU shared with other jobs 1 is fastest)")
    track_every: int = tip.arg(25, "steps per window of the mistake tokens' tracking")
    out: str = tip.arg("", "results folder (empty = benchmarks/results/study-<world>[-quick])")
    work_dir: str = tip.arg("", "training folders while runs train (empty = runs/study-<world>[-quick])")
    world_dir: str = tip.arg("", "where the built-in worlds are cached (empty = $TIP_CACHE or ~/.cache/tip)")
    report: bool = tip.arg(False, "measure the world's teacher and student instead (<out>/world.json)")
    report_seed: int = tip.arg(0, "--report: the sampling seed of the measurement")
    rebuild: bool = tip.arg(False, "--report: build the world again even when it is cached")
    in_process: bool = tip.arg(False, "run one after another in this process (tests, debugging)")
    one: str = tip.arg("", "internal: be the run process of one [setting, seed] (JSON); the study starts these")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        setting, seed = json.loads(args.one)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        run_one(Setting(**setting), seed, args)
        return 0
    if args.report:
        world_report(args)
        return 0
    settings = [parse_setting(text) for text in args.settings] or (QUICK if args.quick else
                                                                   RULE_GRID + CONTROL + LOSS_GRID)
    rules = tip.load_select().RULES
    for setting in settings:  # every mistake before any run starts
        if setting.rule not in rules or not 0 < setting.ratio <= 1:
            raise SystemExit(f"error: setting {setting.name}: the rule must be one of {', '.join(rules)} and the "
                             "ratio in (0, 1]")
    done = {p.stem for p in (Path(args.out) / "runs").glob("*.json")}
    todo = [(s, seed) for s in settings for seed in range(args.seeds) if f"{s.name}-s{seed}" not in done]
    print(f"study on the {args.world} world: {len(settings)} settings x {args.seeds} seeds, {args.steps} steps; "
          f"{len(todo)} runs to go ({len(settings) * args.seeds - len(todo)} done) in {args.out}", flush=True)
    worlds.world_folder(args.world, args.world_dir)  # build the world once, before runs start in parallel
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.time()
    if args.in_process:
        for setting, seed in todo:
            run_one(setting, seed, args)
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(launch, s, seed, args, threads): f"{s.name}-s{seed}" for s, seed in todo}
            for count, future in enumerate(as_completed(futures), 1):
                future.result()
                print(f"[{count}/{len(todo)}] {futures[future]} done ({(time.time() - started) / 60:.1f} min)",
                      flush=True)
    write_outputs(args, settings)
    return 0


def parse(argv=None) -> StudyFlags:
    parser = tip.flag_parser(StudyFlags, __doc__.split("\n\n")[0])
    args = StudyFlags(**tip.given_flags(parser.parse_args(argv), StudyFlags))
    for text in args.settings:
        try:
            parse_setting(text)
        except ValueError as error:
            parser.error(f"--settings {text!r}: {error}")
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.steps = args.steps or (60 if args.quick else 300)
    args.samples = args.samples or (2 if args.quick else 4)
    suffix = "-quick" if args.quick else ""
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"study-{args.world}{suffix}")
    args.work_dir = args.work_dir or str(ROOT / "runs" / f"study-{args.world}{suffix}")
    for name in ("seeds", "steps", "samples", "jobs", "track_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
