"""Student rollouts (paper §3): y ~ S_θ(·|x), n samples per prompt x, and the mask of the sampled tokens.

Every training token is a position t of a rollout the student sampled itself, with context c_t = (x, y_<t);
teacher and student are scored on exactly these tokens (Eqs. 1 and 9). One row of the batch:

    input_ids      pad pad x x x | y y y EOS | pad pad    prompt left-padded, response right-padded
    response_mask   0   0  0 0 0 | 1 1 1  1  |  0   0     exactly the sampled tokens, EOS included

The hidden state at position p predicts the token at p+1, so the scored rows are
`hidden[:, :-1][response_mask[:, 1:]]`. Sampling uses the paper's two knobs only (temperature, top-p; §7.1):
the model's own sampling defaults (Qwen3 ships top-k 20 and temperature 0.6; transformers adds top-k 50)
are switched off, since they would change the distribution the student is trained on.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig

import tip


class Rollouts(NamedTuple):
    input_ids: torch.Tensor       # [B, L] long, on the model's device
    attention_mask: torch.Tensor  # [B, L] long: 1 on real prompt and response tokens
    response_mask: torch.Tensor   # [B, L] bool: True exactly on sampled tokens, EOS included
    prompt_lengths: torch.Tensor  # [B] real prompt tokens per row
    prompt_index: torch.Tensor    # [B] row b came from prompts[prompt_index[b]]; prompt-major, b = i * n + j
    texts: list[str]              # decoded responses, special tokens skipped


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a rollout: the model's generation config (Qwen3 chat models list two), else the
    tokenizer's EOS."""
    eos = tip.unwrap(model).generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return [eos] if isinstance(eos, int) else list(eos)


def generate_rollouts(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature=1.0,
                      top_p=1.0, seed=None, batch_size=None, show_progress=False) -> Rollouts:
    """Sample n rollouts y ~ S_θ(·|x) per formatted prompt x (§3), batched with left padding and the KV cache.

    temperature 0 is greedy. With a `seed` the samples are reproducible (for the same batch_size) and the
    caller's random stream is left untouched. `batch_size` rows are generated at a time (all at once when
    None). A DDP-wrapped model samples through its inner module; a model in training mode (gradient
    checkpointing or not) samples in eval mode with the cache and is put back in training mode.
    """
    if not prompts or n < 1 or max_new_tokens < 1:
        raise ValueError(f"need prompts, n >= 1 and max_new_tokens >= 1 (got {len(prompts)}, {n}, {max_new_tokens})")
    inner = tip.unwrap(model)
    device = next(inner.parameters()).device
    eos = eos_token_ids(inner, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = tip.encode_prompts(tokenizer, prompts)
    if min(map(len, encoded)) == 0:
        raise ValueError(f"prompt {min(range(len(encoded)), key=lambda i: len(encoded[i]))} has no tokens")
    width = max(map(len, encoded))
    prompt_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        prompt_ids[i, width - len(ids):] = torch.tensor(ids)
        prompt_mask[i, width - len(ids):] = 1
    prompt_ids, prompt_mask = (t.repeat_interleave(n, 0).to(device) for t in (prompt_ids, prompt_mask))
    rows = prompt_ids.shape[0]
    batch_size = batch_size or rows
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False))
    was_training, model_generation_config = inner.training, inner.generation_config
    # generate fills every unset option from the model's generation config; a neutral one leaves only ours.
    inner.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                               bos_token_id=model_generation_config.bos_token_id)
    forked = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    responses = []
    bar = tqdm(total=rows, desc="rollouts", disable=not show_progress or tip.rank() != 0)
    try:
        inner.eval()  # gradient checkpointing acts in training mode only, so sampling keeps the KV cache
        with torch.random.fork_rng(devices=forked, enabled=seed is not None):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
                if forked:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            for start in range(0, rows, batch_size):
                ids, mask = prompt_ids[start:start + batch_size], prompt_mask[start:start + batch_size]
                first = int(mask.any(0).long().argmax())  # columns that are padding in every row are cut
                out = inner.generate(input_ids=ids[:, first:], attention_mask=mask[:, first:],
                                     max_new_tokens=max_new_tokens, use_cache=True, **sampling)
                responses.append(out[:, width - first:])
                bar.update(ids.shape[0])
    finally:
        inner.generation_config = model_generation_config
        inner.train(was_training)
        bar.close()
    steps = max(r.shape[1] for r in responses)
    response = torch.cat([F.pad(r, (0, steps - r.shape[1]), value=pad) for r in responses])
    # A row ends at its first EOS. Generate pads finished rows with pad, which may be the EOS token itself,
    # so the mask is built from the position of the first EOS, not from comparisons with pad.
    is_eos = torch.isin(response, torch.tensor(eos, device=response.device)).long()
    sampled = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
    response = response.masked_fill(~sampled, pad)
    texts = tokenizer.batch_decode([row[keep].tolist() for row, keep in zip(response.cpu(), sampled.cpu())],
                                   skip_special_tokens=True)
    return Rollouts(
        input_ids=torch.cat([prompt_ids, response], 1),
        attention_mask=torch.cat([prompt_mask, sampled.long()], 1),
        response_mask=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), sampled], 1),
        prompt_lengths=prompt_mask.sum(1),
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),
        texts=texts,
    )
