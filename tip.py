"""The setting of TIP (paper §3): one config, a teacher/student pair, prompts, and small shared helpers.

A frozen teacher T and a student S_θ share a tokenizer; the student samples rollouts y ~ S_θ(·|x) and
is trained on KL(P_S ‖ P_T) at the tokens selected by select.py (Eqs. 1 and 9). This file holds what the
other files share:

- `Config`: every knob of the pipeline, each with its help text and the paper's default (§7.1, Table 9),
  and the `toy` preset that fits the built-in toy world on a 2-core CPU. Every script's CLI is generated
  from it, so a flag means the same everywhere.
- `load_pair()`: T, S_θ and their shared tokenizer from local folders, hub ids or the built-in toy world,
  with the checks that keep Eqs. 1–3 well defined (one tokenizer; logits = hidden @ headᵀ). `check_head`,
  `lm_head_weight` and `final_hidden_states` give score.py what it needs without a [B, L, V] tensor.
- `load_prompts()`: the prompts x (a hub prompt set such as DAPO-Math-17k, a local file, or the toy task),
  chat-formatted, with the paper's math instruction, deduplicated, over-long ones dropped and counted.
- `load_select()`: the one way project code reaches select.py (see DESIGN.md, "The name select.py").
- torch.distributed helpers: rank, world size, init (gloo on CPU, nccl on GPU), unwrap. The gather of
  per-token scalars of uneven length lives in select.py (`gather_uneven`), which must stand alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent


class InputError(ValueError):
    """A user's input is wrong (a path, a flag, a file): the message names the problem and the fix. The scripts
    print it alone, without a traceback, and exit non-zero."""


def _arg(default, help: str, choices=None):
    """A dataclass field that carries its CLI help (CleanRL style)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- the pair and the data (§7.1) ---
    teacher: str = _arg("", "teacher model: local folder or hub id; empty = the built-in toy teacher")
    student: str = _arg("", "student model: local folder or hub id; empty = the built-in toy student")
    prompts: str = _arg("", "prompt source: a built-in world ('toy', 'facts', 'agent'), deepplanning:PATH (its "
                        "travel tasks, with tools), a hub dataset name, or a local "
                        ".jsonl/.json/.parquet file (the toy preset uses 'toy'; a real pair needs one)")
    prompt_split: str = _arg("train", "split of a hub prompt set to read (a local file is one split)")
    prompt_subset: str = _arg("", "configuration (subset) of a hub prompt set, e.g. 'en' for "
                              "open-r1/DAPO-Math-17k-Processed; empty = its default")
    prompt_field: str = _arg("", "column holding the prompt text; empty = the first of prompt/problem/question")
    answer_field: str = _arg("", "column holding the reference answer (for rollout accuracy); empty = the "
                             "first of answer/solution/reward_model.ground_truth; a.b reads field b of column a")
    chat_template_kwargs: str = _arg('{"enable_thinking": false}', "JSON object of chat-template switches for "
                                     "every prompt, e.g. Qwen3's enable_thinking (off, as the paper's base code "
                                     "runs Qwen3; templates without the switch ignore it)")
    math_instruction: bool = _arg(True, "append the paper's instruction to reason step by step and answer in "
                                  "\\boxed{} to dataset prompts that do not already ask for \\boxed{}")
    world_dir: str = _arg("", "where the built-in worlds are cached; empty = $TIP_CACHE or ~/.cache/tip")
    # --- selection (§4–6) ---
    rule: str = _arg("type_aware", "token selection rule (select.py RULES); type_aware is the paper's Soft-OR")
    ratio: float = _arg(0.0, "kept fraction rho per rollout in (0, 1]; 0 = the rule's default (PAPER.md §5)")
    exclude_mistakes: bool = _arg(False, "the exclusion control: never keep the tokens of a built-in world's known "
                                  "mistake (its <world>_mistake_positions), to test whether only they can fix it")
    divergence: str = _arg("reverse_kl", "training loss: reverse_kl (Eqs. 1/9), forward_kl, or jsd",
                           ["reverse_kl", "forward_kl", "jsd"])
    jsd_beta: float = _arg(0.5, "beta of the generalized JSD loss (0 = forward KL, 1 = reverse KL)")
    # --- rollouts (§3, Table 9) ---
    prompts_per_step: int = _arg(8, "prompts per optimizer step, over all ranks")
    rollouts_per_prompt: int = _arg(16, "student samples per prompt")
    max_prompt_len: int = _arg(2048, "prompts longer than this many tokens are dropped (and counted)")
    max_response_len: int = _arg(8192, "maximum generated tokens per rollout (a conversation: after its opening "
                                 "prompt, tool results included)")
    max_turns: int = _arg(8, "assistant turns per conversation with tools (--prompts agent or deepplanning:PATH)")
    engine: str = _arg("hf", "rollout sampler: hf (transformers generate, runs anywhere) or vllm (vLLM in each "
                       "training process, synced to the student every step; pip install -r requirements-vllm.txt)",
                       ["hf", "vllm"])
    gpu_memory_utilization: float = _arg(0.3, "--engine vllm on GPU: the share of the GPU vLLM takes for its weights "
                                         "and KV cache, beside the training step's (its memory is released while "
                                         "the student trains)")
    temperature: float = _arg(1.0, "sampling temperature for rollouts")
    top_p: float = _arg(1.0, "nucleus sampling top-p for rollouts")
    # --- optimisation (Table 9; weight decay and clip from the base repository) ---
    steps: int = _arg(200, "optimizer steps (the paper does not state its count)")
    lr: float = _arg(1e-6, "peak AdamW learning rate (3e-7 for Llama in the paper)")
    warmup_steps: int = _arg(0, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = _arg(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = _arg(0.1, "AdamW weight decay")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.999, "AdamW beta2")
    grad_clip: float = _arg(1.0, "global gradient-norm clip (0 = off)")
    micro_batch_size: int = _arg(8, "rollouts per forward/backward on one rank (gradient accumulation beyond)")
    chunk_size: int = _arg(512, "rows of [rows, vocab] logits materialised at once in scoring and the loss")
    gradient_checkpointing: bool = _arg(True, "recompute student activations in backward to save memory")
    single_forward: bool = _arg(False, "keep every micro-batch's student graph from scoring to the loss: one student "
                                "forward fewer per micro-batch, but activation memory grows with the step (one "
                                "micro-batch per rank runs this way anyway)")
    fsdp: bool = _arg(False, "shard student and teacher with FSDP2 (for models that do not fit one GPU)")
    dtype: str = _arg("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32",
                      ["auto", "bfloat16", "float16", "float32"])
    # --- bookkeeping ---
    seed: int = _arg(0, "random seed (sampling is offset by rank, initialisation is not)")
    out_dir: str = _arg("runs", "parent folder of run folders")
    run_name: str = _arg("", "run folder name; empty = <rule>-s<seed>-<time>")
    save_every: int = _arg(0, "save a checkpoint every this many steps (0 = only at the end)")
    resume: bool = _arg(False, "continue from the newest complete checkpoint in the run folder")
    eval_every: int = _arg(0, "evaluate held-out accuracy every this many steps (0 = before and after only)")
    eval_samples: int = _arg(1, "samples per held-out problem in the in-training evaluation (mean@k)")
    eval_problems: int = _arg(0, "held-out problems in the in-training evaluation (0 = none)")


# The toy preset: the built-in pair on a 2-core CPU. Anything the user passes on the command line wins.
PRESETS = {
    "paper": {},
    "toy": dict(prompts="toy", prompts_per_step=8, rollouts_per_prompt=4, max_prompt_len=64,
                max_response_len=48, steps=300, lr=2e-4, warmup_steps=10, min_lr_ratio=0.1,
                micro_batch_size=32, chunk_size=512, gradient_checkpointing=False, save_every=100,
                eval_problems=200),
}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """argparse from the Config fields: `--field-name`, help and default text from the dataclass."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="defaults to start from; default: toy when no --teacher/--student, else paper")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=None, help=f"{f.metadata['help']} (default: {f.default!r})")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, choices=f.metadata["choices"], **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset defaults, then whatever was given explicitly on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name, None) is not None}
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


# --- the pair T, S_θ (§3): one tokenizer, logits = hidden @ headᵀ ---

# Config attributes that transform logits after the head (Gemma 2, Cohere, Granite, Falcon-H1). score.py
# computes Eqs. 1–3 from hidden states and head weights alone, so such a model would be scored wrongly.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub does not answer within `timeout` seconds (asked up front:
    without network, transformers retries each file for about 25 s)."""
    import huggingface_hub
    if _env_flag("HF_HUB_OFFLINE"):
        return False
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


def _looks_local(name: str) -> bool:
    """A path, not a hub id "org/name": starts with . / ~, exists, has a parent that exists, or has 2+ slashes."""
    path = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
            or (str(path.parent) != "." and path.parent.exists()))


def _resolve_model(name: str, role: str, online: bool) -> str:
    import huggingface_hub
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise InputError(f"{role} path {name!r} does not exist (or is not a folder)")
    if _looks_local(name):
        return str(Path(name).expanduser())
    if not online and not isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        raise InputError(f"{role} {name!r} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1 or no network) and "
                         f"it is not cached: pass a local folder (`hf download {name} --local-dir DIR` elsewhere)")
    return name


def _check_logit_config(config, name: str) -> None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(text_config, attr, None)
        if value is not None and (attr == "final_logit_softcapping" or value != 1):
            raise InputError(f"{name}: logits are transformed after the head ({attr}={value}), but TIP scores "
                             f"tokens from hidden @ headᵀ (Eqs. 1–3); this model family is not supported")


def check_head(model: torch.nn.Module) -> None:
    """Refuse a model whose logits are not exactly hidden @ Wᵀ (head bias, logit scaling, softcapping):
    score.py computes P_S and P_T of Eqs. 1–3 from final hidden states and head weights, in chunks."""
    model = unwrap(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    _check_logit_config(model.config, name)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or getattr(head, "bias", None) is not None:
        raise InputError(f"{name}: TIP needs an LM head without a bias, logits = hidden @ headᵀ (Eqs. 1–3)")


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The head W [V, d], logits = hidden @ Wᵀ (see `check_head`): the P of Eqs. 1–3."""
    return unwrap(model).get_output_embeddings().weight


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Hidden states [B, L, d] after the final norm, one per context c_t = (x, y_<t) (§3), without logits:
    score.py multiplies chunks of them by `lm_head_weight`. Positions count real tokens, as generate does with
    left padding. A DDP/FSDP2-wrapped model runs through its wrapper (gradient sync, parameter gathering)
    with logits for no position, and the decoder's output is taken by a forward hook."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inner = unwrap(model)
    decoder = inner.get_decoder()
    fsdp = getattr(torch.distributed, "fsdp", None)  # loaded only where something was sharded
    if model is inner and not (hasattr(fsdp, "FSDPModule") and isinstance(model, fsdp.FSDPModule)):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=input_ids.new_zeros(0))
    finally:
        handle.remove()
    return captured[0]


def torch_dtype(dtype: str | torch.dtype, device) -> torch.dtype:
    """"auto" is bf16 on GPU and fp32 on CPU; a name such as "bfloat16" or a torch.dtype is taken as given."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_pair(teacher: str, student: str, device, dtype="auto"):
    """(teacher T, student S_θ, tokenizer) of §3 from local folders or hub ids. T is frozen (eval mode, no
    grads); "auto" dtype is bf16 on GPU, fp32 on CPU. Paths, hub, tokenizers and logit transforms are checked
    before any weight is read. Heads of different widths are allowed: scores use the shared first
    min(V_s, V_t) rows (Qwen2.5 14B → 1.5B)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not teacher or not student:
        raise InputError("pass both --teacher and --student, or neither for a built-in world's pair")
    online = not all(map(_looks_local, (teacher, student))) and hub_reachable()
    paths = {role: _resolve_model(name, role, online) for role, name in (("teacher", teacher), ("student", student))}
    load = dict(local_files_only=not online)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"], **load)
    teacher_tokenizer = AutoTokenizer.from_pretrained(paths["teacher"], **load)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"teacher {teacher!r} and student {student!r} have different tokenizers "
                         f"({len(teacher_tokenizer)} vs {len(tokenizer)} tokens): Eqs. 1–3 compare distributions "
                         f"token by token; use a pair of one model family")
    for role, path in paths.items():
        _check_logit_config(AutoConfig.from_pretrained(path, **load), f"{role} {path!r}")
    dtype = torch_dtype(dtype, device)
    models = {role: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load).to(device)
              for role, path in paths.items()}
    for model in models.values():
        check_head(model)
    models["teacher"].eval().requires_grad_(False)
    widths = [lm_head_weight(models[role]).shape[0] for role in ("teacher", "student")]
    log(f"pair: teacher {teacher} ({widths[0]} head rows), student {student} ({widths[1]}); scores use the shared "
        f"first {min(widths)} rows{'' if len(tokenizer) <= min(widths) else f' (warning: {len(tokenizer)} tokens)'}")
    return models["teacher"], models["student"], tokenizer


# --- the prompts x (§3, §7.1) ---

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# DAPO-Math-17k wraps every problem in its own answer format ("Answer: $Answer"); the paper asks for
# \boxed{} instead, so the wrapper is removed before MATH_INSTRUCTION is appended.
_DAPO_WRAPPER = re.compile(r"^Solve the following math problem step by step\. The last line of your response "
                           r"should be of the form Answer: \$Answer .*? to the problem\.\s*(.*?)\s*Remember to put "
                           r"your answer on its own line after \"Answer:\"\.\s*$", re.S)
PROMPT_FIELDS, ANSWER_FIELDS = ("prompt", "problem", "question"), ("answer", "solution", "reward_model.ground_truth")


def template_switches(config: Config) -> dict:
    """`config.chat_template_kwargs` as a dict, or an InputError that shows the expected form."""
    try:
        switches = json.loads(config.chat_template_kwargs or "{}")
    except json.JSONDecodeError as error:
        switches = error
    if not isinstance(switches, dict):
        raise InputError(f"--chat-template-kwargs {config.chat_template_kwargs!r} is not a JSON object; write it "
                         """like '{"enable_thinking": false}'""")
    return switches


def format_prompt(tokenizer, text: str, template_switches: dict | None = None) -> str:
    """The context x that rollouts y ~ S_θ(·|x) start from (§3): a user turn and the generation prompt under
    the tokenizer's chat template (with its switches, e.g. enable_thinking), or the bare text when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, **(template_switches or {}))
    return text


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of formatted prompts x (§3); BOS is added unless the texts already start with it (chat
    templates such as Llama 3's write it)."""
    bos = tokenizer.bos_token
    return tokenizer(list(texts), add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)))["input_ids"]


def _math_prompt(text: str) -> str:
    match = _DAPO_WRAPPER.match(text)
    text = match.group(1) if match else text
    return text if "\\boxed" in text else f"{text}\n\n{MATH_INSTRUCTION}"


def _user_text(value, source: str) -> str:
    """A prompt given as text or as chat messages ([{"role": "user", "content": ...}], as in DAPO)."""
    for message in value if isinstance(value, list) else []:
        if isinstance(message, dict) and message.get("role") == "user":
            return message["content"]
    if not isinstance(value, str):
        raise InputError(f"{source}: a prompt is neither text nor chat messages with a user turn: {value!r:.200}")
    return value


def _field(dataset, name: str, read: bool = True):
    """The values of column `name` ("a.b": field b of struct column a), or None when there is no such field."""
    feature = dataset.features
    for key in name.split("."):
        if not isinstance(feature, dict) or key not in feature:
            return None
        feature = feature[key]
    head, *rest = name.split(".")
    values = list(dataset[head]) if read else []
    for key in rest:
        values = [value.get(key) if isinstance(value, dict) else None for value in values]
    return values


def _load_dataset(config):
    import datasets
    source, suffix = config.prompts, Path(config.prompts).suffix.lower()
    path = Path(source).expanduser()
    if path.is_dir():  # a dataset folder, e.g. made by `hf download ... --repo-type dataset --local-dir`
        return datasets.load_dataset(str(path), config.prompt_subset or None, split=config.prompt_split)
    if suffix in (".jsonl", ".json", ".parquet") or _looks_local(source):
        if not path.is_file() or suffix not in (".jsonl", ".json", ".parquet"):
            raise InputError(f"prompt file {source!r} does not exist or is not a dataset folder or a .jsonl, "
                             f".json or .parquet file")
        if path.stat().st_size == 0:
            raise InputError(f"prompt file {source!r} is empty")
        try:  # a local file is one split, whatever --prompt-split says
            builder = "parquet" if suffix == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:
            raise InputError(f"prompt file {source!r} could not be read: {type(error).__name__}: {error}") from error
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")
    hint = (f"pass a local dataset folder or .jsonl/.json/.parquet file (`hf download {source} --repo-type dataset "
            f"--local-dir DIR` where there is network)")
    if not offline and not hub_reachable():
        raise InputError(f"the hub is unreachable for prompt set {source!r}: {hint}, or set HF_DATASETS_OFFLINE=1")
    try:
        return datasets.load_dataset(source, config.prompt_subset or None, split=config.prompt_split)
    except Exception as error:
        if offline:
            raise InputError(f"prompt set {source!r} is not cached and the hub is offline: {hint}") from error
        raise


def load_prompts(config: Config, tokenizer, problems: list[dict] | None = None) -> list[dict]:
    """The prompts x of §3, [{"prompt": formatted text, "answer": str | None}], deduplicated (§7.1), from
    `problems` (a built-in world's [{"problem", "answer"}], asked bare, as its models learned them) or else
    `config.prompts`: a local .jsonl/.json/.parquet file or a hub prompt set. Dataset prompts get
    MATH_INSTRUCTION unless they already ask for \\boxed{} or --no-math-instruction is given. Prompts over
    `config.max_prompt_len` tokens are dropped and counted."""
    source = config.prompts
    if problems is not None:
        rows = [(p["problem"], p["answer"]) for p in problems]
    else:
        dataset, fields = _load_dataset(config), {}
        columns = f"columns: {', '.join(dataset.column_names)}"
        for role, given, candidates in (("prompt", config.prompt_field, PROMPT_FIELDS),
                                        ("answer", config.answer_field, ANSWER_FIELDS)):
            if given and _field(dataset, given, read=False) is None:
                raise InputError(f"{source}: no {role} field {given!r} ({columns})")
            fields[role] = given or next((f for f in candidates if _field(dataset, f, read=False) is not None), None)
        if fields["prompt"] is None:
            raise InputError(f"{source}: no {'/'.join(PROMPT_FIELDS)} column ({columns}); name one with --prompt-field")
        texts = [_user_text(value, source) for value in _field(dataset, fields["prompt"])]
        texts = [_math_prompt(text) for text in texts] if config.math_instruction else texts
        rows = list(zip(texts, _field(dataset, fields["answer"]) if fields["answer"] else [None] * len(texts)))
    unique = {}
    for text, answer in rows:  # DAPO-Math-17k repeats each problem; the paper deduplicates (§7.1)
        unique.setdefault(text, answer)
    switches = template_switches(config)
    texts = [format_prompt(tokenizer, text, switches) for text in unique]
    lengths = [len(ids) for ids in encode_prompts(tokenizer, texts)] if texts else []
    prompts = [{"prompt": text, "answer": None if answer is None else str(answer)}
               for text, answer, length in zip(texts, unique.values(), lengths) if length <= config.max_prompt_len]
    dropped = len(unique) - len(prompts)
    log(f"prompts: {len(prompts)} from {source} ({len(rows) - len(unique)} duplicates and {dropped} longer than "
        f"{config.max_prompt_len} tokens dropped)")
    if not prompts:
        raise InputError(f"no prompts left from {source!r}: {len(rows)} read, {dropped} over --max-prompt-len")
    return prompts
