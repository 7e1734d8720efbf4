"""Peak memory and time of the distillation loss of paper Eqs. 1/9 (mean reverse KL over N response tokens):
naive full-vocabulary logits vs chunked (score.reverse_kl_loss), each in a fresh process, with their loss and
gradients compared. Exit code 1 when a variant fails, the two disagree, or a target is missed.

    python benchmarks/bench_score.py                                    # CPU, fp32, N=2048, V=151936, d=256
    python benchmarks/bench_score.py --device cuda --dtype bfloat16 --hidden 4096
    python benchmarks/bench_score.py --tiny
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from agreement import Verdicts, max_abs, max_abs_diff
from flags import THREADS_HELP, BenchFlags, parse_bench_flags, size_arg
from processes import run_variants
from readings import gib, machine_line, measure, step_time, time_cell
import score  # noqa: E402  (flags has put the project on the path)
import tip  # noqa: E402

# Why chunk (Eq. 1; Eq. 9 over the kept tokens). The loss is the mean reverse KL, KL(P_S ‖ P_T), over N response
# tokens of full-vocabulary distributions. Written the obvious way it materialises [N, V] student and teacher
# logits, their fp32 log-softmaxes and the autograd graph between them: at Qwen3's vocabulary (V = 151,936) each
# fp32 [N, V] tensor is N × 0.6 MB, several stay alive for backward, and peak memory grows with all tokens ×
# vocabulary. That is what the paper reports for its base repository (§7, Table 3: peak GPU memory 72.0 GB with
# all tokens vs 35.3 GB with 10 % of them for Qwen3 8B→4B), where the memory saving of token selection comes from
# fewer full-vocabulary rows. `score.reverse_kl_loss` instead computes each chunk's gradient in its forward pass
# and never holds more than `chunk_size` rows of [·, V] tensors.
#
# How it is measured. Each variant runs in its own fresh process (processes.run_variants):
#   naive    full student and teacher logits [N, V], fp32 log-softmax, mean reverse KL, autograd backward
#            to the student hidden states and LM head;
#   chunked  score.reverse_kl_loss(..., chunk_size), forward + backward.
# Each child builds its inputs and takes one warm-up step; then both children, alive together, take their
# --repeats timed steps in turn (a shared machine's changing load hits both alike). For each the table gives the
# largest peak memory above the state right before a step (readings.measure: CUDA's max_memory_allocated on GPU;
# on CPU ru_maxrss, lowered to the current RSS before each step), the median wall time (and CPU time, on CPU),
# and the chunked/naive ratios against the targets: memory ≤ 10 % of naive, time ≤ 1.0× naive, where time is CPU
# time on a CPU (readings.step_time: a step's own work, which a shared machine's load moves less) and wall time on
# GPU. The children save their loss and gradients and the parent prints the largest differences, so a fast wrong
# path, or a backward with the wrong sign, cannot pass.
#
# --tiny (N = 64, V = 512, d = 32, chunk 16, 1 step) runs in seconds and checks agreement the same way; its
# tensors are a few hundred KiB, below what RSS resolves, and its steps take milliseconds, so it prints the
# targets without failing on them.

VARIANTS = ("naive", "chunked")
MEMORY_TARGET, TIME_TARGET = 0.10, 1.0
# largest |Δgrad| / max|grad naive| accepted: fp32 differs only in summation order, bf16 in rounding of the
# bf16 gradient matmuls (the chunked path accumulates chunks in fp32, autograd does one bf16 matmul)
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
FULL = dict(rows=2048, vocab=151936, hidden=256, chunk_size=512, repeats=3, threads=torch.get_num_threads())
SIZES = {"cpu": FULL, "cuda": FULL, "tiny": dict(rows=64, vocab=512, hidden=32, chunk_size=16, repeats=1, threads=1)}


@dataclass
class ScoreFlags(BenchFlags):
    dtype: str = tip.arg("float32", "hidden states and heads of both models", ["float32", "bfloat16"])
    rows: int = size_arg("rows", SIZES, "N, scored token rows")
    vocab: int = size_arg("vocab", SIZES, "V, vocabulary (Qwen3's: 151,936)")
    hidden: int = size_arg("hidden", SIZES, "d, hidden size of student and teacher")
    chunk_size: int = size_arg("chunk_size", SIZES, "rows per chunk of the chunked loss")
    repeats: int = size_arg("repeats", SIZES, "timed steps after one warm-up step")
    threads: int = size_arg("threads", SIZES, THREADS_HELP)


# ---------------------------------------------------------------- the two variants (run in a child)

def naive_loss(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size):
    """Eq. 1 the obvious way: full [N, V] logits, fp32 log-softmax, autograd through all of it."""
    student_logits = student_hidden @ student_head.T
    teacher_logits = teacher_hidden @ teacher_head.T
    log_p_s = student_logits.float().log_softmax(-1)
    log_p_t = teacher_logits.float().log_softmax(-1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean()


def chunked_loss(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size):
    """Eq. 1 through score.reverse_kl_loss: at most `chunk_size` rows of [·, V] tensors at a time."""
    return score.reverse_kl_loss(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=chunk_size)


LOSSES = {"naive": naive_loss, "chunked": chunked_loss}


def make_inputs(args, device: torch.device, dtype: torch.dtype):
    """Random hidden states ~ N(0, 1) and heads scaled so that logits have std ≈ 2 (student) and 3 (teacher).

    Built directly in the target dtype and scaled in place, so building leaves no peak above the baseline.
    Both children use the same seed on the same device, hence the same inputs."""
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def randn(rows, std):
        return torch.randn(rows, args.hidden, generator=generator, device=device, dtype=dtype).mul_(std)

    student_hidden = randn(args.rows, 1.0).requires_grad_()
    student_head = randn(args.vocab, 2.0 / args.hidden ** 0.5).requires_grad_()
    teacher_hidden = randn(args.rows, 1.0)
    teacher_head = randn(args.vocab, 3.0 / args.hidden ** 0.5)
    return student_hidden, student_head, teacher_hidden, teacher_head


def prepare(variant: str, args):
    """Child process: the inputs and one warm-up step; returns (step, finish) for processes.run_variants.
    Every step starts without gradients; finish saves the last step's gradients for the parent."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs = make_inputs(args, device, dtype)
    student_hidden, student_head = inputs[0], inputs[1]

    def forward_backward() -> dict:
        loss = LOSSES[variant](*inputs, args.chunk_size)
        loss.backward()
        return dict(loss=loss.double().item())

    def step() -> dict:
        student_hidden.grad = student_head.grad = None  # each step starts from the same state
        return measure(forward_backward, device)

    def finish() -> dict:
        path = Path(args.folder) / f"{variant}.pt"
        torch.save({"grad_hidden": student_hidden.grad, "grad_head": student_head.grad}, path)
        return dict(gradients=str(path))

    forward_backward()
    return step, finish


# ---------------------------------------------------------------- the parent: spawn, compare, print

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(f"# bench_score: N={args.rows} rows, V={args.vocab}, d={args.hidden}, chunk {args.chunk_size}, "
          f"{args.dtype} on {args.device}, median of {args.repeats} steps after 1 warm-up"
          f"{' (--tiny)' if args.tiny else ''}")
    print(f"# before: {machine_line(args.device)}")
    verdicts = Verdicts(enforce_targets=not args.tiny)
    with tempfile.TemporaryDirectory() as folder:  # the gradients, one file per variant
        args.folder = folder
        results = run_variants(prepare, VARIANTS, args, args.repeats, together=True)
        print(f"# after:  {machine_line(args.device)}\n")
        failed = print_table(results, args, verdicts)
        if not failed:
            check_agreement(results, args, verdicts)
    return verdicts.exit_code(failed)


def print_table(results: dict, args, verdicts: Verdicts) -> list[str]:
    """The markdown table with the targets in its last row; returns the variants that failed."""
    memory = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    print(f"| variant | peak memory above the state before the step ({memory}) | time, forward + backward |")
    print("|---|---|---|")
    names = {"naive": "naive: full [N, V] logits, fp32 log-softmax, autograd",
             "chunked": f"chunked: `score.reverse_kl_loss`, chunk {args.chunk_size}"}
    for v in VARIANTS:
        r = results[v]
        cells = ["failed: " + r["error"], "–"] if "error" in r else [gib(r["peak_bytes"]), time_cell(r, args.device)]
        print(f"| {names[v]} | {cells[0]} | {cells[1]} |")
    failed = [v for v in VARIANTS if "error" in results[v]]
    if not failed:
        naive, chunked = results["naive"], results["chunked"]
        memory_ratio = chunked["peak_bytes"] / max(naive["peak_bytes"], 1)
        time_ratio = step_time(chunked, args.device) / step_time(naive, args.device)
        wall = f" (wall: {chunked['seconds'] / naive['seconds']:.3f})" if args.device == "cpu" else ""
        print(f"| chunked / naive | {verdicts.target('memory', memory_ratio, MEMORY_TARGET)} "
              f"| {verdicts.target('time', time_ratio, TIME_TARGET)}{wall} |")
    return failed


def check_agreement(results: dict, args, verdicts: Verdicts) -> None:
    """The two paths must compute the same loss and gradients, else the speed and memory mean nothing."""
    naive, chunked = results["naive"], results["chunked"]
    tolerance = TOLERANCE[args.dtype]
    loss, plain = chunked["first"]["loss"], naive["first"]["loss"]
    ok = abs(loss - plain) <= tolerance * max(abs(plain), 1.0)
    print(f"\nagreement: loss naive {plain:.6f} nats, chunked {loss:.6f}, |Δ| {abs(loss - plain):.2e}")
    gradients = [torch.load(r["gradients"], map_location="cpu", weights_only=True) for r in (naive, chunked)]
    for name in ("grad_hidden", "grad_head"):
        diff, scale = max_abs_diff(gradients[0][name], gradients[1][name]), max_abs(gradients[0][name])
        ok &= diff <= tolerance * scale
        print(f"  {name}: max |Δ| {diff:.2e}, max |naive| {scale:.2e}, relative {diff / max(scale, 1e-30):.2e}")
    print(f"  {verdicts.agreement('loss and gradients', ok)} (tolerance {tolerance:g} relative, {args.dtype})")


def parse(argv: list[str] | None = None) -> ScoreFlags:
    return parse_bench_flags(ScoreFlags, argv, SIZES, __doc__.split("\n\n")[0])[0]


if __name__ == "__main__":
    sys.exit(main())
