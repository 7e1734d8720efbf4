"""Checkpoints of train.py (paper §7): the student, its optimizer and every rank's random state, saved so that a
run stopped at any moment continues exactly (--resume). A checkpoint folder is complete or absent.

Two layouts, both read by `resume_from` under any number of processes, sharded or not:
    checkpoint-000100/model/        the student (save_pretrained, safetensors) and its tokenizer; state.pt holds the
                                    step, the optimizer and every rank's random state (one process, or plain DDP)
    checkpoint-000100/sharded/      under --fsdp: every rank writes and reads its own shards of the student and the
                                    optimizer (torch.distributed.checkpoint); state.pt holds the step and random state
`final/` is always one from_pretrained folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import tip


def full_state(student, optimizer):
    """Whole (unsharded) model and optimizer state dicts; under FSDP a collective whose result is on rank 0."""
    if not tip.is_sharded(student):
        return student.state_dict(), optimizer.state_dict()
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def ranks_random_state() -> list[dict]:
    """The random state of every rank (sampling is seeded by rank), gathered on every rank. Collective."""
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    if not tip.is_distributed():
        return [rng]
    ranks_rng = [None] * tip.world_size()
    dist.all_gather_object(ranks_rng, rng)
    return ranks_rng


def save_checkpoint(run_dir: Path, step: int, student, tokenizer, optimizer, final: bool = False) -> None:
    """A checkpoint of the run after `step` steps, or with `final` the student alone as `final/`. Collective."""
    target = run_dir / ("final" if final else f"checkpoint-{step:06d}")
    if final:
        # under FSDP gathered on rank 0 alone, in CPU memory, shard by shard
        model_state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if tip.rank() == 0:
            tip.write_atomically(target, lambda tmp: save_pretrained(tmp, student, tokenizer, model_state),
                                 folder=True)
    elif tip.is_sharded(student):
        save_sharded(target, step, student, optimizer)
    else:
        model_state, optimizer_state = full_state(student, optimizer)
        ranks_rng = ranks_random_state()
        if tip.rank() == 0:
            def write(tmp: Path):
                save_pretrained(tmp / "model", student, tokenizer, model_state)
                torch.save(dict(step=step, optimizer=optimizer_state, rng=ranks_rng), tmp / "state.pt")
            tip.write_atomically(target, write, folder=True)
    if tip.is_distributed():
        dist.barrier()


def save_pretrained(folder: Path, student, tokenizer, model_state: dict) -> None:
    student.save_pretrained(folder, state_dict=model_state)
    tokenizer.save_pretrained(folder)


def save_sharded(target: Path, step: int, student, optimizer) -> None:
    """Every rank writes its own shards into one temporary folder that rank 0 then renames: no rank ever holds
    the whole student or optimizer, and a kill leaves no half checkpoint under the final name."""
    model_state, optimizer_state = get_state_dict(student, optimizer)
    ranks_rng = ranks_random_state()
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    if tip.rank() == 0:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / "sharded")
    if tip.rank() == 0:
        torch.save(dict(step=step, rng=ranks_rng), tmp / "state.pt")
        if target.is_dir():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def forget_metrics_after(metrics_path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl after `step`: the steps a resumed run is about to take again."""
    if metrics_path.exists():
        lines = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in lines))


def newest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def resume_from(checkpoint: Path, student, optimizer) -> int:
    """Load weights, optimizer state and this rank's random state; returns the number of steps already done."""
    from safetensors.torch import load_file

    # weights_only: tensors and plain containers only, so a run folder from elsewhere cannot run code here
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    if (checkpoint / "sharded").is_dir():  # each rank reads the parts of its own shards, whatever wrote them
        model_state, optimizer_state = get_state_dict(student, optimizer)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / "sharded")
        set_state_dict(student, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    else:
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
