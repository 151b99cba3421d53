"""Where a dataset's files are: a local directory, or shards named the way WebDataset users name them.

``data_dir`` (and ``mebt data verify|stats``) take:

- a directory: ``data/ucf_16f/train`` (or ``file:///data/ucf_16f/train``);
- a shard spec with one brace range, WebDataset's convention: ``/lustre/ucf/train-{000000..000127}.tar``,
  ``https://host/ucf/train-{000000..000127}.tar``, ``file:///...``, or ``pipe:COMMAND`` whose output is the
  shard (``pipe:aws s3 cp s3://bucket/ucf/train-{000000..000127}.tar -``, ``pipe:gsutil cat gs://...``,
  ``pipe:curl -s https://...``), run by the shell like WebDataset's ``gopen``: only use specs you wrote;
- an ``http(s)://`` URL of a dataset directory (``https://host/ucf/train/``): shards at ``URL/NAME``.

The tables (``dataset.json``, ``manifest.parquet``, ``shards.parquet``) are found next to the shards: the
spec with the shard's file name replaced by the table's (so ``pipe:aws s3 cp s3://b/ucf/manifest.parquet -``),
or under ``meta_dir`` when given (a directory or URL). Shard names come from ``shards.parquet``, and each
must be one the spec expands to.

Remote reads (http, https, pipe) fetch a whole shard into memory with a per-request timeout (the whole
transfer, not only the connection) and ``retries`` more attempts with exponential backoff
(``retry_backoff_s``, doubling, at most 30 s); then ``FetchError`` names the URL and the last cause. Nothing
is written to disk unless ``cache_dir`` is set: then a fetched shard is stored there (atomically, under the
spec's hash and the shard name) and later reads map the local copy, once its size matches shards.parquet.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.manifest import DATASET_JSON, MANIFEST, SHARDS, DatasetError, load_tables, read_dataset_json
from mebt.errors import ConfigError
from mebt.fsutil import write_bytes

REMOTE_SCHEMES = ("http://", "https://", "pipe:")
_RANGE = re.compile(r"(?P<pre>[^\s/{}]*)\{(?P<a>\d+)\.\.(?P<b>\d+)\}(?P<post>[^\s/{}]*)")
_MAX_BACKOFF_S = 30.0
_CHUNK = 1 << 20


class FetchError(DatasetError):
    """A remote file that could not be read after every attempt; the message names the URL and the cause."""


class _Permanent(Exception):
    """A failure that retrying cannot fix (404 and other 4xx)."""


def expand_braces(spec: str) -> list[str]:
    """The names of a spec's one numeric brace range ``{a..b}``, zero-padded to the width of ``a``."""
    match = _RANGE.search(spec)
    a, b = int(match["a"]), int(match["b"])
    if b < a:
        raise ConfigError(f"shard spec '{spec}': the range {{{match['a']}..{match['b']}}} is empty")
    width = len(match["a"]) if match["a"].startswith("0") else 0
    return [f"{match['pre']}{str(i).zfill(width)}{match['post']}" for i in range(a, b + 1)]


class ShardSource:
    """Shard names -> where they are, and the bytes of shards and tables (see the module docstring)."""

    def __init__(self, spec: str, meta_dir: str | None = None, *, timeout_s: float = 60.0, retries: int = 3,
                 retry_backoff_s: float = 1.0, cache_dir: str | None = None):
        spec = str(spec).strip()
        self.spec, self.timeout_s, self.retries, self.backoff_s = spec, timeout_s, retries, retry_backoff_s
        self.cache_dir = Path(cache_dir) / hashlib.sha256(spec.encode()).hexdigest()[:16] if cache_dir else None
        if spec.startswith("file://"):
            spec = spec[len("file://"):]
        ranges = len(_RANGE.findall(spec))
        if ranges > 1 or spec.count("{") != ranges:
            raise ConfigError(f"shard spec '{self.spec}' must have exactly one numeric brace range such as "
                              "{000000..000127}")
        self.remote = spec.startswith(REMOTE_SCHEMES)
        self._pattern = _RANGE.search(spec)
        self._spec = spec
        if self._pattern is not None:
            self.names = expand_braces(spec)
        elif spec.startswith("pipe:"):
            raise ConfigError(f"shard spec '{self.spec}': a pipe: spec names its shards with a brace range, e.g. "
                              "pipe:aws s3 cp s3://bucket/ds/train-{000000..000127}.tar -")
        else:
            self.names = None   # a directory: every name shards.parquet lists
        self._names_set = set(self.names or ())
        self.meta = meta_dir
        self.local_dir = None if self.remote or self._pattern is not None else Path(spec)

    def __str__(self) -> str:
        return self.spec

    # --- where things are
    def shard_url(self, name: str) -> str:
        if self._pattern is not None:
            if name not in self._names_set:
                raise DatasetError(f"shard '{name}' of the dataset's shards.parquet is not in the spec '{self.spec}'; "
                                   "widen its brace range")
            return self._spec[:self._pattern.start()] + name + self._spec[self._pattern.end():]
        return self._join(self._spec, name)

    def meta_url(self, name: str) -> str:
        if self.meta:
            return self._join(self.meta[len("file://"):] if self.meta.startswith("file://") else self.meta, name)
        if self._pattern is not None:   # the shards' neighbour: the spec with the shard's file name replaced
            return self._spec[:self._pattern.start()] + name + self._spec[self._pattern.end():]
        return self._join(self._spec, name)

    @staticmethod
    def _join(base: str, name: str) -> str:
        return base.rstrip("/") + "/" + name if base.startswith(REMOTE_SCHEMES) else str(Path(base) / name)

    def local_path(self, name: str) -> Path | None:
        """The file to map for shard ``name``: a local one, or its copy in ``cache_dir``; None: fetch it."""
        url = self.shard_url(name)
        if not url.startswith(REMOTE_SCHEMES):
            return Path(url)
        if self.cache_dir is not None and (self.cache_dir / name).is_file():
            return self.cache_dir / name
        return None

    # --- reading
    def read_tables(self) -> tuple[dict, pa.Table, pa.Table]:
        """(dataset.json, manifest, shards table), from the directory or from next to the shards / meta_dir."""
        if self.local_dir is not None and not self.meta:
            return load_tables(self.local_dir)
        try:
            info = json.loads(self.read_meta(DATASET_JSON))
            if not info.get("complete"):
                raise FileNotFoundError(DATASET_JSON)
            return info, *(pq.read_table(pa.BufferReader(self.read_meta(name))) for name in (MANIFEST, SHARDS))
        except FileNotFoundError:
            raise DatasetError(f"no merged dataset tables at '{self.meta_url(MANIFEST)}' (dataset.json, "
                               "manifest.parquet and shards.parquet of a finished mebt preprocess); publish them "
                               "next to the shards or set data.meta_dir") from None
        except (ValueError, pa.ArrowException) as e:
            raise DatasetError(f"the dataset tables at '{self.meta_url(MANIFEST)}' are unreadable ({e}); publish "
                               "them again") from None

    def read_meta(self, name: str) -> bytes:
        url = self.meta_url(name)
        if not url.startswith(REMOTE_SCHEMES):
            path = Path(url)
            if not path.is_file():
                raise FileNotFoundError(url)
            return path.read_bytes()
        return self.fetch(url, missing_ok=True)

    def read_shard(self, name: str, size: int) -> bytes:
        """A remote shard's bytes (stored in ``cache_dir`` when set and the size is right)."""
        data = self.fetch(self.shard_url(name))
        if self.cache_dir is not None and len(data) == size:
            write_bytes(self.cache_dir / name, data)
        return data

    def fetch(self, url: str, missing_ok: bool = False) -> bytes:
        """``url``'s bytes: ``retries`` more attempts after a failure, waiting ``retry_backoff_s`` x 2^k between
        them; a missing file (404) is not retried (FileNotFoundError when ``missing_ok``)."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                return _fetch_once(url, self.timeout_s)
            except _Permanent as e:
                if missing_ok:
                    raise FileNotFoundError(url) from None
                raise FetchError(f"cannot read '{url}': {e}") from None
            except Exception as e:   # connection refused, reset, timeout, 5xx, a failing command
                last = e
        raise FetchError(f"cannot read '{url}' after {self.retries + 1} attempts ({self.timeout_s:g} s timeout "
                         f"each): {_brief(last)}")


def read_dataset_info(data_dir: str, meta_dir: str | None = None) -> dict:
    """The ``dataset.json`` of a dataset directory or shard spec (fetched once when it is at a URL)."""
    source = ShardSource(data_dir, meta_dir, timeout_s=30.0, retries=1)
    if source.local_dir is not None and not meta_dir:
        return read_dataset_json(source.local_dir)
    try:
        return json.loads(source.read_meta(DATASET_JSON))
    except FileNotFoundError:
        raise DatasetError(f"no dataset.json at '{source.meta_url(DATASET_JSON)}'; publish it next to the shards "
                           "or set data.meta_dir") from None
    except ValueError as e:
        raise DatasetError(f"'{source.meta_url(DATASET_JSON)}' is not valid JSON ({e})") from None


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def _fetch_once(url: str, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    if url.startswith("pipe:"):
        return _run_pipe(url[len("pipe:"):], timeout_s)
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise _Permanent(f"HTTP {e.code} {e.reason}") from None
        raise
    with response:
        expected = response.headers.get("Content-Length")
        if expected is None:   # chunked: read to the end
            parts = []
            while chunk := response.read(_CHUNK):
                parts.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"transfer took more than {timeout_s:g} s")
            return b"".join(parts)
        # Known length: straight into one buffer, no copies (the loader's arrays are views of it).
        data = bytearray(int(expected))
        view, got = memoryview(data), 0
        while got < len(data):
            n = response.readinto(view[got:got + _CHUNK])
            if not n:
                raise OSError(f"got {got} of {expected} bytes")
            got += n
            if time.monotonic() > deadline:
                raise TimeoutError(f"transfer took more than {timeout_s:g} s")
    return data


def _run_pipe(command: str, timeout_s: float) -> bytes:
    """The stdout of ``command`` (run by the shell); its process group is killed at the timeout."""
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"'{command}' ran more than {timeout_s:g} s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise OSError(f"'{command}' exited with {proc.returncode}" + (f": {lines[-1]}" if lines else ""))
    return out
