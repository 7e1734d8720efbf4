"""Whether two variants agree (loss, gradient norm, gradients) and a benchmark's verdict: the targets and
agreement checks it prints, and its exit code (Verdicts)."""
from __future__ import annotations

from pathlib import Path

import torch


def _blocks(t: torch.Tensor, size: int = 1 << 22):
    """The elements of `t`, flat, a few million at a time: float64 copies of a [V, d] gradient stay small."""
    flat = t.reshape(-1)
    return (flat[i:i + size].double() for i in range(0, flat.numel(), size))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64."""
    return max(((x - y).abs().max().item() for x, y in zip(_blocks(a), _blocks(b))), default=0.0)


def max_abs(a: torch.Tensor) -> float:
    return max((x.abs().max().item() for x in _blocks(a)), default=0.0)


def compare_gradients(reference: Path, other: Path, tolerance: float) -> tuple[bool, str]:
    """Every tensor of two saved gradient dicts: max |Δ| / max |reference| ≤ tolerance. Returns (ok, a line
    naming the tensor that is furthest off). Memory-mapped, so two copies of a large model never sit in RAM."""
    a = torch.load(reference, map_location="cpu", mmap=True, weights_only=True)
    b = torch.load(other, map_location="cpu", mmap=True, weights_only=True)
    if a.keys() != b.keys():
        return False, f"gradients of different parameters: {sorted(a.keys() ^ b.keys())[:3]}"
    worst, worst_name = 0.0, ""
    for name in a:
        if a[name].shape != b[name].shape:
            return False, f"{name}: shapes {tuple(a[name].shape)} and {tuple(b[name].shape)}"
        diff, scale = max_abs_diff(a[name], b[name]), max_abs(a[name])
        relative = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
        if relative >= worst:
            worst, worst_name = relative, name
    return worst <= tolerance, f"largest max |Δ| / max |g| over {len(a)} tensors {worst:.1e} ({worst_name})"


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def step_agreement(reference: dict, other: dict, tolerance: float) -> tuple[bool, str]:
    """Whether two variants' first timed optimizer steps agree, and a line saying by how much: the loss, the
    gradient norm before clipping and the clipped gradients (run_variants results, relative differences). The
    norm matters: clipping rescales a gradient to norm 1, so clipped gradients alone miss a wrong scale."""
    loss = relative_difference(other["first"]["loss"], reference["first"]["loss"])
    norm = relative_difference(other["first"]["grad_norm"], reference["first"]["grad_norm"])
    ok, line = compare_gradients(Path(reference["gradients"]), Path(other["gradients"]), tolerance)
    return (ok and loss <= tolerance and norm <= tolerance,
            f"relative |Δ| of the loss {loss:.1e}, of the gradient norm before clipping {norm:.1e}; clipped "
            f"gradients: {line}")


class Verdicts:
    """The targets and agreement checks a benchmark prints, and its exit code: 1 when a variant failed, the
    compared paths disagree, or (unless targets are only reported, as under --tiny) a target is missed."""

    def __init__(self, enforce_targets: bool):
        self.enforce_targets, self.missed, self.disagree = enforce_targets, [], []

    def target(self, what: str, value: float, limit: float, below: bool = False) -> str:
        """"met"/"MISSED" for value ≤ limit (value < limit when `below`), remembered for the exit code."""
        met = value < limit if below else value <= limit
        if not met:
            self.missed.append(what)
        return f"{value:.3f} (target {'<' if below else '≤'} {limit:g}: {'met' if met else 'MISSED'})"

    def agreement(self, what: str, ok: bool) -> str:
        if not ok:
            self.disagree.append(what)
        return "agree" if ok else "DISAGREE"

    def exit_code(self, failed: list[str]) -> int:
        """Prints the verdict line and returns the exit code."""
        problems = [f"failed: {', '.join(failed)}"] if failed else []
        problems += [f"DISAGREE: {', '.join(self.disagree)}"] if self.disagree else []
        if self.missed:
            problems.append(f"target MISSED: {', '.join(self.missed)}" if self.enforce_targets
                            else f"target missed (not enforced at --tiny): {', '.join(self.missed)}")
        bad = failed or self.disagree or (self.missed and self.enforce_targets)
        print(f"\nverdict: {'; '.join(problems) if problems else 'every target met, the paths agree'}"
              f" (exit code {1 if bad else 0})")
        return 1 if bad else 0
