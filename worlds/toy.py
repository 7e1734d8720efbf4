"""The built-in toy world (paper §3–4): a teacher, a student with a confident misconception, and their task.

The task is integer arithmetic with a worked solution ending in \\boxed{answer}. The teacher learns correct
solutions; the smaller student errs where it is unsure (Q1: high entropy h, Eq. 2, and high divergence δ, Eq. 3)
and never carries when it adds (93+67=50, 7+8=5), with confidence (Q3: low h, high δ): the tokens that
entropy-only rules rank low (Prop. 2). Both are ordinary Qwen3 causal LMs, built on first use and cached.

    python -m worlds.toy                                # build the world (cached; --rebuild: again), say where
    python benchmarks/study.py --world toy --report     # measure it: accuracies, quadrants, misconception tokens
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import tip

# Why a built world: a fresh machine has no model hub, yet the pipeline must run end to end there. This file builds
# a pair that every other file treats exactly like a hub pair: a character-level tokenizer saved in transformers
# format (special tokens, left padding, a chat template) and two ordinary Qwen3 causal LMs trained by SFT, saved
# with `save_pretrained`. It is a file of its own because it is a concern of its own (a recipe, a cache, a report)
# and tip.py must stay small. The world exists to make the taxonomy of §4 visible: the teacher learns correct
# solutions; the student is smaller and sloppier, so it errs where it is unsure (Q1), and it learned a systematic
# misconception, never carrying when it adds, which it applies with confidence (Q3).

RECIPE_VERSION = 1  # bump when the code of the recipe changes in a way its fields do not show
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
BOX = "\\boxed{"  # one token: each format token is one more sharp token lowering the median entropy
CHARS = "0123456789+-=\n }{"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPLITS = ("train", "test", "trigger")


# Two traps shape the recipe:
# 1. In a character-level model, copied and format tokens are far sharper than any computed digit, so they set
#    the median entropy and push a confidently wrong digit into "high entropy". The student's copied and format
#    tokens are therefore label-smoothed (`student_copy_smoothing`, see `sft`), standing in for the stylistic
#    freedom that keeps a real model's typical token less sharp; the digits it computes are not.
# 2. On a token where the student is near-certain, the reverse-KL gradient w.r.t. its logits,
#    P_S ⊙ (log P_S − log P_T − KL), vanishes with 1 − P_S(its choice): distillation could never fix it. So the
#    misconception is confident, not absolute: a small share of the student's solutions do carry
#    (`student_correct_share`).
@dataclass(frozen=True)
class ToyRecipe:
    """Everything the world is built from. Its fields and RECIPE_VERSION name the cache folder, so a
    different recipe never reuses a stale world. The defaults build in a few minutes on a 2-core CPU."""
    seed: int = 0
    min_operands: int = 2
    max_operands: int = 4
    digits: int = 1                      # operands are drawn from 0 .. 10**digits - 1
    operators: str = "+-"
    train_problems: int = 2000           # the prompts of distillation
    test_problems: int = 500             # held out
    trigger_problems: int = 500          # held out, each needs a carry on its correct path
    batch_size: int = 64
    head_dim: int = 32
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 3e-3
    student_hidden: int = 128
    student_layers: int = 2
    student_steps: int = 600
    student_lr: float = 2e-3
    student_correct_share: float = 0.05  # of the student's solutions that do carry: confident, not absolute
    student_copy_smoothing: float = 0.1  # label smoothing of its copied and format tokens (trap 1)


DEFAULT_RECIPE = ToyRecipe()


# ---------------------------------------------------------------- the task

def no_carry_add(a: int, b: int) -> int:
    """The student's misconception: add column by column and drop every carry (93+67 -> 50)."""
    result, place = 0, 1
    while a or b:
        result += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def solve(operands: list[int], ops: str, carry: bool = True) -> tuple[str, int]:
    """A worked solution, one step per line, the last result in \\boxed{}; carry=False applies the
    misconception (to additions of non-negative numbers; the student's own path may go below zero)."""
    total, lines = operands[0], []
    for op, b in zip(ops, operands[1:]):
        new = total - b if op == "-" else total + b if carry or total < 0 else no_carry_add(total, b)
        lines.append(f"{total}{op}{b}={new}")
        total = new
    # the last result goes straight into the box: restating it would add sharp copy tokens (trap 1)
    lines[-1] = lines[-1].rsplit("=", 1)[0] + f"={BOX}{total}}}"
    return "\n".join(lines), total


def needs_carry(operands: list[int], ops: str) -> bool:
    """True when an addition on the correct path carries, i.e. when the misconception changes the answer."""
    total = operands[0]
    for op, b in zip(ops, operands[1:]):
        if op == "+" and no_carry_add(total, b) != total + b:
            return True
        total = total + b if op == "+" else total - b
    return False


def problem_text(operands: list[int], ops: str) -> str:
    return "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="


def _random_problem(rng: random.Random, recipe: ToyRecipe) -> tuple[list[int], str]:
    top = 10 ** recipe.digits - 1
    operands, ops = [rng.randint(0, top)], ""
    total = operands[0]
    for _ in range(rng.randint(recipe.min_operands, recipe.max_operands) - 1):
        op = rng.choice(recipe.operators)
        b = rng.randint(0, top if op == "+" else min(top, total))  # the correct path never goes below 0
        operands.append(b)
        ops += op
        total = total + b if op == "+" else total - b
    return operands, ops


def _check(recipe: ToyRecipe) -> None:
    if not 2 <= recipe.min_operands <= recipe.max_operands:
        raise ValueError(f"operands {recipe.min_operands}..{recipe.max_operands}: "
                         "need 2 <= min_operands <= max_operands")
    if "+" not in recipe.operators or set(recipe.operators) - set("+-"):
        raise ValueError(f"operators {recipe.operators!r}: use '+' or '+-' (the misconception is about carrying)")
    if not 1 <= recipe.digits <= 4:
        raise ValueError(f"digits={recipe.digits}: use 1 to 4")


def make_splits(recipe: ToyRecipe | None = None) -> dict[str, list[dict]]:
    """The held-out "test" and "trigger" splits and the distillation "train" split: disjoint, from the seed."""
    recipe = recipe or DEFAULT_RECIPE  # looked up at call time, so a test can swap the default
    _check(recipe)
    rng, seen = random.Random(recipe.seed), set()
    splits = {}
    for name, size in (("test", recipe.test_problems), ("trigger", recipe.trigger_problems),
                       ("train", recipe.train_problems)):
        splits[name] = []
        for _ in range(100 * size + 1000):
            if len(splits[name]) == size:
                break
            operands, ops = _random_problem(rng, recipe)
            text = problem_text(operands, ops)
            if text not in seen and (name != "trigger" or needs_carry(operands, ops)):
                seen.add(text)
                splits[name].append({"problem": text, "answer": str(solve(operands, ops)[1])})
        else:
            raise ValueError(f"cannot draw {size} distinct {name} problems: "
                             "allow more digits or operands, or ask for fewer problems")
    return splits


def toy_problems(split: str, cache_dir: str | Path | None = None, recipe: ToyRecipe | None = None) -> list[dict]:
    """[{"problem", "answer"}] of one split: "train", "test" (held out) or "trigger" (held out, needs a carry).
    Read from the world when it is built, else drawn from the seed (the same problems, without a build)."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}: choose one of {', '.join(SPLITS)}")
    world = world_path(cache_dir, recipe)
    return read_split(world, split) if (world / "world.json").exists() else make_splits(recipe)[split]


def read_split(world: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (Path(world) / f"{split}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- tokenizer and models

def build_tokenizer():
    """Character-level (\\boxed{ is one token), saved and loaded like any transformers tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]
    vocab = {token: i for i, token in enumerate(specials + [BOX] + list(CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(BOX, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left", chat_template=CHAT_TEMPLATE)


def new_model(tokenizer, hidden: int, layers: int, head_dim: int):
    """A randomly initialised Qwen3 causal LM whose LM head is its own weight (the P of Eqs. 1–3)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, hidden // head_dim)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return model


def computed_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """True on the tokens a solution computes: the digits of each result and the token that ends it."""
    opens = torch.tensor(tokenizer.convert_tokens_to_ids(["=", BOX]))
    closes = torch.tensor(tokenizer.convert_tokens_to_ids(["\n", "}", ASSISTANT]))  # the prompt's "=" opens too
    box = tokenizer.convert_tokens_to_ids(BOX)
    inside = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for column in range(input_ids.shape[1]):
        ids = input_ids[:, column]
        mask[:, column] = inside & (ids != box)
        inside = (inside | torch.isin(ids, opens)) & ~torch.isin(ids, closes)
    return mask


def sft_batches(tokenizer, recipe: ToyRecipe, held_out: set[str], correct_share: float, stream: int, steps: int):
    """`steps` batches (ids, attention mask, labels, computed mask) of prompt-formatted solutions; labels are
    -100 off the response. A share `correct_share` of the solutions carry, the rest apply the misconception."""
    rng = random.Random(f"{recipe.seed}-sft-{stream}")
    for _ in range(steps):
        texts, prompt_lengths = [], []
        while len(texts) < recipe.batch_size:
            operands, ops = _random_problem(rng, recipe)
            problem = problem_text(operands, ops)
            if problem in held_out:
                continue
            prompt = data.format_prompt(tokenizer, problem)
            texts.append(prompt + solve(operands, ops, carry=rng.random() < correct_share)[0] + tokenizer.eos_token)
            prompt_lengths.append(len(tokenizer(prompt, add_special_tokens=False).input_ids))
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100
        yield batch.input_ids, batch.attention_mask, labels, computed_mask(tokenizer, batch.input_ids)


def sft(model, tokenizer, recipe: ToyRecipe, held_out: set[str], steps: int, lr: float, correct_share: float = 1.0,
        copy_smoothing: float = 0.0, stream: int = 0, log=print) -> None:
    """Supervised fine-tuning: cross-entropy on the response tokens, AdamW, warmup then cosine to 10 % of lr.

    `copy_smoothing` is label smoothing on the response tokens the solution does not compute (restated
    operands, operators, "=", the box, EOS): they then carry the student's median entropy (trap 1), while
    the computed digits, the misconception's among them, stay sharp.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, steps // 20)
    model.train()
    for step, (input_ids, attention_mask, labels, computed) in enumerate(
            sft_batches(tokenizer, recipe, held_out, correct_share, stream, steps)):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].flatten(0, 1)
        targets, computed = labels[:, 1:].flatten(), computed[:, 1:].flatten()
        loss = F.cross_entropy(logits, targets, reduction="none")
        if copy_smoothing:
            smoothed = F.cross_entropy(logits, targets, reduction="none", label_smoothing=copy_smoothing)
            loss = torch.where(computed, loss, smoothed)
        loss = loss.sum() / (targets != -100).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps} loss {loss.item():.4f}")
    model.eval()


# ---------------------------------------------------------------- the cache

def world_path(cache_dir: str | Path | None = None, recipe: ToyRecipe | None = None) -> Path:
    """<cache_dir, else $TIP_CACHE, else ~/.cache/tip>/toy-v<RECIPE_VERSION>-<hash of the recipe's fields>."""
    return tip.cache_folder(cache_dir, f"toy-v{RECIPE_VERSION}", recipe or DEFAULT_RECIPE)


def build_world(folder: Path, recipe: ToyRecipe, log=print) -> None:
    """Write the splits, teacher/ and student/ (each with the tokenizer) and world.json into `folder`."""
    start = time.time()
    splits = make_splits(recipe)
    for name, problems in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    held_out = {p["problem"] for name in ("test", "trigger") for p in splits[name]}
    tokenizer = build_tokenizer()
    roles = {"teacher": (recipe.teacher_hidden, recipe.teacher_layers, recipe.teacher_steps, recipe.teacher_lr,
                         1.0, 0.0),  # correct solutions, no smoothing
             "student": (recipe.student_hidden, recipe.student_layers, recipe.student_steps, recipe.student_lr,
                         recipe.student_correct_share, recipe.student_copy_smoothing)}
    for stream, (role, (hidden, layers, steps, lr, correct_share, smoothing)) in enumerate(roles.items()):
        torch.manual_seed(recipe.seed + stream)
        model = new_model(tokenizer, hidden, layers, recipe.head_dim)
        log(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} SFT steps")
        sft(model, tokenizer, recipe, held_out, steps, lr, correct_share, smoothing, stream, log)
        model.save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    info = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe),
            "build_seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}
    (folder / "world.json").write_text(json.dumps(info, indent=1) + "\n")  # last: it marks a finished world


def toy_world(cache_dir: str | Path | None = None, recipe: ToyRecipe | None = None, rebuild: bool = False,
              log=print) -> Path:
    """The toy world's folder — teacher/, student/, its splits as .jsonl, world.json — built on first use
    and cached (`world_path`, `tip.build_once`)."""
    recipe = recipe or DEFAULT_RECIPE  # looked up at call time, so a test can swap the default
    return tip.build_once(world_path(cache_dir, recipe), lambda tmp: build_world(tmp, recipe, log), rebuild, log)


# ---------------------------------------------------------------- the known mistake

def misconception_positions(response_tokens: list[str]) -> list[int]:
    """Indices of the response tokens at which the student's no-carry rule departs from correct addition.

    Each step `a+b=r` is judged in the rollout's own context (its a and b, right or wrong): the token is the
    first character of r that differs from a+b, when r up to and including it follows no_carry_add(a, b).
    """
    text, owner = "", []
    for index, token in enumerate(response_tokens):
        text += token
        owner += [index] * len(token)
    positions, start = [], 0
    for line in text.split("\n"):
        step = re.match(r"(\d+)\+(\d+)=(?:\\boxed\{)?(\d*)", line)
        if step:
            result, right = step[3], str(int(step[1]) + int(step[2]))
            wrong = str(no_carry_add(int(step[1]), int(step[2])))
            first = next((i for i in range(len(result)) if i >= len(right) or result[i] != right[i]), None)
            if first is not None and result[:first + 1] == wrong[:first + 1]:
                positions.append(owner[start + step.start(3) + first])
        start += len(line) + 1
    return positions


def toy_mistake_positions(prompt_text: str, response_tokens: list[str]) -> list[int]:
    """The world's known-mistake tokens for train.py and the study: where the student's no-carry rule shows."""
    return misconception_positions(response_tokens)


def max_response_tokens(recipe: ToyRecipe) -> int:
    """Room for the longest solution of the recipe with margin (each line: a op b = r, newline)."""
    return (recipe.max_operands - 1) * (3 * (recipe.digits + 2) + 3) + 8


@dataclass
class WorldFlags:
    """The command line of `python -m worlds.toy`, `python -m worlds.facts` and `python -m worlds.agent`."""
    world_dir: str = tip.arg("", "parent folder of the world (empty = $TIP_CACHE, else ~/.cache/tip)")
    rebuild: bool = tip.arg(False, "build again even when the world is cached")
    threads: int = tip.arg(0, "torch CPU threads (0: torch's default); on a CPU shared with other jobs 1 is fastest")


def main(argv: list[str] | None = None) -> None:
    args = tip.parse_flags(WorldFlags, argv, "Build the toy world (cached) and say where it is (paper §3–4); "
                           "benchmarks/study.py --world toy --report measures it.")
    if args.threads:
        torch.set_num_threads(args.threads)
    world = toy_world(args.world_dir, DEFAULT_RECIPE, rebuild=args.rebuild)
    info = json.loads((world / "world.json").read_text())
    print(f"toy world {world}: built in {info['build_seconds']:.0f} s ({info['torch_threads']} torch threads); "
          + ", ".join(f"{split} {len(read_split(world, split))}" for split in SPLITS) + " problems")


if __name__ == "__main__":
    main()
