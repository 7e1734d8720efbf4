"""What the study measures of a built-in world's models (paper §3–4, §7.1): mean@k on its held-out splits, and
the model's test rollouts scored against the world's teacher (h Eq. 2, δ Eq. 3, the quadrants of §4, the tokens
of the world's known mistake). benchmarks/study.py measures each run's final student so, and with --report the
world's own teacher and student, with what the toy and facts worlds show of their pair.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, whichever folder the script runs from
    sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import pair  # noqa: E402
import score  # noqa: E402
import taxonomy  # noqa: E402
import tip  # noqa: E402
import worlds  # noqa: E402
from rollout import generate_conversations, generate_rollouts  # noqa: E402
from worlds import facts, toy  # noqa: E402

MAX_NEW = tip.PRESETS["toy"]["max_response_len"]  # the length the worlds train at


# ---------------------------------------------------------------- a model measured

def load_model(folder: Path):
    """A saved causal LM in fp32, in eval mode."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def accuracy(model, tokenizer, problems: list[dict], samples: int, seed: int, max_new: int, tasks: dict | None = None,
             max_turns: int = 8) -> float:
    """mean@k (§7.1) at temperature 1 with k = samples, or greedy pass@1 when samples is 0, of bare problems (a
    built-in world's; with `tasks`, conversations with tools)."""
    generate = evaluate.model_generator(model, tokenizer, max_new, 1.0 if samples else 0.0, 1.0, seed, 512, tasks=tasks,
                                        max_turns=max_turns)
    summary, _ = evaluate.run_benchmark(problems, evaluate.benchmark_prompts(problems, tokenizer, bare=True),
                                        generate, samples or 1, batch_size=512, show_progress=False)
    return summary["accuracy"]


@torch.no_grad()
def scored_tokens(model, teacher, rollouts):
    """(model logits, teacher logits, token stats, h, quadrant) at the response tokens of `rollouts`, row-major:
    h the normalized entropy (Eq. 2), δ the reverse KL (Eq. 3), both split at their medians into the quadrants
    of §4 (docs/decisions.md, "Quadrant boundaries")."""
    logits = [pair.response_hidden_states(m, rollouts, slice(None)) @ pair.lm_head_weight(m).T
              for m in (model, teacher)]
    stats = score.token_stats(*logits)
    h = score.normalized_entropy(stats.entropy, logits[0].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    return logits[0], logits[1], stats, h, quadrant


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two flat tensors: the Pearson correlation of their ranks (ties are
    ranked by position), in float64."""
    positions = torch.arange(len(x), dtype=torch.float64)
    a, b = (torch.empty_like(positions).scatter_(0, v.argsort(), positions) - positions.mean() for v in (x, y))
    return float((a * b).sum() / (a.norm() * b.norm()))


@torch.no_grad()
def measure_model(world: str, world_dir: str, folder: Path, samples: int, seed: int) -> dict:
    """mean@k (T=1) of the model in `folder` on each held-out split; on its test rollouts scored against the
    world's teacher: the quadrants of §4 (median split; token and reverse-KL mass shares), the mean reverse KL
    (Eq. 3) and, at the world's known-mistake tokens, how many there are per rollout, how often the token is
    not the teacher's first choice, their share of the KL mass, their quadrants and share below the median h."""
    from transformers import AutoTokenizer
    world_folder = worlds.world_folder(world, world_dir)
    tokenizer = AutoTokenizer.from_pretrained(world_folder / "student")
    model, teacher = load_model(folder), load_model(world_folder / "teacher")
    report, max_turns = {"accuracy": {}}, tip.Config().max_turns
    for split in [s for s in worlds.world_module(world).SPLITS if s != "train"]:
        problems = worlds.world_problems(world, split, world_dir)
        report["accuracy"][split] = accuracy(model, tokenizer, problems, samples, seed, MAX_NEW,
                                             worlds.world_tasks(world, problems, tokenizer), max_turns)
    problems = worlds.world_problems(world, "test", world_dir)
    prompts, tasks = evaluate.benchmark_prompts(problems, tokenizer, bare=True), worlds.world_tasks(world, problems,
                                                                                                    tokenizer)
    rollouts = (generate_conversations(model, tokenizer, [tasks[p] for p in prompts], 1, MAX_NEW, max_turns, 1.0, 1.0,
                                       seed + 1, batch_size=512) if tasks else
                generate_rollouts(model, tokenizer, prompts, 1, MAX_NEW, 1.0, 1.0, seed=seed + 1, batch_size=512))
    scored = rollouts.response_mask[:, 1:]  # the hidden state at p predicts the token at p + 1
    _, teacher_logits, stats, h, quadrant = scored_tokens(model, teacher, rollouts)
    kl = stats.reverse_kl.double()
    def mass(where):  # None for the teacher against itself
        return float(kl[where].sum() / kl.sum()) if kl.sum() > 0 else None
    report["held_out_reverse_kl"] = float(kl.mean())
    report["quadrants"] = {f"Q{q}": {"token_share": float((quadrant == q).double().mean()),
                                     "kl_mass_share": mass(quadrant == q)} for q in range(1, 5)}
    mistakes = worlds.world_mistake_mask(world, tokenizer, rollouts, prompts)
    if mistakes is not None:
        mistakes = mistakes[:, 1:][scored]
        sampled = rollouts.input_ids[:, 1:][scored]
        report["mistakes"] = {"per_rollout": float(mistakes.sum()) / len(rollouts.texts)}
        if mistakes.any():
            report["mistakes"].update(
                not_teacher_choice=float((sampled[mistakes] != teacher_logits[mistakes].argmax(-1)).double().mean()),
                kl_mass_share=mass(mistakes),
                below_median_h=float((h[mistakes] <= h.median()).double().mean()),
                **{f"q{q}_share": float((quadrant[mistakes] == q).double().mean()) for q in range(1, 5)})
    return report


# ---------------------------------------------------------------- the world's own pair (--report)

# What the default toy world must show (low, high): a teacher that solves the task, a student that errs where it
# is unsure and confidently on every carry, and Q3 tokens that hold a real share of the reverse-KL mass.
TOY_TARGETS = {
    "teacher_test_greedy": (0.90, 1.0), "teacher_test_t1": (0.85, 1.0), "teacher_trigger_t1": (0.85, 1.0),
    "student_test_t1": (0.20, 0.50), "student_trigger_t1": (0.0, 0.20), "q3_token_share": (0.05, 1.0),
    "q3_kl_mass_share": (0.10, 1.0), "rank_correlation_entropy_kl": (-1.0, 0.80)}


def world_report(args) -> dict:
    """The world's teacher and student measured as a trained run is (`measure_model`), and what the toy and facts
    worlds measure of their own pair (`toy_measures`, `facts_measures`); printed and written to <out>/world.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.time()
    folder = Path(getattr(worlds.world_module(args.world), f"{args.world}_world")(args.world_dir or None,
                                                                                      rebuild=args.rebuild))
    info, measure_start = json.loads((folder / "world.json").read_text()), time.time()
    report = {"world": str(folder), "recipe": info["recipe"], "build_seconds": info["build_seconds"],
              "build_threads": info["torch_threads"], "built_now": (folder / "world.json").stat().st_mtime >= start,
              "samples": args.samples, **{role: measure_model(args.world, args.world_dir, folder / role, args.samples,
                                                              args.report_seed) for role in ("teacher", "student")}}
    if args.world == "toy":
        report.update(toy_measures(folder, report, args.samples, args.report_seed))
    elif args.world == "facts":
        report.update(facts_measures(folder, report, args.samples, args.report_seed))
    report.update(measure_seconds=round(time.time() - measure_start, 1), cpus=os.cpu_count(),
                  load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    if args.world == "toy":
        values = toy_values(report)
        report["targets_met"] = {name: low <= values[name] <= high for name, (low, high) in TOY_TARGETS.items()}
    out = Path(args.out) / "world.json"
    tip.write_json(out, report)
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
    {"toy": print_toy, "facts": print_facts}.get(args.world, lambda report: None)(report)
    print(f"report: {out}")
    return report


@torch.no_grad()
def toy_measures(folder: Path, report: dict, samples: int, seed: int) -> dict:
    """The toy pair's accuracies (greedy and at T=1), and the student's test rollouts scored against the teacher:
    the quadrants of §4, the rank correlation of entropy and δ, and the misconception tokens' share of the tokens,
    of the reverse-KL mass and of the loss gradient, a token's being that of its δ w.r.t. the student's logits,
    P_S ⊙ (log P_S − log P_T − KL) (score.divergence_and_grad)."""
    from transformers import AutoTokenizer
    recipe = toy.ToyRecipe(**json.loads((folder / "world.json").read_text())["recipe"])
    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    models = {role: load_model(folder / role) for role in ("teacher", "student")}
    problems = {split: toy.read_split(folder, split) for split in ("test", "trigger")}
    max_new, measured, report = toy.max_response_tokens(recipe), report, {}
    for role, split, temperature in (("teacher", "test", 0.0), ("teacher", "test", 1.0), ("teacher", "trigger", 0.0),
                                     ("teacher", "trigger", 1.0), ("student", "test", 1.0),
                                     ("student", "trigger", 1.0)):
        # T=1 is measure_model's mean@k (the same generator and seed); greedy is measured here
        value = (measured[role]["accuracy"][split] if temperature else
                 accuracy(models[role], tokenizer, problems[split], 0, seed, max_new))
        name = f"{role}_{split}_{'greedy' if temperature == 0 else 't1'}"
        report[name] = round(value, 4)
        print(f"{name}: {100 * value:.1f} %")
    prompts = evaluate.benchmark_prompts(problems["test"], tokenizer, bare=True)
    rollouts = generate_rollouts(models["student"], tokenizer, prompts, samples, max_new, 1.0, 1.0, seed=seed + 1)
    student_logits, teacher_logits, stats, h, quadrant = scored_tokens(models["student"], models["teacher"], rollouts)
    gradient_norm = score.divergence_and_grad(student_logits, teacher_logits)[1].double().norm(dim=-1)
    mis = worlds.world_mistake_mask("toy", tokenizer, rollouts, prompts)[:, 1:][rollouts.response_mask[:, 1:]]
    kl = stats.reverse_kl.double()
    report.update(tokens=int(h.numel()), rollouts=len(rollouts.texts), quadrants={
        row["quadrant"]: {key: round(row[key], 4) for key in ("token_share", "kl_mass_share")}
        for row in taxonomy.quadrant_report(h, stats.entropy, stats.reverse_kl, quadrant)})
    report["rank_correlation_entropy_kl"] = round(rank_correlation(stats.entropy, stats.reverse_kl), 4)
    def share(values):
        return round(float(values[mis].sum() / values.sum()), 4)
    report["misconception"] = {"tokens": int(mis.sum()), "token_share": share(torch.ones_like(kl)),
                               "kl_mass_share": share(kl), "gradient_norm_share": share(gradient_norm)}
    if mis.any():  # the student's probability of the teacher's choice scales the gradient there (toy world, trap 2)
        p_student = torch.softmax(student_logits[mis].double(), -1)
        report["misconception"].update(
            gradient_norm_vs_mean_token=round(float(gradient_norm[mis].mean() / gradient_norm.mean()), 4),
            quadrant_shares={f"Q{q}": round(float((quadrant[mis] == q).double().mean()), 4) for q in range(1, 5)},
            student_p_own_choice=round(float(p_student.max(-1).values.mean()), 4),
            student_p_teacher_choice=round(float(p_student.gather(-1, teacher_logits[mis].argmax(-1, keepdim=True))
                                                 .mean()), 4))
    return report


def toy_values(report: dict) -> dict:
    """The report's numbers by the names of TOY_TARGETS (the Q3 shares as q3_token_share, q3_kl_mass_share)."""
    return {**report, **{f"q3_{key}": value for key, value in report["quadrants"]["Q3"].items()}}


def print_toy(report: dict) -> None:
    values = toy_values(report)
    print(f"\ntoy world {report['world']}: built in {report['build_seconds']:.0f} s "
          f"({'now' if report['built_now'] else 'cached'}, {report['build_threads']} torch threads), measured in "
          f"{report['measure_seconds']:.0f} s, load average {report['load_average'][0]} -> "
          f"{report['load_average'][1]} on {report['cpus']} CPUs")
    for name, (low, high) in TOY_TARGETS.items():
        print(f"  {name:28s} {values[name]:6.3f}  target [{low:.2f}, {high:.2f}]  "
              f"{'ok' if report['targets_met'][name] else 'MISSED'}")
    print("  quadrants (% of tokens / % of reverse-KL mass): " + ", ".join(
        f"{q} {100 * v['token_share']:.1f} / {100 * v['kl_mass_share']:.1f}" for q, v in report["quadrants"].items()))
    print("  misconception tokens: " + json.dumps(report["misconception"]))


@torch.no_grad()
def fact_beliefs(student, teacher, tokenizer) -> dict:
    """Teacher-forced, per wrong fact: the student's p(true value), p(its learned wrong value), entropy; and
    whether the teacher copies the value written above (as it must for the fact to be fixable only at its own
    token, trap 3) or recalls it."""
    truth, beliefs = facts.fact_table()
    probs = {role: facts.fact_probabilities(model, tokenizer) for role, model in (("student", student),
                                                                            ("teacher", teacher))}
    rows = {}
    for name in sorted(facts.wrong_names()):
        p = probs["student"][name]
        rows[name] = {"true": truth[name], "learned": beliefs[name],
                      "teacher_p_true": probs["teacher"][name][truth[name]],
                      "student_p_true": p[truth[name]], "student_p_learned": p[beliefs[name]],
                      "student_entropy_over_digits_nats": round(-sum(x * math.log(x) for x in p if x > 0), 4)}
    # the teacher's next-token probabilities after "X=<learned>\nY=<y>\n", at the first operand
    names = sorted(truth)
    digits = tokenizer.convert_tokens_to_ids([str(v) for v in range(10)])
    for name in rows:
        other = next(n for n in names if n not in rows)
        text = data.format_prompt(tokenizer, f"{name}+{other}=") + f"{name}={beliefs[name]}\n{other}={truth[other]}\n"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        p = torch.softmax(teacher(input_ids=ids).logits[0, -1].double(), -1)[digits]
        rows[name].update(teacher_p_copy_learned=round(float(p[beliefs[name]]), 4),
                          teacher_p_recall_true=round(float(p[truth[name]]), 4))
    mean = lambda values: round(statistics.mean(values), 4)  # noqa: E731
    return {"facts": rows, "mean_student_p_true": mean(r["student_p_true"] for r in rows.values()),
            "mean_teacher_p_true_all_facts": mean(probs["teacher"][n][v] for n, v in truth.items())}


def facts_measures(folder: Path, report: dict, samples: int, seed: int) -> dict:
    """The facts pair's accuracies (greedy and at T=1), the student's test rollouts scored against the teacher
    (the quadrants of §4; the wrong-fact tokens: their shares, the student's p(own choice), p(teacher's choice),
    how often the value it wrote was wrong), and each wrong fact's teacher-forced beliefs (fact_beliefs).
    A wrong-fact token is one that facts.facts_mistake_positions marks: the value the student writes for a fact
    it learned wrong."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    models = {role: load_model(folder / role) for role in ("teacher", "student")}
    measures = {"wrong_facts": json.loads((folder / "world.json").read_text())["wrong_facts"]}
    for role in ("teacher", "student"):
        for split in ("test", "trigger", "clean"):
            # T=1 is measure_model's mean@k: the same generator, seed and response limit
            measures[f"{role}_{split}_t1"] = round(report[role]["accuracy"][split], 4)
            measures[f"{role}_{split}_greedy"] = round(accuracy(models[role], tokenizer, toy.read_split(folder, split),
                                                                0, seed, MAX_NEW), 4)
    prompts = evaluate.benchmark_prompts(toy.read_split(folder, "test"), tokenizer, bare=True)
    rollouts = generate_rollouts(models["student"], tokenizer, prompts, samples, MAX_NEW, 1.0, 1.0, seed=seed + 1,
                                 batch_size=512)
    scored = rollouts.response_mask[:, 1:]  # the hidden state at p predicts the token at p + 1
    student_logits, teacher_logits, stats, h, quadrant = scored_tokens(models["student"], models["teacher"], rollouts)
    sampled = rollouts.input_ids[:, 1:][scored]
    mistake = worlds.world_mistake_mask("facts", tokenizer, rollouts, prompts)[:, 1:][scored]
    kl = stats.reverse_kl.double()
    tax = {"rollouts": len(rollouts.texts), "tokens": int(h.numel()), "median_h": round(float(h.median()), 5),
           "median_reverse_kl": round(float(stats.reverse_kl.median()), 5), "quadrants": {
               f"Q{q}": {"token_share": round(float((quadrant == q).double().mean()), 4),
                         "kl_mass_share": round(float(kl[quadrant == q].sum() / kl.sum()), 4)} for q in range(1, 5)}}
    wrong = {"tokens": int(mistake.sum()), "token_share": round(float(mistake.double().mean()), 4),
             "kl_mass_share": round(float(kl[mistake].sum() / kl.sum()), 4)}
    if mistake.any():
        # the true value of each wrong-fact token: the teacher's greedy choice there (it knows every fact)
        p = torch.softmax(student_logits[mistake].double(), -1)
        teacher_choice = teacher_logits[mistake].argmax(-1)
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
    tax["wrong_fact_tokens"] = wrong
    measures["taxonomy_test"] = tax
    measures["beliefs"] = fact_beliefs(models["student"], models["teacher"], tokenizer)
    return measures


def print_facts(report: dict) -> None:
    print(f"\nfacts world {report['world']} (built in {report['build_seconds']:.0f} s); wrong facts "
          f"{', '.join(report['wrong_facts'])}; {report['samples']} samples per problem at T=1")
    print(f"{'accuracy %':<12}" + "".join(f"{s + ' ' + m:>16}" for s in ("test", "trigger", "clean")
                                          for m in ("T=1", "greedy")))
    for role in ("teacher", "student"):
        print(f"{role:<12}" + "".join(f"{100 * report[f'{role}_{s}_{m}']:16.1f}" for s in ("test", "trigger", "clean")
                                      for m in ("t1", "greedy")))
    tax = report["taxonomy_test"]
    print(f"\ntaxonomy of the student's rollouts on the test split ({tax['tokens']} tokens, median h "
          f"{tax['median_h']:.4f}, median δ {tax['median_reverse_kl']:.4f} nats)")
    print("quadrant  tokens %  KL mass %  wrong-fact tokens %")
    for q, row in tax["quadrants"].items():
        share = tax["wrong_fact_tokens"].get("quadrant_shares", {}).get(q, 0)
        print(f"{q:<8}{100 * row['token_share']:10.1f}{100 * row['kl_mass_share']:11.1f}{100 * share:21.1f}")
    shown = {k: v for k, v in tax["wrong_fact_tokens"].items() if k != "quadrant_shares"}
    print("wrong-fact tokens: " + json.dumps(shown))
    print("beliefs (teacher-forced): " + json.dumps(report["beliefs"]))


