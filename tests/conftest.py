"""Tests run offline, from the project root, on tiny models built from configs."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and other processes share the cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # the measurement scripts (study, world_measures) are tested too
    sys.path.append(str(ROOT / "benchmarks"))


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHARS = "0123456789+-*=(){}$\\ .,?:\"\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def char_tokenizer(chars: str = CHARS):
    """A character-level tokenizer with a ChatML-like template (pad ≠ eos, no BOS), built with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_causal_lm(tokenizer, hidden: int, layers: int = 2, seed: int = 0, **overrides):
    """A random Qwen3 causal LM over `tokenizer`'s vocabulary, small enough for a CPU test."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{"tie_word_embeddings": False, **overrides})
    model = Qwen3ForCausalLM(config)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Path:
    """`teacher/` (hidden 48) and `student/` (hidden 32): random Qwen3 models from configs sharing a
    character-level tokenizer (chat template), saved with save_pretrained as a user's folders would be."""
    folder = tmp_path_factory.mktemp("tiny_pair")
    tokenizer = char_tokenizer()
    for role, hidden, seed in (("teacher", 48, 1), ("student", 32, 2)):
        tiny_causal_lm(tokenizer, hidden, seed=seed).save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    return folder


@pytest.fixture(scope="session")
def pair_and_prompts(tiny_pair):
    """The tiny saved pair and a local prompt file with answers, as a user would pass them."""
    rows = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
    (tiny_pair / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_pair


def cli(folder, out_dir, run_name, *extra):
    """train.py's command line for the tiny pair and its prompts: 4 short steps unless `extra` says otherwise
    (a flag given again wins)."""
    return ["--teacher", str(folder / "teacher"), "--student", str(folder / "student"),
            "--prompts", str(folder / "prompts.jsonl"), "--no-math-instruction", "--steps", "4",
            "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-response-len", "6",
            "--micro-batch-size", "3", "--lr", "1e-3", "--chunk-size", "4", "--seed", "3",
            "--out-dir", str(out_dir), "--run-name", run_name, *extra]


def recording(real, calls: list, answer=lambda arguments: None):
    """Stands in for `real`: appends each call's arguments to `calls` by parameter name (defaults filled in),
    and returns answer(those arguments)."""
    import inspect
    signature = inspect.signature(real)

    def stand_in(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return answer(calls[-1])
    return stand_in
