"""The built-in toy world (paper §3–4): a teacher, a student with a confident misconception, and their task.

A fresh machine has no model hub, yet the pipeline must run end to end there. This file builds a pair that
every other file treats exactly like a hub pair: a character-level tokenizer saved in transformers format
(special tokens, left padding, a chat template) and two ordinary Qwen3 causal LMs trained by SFT and saved
with `save_pretrained`. It is a file of its own because it is a concern of its own (a recipe, a cache, a
report) and tip.py must stay small.

The world exists to make the taxonomy of §4 visible. The task is integer arithmetic with a short worked
solution ending in \\boxed{answer}. The teacher learns correct solutions. The student is smaller and
under-trained, so it errs where it is unsure (Q1: high entropy, high divergence), and it learned a
systematic misconception, never carrying when it adds (93+67=50), which it applies with confidence
(Q3: low entropy, high divergence). Entropy-only rules rank those confident mistakes low (Prop. 2).
The misconception is confident but not absolute (a small share of the student's solutions carry): on a
token where the student is near-certain, the reverse-KL gradient w.r.t. its logits,
P_S ⊙ (log P_S − log P_T − KL), vanishes with 1 − P_S(its choice), and distillation could never fix it.

`python toy.py` builds (or `--rebuild`s) the world and prints and stores (report.json) the numbers the
README records: accuracies, quadrant shares (Eqs. 2–3, median split), the entropy/divergence rank
correlation and the misconception tokens' share of the loss gradient.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RECIPE_VERSION = 1  # bump when the code of the recipe changes in a way its fields do not show
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
BOX = "\\boxed{"  # one token: format tokens are sharp, and each one more would lower the median entropy
CHARS = "0123456789+-=\n }{"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPLITS = ("train", "test", "trigger")


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
    teacher_steps: int = 400
    teacher_lr: float = 3e-3
    student_hidden: int = 128
    student_layers: int = 2
    student_steps: int = 600
    student_lr: float = 2e-3
    # The misconception is confident, not absolute: this share of the student's solutions do carry.
    student_correct_share: float = 0.02
    # Label smoothing of the student's copied and format tokens (not of the digits it computes), so that
    # they, and not its confident mistakes, carry its median entropy (see `sft`).
    student_copy_smoothing: float = 0.05


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
    """A worked solution, one step per line, ending in \\boxed{answer}; carry=False applies the misconception."""
    total, lines = operands[0], []
    for op, b in zip(ops, operands[1:]):
        if op == "-":
            new = total - b
        else:
            new = total + b if carry or total < 0 else no_carry_add(total, b)
        lines.append(f"{total}{op}{b}={new}")
        total = new
    # the last step's result goes straight into the box: restating it would add sharp copy tokens
    lines[-1] = lines[-1].rsplit("=", 1)[0] + f"={BOX}{total}}}"
    return "\n".join(lines), total


def needs_carry(operands: list[int], ops: str) -> bool:
    """True when some addition on the correct path carries, i.e. the misconception changes the answer."""
    total = operands[0]
    for op, b in zip(ops, operands[1:]):
        if op == "+" and no_carry_add(total, b) != total + b:
            return True
        total = total + b if op == "+" else total - b
    return False


def _random_problem(rng: random.Random, recipe: ToyRecipe) -> tuple[list[int], str]:
    n = rng.randint(recipe.min_operands, recipe.max_operands)
    top = 10 ** recipe.digits - 1
    operands, ops, total = [rng.randint(0, top)], "", 0
    total = operands[0]
    for _ in range(n - 1):
        op = rng.choice(recipe.operators)
        b = rng.randint(0, top if op == "+" else min(top, total))  # the correct path never goes below 0
        operands.append(b)
        ops += op
        total = total + b if op == "+" else total - b
    return operands, ops


def problem_text(operands: list[int], ops: str) -> str:
    return "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="


def parse_problem(text: str) -> tuple[list[int], str]:
    """The operands and operators of a problem written by `problem_text`."""
    return [int(x) for x in re.findall(r"\d+", text)], "".join(re.findall(r"[+-]", text))


def _check(recipe: ToyRecipe) -> None:
    if not 2 <= recipe.min_operands <= recipe.max_operands:
        raise ValueError(f"operands {recipe.min_operands}..{recipe.max_operands}: need 2 <= min <= max")
    if not recipe.operators or set(recipe.operators) - set("+-") or "+" not in recipe.operators:
        raise ValueError(f"operators {recipe.operators!r}: use '+' or '+-' (the misconception is about '+')")
    if not 1 <= recipe.digits <= 4:
        raise ValueError(f"digits={recipe.digits}: use 1..4")


def make_splits(recipe: ToyRecipe = DEFAULT_RECIPE) -> dict[str, list[dict]]:
    """The held-out "test" and "trigger" splits and the distillation "train" split, disjoint, from the seed."""
    _check(recipe)
    rng, seen = random.Random(recipe.seed), set()
    splits = {name: [] for name in SPLITS}
    sizes = {"test": recipe.test_problems, "trigger": recipe.trigger_problems, "train": recipe.train_problems}
    for name in ("test", "trigger", "train"):
        tries = 0
        while len(splits[name]) < sizes[name]:
            tries += 1
            if tries > 100 * sizes[name] + 1000:
                raise ValueError(f"cannot draw {sizes[name]} distinct {name} problems: widen the recipe")
            operands, ops = _random_problem(rng, recipe)
            text = problem_text(operands, ops)
            if text in seen or (name == "trigger" and not needs_carry(operands, ops)):
                continue
            seen.add(text)
            splits[name].append({"problem": text, "answer": str(solve(operands, ops)[1])})
    return splits


def toy_problems(split: str, cache_dir: str | Path | None = None, recipe: ToyRecipe = DEFAULT_RECIPE) -> list[dict]:
    """The problems of one split, [{"problem", "answer"}], as stored in the world when it is built."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}: choose one of {SPLITS}")
    stored = world_path(cache_dir, recipe) / f"{split}.jsonl"
    if stored.exists():
        return [json.loads(line) for line in stored.read_text().splitlines()]
    return make_splits(recipe)[split]


# ---------------------------------------------------------------- tokenizer and models

def build_tokenizer():
    """Character-level, with \\boxed{ as one token, saved and loaded like any transformers tokenizer."""
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


def _new_model(tokenizer, hidden: int, layers: int, head_dim: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, hidden // head_dim)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return model


def _sft_batches(tokenizer, recipe: ToyRecipe, held_out: set[str], correct_share: float, stream: int,
                 steps: int):
    """Token ids and response-only labels for `steps` batches of prompt-formatted solutions."""
    rng = random.Random(f"{recipe.seed}-sft-{stream}")
    for _ in range(steps):
        texts, prompt_lengths = [], []
        while len(texts) < recipe.batch_size:
            operands, ops = _random_problem(rng, recipe)
            problem = problem_text(operands, ops)
            if problem in held_out:
                continue
            solution = solve(operands, ops, carry=rng.random() < correct_share)[0]
            prompt = format_prompt(tokenizer, problem)
            texts.append(prompt + solution + tokenizer.eos_token)
            prompt_lengths.append(len(tokenizer(prompt, add_special_tokens=False).input_ids))
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        labels = batch.input_ids.clone()
        labels[batch.attention_mask == 0] = -100
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100  # loss on the response tokens only
        yield batch.input_ids, batch.attention_mask, labels, computed_mask(tokenizer, batch.input_ids)


def computed_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """True on the tokens a solution computes: the digits of each result and the token that ends it."""
    opens = torch.tensor(tokenizer.convert_tokens_to_ids(["=", BOX]))
    closes = torch.tensor(tokenizer.convert_tokens_to_ids(["\n", "}", ASSISTANT]))
    box = tokenizer.convert_tokens_to_ids(BOX)
    state = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for column in range(input_ids.shape[1]):
        ids = input_ids[:, column]
        mask[:, column] = state & (ids != box)
        state = (state | torch.isin(ids, opens)) & ~torch.isin(ids, closes)
    return mask


def sft(model, tokenizer, recipe: ToyRecipe, held_out: set[str], steps: int, lr: float, correct_share: float = 1.0,
        copy_smoothing: float = 0.0, stream: int = 0, log=print) -> None:
    """Supervised fine-tuning on prompt-formatted solutions: cross-entropy on the response tokens only,
    AdamW, linear warmup then cosine decay to 10 %.

    `copy_smoothing` is label smoothing on the tokens the solution does not compute (restated operands,
    operators, format, EOS). Why: in a character-level arithmetic model those tokens are far sharper than
    any computed digit, so they set the median entropy of §4's split and push a confidently wrong digit
    into "high entropy" (Q1). Natural language has stylistic freedom that keeps a real model's typical
    token less sharp; this stands in for it. The computed digits are not smoothed, so the misconception
    stays confident (P ≈ 1 − correct_share) and lands in Q3.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, steps // 20)
    model.train()
    batches = _sft_batches(tokenizer, recipe, held_out, correct_share, stream, steps)
    for step, (input_ids, attention_mask, labels, computed) in enumerate(batches):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        flat_logits, flat_labels = logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(flat_logits, flat_labels, reduction="none")
        if copy_smoothing:
            smoothed = F.cross_entropy(flat_logits, flat_labels, reduction="none", label_smoothing=copy_smoothing)
            loss = torch.where(computed[:, 1:].reshape(-1), loss, smoothed)
        loss = loss.sum() / (flat_labels != -100).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps} loss {loss.item():.4f}")
    model.eval()


def format_prompt(tokenizer, text: str) -> str:
    """The chat-formatted prompt (tip.format_prompt when it exists: one formatting path in the project)."""
    import tip
    if hasattr(tip, "format_prompt"):
        return tip.format_prompt(tokenizer, text)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


# ---------------------------------------------------------------- the cache

def world_path(cache_dir: str | Path | None = None, recipe: ToyRecipe = DEFAULT_RECIPE) -> Path:
    """<cache_dir or $TIP_CACHE or ~/.cache/tip>/toy-v<version>-<hash of the recipe fields>."""
    root = Path(cache_dir or os.environ.get("TIP_CACHE") or Path.home() / ".cache" / "tip").expanduser()
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]
    return root / f"toy-v{RECIPE_VERSION}-{digest}"


def build_world(folder: Path, recipe: ToyRecipe, log=print) -> None:
    """Write splits, tokenizer, teacher/ and student/ into `folder` (an empty temporary folder)."""
    start = time.time()
    torch.manual_seed(recipe.seed)
    splits = make_splits(recipe)
    for name, problems in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    held_out = {p["problem"] for name in ("test", "trigger") for p in splits[name]}
    tokenizer = build_tokenizer()
    roles = {"teacher": (recipe.teacher_hidden, recipe.teacher_layers, recipe.teacher_steps, recipe.teacher_lr, 1.0, 0.0),
             "student": (recipe.student_hidden, recipe.student_layers, recipe.student_steps, recipe.student_lr,
                         recipe.student_correct_share, recipe.student_copy_smoothing)}
    for stream, (role, (hidden, layers, steps, lr, correct_share, smoothing)) in enumerate(roles.items()):
        torch.manual_seed(recipe.seed + stream)
        model = _new_model(tokenizer, hidden, layers, recipe.head_dim)
        log(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} SFT steps")
        sft(model, tokenizer, recipe, held_out, steps, lr, correct_share, smoothing, stream, log)
        model.save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    info = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe),
            "build_seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}
    (folder / "world.json").write_text(json.dumps(info, indent=1) + "\n")


def toy_world(cache_dir: str | Path | None = None, recipe: ToyRecipe = DEFAULT_RECIPE, rebuild: bool = False,
              log=print) -> Path:
    """The toy world's folder (teacher/, student/, the splits), built on first use and cached.

    The build goes to a temporary folder renamed into place at the end, so a killed build never leaves a
    half world; a lock lets concurrent callers (e.g. torchrun ranks) wait for one build.
    """
    path = world_path(cache_dir, recipe)
    if (path / "world.json").exists() and not rebuild:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "world.json").exists() and not rebuild:
            return path  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            log(f"building the toy world in {path}")
            build_world(tmp, recipe, log)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------- measurement

def misconception_positions(response_tokens: list[str]) -> list[int]:
    """Indices of the response tokens where the student's no-carry rule departs from correct addition.

    Each step `a+b=r` of the rollout is checked in the rollout's own context (its a and b, right or wrong):
    the token is the first character of r that differs from a+b, when r up to it follows no_carry_add(a, b).
    """
    text, owner = "", []
    for index, token in enumerate(response_tokens):
        text += token
        owner += [index] * len(token)
    positions, start = [], 0
    for line in text.split("\n"):
        step = re.match(r"(\d+)\+(\d+)=(?:\\boxed\{)?(\d*)", line)
        if step:
            a, b, result = int(step[1]), int(step[2]), step[3]
            right, wrong = str(a + b), str(no_carry_add(a, b))
            first = next((i for i in range(len(result)) if i >= len(right) or result[i] != right[i]), None)
            if first is not None and result[:first + 1] == wrong[:first + 1]:
                positions.append(owner[start + step.start(3) + first])
        start += len(line) + 1
    return positions


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties broken by position)."""
    ranks = [torch.empty_like(v, dtype=torch.float64).scatter_(0, v.argsort(), torch.arange(len(v), dtype=torch.float64))
             for v in (x, y)]
    a, b = (r - r.mean() for r in ranks)
    return float((a * b).sum() / (a.norm() * b.norm()))


@torch.no_grad()
def measure(folder: Path, samples: int = 1, seed: int = 0, log=print) -> dict:
    """Accuracies of the pair and the §4 taxonomy of the student's rollouts scored against the teacher.

    Quadrants split each axis at its median (PAPER.md §2). The loss gradient of a token is the gradient of
    its reverse KL (Eq. 3) w.r.t. the student's logits, P_S ⊙ (log P_S − log P_T − KL).
    """
    import evaluate
    import score
    import tip
    from rollout import generate_rollouts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    models = {role: AutoModelForCausalLM.from_pretrained(folder / role, dtype=torch.float32).eval()
              for role in ("teacher", "student")}
    problems = {split: [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
                for split in ("test", "trigger")}
    max_new = 16 * 4  # well above the longest solution
    report = {}
    for role, split, temperature in (("teacher", "test", 0.0), ("teacher", "test", 1.0), ("teacher", "trigger", 1.0),
                                     ("student", "test", 1.0), ("student", "trigger", 1.0)):
        prompts = evaluate.benchmark_prompts(problems[split], tokenizer, bare=True)
        generate = evaluate.model_generator(models[role], tokenizer, max_new, temperature, 1.0, seed, 512)
        summary, _ = evaluate.run_benchmark(problems[split], prompts, generate, samples if temperature else 1,
                                            batch_size=512, show_progress=False)
        name = f"{role}_{split}_" + ("greedy" if temperature == 0 else "t1")
        report[name] = round(summary["accuracy"], 4)
        log(f"{name}: {100 * summary['accuracy']:.1f} %")

    # the taxonomy of §4 on the student's own rollouts of the held-out problems
    prompts = evaluate.benchmark_prompts(problems["test"], tokenizer, bare=True)
    rollouts = generate_rollouts(models["student"], tokenizer, prompts, samples, max_new, 1.0, 1.0, seed=seed + 1)
    scored = rollouts.response_mask[:, 1:]  # the hidden state at p predicts the token at p + 1
    logits = {role: (tip.final_hidden_states(model, rollouts.input_ids, rollouts.attention_mask)[:, :-1][scored]
                     @ tip.lm_head_weight(model).T) for role, model in models.items()}
    stats = score.token_stats(logits["student"], logits["teacher"])
    _, gradient = score.divergence_and_grad(logits["student"], logits["teacher"], "reverse_kl")
    gradient_norm = gradient.double().norm(dim=-1)
    h = score.normalized_entropy(stats.entropy, logits["student"].shape[-1])
    quadrant = tip.load_select().quadrants(h, stats.reverse_kl, torch.ones_like(h, dtype=torch.bool))
    misconception, offset = torch.zeros_like(h, dtype=torch.bool), 0
    for ids, keep in zip(rollouts.input_ids, rollouts.response_mask):
        tokens = tokenizer.convert_ids_to_tokens(ids[keep].tolist())
        misconception[[offset + i for i in misconception_positions(tokens)]] = True
        offset += len(tokens)
    kl = stats.reverse_kl.double()
    report["tokens"] = int(h.numel())
    report["quadrants"] = {row["quadrant"]: {"token_share": round(row["token_share"], 4),
                                             "kl_mass_share": round(row["kl_mass_share"], 4)}
                           for row in evaluate.quadrant_report(h, stats.entropy, stats.reverse_kl, quadrant)}
    report["rank_correlation_entropy_kl"] = round(rank_correlation(stats.entropy, stats.reverse_kl), 4)
    report["misconception"] = {
        "token_share": round(float(misconception.double().mean()), 4),
        "kl_mass_share": round(float(kl[misconception].sum() / kl.sum()), 4),
        "gradient_norm_share": round(float(gradient_norm[misconception].sum() / gradient_norm.sum()), 4),
        "gradient_norm_vs_mean_token": round(float(gradient_norm[misconception].mean() / gradient_norm.mean()), 4),
        "quadrant_shares": {f"Q{q}": round(float((quadrant[misconception] == q).double().mean()), 4)
                            for q in range(1, 5)} if misconception.any() else {},
        "mean_student_p": round(float(torch.softmax(logits["student"][misconception], -1).max(-1).values.mean()), 4)
        if misconception.any() else None}
    return report
