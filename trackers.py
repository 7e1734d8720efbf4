"""The record of a train.py run (paper §7) as it goes: each step's line of metrics.jsonl, the progress bar's
numbers, and the experiment trackers, where every line, the config and the held-out accuracy are logged through
each tracker's own API on rank 0, so a run that lasts hours can be watched as curves.

    python train.py --report-to tensorboard          # event files in RUN_DIR/tensorboard: tensorboard --logdir runs
    python train.py --report-to wandb trackio        # several at once

Offline by default: TensorBoard writes files in the run folder; W&B runs in offline mode in the run folder unless
WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later); trackio writes its local
store ($TRACKIO_DIR, `trackio show`). A resumed run continues the same tracker run: TensorBoard drops the events
after the checkpoint's step, W&B and trackio reopen the run by its id. The trackers are optional installs
(requirements-trackers.txt).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

from tqdm import tqdm

import tip

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # flag name: package needed
PROJECT = "tip"


class Tracker(NamedTuple):
    log: Callable[[dict], None]  # one metrics.jsonl record (its "step" is the x axis)
    close: Callable[[], None]


def require(names: list[str]) -> None:
    """Refuse --report-to trackers whose package is not installed, before any model loads."""
    missing = [TRACKERS[name] for name in names if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        raise tip.InputError(f"--report-to needs {', '.join(missing)}: pip install -r requirements-trackers.txt")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record, the step aside: what a tracker can draw (the `skipped` reason is text)."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def tensorboard(run_dir: Path, config: dict, start_step: int) -> Tracker:
    from torch.utils.tensorboard import SummaryWriter
    # purge_step: a resumed run rewrites the steps after its checkpoint, as metrics.jsonl does
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    if not start_step:
        writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(record: dict) -> None:
        for key, value in scalars(record).items():
            writer.add_scalar(key, value, record["step"])
        writer.flush()
    return Tracker(log, writer.close)


def run_id(run_dir: Path, tracker: str) -> str:
    """The id of this run folder's run in `tracker`, kept in the folder so that --resume reopens that run."""
    path = run_dir / f".{tracker}-run-id"
    if not path.exists():
        path.write_text(f"{run_dir.name}-{os.urandom(4).hex()}")
    return path.read_text()


def wandb(run_dir: Path, config: dict, start_step: int) -> Tracker:
    import wandb as wandb_module
    run = wandb_module.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                            id=run_id(run_dir, "wandb"), resume="allow", dir=str(run_dir), config=config,
                            mode=os.environ.get("WANDB_MODE", "offline"))
    return Tracker(lambda record: run.log(scalars(record), step=record["step"]), run.finish)


def trackio(run_dir: Path, config: dict, start_step: int) -> Tracker:
    import trackio as trackio_module
    trackio_module.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_id(run_dir, "trackio"),
                        config=config, resume="allow")
    return Tracker(lambda record: trackio_module.log(scalars(record), step=record["step"]), trackio_module.finish)


def open_trackers(names: list[str], run_dir: Path, config: dict, start_step: int) -> list[Tracker]:
    """The trackers named by --report-to, for the process that writes metrics.jsonl (rank 0)."""
    makers = dict(tensorboard=tensorboard, wandb=wandb, trackio=trackio)
    return [makers[name](run_dir, config, start_step) for name in dict.fromkeys(names)]


def log_record(run_dir: Path, record: dict, opened: list[Tracker]) -> None:
    """A line of metrics.jsonl, and the same record to each tracker at its step (rank 0)."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    for tracker in opened:
        tracker.log(record)


def log_step(run_dir: Path, record: dict, opened: list[Tracker], bar) -> None:
    """One step's record: a line of metrics.jsonl, each tracker, and the progress bar's numbers (rank 0)."""
    log_record(run_dir, record, opened)
    if record["skipped"]:
        tqdm.write(f"step {record['step']} skipped: {record['skipped']}")
    shown = dict(loss=record["loss"], kl=record.get("mean_reverse_kl"), kept=record.get("kept_fraction"),
                 reward=record["reward"], tok_s=record["tokens_per_second"])
    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
