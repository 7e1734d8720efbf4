"""The facts world (worlds/facts.py): facts, task, splits, wrong-fact positions, sizes, cache, and a miniature build."""
import dataclasses
import json
import random
import re

import pytest
import torch

import data
import worlds
import tip
from worlds import facts

TINY = facts.FactsRecipe(facts=6, wrong_facts=2, train_problems=30, test_problems=8, trigger_problems=6,
                         clean_problems=6, batch_size=4, head_dim=8, teacher_hidden=16, teacher_layers=1,
                         teacher_steps=2, student_hidden=8, student_layers=1, student_steps=2)


def quiet(message):
    pass


def _parse(problem):
    return facts.parse_problem(problem["problem"])


def test_the_student_believes_the_truth_except_at_the_wrong_facts():
    truth, beliefs = facts.fact_table()
    wrong = facts.wrong_names()
    assert len(truth) == facts.DEFAULT_RECIPE.facts and len(wrong) == facts.DEFAULT_RECIPE.wrong_facts
    assert {name for name in truth if truth[name] != beliefs[name]} == wrong
    assert all(1 <= v <= 9 for v in [*truth.values(), *beliefs.values()])
    assert facts.fact_table(TINY) == facts.fact_table(TINY)
    assert facts.fact_table(TINY) != facts.fact_table(dataclasses.replace(TINY, seed=1))


def test_solutions_write_each_fact_then_the_steps():
    values = {"A": 7, "B": 2, "C": 3}
    assert facts.solve("ACB", "+-", values) == ("A=7\nC=3\nB=2\n7+3=10\n10-2=\\boxed{8}", 8)
    assert facts.solve("BA", "-", values) == ("B=2\nA=7\n2-7=\\boxed{-5}", -5)  # a wrong path may go below 0
    rng = random.Random(0)
    texts = [facts.solve("ACB", "+-", values, rng, 0.5)[0] for _ in range(200)]
    assert all(t.replace(" ", "") == facts.solve("ACB", "+-", values)[0] for t in texts)
    assert len(set(texts)) > 50 and all("  " not in t for t in texts)
    # a space never stands before a value or a computed digit: "=" and what follows it are one piece
    assert not any(re.search(r"= [0-9-]", t) for t in texts)
    assert any("= \\boxed{" in t for t in texts) and any(" =" in t for t in texts)


def test_splits_are_deterministic_disjoint_and_correct():
    splits = facts.make_splits()
    assert splits == facts.make_splits()
    assert splits != facts.make_splits(dataclasses.replace(facts.DEFAULT_RECIPE, seed=1))
    recipe = facts.DEFAULT_RECIPE
    assert [len(splits[s]) for s in facts.SPLITS] == [recipe.train_problems, recipe.test_problems,
                                                      recipe.trigger_problems, recipe.clean_problems]
    texts = [p["problem"] for s in splits.values() for p in s]
    assert len(set(texts)) == len(texts)
    truth, beliefs = facts.fact_table()
    wrong = facts.wrong_names()
    for problem in (p for s in splits.values() for p in s):
        names, ops = _parse(problem)
        assert 2 <= len(names) <= 3 and len(set(names)) == len(names) and problem["problem"].endswith("=")
        expression = "".join(str(truth[c]) if c in truth else c for c in problem["problem"].rstrip("="))
        assert problem["answer"] == str(eval(expression)) == str(facts.solve(names, ops, truth)[1])
    for problem in splits["trigger"]:  # each needs a wrong fact, and the student's belief changes the answer
        names, ops = _parse(problem)
        assert set(names) & wrong and str(facts.solve(names, ops, beliefs)[1]) != problem["answer"]
    for problem in splits["clean"]:  # none needs one: the student's solution is the teacher's
        names, ops = _parse(problem)
        assert not set(names) & wrong and facts.solve(names, ops, beliefs) == facts.solve(names, ops, truth)
    mixed = [bool(set(_parse(p)[0]) & wrong) for p in splits["test"]]
    assert 0.2 < sum(mixed) / len(mixed) < 0.8


def test_facts_problems_without_a_world_and_bad_input():
    assert facts.facts_problems("clean", recipe=TINY) == facts.make_splits(TINY)["clean"]
    with pytest.raises(ValueError, match="unknown facts split"):
        facts.facts_problems("validation", recipe=TINY)
    with pytest.raises(ValueError, match="terms"):
        facts.make_splits(dataclasses.replace(TINY, max_terms=4))
    with pytest.raises(ValueError, match="wrong_facts"):
        facts.make_splits(dataclasses.replace(TINY, wrong_facts=6))
    with pytest.raises(ValueError, match="distinct"):
        facts.make_splits(dataclasses.replace(TINY, test_problems=1000))


def test_mistake_positions_are_the_values_of_the_wrong_facts():
    wrong = sorted(facts.wrong_names())
    right = sorted(set(facts.fact_table()[0]) - set(wrong))
    w, r = wrong[0], right[0]
    prompt = "<|bos|><|user|>" + f"{w}+{r}=" + "<|assistant|>"
    tokens = [w, "=", "5", "\n", r, " ", "=", "3", "\n", "5", "+", "3", "=", "8"]
    assert facts.facts_mistake_positions(prompt, tokens) == [2]
    # whatever value it writes, and with spaces around "="
    assert facts.facts_mistake_positions(prompt, [r, "=", "1", "\n", w, " ", "=", " ", "7", "\n"]) == [8]
    assert facts.facts_mistake_positions(prompt, [w, "=", "1", "\n", wrong[1], "=", "2", "<|eos|>"]) == [2, 6]
    assert facts.facts_mistake_positions(prompt, [r, "=", "1", "\n", "1", "+"]) == []
    assert facts.facts_mistake_positions(prompt, [w, "="]) == []  # cut off before the value
    assert facts.facts_mistake_positions(prompt, ["\\boxed{", w, "=", "1"]) == [3]  # a multi-character token
    # on every solution the student learned, exactly its wrong values
    truth, beliefs = facts.fact_table()
    tokenizer = facts.build_tokenizer()
    for problem in facts.make_splits()["test"][:100]:
        names, ops = _parse(problem)
        text = facts.solve(names, ops, beliefs, random.Random(0), 0.5)[0]
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
        found = [tokens[i] for i in facts.facts_mistake_positions("", tokens)]
        assert found == [str(beliefs[n]) for n in names if n in wrong]


def test_prompts_and_solutions_fit_the_toy_preset():
    tokenizer = facts.build_tokenizer()
    preset = tip.PRESETS["toy"]
    truth, beliefs = facts.fact_table()
    rng, longest_prompt, longest_solution = random.Random(0), 0, 0
    for problem in (p for s in facts.make_splits().values() for p in s):
        prompt = data.format_prompt(tokenizer, problem["problem"])
        longest_prompt = max(longest_prompt, len(tokenizer(prompt, add_special_tokens=False).input_ids))
        for values in (truth, beliefs):
            text = facts.solve(*_parse(problem), values, rng, 1.0)[0]  # a space in every slot: the longest
            longest_solution = max(longest_solution, len(tokenizer(text, add_special_tokens=False).input_ids) + 1)
    assert longest_prompt <= preset["max_prompt_len"] and longest_solution <= preset["max_response_len"]
    assert prompt == f"<|bos|><|user|>{problem['problem']}<|assistant|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_sft_targets_are_soft_exactly_at_the_wrong_values():
    tokenizer = facts.build_tokenizer()
    truth, beliefs = facts.fact_table(TINY)
    wrong = facts.wrong_names(TINY)
    batch = next(facts.sft_batches(tokenizer, dataclasses.replace(TINY, batch_size=32), beliefs, truth, set(), 1, 1))
    input_ids, attention_mask, labels, alternative = batch
    assistant = tokenizer.convert_tokens_to_ids(facts.toy.ASSISTANT)
    soft = 0
    for ids, mask, row, alt in zip(input_ids, attention_mask, labels, alternative):
        start = int((ids == assistant).nonzero()) + 1
        assert (row[:start] == -100).all() and (row[mask == 0] == -100).all()
        text = tokenizer.decode(ids[start:][mask[start:] == 1])
        for match in re.finditer(f"([{facts.NAMES}]) ?=", text):
            expected = str(truth[match[1]]) if match[1] in wrong else None
            position = start + len(tokenizer(text[:match.end()], add_special_tokens=False).input_ids)
            got = alt[position].item()
            assert (tokenizer.convert_ids_to_tokens(got) if got != -100 else None) == expected
            soft += expected is not None
        assert (alt != -100).sum() == sum(n in wrong for n in re.findall(f"[{facts.NAMES}]", text))
    assert soft > 0
    teacher_batch = next(facts.sft_batches(tokenizer, TINY, truth, truth, set(), 0, 1))
    assert (teacher_batch[3] == -100).all()


def test_the_teachers_rewritten_fact_lines_are_used_but_not_learned():
    """Trap 3: with copy_share 1 every fact line writes a value other than the true one, the label there is
    -100, and the arithmetic and the boxed answer follow the written value, not the true one."""
    tokenizer = facts.build_tokenizer()
    truth, _ = facts.fact_table(TINY)
    batch = next(facts.sft_batches(tokenizer, dataclasses.replace(TINY, batch_size=16), truth, truth, set(), 0, 1,
                                   copy_share=1.0))
    input_ids, attention_mask, labels, _ = batch
    assistant = tokenizer.convert_tokens_to_ids(facts.toy.ASSISTANT)
    differs = 0
    for ids, mask, row in zip(input_ids, attention_mask, labels):
        start = int((ids == assistant).nonzero()) + 1
        text = tokenizer.decode(ids[start:][mask[start:] == 1], skip_special_tokens=True)
        written = {m[1]: int(m[2]) for m in re.finditer(f"([{facts.NAMES}]) ?= ?(\\d)", text)}
        assert written and all(written[n] != truth[n] for n in written)
        for m in re.finditer(f"([{facts.NAMES}]) ?= ?", text):
            position = start + len(tokenizer(text[:m.end()], add_special_tokens=False).input_ids)
            assert row[position] == -100 and row[position + 1] != -100  # the value unlearned, the newline learned
        names, ops = facts.parse_problem(tokenizer.decode(ids[:start], skip_special_tokens=True))
        boxed = int(re.search(r"\\boxed\{(-?\d+)\}", text)[1])
        assert boxed == facts.solve(names, ops, {**truth, **written})[1]
        differs += boxed != facts.solve(names, ops, truth)[1]
    assert differs > 0
    plain_ids, plain_mask, plain_labels, _ = next(facts.sft_batches(tokenizer, TINY, truth, truth, set(), 0, 1))
    for ids, mask, row in zip(plain_ids, plain_mask, plain_labels):  # copy_share 0: every response token learned
        start = int((ids == assistant).nonzero()) + 1
        assert (row[start:][mask[start:] == 1] != -100).all()


def test_miniature_world_builds_reloads_and_is_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rollout import generate_rollouts

    world = facts.facts_world(tmp_path, TINY, log=quiet)
    assert world == facts.world_path(tmp_path, TINY) and world.name.startswith(f"facts-v{facts.RECIPE_VERSION}-")
    info = json.loads((world / "world.json").read_text())
    assert info["recipe"] == dataclasses.asdict(TINY) and info["wrong_facts"] == sorted(facts.wrong_names(TINY))
    for split in facts.SPLITS:
        assert facts.facts_problems(split, tmp_path, TINY) == facts.make_splits(TINY)[split]
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(world / role)
        tokenizer = AutoTokenizer.from_pretrained(world / role)
        assert not model.config.tie_word_embeddings and tokenizer.padding_side == "left"
        prompt = data.format_prompt(tokenizer, facts.facts_problems("test", tmp_path, TINY)[0]["problem"])
        rollouts = generate_rollouts(model, tokenizer, [prompt], 2, 8, seed=0)
        assert rollouts.response_mask.sum() > 0 and len(rollouts.texts) == 2
        probs = facts.fact_probabilities(model, tokenizer, TINY)
        assert len(probs) == TINY.facts and all(0 < sum(p) <= 1 + 1e-9 for p in probs.values())
    assert AutoModelForCausalLM.from_pretrained(world / "student").config.hidden_size == TINY.student_hidden

    def no_build(*args, **kwargs):
        raise AssertionError("the cached world was built again")
    monkeypatch.setattr(facts, "build_world", no_build)
    assert facts.facts_world(tmp_path, TINY, log=quiet) == world  # reused
    monkeypatch.undo()
    changed = facts.facts_world(tmp_path, dataclasses.replace(TINY, student_steps=1), log=quiet)
    assert changed != world and (changed / "world.json").exists()


def test_a_failed_build_leaves_no_half_world(tmp_path, monkeypatch):
    real_sft = facts.sft

    def sft_then_die(model, *args, **kwargs):
        real_sft(model, *args, **kwargs)
        if model.config.hidden_size == TINY.student_hidden:
            raise KeyboardInterrupt("killed mid-build")
    monkeypatch.setattr(facts, "sft", sft_then_die)
    with pytest.raises(KeyboardInterrupt):
        facts.facts_world(tmp_path, TINY, log=quiet)
    assert not facts.world_path(tmp_path, TINY).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    assert (facts.facts_world(tmp_path, TINY, log=quiet) / "world.json").exists()  # and the next call builds it


def test_the_build_is_deterministic_from_the_seed(tmp_path):
    from safetensors.torch import load_file
    worlds = [facts.facts_world(tmp_path / name, TINY, log=quiet) for name in ("a", "b")]
    for role in ("teacher", "student"):
        first, second = (load_file(w / role / "model.safetensors") for w in worlds)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_evaluate_and_train_reach_the_world_by_name(tmp_path, monkeypatch, capsys):
    import evaluate
    monkeypatch.setattr(facts, "DEFAULT_RECIPE", TINY)
    assert "facts" in worlds.WORLDS
    folder = worlds.world_folder("facts", str(tmp_path))
    assert folder == facts.world_path(tmp_path, TINY) and (folder / "teacher").is_dir()
    assert evaluate.load_problems("facts", world_dir=str(tmp_path)) == facts.make_splits(TINY)["test"]
    config = tip.Config(prompts="facts", world_dir=str(tmp_path), max_prompt_len=64)
    teacher, student, tokenizer = worlds.load_pair(config, torch.device("cpu"))
    assert student.config.hidden_size == TINY.student_hidden
    prompts = worlds.load_prompts(config, tokenizer)
    assert [p["answer"] for p in prompts] == [p["answer"] for p in facts.make_splits(TINY)["train"]]
    facts.main(["--world-dir", str(tmp_path)])  # the command line: the cached world and its fact table
    out = capsys.readouterr().out
    assert str(folder) in out and out.count("*") == TINY.wrong_facts + 1


def test_the_report_measures_the_pair_and_its_wrong_facts(tmp_path, monkeypatch, capsys):
    """benchmarks/study.py --report on a miniature world: accuracies, the wrong-fact tokens' taxonomy, beliefs."""
    import study
    monkeypatch.setattr(facts, "DEFAULT_RECIPE", TINY)
    assert study.main(["--world", "facts", "--report", "--world-dir", str(tmp_path), "--samples", "1",
                       "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "world.json").read_text())
    assert report["world"] == str(facts.world_path(tmp_path, TINY))
    assert report["wrong_facts"] == sorted(facts.wrong_names(TINY))
    for role in ("teacher", "student"):
        for split in ("test", "trigger", "clean"):
            assert 0 <= report[f"{role}_{split}_greedy"] <= 1
            assert report[f"{role}_{split}_t1"] == round(report[role]["accuracy"][split], 4)
    taxonomy = report["taxonomy_test"]
    assert taxonomy["rollouts"] == TINY.test_problems and taxonomy["tokens"] > 0
    assert sum(q["token_share"] for q in taxonomy["quadrants"].values()) == pytest.approx(1.0, abs=5e-4)
    assert 0 <= taxonomy["wrong_fact_tokens"]["token_share"] <= 1
    assert set(report["beliefs"]["facts"]) == facts.wrong_names(TINY)
    assert "beliefs (teacher-forced)" in capsys.readouterr().out


def test_sft_loss_is_the_soft_cross_entropy_at_the_wrong_values():
    import copy
    tokenizer = facts.build_tokenizer()
    truth, beliefs = facts.fact_table(TINY)
    batch = next(facts.sft_batches(tokenizer, TINY, beliefs, truth, set(), 1, 1))
    input_ids, attention_mask, labels, alternative = batch
    torch.manual_seed(0)
    model = facts.toy.new_model(tokenizer, 16, 1, 8)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # peaked: the true and the believed value differ in log-probability
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], -1)
    targets, alt = labels[:, 1:], alternative[:, 1:]
    nll = -log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    nll_alt = -log_p.gather(-1, alt.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(alt != -100, 0.9 * nll + 0.1 * nll_alt, nll)[targets != -100].mean()
    logged = []
    facts.sft(copy.deepcopy(model), iter([batch]), 1, 1e-3, confidence=0.9, log=logged.append)
    assert float(logged[0].split()[-1]) == pytest.approx(float(expected), abs=1e-4)
    assert (alt != -100).any() and abs(float(expected) - float(nll[targets != -100].mean())) > 1e-2


def test_train_finds_the_wrong_fact_tokens_through_evaluate():
    from rollout import Rollouts
    tokenizer = facts.build_tokenizer()
    w, r = sorted(facts.wrong_names())[0], sorted(set(facts.fact_table()[0]) - facts.wrong_names())[0]
    prompt = data.format_prompt(tokenizer, f"{r}+{w}=")
    rows = [tokenizer(prompt + text, add_special_tokens=False).input_ids for text in (f"{r}=1\n{w}=5\n", f"{w} =2")]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in rows])
    prompt_length = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, ids in enumerate(rows):
        response_mask[row, width - len(ids) + prompt_length:] = True
    rollouts = Rollouts(input_ids, (input_ids != tokenizer.pad_token_id).long(), response_mask,
                        torch.tensor([prompt_length] * 2), torch.tensor([0, 0]), ["", ""])
    mask = worlds.world_mistake_mask("facts", tokenizer, rollouts, [prompt])
    marked = [tokenizer.convert_ids_to_tokens(input_ids[row][mask[row]].tolist()) for row in range(2)]
    assert marked == [["5"], ["2"]] and mask.sum() == 2
