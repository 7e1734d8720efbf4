"""Per-GPU memory of a train.py run (paper §7), estimated from the models' shapes on any machine, without a GPU.

    python benchmarks/estimate_memory.py --preset paper --fsdp --gpus 8 --gpu-memory-gib 80     # Qwen3 8B → 4B
    python benchmarks/estimate_memory.py --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-1.7B --gpus 8 --engine vllm
    python benchmarks/estimate_memory.py --teacher DIR --student DIR --max-response-len 4096 --micro-batch-size 4

Every train.py flag is accepted. It models one optimizer step as train.py runs it, phase by phase: loading the pair
(each rank loads it whole before sharding), sampling (step 1: transformers generate with its KV cache, or the vLLM
engine's --gpu-memory-utilization share, released while the student trains), scoring (step 2: teacher and student
forwards without grad, chunked scores), the loss and the backward of the last micro-batch (step 4), and the
optimizer step (5). The student is fp32 master weights, fp32 gradients and two fp32 AdamW moments (fused: no
temporary at step()); the teacher is frozen in the compute dtype (bf16 on GPU, fp32 on CPU). With --fsdp (FSDP2:
each decoder layer and the whole model are units, parameters gathered in the compute dtype, gradients reduced in
fp32) all of that is divided by --gpus, and what is gathered is added: two decoder layers at a time, and the root
(embeddings, final norm, head) from a forward to the end of the backward (student) or of the step (teacher).
Without it, the GPU computes in bf16 autocast over the fp32 weights, so the residual stream stays fp32.

It is an upper bound of the tensors alive (the longest rollouts, every rank's share rounded up, gradients whole
while the last micro-batch trains), checked against torch's MemTracker on CPU (tests/test_estimate_memory.py).
Exit code 0 when the peak fits in --gpu-memory-gib × 0.9 (the rest: CUDA context, allocator cache and
fragmentation), 1 when it does not, 2 on a wrong flag.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, whichever folder this runs from
    sys.path.insert(0, str(ROOT))
import tip  # noqa: E402

GIB = 2 ** 30
HEADROOM = 0.9  # of a GPU's memory for tensors: the CUDA context, the allocator's cache and fragmentation take the rest
PAPER_PAIR = ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B")  # teacher, student (paper §7.1)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151_936
    tied: bool = False


# Qwen3's public config.json values (hidden, layers, intermediate, heads, kv heads; head_dim 128, vocab 151,936)
QWEN3 = {"Qwen/Qwen3-0.6B": Shape(1024, 28, 3072, 16, 8, tied=True),
         "Qwen/Qwen3-1.7B": Shape(2048, 28, 6144, 16, 8, tied=True),
         "Qwen/Qwen3-4B": Shape(2560, 36, 9728, 32, 8, tied=True), "Qwen/Qwen3-8B": Shape(4096, 36, 12288, 32, 8),
         "Qwen/Qwen3-14B": Shape(5120, 40, 17408, 40, 8), "Qwen/Qwen3-32B": Shape(5120, 64, 25600, 64, 8)}


def shape_of(name: str) -> Shape:
    """A built-in Qwen3 (hub id, with or without 'Qwen/'), or the config.json of a local folder."""
    if name in QWEN3 or f"Qwen/{name}" in QWEN3:
        return QWEN3.get(name) or QWEN3[f"Qwen/{name}"]
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        raise tip.InputError(f"unknown model {name!r}: pass one of {', '.join(QWEN3)}, or a local folder with "
                             f"its config.json (`hf download {name} config.json --local-dir DIR` where the hub "
                             f"is reachable)")
    c = json.loads(path.read_text())
    c = {**c, **c.get("text_config", {})}
    heads = c["num_attention_heads"]
    return Shape(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                 c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                 c["vocab_size"], bool(c.get("tie_word_embeddings", False)))


def toy_shapes() -> tuple[Shape, Shape]:
    """The built-in toy pair (worlds/toy.py: new_model from DEFAULT_RECIPE over its character tokenizer)."""
    from worlds import toy
    r, vocab = toy.DEFAULT_RECIPE, len(toy.build_tokenizer())
    return tuple(Shape(h, n, 3 * h, h // r.head_dim, h // r.head_dim, r.head_dim, vocab)
                 for h, n in ((r.teacher_hidden, r.teacher_layers), (r.student_hidden, r.student_layers)))


def layer_params(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 2 * s.hidden * q + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate + 2 * s.hidden + 2 * s.head_dim


def root_params(s: Shape) -> int:
    """The FSDP2 root's own parameters: embeddings, the head unless tied, the final norm."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def params(s: Shape) -> int:
    return s.layers * layer_params(s) + root_params(s)


def largest_param(s: Shape) -> int:
    return max(s.vocab * s.hidden, s.hidden * s.intermediate)


def layer_with_grad(s: Shape, tokens: int, act: int, c: int) -> float:
    """One decoder layer's recompute and backward: what its forward saves for backward (two RMSNorms that work
    in fp32, q/k/v with their q/k norms and RoPE, SDPA's output, o_proj, the MLP's gate, up, act and product),
    and the gradients alive at once in its backward (the MLP's, the widest)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return tokens * (8 * s.hidden * act + (8 * q + 6 * kv + 7 * s.intermediate) * c)


def layer_no_grad(s: Shape, tokens: int, act: int, c: int) -> float:
    """One decoder layer without grad: freed as it goes, so the widest moment (the MLP's up, act and product,
    or attention's q, k, v and output) beside the residual stream."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return tokens * (3 * s.hidden * act + max(3 * s.intermediate, 4 * q + 3 * kv) * c)


def estimate(config: tip.Config, gpus: int, teacher: Shape, student: Shape, device: str = "cuda",
             gpu_bytes: float = 80 * GIB) -> dict[str, dict[str, float]]:
    """{phase: {component: bytes}} for one rank, in the order the phases run; the peak is the largest sum."""
    gpu = device == "cuda"
    c = {"auto": 2 if gpu else 4, "float32": 4}.get(config.dtype, 2)  # compute (and teacher) bytes per element
    autocast = gpu and c == 2 and not config.fsdp  # fp32 weights cast per op; FSDP2 gathers in bf16 instead
    act = 4 if autocast else c  # the residual stream and checkpointed layer inputs: fp32 under autocast
    shard = gpus if config.fsdp else 1
    rows = math.ceil(config.prompts_per_step * config.rollouts_per_prompt / gpus)  # this rank's rollouts
    # a micro-batch: up to micro_batch_size rollouts at full length, or, with a token budget, at most that many
    # tokens (a rollout longer than the budget alone); `micro` counts full-length rollouts' worth of tokens
    micro = min(config.micro_batch_size, rows)
    if config.micro_batch_tokens:
        micro = min(micro, max(config.micro_batch_tokens, config.max_prompt_len + config.max_response_len)
                    / (config.max_prompt_len + config.max_response_len))
    micro_batches = math.ceil(rows / micro)
    length, response = config.max_prompt_len + config.max_response_len, config.max_response_len
    tokens, scored = round(micro * length), round(micro * response)  # a micro-batch's positions, scored rows
    ratio = config.ratio or tip.load_select().RULES[config.rule].default_ratio
    kept = math.ceil(ratio * scored)
    p_s, p_t, v = params(student), params(teacher), min(student.vocab, teacher.vocab)

    state = dict(weights=4 * p_s / shard, optimizer=8 * p_s / shard, teacher=c * p_t / shard)
    # FSDP2: roots stay gathered (student: forward to end of backward, with its unsharded gradient; teacher: the
    # step), plus two decoder layers (prefetch), and in backward a layer's gradients and their fp32 reduce-scatter
    roots = c * (root_params(student) + root_params(teacher)) if config.fsdp else 0
    gathered_layers = 2 * c * max(layer_params(student), layer_params(teacher)) if config.fsdp else 0
    in_backward = (2 * c * root_params(student) + c * root_params(teacher) + 2 * c * layer_params(student)
                   + (c + 4) * layer_params(student)) if config.fsdp else 0
    cast = 2 * largest_param(student) if autocast else 0  # autocast without its weight cache: one weight at a time
    # the SDPA mask with padding: [micro, 1, L, L] booleans, made by each forward, alive to the end of its backward
    mask = tokens * length
    checkpoints = (student.layers * tokens * student.hidden * act if config.gradient_checkpointing
                   else student.layers * layer_with_grad(student, tokens, act, c))
    one_layer = layer_with_grad(student, tokens, act, c) if config.gradient_checkpointing else 0
    # the final norm (fp32 inside), its output and the response rows gathered from it, and the kept rows
    final = 4 * tokens * student.hidden * act + (scored + kept) * student.hidden * act
    teacher_rows = rows * response * teacher.hidden * c  # kept for the loss (conservative: every micro-batch's)
    if config.single_forward or micro_batches == 1:  # the scoring pass's graph is kept for the loss
        checkpoints *= micro_batches

    phases = {"load": dict(weights=4 * p_s, teacher=c * p_t, **{"load transient": c * largest_param(student)})}
    generation = dict(state, gathered=c * (root_params(student) + 2 * layer_params(student)) if config.fsdp else 0)
    if config.engine == "vllm":
        generation["engine"] = config.gpu_memory_utilization * gpu_bytes if gpu else 0
    else:  # transformers generate, all of this rank's rollouts at once, the KV cache grown to the full length
        kv = rows * length * student.layers * 2 * student.kv_heads * student.head_dim * c
        generation["KV cache"] = kv * (1 + 1 / (2 * student.layers))  # + the torch.cat that grows one layer
        generation["activations"] = (layer_no_grad(student, rows * config.max_prompt_len, act, c)  # the prefill
                                     + 2 * rows * student.vocab * 4 + cast)  # fp32 logits and probabilities
    phases["generation"] = generation
    no_grad = max(layer_no_grad(teacher, tokens, c, c), layer_no_grad(student, tokens, act, c) + cast,
                  3 * config.chunk_size * v * 4 + (2 * student.vocab * student.hidden if autocast else 0))
    phases["scoring"] = dict(state, gathered=roots + gathered_layers, activations=teacher_rows + mask + no_grad)
    grads = dict(gradients=4 * p_s / shard)
    # the loss of the last micro-batch: per chunk two fp32 [chunk, V] buffers (bf16 copies on GPU), the head's
    # gradient as one [V, d] buffer (and under autocast the head in bf16), the hidden states' gradient in fp32
    loss = (config.chunk_size * v * (10 if gpu and c == 2 else 8) + student.vocab * student.hidden * (4 if not
            config.fsdp else c) + (2 * student.vocab * student.hidden if autocast else 0) + kept * student.hidden * 4)
    phases["loss"] = dict(state, **grads, gathered=roots + c * root_params(student) if config.fsdp else 0,
                          activations=teacher_rows / micro_batches + mask + checkpoints + final,
                          **{"loss buffers": loss})
    phases["backward"] = dict(state, **grads, gathered=in_backward,
                              activations=teacher_rows / micro_batches + mask + checkpoints + one_layer + cast
                              + 2 * tokens * student.hidden * act)  # the layer's incoming and outgoing gradient
    step = 0  # fused AdamW and the clip's vector norms make no parameter-sized temporary
    phases["optimizer step"] = dict(state, **grads, gathered=c * root_params(teacher) if config.fsdp else 0,
                                    **{"optimizer step": step})
    return phases


COMPONENTS = ("weights", "gradients", "optimizer", "teacher", "gathered", "activations", "loss buffers", "KV cache",
              "engine", "optimizer step", "load transient")


def report(phases: dict[str, dict[str, float]]) -> str:
    """The table of components (GiB) by phase, and the total of each."""
    names = list(phases)
    lines = ["| component | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for component in COMPONENTS:
        if any(phases[p].get(component) for p in names):
            lines.append(f"| {component} | " + " | ".join(f"{phases[p].get(component, 0) / GIB:.2f}" for p in names)
                         + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(phases[p].values()) / GIB:.2f}**" for p in names) + " |")
    return "\n".join(lines)


def fail(message: str):
    """A wrong input: one line that names the fix, exit code 2 (1 means "does not fit")."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv: list[str] | None = None):
    parser = tip.build_parser(__doc__.split("\n\n")[0] + " Models: " + ", ".join(QWEN3) + ", or a folder with a "
                              "config.json; none: the paper's pair (8B → 4B) with --preset paper, else the toy pair.")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (training processes) of the run (default: 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help=f"memory of one GPU in GiB (default: 80); the run fits when its peak is at most "
                             f"{HEADROOM} of it (the rest: CUDA context, allocator cache, fragmentation)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default), or cpu: fp32 without autocast, as train.py runs on a CPU (the tests)")
    args = parser.parse_args(argv)
    config = tip.config_from_args(args)
    if args.gpus < 1:
        fail(f"--gpus {args.gpus}: the run needs at least one GPU; pass --gpus N, N the GPUs it trains on")
    if args.gpu_memory_gib <= 0:
        fail(f"--gpu-memory-gib {args.gpu_memory_gib}: pass the memory of one GPU, e.g. 80 for an H100")
    if config.prompts_per_step * config.rollouts_per_prompt < args.gpus:
        fail(f"{config.prompts_per_step} prompts x {config.rollouts_per_prompt} rollouts cannot give each "
                     f"of {args.gpus} GPUs a rollout: raise --prompts-per-step or lower --gpus")
    if config.rule not in tip.load_select().RULES:
        fail(f"unknown --rule {config.rule!r}; valid rules: {', '.join(tip.load_select().RULES)}")
    try:
        if config.teacher or config.student or args.preset == "paper":
            teacher, student = (shape_of(name or default) for name, default in
                                zip((config.teacher, config.student), PAPER_PAIR))
        else:
            teacher, student = toy_shapes()
    except tip.InputError as error:
        fail(str(error))
    names = [config.teacher or (PAPER_PAIR[0] if teacher == QWEN3[PAPER_PAIR[0]] else "toy teacher"),
             config.student or (PAPER_PAIR[1] if student == QWEN3[PAPER_PAIR[1]] else "toy student")]
    return config, args, teacher, student, names


def main(argv: list[str] | None = None) -> int:
    config, args, teacher, student, names = parse(argv)
    phases = estimate(config, args.gpus, teacher, student, args.device, args.gpu_memory_gib * GIB)
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    peak, budget = sum(phases[peak_phase].values()), HEADROOM * args.gpu_memory_gib * GIB
    rows = math.ceil(config.prompts_per_step * config.rollouts_per_prompt / args.gpus)
    sharding = "FSDP2" if config.fsdp else "no sharding"
    budget_text = f" within {config.micro_batch_tokens} tokens" if config.micro_batch_tokens else ""
    print(f"# {names[0]} ({params(teacher) / 1e9:.2f} B) → {names[1]} "
          f"({params(student) / 1e9:.2f} B) on {args.gpus} {args.device} device(s), {sharding}, "
          f"engine {config.engine}; {rows} rollouts per rank of ≤{config.max_prompt_len} + "
          f"{config.max_response_len} tokens, micro-batches of {config.micro_batch_size}{budget_text}, "
          f"chunk {config.chunk_size}, "
          f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}")
    print(report(phases))
    fits = peak <= budget
    print(f"{'fits' if fits else 'does NOT fit'}: the peak ({peak_phase}) against {HEADROOM:.0%} of "
          f"{args.gpu_memory_gib:g} GiB = {budget / GIB:.1f} GiB")
    print(f"peak per GPU: {peak / GIB:.1f} GiB")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
