"""Peak memory and wall time of one whole OPD step, TIP at kept ratio ρ vs a naive full-logit step (paper §7,
Table 3; Eqs. 1 and 9).

TIP trains on KL(P_S ‖ P_T) at the kept tokens only (Eq. 9). In the paper's base repository the memory saving
of selection comes from fewer full-vocabulary rows: it keeps each chunk's fp32 log-softmax in the autograd
graph and caches the teacher's full logits, so its peak GPU memory grows with the kept tokens (PAPER.md §7,
Table 3: Qwen3 8B→4B needs 72.0 GB with every token and 35.3 GB with 10 % of them, 2.04×). train.py never
holds a [tokens, vocabulary] tensor: teacher and student give final hidden states, per-token h, δ, δ_fwd are
scored `chunk_size` rows at a time (score.py), selection runs over the global batch (select.py), and the loss
computes each chunk's gradient in its forward. Its peak is then set by one chunk × V, whatever ρ is.

This script times exactly what train.py does for one optimizer step, `train.train_step` (teacher and student
forward, chunked scoring, the type_aware selection at ρ, the chunked loss at the kept rows, backward, clip,
AdamW), at ρ ∈ {1.0, 0.5, 0.1}, and a naive step on the same models and batch: full student logits
`student(input_ids, attention_mask, position_ids).logits` and teacher logits in fp32 at every position (as
`.logits` gives them), log-softmax, the reverse KL averaged over response tokens (no selection), backward,
clip, AdamW. The models are tiny Qwen3 stacks
(student --hidden, teacher 1.5× wider, --layers each) with Qwen3's vocabulary V = 151,936, so that, as in real
models, the vocabulary dominates. The batch is synthetic rollouts laid out as rollout.py returns them:
prompts of 8–32 tokens left-padded to 32 columns, responses of --response-len/4 to --response-len tokens
right-padded (the first rollout at full length), so nothing depends on sampling. The default batch is
16 rollouts × ≤256 tokens on GPU and 8 × ≤128 on CPU: the naive step holds about 8 fp32 [B, L, V] tensors at
its peak, about 21 GiB of RAM at 16 × 256. The student is fp32 (master
weights) with train.py's bf16 autocast on GPU; the teacher is in --dtype.

How memory is measured. Each variant runs in its own fresh subprocess, so peaks never mix. The child builds
the models, the batch and the AdamW optimizer (as train.py's main does), then takes one warm-up step on a
2-rollout batch of 8 response tokens: that allocates AdamW's moment buffers, which every later step finds in
place, so the state right before each timed step is the same for every variant (weights, teacher, optimizer
state, batch; no gradients, as train_step leaves them). The reported peak is the largest, over the timed steps,
of the memory above that state:
  GPU  torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus
       torch.cuda.memory_allocated before the step (caching-allocator bytes in live tensors);
  CPU  resource.getrusage(RUSAGE_SELF).ru_maxrss after the step minus the resident set size (/proc/self/statm)
       before it. ru_maxrss is the process's high-water mark, so before each step the child resets it to the
       current RSS by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0). Where that is refused, the high-water
       mark covers everything since the child started; the small warm-up keeps that below a timed step's
       peak, so the first timed step still gives the number. RSS counts pages the allocator has not returned
       to the system: blocks above glibc's mmap threshold (at most 32 MB; one fp32 [512, V] chunk is 311 MB)
       go back at once, so the residue of smaller freed blocks can only make a delta slightly smaller.
Time is the median wall time of --repeats steps (CUDA synchronised). The variants run one after another; on a
shared CPU the load average, printed before and after, says how far to trust the times.

The ρ = 1.0 step and the naive step compute the same loss (Eq. 9 with every token kept is Eq. 1), so their
losses are compared: a fast wrong path cannot pass (exit code 1 if they disagree or a variant fails).
Targets, printed beside the ratios: peak at ρ = 1.0 ≤ 1.15× peak at ρ = 0.1, and every TIP variant below naive.

    python benchmarks/bench_step.py                   # CPU, fp32, 8 rollouts × ≤128 tokens, d=256, 2 layers
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --hidden 2048      # 16 rollouts × ≤256 tokens
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import require_positive, current_rss_bytes, max_rss_bytes, reset_max_rss, gib, machine_line

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import tip  # noqa: E402  (after the path fix, so the script runs from any folder)
import train  # noqa: E402
from rollout import Rollouts  # noqa: E402

RATIOS = (1.0, 0.5, 0.1)
VARIANTS = tuple(f"rho={r}" for r in RATIOS) + ("naive",)
RULE = "type_aware"  # the paper's Soft-OR rule (Eq. 7)
PROMPT_WIDTH = 32  # prompt columns; prompts of 8–32 tokens are left-padded to it
HEAD_DIM = 64
PEAK_TARGET, PAPER_BASE_RATIO = 1.15, 2.04
# relative |Δ loss| accepted between ρ = 1.0 and naive: in fp32 they differ in summation order only; with bf16
# (autocast on GPU, a bf16 teacher) the naive path's logits are rounded to bf16 and train.py's are not
LOSS_TOLERANCE = {"exact": 1e-4, "bf16": 3e-2}
# the default batch (rollouts, longest response): smaller on CPU, where the naive step would need ≈ 21 GiB of RAM
# at 16 × 256 (measured: ≈ 8 fp32 [B, L, V] tensors alive at its peak)
DEFAULT_BATCH = {"cuda": (16, 256), "cpu": (8, 128)}


# ---------------------------------------------------------------- what a child builds

def teacher_hidden_size(hidden: int) -> int:
    """The teacher is 1.5× wider than the student (e.g. 256 → 384, 2048 → 3072), in whole heads."""
    return max(HEAD_DIM, round(1.5 * hidden / HEAD_DIM) * HEAD_DIM)


def tiny_qwen3(hidden: int, layers: int, vocab: int, max_positions: int, dtype: torch.dtype,
               device: torch.device, seed: int):
    """A random Qwen3 causal LM: few small layers, full vocabulary, untied head (the cost sits in V × d)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(1, hidden // HEAD_DIM)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: no second copy on the way to the device
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make_rollouts(rollouts: int, response_len: int, vocab: int, seed: int, device: torch.device) -> Rollouts:
    """Synthetic rollouts in rollout.py's layout: prompt left-padded to PROMPT_WIDTH, then the response,
    right-padded; the first rollout runs to response_len, the others stop earlier (varied lengths)."""
    g = torch.Generator().manual_seed(seed)
    length = PROMPT_WIDTH + response_len
    prompt_lengths = torch.randint(PROMPT_WIDTH // 4, PROMPT_WIDTH + 1, (rollouts,), generator=g)
    response_lengths = torch.randint(max(1, response_len // 4), response_len + 1, (rollouts,), generator=g)
    response_lengths[0] = response_len
    input_ids = torch.zeros(rollouts, length, dtype=torch.long)  # token 0 is the pad
    attention_mask = torch.zeros(rollouts, length, dtype=torch.long)
    response_mask = torch.zeros(rollouts, length, dtype=torch.bool)
    for b in range(rollouts):
        p, r = int(prompt_lengths[b]), int(response_lengths[b])
        input_ids[b, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = torch.randint(1, vocab, (p + r,), generator=g)
        attention_mask[b, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = 1
        response_mask[b, PROMPT_WIDTH:PROMPT_WIDTH + r] = True
    return Rollouts(input_ids.to(device), attention_mask.to(device), response_mask.to(device), prompt_lengths,
                    torch.arange(rollouts), [""] * rollouts)


def naive_step(student, teacher, batch: Rollouts, optimizer, config: tip.Config) -> dict:
    """Eq. 1 the obvious way: [B, L, V] logits from both models, fp32 log-softmax, the reverse KL per position,
    its mean over response tokens, autograd backward through all of it, clip, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    device = batch.input_ids.device
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                  use_cache=False)
    targets = batch.response_mask[:, 1:]  # the logits at p predict the token at p + 1
    with train.autocast(device):
        student_logits = student(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    log_p_s = student_logits[:, :-1].float().log_softmax(-1)
    log_p_t = teacher_logits[:, :-1].float().log_softmax(-1)
    reverse_kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    loss = reverse_kl[targets].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(targets.sum())
    return dict(loss=loss.item(), response_tokens=tokens, kept_tokens=tokens, skipped="")


def run_variant(args) -> None:
    """Child process: models, batch, optimizer, one small warm-up step, then --repeats measured steps.
    Writes peaks, times and the step's metrics to args.result as JSON."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    max_positions = PROMPT_WIDTH + args.response_len
    teacher = tiny_qwen3(teacher_hidden_size(args.hidden), args.layers, args.vocab, max_positions,
                         getattr(torch, args.dtype), device, args.seed + 1).eval().requires_grad_(False)
    student = tiny_qwen3(args.hidden, args.layers, args.vocab, max_positions, torch.float32, device, args.seed + 2)
    student.train()
    if args.gradient_checkpointing:  # as train.py's main; transformers ≥ 5.2x renamed the method
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ratio = None if args.worker == "naive" else float(args.worker.split("=")[1])
    config = tip.Config(rule=RULE, ratio=ratio or 0.0, micro_batch_size=args.rollouts, chunk_size=args.chunk_size,
                        gradient_checkpointing=args.gradient_checkpointing, grad_clip=1.0, steps=1)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                                  foreach=True)  # as train.py without --fsdp
    batch = make_rollouts(args.rollouts, args.response_len, args.vocab, args.seed, device)
    warm_up_batch = make_rollouts(2, 8, args.vocab, args.seed + 3, device)

    def step(rollouts: Rollouts) -> dict:
        if args.worker == "naive":
            return naive_step(student, teacher, rollouts, optimizer, config)
        return train.train_step(student, teacher, rollouts, optimizer, config, 0,
                                torch.Generator().manual_seed(args.seed))

    step(warm_up_batch)  # AdamW's moments now exist, as in every step of a run but the first
    peaks, befores, times, metrics, exact = [], [], [], None, True
    for _ in range(args.repeats):
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = current_rss_bytes()
            exact &= reset_max_rss()
        start = time.perf_counter()
        result = step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        peaks.append((torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - before)
        befores.append(before)
        metrics = metrics or result  # the first measured step's loss: the same weights in every variant
    Path(args.result).write_text(json.dumps(dict(peak_bytes=max(peaks), peaks=peaks, before_bytes=befores[0],
                                                 times=times, exact=exact, loss=metrics["loss"],
                                                 response_tokens=metrics["response_tokens"],
                                                 kept_tokens=metrics["kept_tokens"], skipped=metrics["skipped"])))


# ---------------------------------------------------------------- the parent: spawn, compare, print

def measure(variant: str, args, folder: Path) -> dict:
    """One variant in a fresh process; its result, or {"error": last line of its stderr}."""
    result = folder / f"{variant}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result", str(result)]
    for flag in ("device", "dtype", "hidden", "layers", "vocab", "rollouts", "response_len", "chunk_size",
                 "repeats", "seed"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    command.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0 or not result.exists():
        lines = (done.stderr + done.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit code {done.returncode}"
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of memory?)"
        return {"error": why[-160:]}
    return json.loads(result.read_text())


def main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible (drop the flag to run on CPU)")
    print(f"# bench_step: one train.train_step ({RULE}) vs a naive full-logit step; {args.rollouts} rollouts × "
          f"≤{args.response_len} response tokens, V={args.vocab}, student d={args.hidden} / teacher "
          f"d={teacher_hidden_size(args.hidden)}, {args.layers} layers, chunk {args.chunk_size}, teacher "
          f"{args.dtype}, student fp32{' + bf16 autocast' if args.device == 'cuda' else ''} on {args.device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"median of {args.repeats} steps after 1 small warm-up")
    print(f"# before: {machine_line(args)}")
    with tempfile.TemporaryDirectory() as folder:
        results = {v: measure(v, args, Path(folder)) for v in VARIANTS}
    print(f"# after:  {machine_line(args)}")
    if args.device == "cpu":
        exact = all(r.get("exact", True) for r in results.values())
        print("# CPU peak: ru_maxrss " + ("reset before each step via /proc/self/clear_refs" if exact else
                                           "NOT resettable here: high-water mark since the child started"))
    print()

    memory = "max RSS" if args.device == "cpu" else "max_memory_allocated"
    reference, naive = results["rho=0.1"], results["naive"]
    print(f"| variant | kept / response tokens | state before the step | peak above it ({memory}) "
          f"| peak / peak at ρ=0.1 | peak / naive | step time (median) |")
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        r = results[v]
        name = f"TIP {RULE}, ρ = {v.split('=')[1]}" if v != "naive" else "naive: full logits, no selection"
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | – | – | – | – | – |")
            continue
        kept = f"{r['kept_tokens']} / {r['response_tokens']} ({r['kept_tokens'] / max(r['response_tokens'], 1):.0%})"

        def ratio(other):
            return f"{r['peak_bytes'] / other['peak_bytes']:.2f}" if "error" not in other else "–"
        print(f"| {name} | {kept} | {gib(r['before_bytes'])} | {gib(r['peak_bytes'])} | {ratio(reference)} "
              f"| {ratio(naive)} | {statistics.median(r['times']):.2f} s |")
    if any("error" in r for r in results.values()):
        return 1

    peak_ratio = results["rho=1.0"]["peak_bytes"] / reference["peak_bytes"]
    worst = max(results[v]["peak_bytes"] / naive["peak_bytes"] for v in VARIANTS if v != "naive")
    print(f"\ntarget: peak at ρ=1.0 / peak at ρ=0.1 = {peak_ratio:.3f} ≤ {PEAK_TARGET} "
          f"({'met' if peak_ratio <= PEAK_TARGET else 'MISSED'}; the paper's base repository: {PAPER_BASE_RATIO})")
    print(f"target: every TIP peak below naive: largest TIP / naive = {worst:.3f} "
          f"({'met' if worst < 1 else 'MISSED'})")
    # the ρ = 1.0 step keeps every token, so its loss is the naive one; else the comparison means nothing
    full, plain = results["rho=1.0"]["loss"], naive["loss"]
    tolerance = LOSS_TOLERANCE["exact" if args.device == "cpu" and args.dtype == "float32" else "bf16"]
    agree = abs(full - plain) <= tolerance * max(abs(plain), 1e-12)
    print(f"agreement: loss at ρ=1.0 {full:.6g} nats, naive {plain:.6g}, relative |Δ| "
          f"{abs(full - plain) / max(abs(plain), 1e-12):.1e} ({'agree' if agree else 'DISAGREE'}, "
          f"tolerance {tolerance:g})")
    return 0 if agree else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="teacher weights (the student is fp32 master weights, bf16 autocast on GPU)")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size (the teacher's is 1.5×)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of each model")
    parser.add_argument("--vocab", type=int, default=151936, help="V, vocabulary (Qwen3: 151,936)")
    parser.add_argument("--rollouts", type=int, default=None,
                        help="rollouts in the step, one micro-batch (default: 16 on cuda, 8 on cpu)")
    parser.add_argument("--response-len", type=int, default=None,
                        help="longest response, in tokens (default: 256 on cuda, 128 on cpu)")
    parser.add_argument("--chunk-size", type=int, default=512, help="rows per chunk in scoring and the loss")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps after one small warm-up step")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute the student's activations in backward, as train.py does by default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    cli = build_parser().parse_args()
    default_rollouts, default_length = DEFAULT_BATCH[cli.device]
    cli.rollouts = default_rollouts if cli.rollouts is None else cli.rollouts
    cli.response_len = default_length if cli.response_len is None else cli.response_len
    require_positive(cli, ("hidden", "layers", "rollouts", "response_len", "chunk_size", "repeats"))
    if cli.vocab < 2:
        raise SystemExit(f"--vocab must be at least 2, got {cli.vocab}")
    if cli.worker:
        run_variant(cli)
    else:
        sys.exit(main(cli))
