"""Token importance and selection (paper §4–6): the two axes, the quadrant taxonomy and every selection rule.

Each response token has the student's entropy h_t (Eq. 2) and the divergence δ_t = KL(P_S ‖ P_T) (Eq. 3). Over
the global batch both are min-max scaled (`normalize`, §6); a rule keeps the top ⌊ρm⌋ tokens of each rollout by
its score (`select_tokens`, Eq. 8); the loss is the plain mean over the kept tokens (Eq. 9). The paper's rule,
`type_aware`, scores by the Soft-OR s = ĥ + δ̂ − ĥδ̂ (`soft_or`, Eq. 7). Depends on torch and the standard library
only. The file shares its name with the standard library's `select` and hands that module to anyone who imports
it by that name (docs/decisions.md, "The name select.py"). `python select.py` runs a demo on a random batch.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == "select":
    # `import select` reached this file ahead of the standard library. Load the real module from the rest of
    # sys.path: the import system hands the importer whatever sys.modules["select"] holds once this file has
    # run. torch must not be imported here: the import in flight may be torch's own (via subprocess).
    _here = Path(__file__).resolve().parent
    _path = [entry for entry in sys.path if Path(entry or ".").resolve() != _here]
    _spec = importlib.machinery.PathFinder.find_spec("select", _path)
    if _spec is None:
        raise ImportError(f"the standard library's select module was not found on sys.path outside {_here}")
    _standard_select = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_standard_select)
    sys.modules["select"] = _standard_select
else:
    import torch
    import torch.distributed as dist

ENTROPY_CLIP_QUANTILE = 0.98  # §6: h ← min(h, q_0.98(h)) before min-max scaling


def gather_uneven(values: torch.Tensor) -> torch.Tensor:
    """The 1-D `values` of every rank, concatenated in rank order; ranks may hold different counts.

    This is what makes the batch of §6 the global one (docs/decisions.md, "The global batch"): a few floats cross
    the ranks, never logits. Without an initialized process group it returns `values`. A collective: every
    rank must call it.
    """
    values = values.reshape(-1)
    if not (dist.is_available() and dist.is_initialized()):
        return values
    count = torch.tensor([values.numel()], device=values.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if max(counts) == 0:
        return values
    # all_gather moves equal shapes only: pad every rank to the longest, then cut each part back.
    padded = values.new_zeros(max(counts))
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) with its default linear interpolation, from a sort: torch.quantile refuses
    more than 2^24 elements, and a global batch of long rollouts has more (docs/decisions.md, "Order statistics")."""
    ordered = values.reshape(-1).sort().values
    position = q * (ordered.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.numel() - 1)
    return torch.lerp(ordered[below], ordered[above], position - below)


def normalize(values: torch.Tensor, valid_mask: torch.Tensor, clip_quantile: float | None = None) -> torch.Tensor:
    """§6: min-max scale `values` to [0, 1] over the valid tokens of the global batch; 0 off `valid_mask`.

    With `clip_quantile` the values are first capped at that quantile, so that one outlier cannot squash the
    rest: ĥ = minmax(min(h, q_0.98(h))); δ̂ = minmax(δ) has no clip. Under torch.distributed the valid values of
    every rank are gathered first (`gather_uneven`), so N ranks scale exactly as one process would on the whole
    batch; every rank must call it. All-equal values scale to 0 (docs/decisions.md, "Degenerate scaling").
    Min-max is scale-invariant: entropy in nats
    or divided by ln|V| (Eq. 2) gives the same ĥ.
    """
    if values.shape != valid_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and valid_mask {tuple(valid_mask.shape)} differ in shape")
    valid = valid_mask.bool()
    values = values.detach() if values.is_floating_point() else values.float()
    batch = gather_uneven(values[valid])
    scaled = torch.zeros_like(values)
    if batch.numel() == 0:
        return scaled
    if clip_quantile is not None:
        cap = quantile(batch, clip_quantile)
        batch, values = batch.clamp(max=cap), values.clamp(max=cap)
    low, high = batch.min(), batch.max()
    if high > low:
        scaled = torch.where(valid, (values - low) / (high - low), scaled)
    return scaled


def soft_or(h_hat: torch.Tensor, d_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 7, the Soft-OR score s = ĥ + δ̂ − ĥδ̂ = 1 − (1 − ĥ)(1 − δ̂): "high entropy or high divergence".

    Remark 1: Q1 ≈ 1, Q3 ≈ δ̂ > 0, Q4 ≈ 0, and the product term keeps Q1 from counting twice, so the score
    needs no tuning coefficient. Computed in the second form, which is exactly 1 at ĥ = 1 (where the clip puts
    the top 2 % of entropy), so those ties break by position, and is bitwise 1 − the Q4 membership.
    """
    return 1 - (1 - h_hat) * (1 - d_hat)


def quadrant_scores(h_hat: torch.Tensor, d_hat: torch.Tensor):
    """The soft quadrant memberships (Q1, Q2, Q3, Q4) = (ĥδ̂, ĥ(1−δ̂), (1−ĥ)δ̂, (1−ĥ)(1−δ̂)) of §4.

    The four sum to 1 at every token, and Soft-OR (Eq. 7) = 1 − the Q4 membership: type-aware selection
    keeps everything except what is solved.
    """
    return h_hat * d_hat, h_hat * (1 - d_hat), (1 - h_hat) * d_hat, (1 - h_hat) * (1 - d_hat)


def quadrants(h: torch.Tensor, d: torch.Tensor, valid_mask: torch.Tensor,
              h_split: float | None = None, d_split: float | None = None) -> torch.Tensor:
    """The hard quadrant of each token by the paper's numbering (§4), as an integer tensor shaped like `h`:
    1 high h / high δ, 2 high h / low δ, 3 low h / high δ (overconfident), 4 low h / low δ (solved); 0 off
    `valid_mask`. "High" means above the split. The splits default to each axis' median over the valid tokens
    of the global batch (docs/decisions.md, "Quadrant boundaries"; a collective under torch.distributed); given, they
    are absolute values in the units of `h` and `d`.
    """
    if not h.shape == d.shape == valid_mask.shape:
        raise ValueError(f"h {tuple(h.shape)}, d {tuple(d.shape)} and valid_mask {tuple(valid_mask.shape)} "
                         "must have one shape")
    valid = valid_mask.bool()
    if h_split is None or d_split is None:
        batch_h, batch_d = gather_uneven(h[valid]), gather_uneven(d[valid])
        if batch_h.numel() == 0:
            return torch.zeros(h.shape, dtype=torch.long, device=h.device)
        h_split = quantile(batch_h, 0.5) if h_split is None else h_split
        d_split = quantile(batch_d, 0.5) if d_split is None else d_split
    low_h, low_d = (h <= h_split).long(), (d <= d_split).long()
    return (1 + 2 * low_h + low_d) * valid


class Rule(NamedTuple):
    """A selection rule of §5. `score(h_hat, d_hat, stats)` ranks the tokens of a rollout, highest kept; for a
    `sampled` rule it is the log of the sampling weight. `default_ratio` is ρ when none is given; `source` is
    where the paper reports it."""
    score: Callable
    default_ratio: float
    sampled: bool
    source: str


RULES = {
    "all": Rule(lambda h_hat, d_hat, s: torch.ones_like(h_hat), 1.0, False, "Eq. 1; Table 5 (100 %)"),
    # ∝ raw entropy, not ĥ: min-max would give the least uncertain token of the batch probability zero.
    "entropy": Rule(lambda h_hat, d_hat, s: s.entropy.clamp(min=0).log(), 0.5, True, "Tables 3, 5"),
    "entropy_top": Rule(lambda h_hat, d_hat, s: h_hat, 0.5, False, "Prop. 2 (Soft-OR with δ̂ = 0)"),
    "divergence": Rule(lambda h_hat, d_hat, s: s.reverse_kl, 0.5, False, "Table 8"),
    "q1": Rule(lambda h_hat, d_hat, s: h_hat * d_hat, 0.2, False, "ablation (§4 quadrants)"),
    "q2": Rule(lambda h_hat, d_hat, s: h_hat * (1 - d_hat), 0.2, False, "ablation (§4 quadrants)"),
    "q3": Rule(lambda h_hat, d_hat, s: s.forward_kl * (1 - h_hat), 0.1, False, "Tables 4, 8; DeepPlanning"),
    "q4": Rule(lambda h_hat, d_hat, s: (1 - h_hat) * (1 - d_hat), 0.2, False, "ablation (§4 quadrants)"),
    "type_aware": Rule(lambda h_hat, d_hat, s: soft_or(h_hat, d_hat), 0.5, False, "Table 5; Eq. 7, Remark 1"),
    "type_aware_bottom": Rule(lambda h_hat, d_hat, s: -soft_or(h_hat, d_hat), 0.5, False, "Table 6"),
    "random": Rule(lambda h_hat, d_hat, s: torch.zeros_like(h_hat), 0.5, True, "control (not in the paper)"),
}


def select_tokens(rule: str, stats, response_mask: torch.Tensor, ratio: float | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The kept set T of Eq. 9 as a bool mask shaped like `response_mask` [B, L], a subset of it.

    `stats` has `entropy`, `reverse_kl` and `forward_kl` per token, each shaped like the mask (score.TokenStats);
    entropy may be in nats or divided by ln|V| (Eq. 2): every rule keeps the same tokens either way. Each
    rollout (row) with m response tokens keeps k = ⌊ρm⌋ of them, at least 1 (0 when m = 0; docs/decisions.md,
    "Ties and at least one kept token"). Deterministic
    rules keep the top k by the rule's score (Eq. 8), ties to earlier positions, on ĥ, δ̂ normalized over the
    global batch (`normalize`; a collective under torch.distributed). `entropy` draws k without replacement
    with probability ∝ h_t, `random` uniformly, both from `generator` (whose device draws the noise). No
    importance weights: the loss is the plain mean over the kept tokens (Eq. 9).
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; valid rules: {', '.join(RULES)}")
    ratio = RULES[rule].default_ratio if ratio is None else float(ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio {ratio} is outside (0, 1]: it is the kept fraction of each rollout")
    if rule == "all" and ratio != 1:
        raise ValueError(f"rule 'all' keeps every response token (Eq. 1), so its ratio is 1, not {ratio}; "
                         "for a uniform subset use rule 'random'")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [rollouts, positions], got shape {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    for name in ("entropy", "reverse_kl", "forward_kl"):
        value = getattr(stats, name)
        if value.shape != mask.shape:
            raise ValueError(f"stats.{name} has shape {tuple(value.shape)} but response_mask has "
                             f"{tuple(mask.shape)}: pass one value per position of the mask")
        if not torch.isfinite(value[mask]).all():
            raise ValueError(f"stats.{name} holds NaN or inf at response positions")

    h_hat = normalize(stats.entropy, mask, clip_quantile=ENTROPY_CLIP_QUANTILE)
    d_hat = normalize(stats.reverse_kl, mask)
    key = RULES[rule].score(h_hat, d_hat, stats).detach()
    if RULES[rule].sampled:
        # Gumbel-top-k: the k largest of log w + Gumbel noise are k draws without replacement ∝ w.
        device = generator.device if generator is not None else key.device
        uniform = torch.rand(key.shape, generator=generator, device=device, dtype=torch.float64).to(key.device)
        key = key - torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float64).tiny)))
    # w = 0 (log w = −∞) goes after every w > 0 token but ahead of positions off the mask.
    key = key.clamp(min=torch.finfo(key.dtype).min).masked_fill(~mask, -math.inf)

    length = mask.sum(dim=1)
    # the epsilon keeps 0.29 · 100 at 29 kept tokens despite floating point
    k = torch.floor(ratio * length.double() + 1e-9).long().clamp(min=1) * (length > 0)
    order = key.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    place = torch.empty_like(order).scatter_(1, order, positions)  # each token's place in its rollout's order
    return (place < k[:, None]) & mask


if __name__ == "__main__":
    import argparse
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description="A demo on a random batch: the quadrant table (§4) and what each "
                                     "rule of §5 keeps.")
    parser.add_argument("--rollouts", type=int, default=16, help="rollouts in the batch (default: 16)")
    parser.add_argument("--length", type=int, default=256, help="the longest response, in tokens (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch and the sampled rules (default: 0)")
    flags = parser.parse_args()
    rollouts, longest, seed = flags.rollouts, flags.length, flags.seed
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (rollouts,), generator=g)
    mask = torch.arange(longest) < lengths[:, None]
    # A caricature of a real batch: each token drawn as Q1..Q4 with the paper's shares (§2), in nats.
    kind = torch.multinomial(torch.tensor([0.25, 0.2, 0.1, 0.45]), mask.numel(), True, generator=g)
    kind = kind.view(mask.shape)
    high_h, high_d = kind <= 1, kind % 2 == 0
    u = torch.rand((3, *mask.shape), generator=g)
    entropy = torch.where(high_h, 0.5 + 2.5 * u[0], 0.3 * u[0])
    reverse_kl = torch.where(high_d, 0.5 + 2.0 * u[1], 0.1 * u[1])
    stats = SimpleNamespace(entropy=entropy, reverse_kl=reverse_kl, forward_kl=reverse_kl * (0.5 + u[2]))

    quadrant = quadrants(entropy, reverse_kl, mask)
    print(f"{mask.sum()} response tokens in {rollouts} rollouts; quadrants split at the medians\n")
    print(f"{'quadrant':<10}{'tokens':>9}{'reverse-KL mass':>17}")
    for q, reading in zip(range(1, 5), ["uncertain, wrong", "underconfident", "overconfident", "solved"]):
        share = (quadrant == q).sum() / mask.sum()
        mass = reverse_kl[quadrant == q].sum() / reverse_kl[mask].sum()
        print(f"Q{q:<9}{share:>9.1%}{mass:>17.1%}   {reading}")
    print(f"\n{'rule':<19}{'ratio':>6}{'kept':>7}   share of kept in Q1 / Q2 / Q3 / Q4")
    for name, rule in RULES.items():
        kept = select_tokens(name, stats, mask, generator=torch.Generator().manual_seed(seed))
        shares = " / ".join(f"{(quadrant[kept] == q).float().mean():4.0%}" for q in range(1, 5))
        print(f"{name:<19}{rule.default_ratio:>6}{int(kept.sum()):>7}   {shares}")
