"""Rollout throughput (paper §3: y ~ S_θ(·|x)), transformers `generate` vs the vLLM engine (rollout.py).

Both engines sample the same rollouts (temperature 1, top-p 1) from the same random Qwen3 student with
Qwen3's vocabulary (151,936; tied embeddings, ~100M parameters at the default size), for the same prompts.
Sampling dominates a training step on one machine, so this ratio is what the optional engine buys. After a
warm-up the two engines take turns for --repeats timed runs; the table gives response tokens per second
(median) and the engine/generate ratio per response length. Exit code 1 when a ratio misses the target
(2.5x on CPU) at full size; --tiny runs a tiny model in seconds and checks only that both engines run.

    python benchmarks/bench_rollout.py                  # needs: pip install -r requirements-vllm.txt
    python benchmarks/bench_rollout.py --tiny
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import machine_line, require_positive

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import rollout  # noqa: E402  (after the path fix, so the script runs from any folder)

TARGET = 2.5


def word_tokenizer(vocab: int):
    """A tokenizer whose vocabulary is exactly the model's: words w0, w1, … (w2 is EOS), no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w1", eos_token="w2")


def student(args, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(args.seed)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=max(args.lengths) + 256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def run(sample, length: int) -> tuple[float, float]:
    """(response tokens per second, mean response length) of one call `sample(length)`."""
    start = time.perf_counter()
    r = sample(length)
    seconds = time.perf_counter() - start
    tokens = int(r.response_mask.sum())
    return tokens / seconds, tokens / r.input_ids.shape[0]


def main(args) -> int:
    require_positive(args, ["rollouts", "prompts", "repeats", "hidden", "layers", "vocab"])
    if args.rollouts % args.prompts:
        raise SystemExit("--rollouts must be a multiple of --prompts")
    torch.set_num_threads(args.threads)
    tokenizer = word_tokenizer(args.vocab)
    model = student(args, tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"w{int(t)}" for t in torch.randint(3, args.vocab, (int(length),), generator=generator))
               for length in torch.randint(16, 64, (args.prompts,), generator=generator)]
    n = args.rollouts // args.prompts
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{machine_line(args)}\nstudent: random Qwen3, {parameters / 1e6:.0f}M parameters, hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}, fp32; {args.rollouts} rollouts ({args.prompts} prompts x {n})")
    start = time.perf_counter()
    engine = rollout.VLLMEngine(model, tokenizer, max_model_len=max(args.lengths) + 128, seed=args.seed)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    engine.sync(model)
    sync = time.perf_counter() - start
    samplers = {"generate": lambda steps: rollout.generate_rollouts(model, tokenizer, prompts, n, steps,
                                                                    seed=args.seed),
                "vllm": lambda steps: engine.generate(prompts, n, steps, seed=args.seed)}
    for sample in samplers.values():
        sample(8)  # warm-up
    print(f"vLLM engine: start-up {startup:.1f} s (once), sync {sync:.2f} s (after every optimizer step)\n")
    print("| response tokens | generate tok/s | vLLM tok/s | vLLM / generate | mean length (generate / vLLM) |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    missed = []
    for length in args.lengths:
        # the engines take turns, so a change in the machine's load hits both
        runs = [{name: run(sample, length) for name, sample in samplers.items()} for _ in range(args.repeats)]
        rate = {name: statistics.median(r[name][0] for r in runs) for name in samplers}
        mean_length = {name: statistics.fmean(r[name][1] for r in runs) for name in samplers}
        ratio = rate["vllm"] / rate["generate"]
        print(f"| {length} | {rate['generate']:.1f} | {rate['vllm']:.1f} | {ratio:.2f}x | "
              f"{mean_length['generate']:.0f} / {mean_length['vllm']:.0f} |", flush=True)
        if ratio < TARGET:
            missed.append(length)
    engine.close()
    if args.tiny:
        print(f"\n--tiny: the {TARGET}x target is not checked")
        return 0
    print(f"\ntarget: vLLM >= {TARGET}x generate: " + (f"MISSED at {missed}" if missed else "met"))
    return 1 if missed else 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--lengths", type=int, nargs="+", default=[256], help="response lengths (max new tokens) to time")
    add("--rollouts", type=int, default=32, help="rollouts per run")
    add("--prompts", type=int, default=8, help="prompts per run (rollouts / prompts samples each)")
    add("--hidden", type=int, default=512, help="student hidden size (head_dim 64)")
    add("--layers", type=int, default=8, help="student layers")
    add("--vocab", type=int, default=151936, help="vocabulary (Qwen3: 151,936)")
    add("--repeats", type=int, default=1, help="timed runs per engine and length (median)")
    add("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    add("--seed", type=int, default=0)
    add("--tiny", action="store_true", help="a tiny model and short rollouts: runs in seconds, target not checked")
    args = parser.parse_args(argv)
    args.device = "cpu"
    if args.tiny:
        args.lengths, args.rollouts, args.prompts, args.hidden, args.layers, args.vocab = [16], 8, 4, 64, 2, 512
    return args


if __name__ == "__main__":
    sys.exit(main(parse()))
