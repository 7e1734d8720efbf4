"""Checkpoints of train.py (paper §7): the student, its optimizer and every rank's random state, saved so that a
run stopped at any moment continues exactly (--resume). A checkpoint folder is complete or absent.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import tip


def full_state(student, optimizer):
    """Whole (unsharded) model and optimizer state dicts on every rank; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if not tip.is_sharded(student):
        return student.state_dict(), optimizer.state_dict()
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir: Path, step: int, student, tokenizer, optimizer, final: bool = False) -> None:
    """The student (save_pretrained, safetensors) with its tokenizer, and the training state with the random
    state of every rank (sampling offsets it by rank). Collective."""
    model_state, optimizer_state = full_state(student, optimizer)
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    ranks_rng = [None] * tip.world_size()
    if tip.is_distributed():
        dist.all_gather_object(ranks_rng, rng)
    else:
        ranks_rng = [rng]
    if tip.rank() == 0:
        def write(tmp: Path):
            student.save_pretrained(tmp / "model" if not final else tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp / "model" if not final else tmp)
            if not final:
                torch.save(dict(step=step, optimizer=optimizer_state, rng=ranks_rng), tmp / "state.pt")
        tip.write_atomically(run_dir / ("final" if final else f"checkpoint-{step:06d}"), write, folder=True)
    if tip.is_distributed():
        dist.barrier()


def newest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def resume_from(checkpoint: Path, student, optimizer) -> int:
    """Load weights, optimizer state and this rank's random state; returns the number of steps already done."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # weights_only: tensors and plain containers only, so a run folder from elsewhere cannot run code here
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    weights = {}
    for file in sorted((checkpoint / "model").glob("*.safetensors")):
        weights.update(load_file(file))
    if student.config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    if tip.is_sharded(student):
        set_state_dict(student, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        student.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == tip.world_size():  # else the seed stands: sampling is seeded by step and rank anyway
        rng = state["rng"][tip.rank()]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        tip.log(f"note: {checkpoint} was saved by {len(state['rng'])} processes, not {tip.world_size()}: the "
                "random state is not restored")
    return state["step"]
