"""The token taxonomy of a pair (paper §4, Fig. 2): student rollouts scored against the teacher token by token.

Each response token gets h_t = H(P_S) / ln|V| (Eq. 2) and δ_t = KL(P_S ‖ P_T) (Eq. 3); both axes split at their
medians (docs/decisions.md, "Quadrant boundaries") give the quadrants Q1–Q4. The report holds each quadrant's share
of tokens and of the reverse-KL mass (Eq. 1's loss), the Q3 examples (confident and wrong) and the scatter.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pair
import rollout
import score
import tip

QUADRANTS = {1: "high h, high δ: uncertain and disagrees", 2: "high h, low δ: underconfident",
             3: "low h, high δ: confident and wrong", 4: "low h, low δ: solved"}


def quadrant_report(h: torch.Tensor, entropy: torch.Tensor, reverse_kl: torch.Tensor,
                    quadrant: torch.Tensor) -> list[dict]:
    """Per quadrant of §4: share of tokens, share of the total reverse-KL mass Σδ_t (Eq. 1's loss), mean
    normalized entropy h (Eq. 2), mean entropy in nats, mean δ (Eq. 3) in nats. Flat tensors over tokens."""
    total_mass = float(reverse_kl.double().sum())
    rows = []
    for q, reading in QUADRANTS.items():
        inside = quadrant == q
        count = int(inside.sum())
        mean = (lambda x: float(x[inside].double().mean())) if count else (lambda x: None)  # JSON null
        rows.append({"quadrant": f"Q{q}", "reading": reading, "tokens": count, "token_share": count / len(h),
                     "kl_mass_share": float(reverse_kl[inside].double().sum()) / total_mass if total_mass > 0 else 0.0,
                     "mean_h": mean(h), "mean_entropy": mean(entropy), "mean_reverse_kl": mean(reverse_kl)})
    return rows


@torch.no_grad()
def taxonomy(teacher, student, tokenizer, prompts: list[str], samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             chunk_size: int = 512, h_split: float | None = None, d_split: float | None = None,
             examples: int = 8) -> tuple[dict, dict]:
    """Student rollouts scored against the teacher per token (Eqs. 2–3), split into the quadrants of §4.
    Returns the JSON-ready report and the flat per-token tensors h, d (δ), quadrant for the scatter. Splits
    default to the medians; given, h_split is on h ∈ [0, 1] and d_split on δ in nats."""
    select = tip.load_select()
    rollouts = rollout.generate_rollouts(student, tokenizer, prompts, samples, max_new_tokens, temperature, top_p,
                                         seed=seed, batch_size=batch_size, show_progress=True)
    student_head, teacher_head = pair.lm_head_weight(student), pair.lm_head_weight(teacher)
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    entropy, reverse_kl, where = [], [], []
    for start in range(0, rollouts.input_ids.shape[0], batch_size):
        ids, mask = rollouts.input_ids[start:start + batch_size], rollouts.attention_mask[start:start + batch_size]
        scored = rollouts.response_mask[start:start + batch_size, 1:]  # hidden at p predicts the token at p + 1
        stats = score.chunked_token_stats(pair.final_hidden_states(student, ids, mask)[:, :-1][scored], student_head,
                                          pair.final_hidden_states(teacher, ids, mask)[:, :-1][scored], teacher_head,
                                          chunk_size)
        entropy.append(stats.entropy.cpu())
        reverse_kl.append(stats.reverse_kl.cpu())
        where.append(scored.nonzero().cpu() + torch.tensor([start, 1]))
    entropy, reverse_kl, where = torch.cat(entropy), torch.cat(reverse_kl), torch.cat(where)
    if entropy.numel() == 0:
        raise ValueError("the rollouts hold no sampled tokens to score")
    h = score.normalized_entropy(entropy, vocab)
    # the splits go into the report, so they are computed here (in float64) rather than inside quadrants()
    given = h_split is not None or d_split is not None
    h_split = float(select.quantile(h.double(), 0.5)) if h_split is None else h_split
    d_split = float(select.quantile(reverse_kl.double(), 0.5)) if d_split is None else d_split
    quadrant = select.quadrants(h, reverse_kl, torch.ones_like(h, dtype=torch.bool), h_split, d_split)
    q3 = (quadrant == 3).nonzero().squeeze(1)
    shown = []
    for index in q3[reverse_kl[q3].argsort(descending=True)[:examples]].tolist():
        row, position = where[index].tolist()
        ids, mask = rollouts.input_ids[row:row + 1], rollouts.attention_mask[row:row + 1]
        token, context = int(ids[0, position]), slice(max(0, position - 16), position)
        p_student, p_teacher = (torch.softmax((pair.final_hidden_states(m, ids, mask)[0, position - 1]
                                               @ pair.lm_head_weight(m)[:vocab].T).float(), -1)
                                for m in (student, teacher))
        shown.append({"context": tokenizer.decode(ids[0, context][mask[0, context].bool()].tolist(),
                                                  skip_special_tokens=True),
                      "token": tokenizer.decode([token]), "student_p": float(p_student[token]),
                      "teacher_p": float(p_teacher[token]), "teacher_top": tokenizer.decode([int(p_teacher.argmax())]),
                      "teacher_top_p": float(p_teacher.max()), "h": float(h[index]),
                      "reverse_kl": float(reverse_kl[index])})
    summary = dict(prompts=len(prompts), rollouts=int(rollouts.input_ids.shape[0]), tokens=int(h.numel()), vocab=vocab,
                   h_split=h_split, d_split=d_split, split="given" if given else "median", samples=samples,
                   temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    report = {"summary": summary, "quadrants": quadrant_report(h, entropy, reverse_kl, quadrant), "q3_examples": shown}
    return report, {"h": h, "d": reverse_kl, "quadrant": quadrant}


def format_taxonomy(report: dict) -> str:
    """The quadrant table of §4 (shares of tokens and of the Eq. 1 mass) and the Q3 examples as text."""
    s = report["summary"]
    lines = [f"{s['tokens']} tokens in {s['rollouts']} rollouts of {s['prompts']} prompts; splits h = "
             f"{s['h_split']:.4f} (normalized entropy), δ = {s['d_split']:.4f} nats ({s['split']})", "",
             "| quadrant | tokens % | reverse-KL mass % | mean h | mean entropy (nats) | mean δ (nats) | reading |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in report["quadrants"]:
        means = " | ".join("—" if q[key] is None else f"{q[key]:.3f}"
                           for key in ("mean_h", "mean_entropy", "mean_reverse_kl"))
        lines.append(f"| {q['quadrant']} | {100 * q['token_share']:.1f} | {100 * q['kl_mass_share']:.1f} | "
                     f"{means} | {q['reading']} |")
    if report["q3_examples"]:
        lines += ["", "Q3 examples (highest δ): context [sampled token] student p / teacher p, teacher's choice"]
    for e in report["q3_examples"]:
        lines.append(f"  …{e['context']!r} [{e['token']!r}] {e['student_p']:.2f} / {e['teacher_p']:.2f}, teacher: "
                     f"{e['teacher_top']!r} ({e['teacher_top_p']:.2f}); δ = {e['reverse_kl']:.2f}")
    return "\n".join(lines)


def plot_taxonomy(points: dict, report: dict, path: str | Path, max_points: int = 20000, seed: int = 0) -> bool:
    """Fig. 2: normalized entropy h (Eq. 2) against δ (Eq. 3), coloured by quadrant, the splits drawn.
    matplotlib is optional: without it nothing is drawn and False is returned."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    h, d, quadrant = points["h"], points["d"], points["quadrant"]
    if h.numel() > max_points:  # a readable picture; the shares in the legend count every token
        keep = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(seed))[:max_points]
        h, d, quadrant = h[keep], d[keep], quadrant[keep]
    figure = Figure(figsize=(6.4, 4.8))
    axes, s = figure.subplots(), report["summary"]
    colours = ("tab:red", "tab:orange", "tab:purple", "tab:green")
    for q, (row, colour) in enumerate(zip(report["quadrants"], colours), 1):
        axes.scatter(h[quadrant == q].numpy(), d[quadrant == q].numpy(), s=4, alpha=0.5, c=colour, linewidths=0,
                     label=f"Q{q} {100 * row['token_share']:.0f}% tokens, {100 * row['kl_mass_share']:.0f}% KL mass")
    axes.axvline(s["h_split"], color="black", linestyle="--", linewidth=0.8)
    axes.axhline(s["d_split"], color="black", linestyle="--", linewidth=0.8)
    # log above the split separates the large divergences; linear below it keeps δ = 0 (solved tokens) on the plot
    axes.set_yscale("symlog", linthresh=max(s["d_split"], 1e-4))
    axes.set_ylim(bottom=0)  # δ ≥ 0: no negative half of the symlog axis
    axes.set_xlabel("normalized student entropy h = H(P_S) / ln|V|  (Eq. 2)")
    axes.set_ylabel("divergence δ = KL(P_S ‖ P_T), nats  (Eq. 3)")
    axes.set_title(f"token taxonomy: {s['tokens']} tokens, {s['split']} split")
    axes.legend(loc="upper left", fontsize=7, markerscale=3)
    figure.tight_layout()
    tip.write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return True
