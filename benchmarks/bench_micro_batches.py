"""Peak memory and time of one optimizer step (paper §7, Eq. 9) as it grows by micro-batches: train.py's two
passes (score every micro-batch without grad, select over the whole step, then loss and backward one micro-batch
at a time) against its single-forward path (`Config.single_forward`), each variant in a fresh process; the two
must agree. Targets: two-pass peak at the most micro-batches ≤ 1.2× at one; two-pass time ≤ 1.35× single-forward.

    python benchmarks/bench_micro_batches.py                     # CPU: d=512, 8 layers, 2 × ≤256 per micro-batch
    python benchmarks/bench_micro_batches.py --device cuda --dtype bfloat16 --hidden 2560 --layers 36
    python benchmarks/bench_micro_batches.py --tiny
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
from readings import gib, load_average, machine_line, step_time, time_cell
from synthetic import STEP_MODULES, measured, step_setup, teacher_hidden_size, warm_up_batch
import tip  # noqa: E402  (flags has put the project on the path)

# The claims measured. train.py claims its peak is one micro-batch's, whatever the step's size, for the price of a
# second student forward per micro-batch; the single-forward path (every micro-batch's student graph kept from
# scoring to the loss) saves that forward and keeps every graph, so its memory grows with the step. Both are
# measured on one `train.train_step` at realistic depth: a random Qwen3 student (--layers 8, --hidden 512 on CPU)
# with Qwen3's vocabulary V = 151,936, set up by `train.prepare_student` as train.py does (fp32 master weights,
# training mode, gradient checkpointing), a teacher of the same depth 1.5× wider (in --dtype), the type_aware rule
# at its default ρ, at 1, 2, 4 and 8 micro-batches of --micro-batch-size rollouts × ≤ --response-len tokens
# (synthetic rollouts in rollout.py's layout, synthetic.make_rollouts). With one micro-batch train.py takes the
# single-forward path either way, so the two columns of that row measure the same code: their time ratio shows how
# far the times can be trusted. On GPU the student computes under train.py's bf16 autocast.
#
# How. Each variant (micro-batches × path) runs in its own fresh process (processes.run_variants): models, batch and
# AdamW as train.py's setup builds them, a warm-up step at learning rate 0 on 2 short rollouts (AdamW's moments
# then exist and the weights are unchanged, so both paths start their first timed step from the same weights),
# then --repeats timed steps. Peak: the largest, over the timed steps, of the memory above the state before the
# step (readings.measure: max_memory_allocated on GPU; on CPU ru_maxrss, lowered to the current RSS before each
# step). Time: the median step; the time target compares CPU time on a CPU (readings.step_time: a step's own work,
# which a shared machine's load moves less) and wall time on GPU; on CPU the wall times are printed too. On CPU the
# two paths of one size are alive together and take their timed steps in turn, so a shared machine's changing
# load slows both alike; on GPU they run one after the other (one variant's memory at a time). Both paths' first
# timed steps are compared (agreement.step_agreement): the loss, the gradient norm before clipping, and the clipped
# gradients the optimizer steps with, tensor by tensor as max |Δ| / max |g|.
#
# Targets: two-pass peak at the most micro-batches ≤ 1.2× its peak at the fewest (one); two-pass step time
# ≤ 1.35× the single-forward time on the same batch at the most micro-batches (every size is printed). Exit code 1
# when a variant fails, the paths disagree, or a target is missed. --tiny (V = 512, d = 64, 2 layers, micro-batches
# of 2 rollouts × ≤16 tokens, 1 step) runs in seconds and checks agreement the same way; at that size the peaks
# are a few MiB of allocator noise and the steps take milliseconds, so it prints the targets without failing on
# them.

PATHS = ("two-pass", "single-forward")
RULE = "type_aware"
PEAK_TARGET, TIME_TARGET = 1.2, 1.35
# relative differences accepted between the paths. Both run the same kernels on the same numbers in fp32; under
# bf16 autocast scoring without grad may pick other attention kernels than with it, which can move a token
# across the selection threshold
TOLERANCE = {"exact": 1e-4, "bf16": 5e-2}
SIZES = {
    "cpu": dict(hidden=512, layers=8, vocab=151936, micro_batch_size=2, response_len=256, chunk_size=512,
                repeats=1, threads=torch.get_num_threads()),
    "cuda": dict(hidden=512, layers=8, vocab=151936, micro_batch_size=4, response_len=512, chunk_size=512,
                 repeats=3, threads=torch.get_num_threads()),
    "tiny": dict(hidden=64, layers=2, vocab=512, micro_batch_size=2, response_len=16, chunk_size=16, repeats=1,
                 threads=1),
}


@dataclass
class MicroBatchFlags(BenchFlags):
    dtype: str = tip.arg("float32", "teacher weights (the student is fp32 master weights, bf16 autocast on GPU)",
                         ["float32", "bfloat16"])
    hidden: int = size_arg("hidden", SIZES, MODEL_SIZE_HELP["hidden"])
    layers: int = size_arg("layers", SIZES, MODEL_SIZE_HELP["layers"])
    vocab: int = size_arg("vocab", SIZES, MODEL_SIZE_HELP["vocab"])
    micro_batch_size: int = size_arg("micro_batch_size", SIZES, "rollouts per micro-batch")
    response_len: int = size_arg("response_len", SIZES, MODEL_SIZE_HELP["response_len"])
    chunk_size: int = size_arg("chunk_size", SIZES, MODEL_SIZE_HELP["chunk_size"])
    repeats: int = size_arg("repeats", SIZES, "timed steps per variant")
    threads: int = size_arg("threads", SIZES, THREADS_HELP)
    micro_batches: list[int] = tip.arg([1, 2, 4, 8], "micro-batches per step to measure; the targets compare the "
                                       "most with the fewest")
    gradient_checkpointing: bool = tip.arg(True, "recompute the student's activations in backward, as train.py "
                                           "does by default")


def variant_name(micro_batches: int, path: str) -> str:
    return f"{micro_batches}x{path}"


# ---------------------------------------------------------------- what a child runs

def prepare(variant: str, args):
    """Child process: synthetic.step_setup (models, the batch of this many micro-batches, optimizer, warm-up).
    Returns (step, finish) for processes.run_variants; the first step saves its gradients."""
    import train

    micro_batches, path = variant.split("x", 1)
    teacher, student, optimizer, config, batch = step_setup(
        args, int(micro_batches) * args.micro_batch_size, rule=RULE, micro_batch_size=args.micro_batch_size,
        single_forward=path == "single-forward")

    def one_step(rollouts, step_config) -> dict:
        return train.train_step(student, teacher, rollouts, optimizer, step_config, 0,
                                torch.Generator().manual_seed(args.seed))

    one_step(warm_up_batch(args), dataclasses.replace(config, lr=0.0))
    gradients = Path(args.folder) / f"{variant}.pt"
    return (measured(lambda: one_step(batch, config), torch.device(args.device), optimizer, student, gradients),
            lambda: dict(gradients=str(gradients)))


# ---------------------------------------------------------------- the parent: spawn, compare, print

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rollouts = " / ".join(str(n * args.micro_batch_size) for n in args.micro_batches)
    print(f"# bench_micro_batches: one train.train_step ({RULE}), two-pass vs single-forward, at "
          f"{', '.join(map(str, args.micro_batches))} micro-batches of {args.micro_batch_size} rollouts × "
          f"≤{args.response_len} response tokens ({rollouts} rollouts); V={args.vocab}, student d={args.hidden} / "
          f"teacher d={teacher_hidden_size(args.hidden)}, {args.layers} layers, chunk {args.chunk_size}, teacher "
          f"{args.dtype}, student fp32{' + bf16 autocast' if args.device == 'cuda' else ''} on {args.device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, median of {args.repeats} "
          f"steps after 1 small warm-up{' (--tiny)' if args.tiny else ''}")
    print(f"# before: {machine_line(args.device)}", flush=True)
    results, agreement = {}, {}
    with tempfile.TemporaryDirectory() as folder:  # gradients: one pair of files at a time, deleted once compared
        args.folder = folder
        for n in args.micro_batches:
            names = [variant_name(n, path) for path in PATHS]
            results.update(run_variants(prepare, names, args, args.repeats, together=args.device == "cpu",
                                        preload=STEP_MODULES))
            agreement[n] = compare(*(results[name] for name in names), args)
            print(f"# {n} micro-batch(es) measured; load average {load_average()}", flush=True)
    print(f"# after:  {machine_line(args.device)}")
    for r in results.values():
        if "error" not in r and r["first"]["skipped"]:
            r["error"] = f"the step was skipped: {r['first']['skipped']}"
    failed = [name for name, r in results.items() if "error" in r]
    verdicts = Verdicts(enforce_targets=not args.tiny)
    print_table(results, agreement, args, verdicts)
    if not failed:
        check(results, args, verdicts)
    return verdicts.exit_code(failed)


def compare(two_pass: dict, single: dict, args) -> tuple[bool, str] | None:
    """agreement.step_agreement of the two paths, their gradient files then deleted; None when one failed."""
    if "error" in two_pass or "error" in single:
        return None
    exact = args.device == "cpu" and args.dtype == "float32"
    agreement = step_agreement(single, two_pass, TOLERANCE["exact" if exact else "bf16"])
    for r in (two_pass, single):
        Path(r["gradients"]).unlink()
    return agreement


def print_table(results: dict, agreement: dict, args, verdicts: Verdicts) -> None:
    memory = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    reference = {path: results[variant_name(args.micro_batches[0], path)] for path in PATHS}
    print(f"\n| micro-batches | kept / response tokens | two-pass peak ({memory}) | ÷ its peak at "
          f"{args.micro_batches[0]} | single-forward peak | ÷ its peak at {args.micro_batches[0]} | two-pass step "
          f"| single-forward step | two-pass ÷ single-forward time{', CPU (wall)' if args.device == 'cpu' else ''} "
          f"| paths agree? |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.micro_batches:
        two_pass, single = (results[variant_name(n, path)] for path in PATHS)
        if "error" in two_pass or "error" in single:
            why = two_pass.get("error") or single.get("error")
            print(f"| {n} | failed: {why} | – | – | – | – | – | – | – | – |")
            continue

        def growth(r, path):
            base = reference[path]
            return "–" if "error" in base else f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}"
        first = two_pass["first"]
        ok, line = agreement[n]
        print(f"| {n} | {first['kept_tokens']} / {first['response_tokens']} | {gib(two_pass['peak_bytes'])} "
              f"| {growth(two_pass, 'two-pass')} | {gib(single['peak_bytes'])} | {growth(single, 'single-forward')} "
              f"| {time_cell(two_pass, args.device)} | {time_cell(single, args.device)} "
              f"| {ratio_cell(two_pass, single, args.device)} | {verdicts.agreement(f'{n} micro-batches', ok)}: "
              f"{line} |")


def ratio_cell(two_pass: dict, single: dict, device: str) -> str:
    ratio = f"{step_time(two_pass, device) / step_time(single, device):.3f}"
    return ratio + (f" ({two_pass['seconds'] / single['seconds']:.3f})" if device == "cpu" else "")


def check(results: dict, args, verdicts: Verdicts) -> None:
    fewest, most = args.micro_batches[0], args.micro_batches[-1]
    two_pass, single = results[variant_name(most, "two-pass")], results[variant_name(most, "single-forward")]
    growth = two_pass["peak_bytes"] / max(results[variant_name(fewest, "two-pass")]["peak_bytes"], 1)
    contrast = single["peak_bytes"] / max(results[variant_name(fewest, "single-forward")]["peak_bytes"], 1)
    print(f"\ntarget: two-pass peak at {most} / at {fewest} micro-batch(es) = "
          f"{verdicts.target(f'two-pass peak at {most} micro-batches', growth, PEAK_TARGET)} "
          f"(single-forward, for contrast: {contrast:.3f})")
    time_ratio = step_time(two_pass, args.device) / step_time(single, args.device)
    which = "CPU time" if args.device == "cpu" else "time"
    print(f"target: two-pass / single-forward step {which} at {most} micro-batches = "
          f"{verdicts.target(f'two-pass time at {most} micro-batches', time_ratio, TIME_TARGET)}")


def parse(argv: list[str] | None = None) -> MicroBatchFlags:
    args, parser = parse_bench_flags(MicroBatchFlags, argv, SIZES, __doc__.split("\n\n")[0])
    if min(args.micro_batches) < 1:
        parser.error("every --micro-batches count must be at least 1")
    args.micro_batches = sorted(set(args.micro_batches))
    return args


if __name__ == "__main__":
    sys.exit(main())
