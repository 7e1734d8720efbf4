"""train.py: the masked OPD step (Eqs. 1, 9) against plain formulas, accumulation, ranks, FSDP2, resume."""
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tip
import train
from conftest import ROOT, tiny_causal_lm
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
