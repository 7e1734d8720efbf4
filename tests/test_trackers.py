"""train.py --report-to (trackers.py) read back by each tracker's own reader, and plot.py. The trackers are the
optional installs of requirements-trackers.txt, which the README's test command installs."""
import json
import os
import subprocess
import sys

import pytest

import plot
import train
from conftest import ROOT, cli


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(line: dict) -> dict:
    return {k: v for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_tensorboard_scalars_are_the_metrics_lines_and_a_resume_continues_them(pair_and_prompts, tmp_path):
    """Every number of every metrics.jsonl line is a TensorBoard scalar at its step, read with TensorBoard's own
    reader; the config is there once; a run resumed from step 2 of 4 leaves each step's value exactly once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(cli(pair_and_prompts, tmp_path, "tb", "--steps", "2", "--report-to", "tensorboard"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    assert len(events.Reload().Tensors("config/text_summary")) == 1  # the config, once, by the fresh run
    train.main(cli(pair_and_prompts, tmp_path, "tb", "--steps", "4", "--report-to", "tensorboard", "--resume"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    lines = metrics(tmp_path / "tb")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        for key, value in numbers(line).items():
            logged = [e for e in events.Scalars(key) if e.step == line["step"]]
            assert len(logged) == 1 and logged[0].value == pytest.approx(value, rel=1e-6, abs=1e-12), (key, line)
    assert set(events.Tags()["scalars"]) == {k for line in lines for k in numbers(line)}
    for line in lines:  # the rates: every token the step sampled over the step's whole time, sampling included
        assert line["tokens_per_second"] == pytest.approx(line["response_tokens"] / line["seconds"], rel=1e-9)
        assert 0 < line["rollout_seconds"] < line["seconds"]
    assert len(events.Tensors("config/text_summary")) == 1  # written by the fresh run, not again on resume


def run_elsewhere(env: dict, *argv) -> subprocess.CompletedProcess:
    """train.py in a process of its own: a tracker's store is read from the environment at import."""
    env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def wandb_records(path):
    """The records of a W&B transaction log (RUN/run-ID.wandb): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks: checksum, length, type; full = 1, first/middle/last = 2/3/4), each record one of
    W&B's own protobuf messages. wandb 0.31 ships no Python reader of its own offline files."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pieces = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""


def test_wandb_offline_run_holds_every_metrics_line_and_a_resume_reopens_it(pair_and_prompts, tmp_path):
    """W&B, offline by default, in the run folder: the history of its runs holds every number of every
    metrics.jsonl line at its step, the run's config is the run's, and a resume reopens the same run id."""
    pytest.importorskip("wandb")
    for extra in ([], ["--resume", "--steps", "3"]):
        result = run_elsewhere({"WANDB_SILENT": "true"}, *cli(pair_and_prompts, tmp_path, "wb", "--steps", "2",
                                                             "--report-to", "wandb", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [record for log in logs for record in wandb_records(log)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(logs) == 2 and len({run.run_id for run in runs}) == 1
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["rule"] == "type_aware" and config["steps"] == 2
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records
               if r.WhichOneof("record_type") == "history"]
    lines = metrics(tmp_path / "wb")
    assert [h["_step"] for h in history] == [line["step"] for line in lines] == [1, 2, 3]
    for logged, line in zip(history, lines):
        for key, value in numbers(line).items():
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_trackio_local_store_holds_every_metrics_line_and_a_resume_continues_its_run(pair_and_prompts, tmp_path):
    """trackio's local store ($TRACKIO_DIR), read back with its own storage class: one run, the one this run
    folder names, with every line at its step, also after a run of 2 steps is resumed to 3."""
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    for extra in ([], ["--resume", "--steps", "3"]):
        result = run_elsewhere({"TRACKIO_DIR": str(store)}, *cli(pair_and_prompts, tmp_path, "ta", "--steps", "2",
                                                                 "--report-to", "trackio", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    read = subprocess.run([sys.executable, "-c", "import json, sys; from trackio.sqlite_storage import SQLiteStorage;"
                           "print(json.dumps({r: SQLiteStorage.get_logs('tip', r) for r in SQLiteStorage.get_runs("
                           "'tip')}, default=str))"], env={**os.environ, "TRACKIO_DIR": str(store)},
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    (run, logs), = json.loads(read.stdout.strip().splitlines()[-1]).items()
    assert run == (tmp_path / "ta" / ".trackio-run-id").read_text()
    lines = metrics(tmp_path / "ta")
    by_step = {log["step"]: log for log in logs}
    assert sorted(by_step) == [line["step"] for line in lines] == [1, 2, 3] and len(logs) == 3
    for line in lines:
        for key, value in numbers(line).items():
            assert by_step[line["step"]][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("mode", [None, "disabled", "online"])
def test_wandb_is_offline_unless_wandb_mode_says_otherwise(tmp_path, monkeypatch, mode):
    """W&B's own setting wins: WANDB_MODE chooses; without it the run stays offline, in the run folder, under this
    folder's run id, reopened on resume."""
    pytest.importorskip("wandb")
    import wandb
    import trackers
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or type(
        "Run", (), {"log": lambda self, *a, **k: None, "finish": lambda self: None})())
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    trackers.wandb(tmp_path, {"rule": "type_aware"}, 0)
    (init,) = calls
    assert init["mode"] == (mode or "offline") and init["dir"] == str(tmp_path)
    assert init["id"] == (tmp_path / ".wandb-run-id").read_text() and init["resume"] == "allow"
    assert init["config"] == {"rule": "type_aware"}


@pytest.mark.parametrize("missing", ["tensorboard", "wandb", "trackio"])
def test_a_tracker_that_is_not_installed_is_refused_before_any_model_loads(monkeypatch, capsys, missing):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else object())
    with pytest.raises(SystemExit):
        train.parse_config(["--report-to", "tensorboard", "wandb", "trackio"])
    assert f"--report-to needs {missing}: pip install -r requirements-trackers.txt" in capsys.readouterr().err
    train.parse_config(["--report-to", *(t for t in ("tensorboard", "wandb", "trackio") if t != missing)])


def test_trackers_get_every_line_and_the_held_out_accuracy_at_its_step_and_are_closed(pair_and_prompts,
                                                                                      tmp_path, monkeypatch):
    """On rank 0 each opened tracker gets the held-out accuracy before training at step 0, every step's line, the
    accuracy after training at the last step, and is closed once, also when the run stops on a signal."""
    import signal
    import evaluate
    import trackers
    import worlds
    logged, closed = [], []
    monkeypatch.setattr(trackers, "open_trackers", lambda names, run_dir, config, start_step: [
        trackers.Tracker(logged.append, lambda: closed.append(start_step))])
    monkeypatch.setattr(worlds, "held_out_problems", lambda config, tokenizer: [{"prompt": "1+1=", "answer": "2"}])
    accuracies = iter([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    monkeypatch.setattr(evaluate, "held_out_accuracy", lambda *a, **k: next(accuracies))
    train.main(cli(pair_and_prompts, tmp_path, "held", "--steps", "2", "--eval-every", "2", "--report-to",
                   "tensorboard"))
    lines = metrics(tmp_path / "held")  # the trackers and metrics.jsonl (plot.py's source) get the same lines
    assert lines[0] == dict(step=0, held_out_accuracy=0.25) and lines[-1] == dict(step=2, held_out_accuracy=0.75)
    assert logged == lines and len(lines) == 4 and [line["step"] for line in lines] == [0, 1, 2, 2]
    assert lines[2]["held_out_accuracy"] == 0.5 and "held_out_accuracy" not in lines[1] and closed == [0]
    logged.clear()  # resumed to 3 steps: no second "before" accuracy, the "after" one at the new last step
    train.main(cli(pair_and_prompts, tmp_path, "held", "--steps", "3", "--eval-every", "2", "--report-to",
                   "tensorboard", "--resume"))
    lines = metrics(tmp_path / "held")
    assert logged == lines[4:] and [line["step"] for line in logged] == [3, 3] and closed == [0, 2]
    assert [line for line in lines if line["step"] == 0] == [dict(step=0, held_out_accuracy=0.25)]
    assert logged[-1] == dict(step=3, held_out_accuracy=1.0) and "held_out_accuracy" not in logged[0]
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)
                        or real_step(*a, **k))
    train.main(cli(pair_and_prompts, tmp_path, "stopped", "--steps", "3", "--report-to", "tensorboard"))
    assert closed == [0, 2, 0] and (tmp_path / "stopped" / "checkpoint-000001").is_dir()


def test_a_tracker_gets_the_numbers_of_the_line_and_the_bar_shows_its_own(tmp_path):
    """What reaches a tracker is exactly a line's numbers (no step, text, None or booleans); the progress bar's
    numbers are the line's loss, mean δ, kept fraction, reward and tokens per second."""
    import trackers
    record = dict(step=3, loss=0.5, mean_reverse_kl=0.25, kept_fraction=0.4, reward=0.75, tokens_per_second=123.0,
                  kept_tokens=4, skipped="", grad_norm=None, flag=True)
    logged, shown = [], {}
    bar = type("Bar", (), {"set_postfix": lambda self, values, refresh=True: shown.update(values)})()
    trackers.log_step(tmp_path, record, [trackers.Tracker(logged.append, lambda: None)], bar)
    assert trackers.scalars(record) == dict(loss=0.5, mean_reverse_kl=0.25, kept_fraction=0.4, reward=0.75,
                                            tokens_per_second=123.0, kept_tokens=4.0)
    assert logged == [record] and metrics(tmp_path) == [record]
    assert {k: float(v) for k, v in shown.items()} == dict(loss=0.5, kl=0.25, kept=0.4, reward=0.75, tok_s=123.0)


def test_plot_draws_one_run_and_two_overlaid(pair_and_prompts, tmp_path):
    """plot.py on one run and on two (a rule comparison): a picture each, every panel with its curves; a folder
    without metrics.jsonl is a one-line error."""
    pytest.importorskip("matplotlib")
    import matplotlib.image
    for rule in ("type_aware", "entropy"):
        train.main(cli(pair_and_prompts, tmp_path, rule, "--steps", "2", "--rule", rule))
    curves = {}
    for name, runs in (("one", ["type_aware"]), ("two", ["type_aware", "entropy"])):
        out = tmp_path / f"{name}.png"
        curves[name] = plot.plot([str(tmp_path / r) for r in runs], out)
        image = matplotlib.image.imread(out)
        assert image.shape[0] > 500 and image.shape[1] > 1000 and image[..., :3].std() > 0.05
    # no held-out accuracy in these runs: every other field is a curve, once per run, drawn from its own field
    assert {t: len(c) for t, c in curves["one"].items()} == {
        title: len(fields) - (title.startswith("reward")) for title, fields in plot.PANELS}
    assert {t: len(c) for t, c in curves["two"].items()} == {t: 2 * len(c) for t, c in curves["one"].items()}
    lines = {rule: metrics(tmp_path / rule) for rule in ("type_aware", "entropy")}
    quadrants = curves["two"]["quadrant shares: kept (solid), all (dotted)"]
    for rule in lines:
        steps = [line["step"] for line in lines[rule]]
        for q in range(1, 5):
            assert quadrants[f"{rule}: Q{q} kept"] == (steps, [line[f"q{q}_share_kept"] for line in lines[rule]])
            assert quadrants[f"{rule}: Q{q} all"] == (steps, [line[f"q{q}_share"] for line in lines[rule]])
        assert curves["two"]["loss and mean reverse KL"][f"{rule}: mean δ"] == (
            steps, [line["mean_reverse_kl"] for line in lines[rule]])
        assert curves["two"]["kept fraction"][f"{rule}: kept"] == (steps, [line["kept_fraction"]
                                                                           for line in lines[rule]])
    plot.main([str(tmp_path / "type_aware"), "--out", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").is_file()
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_plot_draws_each_number_at_the_step_it_was_logged(tmp_path):
    """The x of every point is the step of its metrics.jsonl line: the held-out accuracy before training at step 0
    and after it at the last step, a skipped step (no loss) leaves a gap, a resumed run's lines start past 1."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    lines = [dict(step=0, held_out_accuracy=0.25),
             dict(step=5, loss=0.5, reward=0.1, kept_fraction=0.2, skipped=""),
             dict(step=6, loss=None, reward=0.2, kept_fraction=None, skipped="non-finite loss"),
             dict(step=8, loss=0.25, reward=0.4, kept_fraction=0.3, skipped=""),
             dict(step=8, held_out_accuracy=0.75)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = plot.plot([str(run)], tmp_path / "run.png")
    assert curves["loss and mean reverse KL"] == {"loss": ([5, 8], [0.5, 0.25])}
    assert curves["kept fraction"] == {"kept": ([5, 8], [0.2, 0.3])}
    assert curves["reward and held-out accuracy"] == {"reward": ([5, 6, 8], [0.1, 0.2, 0.4]),
                                                      "held-out": ([0, 8], [0.25, 0.75])}
    assert plot.series(lines, "held_out_accuracy") == ([0, 8], [0.25, 0.75])
