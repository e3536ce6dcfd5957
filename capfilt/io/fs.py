"""All filesystem access goes through here: local paths and any fsspec URL alike."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from capfilt.io.layout import is_temporary, temporary_name
from capfilt.redaction import redact_text

log = logging.getLogger(__name__)

_CONFIGURED: set[str] = set()


def configure_storage(options: dict[str, dict]) -> None:
    """Default fsspec options per protocol (``{"s3": {"endpoint_url": ...}}``) for this process.

    fsspec's defaults are process-wide: options a previous call set and this one does
    not name are removed, so one run's credentials never leak into the next.
    """
    from fsspec.config import conf

    for protocol in _CONFIGURED - set(options):
        conf.pop(protocol, None)
    for protocol, kwargs in options.items():
        conf[protocol] = dict(kwargs)
    _CONFIGURED.clear()
    _CONFIGURED.update(options)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand_input(spec: str | list[str], suffixes: tuple[str, ...] = SHARD_SUFFIXES) -> list[str]:
    """Expand a brace pattern, glob, directory, or list of those into sorted shard URLs.

    Raises ``FileNotFoundError`` naming the pattern that matched nothing, so a typo
    is not a silent empty run. Explicit paths without wildcards are kept as given
    even when missing: the shard then fails with its own error.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for pattern in braceexpand(item):
            urls.extend(_expand_one(pattern, suffixes))
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def _expand_one(pattern: str, suffixes: tuple[str, ...]) -> list[str]:
    if pattern.startswith(("http://", "https://")):
        return [pattern]  # a web address lists nothing, and its '?' starts a query (a signed URL's)
    fs, path = url_to_fs(pattern)
    if any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"input pattern {pattern!r} matched no file")
        return [unstrip(fs, m) for m in matches]
    if fs.isdir(path):
        # The folder's own shards only, as img2dataset writes them: not subfolders
        # (an output folder inside it) and not hidden temporaries.
        matches = sorted(p for p in fs.ls(path, detail=False)
                         if p.endswith(suffixes) and not posixpath.basename(p).startswith("."))
        if not matches:
            raise FileNotFoundError(f"input folder {pattern!r} holds no shard ({', '.join(suffixes)})")
        return [unstrip(fs, m) for m in matches]
    return [pattern]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return fs.protocol in ("file", ("file", "local"))


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give a path listed by ``fs`` back its protocol, so it can be opened anywhere."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def location(url: str) -> str:
    """A canonical spelling of a local path (resolved) or an object-store URL, to compare folders."""
    fs, path = url_to_fs(url)
    return os.path.realpath(path) if _is_local(fs) else fs.unstrip_protocol(path.rstrip("/"))


def shard_name(url: str) -> str:
    """``s3://b/x/00012.tar`` -> ``00012``; the output names derive from it. A URL's query
    and fragment (a signed URL's credentials) are not part of it."""
    if "://" in url:
        url = urlsplit(url).path
    base = posixpath.basename(url.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def open_read(url: str) -> IO[bytes]:
    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def read_parquet(url: str, columns: list[str] | None = None):
    """The parquet file at ``url`` as a pyarrow Table: the one way capfilt reads parquet.

    pyarrow is given the filesystem, not a Python file object: reading through a file
    object leaves one of pyarrow's I/O threads alive at exit, and the process can abort
    (``terminate called without an active exception``, exit 134; pyarrow 26).
    """
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    return pq.read_table(path, filesystem=fs, columns=columns)


def iter_parquet_batches(url: str, max_row_group_bytes: int, batch_size: int = 1024) -> Iterator[Any]:
    """The parquet file at ``url`` as pyarrow RecordBatches, a row group at a time: never whole.

    Its footer may take no more than ``max_row_group_bytes``, and a row group's columns are read
    smallest first while their sizes (uncompressed, as the file's metadata states them) add up
    to no more; the others are left out of that row group's batches. Opened through the
    filesystem, as ``read_parquet`` does, and closed when the iteration ends.
    """
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    with pq.ParquetFile(path, filesystem=fs, pre_buffer=False, buffer_size=1 << 20,  # chunks in pieces
                        thrift_string_size_limit=max_row_group_bytes) as parquet:
        fields, metadata = parquet.schema_arrow, parquet.metadata
        for index in range(metadata.num_row_groups):
            columns = _columns_within(fields, metadata.row_group(index), max_row_group_bytes)
            if len(columns) < len(fields):
                log.warning("%s: row group %d: %d columns left out, over %d bytes together",
                            redact_text(url), index, len(fields) - len(columns), max_row_group_bytes)
            if columns:
                # One thread: mimalloc's per-thread heaps would keep what each thread freed.
                yield from parquet.iter_batches(batch_size, row_groups=[index], columns=columns,
                                                use_threads=False)


def _columns_within(fields, row_group, budget: int) -> list[str]:
    """The top-level columns of ``row_group`` to read, in file order, smallest first within ``budget``."""
    sizes, first = [], 0
    for field in fields:  # a nested column is stored as its leaves, in order
        last = first + _leaf_count(field.type)
        sizes.append(sum(row_group.column(i).total_uncompressed_size for i in range(first, last)))
        first = last
    chosen: set[int] = set()
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        if sizes[i] > budget:
            break
        budget -= sizes[i]
        chosen.add(i)
    return [fields[i].name for i in sorted(chosen)]


def _leaf_count(arrow_type) -> int:
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return sum(_leaf_count(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_map(arrow_type):
        return _leaf_count(arrow_type.key_type) + _leaf_count(arrow_type.item_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or \
            pa.types.is_fixed_size_list(arrow_type):
        return _leaf_count(arrow_type.value_type)
    return 1


def read_parquet_schema(url: str):
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    return pq.read_schema(path, filesystem=fs)


def read_json(url: str) -> Any:
    """The parsed JSON file at ``url``; None when there is no such file."""
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        return None


def read_matching(pattern: str) -> dict[str, bytes]:
    """Every file matching a glob pattern, by URL; fetched concurrently on object stores."""
    fs, path = url_to_fs(pattern)
    paths = sorted(fs.glob(path))
    return {unstrip(fs, p): data for p, data in fs.cat(paths).items()} if paths else {}


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.isdir(path)


def write_file(url: str, data: bytes) -> None:
    """Write one file, which appears only when complete (its folder is made if need be)."""
    folder, name = posixpath.split(url)
    OutputDir(folder or ".").write_bytes(name, data)


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local folder with the files of the folder ``url`` (for transformers' from_pretrained).

    A local path, or a name that is no URL (a hub id), is given back unchanged. Of a
    remote folder, the files are downloaded (not its subfolders, such as a fine-tuned
    model's ``checkpoints/``) to a temporary folder, removed on exit.
    """
    fs, path = url_to_fs(url)
    if _is_local(fs):
        yield url
        return
    fs.invalidate_cache(path)  # object stores cache listings; this folder may just have been written
    with tempfile.TemporaryDirectory(prefix="capfilt-") as local:
        for entry in fs.ls(path, detail=True):
            if entry["type"] == "file":
                fs.get_file(entry["name"], os.path.join(local, posixpath.basename(entry["name"])))
        yield local


# A write that fails for want of room: the error names the file it was writing.
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputDir:
    """An output folder on any filesystem, where files appear only when complete."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or "/"
        self.fs, self.root = url_to_fs(self.url)
        self.local = _is_local(self.fs)
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)
        # Object stores have no folders; makedirs would even create a mistyped bucket.

    def local_path(self) -> str | None:
        """The folder's path when it is on this machine's filesystem, else None."""
        return self.root if self.local else None

    def path(self, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"output file name {name!r} must be a plain name")
        return posixpath.join(self.root, name)

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(self.path(name))

    def read_text(self, name: str) -> str:
        with self.fs.open(self.path(name), "r", encoding="utf-8") as f:
            return f.read()

    def listdir(self) -> list[str]:
        self.fs.invalidate_cache(self.root)  # object stores cache listings; workers write here
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:  # an object store has no empty folders: nothing written yet
            return []
        return sorted(posixpath.basename(p) for p in paths)

    @contextlib.contextmanager
    def atomic_open(self, name: str) -> Iterator[IO[bytes]]:
        """Write to a unique temporary name; rename to ``name`` only on success."""
        with self.staged() as staging, staging.open(name) as f:
            yield f

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_open(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def staged(self) -> Iterator["Staging"]:
        """Files opened with ``staging.open(name)`` in the block are renamed into place, in the
        order they were opened, when the block ends; if it raises, none of them appears."""
        staging = Staging(self)
        try:
            yield staging
            for tmp, final in staging.files:
                self._rename(tmp, final)
            self._sync_folder()
        except BaseException:
            for tmp, _ in staging.files:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)
            raise

    @contextlib.contextmanager
    def write_folder(self) -> Iterator[str]:
        """A local temporary folder to fill (transformers' save_pretrained needs one).

        On success its files are copied here, each appearing only when complete; the
        caller writes a marker afterwards if the set of files must appear complete too.
        """
        with tempfile.TemporaryDirectory(prefix="capfilt-") as local:
            yield local
            for name in sorted(os.listdir(local)):
                source = os.path.join(local, name)
                if not os.path.isfile(source):
                    raise ValueError(f"{name}: write_folder copies files, not subfolders")
                tmp = self.path(temporary_name(name, uuid.uuid4().hex[:12]))
                self.fs.put_file(source, tmp)
                self._rename(tmp, self.path(name))

    def _rename(self, src: str, dst: str) -> None:
        if self.local:
            os.replace(src, dst)  # atomic on POSIX
        else:
            self.fs.mv(src, dst)

    def _sync_folder(self) -> None:
        """Make renames into a local folder durable: after a power cut, a file under its final
        name has its content (each was fsynced before its rename) and the name itself survives.
        An object store makes a write durable before it answers."""
        if self.local:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(name))

    def remove_folder(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(name), recursive=True)

    def remove_temporaries(self) -> list[str]:
        """Delete temporary files a killed run left behind; returns their names."""
        stale = [n for n in self.listdir() if is_temporary(n)]
        for name in stale:
            self.remove(name)
        return stale


class Staging:
    """Temporary files of one ``OutputDir.staged`` block, renamed together at its end."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.files: list[tuple[str, str]] = []  # (temporary path, final path)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        final = self.out.path(name)
        tmp = self.out.path(temporary_name(name, uuid.uuid4().hex[:12]))
        self.files.append((tmp, final))
        try:
            with self.out.fs.open(tmp, "wb") as f:
                yield f
                if self.out.local:  # its content on disk before its name can be
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno in STORAGE_FULL and exc.filename is None:  # a write says not where
                raise OSError(exc.errno, f"{exc.strerror}, writing into {self.out.url}", final) from exc
            raise
