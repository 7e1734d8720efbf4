"""Peak memory and wall time of the distillation loss, naive vs chunked (score.py; paper Eqs. 1/9).

The loss of Eq. 1 (Eq. 9 over the kept tokens) is the mean reverse KL, KL(P_S ‖ P_T), over N response
tokens of full-vocabulary distributions. Written the obvious way it materialises [N, V] student and teacher
logits, their fp32 log-softmaxes and the autograd graph between them: at Qwen3's vocabulary (V = 151,936)
each fp32 [N, V] tensor is N × 0.6 MB, several stay alive for backward, and peak memory grows with all
tokens × vocabulary. That is what PAPER.md §7 reports for the paper's base repository (Table 3: peak GPU
memory 72.0 GB with all tokens vs 35.3 GB with 10 % of them for Qwen3 8B→4B), where the memory saving of
token selection comes from fewer full-vocabulary rows. `score.reverse_kl_loss` instead computes each chunk's
gradient in its forward pass and never holds more than `chunk_size` rows of [·, V] tensors.

This script runs, each in its own fresh subprocess so that peaks do not mix:
  naive    full student and teacher logits [N, V], fp32 log-softmax, mean reverse KL, autograd backward
           to the student hidden states and LM head;
  chunked  score.reverse_kl_loss(..., chunk_size), forward + backward.
For each it reports the peak memory above the state right before the step (CPU: max RSS of the process
minus its RSS before the first step; GPU: torch.cuda.max_memory_allocated minus memory allocated before
the step), the median wall time of --repeats steps after one warm-up step (both children stay alive and
take their timed steps in turn, so a shared machine's changing load hits both alike), and the
chunked/naive ratios against the targets: memory ≤ 10 % of naive, time ≤ 1.0× naive. The children send
back their loss and gradients and the parent prints the largest differences, so a fast wrong path cannot
pass (exit code 1 if they disagree).

    python benchmarks/bench_score.py                                    # CPU, fp32, N=2048, V=151936, d=256
    python benchmarks/bench_score.py --device cuda --dtype bfloat16 --hidden 4096
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import require_positive, current_rss_bytes, max_rss_bytes, gib, machine_line

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import score  # noqa: E402  (after the path fix, so the script runs from any folder)

VARIANTS = ("naive", "chunked")
MEMORY_TARGET, TIME_TARGET = 0.10, 1.0
# largest |Δgrad| / max|grad naive| accepted: fp32 differs only in summation order, bf16 in rounding of the
# bf16 gradient matmuls (the chunked path accumulates chunks in fp32, autograd does one bf16 matmul)
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


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


def run_variant(args) -> None:
    """Child process: build inputs, take the warm-up step, then one timed step per "step" line on stdin;
    on "finish" save loss, gradients, peak and times to args.result. Answers go to stdout, one line each."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    inputs = make_inputs(args, device, dtype)
    student_hidden, student_head = inputs[0], inputs[1]
    loss_fn = LOSSES[args.worker]

    def step():
        student_hidden.grad = student_head.grad = None  # each step starts from the baseline state
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(*inputs, args.chunk_size)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, loss.detach()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss_bytes()
    _, loss = step()  # warm-up; on CPU also the step whose peak max RSS records
    print("ready", flush=True)
    times = []
    for command in sys.stdin:
        if command.strip() != "step":
            break
        times.append(step()[0])
        print(f"time {times[-1]!r}", flush=True)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - baseline
    torch.save({"peak_bytes": peak, "times": times, "loss": loss.double().item(),
                "grad_hidden": student_hidden.grad.cpu(), "grad_head": student_head.grad.cpu()}, args.result)
    print("saved", flush=True)


# ---------------------------------------------------------------- the parent: spawn, compare, print

def max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 16384) -> float:
    """max |a − b| in float64, a block of rows at a time so a [V, d] gradient needs no full-size copies."""
    return max((a[i:i + rows].double() - b[i:i + rows].double()).abs().max().item()
               for i in range(0, max(a.shape[0], 1), rows)) if a.numel() else 0.0


def max_abs(a: torch.Tensor, rows: int = 16384) -> float:
    return max((a[i:i + rows].double().abs().max().item() for i in range(0, a.shape[0], rows)), default=0.0)


class Worker:
    """One variant in its own process, driven line by line so that the timed steps of the two variants
    can alternate: a shared machine's load then slows both alike instead of whichever ran second."""

    def __init__(self, variant: str, args, folder: Path):
        self.variant, self.result, self.error = variant, folder / f"{variant}.pt", None
        self.stderr = open(folder / f"{variant}.stderr", "w+")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                   "--result", str(self.result), "--rows", str(args.rows), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--dtype", args.dtype,
                   "--device", args.device, "--seed", str(args.seed)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True)
        self.expect("ready")  # inputs built and the warm-up step taken

    def expect(self, word: str) -> str:
        if self.error:
            return ""
        line = self.process.stdout.readline()
        if not line.startswith(word):
            self.process.wait()
            self.stderr.seek(0)
            last = (self.stderr.read().strip().splitlines() or [f"exit code {self.process.returncode}"])[-1]
            self.error = last[-160:]
            return ""
        return line

    def send(self, command: str) -> None:
        if not self.error:
            try:
                self.process.stdin.write(command + "\n")
                self.process.stdin.flush()
            except BrokenPipeError:  # the child died; expect() reads why from its stderr
                pass

    def finish(self) -> dict:
        self.send("finish")
        self.expect("saved")
        self.process.wait()
        self.stderr.close()
        return {"error": self.error} if self.error else torch.load(self.result, weights_only=True)


def measure(args, folder: Path) -> dict:
    """Start the children one after the other (their warm-ups do not overlap), then alternate timed steps."""
    workers = [Worker(v, args, folder) for v in VARIANTS]
    for repeat in range(args.repeats):
        for worker in workers[::1 if repeat % 2 == 0 else -1]:  # alternate who goes first
            worker.send("step")
            worker.expect("time")
    return {w.variant: w.finish() for w in workers}


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.3f} (target ≤ {target:g}: {'met' if ratio <= target else 'MISSED'})"


def main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible (drop the flag to run on CPU)")
    print(f"# bench_score: N={args.rows} rows, V={args.vocab}, d={args.hidden}, chunk {args.chunk_size}, "
          f"{args.dtype} on {args.device}, median of {args.repeats} steps after 1 warm-up")
    print(f"# before: {machine_line(args)}")
    with tempfile.TemporaryDirectory() as folder:
        results = measure(args, Path(folder))
    print(f"# after:  {machine_line(args)}\n")

    memory = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    print(f"| variant | peak memory above baseline ({memory}) | wall time, forward + backward |")
    print("|---|---|---|")
    names = {"naive": "naive: full [N, V] logits, fp32 log-softmax, autograd",
             "chunked": f"chunked: `score.reverse_kl_loss`, chunk {args.chunk_size}"}
    for v in VARIANTS:
        r = results[v]
        cells = (["failed: " + r["error"], "–"] if "error" in r
                 else [gib(r["peak_bytes"]), f"{statistics.median(r['times']):.3f} s"])
        print(f"| {names[v]} | {cells[0]} | {cells[1]} |")
    naive, chunked = results["naive"], results["chunked"]
    if "error" in naive or "error" in chunked:
        return 1
    memory_ratio = chunked["peak_bytes"] / max(naive["peak_bytes"], 1)
    time_ratio = statistics.median(chunked["times"]) / statistics.median(naive["times"])
    print(f"| chunked / naive | {verdict(memory_ratio, MEMORY_TARGET)} | {verdict(time_ratio, TIME_TARGET)} |")

    # the two paths must compute the same loss and gradients, else the speed and memory mean nothing
    tolerance = TOLERANCE[args.dtype]
    ok = abs(chunked["loss"] - naive["loss"]) <= tolerance * max(abs(naive["loss"]), 1.0)
    print(f"\nagreement: loss naive {naive['loss']:.6f} nats, chunked {chunked['loss']:.6f}, "
          f"|Δ| {abs(chunked['loss'] - naive['loss']):.2e}")
    for name in ("grad_hidden", "grad_head"):
        diff, scale = max_abs_diff(naive[name], chunked[name]), max_abs(naive[name])
        ok &= diff <= tolerance * scale
        print(f"  {name}: max |Δ| {diff:.2e}, max |naive| {scale:.2e}, relative {diff / max(scale, 1e-30):.2e}")
    print(f"  {'agree' if ok else 'DISAGREE'} (tolerance {tolerance:g} relative, {args.dtype})")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="N, scored token rows")
    parser.add_argument("--vocab", type=int, default=151936, help="V, vocabulary (Qwen3: 151,936)")
    parser.add_argument("--hidden", type=int, default=256, help="d, hidden size of student and teacher")
    parser.add_argument("--chunk-size", type=int, default=512, help="rows per chunk of the chunked loss")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    cli = build_parser().parse_args()
    require_positive(cli, ("rows", "vocab", "hidden", "chunk_size", "repeats"))
    if cli.worker:
        run_variant(cli)
    else:
        sys.exit(main(cli))
