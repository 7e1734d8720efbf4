"""Rollout throughput (paper §3: y ~ S_θ(·|x)) and train.py's whole step, `generate` vs the vLLM engine, on the
same random Qwen3 student (~100M parameters, Qwen3's vocabulary) and prompts; per response length, the sampling
throughput and the step's seconds. Exit code 1 when the engine's sampling misses 2.5x `generate`.

    python benchmarks/bench_rollout.py --lengths 256 1024     # needs: pip install -r requirements-vllm.txt
    python benchmarks/bench_rollout.py --toy --repeats 5
    python benchmarks/bench_rollout.py --tiny                 # seconds: checks only that both engines run
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flags import require_positive
from readings import machine_line

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import rollout  # noqa: E402  (after the path fix, so the script runs from any folder)
import worlds  # noqa: E402
import tip  # noqa: E402
import vllm_engine  # noqa: E402

TARGET = 2.5
# What runs: each engine runs train.py's `run_step` (rollouts, scoring, selection, loss, optimizer; the engine also
# sleeps and takes the new weights) on its own copy of the same random Qwen3 student with Qwen3's vocabulary
# (151,936; tied embeddings, ~100M parameters at the default size), a teacher 1.5x wider, and the same prompts; the
# two take turns step by step, so a change in the machine's load hits both. The table gives, per response length,
# the sampling throughput (response tokens/s, median of --repeats steps) and the whole step's seconds, with
# ratios. --toy: the built-in toy pair and its prompts instead; the target is for the ~100M model, so neither
# --toy nor --tiny checks it.


@dataclass
class RolloutFlags:
    lengths: list[int] = tip.arg([], "response lengths (max new tokens) to time; empty = 256 (the toy pair: 48, "
                                 "its training length)")
    rollouts: int = tip.arg(32, "rollouts per run")
    prompts: int = tip.arg(8, "prompts per run (rollouts / prompts samples each)")
    hidden: int = tip.arg(512, "student hidden size (head_dim 64)")
    layers: int = tip.arg(8, "student layers")
    vocab: int = tip.arg(151936, "vocabulary (Qwen3: 151,936)")
    repeats: int = tip.arg(1, "timed steps per engine and length (median)")
    threads: int = tip.arg(torch.get_num_threads(), "torch CPU threads")
    micro_batch_size: int = tip.arg(8, "rollouts per forward/backward in the step")
    toy: bool = tip.arg(False, "the built-in toy pair and prompts instead of a random Qwen3")
    seed: int = tip.arg(0, "random seed of the models and prompts")
    tiny: bool = tip.arg(False, "a tiny model and short rollouts: runs in seconds, target not checked")


def word_tokenizer(vocab: int):
    """A tokenizer whose vocabulary is exactly the model's: words w0, w1, … (w2 is EOS), no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w1", eos_token="w2")


def random_qwen3(args, tokenizer, hidden: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=args.layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 128), head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=max(args.lengths) + 256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def pair_and_prompts(args):
    """(student, teacher, tokenizer, prompt texts): the toy pair and its train prompts, or random Qwen3s with
    Qwen3's vocabulary (the teacher 1.5x wider, as a real teacher is larger) and random prompts of 16-63 words."""
    if args.toy:
        config = tip.Config(**tip.PRESETS["toy"], dtype="float32")
        teacher, student, tokenizer = worlds.load_pair(config, torch.device("cpu"))
        prompts = [p["prompt"] for p in worlds.load_prompts(config, tokenizer)[:args.prompts]]
        return student, teacher, tokenizer, prompts
    tokenizer = word_tokenizer(args.vocab)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"w{int(t)}" for t in torch.randint(3, args.vocab, (int(length),), generator=generator))
               for length in torch.randint(16, 64, (args.prompts,), generator=generator)]
    teacher = random_qwen3(args, tokenizer, args.hidden * 3 // 2 // 64 * 64, args.seed + 1)
    return random_qwen3(args, tokenizer, args.hidden, args.seed), teacher, tokenizer, prompts


def step_table(args, student, teacher, tokenizer, prompts, engine, n: int) -> list[int]:
    """Times train.py's `run_step` with each engine, per length: its sampling (response tokens/s) and the whole
    step. Each engine trains its own copy of the student, and the two take turns step by step, so a change in
    the machine's load hits both. Returns the lengths where the engine's sampling misses the target."""
    import copy
    import train
    students = {"generate": student, "vllm": copy.deepcopy(student)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in students.items()}
    engines = {"generate": None, "vllm": engine}
    items = [{"prompt": text, "answer": None} for text in prompts]
    print("| response tokens | generate tok/s | vLLM tok/s | vLLM / generate | mean length (generate / vLLM) | "
          "generate step s | vLLM step s | step: generate / vLLM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    missed = []
    for length in args.lengths:
        config = tip.Config(prompts="", prompts_per_step=len(prompts), rollouts_per_prompt=n, max_response_len=length,
                            steps=100, lr=1e-5, micro_batch_size=args.micro_batch_size, dtype="float32",
                            gradient_checkpointing=True, seed=args.seed)
        records = {name: [] for name in students}
        for step in range(args.repeats):
            for name in students:
                train.prepare_student(students[name], config)
                records[name].append(train.run_step(step, students[name], teacher, tokenizer, optimizers[name], items,
                                                    None, config, torch.device("cpu"), engines[name]))

        def median(name, key):
            return statistics.median(r[key] for r in records[name])
        rate = {name: statistics.median(r["response_tokens"] / r["rollout_seconds"] for r in records[name])
                for name in students}
        mean_length = {name: median(name, "response_tokens") / (n * len(prompts)) for name in students}
        seconds = {name: median(name, "seconds") for name in students}
        ratio = rate["vllm"] / rate["generate"]
        print(f"| {length} | {rate['generate']:.1f} | {rate['vllm']:.1f} | {ratio:.2f}x | "
              f"{mean_length['generate']:.0f} / {mean_length['vllm']:.0f} | {seconds['generate']:.1f} | "
              f"{seconds['vllm']:.1f} | {seconds['generate'] / seconds['vllm']:.2f}x |", flush=True)
        if ratio < TARGET:
            missed.append(length)
    return missed


def main(args) -> int:
    require_positive(args, ["rollouts", "prompts", "repeats", "hidden", "layers", "vocab", "micro_batch_size"])
    if args.rollouts % args.prompts:
        raise SystemExit("--rollouts must be a multiple of --prompts")
    torch.set_num_threads(args.threads)
    model, teacher, tokenizer, prompts = pair_and_prompts(args)
    n = args.rollouts // len(prompts)
    parameters = sum(p.numel() for p in model.parameters())
    what = "the toy student" if args.toy else f"random Qwen3, hidden {args.hidden}, {args.layers} layers"
    print(f"{machine_line('cpu')}\nstudent: {what}, {parameters / 1e6:.1f}M parameters, vocab "
          f"{model.config.vocab_size}, fp32; teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M; "
          f"{n * len(prompts)} rollouts ({len(prompts)} prompts x {n}) per step, type_aware, micro-batches of "
          f"{args.micro_batch_size} with gradient checkpointing, AdamW")
    start = time.perf_counter()
    engine = vllm_engine.VLLMEngine(model, tokenizer, max_model_len=max(args.lengths) + 128, seed=args.seed)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    engine.sync(model)
    sync = time.perf_counter() - start
    rollout.generate_rollouts(model, tokenizer, prompts, n, 8, seed=args.seed)  # warm-up
    engine.generate(prompts, n, 8, seed=args.seed)
    print(f"vLLM engine: start-up {startup:.1f} s (once), sync {sync:.2f} s (after every optimizer step, inside "
          f"its step time)\n")
    missed = step_table(args, model, teacher, tokenizer, prompts, engine, n)
    engine.close()
    if args.tiny or args.toy:
        print(f"\n--{'tiny' if args.tiny else 'toy'}: the {TARGET}x target is for the ~100M model, not checked here")
        return 0
    print(f"\ntarget: vLLM sampling >= {TARGET}x generate: " + (f"MISSED at {missed}" if missed else "met"))
    return 1 if missed else 0


def parse(argv=None) -> RolloutFlags:
    args = tip.parse_flags(RolloutFlags, argv, __doc__.split("\n\n")[0])
    args.lengths = args.lengths or [tip.PRESETS["toy"]["max_response_len"] if args.toy else 256]
    if args.tiny:
        args.lengths, args.rollouts, args.prompts, args.hidden, args.layers, args.vocab = [16], 8, 4, 64, 2, 512
    return args


if __name__ == "__main__":
    sys.exit(main(parse()))
