"""A mutation check of the test suite: realistic one-line bugs, each applied to a fresh copy of the project, and
whether the tests that guard that code catch it. Not part of the suite (it runs the suite dozens of times).

    python tests/mutate.py                  # every mutant; exit 1 if one survives or no longer applies
    python tests/mutate.py --only eq9 sign  # the mutants whose names contain these words
    python tests/mutate.py --list

Each mutant replaces one exact piece of one file (it must occur exactly once, so a refactor that moves the code
makes the mutant fail loudly instead of testing nothing) and names the tests to run: the file's own tests,
narrowed with -k where the whole file would be slow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tip  # noqa: E402  (the project's flags, after the path fix)


class Mutant(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS = [
    # score.py: Eqs. 1–3 and the chunked loss
    Mutant("entropy sign", "score.py", "entropy = -log_p_s.mul_(p_s).sum(-1)", "entropy = log_p_s.mul_(p_s).sum(-1)",
           ("tests/test_score.py",)),
    Mutant("reverse-KL gradient drops the KL term", "score.py", "log_ratio.addcmul_(p_s, -value[:, None])",
           "log_ratio.addcmul_(p_s, value[:, None])", ("tests/test_score.py",)),
    Mutant("bf16 autocast head gradient sign", "score.py", "grad_head += torch.mm(grad_logits.T, rows, out=chunk_grad_head)",
           "grad_head -= torch.mm(grad_logits.T, rows, out=chunk_grad_head)", ("tests/test_score.py",)),
    Mutant("backward ignores the incoming gradient", "score.py",
           "grad_hidden = None if grad_hidden is None else grad_hidden.mul_(grad_total)",
           "grad_hidden = None if grad_hidden is None else grad_hidden", ("tests/test_score.py",)),
    Mutant("normalized entropy by the wrong width", "score.py", "return entropy / math.log(vocab_size)",
           "return entropy / math.log(vocab_size + 1)", ("tests/test_score.py",)),
    # select.py: §4–6
    Mutant("entropy clip at the 90th percentile", "select.py", "ENTROPY_CLIP_QUANTILE = 0.98",
           "ENTROPY_CLIP_QUANTILE = 0.90", ("tests/test_select.py", "-k", "not commands")),
    Mutant("Soft-OR without the product term", "select.py", "return 1 - (1 - h_hat) * (1 - d_hat)",
           "return h_hat + d_hat", ("tests/test_select.py", "-k", "not commands")),
    Mutant("k rounds up", "select.py", "torch.floor(ratio * length.double() + 1e-9)",
           "torch.ceil(ratio * length.double() - 1e-9)", ("tests/test_select.py", "-k", "not commands")),
    Mutant("quadrants 2 and 3 swapped", "select.py", "(1 + 2 * low_h + low_d) * valid",
           "(1 + low_h + 2 * low_d) * valid", ("tests/test_select.py", "-k", "not commands")),
    Mutant("Q3-only ranks by reverse KL", "select.py", "s.forward_kl * (1 - h_hat)", "s.reverse_kl * (1 - h_hat)",
           ("tests/test_select.py", "-k", "not commands")),
    Mutant("normalization over this rank only", "select.py", "batch = gather_uneven(values[valid])",
           "batch = values[valid]", ("tests/test_select.py", "-k", "ranks")),
    # tip.py: loading and positions
    Mutant("positions count padding", "pair.py", "position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
           "position_ids = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)",
           ("tests/test_tip.py", "tests/test_train.py", "-k", "hidden or plain_formula")),
    Mutant("different tokenizers accepted", "pair.py", "if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():",
           "if False:", ("tests/test_tip.py",)),
    Mutant("chat-template switches dropped", "data.py", "add_generation_prompt=True, **(template_switches or {}))",
           "add_generation_prompt=True)", ("tests/test_tip.py",)),
    # rollout.py: the response mask
    Mutant("EOS left out of the response mask", "rollout.py", "r[:next((t + 1 for t, token in enumerate(r) if",
           "r[:next((t for t, token in enumerate(r) if", ("tests/test_rollout.py",)),
    Mutant("the model's top-k left on", "rollout.py", "top_p=top_p, top_k=0) if temperature > 0",
           "top_p=top_p, top_k=50) if temperature > 0", ("tests/test_rollout.py",)),
    # train.py: the step
    Mutant("Eq. 9 normalized per micro-batch", "train.py", "(loss / kept_tokens).backward()",
           "(loss / max(int(kept_rows.sum()), 1)).backward()", ("tests/test_train.py", "-k", "micro_batches")),
    Mutant("gradients not summed over ranks", "train.py",
           "for work in [dist.all_reduce(g, async_op=True) for g in replicated]:",
           "for work in []:", ("tests/test_train.py", "-k", "ranks_match and ddp")),
    Mutant("FSDP2 halves the sharded gradients", "tip.py", "module.set_gradient_divide_factor(1.0)",
           "module.set_gradient_divide_factor(2.0)", ("tests/test_train.py", "-k", "ranks_match and fsdp")),
    Mutant("the student stays in eval mode", "train.py", "student.float().train()", "student.float()",
           ("tests/test_train.py", "-k", "checkpointing")),
    Mutant("rollouts dropped on uneven shares", "data.py", "share = len(rollouts) / tip.world_size()",
           "share = len(rollouts) // tip.world_size()", ("tests/test_train.py", "-k", "rollout_shares")),
    Mutant("cosine over a quarter period", "train.py", "cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))",
           "cosine = math.cos(0.5 * math.pi * min(1.0, progress))", ("tests/test_train.py", "-k", "cosine")),
    Mutant("a NaN score is not caught before selection", "train.py", "if response_tokens == 0 or non_finite:",
           "if response_tokens == 0:", ("tests/test_train.py", "-k", "non_finite")),
    Mutant("resume does not restore the random state", "checkpoint.py", "torch.set_rng_state(rng[\"torch\"])",
           "torch.get_rng_state()", ("tests/test_train.py", "-k", "resume")),
    Mutant("every rank evaluates every held-out problem", "evaluate.py",
           "mine = problems[tip.rank()::tip.world_size()]",
           "mine = problems", ("tests/test_train.py", "-k", "held_out")),
    Mutant("kept quadrant shares over all tokens", "train.py",
           'metrics[f"q{q}_share_kept"] = shares[3 + q] / max(kept_tokens, 1)',
           'metrics[f"q{q}_share_kept"] = shares[3 + q] / response_tokens',
           ("tests/test_train.py", "-k", "plain_formula or as_trained")),
    Mutant("the exclusion control excludes nothing", "train.py",
           "return kept_mask & ~mistakes if config.exclude_mistakes else kept_mask", "return kept_mask",
           ("tests/test_train.py", "-k", "exclude")),
    # evaluate.py: grading, mean@k, the taxonomy
    Mutant("the first box is graded", "grade.py", "start, depth = opens[-1].end(), 1",
           "start, depth = opens[0].end(), 1", ("tests/test_evaluate.py", "-k", "grader or extract")),
    Mutant("mean@k divides by the problem count", "evaluate.py", "per_problem = [sum(c) / k for c in correct]",
           "per_problem = [sum(c) / len(correct) for c in correct]", ("tests/test_evaluate.py", "-k", "mean")),
    Mutant("grading off the main thread skips the pool", "grade.py",
           "if threading.current_thread() is threading.main_thread():", "if True:",
           ("tests/test_evaluate.py", "-k", "threads or timeout")),
    Mutant("the taxonomy splits at the mean", "taxonomy.py",
           "h_split = float(select.quantile(h.double(), 0.5)) if h_split is None else h_split",
           "h_split = float(h.double().mean()) if h_split is None else h_split", ("tests/test_evaluate.py", "-k", "taxonomy")),
    # worlds/: the built-in worlds
    Mutant("the no-carry rule carries", "worlds/toy.py", "result += (a % 10 + b % 10) % 10 * place",
           "result += (a % 10 + b % 10) * place", ("tests/test_toy.py",)),
    Mutant("the wrong-fact token is the one before the value", "worlds/facts.py", "[owner[m.end()] for m in",
           "[owner[m.end() - 1] for m in", ("tests/test_facts.py",)),
    Mutant("trigger problems need no carry", "worlds/toy.py", '(name != "trigger" or needs_carry(operands, ops))',
           '(name != "trigger" or not needs_carry(operands, ops))', ("tests/test_toy.py",)),
    # conversations with tools (rollout.py), the agent world, DeepPlanning, the study
    Mutant("tool results are trained on", "rollout.py", "sampled[b] += [False] * len(glue)",
           "sampled[b] += [True] * len(glue)", ("tests/test_conversations.py",)),
    Mutant("no turn limit", "rollout.py", "if not calls or turn == max_turns - 1:", "if not calls:",
           ("tests/test_conversations.py",)),
    Mutant("the agent's mistake is the call token, not its argument", "worlds/agent.py",
           "calls = [i + 1 for i, token in", "calls = [i for i, token in", ("tests/test_agent.py",)),
    Mutant("the engine samples every row up to the batch's largest budget", "rollout.py",
           "engine.sample_tokens(contexts, rooms, temperature", "engine.sample_tokens(contexts, [max(rooms)] * "
           "len(contexts), temperature", ("tests/test_conversations.py", "-k", "own_budget")),
    Mutant("the plan is read after the first </think>, not the last", "worlds/deepplanning_checks.py",
           'text = re.split(r"</think>", text, flags=re.I)[-1]',
           'text = re.split(r"</think>", text, maxsplit=1, flags=re.I)[-1]', ("tests/test_deepplanning.py", "-k",
                                                                               "delivered")),
    Mutant("closure weekdays lose Sunday at the wrap", "worlds/deepplanning_checks.py",
           '(weekday - 1 + i) % 7 + 1 in closed', '(weekday + i) % 7 in closed',
           ("tests/test_deepplanning.py", "-k", "calendar")),
    Mutant("a row's tool calls run against another task's tools", "rollout.py", "task = tasks[b // n]",
           "task = tasks[b % n]", ("tests/test_conversations.py", "-k", "own_tasks")),
    Mutant("DeepPlanning trains on 20 % and holds out 80 %", "worlds/deepplanning.py", "cut = len(shuffled) * 4 // 5",
           "cut = len(shuffled) // 5", ("tests/test_deepplanning.py",)),
    Mutant("the study runs a finished run again", "benchmarks/study.py",
           'for seed in range(args.seeds) if f"{s.name}-s{seed}" not in done]', "for seed in range(args.seeds)]",
           ("tests/test_study.py", "-k", "resumes")),
    # bugs that once survived the suite, each caught since by a test of its class
    Mutant("resume from the oldest checkpoint", "checkpoint.py", "return done[-1] if done else None",
           "return done[0] if done else None", ("tests/test_train.py", "-k", "two_resumes")),
    Mutant("every rank resumes rank 0's random state", "checkpoint.py", 'rng = state["rng"][tip.rank()]',
           'rng = state["rng"][0]', ("tests/test_train.py", "-k", "own_random_state")),
    Mutant("ranks sample with the same seed", "train.py", "step * tip.world_size() + tip.rank()",
           "step * tip.world_size()", ("tests/test_train.py", "-k", "sample_differently")),
    Mutant("the skipped-steps counter never restarts", "train.py", 'if record["skipped"] else 0',
           'if record["skipped"] else skipped_in_a_row', ("tests/test_train.py", "-k", "skip_counter")),
    Mutant("SIGTERM stops only the rank that got it", "train.py",
           "stop_now = tip.all_reduce_sum([float(bool(stop))], device)[0] > 0", "stop_now = bool(stop)",
           ("tests/test_train.py", "-k", "sigterm_on_another and ddp")),
    Mutant("one model named keeps the toy preset", "tip.py", 'given.get("teacher") or given.get("student")',
           'given.get("teacher") and given.get("student")', ("tests/test_tip.py", "-k", "preset")),
    Mutant("a conversation turn gets the least room of the batch", "rollout.py",
           "room = max([max_new_tokens - len(tokens[b]) for b in live] or [1])",
           "room = min([max_new_tokens - len(tokens[b]) for b in live] or [1])", ("tests/test_conversations.py",)),
    Mutant("evaluation samples every call with one seed", "evaluate.py",
           "seed=seed + next(calls), batch_size=batch_size)", "seed=seed, batch_size=batch_size)",
           ("tests/test_evaluate.py", "-k", "draws_anew")),
    Mutant("math-verify's gold and prediction swapped", "grade.py", "verify(gold, predicted,",
           "verify(predicted, gold,", ("tests/test_evaluate.py", "-k", "grader_table")),
    Mutant("the taxonomy splits h at the median of raw entropy", "taxonomy.py",
           "select.quantile(h.double(), 0.5)", "select.quantile(entropy.double(), 0.5)",
           ("tests/test_evaluate.py", "-k", "full_logits")),
    Mutant("the study's mistake share of the kept tokens divides by the mistakes", "benchmarks/study.py",
           '"kept_that_are_mistakes": sum(r.get("mistake_kept", 0) for r in rows) / max(1, kept)',
           '"kept_that_are_mistakes": sum(r.get("mistake_kept", 0) for r in rows) / max(1, mistakes)',
           ("tests/test_study.py", "-k", "agent_world")),
    Mutant("a skipped FSDP2 step leaves the student gathered", "train.py",
           "    tip.reshard(student)  # FSDP2: a skipped step", "    pass  # FSDP2: a skipped step",
           ("tests/test_train.py", "-k", "back_in_their_shards")),
    Mutant("the study's std over seeds is the population's", "benchmarks/study.py", "statistics.stdev(values)",
           "statistics.pstdev(values)", ("tests/test_study.py", "-k", "sample_std")),
    Mutant("a resume on fewer processes restores another layout's random state", "checkpoint.py",
           'if len(state["rng"]) == tip.world_size():', 'if len(state["rng"]) >= tip.world_size():',
           ("tests/test_train.py", "-k", "sigterm_on_another and fsdp")),
    Mutant("sums over ranks in float32", "tip.py", "t = torch.tensor(values, dtype=torch.float64",
           "t = torch.tensor(values, dtype=torch.float32", ("tests/test_tip.py", "-k", "float64")),
    Mutant("a conversation is graded on its first assistant turn", "evaluate.py",
           'for m in reversed(c) if m["role"] == "assistant"', 'for m in c if m["role"] == "assistant"',
           ("tests/test_evaluate.py", "-k", "draws_anew")),
    Mutant("the sampled rules replay one seed every step", "train.py",
           "generator = torch.Generator().manual_seed(sampling_seed(step, config))",
           "generator = torch.Generator().manual_seed(config.seed)", ("tests/test_train.py", "-k", "draw_anew")),
    Mutant("each rank acts on its own on-policy gap", "vllm_engine.py",
           "gap = tip.all_reduce_max(float(gaps[worst]), self.device)", "gap = float(gaps[worst])",
           ("tests/test_vllm.py", "-k", "another_rank")),
    Mutant("a caller that waited for the lock builds the world again", "tip.py",
           "            return path  # built by another process while this one waited",
           "            pass  # built by another process while this one waited",
           ("tests/test_tip.py", "-k", "waited_for_the_build")),
    Mutant("FSDP2 layers stay gathered after their forward", "tip.py",
           "fully_shard(layer, mp_policy=precision, reshard_after_forward=True)",
           "fully_shard(layer, mp_policy=precision, reshard_after_forward=False)",
           ("tests/test_train.py", "-k", "back_in_their_shards")),
    Mutant("FSDP2 sampling not in lockstep", "rollout.py", "synced_gpus=synced, **sampling",
           "synced_gpus=False, **sampling", ("tests/test_train.py", "-k", "uneven_ranks")),
    Mutant("FSDP2 conversations stop turning on a finished rank", "rollout.py",
           "float(bool(live)), next(inner.parameters()).device) if synced else live",
           "float(bool(live)), next(inner.parameters()).device) if False else live",
           ("tests/test_train.py", "-k", "uneven_ranks")),
    Mutant("a sharded checkpoint keeps the first process's shards only", "checkpoint.py",
           "dcp.save({\"model\": model_state, \"optimizer\": optimizer_state}, checkpoint_id=tmp / \"sharded\")",
           "dcp.save({\"model\": model_state, \"optimizer\": optimizer_state}, checkpoint_id=tmp / \"sharded\",\n"
           "             no_dist=True) if tip.rank() == 0 else None",
           ("tests/test_train.py", "-k", "fsdp_checkpoint")),
    # blind round 6 survivors, with the tests written for their class
    Mutant("evaluate's default sample counts swapped", "evaluate.py", "args.samples or (4 if args.taxonomy else 16)",
           "args.samples or (16 if args.taxonomy else 4)", ("tests/test_evaluate.py", "-k", "sampling_flag")),
    Mutant("model_generator drops top-p", "evaluate.py",
           "return generate_rollouts(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p,",
           "return generate_rollouts(model, tokenizer, prompts, n, max_new_tokens, temperature,",
           ("tests/test_evaluate.py", "-k", "every_setting")),
    Mutant("the agent reward refuses negative answers", "worlds/agent.py", r'r"\\boxed\{(-?\d+)\}"',
           r'r"\\boxed\{(\d+)\}"', ("tests/test_agent.py", "-k", "every_answer")),
    Mutant("a signal stops the run without its checkpoint", "train.py",
           "if stop_now or give_up or (config.save_every", "if give_up or (config.save_every",
           ("tests/test_train.py", "-k", "two_resumes")),
    Mutant("resume reads one safetensors file", "checkpoint.py",
           'for file in sorted((checkpoint / "model").glob("*.safetensors")):',
           'for file in sorted((checkpoint / "model").glob("model.safetensors")):',
           ("tests/test_train.py", "-k", "several_safetensors")),
    Mutant("the taxonomy samples with temperature and top-p swapped", "taxonomy.py",
           "samples, max_new_tokens, temperature, top_p,", "samples, max_new_tokens, top_p, temperature,",
           ("tests/test_evaluate.py", "-k", "taxonomy_passes")),
    Mutant("a local prompt file read as --prompt-split", "data.py",
           'data_files=str(path), split="train")', "data_files=str(path), split=config.prompt_split)",
           ("tests/test_tip.py", "-k", "one_split")),
    # blind round 7
    Mutant("FSDP2 ranks clip by their own shards' norm", "train.py", "    if sharded and tip.is_distributed():",
           "    if replicated and tip.is_distributed():", ("tests/test_train.py", "-k", "ranks_match and fsdp")),
    Mutant("a held-out stand-in problem is counted", "evaluate.py", 'correct = summary["accuracy"] * len(mine)',
           'correct = summary["accuracy"] * len(work)', ("tests/test_train.py", "-k", "held_out_accuracy_over")),
    Mutant("the memory verdict without its headroom", "benchmarks/estimate_memory.py",
           "HEADROOM * args.gpu_memory_gib * GIB", "args.gpu_memory_gib * GIB",
           ("tests/test_estimate_memory.py", "-k", "90_percent")),
    Mutant("ranks balanced by sampled tokens only", "rollout.py", "[len(ids) for ids, *_ in rows]",
           "[int(sampled.sum()) for _, sampled, *_ in rows]", ("tests/test_train.py", "-k", "rows_move")),
    # the blind round of the trackers and plot.py
    Mutant("trackers log booleans", "trackers.py", "isinstance(value, (int, float)) and not isinstance(value, bool)}",
           "isinstance(value, (int, float))}", ("tests/test_trackers.py", "-k", "numbers_of_the_line")),
    Mutant("the plot's kept and all quadrant curves swapped", "plot.py",
           '[(f"q{q}_share_kept", f"Q{q} kept", "-")', '[(f"q{q}_share", f"Q{q} kept", "-")',
           ("tests/test_trackers.py", "-k", "plot")),
    Mutant("tensorboard assumed installed", "trackers.py", "for name in names if importlib",
           'for name in names if name != "tensorboard" and importlib', ("tests/test_trackers.py", "-k", "refused")),
    Mutant("the bar's kl shows the loss", "trackers.py", 'kl=record.get("mean_reverse_kl")', 'kl=record.get("loss")',
           ("tests/test_trackers.py", "-k", "numbers_of_the_line")),
    Mutant("the held-out accuracy before training logged at step 1", "train.py", 'held_out("before", 0)',
           'held_out("before", 1)', ("tests/test_trackers.py", "-k", "held_out_accuracy_at")),
    Mutant("the trackers are never closed", "train.py", "            tracker.close()\n", "            pass\n",
           ("tests/test_trackers.py", "-k", "held_out_accuracy_at")),
    Mutant("TensorBoard's config written on resume only", "trackers.py", "    if not start_step:\n        writer",
           "    if start_step:\n        writer", ("tests/test_trackers.py", "-k", "tensorboard_scalars")),
    # round B's survivors
    Mutant("a resumed trackio run opens a second run", "trackers.py", 'config=config, resume="allow")',
           "config=config)", ("tests/test_trackers.py", "-k", "trackio")),
    Mutant("the plot numbers the points 1..n", "plot.py", "return [s for s, _ in points], [v for _, v in points]",
           "return list(range(1, len(points) + 1)), [v for _, v in points]", ("tests/test_trackers.py", "-k", "plot")),
    Mutant("every rank opens the trackers", "train.py", "dataclasses.asdict(config), start_step) if master else []",
           "dataclasses.asdict(config), start_step)", ("tests/test_train.py", "-k", "four_ranks and ddp")),
    Mutant("a resumed run evaluates 'before' again", "train.py", "if eval_problems and start_step == 0:",
           "if eval_problems:", ("tests/test_trackers.py", "-k", "held_out_accuracy_at")),
    Mutant("tokens per second over the sampling time", "train.py", 'metrics["response_tokens"] / elapsed',
           'metrics["response_tokens"] / sampled_seconds', ("tests/test_trackers.py", "-k", "tensorboard_scalars")),
    Mutant("WANDB_MODE ignored", "trackers.py", 'mode=os.environ.get("WANDB_MODE", "offline")', 'mode="offline"',
           ("tests/test_trackers.py", "-k", "wandb")),
    # round D's survivors
    Mutant("the reward averaged on each rank alone", "train.py",
           "reward_sum, reward_count = tip.all_reduce_sum([sum(scored), len(scored)], device)",
           "reward_sum, reward_count = sum(scored), len(scored)", ("tests/test_train.py", "-k", "four_ranks and ddp")),
    Mutant("CPU peak memory in the wrong unit", "tip.py", "ru_maxrss / 2**20", "ru_maxrss / 2**30",
           ("tests/test_tip.py", "-k", "peak_memory")),
    Mutant("toy problems unique within each split only", "worlds/toy.py", "        splits[name] = []\n",
           "        splits[name], seen = [], set()\n", ("tests/test_toy.py", "-k", "splits")),
]


def project_copy(folder: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the project, as they are now."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)


def run(mutant: Mutant, timeout: float) -> tuple[str, float]:
    """'caught', 'SURVIVED', or 'NOT APPLIED' (the code moved), and the seconds the tests took."""
    with tempfile.TemporaryDirectory(prefix="tip-mutant-") as folder:
        folder = Path(folder)
        project_copy(folder)
        path = folder / mutant.file
        text = path.read_text()
        if text.count(mutant.old) != 1:
            return "NOT APPLIED", 0.0
        path.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.time()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *mutant.tests], cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            caught = done.returncode != 0
        except subprocess.TimeoutExpired:
            caught = True  # a hang is a failure the suite would show (at its own timeout)
        return ("caught" if caught else "SURVIVED"), time.time() - start


@dataclass
class MutateFlags:
    only: list[str] = tip.arg([], "run the mutants whose names contain all of these words")
    list: bool = tip.arg(False, "list the mutants and exit")
    timeout: float = tip.arg(600.0, "seconds for one mutant's tests")


def main() -> int:
    args = tip.parse_flags(MutateFlags, None, __doc__.split("\n\n")[0])
    chosen = [m for m in MUTANTS if all(word.lower() in m.name.lower() for word in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.file:12} {m.name}")
        return 0
    print("| mutant | file | verdict | seconds |\n|---|---|---|---|", flush=True)
    verdicts = []
    for mutant in chosen:
        verdict, seconds = run(mutant, args.timeout)
        verdicts.append(verdict)
        print(f"| {mutant.name} | {mutant.file} | {verdict} | {seconds:.0f} |", flush=True)
    caught = verdicts.count("caught")
    print(f"\n{caught} of {len(chosen)} mutants caught; files covered: {len({m.file for m in chosen})}")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
