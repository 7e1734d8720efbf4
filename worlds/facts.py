"""The facts world (paper §3–4, Prop. 2): a student whose confident mistakes are memorized facts.

Problems name constants (A+C-B=); a solution writes the value of each fact it needs, then does the arithmetic,
ending in \\boxed{answer}. The teacher knows every fact; the student learned a few wrong, with confidence, so
distillation can fix a wrong fact only through its own value token (§4's Q3: low entropy h, Eq. 2; high
divergence δ, Eq. 3), which Prop. 2 says entropy-only rules never keep.

    python -m worlds.facts                              # build the world (cached; --rebuild: again), its beliefs
    python benchmarks/study.py --world facts --report   # measure it: accuracies, quadrants, wrong-fact tokens
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
from worlds import toy

# Why facts: the toy world's confident mistake (never carrying) is one skill shared with every uncertain digit, so
# any rule fixes it through other tokens. Here the mistake is a fact: a table of named constants (each name one
# token, A, B, …, each value one digit) that problems refer to. A solution writes the value of each fact it needs,
# then does the arithmetic, ending in \boxed{answer}:
#
#     problem  A+C-B=          solution  A=7\nC=3 \nB=2\n7+3=10\n10 -2=\boxed{8}
#
# The teacher knows every fact. The student learned a few facts wrong, with confidence: at a wrong fact's value it
# puts `student_confidence` (0.95) on its own value and the rest on the teacher's — a soft SFT target, so the
# reverse-KL gradient there, which scales with P_S(teacher's value), does not vanish. A value is a lookup by name,
# not a skill: no other token carries it (the arithmetic copies whatever value the line above wrote, for the
# teacher too), so distillation can fix a wrong fact only through the fact's own value token (§4's Q3: low entropy
# h, Eq. 2; high divergence δ, Eq. 3). Prop. 2 says entropy-only rules never keep those tokens. The rules and the
# exclusion control trained on this world: python benchmarks/study.py --world facts.

RECIPE_VERSION = 1  # bump when the code of the recipe changes in a way its fields do not show
NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the facts' names, one token each
CHARS = "0123456789+-=\n }{" + NAMES
SPLITS = ("train", "test", "trigger", "clean")


# Three traps shape the recipe and the format.
# 1. A median split needs the typical token to be less sharp than a confident mistake (entropy 0.2 nats at
#    0.95/0.05), yet format tokens are near-certain. So, as in real text, the format has genuine freedom that
#    teacher and student share: between the pieces of a solution a space may stand (`space_share`); those tokens
#    are high h and low δ (Q2) for both models and stay so under distillation, so a wrong fact stays below the
#    median entropy while everything else trains. No space may precede a value or a computed digit, whose
#    distributions must stay pure.
# 2. The student is smaller and trained less than the teacher, so its arithmetic is only partly learned (Q1, the
#    uncertain signal of real OPD).
# 3. A teacher that only ever saw true values recalls a fact again wherever the solution uses it, and then
#    disagrees with a student's wrong value in every later line: those tokens would fix the fact too. So the
#    teacher's SFT writes `teacher_copy_share` of its fact lines with another value (no loss on it) and does the
#    arithmetic with that value: the teacher learns to use the value the line above wrote, and a wrong fact differs
#    only where it is written.
@dataclass(frozen=True)
class FactsRecipe:
    """Everything the world is built from. Its fields and RECIPE_VERSION name the cache folder, so a
    different recipe never reuses a stale world. The defaults build in a few minutes on a 2-core CPU."""
    seed: int = 0
    facts: int = 16                  # named constants A, B, …, each 1..9
    wrong_facts: int = 4             # of them the student learned wrong
    min_terms: int = 2               # facts per problem
    max_terms: int = 3
    train_problems: int = 2000       # the prompts of distillation (a mix)
    test_problems: int = 400         # held out, a mix
    trigger_problems: int = 300      # held out, each needs a wrong fact
    clean_problems: int = 300        # held out, none needs a wrong fact
    space_share: float = 0.25        # chance that a space stands between two pieces of a solution (trap 1)
    student_confidence: float = 0.95  # the student's SFT target on its own wrong value; the rest: the teacher's
    teacher_copy_share: float = 0.2  # fact lines the teacher's SFT writes with another value, unlearned (trap 3)
    batch_size: int = 64
    head_dim: int = 32
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    student_hidden: int = 64         # smaller and trained less: its arithmetic is only partly learned (trap 2)
    student_layers: int = 2
    student_steps: int = 400
    student_lr: float = 2e-3


DEFAULT_RECIPE = FactsRecipe()


# ---------------------------------------------------------------- the facts and the task

def fact_table(recipe: FactsRecipe | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """(the true values, the student's beliefs): beliefs differ from the truth at `wrong_facts` names."""
    recipe = recipe or DEFAULT_RECIPE  # looked up at call time, so a test can swap the default
    rng = random.Random(f"{recipe.seed}-facts")
    truth = {name: rng.randint(1, 9) for name in NAMES[:recipe.facts]}
    wrong = sorted(rng.sample(sorted(truth), recipe.wrong_facts))
    beliefs = {**truth, **{name: rng.choice([v for v in range(1, 10) if v != truth[name]]) for name in wrong}}
    return truth, beliefs


def wrong_names(recipe: FactsRecipe | None = None) -> set[str]:
    truth, beliefs = fact_table(recipe)
    return {name for name in truth if truth[name] != beliefs[name]}


def solve(names: str, ops: str, values: dict[str, int], rng: random.Random | None = None,
          space_share: float = 0.0) -> tuple[str, int]:
    """A worked solution: one line per fact, then one step per operator, the last result in \\boxed{}.
    A space stands in each slot between pieces with probability `space_share` (never before a value or a
    computed digit: pieces keep "=" with what follows it)."""
    pieces = [piece for name in names for piece in (name, f"={values[name]}", "\n")]
    total = values[names[0]]
    for i, (op, name) in enumerate(zip(ops, names[1:])):
        new = total + values[name] if op == "+" else total - values[name]
        pieces += [str(total), op, str(values[name])]
        pieces += ["=", f"{toy.BOX}{new}}}"] if i == len(ops) - 1 else [f"={new}", "\n"]
        total = new
    text = pieces[0] + "".join((" " if rng is not None and rng.random() < space_share else "") + piece
                               for piece in pieces[1:])
    return text, total


def _check(recipe: FactsRecipe) -> None:
    if not 2 <= recipe.facts <= len(NAMES) or not 0 <= recipe.wrong_facts < recipe.facts:
        raise ValueError(f"facts={recipe.facts}, wrong_facts={recipe.wrong_facts}: need 2 <= facts <= "
                         f"{len(NAMES)} and 0 <= wrong_facts < facts")
    if not 2 <= recipe.min_terms <= recipe.max_terms <= min(3, recipe.facts):
        raise ValueError(f"terms {recipe.min_terms}..{recipe.max_terms}: need 2 <= min <= max <= 3 (the "
                         "solution must fit the toy preset's 48 response tokens)")


def random_problem(rng: random.Random, recipe: FactsRecipe, truth: dict[str, int]) -> tuple[str, str]:
    names = "".join(rng.sample(NAMES[:recipe.facts], rng.randint(recipe.min_terms, recipe.max_terms)))
    ops, total = "", truth[names[0]]
    for name in names[1:]:
        op = rng.choice("+-") if total >= truth[name] else "+"  # the correct path never goes below 0
        ops += op
        total += truth[name] if op == "+" else -truth[name]
    return names, ops


def problem_text(names: str, ops: str) -> str:
    return "".join(f"{n}{op}" for n, op in zip(names, ops)) + f"{names[-1]}="


def parse_problem(text: str) -> tuple[str, str]:
    """(names, operators) of a problem text such as "A+C-B="."""
    return "".join(c for c in text if c in NAMES), "".join(c for c in text if c in "+-")


def make_splits(recipe: FactsRecipe | None = None, beliefs: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """The held-out splits ("test" a mix, "trigger" each needing a wrong fact whose error changes the answer,
    "clean" needing none) and the distillation "train" split (a mix): disjoint, from the seed. `beliefs`: the
    values the student uses (default: the facts it learned)."""
    recipe = recipe or DEFAULT_RECIPE
    _check(recipe)
    truth, learned = fact_table(recipe)
    beliefs = beliefs or learned
    wrong = {name for name in truth if beliefs[name] != truth[name]}
    rng, seen, splits = random.Random(recipe.seed), set(), {}
    wanted = {"test": lambda names, ops: True, "clean": lambda names, ops: not set(names) & wrong,
              "trigger": lambda names, ops: solve(names, ops, beliefs)[1] != solve(names, ops, truth)[1],
              "train": lambda names, ops: True}
    for name in ("test", "trigger", "clean", "train"):
        size, splits[name] = getattr(recipe, f"{name}_problems"), []
        for _ in range(200 * size + 1000):
            if len(splits[name]) == size:
                break
            names, ops = random_problem(rng, recipe, truth)
            text = problem_text(names, ops)
            if text not in seen and wanted[name](names, ops):
                seen.add(text)
                splits[name].append({"problem": text, "answer": str(solve(names, ops, truth)[1])})
        else:
            raise ValueError(f"cannot draw {size} distinct {name} problems: allow more facts or terms, "
                             "or ask for fewer problems")
    return splits


def facts_problems(split: str, cache_dir: str | Path | None = None,
                   recipe: FactsRecipe | None = None) -> list[dict]:
    """[{"problem", "answer"}] of one split: "train", "test", "trigger" or "clean" (the last three held out).
    Read from the world when it is built, else drawn from the seed (the same problems, without a build)."""
    if split not in SPLITS:
        raise ValueError(f"unknown facts split {split!r}: choose one of {', '.join(SPLITS)}")
    world = world_path(cache_dir, recipe)
    return toy.read_split(world, split) if (world / "world.json").exists() else make_splits(recipe)[split]


def facts_mistake_positions(prompt_text: str, response_tokens: list[str],
                            recipe: FactsRecipe | None = None) -> list[int]:
    """Indices of the response tokens at which a value of a wrongly learned fact is written: the token after
    "X=" (spaces allowed around "=") for each wrong fact X, whatever value it holds in this sample.

    A fact line names its fact, so the response alone decides; `prompt_text` (the chat-formatted prompt) is
    part of the signature every world shares.
    """
    return value_positions(response_tokens, wrong_names(recipe))


def value_positions(response_tokens: list[str], names: set[str]) -> list[int]:
    """Indices of the tokens that hold the value written after "X=" (spaces allowed around "=") for X in `names`."""
    text, owner = "", []
    for index, token in enumerate(response_tokens):
        text += token
        owner += [index] * len(token)
    return [owner[m.end()] for m in re.finditer(f"([{NAMES}]) *= *", text) if m[1] in names and m.end() < len(text)]


# ---------------------------------------------------------------- tokenizer, models, SFT

def build_tokenizer():
    """Character-level like the toy world's (\\boxed{ one token), over digits, operators and the names."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [toy.PAD, toy.BOS, toy.EOS, toy.UNK, toy.SYSTEM, toy.USER, toy.ASSISTANT]
    vocab = {token: i for i, token in enumerate(specials + [toy.BOX] + list(CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=toy.UNK))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(toy.BOX, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=toy.BOS, eos_token=toy.EOS,
                                   pad_token=toy.PAD, unk_token=toy.UNK, padding_side="left",
                                   chat_template=toy.CHAT_TEMPLATE)


def sft_batches(tokenizer, recipe: FactsRecipe, values: dict[str, int], truth: dict[str, int],
                held_out: set[str], stream: int, steps: int, copy_share: float = 0.0):
    """`steps` batches (ids, attention mask, labels, alternative labels) of prompt-formatted solutions written
    with `values`. labels are -100 off the response; alternative labels hold the true value where `values`
    is wrong (the soft target's other half) and -100 elsewhere. With `copy_share`, that share of fact lines
    writes another value, carried through the arithmetic, with label -100 on it (trap 3)."""
    rng, wrong = random.Random(f"{recipe.seed}-sft-{stream}"), {n for n in truth if truth[n] != values[n]}
    for _ in range(steps):
        texts, prompt_lengths, rewritten = [], [], []
        while len(texts) < recipe.batch_size:
            names, ops = random_problem(rng, recipe, truth)
            if problem_text(names, ops) in held_out:
                continue
            changed = {n: rng.choice([v for v in range(1, 10) if v != values[n]]) for n in names
                       if copy_share and rng.random() < copy_share}
            prompt = data.format_prompt(tokenizer, problem_text(names, ops))
            text = solve(names, ops, {**values, **changed}, rng, recipe.space_share)[0]
            texts.append(prompt + text + tokenizer.eos_token)
            prompt_lengths.append(len(tokenizer(prompt, add_special_tokens=False).input_ids))
            rewritten.append(set(changed))
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        alternative = torch.full_like(labels, -100)
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100
            tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[row, length:].tolist())
            for position in value_positions(tokens, rewritten[row]):
                labels[row, length + position] = -100  # a value written on purpose wrong: used, not learned
            for position in facts_mistake_positions("", tokens, recipe) if wrong else []:
                name = re.findall(f"[{NAMES}]", "".join(tokens[:position]))[-1]
                alternative[row, length + position] = tokenizer.convert_tokens_to_ids(str(truth[name]))
        yield batch.input_ids, batch.attention_mask, labels, alternative


def sft(model, batches, steps: int, lr: float, confidence: float = 1.0, log=print) -> None:
    """Cross-entropy on the response tokens, AdamW, warmup then cosine to 10 % of lr. Where a batch has an
    alternative label the target is soft: `confidence` on the label, the rest on the alternative."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, steps // 20)
    model.train()
    for step, (input_ids, attention_mask, labels, alternative) in enumerate(batches):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].flatten(0, 1)
        targets, alternative = labels[:, 1:].flatten(), alternative[:, 1:].flatten()
        loss = F.cross_entropy(logits, targets, reduction="none")
        soft = alternative != -100
        if soft.any():
            other = F.cross_entropy(logits[soft], alternative[soft], reduction="none")
            loss[soft] = confidence * loss[soft] + (1 - confidence) * other
        loss = loss.sum() / (targets != -100).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps} loss {loss.item():.4f}")
    model.eval()


# ---------------------------------------------------------------- the cache

def world_path(cache_dir: str | Path | None = None, recipe: FactsRecipe | None = None) -> Path:
    """<cache_dir, else $TIP_CACHE, else ~/.cache/tip>/facts-v<RECIPE_VERSION>-<hash of the recipe's fields>."""
    recipe = recipe or DEFAULT_RECIPE
    return tip.cache_folder(cache_dir, f"facts-v{RECIPE_VERSION}", recipe)


def build_world(folder: Path, recipe: FactsRecipe, log=print) -> None:
    """Write the splits, teacher/ and student/ (each with the tokenizer) and world.json into `folder`."""
    start = time.time()
    splits = make_splits(recipe)
    for name, problems in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    held_out = {p["problem"] for name in ("test", "trigger", "clean") for p in splits[name]}
    tokenizer, (truth, beliefs) = build_tokenizer(), fact_table(recipe)
    roles = {"teacher": (recipe.teacher_hidden, recipe.teacher_layers, recipe.teacher_steps, recipe.teacher_lr,
                         truth),
             "student": (recipe.student_hidden, recipe.student_layers, recipe.student_steps, recipe.student_lr,
                         beliefs)}
    for stream, (role, (hidden, layers, steps, lr, values)) in enumerate(roles.items()):
        torch.manual_seed(recipe.seed + stream)
        model = toy.new_model(tokenizer, hidden, layers, recipe.head_dim)
        log(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} SFT steps")
        batches = sft_batches(tokenizer, recipe, values, truth, held_out, stream, steps,
                              recipe.teacher_copy_share if role == "teacher" else 0.0)
        sft(model, batches, steps, lr, recipe.student_confidence if role == "student" else 1.0, log)
        model.save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    info = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "facts": truth,
            "student_beliefs": beliefs, "wrong_facts": sorted(wrong_names(recipe)),
            "build_seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads()}
    (folder / "world.json").write_text(json.dumps(info, indent=1) + "\n")  # last: it marks a finished world


def facts_world(cache_dir: str | Path | None = None, recipe: FactsRecipe | None = None, rebuild: bool = False,
                log=print) -> Path:
    """The facts world's folder — teacher/, student/, its splits as .jsonl, world.json — built on first use
    and cached (`world_path`, `tip.build_once`)."""
    recipe = recipe or DEFAULT_RECIPE
    return tip.build_once(world_path(cache_dir, recipe), lambda tmp: build_world(tmp, recipe, log), rebuild, log)


# ---------------------------------------------------------------- the report

@torch.no_grad()
def fact_probabilities(model, tokenizer, recipe: FactsRecipe | None = None) -> dict[str, list[float]]:
    """For each fact X, the model's distribution over the digits 0..9 at the value of "X=", as the first line
    of the solution of "X+Y=" (Y the next fact), averaged over a space or none after X."""
    recipe = recipe or DEFAULT_RECIPE
    names = NAMES[:recipe.facts]
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    texts = [data.format_prompt(tokenizer, f"{x}+{names[(i + 1) % len(names)]}=") + f"{x}{space}="
             for i, x in enumerate(names) for space in ("", " ")]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")  # left padding
    probs = torch.softmax(model(**batch).logits[:, -1].double(), -1)[:, digits].view(len(names), 2, 10).mean(1)
    return {x: [round(p, 5) for p in row.tolist()] for x, row in zip(names, probs)}


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = tip.parse_flags(toy.WorldFlags, argv, "Build the facts world (cached) and show what each model "
                           "believes of each fact (paper §3–4, Prop. 2).")
    if args.threads:
        torch.set_num_threads(args.threads)
    world = facts_world(args.world_dir, DEFAULT_RECIPE, rebuild=args.rebuild)
    info = json.loads((world / "world.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(world / "student")
    probs = {role: fact_probabilities(AutoModelForCausalLM.from_pretrained(world / role).eval(), tokenizer)
             for role in ("teacher", "student")}
    truth, beliefs = fact_table(DEFAULT_RECIPE)
    print(f"facts world {world}: built in {info['build_seconds']:.0f} s ({info['torch_threads']} torch threads); "
          + ", ".join(f"{s} {len(toy.read_split(world, s))}" for s in SPLITS) + " problems")
    print("fact  true  student  teacher p(true)  student p(own)  student p(true)  student entropy (nats)")
    for name in truth:
        p = torch.tensor(probs["student"][name])
        entropy = float(-(p * p.clamp(min=1e-12).log()).sum())
        print(f"{name:>4}  {truth[name]:>4}  {beliefs[name]:>7}{'*' if beliefs[name] != truth[name] else ' '}"
              f"  {probs['teacher'][name][truth[name]]:15.3f}  {probs['student'][name][beliefs[name]]:14.3f}"
              f"  {probs['student'][name][truth[name]]:15.3f}  {entropy:22.3f}")
    print("* learned wrong")


if __name__ == "__main__":
    main()
