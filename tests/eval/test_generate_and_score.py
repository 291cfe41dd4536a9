"""toolkits/eval: scoring against rouge_score, generation end to end on a tiny HF Idefics2,
--adapter against peft's merged checkpoint, the synthetic shapes set, and eval_all_checkpoints.sh."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rouge_score import rouge_scorer

from toolkits.eval import generate_and_score as gas

pytestmark = pytest.mark.e2e


REPO = Path(__file__).resolve().parents[2]
EVAL_SH = REPO / "toolkits" / "eval" / "eval_all_checkpoints.sh"


def load_script(relative: str):
    """A script of the repo as a module (examples/ is not a package)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shapes = load_script("examples/idefics2/make_shapes_dataset.py")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def error_line(capsys, prog: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


# ---- scoring ---------------------------------------------------------------------------------
def test_score_matches_rouge_score():
    refs = ["a red circle on a blue background", "a green square on a white background",
            "a blue triangle on a red background", "a white circle on a purple background"]
    preds = ["A Red  circle on a blue background ", "a green square on white", "",
             "a white circle on a purple background."]
    result = gas.score(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected_rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs)
    assert result["rouge_l"] == pytest.approx(expected_rouge, abs=1e-12)
    assert 0 < result["rouge_l"] < 1
    # Case and white space are normalised, punctuation is not: only the first one matches.
    assert result["exact_match"] == pytest.approx(1 / 4)
    assert result["num_samples"] == 4
    try:
        import sacrebleu
    except ImportError:
        assert result["bleu"] is None and "sacrebleu" in result["bleu_note"]
    else:
        assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert gas.score([], [])["exact_match"] is None
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        gas.score(["a", "b"], ["a"])


# ---- the shapes set --------------------------------------------------------------------------
def test_shapes_dataset_is_deterministic_truthful_and_held_out(tmp_path):
    for name in ("a", "b"):
        assert shapes.main(["--output-dir", str(tmp_path / name), "--train", "24", "--valid", "8",
                            "--seed", "3"]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 24 + 8 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)

    root = tmp_path / "a"
    splits = {s: json.loads((root / f"{s}.json").read_text()) for s in ("train", "valid")}
    assert [len(splits["train"]), len(splits["valid"])] == [24, 8]
    ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
    assert len(ids["train"]) == 24 and not ids["train"] & ids["valid"]
    assert not {r["image"] for r in splits["train"]} & {r["image"] for r in splits["valid"]}
    seen_shapes = set()
    for record in splits["train"] + splits["valid"]:
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": shapes.PROMPT}
        words = gpt["value"].split()  # "a COLOUR SHAPE on a BACKGROUND background"
        colour, shape, background = words[1], words[2], words[5]
        assert gpt["value"] == shapes.CAPTION.format(colour=colour, shape=shape, background=background)
        assert colour != background and shape in shapes.SHAPES
        seen_shapes.add(shape)
        image = Image.open(root / "images" / record["image"])
        assert image.size == (56, 56) and image.mode == "RGB"
        assert image.getpixel((28, 28)) == shapes.COLOURS[colour], record["id"]
        for corner in ((0, 0), (55, 0), (0, 55), (55, 55)):
            assert image.getpixel(corner) == shapes.COLOURS[background], (record["id"], corner)
        # The shape's share of its bounding box tells the three apart: 1, pi/4 and 1/2.
        mask = (np.asarray(image) == shapes.COLOURS[colour]).all(axis=-1)
        rows, cols = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        expected_fill = {"square": (0.95, 1.0), "circle": (0.7, 0.86), "triangle": (0.4, 0.6)}[shape]
        assert expected_fill[0] <= fill <= expected_fill[1], (record["id"], shape, fill)
    assert seen_shapes == set(shapes.SHAPES)


# ---- generation end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "hf"
    from toolkits.model_checkpoints_convertor.idefics2 import make_tiny_checkpoint

    make_tiny_checkpoint.main(["--save-path", str(path), "--tokenizer", "mistral"])
    return path


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """shapes valid records, a two-round one, and one broken record of each kind (JSONL)."""
    root = tmp_path_factory.mktemp("shapes")
    shapes.main(["--output-dir", str(root), "--train", "1", "--valid", "5"])
    good = json.loads((root / "valid.json").read_text())
    two_rounds = {"id": "two-rounds", "image": good[0]["image"], "conversations": [
        *good[0]["conversations"], {"from": "human", "value": "Say it again, please."},
        {"from": "gpt", "value": "it is " + good[0]["conversations"][1]["value"]}]}
    (root / "images" / "valid" / "garbage.png").write_bytes(b"not a png")
    question = {"from": "human", "value": shapes.PROMPT}
    lines = [json.dumps(r) for r in good[:2]] + [json.dumps(two_rounds)] + [json.dumps(r) for r in good[2:]]
    lines += [
        json.dumps({"id": "missing", "image": "valid/nope.png",
                    "conversations": [question, good[0]["conversations"][1]]}),
        json.dumps({"id": "no-answer", "image": good[1]["image"], "conversations": [question]}),
        json.dumps({"id": "garbage", "image": "valid/garbage.png", "conversations": good[0]["conversations"]}),
        "{this is not json",
        json.dumps({"id": "blank-last-answer", "image": good[1]["image"],
                    "conversations": [*good[1]["conversations"], {"from": "human", "value": "More?"},
                                      {"from": "gpt", "value": " "}]}),
    ]
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")
    good_ids = [r["id"] for r in good[:2]] + ["two-rounds"] + [r["id"] for r in good[2:]]
    return root, good_ids


def run_gas(tiny_hf, data, out: Path, *extra, capsys=None):
    rc = gas.main(["--hf-path", str(tiny_hf), "--data", str(data), "--output", str(out), "--no-progress",
                   "--max-new-tokens", "12", *extra])
    assert rc == 0
    if capsys is not None:
        assert "generate_and_score: " in capsys.readouterr().out
    return read_jsonl(out), json.loads(out.with_suffix(".summary.json").read_text())


@pytest.fixture(scope="module")
def batch4(tiny_hf, eval_data, tmp_path_factory):
    """Predictions and summary of the JSONL set at batch size 4 (shared by two tests)."""
    root, _ = eval_data
    out = tmp_path_factory.mktemp("batch4") / "preds.jsonl"
    return run_gas(tiny_hf, root / "eval.jsonl", out, "--image-folder", str(root / "images"), "--batch-size", "4")


def test_generate_json_and_shards(tiny_hf, eval_data, batch4, tmp_path, capsys):
    root, good_ids = eval_data
    preds4, summary = batch4
    assert [p["id"] for p in preds4] == good_ids
    assert summary["num_samples"] == len(good_ids) and summary["skipped_total"] == 5
    assert summary["skipped"] == {"empty_conversation": 1, "empty_reference": 1, "malformed_record": 1,
                                  "missing_image": 1, "undecodable_image": 1}
    rescored = gas.score([p["prediction"] for p in preds4], [p["reference"] for p in preds4])
    assert {k: summary[k] for k in rescored} == rescored
    two = preds4[good_ids.index("two-rounds")]  # prompt ends before the LAST answer, which is the reference
    assert two["reference"].startswith("it is a ") and "Say it again" in two["prompt"]
    assert two["prompt"].endswith("Assistant:") and two["prompt"].count("Assistant:") == 2
    assert all(p["prediction"] for p in preds4)  # random weights still produce some text

    # Greedy + left padding: the batch (the two-round prompt is longer, so others are padded)
    # must not change any answer.
    preds1, _ = run_gas(tiny_hf, root / "eval.jsonl", tmp_path / "b1.jsonl", "--image-folder", str(root / "images"),
                        "--batch-size", "1", capsys=capsys)
    assert [p["prediction"] for p in preds1] == [p["prediction"] for p in preds4]

    from toolkits.pretrain_data_preprocessing import build_webdataset

    shard_dir = tmp_path / "shards"
    build_webdataset.main(["--input", str(root / "eval.jsonl"), "--image-folder", str(root / "images"),
                           "--output-dir", str(shard_dir), "--samples-per-shard", "3", "--workers", "1",
                           "--no-progress"])
    preds_s, summary_s = run_gas(tiny_hf, shard_dir, tmp_path / "s.jsonl", "--batch-size", "3", "--limit", "5")
    assert summary_s["num_samples"] == 5 and summary_s["skipped"] == {}
    assert preds_s == preds4[:5]  # same images (stored bytes), prompts and answers as from the JSONL


def test_generate_and_score_bad_flags(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = tmp_path / "d.json"
    data.write_text("[]")
    cases = [
        (["--data", str(data)], "--hf-path"),
        (["--hf-path", str(tmp_path / "nope"), "--data", str(data)], "no config.json"),
        (["--hf-path", str(hf), "--data", str(tmp_path / "missing.json")], "does not exist"),
        (["--hf-path", str(hf), "--data", str(data)], "pass --image-folder"),
        (["--hf-path", str(hf), "--data", str(data), "--image-folder", str(tmp_path / "x")], "not a directory"),
        (["--hf-path", str(hf), "--data", str(tmp_path), "--image-folder", str(tmp_path)], "carry their images"),
        (["--hf-path", str(hf), "--data", str(data), "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for argv, message in cases:
        assert gas.main(argv) == 1, argv
        assert message in error_line(capsys, "generate_and_score"), argv


# ---- --adapter ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A peft LoRA adapter with random non-zero B on every text-model projection, saved by peft
    (made on tests/models' tiny Mistral-style Idefics2, whose layers are tiny_hf's)."""
    from tests.models.lora_cases import save_peft_adapter

    folder = tmp_path_factory.mktemp("adapter")
    save_peft_adapter(folder)
    return folder


def test_adapter_answers_as_peft_merged_checkpoint(tiny_hf, eval_data, batch4, adapter_dir, tmp_path, capsys):
    """--adapter on the base answers and scores exactly as the checkpoint peft merged the adapter into,
    and differently from the base alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    root, _ = eval_data
    merged_dir = tmp_path / "merged"
    base = Idefics2ForConditionalGeneration.from_pretrained(tiny_hf).state_dict()
    merged = PeftModel.from_pretrained(Idefics2ForConditionalGeneration.from_pretrained(tiny_hf),
                                       str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    AutoProcessor.from_pretrained(tiny_hf).save_pretrained(merged_dir)

    ours = gas.Generator(str(tiny_hf), "float32", 12, str(adapter_dir)).model.state_dict()
    assert ours.keys() == merged.state_dict().keys()
    changed = []
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)
        if not torch.equal(value, base[name]):
            changed.append(name)
    assert len(changed) == 7 * 4 and all(".text_model.layers." in n and n.endswith("proj.weight") for n in changed)

    flags = ("--image-folder", str(root / "images"), "--limit", "4", "--batch-size", "4")  # 4 good records
    preds_m, summary_m = run_gas(merged_dir, root / "eval.jsonl", tmp_path / "m.jsonl", *flags)
    capsys.readouterr()
    preds_a, summary_a = run_gas(tiny_hf, root / "eval.jsonl", tmp_path / "a.jsonl", *flags,
                                 "--adapter", str(adapter_dir))
    assert f" with adapter {adapter_dir} " in capsys.readouterr().out
    assert [p["prediction"] for p in preds_a] == [p["prediction"] for p in preds_m]
    metrics = ("num_samples", "exact_match", "rouge_l", "bleu")
    assert [summary_a[k] for k in metrics] == [summary_m[k] for k in metrics]
    assert summary_a["adapter"] == str(adapter_dir) and summary_m["adapter"] is None
    base_preds = [p["prediction"] for p in batch4[0][:4]]
    assert all(a["prediction"] != b for a, b in zip(preds_a, base_preds)), (preds_a, base_preds)


def test_adapter_refused_in_one_line(tiny_hf, eval_data, adapter_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, _ = eval_data
    weights = load_file(adapter_dir / "adapter_model.safetensors")

    def variant(name, change):
        """adapter_dir with the weights {key: change(key, tensor)} (None drops the key)."""
        folder = tmp_path / name
        shutil.copytree(adapter_dir, folder)
        changed = {k: change(k, v) for k, v in weights.items()}
        save_file({k: v for k, v in changed.items() if v is not None}, folder / "adapter_model.safetensors")
        return folder

    dora = variant("dora", lambda k, v: v)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    three_layers = variant("three", lambda k, v: None if ".layers.3." in k else v)
    narrow = variant("narrow", lambda k, v: v[:, :-1].contiguous() if ".lora_A." in k else v)  # a base 1 narrower
    cases = [
        (tmp_path, f"--adapter {tmp_path}: no adapter_config.json"),
        (dora, "DoRA (use_dora=True) is not supported"),
        (three_layers, "q_proj has adapters on some layers only"),
    ]
    for folder, message in cases:  # refused before the model loads
        argv = ["--hf-path", str(tiny_hf), "--data", str(root / "eval.jsonl"), "--image-folder", str(root / "images"),
                "--output", str(tmp_path / "p.jsonl"), "--no-progress", "--adapter", str(folder)]
        assert gas.main(argv) == 1, folder
        line = error_line(capsys, "generate_and_score")
        assert message in line and "--lora-load" not in line, line
    with pytest.raises(gas.ToolError, match=r"model\.text_model\.layers\.0\.self_attn\.q_proj\.weight is 48 x 47, "
                                            r"the base's weight \(48, 48\)"):
        gas.Generator(str(tiny_hf), "float32", 12, str(narrow))


# ---- eval_all_checkpoints.sh -----------------------------------------------------------------
def run_sh(*args, env=None):
    return subprocess.run(["bash", str(EVAL_SH), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_eval_all_checkpoints_input_checks(tmp_path, eval_data):
    root, _ = eval_data
    data, images = root / "eval.jsonl", root / "images"
    (tmp_path / "mg").mkdir()
    cases = [
        ((tmp_path / "nope", data, images), "MG_DIR"),
        ((tmp_path / "mg",), "expected MG_DIR DATA"),
        ((tmp_path / "mg", tmp_path / "nope.json", images), "DATA"),
        ((tmp_path / "mg", data), "pass IMAGE_FOLDER"),
        ((tmp_path / "mg", data, images), "no iter_XXXXXXX folders"),
    ]
    for args, message in cases:
        result = run_sh(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("eval_all_checkpoints: error: ") and message in lines[0], lines


FAKE_PYTHON = """#!{python}
# Stands in for the converter and the scorer; runs the table step (python -) for real.
import json, os, sys
script, args = sys.argv[1], sys.argv[2:]
flag = lambda name: args[args.index(name) + 1]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(script), *args]) + "\\n")
if script.endswith("mcore2hf.py"):
    os.makedirs(flag("--save-path"))
elif script.endswith("generate_and_score.py"):
    it = int(os.path.basename(flag("--hf-path"))[len("iter_"):])
    with open(flag("--summary"), "w") as f:
        json.dump({{"exact_match": it / 100, "rouge_l": it / 1000, "bleu": it if it > 5 else None}}, f)
else:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_eval_all_checkpoints_order_and_table(tmp_path, eval_data):
    """Numeric iteration order, only iter_ folders, default EVAL_DIR, EVAL_ARGS, the table's columns."""
    root, _ = eval_data
    mg = tmp_path / "mg"
    for name in ("iter_10000000", "iter_0000005", "iter_9000000", "iter_0000008",  # 10#: not octal
                 "release", "iter_abc", ".iter_0000011.partial"):  # none of these is evaluated
        (mg / name).mkdir(parents=True)
    (mg / "iter_0000003").write_text("a file, not a save")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "log.jsonl"
    result = run_sh(mg, root / "eval.jsonl", root / "images",
                    env={"PYTHON": str(fake), "FAKE_LOG": str(log), "EVAL_ARGS": "--limit 3 --batch-size 2"})
    assert result.returncode == 0, result.stderr
    calls = read_jsonl(log)
    assert [c[c.index("--iteration") + 1] for c in calls if c[0] == "mcore2hf.py"] == ["5", "8", "9000000", "10000000"]
    scorer_calls = [c for c in calls if c[0] == "generate_and_score.py"]
    assert scorer_calls[0][-4:] == ["--limit", "3", "--batch-size", "2"]
    assert scorer_calls[0][scorer_calls[0].index("--image-folder") + 1] == str(root / "images")
    rows = [line.split("\t") for line in (mg / "eval" / "scores.tsv").read_text().splitlines()]
    assert rows == [["iteration", "exact_match", "rouge_l", "bleu"], ["5", "0.0500", "0.0050", "NA"],
                    ["8", "0.0800", "0.0080", "8.0000"],
                    ["9000000", "90000.0000", "9000.0000", "9000000.0000"],
                    ["10000000", "100000.0000", "10000.0000", "10000000.0000"]]


def test_eval_all_checkpoints_runs(tmp_path, tiny_hf, eval_data, batch4):
    root, good_ids = eval_data
    mg = tmp_path / "mg"
    from toolkits.model_checkpoints_convertor.idefics2 import hf2mcore

    assert hf2mcore.main(["--load-path", str(tiny_hf), "--save-path", str(mg)]) == 0
    # hf2mcore writes release/ only; a training save is an iter_ folder with its number in the info file.
    shutil.copytree(mg / "release", mg / "iter_0000007")
    info_path = mg / "iter_0000007" / "checkpoint_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "iteration": 7}))
    out = tmp_path / "eval"
    result = run_sh(mg, root / "eval.jsonl", root / "images",
                    env={"EVAL_DIR": str(out), "EVAL_ARGS": "--limit 4 --max-new-tokens 12"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("\t") for line in (out / "scores.tsv").read_text().splitlines()]
    assert rows[0] == ["iteration", "exact_match", "rouge_l", "bleu"] and [r[0] for r in rows[1:]] == ["7"]
    summary = json.loads((out / "iter_0000007.summary.json").read_text())
    assert rows[1][1:3] == [f"{summary['exact_match']:.4f}", f"{summary['rouge_l']:.4f}"]
    assert "iteration" in result.stdout and "scores.tsv" in result.stdout
    # The exported checkpoint answers exactly as the HF checkpoint it was converted from
    # (the first 4 records are all good ones).
    assert read_jsonl(out / "iter_0000007.preds.jsonl") == batch4[0][:4]
