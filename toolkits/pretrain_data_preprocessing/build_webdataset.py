"""Build webdataset shards (+ index and report) from LLaVA / ShareGPT / canonical JSON(L).

Examples::

    python toolkits/pretrain_data_preprocessing/build_webdataset.py \\
        --input llava_v1_5_mix665k.json --image-folder /data/images \\
        --output-dir /data/shards/llava665k --samples-per-shard 1000 --workers 8

Writes ``OUT/shard-NNNNNN.tar`` (members ``KEY.json`` canonical record and ``KEY.<i>.<ext>``
image bytes as stored), ``OUT/shard-NNNNNN.idx.json`` (member offsets for random access),
``OUT/index.json`` (sample counts) and ``OUT/report.json``::

    {"read": N, "written": W, "skipped_total": S, "skipped": {reason: count},
     "examples": {reason: [ids]}, "formats": {...}, "shards": K}

with read = written + skipped_total. Reasons: see ``megatron_patch/data/formats.py``
(malformed_record, empty_conversation, wrong_role, image_path_outside_folder,
too_many_images, image_count_mismatch, missing_image, undecodable_image).
``--energon`` then writes megatron-energon's ``OUT/.nv-meta/`` too (``energon_prepare.py``).

Determinism: input records are cut into consecutive chunks of ``--samples-per-shard``;
chunk i becomes shard i (fewer samples when some are skipped; none when all are), so the
output does not depend on ``--workers`` or on worker timing.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from itertools import chain, islice

from tqdm import tqdm

from megatron_patch.data import formats
from megatron_patch.data.shards import INDEX_FILE, SIDECAR_SUFFIX, write_index
from toolkits.pretrain_data_preprocessing.records_io import format_flag, read_records
from toolkits.pretrain_data_preprocessing.shard_writer import ShardTask, write_shard

REPORT_FILE = "report.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="LLaVA / ShareGPT / canonical .json or .jsonl")
    p.add_argument("--image-folder", required=True, help="root that image paths are relative to")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--format", default="auto", choices=("auto",) + formats.FORMATS)
    p.add_argument("--max-image-num", type=int, default=5, help="more images -> too_many_images")
    p.add_argument("--shard-prefix", default="shard")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output-dir")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--energon", action="store_true",
                   help="also write megatron-energon's .nv-meta/ (energon_prepare.py; docs/energon.md)")
    args = p.parse_args(argv)
    for flag in ("samples_per_shard", "workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_image_num < 0:
        p.error("--max-image-num must be >= 0")
    if not os.path.isdir(args.image_folder):
        p.error(f"--image-folder {args.image_folder} is not a directory")
    if args.energon and importlib.util.find_spec("megatron.energon") is None:
        p.error("--energon needs megatron-energon: pip install 'megatron_patch[energon]'")
    return args


def _prepare_output(out: str, overwrite: bool) -> None:
    os.makedirs(out, exist_ok=True)
    old = glob.glob(os.path.join(out, "*.tar")) + glob.glob(os.path.join(out, "*" + SIDECAR_SUFFIX))
    old += [p for p in (os.path.join(out, INDEX_FILE), os.path.join(out, REPORT_FILE))
            if os.path.exists(p)]
    old += glob.glob(os.path.join(out, "*.tar.idx"))  # energon's, stale once the tars change
    if old and not overwrite:
        raise SystemExit(f"error: --output-dir {out} already holds shards "
                         f"({os.path.basename(sorted(old)[0])} ...); pass --overwrite or pick another")
    for path in old:
        os.remove(path)
    shutil.rmtree(os.path.join(out, ".nv-meta"), ignore_errors=True)  # describes the old tars


def _tasks(args):
    fmt = format_flag(args.format)
    records = read_records(args.input)
    shard_id = 0
    while chunk := list(islice(records, args.samples_per_shard)):
        yield ShardTask(shard_id, chunk, args.output_dir, args.image_folder, fmt,
                        args.max_image_num, args.shard_prefix)
        shard_id += 1


def build(args) -> dict:
    """Write the shards, ``index.json`` and ``report.json``; return the report."""
    _prepare_output(args.output_dir, args.overwrite)
    results = []
    # Read the first chunk here: input errors (unreadable file, broken JSON array) must
    # surface in the main process, not in the pool's task-feeding thread.
    tasks = _tasks(args)
    first = next(tasks, None)
    tasks = chain([first], tasks) if first is not None else iter(())
    bar = tqdm(desc="records", unit="rec", disable=args.no_progress)
    if args.workers == 1:
        for task in tasks:
            results.append(write_shard(task))
            bar.update(results[-1].read)
    else:
        with multiprocessing.Pool(args.workers) as pool:
            for result in pool.imap_unordered(write_shard, tasks):
                results.append(result)
                bar.update(result.read)
    bar.close()
    results.sort(key=lambda r: r.shard_id)
    infos = [r.shard_info for r in results if r.shard_info is not None]
    write_index(args.output_dir, infos)
    return _write_report(args.output_dir, results, len(infos))


def _write_report(out: str, results: list, num_shards: int) -> dict:
    skipped, fmts, examples = Counter(), Counter(), {}
    for r in results:
        skipped.update(r.skipped)
        fmts.update(r.formats)
        for kind, ids in r.examples.items():
            examples.setdefault(kind, []).extend(ids)
    report = {
        "read": sum(r.read for r in results),
        "written": sum(r.written for r in results),
        "skipped_total": sum(skipped.values()),
        "skipped": {k: skipped[k] for k in formats.PROBLEM_KINDS if skipped[k]},
        "examples": {k: examples[k][:5] for k in formats.PROBLEM_KINDS if k in examples},
        "formats": dict(fmts),
        "shards": num_shards,
    }
    if report["read"] != report["written"] + report["skipped_total"]:  # internal invariant
        raise RuntimeError(f"report does not add up: {report}")
    with open(os.path.join(out, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = build(args)
    print(f"read {report['read']}  written {report['written']}  skipped {report['skipped_total']} "
          f"{report['skipped']}  shards {report['shards']} -> {args.output_dir}")
    if args.energon and report["written"]:
        from toolkits.pretrain_data_preprocessing.energon_prepare import prepare

        counts = prepare(args.output_dir, num_workers=args.workers)
        print(f"energon metadata for {len(counts)} shards -> {os.path.join(args.output_dir, '.nv-meta')}")
    return 0 if report["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
