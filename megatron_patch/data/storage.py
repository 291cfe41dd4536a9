"""Where a shard dataset lives: one small interface over local folders, fsspec URLs and pipes.

``open_location(url)`` turns a ``--data-path`` entry into a ``Location``; ``ShardedDataset``
reads ``index.json``, the ``*.idx.json`` sidecars and the tars through it and nothing else.
Every name is a file name within the dataset (``index.json``, ``shard-000000.tar``, ...).

=========================  ===============================================================
``/data/ds``, ``ds``        a local folder; ``file:///data/ds`` is the same folder.
``s3://bucket/ds``          any fsspec protocol (``s3`` needs ``s3fs``, ``gs`` ``gcsfs``,
``memory://ds`` ...         ...): random access through range reads (``cat_file`` with
                            ``start``/``end``), one request per sample; the fast path for
                            object stores.
``pipe:CMD {name} ...``     webdataset's convention: ``{name}`` is replaced by the file name
                            and the command's stdout is the file, e.g.
                            ``pipe:aws s3 cp s3://b/ds/{name} -``. A pipe is a stream: reading
                            a sample reads (and discards) its shard up to that sample, so a
                            random-access epoch costs about half a shard per sample. Use it when
                            nothing else reaches the data; prefer an fsspec URL for object
                            stores. A pipe cannot be listed (``index.json`` is required) and
                            sizes are unknown (``size`` returns None).
=========================  ===============================================================

Locations are picklable and safe in forked DataLoader workers: files are opened per call,
and an fsspec filesystem is re-created in a process other than the one that made it (async
filesystems such as s3fs hold an event loop that does not survive ``fork``).

Errors: ``LocationError`` (a ``ShardIndexError``) for a URL that cannot be used at all, one line
naming it; ``PipeError`` (an ``OSError``, like any other read failure) for a failing command,
one line naming the command; ``FileNotFoundError`` for a missing file elsewhere.
"""
from __future__ import annotations

import glob
import io
import os
import re
import subprocess
import tempfile
from urllib.parse import unquote, urlsplit

from megatron_patch.data.errors import ShardIndexError

PIPE_PREFIX = "pipe:"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._/-]+$")  # names substituted into a shell command
_SKIP_CHUNK = 1 << 20


class LocationError(ShardIndexError):
    """A data location that cannot be used: bad URL, unknown protocol, missing package."""


class PipeError(OSError):
    """A ``pipe:`` command failed (non-zero exit or no output)."""


def open_location(url) -> "Location":
    """``--data-path`` entry -> ``LocalLocation``, ``FsspecLocation`` or ``PipeLocation``."""
    url = os.fspath(url)
    if url.startswith(PIPE_PREFIX):
        return PipeLocation(url[len(PIPE_PREFIX):])
    if url.startswith("file://"):
        return LocalLocation(_file_url_path(url))
    if "://" in url:
        return FsspecLocation(url)
    return LocalLocation(url)


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise LocationError(f"{url}: a file:// URL names a local folder (file:///abs/folder), "
                            f"not host {parts.netloc}")
    return unquote(parts.path)


class Location:
    """A folder-like place holding one dataset's files."""

    url: str            # printable: used in messages and as ShardedDataset.dir
    seekable = True     # False: open() gives a forward-only stream

    def open(self, name: str):
        """Binary file object (a context manager)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (shorter when the file is)."""
        with self.open(name) as f:
            f.seek(start)
            return f.read(end - start)

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """Bytes of ``name``; ``FileNotFoundError`` when missing; None when unknowable."""
        raise NotImplementedError

    def list_tars(self) -> list[str]:
        """Sorted names of the ``*.tar`` files directly in the location."""
        raise NotImplementedError

    def describe(self, name: str) -> str:
        """Printable path or URL of ``name`` for messages and counters."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``LocationError`` (one line) when the location itself is not there."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalLocation(Location):
    def __init__(self, folder: str):
        self.url = os.path.abspath(folder)

    def open(self, name):
        return open(self.describe(name), "rb")

    def exists(self, name):
        return os.path.isfile(self.describe(name))

    def size(self, name):
        return os.path.getsize(self.describe(name))

    def list_tars(self):
        return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(self.url), "*.tar")))

    def describe(self, name):
        return os.path.join(self.url, name)

    def check(self):
        if not os.path.isdir(self.url):
            raise LocationError(f"shard dir {self.url} does not exist (or is not a directory)")


class FsspecLocation(Location):
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._fs, self._root = _url_to_fs(self.url)
        self._pid = os.getpid()
        self._listing: dict | None = None

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():  # unpickled, or in a forked worker
            self._fs, self._root = _url_to_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}

    def _path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def open(self, name):
        return self.fs.open(self._path(name), "rb")

    def read_bytes(self, name):
        return self.fs.cat_file(self._path(name))

    def read_range(self, name, start, end):
        # One ranged request on object stores; fs.open would read ahead a whole block.
        return self.fs.cat_file(self._path(name), start=start, end=end)

    def exists(self, name):
        return self.fs.exists(self._path(name))

    def size(self, name):
        # Sizes come from one listing of the folder (a few requests), not one HEAD per shard.
        if self._listing is None:
            try:
                entries = self.fs.ls(self._root, detail=True)
            except (OSError, NotImplementedError):  # e.g. no list permission: ask per file
                entries = []
            self._listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                             for e in entries if e.get("type") == "file"}
        if self._listing.get(name) is not None:
            return self._listing[name]
        return self.fs.size(self._path(name))  # FileNotFoundError when missing

    def list_tars(self):
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.glob(self._path("*.tar")))

    def describe(self, name):
        return f"{self.url}/{name}"

    def check(self):
        try:
            # An object-store prefix may be unlistable to these credentials; index.json still tells.
            found = self.fs.exists(self._root) or self.fs.exists(self._path("index.json"))
        except Exception as exc:  # credentials, network: each backend raises its own types
            raise LocationError(f"cannot reach {self.url}: {type(exc).__name__}: {_one_line(exc)}") from exc
        if not found:
            raise LocationError(f"shard dir {self.url} does not exist")


def _url_to_fs(url: str):
    """``fsspec.core.url_to_fs`` with one-line errors for unknown protocols and missing packages."""
    try:
        import fsspec
        import fsspec.core
        from fsspec.registry import known_implementations
    except ImportError:
        raise LocationError(f"{url}: URLs other than file:// and pipe: need the fsspec package "
                            "(pip install fsspec)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        for part in url.split("::"):
            protocol = fsspec.core.split_protocol(part)[0]
            known = known_implementations.get(protocol or "")
            if known:
                try:
                    fsspec.get_filesystem_class(protocol)
                except ImportError:
                    package = known["class"].split(".")[0]
                    raise LocationError(f"{url}: {protocol}:// needs the {package} package "
                                        f"(pip install {package})") from None
        raise
    except ValueError as exc:
        protocol = fsspec.core.split_protocol(url)[0]
        if protocol and protocol not in fsspec.available_protocols():
            raise LocationError(f"{url}: unknown protocol {protocol}:// (fsspec knows "
                                "s3, gs, az, http, memory, ...; or use a local folder or pipe:CMD)") from None
        raise LocationError(f"{url}: {_one_line(exc)}") from None


class PipeLocation(Location):
    seekable = False

    def __init__(self, template: str):
        self.template = template
        self.url = PIPE_PREFIX + template
        if "{name}" not in template:
            raise LocationError(f"{self.url}: a pipe: URL needs {{name}} where the file name goes, "
                                "e.g. pipe:cat /data/ds/{name}")

    def command(self, name: str) -> str:
        if not _SAFE_NAME.match(name):
            raise LocationError(f"{self.url}: file name {name!r} is not safe to put in a shell command")
        return self.template.replace("{name}", name)

    def open(self, name):
        return io.BufferedReader(_PipeStream(self.command(name)), buffer_size=_SKIP_CHUNK)

    def read_range(self, name, start, end):
        # A stream: read and drop everything before ``start`` (this is the cost of pipe:).
        with self.open(name) as f:
            left = start
            while left > 0:
                chunk = f.read(min(left, _SKIP_CHUNK))
                if not chunk:
                    return b""
                left -= len(chunk)
            return f.read(end - start)

    def exists(self, name):
        """Runs the command to the end: as costly as reading the file."""
        try:
            with self.open(name) as f:
                while f.read(_SKIP_CHUNK):
                    pass
            return True
        except PipeError:
            return False

    def size(self, name):
        return None  # unknown without reading the whole stream

    def list_tars(self):
        raise LocationError(f"{self.url}: a pipe cannot list *.tar shards; the dataset needs its "
                            "index.json (written by build_webdataset.py)")

    def describe(self, name):
        return PIPE_PREFIX + self.command(name)


class _PipeStream(io.RawIOBase):
    """stdout of ``command``; at end of stream the exit status is checked (``PipeError``)."""

    def __init__(self, command: str):
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty stderr cannot block
        self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)
        self._read = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self._proc.stdout.readinto(buffer)
        if n:
            self._read += n
            return n
        rc = self._proc.wait()
        if rc != 0:
            raise PipeError(f"pipe command `{self.command}` failed (exit {rc}){self._stderr_tail()}")
        if self._read == 0:
            raise PipeError(f"pipe command `{self.command}` produced no output")
        return 0

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return f": {lines[-1].strip()[:300]}" if lines else ""

    def close(self):
        if not self.closed and hasattr(self, "_proc"):  # _proc is missing when Popen failed
            # Stopped early (we had the bytes we needed): its exit status means nothing then.
            self._proc.stdout.close()
            if self._proc.poll() is None:
                self._proc.terminate()
            self._proc.wait()
            self._stderr.close()
        super().close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
