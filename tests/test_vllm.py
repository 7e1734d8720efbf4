"""vllm_engine.VLLMEngine: vLLM samples the rollouts y ~ S_θ(·|x) of §3 exactly as generate_rollouts does, from
the weights θ that sync() pushed, and evaluate.py's mean@k (§7.1) runs through it.

Skipped where vllm is not installed (pip install -r requirements-vllm.txt), except the test of the error a
user sees then. vLLM's CPU attention needs a head size of 32 or more, hence hidden 64 with two heads.
"""
import copy
import importlib.util
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import data
import evaluate
import rollout
import tip
import vllm_engine
from conftest import ROOT, char_tokenizer
from test_rollout import QUESTIONS, check_layout

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                   reason="vllm is not installed: pip install -r requirements-vllm.txt")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: the tests' engines are tiny
MAX_LEN = 512


def qwen3(tokenizer, vocab=None, seed=0, **overrides):
    """A random fp32 Qwen3 (hidden 64, head size 32) whose logits are peaked enough that greedy decoding does
    not flip on rounding and rollouts reach EOS."""
    torch.manual_seed(seed)
    config = Qwen3Config(**{**dict(
        vocab_size=vocab or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id), **overrides})
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [data.format_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def student(tokenizer):
    return qwen3(tokenizer)


@pytest.fixture
def engine(student, tokenizer):
    # one engine at a time: closing one tears down vLLM's process-wide state that every engine uses
    engine = vllm_engine.VLLMEngine(student, tokenizer, max_model_len=MAX_LEN)
    yield engine
    engine.close()


def test_missing_vllm_is_a_clear_error(monkeypatch, student, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(tip.InputError, match=r"pip install -r requirements-vllm\.txt"):
        vllm_engine.VLLMEngine(student, tokenizer)


@requires_vllm
def test_layout_and_masks_are_those_of_generate(engine, tokenizer, prompts):
    max_new = 40
    r = engine.generate(prompts, n=3, max_new_tokens=max_new, seed=3)
    lengths = check_layout(r, tokenizer, prompts, 3, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    assert min(lengths) < max_new and max(lengths) == r.input_ids.shape[1] - int(r.prompt_lengths.max())


@requires_vllm
def test_real_vocabulary_and_several_stop_tokens(tokenizer, prompts):
    """Qwen3's vocabulary (151,936) and a generation config that lists many EOS tokens, as Qwen3 lists two."""
    model = qwen3(tokenizer, vocab=151936, seed=1, initializer_range=0.02)
    eos = [tokenizer.eos_token_id, *range(1000, 11000)]  # ~7% of the vocabulary: rows end after ~15 tokens
    model.generation_config.eos_token_id = eos
    rng_state, python_state = torch.get_rng_state(), random.getstate()
    engine = vllm_engine.VLLMEngine(model, tokenizer, max_model_len=256)
    assert torch.equal(torch.get_rng_state(), rng_state) and random.getstate() == python_state  # vLLM reseeds
    max_new = 48
    try:
        r = engine.generate(prompts, n=4, max_new_tokens=max_new, seed=0)
    finally:
        engine.close()
    lengths = check_layout(r, tokenizer, prompts, 4, set(eos), tokenizer.pad_token_id)
    assert min(lengths) < max_new and int(r.input_ids.max()) > len(tokenizer)
    last = r.input_ids[r.response_mask & ~torch.roll(r.response_mask, -1, 1)]  # each row's last token
    assert all(int(t) in eos for t, length in zip(last, lengths) if length < max_new)


@requires_vllm
@pytest.mark.parametrize("stop", ["tokenizer", "generation config"])
def test_greedy_equals_generate_token_for_token(student, tokenizer, prompts, stop):
    """Token for token, also when the generation config's EOS list leaves out the tokenizer's EOS: then
    rollouts run through <|im_end|> in both engines."""
    model = copy.deepcopy(student)
    if stop == "generation config":
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    hf = rollout.generate_rollouts(model, tokenizer, prompts, n=2, max_new_tokens=30, temperature=0)
    engine = vllm_engine.VLLMEngine(model, tokenizer, max_model_len=MAX_LEN)
    try:
        ours = engine.generate(prompts, n=2, max_new_tokens=30, temperature=0)
    finally:
        engine.close()
    for field in ("input_ids", "attention_mask", "response_mask", "prompt_lengths", "prompt_index"):
        assert torch.equal(getattr(hf, field), getattr(ours, field)), field
    assert hf.texts == ours.texts and len(set(hf.texts)) > 1
    # rows reach <|im_end|>, and run on through it where it is no stop token
    assert tokenizer.eos_token_id in hf.input_ids[hf.response_mask].tolist()


def fitted(model, batch, mask, labels, steps: int):
    """`model` trained on the left-padded rows `batch` (loss at `labels` other than -100) until it reproduces them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=batch, attention_mask=mask, position_ids=position_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def tool_calling_student(tokenizer, tasks, turns, steps=400):
    """A student that learned each task's scripted assistant turns (`turns[i]`, a tool call and then an answer),
    with the tool's real results between them: greedy decoding replays a conversation with tools."""
    model = qwen3(tokenizer, initializer_range=0.02)
    rows = []
    for task, texts in zip(tasks, turns):
        messages = [dict(m) for m in task.messages]
        for text in texts:
            messages.append({"role": "assistant", "content": text})
            for call in rollout.parse_tool_calls(text):
                messages.append({"role": "tool", "content": rollout.run_tool_call(
                    call, {tool.__name__: tool for tool in task.tools})})
        ids = tokenizer.apply_chat_template(messages, tools=task.tools, tokenize=True, return_dict=True)["input_ids"]
        rows.append(ids)
    batch, mask = rollout.left_padded(rows, tokenizer.pad_token_id)
    labels = batch.masked_fill(mask == 0, -100)
    return fitted(model, batch, mask, labels, steps)


@requires_vllm
def test_greedy_conversations_with_tools_equal_generate_token_for_token():
    """rollout.generate_conversations through the engine: under greedy decoding the same turns, tool results and
    masks as transformers generate, token for token, over several turns and with each row's own budget."""
    from test_conversations import CALL_A, lookup, tokenizer_with_tools
    tokenizer = tokenizer_with_tools()
    tasks = [rollout.Task([{"role": "user", "content": f"task {i}"}], [lookup]) for i in range(3)]
    turns = [[CALL_A, "A is 7"], ["42"], [CALL_A.replace('"A"', '"B"'), "B is 3"]]
    model = tool_calling_student(tokenizer, tasks, turns)
    engine = vllm_engine.VLLMEngine(model, tokenizer, max_model_len=MAX_LEN)
    try:
        for budget in (170, 60):  # room for every turn; a limit that cuts the conversations short
            hf = rollout.generate_conversations(model, tokenizer, tasks, 2, budget, 4, temperature=0)
            ours = rollout.generate_conversations(model, tokenizer, tasks, 2, budget, 4, temperature=0, engine=engine)
            for field in ("input_ids", "attention_mask", "response_mask", "prompt_lengths", "prompt_index"):
                assert torch.equal(getattr(hf, field), getattr(ours, field)), (budget, field)
            assert hf.conversations == ours.conversations and hf.texts == ours.texts
            if budget == 170:  # the learned conversations: a tool call, its result, then the answer
                assert [m["role"] for m in hf.conversations[0]] == ["user", "assistant", "tool", "assistant"]
                assert hf.conversations[0][2]["content"] == "7" and hf.conversations[4][2]["content"] == "3"
                assert [m["role"] for m in hf.conversations[2]] == ["user", "assistant"]
    finally:
        engine.close()


@requires_vllm
def test_samples_follow_top_p_and_the_seed(engine, student, tokenizer, prompts):
    """Every sampled token lies in the nucleus of the student's own distribution (no top-k or temperature
    from elsewhere); a seed reproduces the samples and leaves the caller's random stream alone."""
    top_p = 0.3
    state = torch.get_rng_state()
    r = engine.generate(prompts, n=4, max_new_tokens=24, top_p=top_p, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = student(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids).logits
    probs = logits[:, :-1][r.response_mask[:, 1:]].softmax(-1)
    tokens = r.input_ids[r.response_mask]
    mass_above = (probs * (probs > probs.gather(1, tokens[:, None]))).sum(-1)
    assert tokens.numel() > 50 and (mass_above < top_p + 1e-5).all()
    again = engine.generate(prompts, n=4, max_new_tokens=24, top_p=top_p, seed=5)
    other = engine.generate(prompts, n=4, max_new_tokens=24, top_p=top_p, seed=6)
    assert torch.equal(r.input_ids, again.input_ids) and not torch.equal(r.input_ids, other.input_ids)
    assert len(set(r.texts[:4])) > 1  # the n samples of a prompt differ, and so do equal prompts' samples
    twice = engine.generate([prompts[0]] * 2, n=1, max_new_tokens=24, seed=5)
    assert twice.texts[0] != twice.texts[1]


def engine_logprob_gap(engine, model, encoded, seed) -> float:
    """Largest |log p| difference between what vLLM reports for its own samples and the transformers model."""
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=24, seed=seed, logprobs=0, detokenize=False)  # logprobs=0: the sampled one
    worst = 0.0
    for ids, out in zip(encoded, engine.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                                                     use_tqdm=False)):
        sampled = list(out.outputs[0].token_ids)
        reported = torch.tensor([step[token].logprob for step, token in zip(out.outputs[0].logprobs, sampled)])
        with torch.no_grad():
            log_p = model(torch.tensor([ids + sampled])).logits[0, len(ids) - 1:-1].double().log_softmax(-1)
        worst = max(worst, float((reported - log_p[torch.arange(len(sampled)), sampled]).abs().max()))
    return worst


def trained_copy(model, ids: list[int], steps: int = 3):
    """A copy of `model` after `steps` SGD steps (lr 0.5) of language modelling on one sequence `ids`: weights the
    engine does not hold until the next sync."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    batch = torch.tensor([ids])
    for _ in range(steps):
        trained(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return trained


@requires_vllm
def test_sync_pushes_the_trained_weights(engine, student, tokenizer):
    """After optimizer steps on the transformers student, vLLM's log-probabilities of its own samples match the
    student's only once sync() ran. Prompts span several KV blocks, so vLLM's prefix cache holds them too."""
    long = "What is (12+34)*5-6 when you add 7, multiply by 8 and then subtract 9 from all of it? " * 3
    encoded = data.encode_prompts(tokenizer, [data.format_prompt(tokenizer, long + q) for q in QUESTIONS])
    assert min(map(len, encoded)) > 256  # two KV blocks at least
    assert engine_logprob_gap(engine, student, encoded, seed=1) < 1e-4
    trained = trained_copy(student, encoded[0] + tokenizer("\\boxed{42}", add_special_tokens=False).input_ids)
    assert engine_logprob_gap(engine, trained, encoded, seed=1) > 0.05
    engine.sync(trained)
    assert engine_logprob_gap(engine, trained, encoded, seed=1) < 1e-4


def tied(tokenizer, architecture: str, seed=0):
    """A random fp32 model whose LM head is its input embeddings (Qwen3 0.6B-4B, Llama 3.2, SmolLM2)."""
    if architecture == "qwen3":
        return qwen3(tokenizer, seed=seed, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=MAX_LEN, tie_word_embeddings=True,
        initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_sync_names_every_weight_transformers_saves(tokenizer, architecture):
    """The sync sends a weight under every name a checkpoint of the model holds (transformers' state_dict, the
    independent reference): a tied head goes as lm_head.weight too, the same tensor as the embeddings."""
    model = tied(tokenizer, architecture)
    sent = dict(vllm_engine.engine_weights(model))
    assert set(sent) == set(model.state_dict()) and "lm_head.weight" in sent
    assert sent["lm_head.weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = qwen3(tokenizer)
    assert set(dict(vllm_engine.engine_weights(untied))) == set(untied.state_dict())


@requires_vllm
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_tied_heads_sample_as_generate_before_and_after_training(tokenizer, prompts, architecture):
    """A tied model through the engine: greedy rollouts equal generate's token for token at creation, and after
    optimizer steps and a sync the engine's log-probabilities of its own samples are the trained model's."""
    model = tied(tokenizer, architecture)
    hf = rollout.generate_rollouts(model, tokenizer, prompts, n=1, max_new_tokens=30, temperature=0)
    engine = vllm_engine.VLLMEngine(model, tokenizer, max_model_len=MAX_LEN)
    try:
        ours = engine.generate(prompts, n=1, max_new_tokens=30, temperature=0)
        assert torch.equal(hf.input_ids, ours.input_ids) and len(set(hf.texts)) > 1
        trained = trained_copy(model, data.encode_prompts(tokenizer, prompts[:1])[0] + [5, 6, 7])
        encoded = data.encode_prompts(tokenizer, prompts)
        assert engine_logprob_gap(engine, trained, encoded, seed=1) > 0.05
        engine.sync(trained)
        assert engine_logprob_gap(engine, trained, encoded, seed=1) < 1e-4
        assert engine.last_gap < 1e-4  # the engine's own check agrees
    finally:
        engine.close()


@requires_vllm
@pytest.mark.parametrize("missed", ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"])
def test_the_on_policy_check_stops_an_engine_with_another_models_weights(tokenizer, monkeypatch, missed):
    """A weight the sync does not reach keeps vLLM's dummy initialisation: the check raises at once, naming the
    largest log-probability difference, instead of sampling another model's rollouts."""
    model = tied(tokenizer, "qwen3")
    real_weights = vllm_engine.engine_weights
    monkeypatch.setattr(vllm_engine, "engine_weights",
                        lambda m: ((name, w) for name, w in real_weights(m) if name != missed))
    with pytest.raises(vllm_engine.OffPolicyError, match=r"differ from the student's by up to (\d+\.?\d*) nats") \
            as raised:
        vllm_engine.VLLMEngine(model, tokenizer, max_model_len=MAX_LEN)
    gap = float(re.search(r"up to ([\d.e+-]+) nats", str(raised.value)).group(1))
    assert gap > 1.0  # an unsynced weight moves the log-probabilities by nats, far beyond the tolerance


@requires_vllm
def test_a_mismatch_on_another_rank_stops_this_one_too(engine, student, monkeypatch):
    """Every rank acts on the largest gap over all ranks: a rank whose own engine matches still stops when
    another rank's does not (else it would wait in the next collective for a rank that stopped)."""
    assert engine.check_on_policy(student) < 1e-4
    monkeypatch.setattr(tip, "all_reduce_max", lambda value, device: max(value, 3.0))  # another rank saw 3 nats
    with pytest.raises(vllm_engine.OffPolicyError, match="by up to 3 nats"):
        engine.check_on_policy(student)
    assert engine.last_gap == 3.0


@requires_vllm
def test_the_check_catches_stale_weights_and_runs_every_n_syncs(engine, student, tokenizer, monkeypatch):
    """Weights that changed after the last sync fail the check (fp32 tolerance 0.05 nats); with check_every=2 the
    check runs at syncs 1, 3, 5 ... and the gap of an unchecked sync is None, not the last one's."""
    assert engine.check_on_policy(student) < 1e-4
    trained = trained_copy(student, data.encode_prompts(tokenizer, QUESTIONS[:1])[0] + [5, 6, 7])
    with pytest.raises(vllm_engine.OffPolicyError):
        engine.check_on_policy(trained)
    checks = []
    real_check = vllm_engine.VLLMEngine.check_on_policy
    monkeypatch.setattr(vllm_engine.VLLMEngine, "check_on_policy",
                        lambda self, model: checks.append(self.syncs) or real_check(self, model))
    engine.check_every, engine.syncs = 2, 0
    gaps = []
    for _ in range(5):
        engine.sync(trained)
        gaps.append(engine.last_gap)
    assert checks == [1, 3, 5]
    assert [gap is None for gap in gaps] == [False, True, False, True, False]


@requires_vllm
def test_sync_gathers_fsdp2_shards(student, tokenizer, prompts, tmp_path):
    """An FSDP2-sharded student (DTensor parameters, class FSDPQwen3ForCausalLM) feeds the engine as the plain
    one does; one rank here, so full_tensor() gathers from itself."""
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sharded = copy.deepcopy(student)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert hasattr(next(sharded.parameters()), "full_tensor")
        engine = vllm_engine.VLLMEngine(sharded, tokenizer, max_model_len=MAX_LEN)
        ours = engine.generate(prompts, n=1, max_new_tokens=30, temperature=0)
        engine.close()  # vLLM's teardown destroys the process group too
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    hf = rollout.generate_rollouts(student, tokenizer, prompts, n=1, max_new_tokens=30, temperature=0)
    assert torch.equal(hf.input_ids, ours.input_ids)


@requires_vllm
def test_sleep_and_wake_are_safe_on_cpu(engine, prompts):
    engine.sleep()  # vLLM has no sleep mode on CPU: nothing happens, the weights stay
    engine.wake_up()
    assert engine.generate(prompts[:1], n=1, max_new_tokens=4, seed=0).input_ids.shape[0] == 1
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts, n=1, max_new_tokens=MAX_LEN)


def answering_student(tokenizer, prompts, shares, steps=150):
    """A student that answers prompt i with \\boxed{1} at a share shares[i] of its samples, else \\boxed{2}."""
    model = qwen3(tokenizer, initializer_range=0.02)
    encoded = data.encode_prompts(tokenizer, prompts)
    rows = []
    for ids, share in zip(encoded, shares):
        for k in range(10):
            answer = "1" if k < 10 * share else "2"
            rows.append(ids + tokenizer(f"\\boxed{{{answer}}}<|im_end|>", add_special_tokens=False).input_ids)
    batch, mask = rollout.left_padded(rows, tokenizer.pad_token_id)  # the answers, equally long, end every row
    labels = batch.clone()
    labels[:, :-len(tokenizer("\\boxed{1}<|im_end|>", add_special_tokens=False).input_ids)] = -100
    return fitted(model, batch, mask, labels, steps)


@requires_vllm
def test_evaluate_mean_at_k_through_the_engine(tmp_path, tokenizer, monkeypatch):
    problems = [{"problem": q, "answer": "1"} for q in QUESTIONS]
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    folder = tmp_path / "student"
    answering_student(tokenizer, evaluate.benchmark_prompts(problems, tokenizer), [0.9, 0.2, 0.7, 0.3]) \
        .save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def run(engine, *flags):
        out = tmp_path / f"{engine}{len(flags)}.json"
        evaluate.main(["--model", str(folder), "--data", str(data), "--max-new-tokens", "16", "--device", "cpu",
                       "--engine", engine, "--out", str(out), *flags])
        return json.loads(out.read_text())

    calls = []
    engine_generate = vllm_engine.VLLMEngine.generate
    monkeypatch.setattr(vllm_engine.VLLMEngine, "generate", lambda *args, **kwargs: calls.append(args[2]) or
                        engine_generate(*args, **kwargs))
    greedy = {engine: run(engine, "--greedy") for engine in ("hf", "vllm")}
    assert calls == [1]  # one call: the 4 problems x 1 sample, through the engine
    predictions = {engine: [p["predictions"] for p in run["problems"]] for engine, run in greedy.items()}
    assert predictions["hf"] == predictions["vllm"]
    assert greedy["hf"]["summary"]["accuracy"] == greedy["vllm"]["summary"]["accuracy"] == 0.5
    sampled = {engine: run(engine, "--samples", "32")["summary"]["accuracy"] for engine in ("hf", "vllm")}
    # both estimate the same mean@32 (about 0.5); their difference has a standard deviation of about 0.06
    assert abs(sampled["hf"] - sampled["vllm"]) < 0.2 and 0.25 < sampled["vllm"] < 0.75


def test_evaluate_engine_flag_without_vllm(monkeypatch, tmp_path, tiny_pair, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match=r"pip install -r requirements-vllm\.txt"):
        evaluate.main(["--model", str(tiny_pair / "student"), "--data", str(data), "--engine", "vllm",
                       "--device", "cpu", "--out", str(tmp_path / "out.json")])


@requires_vllm
def test_benchmark_runs_at_tiny_size():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_rollout.py"), "--tiny"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 16 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 8 and all(float(cells[i]) > 0 for i in (1, 2, 5, 6)), row  # both engines ran whole steps
