"""The facts world measured (paper §4, Prop. 2): the pair's accuracies, its taxonomy and the wrong-fact tokens.

    python benchmarks/facts_world.py --threads 1     # builds the world first when it is not cached

Writes benchmarks/results/facts_measure.json. A wrong-fact token is one that facts.facts_mistake_positions
marks: the value the student writes for a fact it learned wrong. The exclusion control and the rules are
benchmarks/study.py --world facts.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
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
import train  # noqa: E402  (its response_hidden_states: the scored positions of a rollout)
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
    logits = {role: train.response_hidden_states(model, rollouts, slice(None))
              @ tip.lm_head_weight(model).T for role, model in (("student", student), ("teacher", teacher))}
    stats = score.token_stats(logits["student"], logits["teacher"])
    h = score.normalized_entropy(stats.entropy, logits["student"].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    sampled = rollouts.input_ids[:, 1:][scored]
    mistake = evaluate.world_mistake_mask("facts", tokenizer, rollouts, prompts)[:, 1:][scored]
    kl = stats.reverse_kl.double()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out problem at T=1")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd_measure(args)


if __name__ == "__main__":
    main()
