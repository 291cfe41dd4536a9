"""Directory layout of a Megatron checkpoint: iteration folders, the tracker file, per-rank folders.

    MG_DIR/
      latest_checkpointed_iteration.txt   "release" or the latest iteration number, written last
      release/                            a converted (or hand-promoted) checkpoint
      iter_0000010/                       a training save at iteration 10
        checkpoint_info.json              layout + format version (see info.py)
        hf_config/                        HF config.json + tokenizer/processor files (config_files.py)
        mp_rank_00_000/                   TP rank 00, PP stage 000 ("mp_rank_00" when PP = 1)
          model-00001.safetensors ...     model tensors, canonical megatron-core names (model_files.py)
          model.safetensors.index.json
          (optimizer / RNG state: *.pt files written by training, read with weights_only=True)

This is the tracker/iteration layout Megatron-LM users know. Folders are built under a hidden
staging sibling (`.iter_0000010.partial`) and renamed into place once complete and verified, so a
crash never leaves a half-written iteration behind a tracker that names it.
Retention (`prune_iterations`) renames a folder to `.iter_0000010.deleting` before removing it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from megatron_patch.checkpoint.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
Iteration = Union[int, str]  # an iteration number, or RELEASE

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def parse_iteration(value) -> Iteration:
    """An iteration from user input: an int, a digit string, 'release', or an `iter_XXXXXXX` name."""
    if isinstance(value, int) and value >= 0:
        return value
    text = str(value).strip()
    if text == RELEASE:
        return RELEASE
    match = _ITER_DIR.match(text)
    if match:
        return int(match.group(1))
    if text.isdigit():
        return int(text)
    raise CheckpointError(f"iteration {value!r} is neither a non-negative number nor '{RELEASE}'")


def iteration_dir_name(iteration: Iteration) -> str:
    iteration = parse_iteration(iteration)
    return RELEASE if iteration == RELEASE else f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's per-rank folder name: mp_rank_TT when PP = 1, mp_rank_TT_PPP otherwise."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(ckpt_dir) -> Optional[Iteration]:
    """The iteration the tracker names, or None when there is no tracker file."""
    path = Path(ckpt_dir) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return parse_iteration(text)
    except CheckpointError:
        raise CheckpointError(f"tracker {path} holds {text!r}; expected an iteration number or '{RELEASE}'") from None


def write_durable(path, text: str) -> None:
    """Write a small text file and fsync it (a crash after this returns keeps its content)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """fsync a folder, so the names created, renamed or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file and folder under `root` (and `root`) before it is published by a rename.

    Ranks fsync the files they write themselves (on a shared filesystem only the writer's fsync
    counts); this pass covers files copied by rank 0 and every folder entry."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def write_tracker(ckpt_dir, iteration: Iteration) -> None:
    """Point the tracker at `iteration`: written aside, fsynced, then atomically renamed over the
    old one and the folder fsynced (readers and crashes see the old or the new content)."""
    path = Path(ckpt_dir) / TRACKER_FILE
    tmp = path.with_name(f".{TRACKER_FILE}.tmp")
    write_durable(tmp, f"{parse_iteration(iteration)}\n")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_iterations(ckpt_dir) -> list:
    """Iterations present as folders: numbers ascending, then 'release' when present."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    numbers = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name)))
    return numbers + ([RELEASE] if (root / RELEASE).is_dir() else [])


def resolve_iteration(ckpt_dir, iteration: Optional[Iteration] = None) -> tuple:
    """(iteration, folder) to load: the given one, else the one the tracker names."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    available = list_iterations(root)
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(
                f"{root} has no {TRACKER_FILE}; pass the iteration to load explicitly "
                f"(folders present: {', '.join(map(str, available)) or 'none'})"
            )
        source = f"the tracker {root / TRACKER_FILE}"
    else:
        iteration = parse_iteration(iteration)
        source = "the requested iteration"
    folder = root / iteration_dir_name(iteration)
    if not folder.is_dir():
        raise CheckpointError(
            f"{source} names iteration {iteration}, but {folder} does not exist "
            f"(folders present: {', '.join(map(str, available)) or 'none'})"
        )
    return iteration, folder


def holds_checkpoint(ckpt_dir) -> bool:
    """True when the folder has a tracker or any iteration folder."""
    return read_tracker(ckpt_dir) is not None or bool(list_iterations(ckpt_dir))


def staging_path(final) -> Path:
    """Hidden sibling a folder is built in before it is renamed to `final` (same filesystem)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def fresh_staging(final) -> Path:
    """An empty staging folder for `final` (a stale one from a crashed run is removed first)."""
    staging = staging_path(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(staging, final, replace: bool = False) -> None:
    """Rename the finished staging folder to `final`; an existing `final` is replaced only if asked."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        if not replace:
            raise CheckpointError(f"{final} already exists; pass --overwrite to replace it")
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)  # kept until the new folder is in place
        os.rename(staging, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.rename(staging, final)
    fsync_dir(final.parent)


def _deleting_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.deleting")


def prune_iterations(ckpt_dir, keep: int) -> list:
    """Delete all but the `keep` newest iteration folders; never the tracker's, nor release. Each
    goes by a rename to a hidden `.iter_XXXXXXX.deleting` name first, so a kill in the middle of its
    removal leaves no folder that looks complete; leftovers of such a kill are removed here too.
    Call it only once the new checkpoint is committed and the tracker names it. Returns the deleted
    iterations."""
    root = Path(ckpt_dir)
    for leftover in root.glob(".iter_*.deleting"):
        shutil.rmtree(leftover)
    numbers = [i for i in list_iterations(root) if i != RELEASE]
    protected = set(numbers[-keep:]) | {read_tracker(root)}
    deleted = [i for i in numbers if i not in protected]
    for iteration in deleted:
        folder = root / iteration_dir_name(iteration)
        os.rename(folder, _deleting_path(folder))
        fsync_dir(root)  # the rename is durable before the files go
        shutil.rmtree(_deleting_path(folder))
    return deleted
