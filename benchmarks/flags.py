"""The flags the measurement benchmarks share (tip.arg): their help texts, BenchFlags, the size flags that
default per device or --tiny, and the checks of their values."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, whichever folder the benchmark runs from
    sys.path.insert(0, str(ROOT))
import tip  # noqa: E402

THREADS_HELP = "torch CPU threads (--tiny takes one: on a busy machine more make tiny steps slower, not faster)"
MODEL_SIZE_HELP = dict(hidden="student hidden size (the teacher's is 1.5×)", layers="decoder layers of each model",
                       vocab="V, vocabulary (Qwen3's: 151,936)", response_len="longest response, in tokens",
                       chunk_size="rows per chunk in scoring and the loss")  # the flags of step_setup


@dataclass
class BenchFlags:
    """The flags of every measurement benchmark (tip.arg); each benchmark's dataclass adds its sizes (`size_arg`)
    and may declare `dtype` again with its own help."""
    device: str = tip.arg("cpu", "where the variants run", ["cpu", "cuda"])
    dtype: str = tip.arg("float32", "dtype of the measured tensors", ["float32", "bfloat16"])
    seed: int = tip.arg(0, "random seed of the models and inputs")
    tiny: bool = tip.arg(False, "tiny sizes (size flags given still win): runs in seconds, checks that the compared "
                         "paths agree, prints the targets without enforcing them")


def size_arg(flag: str, sizes: dict, text: str):
    """An int size flag of a BenchFlags dataclass: 0 (its default) means the size `sizes` ({"cpu"|"cuda"|"tiny":
    {flag: value}}) gives for --device, or for --tiny; its help lists them."""
    cpu, cuda, tiny = (sizes[where][flag] for where in ("cpu", "cuda", "tiny"))
    default = f"{cpu}" if cpu == cuda else f"{cpu} on cpu, {cuda} on cuda"
    return tip.arg(0, f"{text} (0 = {default}; --tiny {tiny})")


def parse_bench_flags(flags_class, argv: list[str] | None, sizes: dict, description: str):
    """(the flags, their parser): sizes left at 0 filled from `sizes`, every size checked; stops with a clear
    message on a bad value or on --device cuda without a GPU. Sets the torch threads, so that the machine line
    says them."""
    parser = tip.flag_parser(flags_class, description)
    args = flags_class(**tip.given_flags(parser.parse_args(argv), flags_class))
    chosen = sizes["tiny" if args.tiny else args.device]
    for flag, value in chosen.items():
        if getattr(args, flag) == 0:
            setattr(args, flag, value)
    for flag in chosen:
        least = 2 if flag == "vocab" else 1
        if getattr(args, flag) < least:
            parser.error(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible (drop the flag to run on CPU)")
    torch.set_num_threads(args.threads)  # the children set it from args too
    return args, parser


def require_positive(cli, flags) -> None:
    """Stop with a clear message when a size flag is below 1."""
    for flag in flags:
        if getattr(cli, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(cli, flag)}")
