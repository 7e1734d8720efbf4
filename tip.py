"""The setting of TIP (paper §3): one config, a teacher/student pair, prompts, and small shared helpers.

A frozen teacher T and a student S_θ share a tokenizer; the student samples rollouts y ~ S_θ(·|x) and
is trained on KL(P_S ‖ P_T) at the tokens selected by select.py (Eqs. 1 and 9). This file holds what the
other files share:

- `Config`: every knob of the pipeline, each with its help text and the paper's default (§7.1, Table 9),
  and the `toy` preset that fits the built-in toy world on a 2-core CPU. Every script's CLI is generated
  from it, so a flag means the same everywhere.
- `load_select()`: the one way project code reaches select.py (see DESIGN.md, "The name select.py").
- torch.distributed helpers: rank, world size, init (gloo on CPU, nccl on GPU). The gather of per-token
  scalars of uneven length lives in select.py (`gather_uneven`), which must stand alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent


def _arg(default, help: str, choices=None):
    """A dataclass field that carries its CLI help (CleanRL style)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- the pair and the data (§7.1) ---
    teacher: str = _arg("", "teacher model: local folder or hub id; empty = the built-in toy teacher")
    student: str = _arg("", "student model: local folder or hub id; empty = the built-in toy student")
    prompts: str = _arg("toy", "prompt source: 'toy', a hub dataset name, or a local .jsonl/.json/.parquet file")
    prompt_split: str = _arg("train", "dataset split to read prompts from")
    prompt_field: str = _arg("", "column holding the prompt text; empty = the first of prompt/problem/question")
    answer_field: str = _arg("", "column holding the reference answer (for rollout accuracy); empty = auto")
    toy_dir: str = _arg("", "where the toy world is cached; empty = $TIP_CACHE or ~/.cache/tip")
    # --- selection (§4–6) ---
    rule: str = _arg("type_aware", "token selection rule (select.py RULES); type_aware is the paper's Soft-OR")
    ratio: float = _arg(0.0, "kept fraction rho per rollout in (0, 1]; 0 = the rule's default (PAPER.md §5)")
    divergence: str = _arg("reverse_kl", "training loss: reverse_kl (Eqs. 1/9), forward_kl, or jsd",
                           ["reverse_kl", "forward_kl", "jsd"])
    jsd_beta: float = _arg(0.5, "beta of the generalized JSD loss (0 = forward KL, 1 = reverse KL)")
    # --- rollouts (§3, Table 9) ---
    prompts_per_step: int = _arg(8, "prompts per optimizer step, over all ranks")
    rollouts_per_prompt: int = _arg(16, "student samples per prompt")
    max_prompt_len: int = _arg(2048, "prompts longer than this many tokens are dropped (and counted)")
    max_response_len: int = _arg(8192, "maximum generated tokens per rollout")
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

