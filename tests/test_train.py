"""train.py: the masked OPD step (Eqs. 1, 9) against plain formulas, accumulation, ranks, FSDP2, resume."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import tip
import train
from conftest import ROOT
from train_worker import config, make_batch, make_pair, one_step

def gradients(student):
    return {name: p.grad.clone() for name, p in student.named_parameters()}


def plain_reverse_kl(student, teacher, batch, dtype=torch.float64):
    """Eq. 1 from full logits in float64: the mean over response tokens of KL(P_S ‖ P_T)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    log_p_s = student.to(dtype)(**kwargs).logits[:, :-1].log_softmax(-1)
    log_p_t = teacher.to(dtype)(**kwargs).logits[:, :-1].log_softmax(-1)
    per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    return per_token[batch.response_mask[:, 1:]].mean()


def test_rule_all_loss_and_gradients_equal_plain_full_logit_formula():
    teacher, student = make_pair()
    batch = make_batch()
    metrics = train.accumulate_gradients(student, teacher, batch, config(rule="all"), None)
    got = gradients(student)
    student64 = copy.deepcopy(student)
    student64.zero_grad(set_to_none=True)
    reference = plain_reverse_kl(student64, copy.deepcopy(teacher), batch)
    reference.backward()
    assert metrics["kept_tokens"] == metrics["response_tokens"] == int(batch.response_mask.sum())
    assert abs(metrics["loss"] - reference.item()) < 1e-5
    for name, p in student64.named_parameters():
        torch.testing.assert_close(got[name].double(), p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_one_step_decreases_reverse_kl_on_a_fixed_batch():
    teacher, student = make_pair()
    batch = make_batch()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    before = plain_reverse_kl(copy.deepcopy(student), teacher, batch, torch.float32).item()
    metrics = train.train_step(student, teacher, batch, optimizer, config(), 0, None)
    after = plain_reverse_kl(copy.deepcopy(student), teacher, batch, torch.float32).item()
    assert not metrics["skipped"] and 0 < metrics["kept_fraction"] < 1
    assert after < before


def test_student_equal_to_teacher_gives_zero_loss_and_leaves_weights_unchanged():
    teacher, _ = make_pair()
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    metrics = train.train_step(student, teacher, make_batch(), optimizer, config(rule="all"), 0, None)
    assert metrics["loss"] == 0 and metrics["mean_reverse_kl"] == 0 and metrics["grad_norm"] == 0
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("rule", ["type_aware", "q3", "entropy"])
def test_two_micro_batches_give_the_gradients_of_one(rule):
    teacher, student = make_pair()
    batch = make_batch()
    whole = train.accumulate_gradients(student, teacher, batch, config(rule=rule, micro_batch_size=64),
                                       torch.Generator().manual_seed(3))
    want = gradients(student)
    student.zero_grad(set_to_none=True)
    split = train.accumulate_gradients(student, teacher, batch, config(rule=rule, micro_batch_size=4),
                                       torch.Generator().manual_seed(3))
    assert split == pytest.approx(whole, rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_non_finite_loss_is_skipped_and_weights_are_unchanged(monkeypatch):
    teacher, student = make_pair()
    before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    real_loss = train.score.distillation_loss
    monkeypatch.setattr(train.score, "distillation_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    metrics = train.train_step(student, teacher, make_batch(), optimizer, config(), 0, None)
    assert metrics["skipped"] == "non-finite loss or gradient"
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not optimizer.state  # AdamW never stepped: no moments were created


def test_step_without_response_tokens_is_skipped():
    teacher, student = make_pair()
    batch = make_batch()
    empty = batch._replace(response_mask=torch.zeros_like(batch.response_mask))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    metrics = train.train_step(student, teacher, empty, optimizer, config(), 0, None)
    assert metrics["skipped"] == "no response tokens" and metrics["response_tokens"] == 0


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    c = config(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.cosine_lr(s, c) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train.cosine_lr(110, c) == pytest.approx(0.1)


def test_step_prompts_cover_each_epoch_once():
    c = config(prompts_per_step=4, seed=5)
    epoch = [i for step in range(5) for i in train.step_prompts(step, 21, c)]
    assert len(epoch) == 20 and len(set(epoch)) == 20
    assert train.step_prompts(5, 21, c) != train.step_prompts(0, 21, c)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, mode):
    """torchrun × 2 (gloo), uneven shares of the rollouts, one micro-batch each, against one process on the
    whole batch: the same kept tokens, gradients, clip and weights after the step, identical on both ranks."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "train_worker.py"), str(tmp_path), mode]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = one_step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in reference.items():
        if mode == "ddp":  # FSDP2's full state dict is gathered on rank 0 only
            assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def pair_and_prompts(tiny_pair):
    """The tiny saved pair and a local prompt file with answers, as a user would pass them."""
    rows = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
    (tiny_pair / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_pair


def cli(folder, out_dir, run_name, *extra):
    return ["--teacher", str(folder / "teacher"), "--student", str(folder / "student"),
            "--prompts", str(folder / "prompts.jsonl"), "--no-math-instruction", "--steps", "4",
            "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-response-len", "6",
            "--micro-batch-size", "3", "--lr", "1e-3", "--chunk-size", "4", "--seed", "3",
            "--out-dir", str(out_dir), "--run-name", run_name, *extra]


def comparable(metrics_path):
    """metrics.jsonl without the fields that measure wall time."""
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_second", "peak_memory_gb")}
            for line in lines]


def test_resume_after_sigterm_matches_an_uninterrupted_run(pair_and_prompts, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    train.main(cli(pair_and_prompts, tmp_path, "straight"))
    real_step = train.train_step

    def terminated_during_step_2(*args, **kwargs):
        if args[5] == 1:  # the 0-based step: SIGTERM arrives while step 2 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", terminated_during_step_2)
    train.main(cli(pair_and_prompts, tmp_path, "killed"))
    killed = tmp_path / "killed"
    assert [p.name for p in sorted(killed.glob("checkpoint-*"))] == ["checkpoint-000002"]
    assert not (killed / "final").exists() and len(comparable(killed / "metrics.jsonl")) == 2
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(cli(pair_and_prompts, tmp_path, "killed", "--resume"))

    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(killed / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert comparable(killed / "metrics.jsonl") == comparable(tmp_path / "straight" / "metrics.jsonl")
    assert not list(tmp_path.rglob("*.tmp"))


def test_metrics_lines_carry_the_realized_selection(pair_and_prompts, tmp_path):
    train.main(cli(pair_and_prompts, tmp_path, "q3", "--rule", "q3", "--steps", "1"))
    line, = comparable(tmp_path / "q3" / "metrics.jsonl")
    assert line["kept_tokens"] < line["response_tokens"]
    assert line["kept_fraction"] == pytest.approx(line["kept_tokens"] / line["response_tokens"])
    assert sum(line[f"q{q}_share"] for q in range(1, 5)) == pytest.approx(1)
    assert sum(line[f"q{q}_share_kept"] for q in range(1, 5)) == pytest.approx(1)
    assert 0 <= line["reward"] <= 1 and line["lr"] > 0 and not line["skipped"]
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert config["rule"] == "q3" and config["steps"] == 1
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q3" / "final").config.hidden_size == 32


def test_bad_flags_fail_before_any_model_loads(tmp_path, capsys):
    for argv, message in ((["--rule", "nope"], "valid rules"), (["--ratio", "1.5"], "outside (0, 1]"),
                          (["--teacher", "t", "--student", "s"], "--prompts is required"),
                          (["--resume"], "needs --run-name"),
                          (["--resume", "--run-name", "x", "--out-dir", str(tmp_path)], "no complete checkpoint")):
        with pytest.raises(SystemExit):
            train.parse_config(argv)
        assert message in capsys.readouterr().err


def test_toy_main_job_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """`python train.py` with no model flags: the toy preset on the toy pair (a miniature world here, built in
    seconds instead of the real one's minutes), held-out accuracy before and after, a final checkpoint."""
    import toy

    recipe = toy.ToyRecipe(train_problems=40, test_problems=8, trigger_problems=8, teacher_hidden=32,
                           teacher_layers=1, teacher_steps=3, student_hidden=32, student_layers=1, student_steps=3,
                           batch_size=8)
    world = toy.toy_world(tmp_path / "cache", recipe=recipe, log=lambda *args: None)
    monkeypatch.setattr(toy, "toy_world", lambda *args, **kwargs: world)
    train.main(["--steps", "2", "--eval-problems", "4", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
                "--out-dir", str(tmp_path), "--run-name", "toy"])
    out = capsys.readouterr().out
    assert "held-out accuracy before training" in out and "held-out accuracy after training" in out
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["prompts"] == "toy" and config["lr"] == tip.PRESETS["toy"]["lr"]
    assert len(comparable(tmp_path / "toy" / "metrics.jsonl")) == 2
    assert (tmp_path / "toy" / "final" / "model.safetensors").exists()
