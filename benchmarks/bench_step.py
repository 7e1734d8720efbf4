"""Peak memory and time of one whole OPD step (paper §7, Table 3; Eqs. 1 and 9): train.py's `train_step` with
type_aware at kept ratio ρ ∈ {1.0, 0.5, 0.1} vs a naive full-logit step, each in a fresh process; ρ = 1.0 and
naive must agree. Targets: peak at ρ = 1.0 ≤ 1.15× peak at ρ = 0.1, every TIP peak below naive.

    python benchmarks/bench_step.py                   # CPU, fp32, 8 rollouts × ≤128 tokens, d=256, 2 layers
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --hidden 2048      # 16 rollouts × ≤256 tokens
    python benchmarks/bench_step.py --tiny
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from agreement import Verdicts, step_agreement
from flags import MODEL_SIZE_HELP, THREADS_HELP, BenchFlags, parse_bench_flags, size_arg
from processes import run_variants
from readings import gib, machine_line, time_cell
from synthetic import STEP_MODULES, measured, step_setup, teacher_hidden_size, warm_up_batch
import tip  # noqa: E402  (flags has put the project on the path)

# Why the peak should not grow with ρ. TIP trains on KL(P_S ‖ P_T) at the kept tokens only (Eq. 9). In the paper's
# base repository the memory saving of selection comes from fewer full-vocabulary rows: it keeps each chunk's fp32
# log-softmax in the autograd graph and caches the teacher's full logits, so its peak GPU memory grows with the
# kept tokens (paper §7, Table 3: Qwen3 8B→4B needs 72.0 GB with every token and 35.3 GB with 10 % of them,
# 2.04×). train.py never holds a [tokens, vocabulary] tensor: teacher and student give final hidden states, per-token
# h, δ, δ_fwd are scored `chunk_size` rows at a time (score.py), selection runs over the global batch (select.py),
# and the loss computes each chunk's gradient in its forward. Its peak is then set by one chunk × V, whatever ρ is.
#
# What is timed: exactly what train.py does for one optimizer step, `train.train_step` (teacher and student
# forward, chunked scoring, the type_aware selection at ρ, the chunked loss at the kept rows, backward, clip,
# AdamW), at each ρ, and a naive step on the same models and batch: full student logits
# `student(input_ids, attention_mask, position_ids).logits` and teacher logits in fp32 at every position (as
# `.logits` gives them), log-softmax, the reverse KL averaged over response tokens (no selection), backward, then
# train.py's clip and AdamW. The models are small random Qwen3 stacks (student --hidden, teacher 1.5× wider,
# --layers each) with Qwen3's vocabulary V = 151,936, so that, as in real models, the vocabulary dominates; the
# student is set up by `train.prepare_student`, as train.py does it (fp32 master weights, training mode, gradient
# checkpointing unless --no-gradient-checkpointing), with train.py's bf16 autocast on GPU; the teacher is in
# --dtype. The batch is synthetic rollouts laid out as rollout.py returns them (synthetic.make_rollouts), so nothing
# depends on sampling. The default batch is 16 rollouts × ≤256 tokens on GPU and 8 × ≤128 on CPU: the naive step
# holds about 8 fp32 [B, L, V] tensors at its peak, about 21 GiB of RAM at 16 × 256.
#
# How memory is measured. Each variant runs in its own fresh process, one after another (processes.run_variants).
# The child builds the models, the batch and the AdamW optimizer (as train.py's setup does), then takes one
# warm-up step at learning rate 0 on a 2-rollout batch of 8 response tokens: that allocates AdamW's moment
# buffers, which every later step finds in place, and leaves the weights as they were, so every variant's first
# timed step starts from the same weights and the state right before each timed step is the same for every
# variant (weights, teacher, optimizer state, batch; no gradients, as train_step leaves them). The reported peak is
# the largest, over the timed steps, of the memory above that state (readings.measure: CUDA's max_memory_allocated
# on GPU; on CPU ru_maxrss, lowered to the current RSS before each step). Time is the median wall time of
# --repeats steps (CUDA synchronised), and on CPU their median CPU time too: on a shared CPU wall time depends on
# the other jobs (the load average is printed before and after), CPU time much less.
#
# Agreement. The ρ = 1.0 step and the naive step compute the same loss and gradient (Eq. 9 with every token kept
# is Eq. 1), so their first timed steps, from the same weights, are compared (agreement.step_agreement): the losses,
# the gradient norms before clipping, and the clipped gradients the optimizer steps with (kept by a pre-step hook,
# which allocates nothing), tensor by tensor as max |Δ| / max |g|. A fast wrong path, or a backward with the wrong
# sign or scale, cannot pass.
#
# Exit code 1 when a variant fails, the paths disagree, or a target is missed. --tiny (V = 512, d = 64, 2 layers,
# 4 rollouts × ≤16 tokens, 1 step) runs in seconds and checks agreement the same way; its peaks are a few MiB,
# where allocator and page-size noise decide the ratios, so it prints the targets without failing on them.

RATIOS = (1.0, 0.5, 0.1)
VARIANTS = tuple(f"rho={r}" for r in RATIOS) + ("naive",)
COMPARED = ("rho=1.0", "naive")  # the same loss and gradient: every token kept is Eq. 1
RULE = "type_aware"  # the paper's Soft-OR rule (Eq. 7)
PEAK_TARGET, PAPER_BASE_RATIO = 1.15, 2.04
# relative differences accepted between ρ = 1.0 and naive: in fp32 they differ in summation order only; with
# bf16 (autocast on GPU, a bf16 teacher) the naive path's logits are rounded to bf16 and train.py's are not
TOLERANCE = {"exact": 1e-4, "bf16": 5e-2}
SIZES = {  # the naive step would need ≈ 21 GiB of RAM at 16 × 256 (≈ 8 fp32 [B, L, V] tensors at its peak)
    "cpu": dict(hidden=256, layers=2, vocab=151936, rollouts=8, response_len=128, chunk_size=512, repeats=3,
                threads=torch.get_num_threads()),
    "cuda": dict(hidden=256, layers=2, vocab=151936, rollouts=16, response_len=256, chunk_size=512, repeats=3,
                 threads=torch.get_num_threads()),
    "tiny": dict(hidden=64, layers=2, vocab=512, rollouts=4, response_len=16, chunk_size=16, repeats=1, threads=1),
}


@dataclass
class StepFlags(BenchFlags):
    dtype: str = tip.arg("float32", "teacher weights (the student is fp32 master weights, bf16 autocast on GPU)",
                         ["float32", "bfloat16"])
    hidden: int = size_arg("hidden", SIZES, MODEL_SIZE_HELP["hidden"])
    layers: int = size_arg("layers", SIZES, MODEL_SIZE_HELP["layers"])
    vocab: int = size_arg("vocab", SIZES, MODEL_SIZE_HELP["vocab"])
    rollouts: int = size_arg("rollouts", SIZES, "rollouts in the step, one micro-batch")
    response_len: int = size_arg("response_len", SIZES, MODEL_SIZE_HELP["response_len"])
    chunk_size: int = size_arg("chunk_size", SIZES, MODEL_SIZE_HELP["chunk_size"])
    repeats: int = size_arg("repeats", SIZES, "timed steps after one small warm-up step")
    threads: int = size_arg("threads", SIZES, THREADS_HELP)
    gradient_checkpointing: bool = tip.arg(True, "recompute the student's activations in backward, as train.py "
                                           "does by default")


# ---------------------------------------------------------------- what a child runs

def naive_step(student, teacher, batch, optimizer, config) -> dict:
    """Eq. 1 the obvious way: [B, L, V] logits from both models, fp32 log-softmax, the reverse KL per position,
    its mean over response tokens, autograd backward through all of it; then train.py's clip and AdamW step."""
    import tip
    import train

    for group in optimizer.param_groups:
        group["lr"] = config.lr
    optimizer.zero_grad(set_to_none=True)
    device = batch.input_ids.device
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                  use_cache=False)
    targets = batch.response_mask[:, 1:]  # the logits at p predict the token at p + 1
    with tip.autocast(device):
        student_logits = student(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    log_p_s = student_logits[:, :-1].float().log_softmax(-1)
    log_p_t = teacher_logits[:, :-1].float().log_softmax(-1)
    reverse_kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    loss = reverse_kl[targets].mean()
    loss.backward()
    # clipped as train_step clips: torch.nn.utils.clip_grad_norm_ reports the norm of a 39M-element fp32 gradient
    # 0.3 % off here (its fp32 vector norm), train.py's sum of squares is within 1e-7 of float64
    grad_norm = train.sync_and_clip_gradients(student, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(targets.sum())
    return dict(loss=loss.item(), response_tokens=tokens, kept_tokens=tokens, grad_norm=grad_norm, skipped="")


def prepare(variant: str, args):
    """Child process: synthetic.step_setup (models, batch, optimizer, warm-up). Returns (step, finish) for
    processes.run_variants; the first step of a COMPARED variant saves its gradients."""
    import train

    ratio = 0.0 if variant == "naive" else float(variant.split("=")[1])
    teacher, student, optimizer, config, batch = step_setup(args, args.rollouts, rule=RULE, ratio=ratio,
                                                            micro_batch_size=args.rollouts)

    def one_step(rollouts, step_config) -> dict:
        if variant == "naive":
            return naive_step(student, teacher, rollouts, optimizer, step_config)
        return train.train_step(student, teacher, rollouts, optimizer, step_config, 0,
                                torch.Generator().manual_seed(args.seed))

    one_step(warm_up_batch(args), dataclasses.replace(config, lr=0.0))
    gradients = Path(args.folder) / f"{variant}.pt" if variant in COMPARED else None
    return (measured(lambda: one_step(batch, config), torch.device(args.device), optimizer, student, gradients),
            lambda: dict(gradients=str(gradients) if gradients else None))


# ---------------------------------------------------------------- the parent: spawn, compare, print

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(f"# bench_step: one train.train_step ({RULE}) vs a naive full-logit step; {args.rollouts} rollouts × "
          f"≤{args.response_len} response tokens, V={args.vocab}, student d={args.hidden} / teacher "
          f"d={teacher_hidden_size(args.hidden)}, {args.layers} layers, chunk {args.chunk_size}, teacher "
          f"{args.dtype}, student fp32{' + bf16 autocast' if args.device == 'cuda' else ''} on {args.device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"median of {args.repeats} steps after 1 small warm-up{' (--tiny)' if args.tiny else ''}")
    print(f"# before: {machine_line(args.device)}")
    verdicts = Verdicts(enforce_targets=not args.tiny)
    with tempfile.TemporaryDirectory() as folder:  # the compared gradients, one file per variant
        args.folder = folder
        results = run_variants(prepare, VARIANTS, args, args.repeats, together=False, preload=STEP_MODULES)
        print(f"# after:  {machine_line(args.device)}")
        for r in results.values():
            if "error" not in r and r["first"]["skipped"]:
                r["error"] = f"the step was skipped: {r['first']['skipped']}"
        if args.device == "cpu":
            exact = all(r.get("exact", True) for r in results.values())
            print("# CPU peak: ru_maxrss " + ("reset before each step via /proc/self/clear_refs" if exact else
                                              "NOT resettable here: high-water mark since the child started"))
        failed = print_table(results, args)
        if not failed:
            check(results, args, verdicts)
    return verdicts.exit_code(failed)


def print_table(results: dict, args) -> list[str]:
    """The markdown table; returns the variants that failed."""
    memory = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    reference, naive = results["rho=0.1"], results["naive"]
    print(f"\n| variant | kept / response tokens | state before the step | peak above it ({memory}) "
          f"| peak / peak at ρ=0.1 | peak / naive | step time (median) |")
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        r = results[v]
        name = f"TIP {RULE}, ρ = {v.split('=')[1]}" if v != "naive" else "naive: full logits, no selection"
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | – | – | – | – | – |")
            continue
        first = r["first"]
        kept = (f"{first['kept_tokens']} / {first['response_tokens']} "
                f"({first['kept_tokens'] / max(first['response_tokens'], 1):.0%})")

        def ratio(other):
            return f"{r['peak_bytes'] / max(other['peak_bytes'], 1):.2f}" if "error" not in other else "–"
        print(f"| {name} | {kept} | {gib(r['before_bytes'])} | {gib(r['peak_bytes'])} | {ratio(reference)} "
              f"| {ratio(naive)} | {time_cell(r, args.device)} |")
    return [v for v in VARIANTS if "error" in results[v]]


def check(results: dict, args, verdicts: Verdicts) -> None:
    """The two targets, then the agreement of ρ = 1.0 with naive: loss and clipped gradients."""
    naive, full = results["naive"], results["rho=1.0"]
    peak_ratio = full["peak_bytes"] / max(results["rho=0.1"]["peak_bytes"], 1)
    worst = max(results[v]["peak_bytes"] / max(naive["peak_bytes"], 1) for v in VARIANTS if v != "naive")
    print(f"\ntarget: peak at ρ=1.0 / peak at ρ=0.1 = {verdicts.target('peak at ρ=1.0', peak_ratio, PEAK_TARGET)}; "
          f"the paper's base repository: {PAPER_BASE_RATIO}")
    print(f"target: every TIP peak below naive: largest TIP / naive = "
          f"{verdicts.target('TIP peaks below naive', worst, 1.0, below=True)}")
    tolerance = TOLERANCE["exact" if args.device == "cpu" and args.dtype == "float32" else "bf16"]
    ok, line = step_agreement(naive, full, tolerance)
    print(f"agreement: ρ=1.0 vs naive, {line} ({verdicts.agreement('ρ=1.0 vs naive', ok)}, tolerance {tolerance:g})")


def parse(argv: list[str] | None = None) -> StepFlags:
    return parse_bench_flags(StepFlags, argv, SIZES, __doc__.split("\n\n")[0])[0]


if __name__ == "__main__":
    sys.exit(main())
