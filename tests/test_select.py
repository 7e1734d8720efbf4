"""select.py (paper §4–6): normalization, Soft-OR and the quadrants, every rule against its plain formula,
sampling statistics, the global batch under torchrun, and the file's name beside the standard `select`."""
import importlib
import itertools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import tip

ROOT = Path(__file__).resolve().parents[1]
sel = tip.load_select()
RULE_NAMES = list(sel.RULES)
DETERMINISTIC = [name for name, rule in sel.RULES.items() if not rule.sampled]


class Stats(NamedTuple):
    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor


def random_batch(seed=0, rollouts=6, length=40, dtype=torch.float32):
    """Rollouts with a prompt prefix and right padding off the mask, one of them empty (m = 0)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 6, (rollouts, 1), generator=g)
    end = prompt + torch.randint(1, length - 5, (rollouts, 1), generator=g)
    end[2] = prompt[2]  # an empty response
    positions = torch.arange(length)
    mask = (positions >= prompt) & (positions < end)
    u = torch.rand((3, rollouts, length), generator=g, dtype=torch.float64)
    entropy = 3.0 * u[0] ** 2
    entropy[0, int(prompt[0])] = 50.0  # an outlier for the 98th-percentile clip
    stats = Stats(entropy, 2.0 * u[1] ** 3, 2.0 * u[1] ** 3 * (0.5 + u[2]))
    return Stats(*(x.to(dtype) for x in stats)), mask


def counts(mask, ratio):
    m = mask.sum(1)
    return torch.tensor([max(1, math.floor(ratio * int(n) + 1e-9)) if n else 0 for n in m])


def plain_normalize(values, mask, clip=None):
    """§6 in float64 with torch.quantile, for small inputs."""
    values = values.double()
    if clip is not None:
        values = values.clamp(max=torch.quantile(values[mask], clip))
    low, high = values[mask].min(), values[mask].max()
    return torch.where(mask, (values - low) / (high - low), 0.0)


def plain_top(score, mask, ratio):
    """Eq. 8 one rollout at a time: the top ⌊ρm⌋ (min 1) by score, ties to earlier positions."""
    kept = torch.zeros_like(mask)
    for b, k in enumerate(counts(mask, ratio).tolist()):
        positions = mask[b].nonzero().flatten().tolist()
        for t in sorted(positions, key=lambda t: (-float(score[b, t]), t))[:k]:
            kept[b, t] = True
    return kept


def plain_scores(stats, mask):
    h_hat = plain_normalize(stats.entropy, mask, 0.98)
    d_hat = plain_normalize(stats.reverse_kl, mask)
    q4 = (1 - h_hat) * (1 - d_hat)
    return {"all": torch.ones_like(h_hat), "entropy_top": h_hat, "divergence": stats.reverse_kl.double(),
            "q1": h_hat * d_hat, "q2": h_hat * (1 - d_hat), "q3": stats.forward_kl.double() * (1 - h_hat),
            "q4": q4, "type_aware": 1 - q4, "type_aware_bottom": q4 - 1}


# --- normalization, Soft-OR and the quadrants (§4, §6, Eq. 7) ---

def test_normalize_matches_the_plain_formula_and_clips_the_outlier():
    stats, mask = random_batch(dtype=torch.float64)
    h_hat = sel.normalize(stats.entropy, mask, clip_quantile=0.98)
    torch.testing.assert_close(h_hat, plain_normalize(stats.entropy, mask, 0.98), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sel.normalize(stats.reverse_kl, mask), plain_normalize(stats.reverse_kl, mask))
    assert h_hat[~mask].eq(0).all() and h_hat[mask].min() == 0 and h_hat[mask].max() == 1
    # the outlier (50 nats among values below 3) would squash the rest to below 0.06 without the clip
    assert h_hat[mask].quantile(0.9) > 0.5
    assert sel.normalize(stats.entropy, mask)[mask].quantile(0.9) < 0.06


def test_one_outlier_does_not_squash_the_others():
    values = torch.cat([torch.linspace(0, 1, 100), torch.tensor([1e6])]).double()
    valid = torch.ones_like(values, dtype=torch.bool)
    scaled = sel.normalize(values, valid, clip_quantile=0.98)
    cap = torch.quantile(values, 0.98)
    torch.testing.assert_close(scaled, values.clamp(max=cap) / cap)
    assert scaled[-1] == 1 and scaled[50] > 0.5


def test_normalize_beyond_torch_quantile_limit():
    n = 2**24 + 3  # torch.quantile refuses more than 2^24 elements
    values = torch.arange(n, dtype=torch.float64).flip(0)
    scaled = sel.normalize(values, torch.ones(n, dtype=torch.bool), clip_quantile=0.98)
    cap = 0.98 * (n - 1)
    for i in (0, 1, n // 2, n - 1):
        assert math.isclose(float(scaled[i]), min(n - 1 - i, cap) / cap, rel_tol=1e-12)


def test_all_equal_values_scale_to_zero_and_empty_batches_pass():
    mask = torch.tensor([[True, True, False]])
    assert sel.normalize(torch.full((1, 3), 0.7), mask, clip_quantile=0.98).eq(0).all()
    assert sel.normalize(torch.rand(1, 3), torch.zeros(1, 3, dtype=torch.bool)).eq(0).all()


def test_soft_or_is_eq7_and_memberships_sum_to_one():
    h_hat, d_hat = torch.rand(2, 1000, dtype=torch.float64)
    torch.testing.assert_close(sel.soft_or(h_hat, d_hat), h_hat + d_hat - h_hat * d_hat)
    q1, q2, q3, q4 = sel.quadrant_scores(h_hat, d_hat)
    torch.testing.assert_close(q1 + q2 + q3 + q4, torch.ones_like(h_hat))
    assert torch.equal(sel.soft_or(h_hat, d_hat), 1 - q4)
    # Remark 1 at the corners: Q1 → 1, Q3 → δ̂, Q4 → 0
    corners = sel.soft_or(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.6, 0.0]))
    torch.testing.assert_close(corners, torch.tensor([1.0, 0.6, 0.0]))


def test_quadrants_numbering_medians_and_absolute_splits():
    h = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5]])
    d = torch.tensor([[2.0, 0.1, 3.0, 0.2, 9.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    # medians over the valid four: h 0.5, d 1.1
    assert sel.quadrants(h, d, valid).tolist() == [[1, 2, 3, 4, 0]]
    assert sel.quadrants(h, d, valid, h_split=0.85, d_split=0.15).tolist() == [[1, 4, 3, 3, 0]]
    assert sel.quadrants(h, d, torch.zeros_like(valid)).eq(0).all()


# --- the rules (§5, Eq. 8) ---

@pytest.mark.parametrize("rule, ratio", [(rule, ratio) for rule in RULE_NAMES for ratio in [1.0, 0.5, 0.2, 0.1]
                                         if rule != "all" or ratio == 1])  # 'all' refuses ρ < 1: test_errors
def test_per_rollout_counts_and_subset_of_the_response(rule, ratio):
    stats, mask = random_batch(seed=1)
    kept = sel.select_tokens(rule, stats, mask, ratio=ratio, generator=torch.Generator().manual_seed(0))
    assert kept.dtype == torch.bool and kept.shape == mask.shape
    assert not (kept & ~mask).any(), "a prompt or padding position was kept"
    assert torch.equal(kept.sum(1), counts(mask, ratio))
    assert kept[2].sum() == 0 and mask[2].sum() == 0


def test_count_epsilon_and_minimum_of_one():
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, 3:] = False
    stats = Stats(*torch.rand(3, 2, 100))
    kept = sel.select_tokens("type_aware", stats, mask, ratio=0.29)
    assert kept.sum(1).tolist() == [29, 1]  # 0.29 · 100 is 28.999… in floating point; ⌊0.29 · 3⌋ = 0 → 1


@pytest.mark.parametrize("rule", DETERMINISTIC)
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_deterministic_rules_match_the_plain_formula(rule, ratio):
    stats, mask = random_batch(seed=2, dtype=torch.float64)
    ratio = 1.0 if rule == "all" else ratio
    kept = sel.select_tokens(rule, stats, mask, ratio=ratio)
    assert torch.equal(kept, plain_top(plain_scores(stats, mask)[rule], mask, ratio))


def test_ties_break_toward_earlier_positions():
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, 1:7] = mask[1, 50:250] = True  # long rows: an unstable sort reorders ties there
    stats = Stats(torch.ones(2, 300), torch.ones(2, 300), torch.ones(2, 300))
    for rule in DETERMINISTIC[1:]:
        kept = sel.select_tokens(rule, stats, mask, ratio=0.5)
        assert kept[0].nonzero().flatten().tolist() == [1, 2, 3], rule
        assert kept[1].nonzero().flatten().tolist() == list(range(50, 150)), rule


def hand_built():
    """One rollout by quadrant: Q1 token 0, Q2 tokens 1–4, Q3 token 5 (overconfident), Q4 tokens 6–11."""
    entropy = torch.tensor([[2.5, 2.0, 2.2, 2.4, 2.6, 0.01, 0.02, 0.03, 0.04, 0.05, 0.02, 0.03]])
    reverse_kl = torch.tensor([[2.0, 0.01, 0.02, 0.01, 0.03, 3.0, 0.01, 0.02, 0.01, 0.02, 0.03, 0.01]])
    forward_kl = reverse_kl * 1.5
    forward_kl[0, 0] = 4.5  # as wrong as the Q3 token, but uncertain
    return Stats(entropy, reverse_kl, forward_kl), torch.ones(1, 12, dtype=torch.bool)


def test_q3_keeps_confident_and_wrong_drops_high_entropy():
    stats, mask = hand_built()
    assert sel.select_tokens("q3", stats, mask, ratio=0.1).nonzero()[:, 1].tolist() == [5]
    kept = sel.select_tokens("q3", stats, mask, ratio=0.5)[0]
    assert kept[5] and not kept[1:5].any()


def test_q3_ranks_confident_tokens_by_forward_not_reverse_kl():
    """Two confident tokens, each wrong by one of the KLs: Q3-only keeps the one the teacher's own choice is
    missed on (forward KL, Table 8), not the one with the larger reverse KL."""
    entropy = torch.tensor([[0.01, 0.01, 2.0, 2.0, 0.02, 0.02]])
    reverse_kl = torch.tensor([[3.0, 0.5, 0.1, 0.1, 0.01, 0.01]])
    forward_kl = torch.tensor([[0.5, 3.0, 0.1, 0.1, 0.01, 0.01]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert sel.select_tokens("q3", Stats(entropy, reverse_kl, forward_kl), mask, ratio=0.2)[0].tolist() == \
        [False, True, False, False, False, False]
    assert sel.select_tokens("divergence", Stats(entropy, reverse_kl, forward_kl), mask, ratio=0.2)[0, 0]


def test_entropy_top_blind_spot_prop2():
    stats, mask = hand_built()
    for ratio in (0.1, 0.2, 0.3, 0.4):
        assert not sel.select_tokens("entropy_top", stats, mask, ratio=ratio)[0, 5]
    # on any batch: no kept token has lower entropy than a dropped one
    stats, mask = random_batch(seed=3)
    kept = sel.select_tokens("entropy_top", stats, mask, ratio=0.2)
    h_hat = sel.normalize(stats.entropy, mask, clip_quantile=0.98)
    for b in range(mask.shape[0]):
        if kept[b].any():
            assert h_hat[b][kept[b]].min() >= h_hat[b][mask[b] & ~kept[b]].max()


def test_type_aware_keeps_uncertain_and_overconfident_drops_solved():
    stats, mask = hand_built()
    kept = sel.select_tokens("type_aware", stats, mask, ratio=0.5)[0]
    assert kept[0] and kept[5] and kept[1:5].sum() == 4 and not kept[6:].any()
    bottom = sel.select_tokens("type_aware_bottom", stats, mask, ratio=0.5)[0]
    assert torch.equal(bottom, ~kept)


def test_type_aware_bottom_is_the_complement_ranked_set():
    stats, mask = random_batch(seed=4)
    mask &= mask.cumsum(1) <= 2 * (mask.sum(1, keepdim=True) // 2)  # even m in every rollout
    top = sel.select_tokens("type_aware", stats, mask, ratio=0.5)
    assert torch.equal(sel.select_tokens("type_aware_bottom", stats, mask, ratio=0.5), mask & ~top)


# --- sampled rules: entropy ∝ h, random uniform ---

def keep_frequency(rule, h, ratio, draws=4000, seed=0):
    entropy = h.expand(draws, -1).clone()
    stats = Stats(entropy, torch.rand(draws, len(h)), torch.rand(draws, len(h)))
    mask = torch.ones(draws, len(h), dtype=torch.bool)
    kept = sel.select_tokens(rule, stats, mask, ratio=ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(kept.sum(1), counts(mask, ratio))
    return kept.double().mean(0), kept


def inclusion_probability(h, k):
    """P(token in the first k draws without replacement ∝ h), by enumerating the ordered draws."""
    total = torch.zeros(len(h), dtype=torch.float64)
    for sequence in itertools.permutations(range(len(h)), k):
        p, left = 1.0, float(h.sum())
        for t in sequence:
            p, left = p * float(h[t]) / left, left - float(h[t])
        total[list(sequence)] += p
    return total


@pytest.mark.parametrize("k", [1, 3])
def test_entropy_sampling_is_proportional_to_raw_h(k):
    # the smallest h is not 0: sampling ∝ ĥ would never keep it, sampling ∝ h does
    h = torch.tensor([0.4, 0.02, 0.05, 0.8, 0.1, 0.2])
    frequency, kept = keep_frequency("entropy", h, ratio=k / 6 + 1e-6)
    expected = inclusion_probability(h.double(), k)
    tolerance = 4 * (expected * (1 - expected) / 4000).sqrt()  # 4 standard errors
    assert ((frequency - expected).abs() <= tolerance).all(), (frequency, expected)
    assert (frequency[h.argsort()].diff() > 0).all()  # rises with h


def test_entropy_sampling_takes_h_zero_only_after_every_positive():
    h = torch.tensor([0.0, 0.3, 0.0, 0.5, 0.0, 0.0])
    frequency, kept = keep_frequency("entropy", h, ratio=1 / 6 + 1e-6, draws=200)
    assert kept[:, [1, 3]].any(1).all()
    _, kept = keep_frequency("entropy", h, ratio=0.5, draws=200)
    assert kept[:, [1, 3]].all()
    # and an h = 0 token still goes ahead of the positions off the mask
    mask = torch.tensor([[False, True, True, True, True, True, True, False]])
    stats = Stats(torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.5, 0.0, 0.0, 0.0]]), torch.rand(1, 8), torch.rand(1, 8))
    kept = sel.select_tokens("entropy", stats, mask, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert kept[0, [2, 4]].all() and kept.sum() == 3 and not (kept & ~mask).any()


def test_sampling_is_reproducible_and_uniform_for_random():
    stats, mask = random_batch(seed=5)
    draw = lambda seed: sel.select_tokens("entropy", stats, mask, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
    frequency, _ = keep_frequency("random", torch.tensor([0.0, 1.0, 2.0, 0.0, 5.0, 1.0]), ratio=2 / 6 + 1e-6)
    assert ((frequency - 1 / 3).abs() <= 4 * math.sqrt(2 / 9 / 4000)).all(), frequency


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_entropy_units_do_not_change_the_selection(rule):
    stats, mask = random_batch(seed=6)
    normalized = stats._replace(entropy=stats.entropy / math.log(151936))  # Eq. 2
    draw = lambda s: sel.select_tokens(rule, s, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(stats), draw(normalized))


def test_errors_are_clear_value_errors():
    stats, mask = random_batch()
    with pytest.raises(ValueError, match="type_aware.*random"):
        sel.select_tokens("soft_or", stats, mask)
    for ratio in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            sel.select_tokens("type_aware", stats, mask, ratio=ratio)
    with pytest.raises(ValueError, match="shape"):
        sel.select_tokens("type_aware", stats, mask[:, :-1])
    with pytest.raises(ValueError, match="forward_kl"):
        sel.select_tokens("type_aware", stats._replace(forward_kl=stats.forward_kl[:-1]), mask)
    with pytest.raises(ValueError, match="'all'"):
        sel.select_tokens("all", stats, mask, ratio=0.5)
    with pytest.raises(ValueError, match="NaN"):
        sel.select_tokens("q3", stats._replace(forward_kl=torch.where(mask, math.nan, 0.0)), mask)
    with pytest.raises(ValueError, match=r"\[rollouts, positions\]"):
        sel.select_tokens("type_aware", stats._replace(**{k: v.flatten() for k, v in stats._asdict().items()}),
                          mask.flatten())
    with pytest.raises(ValueError, match="differ in shape"):
        sel.normalize(stats.entropy, mask[:, :-1])
    with pytest.raises(ValueError, match="must have one shape"):
        sel.quadrants(stats.entropy, stats.reverse_kl[:, :-1], mask)


def test_rules_table():
    assert set(sel.RULES) == {"all", "entropy", "entropy_top", "divergence", "q1", "q2", "q3", "q4",
                              "type_aware", "type_aware_bottom", "random"}
    ratios = {name: rule.default_ratio for name, rule in sel.RULES.items()}
    assert ratios == {"all": 1.0, "entropy": 0.5, "entropy_top": 0.5, "divergence": 0.5, "q1": 0.2, "q2": 0.2,
                      "q3": 0.1, "q4": 0.2, "type_aware": 0.5, "type_aware_bottom": 0.5, "random": 0.5}
    assert {name for name, rule in sel.RULES.items() if rule.sampled} == {"entropy", "random"}


# --- the global batch under torch.distributed (§6, Decision) ---

WORKER = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    root, folder = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)
    import torch, torch.distributed as dist
    import tip


    def main():
        sel = tip.load_select()
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        batch = torch.load(f"{folder}/in{rank}.pt")
        stats, mask = SimpleNamespace(**batch["stats"]), batch["mask"]
        out = {"gathered": sel.gather_uneven(stats.entropy[mask]),
               "h_hat": sel.normalize(stats.entropy, mask, 0.98), "d_hat": sel.normalize(stats.reverse_kl, mask),
               "quadrants": sel.quadrants(stats.entropy, stats.reverse_kl, mask)}
        for rule in sys.argv[3:]:
            for ratio in ([1.0] if rule == "all" else [None, 0.2]):
                out[rule, ratio] = sel.select_tokens(rule, stats, mask, ratio=ratio)
        torch.save(out, f"{folder}/out{rank}.pt")
        dist.destroy_process_group()


    tip.run_main(main)
""")


def run(command, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_two_ranks_select_what_one_process_selects(tmp_path):
    stats, mask = random_batch(seed=7, rollouts=7, length=48)
    mask[:3, 30:] = False  # rank 0 holds 3 rollouts of width 30, rank 1 four of width 48: uneven counts
    split = [(slice(0, 3), slice(0, 30)), (slice(3, 7), slice(0, 48))]
    for rank, (rows, cols) in enumerate(split):
        torch.save({"stats": {k: v[rows, cols].clone() for k, v in stats._asdict().items()},
                    "mask": mask[rows, cols].clone()}, tmp_path / f"in{rank}.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(ROOT), str(tmp_path), *DETERMINISTIC])

    single = {"h_hat": sel.normalize(stats.entropy, mask, 0.98), "d_hat": sel.normalize(stats.reverse_kl, mask),
              "quadrants": sel.quadrants(stats.entropy, stats.reverse_kl, mask)}
    for rule in DETERMINISTIC:
        for ratio in ([1.0] if rule == "all" else [None, 0.2]):
            single[rule, ratio] = sel.select_tokens(rule, stats, mask, ratio=ratio)
    outs = [torch.load(tmp_path / f"out{rank}.pt") for rank in range(2)]
    for out in outs:  # every rank holds the whole batch's values, in rank order
        assert torch.equal(out["gathered"], stats.entropy[mask])
    assert len(single) == len(outs[0]) - 1
    for key, expected in single.items():
        for out, (rows, cols) in zip(outs, split):
            assert torch.equal(out[key], expected[rows, cols]), key
    assert not single[("type_aware", None)][:3, 30:].any()


def test_gather_uneven_without_a_process_group_is_the_input():
    values = torch.rand(5)
    assert torch.equal(sel.gather_uneven(values), values)


# --- the name select.py beside the standard library's select (docs/decisions.md, "The name select.py") ---

def test_defines_no_name_of_the_standard_module():
    standard = importlib.import_module("select")
    assert hasattr(standard, "select") and not hasattr(standard, "select_tokens")
    assert Path(getattr(standard, "__file__", "builtin")).parent != ROOT
    public = lambda module: {name for name in dir(module) if not name.startswith("_")}
    assert public(sel) & public(standard) == set()


@pytest.mark.parametrize("command", [
    ["{python}", "train.py", "--help"],
    ["{python}", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "--help"],
    ["{python}", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_select.py"],
    ["{pytest}", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_select.py"],
    ["{python}", "-c", "import subprocess, select; assert select.poll and not hasattr(select, 'RULES')"],
    ["{python}", "-m", "venv", "{tmp}/v", "--without-pip"],
    ["{python}", "select.py", "--help"],
    ["{python}", "select.py", "--rollouts", "3", "--length", "20"],
], ids=["train", "torchrun", "python-m-pytest", "pytest", "import-subprocess", "venv", "select-help", "demo"])
def test_commands_from_the_project_root(command, tmp_path):
    python = sys.executable
    names = {"python": python, "pytest": str(Path(python).with_name("pytest")), "tmp": str(tmp_path)}
    result = run([part.format(**names) for part in command])
    if command[-1] == "20":
        assert "type_aware" in result.stdout and "Q3" in result.stdout and " in 3 rollouts;" in result.stdout
