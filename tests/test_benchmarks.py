"""benchmarks/: each benchmark runs at --tiny size as a user runs it, passes, and fails when the path it compares
is broken. The runs start together (they are mostly interpreter start-up) and each test reads its own."""
import subprocess
import sys

import pytest

from conftest import ROOT

BENCHMARKS = ("bench_score", "bench_step", "bench_micro_batches", "bench_uneven")
# Each break is applied at the top of a wrapper script: the benchmark's children are forked from a server that
# imported that script first, so they run the broken code too.
BREAKS = {
    # the chunked loss's gradient with the wrong sign: train.py's step then ascends the KL
    "bench_score": "negated_score_gradient",
    "bench_step": "negated_score_gradient",
    # the two-pass path divides its loss by twice the step's kept count: half the gradient of the single-forward path
    "bench_micro_batches": "two_pass_divides_twice",
    # --micro-batch-tokens not reaching the packing (rows only): micro-batches of 8 padded rows exceed the budget
    "bench_uneven": "micro_batches_ignore_budget",
}
PATCHES = {
    "negated_score_gradient": """
import score
real = score._divergence_and_grad_
def negated(*args, **kwargs):
    value, grad = real(*args, **kwargs)
    return value, -grad
score._divergence_and_grad_ = negated
""",
    "two_pass_divides_twice": """
import train
real = train.train_on_kept
def divided_twice(student, teacher, batch, groups, kept_mask, teacher_rows, student_rows, kept_tokens, config):
    two_pass = any(rows is None for rows in student_rows)
    return real(student, teacher, batch, groups, kept_mask, teacher_rows, student_rows,
                2 * kept_tokens if two_pass else kept_tokens, config)
train.train_on_kept = divided_twice
""",
    "micro_batches_ignore_budget": """
import data
real = data.micro_batches
def rows_only(prompt_lengths, response_lengths, max_rows, max_tokens=0, padding_free=False):
    return real(prompt_lengths, response_lengths, max_rows, 0, padding_free)
data.micro_batches = rows_only
""",
}


def broken_script(benchmark: str, folder) -> str:
    script = folder / f"broken_{benchmark}.py"
    script.write_text(f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]\n"
                      f"{PATCHES[BREAKS[benchmark]]}\nimport {benchmark}\n\n"
                      f"if __name__ == '__main__':\n    sys.exit({benchmark}.main(['--tiny']))\n")
    return str(script)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(benchmark, "as is" | "broken"): (exit code, stdout + stderr)}, every run started at once."""
    folder = tmp_path_factory.mktemp("benchmarks")
    commands = {(b, "as is"): [str(ROOT / "benchmarks" / f"{b}.py"), "--tiny"] for b in BENCHMARKS}
    commands.update({(b, "broken"): [broken_script(b, folder)] for b in BENCHMARKS})
    started = {key: subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for key, command in commands.items()}
    outputs = {key: process.communicate(timeout=600)[0] for key, process in started.items()}
    return {key: (process.returncode, outputs[key]) for key, process in started.items()}


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_benchmark_runs_at_tiny_size_and_its_paths_agree(runs, benchmark):
    code, output = runs[benchmark, "as is"]
    assert code == 0, output
    assert "|---|" in output and "| failed" not in output  # the table, every variant measured
    assert "agree" in output and "DISAGREE" not in output
    assert "target" in output and "verdict:" in output and "(exit code 0)" in output


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_benchmark_fails_when_the_compared_path_is_broken(runs, benchmark):
    code, output = runs[benchmark, "broken"]
    assert code == 1, output
    assert "DISAGREE" in output and "(exit code 1)" in output
    assert "|---|" in output  # it still measured and printed everything
