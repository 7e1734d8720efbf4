"""The built-in worlds by name (paper §3–4, §7): their pairs, splits, tasks and known mistakes, for train.py and
evaluate.py. A world `<name>` is a module of this folder, `worlds/<name>.py` (toy, facts, agent), and DeepPlanning's
travel tasks are `worlds/deepplanning.py`; a prompt source that names none of them is an ordinary prompt set.
These are test beds of the method, not the method: the paper's files sit one folder up.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

import data
import pair
import tip

# Each is a module of its own, `worlds/<name>.py`, with `<name>_world(cache_dir) -> folder` (teacher/ and student/,
# built on first use and cached) and `<name>_problems(split, cache_dir) -> [{"problem", "answer"}]`; a world
# whose problems are conversations with tools also has `<name>_task(problem) -> rollout.Task`.
WORLDS = ("toy", "facts", "agent")


def world_module(name: str):
    """worlds/<name>.py, imported on first use: a run loads only the world it names."""
    return importlib.import_module(f"{__name__}.{name}")


def world_folder(name: str, cache_dir: str = "") -> Path:
    """The folder of built-in world `name`: teacher/, student/ and its splits."""
    return Path(getattr(world_module(name), f"{name}_world")(cache_dir or None))


def world_problems(name: str, split: str, cache_dir: str = "") -> list[dict]:
    """[{"problem", "answer"}] of a split of built-in world `name`."""
    return getattr(world_module(name), f"{name}_problems")(split, cache_dir or None)


def world_mistake_mask(name: str, tokenizer, rollouts, prompt_texts: list[str]) -> torch.Tensor | None:
    """[B, L] bool: the response tokens where the student writes built-in world `name`'s known mistake (its
    `<name>_mistake_positions(prompt_text, response_tokens)`); None for a prompt set that is no such world."""
    module = world_module(name) if name in WORLDS else None
    find = getattr(module, f"{name}_mistake_positions", None)
    if find is None:
        return None
    mask = torch.zeros_like(rollouts.response_mask, dtype=torch.bool)
    for row, (ids, sampled) in enumerate(zip(rollouts.input_ids, rollouts.response_mask)):
        columns = sampled.nonzero().squeeze(1)
        tokens = tokenizer.convert_ids_to_tokens(ids[columns].tolist())
        mask[row, columns[find(prompt_texts[int(rollouts.prompt_index[row])], tokens)]] = True
    return mask


def load_pair(config: tip.Config, device):
    """pair.load_pair of --teacher/--student; with neither, the pair of the built-in world named by --prompts
    (the toy world unless --prompts names another)."""
    teacher, student = config.teacher, config.student
    if not teacher and not student:
        folder = world_folder(config.prompts if config.prompts in WORLDS else "toy", config.world_dir)
        teacher, student = str(folder / "teacher"), str(folder / "student")
    return pair.load_pair(teacher, student, device, config.dtype, config.attn_implementation)


def world_tasks(name: str, problems: list[dict], tokenizer, switches: dict | None = None) -> dict | None:
    """{formatted prompt: rollout.Task} of a built-in world whose problems are conversations with tools (its
    `<name>_task`); None for any other prompt source."""
    make_task = getattr(world_module(name), f"{name}_task", None) if name in WORLDS else None
    if make_task is None:
        return None
    return {data.format_prompt(tokenizer, p["problem"], switches): make_task(p) for p in problems}


def load_prompts(config: tip.Config, tokenizer) -> list[dict]:
    """data.load_prompts, with a built-in world's train split when --prompts names one (and, for a world of
    conversations, each prompt's "task"); deepplanning:PATH gives the train split of DeepPlanning's tasks."""
    if config.prompts.startswith("deepplanning:"):
        return task_prompts(config, tokenizer, world_module("deepplanning").deepplanning_tasks(
            config.prompts.split(":", 1)[1], "train"))
    problems = world_problems(config.prompts, "train", config.world_dir) if config.prompts in WORLDS else None
    prompts = data.load_prompts(config, tokenizer, problems)
    tasks = world_tasks(config.prompts, problems or [], tokenizer, data.template_switches(config))
    return [{**p, "task": tasks[p["prompt"]]} for p in prompts] if tasks else prompts


def task_prompts(config: tip.Config, tokenizer, tasks: list) -> list[dict]:
    """[{"prompt", "answer": None, "task"}] of conversations with tools: each task's opening messages and tool
    schemas under the chat template; tasks over --max-prompt-len tokens are dropped and counted."""
    switches = data.template_switches(config)
    texts = [tokenizer.apply_chat_template(t.messages, tools=t.tools or None, tokenize=False,
                                           add_generation_prompt=True, **switches) for t in tasks]
    lengths = [len(ids) for ids in data.encode_prompts(tokenizer, texts)]
    prompts = [{"prompt": text, "answer": None, "task": task}
               for text, task, length in zip(texts, tasks, lengths) if length <= config.max_prompt_len]
    tip.log(f"prompts: {len(prompts)} conversations from {config.prompts} ({len(tasks) - len(prompts)} longer than "
            f"{config.max_prompt_len} tokens dropped)")
    if not prompts:
        raise tip.InputError(f"no tasks left from {config.prompts!r}: raise --max-prompt-len (the longest opening "
                             f"prompt has {max(lengths, default=0)} tokens)")
    return prompts


def held_out_problems(config: tip.Config, tokenizer) -> list[dict]:
    """A built-in world's held-out split for train.py's in-training evaluation, [{"prompt", "answer", "task"}];
    empty for other prompt sets (evaluate.py measures those) or without --eval-problems."""
    if config.prompts not in WORLDS or not config.eval_problems:
        return []
    switches = data.template_switches(config)
    problems = world_problems(config.prompts, "test", config.world_dir)[:config.eval_problems]
    tasks = world_tasks(config.prompts, problems, tokenizer, switches) or {}
    return [{"prompt": prompt, "answer": p["answer"], "task": tasks.get(prompt)}
            for p, prompt in ((p, data.format_prompt(tokenizer, p["problem"], switches)) for p in problems)]


def model_path(name: str, cache_dir: str = "") -> str:
    """`toy-teacher`, `facts-student`, … name a built-in world's model folder; anything else is returned as is."""
    world, _, role = name.partition("-")
    if world in WORLDS and role in ("teacher", "student") and not Path(name).exists():
        return str(world_folder(world, cache_dir) / role)
    return name
