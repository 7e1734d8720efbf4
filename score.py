"""Per-token signals and the distillation loss of TIP (paper §3–4: Eqs. 1, 2, 3 and 9).

`token_stats` is the plain definition: from full logits, H(P_S) (Eq. 2 before the division by ln|V|),
δ_t = KL(P_S ‖ P_T) (Eq. 3, the per-token loss of Eq. 1) and KL(P_T ‖ P_S) (the Q3-only rule's signal).
`chunked_token_stats` and `distillation_loss` are its fast twins for training: they take final hidden states and
LM-head weights and never hold more than `chunk_size` rows of [rows, V] logits, in forward or backward (at
Qwen3's 151,936 tokens one fp32 row is 0.6 MB). Heads of different widths use the shared first rows
(docs/decisions.md, "Head widths"). Public functions depend only on torch and their arguments.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


class TokenStats(NamedTuple):
    """Per-token signals, each shaped like the logits without their last dim, fp32, in nats."""

    entropy: torch.Tensor  # H(P_S), Eq. 2 before the division by ln |V|
    reverse_kl: torch.Tensor  # KL(P_S ‖ P_T), Eq. 3
    forward_kl: torch.Tensor  # KL(P_T ‖ P_S)


def normalized_entropy(entropy: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Eq. 2: h_t = H(P_S) / ln |V| ∈ [0, 1]. With heads of different width, |V| is the shared width."""
    return entropy / math.log(vocab_size)


def _shared_vocab(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut both tensors to the shared first min(V_s, V_t) vocabulary entries along `dim` (views, no copy)."""
    width = min(student.shape[dim], teacher.shape[dim])
    return student.narrow(dim, 0, width), teacher.narrow(dim, 0, width)


def token_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> TokenStats:
    """Entropy (Eq. 2 numerator), reverse KL (Eq. 3) and forward KL from full logits, over the last dim: the
    formulas as written, in fp32 (float64 stays float64). Logits of different width are cut to the shared width.
    The fast paths below equal it (tests/test_score.py: test_chunked_stats_equal_full_logits)."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must agree on every dim but the vocabulary")
    student_logits, teacher_logits = _shared_vocab(student_logits, teacher_logits, dim=-1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s, log_p_t = student_logits.to(dtype).log_softmax(-1), teacher_logits.to(dtype).log_softmax(-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    entropy = -(p_s * log_p_s).sum(-1)  # H(P_S) = -Σ_v P_S(v) log P_S(v)
    reverse_kl = (p_s * (log_p_s - log_p_t)).sum(-1)  # δ_t = Σ_v P_S(v) (log P_S(v) − log P_T(v))
    forward_kl = (p_t * (log_p_t - log_p_s)).sum(-1)
    return TokenStats(entropy, reverse_kl, forward_kl)


# --- the fast twins: the same numbers from hidden states and head weights, chunk by chunk, in place ---

def _owned_float(x: torch.Tensor, copy: bool) -> torch.Tensor:
    """x in at least fp32 (float64 stays), as a buffer the caller may overwrite: bf16/fp16 always become a
    new fp32 tensor; an fp32 input is copied only when `copy` (it belongs to someone else)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype, copy=copy)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the vocabulary, in place: no second [rows, V] buffer, and on a CPU a fresh buffer
    costs more in page faults than the kernel itself."""
    return torch.log_softmax(logits, dim=-1, out=logits)


def _token_stats_(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> TokenStats:
    """`token_stats` on [rows, V] fp32 buffers it overwrites, with three [rows, V] tensors at most (on a CPU a
    fresh buffer costs more in page faults than the kernel itself).

    Each Σ_v is a product written into a buffer that is no longer needed, then `.sum` (pairwise summation:
    a dot product by matmul accumulates sequentially and is off by ~1e-2 nats at V = 151,936).
    """
    log_p_s, log_p_t = _log_softmax_(student_logits), _log_softmax_(teacher_logits)
    spare = log_p_t.exp()  # P_T
    neg_log_ratio = log_p_t.sub_(log_p_s)  # log P_T − log P_S, in the teacher's buffer
    forward_kl = spare.mul_(neg_log_ratio).sum(-1)
    p_s = torch.exp(log_p_s, out=spare)
    entropy = -log_p_s.mul_(p_s).sum(-1)
    reverse_kl = -neg_log_ratio.mul_(p_s).sum(-1)
    return TokenStats(entropy, reverse_kl, forward_kl)


def _check_rows(student_hidden, student_head, teacher_hidden, teacher_head) -> None:
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("hidden states must be [N, d]: select the scored rows first "
                         "(e.g. hidden[:, :-1][response_mask[:, 1:]])")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} rows but teacher has {teacher_hidden.shape[0]}: "
                         "both must hold the same token positions")
    for who, hidden, head in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if head.dim() != 2 or head.shape[1] != hidden.shape[1]:
            raise ValueError(f"{who} head {tuple(head.shape)} does not match hidden size {hidden.shape[1]}: "
                             "pass the LM head weight [V, d] (model.get_output_embeddings().weight)")


def _chunk_logits(hidden: torch.Tensor, head: torch.Tensor, start: int, chunk_size: int) -> torch.Tensor:
    """Logits of rows start:start+chunk_size in the head's dtype, returned as an fp32 buffer to overwrite."""
    return _owned_float(hidden[start:start + chunk_size].to(head.dtype) @ head.T, copy=False)


@torch.no_grad()
def chunked_token_stats(student_hidden: torch.Tensor, student_head: torch.Tensor,
                        teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                        chunk_size: int = 512) -> TokenStats:
    """`token_stats(hidden @ headᵀ, …)` for N rows of final hidden states ([N, d_s], [N, d_t]) and LM heads
    ([V_s, d_s], [V_t, d_t]), never holding more than `chunk_size` rows of logits. Eqs. 2–3; no grad. Logits are
    computed in the heads' dtype (bf16 tensor cores on GPU), then everything else in fp32. Equal to
    `token_stats`: tests/test_score.py, test_chunked_stats_equal_full_logits.

    Logits are hidden @ headᵀ: a head with a bias, a logit scale or a final softcap must be refused by the caller
    (pair.check_head does; docs/decisions.md, "Logits from hidden states"), not silently mis-scored here.
    """
    _check_rows(student_hidden, student_head, teacher_hidden, teacher_head)
    student_head, teacher_head = _shared_vocab(student_head, teacher_head, dim=0)
    pieces = [_token_stats_(_chunk_logits(student_hidden, student_head, i, chunk_size),
                            _chunk_logits(teacher_hidden, teacher_head, i, chunk_size))
              for i in range(0, student_hidden.shape[0], chunk_size)]
    if not pieces:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return TokenStats(empty, empty, empty)
    return TokenStats(*(torch.cat(column) for column in zip(*pieces)))


def divergence_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        divergence: str = "reverse_kl", jsd_beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence D(z) and its gradient ∂D/∂z with respect to the student logits z ([rows, V]), in fp32.

    For any D that is a function of p = softmax(z) with u = ∂D/∂p, the chain rule through the softmax gives
    ∂D/∂z = p ⊙ (u − ⟨p, u⟩). Hence:
      reverse_kl  KL(P_S‖P_T) (Eqs. 1/9):  u = log p_s − log p_t + 1   ⇒  ∂/∂z = p_s ⊙ (log p_s − log p_t − KL)
      forward_kl  KL(P_T‖P_S):             ∂/∂z = p_s − p_t
      jsd         β KL(P_T‖M) + (1−β) KL(P_S‖M), M = β P_T + (1−β) P_S (GKD; β=0 forward, β=1 reverse):
                  u = (1−β)(log p_s − log m)  ⇒  ∂/∂z = p_s ⊙ (u − ⟨p_s, u⟩)
    """
    return _divergence_and_grad_(_owned_float(student_logits, copy=True), _owned_float(teacher_logits, copy=True),
                                 divergence, jsd_beta)


def _divergence_and_grad_(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str,
                          jsd_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`divergence_and_grad` on fp32 buffers it overwrites: two [rows, V] tensors live for reverse KL,
    three for forward KL; JSD is written plainly."""
    if divergence == "jsd" and jsd_beta in (0.0, 1.0):  # the endpoints are exactly the two KLs
        divergence = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"
    log_p_s, log_p_t = _log_softmax_(student_logits), _log_softmax_(teacher_logits)
    if divergence == "reverse_kl":
        log_ratio = torch.sub(log_p_s, log_p_t, out=log_p_t)
        p_s = log_p_s.exp_()
        value = log_ratio.mul_(p_s).sum(-1)  # the buffer now holds p_s ⊙ log_ratio
        return value, log_ratio.addcmul_(p_s, -value[:, None])  # p_s ⊙ (log_ratio − KL)
    if divergence == "forward_kl":
        p_t = log_p_t.exp()
        value = log_p_t.sub_(log_p_s).mul_(p_t).sum(-1)
        return value, log_p_s.exp_().sub_(p_t)
    if divergence == "jsd":
        beta = jsd_beta
        log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
        teacher_part = beta * (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
        u = (1 - beta) * (log_p_s - log_m)
        p_s = log_p_s.exp_()
        student_part = (p_s * u).sum(-1)
        return teacher_part + student_part, u.sub_(student_part[:, None]).mul_(p_s)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over rows of a divergence, with each chunk's gradient computed in forward (as Liger's fused
    linear losses do): forward keeps only grad_hidden [N, d_s] and grad_head [V, d_s], so no [rows, V]
    tensor outlives its chunk and memory grows with chunk × V, not with the number of tokens. Backward only
    scales them, in place: the graph cannot be retained for a second backward (autograd says so if tried).
    """

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, chunk_size, divergence, jsd_beta):
        device = student_hidden.device
        # Matmuls run in the compute dtype: autocast's when it is on (fp32 master weights, bf16 compute),
        # else the head's. Gradients accumulate in fp32 for an fp32 head; a bf16 head gets a bf16 gradient,
        # accumulated in place, so no [V, d] temporary is made per chunk.
        autocast = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if autocast else student_head.dtype
        with torch.autocast(device.type, enabled=False):
            head = student_head.to(compute)
            teacher = teacher_head.to(torch.get_autocast_dtype(device.type) if compute != student_head.dtype
                                      else teacher_head.dtype)
            total = torch.zeros((), dtype=torch.float64, device=device)  # sums over many chunks
            grad_hidden = torch.empty(student_hidden.shape, dtype=torch.promote_types(compute, torch.float32),
                                      device=device) if ctx.needs_input_grad[0] else None
            grad_head = torch.zeros(student_head.shape, dtype=student_head.dtype, device=device) \
                if ctx.needs_input_grad[1] else None
            # an fp32 head under bf16 compute: each chunk's product lands in one bf16 buffer of this call and is
            # added to the fp32 sum from there (no [V, d] temporary per chunk)
            chunk_grad_head = torch.empty(student_head.shape, dtype=compute, device=device) \
                if grad_head is not None and grad_head.dtype != compute else None
            for i in range(0, student_hidden.shape[0], chunk_size):
                rows = student_hidden[i:i + chunk_size].to(compute)
                value, grad_logits = _divergence_and_grad_(_chunk_logits(rows, head, 0, chunk_size),
                                                           _chunk_logits(teacher_hidden[i:i + chunk_size], teacher,
                                                                         0, chunk_size), divergence, jsd_beta)
                total += value.sum()
                grad_logits = grad_logits.to(compute)
                if grad_hidden is not None:
                    torch.mm(grad_logits, head, out=grad_hidden[i:i + chunk_size]) \
                        if grad_hidden.dtype == compute else grad_hidden[i:i + chunk_size].copy_(grad_logits @ head)
                if grad_head is not None:
                    if chunk_grad_head is None:
                        grad_head.addmm_(grad_logits.T, rows)
                    else:
                        grad_head += torch.mm(grad_logits.T, rows, out=chunk_grad_head)
                del grad_logits  # before the next chunk's logits exist
        ctx.save_for_backward(grad_hidden, grad_head)
        return total.to(torch.promote_types(compute, torch.float32))

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_head = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden.mul_(grad_total)
        grad_head = None if grad_head is None else grad_head.mul_(grad_total)
        return grad_hidden, grad_head, None, None, None, None, None


def distillation_loss(student_hidden: torch.Tensor, student_head: torch.Tensor,
                      teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                      chunk_size: int = 512, reduction: str = "mean",
                      divergence: str = "reverse_kl", jsd_beta: float = 0.5) -> torch.Tensor:
    """Mean (or sum) over N rows of a divergence between student and teacher next-token distributions.

    `divergence="reverse_kl"` is the paper's loss, KL(P_S‖P_T) (Eq. 1 over all response tokens, Eq. 9
    over the kept set T); "forward_kl" and "jsd" (GKD's generalized JSD, `jsd_beta`) are offered because
    users of this field switch between them. Differentiable with respect to `student_hidden` and
    `student_head`; forward and backward hold at most `chunk_size` rows of [rows, V] tensors.
    `reduction="sum"` lets a training loop divide by a global token count (docs/decisions.md, "Loss
    normalization"). N = 0 gives a zero loss whose gradients are zeros.

    The plain definition it equals, value and gradient: `token_stats(hidden @ headᵀ, …).reverse_kl.mean()` under
    autograd (tests/test_score.py, test_chunked_loss_and_gradients_equal_plain_autograd).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    _check_rows(student_hidden, student_head, teacher_hidden, teacher_head)
    student_head_shared, teacher_head = _shared_vocab(student_head, teacher_head, dim=0)
    total = _ChunkedDivergence.apply(student_hidden, student_head_shared, teacher_hidden.detach(),
                                     teacher_head.detach(), chunk_size, divergence, jsd_beta)
    return total / max(student_hidden.shape[0], 1) if reduction == "mean" else total


def reverse_kl_loss(student_hidden: torch.Tensor, student_head: torch.Tensor,
                    teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                    chunk_size: int = 512, reduction: str = "mean") -> torch.Tensor:
    """The paper's loss, KL(P_S ‖ P_T) averaged (or summed) over the given rows: Eq. 1, or Eq. 9 when the
    rows are the kept set T. Chunked as `distillation_loss`; its gradient with respect to the student
    logits is P_S ⊙ (log P_S − log P_T − KL)."""
    return distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head,
                             chunk_size=chunk_size, reduction=reduction, divergence="reverse_kl")
