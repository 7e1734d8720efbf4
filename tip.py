"""The setting of TIP (paper §3, §7.1): the one Config, its command-line flags, and helpers every file shares.

`Config` holds every knob of the pipeline with its help text and the paper's default (Table 9); every script
declares its flags the same way (`arg`, `flag_parser`). Also here: torch.distributed helpers, atomic writes,
the cache of built worlds, and `load_select`, the one way project code reaches select.py
(docs/decisions.md, "The name select.py").
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent


class InputError(ValueError):
    """A user's input is wrong (a path, a flag, a file): the message names the problem and the fix. The scripts
    print it alone, without a traceback, and exit non-zero."""


def arg(default, help: str, choices=None):
    """A config field that carries its command-line help (CleanRL style); every script declares flags this way."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- the pair and the data (§7.1) ---
    teacher: str = arg("", "teacher model: local folder or hub id; empty = the built-in toy teacher")
    student: str = arg("", "student model: local folder or hub id; empty = the built-in toy student")
    prompts: str = arg("", "prompt source: a built-in world ('toy', 'facts', 'agent'), deepplanning:PATH (its "
                       "travel tasks, with tools), a hub dataset name, or a local "
                       ".jsonl/.json/.parquet file (the toy preset uses 'toy'; a real pair needs one)")
    prompt_split: str = arg("train", "split of a hub prompt set to read (a local file is one split)")
    prompt_subset: str = arg("", "configuration (subset) of a hub prompt set, e.g. 'en' for "
                             "open-r1/DAPO-Math-17k-Processed; empty = its default")
    prompt_field: str = arg("", "column holding the prompt text; empty = the first of prompt/problem/question")
    answer_field: str = arg("", "column holding the reference answer (for rollout accuracy); empty = the "
                            "first of answer/solution/reward_model.ground_truth; a.b reads field b of column a")
    chat_template_kwargs: str = arg('{"enable_thinking": false}', "JSON object of chat-template switches for "
                                    "every prompt, e.g. Qwen3's enable_thinking (off, as the paper's base code "
                                    "runs Qwen3; templates without the switch ignore it)")
    math_instruction: bool = arg(True, "append the paper's instruction to reason step by step and answer in "
                                 "\\boxed{} to dataset prompts that do not already ask for \\boxed{}")
    world_dir: str = arg("", "where the built-in worlds are cached; empty = $TIP_CACHE or ~/.cache/tip")
    # --- selection (§4–6) ---
    rule: str = arg("type_aware", "token selection rule (select.py RULES); type_aware is the paper's Soft-OR")
    ratio: float = arg(0.0, "kept fraction rho per rollout in (0, 1]; 0 = the rule's default (select.py RULES)")
    exclude_mistakes: bool = arg(False, "the exclusion control: never keep the tokens of a built-in world's known "
                                 "mistake (its <world>_mistake_positions), to test whether only they can fix it")
    divergence: str = arg("reverse_kl", "training loss: reverse_kl (Eqs. 1/9), forward_kl, or jsd",
                          ["reverse_kl", "forward_kl", "jsd"])
    jsd_beta: float = arg(0.5, "beta of the generalized JSD loss (0 = forward KL, 1 = reverse KL)")
    # --- rollouts (§3, Table 9) ---
    prompts_per_step: int = arg(8, "prompts per optimizer step, over all ranks")
    rollouts_per_prompt: int = arg(16, "student samples per prompt")
    max_prompt_len: int = arg(2048, "prompts longer than this many tokens are dropped (and counted)")
    max_response_len: int = arg(8192, "maximum generated tokens per rollout (a conversation: after its opening "
                                "prompt, tool results included)")
    max_turns: int = arg(8, "assistant turns per conversation with tools (--prompts agent or deepplanning:PATH)")
    engine: str = arg("hf", "rollout sampler: hf (transformers generate, runs anywhere) or vllm (vLLM in each "
                      "training process, synced to the student every step; pip install -r requirements-vllm.txt)",
                      ["hf", "vllm"])
    gpu_memory_utilization: float = arg(0.3, "--engine vllm on GPU: the share of the GPU vLLM takes for its weights "
                                        "and KV cache, beside the training step's (its memory is released while "
                                        "the student trains)")
    engine_check_every: int = arg(1, "--engine vllm: after every this many weight syncs, compare the engine's "
                                  "log-probabilities of a short probe with the student's and stop the run on a "
                                  "mismatch (0 = never)")
    engine_check_tolerance: float = arg(0.0, "--engine vllm: the largest |log p| difference (nats) the check allows; "
                                        "0 = by the engine's dtype: 0.05 in fp32, 1.0 in bf16/fp16")
    temperature: float = arg(1.0, "sampling temperature for rollouts")
    top_p: float = arg(1.0, "nucleus sampling top-p for rollouts")
    # --- optimisation (Table 9; weight decay and clip from the base repository) ---
    steps: int = arg(200, "optimizer steps (the paper does not state its count)")
    lr: float = arg(1e-6, "peak AdamW learning rate (3e-7 for Llama in the paper)")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = arg(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    grad_clip: float = arg(1.0, "global gradient-norm clip (0 = off)")
    micro_batch_size: int = arg(8, "rollouts per forward/backward on one rank (gradient accumulation beyond)")
    micro_batch_tokens: int = arg(0, "micro-batches by tokens: rollouts sorted by length and packed while rows x "
                                  "(longest prompt + longest response) stays within this many tokens (and the rows "
                                  "within --micro-batch-size); 0 = consecutive groups of --micro-batch-size rows")
    attn_implementation: str = arg("auto", "the models' attention (transformers' attn_implementation: sdpa, eager, "
                                   "flash_attention_2, ...); auto = flash_attention_2 on a GPU where flash_attn is "
                                   "installed, else transformers' default")
    padding_free: str = arg("auto", "pack each micro-batch's rollouts into one row of their real tokens: auto = where "
                            "the attention has a variable-length path (attn_implementation flash_attention_2/3), "
                            "on = also elsewhere (a block-diagonal mask over the packed row), off = pad",
                            ["auto", "on", "off"])
    chunk_size: int = arg(512, "rows of [rows, vocab] logits materialised at once in scoring and the loss")
    gradient_checkpointing: bool = arg(True, "recompute student activations in backward to save memory")
    single_forward: bool = arg(False, "keep every micro-batch's student graph from scoring to the loss: one student "
                               "forward fewer per micro-batch, but activation memory grows with the step (one "
                               "micro-batch per rank runs this way anyway)")
    fsdp: bool = arg(False, "shard student and teacher with FSDP2 (for models that do not fit one GPU)")
    dtype: str = arg("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32",
                     ["auto", "bfloat16", "float16", "float32"])
    # --- bookkeeping ---
    seed: int = arg(0, "random seed (sampling is offset by rank, initialisation is not)")
    out_dir: str = arg("runs", "parent folder of run folders")
    run_name: str = arg("", "run folder name; empty = <rule>-s<seed>-<time>")
    save_every: int = arg(0, "save a checkpoint every this many steps (0 = only at the end)")
    resume: bool = arg(False, "continue from the newest complete checkpoint in the run folder")
    eval_every: int = arg(0, "evaluate held-out accuracy every this many steps (0 = before and after only)")
    eval_samples: int = arg(1, "samples per held-out problem in the in-training evaluation (mean@k)")
    eval_problems: int = arg(0, "held-out problems in the in-training evaluation (0 = none)")
    report_to: list[str] = arg([], "experiment trackers that get every metrics.jsonl line, the config and the held-out "
                               "accuracy (several allowed; pip install -r requirements-trackers.txt)",
                               ["tensorboard", "wandb", "trackio"])


# The toy preset: the built-in pair on a 2-core CPU. Anything the user passes on the command line wins.
PRESETS = {
    # micro-batches of at most one full-length rollout's tokens (2,048 + 8,192): short rollouts share one, with
    # little padding once sorted by length (none with FlashAttention's variable-length path)
    "paper": dict(micro_batch_tokens=10240),
    "toy": dict(prompts="toy", prompts_per_step=8, rollouts_per_prompt=4, max_prompt_len=64,
                max_response_len=48, steps=300, lr=2e-4, warmup_steps=10, min_lr_ratio=0.1,
                micro_batch_size=32, chunk_size=512, gradient_checkpointing=False, save_every=100,
                eval_problems=200),
}


_FLAG_TYPES = {"int": int, "float": float, "str": str, "float | None": float, "int | None": int, "list[int]": int,
               "list[float]": float, "list[str]": str}


def flag_parser(config_class, description: str = "") -> argparse.ArgumentParser:
    """argparse from a config dataclass: `--field-name` per field, with the field's help and default. Every flag
    defaults to None, so `given_flags` can tell what was typed from what was not."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # argparse %-formats help strings: a literal % (as in "20 % of the tasks") must be doubled
        help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        kwargs = dict(dest=f.name, default=None, help=help_text)
        kind = f.type if isinstance(f.type, str) else f.type.__name__ if isinstance(f.type, type) else str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            nargs = "+" if kind.startswith("list[") else None
            parser.add_argument(flag, type=_FLAG_TYPES[kind], nargs=nargs, choices=f.metadata["choices"], **kwargs)
    return parser


def given_flags(args: argparse.Namespace, config_class) -> dict:
    """The fields that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if getattr(args, f.name, None) is not None}


def parse_flags(config_class, argv: list[str] | None = None, description: str = ""):
    """A script's config dataclass from its command line (a script without presets)."""
    return config_class(**given_flags(flag_parser(config_class, description).parse_args(argv), config_class))


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """train.py's flags: every Config field, and the preset to start from."""
    parser = flag_parser(Config, description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="defaults to start from; default: toy when no --teacher/--student, else paper")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset defaults, then whatever was given explicitly on the command line."""
    given = given_flags(args, Config)
    preset = args.preset or ("paper" if given.get("teacher") or given.get("student") else "toy")
    return dataclasses.replace(Config(), **{**PRESETS[preset], **given})


def load_select():
    """select.py, imported by path under the module name `tip_select`.

    The file keeps the design's name, which the standard library's `select` module also has; importing it
    as `select` would depend on sys.path order. Reaching it by path under another name is unambiguous.
    """
    if "tip_select" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tip_select", ROOT / "select.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tip_select"] = module
        spec.loader.exec_module(module)
    return sys.modules["tip_select"]


# --- torch.distributed: the same file runs under `python` and `torchrun` (nanoGPT style) ---

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> torch.device:
    """Initialise the process group when launched by torchrun (RANK set); return this rank's device."""
    if "RANK" in os.environ and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def run_main(main) -> None:
    """Run a script's `main()` and exit with its code; a torchrun worker exits without interpreter finalization.

    Why: a gloo worker thread drops its reference to a finished collective (and so to the tensors it moved)
    just after the main thread's wait() returns. When the main thread finishes first and Python has begun
    finalizing, that last release of a Python-made tensor can no longer take the GIL, and the process aborts
    ("terminate called without an active exception", SIGABRT), rarely and more often on a loaded machine.
    Everything is written, the process group ended and the streams flushed before os._exit."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    if "RANK" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DistributedDataParallel wrapper (nanoGPT's `raw_model`)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(module_or_parameter) -> bool:
    """FSDP2 or not, decided here once and by type: a model is sharded when fully_shard wrapped any of its
    modules (between a forward and its reshard, its parameters are whole plain tensors, so they cannot tell), a
    parameter when it is a DTensor (it has `to_local`)."""
    if isinstance(module_or_parameter, torch.nn.Module):
        from torch.distributed.fsdp import FSDPModule
        return any(isinstance(m, FSDPModule) for m in module_or_parameter.modules())
    return hasattr(module_or_parameter, "to_local")


def reshard(model) -> None:
    """Return every FSDP2 unit of `model` to its shards. Decoder layers reshard after each forward by themselves;
    the root (embeddings, final norm, head) stays gathered from a forward to the end of its backward, or, for the
    teacher, which never runs backward, until this call. Local: no collective; a no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_with_fsdp(model, compute_dtype: torch.dtype) -> None:
    """FSDP2 as the one place where sharding and precision are applied: each decoder layer its own unit that
    reshards after its forward, the whole model the root (embeddings, final norm and head, tied or not), so a
    layer is whole only while it computes. Parameters are gathered in `compute_dtype` (bf16 on GPU: activations
    and the layer inputs that gradient checkpointing keeps are bf16) over fp32 master shards, and gradients are
    reduced in fp32. Each micro-batch's backward reduce-scatters a plain sum (divide factor 1), which adds up in
    the shards over micro-batches: the loss is already divided by the global kept count (Eq. 9)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=precision, reshard_after_forward=True)
    fully_shard(model, mp_policy=precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # plain SUM: gloo has no pre-multiplied sum
                module.set_force_sum_reduction_for_comms(True)


def parallelize(student, teacher, fsdp: bool, compute_dtype: torch.dtype) -> None:
    """FSDP2 on both models, or, for plain data parallelism, the same starting weights on every rank."""
    if fsdp:
        shard_with_fsdp(student, compute_dtype)
        shard_with_fsdp(teacher, compute_dtype)
    elif is_distributed():
        for p in student.parameters():
            dist.broadcast(p.data, 0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sums a few scalars over ranks (counts and totals for logging and the Eq. 9 denominator)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device) -> float:
    """The largest of one scalar over ranks (a check every rank must act on alike)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def autocast(device: torch.device):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU. Without the weight cache: it would keep a
    bf16 copy of every weight until the region ends, though a layer needs its copy only while it computes."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def log(message: str) -> None:
    """Print once per job, on rank 0."""
    if rank() == 0:
        print(message, flush=True)


def write_atomically(path: str | Path, write, folder: bool = False) -> None:
    """`write(tmp)` fills a temporary file (or, with `folder`, a folder) beside `path`, which then takes its
    place: a kill at any moment leaves the old `path` or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    try:
        if folder:
            tmp.mkdir()
        write(tmp)
        if path.is_dir():  # a folder cannot be replaced in one step: move the old one aside first
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def write_json(path: str | Path, payload) -> None:
    """`payload` as indented UTF-8 JSON at `path`, written atomically (results, reports, run records)."""
    text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def cache_folder(cache_dir: str | Path | None, name: str, recipe) -> Path:
    """<cache_dir, else $TIP_CACHE, else ~/.cache/tip>/<name>-<hash of the recipe dataclass's fields>: a different
    recipe never reuses a stale build."""
    root = Path(cache_dir or os.environ.get("TIP_CACHE") or Path.home() / ".cache" / "tip").expanduser()
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]
    return root / f"{name}-{digest}"


def build_once(path: Path, build, rebuild: bool = False, log=print) -> Path:
    """`path`, a folder that `build(tmp)` fills, made on first use and kept: world.json, written last by
    `build`, marks it finished. A lock makes concurrent callers (torchrun ranks) wait for one build, which runs
    in a temporary folder renamed into place (`write_atomically`), so a killed build never leaves half of one."""
    if (path / "world.json").exists() and not rebuild:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "world.json").exists() and not rebuild:
            return path  # built by another process while this one waited
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        log(f"building {path}")
        write_atomically(path, build, folder=True)
    return path


# --- the hub: asked once, up front (offline, transformers retries each file for ~25 s) ---

def env_flag(name: str) -> bool:
    """An environment switch such as HF_HUB_OFFLINE=1 is on."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub does not answer within `timeout` seconds (asked up front:
    without network, transformers retries each file for about 25 s)."""
    import huggingface_hub
    if env_flag("HF_HUB_OFFLINE"):
        return False
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


def looks_local(name: str) -> bool:
    """A path, not a hub id "org/name": starts with . / ~, exists, has a parent that exists, or has 2+ slashes."""
    path = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
            or (str(path.parent) != "." and path.parent.exists()))
