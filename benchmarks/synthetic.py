"""A random Qwen3 teacher and student, synthetic rollouts in rollout.py's layout, and what a child of bench_step,
bench_micro_batches or bench_uneven builds and times from them (step_setup, warm_up_batch, measured)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from readings import measure

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, whichever folder the benchmark runs from
    sys.path.insert(0, str(ROOT))
import tip  # noqa: E402

PROMPT_WIDTH = 32  # prompt columns of the synthetic rollouts; prompts of 8–32 tokens are left-padded to it
HEAD_DIM = 64


def teacher_hidden_size(hidden: int) -> int:
    """The teacher is 1.5× wider than the student (e.g. 256 → 384, 2048 → 3072), in whole heads."""
    return max(HEAD_DIM, round(1.5 * hidden / HEAD_DIM) * HEAD_DIM)


def random_qwen3(hidden: int, layers: int, vocab: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device, seed: int):
    """A random Qwen3 causal LM with an untied head; at Qwen3's vocabulary the cost sits in V × d."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(1, hidden // HEAD_DIM)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: no second copy on the way to the device
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make_rollouts(rollouts: int, response_len: int, vocab: int, seed: int, device: torch.device):
    """Synthetic rollouts in rollout.py's layout: prompt left-padded to PROMPT_WIDTH, then the response,
    right-padded; the first rollout runs to response_len, the others stop between response_len/4 and it."""
    from rollout import Rollouts

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


STEP_MODULES = ("train", "transformers.models.qwen3.modeling_qwen3")  # step_setup's imports: preload them


def step_setup(args, rollouts: int, **config_fields):
    """What a child of bench_step or bench_micro_batches builds, as train.py's setup does: the teacher (1.5×
    wider, in --dtype, frozen), the student (fp32, set up by train.prepare_student), the tip.Config, AdamW as
    train.py makes it, and a batch of `rollouts` synthetic rollouts. Then a warm-up step at
    learning rate 0 on 2 short rollouts: AdamW's moments exist afterwards, as in every step of a run but the
    first, and the weights are unchanged, so every variant's first timed step starts from the same weights."""
    import train

    device = torch.device(args.device)
    max_positions = PROMPT_WIDTH + args.response_len
    teacher = random_qwen3(teacher_hidden_size(args.hidden), args.layers, args.vocab, max_positions,
                           getattr(torch, args.dtype), device, args.seed + 1).eval().requires_grad_(False)
    student = random_qwen3(args.hidden, args.layers, args.vocab, max_positions, torch.float32, device, args.seed + 2)
    config = tip.Config(chunk_size=args.chunk_size, gradient_checkpointing=args.gradient_checkpointing, grad_clip=1.0,
                        steps=1, **config_fields)
    train.prepare_student(student, config)
    optimizer = train.make_optimizer(student, config)
    return teacher, student, optimizer, config, make_rollouts(rollouts, args.response_len, args.vocab, args.seed,
                                                              device)


def warm_up_batch(args):
    """2 rollouts of at most 8 response tokens, for the warm-up step."""
    return make_rollouts(2, 8, args.vocab, args.seed + 3, torch.device(args.device))


def measured(step, device: torch.device, optimizer=None, model=None, gradients: Path | None = None):
    """The step function run_variants calls: each call is `measure(step, device)`; with `gradients`, the first
    call also saves there the gradients the optimizer steps with (after clipping). A pre-step hook keeps
    references only, so the step allocates nothing more; the file is written after the measurement."""
    calls = []

    def call() -> dict:
        kept = {}
        record = gradients is not None and not calls
        if record:
            handle = optimizer.register_step_pre_hook(
                lambda *_: kept.update((name, p.grad) for name, p in model.named_parameters() if p.grad is not None))
        try:
            result = measure(step, device)
        finally:
            if record:
                handle.remove()
        if record:
            torch.save(kept, gradients)
        calls.append(result)
        return result
    return call
