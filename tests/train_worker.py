"""Builders shared by tests/test_train.py, and its torchrun worker.

    python -m torch.distributed.run --nproc_per_node=N tests/train_worker.py OUT_DIR ddp|fsdp|conversations|held_out
    python -m torch.distributed.run --nproc_per_node=N tests/train_worker.py OUT_DIR nan_on_rank_1 TRAIN_ARGS...

nan_on_rank_1: train.main with rank 1's first scores NaN, SIGTERM on rank 2 in step 2, and each rank's rewards
its rank number (rank 3 grades one rollout of its two), so the global mean reward is known.
rng: each rank's random state through save_checkpoint and resume_from; saves its draws after each.
save_sharded / resume_sharded: an FSDP2 checkpoint after one AdamW step, and its resume; saves the whole state.
balance: rollout.balance_over_ranks of uneven rows; saves each rank's rows after.
generate: FSDP2 sampling with ranks of very different lengths, and conversations of different turn counts.
reshard: FSDP2 steps, skipped and trained, in one and two passes, and a scoring pass alone; saves whether every
layer is sharded after each.
ddp / fsdp / conversations: one TIP step on this rank's contiguous share of a fixed batch (conversations: with
tool results inside the responses); saves the weight update and the metrics. held_out (held_out_fsdp, sharded; an optional problem count):
evaluate.held_out_accuracy with a stand-in grader (a problem is right when its answer is "1"),
so the accuracy of the whole set is known; saves it.
"""
import itertools
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, from any folder
import checkpoint
import data
import evaluate
import grade
import rollout
import tip
import train
from conftest import char_tokenizer, tiny_causal_lm
from rollout import Rollouts

_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(char_tokenizer())
    return _TOKENIZER[0]


def make_pair(seed=0):
    teacher = tiny_causal_lm(tokenizer(), 48, seed=seed + 1).eval().requires_grad_(False)
    student = tiny_causal_lm(tokenizer(), 32, seed=seed + 2).train()
    return teacher, student


def make_batch(rows=7, length=16, seed=0, tool_results=False) -> Rollouts:
    """Left-padded prompts and right-padded responses of varied lengths, laid out as rollout.py does; with
    `tool_results`, a conversation's: two tokens inside each longer response are context (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.full((rows, length), tokenizer().pad_token_id)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    response_mask = torch.zeros(rows, length, dtype=torch.bool)
    prompt_width = 5
    prompt_lengths = torch.randint(2, prompt_width + 1, (rows,), generator=g)
    response_lengths = torch.randint(1, length - prompt_width + 1, (rows,), generator=g)
    for b in range(rows):
        p, r = int(prompt_lengths[b]), int(response_lengths[b])
        input_ids[b, prompt_width - p:prompt_width + r] = torch.randint(7, len(tokenizer()), (p + r,), generator=g)
        attention_mask[b, prompt_width - p:prompt_width + r] = 1
        response_mask[b, prompt_width:prompt_width + r] = True
        if tool_results and r >= 5:
            response_mask[b, prompt_width + 2:prompt_width + 4] = False
    return Rollouts(input_ids, attention_mask, response_mask, prompt_lengths, torch.arange(rows), [""] * rows)


def config(**overrides) -> tip.Config:
    base = dict(rule="type_aware", micro_batch_size=64, chunk_size=5, lr=1e-3, weight_decay=0.0, grad_clip=0.0,
                steps=10, warmup_steps=0, gradient_checkpointing=False)
    return tip.Config(**{**base, **overrides})


def held_out_answers() -> list[tuple[int, int, str]]:
    """(a, b, answer) of the held_out problems, right ones ("1") first: a stand-in problem that was counted would
    raise the accuracy."""
    return sorted(((a, b, str((a * b) % 3)) for a in range(4) for b in range(3)), key=lambda p: p[2] != "1")


def longest_first(batch: Rollouts) -> Rollouts:
    """The rows sorted by length, longest first: contiguous shares are then as uneven as they get."""
    order = batch.attention_mask.sum(1).argsort(descending=True, stable=True)
    return Rollouts(*(None if field is None else field[order] if torch.is_tensor(field) else [field[i] for i in order]
                      for field in batch))


def rank_share(batch: Rollouts) -> Rollouts:
    """This rank's contiguous share of the rows, as data.rollout_share cuts a step (7 rows on 3 ranks: 2, 3, 2)."""
    share = batch.input_ids.shape[0] / tip.world_size()
    rows = slice(round(tip.rank() * share), round((tip.rank() + 1) * share))
    return Rollouts(*(None if field is None else field[rows] for field in batch))


CLIP = 0.02  # the step's gradient norm is about 0.045: the clip binds, so every rank must clip by the global norm


def one_step(fsdp: bool = False, micro_batch_size: int = 64, rows: int = 7, tool_results: bool = False
             ) -> tuple[dict, dict]:
    """One SGD step of type_aware selection with a clip that binds, on this rank's share of the batch.
    Returns (the weight update after − before, by name; the step's metrics)."""
    teacher, student = make_pair()
    before = {name: value.detach().clone() for name, value in student.state_dict().items()}
    batch, _ = rollout.balance_over_ranks(rank_share(make_batch(rows, tool_results=tool_results)))
    if fsdp:
        tip.shard_with_fsdp(student, torch.float32)
        tip.shard_with_fsdp(teacher, torch.float32)
    # SGD: the update is the clipped gradient times lr (Adam's first step, ≈ lr · sign(g), would amplify float
    # noise in near-zero gradient entries). lr 1000 makes updates of ~1e-3, far above the weights' float32
    # resolution (~1e-9 at 0.02), so after − before is the update to ~1e-6 of its size.
    optimizer = torch.optim.SGD(student.parameters())
    metrics = train.train_step(student, teacher, batch, optimizer, config(grad_clip=CLIP, lr=1000.0,
                               micro_batch_size=micro_batch_size), 0, None)
    after = checkpoint.full_state(student, optimizer)[0]
    return {name: after[name] - before[name] for name in after}, metrics


def worker() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: {__doc__}")
        return
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    tip.init_distributed()
    if mode == "nan_on_rank_1":  # train.main on the rest of the command line; rank 1's first scores are NaN,
        real_stats, calls = train.score.chunked_token_stats, []  # and SIGTERM reaches rank 2 alone during step 2
        real_step = train.train_step

        def terminated_in_step_2(*args, **kwargs):
            if args[5] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(*args, **kwargs)
        if tip.rank() == 2:
            train.train_step = terminated_in_step_2

        def nan_once(*args, **kwargs):
            stats = real_stats(*args, **kwargs)
            calls.append(1)
            return stats._replace(reverse_kl=stats.reverse_kl * float("nan")) if len(calls) == 1 else stats
        if tip.rank() == 1:
            train.score.chunked_token_stats = nan_once
        graded = itertools.count()  # each rank's reward is its rank; rank 3 grades one of its 2 rollouts a step

        def reward_of_the_rank(*args, **kwargs):
            return None if tip.rank() == 3 and next(graded) % 2 == 0 else float(tip.rank())
        train.grade.reward = reward_of_the_rank
        train.main(sys.argv[3:])  # it ends the process group itself
        return
    if mode == "rng":  # each rank's random state, saved with a checkpoint and restored by the resume
        _, student = make_pair()
        optimizer = torch.optim.AdamW(student.parameters())
        torch.manual_seed(100 + tip.rank())
        checkpoint.save_checkpoint(out_dir, 1, student, tokenizer(), optimizer)
        after_save = torch.rand(4)
        torch.manual_seed(0)  # what a fresh process would start from
        checkpoint.resume_from(checkpoint.newest_checkpoint(out_dir), student, optimizer)
        torch.save(dict(after_save=after_save, after_resume=torch.rand(4)), out_dir / f"rank{tip.rank()}.pt")
    elif mode in ("save_sharded", "resume_sharded"):  # a checkpoint of FSDP2 shards, read back on other counts
        _, student = make_pair()
        tip.shard_with_fsdp(student, torch.float32)
        optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
        if mode == "save_sharded":
            for p in student.parameters():  # an update and optimizer moments that differ from a fresh start
                p.grad = torch.full_like(p, 0.5)
            optimizer.step()
            checkpoint.save_checkpoint(out_dir, 5, student, tokenizer(), optimizer)
        else:
            assert checkpoint.resume_from(checkpoint.newest_checkpoint(out_dir), student, optimizer) == 5
        model_state, optimizer_state = checkpoint.full_state(student, optimizer)
        if tip.rank() == 0:
            torch.save(dict(model=model_state, optimizer=optimizer_state), out_dir / f"{mode}.pt")
    elif mode == "balance":  # 9 rollouts of very uneven lengths over 3 ranks, moved so ranks train alike
        batch = rank_share(longest_first(make_batch(rows=9, length=40, seed=11, tool_results=True)))
        mistakes = batch.response_mask & (batch.input_ids % 3 == 0)
        moved, moved_mistakes = rollout.balance_over_ranks(batch, mistakes)
        real = moved.attention_mask.bool()
        rows = [dict(ids=moved.input_ids[b][real[b]].tolist(), sampled=moved.response_mask[b][real[b]].tolist(),
                     mistakes=moved_mistakes[b][real[b]].tolist(), prompt=int(moved.prompt_lengths[b]),
                     first=int(real[b].nonzero()[0]), prompt_end=int(real[b].nonzero()[0]) + int(
                         moved.prompt_lengths[b]), response_starts=int(moved.response_mask[b].nonzero()[0]))
                for b in range(real.shape[0])]
        (out_dir / f"rank{tip.rank()}.json").write_text(json.dumps(dict(rows=rows, before=int(
            batch.attention_mask.sum()), columns=moved.input_ids.shape[1])))
    elif mode == "reshard":  # after a skipped step and after a trained one, every layer is back in its shards
        teacher, student = make_pair()
        tip.shard_with_fsdp(student, torch.float32)
        tip.shard_with_fsdp(teacher, torch.float32)
        optimizer = torch.optim.SGD(student.parameters())
        batch, real_stats, sharded = rank_share(make_batch(8)), train.score.chunked_token_stats, []
        for skipped in (True, False, True):
            train.score.chunked_token_stats = lambda *a, **k: (lambda s: s._replace(
                reverse_kl=s.reverse_kl * float("nan")) if skipped else s)(real_stats(*a, **k))
            for micro_batch_size in (1, 8):  # two passes, and one forward kept for the loss
                metrics = train.train_step(student, teacher, batch, optimizer,
                                           config(micro_batch_size=micro_batch_size), 0, None)
                sharded.append([bool(metrics["skipped"])] + [all(tip.is_sharded(p) for p in model.model.layers
                                                                 .parameters()) for model in (student, teacher)])
        train.score_rollouts(student, teacher, batch, [[0], [1], [2], [3]], config(), keep_graph=False)  # pass 1
        sharded.append([False] + [all(tip.is_sharded(p) for p in model.model.layers.parameters())
                                  for model in (student, teacher)])
        hidden = [train.pair.response_hidden_states(model, batch, slice(None)) for model in (student, teacher)]
        sharded.append([False] + [all(tip.is_sharded(p) for p in model.model.layers.parameters())  # a forward
                                  for model in (student, teacher)])  # with grad, its backward still to come
        hidden[0].sum().backward()
        (out_dir / f"rank{tip.rank()}.json").write_text(json.dumps(sharded))
    elif mode == "generate":  # under FSDP2, ranks of very different lengths and turn counts; greedy
        _, student = make_pair()
        prompts = [data.format_prompt(tokenizer(), f"{tip.rank()}+{i}=") for i in range(tip.rank() + 1)]
        length = 2 + 9 * tip.rank()
        whole = rollout.generate_rollouts(student, tokenizer(), prompts, 1, length, temperature=0.0)
        tip.shard_with_fsdp(student, torch.float32)
        sharded = rollout.generate_rollouts(student, tokenizer(), prompts, 1, length, temperature=0.0)
        import test_conversations as scripted  # scripted turns: rank r's task calls its tool r times
        real_sample, turns = rollout.sample_tokens, []

        def sample_and_script(model, tok, contexts, n, room, *args, **kwargs):
            real_sample(model, tok, contexts, n, 3, *args, **kwargs)  # the collective forwards of a real turn
            turns.append(len(contexts))
            return scripted.scripted_sampler(tok)(model, tok, contexts, n, room)
        rollout.sample_tokens = sample_and_script
        scripted.SCRIPTS[6] = [scripted.CALL_A] * tip.rank() + ["done"]
        task = rollout.Task([{"role": "user", "content": "task 6"}], [scripted.lookup])
        tools_tokenizer = scripted.tokenizer_with_tools()
        agent = tiny_causal_lm(tools_tokenizer, 32, seed=5)
        tip.shard_with_fsdp(agent, torch.float32)
        conversation = rollout.generate_conversations(agent, tools_tokenizer, [task], 1, 400, 8,
                                                      temperature=0.0).conversations[0]
        (out_dir / f"rank{tip.rank()}.json").write_text(json.dumps(dict(
            same=torch.equal(whole.input_ids, sharded.input_ids), width=sharded.input_ids.shape[1], turns=turns,
            assistant_turns=sum(m["role"] == "assistant" for m in conversation))))
    elif mode in ("held_out", "held_out_fsdp"):
        grade.is_correct = lambda text, answer: answer == "1"  # a verdict that does not depend on the sample
        _, student = make_pair()
        if mode == "held_out_fsdp":
            tip.shard_with_fsdp(student, torch.float32)
        problems = [{"prompt": data.format_prompt(tokenizer(), f"{a}+{b}="), "answer": answer}
                    for a, b, answer in held_out_answers()][:int(sys.argv[3]) if len(sys.argv) > 3 else None]
        accuracy = evaluate.held_out_accuracy(student, tokenizer(), problems,
                                              config(max_response_len=4, temperature=0.0), seed=0)
        (out_dir / f"rank{tip.rank()}.json").write_text(json.dumps(accuracy))
    else:
        # FSDP2 also accumulates, on the two-pass path: 8 rows, 2 per rank, in micro-batches of 1 (FSDP2 needs
        # as many forwards on every rank; train.py's parse_config refuses shares that would differ)
        fsdp = mode.startswith("fsdp")
        update, metrics = one_step(fsdp, micro_batch_size=1 if fsdp else 64, rows=8 if mode == "fsdp" else 7,
                                   tool_results=mode == "conversations")
        torch.save(dict(update=update, metrics=metrics), out_dir / f"rank{tip.rank()}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    tip.run_main(worker)
