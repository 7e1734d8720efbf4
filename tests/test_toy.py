"""The toy world (worlds/toy.py): task, splits, tokenizer, cache, a miniature build; its measurement
(benchmarks/study.py --report)."""
import dataclasses
import json
import random

import pytest
import torch

import data
import study
import world_measures
from worlds import toy

TINY = toy.ToyRecipe(train_problems=20, test_problems=6, trigger_problems=6, batch_size=4, head_dim=8,
                     teacher_hidden=16, teacher_layers=1, teacher_steps=2, student_hidden=8, student_layers=1,
                     student_steps=2)


def quiet(message):
    pass


def test_no_carry_add_drops_every_carry():
    assert toy.no_carry_add(93, 67) == 50
    assert toy.no_carry_add(7, 8) == 5
    assert toy.no_carry_add(15, 5) == 10
    assert toy.no_carry_add(123, 877) == 990
    assert toy.no_carry_add(12, 34) == 46  # no carry: the same as +
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        digits = [(int(x) + int(y)) % 10 for x, y in zip(f"{a:05d}", f"{b:05d}")]
        assert toy.no_carry_add(a, b) == int("".join(map(str, digits)))


def test_solutions_are_worked_steps_ending_in_the_box():
    assert toy.solve([93, 67, 12], "+-") == ("93+67=160\n160-12=\\boxed{148}", 148)
    assert toy.solve([93, 67, 12], "+-", carry=False) == ("93+67=50\n50-12=\\boxed{38}", 38)
    assert toy.solve([7, 8], "+") == ("7+8=\\boxed{15}", 15)
    assert toy.solve([5, 6, 8], "+-", carry=False)[1] == -7  # the student's own path may go below zero


def test_splits_are_deterministic_disjoint_and_correct():
    """The world's own recipe (one-digit operands: a small space, where repeats are likely), and no problem is in
    two splits: distillation never sees a held-out problem."""
    recipe = toy.DEFAULT_RECIPE
    splits = toy.make_splits(recipe)
    assert splits == toy.make_splits(recipe)
    assert splits != toy.make_splits(dataclasses.replace(recipe, seed=1))
    assert [len(splits[s]) for s in ("train", "test", "trigger")] == [2000, 500, 500]
    held_out = {p["problem"] for s in ("test", "trigger") for p in splits[s]}
    assert held_out.isdisjoint(p["problem"] for p in splits["train"])
    texts = [p["problem"] for s in splits.values() for p in s]
    assert len(set(texts)) == len(texts)
    for problem in (p for s in splits.values() for p in s):
        operands = [int(x) for x in problem["problem"].rstrip("=").replace("-", "+").split("+")]
        assert 2 <= len(operands) <= 4 and max(operands) <= 9 and problem["problem"].endswith("=")
        assert problem["answer"] == str(eval(problem["problem"].rstrip("=")))  # plain integer arithmetic


def test_trigger_split_triggers_the_misconception():
    recipe = dataclasses.replace(TINY, test_problems=200, trigger_problems=100)
    splits = toy.make_splits(recipe)
    for problem in splits["trigger"]:
        operands, ops = _parse(problem["problem"])
        assert toy.needs_carry(operands, ops)
        # the student's training solution of this problem is wrong, the teacher's right
        assert str(toy.solve(operands, ops, carry=False)[1]) != problem["answer"] == str(toy.solve(operands, ops)[1])
    # and without a carry, the student's solutions are exactly the teacher's
    plain = [_parse(p["problem"]) for p in splits["test"] if not toy.needs_carry(*_parse(p["problem"]))]
    assert plain and all(toy.solve(*p, carry=False) == toy.solve(*p) for p in plain)


def _parse(text):
    operands = [int(x) for x in text.rstrip("=").replace("-", "+").split("+")]
    return operands, "".join(c for c in text if c in "+-")


def test_toy_problems_without_a_world_and_bad_input():
    assert toy.toy_problems("test", recipe=TINY) == toy.make_splits(TINY)["test"]
    with pytest.raises(ValueError, match="unknown toy split"):
        toy.toy_problems("validation", recipe=TINY)
    with pytest.raises(ValueError, match="operators"):
        toy.make_splits(dataclasses.replace(TINY, operators="*"))
    with pytest.raises(ValueError, match="operands"):
        toy.make_splits(dataclasses.replace(TINY, min_operands=1))
    with pytest.raises(ValueError, match="digits=5: use 1 to 4"):
        toy.make_splits(dataclasses.replace(TINY, digits=5))
    with pytest.raises(ValueError, match="distinct"):
        toy.make_splits(dataclasses.replace(TINY, max_operands=2, test_problems=1000))


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer
    toy.build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.padding_side == "left"
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        tokenizer.unk_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "93+67-12="}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<|bos|><|user|>93+67-12=<|assistant|>"
    solution = toy.solve([93, 67, 12], "+-")[0]
    ids = tokenizer(prompt + solution + tokenizer.eos_token, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "93+67-12=" + solution
    assert tokenizer.convert_ids_to_tokens(ids).count("\\boxed{") == 1  # one token
    assert len(ids) == 4 + len("93+67-12=") + len(solution) - len("\\boxed{") + 1  # 4 special tokens


def test_computed_mask_marks_result_digits_only():
    tokenizer = toy.build_tokenizer()
    text = data.format_prompt(tokenizer, "9-2+7=") + toy.solve([9, 2, 7], "-+")[0] + tokenizer.eos_token
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    marked = "".join(t for t, m in zip(tokens, toy.computed_mask(tokenizer, ids)[0].tolist()) if m)
    assert toy.solve([9, 2, 7], "-+")[0] == "9-2=7\n7+7=\\boxed{14}"
    assert marked == "<|assistant|>7\n14}"  # the prompt's own "=" is masked out by its labels


def test_sft_labels_cover_the_response_only():
    tokenizer = toy.build_tokenizer()
    input_ids, attention_mask, labels, _ = next(toy.sft_batches(tokenizer, TINY, set(), 1.0, 0, 1))
    assistant = tokenizer.convert_tokens_to_ids(toy.ASSISTANT)
    for ids, mask, row in zip(input_ids, attention_mask, labels):
        start = int((ids == assistant).nonzero()) + 1
        assert (row[:start] == -100).all() and (row[mask == 0] == -100).all()
        assert torch.equal(row[start:][mask[start:] == 1], ids[start:][mask[start:] == 1])
        assert tokenizer.decode(row[start:][mask[start:] == 1]).endswith(tokenizer.eos_token)


def test_misconception_positions():
    tokens = list("93+67=50\n50-12=") + ["\\boxed{"] + list("38}") + ["<|eos|>"]
    assert toy.misconception_positions(tokens) == [6]
    assert toy.misconception_positions(list("93+67=160\n160-12=") + ["\\boxed{"] + list("148}")) == []
    assert toy.misconception_positions(list("93+67=70\n")) == []  # wrong, but not the no-carry rule
    assert toy.misconception_positions(list("55+61=16\n")) == [7]  # 116 vs 16: departs at the second digit
    assert toy.misconception_positions(list("1+2=3\n4+8=") + ["\\boxed{"] + list("2}")) == [11]


def test_rank_correlation_matches_the_plain_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, generator=generator)
    y = x + torch.randn(300, generator=generator)
    rank = lambda v: torch.tensor([sorted(v.tolist()).index(value) for value in v.tolist()], dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1]
    assert world_measures.rank_correlation(x, y) == pytest.approx(float(expected), abs=1e-12)
    assert world_measures.rank_correlation(x, x.exp()) == pytest.approx(1.0)
    assert world_measures.rank_correlation(x, -x) == pytest.approx(-1.0)


def test_miniature_world_builds_reloads_samples_and_is_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rollout import generate_rollouts

    world = toy.toy_world(tmp_path, TINY, log=quiet)
    assert world == toy.world_path(tmp_path, TINY) and world.name.startswith(f"toy-v{toy.RECIPE_VERSION}-")
    assert json.loads((world / "world.json").read_text())["recipe"] == dataclasses.asdict(TINY)
    assert toy.toy_problems("trigger", tmp_path, TINY) == toy.make_splits(TINY)["trigger"]
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(world / role)
        tokenizer = AutoTokenizer.from_pretrained(world / role)
        assert not model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert (world / role / "model.safetensors").exists()
        prompt = data.format_prompt(tokenizer, toy.toy_problems("test", tmp_path, TINY)[0]["problem"])
        rollouts = generate_rollouts(model, tokenizer, [prompt], 2, 8, seed=0)
        assert rollouts.response_mask.sum() > 0 and len(rollouts.texts) == 2
    assert AutoModelForCausalLM.from_pretrained(world / "teacher").config.hidden_size == TINY.teacher_hidden

    def no_build(*args, **kwargs):
        raise AssertionError("the cached world was built again")
    monkeypatch.setattr(toy, "build_world", no_build)
    assert toy.toy_world(tmp_path, TINY, log=quiet) == world  # reused
    monkeypatch.undo()

    changed = toy.toy_world(tmp_path, dataclasses.replace(TINY, student_steps=1), log=quiet)
    monkeypatch.setattr(toy, "RECIPE_VERSION", toy.RECIPE_VERSION + 1)
    bumped = toy.toy_world(tmp_path, TINY, log=quiet)
    assert len({world, changed, bumped}) == 3 and all((w / "world.json").exists() for w in (world, changed, bumped))


def test_the_build_is_deterministic_from_the_seed(tmp_path):
    from safetensors.torch import load_file
    worlds = [toy.toy_world(tmp_path / name, TINY, log=quiet) for name in ("a", "b")]
    for role in ("teacher", "student"):
        first, second = (load_file(w / role / "model.safetensors") for w in worlds)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (worlds[0] / "test.jsonl").read_text() == (worlds[1] / "test.jsonl").read_text()


def test_a_failed_build_leaves_no_half_world(tmp_path, monkeypatch):
    real_sft = toy.sft

    def sft_then_die(model, *args, **kwargs):
        real_sft(model, *args, **kwargs)
        if model.config.hidden_size == TINY.student_hidden:
            raise KeyboardInterrupt("killed mid-build")
    monkeypatch.setattr(toy, "sft", sft_then_die)
    with pytest.raises(KeyboardInterrupt):
        toy.toy_world(tmp_path, TINY, log=quiet)
    assert not toy.world_path(tmp_path, TINY).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    assert (toy.toy_world(tmp_path, TINY, log=quiet) / "world.json").exists()  # and the next call builds it


def test_measure_and_the_command_line_on_a_miniature_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy, "DEFAULT_RECIPE", TINY)
    assert study.main(["--world", "toy", "--report", "--world-dir", str(tmp_path), "--samples", "1",
                       "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "world.json").read_text())
    assert report["world"] == str(toy.world_path(tmp_path, TINY))
    for name in ("teacher_test_greedy", "teacher_test_t1", "teacher_trigger_greedy", "teacher_trigger_t1",
                 "student_test_t1", "student_trigger_t1"):
        assert 0 <= report[name] <= 1
    assert report["tokens"] > 0 and report["built_now"]
    # the report rounds each share to 4 decimals
    assert sum(q["token_share"] for q in report["quadrants"].values()) == pytest.approx(1.0, abs=5e-4)
    assert sum(q["kl_mass_share"] for q in report["quadrants"].values()) == pytest.approx(1.0, abs=5e-4)
    assert -1 <= report["rank_correlation_entropy_kl"] <= 1
    assert set(report["targets_met"]) == set(world_measures.TOY_TARGETS)
    assert "student_test_t1" in capsys.readouterr().out
