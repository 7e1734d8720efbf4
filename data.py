"""The prompts x of TIP (paper §3, §7.1): a prompt set read, deduplicated and chat-formatted for rollouts.

A hub prompt set (DAPO-Math-17k in the paper), a local .jsonl/.json/.parquet file or a built-in world's problems
become [{"prompt": formatted text, "answer": reference or None}], with the paper's instruction to answer in
\\boxed{} and prompts over --max-prompt-len dropped and counted.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import tip

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# DAPO-Math-17k wraps every problem in its own answer format ("Answer: $Answer"); the paper asks for
# \boxed{} instead, so the wrapper is removed before MATH_INSTRUCTION is appended.
_DAPO_WRAPPER = re.compile(r"^Solve the following math problem step by step\. The last line of your response "
                           r"should be of the form Answer: \$Answer .*? to the problem\.\s*(.*?)\s*Remember to put "
                           r"your answer on its own line after \"Answer:\"\.\s*$", re.S)
PROMPT_FIELDS, ANSWER_FIELDS = ("prompt", "problem", "question"), ("answer", "solution", "reward_model.ground_truth")


def template_switches(config: tip.Config) -> dict:
    """`config.chat_template_kwargs` as a dict, or an InputError that shows the expected form."""
    try:
        switches = json.loads(config.chat_template_kwargs or "{}")
    except json.JSONDecodeError as error:
        switches = error
    if not isinstance(switches, dict):
        raise tip.InputError(f"--chat-template-kwargs {config.chat_template_kwargs!r} is not a JSON object; write it "
                             """like '{"enable_thinking": false}'""")
    return switches


def format_prompt(tokenizer, text: str, template_switches: dict | None = None) -> str:
    """The context x that rollouts y ~ S_θ(·|x) start from (§3): a user turn and the generation prompt under
    the tokenizer's chat template (with its switches, e.g. enable_thinking), or the bare text when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, **(template_switches or {}))
    return text


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of formatted prompts x (§3); BOS is added unless the texts already start with it (chat
    templates such as Llama 3's write it)."""
    bos = tokenizer.bos_token
    return tokenizer(list(texts), add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)))["input_ids"]


def _math_prompt(text: str) -> str:
    match = _DAPO_WRAPPER.match(text)
    text = match.group(1) if match else text
    return text if "\\boxed" in text else f"{text}\n\n{MATH_INSTRUCTION}"


def _user_text(value, source: str) -> str:
    """A prompt given as text or as chat messages ([{"role": "user", "content": ...}], as in DAPO)."""
    for message in value if isinstance(value, list) else []:
        if isinstance(message, dict) and message.get("role") == "user":
            return message["content"]
    if not isinstance(value, str):
        raise tip.InputError(f"{source}: a prompt is neither text nor chat messages with a user turn: {value!r:.200}")
    return value


def _field(dataset, name: str, read: bool = True):
    """The values of column `name` ("a.b": field b of struct column a), or None when there is no such field."""
    feature = dataset.features
    for key in name.split("."):
        if not isinstance(feature, dict) or key not in feature:
            return None
        feature = feature[key]
    head, *rest = name.split(".")
    values = list(dataset[head]) if read else []
    for key in rest:
        values = [value.get(key) if isinstance(value, dict) else None for value in values]
    return values


def _load_dataset(config):
    import datasets
    source, suffix = config.prompts, Path(config.prompts).suffix.lower()
    path = Path(source).expanduser()
    if path.is_dir():  # a dataset folder, e.g. made by `hf download ... --repo-type dataset --local-dir`
        return datasets.load_dataset(str(path), config.prompt_subset or None, split=config.prompt_split)
    if suffix in (".jsonl", ".json", ".parquet") or tip.looks_local(source):
        if not path.is_file() or suffix not in (".jsonl", ".json", ".parquet"):
            raise tip.InputError(f"prompt file {source!r} does not exist or is not a dataset folder or a .jsonl, "
                                 f".json or .parquet file")
        if path.stat().st_size == 0:
            raise tip.InputError(f"prompt file {source!r} is empty")
        try:  # a local file is one split, whatever --prompt-split says
            builder = "parquet" if suffix == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:
            raise tip.InputError(f"prompt file {source!r} could not be read: {type(error).__name__}: "
                                 f"{error}") from error
    offline = tip.env_flag("HF_HUB_OFFLINE") or tip.env_flag("HF_DATASETS_OFFLINE")
    hint = (f"pass a local dataset folder or .jsonl/.json/.parquet file (`hf download {source} --repo-type dataset "
            f"--local-dir DIR` where there is network)")
    if not offline and not tip.hub_reachable():
        raise tip.InputError(f"the hub is unreachable for prompt set {source!r}: {hint}, or set HF_DATASETS_OFFLINE=1")
    try:
        return datasets.load_dataset(source, config.prompt_subset or None, split=config.prompt_split)
    except Exception as error:
        if offline:
            raise tip.InputError(f"prompt set {source!r} is not cached and the hub is offline: {hint}") from error
        raise


def load_prompts(config: tip.Config, tokenizer, problems: list[dict] | None = None) -> list[dict]:
    """The prompts x of §3, [{"prompt": formatted text, "answer": str | None}], deduplicated (§7.1), from
    `problems` (a built-in world's [{"problem", "answer"}], asked bare, as its models learned them) or else
    `config.prompts`: a local .jsonl/.json/.parquet file or a hub prompt set. Dataset prompts get
    MATH_INSTRUCTION unless they already ask for \\boxed{} or --no-math-instruction is given. Prompts over
    `config.max_prompt_len` tokens are dropped and counted."""
    source = config.prompts
    if problems is not None:
        rows = [(p["problem"], p["answer"]) for p in problems]
    else:
        dataset, fields = _load_dataset(config), {}
        columns = f"columns: {', '.join(dataset.column_names)}"
        for role, given, candidates in (("prompt", config.prompt_field, PROMPT_FIELDS),
                                        ("answer", config.answer_field, ANSWER_FIELDS)):
            if given and _field(dataset, given, read=False) is None:
                raise tip.InputError(f"{source}: no {role} field {given!r} ({columns})")
            fields[role] = given or next((f for f in candidates if _field(dataset, f, read=False) is not None), None)
        if fields["prompt"] is None:
            raise tip.InputError(f"{source}: no {'/'.join(PROMPT_FIELDS)} column ({columns}); name one with "
                                 "--prompt-field")
        texts = [_user_text(value, source) for value in _field(dataset, fields["prompt"])]
        texts = [_math_prompt(text) for text in texts] if config.math_instruction else texts
        rows = list(zip(texts, _field(dataset, fields["answer"]) if fields["answer"] else [None] * len(texts)))
    unique = {}
    for text, answer in rows:  # DAPO-Math-17k repeats each problem; the paper deduplicates (§7.1)
        unique.setdefault(text, answer)
    switches = template_switches(config)
    texts = [format_prompt(tokenizer, text, switches) for text in unique]
    lengths = [len(ids) for ids in encode_prompts(tokenizer, texts)] if texts else []
    prompts = [{"prompt": text, "answer": None if answer is None else str(answer)}
               for text, answer, length in zip(texts, unique.values(), lengths) if length <= config.max_prompt_len]
    dropped = len(unique) - len(prompts)
    tip.log(f"prompts: {len(prompts)} from {source} ({len(rows) - len(unique)} duplicates and {dropped} longer than "
            f"{config.max_prompt_len} tokens dropped)")
    if not prompts:
        raise tip.InputError(f"no prompts left from {source!r}: {len(rows)} read, {dropped} over --max-prompt-len")
    return prompts


# --- which prompts each optimizer step, and each rank, samples ---

def step_prompts(step: int, num_prompts: int, config: tip.Config) -> list[int]:
    """The prompt indices of `step`, over all ranks: consecutive slices of a seeded permutation drawn anew
    each epoch, so the data position is a function of the step alone (resuming needs nothing else)."""
    per_step = config.prompts_per_step
    steps_per_epoch = max(1, num_prompts // per_step)
    epoch, slot = divmod(step, steps_per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(config.seed + epoch))
    return order[slot * per_step:(slot + 1) * per_step].tolist()


def rollout_share(step: int, num_prompts: int, config: tip.Config) -> list[int]:
    """The prompt index of each rollout this rank samples at `step`. The step's prompts × n rollouts, prompt-major,
    are cut into contiguous shares that differ by at most one rollout, so any world size up to prompts × n works
    and one prompt's rollouts may live on several ranks (selection and Eq. 9 are over the global batch anyway)."""
    rollouts = [i for i in step_prompts(step, num_prompts, config) for _ in range(config.rollouts_per_prompt)]
    share = len(rollouts) / tip.world_size()
    return rollouts[round(tip.rank() * share):round((tip.rank() + 1) * share)]


def balanced_owners(lengths: list[int], world_size: int) -> list[int]:
    """The rank that trains each of the step's rollouts (`lengths`: their tokens, every rank's rows in rank
    order), so that ranks train about as many tokens each. Longest first, each to the rank with the fewest tokens
    so far (then the fewest rows, then the lowest rank): the longest-processing-time rule, within 4/3 of the best
    split, every rank with a row when there are as many rows as ranks. Then, while it brings them closer, the
    busiest rank gives the lightest one a row, or trades one for a shorter row of it (the best such change first)."""
    tokens, rows, owners = [0] * world_size, [0] * world_size, [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        owner = min(range(world_size), key=lambda r: (tokens[r], rows[r], r))
        owners[i] = owner
        tokens[owner] += lengths[i]
        rows[owner] += 1

    def gain(i: int, j: int | None) -> int:  # the tokens that move when row i goes over (for row j, if a trade)
        return lengths[i] - (0 if j is None else lengths[j])
    while True:  # each move or trade brings two loads closer, so this ends
        busiest = max(range(world_size), key=lambda r: tokens[r])
        lightest = min(range(world_size), key=lambda r: tokens[r])
        theirs = [None] * (rows[busiest] > 1) + [j for j, o in enumerate(owners) if o == lightest]
        best = max(((i, j) for i, o in enumerate(owners) if o == busiest for j in theirs
                    if 0 < gain(i, j) and tokens[lightest] + gain(i, j) < tokens[busiest]),
                   key=lambda pair: min(gain(*pair), tokens[busiest] - tokens[lightest] - gain(*pair)), default=None)
        if best is None:
            return owners
        i, j = best
        owners[i], tokens[busiest], tokens[lightest] = lightest, tokens[busiest] - gain(i, j), \
            tokens[lightest] + gain(i, j)
        if j is None:
            rows[busiest], rows[lightest] = rows[busiest] - 1, rows[lightest] + 1
        else:
            owners[j] = busiest


def micro_batches(prompt_lengths: list[int], response_lengths: list[int], max_rows: int,
                  max_tokens: int = 0, padding_free: bool = False) -> list[list[int]]:
    """The rows of each micro-batch of a rank's rollouts. Without a token budget: consecutive groups of `max_rows`.
    With one: rows sorted by length, longest first, and packed while the micro-batch's size stays within
    `max_tokens` (and its rows within `max_rows`); a row longer than the budget is a micro-batch of its own. The
    size is what the forward computes: rows × (longest prompt + longest response), since prompts are left-padded
    and responses right-padded to the micro-batch's longest, or, `padding_free`, the real tokens alone."""
    rows = len(prompt_lengths)
    if not max_tokens:
        return [list(range(start, min(start + max_rows, rows))) for start in range(0, rows, max_rows)]
    order = sorted(range(rows), key=lambda i: (-(prompt_lengths[i] + response_lengths[i]), i))

    def size(group: list[int]) -> int:  # the tokens the forward computes for these rows
        if padding_free:
            return sum(prompt_lengths[j] + response_lengths[j] for j in group)
        return len(group) * (max(prompt_lengths[j] for j in group) + max(response_lengths[j] for j in group))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < max_rows and size(groups[-1] + [i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
