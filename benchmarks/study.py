"""The paper's rule tables at toy scale (Tables 3–6, 8): every rule at several kept ratios, with seeds.

    python benchmarks/study.py --world toy --jobs 2     # the full grid below, 3 seeds, 300 steps each
    python benchmarks/study.py --world facts --jobs 2
    python benchmarks/study.py --quick                  # 4 rules x 2 seeds x 60 steps: ~15 min on 2 cores
    python benchmarks/study.py --world agent --report   # the world's own pair: accuracies, quadrants, mistakes

A run is train.py on a built-in world (toy preset) with one rule, kept ratio ρ, loss and seed (the seed changes
the rollouts and the selection draws, not the starting student); its final student is then measured: mean@k on
every held-out split, the reverse KL to the teacher on its own test rollouts, and what it still does at the
world's known-mistake tokens. From train.py's metrics come the kept tokens, the share of them that are mistake
tokens, and every --track-every steps the mistake tokens' quadrants and kept share. `all` with
--exclude-mistakes is the exclusion control (never trained on the mistake tokens). A run's result is one JSON
file under <out>/runs/, written once the run is complete, so a stopped study resumes where it stopped.
Writes <out>/study.json, <out>/study.md (mean ± std over seeds) and <out>/study.png.
"""
from __future__ import annotations

import argparse
import importlib
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (after the path fix, so the script runs from any folder)
import score  # noqa: E402
import tip  # noqa: E402
import train  # noqa: E402  (its response_hidden_states: the scored positions of a rollout)
from rollout import generate_conversations, generate_rollouts  # noqa: E402

MAX_NEW = tip.PRESETS["toy"]["max_response_len"]  # the length the worlds train at


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
        raise argparse.ArgumentTypeError(f"{text!r}: write rule:ratio[:loss][:excluded], e.g. q3:0.1")
    return Setting(parts[0], float(parts[1]), parts[2] if len(parts) > 2 else "reverse_kl", len(parts) == 4)


# ---------------------------------------------------------------- one run

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


@torch.no_grad()
def measure_model(world: str, world_dir: str, folder: Path, samples: int, seed: int) -> dict:
    """mean@k (T=1) of the model in `folder` on each held-out split; on its test rollouts scored against the
    world's teacher: the quadrants of §4 (median split; token and reverse-KL mass shares), the mean reverse KL
    (Eq. 3) and, at the world's known-mistake tokens, how many there are per rollout, how often the token is
    not the teacher's first choice, their share of the KL mass, their quadrants and share below the median h."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    world_folder = evaluate.world_folder(world, world_dir)
    tokenizer = AutoTokenizer.from_pretrained(world_folder / "student")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world_folder / "teacher", dtype=torch.float32).eval()
    report, max_turns = {"accuracy": {}}, tip.Config().max_turns
    for split in [s for s in importlib.import_module(world).SPLITS if s != "train"]:
        problems = evaluate.world_problems(world, split, world_dir)
        tasks = evaluate.world_tasks(world, problems, tokenizer)
        generate = evaluate.model_generator(model, tokenizer, MAX_NEW, 1.0, 1.0, seed, 512, tasks=tasks,
                                            max_turns=max_turns)
        summary, _ = evaluate.run_benchmark(problems, evaluate.benchmark_prompts(problems, tokenizer, bare=True),
                                            generate, samples, batch_size=512, show_progress=False)
        report["accuracy"][split] = summary["accuracy"]
    problems = evaluate.world_problems(world, "test", world_dir)
    prompts, tasks = evaluate.benchmark_prompts(problems, tokenizer, bare=True), evaluate.world_tasks(world, problems,
                                                                                                       tokenizer)
    rollouts = (generate_conversations(model, tokenizer, [tasks[p] for p in prompts], 1, MAX_NEW, max_turns, 1.0, 1.0,
                                       seed + 1, batch_size=512) if tasks else
                generate_rollouts(model, tokenizer, prompts, 1, MAX_NEW, 1.0, 1.0, seed=seed + 1, batch_size=512))
    scored = rollouts.response_mask[:, 1:]  # the hidden state at p predicts the token at p + 1
    logits = {role: train.response_hidden_states(m, rollouts, slice(None))
              @ tip.lm_head_weight(m).T for role, m in (("model", model), ("teacher", teacher))}
    stats = score.token_stats(logits["model"], logits["teacher"])
    h = score.normalized_entropy(stats.entropy, logits["model"].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    kl = stats.reverse_kl.double()
    def mass(where):  # None for the teacher against itself
        return float(kl[where].sum() / kl.sum()) if kl.sum() > 0 else None
    report["held_out_reverse_kl"] = float(kl.mean())
    report["quadrants"] = {f"Q{q}": {"token_share": float((quadrant == q).double().mean()),
                                     "kl_mass_share": mass(quadrant == q)} for q in range(1, 5)}
    mistakes = evaluate.world_mistake_mask(world, tokenizer, rollouts, prompts)
    if mistakes is not None:
        mistakes = mistakes[:, 1:][scored]
        sampled = rollouts.input_ids[:, 1:][scored]
        report["mistakes"] = {"per_rollout": float(mistakes.sum()) / len(rollouts.texts)}
        if mistakes.any():
            report["mistakes"].update(
                not_teacher_choice=float((sampled[mistakes] != logits["teacher"][mistakes].argmax(-1)).double().mean()),
                kl_mass_share=mass(mistakes),
                below_median_h=float((h[mistakes] <= h.median()).double().mean()),
                **{f"q{q}_share": float((quadrant[mistakes] == q).double().mean()) for q in range(1, 5)})
    return report


def world_report(args) -> dict:
    """The world's teacher and student measured as a trained run is (`measure_model`), printed and written to
    <out>/world.json."""
    folder = evaluate.world_folder(args.world, args.world_dir)
    report = {"world": str(folder), "samples": args.samples, **{role: measure_model(
        args.world, args.world_dir, folder / role, args.samples, 0) for role in ("teacher", "student")}}
    evaluate.write_json(Path(args.out) / "world.json", report)
    splits = list(report["student"]["accuracy"])
    print(f"{args.world} world {folder}, mean@{args.samples} at T=1 (%): " + "; ".join(
        f"{role} " + ", ".join(f"{s} {100 * report[role]['accuracy'][s]:.1f}" for s in splits)
        for role in ("teacher", "student")))
    student = report["student"]
    print("student's test rollouts against the teacher, median split: " + ", ".join(
        f"{q} {100 * v['token_share']:.1f} % of tokens / {100 * (v['kl_mass_share'] or 0):.1f} % of KL"
        for q, v in student["quadrants"].items()))
    if "mistakes" in student:
        print("known-mistake tokens: " + json.dumps({k: round(v, 4) for k, v in student["mistakes"].items()}))
    return report


def run_one(setting: Setting, seed: int, args) -> dict:
    """Train one run, measure it, write <out>/runs/<name>.json (atomically) and delete its training folder."""
    name = f"{setting.name}-s{seed}"
    run_dir = Path(args.work_dir) / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped half-way starts again: it is complete or absent
    start = time.time()
    train.main(train_arguments(setting, seed, args, run_dir))
    train_seconds = time.time() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
    evaluate.write_json(Path(args.out) / "runs" / f"{name}.json", result)
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
    evaluate.write_json(out / "study.json", {"world": args.world, "steps": args.steps, "samples": args.samples,
                                             "command": "python benchmarks/study.py " + " ".join(sys.argv[1:]),
                                             "rows": rows, "runs": runs})
    tip.write_atomically(out / "study.md", lambda tmp: tmp.write_text(table))
    plot(rows, out / "study.png", args.world, splits)
    print(table)
    return rows


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
    settings = args.settings or (QUICK if args.quick else RULE_GRID + CONTROL + LOSS_GRID)
    rules = tip.load_select().RULES
    for setting in settings:  # every mistake before any run starts
        if setting.rule not in rules or not 0 < setting.ratio <= 1:
            raise SystemExit(f"error: setting {setting.name}: the rule must be one of {', '.join(rules)} and the "
                             "ratio in (0, 1]")
    done = {p.stem for p in (Path(args.out) / "runs").glob("*.json")}
    todo = [(s, seed) for s in settings for seed in range(args.seeds) if f"{s.name}-s{seed}" not in done]
    print(f"study on the {args.world} world: {len(settings)} settings x {args.seeds} seeds, {args.steps} steps; "
          f"{len(todo)} runs to go ({len(settings) * args.seeds - len(todo)} done) in {args.out}", flush=True)
    evaluate.world_folder(args.world, args.world_dir)  # build the world once, before runs start in parallel
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


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--world", default="toy", choices=evaluate.WORLDS, help="the built-in world to study")
    add("--settings", type=parse_setting, nargs="+", default=None,
        help="rule:ratio[:loss][:excluded] settings to run instead of the full grid (e.g. q3:0.1 all:1:jsd)")
    add("--quick", action="store_true", help="4 rules x 2 seeds x 60 steps, mean@2 (about 15 min on 2 cores)")
    add("--seeds", type=int, default=None, help="seeds 0..n-1 per setting (default 3; --quick 2)")
    add("--steps", type=int, default=None, help="optimizer steps per run (default 300; --quick 60)")
    add("--samples", type=int, default=None, help="samples per held-out problem, mean@k (default 4; --quick 2)")
    add("--jobs", type=int, default=1, help="runs at once, each in a process of its own")
    add("--threads", type=int, default=0, help="torch threads per run (0: the cores divided by --jobs)")
    add("--track-every", type=int, default=25, help="steps per window of the mistake tokens' tracking")
    add("--out", default="", help="results folder (default benchmarks/results/study-<world>[-quick])")
    add("--work-dir", default="", help="training folders while runs train (default runs/study-<world>)")
    add("--world-dir", default="", help="where the built-in worlds are cached (default: $TIP_CACHE or ~/.cache/tip)")
    add("--report", action="store_true", help="measure the world's teacher and student instead (world.json)")
    add("--in-process", action="store_true", help="run one after another in this process (tests, debugging)")
    add("--one", default="", help=argparse.SUPPRESS)  # a run process: [setting, seed] as JSON
    args = parser.parse_args(argv)
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
