"""Grading of paper §7.1: a response is correct when its last \\boxed{…} answer equals the reference.

Equivalence is math-verify's (\\frac12 = 0.5, 1,000 = 1000, intervals and tuples as such), under a time limit.
The reference is the dataset's own answer field (docs/decisions.md, "Benchmark answers").
"""
from __future__ import annotations

import functools
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor

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


def reward(item: dict, text: str, conversation: list[dict] | None) -> float | None:
    """A rollout's reward, for the log: its task's own reward for a conversation, else whether its \\boxed{}
    answer is right; None without either."""
    task = item.get("task")
    if task is not None and task.reward is not None and conversation is not None:
        return task.reward(conversation)
    return None if item["answer"] is None else float(is_correct(text, item["answer"]))
