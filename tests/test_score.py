"""score.py against the plain float64 formulas of Eqs. 1–3, chunked against unchunked, and its memory bound."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import score

torch.manual_seed(0)


def logits_with_peaked_and_flat_rows(n, v, dtype=torch.float64, seed=0):
    """Rows from nearly uniform (scale 0.01) to nearly one-hot (scale 30)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, math.log10(30), n, dtype=torch.float64)[:, None]
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scales).to(dtype)


def plain_stats(student_logits, teacher_logits):
    """Eqs. 2–3 written out in float64: p = softmax, H = -Σ p log p, KL(p‖q) = Σ p (log p - log q)."""
    s, t = student_logits.double(), teacher_logits.double()
    p_s = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    p_t = torch.exp(t) / torch.exp(t).sum(-1, keepdim=True)
    log_p_s, log_p_t = torch.log(p_s), torch.log(p_t)
    return (-(p_s * log_p_s).sum(-1), (p_s * (log_p_s - log_p_t)).sum(-1), (p_t * (log_p_t - log_p_s)).sum(-1))


def plain_divergence(student_logits, teacher_logits, divergence, beta=0.5):
    """Per-row loss in float64 from softmaxes, for autograd to differentiate."""
    log_p_s, log_p_t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if divergence == "reverse_kl":
        return (p_s * (log_p_s - log_p_t)).sum(-1)
    if divergence == "forward_kl":
        return (p_t * (log_p_t - log_p_s)).sum(-1)
    if beta == 0.0:
        return (p_t * (log_p_t - log_p_s)).sum(-1)
    if beta == 1.0:
        return (p_s * (log_p_s - log_p_t)).sum(-1)
    log_m = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * (p_t * (log_p_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_p_s - log_m)).sum(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
def test_token_stats_match_float64_formula(dtype, tol):
    student = logits_with_peaked_and_flat_rows(64, 300, dtype, seed=1)
    teacher = logits_with_peaked_and_flat_rows(64, 300, dtype, seed=2).flip(0)
    stats = score.token_stats(student, teacher)
    for got, want in zip(stats, plain_stats(student, teacher)):  # the reference sees the same rounded inputs
        assert got.dtype == torch.float32 and got.shape == (64,)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_uniform_row_has_entropy_ln_v_and_identical_rows_have_zero_divergence():
    v = 1000
    for dtype, ulps in ((torch.float32, 4), (torch.float64, 4)):  # a sum of V terms: a few roundings
        stats = score.token_stats(torch.zeros(3, v, dtype=dtype), torch.zeros(3, v, dtype=dtype))
        assert torch.all((stats.entropy.double() - math.log(v)).abs() <= ulps * torch.finfo(dtype).eps * math.log(v))
        assert torch.all(stats.reverse_kl == 0) and torch.all(stats.forward_kl == 0)
    torch.testing.assert_close(score.normalized_entropy(stats.entropy, v), torch.ones(3, dtype=torch.float64))
    logits = logits_with_peaked_and_flat_rows(16, 200, torch.float32)
    same = score.token_stats(logits, logits.clone())
    assert torch.all(same.reverse_kl == 0) and torch.all(same.forward_kl == 0)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5),
                                             ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.1)])
def test_divergence_value_and_logit_gradient_match_autograd(divergence, beta):
    student = logits_with_peaked_and_flat_rows(24, 80, seed=3).requires_grad_()
    teacher = logits_with_peaked_and_flat_rows(24, 80, seed=4)
    want = plain_divergence(student, teacher, divergence, beta)
    want_grad, = torch.autograd.grad(want.sum(), student)
    value, grad = score.divergence_and_grad(student.detach(), teacher, divergence, beta)
    torch.testing.assert_close(value, want.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-10)


def test_jsd_endpoints_are_the_two_kls():
    student, teacher = logits_with_peaked_and_flat_rows(8, 50, seed=5), logits_with_peaked_and_flat_rows(8, 50, seed=6)
    forward, _ = score.divergence_and_grad(student, teacher, "forward_kl")
    reverse, _ = score.divergence_and_grad(student, teacher, "reverse_kl")
    assert torch.equal(score.divergence_and_grad(student, teacher, "jsd", 0.0)[0], forward)
    assert torch.equal(score.divergence_and_grad(student, teacher, "jsd", 1.0)[0], reverse)
    # and the interior approaches them: JSD(β)/β → forward KL as β → 0 (GKD); moderate rows, where the
    # O(β²) remainder, which grows with (p_t/p_s)², is already negligible at this β
    student, teacher = torch.randn(8, 50, dtype=torch.float64), torch.randn(8, 50, dtype=torch.float64)
    forward, _ = score.divergence_and_grad(student, teacher, "forward_kl")
    small, _ = score.divergence_and_grad(student, teacher, "jsd", 1e-6)
    torch.testing.assert_close(small / 1e-6, forward, rtol=1e-3, atol=1e-6)


def random_rows(n, d_s=12, d_t=20, v_s=97, v_t=97, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    return make(n, d_s), make(v_s, d_s, s=0.7), make(n, d_t), make(v_t, d_t, s=0.7)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_stats_equal_full_logits(chunk_size):
    hs, ws, ht, wt = random_rows(45, dtype=torch.float32)
    chunked = score.chunked_token_stats(hs, ws, ht, wt, chunk_size=chunk_size)
    full = score.token_stats(hs @ ws.T, ht @ wt.T)
    for got, want in zip(chunked, full):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_and_gradients_equal_plain_autograd(divergence, beta, chunk_size, reduction):
    hs, ws, ht, wt = random_rows(45)
    hs.requires_grad_(), ws.requires_grad_()
    loss = score.distillation_loss(hs, ws, ht, wt, chunk_size=chunk_size, reduction=reduction,
                                   divergence=divergence, jsd_beta=beta)
    got = torch.autograd.grad(loss, [hs, ws])
    per_row = plain_divergence(hs @ ws.T, ht @ wt.T, divergence, beta)
    want_loss = per_row.mean() if reduction == "mean" else per_row.sum()
    want = torch.autograd.grad(want_loss, [hs, ws])
    torch.testing.assert_close(loss, want_loss, atol=1e-12, rtol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_fp32_loss_gradients_within_1e5_of_float64():
    hs, ws, ht, wt = random_rows(33)
    hs32, ws32 = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss = score.reverse_kl_loss(hs32, ws32, ht.float(), wt.float(), chunk_size=8)
    got = torch.autograd.grad(loss, [hs32, ws32])
    hs.requires_grad_(), ws.requires_grad_()
    want_loss = plain_divergence(hs @ ws.T, ht @ wt.T, "reverse_kl").mean()
    want = torch.autograd.grad(want_loss, [hs, ws])
    assert abs(loss.item() - want_loss.item()) < 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4)


def test_bf16_loss_is_close_to_float64_and_returns_bf16_gradients():
    hs, ws, ht, wt = random_rows(40)
    bf = [x.bfloat16() for x in (hs, ws, ht, wt)]
    bf[0].requires_grad_(), bf[1].requires_grad_()
    loss = score.reverse_kl_loss(*bf, chunk_size=16)
    loss.backward()
    want = plain_divergence(hs @ ws.T, ht @ wt.T, "reverse_kl").mean()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 0.03 * want.item()
    assert bf[0].grad.dtype == torch.bfloat16 and bf[1].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_bf16_autocast_with_fp32_weights_matches_float64_autograd(divergence):
    """train.py's GPU precision: fp32 master weights under bf16 autocast, so the matmuls run in bf16 while the
    head's gradient accumulates in fp32. torch.autocast("cpu") takes the same branch of the chunked loss."""
    hs, ws, ht, wt = random_rows(40, v_s=300, v_t=300)
    hs32, ws32 = hs.float().requires_grad_(), ws.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = score.distillation_loss(hs32, ws32, ht.float(), wt.float(), chunk_size=16, divergence=divergence)
    got = torch.autograd.grad(loss, [hs32, ws32])
    assert loss.dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.float32
    # the reference sees the inputs the bf16 matmuls see
    rounded = [x.bfloat16().double() for x in (hs, ws, ht, wt)]
    rounded[0].requires_grad_(), rounded[1].requires_grad_()
    want_loss = plain_divergence(rounded[0] @ rounded[1].T, rounded[2] @ rounded[3].T, divergence).mean()
    want = torch.autograd.grad(want_loss, rounded[:2])
    assert loss.item() == pytest.approx(want_loss.item(), rel=2e-2)
    for g, w in zip(got, want):  # bf16 keeps 8 bits of mantissa: a few 1e-3 of each gradient's scale
        torch.testing.assert_close(g.double(), w, atol=2e-2 * w.abs().max().item(), rtol=0)


def test_student_equal_teacher_gives_zero_loss_and_zero_gradient():
    hs, ws, _, _ = random_rows(20)
    hs.requires_grad_(), ws.requires_grad_()
    stats = score.chunked_token_stats(hs, ws, hs.detach(), ws.detach(), chunk_size=6)
    assert torch.all(stats.reverse_kl.abs() < 1e-12) and torch.all(stats.forward_kl.abs() < 1e-12)
    for divergence in score.DIVERGENCES:
        loss = score.distillation_loss(hs, ws, hs.detach(), ws.detach(), chunk_size=6, divergence=divergence)
        grads = torch.autograd.grad(loss, [hs, ws])
        assert abs(loss.item()) < 1e-12
        assert all(g.abs().max() < 1e-12 for g in grads)


def test_different_head_widths_equal_explicitly_sliced_heads():
    hs, ws, ht, wt = random_rows(30, v_s=90, v_t=97)  # teacher head wider, as Qwen2.5-14B vs 1.5B
    stats = score.chunked_token_stats(hs, ws, ht, wt, chunk_size=8)
    sliced = score.chunked_token_stats(hs, ws, ht, wt[:90], chunk_size=8)
    for a, b in zip(stats, sliced):
        assert torch.equal(a, b)
    ws.requires_grad_()
    loss = score.reverse_kl_loss(hs, ws, ht, wt, chunk_size=8)
    sliced_ws = ws.detach().clone().requires_grad_()
    want = score.reverse_kl_loss(hs, sliced_ws, ht, wt[:90].clone(), chunk_size=8)
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, ws)[0], torch.autograd.grad(want, sliced_ws)[0])
    # the student head wider than the teacher: its extra rows get zero gradient
    wide = torch.cat([ws.detach(), torch.randn(7, ws.shape[1], dtype=ws.dtype)]).requires_grad_()
    grad, = torch.autograd.grad(score.reverse_kl_loss(hs, wide, ht, wt, chunk_size=8), wide)
    assert torch.all(grad[97:] == 0) and grad[:90].abs().sum() > 0
    # logits of different widths in token_stats too
    full = score.token_stats(hs @ ws.detach().T, ht @ wt.T)
    torch.testing.assert_close(full.reverse_kl, stats.reverse_kl)


def test_zero_rows_give_zero_loss_that_backpropagates():
    _, ws, _, wt = random_rows(1)
    hs = torch.zeros(0, ws.shape[1], dtype=ws.dtype, requires_grad=True)
    ws.requires_grad_()
    for reduction in ("mean", "sum"):
        loss = score.reverse_kl_loss(hs, ws, torch.zeros(0, wt.shape[1], dtype=wt.dtype), wt, reduction=reduction)
        grad_hidden, grad_head = torch.autograd.grad(loss, [hs, ws])
        assert loss.item() == 0 and grad_hidden.shape == (0, ws.shape[1]) and torch.all(grad_head == 0)
    stats = score.chunked_token_stats(hs.detach(), ws.detach(), torch.zeros(0, wt.shape[1]), wt)
    assert all(s.shape == (0,) for s in stats)


def test_bad_arguments_are_clear_errors():
    hs, ws, ht, wt = random_rows(4)
    with pytest.raises(ValueError, match="reduction"):
        score.reverse_kl_loss(hs, ws, ht, wt, reduction="none")
    with pytest.raises(ValueError, match="unknown divergence"):
        score.distillation_loss(hs, ws, ht, wt, divergence="tvd")
    with pytest.raises(ValueError, match="rows"):
        score.reverse_kl_loss(hs, ws, ht[:3], wt)
    with pytest.raises(ValueError, match="hidden size"):
        score.reverse_kl_loss(hs, ws[:, :5], ht, wt)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        score.chunked_token_stats(hs[None], ws, ht[None], wt)
    with pytest.raises(ValueError, match="jsd_beta"):
        score.distillation_loss(hs, ws, ht, wt, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        score.distillation_loss(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="every dim but the vocabulary"):
        score.token_stats(torch.zeros(3, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="unknown divergence"):
        score.divergence_and_grad(torch.zeros(3, 5), torch.zeros(3, 5), "tvd")


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_chunk_by_vocab_is_created_or_saved():
    n, d, v, chunk = 256, 16, 1024, 32  # d < chunk, so the [V, d] head gradient is below chunk × V too
    hs, ws, ht, wt = random_rows(n, d_s=d, d_t=d, v_s=v, v_t=v, dtype=torch.float32)
    hs.requires_grad_(), ws.requires_grad_()
    saved = []
    with LargestTensor() as created, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        score.reverse_kl_loss(hs, ws, ht, wt, chunk_size=chunk).backward()
    assert created.largest <= chunk * v
    assert max(saved) <= max(n * d, v * d)  # only the per-row and per-head gradients outlive a chunk
    # the same probe sees the naive version's [N, V] logits, so the bound above can fail
    with LargestTensor() as naive:
        plain_divergence(hs @ ws.T, ht @ wt.T, "reverse_kl").mean().backward()
    assert naive.largest >= n * v
