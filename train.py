"""On-policy distillation with TIP token selection (paper §7; Eqs. 1, 7–9), one process or many via torchrun.

    python train.py --rule type_aware                                 # the built-in toy pair, on a CPU
    torchrun --nproc_per_node=8 train.py --rule type_aware --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-4B \
        --prompts BytedTsinghua-SIA/DAPO-Math-17k

One optimizer step, one function each, defined in the order they run: `sample_rollouts` (1), `score_rollouts`
(2: h, δ, δ_fwd per token, no grad), `select_kept` (3: over the global batch), `train_on_kept` (4: Eq. 9 per
micro-batch), `sync_and_clip_gradients` (5); then `train_step`, `run_step`, the loop `train`, and `main`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import evaluate
import grade
import pair
import rollout
import score
import tip
import trackers
import vllm_engine
import worlds
from rollout import Rollouts, generate_conversations, generate_rollouts

MAX_SKIPPED_IN_A_ROW = 10  # then the run saves a checkpoint and stops: something is wrong beyond one batch


def cosine_lr(step: int, config: tip.Config) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine decay to min_lr_ratio × lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def sampling_seed(step: int, config: tip.Config) -> int:
    """The seed of this rank's rollouts and sampled selection at `step`: ranks sample differently."""
    return config.seed * 1_000_003 + step * tip.world_size() + tip.rank()


# --- one optimizer step, in the order it runs ---

def sample_rollouts(step: int, student, tokenizer, prompts: list[dict], config: tip.Config, device,
                    engine: vllm_engine.VLLMEngine | None = None) -> tuple[list[dict], Rollouts]:
    """Step 1: this rank's share of the step's prompts × n rollouts y ~ S_θ(·|x) from the current student (§3),
    sampled in the compute precision or by the vLLM engine, which then sleeps through the step. Returns the
    prompts of the rollouts and the rollouts."""
    mine = [prompts[i] for i in data.rollout_share(step, len(prompts), config)]
    seed = sampling_seed(step, config)
    texts = [p["prompt"] for p in mine]
    if mine[0].get("task") is not None:  # conversations with tools: only the student's own turns are trained
        with tip.autocast(device):
            rollouts = generate_conversations(student, tokenizer, [p["task"] for p in mine], 1,
                                              config.max_response_len, config.max_turns, config.temperature,
                                              config.top_p, seed, data.template_switches(config), engine=engine)
    elif engine is not None:
        rollouts = engine.generate(texts, 1, config.max_response_len, config.temperature, config.top_p, seed=seed)
    else:
        with tip.autocast(device):
            rollouts = generate_rollouts(student, tokenizer, texts, 1, config.max_response_len, config.temperature,
                                         config.top_p, seed=seed)
    if engine is not None:
        engine.sleep()  # its memory is the training step's until the next sync
    return mine, rollouts


def micro_batches(student, batch: Rollouts, config: tip.Config) -> list[list[int]]:
    """The rows of each micro-batch (data.micro_batches: by rows, or packed under --micro-batch-tokens). Under
    FSDP2 every forward and backward is a collective, so a rank with fewer adds empty ones, which run a stand-in
    row with the others and drop it."""
    prompt_lengths = batch.prompt_lengths.tolist()
    response_lengths = [int(real) - p for real, p in zip(batch.attention_mask.sum(1).tolist(), prompt_lengths)]
    groups = data.micro_batches(prompt_lengths, response_lengths, config.micro_batch_size, config.micro_batch_tokens,
                                pair.packs_rows(student, config.padding_free))
    if tip.is_distributed() and tip.is_sharded(student):
        groups += [[] for _ in range(int(tip.all_reduce_max(len(groups), batch.input_ids.device)) - len(groups))]
    return groups


def score_rollouts(student, teacher, batch: Rollouts, groups: list[list[int]], config: tip.Config, keep_graph: bool):
    """Step 2, pass 1, per micro-batch: h, δ, δ_fwd of every response token (Eqs. 2–3, chunked) as [B, L]
    tensors, and the teacher's final hidden states at those tokens (one [N, d] per micro-batch; the loss needs
    them again). No student graph outlives its micro-batch unless `keep_graph` (one micro-batch: pass 2 reuses
    this forward)."""
    device, response_mask = next(student.parameters()).device, batch.response_mask.bool()
    stats = [response_mask.new_zeros(response_mask.shape, dtype=torch.float32) for _ in score.TokenStats._fields]
    teacher_rows, student_rows = [], []
    for rows in groups:
        with torch.no_grad():
            teacher_rows.append(pair.response_hidden_states(teacher, batch, rows, config.padding_free))
        with tip.autocast(device), torch.set_grad_enabled(keep_graph):  # autocast also puts scoring on bf16 cores
            hidden = pair.response_hidden_states(student, batch, rows, config.padding_free)
            # the heads after the forwards: under FSDP2 the roots hold them whole from a forward on
            part = score.chunked_token_stats(hidden.detach(), pair.lm_head_weight(student), teacher_rows[-1],
                                             pair.lm_head_weight(teacher), config.chunk_size)
        for full, values in zip(stats, part):  # back to the rows' places, row-major as the hidden states are
            full[rows] = full[rows].masked_scatter(response_mask[rows], values.to(device))
        student_rows.append(hidden if keep_graph else None)
    return score.TokenStats(*stats), teacher_rows, student_rows


def select_kept(stats: score.TokenStats, response_mask: torch.Tensor, config: tip.Config,
                generator: torch.Generator | None, mistakes: torch.Tensor) -> torch.Tensor:
    """Step 3: the kept mask T of Eq. 9, by `config.rule` over the global batch of every rank (select.py), less a
    built-in world's known-mistake tokens under --exclude-mistakes (the exclusion control)."""
    kept_mask = tip.load_select().select_tokens(config.rule, stats, response_mask, config.ratio or None, generator)
    return kept_mask & ~mistakes if config.exclude_mistakes else kept_mask


def step_metrics(stats: score.TokenStats, response_mask, kept_mask, mistakes, device, with_mistakes: bool) -> dict:
    """The step's log over all ranks: kept count and fraction, mean h and δ, each quadrant's share of the response
    tokens, of the kept ones and (for a built-in world) of its known-mistake tokens."""
    quadrant = tip.load_select().quadrants(stats.entropy, stats.reverse_kl, response_mask)
    local = [response_mask.sum().item(), kept_mask.sum().item(), stats.entropy[response_mask].sum().item(),
             stats.reverse_kl[response_mask].sum().item(), mistakes.sum().item(), (mistakes & kept_mask).sum().item()]
    local += [(quadrant[where] == q).sum().item() for where in (response_mask, kept_mask, mistakes)
              for q in range(1, 5)]
    response_tokens, kept_tokens, entropy, reverse_kl, mistake_tokens, mistake_kept, *shares = \
        tip.all_reduce_sum(local, device)
    metrics = dict(response_tokens=int(response_tokens), kept_tokens=int(kept_tokens),
                   kept_fraction=kept_tokens / response_tokens, mean_entropy=entropy / response_tokens,
                   mean_reverse_kl=reverse_kl / response_tokens)
    for q in range(1, 5):
        metrics[f"q{q}_share"] = shares[q - 1] / response_tokens
        metrics[f"q{q}_share_kept"] = shares[3 + q] / max(kept_tokens, 1)
    if with_mistakes:
        metrics.update(mistake_tokens=int(mistake_tokens), mistake_kept=int(mistake_kept),
                       **{f"mistake_q{q}_share": shares[7 + q] / max(mistake_tokens, 1) for q in range(1, 5)})
    return metrics


def train_on_kept(student, teacher, batch: Rollouts, groups: list[list[int]], kept_mask, teacher_rows, student_rows,
                  kept_tokens: float, config: tip.Config) -> float:
    """Step 4, pass 2, per micro-batch: the student forward with grad (checkpointed when asked), KL at the kept
    rows only (chunked, gradient per chunk), divided by the kept count of the whole step on all ranks (Eq. 9;
    docs/decisions.md, "Loss normalization"), backward; its activations are freed before the next micro-batch.
    Returns this rank's summed loss."""
    device, response_mask = next(student.parameters()).device, batch.response_mask.bool()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, rows in enumerate(groups):
        kept_rows = kept_mask[rows][response_mask[rows]]  # this micro-batch's kept tokens, in row order
        with tip.autocast(device):
            hidden = student_rows[i]
            if hidden is None:
                hidden = pair.response_hidden_states(student, batch, rows, config.padding_free)
            # the student's head read after its forward: under FSDP2 it is whole (and takes its gradient) only then
            loss = score.distillation_loss(hidden[kept_rows], pair.lm_head_weight(student), teacher_rows[i][kept_rows],
                                           pair.lm_head_weight(teacher), config.chunk_size, "sum", config.divergence,
                                           config.jsd_beta)
        loss_sum += loss.detach()
        if kept_tokens > 0:
            (loss / kept_tokens).backward()
        teacher_rows[i] = student_rows[i] = None  # free this micro-batch before the next
        del hidden, loss
    return loss_sum.item()  # one device sync per step, not one per micro-batch


def accumulate_gradients(student, teacher, batch: Rollouts, config: tip.Config, generator: torch.Generator | None,
                         mistake_mask: torch.Tensor | None = None) -> dict:
    """Steps 2–4 for this rank's rollouts: score, select over the global batch, train on the kept tokens.
    `mistake_mask` marks a built-in world's known-mistake tokens: counted, and never kept with --exclude-mistakes.
    Returns the step's metrics; `skipped` names why no gradient was made (then every rank skips)."""
    device, response_mask = next(student.parameters()).device, batch.response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("a rollout's first position is a response token: every row needs a prompt token first")
    groups = micro_batches(student, batch, config)
    stats, teacher_rows, student_rows = score_rollouts(student, teacher, batch, groups, config,
                                                       keep_graph=config.single_forward or len(groups) == 1)
    non_finite = sum(int((~torch.isfinite(value[response_mask])).sum()) for value in stats)
    response_tokens, non_finite = tip.all_reduce_sum([response_mask.sum().item(), non_finite], device)
    if response_tokens == 0 or non_finite:  # every rank sees the same totals, so every rank skips
        return dict(response_tokens=int(response_tokens), kept_tokens=0, loss=None,
                    skipped=f"{int(non_finite)} non-finite token scores" if non_finite else "no response tokens")
    mistakes = torch.zeros_like(response_mask) if mistake_mask is None else mistake_mask.bool() & response_mask
    kept_mask = select_kept(stats, response_mask, config, generator, mistakes)
    metrics = step_metrics(stats, response_mask, kept_mask, mistakes, device, mistake_mask is not None)
    loss_sum = train_on_kept(student, teacher, batch, groups, kept_mask, teacher_rows, student_rows,
                             metrics["kept_tokens"], config)
    loss = tip.all_reduce_sum([loss_sum], device)[0] / max(metrics["kept_tokens"], 1)
    return dict(loss=loss, **metrics, skipped="")


def sync_and_clip_gradients(student, max_norm: float) -> float:
    """Step 5: sum the gradients of every replicated parameter over ranks (FSDP2 reduce-scatters its own shards),
    then clip by the global norm. Returns the norm before clipping (inf/nan when not finite)."""
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    replicated = [p.grad for p in params if not tip.is_sharded(p)]
    sharded = [p.grad.to_local() for p in params if tip.is_sharded(p)]
    if tip.is_distributed():
        for work in [dist.all_reduce(g, async_op=True) for g in replicated]:
            work.wait()
    def squares(grads):  # vector_norm reduces in place: no parameter-sized temporary as g.pow(2) would make
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads]
                           or [torch.zeros(())]).sum()
    replicated_square, sharded_square = squares(replicated), squares(sharded)
    if sharded and tip.is_distributed():
        dist.all_reduce(sharded_square)
    norm = (replicated_square + sharded_square.to(replicated_square.device)).sqrt().item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def train_step(student, teacher, rollouts: Rollouts, optimizer, config: tip.Config, step: int,
               generator: torch.Generator | None, mistake_mask: torch.Tensor | None = None) -> dict:
    """One optimizer step on this rank's rollouts. A step without response tokens, or with a non-finite score,
    loss or gradient on any rank, is skipped on every rank (the weights are not touched) and says why."""
    lr = cosine_lr(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(student, teacher, rollouts, config, generator, mistake_mask)
    grad_norm = None
    if not metrics["skipped"]:
        grad_norm = sync_and_clip_gradients(student, config.grad_clip)  # global: a NaN on one rank reaches all
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            metrics["skipped"] = "non-finite loss or gradient"
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tip.reshard(student)  # FSDP2: a skipped step ran forwards without the backward that reshards the root
    tip.reshard(teacher)  # and the teacher never runs one
    return dict(lr=lr, **metrics, grad_norm=grad_norm)


def run_step(step, student, teacher, tokenizer, optimizer, prompts, eval_problems, config, device,
             engine: vllm_engine.VLLMEngine | None = None) -> dict:
    """One logged step: rollouts (step 1), `train_step` (steps 2–5), the engine synced to the new θ, the reward of
    the rollouts, and the held-out accuracy every --eval-every steps."""
    t0 = time.time()
    mine, rollouts = sample_rollouts(step, student, tokenizer, prompts, config, device, engine)
    sampled_seconds = time.time() - t0
    mistakes = worlds.world_mistake_mask(config.prompts, tokenizer, rollouts, [p["prompt"] for p in mine])
    batch, mistakes = rollout.balance_over_ranks(rollouts, mistakes)  # every rank trains about as many tokens
    generator = torch.Generator().manual_seed(sampling_seed(step, config))  # the sampled rules' draws
    metrics = train_step(student, teacher, batch, optimizer, config, step, generator, mistakes)
    if engine is not None:
        engine.sync(student)  # on-policy: the next step samples from the weights this step made (and checks it)
        metrics["engine_logprob_gap"] = engine.last_gap
    scored = [grade.reward(mine[int(i)], text, conversation) for text, i, conversation in
              zip(rollouts.texts, rollouts.prompt_index, rollouts.conversations or [None] * len(rollouts.texts))]
    scored = [r for r in scored if r is not None]
    reward_sum, reward_count = tip.all_reduce_sum([sum(scored), len(scored)], device)
    elapsed = time.time() - t0
    record = dict(step=step + 1, **metrics, reward=reward_sum / reward_count if reward_count else None,
                  tokens_per_second=metrics["response_tokens"] / elapsed, seconds=elapsed,
                  rollout_seconds=sampled_seconds, peak_memory_gb=tip.peak_memory_gb(device))
    if eval_problems and config.eval_every and (step + 1) % config.eval_every == 0:
        record["held_out_accuracy"] = evaluate.held_out_accuracy(student, tokenizer, eval_problems, config,
                                                                 config.seed + 10**6, engine)
    return record


# --- the run: flags, models, the loop ---

def parse_config(argv: list[str] | None = None) -> tip.Config:
    """The config from the command line, every check that needs no model done before anything loads."""
    sel = tip.load_select()
    rules = ", ".join(f"{name} (ρ={rule.default_ratio})" for name, rule in sel.RULES.items())
    parser = tip.build_parser(__doc__.split("\n\n")[0] + f"\nRules and their default kept ratio: {rules}.")
    config = tip.config_from_args(parser.parse_args(argv))
    rollouts, processes = config.prompts_per_step * config.rollouts_per_prompt, int(os.environ.get("WORLD_SIZE", 1))
    if config.rule not in sel.RULES:
        parser.error(f"unknown --rule {config.rule!r}; valid rules: {', '.join(sel.RULES)}")
    if config.ratio and not 0 < config.ratio <= 1:
        parser.error(f"--ratio {config.ratio} is outside (0, 1]")
    if not config.prompts:
        parser.error("--prompts is required with --teacher/--student (a hub dataset or a local file)")
    if processes > rollouts:
        parser.error(f"{processes} processes but only {config.prompts_per_step} prompts x {config.rollouts_per_prompt} "
                     f"rollouts = {rollouts} rollouts per step: every process needs one; raise --prompts-per-step "
                     f"or --rollouts-per-prompt to at least {processes} rollouts, or launch fewer processes")
    if config.resume and not config.run_name:
        parser.error("--resume needs --run-name: the run folder to continue")
    if config.resume and checkpoint.newest_checkpoint(Path(config.out_dir) / config.run_name) is None:
        parser.error(f"--resume: no complete checkpoint in {Path(config.out_dir) / config.run_name}")
    if config.fsdp and "RANK" not in os.environ:
        parser.error("--fsdp shards over processes: launch with torchrun")
    try:
        data.template_switches(config)
        trackers.require(config.report_to)
        if config.engine == "vllm":
            vllm_engine.require_vllm()
    except tip.InputError as error:
        parser.error(str(error))
    return config


def prepare_student(student, config: tip.Config) -> None:
    """fp32 master weights (a 1e-6 AdamW update vanishes in bf16; compute is bf16 autocast), training mode, and
    gradient checkpointing when asked, which transformers applies in training mode only."""
    student.float().train()
    if config.gradient_checkpointing:  # transformers ≥ 5.2x renamed it; 5.17 has only the old name
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def setup(config: tip.Config, device):
    """The pair, the prompts and the optimizer, every rank starting from the same weights (or the checkpoint)."""
    teacher, student, tokenizer = worlds.load_pair(config, device)
    prepare_student(student, config)
    prompts = worlds.load_prompts(config, tokenizer)
    if min(config.prompts_per_step, len(prompts)) * config.rollouts_per_prompt < tip.world_size():
        raise tip.InputError(f"{len(prompts)} prompts x {config.rollouts_per_prompt} rollouts cannot give each of "
                             f"{tip.world_size()} processes a rollout: use more prompts or fewer processes")
    tip.parallelize(student, teacher, config.fsdp, pair.torch_dtype(config.dtype, device))
    return teacher, student, tokenizer, prompts, make_optimizer(student, config)


def make_optimizer(student, config: tip.Config) -> torch.optim.Optimizer:
    """AdamW over the student's (sharded or whole) fp32 weights; fused: no parameter-sized temporary at step()."""
    return torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr, fused=True,
                             betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)


def train(config: tip.Config, device) -> None:
    """Steps `config.steps` times (or from the newest checkpoint), with checkpoints, metrics and evaluation."""
    master = tip.rank() == 0
    run_name = config.run_name or f"{config.rule}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.out_dir) / run_name
    teacher, student, tokenizer, prompts, optimizer = setup(config, device)
    eval_problems = worlds.held_out_problems(config, tokenizer)
    start_step = 0
    if config.resume:
        start_step = checkpoint.resume_from(checkpoint.newest_checkpoint(run_dir), student, optimizer)
    engine = None
    if config.engine == "vllm":  # created from the (resumed) student: its weights are the current θ
        engine = vllm_engine.VLLMEngine(student, tokenizer, config.max_prompt_len + config.max_response_len,
                                        config.gpu_memory_utilization, config.dtype, config.seed + tip.rank(),
                                        config.engine_check_every, config.engine_check_tolerance)
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        checkpoint.forget_metrics_after(run_dir / "metrics.jsonl", start_step)  # a resumed run logs them anew
        rho = config.ratio or tip.load_select().RULES[config.rule].default_ratio
        print(f"run folder {run_dir}; {len(prompts)} prompts; rule {config.rule} (ρ = {rho}); "
              f"{tip.world_size()} process(es)")
    opened = trackers.open_trackers(config.report_to, run_dir, dataclasses.asdict(config), start_step) if master else []

    stop, skipped_in_a_row = [], 0  # SIGTERM / Ctrl-C: finish the step, save a checkpoint, exit cleanly
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        def held_out(when: str, step: int) -> None:
            accuracy = evaluate.held_out_accuracy(student, tokenizer, eval_problems, config, config.seed + 10**6,
                                                  engine)
            tip.log(f"held-out accuracy {when} training: {accuracy:.1%} ({len(eval_problems)} problems)")
            if master:  # a line of its own: the accuracy before step 1 and after the last step
                trackers.log_record(run_dir, dict(step=step, held_out_accuracy=accuracy), opened)
        if eval_problems and start_step == 0:
            held_out("before", 0)
        bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not master)
        for step in bar:
            record = run_step(step, student, teacher, tokenizer, optimizer, prompts, eval_problems, config, device,
                              engine)
            skipped_in_a_row = skipped_in_a_row + 1 if record["skipped"] else 0
            if master:  # metrics.jsonl, the trackers and the bar's numbers
                trackers.log_step(run_dir, record, opened, bar)
            stop_now = tip.all_reduce_sum([float(bool(stop))], device)[0] > 0  # every rank stops at the same step
            give_up = skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW  # the same on every rank: skips are agreed
            if stop_now or give_up or (config.save_every and (step + 1) % config.save_every == 0):
                checkpoint.save_checkpoint(run_dir, step + 1, student, tokenizer, optimizer)
            if give_up:
                raise SystemExit(f"error: {skipped_in_a_row} steps in a row were skipped (last: {record['skipped']}); "
                                 f"saved {run_dir / f'checkpoint-{step + 1:06d}'}. Lower --lr, or check the data "
                                 f"and the models' dtype, then continue with --resume --run-name {run_dir.name}"
                                 if master else 1)
            if stop_now:
                tip.log(f"stopped after step {step + 1}; continue with --resume --run-name {run_dir.name}")
                return
        checkpoint.save_checkpoint(run_dir, config.steps, student, tokenizer, optimizer)
        checkpoint.save_checkpoint(run_dir, config.steps, student, tokenizer, optimizer, final=True)
        if eval_problems:
            held_out("after", config.steps)
        tip.log(f"saved the student to {run_dir / 'final'}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for tracker in opened:
            tracker.close()
        if engine is not None:
            engine.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    device = tip.init_distributed()
    torch.manual_seed(config.seed)  # the same on every rank: initialisation must agree
    try:
        train(config, device)
    except (tip.InputError, vllm_engine.OffPolicyError) as error:  # the message alone, once; a non-zero exit
        if tip.rank() != 0:  # torchrun stops every process when one fails: rank 0 gets the time to say why
            time.sleep(10)
        raise SystemExit(f"error: {error}" if tip.rank() == 0 else 1) from None
    finally:
        if tip.is_distributed():  # closing a vLLM engine has ended it already
            dist.destroy_process_group()


if __name__ == "__main__":
    tip.run_main(main)
