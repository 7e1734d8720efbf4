"""The facts world measured (paper §4, Prop. 2): the pair, its taxonomy, the exclusion control and the rules.

    python benchmarks/facts_world.py measure                       # accuracies and taxonomy of the built world
    python benchmarks/facts_world.py train --rule all --exclude-mistakes --seed 0   # 300 toy-preset steps, then
    python benchmarks/facts_world.py train --rule entropy_top --ratio 0.2 --seed 1  #   the trained student measured
    python benchmarks/facts_world.py table                         # every trained run, one row per rule

`measure` writes benchmarks/results/facts_measure.json; each `train` runs `python train.py --prompts facts …`
(runs under runs/facts/), measures its final student and writes benchmarks/results/facts_runs/<run>.json;
`table` gathers those into benchmarks/results/facts_rules.json. A wrong-fact token is one that
facts.facts_mistake_positions marks: the value the student writes for a fact it learned wrong.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import facts  # noqa: E402
import score  # noqa: E402
import tip  # noqa: E402
from rollout import generate_rollouts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_NEW = tip.PRESETS["toy"]["max_response_len"]


def load(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def accuracy(model, tokenizer, problems: list[dict], samples: int, seed: int) -> float:
    """mean@k at temperature 1 (k = samples), or greedy pass@1 when samples is 0."""
    generate = evaluate.model_generator(model, tokenizer, MAX_NEW, 1.0 if samples else 0.0, 1.0, seed, 512)
    summary, _ = evaluate.run_benchmark(problems, evaluate.benchmark_prompts(problems, tokenizer, bare=True),
                                        generate, samples or 1, batch_size=512, show_progress=False)
    return round(summary["accuracy"], 4)


@torch.no_grad()
def taxonomy(student, teacher, tokenizer, problems: list[dict], samples: int, seed: int) -> dict:
    """The student's rollouts scored against the teacher (h Eq. 2, δ = reverse KL Eq. 3), split at the medians
    into the quadrants of §4; the same for the wrong-fact tokens, with the student's p(own choice), p(teacher's
    choice), and how often the value it wrote was wrong."""
    prompts = evaluate.benchmark_prompts(problems, tokenizer, bare=True)
    rollouts = generate_rollouts(student, tokenizer, prompts, samples, MAX_NEW, 1.0, 1.0, seed=seed, batch_size=512)
    scored = rollouts.response_mask[:, 1:]  # the hidden state at p predicts the token at p + 1
    logits = {role: tip.final_hidden_states(model, rollouts.input_ids, rollouts.attention_mask)[:, :-1][scored]
              @ tip.lm_head_weight(model).T for role, model in (("student", student), ("teacher", teacher))}
    stats = score.token_stats(logits["student"], logits["teacher"])
    h = score.normalized_entropy(stats.entropy, logits["student"].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    sampled = rollouts.input_ids[:, 1:][scored]
    mistake = evaluate.world_mistake_mask("facts", tokenizer, rollouts, prompts)[:, 1:][scored]
    kl, truth = stats.reverse_kl.double(), facts.fact_table()[0]
    report = {"rollouts": len(rollouts.texts), "tokens": int(h.numel()), "median_h": round(float(h.median()), 5),
              "median_reverse_kl": round(float(stats.reverse_kl.median()), 5), "quadrants": {
                  f"Q{q}": {"token_share": round(float((quadrant == q).double().mean()), 4),
                            "kl_mass_share": round(float(kl[quadrant == q].sum() / kl.sum()), 4)} for q in range(1, 5)}}
    wrong = {"tokens": int(mistake.sum()), "token_share": round(float(mistake.double().mean()), 4),
             "kl_mass_share": round(float(kl[mistake].sum() / kl.sum()), 4)}
    if mistake.any():
        # the true value of each wrong-fact token: the teacher's greedy choice there (it knows every fact)
        p = torch.softmax(logits["student"][mistake].double(), -1)
        teacher_choice = logits["teacher"][mistake].argmax(-1)
        true_ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(v) for v in range(10)]))
        wrong.update(
            quadrant_shares={f"Q{q}": round(float((quadrant[mistake] == q).double().mean()), 4) for q in range(1, 5)},
            below_median_h=round(float((h[mistake] <= h.median()).double().mean()), 4),
            mean_h=round(float(h[mistake].mean()), 5), mean_entropy_nats=round(float(stats.entropy[mistake].mean()), 4),
            mean_reverse_kl=round(float(stats.reverse_kl[mistake].mean()), 4),
            student_p_own_choice=round(float(p.max(-1).values.mean()), 4),
            student_p_teacher_choice=round(float(p.gather(-1, teacher_choice[:, None]).mean()), 4),
            teacher_choice_is_a_digit=round(float(torch.isin(teacher_choice, true_ids).double().mean()), 4),
            error_rate=round(float((sampled[mistake] != teacher_choice).double().mean()), 4))
    report["wrong_fact_tokens"] = wrong
    return report


def fact_beliefs(student, teacher, tokenizer) -> dict:
    """Teacher-forced, per wrong fact: the student's p(true value), p(its learned wrong value), entropy."""
    truth, beliefs = facts.fact_table()
    probs = {role: facts.fact_probabilities(model, tokenizer) for role, model in (("student", student),
                                                                                    ("teacher", teacher))}
    rows = {}
    for name in sorted(facts.wrong_names()):
        p = probs["student"][name]
        rows[name] = {"true": truth[name], "learned": beliefs[name], "teacher_p_true": probs["teacher"][name][truth[name]],
                      "student_p_true": p[truth[name]], "student_p_learned": p[beliefs[name]],
                      "student_entropy_over_digits_nats": round(-sum(x * math.log(x) for x in p if x > 0), 4)}
    # does the teacher copy the value written above (as it must for the fact to be fixable only at its own
    # token), or recall it? Its next-token probabilities after "X=<learned>\nY=<y>\n", at the first operand
    names = sorted(truth)
    digits = tokenizer.convert_tokens_to_ids([str(v) for v in range(10)])
    for name in rows:
        other = next(n for n in names if n not in rows)
        text = tip.format_prompt(tokenizer, f"{name}+{other}=") + f"{name}={beliefs[name]}\n{other}={truth[other]}\n"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            p = torch.softmax(teacher(input_ids=ids).logits[0, -1].double(), -1)[digits]
        rows[name].update(teacher_p_copy_learned=round(float(p[beliefs[name]]), 4),
                          teacher_p_recall_true=round(float(p[truth[name]]), 4))
    return {"facts": rows, "mean_student_p_true": round(statistics.mean(r["student_p_true"] for r in rows.values()), 4),
            "mean_teacher_p_true_all_facts": round(statistics.mean(probs["teacher"][n][v] for n, v in truth.items()), 4)}


def measure_student(student_folder: Path, world: Path, samples: int, seed: int, teacher_too: bool = False) -> dict:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(world / "student")
    models = {"student": load(student_folder), "teacher": load(world / "teacher")}
    report = {}
    for role in ("teacher", "student") if teacher_too else ("student",):
        for split in ("test", "trigger", "clean"):
            problems = facts.facts_problems(split)
            report[f"{role}_{split}_t1"] = accuracy(models[role], tokenizer, problems, samples, seed)
            if role == "teacher" or teacher_too:
                report[f"{role}_{split}_greedy"] = accuracy(models[role], tokenizer, problems, 0, seed)
    report["taxonomy_test"] = taxonomy(models["student"], models["teacher"], tokenizer, facts.facts_problems("test"),
                                       samples, seed + 1)
    report["beliefs"] = fact_beliefs(models["student"], models["teacher"], tokenizer)
    return report


def cmd_measure(args) -> None:
    start = time.time()
    world = facts.facts_world()
    info = json.loads((world / "world.json").read_text())
    report = {"world": str(world), "recipe": info["recipe"], "build_seconds": info["build_seconds"],
              "wrong_facts": info["wrong_facts"], "samples": args.samples,
              **measure_student(world / "student", world, args.samples, args.seed, teacher_too=True)}
    report["measure_seconds"] = round(time.time() - start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    evaluate.write_json(RESULTS / "facts_measure.json", report)
    print_measure(report)


def print_measure(report: dict) -> None:
    print(f"facts world {report['world']} (built in {report['build_seconds']:.0f} s); wrong facts "
          f"{', '.join(report['wrong_facts'])}; {report['samples']} samples per problem at T=1")
    print(f"{'accuracy %':<12}" + "".join(f"{s + ' ' + m:>16}" for s in ("test", "trigger", "clean")
                                          for m in ("T=1", "greedy")))
    for role in ("teacher", "student"):
        print(f"{role:<12}" + "".join(f"{100 * report[f'{role}_{s}_{m}']:16.1f}" if f"{role}_{s}_{m}" in report
                                      else f"{'-':>16}" for s in ("test", "trigger", "clean") for m in ("t1", "greedy")))
    tax = report["taxonomy_test"]
    print(f"\ntaxonomy of the student's rollouts on the test split ({tax['tokens']} tokens, median h "
          f"{tax['median_h']:.4f}, median δ {tax['median_reverse_kl']:.4f} nats)")
    print("quadrant  tokens %  KL mass %  wrong-fact tokens %")
    for q, row in tax["quadrants"].items():
        share = tax["wrong_fact_tokens"].get("quadrant_shares", {}).get(q, 0)
        print(f"{q:<8}{100 * row['token_share']:10.1f}{100 * row['kl_mass_share']:11.1f}{100 * share:21.1f}")
    print("wrong-fact tokens: " + json.dumps({k: v for k, v in tax["wrong_fact_tokens"].items() if k != "quadrant_shares"}))
    print("beliefs (teacher-forced): " + json.dumps(report["beliefs"]))


# ---------------------------------------------------------------- training runs

def run_name(rule: str, ratio: float | None, seed: int, exclude: bool, steps: int) -> str:
    return f"{rule}{'' if ratio is None else f'-{ratio:g}'}{'-excl' if exclude else ''}-s{seed}" + \
        ("" if steps == 300 else f"-{steps}steps")


def kept_shares(metrics_path: Path) -> dict:
    """Over all steps of a run: the share of the wrong-fact tokens the rule kept, and of all tokens."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    mistakes = sum(r.get("mistake_tokens", 0) for r in rows)
    out = {"steps": len(rows), "mistake_tokens": mistakes, "kept_fraction": round(statistics.mean(
        r["kept_fraction"] for r in rows), 4)}
    if mistakes:
        out["mistake_kept_share"] = round(sum(r.get("mistake_kept", 0) for r in rows) / mistakes, 4)
        for part, rs in (("first_50", rows[:50]), ("last_50", rows[-50:])):
            count = sum(r.get("mistake_tokens", 0) for r in rs)
            out[f"mistake_kept_share_{part}"] = round(sum(r.get("mistake_kept", 0) for r in rs) / max(count, 1), 4)
        out["mistake_tokens_per_step_first_last_50"] = [round(sum(r.get("mistake_tokens", 0) for r in rs) / len(rs), 2)
                                                        for rs in (rows[:50], rows[-50:])]
    return out


def cmd_train(args) -> None:
    name = run_name(args.rule, args.ratio, args.seed, args.exclude_mistakes, args.steps)
    out_dir = ROOT / "runs" / "facts"
    command = [sys.executable, str(ROOT / "train.py"), "--prompts", "facts", "--rule", args.rule, "--seed",
               str(args.seed), "--steps", str(args.steps), "--out-dir", str(out_dir), "--run-name", name,
               "--save-every", "0"]
    command += ["--ratio", str(args.ratio)] if args.ratio is not None else []
    command += ["--exclude-mistakes"] if args.exclude_mistakes else []
    if args.teacher or args.student:  # a pair other than the world's folders (the toy preset all the same)
        command += ["--preset", "toy", "--teacher", args.teacher, "--student", args.student]
    run_dir = out_dir / name
    start = time.time()
    if not (run_dir / "final").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env=env)
    train_seconds = time.time() - start
    world = facts.facts_world()
    report = {"run": name, "rule": args.rule, "ratio": args.ratio, "seed": args.seed, "steps": args.steps,
              "exclude_mistakes": args.exclude_mistakes,
              "pair": [args.teacher or "world teacher", args.student or "world student"], "command": " ".join(command[1:]),
              "train_seconds": round(train_seconds, 1), **kept_shares(run_dir / "metrics.jsonl"),
              **measure_student(run_dir / "final", world, args.samples, args.seed)}
    RESULTS.joinpath("facts_runs").mkdir(parents=True, exist_ok=True)
    evaluate.write_json(RESULTS / "facts_runs" / f"{name}.json", report)
    tax = report["taxonomy_test"]["wrong_fact_tokens"]
    print(json.dumps({k: report.get(k) for k in ("run", "student_trigger_t1", "student_clean_t1", "student_test_t1",
                                                   "mistake_kept_share")}))
    print("wrong-fact tokens after: " + json.dumps(tax))
    print("beliefs after: " + json.dumps(report["beliefs"]))


def cmd_table(args) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "facts_runs").glob("*.json"))]
    groups: dict[str, list[dict]] = {}
    for run in runs:
        key = run["run"].rsplit("-s", 1)[0]
        groups.setdefault(key, []).append(run)
    start = json.loads((RESULTS / "facts_measure.json").read_text()) if (RESULTS / "facts_measure.json").exists() else None

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{100 * statistics.mean(values):.1f}" + (f"±{100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")
    columns = [("trigger acc %", lambda r: r["student_trigger_t1"]), ("clean acc %", lambda r: r["student_clean_t1"]),
               ("test acc %", lambda r: r["student_test_t1"]),
               ("wrong-fact kept %", lambda r: r.get("mistake_kept_share")),
               ("fact error %", lambda r: r["taxonomy_test"]["wrong_fact_tokens"].get("error_rate")),
               ("p(true) %", lambda r: r["beliefs"]["mean_student_p_true"]),
               ("below med h %", lambda r: r["taxonomy_test"]["wrong_fact_tokens"].get("below_median_h"))]
    rows = []
    if start:
        rows.append(["(before training)", "-"] + [cell([f(start)]) if name != "wrong-fact kept %" else "-"
                                                  for name, f in columns])
    for key, group in sorted(groups.items()):
        rows.append([key, str(len(group))] + [cell([f(r) for r in group]) for _, f in columns])
    head = ["run", "seeds"] + [name for name, _ in columns]
    lines = ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows]
    print("\n".join(lines))
    evaluate.write_json(RESULTS / "facts_rules.json", {"table": lines, "runs": {k: [r["run"] for r in g]
                                                                                for k, g in groups.items()}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (this script and train.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="accuracies and taxonomy of the built pair")
    train = sub.add_parser("train", help="train.py --prompts facts with one rule, then measure its student")
    sub.add_parser("table", help="gather the trained runs")
    for p in (measure, train):
        p.add_argument("--samples", type=int, default=4, help="samples per held-out problem at T=1")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (train: also train.py's seed)")
    train.add_argument("--rule", required=True)
    train.add_argument("--ratio", type=float, default=None)
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--exclude-mistakes", action="store_true")
    train.add_argument("--teacher", default="", help="teacher folder (default: the world's)")
    train.add_argument("--student", default="", help="student folder to start from (default: the world's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"measure": cmd_measure, "train": cmd_train, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
