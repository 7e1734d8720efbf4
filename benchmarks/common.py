"""What the benchmarks share: variants in fresh processes, memory readings, a random Qwen3 pair and synthetic
rollouts, gradient comparison, targets and the exit code, their flags (tip.arg) and the machine line.

Every variant runs in its own fresh process, so peaks never mix. The processes are forked from a server
(multiprocessing's forkserver) that imported the benchmark and the modules named by `preload` once, before
computing anything: a variant then starts in milliseconds instead of the seconds an import of torch and
transformers takes, and, like a new interpreter, it has run no kernel and touched no GPU.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, whichever folder the benchmark runs from
    sys.path.insert(0, str(ROOT))
import tip  # noqa: E402

PROMPT_WIDTH = 32  # prompt columns of the synthetic rollouts; prompts of 8–32 tokens are left-padded to it
HEAD_DIM = 64


# ---------------------------------------------------------------- memory readings

def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); elsewhere the high-water mark, which only makes the delta smaller."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_max_rss() -> bool:
    """Lower this process's RSS high-water mark (ru_maxrss) to its current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(step, device: torch.device) -> dict:
    """Run `step()` (it returns a dict) once; add its wall time, its CPU time (all threads of the process) and
    its peak memory above the state before it:
      GPU  torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus
           torch.cuda.memory_allocated before the step (bytes in live tensors);
      CPU  ru_maxrss after the step minus the RSS before it, the high-water mark first lowered to the current
           RSS through /proc/self/clear_refs (Linux ≥ 4.0; `exact` is False where that is refused, and the
           high-water mark then covers the process's whole life). RSS keeps the pages of small freed blocks that
           the allocator has not returned; glibc returns blocks above its mmap threshold (32 MB at most) at once,
           so that residue can only make a delta slightly smaller.
    """
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, exact = torch.cuda.memory_allocated(device), True
    else:
        before = current_rss_bytes()
        exact = reset_max_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - before
    # RSS read just before the reset may exceed what the reset records by a few pages: no growth is 0
    return dict(result, seconds=seconds, cpu_seconds=cpu_seconds, peak_bytes=max(peak, 0), before_bytes=before,
                exact=exact)


def step_time(r: dict, device: str) -> float:
    """The time a target compares. On a CPU, the process's CPU time: the step's own work, which other jobs on a
    shared machine move much less than its wall time (here, at load 5–12 on 2 cores, two processes taking turns
    at the same step differed by up to 1.33× in wall time and 1.13× in CPU time). On a GPU, wall time."""
    return r["cpu_seconds"] if device == "cpu" else r["seconds"]


def time_cell(r: dict, device: str) -> str:
    return f"{r['seconds']:.3g} s" + (f" ({r['cpu_seconds']:.3g} s CPU)" if device == "cpu" else "")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB" if abs(n_bytes) >= 2 ** 30 else f"{n_bytes / 2 ** 20:.0f} MiB"


# ---------------------------------------------------------------- variants in fresh processes

def _serve(connection, prepare, variant: str, args) -> None:
    """Child side: `prepare(variant, args)` builds everything and returns (step, finish); then one `step()` per
    "step" the parent sends, and `finish()` when it sends anything else. Each answer is a small dict."""
    try:
        torch.set_num_threads(args.threads)
        step, finish = prepare(variant, args)
        connection.send(("ready", None))
        while connection.recv() == "step":
            connection.send(("step", step()))
        connection.send(("done", finish()))
    except BaseException as error:  # the parent prints why; the traceback goes to stderr as usual
        connection.send(("error", f"{type(error).__name__}: {error}"))
        raise


class Child:
    """One variant in a fresh process, driven step by step, so that several variants can take turns."""

    def __init__(self, prepare, variant: str, args, preload: tuple[str, ...]):
        # An OpenMP thread spins while it waits for work; on a shared CPU that burns the cores other processes
        # wait for (at load 15 on 2 cores a 2-thread step here used 17–20 s of CPU instead of 7). The children
        # (forked from a server that inherits this environment) sleep instead, unless the caller chose otherwise.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", *preload])
        self.variant, self.error, self.steps = variant, None, []
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, prepare, variant, args), daemon=True)
        self.process.start()
        child_end.close()  # the child holds its end: a child that dies then reads as end of file here
        self.receive("ready")

    def ask(self, command: str, word: str):
        """Send `command`; the child's answer, or None once it has failed (`error` says why)."""
        if self.error:
            return None
        try:
            self.connection.send(command)
        except OSError:  # the child is gone; receive() says why
            pass
        return self.receive(word)

    def receive(self, word: str):
        try:
            kind, value = self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            kind, value = "error", (f"killed by signal {-code} (out of memory?)" if code and code < 0
                                    else f"exited with code {code}")
        if kind == word:
            return value
        self.error = str(value)[-160:]
        self.process.join()
        return None

    def step(self) -> None:
        answer = self.ask("step", "step")
        if answer is not None:
            self.steps.append(answer)

    def finish(self) -> dict:
        """{"steps": the step dicts, "seconds", "cpu_seconds": their median times, "peak_bytes": their largest peak,
        "before_bytes", "exact", "first": the first step's dict, and the finish dict}, or {"error": why}."""
        final = self.ask("finish", "done")
        self.process.join()
        if self.error:
            return {"error": self.error}
        steps = self.steps
        return dict(final, steps=steps, first=steps[0], seconds=statistics.median(s["seconds"] for s in steps),
                    cpu_seconds=statistics.median(s["cpu_seconds"] for s in steps),
                    peak_bytes=max(s["peak_bytes"] for s in steps), before_bytes=steps[0]["before_bytes"],
                    exact=all(s["exact"] for s in steps))


def run_variants(prepare, variants, args, repeats: int, together: bool, preload: tuple[str, ...] = ()) -> dict:
    """Each variant in its own fresh process, `repeats` steps each; {variant: Child.finish()}.

    `together`: every variant's process is built first, then they take their steps in turn, the order
    reversed every round, so a shared machine's changing load slows them alike (the memory of every variant
    is held at once). Otherwise one process at a time (one variant's memory at a time, e.g. a GPU)."""
    if not together:
        return {v: run_variants(prepare, [v], args, repeats, True, preload)[v] for v in variants}
    children = [Child(prepare, v, args, preload) for v in variants]
    for repeat in range(repeats):
        for child in children[::1 if repeat % 2 == 0 else -1]:
            child.step()
    return {child.variant: child.finish() for child in children}


# ---------------------------------------------------------------- models and rollouts

def teacher_hidden_size(hidden: int) -> int:
    """The teacher is 1.5× wider than the student (e.g. 256 → 384, 2048 → 3072), in whole heads."""
    return max(HEAD_DIM, round(1.5 * hidden / HEAD_DIM) * HEAD_DIM)


def random_qwen3(hidden: int, layers: int, vocab: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device, seed: int):
    """A random Qwen3 causal LM with an untied head; at Qwen3's vocabulary the cost sits in V × d."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(1, hidden // HEAD_DIM)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: no second copy on the way to the device
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make_rollouts(rollouts: int, response_len: int, vocab: int, seed: int, device: torch.device):
    """Synthetic rollouts in rollout.py's layout: prompt left-padded to PROMPT_WIDTH, then the response,
    right-padded; the first rollout runs to response_len, the others stop between response_len/4 and it."""
    from rollout import Rollouts

    g = torch.Generator().manual_seed(seed)
    length = PROMPT_WIDTH + response_len
    prompt_lengths = torch.randint(PROMPT_WIDTH // 4, PROMPT_WIDTH + 1, (rollouts,), generator=g)
    response_lengths = torch.randint(max(1, response_len // 4), response_len + 1, (rollouts,), generator=g)
    response_lengths[0] = response_len
    input_ids = torch.zeros(rollouts, length, dtype=torch.long)  # token 0 is the pad
    attention_mask = torch.zeros(rollouts, length, dtype=torch.long)
    response_mask = torch.zeros(rollouts, length, dtype=torch.bool)
    for b in range(rollouts):
        p, r = int(prompt_lengths[b]), int(response_lengths[b])
        input_ids[b, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = torch.randint(1, vocab, (p + r,), generator=g)
        attention_mask[b, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = 1
        response_mask[b, PROMPT_WIDTH:PROMPT_WIDTH + r] = True
    return Rollouts(input_ids.to(device), attention_mask.to(device), response_mask.to(device), prompt_lengths,
                    torch.arange(rollouts), [""] * rollouts)


STEP_MODULES = ("train", "transformers.models.qwen3.modeling_qwen3")  # step_setup's imports: preload them


def step_setup(args, rollouts: int, **config_fields):
    """What a child of bench_step or bench_micro_batches builds, as train.py's setup does: the teacher (1.5×
    wider, in --dtype, frozen), the student (fp32, set up by train.prepare_student), the tip.Config, AdamW as
    train.py makes it, and a batch of `rollouts` synthetic rollouts. Then a warm-up step at
    learning rate 0 on 2 short rollouts: AdamW's moments exist afterwards, as in every step of a run but the
    first, and the weights are unchanged, so every variant's first timed step starts from the same weights."""
    import train

    device = torch.device(args.device)
    max_positions = PROMPT_WIDTH + args.response_len
    teacher = random_qwen3(teacher_hidden_size(args.hidden), args.layers, args.vocab, max_positions,
                           getattr(torch, args.dtype), device, args.seed + 1).eval().requires_grad_(False)
    student = random_qwen3(args.hidden, args.layers, args.vocab, max_positions, torch.float32, device, args.seed + 2)
    config = tip.Config(chunk_size=args.chunk_size, gradient_checkpointing=args.gradient_checkpointing, grad_clip=1.0,
                        steps=1, **config_fields)
    train.prepare_student(student, config)
    optimizer = train.make_optimizer(student, config)
    return teacher, student, optimizer, config, make_rollouts(rollouts, args.response_len, args.vocab, args.seed,
                                                              device)


def warm_up_batch(args):
    """2 rollouts of at most 8 response tokens, for the warm-up step."""
    return make_rollouts(2, 8, args.vocab, args.seed + 3, torch.device(args.device))


def measured(step, device: torch.device, optimizer=None, model=None, gradients: Path | None = None):
    """The step function run_variants calls: each call is `measure(step, device)`; with `gradients`, the first
    call also saves there the gradients the optimizer steps with (after clipping). A pre-step hook keeps
    references only, so the step allocates nothing more; the file is written after the measurement."""
    calls = []

    def call() -> dict:
        kept = {}
        record = gradients is not None and not calls
        if record:
            handle = optimizer.register_step_pre_hook(
                lambda *_: kept.update((name, p.grad) for name, p in model.named_parameters() if p.grad is not None))
        try:
            result = measure(step, device)
        finally:
            if record:
                handle.remove()
        if record:
            torch.save(kept, gradients)
        calls.append(result)
        return result
    return call


# ---------------------------------------------------------------- comparing two variants

def _blocks(t: torch.Tensor, size: int = 1 << 22):
    """The elements of `t`, flat, a few million at a time: float64 copies of a [V, d] gradient stay small."""
    flat = t.reshape(-1)
    return (flat[i:i + size].double() for i in range(0, flat.numel(), size))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64."""
    return max(((x - y).abs().max().item() for x, y in zip(_blocks(a), _blocks(b))), default=0.0)


def max_abs(a: torch.Tensor) -> float:
    return max((x.abs().max().item() for x in _blocks(a)), default=0.0)


def compare_gradients(reference: Path, other: Path, tolerance: float) -> tuple[bool, str]:
    """Every tensor of two saved gradient dicts: max |Δ| / max |reference| ≤ tolerance. Returns (ok, a line
    naming the tensor that is furthest off). Memory-mapped, so two copies of a large model never sit in RAM."""
    a = torch.load(reference, map_location="cpu", mmap=True, weights_only=True)
    b = torch.load(other, map_location="cpu", mmap=True, weights_only=True)
    if a.keys() != b.keys():
        return False, f"gradients of different parameters: {sorted(a.keys() ^ b.keys())[:3]}"
    worst, worst_name = 0.0, ""
    for name in a:
        if a[name].shape != b[name].shape:
            return False, f"{name}: shapes {tuple(a[name].shape)} and {tuple(b[name].shape)}"
        diff, scale = max_abs_diff(a[name], b[name]), max_abs(a[name])
        relative = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
        if relative >= worst:
            worst, worst_name = relative, name
    return worst <= tolerance, f"largest max |Δ| / max |g| over {len(a)} tensors {worst:.1e} ({worst_name})"


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def step_agreement(reference: dict, other: dict, tolerance: float) -> tuple[bool, str]:
    """Whether two variants' first timed optimizer steps agree, and a line saying by how much: the loss, the
    gradient norm before clipping and the clipped gradients (run_variants results, relative differences). The
    norm matters: clipping rescales a gradient to norm 1, so clipped gradients alone miss a wrong scale."""
    loss = relative_difference(other["first"]["loss"], reference["first"]["loss"])
    norm = relative_difference(other["first"]["grad_norm"], reference["first"]["grad_norm"])
    ok, line = compare_gradients(Path(reference["gradients"]), Path(other["gradients"]), tolerance)
    return (ok and loss <= tolerance and norm <= tolerance,
            f"relative |Δ| of the loss {loss:.1e}, of the gradient norm before clipping {norm:.1e}; clipped "
            f"gradients: {line}")


class Verdicts:
    """The targets and agreement checks a benchmark prints, and its exit code: 1 when a variant failed, the
    compared paths disagree, or (unless targets are only reported, as under --tiny) a target is missed."""

    def __init__(self, enforce_targets: bool):
        self.enforce_targets, self.missed, self.disagree = enforce_targets, [], []

    def target(self, what: str, value: float, limit: float, below: bool = False) -> str:
        """"met"/"MISSED" for value ≤ limit (value < limit when `below`), remembered for the exit code."""
        met = value < limit if below else value <= limit
        if not met:
            self.missed.append(what)
        return f"{value:.3f} (target {'<' if below else '≤'} {limit:g}: {'met' if met else 'MISSED'})"

    def agreement(self, what: str, ok: bool) -> str:
        if not ok:
            self.disagree.append(what)
        return "agree" if ok else "DISAGREE"

    def exit_code(self, failed: list[str]) -> int:
        """Prints the verdict line and returns the exit code."""
        problems = [f"failed: {', '.join(failed)}"] if failed else []
        problems += [f"DISAGREE: {', '.join(self.disagree)}"] if self.disagree else []
        if self.missed:
            problems.append(f"target MISSED: {', '.join(self.missed)}" if self.enforce_targets
                            else f"target missed (not enforced at --tiny): {', '.join(self.missed)}")
        bad = failed or self.disagree or (self.missed and self.enforce_targets)
        print(f"\nverdict: {'; '.join(problems) if problems else 'every target met, the paths agree'}"
              f" (exit code {1 if bad else 0})")
        return 1 if bad else 0


# ---------------------------------------------------------------- command line and machine

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


def machine_line(device: str) -> str:
    if device == "cuda":
        where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not available here)"
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}; load average (1/5/15 min) {load_average()}"


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
