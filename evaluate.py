"""Accuracy of paper §7.1: mean@k on MATH-500, AIME 2024, AIME 2025 or a built-in world's held-out split.

    python evaluate.py --model runs/x/final --benchmark math500      # mean@k, k = 16 at temperature 1.0
    python evaluate.py --taxonomy --teacher T --student S            # the quadrant report of a pair (§4)

mean@k is the mean over problems of each problem's fraction of k samples graded correct (grade.py).
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import grade
import pair
import taxonomy
import tip
import vllm_engine
import worlds
from tip import arg

# ---------------------------------------------------------------- benchmarks

# name: (hub dataset, split, problems). Each has `problem` and `answer` columns; the answer column is the
# reference (docs/decisions.md, "Benchmark answers").
BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", 500),
    "aime24": ("HuggingFaceH4/aime_2024", "train", 30),
    "aime25": ("yentinglin/aime_2025", "train", 30),
}
# DeepPlanning's published averages (its scores of a task, summed over tasks and divided by their number)
PLANNING_SCORES = ("delivery_rate", "commonsense", "personalized", "composite", "case_accuracy")


def _problems(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise tip.InputError(f"{source} is empty: it needs rows with `problem` and `answer`")
    for i, row in enumerate(rows):
        missing = [c for c in ("problem", "answer") if not isinstance(row, dict) or c not in row]
        if missing:
            raise tip.InputError(f"{source}: row {i} has no {' or '.join(missing)} column (it has: "
                                 f"{', '.join(map(str, row)) if isinstance(row, dict) else repr(row)}); a benchmark "
                                 "needs `problem` and `answer`")
        if row["answer"] is None or not str(row["answer"]).strip():
            raise tip.InputError(f"{source}: row {i} has an empty answer; every problem needs its reference answer")
    return [{"problem": str(row["problem"]), "answer": str(row["answer"]).strip()} for row in rows]


def read_local(path: str) -> list[dict]:
    """Problems from a local .jsonl or .parquet file with `problem` and `answer` columns."""
    name, path = path, Path(path).expanduser()
    if not path.is_file():
        raise tip.InputError(f"benchmark file {name!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise tip.InputError(f"benchmark file {name!r}: expected .jsonl or .parquet")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet
            rows = pyarrow.parquet.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except Exception as error:
        raise tip.InputError(f"benchmark file {name!r} could not be read: {type(error).__name__}: {error}") from error
    return _problems(rows, f"benchmark file {name!r}")


def load_problems(benchmark: str | None, path: str | None = None, world_dir: str = "") -> list[dict]:
    """[{"problem", "answer"}] of a named benchmark (hub, or a built-in world's held-out test split) or of the
    local file `path`."""
    if path:
        return read_local(path)
    if benchmark in worlds.WORLDS:
        return _problems(worlds.world_problems(benchmark, "test", world_dir), f"the {benchmark} test split")
    if benchmark not in BENCHMARKS:
        raise tip.InputError(f"unknown benchmark {benchmark!r}: choose {', '.join([*BENCHMARKS, *worlds.WORLDS])} "
                             "or pass --data")
    repo, split, size = BENCHMARKS[benchmark]
    hint = (f"pass a local copy with --data FILE (.jsonl/.parquet with `problem` and `answer` columns); where "
            f"there is network: `hf download {repo} --repo-type dataset --local-dir DIR`, then --data DIR/<file>")
    offline = tip.env_flag("HF_HUB_OFFLINE") or tip.env_flag("HF_DATASETS_OFFLINE")
    if not offline and not tip.hub_reachable():
        raise tip.InputError(f"benchmark {benchmark} ({repo}): the hub is unreachable: {hint}")
    import datasets
    try:  # offline, datasets reads its local cache only
        rows = datasets.load_dataset(repo, split=split).to_list()
    except Exception as error:
        where = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not in the local datasets cache, " if offline else ""
        raise tip.InputError(f"benchmark {benchmark} ({repo}) could not be loaded ({where}{type(error).__name__}: "
                             f"{str(error)[:300]}): {hint}") from error
    if len(rows) != size:
        print(f"note: {repo} has {len(rows)} problems, the paper's benchmark has {size}")
    return _problems(rows, repo)


def benchmark_prompts(problems: list[dict], tokenizer, bare: bool = False,
                      template_switches: dict | None = None) -> list[str]:
    """Each problem with the instruction to reason step by step and answer in \\boxed{} (§7.1), under the chat
    template and its switches (e.g. enable_thinking); `bare` (a built-in world) asks the problem alone, as its
    models were trained."""
    return [data.format_prompt(tokenizer, p["problem"] if bare else f"{p['problem']}\n\n{data.MATH_INSTRUCTION}",
                               template_switches) for p in problems]


# ---------------------------------------------------------------- mean@k

def accuracy_summary(correct: list[list[bool]]) -> dict:
    """mean@k (§7.1) = mean over problems of each problem's fraction correct, with two population standard
    deviations: over problems of their accuracy, and over the k sample indices of the benchmark accuracy."""
    k = len(correct[0]) if correct else 0
    if k == 0 or any(len(c) != k for c in correct):
        raise ValueError("every problem needs the same number k >= 1 of graded samples")
    per_problem = [sum(c) / k for c in correct]
    per_sample = [sum(c[j] for c in correct) / len(correct) for j in range(k)]
    return {"accuracy": statistics.fmean(per_problem), "std_over_problems": statistics.pstdev(per_problem),
            "std_over_samples": statistics.pstdev(per_sample), "problems": len(correct), "samples": k}


def run_benchmark(problems: list[dict], prompts: list[str], generate, samples: int, batch_size: int = 64,
                  keep_responses: bool = False, show_progress: bool = True, judge=None) -> tuple[dict, list[dict]]:
    """mean@k (§7.1) of `samples` graded responses per problem. `generate(prompts, n)` returns len(prompts) * n
    texts, prompt-major (text i * n + j is sample j of prompts[i]); about `batch_size` responses per call.
    `judge(problem, text)` scores a response in [0, 1] (default: its \\boxed{} answer is the problem's, grade.py)."""
    judge = judge or (lambda problem, text: grade.is_correct(text, problem["answer"]))
    per_call = max(1, batch_size // samples)
    results = []
    with tqdm(total=len(problems), desc="generating", unit="problem", disable=not show_progress) as bar:
        for start in range(0, len(problems), per_call):
            chunk = problems[start:start + per_call]
            texts = generate(prompts[start:start + per_call], samples)
            if len(texts) != len(chunk) * samples:
                raise ValueError(f"the generator returned {len(texts)} texts for {len(chunk)} prompts x {samples}")
            for i, problem in enumerate(chunk):
                responses = texts[i * samples:(i + 1) * samples]
                correct = [judge(problem, text) for text in responses]
                results.append({**problem, "predictions": [grade.extract_boxed(text) for text in responses],
                                "correct": correct, "accuracy": sum(correct) / samples,
                                **({"responses": responses} if keep_responses else {})})
            bar.update(len(chunk))
    summary = accuracy_summary([r["correct"] for r in results])
    summary["no_box"] = sum(p is None for r in results for p in r["predictions"]) / (len(results) * samples)
    return summary, results


def model_generator(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                    batch_size: int | None, engine=None, tasks: dict | None = None, max_turns: int = 8,
                    switches: dict | None = None):
    """`generate(prompts, n)` for run_benchmark: rollouts y ~ S(·|x) (§3), temperature 0 = greedy, seed + call;
    through `engine` (a vllm_engine.VLLMEngine holding the model's weights) when given, else transformers generate.
    With `tasks` ({prompt: rollout.Task}) each prompt is a conversation with tools; its response is the last
    assistant turn."""
    from rollout import generate_conversations, generate_rollouts
    calls = iter(range(1 << 62))

    def generate(prompts: list[str], n: int) -> list[str]:
        if tasks is not None:
            batch = generate_conversations(model, tokenizer, [tasks[p] for p in prompts], n, max_new_tokens, max_turns,
                                           temperature, top_p, seed + next(calls), switches, batch_size, engine)
            return [next(m["content"] for m in reversed(c) if m["role"] == "assistant") for c in batch.conversations]
        if engine is not None:
            return engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed=seed + next(calls)).texts
        return generate_rollouts(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p,
                                 seed=seed + next(calls), batch_size=batch_size).texts
    return generate


def held_out_accuracy(student, tokenizer, problems: list[dict], config: tip.Config, seed: int,
                      engine=None) -> float:
    """train.py's in-training mean@k on a built-in world's held-out problems (worlds.held_out_problems), at the
    rollout temperature; the ranks share the problems and the result."""
    mine = problems[tip.rank()::tip.world_size()]
    # FSDP2: every rank must run as many generate calls: one each, a rank without problems sampling the first
    # problem and not counting it
    sharded = tip.is_distributed() and tip.is_sharded(student)
    work = mine or (problems[:1] if sharded else [])
    correct = 0.0
    if work:
        tasks = {p["prompt"]: p["task"] for p in work if p.get("task") is not None} or None
        generate = model_generator(student, tokenizer, config.max_response_len, config.temperature,
                                   config.top_p, seed, None, engine, tasks,
                                   config.max_turns, data.template_switches(config))
        per_call = len(work) if sharded else config.micro_batch_size
        with tip.autocast(next(student.parameters()).device):
            summary, _ = run_benchmark(work, [p["prompt"] for p in work], generate, config.eval_samples,
                                       per_call * config.eval_samples, show_progress=False)
        correct = summary["accuracy"] * len(mine)
    return tip.all_reduce_sum([correct], next(student.parameters()).device)[0] / max(1, len(problems))


def format_table(summary: dict) -> str:
    """The mean@k summary (§7.1) as a markdown table, percentages to one decimal."""
    head = ["benchmark", "model", "problems", "metric", "accuracy %", "std over problems %",
            "std over samples %", "no box %"]
    row = [summary["benchmark"], summary["model"], str(summary["problems"]), summary["metric"]] + [
        f"{100 * summary[key]:.1f}" for key in ("accuracy", "std_over_problems", "std_over_samples", "no_box")]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (head, ["---"] * len(head), row))


@dataclass
class EvalConfig:
    model: str = arg("", "model to evaluate: folder, hub id, or toy-teacher / facts-student / …")
    benchmark: str = arg("", "named benchmark (hub datasets; a built-in world = its test split)",
                         ["", *BENCHMARKS, *worlds.WORLDS])
    data: str = arg("", "local .jsonl/.parquet with problem and answer columns (instead of the hub), or "
                    "deepplanning:PATH (DeepPlanning's travel tasks, scored by its rule-based checks)")
    split: str = arg("test", "deepplanning: the tasks evaluated, the held-out 20 % (test) or every task (all, "
                     "as published numbers are)", ["test", "all"])
    samples: int = arg(0, "samples per problem k of mean@k (0 = 16; the taxonomy: 4)")
    greedy: bool = arg(False, "greedy decoding, one sample: pass@1")
    temperature: float = arg(1.0, "sampling temperature (paper: 1.0)")
    top_p: float = arg(1.0, "nucleus top-p (paper: 1.0)")
    max_new_tokens: int = arg(0, "response limit (0 = 8192; a built-in world: 48)")
    max_turns: int = arg(0, "assistant turns per conversation with tools (0 = 8; deepplanning: 150, the official "
                         "agent's limit of model calls)")
    batch_size: int = arg(64, "responses generated (and rollouts scored) at once")
    problems: int = arg(0, "use the first N problems / prompts (0 = all; the taxonomy: 16)")
    seed: int = arg(0, "sampling seed")
    out: str = arg("", "JSON output (empty = eval-<benchmark>.json, or taxonomy.json)")
    save_responses: bool = arg(False, "keep every full response in the JSON")
    device: str = arg("", "torch device (empty = cuda when there is one, else cpu)")
    dtype: str = arg("auto", "auto: bf16 on GPU, fp32 on CPU", ["auto", "bfloat16", "float16", "float32"])
    engine: str = arg("hf", "mean@k sampler: transformers generate, or vLLM (pip install -r requirements-vllm.txt)",
                      ["hf", "vllm"])
    gpu_memory_utilization: float = arg(0.5, "--engine vllm: share of GPU memory vLLM takes for weights and KV "
                                        "cache (the transformers copy of the model sits beside it)")
    chat_template_kwargs: str = arg(tip.Config.chat_template_kwargs, "JSON object of chat-template switches, as "
                                    "train.py's")
    world_dir: str = arg("", "built-in worlds' cache folder (empty = $TIP_CACHE or ~/.cache/tip)")
    taxonomy: bool = arg(False, "report the quadrants of §4 for a teacher/student pair (taxonomy.py)")
    teacher: str = arg("", "taxonomy: teacher folder or hub id (both empty = the toy pair)")
    student: str = arg("", "taxonomy: student folder or hub id")
    prompts: str = arg("toy", "taxonomy: a built-in world (toy, facts), a hub prompt set, or a local file")
    prompt_split: str = arg("train", "taxonomy: split of a hub prompt set")
    prompt_subset: str = arg("", "taxonomy: configuration of a hub prompt set (e.g. en)")
    h_split: float | None = arg(None, "taxonomy: entropy boundary on h in [0, 1] (default: the median)")
    d_split: float | None = arg(None, "taxonomy: divergence boundary in nats (default: the median)")
    examples: int = arg(8, "taxonomy: Q3 tokens shown")
    chunk_size: int = arg(512, "taxonomy: rows of logits materialised at once")
    png: str = arg("", "taxonomy: scatter picture (empty = the JSON path with .png)")


def report_taxonomy(args: EvalConfig, samples: int, temperature: float) -> None:
    """evaluate.py --taxonomy: taxonomy.py's report of the pair, as JSON, a table and a picture."""
    config = tip.Config(teacher=args.teacher, student=args.student, prompts=args.prompts, dtype=args.dtype,
                        world_dir=args.world_dir, prompt_split=args.prompt_split, prompt_subset=args.prompt_subset,
                        chat_template_kwargs=args.chat_template_kwargs)
    teacher, student, tokenizer = worlds.load_pair(config, args.device)
    prompts = [p["prompt"] for p in worlds.load_prompts(config, tokenizer)][:args.problems or 16]
    max_new_tokens = args.max_new_tokens or (48 if args.prompts in worlds.WORLDS else 8192)
    report, points = taxonomy.taxonomy(teacher, student, tokenizer, prompts, samples, max_new_tokens, temperature,
                                       args.top_p, args.seed, args.batch_size, args.chunk_size, args.h_split,
                                       args.d_split, args.examples)
    world = args.prompts if args.prompts in worlds.WORLDS else "toy"
    report["summary"].update(teacher=args.teacher or f"{world} teacher", student=args.student or f"{world} student",
                             prompt_source=args.prompts)
    out = Path(args.out or "taxonomy.json")
    tip.write_json(out, report)
    print(taxonomy.format_taxonomy(report))
    png = Path(args.png or out.with_suffix(".png"))
    drawn = taxonomy.plot_taxonomy(points, report, png, seed=args.seed)
    print(f"\nreport: {out}" + (f"; picture: {png}" if drawn else
                                "; no picture: matplotlib is not installed (pip install matplotlib)"))


def planning_tasks(args: EvalConfig, plans: list, tokenizer):
    """--data deepplanning:PATH: (problems, prompts, {prompt: task}, judge) of DeepPlanning's tasks `plans`; the
    judge scores a response (the last assistant turn) by its task's official scores, kept in the problem's
    "scores", and returns the composite."""
    problems = [{"problem": f"DeepPlanning {args.split} task {k}", "answer": None, "id": k, "scores": []}
                for k in range(len(plans))]
    config = tip.Config(prompts=args.data, max_prompt_len=1 << 30, chat_template_kwargs=args.chat_template_kwargs)
    prompts = [p["prompt"] for p in worlds.task_prompts(config, tokenizer, plans)]

    def plan_score(problem, text):
        problem["scores"].append(plans[problem["id"]].scores([{"role": "assistant", "content": text}]))
        return problem["scores"][-1]["composite"]
    return problems, prompts, dict(zip(prompts, plans)), plan_score


def planning_summary(results: list[dict]) -> dict[str, float]:
    """The benchmark's averages over every task and sample: delivery rate, commonsense, personalized, composite
    and case accuracy (a task that delivered no plan counts 0 in each)."""
    scores = [score for r in results for score in r["scores"]]
    means = {name: sum(score[name] for score in scores) / max(1, len(scores)) for name in scores[0]} if scores else {}
    return {("delivery_rate" if name == "delivered" else name): mean for name, mean in means.items()}


def main(argv: list[str] | None = None) -> None:
    parser = tip.flag_parser(EvalConfig, __doc__.split("\n\n")[0])
    args = EvalConfig(**tip.given_flags(parser.parse_args(argv), EvalConfig))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.greedy and args.samples not in (0, 1):
        parser.error("--greedy gives one sample per problem (pass@1): drop --samples")
    if not args.taxonomy and not (args.model and (args.benchmark or args.data)):
        parser.error("pass --model and --benchmark (or --data), or --taxonomy")
    if args.split != "test" and not args.data.startswith("deepplanning:"):
        parser.error("--split chooses DeepPlanning's tasks: use it with --data deepplanning:PATH")
    samples = 1 if args.greedy else args.samples or (4 if args.taxonomy else 16)
    temperature = 0.0 if args.greedy else args.temperature
    try:
        switches = data.template_switches(tip.Config(chat_template_kwargs=args.chat_template_kwargs))
        if args.taxonomy:
            return report_taxonomy(args, samples, temperature)
        planning = args.data.startswith("deepplanning:")  # the held-out 20 % of DeepPlanning's tasks
        if planning:
            from worlds import deepplanning
            plans = deepplanning.deepplanning_tasks(args.data.split(":", 1)[1], args.split)[:args.problems or None]
        problems = [] if planning else load_problems(args.benchmark, args.data, args.world_dir)[:args.problems or None]
        if args.engine == "vllm":
            vllm_engine.require_vllm()  # before the model loads
        model, tokenizer = pair.load_model(worlds.model_path(args.model, args.world_dir), args.device, args.dtype)
        bare = args.benchmark in worlds.WORLDS  # the worlds' models learned bare problems, whatever the source
        max_new_tokens = args.max_new_tokens or (48 if bare else 8192)
        max_turns = args.max_turns or (150 if planning else 8)
        prompts, judge = benchmark_prompts(problems, tokenizer, bare, switches), None
        tasks = worlds.world_tasks(args.benchmark, problems, tokenizer, switches) if bare else None
        if planning:
            problems, prompts, tasks, judge = planning_tasks(args, plans, tokenizer)
        engine = None
        if args.engine == "vllm":
            longest = max(map(len, data.encode_prompts(tokenizer, prompts)))
            engine = vllm_engine.VLLMEngine(model, tokenizer, longest + max_new_tokens,
                                            args.gpu_memory_utilization, args.dtype, args.seed)
        generate = model_generator(model, tokenizer, max_new_tokens, temperature, args.top_p, args.seed,
                                   args.batch_size, engine, tasks, max_turns, switches)
        try:
            summary, results = run_benchmark(problems, prompts, generate, samples, args.batch_size,
                                             args.save_responses, judge=judge)
        finally:
            if engine is not None:
                engine.close()
        label = args.benchmark or ("deepplanning" if planning else Path(args.data).stem)
        summary = {"benchmark": label, "model": args.model, "metric": "pass@1 (greedy)" if args.greedy
                   else f"mean@{samples}", **summary, "data": args.data or None, "temperature": temperature,
                   "top_p": args.top_p, "max_new_tokens": max_new_tokens, "seed": args.seed,
                   **({"max_turns": max_turns} if tasks else {})}
        if planning:  # accuracy is the mean composite; the benchmark's own averages beside it
            summary.update(split=args.split, **planning_summary(results))
        out = Path(args.out or f"eval-{label}.json")
        tip.write_json(out, {"summary": summary, "problems": results})
        print(format_table(summary))
        if planning:
            print("\n" + " | ".join(f"{name} {100 * summary[name]:.1f} %" for name in PLANNING_SCORES))
        print(f"\nresults: {out}")
    except tip.InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
