"""Weights & Biases (Megatron-LM's --wandb-* flags): the metrics records as one W&B run.

    run = WandbRun(settings.logging, run_id, config=vars-of-the-flags)   # the reporting rank only
    run.log(record)                     # the same scalars as metrics.jsonl, at step = its iteration
    run.finish()

The run's id is kept in the checkpoint (train_state.json's `wandb_run_id`), so a resumed run appends
to the same W&B run. `WANDB_MODE=offline` writes it under --wandb-save-dir for `wandb sync` later
(nodes without internet). `wandb` is optional: `pip install -e ".[wandb]"`.
"""
from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path
from typing import Optional

from megatron_patch.training.settings import LoggingSettings


def wandb_missing() -> Optional[str]:
    """Why `wandb` cannot be used here, or None."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def new_run_id() -> str:
    """A fresh W&B run id (lowercase letters and digits, as W&B's own)."""
    return secrets.token_hex(6)


def run_config(args: argparse.Namespace) -> dict:
    """The run's flags as W&B's config: JSON values as they are, anything else (paths, the HF config) as text."""
    config = {}
    for key, value in sorted(vars(args).items()):
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        config[key] = value
    return config


class WandbRun:
    def __init__(self, settings: LoggingSettings, run_id: str, config: dict):
        import wandb

        save_dir = settings.wandb_save_dir
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity,
                              name=settings.wandb_exp_name, dir=save_dir, id=run_id, resume="allow", config=config)

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items()
                   if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(scalars, step=int(record["iteration"]))

    def finish(self) -> None:
        self.run.finish()
