"""Builders shared by tests/test_train.py, and its torchrun worker: one TIP step on 2 ranks.

    python -m torch.distributed.run --nproc_per_node=2 tests/train_worker.py OUT_DIR ddp|fsdp
"""
import sys
from pathlib import Path

import torch

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
    student = tiny_causal_lm(tokenizer(), 32, seed=seed + 2)
    return teacher, student


def make_batch(rows=7, length=16, seed=0) -> Rollouts:
    """Left-padded prompts and right-padded responses of varied lengths, laid out as rollout.py does."""
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
    return Rollouts(input_ids, attention_mask, response_mask, prompt_lengths, torch.arange(rows), [""] * rows)


def config(**overrides) -> tip.Config:
    base = dict(rule="type_aware", micro_batch_size=64, chunk_size=5, lr=1e-3, weight_decay=0.0, grad_clip=0.0,
                steps=10, warmup_steps=0, gradient_checkpointing=False)
    return tip.Config(**{**base, **overrides})


def one_step(fsdp: bool = False) -> dict:
    """One SGD step of type_aware selection with a clip that binds, on this rank's contiguous share of the batch."""
    teacher, student = make_pair()
    batch = make_batch()
    share = batch.input_ids.shape[0] / tip.world_size()  # 7 rows: 3 on rank 0, 4 on rank 1
    rows = slice(round(tip.rank() * share), round((tip.rank() + 1) * share))
    batch = Rollouts(*(field[rows] for field in batch))
    if fsdp:
        train.shard_with_fsdp(student)
        train.shard_with_fsdp(teacher)
    # SGD at lr 1: the weights move by exactly the clipped gradient (Adam's first step, ≈ lr · sign(g),
    # would amplify float noise in near-zero gradient entries)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    # FSDP2 also accumulates: its 3–4 rows per rank run as micro-batches of 2
    train.train_step(student, teacher, batch, optimizer, config(grad_clip=0.05, micro_batch_size=2 if fsdp else 64),
                     0, None)
    return {name: value.detach().clone() for name, value in train.full_state(student, optimizer)[0].items()}


if __name__ == "__main__":
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    tip.init_distributed()
    weights = one_step(fsdp=mode == "fsdp")
    torch.save(weights, out_dir / f"rank{tip.rank()}.pt")
    torch.distributed.destroy_process_group()
