"""Accuracy (mean@k) on MATH-500, AIME 2024/2025 and the toy task, and the quadrant report (paper §4, §7).

Not built yet beyond the grader's interface.
"""
from __future__ import annotations


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def is_correct(response: str, answer: str) -> bool:
    """True when the last boxed answer of `response` equals `answer`."""
    boxed = extract_boxed(response)
    return boxed is not None and boxed.strip() == str(answer).strip()
