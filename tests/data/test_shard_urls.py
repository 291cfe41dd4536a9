"""--data-path URLs: the same shards read from a local folder, file://, an fsspec URL (the real
``memory://`` filesystem) and ``pipe:cat DIR/{name}`` give the same samples and batches; failures
through each scheme are one line naming the file, URL or command."""
import functools
import json
import os
import re
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest
import torch

from megatron_patch.data.collate import collate
from megatron_patch.data.encoder import SampleEncoder
from megatron_patch.data.errors import BadSample, ShardIndexError
from megatron_patch.data.loader import ResumableLoader
from megatron_patch.data.shards import INDEX_FILE, ShardedDataset, sidecar_path
from megatron_patch.training.arguments import ArgumentError, _check_data_paths, build_parser
from tests.data.corpora import build, good_corpus
from tests.data.encoder_fixtures import tokenizer_dir

pytestmark = pytest.mark.unit


SEQ, MBS, SEED = 64, 2, 5


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """13 samples (0-2 images each) in 3 shards, built by the project's tool."""
    root = tmp_path_factory.mktemp("urls")
    inp, img = good_corpus(str(root), "U", 13)
    out = root / "shards"
    build(inp, img, out, samples_per_shard=5)
    return str(out)


@pytest.fixture(scope="module")
def memfs():
    fs = fsspec.filesystem("memory")
    prefix = f"/shard_urls_{uuid.uuid4().hex}"
    yield fs, prefix
    fs.rm(prefix, recursive=True)


def to_memory(memfs, folder, name, skip=()):
    """Copy ``folder``'s files into the real fsspec memory filesystem; return its memory:// URL."""
    fs, prefix = memfs
    for f in sorted(os.listdir(folder)):
        if f not in skip:
            fs.put_file(os.path.join(folder, f), f"{prefix}/{name}/{f}")
    return f"memory://{prefix}/{name}"


@pytest.fixture(scope="module")
def http_url(local):
    """``local`` served over HTTP with range requests: an async fsspec filesystem (aiohttp), which,
    like s3fs, refuses to run in a forked worker on the parent's instance."""
    folder = local

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            path = os.path.join(folder, os.path.basename(self.path))
            if not os.path.isfile(path):
                return self.send_error(404)
            with open(path, "rb") as f:
                data = f.read()
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start, end = int(m.group(1)), int(m.group(2) or len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                data = data[start:end + 1]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ds"
    server.shutdown()
    thread.join()


def pipe(folder):
    return f"pipe:cat {folder}/{{name}}"


def samples(ds):
    return [(ds.locate(i)[1], r.key, r.record, r.images, r.image_exts)
            for i in range(len(ds)) for r in [ds.read(i)]]


def test_every_scheme_reads_the_same_samples(local, memfs):
    expected = samples(ShardedDataset(local))
    assert len(expected) == 13 and any(len(s[3]) == 2 for s in expected)
    mem = to_memory(memfs, local, "same")
    where = {"file://" + local: f"{local}/shard-000001.tar", mem: f"{mem}/shard-000001.tar",
             pipe(local): f"pipe:cat {local}/shard-000001.tar"}
    for url, shard in where.items():
        ds = ShardedDataset(url)
        assert samples(ds) == expected, url
        # Messages and counters name the shard where it lives (file:// is the local path).
        assert ds.read(7).shard == ds.locate(7)[0] == shard


def test_index_and_sidecars_rebuilt_through_the_same_location(local, memfs, tmp_path):
    expected = samples(ShardedDataset(local))
    # fsspec without index.json nor sidecars: *.tar listed by glob, each scanned (seekable).
    sidecars = {f for f in os.listdir(local) if f.endswith(".idx.json")}
    bare = to_memory(memfs, local, "bare", skip={INDEX_FILE, *sidecars})
    ds = ShardedDataset(bare)
    assert [s["name"] for s in ds.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert samples(ds) == expected
    # pipe: with index.json but no sidecars: each tar is scanned as a stream through the command.
    copy = tmp_path / "no_sidecars"
    shutil.copytree(local, copy)
    for f in copy.glob("*.idx.json"):
        f.unlink()
    assert samples(ShardedDataset(pipe(copy))) == expected


def test_pipe_needs_index_json(local, tmp_path):
    copy = tmp_path / "no_index"
    shutil.copytree(local, copy)
    (copy / INDEX_FILE).unlink()
    with pytest.raises(ShardIndexError) as err:
        ShardedDataset(pipe(copy))
    msg = str(err.value)
    assert f"cat {copy}/index.json" in msg and "needs index.json" in msg and "\n" not in msg
    assert len(ShardedDataset(str(copy))) == 13  # the local folder itself is scanned instead


def test_failing_pipe_command_is_named(local):
    with pytest.raises(ShardIndexError) as err:
        ShardedDataset(f"pipe:echo boom >&2; exit 3 # {{name}}")
    msg = str(err.value)
    assert "`echo boom >&2; exit 3 # index.json` failed (exit 3): boom" in msg and "\n" not in msg
    with pytest.raises(ShardIndexError, match="produced no output"):
        ShardedDataset("pipe:true {name}")
    # Index and sidecars come through, the tars do not: the read fails as shard_unreadable.
    ds = ShardedDataset(f"pipe:case {{name}} in *.tar) exit 4;; *) cat {local}/{{name}};; esac")
    with pytest.raises(BadSample) as bad:
        ds.read(0)
    assert bad.value.reason == "shard_unreadable" and "failed (exit 4)" in str(bad.value)
    assert "shard-000000.tar" in bad.value.shard and "\n" not in str(bad.value)


def test_corrupt_member_in_object_store_is_a_bad_sample(local, memfs):
    url = to_memory(memfs, local, "corrupt")
    fs, _ = memfs
    ds = ShardedDataset(url)
    shard_url, key = ds.locate(4)
    root = url[len("memory://"):]
    tar = f"{root}/{os.path.basename(shard_url)}"
    entry = dict(json.loads(fs.cat_file(sidecar_path(tar)))["samples"])[key]
    _, offset, _ = next(m for m in entry if m[0] == "json")
    data = bytearray(fs.cat_file(tar))
    data[offset - 512] ^= 0xFF  # first byte of the member's name: its header checksum no longer holds
    fs.pipe_file(tar, bytes(data))
    ds = ShardedDataset(url)  # same size: index.json still matches
    with pytest.raises(BadSample) as bad:
        ds.read(4)
    assert bad.value.reason == "corrupt_tar_member" and bad.value.shard == shard_url
    assert ds.read(3).record and ds.read(5).record  # its neighbours still read


def test_size_check_through_fsspec_not_through_pipe(local, memfs, tmp_path):
    url = to_memory(memfs, local, "truncated")
    fs, _ = memfs
    tar = f"{url[len('memory://'):]}/shard-000002.tar"
    fs.pipe_file(tar, fs.cat_file(tar)[:2048])
    with pytest.raises(ShardIndexError, match=f"shard {url}/shard-000002.tar changed size"):
        ShardedDataset(url)
    # Through a pipe the size is unknown at start-up; the cut-off sample is found when read.
    copy = tmp_path / "truncated"
    shutil.copytree(local, copy)
    with open(copy / "shard-000002.tar", "r+b") as f:
        f.truncate(2048)
    ds = ShardedDataset(pipe(copy))
    with pytest.raises(BadSample) as bad:
        ds.read(12)
    assert bad.value.reason == "corrupt_tar_member" and "truncated" in str(bad.value)


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(tokenizer_dir(), seq_length=SEQ, image_seq_len=4, longest_edge=16, shortest_edge=8)


def batches(url, encoder, workers, steps=4):
    loader = ResumableLoader([url], encode=encoder, collate=functools.partial(collate, seq_length=SEQ,
                             pad_token_id=encoder.pad_token_id), micro_batch_size=MBS, seed=SEED,
                             num_workers=workers)
    it = iter(loader)
    out = []
    for _ in range(steps):  # each batch with the loader's counters as it was yielded
        out.append({**next(it), "stats": loader.snapshot()})
    it.close()
    for b in out:  # counters name shards by location; compare the counts only
        b["stats"] = {k: v for k, v in b["stats"].items() if k != "by_shard"}
    return out


def same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_same_from_urls(local, memfs, http_url, encoder, workers):
    expected = batches(local, encoder, 0)
    assert sum(int(b["pixel_values"].shape[0]) for b in expected) > 0  # images went through
    for url in (to_memory(memfs, local, f"loader{workers}"), http_url, pipe(local)):
        for got, want in zip(batches(url, encoder, workers), expected, strict=True):
            same_batch(got, want)


def check(*data_path):
    args = build_parser().parse_args(["--micro-batch-size", "1", "--seq-length", "8", "--data-path", *data_path])
    _check_data_paths(args)


def check_error(*data_path) -> str:
    with pytest.raises(ArgumentError) as err:
        check(*data_path)
    msg = str(err.value)
    assert msg.startswith("--data-path: ") and "\n" not in msg, msg
    return msg


def test_data_path_flags_accept_urls_and_name_bad_ones(local, memfs, tmp_path):
    marker = tmp_path / "ran"
    # Existing local, file:// and memory:// datasets pass; a pipe: command is not run.
    check("0.5", local, "0.3", "file://" + local, "0.2", to_memory(memfs, local, "flags"))
    check(f"pipe:touch {marker}; cat {local}/{{name}}")
    assert not marker.exists()
    assert "memory:///nowhere/at/all does not exist" in check_error("memory:///nowhere/at/all")
    assert "unknown protocol nosuchproto://" in check_error("nosuchproto://bucket/ds")
    assert f"{tmp_path}/missing does not exist" in check_error(f"file://{tmp_path}/missing")
    assert "needs {name}" in check_error(f"pipe:cat {local}/index.json")


def test_missing_fsspec_package_is_named():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    assert "gcs:// needs the gcsfs package" in check_error("gcs://bucket/ds")
