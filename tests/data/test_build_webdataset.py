"""build_webdataset.py: exact report on a corpus with every bad kind; shards webdataset can read."""
import filecmp
import glob
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds

from megatron_patch.data.shards import ShardedDataset
from tests.data.corpora import TOOLKIT, build, good_corpus, llava_record, make_image, write_jsonl

pytestmark = pytest.mark.unit


@pytest.fixture()
def bad_corpus(tmp_path):
    """Input with every skip reason; returns (input, image folder, expected skipped, n_valid)."""
    img = tmp_path / "images"
    make_image(str(img / "ok.jpg"), seed=1)
    make_image(str(img / "ok2.png"), seed=2)
    (img / "garbage.jpg").write_bytes(b"not an image at all")
    png = (img / "ok2.png").read_bytes()
    (img / "truncated.png").write_bytes(png[: len(png) // 2])
    make_image(str(tmp_path / "secret.jpg"), seed=3)
    os.symlink(tmp_path / "secret.jpg", img / "link.jpg")  # inside the folder, points outside
    many = [f"m{i}.jpg" for i in range(6)]
    for name in many:
        make_image(str(img / name), seed=4)
    records = [
        llava_record("good-1", ["ok.jpg"]),
        llava_record("good-2", ["ok.jpg", "ok2.png"]),
        llava_record("good-text"),
        {"id": "good-sharegpt", "images": ["ok2.png"],
         "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]},
        {**llava_record("good-noplaceholder"), "image": "ok.jpg"},
        '{"id": "broken", "conversations": [',                       # malformed_record
        "[1, 2, 3]",                                                   # malformed_record
        llava_record("missing", ["nope.jpg"]),                        # missing_image
        llava_record("garbage", ["garbage.jpg"]),                     # undecodable_image
        llava_record("truncated", ["ok.jpg", "truncated.png"]),       # undecodable_image
        llava_record("mismatch", ["ok.jpg"], question="<image> x"),   # image_count_mismatch
        {"id": "empty", "conversations": []},                          # empty_conversation
        {"id": "role", "conversations": [{"from": "robot", "value": "x"},
                                         {"from": "gpt", "value": "y"}]},  # wrong_role
        llava_record("many", many),                                    # too_many_images
        llava_record("escape", ["../secret.jpg"]),                     # image_path_outside_folder
        llava_record("symlink", ["link.jpg"]),                         # image_path_outside_folder
    ]
    expected = {"malformed_record": 2, "missing_image": 1, "undecodable_image": 2,
                "image_count_mismatch": 1, "empty_conversation": 1, "wrong_role": 1,
                "too_many_images": 1, "image_path_outside_folder": 2}
    return write_jsonl(tmp_path / "in.jsonl", records), img, expected, 5


@pytest.mark.parametrize("workers", [1, 3])
def test_bad_corpus_report_is_exact(tmp_path, bad_corpus, workers):
    inp, img, expected, n_valid = bad_corpus
    report = build(inp, img, tmp_path / "out", samples_per_shard=3, workers=workers)
    assert report["read"] == 16
    assert report["written"] == n_valid
    assert report["skipped"] == expected
    assert report["read"] == report["written"] + report["skipped_total"]
    assert report["examples"]["undecodable_image"] == ["garbage", "truncated"]
    assert report["examples"]["malformed_record"] == ["#5", "#6"]
    ds = ShardedDataset(str(tmp_path / "out"))
    ids = sorted(ds.read(i).record["id"] for i in range(len(ds)))
    assert ids == sorted(["good-1", "good-2", "good-text", "good-sharegpt", "good-noplaceholder"])


def test_output_independent_of_workers(tmp_path):
    inp, img = good_corpus(str(tmp_path), "D", 13)
    build(inp, img, tmp_path / "w1", samples_per_shard=3, workers=1)
    build(inp, img, tmp_path / "w3", samples_per_shard=3, workers=3)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w3"))
    assert len(glob.glob(str(tmp_path / "w1" / "*.tar"))) == 5
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "w1", tmp_path / "w3", names, shallow=False)
    assert not mismatch and not errors


def test_webdataset_reads_our_shards(tmp_path):
    inp, img = good_corpus(str(tmp_path), "W", 7)
    build(inp, img, tmp_path / "out", samples_per_shard=3)
    with open(inp) as f:
        source = [json.loads(line) for line in f]
    tars = sorted(glob.glob(str(tmp_path / "out" / "*.tar")))
    seen = 0
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        rec = json.loads(sample["json"])
        src = source[int(sample["__key__"])]
        assert rec["id"] == src["id"]
        for i, rel in enumerate(rec["images"]):
            ext = rel.rsplit(".", 1)[1]
            assert sample[f"{i}.{ext}"] == (img_bytes := open(os.path.join(img, rel), "rb").read())
            assert img_bytes  # stored exactly as on disk
        seen += 1
    assert seen == 7
    index = json.load(open(tmp_path / "out" / "index.json"))
    assert index["num_samples"] == 7 and [s["num_samples"] for s in index["shards"]] == [3, 3, 1]


def test_scan_fallback_without_index(tmp_path):
    inp, img = good_corpus(str(tmp_path), "S", 6)
    out = tmp_path / "out"
    build(inp, img, out, samples_per_shard=4)
    indexed = ShardedDataset(str(out))
    expected = [(indexed.locate(i)[1], indexed.read(i).record, indexed.read(i).images) for i in range(6)]
    for path in glob.glob(str(out / "*.json")):
        if not path.endswith("report.json"):
            os.remove(path)
    scanned = ShardedDataset(str(out))
    assert [(scanned.locate(i)[1], scanned.read(i).record, scanned.read(i).images)
            for i in range(6)] == expected


def test_refuses_to_mix_with_old_shards_and_cli_runs(tmp_path):
    inp, img = good_corpus(str(tmp_path), "C", 3)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(TOOLKIT, "build_webdataset.py"), "--input", str(inp),
           "--image-folder", str(img), "--output-dir", str(out), "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "written 3" in done.stdout
    # Second build into the same folder: one-line refusal, unless --overwrite.
    with pytest.raises(SystemExit, match="--overwrite") as exc:
        build(inp, img, out)
    assert "\n" not in str(exc.value)
    assert build(inp, img, out, extra=["--overwrite"])["written"] == 3
