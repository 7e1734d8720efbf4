"""The toy world measured (paper §3–4): the pair's accuracies and the taxonomy of §4 on the student's rollouts.

    python benchmarks/toy_world.py --threads 1     # builds the world first when it is not cached

It prints the numbers against the targets the default world must meet and writes them to report.json in the
world folder: accuracies, quadrant shares of tokens and of reverse-KL mass (median split), the rank
correlation of entropy and δ, and the misconception tokens' share of the loss gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (after the path fix, so the script runs from any folder)
import score  # noqa: E402
import tip  # noqa: E402
import train  # noqa: E402  (its response_hidden_states: the scored positions of a rollout)
import toy  # noqa: E402
from rollout import generate_rollouts  # noqa: E402


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two flat tensors: the Pearson correlation of their ranks (ties are
    ranked by position), in float64."""
    positions = torch.arange(len(x), dtype=torch.float64)
    a, b = (torch.empty_like(positions).scatter_(0, v.argsort(), positions) - positions.mean() for v in (x, y))
    return float((a * b).sum() / (a.norm() * b.norm()))




@torch.no_grad()
def measure(folder: Path, samples: int = 1, seed: int = 0, log=print) -> dict:
    """Accuracies of the pair and the taxonomy of §4 on the student's rollouts scored against the teacher.

    h is the normalized entropy (Eq. 2), δ the reverse KL (Eq. 3); both axes split at their medians
    (docs). A token's loss gradient is that of its δ w.r.t. the student's logits,
    P_S ⊙ (log P_S − log P_T − KL) (score.divergence_and_grad).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = toy.ToyRecipe(**json.loads((folder / "world.json").read_text())["recipe"])
    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    models = {role: AutoModelForCausalLM.from_pretrained(folder / role, dtype=torch.float32).eval()
              for role in ("teacher", "student")}
    problems = {split: toy.read_split(folder, split) for split in ("test", "trigger")}
    prompts = {split: evaluate.benchmark_prompts(problems[split], tokenizer, bare=True) for split in problems}
    max_new, report = toy.max_response_tokens(recipe), {}
    for role, split, temperature in (("teacher", "test", 0.0), ("teacher", "test", 1.0), ("teacher", "trigger", 0.0),
                                     ("teacher", "trigger", 1.0), ("student", "test", 1.0),
                                     ("student", "trigger", 1.0)):
        generate = evaluate.model_generator(models[role], tokenizer, max_new, temperature, 1.0, seed, 512)
        summary, _ = evaluate.run_benchmark(problems[split], prompts[split], generate, samples if temperature else 1,
                                            batch_size=512, show_progress=False)
        name = f"{role}_{split}_{'greedy' if temperature == 0 else 't1'}"
        report[name] = round(summary["accuracy"], 4)
        log(f"{name}: {100 * summary['accuracy']:.1f} %")

    rollouts = generate_rollouts(models["student"], tokenizer, prompts["test"], samples, max_new, 1.0, 1.0,
                                 seed=seed + 1)
    logits = {role: train.response_hidden_states(model, rollouts, slice(None))
              @ tip.lm_head_weight(model).T for role, model in models.items()}
    stats = score.token_stats(logits["student"], logits["teacher"])
    gradient_norm = score.divergence_and_grad(logits["student"], logits["teacher"])[1].double().norm(dim=-1)
    h = score.normalized_entropy(stats.entropy, logits["student"].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    misconception, offset = torch.zeros_like(h, dtype=torch.bool), 0
    for ids, keep in zip(rollouts.input_ids, rollouts.response_mask):
        tokens = tokenizer.convert_ids_to_tokens(ids[keep].tolist())
        misconception[[offset + i for i in toy.misconception_positions(tokens)]] = True
        offset += len(tokens)
    mis, kl = misconception, stats.reverse_kl.double()
    report.update(tokens=int(h.numel()), rollouts=len(rollouts.texts), quadrants={
        row["quadrant"]: {key: round(row[key], 4) for key in ("token_share", "kl_mass_share")}
        for row in evaluate.quadrant_report(h, stats.entropy, stats.reverse_kl, quadrant)})
    report["rank_correlation_entropy_kl"] = round(rank_correlation(stats.entropy, stats.reverse_kl), 4)
    def share(values):
        return round(float(values[mis].sum() / values.sum()), 4)
    report["misconception"] = {"tokens": int(mis.sum()), "token_share": share(torch.ones_like(kl)),
                               "kl_mass_share": share(kl), "gradient_norm_share": share(gradient_norm)}
    if mis.any():  # trap 2: the student's probability of the teacher's choice scales the gradient there
        p_student = torch.softmax(logits["student"][mis].double(), -1)
        report["misconception"].update(
            gradient_norm_vs_mean_token=round(float(gradient_norm[mis].mean() / gradient_norm.mean()), 4),
            quadrant_shares={f"Q{q}": round(float((quadrant[mis] == q).double().mean()), 4) for q in range(1, 5)},
            student_p_own_choice=round(float(p_student.max(-1).values.mean()), 4),
            student_p_teacher_choice=round(float(p_student.gather(
                -1, logits["teacher"][mis].argmax(-1, keepdim=True)).mean()), 4))
    return report


TARGETS = {  # what the default world must show (low, high)
    "teacher_test_greedy": (0.90, 1.0), "teacher_test_t1": (0.85, 1.0), "teacher_trigger_t1": (0.85, 1.0),
    "student_test_t1": (0.20, 0.50), "student_trigger_t1": (0.0, 0.20), "q3_token_share": (0.05, 1.0),
    "q3_kl_mass_share": (0.10, 1.0), "rank_correlation_entropy_kl": (-1.0, 0.80)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the toy world (cached) and measure it (paper §3–4).")
    parser.add_argument("--cache-dir", default=None,
                        help="parent folder of the world (default: $TIP_CACHE, else ~/.cache/tip)")
    parser.add_argument("--rebuild", action="store_true", help="build again even when the world is cached")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a CPU shared with other jobs 1 is fastest")
    parser.add_argument("--samples", type=int, default=1, help="samples per held-out problem at temperature 1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.time()
    world = toy.toy_world(args.cache_dir, toy.DEFAULT_RECIPE, rebuild=args.rebuild)
    info, measure_start = json.loads((world / "world.json").read_text()), time.time()
    report = {"world": str(world), "build_seconds": info["build_seconds"], "build_threads": info["torch_threads"],
              "built_now": (world / "world.json").stat().st_mtime >= start, **measure(world, args.samples),
              "measure_seconds": round(time.time() - measure_start, 1), "cpus": os.cpu_count(),
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    values = {**report, **{f"q3_{key}": value for key, value in report["quadrants"]["Q3"].items()}}
    report["targets_met"] = {name: low <= values[name] <= high for name, (low, high) in TARGETS.items()}
    evaluate.write_json(world / "report.json", report)

    print(f"\ntoy world {world}: built in {report['build_seconds']:.0f} s "
          f"({'now' if report['built_now'] else 'cached'}, {report['build_threads']} torch threads), measured in "
          f"{report['measure_seconds']:.0f} s, load average {report['load_average'][0]} -> "
          f"{report['load_average'][1]} on {report['cpus']} CPUs")
    for name, (low, high) in TARGETS.items():
        print(f"  {name:28s} {values[name]:6.3f}  target [{low:.2f}, {high:.2f}]  "
              f"{'ok' if report['targets_met'][name] else 'MISSED'}")
    print("  quadrants (% of tokens / % of reverse-KL mass): " + ", ".join(
        f"{q} {100 * v['token_share']:.1f} / {100 * v['kl_mass_share']:.1f}" for q, v in report["quadrants"].items()))
    print("  misconception tokens: " + json.dumps(report["misconception"]))
    print(f"report: {world / 'report.json'}")


if __name__ == "__main__":
    main()
