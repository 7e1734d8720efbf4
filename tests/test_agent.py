"""The agent world (worlds/agent.py): confusions, splits, the conversation layout, the mistake positions, the
reward, a miniature build, and train.py / evaluate.py on it."""
import dataclasses
import json

import pytest

import data
import rollout
import worlds
import tip
from worlds import agent, facts

TINY = agent.AgentRecipe(facts=6, wrong_facts=2, train_problems=30, test_problems=8, trigger_problems=6,
                         clean_problems=6, batch_size=4, head_dim=8, teacher_hidden=16, teacher_layers=1,
                         teacher_steps=2, student_hidden=8, student_layers=1, student_steps=2)


def quiet(message):
    pass


def test_confusions_and_splits():
    truth = facts.fact_table(agent.DEFAULT_RECIPE)[0]
    confused = agent.confusions()
    assert len(confused) == agent.DEFAULT_RECIPE.wrong_facts
    assert all(truth[x] != truth[y] for x, y in confused.items())
    beliefs = {**truth, **{x: truth[y] for x, y in confused.items()}}
    splits = {s: agent.agent_problems(s) for s in agent.SPLITS}
    seen = [p["problem"] for s in splits.values() for p in s]
    assert len(seen) == len(set(seen))  # disjoint
    for p in splits["trigger"]:
        names, ops = facts.parse_problem(p["problem"])
        assert facts.solve(names, ops, beliefs)[1] != int(p["answer"]) == facts.solve(names, ops, truth)[1]
    assert all(not set(facts.parse_problem(p["problem"])[0]) & set(confused) for p in splits["clean"])


def scripted(tokenizer, turns_by_prompt):
    """rollout.sample_tokens that answers each context with its prompt's next scripted turn (token ids)."""
    def sample(model, tok, contexts, n, room, *args, **kwargs):
        out = []
        for ids in contexts:
            text = tokenizer.decode(ids)
            turn = text.count("<|assistant|>") - 1
            out.append(turns_by_prompt[text.split("<|user|>")[1].split("<|assistant|>")[0]][turn])
        return out
    return sample


@pytest.mark.parametrize("student", [False, True])
def test_generated_conversations_lay_out_as_the_sft_data(monkeypatch, student):
    """What the models learned (conversation_ids) is what generate_conversations lays out when they sample it:
    the same tokens, and the learned positions are exactly the response mask."""
    monkeypatch.setattr(agent, "DEFAULT_RECIPE", TINY)
    tokenizer = agent.build_tokenizer()
    truth, confused = facts.fact_table(TINY)[0], agent.confusions(TINY) if student else {}
    problems = agent.agent_problems("test")[:4]
    expected, turns = {}, {}
    for p in problems:
        names, ops = facts.parse_problem(p["problem"])
        arguments = "".join(confused.get(n, n) for n in names)
        ids, learned, _ = agent.conversation_ids(tokenizer, names, ops, arguments, [truth[a] for a in arguments])
        expected[p["problem"]] = (ids, learned)
        eos = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
        start = learned.index(True)
        turns[p["problem"]] = [ids[start:eos[0] + 1], ids[learned.index(True, eos[0] + 1):eos[1] + 1]]
    monkeypatch.setattr(rollout, "sample_tokens", scripted(tokenizer, turns))
    model = facts.toy.new_model(tokenizer, 16, 1, 8)
    batch = rollout.generate_conversations(model, tokenizer, [agent.agent_task(p) for p in problems], 1, 48, 4)
    for b, p in enumerate(problems):
        real = batch.attention_mask[b].bool()
        ids, learned = expected[p["problem"]]
        assert batch.input_ids[b][real].tolist() == ids
        assert batch.response_mask[b][real].tolist() == learned
        conversation = batch.conversations[b]
        used = {**truth, **{x: truth[y] for x, y in confused.items()}}
        right = p["answer"] == str(facts.solve(*facts.parse_problem(p["problem"]), used)[1])
        assert agent.agent_task(p).reward(conversation) == float(right)
        tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[b][batch.response_mask[b]].tolist())
        positions = agent.agent_mistake_positions(data.format_prompt(tokenizer, p["problem"]), tokens, TINY)
        names = facts.parse_problem(p["problem"])[0]
        assert [tokens[i] for i in positions] == [confused.get(n, n) for n in names if n in agent.confusions(TINY)]


def test_reward_reads_the_last_assistant_turn():
    task = agent.agent_task({"problem": "A+B=", "answer": "4"})
    assert task.reward([{"role": "assistant", "content": "1+3=\\boxed{4}"}]) == 1.0
    assert task.reward([{"role": "assistant", "content": "\\boxed{4}"}, {"role": "tool", "content": "1"},
                        {"role": "assistant", "content": "1+3=\\boxed{5}"}]) == 0.0
    assert task.reward([{"role": "assistant", "content": "no box"}]) == 0.0
    from transformers.utils import get_json_schema
    schema = get_json_schema(task.tools[0])["function"]
    assert schema["name"] == "lookup" and schema["parameters"]["required"] == ["name"]
    assert task.tools[0]("A") == facts.fact_table(agent.DEFAULT_RECIPE)[0]["A"]
    with pytest.raises(KeyError):
        task.tools[0]("a")


@pytest.mark.parametrize("answer", ["-3", "0", "12", "-40"])
def test_reward_takes_every_answer_the_worlds_arithmetic_can_give(answer):
    """Answers are integers of either sign (a difference of looked-up values can be negative): the right one in
    the last turn's box scores 1, any other number 0."""
    task = agent.agent_task({"problem": "A-B=", "answer": answer})
    assert task.reward([{"role": "assistant", "content": f"7-10=\\boxed{{{answer}}}"}]) == 1.0
    assert task.reward([{"role": "assistant", "content": f"\\boxed{{{int(answer) + 1}}}"}]) == 0.0
    assert task.reward([{"role": "assistant", "content": f"\\boxed{{{-int(answer) or 1}}}"}]) == 0.0


def test_miniature_world_builds_and_trains_with_conversations(tmp_path, monkeypatch):
    import evaluate
    import train
    monkeypatch.setattr(agent, "DEFAULT_RECIPE", TINY)
    world = agent.agent_world(tmp_path, log=quiet)
    info = json.loads((world / "world.json").read_text())
    assert info["recipe"] == dataclasses.asdict(TINY) and info["confusions"] == agent.confusions(TINY)
    assert agent.agent_problems("trigger", tmp_path) == agent.agent_problems("trigger")  # read back as drawn
    config = tip.Config(prompts="agent", world_dir=str(tmp_path), max_prompt_len=64)
    prompts = worlds.load_prompts(config, agent.build_tokenizer())
    assert all(isinstance(p["task"], rollout.Task) for p in prompts)
    sampled = []
    monkeypatch.setattr(train, "generate_conversations",
                        lambda *a, **k: sampled.append(len(a[2])) or rollout.generate_conversations(*a, **k))
    train.main(["--prompts", "agent", "--world-dir", str(tmp_path), "--steps", "2", "--prompts-per-step", "2",
                "--rollouts-per-prompt", "2", "--out-dir", str(tmp_path / "runs"), "--run-name", "a",
                "--eval-problems", "2", "--rule", "q3", "--ratio", "0.2"])
    lines = [json.loads(line) for line in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    rows = lines[1:3]  # the steps, between the held-out accuracy before (step 0) and after (step 2)
    assert [line["step"] for line in lines] == [0, 1, 2, 2] and 0 <= lines[-1]["held_out_accuracy"] <= 1
    assert all("mistake_tokens" in r and r["reward"] is not None for r in rows)
    assert sampled == [4, 4]  # each step's 2 prompts x 2 rollouts sampled as conversations
    calls, real = [], rollout.generate_conversations
    monkeypatch.setattr(rollout, "generate_conversations", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    evaluate.main(["--model", "agent-student", "--benchmark", "agent", "--world-dir", str(tmp_path), "--samples",
                   "2", "--problems", "3", "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    summary = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert summary["problems"] == 3 and summary["samples"] == 2 and 0 <= summary["accuracy"] <= 1
    assert calls and all(isinstance(task, rollout.Task) for tasks in calls for task in tasks)  # conversations
