"""The agent world (paper §7, agentic setting): a student whose confident mistake is in how it calls a tool.

A problem names constants ("A+C-B=") whose values only a `lookup` tool knows; a solution is a conversation: a
tool call per name, then the arithmetic ending in \\boxed{answer}. The teacher calls the tool well; the student
confidently passes the wrong name for a few constants, so its mistake is the argument token of its own call
(§4's Q3: low entropy h, Eq. 2; high divergence δ, Eq. 3).

    python -m worlds.agent                              # build the world (cached; --rebuild: again), say where
    python benchmarks/study.py --world agent --report   # measure it: accuracies, quadrants, confused arguments
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import tip
from rollout import Task
from worlds import facts, toy

RECIPE_VERSION = 1  # bump when the code of the recipe changes in a way its fields do not show
TOOL = "<|tool|>"  # the template's tool-message marker
CALL_OPEN, CALL_CLOSE = '<tool_call>{"name": "lookup", "arguments": {"name": "', '"}}</tool_call>'
SPLITS = facts.SPLITS
CHAT_TEMPLATE = (  # the toy template and tool messages; a tool result is context, never an assistant target
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}<|tool|>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# The world. A problem names constants, as in the facts world ("A+C-B="), but no model knows their values: a
# `lookup` tool does. A solution is a conversation: the assistant calls the tool once per name, in order (Qwen3's
# call format), reads the results, then writes the arithmetic ending in \boxed{answer}:
#
#     user       A+C-B=
#     assistant  <tool_call>{"name": "lookup", "arguments": {"name": "A"}}</tool_call> … (C, B)   (sampled)
#     tool       7 / 3 / 2                                                                    (context)
#     assistant  7+3=10\n10-2=\boxed{8}                                                       (sampled)
#
# The teacher calls the tool well. The student confuses a few names with others, with confidence: for a confused
# name X it passes the argument Y (`student_confidence` 0.99 on Y, the rest on X — so reverse KL's gradient there
# does not vanish), reads Y's value and computes with it. Only the argument token carries the mistake: the
# teacher, too, computes with whatever value the tool returned (its SFT replaces `teacher_copy_share` of the
# results with other values, so it learns to read them). The argument is §4's Q3 token in the student's own turn,
# kept below the median entropy by the shared freedom of a space between pieces (`space_share`), as in facts.py.
@dataclass(frozen=True)
class AgentRecipe:
    """Everything the world is built from (its fields and RECIPE_VERSION name the cache folder). The fields
    facts.make_splits reads keep their names there."""
    seed: int = 0
    facts: int = 16                  # named constants A, B, …, each 1..9, behind the lookup tool
    wrong_facts: int = 4             # names the student confuses with another
    min_terms: int = 2
    max_terms: int = 3
    train_problems: int = 2000
    test_problems: int = 400
    trigger_problems: int = 300      # each needs a confused name whose value changes the answer
    clean_problems: int = 300        # none needs a confused name
    space_share: float = 0.25        # chance of a space between two pieces of a turn: shared freedom (Q2)
    student_confidence: float = 0.99  # on the wrong argument: its entropy (~0.08 nats) must stay below the median
    teacher_copy_share: float = 0.2  # tool results the teacher's SFT replaces, so it reads rather than recalls
    batch_size: int = 64
    head_dim: int = 32
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    student_hidden: int = 64
    student_layers: int = 2
    student_steps: int = 400
    student_lr: float = 2e-3


DEFAULT_RECIPE = AgentRecipe()


def confusions(recipe: AgentRecipe | None = None) -> dict[str, str]:
    """{X: Y}: the names the student looks up wrongly, and what it looks up instead (a name of another value)."""
    recipe = recipe or DEFAULT_RECIPE
    truth = facts.fact_table(recipe)[0]
    rng = random.Random(f"{recipe.seed}-confusions")
    return {x: rng.choice([y for y in truth if truth[y] != truth[x]])
            for x in sorted(rng.sample(sorted(truth), recipe.wrong_facts))}


def agent_problems(split: str, cache_dir: str | Path | None = None, recipe: AgentRecipe | None = None) -> list[dict]:
    """[{"problem", "answer"}] of a split: "train", "test", "trigger" or "clean" (as in the facts world, with
    the values the student's confusions lead to as its beliefs)."""
    recipe = recipe or DEFAULT_RECIPE
    if split not in SPLITS:
        raise ValueError(f"unknown agent split {split!r}: choose one of {', '.join(SPLITS)}")
    world = world_path(cache_dir, recipe)
    if (world / "world.json").exists():
        return toy.read_split(world, split)
    truth = facts.fact_table(recipe)[0]
    beliefs = {**truth, **{x: truth[y] for x, y in confusions(recipe).items()}}
    return facts.make_splits(recipe, beliefs)[split]


def lookup_tool(recipe: AgentRecipe | None = None):
    truth = facts.fact_table(recipe or DEFAULT_RECIPE)[0]

    def lookup(name: str) -> int:
        """Look up the value of a named constant.

        Args:
            name: the constant's name, one capital letter
        """
        return truth[name]
    return lookup


def agent_task(problem: dict, recipe: AgentRecipe | None = None) -> Task:
    """The conversation of one problem: the user's question, the lookup tool, and reward 1 for the right
    \\boxed{} answer in the last assistant turn."""
    def reward(conversation: list[dict]) -> float:
        last = next((m["content"] for m in reversed(conversation) if m["role"] == "assistant"), "")
        found = re.findall(r"\\boxed\{(-?\d+)\}", last)
        return float(bool(found) and found[-1] == problem["answer"])
    return Task([{"role": "user", "content": problem["problem"]}], [lookup_tool(recipe)], reward)


def agent_mistake_positions(prompt_text: str, response_tokens: list[str],
                            recipe: AgentRecipe | None = None) -> list[int]:
    """Indices of the sampled tokens that are the argument of a call meant for a confused name: the k-th call
    is meant for the problem's k-th name (read from the prompt), whatever argument it holds."""
    names, _ = facts.parse_problem(prompt_text)
    confused = confusions(recipe)
    calls = [i + 1 for i, token in enumerate(response_tokens[:-1]) if token == CALL_OPEN]
    return [position for position, name in zip(calls, names) if name in confused]


# ---------------------------------------------------------------- tokenizer, conversations, SFT

def build_tokenizer():
    """The facts world's character tokenizer, plus the tool marker and the call's fixed text as tokens."""
    from tokenizers import AddedToken
    tokenizer = facts.build_tokenizer()
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in (TOOL, CALL_OPEN, CALL_CLOSE)])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def arithmetic(values: list[int], ops: str, space=lambda: "") -> str:
    """The answer turn: one step per operator on the looked-up values, the last result in \\boxed{}; `space()`
    may put a space between pieces (never before a computed digit: "=" stays with what follows it)."""
    total, pieces = values[0], []
    for i, (op, value) in enumerate(zip(ops, values[1:])):
        new = total + value if op == "+" else total - value
        pieces += [str(total), op, str(value)]
        pieces += ["=", f"{toy.BOX}{new}}}"] if i == len(ops) - 1 else [f"={new}", "\n"]
        total = new
    return pieces[0] + "".join(space() + piece for piece in pieces[1:])


def conversation_ids(tokenizer, names: str, ops: str, arguments: str, results: list[int], space=lambda: ""):
    """(token ids, labels-mask, argument positions) of a whole conversation as generate_conversations lays it
    out: the prompt, the call turn with its EOS, the results (context), the answer turn with its EOS. `space()`
    may put a space after a call and between the answer's pieces (trap 1 of the facts world)."""
    piece = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    ids = piece(data.format_prompt(tokenizer, facts.problem_text(names, ops)))
    learned, argument_positions = [False] * len(ids), []
    for name in arguments:
        ids += piece(CALL_OPEN)
        argument_positions.append(len(ids))
        ids += piece(name) + piece(CALL_CLOSE + space())
    ids.append(tokenizer.eos_token_id)
    learned += [True] * (len(ids) - len(learned))
    context = piece("".join(f"{TOOL}{r}" for r in results) + "<|assistant|>")
    ids += context
    learned += [False] * len(context)
    answer = piece(arithmetic(results, ops, space)) + [tokenizer.eos_token_id]
    return ids + answer, learned + [True] * len(answer), argument_positions


def sft_batches(tokenizer, recipe: AgentRecipe, student: bool, held_out: set[str], stream: int, steps: int):
    """Batches (ids, mask, labels, alternative labels) for facts.sft: the teacher's conversations call every
    name right (a share of its results replaced); the student's call Y for a confused X, with the soft target
    at that argument (label Y, alternative X)."""
    truth, confused = facts.fact_table(recipe)[0], confusions(recipe) if student else {}
    rng = random.Random(f"{recipe.seed}-agent-sft-{stream}")
    for _ in range(steps):
        rows = []
        while len(rows) < recipe.batch_size:
            names, ops = facts.random_problem(rng, recipe, truth)
            if facts.problem_text(names, ops) in held_out:
                continue
            arguments = "".join(confused.get(n, n) for n in names)
            results = [truth[a] if student or rng.random() >= recipe.teacher_copy_share
                       else rng.choice([v for v in range(1, 10) if v != truth[a]]) for a in arguments]
            space = lambda: " " if rng.random() < recipe.space_share else ""  # noqa: E731
            rows.append((conversation_ids(tokenizer, names, ops, arguments, results, space), names))
        width = max(len(ids) for (ids, _, _), _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        attention_mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
        alternative = torch.full_like(input_ids, -100)
        for b, ((ids, learned, positions), names) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
            labels[b, :len(ids)] = torch.where(torch.tensor(learned), torch.tensor(ids), -100)
            for position, name in zip(positions, names):
                if name in confused:
                    alternative[b, position] = tokenizer.convert_tokens_to_ids(name)
        yield input_ids, attention_mask, labels, alternative


# ---------------------------------------------------------------- the cache

def world_path(cache_dir: str | Path | None = None, recipe: AgentRecipe | None = None) -> Path:
    return tip.cache_folder(cache_dir, f"agent-v{RECIPE_VERSION}", recipe or DEFAULT_RECIPE)


def build_world(folder: Path, recipe: AgentRecipe, log=print) -> None:
    """Write the splits, teacher/ and student/ (each with the tokenizer) and world.json into `folder`."""
    start, truth = time.time(), facts.fact_table(recipe)[0]
    splits = facts.make_splits(recipe, {**truth, **{x: truth[y] for x, y in confusions(recipe).items()}})
    for name, problems in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    held_out = {p["problem"] for name in ("test", "trigger", "clean") for p in splits[name]}
    tokenizer = build_tokenizer()
    for stream, role in enumerate(("teacher", "student")):
        hidden, layers, steps, lr = (getattr(recipe, f"{role}_{k}") for k in ("hidden", "layers", "steps", "lr"))
        torch.manual_seed(recipe.seed + stream)
        model = toy.new_model(tokenizer, hidden, layers, recipe.head_dim)
        log(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} SFT steps")
        batches = sft_batches(tokenizer, recipe, role == "student", held_out, stream, steps)
        facts.sft(model, batches, steps, lr, recipe.student_confidence if role == "student" else 1.0, log)
        model.save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    info = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "facts": truth,
            "confusions": confusions(recipe), "build_seconds": round(time.time() - start, 1),
            "torch_threads": torch.get_num_threads()}
    (folder / "world.json").write_text(json.dumps(info, indent=1) + "\n")  # last: it marks a finished world


def agent_world(cache_dir: str | Path | None = None, recipe: AgentRecipe | None = None, rebuild: bool = False,
                log=print) -> Path:
    """The agent world's folder — teacher/, student/, its splits as .jsonl, world.json — built on first use
    and cached (`tip.build_once`)."""
    recipe = recipe or DEFAULT_RECIPE
    return tip.build_once(world_path(cache_dir, recipe), lambda tmp: build_world(tmp, recipe, log), rebuild, log)


def main(argv: list[str] | None = None) -> None:
    args = tip.parse_flags(toy.WorldFlags, argv, "Build the agent world (cached) and say where it is (paper §7).")
    if args.threads:
        torch.set_num_threads(args.threads)
    world = agent_world(args.world_dir, DEFAULT_RECIPE, rebuild=args.rebuild)
    info = json.loads((world / "world.json").read_text())
    print(f"agent world {world}: built in {info['build_seconds']:.0f} s; confusions "
          + ", ".join(f"{x}->{y}" for x, y in info["confusions"].items()))


if __name__ == "__main__":
    main()
