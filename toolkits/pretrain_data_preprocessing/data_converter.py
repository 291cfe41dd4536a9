"""Validate LLaVA / ShareGPT JSON(L) and convert it to the canonical record format.

The canonical format is documented in ``megatron_patch/data/formats.py``; the shard builder
reads it (and also reads LLaVA / ShareGPT directly, with the same rules).

Examples::

    # report problems only; exit status 1 when any record is invalid
    python toolkits/pretrain_data_preprocessing/data_converter.py --input llava.json --validate-only

    # write valid records as canonical JSONL (invalid ones are reported and left out)
    python toolkits/pretrain_data_preprocessing/data_converter.py --input llava.json \\
        --output train.canonical.jsonl --format auto

``--image-folder DIR`` also checks that every referenced image exists inside DIR.
Records without an ``id`` are named ``#N`` (N = 0-based record number) in reports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

from tqdm import tqdm

from megatron_patch.data import formats
from toolkits.pretrain_data_preprocessing.records_io import check_record, format_flag, read_records

EXAMPLES_PER_KIND = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="LLaVA or ShareGPT .json / .jsonl file")
    p.add_argument("--output", help="canonical JSONL to write")
    p.add_argument("--validate-only", action="store_true", help="report problems, write nothing")
    p.add_argument("--format", default="auto", choices=("auto",) + formats.FORMATS)
    p.add_argument("--max-image-num", type=int, default=5, help="more images -> too_many_images")
    p.add_argument("--image-folder", help="also check that images exist inside this folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.validate_only and not args.output:
        p.error("give --output FILE, or --validate-only")
    if args.max_image_num < 0:
        p.error("--max-image-num must be >= 0")
    return args


def _image_problem(canonical: dict, folder: str) -> str | None:
    root = os.path.realpath(folder)
    for rel in canonical["images"]:
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, full]) != root:
            return formats.PATH_ESCAPE
        if not os.path.isfile(full):
            return formats.MISSING_IMAGE
    return None


def run(args) -> dict:
    """Validate (and convert) ``args.input``; return the summary dict."""
    fmt = format_flag(args.format)
    counts: Counter = Counter()
    examples: dict = defaultdict(list)
    by_format: Counter = Counter()
    read = valid = 0
    out = None
    if args.output and not args.validate_only:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        out = open(args.output, "w", encoding="utf-8")
    try:
        records = tqdm(read_records(args.input), desc="records", unit="rec",
                       disable=getattr(args, "no_progress", True))
        for index, item in records:
            read += 1
            canonical, problems, rid, detected = check_record(index, item, fmt, args.max_image_num)
            if canonical is not None and args.image_folder:
                problem = _image_problem(canonical, args.image_folder)
                problems = [problem] if problem else []
                canonical = None if problem else canonical
            by_format[detected or "unknown"] += 1
            for kind in problems:  # every kind is counted; a record may have several
                counts[kind] += 1
                if len(examples[kind]) < EXAMPLES_PER_KIND:
                    examples[kind].append(rid)
            if canonical is None:
                continue
            valid += 1
            if out is not None:
                out.write(json.dumps(canonical, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            out.close()
    return {"read": read, "valid": valid, "invalid": read - valid, "problems": dict(counts),
            "examples": dict(examples), "formats": dict(by_format)}


def print_summary(summary: dict, stream=sys.stdout) -> None:
    print(f"read {summary['read']}  valid {summary['valid']}  invalid {summary['invalid']}  "
          f"formats {summary['formats']}", file=stream)
    for kind in formats.PROBLEM_KINDS:
        if kind in summary["problems"]:
            ids = ", ".join(summary["examples"][kind])
            print(f"  {kind:<28} {summary['problems'][kind]:>8}  e.g. {ids}", file=stream)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print_summary(summary)
    if args.validate_only:
        return 1 if summary["invalid"] else 0
    print(f"wrote {summary['valid']} canonical records to {args.output}")
    return 0 if summary["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
