"""evaluate.py: the grader, mean@k, benchmark loading, the CLI and the taxonomy of a pair (§4, §7.1)."""
import json
import math
import os
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import data
import grade
import taxonomy
import worlds
import evaluate
import pair
import tip
from conftest import ROOT, recording
from grade import extract_boxed, is_correct


# (response, reference answer, verdict)
GRADER_CASES = [
    ("so \\boxed{\\frac12}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{0.33}", "\\frac13", False),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{(x+1)^2}", "x^2+1", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1000}", "1,000", True),
    ("\\boxed{12,345}", "12345", True),
    ("\\boxed{50\\%}", "50\\%", True),
    ("\\boxed{0.5}", "50\\%", True),
    ("\\boxed{40\\%}", "50\\%", False),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", False),
    ("\\boxed{[1,2)}", "[1,2)", True),
    ("\\boxed{[1,2)}", "(1,2]", False),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{(3, -1)}", "(3,-1)", True),
    ("\\boxed{(3, -1)}", "(-1,3)", False),
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt{3}", True),
    ("first \\boxed{3}, then \\boxed{4}", "4", True),
    ("first \\boxed{4}, then \\boxed{3}", "4", False),
    ("The answer is 4.", "4", False),
    ("\\boxed{}", "4", False),
    ("\\boxed{4}. So the answer is 5, not 4... final: 5", "4", True),
    ("\\boxed {4}", "4", True),
    ("\\fbox{4}", "4", True),
    ("\\boxed{4} but wait \\boxed{\\frac{1", "4", False),
    ("\\boxed{5.0}", "5", True),
    ("\\boxed{033}", "33", True),
    ("\\boxed{-5}", "5", False),
    ("\\boxed{\\text{(B)}}", "B", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{2\\pi}", "2 \\pi", True),
    ("\\boxed{\\text{no}} and the answer is 4", "4", False),
    ("93+67=50\n\\boxed{50}", "160", False),
    ("\\boxed{18.90}", "\\$18.90", True),
    ("\\boxed{\\frac12}", " $0.5$ ", True),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{\\boxed{4}}", "4", True),  # nested: the innermost, last-opened box
    ("\\boxed{a \\boxed{3} b}", "3", True),
    ("\\boxed{4} \\boxed{}", "4", False),  # a trailing empty box is the (empty) answer
    ("\\boxed{4} \\boxed{ }", "4", False),
    ("\\boxed{5\\text{ cm}}", "5", True),  # units
    ("\\boxed{5\\text{ cm}}", "6", False),
    ("\\boxed{12 \\text{ dollars}}", "12", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{\\$5}", "5", True),
    # math-verify's verify(gold, prediction) is not symmetric: an interval answers an inequality, not the reverse
    ("\\boxed{(-\\infty,2)}", "x<2", True),
    ("\\boxed{x<2}", "(-\\infty,2)", False),
]


@pytest.mark.parametrize("response,answer,verdict", GRADER_CASES)
def test_grader_table(response, answer, verdict):
    assert is_correct(response, answer) is verdict


@pytest.mark.parametrize("text,content", [
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("a \\boxed{1} b \\boxed{2} c", "2"),
    ("\\boxed {x}", "x"),
    ("\\fbox{y} z", "y"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{}", ""),
    ("no box here, 42", None),
    ("\\boxed{1} \\boxed{\\frac{2", None),
])
def test_extract_boxed(text, content):
    assert extract_boxed(text) == content


def test_empty_reference_is_an_error():
    with pytest.raises(ValueError, match="reference answer is empty"):
        is_correct("\\boxed{1}", "  ")


def needs_math_verify(case):
    """A case whose verdict the exact-string shortcut of is_correct cannot give."""
    prediction = extract_boxed(case[0])
    return bool(prediction and prediction.strip()) and "".join(prediction.split()) != "".join(case[1].split())


def test_grader_from_threads_gives_the_main_thread_verdicts():
    cases = [case for case in GRADER_CASES if needs_math_verify(case)][:10]
    assert {verdict for _, _, verdict in cases} == {True, False}
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda case: (threading.current_thread() is threading.main_thread(),
                                               is_correct(case[0], case[1])), cases))
    assert [v for _, v in verdicts] == [c[2] for c in cases]
    assert not any(main for main, _ in verdicts)


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_pathological_answer_is_cut_off_by_the_timeout(thread):
    """sympy would evaluate 10^(10^10) for minutes; math-verify's limit turns it into a wrong answer, in the
    main thread (signal.alarm) and from a worker thread (the pool). Run in a child process: a broken limit
    hangs the child, and the test fails at the subprocess timeout instead of hanging the suite."""
    call = "grade.is_correct('\\\\boxed{10^{10^{10}}}', '3')"
    code = (f"import grade; print({call})" if thread == "main" else "import grade; from concurrent.futures "
            f"import ThreadPoolExecutor; print(ThreadPoolExecutor(1).submit(lambda: {call}).result())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=20 * grade.GRADE_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


# ---------------------------------------------------------------- mean@k on a stub generator

PROBLEMS = [{"problem": "Q-zero", "answer": "1"}, {"problem": "Q-one", "answer": "\\frac12"},
            {"problem": "Q-two", "answer": "3"}]
CORRECT_PER_SAMPLE = {"Q-zero": [1, 1, 1, 1], "Q-one": [1, 0, 0, 0], "Q-two": [0, 0, 0, 0]}


def stub_generate(calls):
    def generate(prompts, n):
        calls.append((list(prompts), n))
        texts = []
        for prompt in prompts:
            problem = next(p for p in PROBLEMS if p["problem"] in prompt)  # the prompt may be chat-formatted
            answer = problem["answer"]
            for j in range(n):
                right = CORRECT_PER_SAMPLE[problem["problem"]][j]
                texts.append(f"work \\boxed{{{answer}}}" if right else ("no box" if j % 2 else "\\boxed{-7}"))
        return texts
    return generate


def test_mean_at_k_arithmetic_and_prompt_major_order():
    calls = []
    summary, results = evaluate.run_benchmark(PROBLEMS, [p["problem"] for p in PROBLEMS], stub_generate(calls),
                                              samples=4, batch_size=8, show_progress=False)
    assert [c[1] for c in calls] == [4, 4] and [len(c[0]) for c in calls] == [2, 1]  # 8 // 4 prompts per call
    assert [r["accuracy"] for r in results] == [1.0, 0.25, 0.0]
    assert results[1]["correct"] == [True, False, False, False]
    assert results[1]["predictions"] == ["\\frac12", None, "-7", None]
    # by hand: per problem 1, 1/4, 0 -> mean 5/12, pstdev sqrt(26)/12; per sample index 2/3, 1/3, 1/3, 1/3
    assert summary["accuracy"] == pytest.approx(5 / 12)
    assert summary["std_over_problems"] == pytest.approx(math.sqrt(26) / 12)
    assert summary["std_over_samples"] == pytest.approx(math.sqrt(3) / 12)
    assert summary["no_box"] == pytest.approx(4 / 12)  # samples 1 and 3 of p1 and p2
    assert (summary["problems"], summary["samples"]) == (3, 4)


def test_a_generator_returning_the_wrong_count_is_refused():
    with pytest.raises(ValueError, match="returned 3 texts"):
        evaluate.run_benchmark(PROBLEMS[:1], ["Q-zero"], lambda prompts, n: ["x"] * 3, samples=4, show_progress=False)


def test_each_call_of_a_generator_draws_anew_and_the_seed_replays_them(monkeypatch):
    """mean@k is over independent samples: run_benchmark calls the generator once per batch of problems, and
    each call (transformers, the engine, conversations) samples with a seed of its own; the same seed replays
    the same calls. A conversation's response is its last assistant turn."""
    from conftest import char_tokenizer, tiny_causal_lm
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, 32, seed=4)
    prompt = [data.format_prompt(tokenizer, "1+2=")]
    replay = [evaluate.model_generator(model, tokenizer, 12, 1.0, 1.0, seed=9, batch_size=None) for _ in range(2)]
    first, again = ([generate(prompt, 2) for _ in range(3)] for generate in replay)
    assert first == again and len({text for texts in first for text in texts}) == 6, first
    seeds = {"engine": [], "conversations": []}

    class Engine:
        def generate(self, prompts, n, *args, seed=None):
            seeds["engine"].append(seed)
            return types.SimpleNamespace(texts=["x"] * (len(prompts) * n))

    def conversations(model, tokenizer, tasks, n, max_new_tokens, max_turns, temperature, top_p, seed, *rest):
        seeds["conversations"].append(seed)
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a call"},
                 {"role": "tool", "content": "7"}, {"role": "assistant", "content": "the answer"}]
        return types.SimpleNamespace(conversations=[turns] * (len(tasks) * n))
    import rollout
    monkeypatch.setattr(rollout, "generate_conversations", conversations)
    for generate in (evaluate.model_generator(model, tokenizer, 4, 1.0, 1.0, 9, None, engine=Engine()),
                     evaluate.model_generator(model, tokenizer, 4, 1.0, 1.0, 9, None, tasks={"p": "task"})):
        responses = [generate(["p"], 2) for _ in range(3)]
    assert all(len(set(drawn)) == 3 for drawn in seeds.values()), seeds
    assert responses[0] == ["the answer"] * 2  # a conversation is graded on its last assistant turn


def _table_row(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_json_and_table_agree(tmp_path, tiny_pair, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "bench.jsonl", PROBLEMS)
    monkeypatch.setattr(evaluate, "model_generator", lambda *args, **kwargs: stub_generate([]))
    out = tmp_path / "res" / "out.json"
    evaluate.main(["--model", str(tiny_pair / "student"), "--data", str(data), "--samples", "4",
                   "--out", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    summary, problems = saved["summary"], saved["problems"]
    assert [p["answer"] for p in problems] == [p["answer"] for p in PROBLEMS]
    assert summary["metric"] == "mean@4" and summary["benchmark"] == "bench"
    assert summary["accuracy"] == pytest.approx(sum(p["accuracy"] for p in problems) / len(problems))
    assert summary["accuracy"] == pytest.approx(5 / 12)
    row = _table_row(capsys.readouterr().out)
    assert row["accuracy %"] == f"{100 * summary['accuracy']:.1f}" == "41.7"
    assert row["std over problems %"] == f"{100 * summary['std_over_problems']:.1f}"
    assert row["problems"] == "3" and row["metric"] == "mean@4"
    assert not list(out.parent.glob(".*tmp"))  # written atomically: no temporary file left behind


def test_cli_on_a_tiny_model_end_to_end(tmp_path, tiny_pair, capsys):
    data = write_jsonl(tmp_path / "bench.jsonl", PROBLEMS[:2])
    out = tmp_path / "greedy.json"
    evaluate.main(["--model", str(tiny_pair / "student"), "--data", str(data), "--greedy", "--max-new-tokens",
                   "4", "--out", str(out), "--device", "cpu", "--save-responses"])
    saved = json.loads(out.read_text())
    assert saved["summary"]["metric"] == "pass@1 (greedy)" and saved["summary"]["samples"] == 1
    assert all(len(p["correct"]) == len(p["responses"]) == len(p["predictions"]) == 1 for p in saved["problems"])
    assert "pass@1 (greedy)" in capsys.readouterr().out


def test_cli_toy_benchmark_asks_bare_problems(tmp_path, tiny_pair, monkeypatch):
    seen = []

    def recorder(*args, **kwargs):
        return lambda prompts, n: seen.extend(prompts) or ["\\boxed{0}"] * (len(prompts) * n)
    monkeypatch.setattr(evaluate, "model_generator", recorder)
    evaluate.main(["--model", str(tiny_pair / "student"), "--benchmark", "toy", "--problems", "3", "--samples", "2",
                   "--out", str(tmp_path / "toy.json"), "--device", "cpu"])
    problems = evaluate.load_problems("toy")[:3]
    assert len(seen) == 3 and all(p["problem"] in text and "boxed" not in text for p, text in zip(problems, seen))
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["summary"]["max_new_tokens"] == 48 and saved["summary"]["problems"] == 3


def test_every_sampling_flag_reaches_the_sampler_and_the_defaults_are_the_documented_ones(tmp_path, tiny_pair,
                                                                                         monkeypatch):
    """evaluate.py's flags arrive at model_generator and at the generate call as given; left out, they are the
    documented defaults: mean@16 at temperature 1.0 and top-p 1.0 (§7.1), 8,192 tokens, seed 0; the taxonomy's
    samples: 4."""
    seen = []
    monkeypatch.setattr(evaluate, "model_generator", recording(evaluate.model_generator, seen, lambda arguments: (
        lambda prompts, n: arguments.setdefault("n", n) and ["\\boxed{0}"] * (len(prompts) * n))))
    (tmp_path / "p.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    base = ["--model", str(tiny_pair / "student"), "--data", str(tmp_path / "p.jsonl"), "--out",
            str(tmp_path / "out.json"), "--device", "cpu"]
    evaluate.main(base)
    assert {k: seen[-1][k] for k in ("max_new_tokens", "temperature", "top_p", "seed", "n")} == dict(
        max_new_tokens=8192, temperature=1.0, top_p=1.0, seed=0, n=16)
    evaluate.main([*base, "--samples", "3", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "33",
                   "--seed", "5", "--batch-size", "6"])
    assert {k: seen[-1][k] for k in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size", "n")} == dict(
        max_new_tokens=33, temperature=0.7, top_p=0.9, seed=5, batch_size=6, n=3)
    taxonomy_samples = []
    monkeypatch.setattr(evaluate, "report_taxonomy", lambda args, samples, temperature:
                        taxonomy_samples.append((samples, temperature)))
    evaluate.main(["--taxonomy"])
    evaluate.main(["--taxonomy", "--samples", "2", "--temperature", "0.5"])
    assert taxonomy_samples == [(4, 1.0), (2, 0.5)]


def test_the_taxonomy_passes_every_setting_to_its_sampler(monkeypatch):
    """taxonomy.taxonomy's rollouts are drawn with its own samples, length, temperature, top-p, seed and batch."""
    import rollout
    calls = []

    class Drawn(Exception):
        pass

    def stop(arguments):
        raise Drawn
    monkeypatch.setattr(rollout, "generate_rollouts", recording(rollout.generate_rollouts, calls, stop))
    with pytest.raises(Drawn):
        taxonomy.taxonomy("teacher", "student", "tokenizer", ["p"], 3, 37, temperature=0.3, top_p=0.77, seed=9,
                          batch_size=5)
    assert {k: calls[0][k] for k in ("n", "max_new_tokens", "temperature", "top_p", "seed", "batch_size")} == dict(
        n=3, max_new_tokens=37, temperature=0.3, top_p=0.77, seed=9, batch_size=5)


@pytest.mark.parametrize("path", ["hf", "engine", "conversations"])
def test_model_generator_passes_every_setting_to_its_sampler(path, monkeypatch):
    """Each of model_generator's samplers (transformers generate, the vLLM engine, conversations with tools) gets
    the length, temperature, top-p, n, batch size (turn limit and template switches for conversations) as
    given, and seed + the call's number."""
    import rollout
    calls = []

    def rollouts(arguments):  # as many texts (and conversations) as the call asks for
        rows = len(arguments.get("prompts") or arguments.get("tasks")) * arguments["n"]
        return types.SimpleNamespace(texts=["x"] * rows,
                                     conversations=[[{"role": "assistant", "content": "x"}]] * rows)
    monkeypatch.setattr(rollout, "generate_rollouts", recording(rollout.generate_rollouts, calls, rollouts))
    monkeypatch.setattr(rollout, "generate_conversations", recording(rollout.generate_conversations, calls, rollouts))

    class Engine:
        def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed=None):
            return recording(Engine.generate, calls, rollouts)(self, prompts, n, max_new_tokens, temperature, top_p,
                                                               seed=seed)
    tasks = {name: rollout.Task([{"role": "user", "content": name}]) for name in ("p", "q")}
    generate = evaluate.model_generator("model", "tokenizer", 37, 0.3, 0.77, 900, 5, Engine() if path == "engine"
                                        else None, tasks if path == "conversations" else None, 3, {"switch": 1})
    for _ in range(2):
        generate(["p", "q"], 2)
    for call, seed in zip(calls, (900, 901)):
        assert (call["max_new_tokens"], call["temperature"], call["top_p"], call["n"], call["seed"]) == (
            37, 0.3, 0.77, 2, seed)
        if path != "engine":
            assert call["batch_size"] == 5
        if path == "conversations":
            assert (call["max_turns"], call["switches"], call["tasks"]) == (3, {"switch": 1}, list(tasks.values()))


def test_chat_template_switches_reach_the_benchmark_prompts(tmp_path, tiny_pair, monkeypatch):
    from transformers import AutoTokenizer
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_pair / "student", model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% if not enable_thinking %}NOTHINK {% endif %}{{ messages[0].content }}"
    tokenizer.save_pretrained(model)
    seen = []
    monkeypatch.setattr(evaluate, "model_generator", lambda *a, **k: lambda prompts, n: seen.extend(prompts) or
                        ["\\boxed{0}"] * (len(prompts) * n))
    (tmp_path / "p.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    base = ["--model", str(model), "--data", str(tmp_path / "p.jsonl"), "--samples", "1", "--out",
            str(tmp_path / "out.json"), "--device", "cpu"]
    evaluate.main(base)
    evaluate.main([*base, "--chat-template-kwargs", '{"enable_thinking": true}'])
    assert seen[0].startswith("NOTHINK 1+1") and seen[1].startswith("1+1")
    with pytest.raises(SystemExit, match="is not a JSON object"):
        evaluate.main([*base, "--chat-template-kwargs", "thinking"])


def test_greedy_with_several_samples_is_refused(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "m", "--benchmark", "toy", "--greedy", "--samples", "4"])
    assert "--greedy gives one sample per problem" in capsys.readouterr().err


def test_command_line_mistakes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--benchmark", "toy"])
    assert "pass --model and --benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: benchmark file .*missing.jsonl' does not exist$"):
        evaluate.main(["--model", "m", "--data", str(tmp_path / "missing.jsonl")])
    (tmp_path / "p.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(SystemExit, match=r"^error: model .*broken' could not be loaded"):
        evaluate.main(["--model", str(tmp_path / "broken"), "--data", str(tmp_path / "p.jsonl")])
    with pytest.raises(tip.InputError, match="unknown benchmark 'gsm8k': choose math500"):
        evaluate.load_problems("gsm8k")


def test_an_unreachable_hub_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(tip, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(tip.InputError, match="hub is unreachable: pass a local copy with --data"):
        evaluate.load_problems("math500")


def test_mean_at_k_refuses_ragged_samples_and_taxonomy_refuses_empty_rollouts(tiny_pair, monkeypatch):
    with pytest.raises(ValueError, match="same number k >= 1"):
        evaluate.accuracy_summary([[True, False], [True]])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import rollout
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair / "student")
    student = AutoModelForCausalLM.from_pretrained(tiny_pair / "student").eval()
    real = rollout.generate_rollouts
    monkeypatch.setattr(rollout, "generate_rollouts", lambda *a, **k: real(*a, **k)._replace(
        response_mask=torch.zeros_like(real(*a, **k).response_mask)))
    with pytest.raises(ValueError, match="no sampled tokens to score"):
        taxonomy.taxonomy(student, student, tokenizer, [data.format_prompt(tokenizer, "1+2=")], samples=1,
                          max_new_tokens=3, batch_size=2)


# ---------------------------------------------------------------- loading benchmarks

def test_local_jsonl_and_parquet(tmp_path):
    rows = [{"problem": "What is 1+1?", "answer": 2, "solution": "1+1=\\boxed{3}"},
            {"problem": "x?", "answer": "\\frac{1}{2}"}]
    assert evaluate.load_problems(None, str(write_jsonl(tmp_path / "b.jsonl", rows))) == [
        {"problem": "What is 1+1?", "answer": "2"}, {"problem": "x?", "answer": "\\frac{1}{2}"}]
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"problem": "q", "answer": "7"}]), tmp_path / "b.parquet")
    assert evaluate.load_problems("math500", str(tmp_path / "b.parquet")) == [{"problem": "q", "answer": "7"}]


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ('{"question": "q", "answer": "1"}\n', "no problem column"),
    ('{"problem": "q", "solution": "\\\\boxed{1}"}\n', "no answer column"),
    ('{"problem": "q", "answer": ""}\n', "empty answer"),
    ("not json\n", "could not be read"),
    ("[1, 2]\n", "no problem or answer column"),
])
def test_bad_local_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        evaluate.load_problems(None, str(path))


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.load_problems(None, str(tmp_path / "nope.jsonl"))
    (tmp_path / "b.csv").write_text("problem,answer\nq,1\n")
    with pytest.raises(ValueError, match="expected .jsonl"):
        evaluate.load_problems(None, str(tmp_path / "b.csv"))


@pytest.mark.parametrize("name", ["math500", "aime24", "aime25"])
def test_hub_benchmarks_offline_point_to_data(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub
    # empty caches: a machine that once downloaded the benchmark must still see the offline error
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="--data"):
        evaluate.load_problems(name)


def test_cli_reports_the_offline_error(capsys):
    with pytest.raises(SystemExit, match="--data"):
        evaluate.main(["--model", "m", "--benchmark", "aime24"])


def test_toy_benchmark_is_the_held_out_split_asked_bare(tiny_pair):
    from worlds import toy
    from transformers import AutoTokenizer
    problems = evaluate.load_problems("toy")
    assert problems == [{"problem": p["problem"], "answer": p["answer"]} for p in toy.toy_problems("test")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair / "student")
    bare, math = (evaluate.benchmark_prompts(problems[:1], tokenizer, bare=b) for b in (True, False))
    assert bare[0] == tokenizer.apply_chat_template([{"role": "user", "content": problems[0]["problem"]}],
                                                    tokenize=False, add_generation_prompt=True)
    assert "\\boxed{}" in math[0] and "step by step" in math[0] and problems[0]["problem"] in math[0]


@pytest.mark.parametrize("name", worlds.WORLDS)
def test_a_world_named_by_prompts_gives_the_pair_train_prompts_and_test_problems(name, tiny_pair, monkeypatch):
    """No --teacher/--student: the pair, the prompts and the held-out problems all come from the world that
    --prompts names, through its module's <name>_world and <name>_problems, with the cache folder passed on."""
    calls = []
    world = types.ModuleType(f"worlds.{name}")
    setattr(world, f"{name}_world", lambda cache_dir=None: calls.append(("world", cache_dir)) or tiny_pair)
    setattr(world, f"{name}_problems", lambda split, cache_dir=None: calls.append((split, cache_dir)) or [
        {"problem": f"{split} 1+2", "answer": "3"}])
    monkeypatch.setitem(sys.modules, f"worlds.{name}", world)
    config = tip.Config(prompts=name, world_dir="CACHE")
    teacher, student, tokenizer = worlds.load_pair(config, "cpu")
    assert pair.lm_head_weight(teacher).shape[1] == 48 and pair.lm_head_weight(student).shape[1] == 32
    prompts = worlds.load_prompts(config, tokenizer)
    assert prompts == [{"prompt": data.format_prompt(tokenizer, "train 1+2"), "answer": "3"}]
    assert evaluate.load_problems(name, world_dir="CACHE") == [{"problem": "test 1+2", "answer": "3"}]
    assert calls == [("world", "CACHE"), ("train", "CACHE"), ("test", "CACHE")]
    model, _ = pair.load_model(worlds.model_path(f"{name}-student", "CACHE"), "cpu")
    assert pair.lm_head_weight(model).shape[1] == 32


def test_a_hub_pair_is_loaded_as_given_whatever_the_prompts(tiny_pair):
    config = tip.Config(teacher=str(tiny_pair / "teacher"), student=str(tiny_pair / "student"), prompts="toy")
    teacher, student, _ = worlds.load_pair(config, "cpu")
    assert pair.lm_head_weight(teacher).shape[1] == 48 and pair.lm_head_weight(student).shape[1] == 32


# ---------------------------------------------------------------- the taxonomy of a pair

def run_taxonomy(tiny_pair, tmp_path, *extra):
    out = tmp_path / "tax.json"
    evaluate.main(["--taxonomy", "--teacher", str(tiny_pair / "teacher"), "--student", str(tiny_pair / "student"),
                   "--prompts", "toy", "--problems", "3", "--samples", "2", "--max-new-tokens", "10",
                   "--out", str(out), "--device", "cpu", "--batch-size", "4", *extra])
    return json.loads(out.read_text()), out


def test_taxonomy_shares_sum_to_100_percent(tiny_pair, tmp_path, capsys):
    report, out = run_taxonomy(tiny_pair, tmp_path)
    quadrants, summary = report["quadrants"], report["summary"]
    assert [q["quadrant"] for q in quadrants] == ["Q1", "Q2", "Q3", "Q4"]
    assert sum(q["tokens"] for q in quadrants) == summary["tokens"] > 0
    assert sum(q["token_share"] for q in quadrants) == pytest.approx(1.0)
    assert sum(q["kl_mass_share"] for q in quadrants) == pytest.approx(1.0)
    # median split: strictly above the median is at most half of the tokens, on each axis
    high_h = quadrants[0]["tokens"] + quadrants[1]["tokens"]
    high_d = quadrants[0]["tokens"] + quadrants[2]["tokens"]
    assert high_h <= summary["tokens"] // 2 and high_d <= summary["tokens"] // 2
    assert summary["split"] == "median" and summary["rollouts"] == 6
    printed = capsys.readouterr().out
    assert "reverse-KL mass %" in printed and "| Q3 |" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
        pytest.skip("matplotlib is not installed (an optional dependency): the PNG scatter is not exercised")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_taxonomy_given_splits(tiny_pair, tmp_path):
    report, _ = run_taxonomy(tiny_pair, tmp_path, "--h-split", "2.0", "--d-split", "-1.0", "--png",
                             str(tmp_path / "p.png"))
    assert report["summary"]["split"] == "given"
    # every h <= 1 < 2 is low and every δ >= 0 > -1 is high: every token is Q3
    assert report["quadrants"][2]["token_share"] == 1.0
    assert report["quadrants"][0]["mean_h"] is None  # an empty quadrant has no mean (JSON null, not NaN)
    assert report["q3_examples"] and all(0 <= e["student_p"] <= 1 for e in report["q3_examples"])


def test_taxonomy_matches_full_logits_in_float64(tiny_pair):
    """The scored tokens and their h, δ equal the plain formula on full logits (the shift p -> p + 1 included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import generate_rollouts
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair / "student")
    student = AutoModelForCausalLM.from_pretrained(tiny_pair / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair / "teacher").eval()
    prompts = [data.format_prompt(tokenizer, text) for text in ("12+34=", "5-3=")]
    report, points = taxonomy.taxonomy(teacher, student, tokenizer, prompts, samples=2, max_new_tokens=8, seed=3,
                                       batch_size=4)
    rollouts = generate_rollouts(student, tokenizer, prompts, 2, 8, seed=3, batch_size=4)
    position_ids = (rollouts.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = [m(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask, position_ids=position_ids
                    ).logits[:, :-1][rollouts.response_mask[:, 1:]].double() for m in (student, teacher)]
    log_s, log_t = (torch.log_softmax(x, -1) for x in logits)
    entropy = -(log_s.exp() * log_s).sum(-1)
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    assert points["h"].shape == entropy.shape
    torch.testing.assert_close(points["h"].double(), entropy / math.log(len(tokenizer)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(points["d"].double(), reverse_kl, atol=1e-5, rtol=1e-4)
    assert report["summary"]["tokens"] == int(rollouts.response_mask.sum())

    # the median splits and the quadrant counts, from the plain h and δ (torch.quantile: its own median)
    h, summary = entropy / math.log(len(tokenizer)), report["summary"]
    assert summary["h_split"] == pytest.approx(torch.quantile(h, 0.5).item(), rel=1e-4)
    assert summary["d_split"] == pytest.approx(torch.quantile(reverse_kl, 0.5).item(), rel=1e-4)
    high_h, high_d = h > summary["h_split"], reverse_kl > summary["d_split"]
    plain = [high_h & high_d, high_h & ~high_d, ~high_h & high_d, ~high_h & ~high_d]
    assert [q["tokens"] for q in report["quadrants"]] == [int(m.sum()) for m in plain]
    # the printed Q3 examples are the highest-δ confident tokens, each with its own token, context and p's
    tokens = rollouts.input_ids[:, 1:][rollouts.response_mask[:, 1:]]
    rows, positions = rollouts.response_mask[:, 1:].nonzero().unbind(1)
    q3 = plain[2].nonzero().squeeze(1)
    expected = q3[reverse_kl[q3].argsort(descending=True)][:len(report["q3_examples"])]
    assert len(report["q3_examples"]) == min(8, len(q3)) > 0
    for example, i in zip(report["q3_examples"], expected.tolist()):
        assert example["reverse_kl"] == pytest.approx(reverse_kl[i].item(), rel=1e-4, abs=1e-6)
        assert example["h"] == pytest.approx(h[i].item(), rel=1e-4, abs=1e-6)
        assert example["token"] == tokenizer.decode([int(tokens[i])])
        assert example["student_p"] == pytest.approx(log_s[i, tokens[i]].exp().item(), rel=1e-4)
        assert example["teacher_p"] == pytest.approx(log_t[i, tokens[i]].exp().item(), rel=1e-4)
        assert example["teacher_top"] == tokenizer.decode([int(log_t[i].argmax())])
        row, position = int(rows[i]), int(positions[i]) + 1
        context = rollouts.input_ids[row, max(0, position - 16):position]
        kept = rollouts.attention_mask[row, max(0, position - 16):position].bool()
        assert example["context"] == tokenizer.decode(context[kept].tolist(), skip_special_tokens=True)


def test_taxonomy_student_equals_teacher_gives_zero_divergence(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair / "student")
    student = AutoModelForCausalLM.from_pretrained(tiny_pair / "student").eval()
    report, points = taxonomy.taxonomy(student, student, tokenizer, [data.format_prompt(tokenizer, "1+2=")],
                                       samples=2, max_new_tokens=6, batch_size=2)
    assert points["d"].abs().max() < 1e-6
    assert all(q["kl_mass_share"] == 0.0 for q in report["quadrants"])


def test_the_taxonomy_picture_is_a_png_with_each_quadrant_in_its_colour(tmp_path, monkeypatch):
    from matplotlib import colors, image
    g = torch.Generator().manual_seed(0)
    h, d = torch.rand(400, generator=g), torch.rand(400, generator=g)
    quadrant = tip.load_select().quadrants(h, d, torch.ones(400, dtype=torch.bool), 0.5, 0.5)
    report = {"summary": {"h_split": 0.5, "d_split": 0.5, "tokens": 400, "split": "given"},
              "quadrants": taxonomy.quadrant_report(h, h, d, quadrant)}
    path = tmp_path / "new" / "fig.png"
    assert taxonomy.plot_taxonomy({"h": h, "d": d, "quadrant": quadrant}, report, path) is True
    pixels = image.imread(path)[..., :3]
    assert pixels.shape[:2] == (576, 768)  # 6.4 × 4.8 inches at 120 dpi
    for name in ("tab:red", "tab:orange", "tab:purple", "tab:green"):  # Q1..Q4, alpha-blended on white
        blended = torch.tensor(colors.to_rgb(name)) * 0.5 + 0.5
        distance = (torch.from_numpy(pixels.copy()) - blended).abs().amax(-1)
        assert (distance < 0.06).sum() > 20, name
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary file left behind
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # matplotlib is optional: no picture, no error
    assert taxonomy.plot_taxonomy({"h": h, "d": d, "quadrant": quadrant}, report, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()