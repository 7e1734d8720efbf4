"""train.py --engine vllm: every step samples from the weights the step before made (§3: on-policy), in one
process and under torchrun. Skipped where vllm is not installed (pip install -r requirements-vllm.txt)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import data
import train
import vllm_engine
from conftest import ROOT, char_tokenizer, tiny_causal_lm
from test_vllm import engine_logprob_gap

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed: pip install -r requirements-vllm.txt")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A saved pair vLLM can run (its CPU attention needs heads of 32 or more) and a prompt file. The student
    ties its head to its embeddings, as Qwen3 0.6B-4B do."""
    folder = tmp_path_factory.mktemp("vllm_pair")
    tokenizer = char_tokenizer()
    for role, hidden, seed, tied in (("teacher", 96, 1, False), ("student", 64, 2, True)):
        tiny_causal_lm(tokenizer, hidden, seed=seed, tie_word_embeddings=tied).save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    rows = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def cli(folder, out_dir, *extra):
    return ["--teacher", str(folder / "teacher"), "--student", str(folder / "student"), "--engine", "vllm",
            "--prompts", str(folder / "prompts.jsonl"), "--no-math-instruction", "--steps", "3",
            "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-response-len", "12",
            "--max-prompt-len", "64", "--lr", "1e-2", "--seed", "3", "--out-dir", str(out_dir), *extra]


def test_each_step_samples_from_the_weights_the_step_before_made(pair, tmp_path, monkeypatch):
    """Around every sync after an optimizer step: before it, the engine's log-probabilities of its own samples
    differ from the trained student's (recomputed with transformers, fp32); after it, they are equal."""
    tokenizer = char_tokenizer()
    encoded = data.encode_prompts(tokenizer, [data.format_prompt(tokenizer, f"{a}+1=") for a in range(3)])
    gaps, real_sync = [], vllm_engine.VLLMEngine.sync

    def checked_sync(engine, model):
        before = engine_logprob_gap(engine, model, encoded, seed=1) if gaps else None  # the first: at creation
        real_sync(engine, model)
        gaps.append((before, engine_logprob_gap(engine, model, encoded, seed=1)))
    monkeypatch.setattr(vllm_engine.VLLMEngine, "sync", checked_sync)
    train.main(cli(pair, tmp_path, "--run-name", "on-policy"))
    assert len(gaps) == 4  # at creation, then after each of the 3 steps
    assert all(after < 1e-4 for _, after in gaps)
    assert all(before > 1e-3 for before, _ in gaps[1:])
    lines = [json.loads(line) for line in (tmp_path / "on-policy" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and not any(line["skipped"] for line in lines)
    assert all(0 <= line["engine_logprob_gap"] < 1e-3 for line in lines)  # the built-in check, logged per step


def test_a_weight_the_sync_misses_stops_the_run(pair, tmp_path, monkeypatch):
    """A sync that leaves one weight at the engine's dummy initialisation (here the tied head, as the sync did
    before it listed a tied head under its own name) stops the run with one line naming the gap, before any
    step trains on another model's rollouts."""
    real_weights = vllm_engine.engine_weights
    monkeypatch.setattr(vllm_engine, "engine_weights", lambda model: ((name, w) for name, w in real_weights(model)
                                                                      if name != "lm_head.weight"))
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *args, **kwargs: steps.append(1))
    with pytest.raises(SystemExit, match=r"^error: the vLLM engine's log-probabilities differ from the student's by "
                                         r"up to \d"):
        train.main(cli(pair, tmp_path, "--run-name", "missed"))
    assert steps == []


def test_two_processes_with_the_engine(pair, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *cli(pair, tmp_path, "--run-name", "two", "--steps", "2")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["response_tokens"] > 0 and not line["skipped"] for line in lines)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()


def test_conversations_with_tools_are_sampled_by_the_engine(pair, tmp_path, monkeypatch):
    """With tasks (conversations with tools), train.py samples every turn of the rollouts and of the held-out
    evaluation through the engine, never through transformers generate, and trains on them; the engine sleeps
    after each step's sampling and is synced from the trained weights before the next."""
    import rollout
    import worlds

    def count(name: str) -> int:
        """The number a name spells.

        Args:
            name: digits
        """
        return int(name)

    tokenizer = char_tokenizer()
    tasks = [rollout.Task([{"role": "user", "content": f"{a}+1="}], [count]) for a in range(4)]
    config_prompts = [{"prompt": tokenizer.apply_chat_template(t.messages, tokenize=False, add_generation_prompt=True),
                       "answer": None, "task": t} for t in tasks]
    monkeypatch.setattr(worlds, "load_prompts", lambda config, tokenizer: config_prompts)
    monkeypatch.setattr(worlds, "held_out_problems", lambda config, tokenizer: [{**p, "answer": "1"}
                                                                                for p in config_prompts[:2]])
    monkeypatch.setattr(rollout, "sample_tokens", lambda *a, **k: pytest.fail("sampled with generate"))
    events, real = [], {name: getattr(vllm_engine.VLLMEngine, name) for name in ("sample_tokens", "sleep", "sync")}
    for name in real:
        monkeypatch.setattr(vllm_engine.VLLMEngine, name, lambda self, *a, _name=name, **k: events.append(_name)
                            or real[_name](self, *a, **k))
    train.main(cli(pair, tmp_path, "--run-name", "talk", "--steps", "2", "--max-turns", "2"))
    lines = [json.loads(line) for line in (tmp_path / "talk" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "kept_tokens" in line]
    assert len(steps) == 2 and all(line["response_tokens"] > 0 and not line["skipped"] for line in steps)
    assert [line["step"] for line in lines if "held_out_accuracy" in line] == [0, 2]
    # the sync at creation; the held-out turns and step 1's; per step: sleep, then the sync of its weights, and
    # the next turns (step 2's, then the held-out ones after training)
    collapsed = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert collapsed == ["sync", "sample_tokens", "sleep", "sync", "sample_tokens", "sleep", "sync",
                         "sample_tokens"], collapsed
