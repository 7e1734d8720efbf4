"""Accuracy on MATH-500, AIME 2024/2025 and the toy task (paper §7.1), and the token taxonomy of a pair (§4).

    python evaluate.py --model runs/x/final --benchmark math500      # mean@k, k = 16 at temperature 1.0
    python evaluate.py --taxonomy --teacher T --student S

A sample is correct when the last \\boxed{…} of its response equals the dataset's own answer under math-verify;
mean@k is the mean over problems of each problem's fraction correct (greedy pass@1 is an option). The taxonomy
scores every token of student rollouts against the teacher — h_t = H(P_S) / ln|V| (Eq. 2), δ_t = KL(P_S ‖ P_T)
(Eq. 3) — splits both axes at their medians into the quadrants of §4, and reports each quadrant's share of
tokens and of the reverse-KL mass (Eq. 1's loss), Q3 examples (confident and wrong), and the scatter of Fig. 2.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import multiprocessing
import re
import statistics
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

import tip

# ---------------------------------------------------------------- grading (§7.1)

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.S)  # `\{` and `\}` are the answer's own braces (a set)
# math-verify's own per-call limit. sympy can run for minutes on some answers (10^{10^{10}}), so the limit
# matters; math-verify enforces it with signal.alarm, which exists only in a process's main thread.
GRADE_TIMEOUT_S = 5


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{…} (also `\\boxed {…}`, `\\fbox{…}`), braces balanced; None without a box
    or when the last one never closes (truncated): §7.1 asks for the answer in \\boxed{}; math-verify alone
    would fall back to the last number."""
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    start, depth = opens[-1].end(), 1
    for match in _BRACE_OR_ESCAPE.finditer(text, start):
        depth += {"{": 1, "}": -1}.get(match.group(), 0)
        if depth == 0:
            return text[start:match.start()]
    return None


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    from math_verify import parse
    # wrapped in \boxed{} so math-verify reads the whole reference as the answer, not its last number
    text = answer if answer.startswith("$") or "\\boxed" in answer else f"\\boxed{{{answer}}}"
    return parse(text, parsing_timeout=GRADE_TIMEOUT_S)


def _grade(prediction: str, answer: str) -> bool:
    from math_verify import parse, verify
    gold = _parse_gold(answer)
    predicted = parse(f"\\boxed{{{prediction}}}", parsing_timeout=GRADE_TIMEOUT_S)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=GRADE_TIMEOUT_S))


@functools.lru_cache(maxsize=1)
def _grading_pool() -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that runs threads (torch, tqdm) can deadlock
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def is_correct(response_text: str, answer: str) -> bool:
    """The grader of §7.1: the last boxed answer of `response_text` is equivalent to `answer` (no box ⇒ wrong).

    Equivalence is math-verify's: \\frac12 = 0.5 = \\dfrac{1}{2}, (x+1)^2 = x^2+2x+1, 1,000 = 1000, 50\\% = 0.5,
    intervals and tuples as such. Its signal.alarm timeouts (GRADE_TIMEOUT_S) work only in a main thread, so
    from any other thread the same call runs in a one-process pool: same verdicts, still bounded.
    """
    if answer is None or not str(answer).strip():
        raise ValueError(f"the reference answer is empty ({answer!r}): every problem needs an answer to grade")
    prediction = extract_boxed(response_text)
    if prediction is None or not prediction.strip():
        return False
    if "".join(prediction.split()) == "".join(str(answer).split()):
        return True
    answer = str(answer).strip()
    if threading.current_thread() is threading.main_thread():
        return _grade(prediction, answer)
    return _grading_pool().submit(_grade, prediction, answer).result()


# ---------------------------------------------------------------- benchmarks

# name: (hub dataset, split, problems). Each has `problem` and `answer` columns; the answer column is the
# reference (PAPER.md §8: answers re-extracted from solutions differ on 5 of 30 AIME 2024 problems).
BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", 500),
    "aime24": ("HuggingFaceH4/aime_2024", "train", 30),
    "aime25": ("yentinglin/aime_2025", "train", 30),
}


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


def read_local(data: str) -> list[dict]:
    """Problems from a local .jsonl or .parquet file with `problem` and `answer` columns."""
    path = Path(data).expanduser()
    if not path.is_file():
        raise tip.InputError(f"benchmark file {data!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise tip.InputError(f"benchmark file {data!r}: expected .jsonl or .parquet")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet
            rows = pyarrow.parquet.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except Exception as error:
        raise tip.InputError(f"benchmark file {data!r} could not be read: {type(error).__name__}: {error}") from error
    return _problems(rows, f"benchmark file {data!r}")


# ---------------------------------------------------------------- the built-in worlds

# Each is a module of its own, `<name>.py`, with `<name>_world(cache_dir) -> folder` (teacher/ and student/,
# built on first use and cached) and `<name>_problems(split, cache_dir) -> [{"problem", "answer"}]`; a world
# whose problems are conversations with tools also has `<name>_task(problem) -> rollout.Task`.
WORLDS = ("toy", "facts", "agent")


def world_folder(name: str, cache_dir: str = "") -> Path:
    """The folder of built-in world `name`: teacher/, student/ and its splits."""
    return Path(getattr(importlib.import_module(name), f"{name}_world")(cache_dir or None))


def world_problems(name: str, split: str, cache_dir: str = "") -> list[dict]:
    """[{"problem", "answer"}] of a split of built-in world `name`."""
    return getattr(importlib.import_module(name), f"{name}_problems")(split, cache_dir or None)


def world_mistake_mask(name: str, tokenizer, rollouts, prompt_texts: list[str]) -> torch.Tensor | None:
    """[B, L] bool: the response tokens where the student writes built-in world `name`'s known mistake (its
    `<name>_mistake_positions(prompt_text, response_tokens)`); None for a prompt set that is no such world."""
    module = importlib.import_module(name) if name in WORLDS else None
    find = getattr(module, f"{name}_mistake_positions", None)
    if find is None:
        return None
    mask = torch.zeros_like(rollouts.response_mask, dtype=torch.bool)
    for row, (ids, sampled) in enumerate(zip(rollouts.input_ids, rollouts.response_mask)):
        columns = sampled.nonzero().squeeze(1)
        tokens = tokenizer.convert_ids_to_tokens(ids[columns].tolist())
        mask[row, columns[find(prompt_texts[int(rollouts.prompt_index[row])], tokens)]] = True
    return mask


def load_pair(config: tip.Config, device):
    """tip.load_pair of --teacher/--student; with neither, the pair of the built-in world named by --prompts
    (the toy world unless --prompts names another)."""
    teacher, student = config.teacher, config.student
    if not teacher and not student:
        folder = world_folder(config.prompts if config.prompts in WORLDS else "toy", config.world_dir)
        teacher, student = str(folder / "teacher"), str(folder / "student")
    return tip.load_pair(teacher, student, device, config.dtype)


def world_tasks(name: str, problems: list[dict], tokenizer, switches: dict | None = None) -> dict | None:
    """{formatted prompt: rollout.Task} of a built-in world whose problems are conversations with tools (its
    `<name>_task`); None for any other prompt source."""
    make_task = getattr(importlib.import_module(name), f"{name}_task", None) if name in WORLDS else None
    if make_task is None:
        return None
    return {tip.format_prompt(tokenizer, p["problem"], switches): make_task(p) for p in problems}


def load_prompts(config: tip.Config, tokenizer) -> list[dict]:
    """tip.load_prompts, with a built-in world's train split when --prompts names one (and, for a world of
    conversations, each prompt's "task"); deepplanning:PATH gives the train split of DeepPlanning's tasks."""
    if config.prompts.startswith("deepplanning:"):
        return task_prompts(config, tokenizer, importlib.import_module("deepplanning").deepplanning_tasks(
            config.prompts.split(":", 1)[1], "train"))
    problems = world_problems(config.prompts, "train", config.world_dir) if config.prompts in WORLDS else None
    prompts = tip.load_prompts(config, tokenizer, problems)
    tasks = world_tasks(config.prompts, problems or [], tokenizer, tip.template_switches(config))
    return [{**p, "task": tasks[p["prompt"]]} for p in prompts] if tasks else prompts


def task_prompts(config: tip.Config, tokenizer, tasks: list) -> list[dict]:
    """[{"prompt", "answer": None, "task"}] of conversations with tools: each task's opening messages and tool
    schemas under the chat template; tasks over --max-prompt-len tokens are dropped and counted."""
    switches = tip.template_switches(config)
    texts = [tokenizer.apply_chat_template(t.messages, tools=t.tools or None, tokenize=False,
                                           add_generation_prompt=True, **switches) for t in tasks]
    lengths = [len(ids) for ids in tip.encode_prompts(tokenizer, texts)]
    prompts = [{"prompt": text, "answer": None, "task": task}
               for text, task, length in zip(texts, tasks, lengths) if length <= config.max_prompt_len]
    tip.log(f"prompts: {len(prompts)} conversations from {config.prompts} ({len(tasks) - len(prompts)} longer than "
            f"{config.max_prompt_len} tokens dropped)")
    if not prompts:
        raise tip.InputError(f"no tasks left from {config.prompts!r}: raise --max-prompt-len (the longest opening "
                             f"prompt has {max(lengths, default=0)} tokens)")
    return prompts


def load_problems(benchmark: str | None, data: str | None = None, world_dir: str = "") -> list[dict]:
    """[{"problem", "answer"}] of a named benchmark (hub, or a built-in world's held-out test split) or of `data`."""
    if data:
        return read_local(data)
    if benchmark in WORLDS:
        return _problems(world_problems(benchmark, "test", world_dir), f"the {benchmark} test split")
    if benchmark not in BENCHMARKS:
        raise tip.InputError(f"unknown benchmark {benchmark!r}: choose {', '.join([*BENCHMARKS, *WORLDS])} or pass --data")
    repo, split, size = BENCHMARKS[benchmark]
    hint = (f"pass a local copy with --data FILE (.jsonl/.parquet with `problem` and `answer` columns); where "
            f"there is network: `hf download {repo} --repo-type dataset --local-dir DIR`, then --data DIR/<file>")
    offline = tip._env_flag("HF_HUB_OFFLINE") or tip._env_flag("HF_DATASETS_OFFLINE")
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
    return [tip.format_prompt(tokenizer, p["problem"] if bare else f"{p['problem']}\n\n{tip.MATH_INSTRUCTION}",
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
                  keep_responses: bool = False, show_progress: bool = True, grade=None) -> tuple[dict, list[dict]]:
    """mean@k (§7.1) of `samples` graded responses per problem. `generate(prompts, n)` returns len(prompts) * n
    texts, prompt-major (text i * n + j is sample j of prompts[i]); about `batch_size` responses per call.
    `grade(problem, text)` scores a response in [0, 1] (default: its \\boxed{} answer is the problem's)."""
    grade = grade or (lambda problem, text: is_correct(text, problem["answer"]))
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
                correct = [grade(problem, text) for text in responses]
                results.append({**problem, "predictions": [extract_boxed(text) for text in responses],
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
    through `engine` (a rollout.VLLMEngine holding the model's weights) when given, else transformers generate.
    With `tasks` ({prompt: rollout.Task}) each prompt is a conversation with tools; its response is the last
    assistant turn."""
    from rollout import generate_conversations, generate_rollouts
    calls = iter(range(1 << 62))

    def generate(prompts: list[str], n: int) -> list[str]:
        if tasks is not None:
            batch = generate_conversations(model, tokenizer, [tasks[p] for p in prompts], n, max_new_tokens, max_turns,
                                           temperature, top_p, seed + next(calls), switches, batch_size)
            return [next(m["content"] for m in reversed(c) if m["role"] == "assistant") for c in batch.conversations]
        if engine is not None:
            return engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed=seed + next(calls)).texts
        return generate_rollouts(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p,
                                 seed=seed + next(calls), batch_size=batch_size).texts
    return generate


def format_table(summary: dict) -> str:
    """The mean@k summary (§7.1) as a markdown table, percentages to one decimal."""
    head = ["benchmark", "model", "problems", "metric", "accuracy %", "std over problems %",
            "std over samples %", "no box %"]
    row = [summary["benchmark"], summary["model"], str(summary["problems"]), summary["metric"]] + [
        f"{100 * summary[key]:.1f}" for key in ("accuracy", "std_over_problems", "std_over_samples", "no_box")]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (head, ["---"] * len(head), row))


def write_json(path: str | Path, payload) -> None:
    """`payload` as indented UTF-8 JSON at `path`, written atomically (the results of §7.1 and §4)."""
    text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    tip.write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- the taxonomy of a pair (§4)

QUADRANTS = {1: "high h, high δ: uncertain and disagrees", 2: "high h, low δ: underconfident",
             3: "low h, high δ: confident and wrong", 4: "low h, low δ: solved"}


def quadrant_report(h: torch.Tensor, entropy: torch.Tensor, reverse_kl: torch.Tensor,
                    quadrant: torch.Tensor) -> list[dict]:
    """Per quadrant of §4: share of tokens, share of the total reverse-KL mass Σδ_t (Eq. 1's loss), mean
    normalized entropy h (Eq. 2), mean entropy in nats, mean δ (Eq. 3) in nats. Flat tensors over tokens."""
    total_mass = float(reverse_kl.double().sum())
    rows = []
    for q, reading in QUADRANTS.items():
        inside = quadrant == q
        count = int(inside.sum())
        mean = (lambda x: float(x[inside].double().mean())) if count else (lambda x: None)  # JSON null
        rows.append({"quadrant": f"Q{q}", "reading": reading, "tokens": count, "token_share": count / len(h),
                     "kl_mass_share": float(reverse_kl[inside].double().sum()) / total_mass if total_mass > 0 else 0.0,
                     "mean_h": mean(h), "mean_entropy": mean(entropy), "mean_reverse_kl": mean(reverse_kl)})
    return rows


@torch.no_grad()
def taxonomy(teacher, student, tokenizer, prompts: list[str], samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             chunk_size: int = 512, h_split: float | None = None, d_split: float | None = None,
             examples: int = 8) -> tuple[dict, dict]:
    """Student rollouts scored against the teacher per token (Eqs. 2–3), split into the quadrants of §4.
    Returns the JSON-ready report and the flat per-token tensors h, d (δ), quadrant for the scatter. Splits
    default to the medians (PAPER.md §2, Decision); given, h_split is on h ∈ [0, 1] and d_split on δ in nats."""
    import score
    from rollout import generate_rollouts
    select = tip.load_select()
    rollouts = generate_rollouts(student, tokenizer, prompts, samples, max_new_tokens, temperature, top_p,
                                 seed=seed, batch_size=batch_size, show_progress=True)
    student_head, teacher_head = tip.lm_head_weight(student), tip.lm_head_weight(teacher)
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    entropy, reverse_kl, where = [], [], []
    for start in range(0, rollouts.input_ids.shape[0], batch_size):
        ids, mask = rollouts.input_ids[start:start + batch_size], rollouts.attention_mask[start:start + batch_size]
        scored = rollouts.response_mask[start:start + batch_size, 1:]  # hidden at p predicts the token at p + 1
        stats = score.chunked_token_stats(tip.final_hidden_states(student, ids, mask)[:, :-1][scored], student_head,
                                          tip.final_hidden_states(teacher, ids, mask)[:, :-1][scored], teacher_head,
                                          chunk_size)
        entropy.append(stats.entropy.cpu())
        reverse_kl.append(stats.reverse_kl.cpu())
        where.append(scored.nonzero().cpu() + torch.tensor([start, 1]))
    entropy, reverse_kl, where = torch.cat(entropy), torch.cat(reverse_kl), torch.cat(where)
    if entropy.numel() == 0:
        raise ValueError("the rollouts hold no sampled tokens to score")
    h = score.normalized_entropy(entropy, vocab)
    # the splits go into the report, so they are computed here (in float64) rather than inside quadrants()
    given = h_split is not None or d_split is not None
    h_split = float(select._quantile(h.double(), 0.5)) if h_split is None else h_split
    d_split = float(select._quantile(reverse_kl.double(), 0.5)) if d_split is None else d_split
    quadrant = select.quadrants(h, reverse_kl, torch.ones_like(h, dtype=torch.bool), h_split, d_split)
    q3 = (quadrant == 3).nonzero().squeeze(1)
    shown = []
    for index in q3[reverse_kl[q3].argsort(descending=True)[:examples]].tolist():
        row, position = where[index].tolist()
        ids, mask = rollouts.input_ids[row:row + 1], rollouts.attention_mask[row:row + 1]
        token, context = int(ids[0, position]), slice(max(0, position - 16), position)
        p_student, p_teacher = (torch.softmax((tip.final_hidden_states(m, ids, mask)[0, position - 1]
                                               @ tip.lm_head_weight(m)[:vocab].T).float(), -1)
                                for m in (student, teacher))
        shown.append({"context": tokenizer.decode(ids[0, context][mask[0, context].bool()].tolist(),
                                                  skip_special_tokens=True),
                      "token": tokenizer.decode([token]), "student_p": float(p_student[token]),
                      "teacher_p": float(p_teacher[token]), "teacher_top": tokenizer.decode([int(p_teacher.argmax())]),
                      "teacher_top_p": float(p_teacher.max()), "h": float(h[index]),
                      "reverse_kl": float(reverse_kl[index])})
    summary = dict(prompts=len(prompts), rollouts=int(rollouts.input_ids.shape[0]), tokens=int(h.numel()), vocab=vocab,
                   h_split=h_split, d_split=d_split, split="given" if given else "median", samples=samples,
                   temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    report = {"summary": summary, "quadrants": quadrant_report(h, entropy, reverse_kl, quadrant), "q3_examples": shown}
    return report, {"h": h, "d": reverse_kl, "quadrant": quadrant}


def format_taxonomy(report: dict) -> str:
    """The quadrant table of §4 (shares of tokens and of the Eq. 1 mass) and the Q3 examples as text."""
    s = report["summary"]
    lines = [f"{s['tokens']} tokens in {s['rollouts']} rollouts of {s['prompts']} prompts; splits h = "
             f"{s['h_split']:.4f} (normalized entropy), δ = {s['d_split']:.4f} nats ({s['split']})", "",
             "| quadrant | tokens % | reverse-KL mass % | mean h | mean entropy (nats) | mean δ (nats) | reading |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in report["quadrants"]:
        means = " | ".join("—" if q[key] is None else f"{q[key]:.3f}"
                           for key in ("mean_h", "mean_entropy", "mean_reverse_kl"))
        lines.append(f"| {q['quadrant']} | {100 * q['token_share']:.1f} | {100 * q['kl_mass_share']:.1f} | "
                     f"{means} | {q['reading']} |")
    if report["q3_examples"]:
        lines += ["", "Q3 examples (highest δ): context [sampled token] student p / teacher p, teacher's choice"]
    for e in report["q3_examples"]:
        lines.append(f"  …{e['context']!r} [{e['token']!r}] {e['student_p']:.2f} / {e['teacher_p']:.2f}, teacher: "
                     f"{e['teacher_top']!r} ({e['teacher_top_p']:.2f}); δ = {e['reverse_kl']:.2f}")
    return "\n".join(lines)


def plot_taxonomy(points: dict, report: dict, path: str | Path, max_points: int = 20000, seed: int = 0) -> bool:
    """Fig. 2: normalized entropy h (Eq. 2) against δ (Eq. 3), coloured by quadrant, the splits drawn.
    matplotlib is optional: without it nothing is drawn and False is returned."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    h, d, quadrant = points["h"], points["d"], points["quadrant"]
    if h.numel() > max_points:  # a readable picture; the shares in the legend count every token
        keep = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(seed))[:max_points]
        h, d, quadrant = h[keep], d[keep], quadrant[keep]
    figure = Figure(figsize=(6.4, 4.8))
    axes, s = figure.subplots(), report["summary"]
    colours = ("tab:red", "tab:orange", "tab:purple", "tab:green")
    for q, (row, colour) in enumerate(zip(report["quadrants"], colours), 1):
        axes.scatter(h[quadrant == q].numpy(), d[quadrant == q].numpy(), s=4, alpha=0.5, c=colour, linewidths=0,
                     label=f"Q{q} {100 * row['token_share']:.0f}% tokens, {100 * row['kl_mass_share']:.0f}% KL mass")
    axes.axvline(s["h_split"], color="black", linestyle="--", linewidth=0.8)
    axes.axhline(s["d_split"], color="black", linestyle="--", linewidth=0.8)
    # log above the split separates the large divergences; linear below it keeps δ = 0 (solved tokens) on the plot
    axes.set_yscale("symlog", linthresh=max(s["d_split"], 1e-4))
    axes.set_ylim(bottom=0)  # δ ≥ 0: no negative half of the symlog axis
    axes.set_xlabel("normalized student entropy h = H(P_S) / ln|V|  (Eq. 2)")
    axes.set_ylabel("divergence δ = KL(P_S ‖ P_T), nats  (Eq. 3)")
    axes.set_title(f"token taxonomy: {s['tokens']} tokens, {s['split']} split")
    axes.legend(loc="upper left", fontsize=7, markerscale=3)
    figure.tight_layout()
    tip.write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return True


# ---------------------------------------------------------------- command line

def load_model(name: str, device, dtype: str = "auto", world_dir: str = ""):
    """(model, tokenizer) to evaluate (§7.1) from a folder or hub id; `toy-teacher`, `facts-student`, … name a
    built-in world's pair. Paths and the offline hub are checked as tip.load_pair checks them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    world, _, role = name.partition("-")
    if world in WORLDS and role in ("teacher", "student") and not Path(name).exists():
        name = str(world_folder(world, world_dir) / role)
    online = not tip._looks_local(name) and tip.hub_reachable()
    path, load = tip._resolve_model(name, "model", online), dict(local_files_only=not online)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **load)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=tip.torch_dtype(dtype, device), **load)
        model = model.to(device).eval()
    except OSError as error:
        raise tip.InputError(f"model {name!r} could not be loaded ({error}); offline, pass a local folder") from error
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="", help="model to evaluate: folder, hub id, or toy-teacher / facts-student / …")
    add("--benchmark", choices=[*BENCHMARKS, *WORLDS], help="named benchmark (hub datasets; a built-in world = "
        "its test split)")
    add("--data", default="", help="local .jsonl/.parquet with problem and answer columns (instead of the hub), "
        "or deepplanning:PATH (the held-out 20 %% of its tasks, scored by the rule-based reward)")
    add("--samples", type=int, default=None, help="samples per problem k of mean@k (default 16; taxonomy: 4)")
    add("--greedy", action="store_true", help="greedy decoding, one sample: pass@1")
    add("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    add("--top-p", type=float, default=1.0, help="nucleus top-p (paper: 1.0)")
    add("--max-new-tokens", type=int, default=None, help="response limit (default 8192; toy: 48)")
    add("--batch-size", type=int, default=64, help="responses generated (and rollouts scored) at once")
    add("--problems", type=int, default=None, help="use the first N problems / prompts (default all; taxonomy 16)")
    add("--seed", type=int, default=0, help="sampling seed")
    add("--out", default="", help="JSON output (default eval-<benchmark>.json, or taxonomy.json)")
    add("--save-responses", action="store_true", help="keep every full response in the JSON")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="auto: bf16 on GPU")
    add("--engine", default="hf", choices=["hf", "vllm"], help="mean@k sampler: transformers generate, or vLLM "
        "(pip install -r requirements-vllm.txt)")
    add("--gpu-memory-utilization", type=float, default=0.5, help="--engine vllm: share of GPU memory vLLM takes "
        "for weights and KV cache (the transformers copy of the model sits beside it)")
    add("--chat-template-kwargs", default=tip.Config.chat_template_kwargs, help="JSON object of chat-template "
        "switches, as train.py's (default: thinking off)")
    add("--world-dir", default="", help="built-in worlds' cache folder (default $TIP_CACHE or ~/.cache/tip)")
    add("--taxonomy", action="store_true", help="report the quadrants of §4 for a teacher/student pair")
    add("--teacher", default="", help="taxonomy: teacher folder or hub id (both empty = the toy pair)")
    add("--student", default="", help="taxonomy: student folder or hub id")
    add("--prompts", default="toy", help="taxonomy: a built-in world (toy, facts), a hub prompt set, or a local "
        "file (as train.py)")
    add("--prompt-split", default="train", help="taxonomy: split of a hub prompt set")
    add("--prompt-subset", default="", help="taxonomy: configuration of a hub prompt set (e.g. en)")
    add("--h-split", type=float, default=None, help="taxonomy: entropy boundary on h in [0, 1] (default median)")
    add("--d-split", type=float, default=None, help="taxonomy: divergence boundary in nats (default median)")
    add("--examples", type=int, default=8, help="taxonomy: Q3 tokens shown")
    add("--chunk-size", type=int, default=512, help="taxonomy: rows of logits materialised at once")
    add("--png", default="", help="taxonomy: scatter picture (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if args.greedy and args.samples not in (None, 1):
        parser.error("--greedy gives one sample per problem (pass@1): drop --samples")
    samples = 1 if args.greedy else args.samples or (4 if args.taxonomy else 16)
    temperature = 0.0 if args.greedy else args.temperature
    try:
        switches = tip.template_switches(tip.Config(chat_template_kwargs=args.chat_template_kwargs))
        if args.taxonomy:
            config = tip.Config(teacher=args.teacher, student=args.student, prompts=args.prompts, dtype=args.dtype,
                                world_dir=args.world_dir, prompt_split=args.prompt_split,
                                prompt_subset=args.prompt_subset, chat_template_kwargs=args.chat_template_kwargs)
            teacher, student, tokenizer = load_pair(config, args.device)
            prompts = [p["prompt"] for p in load_prompts(config, tokenizer)][:args.problems or 16]
            report, points = taxonomy(teacher, student, tokenizer, prompts, samples,
                                      args.max_new_tokens or (48 if args.prompts in WORLDS else 8192), temperature,
                                      args.top_p, args.seed, args.batch_size, args.chunk_size, args.h_split,
                                      args.d_split, args.examples)
            world = args.prompts if args.prompts in WORLDS else "toy"
            report["summary"].update(teacher=args.teacher or f"{world} teacher", student=args.student or
                                     f"{world} student", prompt_source=args.prompts)
            out = Path(args.out or "taxonomy.json")
            write_json(out, report)
            print(format_taxonomy(report))
            png = Path(args.png or out.with_suffix(".png"))
            drawn = plot_taxonomy(points, report, png, seed=args.seed)
            print(f"\nreport: {out}" + (f"; picture: {png}" if drawn else
                                       "; no picture: matplotlib is not installed (pip install matplotlib)"))
            return
        if not args.model or not (args.benchmark or args.data):
            parser.error("pass --model and --benchmark (or --data), or --taxonomy")
        planning = args.data.startswith("deepplanning:")
        if planning:  # the held-out 20 % of DeepPlanning's tasks, each scored by its rule-based reward
            plans = importlib.import_module("deepplanning").deepplanning_tasks(args.data.split(":", 1)[1], "test")
            plans = plans[:args.problems or None]
            problems = [{"problem": f"DeepPlanning test task {k}", "answer": None, "id": k} for k in range(len(plans))]
        else:
            problems = load_problems(args.benchmark, args.data, args.world_dir)[:args.problems or None]
        import rollout
        if args.engine == "vllm":
            rollout.require_vllm()  # before the model loads
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.world_dir)
        bare = args.benchmark in WORLDS  # the worlds' models were trained on bare problems, whatever the source
        max_new_tokens = args.max_new_tokens or (48 if bare else 8192)
        prompts = [] if planning else benchmark_prompts(problems, tokenizer, bare, switches)
        engine, grade = None, None
        tasks = world_tasks(args.benchmark, problems, tokenizer, switches) if bare else None
        if planning:
            config = tip.Config(prompts=args.data, max_prompt_len=1 << 30, chat_template_kwargs=args.chat_template_kwargs)
            prompts = [p["prompt"] for p in task_prompts(config, tokenizer, plans)]
            tasks = dict(zip(prompts, plans))

            def plan_reward(problem, text):  # the plan is the last assistant turn
                return plans[problem["id"]].reward([{"role": "assistant", "content": text}])
            grade = plan_reward
        if tasks and args.engine == "vllm":
            raise tip.InputError("--engine vllm samples single-turn prompts; conversations with tools use --engine hf")
        if args.engine == "vllm":
            longest = max(map(len, tip.encode_prompts(tokenizer, prompts)))
            engine = rollout.VLLMEngine(model, tokenizer, longest + max_new_tokens, args.gpu_memory_utilization,
                                        args.dtype, args.seed)
        generate = model_generator(model, tokenizer, max_new_tokens, temperature, args.top_p, args.seed,
                                   args.batch_size, engine, tasks, switches=switches)
        try:
            summary, results = run_benchmark(problems, prompts, generate, samples, args.batch_size,
                                             args.save_responses, grade=grade)
        finally:
            if engine is not None:
                engine.close()
        label = args.benchmark or ("deepplanning" if planning else Path(args.data).stem)
        summary = {"benchmark": label, "model": args.model, "metric": "pass@1 (greedy)" if args.greedy
                   else f"mean@{samples}", **summary, "data": args.data or None, "temperature": temperature,
                   "top_p": args.top_p, "max_new_tokens": max_new_tokens, "seed": args.seed}
        out = Path(args.out or f"eval-{label}.json")
        write_json(out, {"summary": summary, "problems": results})
        print(format_table(summary))
        print(f"\nresults: {out}")
    except tip.InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
