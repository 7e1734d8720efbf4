"""On-policy distillation with TIP token selection (paper §7; Eqs. 1, 7, 9), one process or many via torchrun.

    python train.py --rule type_aware                                 # the built-in toy pair, on a CPU
    torchrun --nproc_per_node=8 train.py --rule type_aware --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-4B \
        --prompts BytedTsinghua-SIA/DAPO-Math-17k

One optimizer step (DESIGN.md, "Data flow of one optimizer step"):
  1. each rank samples n rollouts for its share of the step's prompts from the current student;
  2. per micro-batch: teacher final hidden states (no grad), student final hidden states (with grad), and
     per-token h, δ, δ_fwd from them in chunks (score.py) — the student runs forward once;
  3. the kept mask over the global batch (select.py: the per-token scalars of all ranks are gathered);
  4. KL(P_S ‖ P_T) at the kept rows only (chunked, gradient per chunk), summed and divided by the number of
     kept tokens of the whole step on all ranks — Eq. 9's mean over T — then backward;
  5. gradients summed over ranks, clipped, AdamW, cosine schedule; one JSON line in metrics.jsonl.

Selection needs every micro-batch's forward before any backward, which DDP's reducer (one backward per
forward, in order) cannot express; so data parallelism here is explicit: identical initial weights on every
rank and one all-reduce of the gradients per step. `--fsdp` shards each decoder layer with FSDP2 (their
forward is the wrapper's); embeddings, final norm and LM head stay whole on every rank, so the chunked loss
sees the full head weight and a tied embedding/head pair stays one tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate
import score
import tip
from rollout import generate_rollouts


def cosine_lr(step: int, config: tip.Config) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine decay to min_lr_ratio × lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sums a few scalars over ranks (counts and totals for logging and the Eq. 9 denominator)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if tip.is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def trimmed(batch, rows: slice):
    """A micro-batch of rollouts without the columns that are padding in all of its rows."""
    attention = batch.attention_mask[rows]
    used = attention.any(0).nonzero()
    columns = slice(int(used[0]), int(used[-1]) + 1) if used.numel() else slice(0, 0)
    return batch.input_ids[rows, columns], attention[:, columns], batch.response_mask[rows, columns]


def accumulate_gradients(student, teacher, batch, config: tip.Config, generator: torch.Generator | None):
    """Steps 2–4 above for this rank's rollouts: forward, score, select, backward. Returns metrics."""
    sel = tip.load_select()
    student_head, teacher_head = tip.lm_head_weight(student), tip.lm_head_weight(teacher)
    response_mask = batch.response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("a rollout's first position is a response token: every row needs a prompt token first")
    micro_batches, stats_parts = [], []
    for start in range(0, response_mask.shape[0], config.micro_batch_size):
        rows = slice(start, start + config.micro_batch_size)
        input_ids, attention_mask, mask = trimmed(batch, rows)
        targets = mask[:, 1:].bool()  # the hidden state at p predicts the token at p + 1
        with torch.no_grad():
            teacher_rows = tip.final_hidden_states(teacher, input_ids, attention_mask)[:, :-1][targets]
        with autocast(student_head.device):  # also puts the scoring matmuls on bf16 tensor cores
            student_rows = tip.final_hidden_states(student, input_ids, attention_mask)[:, :-1][targets]
            stats_parts.append(score.chunked_token_stats(student_rows.detach(), student_head, teacher_rows,
                                                         teacher_head, config.chunk_size))
        micro_batches.append((rows, student_rows, teacher_rows))

    # Per-token scalars back in [B, L] layout; rows are in the same row-major order as response_mask.
    stats = score.TokenStats(*(response_mask.new_zeros(response_mask.shape, dtype=torch.float32)
                               .masked_scatter(response_mask, torch.cat(column).to(response_mask.device))
                               for column in zip(*stats_parts)))
    kept_mask = sel.select_tokens(config.rule, stats, response_mask, config.ratio or None, generator)
    quadrant = sel.quadrants(stats.entropy, stats.reverse_kl, response_mask)

    local = [response_mask.sum().item(), kept_mask.sum().item(),
             stats.entropy[response_mask].sum().item(), stats.reverse_kl[response_mask].sum().item()]
    local += [(quadrant == q).sum().item() for q in range(1, 5)]
    local += [(quadrant[kept_mask] == q).sum().item() for q in range(1, 5)]
    totals = all_reduce_sum(local, student_head.device)
    response_tokens, kept_tokens = totals[0], totals[1]

    loss_sum = 0.0
    for rows, student_rows, teacher_rows in micro_batches:
        kept_rows = kept_mask[rows][response_mask[rows]]  # this micro-batch's kept tokens, in row order
        with autocast(student_head.device):
            loss = score.distillation_loss(student_rows[kept_rows], student_head, teacher_rows[kept_rows],
                                           teacher_head, config.chunk_size, "sum", config.divergence, config.jsd_beta)
        loss_sum += loss.item()
        if kept_tokens > 0:
            (loss / kept_tokens).backward()  # Eq. 9: the mean over the kept tokens of the whole step
    loss_sum = all_reduce_sum([loss_sum], student_head.device)[0]
    metrics = dict(loss=loss_sum / max(kept_tokens, 1), response_tokens=int(response_tokens),
                   kept_tokens=int(kept_tokens), kept_fraction=kept_tokens / max(response_tokens, 1),
                   mean_entropy=totals[2] / max(response_tokens, 1), mean_reverse_kl=totals[3] / max(response_tokens, 1))
    for q in range(1, 5):
        metrics[f"q{q}_share"] = totals[3 + q] / max(response_tokens, 1)
        metrics[f"q{q}_share_kept"] = totals[7 + q] / max(kept_tokens, 1)
    return metrics


def autocast(device: torch.device):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync_and_clip_gradients(student, max_norm: float) -> float:
    """Sum the gradients of every replicated parameter over ranks (FSDP2 reduce-scatters its own shards),
    then clip by the global norm. Returns the norm before clipping (inf/nan when not finite)."""
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    replicated = [p.grad for p in params if not hasattr(p, "to_local")]
    sharded = [p.grad.to_local() for p in params if hasattr(p, "to_local")]
    if tip.is_distributed():
        for work in [dist.all_reduce(g, async_op=True) for g in replicated]:
            work.wait()
    squares = torch.stack([g.float().pow(2).sum() for g in replicated] or [torch.zeros(())])
    sharded_square = torch.stack([g.float().pow(2).sum() for g in sharded] or [torch.zeros(())]).sum()
    if sharded and tip.is_distributed():
        dist.all_reduce(sharded_square)
    norm = (squares.sum() + sharded_square.to(squares.device)).sqrt().item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def train_step(student, teacher, rollouts, optimizer, config: tip.Config, step: int,
               generator: torch.Generator | None) -> dict:
    """One optimizer step on this rank's rollouts. A step without response tokens, or whose loss or
    gradient is not finite, is skipped (the weights are not touched) and says so in its metrics."""
    lr = cosine_lr(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(student, teacher, rollouts, config, generator)
    grad_norm = sync_and_clip_gradients(student, config.grad_clip)
    skipped = "no response tokens" if metrics["response_tokens"] == 0 else \
        "non-finite loss or gradient" if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)) else ""
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(lr=lr, **metrics, grad_norm=grad_norm, skipped=skipped)


def step_prompts(step: int, num_prompts: int, config: tip.Config) -> list[int]:
    """The prompt indices of `step`, over all ranks: consecutive slices of a seeded permutation drawn anew
    each epoch, so the data position is a function of the step alone (resuming needs nothing else)."""
    per_step = config.prompts_per_step
    steps_per_epoch = max(1, num_prompts // per_step)
    epoch, slot = divmod(step, steps_per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(config.seed + epoch))
    return order[slot * per_step:(slot + 1) * per_step].tolist()


def shard_with_fsdp(model) -> None:
    """FSDP2 on each decoder layer. Each micro-batch's backward reduce-scatters the layers' gradients as a sum
    (divide factor 1), which add up in the shards over micro-batches: like the explicit all-reduce of the
    replicated parameters, since the loss is already divided by the global kept count."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)
        if hasattr(layer, "set_force_sum_reduction_for_comms"):  # plain SUM: gloo has no pre-multiplied sum
            layer.set_force_sum_reduction_for_comms(True)


def full_state(student, optimizer):
    """Whole (unsharded) model and optimizer state dicts on every rank; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if not any(hasattr(p, "to_local") for p in student.parameters()):
        return student.state_dict(), optimizer.state_dict()
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir: Path, step: int, student, tokenizer, optimizer, final: bool = False) -> None:
    """The student (save_pretrained, safetensors) with its tokenizer, and the training state. Collective."""
    model_state, optimizer_state = full_state(student, optimizer)
    if tip.rank() == 0:
        def write(tmp: Path):
            student.save_pretrained(tmp / "model" if not final else tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp / "model" if not final else tmp)
            if not final:
                torch.save(dict(step=step, optimizer=optimizer_state, torch_rng=torch.get_rng_state()),
                           tmp / "state.pt")
        tip.write_atomically(run_dir / ("final" if final else f"checkpoint-{step:06d}"), write, folder=True)
    if tip.is_distributed():
        dist.barrier()


def newest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def resume_from(checkpoint: Path, student, optimizer) -> int:
    """Load weights and optimizer state from a checkpoint; returns the number of steps already done."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    weights = {}
    for file in sorted((checkpoint / "model").glob("*.safetensors")):
        weights.update(load_file(file))
    if student.config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    if any(hasattr(p, "to_local") for p in student.parameters()):
        set_state_dict(student, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        student.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def held_out_problems(config: tip.Config, tokenizer) -> list[dict]:
    """A built-in world's held-out split for the in-training evaluation; other prompt sets use evaluate.py."""
    if config.prompts not in evaluate.WORLDS or not config.eval_problems:
        return []
    return [{"prompt": tip.format_prompt(tokenizer, p["problem"]), "answer": p["answer"]}
            for p in evaluate.world_problems(config.prompts, "test", config.world_dir)[:config.eval_problems]]


def held_out_accuracy(student, tokenizer, problems: list[dict], config: tip.Config, seed: int) -> float:
    """evaluate.py's mean@k on the held-out problems at the rollout temperature; ranks share the problems."""
    mine = problems[tip.rank()::tip.world_size()]
    correct = 0.0
    if mine:
        generate = evaluate.model_generator(student, tokenizer, config.max_response_len, config.temperature,
                                            config.top_p, seed, batch_size=None)
        summary, _ = evaluate.run_benchmark(mine, [p["prompt"] for p in mine], generate, config.eval_samples,
                                            config.micro_batch_size * config.eval_samples, show_progress=False)
        correct = summary["accuracy"] * len(mine)
    return all_reduce_sum([correct], next(student.parameters()).device)[0] / max(1, len(problems))


def parse_config(argv: list[str] | None = None) -> tip.Config:
    """The config from the command line, every check that needs no model done before anything loads."""
    sel = tip.load_select()
    rules = ", ".join(f"{name} (ρ={rule.default_ratio})" for name, rule in sel.RULES.items())
    parser = tip.build_parser(__doc__.split("\n\n")[0] + f"\nRules and their default kept ratio: {rules}.")
    config = tip.config_from_args(parser.parse_args(argv))
    if config.rule not in sel.RULES:
        parser.error(f"unknown --rule {config.rule!r}; valid rules: {', '.join(sel.RULES)}")
    if config.ratio and not 0 < config.ratio <= 1:
        parser.error(f"--ratio {config.ratio} is outside (0, 1]")
    if not config.prompts:
        parser.error("--prompts is required with --teacher/--student (a hub dataset or a local file)")
    if config.resume and not config.run_name:
        parser.error("--resume needs --run-name: the run folder to continue")
    if config.resume and newest_checkpoint(Path(config.out_dir) / config.run_name) is None:
        parser.error(f"--resume: no complete checkpoint in {Path(config.out_dir) / config.run_name}")
    if config.fsdp and "RANK" not in os.environ:
        parser.error("--fsdp shards over processes: launch with torchrun")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    device = tip.init_distributed()
    master = tip.rank() == 0
    torch.manual_seed(config.seed)  # the same on every rank: initialisation must agree
    run_dir = Path(config.out_dir) / (config.run_name or f"{config.rule}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}")

    teacher, student, tokenizer = evaluate.load_pair(config, device)
    student.float()  # fp32 master weights: a 1e-6 AdamW update vanishes in bf16; compute is bf16 autocast
    prompts = evaluate.load_prompts(config, tokenizer)
    eval_problems = held_out_problems(config, tokenizer)
    if config.gradient_checkpointing:  # transformers ≥ 5.2x renamed it; 5.17 has only the old name
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.fsdp:
        shard_with_fsdp(student)
        shard_with_fsdp(teacher)
    elif tip.is_distributed():
        for p in student.parameters():  # identical start on every rank (explicit data parallelism)
            dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                                  foreach=not config.fsdp)
    start_step = resume_from(newest_checkpoint(run_dir), student, optimizer) if config.resume else 0
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        metrics_path = run_dir / "metrics.jsonl"
        if metrics_path.exists():  # a resumed run rewrites the steps after its checkpoint
            lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= start_step]
            metrics_path.write_text("".join(l + "\n" for l in lines))
        rho = config.ratio or tip.load_select().RULES[config.rule].default_ratio
        print(f"run folder {run_dir}; {len(prompts)} prompts; rule {config.rule} (ρ = {rho}); "
              f"{tip.world_size()} process(es)")

    stop = []  # SIGTERM / Ctrl-C: finish the step, save a checkpoint, exit cleanly
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if eval_problems and start_step == 0:
            before = held_out_accuracy(student, tokenizer, eval_problems, config, seed=config.seed + 10**6)
            tip.log(f"held-out accuracy before training: {before:.1%} ({len(eval_problems)} problems)")
        for step in tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not master):
            record = run_step(step, student, teacher, tokenizer, optimizer, prompts, eval_problems, config, device)
            if master:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if record["skipped"]:
                    tqdm.write(f"step {step + 1} skipped: {record['skipped']}")
            stop_now = all_reduce_sum([float(bool(stop))], device)[0] > 0  # every rank stops at the same step
            if stop_now or (config.save_every and (step + 1) % config.save_every == 0):
                save_checkpoint(run_dir, step + 1, student, tokenizer, optimizer)
            if stop_now:
                tip.log(f"stopped after step {step + 1}; continue with --resume --run-name {run_dir.name}")
                return
        save_checkpoint(run_dir, config.steps, student, tokenizer, optimizer)
        save_checkpoint(run_dir, config.steps, student, tokenizer, optimizer, final=True)
        if eval_problems:
            after = held_out_accuracy(student, tokenizer, eval_problems, config, seed=config.seed + 10**6)
            tip.log(f"held-out accuracy after training: {after:.1%} ({len(eval_problems)} problems)")
        tip.log(f"saved the student to {run_dir / 'final'}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tip.is_distributed():
            dist.destroy_process_group()


def run_step(step, student, teacher, tokenizer, optimizer, prompts, eval_problems, config, device) -> dict:
    """Rollouts for this rank's share of the step's prompts, then `train_step`; the metrics line."""
    t0 = time.time()
    batch_ids = step_prompts(step, len(prompts), config)
    share = len(batch_ids) / tip.world_size()  # contiguous, possibly uneven, shares per rank
    mine = [prompts[i] for i in batch_ids[round(tip.rank() * share):round((tip.rank() + 1) * share)]]
    seed = config.seed * 1_000_003 + step * tip.world_size() + tip.rank()  # ranks sample differently
    rollouts = generate_rollouts(student, tokenizer, [p["prompt"] for p in mine], config.rollouts_per_prompt,
                                 config.max_response_len, config.temperature, config.top_p, seed=seed)
    metrics = train_step(student, teacher, rollouts, optimizer, config, step, torch.Generator().manual_seed(seed))
    scored = [is_correct_or_none(text, mine[int(i)]["answer"]) for text, i in zip(rollouts.texts, rollouts.prompt_index)]
    scored = [r for r in scored if r is not None]
    reward_sum, reward_count = all_reduce_sum([sum(scored), len(scored)], device)
    elapsed = time.time() - t0
    record = dict(step=step + 1, **metrics, reward=reward_sum / reward_count if reward_count else None,
                  tokens_per_second=metrics["response_tokens"] / elapsed, seconds=elapsed,
                  peak_memory_gb=peak_memory_gb(device))
    if eval_problems and config.eval_every and (step + 1) % config.eval_every == 0:
        record["held_out_accuracy"] = held_out_accuracy(student, tokenizer, eval_problems, config,
                                                        seed=config.seed + 10**6)
    return record


def is_correct_or_none(text: str, answer: str | None) -> float | None:
    return None if answer is None else float(evaluate.is_correct(text, answer))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


if __name__ == "__main__":
    main()
