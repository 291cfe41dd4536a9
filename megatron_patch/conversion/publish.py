"""Putting a converter's output in place: build aside, compare with what is there, rename.

A tool builds its output in a staging folder next to the save path. If the save path already holds
the very same files, nothing changes ("identical"); if it holds something different, the tool
refuses unless `--overwrite` was given; a folder that is not a checkpoint of the expected kind is
never deleted, even with `--overwrite`.
"""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path
from typing import Optional

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import commit


def first_difference(a, b) -> Optional[str]:
    """None when folders `a` and `b` hold the same files with the same bytes, else the first difference."""
    a, b = Path(a), Path(b)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        only = sorted(set(files_a) ^ set(files_b))
        return f"file {only[0]} is only in one of them"
    for rel in files_a:
        if not filecmp.cmp(a / rel, b / rel, shallow=False):
            return f"file {rel} differs"
    return None


def publish(staging, final, overwrite: bool, what: str) -> str:
    """Move `staging` to `final`: returns 'created', 'identical' (staging dropped) or 'replaced'."""
    staging, final = Path(staging), Path(final)
    if final.exists() and not any(final.iterdir()):
        final.rmdir()  # an empty folder made by the user
    if not final.exists():
        commit(staging, final)
        return "created"
    difference = first_difference(staging, final)
    if difference is None:
        shutil.rmtree(staging)
        return "identical"
    if not overwrite:
        raise CheckpointError(f"{final} already holds a different {what} ({difference}); pass --overwrite to replace it")
    commit(staging, final, replace=True)
    return "replaced"
