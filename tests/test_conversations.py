"""Multi-turn rollouts with tools (rollout.generate_conversations, §7 agentic): exact masks on scripted
conversations, malformed calls, turn and token limits, and a real model's conversations scored and trained."""

import pytest
import torch

import rollout
from conftest import CHARS, char_tokenizer, tiny_causal_lm

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_with_tools():
    tokenizer = char_tokenizer(CHARS + "<>_/[]'|")
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def lookup(name: str) -> int:
    """Look a constant up by its name.

    Args:
        name: the constant's name, one capital letter
    """
    return {"A": 7, "B": 3}[name]


CALL_A = '<tool_call>{"name": "lookup", "arguments": {"name": "A"}}</tool_call>'
SCRIPTS = {  # task -> the text of each assistant turn it samples
    0: [CALL_A, "A is 7"],
    1: ['<tool_call>{"name": lookup}</tool_call>', "no idea"],         # malformed JSON
    2: ["42"],                                                         # answers at once
    3: [CALL_A, CALL_A, CALL_A, CALL_A],                               # would call forever
    4: ['<tool_call>{"name": "lookup", "arguments": {"name": "Z"}}</tool_call>', "?"],  # the tool raises
    5: ['<tool_call>{"name": "lookup", "arguments": {"name": "Z"}}</tool_call>', CALL_A, "done"],  # a long error,
}                                                                  # then a long turn on less room than the others


def scripted_sampler(tokenizer):
    """Stands in for rollout.sample_tokens: each context gets the next scripted turn of its task, EOS-ended, cut
    at `room` tokens as sampling would be."""
    def sample(model, tok, contexts, n, room, *args, **kwargs):
        out = []
        for ids in contexts:
            text = tokenizer.decode(ids)
            task = int(text.split("task ")[1][0])
            turn = text.count("<|im_start|>assistant") - 1
            out.append((tokenizer(SCRIPTS[task][turn], add_special_tokens=False).input_ids
                        + [tokenizer.eos_token_id])[:room])
        return out
    return sample


def tasks():
    return [rollout.Task([{"role": "user", "content": f"task {i}"}], [lookup]) for i in SCRIPTS]


def test_scripted_conversations_have_exact_masks(monkeypatch):
    tokenizer = tokenizer_with_tools()
    model = tiny_causal_lm(tokenizer, 16, layers=1)
    monkeypatch.setattr(rollout, "sample_tokens", scripted_sampler(tokenizer))
    batch = rollout.generate_conversations(model, tokenizer, tasks(), 1, 400, max_turns=3)
    eos = [tokenizer.eos_token_id]
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    for b, task in enumerate(SCRIPTS):
        turns = SCRIPTS[task][:3]
        conversation = batch.conversations[b]
        assistant = [m["content"] for m in conversation if m["role"] == "assistant"]
        results = [m["content"] for m in conversation if m["role"] == "tool"]
        assert assistant == turns[:len(assistant)] and len(assistant) <= 3
        # rebuild the row: each sampled turn with its EOS (mask 1), then its tool results' glue (mask 0)
        ids, flags = [], []
        for k, text in enumerate(assistant):
            ids += encode(text) + eos
            flags += [True] * (len(encode(text)) + 1)
            if k < len(assistant) - 1:
                glue = encode(rollout.tool_glue(tokenizer, [results[k]], [lookup], eos))
                ids += glue
                flags += [False] * len(glue)
        row = batch.input_ids[b][batch.attention_mask[b].bool()]
        prompt_length = int(batch.prompt_lengths[b])
        assert row[prompt_length:].tolist() == ids
        assert batch.response_mask[b][batch.attention_mask[b].bool()][prompt_length:].tolist() == flags
        assert not batch.response_mask[b][batch.attention_mask[b].bool()][:prompt_length].any()
        assert "<tool_response>" not in tokenizer.decode(row[prompt_length:][torch.tensor(flags, dtype=torch.bool)])
        if task == 0:
            assert results == ["7"] and assistant[-1] == "A is 7"
        if task == 1:
            assert results[0].startswith("Error: the tool call is not valid JSON")
        if task == 2:
            assert results == [] and len(assistant) == 1
        if task == 3:  # the turn limit: three turns sampled, the third's call not run
            assert len(assistant) == 3 and results == ["7", "7"]
        if task == 4:
            assert results[0].startswith("Error: KeyError")


def test_the_token_limit_cuts_and_counts_tool_results(monkeypatch):
    tokenizer = tokenizer_with_tools()
    model = tiny_causal_lm(tokenizer, 16, layers=1)
    monkeypatch.setattr(rollout, "sample_tokens", scripted_sampler(tokenizer))
    call = len(tokenizer(CALL_A, add_special_tokens=False).input_ids) + 1
    glue = len(tokenizer(rollout.tool_glue(tokenizer, ["7"], [lookup], [tokenizer.eos_token_id]),
                         add_special_tokens=False).input_ids)
    for limit in (call - 5, call + glue, call + glue + 3):
        batch = rollout.generate_conversations(model, tokenizer, tasks()[:1], 1, limit, max_turns=5)
        after_prompt = int(batch.attention_mask[0].sum() - batch.prompt_lengths[0])
        assert after_prompt <= limit
        if limit == call - 5:  # the first turn is cut: no call is run
            assert int(batch.response_mask[0].sum()) == limit and len(batch.conversations[0]) == 2
        elif limit == call + glue:  # no room for a sampled token after the results: they are not appended
            assert after_prompt == call and batch.conversations[0][-1]["role"] == "tool"
        else:
            assert after_prompt == limit and int(batch.response_mask[0].sum()) == call + 3


def test_each_row_keeps_its_own_budget_in_a_batch(monkeypatch):
    """Rows of one batch spend their token budgets differently (calls and results of other lengths, answers at
    once): under every limit, each row is exactly the conversation its task has when sampled alone."""
    tokenizer = tokenizer_with_tools()
    model = tiny_causal_lm(tokenizer, 16, layers=1)
    monkeypatch.setattr(rollout, "sample_tokens", scripted_sampler(tokenizer))
    for limit, order in ((limit, order) for limit in range(4, 160, 9) for order in (1, -1)):
        batch = rollout.generate_conversations(model, tokenizer, tasks()[::order], 1, limit, max_turns=4)
        for b, task in enumerate(tasks()[::order]):
            alone = rollout.generate_conversations(model, tokenizer, [task], 1, limit, max_turns=4)
            row, single = batch.attention_mask[b].bool(), alone.attention_mask[0].bool()
            assert batch.input_ids[b][row].tolist() == alone.input_ids[0][single].tolist(), (limit, b)
            assert batch.response_mask[b][row].tolist() == alone.response_mask[0][single].tolist(), (limit, b)
            assert batch.conversations[b] == alone.conversations[0], (limit, b)
            assert int(row.sum() - batch.prompt_lengths[b]) <= limit


def test_tool_calls_are_parsed_robustly():
    calls = rollout.parse_tool_calls('a <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> b '
                                     '<tool_call>{"name": "g", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert calls == [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": 2}}]
    assert rollout.parse_tool_calls("no call") == []
    for bad in ('<tool_call>{"name": 3}</tool_call>', '<tool_call>[1]</tool_call>', '<tool_call>{"name": "f"',
                '<tool_call>{"name": "f", "arguments": "x"}</tool_call>'):
        (error,) = rollout.parse_tool_calls(bad)
        assert isinstance(error, str) and error.startswith("Error:")
    tools = {"lookup": lookup}
    assert rollout.run_tool_call({"name": "lookup", "arguments": {"name": "B"}}, tools) == "3"
    assert "no tool named 'nope'" in rollout.run_tool_call({"name": "nope", "arguments": {}}, tools)
    assert rollout.run_tool_call({"name": "lookup", "arguments": {"nam": "B"}}, tools).startswith("Error: TypeError")


def test_a_template_that_cannot_splice_results_is_refused():
    tokenizer = tokenizer_with_tools()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(ValueError, match="end-of-turn token"):
        rollout.tool_glue(tokenizer, ["7"], [], [tokenizer.eos_token_id])


def test_real_conversations_are_scored_on_their_own_tokens():
    """A random model's conversations: the layout holds, and train.py's loss on them is the plain mean reverse
    KL over exactly the response-mask tokens (teacher and student see the same sequence, tool results as context)."""
    import tip
    import train
    tokenizer = tokenizer_with_tools()
    student, teacher = tiny_causal_lm(tokenizer, 32, seed=1), tiny_causal_lm(tokenizer, 48, seed=2)
    batch = rollout.generate_conversations(student, tokenizer, tasks()[:2], 2, 60, max_turns=2, seed=0)
    assert batch.input_ids.shape[0] == 4 and (batch.response_mask <= batch.attention_mask.bool()).all()
    assert (batch.attention_mask.sum(1) - batch.prompt_lengths <= 60).all()
    config = tip.Config(rule="all", ratio=1.0, micro_batch_size=2, gradient_checkpointing=False, lr=0.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    with torch.no_grad():
        logits = {name: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
                  for name, model in (("student", student), ("teacher", teacher))}
    log_s, log_t = (torch.log_softmax(logits[k][:, :-1], -1) for k in ("student", "teacher"))
    reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)[batch.response_mask[:, 1:]]
    metrics = train.train_step(student, teacher, batch, optimizer, config, 0, torch.Generator().manual_seed(0))
    assert metrics["kept_tokens"] == int(batch.response_mask.sum())
    assert metrics["loss"] == pytest.approx(float(reverse_kl.mean()), rel=1e-4)


class ScriptedEngine:
    """Stands in for vllm_engine.VLLMEngine.sample_tokens with the scripted turns, keeping to each context's own
    limit as the engine does; records the limits it was given."""
    def __init__(self, tokenizer):
        self.sample, self.limits = scripted_sampler(tokenizer), []

    def sample_tokens(self, contexts, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        assert len(max_new_tokens) == len(contexts)
        self.limits.append(list(max_new_tokens))
        return [self.sample(None, None, [ids], 1, room)[0] for ids, room in zip(contexts, max_new_tokens)]


def test_an_engine_samples_each_row_up_to_its_own_budget(monkeypatch):
    """Through an engine, every turn asks for each live row exactly its remaining budget (the limit less what
    follows its prompt so far), never the batch's largest, and the conversations equal generate's."""
    tokenizer = tokenizer_with_tools()
    model = tiny_causal_lm(tokenizer, 16, layers=1)
    monkeypatch.setattr(rollout, "sample_tokens", scripted_sampler(tokenizer))
    spent_differently = False
    for limit in (40, 90, 160, 300):
        hf = rollout.generate_conversations(model, tokenizer, tasks(), 1, limit, max_turns=4)
        engine = ScriptedEngine(tokenizer)
        ours = rollout.generate_conversations(model, tokenizer, tasks(), 1, limit, max_turns=4, engine=engine)
        assert torch.equal(hf.input_ids, ours.input_ids) and torch.equal(hf.response_mask, ours.response_mask)
        assert hf.conversations == ours.conversations
        # replay the turns: a row's budget is the limit less its tokens after the prompt before that turn
        used = [0] * len(tasks())
        for turn, limits in enumerate(engine.limits):
            live = [b for b in range(len(tasks())) if len([m for m in ours.conversations[b]
                                                           if m["role"] == "assistant"]) > turn]
            assert limits == [limit - used[b] for b in live], (limit, turn)
            for b in live:  # what row b holds after this turn: its prompt's continuation up to the next turn
                row = ours.attention_mask[b].bool()
                after = ours.response_mask[b][row][int(ours.prompt_lengths[b]):].tolist()
                sampled_turns = [i for i, (m, n) in enumerate(zip([False] + after, after)) if n and not m]
                ends = sampled_turns[turn + 1] if turn + 1 < len(sampled_turns) else len(after)
                used[b] = ends
        spent_differently |= any(len(set(limits)) > 1 for limits in engine.limits)
    assert spent_differently  # rows of one turn did have different budgets left


def constants(values: dict):
    """A `lookup` tool over its own table: tasks whose tools answer differently."""
    def lookup(name: str) -> int:
        """Look a constant up by its name.

        Args:
            name: the constant's name, one capital letter
        """
        return values[name]
    return lookup


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_rows_calls_run_against_its_own_tasks_tools(n, monkeypatch):
    """Tasks with the same script but tools of their own (A is 7, 1, 4): every row's tool result comes from its
    own task's tools, whichever its position among the n rollouts of each task."""
    tokenizer = tokenizer_with_tools()
    model = tiny_causal_lm(tokenizer, 16, layers=1)
    monkeypatch.setattr(rollout, "sample_tokens", scripted_sampler(tokenizer))
    values = [7, 1, 4]
    own = [rollout.Task([{"role": "user", "content": "task 0"}], [constants({"A": v})]) for v in values]
    batch = rollout.generate_conversations(model, tokenizer, own, n, 200, max_turns=3)
    results = [[m["content"] for m in c if m["role"] == "tool"] for c in batch.conversations]
    assert results == [[str(v)] for v in values for _ in range(n)]
