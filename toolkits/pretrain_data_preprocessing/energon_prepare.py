"""Make one of our shard folders readable by megatron-energon: write its ``.nv-meta/``.

Examples::

    pip install 'megatron_patch[energon]'          # megatron-energon>=7
    python toolkits/pretrain_data_preprocessing/energon_prepare.py /data/shards/llava665k
    python toolkits/pretrain_data_preprocessing/build_webdataset.py ... --energon   # same, after building

This runs energon's own ``energon prepare`` in-process and non-interactively, so ``.nv-meta/``
(``.info.json``, ``split.yaml``, ``index.sqlite``, ``dataset.yaml``) and the ``*.tar.idx`` files
are exactly what energon writes::

    energon prepare DIR --non-interactive --split-ratio 1,0,0 --sample-type CrudeWebdataset

* Split: every shard in ``train``, in name order (``--split-ratio 8,1,1`` for energon's
  train/val/test cut of the shards; energon does not shuffle them unless asked).
* Sample type: ``CrudeWebdataset``. Our samples are multi-image, multi-turn chats, which no
  built-in energon type holds faithfully; energon users cook them with
  ``megatron_patch.data.energon.chat_cooker()`` (see docs/energon.md).
* Afterwards the sample counts energon recorded are checked against our ``index.json``.

The tars are not touched; our own ``index.json`` and sidecars stay valid, and the training
loader keeps using them (``megatron_patch.data.datasets.open_dataset``).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys

from megatron_patch.data.energon import META_DIR, read_shard_counts
from megatron_patch.data.shards import INDEX_FILE

SAMPLE_TYPE = "CrudeWebdataset"


def _energon_prepare_command():
    try:
        from megatron.energon.tools.prepare import command
    except ImportError as exc:
        raise SystemExit("error: energon_prepare needs megatron-energon: "
                         f"pip install 'megatron_patch[energon]' ({exc})") from None
    return command


def prepare(shard_dir: str, split_ratio: str = "1,0,0", num_workers: int = 1,
            overwrite: bool = False, quiet: bool = True) -> dict:
    """Write ``shard_dir/.nv-meta``; return energon's ``{shard: count}``. ``SystemExit`` on failure."""
    if not os.path.isdir(shard_dir):
        raise SystemExit(f"error: {shard_dir} is not a directory")
    if not glob.glob(os.path.join(shard_dir, "*.tar")):
        raise SystemExit(f"error: {shard_dir} holds no *.tar shards")
    command = _energon_prepare_command()
    import click

    args = [shard_dir, "--non-interactive", "--split-ratio", split_ratio, "--sample-type", SAMPLE_TYPE,
            "--num-workers", str(num_workers), "--no-progress"]
    if overwrite:
        args.append("--force-overwrite")
    log = io.StringIO()
    try:
        # energon prints the first samples' JSON and some advice; keep it for failures only.
        with contextlib.redirect_stdout(log if quiet else sys.stdout):
            command.main(args=args, prog_name="energon prepare", standalone_mode=False)
    except click.ClickException as exc:
        sys.stderr.write(log.getvalue())
        if "already been prepared" in exc.format_message():
            raise SystemExit(f"error: {shard_dir} already has energon metadata ({META_DIR}/); "
                             "pass --overwrite to redo it") from None
        raise SystemExit(f"error: energon prepare {shard_dir}: {exc.format_message()}") from None
    except SystemExit:
        sys.stderr.write(log.getvalue())
        raise
    counts = read_shard_counts(shard_dir)
    _check_against_index(shard_dir, counts)
    return counts


def _check_against_index(shard_dir: str, counts: dict) -> None:
    """energon's per-shard counts must be our index's: both count the same tars."""
    index_path = os.path.join(shard_dir, INDEX_FILE)
    if not os.path.exists(index_path):
        return
    with open(index_path, encoding="utf-8") as f:
        ours = {s["name"]: s["num_samples"] for s in json.load(f)["shards"]}
    if counts != ours:
        diff = sorted(set(ours.items()) ^ set(counts.items()))[:3]
        raise SystemExit(f"error: {shard_dir}/{META_DIR}/.info.json disagrees with {index_path} "
                         f"(e.g. {diff}); other tars in the folder?")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shard_dir", help="folder written by build_webdataset.py")
    p.add_argument("--split-ratio", default="1,0,0",
                   help="energon's train,val,test ratio over the shards (default: all train)")
    p.add_argument("--num-workers", type=int, default=1, help="processes indexing the tars")
    p.add_argument("--overwrite", action="store_true", help="redo an existing .nv-meta/")
    p.add_argument("--verbose", action="store_true", help="show energon's own output")
    args = p.parse_args(argv)
    if args.num_workers < 1:
        p.error("--num-workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = prepare(args.shard_dir, args.split_ratio, args.num_workers, args.overwrite,
                     quiet=not args.verbose)
    print(f"energon metadata for {len(counts)} shards, {sum(counts.values())} samples "
          f"-> {os.path.join(args.shard_dir, META_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
