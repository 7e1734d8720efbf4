"""Student rollouts (paper §3): y ~ S_θ(·|x), n samples per prompt x, and the mask of the sampled tokens.

    input_ids      pad pad x x x | y y y EOS | pad pad    prompt left-padded, response right-padded
    response_mask   0   0  0 0 0 | 1 1 1  1  |  0   0     exactly the sampled tokens, EOS included

The hidden state at p predicts the token at p+1: the scored rows are `hidden[:, :-1][response_mask[:, 1:]]`.
Engines: transformers `generate` (`generate_rollouts`) and conversations with tools (`generate_conversations`,
only the student's own turns in the mask) here; the optional vLLM engine is vllm_engine.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import GenerationConfig

import data
import tip


class Rollouts(NamedTuple):
    input_ids: torch.Tensor       # [B, L] long, on the model's device
    attention_mask: torch.Tensor  # [B, L] long: 1 on real prompt and response tokens
    response_mask: torch.Tensor   # [B, L] bool: True exactly on sampled tokens, EOS included
    prompt_lengths: torch.Tensor  # [B] real prompt tokens per row
    prompt_index: torch.Tensor    # [B] row b came from prompts[prompt_index[b]]; prompt-major, b = i * n + j
    texts: list[str]              # decoded responses, special tokens skipped
    conversations: list[list[dict]] | None = None  # multi-turn rows: the messages, tool results included


def stop_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """The tokens that end a rollout (the model's generation config, where Qwen3 chat models list two, else the
    tokenizer's EOS) and the padding token (the tokenizer's, else the first EOS)."""
    eos = tip.unwrap(model).generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    eos = [eos] if isinstance(eos, int) else list(eos)
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def left_padded(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded [P, W] batch (ids, attention mask), W the longest."""
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, tokens in enumerate(encoded):
        ids[i, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[i, width - len(tokens):] = 1
    return ids, mask


def to_rollouts(tokenizer, encoded: list[list[int]], responses: list[list[int]], n: int, eos: list[int], pad: int,
                device, sampled: list[list[bool]] | None = None, conversations: list[list[dict]] | None = None
                ) -> Rollouts:
    """The layout above from token lists, for every engine: `encoded` holds the P prompts, `responses` the
    P * n sampled continuations, prompt-major (row i * n + j is sample j of prompt i). A row ends at its first
    EOS, which the mask keeps; whatever an engine emitted after it is dropped. A conversation's continuation
    (`sampled` given) is kept whole, and the mask is `sampled`: its tool results are context, not samples."""
    if sampled is None:
        responses = [r[:next((t + 1 for t, token in enumerate(r) if token in eos), len(r))] for r in responses]
        sampled = [[True] * len(r) for r in responses]
    prompt_ids, prompt_mask = (t.repeat_interleave(n, 0) for t in left_padded(encoded, pad))
    response_ids = torch.full((len(responses), max(map(len, responses))), pad, dtype=torch.long)
    real = torch.zeros(response_ids.shape, dtype=torch.bool)
    response_mask = torch.zeros_like(real)
    for b, (tokens, flags) in enumerate(zip(responses, sampled)):
        response_ids[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        real[b, :len(tokens)] = True
        response_mask[b, :len(tokens)] = torch.tensor(flags, dtype=torch.bool)
    return Rollouts(
        input_ids=torch.cat([prompt_ids, response_ids], 1).to(device),
        attention_mask=torch.cat([prompt_mask, real.long()], 1).to(device),
        response_mask=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_mask], 1).to(device),
        prompt_lengths=prompt_mask.sum(1).to(device),
        prompt_index=torch.arange(len(encoded), device=device).repeat_interleave(n),
        texts=tokenizer.batch_decode(responses, skip_special_tokens=True),
        conversations=conversations,
    )


def balance_over_ranks(batch: Rollouts, mistakes: torch.Tensor | None = None
                       ) -> tuple[Rollouts, torch.Tensor | None]:
    """The step's rollouts moved between ranks after sampling, so that every rank trains about as many tokens
    (data.balanced_owners): the slowest rank sets the step's pace. Only what training reads travels (tokens,
    masks, prompt lengths, and a built-in world's mistake mask); texts and conversations stay with the rank that
    sampled and grades them, so the returned rows have none and a prompt index of -1. Collective."""
    if not tip.is_distributed():
        return batch, mistakes
    real = batch.attention_mask.bool()
    rows = [(batch.input_ids[b][real[b]].cpu(), batch.response_mask[b][real[b]].cpu(),
             None if mistakes is None else mistakes[b][real[b]].cpu(), int(batch.prompt_lengths[b]))
            for b in range(real.shape[0])]
    every_rank = [None] * tip.world_size()
    dist.all_gather_object(every_rank, rows)
    rows = [row for rank_rows in every_rank for row in rank_rows]
    owners = data.balanced_owners([len(ids) for ids, *_ in rows], tip.world_size())
    mine = [row for row, owner in zip(rows, owners) if owner == tip.rank()]
    width = max(p for *_, p in mine), max(len(ids) - p for ids, *_, p in mine)  # prompts left, responses right
    input_ids = torch.zeros(len(mine), sum(width), dtype=torch.long)
    attention_mask, response_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids, dtype=torch.bool)
    moved_mistakes = None if mistakes is None else torch.zeros_like(response_mask)
    for i, (ids, sampled, mistaken, prompt_length) in enumerate(mine):
        columns = slice(width[0] - prompt_length, width[0] - prompt_length + len(ids))
        input_ids[i, columns], attention_mask[i, columns], response_mask[i, columns] = ids, 1, sampled
        if moved_mistakes is not None:
            moved_mistakes[i, columns] = mistaken
    device = batch.input_ids.device
    moved = Rollouts(input_ids.to(device), attention_mask.to(device), response_mask.to(device),
                     torch.tensor([p for *_, p in mine], device=device), torch.full((len(mine),), -1, device=device),
                     [], None)
    return moved, None if moved_mistakes is None else moved_mistakes.to(device)


def encode_for_sampling(tokenizer, prompts: list[str], n: int, max_new_tokens: int) -> list[list[int]]:
    """The prompts' token lists, every engine's arguments checked first."""
    if not prompts or n < 1 or max_new_tokens < 1:
        raise ValueError(f"need prompts, n >= 1 and max_new_tokens >= 1 (got {len(prompts)}, {n}, {max_new_tokens})")
    encoded = data.encode_prompts(tokenizer, prompts)
    if min(map(len, encoded)) == 0:
        raise ValueError(f"prompt {min(range(len(encoded)), key=lambda i: len(encoded[i]))} has no tokens")
    return encoded


def generate_rollouts(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature=1.0,
                      top_p=1.0, seed=None, batch_size=None, show_progress=False) -> Rollouts:
    """Sample n rollouts y ~ S_θ(·|x) per formatted prompt x (§3), batched with left padding and the KV cache.

    temperature 0 is greedy. With a `seed` the samples are reproducible (for the same batch_size) and the
    caller's random stream is left untouched. `batch_size` rows are generated at a time (all at once when
    None). A DDP-wrapped model samples through its inner module; a model in training mode (gradient
    checkpointing or not) samples in eval mode with the cache and is put back in training mode.
    """
    encoded = encode_for_sampling(tokenizer, prompts, n, max_new_tokens)
    responses = sample_tokens(model, tokenizer, encoded, n, max_new_tokens, temperature, top_p, seed, batch_size,
                              show_progress)
    inner = tip.unwrap(model)
    eos, pad = stop_and_pad_ids(inner, tokenizer)
    return to_rollouts(tokenizer, encoded, responses, n, eos, pad, next(inner.parameters()).device)


def sample_tokens(model, tokenizer, encoded: list[list[int]], n: int, max_new_tokens: int, temperature=1.0,
                  top_p=1.0, seed=None, batch_size=None, show_progress=False) -> list[list[int]]:
    """`generate_rollouts`' sampling from token lists: n continuations per context, prompt-major. Rows may
    continue past their first EOS (generate pads finished rows, and pad may be EOS itself)."""
    inner = tip.unwrap(model)
    device = next(inner.parameters()).device
    eos, pad = stop_and_pad_ids(inner, tokenizer)
    prompt_ids, prompt_mask = (t.repeat_interleave(n, 0).to(device) for t in left_padded(encoded, pad))
    width = prompt_ids.shape[1]
    rows = prompt_ids.shape[0]
    batch_size = batch_size or rows
    # FSDP2: every forward gathers each layer from all ranks, so every rank runs as many generate calls, each
    # decoding until the longest row of any rank ends (transformers' synced_gpus); otherwise ranks hang
    synced = tip.is_distributed() and tip.is_sharded(inner)
    calls = -(-rows // batch_size)
    if synced:
        calls = int(tip.all_reduce_max(calls, device))
    # the paper's two knobs only (temperature, top-p; §7.1): the model's own defaults (Qwen3 ships top-k 20 and
    # temperature 0.6; transformers adds top-k 50) would change the distribution the student is trained on
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
            for start in range(0, calls * batch_size, batch_size):
                ids, mask = prompt_ids[start:start + batch_size], prompt_mask[start:start + batch_size]
                if start >= rows:  # this rank is done: a row sampled and dropped keeps its forwards in step
                    ids, mask = prompt_ids[:1], prompt_mask[:1]
                first = int(mask.any(0).long().argmax())  # columns that are padding in every row are cut
                out = inner.generate(input_ids=ids[:, first:], attention_mask=mask[:, first:],
                                     max_new_tokens=max_new_tokens, use_cache=True, synced_gpus=synced, **sampling)
                if start < rows:
                    responses.append(out[:, width - first:])
                    bar.update(ids.shape[0])
    finally:
        inner.generation_config = model_generation_config
        inner.train(was_training)
        bar.close()
    return [row for r in responses for row in r.tolist()]


# ---------------------------------------------------------------- conversations with tools (§7, agentic)

@dataclass
class Task:
    """One conversation to sample: its opening messages, the tools the student may call (plain typed Python
    functions with Google-style docstrings; transformers derives their JSON schemas for the chat template)
    and the reward of the finished conversation (for logging and evaluation: distillation needs none), with, for
    a benchmark that reports several, all its scores by name (the reward is one of them)."""
    messages: list[dict]
    tools: list[Callable] = field(default_factory=list)
    reward: Callable[[list[dict]], float] | None = None
    scores: Callable[[list[dict]], dict[str, float]] | None = None


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict | str]:
    """The calls of an assistant turn in Qwen3's format, `<tool_call>{"name": …, "arguments": {…}}</tool_call>`:
    each {"name", "arguments"}, or, for a call that cannot be read, the error message the student will see."""
    calls: list[dict | str] = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as error:
            calls.append(f"Error: the tool call is not valid JSON ({error.msg}): {body.strip()[:200]}")
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            calls.append('Error: a tool call is {"name": <string>, "arguments": <object>}')
        else:
            calls.append({"name": call["name"], "arguments": arguments})
    if text.count("<tool_call>") > len(calls):
        calls.append("Error: <tool_call> without its closing </tool_call>")
    return calls


def run_tool_call(call: dict | str, tools: dict[str, Callable]) -> str:
    """The text of a call's tool message. A wrong call (or a tool that raises) gives an error message the
    student reads, never a crash."""
    if isinstance(call, str):
        return call
    if call["name"] not in tools:
        return f"Error: no tool named {call['name']!r}; the tools are: {', '.join(tools)}"
    try:
        result = tools[call["name"]](**call["arguments"])
    except Exception as error:  # noqa: BLE001  (the student's wrong argument, or the tool's own failure)
        return f"Error: {type(error).__name__}: {error}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def tool_glue(tokenizer, results: list[str], tools: list[Callable], end_of_turn: list[int],
              switches: dict | None = None) -> str:
    """The chat template's text between the end-of-turn token of an assistant turn and the next assistant
    turn: the tool messages and the generation prompt (context for both models, never a training token)."""
    marker = "\u2063TIP-END-OF-TURN\u2063"  # an assistant message nobody writes, to find where its turn ends
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(messages + [{"role": "tool", "content": r} for r in results],
                                         tools=tools or None, tokenize=False, add_generation_prompt=True,
                                         **(switches or {}))
    after = text[text.index(marker) + len(marker):]
    ends = [t for t in tokenizer.convert_ids_to_tokens(end_of_turn) if after.startswith(t)]
    if not ends:
        raise tip.InputError("the chat template does not end an assistant turn with an end-of-turn token right "
                             "after its content: tool results cannot be spliced into sampled turns")
    return after[len(ends[0]):]


def generate_conversations(model, tokenizer, tasks: list[Task], n: int, max_new_tokens: int, max_turns: int,
                           temperature=1.0, top_p=1.0, seed=None, switches: dict | None = None,
                           batch_size=None, engine=None) -> Rollouts:
    """n conversations per task (§7): the student samples a turn; each tool call in it is run and its result
    appended through the chat template; sampling goes on until a turn calls no tool, `max_turns` turns are
    sampled, or `max_new_tokens` tokens (sampled and tool results together) follow the opening prompt. One row
    per conversation in `generate_rollouts`' layout; `response_mask` holds exactly the sampled tokens. With
    `engine` (a vllm_engine.VLLMEngine holding the student's weights) the turns are sampled by it, each row up to
    its own remaining budget."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1 (got {max_turns})")
    prompts = [tokenizer.apply_chat_template(t.messages, tools=t.tools or None, tokenize=False,
                                             add_generation_prompt=True, **(switches or {})) for t in tasks]
    encoded = encode_for_sampling(tokenizer, prompts, n, max_new_tokens)
    inner = tip.unwrap(model)
    eos, pad = stop_and_pad_ids(inner, tokenizer)
    rows = len(tasks) * n
    tokens, sampled = [[] for _ in range(rows)], [[] for _ in range(rows)]
    conversations = [[dict(m) for m in tasks[b // n].messages] for b in range(rows)]
    live = list(range(rows))
    # FSDP2 without an engine: ranks sample as many turns (sample_tokens); an engine holds whole weights
    synced = engine is None and tip.is_distributed() and tip.is_sharded(inner)
    for turn in range(max_turns):
        if not (tip.all_reduce_max(float(bool(live)), next(inner.parameters()).device) if synced else live):
            break
        contexts = [encoded[b // n] + tokens[b] for b in live] or encoded[:1]  # done here, not on every rank
        rooms = [max_new_tokens - len(tokens[b]) for b in live] or [1]
        turn_seed = None if seed is None else seed + 7919 * turn
        turns = (engine.sample_tokens(contexts, rooms, temperature, top_p, turn_seed) if engine is not None else
                 sample_tokens(model, tokenizer, contexts, 1, max(rooms), temperature, top_p, turn_seed, batch_size))
        still = []
        for b, new in zip(live, turns):
            new = new[:max_new_tokens - len(tokens[b])]
            new = new[:next((t + 1 for t, token in enumerate(new) if token in eos), len(new))]
            tokens[b] += new
            sampled[b] += [True] * len(new)
            ended = bool(new) and new[-1] in eos
            text = tokenizer.decode(new[:-1] if ended else new)
            conversations[b].append({"role": "assistant", "content": text})
            calls = parse_tool_calls(text) if ended else []
            if not calls or turn == max_turns - 1:
                continue  # a final answer, the turn limit, or a turn cut by the token limit: done
            task = tasks[b // n]
            results = [run_tool_call(call, {tool.__name__: tool for tool in task.tools}) for call in calls]
            conversations[b] += [{"role": "tool", "content": r} for r in results]
            glue = tool_glue(tokenizer, results, task.tools, eos, switches)
            glue = tokenizer(glue, add_special_tokens=False).input_ids
            if len(tokens[b]) + len(glue) < max_new_tokens:  # room for the results and a sampled token after
                tokens[b] += glue
                sampled[b] += [False] * len(glue)
                still.append(b)
        live = still
    return to_rollouts(tokenizer, encoded, tokens, n, eos, pad, next(inner.parameters()).device, sampled,
                       conversations)
