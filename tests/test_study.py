"""The study's machinery (benchmarks/study.py) on a miniature toy world: two settings x one seed x two steps,
in run processes and in-process; its table, JSON, plot and resuming. Not the accuracies."""
import json
import shutil
from dataclasses import asdict

import pytest

import study
import world_measures
from worlds import toy

TINY = toy.ToyRecipe(train_problems=20, test_problems=6, trigger_problems=6, batch_size=4, head_dim=8,
                     teacher_hidden=16, teacher_layers=1, teacher_steps=2, student_hidden=8, student_layers=1,
                     student_steps=2)


def test_settings_parse_and_bad_ones_are_refused(tmp_path):
    assert study.parse_setting("q3:0.1") == study.Setting("q3", 0.1)
    assert study.parse_setting("all:1:jsd") == study.Setting("all", 1.0, "jsd")
    assert study.parse_setting("all:1:reverse_kl:excluded").exclude_mistakes
    for bad in ("q3", "q3:0.1:jsd:x", "q3:a"):
        with pytest.raises((SystemExit, ValueError)):
            study.parse(["--settings", bad])
    with pytest.raises(SystemExit, match="no_such_rule"):
        study.main(["--settings", "no_such_rule:0.5", "--out", str(tmp_path)])


def test_tracking_windows_weight_quadrants_by_mistake_tokens():
    rows = [dict(skipped="", kept_fraction=0.5, reward=1.0, mistake_tokens=3, mistake_kept=3,
                 **{f"mistake_q{q}_share": float(q == 3) for q in range(1, 5)}),
            dict(skipped="", kept_fraction=0.3, reward=0.0, mistake_tokens=1, mistake_kept=0,
                 **{f"mistake_q{q}_share": float(q == 1) for q in range(1, 5)}),
            dict(skipped="no response tokens", kept_fraction=0.0, reward=None)]
    first, second = study.tracked(rows, 2)
    assert first["steps"] == [1, 2] and first["mistake_kept_share"] == 0.75
    assert first["mistake_q3_share"] == 0.75 and first["mistake_q1_share"] == 0.25
    assert first["kept_fraction"] == pytest.approx(0.4) and first["mistake_tokens_per_step"] == 2
    assert second["steps"] == [3, 3] and second["kept_fraction"] is None  # a skipped step is no data


def test_each_row_is_the_mean_and_sample_std_of_its_own_seeds():
    """The table's "mean ± std over seeds": each setting's own runs only, each split's accuracy under its own
    name, the standard deviation with the n - 1 of a sample (torch.std's default)."""
    import torch
    settings = [study.parse_setting("all:1"), study.parse_setting("q3:0.5")]
    runs = []
    for i, (setting, seed) in enumerate((s, seed) for s in settings for seed in range(3)):
        runs.append({"setting": asdict(setting), "seed": seed, "kept_fraction": 0.1 * i + 0.05 * seed ** 2,
                     "accuracy": {"test": 0.5 + 0.1 * seed, "trigger": 0.2 * seed}, "held_out_reverse_kl": 1.0 + i,
                     "mistake_kept_share": None, "kept_that_are_mistakes": 0.0, "peak_memory_gb": 1.0 + seed,
                     "train_seconds": 60.0 * i, "measure_seconds": 30.0})
    rows = study.summarize(runs[::-1], settings)
    assert [row["name"] for row in rows] == [s.name for s in settings]
    for row, setting in zip(rows, settings):
        group = [r for r in runs if r["setting"] == asdict(setting)]
        for key, values in {"kept_fraction": [r["kept_fraction"] for r in group],
                            "accuracy_test": [r["accuracy"]["test"] for r in group],
                            "accuracy_trigger": [r["accuracy"]["trigger"] for r in group],
                            "minutes": [(r["train_seconds"] + r["measure_seconds"]) / 60 for r in group]}.items():
            reference = torch.tensor(values, dtype=torch.float64)
            assert row[key] == pytest.approx(reference.mean().item()), key
            assert row[f"{key}_std"] == pytest.approx(reference.std().item()), key
        assert row["mistake_kept_share"] is None and row["seeds"] == [0, 1, 2]


def test_the_study_runs_writes_its_outputs_and_resumes(tmp_path, monkeypatch):
    cache, out, work = tmp_path / "cache", tmp_path / "out", tmp_path / "work"
    # the run processes build the default recipe's world: give them the miniature world under its name
    shutil.copytree(toy.toy_world(cache, TINY, log=lambda m: None), toy.world_path(cache, toy.ToyRecipe()))
    common = ["--world", "toy", "--world-dir", str(cache), "--settings", "all:1", "q3:0.5:jsd", "--seeds", "1",
              "--steps", "2", "--samples", "1", "--track-every", "1", "--out", str(out), "--work-dir", str(work)]
    assert study.main(common + ["--jobs", "2", "--threads", "1"]) == 0
    result = json.loads((out / "study.json").read_text())
    assert [row["name"] for row in result["rows"]] == ["all-1-reverse_kl", "q3-0.5-jsd"]
    for run in result["runs"]:
        assert run["steps"] == 2 and len(run["track"]) == 2 and set(run["accuracy"]) == {"test", "trigger"}
        assert 0 < run["kept_fraction"] <= 1 and run["held_out_reverse_kl"] >= 0 and run["peak_memory_gb"] > 0
    all_run = next(r for r in result["runs"] if r["setting"]["rule"] == "all")
    assert all_run["kept_fraction"] == 1.0  # `all` keeps every response token
    table = (out / "study.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| all | 1 | reverse_kl | 1 |")
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(work.iterdir())  # a complete run leaves its result, not its training folder

    # resume: a complete run is not run again; a missing one is, and its half-written folder is replaced
    kept = out / "runs" / "all-1-reverse_kl-s0.json"
    before = kept.stat().st_mtime_ns
    (out / "runs" / "q3-0.5-jsd-s0.json").unlink()
    (work / "q3-0.5-jsd-s0").mkdir()
    (work / "q3-0.5-jsd-s0" / "metrics.jsonl").write_text("half a run\n")
    monkeypatch.setattr(toy, "DEFAULT_RECIPE", TINY)
    assert study.main(common + ["--in-process"]) == 0
    assert kept.stat().st_mtime_ns == before and (out / "runs" / "q3-0.5-jsd-s0.json").exists()
    assert len(json.loads((out / "study.json").read_text())["runs"]) == 2 and not any(work.iterdir())


def test_report_and_a_run_on_the_agent_world(tmp_path, monkeypatch):
    """The conversation world through the same machinery: its pair's report, and one in-process run."""
    from worlds import agent
    tiny = agent.AgentRecipe(facts=6, wrong_facts=2, train_problems=30, test_problems=8, trigger_problems=6,
                             clean_problems=6, batch_size=4, head_dim=8, teacher_hidden=16, teacher_layers=1,
                             teacher_steps=2, student_hidden=8, student_layers=1, student_steps=2)
    monkeypatch.setattr(agent, "DEFAULT_RECIPE", tiny)
    common = ["--world", "agent", "--world-dir", str(tmp_path / "cache"), "--samples", "1", "--out",
              str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert study.main(common + ["--report"]) == 0
    report = json.loads((tmp_path / "out" / "world.json").read_text())
    for role in ("teacher", "student"):
        assert set(report[role]["accuracy"]) == {"test", "trigger", "clean"}
        assert sum(q["token_share"] for q in report[role]["quadrants"].values()) == pytest.approx(1.0)
    assert sum(q["kl_mass_share"] for q in report["student"]["quadrants"].values()) == pytest.approx(1.0)
    assert "mistakes" in report["student"]
    calls, real = [], world_measures.generate_conversations
    monkeypatch.setattr(world_measures, "generate_conversations", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(study.shutil, "rmtree", lambda *a, **k: None)  # keep the run's metrics.jsonl to check
    assert study.main(common + ["--settings", "all:1", "--seeds", "1", "--steps", "3", "--in-process"]) == 0
    (run,) = json.loads((tmp_path / "out" / "study.json").read_text())["runs"]
    assert run["steps"] == 3 and set(run["accuracy"]) == {"test", "trigger", "clean"} and calls
    # the run's numbers, from the metrics.jsonl it wrote, by their plain definitions
    rows = [json.loads(line) for line in (tmp_path / "work" / "all-1-reverse_kl-s0" / "metrics.jsonl")
            .read_text().splitlines()]
    total = lambda field: sum(r.get(field) or 0 for r in rows)  # noqa: E731
    assert total("mistake_tokens") > 0 and total("kept_tokens") > total("mistake_kept") > 0
    assert run["kept_tokens"] == total("kept_tokens") and run["mistake_tokens"] == total("mistake_tokens")
    assert run["kept_fraction"] == pytest.approx(total("kept_tokens") / total("response_tokens"))
    assert run["mistake_kept_share"] == pytest.approx(total("mistake_kept") / total("mistake_tokens"))
    assert run["kept_that_are_mistakes"] == pytest.approx(total("mistake_kept") / total("kept_tokens"))
    assert run["skipped_steps"] == sum(bool(r["skipped"]) for r in rows)
    assert run["peak_memory_gb"] == max(r["peak_memory_gb"] for r in rows)
