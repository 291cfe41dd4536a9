"""Generate answers with a Hugging Face Idefics2 checkpoint and score them against the references.

    python toolkits/eval/generate_and_score.py --hf-path runs/tiny/hf \\
        --data runs/shapes/valid.json --image-folder runs/shapes/images \\
        [--max-new-tokens 32] [--batch-size 8] [--limit N] [--output preds.jsonl] [--summary S.json]
    python toolkits/eval/generate_and_score.py --hf-path HF_DIR --data SHARD_DIR    # webdataset shards
    python toolkits/eval/generate_and_score.py --hf-path HF_DIR --adapter PEFT_DIR ...  # a LoRA adapter on HF_DIR

--data is a LLaVA / ShareGPT .json or .jsonl file (then --image-folder is required: image paths are
relative to it) or a shard folder written by build_webdataset.py (images inside the shards). For
each record the prompt is every turn before its LAST assistant turn, and the reference is that
turn's text; the prompt is rendered with the processor's chat template (add_generation_prompt=True)
and answered by greedy `generate` in left-padded batches (the batch size does not change answers).
Generation stops at the tokenizer's EOS or `<end_of_utterance>`, or after --max-new-tokens.

--adapter PEFT_DIR evaluates a peft LoRA adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, as peft's save_pretrained writes) on --hf-path as its base: the folder is
checked as `--lora-load` checks it (plain LoRA on every layer of the projections it targets; anything
else is one error line) and merged into the model as mcore2hf merges a LoRA checkpoint (`W + alpha / r
* B @ A` in float32, cast back to --dtype), which is what a plain LoRA adapter computes at eval time.
The summary names the adapter.

Bad records are skipped and counted by reason, never fatal: the formats.py problem kinds
(malformed_record, empty_conversation -- also a record with no assistant turn -- wrong_role, ...),
missing_image, undecodable_image, empty_reference (the last assistant turn is blank) and the shard
read errors of shards.py (bad_json, corrupt_tar_member, ...). --limit N takes the
first N records of --data, skipped ones included.

Writes --output (default `preds.jsonl` in the current folder): one JSON line per scored sample,
{"id", "prompt", "reference", "prediction"}; and --summary (default `<output without suffix>.summary.json`):
num_samples, skipped {reason: count}, exact_match (after casefolding and collapsing white space),
rouge_l (mean rougeL F-measure from the `rouge_score` package), bleu (sacrebleu corpus BLEU, 0-100;
null with `bleu_note` when sacrebleu is not installed), adapter (--adapter's folder or null). Runs on
the GPU when CUDA is available (bfloat16 unless --dtype says otherwise), else on the CPU in float32.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from megatron_patch.data import formats
from megatron_patch.data.errors import ShardIndexError, SkipSample
from megatron_patch.errors import UserError

PROG = "generate_and_score"
NORMALISATION = "casefold, white space collapsed to single spaces, stripped"
EMPTY_REFERENCE = "empty_reference"  # the last assistant turn is blank (formats.py accepts that)
END_OF_UTTERANCE = "<end_of_utterance>"


class ToolError(UserError):
    """A bad flag or input: reported as one `generate_and_score: error: ...` line, exit 1."""


# ---- scoring ---------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Exact-match normalisation: casefold and collapse white space (punctuation is kept)."""
    return " ".join(text.casefold().split())


def score(predictions: list[str], references: list[str]) -> dict:
    """exact_match, rouge_l (mean rougeL F-measure, rouge_score) and bleu (sacrebleu, if installed)."""
    if len(predictions) != len(references):
        raise ValueError(f"score: {len(predictions)} predictions but {len(references)} references")
    from rouge_score import rouge_scorer

    n = len(predictions)
    result = {"num_samples": n, "exact_match": None, "rouge_l": None, "bleu": None}
    if n:
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        result["exact_match"] = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / n
        result["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n
    try:
        import sacrebleu
    except ImportError:
        result["bleu_note"] = "sacrebleu is not installed (pip install sacrebleu); bleu not computed"
        return result
    if n:
        result["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    return result


# ---- reading samples ---------------------------------------------------------------------------
@dataclass
class Sample:
    """One record ready for generation."""

    id: str
    messages: list   # canonical turns before the last assistant turn
    reference: str
    images: list     # PIL images, one per <image> placeholder of `messages`


def decode_image(source, what: str):
    """A path or bytes -> RGB PIL image; SkipSample when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SkipSample(formats.UNDECODABLE_IMAGE, f"{what}: {exc}") from None


def read_json_records(path: str) -> list:
    """Records of a JSON array or JSONL file; a JSONL line that is not JSON stays as None (malformed)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"--data {path} cannot be read ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ToolError(f"--data {path} starts with '[' but is not valid JSON ({exc})") from None
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append(None)
    return records


def json_loaders(path: str, image_folder: str) -> list[Callable]:
    """One loader per record: () -> (canonical record, images) or SkipSample."""
    def loader(index: int, item) -> Callable:
        def load():
            try:
                record = formats.to_canonical(item, index=index)
            except formats.RecordError as exc:
                raise SkipSample(exc.problems[0], str(exc)) from None
            images = []
            for rel in record["images"]:
                full = os.path.join(image_folder, rel)
                if not os.path.isfile(full):
                    raise SkipSample(formats.MISSING_IMAGE, f"record {record['id']}: {full}")
                images.append(decode_image(full, f"record {record['id']}: {full}"))
            return record, images
        return load
    return [loader(i, item) for i, item in enumerate(read_json_records(path))]


def shard_loaders(shard_dir: str) -> list[Callable]:
    from megatron_patch.data.shards import ShardedDataset

    try:
        dataset = ShardedDataset(shard_dir)
    except ShardIndexError as exc:
        raise ToolError(str(exc)) from None

    def loader(index: int) -> Callable:
        def load():
            raw = dataset.read(index)  # BadSample is a SkipSample
            record = raw.record
            rid = str(record.get("id", raw.key))
            problems = formats.validate_record(record)  # shards hold canonical records; check anyway
            if problems:
                raise SkipSample(problems[0], f"record {rid} in {raw.shard}")
            record = {**record, "id": rid}
            return record, [decode_image(b, f"record {rid} image {i}") for i, b in enumerate(raw.images)]
        return load
    return [loader(i) for i in range(len(dataset))]


def to_sample(record: dict, images: list) -> Sample:
    """Split at the last assistant turn; keep the images whose placeholders lie in the prompt."""
    messages = record["messages"]
    # Validated records have an assistant turn with text, but the last one may be blank.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reference = messages[last]["content"]
    if not reference.strip():
        raise SkipSample(EMPTY_REFERENCE, f"record {record['id']}")
    prompt = messages[:last]
    return Sample(record["id"], prompt, reference, images[: formats.count_placeholders(prompt)])


def iter_samples(loaders: list[Callable], skipped: Counter, progress: bool) -> Iterator[Sample]:
    """Good samples in input order; bad ones counted in `skipped` under their reason."""
    from tqdm import tqdm

    for load in tqdm(loaders, desc=PROG, unit="sample", disable=not progress):
        try:
            yield to_sample(*load())
        except SkipSample as exc:
            skipped[exc.reason] += 1


def batched(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    """Consecutive groups of `size` (the last may be shorter); images stay lazy until their batch."""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- generation --------------------------------------------------------------------------------
def read_adapter(folder: str, hf_config):
    """The LoraSettings of a peft folder made on the Idefics2 of `hf_config`; a ToolError (one line,
    naming --adapter) for a folder that is not one."""
    from megatron_patch.models.idefics2.peft_adapter import PeftAdapterError, read_adapter_settings

    try:
        return read_adapter_settings(folder, hf_config, flag="--adapter")
    except PeftAdapterError as exc:
        raise ToolError(str(exc)) from None


def merge_adapter(model, folder: str) -> None:
    """Merge the peft LoRA adapter in `folder` into the HF Idefics2 `model` (W + alpha / r * B @ A, as
    mcore2hf merges a LoRA checkpoint)."""
    import torch

    from megatron_patch.checkpoint.errors import CheckpointError
    from megatron_patch.conversion.lora_export import AdapterMerge

    merge = AdapterMerge.of_peft_folder(folder, read_adapter(folder, model.config))
    try:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                weight.copy_(merge(name, weight))
        merge.check_all_merged()
    except CheckpointError as exc:
        raise ToolError(f"--adapter {exc}") from None


class Generator:
    """Model + processor of one HF folder (plus a peft LoRA adapter, if given); `__call__` answers a
    batch of samples greedily."""

    def __init__(self, hf_path: str, dtype: str, max_new_tokens: int, adapter: str | None = None):
        import torch
        from transformers import AutoProcessor, Idefics2ForConditionalGeneration

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        try:
            self.processor = AutoProcessor.from_pretrained(hf_path)
            self.model = Idefics2ForConditionalGeneration.from_pretrained(hf_path, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise ToolError(f"--hf-path {hf_path} does not load as an Idefics2 checkpoint ({exc})") from None
        if not hasattr(self.processor, "image_processor"):
            raise ToolError(f"--hf-path {hf_path} has no image processor (processor_config.json); "
                            "export it with mcore2hf.py or save an Idefics2Processor there")
        self.model.to(self.device).eval()
        if adapter:
            merge_adapter(self.model, adapter)
        tok = self.tokenizer = self.processor.tokenizer
        tok.padding_side = "left"  # generated tokens must follow the prompt directly
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # left pads are masked out, so any id serves
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if END_OF_UTTERANCE in tok.get_vocab():
            eos.append(tok.convert_tokens_to_ids(END_OF_UTTERANCE))  # Idefics2 ends each turn with it
        self.eos, self.max_new_tokens = sorted(set(eos)), max_new_tokens

    def prompt(self, sample: Sample) -> str:
        from megatron_patch.data.chat import content_parts

        messages = [{"role": m["role"], "content": content_parts(m["content"])} for m in sample.messages]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, samples: list[Sample], prompts: list[str]) -> list[str]:
        import torch

        images = [s.images for s in samples] if any(s.images for s in samples) else None
        inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ---- command line -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other bad input
        raise ToolError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", required=True, help="HF Idefics2 folder (model + processor)")
    p.add_argument("--data", required=True, help="LLaVA/ShareGPT .json/.jsonl file, or a shard folder")
    p.add_argument("--image-folder", help="root of the image paths of a JSON/JSONL --data")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="use only the first N records of --data")
    p.add_argument("--output", default="preds.jsonl", help="predictions JSONL (default: ./preds.jsonl)")
    p.add_argument("--summary", help="summary JSON (default: <output without suffix>.summary.json)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--adapter", help="peft LoRA adapter folder to evaluate on --hf-path (its base)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for flag in ("max_new_tokens", "batch_size", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ToolError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isfile(os.path.join(args.hf_path, "config.json")):
        raise ToolError(f"--hf-path {args.hf_path} is not an HF checkpoint folder (no config.json)")
    if not os.path.exists(args.data):
        raise ToolError(f"--data {args.data} does not exist")
    if os.path.isdir(args.data):
        if args.image_folder:
            raise ToolError(f"--image-folder is for JSON/JSONL --data; the shards in {args.data} carry their images")
    elif not args.image_folder:
        raise ToolError(f"--data {args.data} is a JSON/JSONL file: pass --image-folder (its image paths' root)")
    elif not os.path.isdir(args.image_folder):
        raise ToolError(f"--image-folder {args.image_folder} is not a directory")
    if args.adapter:  # a bad folder fails before the model loads
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(args.hf_path)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ToolError(f"--hf-path {args.hf_path} does not load as an Idefics2 checkpoint ({exc})") from None
        read_adapter(args.adapter, hf_config)
    args.summary = args.summary or str(Path(args.output).with_suffix(".summary.json"))
    return args


def run(args: argparse.Namespace) -> dict:
    if os.path.isdir(args.data):
        loaders = shard_loaders(args.data)
    else:
        loaders = json_loaders(args.data, args.image_folder)
    loaders = loaders[: args.limit]
    generator = Generator(args.hf_path, args.dtype, args.max_new_tokens, args.adapter)
    skipped: Counter = Counter()
    predictions, references = [], []
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out:
        for batch in batched(iter_samples(loaders, skipped, not args.no_progress), args.batch_size):
            prompts = [generator.prompt(s) for s in batch]
            for s, prompt, pred in zip(batch, prompts, generator(batch, prompts)):
                out.write(json.dumps({"id": s.id, "prompt": prompt, "reference": s.reference,
                                      "prediction": pred}, ensure_ascii=False) + "\n")
                predictions.append(pred)
                references.append(s.reference)
    summary = score(predictions, references)
    summary.update(skipped=dict(sorted(skipped.items())), skipped_total=sum(skipped.values()),
                   exact_match_normalisation=NORMALISATION, hf_path=args.hf_path, adapter=args.adapter, data=args.data,
                   output=args.output, max_new_tokens=args.max_new_tokens)
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _metric(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_line(s: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    adapter = f" with adapter {s['adapter']}" if s.get("adapter") else ""
    return (f"{PROG}: {s['num_samples']} samples{adapter} (skipped: {skipped}); "
            f"exact_match {_metric(s['exact_match'])} rouge_l {_metric(s['rouge_l'])} bleu {_metric(s['bleu'])}; wrote {s['output']}")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        summary = run(args)
    except ToolError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(summary_line(summary))
    if summary["num_samples"] == 0:
        print(f"{PROG}: error: no usable samples in --data {args.data} (all {summary['skipped_total']} "
              f"skipped; see {args.summary})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
