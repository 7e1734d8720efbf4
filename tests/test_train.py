"""train.py: the masked OPD step (Eqs. 1, 9) against plain formulas, its two passes, ranks, FSDP2, resume, CLI."""
import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import pair
import score
import tip
import train
from conftest import ROOT, cli, recording
from train_worker import CLIP, config, held_out_answers, make_batch, make_pair, one_step, tokenizer

SEL = tip.load_select()


def gradients(student):
    return {name: p.grad.clone() for name, p in student.named_parameters()}


def plain_logits(model, batch, dtype=torch.float64):
    """Full-vocabulary logits of `model` (a copy in `dtype` unless it has it) at the response contexts [N, V]."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    model = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids).logits
    return logits[:, :-1][batch.response_mask[:, 1:]]


def plain_reverse_kl(student, teacher, batch, dtype=torch.float64, kept=None):
    """Eq. 1 (Eq. 9 with `kept`, a [B, L] mask) from full logits: the mean of KL(P_S ‖ P_T) over the tokens."""
    log_p_s = plain_logits(student, batch, dtype).log_softmax(-1)
    log_p_t = plain_logits(teacher, batch, dtype).log_softmax(-1)
    per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    rows = torch.ones_like(per_token, dtype=torch.bool) if kept is None else kept[batch.response_mask]
    return per_token[rows].mean()


def without_skipped(metrics):
    return {k: v for k, v in metrics.items() if k != "skipped"}


def test_rule_all_loss_and_gradients_equal_plain_full_logit_formula():
    teacher, student = make_pair()
    batch = make_batch()
    metrics = train.accumulate_gradients(student, teacher, batch, config(rule="all"), None)
    got = gradients(student)
    student64 = copy.deepcopy(student).double()
    student64.zero_grad(set_to_none=True)
    plain_reverse_kl(student64, teacher, batch).backward()
    reference = plain_reverse_kl(student, teacher, batch).item()
    assert metrics["kept_tokens"] == metrics["response_tokens"] == int(batch.response_mask.sum())
    assert metrics["loss"] == pytest.approx(reference, rel=1e-5)
    for name, p in student64.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(got[name].double(), p.grad, atol=1e-4 * scale, rtol=1e-4, msg=name)


def test_selected_loss_gradients_and_shares_equal_the_plain_formula_at_the_kept_tokens(monkeypatch):
    """type_aware over three micro-batches (the two-pass path): the kept set is the rule applied to the plain
    float64 scores, the loss and gradients are Eq. 9 at those tokens, the shares are `quadrants` of them."""
    teacher, student = make_pair()
    batch = make_batch()
    chosen = []
    real_select = SEL.select_tokens
    monkeypatch.setattr(SEL, "select_tokens", lambda *a, **k: chosen.append(real_select(*a, **k)) or chosen[-1])
    metrics = train.accumulate_gradients(student, teacher, batch, config(micro_batch_size=3), None)
    got = gradients(student)

    with torch.no_grad():
        stats64 = score.token_stats(plain_logits(student, batch), plain_logits(teacher, batch))
    response = batch.response_mask
    full = score.TokenStats(*(torch.zeros(response.shape, dtype=torch.float64).masked_scatter(response, s)
                              for s in stats64))
    kept = SEL.select_tokens("type_aware", full, response)
    assert torch.equal(chosen[0], kept) and 0 < kept.sum() < response.sum()
    student64 = copy.deepcopy(student).double()
    student64.zero_grad(set_to_none=True)
    loss = plain_reverse_kl(student64, teacher, batch, kept=kept)
    loss.backward()
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["kept_tokens"] == int(kept.sum())
    for name, p in student64.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(got[name].double(), p.grad, atol=1e-4 * scale, rtol=1e-4, msg=name)
    quadrant = SEL.quadrants(full.entropy, full.reverse_kl, response)
    for q in range(1, 5):
        assert metrics[f"q{q}_share"] == pytest.approx(float((quadrant[response] == q).double().mean()))
        assert metrics[f"q{q}_share_kept"] == pytest.approx(float((quadrant[kept] == q).double().mean()))
    assert metrics["mean_reverse_kl"] == pytest.approx(stats64.reverse_kl.mean().item(), rel=1e-5)
    assert metrics["mean_entropy"] == pytest.approx(stats64.entropy.mean().item(), rel=1e-5)


def test_one_step_decreases_reverse_kl_on_a_fixed_batch():
    teacher, student = make_pair()
    batch = make_batch()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    before = plain_reverse_kl(student, teacher, batch, torch.float32).item()
    metrics = train.train_step(student, teacher, batch, optimizer, config(), 0, None)
    after = plain_reverse_kl(student, teacher, batch, torch.float32).item()
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
@pytest.mark.parametrize("micro_batch_size,micro_batch_tokens,single_forward",
                         [(1, 0, False), (3, 0, False), (3, 0, True), (64, 40, False), (64, 40, True), (2, 1, False)])
def test_micro_batches_give_the_gradients_of_one(rule, micro_batch_size, micro_batch_tokens, single_forward):
    """One micro-batch reuses its scoring forward; several run the student twice (no grad, then with grad),
    or keep every graph with --single-forward; packed by tokens (rows out of order, a budget below every row),
    the same."""
    teacher, student = make_pair()
    batch = make_batch()
    whole = train.accumulate_gradients(student, teacher, batch, config(rule=rule, micro_batch_size=64),
                                       torch.Generator().manual_seed(3))
    want = gradients(student)
    student.zero_grad(set_to_none=True)
    split_config = config(rule=rule, micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens,
                          single_forward=single_forward)
    assert len(train.micro_batches(student, batch, split_config)) > 1
    split = train.accumulate_gradients(student, teacher, batch, split_config, torch.Generator().manual_seed(3))
    assert without_skipped(split) == pytest.approx(without_skipped(whole), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5 * want[name].abs().max().item(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("padding_free", ["off", "on"])
@pytest.mark.parametrize("max_rows,max_tokens", [(3, 0), (64, 40), (3, 40), (64, 1), (2, 10_000)])
def test_micro_batches_by_tokens_cover_every_row_once_within_the_budget(max_rows, max_tokens, padding_free):
    """Every row in exactly one micro-batch; the size the forward really computes (padded: the micro-batch's
    columns that are not padding in all rows, as pair.trimmed cuts them; packed: the row pair.packed makes) within
    the budget unless the row is alone and longer; at most max_rows rows; without a budget, consecutive rows in
    order; with one, packed greedily from the longest (a micro-batch is closed only when the next row would not
    fit)."""
    batch = make_batch(rows=11, length=24, seed=5)

    def computed(rows):
        return (pair.packed(batch, rows)[0] if padding_free == "on" else pair.trimmed(batch, rows)[0]).numel()
    groups = train.micro_batches(make_pair()[1], batch, config(micro_batch_size=max_rows,
                                                               micro_batch_tokens=max_tokens, padding_free=padding_free))
    assert sorted(i for rows in groups for i in rows) == list(range(11))
    real = batch.attention_mask.sum(1)
    for rows in groups:
        assert 1 <= len(rows) <= max_rows
        if max_tokens:
            assert computed(rows) <= max_tokens or (len(rows) == 1 and real[rows[0]] > max_tokens)
    if not max_tokens:
        assert groups == [list(range(s, min(s + max_rows, 11))) for s in range(0, 11, max_rows)]
    else:
        lengths = [int(real[i]) for rows in groups for i in rows]
        assert lengths == sorted(lengths, reverse=True)
        for rows, following in zip(groups, groups[1:]):  # the next micro-batch's first row did not fit
            assert len(rows) == max_rows or computed(rows + following[:1]) > max_tokens


def test_padding_free_auto_packs_where_attention_has_a_variable_length_path():
    config_of_model = type("Config", (), {"_attn_implementation": "sdpa"})()
    model = torch.nn.Module()
    model.config = config_of_model
    assert [pair.packs_rows(model, mode) for mode in ("auto", "on", "off")] == [False, True, False]
    config_of_model._attn_implementation = "flash_attention_2"
    assert [pair.packs_rows(model, mode) for mode in ("auto", "on", "off")] == [True, True, False]


@pytest.mark.parametrize("rule", ["type_aware", "entropy"])
def test_packed_rows_give_the_loss_and_gradients_of_padded_ones(rule):
    """--padding-free on: each micro-batch one row of real tokens, positions restarting per rollout; the same
    scores, kept tokens, loss and gradients as padded micro-batches (rows of very different lengths)."""
    teacher, student = make_pair()
    batch = make_batch(rows=9, length=24, seed=2)
    results, grads = [], []
    for padding_free in ("off", "on"):
        student.zero_grad(set_to_none=True)
        results.append(train.accumulate_gradients(student, teacher, batch, config(
            rule=rule, micro_batch_size=4, padding_free=padding_free), torch.Generator().manual_seed(3)))
        grads.append(gradients(student))
    assert without_skipped(results[1]) == pytest.approx(without_skipped(results[0]), rel=1e-5)
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5 * want.abs().max().item(), rtol=1e-4, msg=name)


def test_gradient_checkpointing_recomputes_in_backward_in_trains_own_step(pair_and_prompts, tmp_path, monkeypatch):
    """train.main puts the student in training mode, so --gradient-checkpointing really recomputes each decoder
    layer in backward (hooks on a layer's submodule fire again then), and without the flag nothing does."""
    calls = {}
    real_step = train.train_step

    def counting_step(student, *args, **kwargs):
        attention = student.model.layers[0].self_attn
        count = []
        handle = attention.register_forward_hook(lambda *hook_args: count.append(1))
        try:
            return real_step(student, *args, **kwargs)
        finally:
            handle.remove()
            calls[(student.training, student.is_gradient_checkpointing)] = len(count)
    monkeypatch.setattr(train, "train_step", counting_step)
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        # 4 rollouts in micro-batches of 2: pass 1 forwards twice, pass 2 twice, and a checkpoint twice more
        train.main(cli(pair_and_prompts, tmp_path, flag.strip("-"), flag, "--steps", "1", "--micro-batch-size", "2"))
    assert calls == {(True, True): 6, (True, False): 4}


def test_a_non_finite_loss_is_skipped_and_weights_are_unchanged(monkeypatch):
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


def test_a_non_finite_score_skips_the_step_before_selection(monkeypatch):
    teacher, student = make_pair()
    real_stats = train.score.chunked_token_stats

    def one_nan(*args, **kwargs):
        stats = real_stats(*args, **kwargs)
        stats.reverse_kl[0] = float("nan")
        return stats
    monkeypatch.setattr(train.score, "chunked_token_stats", one_nan)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    metrics = train.train_step(student, teacher, make_batch(), optimizer, config(), 0, None)
    assert metrics["skipped"] == "1 non-finite token scores" and metrics["grad_norm"] is None
    assert not optimizer.state and all(p.grad is None for p in student.parameters())


def test_step_without_response_tokens_is_skipped():
    teacher, student = make_pair()
    batch = make_batch()
    empty = batch._replace(response_mask=torch.zeros_like(batch.response_mask))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    metrics = train.train_step(student, teacher, empty, optimizer, config(), 0, None)
    assert metrics["skipped"] == "no response tokens" and metrics["response_tokens"] == 0


def test_exclude_mistakes_never_keeps_them_and_counts_them():
    teacher, student = make_pair()
    batch = make_batch()
    mistakes = torch.zeros_like(batch.response_mask)
    mistakes[:, 5:8] = True  # the first response tokens of every row (and some padding, which must not count)
    counted = mistakes & batch.response_mask
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = train.accumulate_gradients(student, teacher, batch, config(rule="all"), generator(), mistakes)
    assert plain["mistake_tokens"] == plain["mistake_kept"] == int(counted.sum())
    assert sum(plain[f"mistake_q{q}_share"] for q in range(1, 5)) == pytest.approx(1)
    excluded = train.accumulate_gradients(student, teacher, batch, config(rule="all", exclude_mistakes=True),
                                          generator(), mistakes)
    assert excluded["mistake_kept"] == 0 and excluded["mistake_tokens"] == int(counted.sum())
    assert excluded["kept_tokens"] == plain["kept_tokens"] - int(counted.sum())


def test_a_response_at_the_first_position_is_refused():
    teacher, student = make_pair()
    batch = make_batch()
    batch.response_mask[2, 0] = True
    with pytest.raises(ValueError, match="every row needs a prompt token first"):
        train.accumulate_gradients(student, teacher, batch, config(), None)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    c = config(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.cosine_lr(s, c) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(π/2) = 0
    assert lrs[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5))  # a quarter of the way: cos(π/4)
    assert train.cosine_lr(110, c) == pytest.approx(0.1)


def test_step_prompts_cover_each_epoch_once():
    c = config(prompts_per_step=4, seed=5)
    epoch = [i for step in range(5) for i in data.step_prompts(step, 21, c)]
    assert len(epoch) == 20 and len(set(epoch)) == 20
    assert data.step_prompts(5, 21, c) != data.step_prompts(0, 21, c)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 16])
def test_rollout_shares_cover_the_step_once_and_differ_by_at_most_one(world_size, monkeypatch):
    c = config(prompts_per_step=2, rollouts_per_prompt=8, seed=1)
    monkeypatch.setattr(tip, "world_size", lambda: world_size)
    shares = []
    for r in range(world_size):
        monkeypatch.setattr(tip, "rank", lambda r=r: r)
        shares.append(data.rollout_share(3, 10, c))
    assert [i for share in shares for i in share] == [i for i in data.step_prompts(3, 10, c) for _ in range(8)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1


@pytest.mark.parametrize("path", ["hf", "engine", "conversations"])
def test_sample_rollouts_passes_every_setting_to_its_sampler(path, monkeypatch):
    """train.py's flags reach each sampler as given: --max-response-len, --temperature, --top-p, one rollout
    per listed prompt (the share already repeats each prompt --rollouts-per-prompt times), the step's seed,
    and for conversations --max-turns and the chat-template switches."""
    import rollout
    calls = []
    monkeypatch.setattr(train, "generate_rollouts", recording(rollout.generate_rollouts, calls, lambda _: "rollouts"))
    monkeypatch.setattr(train, "generate_conversations", recording(rollout.generate_conversations, calls,
                                                                   lambda _: "rollouts"))

    class Engine:
        def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed=None):
            return recording(Engine.generate, calls, lambda _: "rollouts")(self, prompts, n, max_new_tokens,
                                                                         temperature, top_p, seed=seed)

        def sleep(self):
            calls[-1]["slept"] = True
    task = rollout.Task([{"role": "user", "content": "q"}]) if path == "conversations" else None
    prompts = [{"prompt": f"p{i}", "task": task} for i in range(3)]
    c = config(prompts_per_step=3, rollouts_per_prompt=2, max_response_len=37, temperature=0.3, top_p=0.77,
               max_turns=5, seed=4, chat_template_kwargs='{"enable_thinking": true}')
    mine, rollouts = train.sample_rollouts(7, "student", "tokenizer", prompts, c, torch.device("cpu"),
                                           Engine() if path == "engine" else None)
    call = calls[0]
    assert len(calls) == 1 and rollouts == "rollouts" and len(mine) == 6
    assert (call["max_new_tokens"], call["temperature"], call["top_p"], call["n"], call["seed"]) == (
        37, 0.3, 0.77, 1, train.sampling_seed(7, c))
    assert len(call.get("prompts") or call.get("tasks")) == 6
    if path == "engine":
        assert call["slept"]
    if path == "conversations":
        assert (call["max_turns"], call["switches"]) == (5, {"enable_thinking": True})


def test_ranks_and_steps_sample_differently(monkeypatch):
    """Rollouts are drawn independently: two ranks holding the same prompt, or one rank at two steps, sample
    different responses (identical draws would train on copies of one sample)."""
    _, student = make_pair()
    prompts = [{"prompt": data.format_prompt(tokenizer(), "1+2=")}]
    c = config(prompts_per_step=1, rollouts_per_prompt=4, max_response_len=12, temperature=1.0, seed=5)
    monkeypatch.setattr(tip, "world_size", lambda: 2)
    texts = {}
    for step in (0, 1):
        for r in (0, 1):
            monkeypatch.setattr(tip, "rank", lambda r=r: r)
            mine, rollouts = train.sample_rollouts(step, student, tokenizer(), prompts, c, torch.device("cpu"))
            assert len(mine) == 2
            texts[step, r] = rollouts.texts
    assert len({text for batch in texts.values() for text in batch}) == 8, texts
    seeds = set()
    for step in range(50):
        for r in range(4):
            monkeypatch.setattr(tip, "world_size", lambda: 4)
            monkeypatch.setattr(tip, "rank", lambda r=r: r)
            seeds.add(train.sampling_seed(step, c))
    assert len(seeds) == 200


def torchrun(nproc: int, *args, timeout=300):
    """torchrun × nproc; a run that hangs past `timeout` fails the test and leaves no process behind."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("mode,nproc", [("ddp", 3), ("fsdp", 4), ("fsdp_uneven", 4), ("conversations", 3)])
def test_ranks_match_one_process(tmp_path, mode, nproc):
    """torchrun × N (gloo), uneven shares of the rollouts, against one process on the whole batch: the same
    kept tokens and loss, and the same weight update (compared at its own size: the step moves weights by
    ~1e-3), identical on every rank. fsdp_uneven: 7 rows over 4 FSDP2 ranks in micro-batches of 1, so one rank
    runs an empty micro-batch beside the others' last."""
    result = torchrun(nproc, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), mode)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference, reference_metrics = one_step(rows=8 if mode == "fsdp" else 7, tool_results=mode == "conversations")
    if mode == "conversations":  # tool results inside the responses: context the mask leaves out
        batch = make_batch(7, tool_results=True)
        assert (batch.attention_mask.bool() & ~batch.response_mask)[:, 5:].any()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    for name, update in reference.items():
        assert update.abs().max() > 0, name
        if not mode.startswith("fsdp"):  # FSDP2's full state dict is gathered on rank 0 only
            for other in ranks[1:]:
                assert torch.equal(ranks[0]["update"][name], other["update"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0]["update"][name], update, atol=1e-4 * update.abs().max().item(),
                                   rtol=1e-3, msg=name)
    assert reference_metrics["grad_norm"] > 2 * CLIP  # the clip binds: a norm that is not global would show
    for other in ranks:
        assert other["metrics"]["grad_norm"] == pytest.approx(reference_metrics["grad_norm"], rel=1e-5)
        assert other["metrics"]["kept_tokens"] == reference_metrics["kept_tokens"]
        assert other["metrics"]["loss"] == pytest.approx(reference_metrics["loss"], rel=1e-5)


def test_fsdp_layers_are_back_in_their_shards_after_every_step(tmp_path):
    """Under FSDP2 no decoder-layer parameter of the student or the teacher stays a whole tensor after a step:
    skipped (forwards without the backward that reshards) or trained, in one pass or two, nor between the scoring
    pass and the training pass, nor right after a forward with grad whose backward has not run, on 2 processes."""
    result = torchrun(2, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "reshard")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [skipped for skipped, *_ in steps] == [True, True, False, False, True, True, False, False]
        assert all(student and teacher for _, student, teacher in steps), steps


def test_rows_move_between_ranks_so_each_trains_about_as_many_tokens(tmp_path):
    """9 rollouts of very uneven lengths on 3 processes, the longest on rank 0: after balancing, every rollout is
    on exactly one rank with its tokens, sampled mask, mistake mask and prompt length, laid out as rollout.py lays
    rollouts out (prompts left-padded, responses right-padded, so every row's response starts in one column); the
    busiest rank's tokens are within 5 % of the best split (found by trying all 3^9) and below the contiguous
    shares'."""
    import itertools

    result = torchrun(3, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "balance")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    batch = make_batch(rows=9, length=40, seed=11, tool_results=True)
    mistakes = batch.response_mask & (batch.input_ids % 3 == 0)
    real = batch.attention_mask.bool()
    want = sorted((batch.input_ids[b][real[b]].tolist(), batch.response_mask[b][real[b]].tolist(),
                   mistakes[b][real[b]].tolist(), int(batch.prompt_lengths[b])) for b in range(9))
    got = sorted((row["ids"], row["sampled"], row["mistakes"], row["prompt"]) for rank in ranks for row in rank["rows"])
    assert got == want
    for rank in ranks:
        assert len({row["prompt_end"] for row in rank["rows"]}) == 1
        assert all(row["response_starts"] >= row["prompt_end"] for row in rank["rows"])
        assert min(row["first"] for row in rank["rows"]) == 0
        assert rank["columns"] == max(row["prompt"] for row in rank["rows"]) + max(
            len(row["ids"]) - row["prompt"] for row in rank["rows"])
    loads = [sum(len(row["ids"]) for row in rank["rows"]) for rank in ranks]
    lengths = real.sum(1).tolist()
    best = min(max(sum(l for l, o in zip(lengths, owners) if o == r) for r in range(3))
               for owners in itertools.product(range(3), repeat=9))
    assert max(loads) <= 1.05 * best and max(loads) < max(rank["before"] for rank in ranks)


@pytest.mark.parametrize("world_size", [4, 8])
def test_balanced_owners_of_realistic_rollouts_are_within_5_percent_of_the_mean(world_size):
    """The paper's step (16 rollouts a rank) at its spread: responses log-normal (median a quarter of the cap,
    σ 0.8, cut at the cap) after prompts of 100-2,048 tokens; over 50 draws the busiest rank trains at most 1.05×
    the mean, where contiguous shares reach far more; each rank gets 16 ± 8 rows."""
    worst, contiguous = 0.0, 0.0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        lengths = ((torch.randn(16 * world_size, generator=g) * 0.8).exp() * 2048).clamp(max=8192).long() \
            + torch.randint(100, 2048, (16 * world_size,), generator=g)
        lengths = lengths.tolist()
        owners = data.balanced_owners(lengths, world_size)
        loads = [sum(l for l, o in zip(lengths, owners) if o == r) for r in range(world_size)]
        assert all(8 <= owners.count(r) <= 24 for r in range(world_size))
        worst = max(worst, max(loads) * world_size / sum(lengths))
        shares = [sum(lengths[16 * r:16 * (r + 1)]) for r in range(world_size)]
        contiguous = max(contiguous, max(shares) * world_size / sum(lengths))
    assert worst <= 1.05 < contiguous


def test_each_rank_resumes_its_own_random_state(tmp_path):
    """Two ranks with different random states save a checkpoint and resume from it: each draws after the resume
    what it drew after the save (its own state, not rank 0's)."""
    result = torchrun(2, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "rng")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    draws = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in draws:
        assert torch.equal(rank["after_save"], rank["after_resume"])
    assert not torch.equal(draws[0]["after_save"], draws[1]["after_save"])


def test_an_fsdp_checkpoint_is_written_in_shards_and_resumes_on_other_process_counts(tmp_path):
    """Saved by 4 FSDP2 processes, each writing its own shards (no model/ folder, no whole state on any rank), the
    checkpoint resumes on 2 processes and in one unsharded process with the same weights and AdamW moments; torch's
    own reader of the format (dcp_to_torch_save) finds the same weights in it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = torchrun(4, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "save_sharded")
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    folder = tmp_path / "checkpoint-000005"
    assert sorted(p.name for p in folder.iterdir()) == ["sharded", "state.pt"]
    assert len(list((folder / "sharded").glob("*.distcp"))) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    resumed = torchrun(2, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "resume_sharded")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    want, got = (torch.load(tmp_path / f"{mode}.pt") for mode in ("save_sharded", "resume_sharded"))
    _, student = make_pair()
    fresh = {name: value.clone() for name, value in student.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters())
    assert checkpoint.resume_from(folder, student, optimizer) == 5
    dcp_to_torch_save(folder / "sharded", tmp_path / "converted.pt")
    converted = torch.load(tmp_path / "converted.pt")["model"]
    for name, value in want["model"].items():
        assert not torch.equal(value, fresh[name]), name
        for other in (got["model"][name], student.state_dict()[name], converted[name]):
            assert torch.equal(other, value), name
    names = [name for name, _ in student.named_parameters()]
    moments = [moments_by_name(state, names) for state in (want["optimizer"], got["optimizer"],
                                                             optimizer.state_dict())]
    assert moments[0].keys() == set(names) and all(m.keys() == moments[0].keys() for m in moments)
    for name, (exp_avg, exp_avg_sq) in moments[0].items():
        assert exp_avg.abs().min() > 0, name
        assert all(torch.equal(m[name][0], exp_avg) and torch.equal(m[name][1], exp_avg_sq) for m in moments), name


def moments_by_name(optimizer_state: dict, names: list[str]) -> dict:
    """AdamW's moments by parameter name, from a plain state dict (keyed by index) or FSDP2's (keyed by name)."""
    return {(name if isinstance(name, str) else names[name]): (s["exp_avg"], s["exp_avg_sq"])
            for name, s in optimizer_state["state"].items()}


@pytest.mark.parametrize("mode,nproc,problems", [("held_out", 3, 12), ("held_out_fsdp", 4, 5), ("held_out_fsdp", 4, 3)])
def test_held_out_accuracy_over_ranks_is_that_of_the_whole_set(tmp_path, mode, nproc, problems):
    """Uneven shares, and under FSDP2 a rank without a problem (which must still sample with the others)."""
    result = torchrun(nproc, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), mode, str(problems),
                      timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    want = sum(answer == "1" for *_, answer in held_out_answers()[:problems]) / problems
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)] == [pytest.approx(want)] * nproc


def test_fsdp_sampling_of_uneven_ranks_finishes_and_equals_the_whole_model(tmp_path):
    """4 processes under FSDP2, each decoding a different number of rows to a different length (2 to 29 tokens),
    and conversations that call a tool 0 to 3 times: every rank finishes, its greedy rollouts are the unsharded
    model's token for token, and each conversation has its own number of turns while every rank sampled as many
    (the ranks that were done sampled along with a stand-in row)."""
    result = torchrun(4, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "generate", timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(rank["same"] for rank in ranks), ranks
    assert len({rank["width"] for rank in ranks}) == 4
    assert [rank["assistant_turns"] for rank in ranks] == [1, 2, 3, 4]
    assert [rank["turns"] for rank in ranks] == [[1, 1, 1, 1]] * 4


def comparable(metrics_path):
    """metrics.jsonl without the fields that measure wall time."""
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    timing = ("seconds", "rollout_seconds", "tokens_per_second", "peak_memory_gb")
    return [{k: v for k, v in line.items() if k not in timing} for line in lines]


def test_two_resumes_after_sigterm_match_an_uninterrupted_run(pair_and_prompts, tmp_path, monkeypatch):
    """Weights, metrics and the random state over a run stopped twice (a checkpoint every step): each resume
    continues from the newest checkpoint. Each step draws from the global generator, so a resume that did not
    restore it, or went back to an older checkpoint, would draw other numbers."""
    from safetensors.torch import load_file

    real_step = train.train_step
    draws = {"straight": [], "killed": []}

    def drawing_step(run, *args, **kwargs):
        draws[run].append(torch.rand(1).item())
        step = args[5]
        if run == "killed" and step in (1, 2) and len(draws["killed"]) == step + 1:  # SIGTERM during steps 2, 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", lambda *a, **k: drawing_step("straight", *a, **k))
    train.main(cli(pair_and_prompts, tmp_path, "straight", "--save-every", "1"))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: drawing_step("killed", *a, **k))
    train.main(cli(pair_and_prompts, tmp_path, "killed", "--save-every", "1"))
    killed = tmp_path / "killed"
    assert [p.name for p in sorted(killed.glob("checkpoint-*"))] == ["checkpoint-000001", "checkpoint-000002"]
    assert not (killed / "final").exists() and len(comparable(killed / "metrics.jsonl")) == 2
    train.main(cli(pair_and_prompts, tmp_path, "killed", "--save-every", "1", "--resume"))
    assert len(comparable(killed / "metrics.jsonl")) == 3 and not (killed / "final").exists()
    train.main(cli(pair_and_prompts, tmp_path, "killed", "--save-every", "1", "--resume"))

    assert draws["killed"] == draws["straight"] and len(set(draws["straight"])) == 4
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(killed / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert comparable(killed / "metrics.jsonl") == comparable(tmp_path / "straight" / "metrics.jsonl")
    assert not list(tmp_path.rglob("*.tmp"))
    # without --save-every, a stopped run still leaves the checkpoint of the step it stopped after, and only it
    draws["killed"] = []
    train.main(cli(pair_and_prompts, tmp_path, "once"))
    once = tmp_path / "once"
    assert [p.name for p in once.glob("checkpoint-*")] == ["checkpoint-000002"] and not (once / "final").exists()
    monkeypatch.setattr(train, "train_step", lambda *a, **k: draws["killed"].append(torch.rand(1).item())
                        or real_step(*a, **k))  # no signal this time
    train.main(cli(pair_and_prompts, tmp_path, "once", "--resume"))
    assert draws["killed"] == draws["straight"]
    final = load_file(once / "final" / "model.safetensors")
    assert all(torch.equal(final[name], straight[name]) for name in straight)


def test_resume_reads_a_student_saved_in_several_safetensors_files(tmp_path, monkeypatch):
    """save_pretrained splits a large model into shards (model-00001-of-0000N.safetensors and an index); a
    checkpoint written that way resumes with every weight."""
    import functools
    _, student = make_pair()
    optimizer = torch.optim.AdamW(student.parameters())
    monkeypatch.setattr(type(student), "save_pretrained", functools.partialmethod(
        type(student).save_pretrained, max_shard_size="20KB"))
    checkpoint.save_checkpoint(tmp_path, 3, student, tokenizer(), optimizer)
    assert len(list((tmp_path / "checkpoint-000003" / "model").glob("*.safetensors"))) > 2
    want = {name: value.clone() for name, value in student.state_dict().items()}
    fresh = make_pair(seed=7)[1]
    assert any(not torch.equal(fresh.state_dict()[n], want[n]) for n in want)
    assert checkpoint.resume_from(tmp_path / "checkpoint-000003", fresh, torch.optim.AdamW(fresh.parameters())) == 3
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in want.items())


def test_metrics_lines_carry_the_step_as_trained(pair_and_prompts, tmp_path, monkeypatch):
    """The loss, kept count and quadrant shares of metrics.jsonl, recomputed from the step's own rollouts and
    starting weights with the plain formulas."""
    seen = []
    real_step = train.train_step

    def recording_step(student, teacher, rollouts, *args, **kwargs):
        seen.append((copy.deepcopy(student), rollouts))
        return real_step(student, teacher, rollouts, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    train.main(cli(pair_and_prompts, tmp_path, "q3", "--rule", "q3", "--steps", "1", "--ratio", "0.5"))
    line, = comparable(tmp_path / "q3" / "metrics.jsonl")
    (student, rollouts), = seen
    teacher, _, _ = pair.load_pair(str(pair_and_prompts / "teacher"), str(pair_and_prompts / "student"), "cpu")
    with torch.no_grad():
        stats64 = score.token_stats(plain_logits(student, rollouts), plain_logits(teacher, rollouts))
    response = rollouts.response_mask
    full = score.TokenStats(*(torch.zeros(response.shape, dtype=torch.float64).masked_scatter(response, s)
                              for s in stats64))
    kept = SEL.select_tokens("q3", full, response, 0.5)
    assert line["response_tokens"] == int(response.sum()) and line["kept_tokens"] == int(kept.sum())
    assert line["kept_fraction"] == pytest.approx(line["kept_tokens"] / line["response_tokens"])
    assert line["loss"] == pytest.approx(plain_reverse_kl(student, teacher, rollouts, kept=kept).item(), rel=1e-5)
    quadrant = SEL.quadrants(full.entropy, full.reverse_kl, response)
    for q in range(1, 5):
        assert line[f"q{q}_share"] == pytest.approx(float((quadrant[response] == q).double().mean()))
        assert line[f"q{q}_share_kept"] == pytest.approx(float((quadrant[kept] == q).double().mean()))
    assert 0 <= line["reward"] <= 1 and line["lr"] == pytest.approx(1e-3) and not line["skipped"]
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert config["rule"] == "q3" and config["steps"] == 1
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q3" / "final").config.hidden_size == 32


def test_ten_skipped_steps_in_a_row_save_and_stop(pair_and_prompts, tmp_path, monkeypatch):
    real_stats = train.score.chunked_token_stats
    monkeypatch.setattr(train.score, "chunked_token_stats", lambda *a, **k: real_stats(*a, **k)._replace(
        entropy=torch.full_like(real_stats(*a, **k).entropy, float("inf"))))
    with pytest.raises(SystemExit, match="10 steps in a row were skipped") as stopped:
        train.main(cli(pair_and_prompts, tmp_path, "nan", "--steps", "20", "--max-response-len", "2"))
    assert "--resume --run-name nan" in str(stopped.value)
    assert [p.name for p in (tmp_path / "nan").glob("checkpoint-*")] == ["checkpoint-000010"]
    assert all(line["skipped"] for line in comparable(tmp_path / "nan" / "metrics.jsonl"))


def test_the_sampled_rules_draw_anew_each_step(pair_and_prompts, tmp_path, monkeypatch):
    """A sampled rule's draws (random, entropy) come from the step's own seed, the seed its rollouts are drawn
    with, distinct per step and rank: never one stream replayed every step."""
    seeds, real_step = [], train.train_step

    def recording_step(*args, **kwargs):
        seeds.append((args[5], args[6].initial_seed()))
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    train.main(cli(pair_and_prompts, tmp_path, "random", "--rule", "random", "--steps", "3"))
    config = tip.Config(seed=3)
    assert seeds == [(step, train.sampling_seed(step, config)) for step in range(3)]
    assert len({seed for _, seed in seeds}) == 3


def test_the_skip_counter_restarts_after_a_step_that_trains(pair_and_prompts, tmp_path, monkeypatch):
    """Nine skipped steps, one that trains, nine more skipped: never ten in a row, so the run finishes."""
    real_stats, real_step, step_now = train.score.chunked_token_stats, train.train_step, []

    def step_recorded(*args, **kwargs):
        step_now[:] = [args[5]]
        return real_step(*args, **kwargs)

    def infinite_unless_every_tenth(*args, **kwargs):
        stats = real_stats(*args, **kwargs)
        return stats if step_now[0] % 10 == 9 else stats._replace(entropy=torch.full_like(stats.entropy, math.inf))
    monkeypatch.setattr(train, "train_step", step_recorded)
    monkeypatch.setattr(train.score, "chunked_token_stats", infinite_unless_every_tenth)
    train.main(cli(pair_and_prompts, tmp_path, "gaps", "--steps", "20", "--max-response-len", "2"))
    skipped = [bool(line["skipped"]) for line in comparable(tmp_path / "gaps" / "metrics.jsonl")]
    assert skipped == ([True] * 9 + [False]) * 2 and (tmp_path / "gaps" / "final").exists()


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_four_ranks_two_prompts_a_nan_on_one_rank_and_a_sigterm_on_another(pair_and_prompts, tmp_path, sharding):
    """4 processes share 2 prompts × 4 rollouts; rank 1's scores are NaN at step 1 only; the reward is global. Every rank skips step 1
    (the weights do not move), nobody hangs, and step 2 trains. SIGTERM reaches rank 2 alone during step 2 of 3:
    every rank stops after step 2, with its checkpoint, and the run exits cleanly. Under FSDP2 the skipped step
    (forwards without a backward) is followed by a checkpoint, and the run then resumes on 2 processes."""
    tensorboard = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    args = cli(pair_and_prompts, tmp_path, "ranks", "--steps", "3", "--rollouts-per-prompt", "4", "--save-every", "1",
               *sharding, *tensorboard)
    result = torchrun(4, str(ROOT / "tests" / "train_worker.py"), str(tmp_path), "nan_on_rank_1", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = sorted((tmp_path / "ranks" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == (1 if tensorboard else 0)  # rank 0 alone opens the trackers
    assert "stopped after step 2" in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "ranks").glob("checkpoint-*")) == [
        "checkpoint-000001", "checkpoint-000002"] and not (tmp_path / "ranks" / "final").exists()
    first, second = comparable(tmp_path / "ranks" / "metrics.jsonl")
    assert first["skipped"].endswith("non-finite token scores") and not second["skipped"]
    assert second["kept_tokens"] > 0 and second["response_tokens"] <= 2 * 4 * 6
    # the reward is the mean over every graded rollout of every rank: ranks 0-2 grade 2 rollouts, rank 3 one
    assert first["reward"] == second["reward"] == pytest.approx((2 * (0 + 1 + 2) + 3) / 7, rel=1e-12)
    from safetensors.torch import load_file
    start = load_file(pair_and_prompts / "student" / "model.safetensors")
    after = [checkpoint_weights(tmp_path / "ranks" / f"checkpoint-00000{s}") for s in (1, 2)]
    assert all((tmp_path / "ranks" / f"checkpoint-00000{s}" / ("sharded" if sharding else "model")).is_dir()
               for s in (1, 2))
    assert all(torch.equal(after[0][name], start[name]) for name in start)
    assert not all(torch.equal(after[1][name], start[name]) for name in start)
    if sharding:
        resumed = torchrun(2, str(ROOT / "train.py"), *args, "--resume")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        # 4 saved random states do not map onto 2 processes: none is restored, and the log says so
        assert "saved by 4 processes, not 2: the random state is not restored" in resumed.stdout
        assert [line["step"] for line in comparable(tmp_path / "ranks" / "metrics.jsonl")] == [1, 2, 3]
        assert len(list((tmp_path / "ranks" / "tensorboard").glob("events.out.tfevents.*"))) == (
            2 if tensorboard else 0)  # and rank 0 of the resumed run
        final = load_file(tmp_path / "ranks" / "final" / "model.safetensors")
        assert final.keys() == start.keys() and not all(torch.equal(final[n], after[1][n]) for n in start)


def checkpoint_weights(folder) -> dict:
    """The student's weights in a checkpoint, read by transformers' format (safetensors) or by torch's own reader
    of a sharded one."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    if (folder / "model").is_dir():
        return load_file(folder / "model" / "model.safetensors")
    dcp_to_torch_save(folder / "sharded", folder.parent / f"{folder.name}.pt")
    return torch.load(folder.parent / f"{folder.name}.pt")["model"]


def test_bad_flags_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    for argv, message in ((["--rule", "nope"], "valid rules"), (["--ratio", "1.5"], "outside (0, 1]"),
                          (["--teacher", "t", "--student", "s"], "--prompts is required"),
                          (["--resume"], "needs --run-name"),
                          (["--resume", "--run-name", "x", "--out-dir", str(tmp_path)], "no complete checkpoint"),
                          (["--chat-template-kwargs", "enable_thinking"], "is not a JSON object")):
        with pytest.raises(SystemExit):
            train.parse_config(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--fsdp"])
    assert "--fsdp shards over processes: launch with torchrun" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on the core install
    with pytest.raises(SystemExit):
        train.parse_config(["--engine", "vllm"])
    assert "pip install -r requirements-vllm.txt" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    # shares that make different numbers of micro-batches are fine: the ranks with fewer run empty ones
    train.parse_config(["--fsdp", "--prompts-per-step", "1", "--rollouts-per-prompt", "7", "--micro-batch-size", "1"])
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "9")
    with pytest.raises(SystemExit):
        train.parse_config(["--prompts-per-step", "2", "--rollouts-per-prompt", "4"])
    assert "9 processes but only 2 prompts x 4 rollouts = 8 rollouts per step" in capsys.readouterr().err


def test_too_few_prompts_for_the_processes_is_an_input_error(pair_and_prompts, tmp_path, monkeypatch):
    """12 prompts × 2 rollouts, but --prompts-per-step 1 gives a step 2 rollouts: 3 processes cannot share them."""
    monkeypatch.setattr(tip, "world_size", lambda: 3)
    with pytest.raises(SystemExit, match="cannot give each of 3 processes a rollout"):
        train.main(cli(pair_and_prompts, tmp_path, "few", "--prompts-per-step", "1"))


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_users_mistake_prints_one_line_once(tmp_path, launcher):
    args = ["train.py", "--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student"),
            "--prompts", "p.jsonl"]
    if launcher == "python":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
    else:
        result = torchrun(2, *args)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # torchrun adds its own report of the failed processes; no traceback comes from the project's code
    assert result.returncode != 0 and "InputError" not in result.stderr and "train.py\", line" not in result.stderr
    assert launcher == "torchrun" or "Traceback" not in result.stderr
    assert lines == [f"error: teacher path {str(tmp_path / 'no-teacher')!r} does not exist (or is not a folder)"]


def test_toy_main_job_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """`python train.py` with no model flags: the toy preset on the toy pair (a miniature world here, built in
    seconds instead of the real one's minutes), held-out accuracy before and after, a final checkpoint."""
    from worlds import toy

    recipe = toy.ToyRecipe(train_problems=40, test_problems=8, trigger_problems=8, teacher_hidden=32,
                           teacher_layers=1, teacher_steps=3, student_hidden=32, student_layers=1, student_steps=3,
                           batch_size=8)
    world = toy.toy_world(tmp_path / "cache", recipe=recipe, log=lambda *args: None)
    monkeypatch.setattr(toy, "toy_world", lambda *args, **kwargs: world)
    train.main(["--steps", "2", "--eval-problems", "4", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
                "--eval-every", "2", "--out-dir", str(tmp_path), "--run-name", "toy"])
    out = capsys.readouterr().out
    assert "held-out accuracy before training" in out and "held-out accuracy after training" in out
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["prompts"] == "toy" and config["lr"] == tip.PRESETS["toy"]["lr"]
    before, *lines, after = comparable(tmp_path / "toy" / "metrics.jsonl")
    assert len(lines) == 2 and all("mistake_tokens" in line for line in lines)
    assert "held_out_accuracy" not in lines[0] and 0 <= lines[1]["held_out_accuracy"] <= 1
    assert before.keys() == after.keys() == {"step", "held_out_accuracy"} and (before["step"], after["step"]) == (0, 2)
    assert (tmp_path / "toy" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("max_norm", [1e-3, 1e6, 0.0])
def test_gradient_norm_and_clip_are_torchs(max_norm):
    """The logged norm and the clipped gradients are torch.nn.utils.clip_grad_norm_'s (0 = no clipping)."""
    _, student = make_pair()
    generator = torch.Generator().manual_seed(3)
    for p in student.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    reference = copy.deepcopy(student)
    for p, q in zip(student.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm or float("inf"))
    norm = train.sync_and_clip_gradients(student, max_norm)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
    assert (max_norm == 1e-3) == (sum(p.grad.pow(2).sum() for p in student.parameters()).sqrt() < 2e-3)


class _RunsCode:
    def __reduce__(self):  # unpickling this calls os.system
        return os.system, ("touch ran-code",)


def test_a_checkpoint_is_read_back_by_transformers_and_runs_no_code(pair_and_prompts, tmp_path, monkeypatch):
    """A checkpoint's model folder is a plain from_pretrained folder with the trained weights; resuming reads
    tensors and plain containers only: a state.pt that would run code when unpickled is refused."""
    import pickle

    import checkpoint
    from transformers import AutoModelForCausalLM
    train.main(cli(pair_and_prompts, tmp_path, "run", "--steps", "1"))
    saved = checkpoint.newest_checkpoint(tmp_path / "run")
    student = AutoModelForCausalLM.from_pretrained(saved / "model")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    for (name, a), b in zip(student.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name
    optimizer = torch.optim.AdamW(student.parameters())
    assert checkpoint.resume_from(saved, student, optimizer) == 1 and optimizer.state
    state = torch.load(saved / "state.pt", weights_only=True)
    torch.save({**state, "payload": _RunsCode()}, saved / "state.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.resume_from(saved, student, optimizer)
    assert not (tmp_path / "ran-code").exists()
