"""megatron-energon interop, judged by energon itself.

A: shards built by our tool + ``energon_prepare`` (through ``build_webdataset.py --energon``) are
   read by energon's own loader, with our ``chat_cooker``, as ``ShardedDataset`` reads them.
B: a LLaVA-style webdataset written the way Megatron-LM's recipe does (``webdataset.TarWriter``,
   ``KEY.jpg`` + ``KEY.json`` = the conversation) and prepared by the real ``energon prepare``
   command (in-process) is read by ``EnergonDataset`` as energon yields it, and trains through ``ResumableLoader``.
"""
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

energon = pytest.importorskip(
    "megatron.energon", reason="megatron-energon is not installed (pip install 'megatron_patch[energon]')")

from megatron_patch.data.collate import collate  # noqa: E402
from megatron_patch.data.datasets import open_dataset  # noqa: E402
from megatron_patch.data.encoder import SampleEncoder  # noqa: E402
from megatron_patch.data.energon import EnergonDataset, chat_cooker  # noqa: E402
from megatron_patch.data.errors import BadSample, ShardIndexError  # noqa: E402
from megatron_patch.data.loader import ResumableLoader  # noqa: E402
from megatron_patch.data.shards import ShardedDataset  # noqa: E402
from tests.data.corpora import REPO, build, good_corpus  # noqa: E402
from tests.data.encoder_fixtures import tokenizer_dir  # noqa: E402

pytestmark = pytest.mark.unit


ROLES = {"human": "user", "gpt": "assistant"}


def energon_samples(path, split_part, cooker):
    """Every sample of ``split_part`` as energon's own loader yields it: one rank, no workers,
    validation mode (no shuffling), no decoding (the stored bytes)."""
    class TaskEncoder(energon.DefaultTaskEncoder):
        decoder = None
        cookers = [cooker]

    worker_config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = energon.get_val_dataset(str(path), split_part=split_part, worker_config=worker_config,
                                      batch_size=None, task_encoder=TaskEncoder())
    return list(energon.get_loader(dataset))


@energon.stateless
def raw_cook(crude):
    return crude


RAW_COOKER = energon.Cooker(raw_cook)


# ---- A: our shards, read by energon -------------------------------------------------------
@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """13 samples with 0-3 images each (png and jpg), 4 per shard, built with --energon."""
    root = str(tmp_path_factory.mktemp("energon_ours"))
    inp, img = good_corpus(root, "E", 13, images_per_record=(0, 1, 2, 3))
    out = os.path.join(root, "shards")
    build(inp, img, out, samples_per_shard=4, extra=["--energon"])
    return out


def test_energon_reads_our_shards_as_we_do(ours):
    expected = {}
    shards = ShardedDataset(ours)
    for i in range(len(shards)):
        raw = shards.read(i)
        expected[raw.key] = (raw.record["id"], raw.record["messages"], raw.images, raw.image_exts)
    got = {s.__key__: (s.id, s.messages, s.images, s.image_exts)
           for s in energon_samples(ours, "train", chat_cooker())}
    assert got == expected
    assert max(len(v[2]) for v in got.values()) == 3  # multi-image samples made it through
    with open(os.path.join(ours, ".nv-meta", ".info.json")) as f:
        counts = json.load(f)["shard_counts"]
    with open(os.path.join(ours, "index.json")) as f:
        assert counts == {s["name"]: s["num_samples"] for s in json.load(f)["shards"]}


def test_cooked_samples_pickle_and_energon_is_not_imported_for_reading(ours):
    sample = energon_samples(ours, "train", chat_cooker())[2]
    back = pickle.loads(pickle.dumps(sample))  # energon's workers send samples across processes
    assert (back.id, back.messages, back.images) == (sample.id, sample.messages, sample.images)
    code = ("import sys, megatron_patch.data.datasets as d, megatron_patch.data.energon as e; "
            "assert 'megatron.energon' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_both_readers_agree_and_open_dataset_picks_ours(ours, tmp_path):
    assert type(open_dataset(ours)) is ShardedDataset  # index.json wins over .nv-meta
    shards, theirs = ShardedDataset(ours), EnergonDataset(ours)
    assert len(theirs) == len(shards)
    for i in range(len(shards)):
        a, b = shards.read(i), theirs.read(i)
        assert (a.key, a.record, a.images, a.image_exts) == (b.key, b.record, b.images, b.image_exts)
        assert theirs.locate(i) == shards.locate(i)
    copy = tmp_path / "no_index"
    shutil.copytree(ours, copy)
    os.remove(copy / "index.json")
    assert type(open_dataset(str(copy))) is EnergonDataset


def test_prepare_refuses_to_redo_unless_asked(ours, tmp_path):
    from toolkits.pretrain_data_preprocessing import energon_prepare

    copy = str(tmp_path / "again")
    shutil.copytree(ours, copy)
    with pytest.raises(SystemExit, match="already has energon metadata.*--overwrite"):
        energon_prepare.main([copy])
    assert energon_prepare.main([copy, "--overwrite"]) == 0
    with pytest.raises(SystemExit, match="holds no \\*.tar"):
        energon_prepare.main([str(tmp_path)])


def test_rebuilding_drops_stale_energon_metadata(tmp_path):
    inp, img = good_corpus(str(tmp_path), "S", 3)
    out = tmp_path / "shards"
    build(inp, img, out, extra=["--energon"])
    assert (out / ".nv-meta" / "split.yaml").exists() and list(out.glob("*.tar.idx"))
    build(inp, img, out, extra=["--overwrite"])  # the old metadata would describe the old tars
    assert not (out / ".nv-meta").exists() and not list(out.glob("*.tar.idx"))


# ---- B: Megatron-LM's LLaVA webdataset, read by us ------------------------------------------
def _image_bytes(seed, fmt):
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _conversation(i):
    conv = [{"from": "human", "value": f"<image>\nCaption {i}."}, {"from": "gpt", "value": f"A picture {i}."}]
    if i % 3 == 1:  # multi-turn
        conv += [{"from": "human", "value": "And the colours?"}, {"from": "gpt", "value": "Noise."}]
    if i == 5:  # no placeholder: LLaVA's convention puts the image before the first question
        conv[0]["value"] = "What is this?"
    return conv


def expected_messages(conv):
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conv]
    if "<image>" not in messages[0]["content"]:
        messages[0]["content"] = "<image>\n" + messages[0]["content"]
    return messages


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """3 shards x 3 samples; ``energon prepare`` CLI: shards 0-1 train, shard 2 val."""
    import webdataset

    root = tmp_path_factory.mktemp("energon_llava") / "wds"
    root.mkdir()
    for shard in range(3):
        with webdataset.TarWriter(str(root / f"pretrain-{shard}.tar")) as sink:
            for j in range(3):
                i = shard * 3 + j
                ext = "png" if i == 4 else "jpg"
                sink.write({"__key__": f"{4539375 + i:09d}", ext: _image_bytes(i, ext.replace("jpg", "jpeg")),
                            "json": json.dumps(_conversation(i)).encode("utf-8")})
    from megatron.energon.cli.main import main as energon_cli  # the `energon` command, in-process

    energon_cli.main(["prepare", str(root), "--non-interactive", "--split-parts", r"train:pretrain-[01]\.tar",
                      "--split-parts", r"val:pretrain-2\.tar", "--sample-type", "CrudeWebdataset",
                      "--no-progress", "--num-workers", "1"], standalone_mode=False)
    return str(root)


def _energon_view(path, split_part):
    out = {}
    for s in energon_samples(path, split_part, RAW_COOKER):
        image = next(s[k] for k in ("jpg", "png") if k in s)
        out[s["__key__"]] = (expected_messages(json.loads(s["json"])), [image])
    return out


@pytest.mark.parametrize("split_part, size", [("train", 6), ("val", 3)])
def test_energon_dataset_reads_what_energon_yields(llava, split_part, size):
    ds = open_dataset(llava, split_part)
    assert type(ds) is EnergonDataset and len(ds) == ds.num_samples == size
    ours = {}
    for i in range(len(ds)):
        raw = ds.read(i)
        assert ds.locate(i) == (raw.shard, raw.key)
        ours[raw.key] = (raw.record["messages"], raw.images)
        assert raw.record["id"] == raw.key and len(raw.record["images"]) == 1
    assert ours == _energon_view(llava, split_part)


def test_excludes_and_missing_sqlite_follow_energon(llava, tmp_path):
    copy = str(tmp_path / "wds")
    shutil.copytree(llava, copy)
    split = os.path.join(copy, ".nv-meta", "split.yaml")
    with open(split) as f:
        text = f.read()
    with open(split, "w") as f:  # energon's syntax: SHARD/KEY drops that sample (ignored if none)
        f.write(text.replace("exclude: []", "exclude:\n- pretrain-0.tar/004539376\n- pretrain-1.tar/nokey"))
    sqlite = os.path.join(copy, ".nv-meta", "index.sqlite")
    os.remove(sqlite)  # our reader falls back to scanning the tars
    ds = EnergonDataset(copy)
    keys = {ds.read(i).key for i in range(len(ds))}
    assert len(ds) == 5 and "004539376" not in keys
    shutil.copy(os.path.join(llava, ".nv-meta", "index.sqlite"), sqlite)  # energon needs it
    assert keys == set(_energon_view(copy, "train"))


def encode_id(record, images):
    return {"id": record["id"], "sizes": [im.size for im in images]}


def collate_ids(samples):
    return {"ids": [s["id"] for s in samples]}


def test_resumable_loader_trains_on_an_energon_dataset(llava):
    seq = 128
    encoder = SampleEncoder(tokenizer_dir(), seq_length=seq, image_seq_len=4, longest_edge=16, shortest_edge=8)
    ds = EnergonDataset(llava)
    loader = ResumableLoader([ds], encode=encoder, micro_batch_size=2, seed=3, total_samples=len(ds),
                             collate=lambda rows: collate(rows, seq, encoder.pad_token_id))
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["tokens"].shape == (2, seq) and batch["loss_mask"].sum() > 0
    stats = loader.snapshot()  # after the last batch
    assert stats["seen"] == 6 and stats["bad"] == 0 and stats["dropped"] == 0


def _damage(path, member, how):
    """Overwrite ``member``'s data (``json``) or its header checksum (``header``), in place."""
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    with open(path, "r+b") as f:
        if how == "header":  # the member's own header, right before its data (after any pax header)
            f.seek(info.offset_data - tarfile.BLOCKSIZE + 148)
            f.write(b"0000000\0")
        else:
            f.seek(info.offset_data)
            f.write(b"{" * info.size)


def test_damaged_members_are_bad_samples_counted_not_fatal(llava, tmp_path):
    copy = str(tmp_path / "wds")
    shutil.copytree(llava, copy)
    _damage(os.path.join(copy, "pretrain-0.tar"), "004539376.json", "json")
    _damage(os.path.join(copy, "pretrain-1.tar"), "004539378.jpg", "header")
    ds = EnergonDataset(copy)
    reasons = {}
    for i in range(len(ds)):
        try:
            ds.read(i)
        except BadSample as exc:
            reasons[exc.key] = exc.reason
    assert reasons == {"004539376": "bad_json", "004539378.jpg": "corrupt_tar_member"}
    loader = ResumableLoader([ds], encode=encode_id, collate=collate_ids, micro_batch_size=6, seed=3,
                             total_samples=6, max_bad_sample_fraction=1.0)
    batch = next(iter(loader))
    assert not {"004539376", "004539378"} & set(batch["ids"])
    stats = loader.snapshot()
    assert stats["by_reason"] == {"bad_json": 1, "corrupt_tar_member": 1} and stats["bad"] == 2


@pytest.mark.parametrize("damage, message", [
    ("no_split", r"split\.yaml: missing"),
    ("bad_info", r"\.info\.json: unreadable"),
    ("unknown_shard", r"shard pretrain-9\.tar of split 'train' is not in \.info shard_counts"),
    ("no_part", r"no split part 'test'"),
])
def test_broken_metadata_is_one_line(llava, tmp_path, damage, message):
    copy = str(tmp_path / "wds")
    shutil.copytree(llava, copy)
    meta = os.path.join(copy, ".nv-meta")
    if damage == "no_split":
        os.remove(os.path.join(meta, "split.yaml"))
    elif damage == "bad_info":
        with open(os.path.join(meta, ".info.json"), "w") as f:
            f.write("{not json")
    elif damage == "unknown_shard":
        with open(os.path.join(meta, "split.yaml"), "w") as f:
            yaml.safe_dump({"split_parts": {"train": ["pretrain-0.tar", "pretrain-9.tar"]}}, f)
    with pytest.raises(ShardIndexError, match=message) as info:
        open_dataset(copy, "test" if damage == "no_part" else "train")
    assert "\n" not in str(info.value) and meta in str(info.value)
