"""The command lines a newcomer types: every script's --help, and every command README.md and docs/ show, parsed
by the script it names (and the files it names present), with the README's main job run for a few steps."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def scripts() -> list[str]:
    """Every Python file of the repository that runs as a script (found, so that a new one is covered too)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("worlds/*.py")]
    return sorted(str(f.relative_to(ROOT)) for f in files
                  if re.search(r"^if __name__ == .__main__.:", f.read_text(), re.MULTILINE))


def as_typed(script: str) -> list[str]:
    """The arguments after `python` that run `script`: a module of the worlds package runs with -m."""
    return ["-m", script.removesuffix(".py").replace("/", ".")] if script.startswith("worlds/") else [script]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each command in the documents' code blocks: `\\` continuations joined, comments, `&&`
    chains and leading VAR=value assignments split off."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", document.read_text(), re.MULTILINE | re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words:
                    end = words.index("&&") if "&&" in words else len(words)
                    command, words = words[:end], words[end + 1:]
                    while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
                        command = command[1:]
                    if command:
                        commands.append((document.name, command))
    return commands


def test_the_documents_show_commands():
    """The extraction below finds what the README shows (else every later test would pass on nothing)."""
    shown = [" ".join(argv) for _, argv in documented_commands()]
    assert "python train.py --rule type_aware" in shown
    assert "python -m pytest -q tests" in shown
    assert sum(argv[0] == "torchrun" for _, argv in documented_commands()) >= 3


def test_every_script_answers_help():
    found = scripts()
    assert {"train.py", "evaluate.py", "select.py", "benchmarks/study.py", "tests/mutate.py", "worlds/toy.py"} \
        <= set(found)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = {script: subprocess.Popen([sys.executable, *as_typed(script), "--help"], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for script in found}
    for script, process in started.items():
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0 and "usage:" in output, f"python {script} --help:\n{output[-2000:]}"


# Runs each script as `python SCRIPT ARGS` would, in one process, stopping each at the end of its argument parsing:
# an unknown flag or a bad value exits 2 with argparse's message; nothing is loaded or trained. train.py goes
# through its own parse_config, with every check it makes before a model loads, as one of WORLD_SIZE processes.
PARSE_ONLY = r"""
import argparse, contextlib, io, json, os, runpy, sys
sys.path.insert(0, os.getcwd())
parse_args = argparse.ArgumentParser.parse_args
class Parsed(BaseException):
    pass
def parsed(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed
results = []
for script, args, processes in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if script == "train.py":
                os.environ.update(WORLD_SIZE=str(processes), RANK="0") if processes > 1 else None
                import train
                argparse.ArgumentParser.parse_args = parse_args
                train.parse_config(args)
                raise Parsed
            argparse.ArgumentParser.parse_args = parsed
            if script.endswith(".py"):
                runpy.run_path(script, run_name="__main__")
            else:  # python -m PACKAGE.MODULE
                sys.path[0] = os.getcwd()
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        outcome = "ran without parsing its arguments"
    except Parsed:
        outcome = "parsed"
    except SystemExit as stop:
        outcome = f"exit {stop.code}: {stderr.getvalue().strip()[-500:]}"
    finally:
        os.environ.pop("WORLD_SIZE", None), os.environ.pop("RANK", None)
    results.append(outcome)
print(json.dumps(results))
"""


def parse_only(commands: list[tuple[str, list[str], int]]) -> list[str]:
    """How each (script, args, processes) ends: "parsed", or "exit CODE: the script's message"."""
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def processes(argv: list[str]) -> int:
    """How many processes a `torchrun` command line launches (1 for python)."""
    flags = dict(re.findall(r"--(nproc[-_]per[-_]node|nnodes)[= ](\d+)", " ".join(argv)))
    return int(flags.get("nproc-per-node", flags.get("nproc_per_node", 1))) * int(flags.get("nnodes", 1))


def test_every_documented_command_is_accepted():
    """Each `python X.py …` / `torchrun … X.py …` shown parses with X's own flags (train.py: with its checks, on
    the processes torchrun launches); each file it names to pip or pytest exists."""
    to_parse, checked = [], 0
    for where, argv in documented_commands():
        if argv[0] == "pip":
            for flag, value in zip(argv, argv[1:]):
                if flag == "-r":
                    assert (ROOT / value).is_file(), f"{where}: {' '.join(argv)}: no {value}"
                    checked += 1
        elif argv[:3] == ["python", "-m", "pytest"]:
            paths = [word for word in argv[3:] if not word.startswith("-")]
            assert paths and all((ROOT / p).exists() for p in paths), f"{where}: {' '.join(argv)}"
            checked += 1
        elif argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2].startswith("worlds."):
            assert (ROOT / (argv[2].replace(".", "/") + ".py")).is_file(), f"{where}: {' '.join(argv)}"
            to_parse.append((where, (argv[2], tuple(argv[3:]), 1)))
        elif argv[0] in ("python", "python3", "torchrun") and any(word.endswith(".py") for word in argv):
            at = next(i for i, word in enumerate(argv) if word.endswith(".py"))
            assert (ROOT / argv[at]).is_file(), f"{where}: {' '.join(argv)}: no {argv[at]}"
            to_parse.append((where, (argv[at], tuple(argv[at + 1:]), processes(argv[:at]))))
    unique = sorted({command for _, command in to_parse})
    outcomes = dict(zip(unique, parse_only(unique)))
    # without the optional install, --engine vllm stops at the one check that needs it
    absent = "needs vllm" if importlib.util.find_spec("vllm") is None else "parsed"
    failed = [f"{where}: {command[0]} {' '.join(command[1])} -> {outcomes[command]}" for where, command in to_parse
              if outcomes[command] != "parsed" and not (absent in outcomes[command] and "vllm" in command[1])]
    assert not failed, "\n".join(failed)
    assert len(unique) >= 15 and checked >= 4 and max(command[2] for command in unique) >= 8


def test_a_command_the_script_would_refuse_is_refused():
    """The parse-only run above can fail: a misspelt flag, a value outside the choices, a rule train.py does not
    know, and more processes than rollouts are each caught with the script's own message."""
    bad = [("train.py", ["--rule", "type_aware", "--no-such-flag", "1"], 1), ("train.py", ["--rule", "typeaware"], 1),
           ("evaluate.py", ["--model", "m", "--benchmark", "math5000"], 1),
           ("train.py", ["--prompts-per-step", "2", "--rollouts-per-prompt", "2"], 8),
           ("benchmarks/bench_step.py", ["--repeats", "two"], 1)]
    outcomes = parse_only(bad)
    assert all(outcome.startswith("exit 2") for outcome in outcomes), outcomes
    for outcome, expected in zip(outcomes, ["--no-such-flag", "typeaware", "math5000", "8 processes", "two"]):
        assert expected in outcome, outcome
    assert parse_only([("train.py", ["--prompts-per-step", "2", "--rollouts-per-prompt", "4"], 8)]) == ["parsed"]


def readme_command(script: str, *containing: str) -> list[str]:
    """The arguments of the first command the README shows for `script` with all of `containing` in it."""
    return next(argv[argv.index(script) + 1:] for where, argv in documented_commands()
                if where == "README.md" and script in argv and set(containing) <= set(argv))


def test_the_readme_main_job_and_toy_evaluation_run_shortened(tmp_path, monkeypatch, capsys):
    """The README's main job (the toy pair) and its toy evaluation, as typed, on a miniature toy world and cut to
    a few steps and problems: the run folder holds what the README says a run writes."""
    import evaluate
    from worlds import toy
    import train
    from test_toy import TINY
    monkeypatch.setattr(toy, "DEFAULT_RECIPE", TINY)
    main_job = readme_command("train.py")
    assert main_job == ["--rule", "type_aware"]
    short = ["--world-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--run-name", "readme"]
    train.main([*main_job, *short, "--steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
                "--eval-problems", "2", "--eval-samples", "1"])
    run = tmp_path / "runs" / "readme"
    # the steps, and the held-out evaluations before the first and after the last
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2]
    assert (run / "final" / "model.safetensors").exists() and json.loads((run / "config.json").read_text())["rule"] \
        == "type_aware"
    evaluation = readme_command("evaluate.py", "toy", "toy-student")
    assert evaluation == ["--model", "toy-student", "--benchmark", "toy"]
    evaluate.main([*evaluation, "--world-dir", str(tmp_path), "--problems", "2", "--samples", "1",
                   "--out", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert len(report["problems"]) == 2 and report["summary"]["model"] == "toy-student"
    assert report["summary"]["accuracy"] == sum(p["correct"][0] for p in report["problems"]) / 2
    # the README's evaluation of a trained run, on the folder this run wrote
    trained = next(argv[2:] for where, argv in documented_commands() if where == "README.md"
                   and argv[:2] == ["python", "evaluate.py"] and argv[3].endswith("/final") and "toy" in argv)
    trained[trained.index("--model") + 1] = str(run / "final")
    evaluate.main([*trained, "--world-dir", str(tmp_path), "--problems", "2", "--samples", "1",
                   "--out", str(tmp_path / "trained.json")])
    assert json.loads((tmp_path / "trained.json").read_text())["summary"]["model"] == str(run / "final")
