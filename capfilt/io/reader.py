"""Stream samples out of a webdataset tar shard, one group of members at a time.

The tar is read in stream mode (``r|*``), so memory holds one sample, never the
whole shard; gzip-compressed shards are read the same way. Member data is only
ever read into memory: nothing is extracted to disk, and nothing is unpickled.
The headers before a member are read within bounds too (``BoundedTarInfo``).

Damage does not end the read: where a header is due but the block holds none (a flipped
byte, garbage, a zeroed block), ``tarfile``'s ``ignore_zeros`` reads on block by block to the
next valid header. Each such stretch becomes one error sample of its own, and the samples
either side of it are noted (``_Gap``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import posixpath
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from capfilt.config import ReaderConfig
from capfilt.io.fs import iter_parquet_batches, open_read, shard_name
from capfilt.io.layout import parquet_name
from capfilt.redaction import redact_text
from capfilt.sample import Sample

log = logging.getLogger(__name__)


class ShardReadError(OSError):
    """The shard is not a readable tar at all: a failure of the shard, to retry and report."""


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key runs to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape a folder it is written into, or None."""
    if name.startswith("/") or name.startswith("\\"):
        return "absolute member name"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "member name contains '..'"
    if any(ord(c) < 32 for c in name):
        return "member name contains control characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable bytes as surrogates
        return "member name is not UTF-8"
    return None


def printable_key(key: str) -> str:
    """``key`` as valid UTF-8 text: undecodable bytes of a member name as ``\\xNN``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_json(data: bytes) -> tuple[dict | None, str | None]:
    """(the json as a dict, None), or (None, what is wrong with it). Valid JSON that the output
    cannot hold (a lone surrogate, nesting past the recursion limit) is wrong too."""
    try:
        meta = json.loads(data)
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except Exception as exc:  # ValueError, RecursionError, UnicodeError: any of them
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return (meta if isinstance(meta, dict) else {"value": meta}), None


def read_shard(url: str, options: ReaderConfig | None = None) -> Iterator[Sample]:
    """Yield one ``Sample`` per key in ``url``; unreadable parts become error samples.

    Opening the shard can raise (missing file, network): that is a shard failure for
    the caller to retry. A tar that ends in the middle of a member yields the
    samples before it and one error sample for the cut-off key. A damaged stretch
    (no valid header where one is due) is read past: one error sample stands for it,
    and the samples after it are read as usual.
    """
    options = options or ReaderConfig()
    with open_read(url) as stream, contextlib.closing(Sidecar(url)) as sidecar:
        # Samples and messages name the shard without the credentials its URL may hold.
        for sample in _read_stream(stream, redact_text(url), options):
            for field_name, value in sidecar.fields(sample.key).items():
                sample.meta.setdefault(field_name, value)
            yield sample


# Sidecar rows held at once, as Arrow holds them, with their index entries.
SIDECAR_BYTES = 32 * 1024 * 1024
_INDEX_BYTES_PER_ROW = 512  # a key held in Sidecar's index, with Python's overhead (measured 300-500)


class Sidecar:
    """The rows of the ``NAME.parquet`` img2dataset writes beside ``NAME.tar``, by key.

    They fill in fields a sample's json lacks. Absent or unreadable: no extra fields.

    The file is read a record batch at a time, as the tar's keys ask for rows, never whole:
    img2dataset writes its rows in the order of the tar's samples (with the rows of failed
    downloads between them). Rows read are held up to ``SIDECAR_BYTES`` (and one batch), the
    oldest let go past it; a sidecar within that is held whole, as a plain read would. A row group's columns
    over ``SIDECAR_BYTES`` together are left out (``iter_parquet_batches``). So a sidecar of
    millions of rows or of huge junk columns costs bounded memory; what it costs is the fields
    of a key whose row was let go before the tar asked for it.
    """

    def __init__(self, url: str):
        self.path = posixpath.join(posixpath.dirname(url), parquet_name(shard_name(url)))
        self._batches: Iterator | None = None
        self._index: dict[str, tuple[int, object, int]] = {}  # key -> (batch number, batch, row)
        self._held: deque[tuple[int, list[str], int]] = deque()  # (batch number, keys, bytes)
        self._held_bytes = self._read = 0
        self._full = self._ended = False

    def fields(self, key: str) -> dict:
        while not self._ended and (key not in self._index or not self._full):
            self._read_batch()
        found = self._index.get(key)
        if found is None:
            return {}
        _, batch, row = found
        fields = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                value = column[row].as_py()
            except Exception:  # a value Python cannot hold (a date out of its range): left out
                continue
            if value is not None and name != "key" and _jsonable(value):
                fields[name] = value
        return fields

    def _read_batch(self) -> None:
        try:
            if self._batches is None:
                self._batches = iter_parquet_batches(self.path, SIDECAR_BYTES)
            self._hold(next(self._batches))
        except (StopIteration, FileNotFoundError):
            self._ended = True
        except Exception as exc:  # a broken sidecar must not cost the shard
            log.warning("%s: ignoring the rest of an unreadable metadata parquet: %s",
                        redact_text(self.path), exc)
            self._ended = True

    def _hold(self, batch) -> None:
        number, self._read = self._read, self._read + 1
        keys = []
        for row, key in enumerate(batch.column("key").to_pylist() if "key" in batch.schema.names else []):
            if isinstance(key, str):
                self._index[key] = (number, batch, row)
                keys.append(key)
        if not keys:
            return
        cost = batch.nbytes + _INDEX_BYTES_PER_ROW * len(keys)
        self._held.append((number, keys, cost))
        self._held_bytes += cost
        self._full = self._full or self._held_bytes >= SIDECAR_BYTES
        # Let the oldest rows go only while the rest still fill the window: at most one batch over.
        while len(self._held) > 1 and self._held_bytes - self._held[0][2] >= SIDECAR_BYTES:
            old, old_keys, old_cost = self._held.popleft()
            for key in old_keys:
                if self._index.get(key, (None,))[0] == old:  # not since held from a later batch
                    del self._index[key]
            self._held_bytes -= old_cost

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()


def _jsonable(value) -> bool:
    """Whether the output's json can hold ``value`` (not bytes, datetimes, NaN, lone surrogates)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except Exception:
        return False
    return True


MAX_NOTES = 10  # per sample; more are counted, not kept


@dataclass(slots=True)
class _Group:
    """The members of one key read so far, and what was noted or went wrong on the way."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fault: str | None = None  # a member that could not be read: the sample is an error

    def note(self, note: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(note)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("more members skipped")


def _read_stream(stream, url: str, options: ReaderConfig) -> Iterator[Sample]:
    seen: set[str] = set()
    group: _Group | None = None
    gap: _Gap | None = None  # a damaged stretch just read past, until the samples beside it are noted
    try:
        tar = ResyncingTar.open(fileobj=stream, mode="r|*", tarinfo=_tarinfo_class(header_limit(options)),
                                ignore_zeros=True)
        for info in tar:
            tar.members = []  # stream mode: keep no history of members, read or skipped
            if tar.gap is not None:
                if gap is not None:  # only directories between the two
                    yield gap.sample(url)
                gap, tar.gap = tar.gap, None
            if info.isdir():
                continue
            key, ext = split_key(info.name)
            if group is None or key != group.key:
                if group is not None:
                    yield _assemble(_beside(gap, group, "precedes"), seen, url, options)
                group = _Group(key)
            if gap is not None:  # its own error row, in its place between the samples
                yield gap.sample(url)
                _beside(gap, group, "follows")
                gap = None
            _add_member(group, info, ext, tar, options)
    except (tarfile.TarError, EOFError) as exc:
        if group is None:
            raise ShardReadError(f"{url}: not a readable tar: {exc}") from exc
        cut = group.key
        log.warning("%s: tar is truncated or corrupt after key %r: %s", url, cut, exc)
        yield Sample(key=cut, source=url).fail(f"tar truncated or corrupt in {url} at key {cut!r}: {exc}")
        return
    yield from _read_to_the_end(tar, group, gap, seen, url, options)


def _add_member(group: _Group, info: tarfile.TarInfo, ext: str, tar: tarfile.TarFile,
                options: ReaderConfig) -> None:
    """Read one member into its sample, or note why not. Memory per key is bounded: only the
    members a sample is made of are read, once each."""
    if info.fault:
        group.fault = group.fault or f"member {info.name!r}: {info.fault}"
        return
    skipped = _why_skipped(info, ext, group, options)
    if skipped:
        group.note(skipped)
        return
    group.members[ext] = tar.extractfile(info).read()


def _read_to_the_end(tar: ResyncingTar, group: _Group | None, pending: _Gap | None, seen: set[str],
                     url: str, options: ReaderConfig) -> Iterator[Sample]:
    """The last sample, and the damaged stretch the tar ends in, if any (not its end-of-archive
    zeros). A file in which no header was found at all is no tar: a fault of the shard.
    ``pending``: a stretch followed by directories only."""
    gap = tar.gap
    if gap is not None and group is None and pending is None:
        raise ShardReadError(f"{url}: not a readable tar: no tar header in its {gap.end} bytes")
    if group is not None:
        yield _assemble(_beside(pending or gap, group, "precedes"), seen, url, options)
    yield from (stretch.sample(url) for stretch in (pending, gap) if stretch is not None)


def _why_skipped(info: tarfile.TarInfo, ext: str, group: _Group, options: ReaderConfig) -> str | None:
    """Why a member is not read into memory, or None for a member the sample is made of."""
    if not info.isreg():
        return f"skipped non-regular member {info.name!r}"
    if ext not in options.image_extensions and ext not in ("txt", "json"):
        return f"skipped member {info.name!r}"
    if info.size > options.max_member_bytes:
        return f"member {info.name!r} is {info.size} bytes, over the limit"
    if ext in group.members:
        return f"duplicate member {info.name!r}"
    return None


def _assemble(group: _Group, seen: set[str], url: str, options: ReaderConfig) -> Sample:
    key, members, notes = group.key, group.members, group.notes
    sample = Sample(key=key, source=url)
    reason = unsafe_name(key)
    if reason:
        sample.key = printable_key(key)
        return sample.fail(f"{url}: {reason}: {sample.key!r}")
    if key in seen:
        return sample.fail(f"{url}: duplicate key {key!r} (its members are not adjacent or repeat)")
    seen.add(key)
    if group.fault:
        return sample.fail(f"{url}: sample {key!r}: {group.fault}")
    if "txt" in members:
        sample.web_text = members["txt"].decode("utf-8", errors="replace")
    if "json" in members:
        meta, problem = parse_json(members["json"])
        if problem is None:
            sample.meta = meta
        else:  # bad metadata costs the metadata, not the sample
            sample.raw_json = members["json"].decode("utf-8", errors="backslashreplace")
            notes.append(f"{key}.json is not usable metadata ({problem}); kept as read in input_json")
    image_ext = next((e for e in options.image_extensions if e in members), None)
    if image_ext is None:
        detail = "; ".join(notes) if notes else f"members: {sorted(members)}"
        return sample.fail(f"{url}: sample {key!r} has no image ({detail})")
    sample.image, sample.image_ext = members[image_ext], image_ext
    if notes:
        sample.notes = notes
        log.info("%s: %s: %s", url, key, "; ".join(notes))
    return sample


# --- Reading past damage ---------------------------------------------------------------------


@dataclass(slots=True)
class _Gap:
    """A stretch of the tar where a header was due and none was: read past, block by block, to
    the next valid header (or to the end). Whatever members it held are lost; it becomes one
    error sample of its own, and the samples either side of it are noted."""

    start: int
    end: int
    followed: bool  # by a valid header, or else by the end of the tar

    def where(self) -> str:
        return f"{self.end - self.start} bytes at byte {self.start}"

    def sample(self, url: str) -> Sample:
        # Names the stretch, not a sample of the tar; holds no '/', so it cannot name a path.
        key = f"(damaged tar: bytes {self.start}-{self.end})"
        return Sample(key=key, source=url).fail(
            f"{url}: damaged tar: {self.where()} hold no valid header; read past them to "
            f"{'the next valid header' if self.followed else 'the end'}: any member in them is lost")


def _beside(gap: _Gap | None, group: _Group, side: str) -> _Group:
    """``group``, noted if it lies beside ``gap``: it may have lost a member to it."""
    if gap is not None:
        group.note(f"{side} a damaged stretch of the tar ({gap.where()}): it may have lost a member")
    return group


class ResyncingTar(tarfile.TarFile):
    """``tarfile`` that reads on past damage (with ``ignore_zeros``) and keeps where it did.

    ``gap`` is the damaged stretch read past before the member just read, or before the end;
    a stretch of zero blocks alone (the end-of-archive marker and its padding) is none.
    """

    gap: _Gap | None = None
    _skipping: tuple[int, int, int | None] | None = None  # (start, end, end of its last non-zero block)

    def read_past(self, start: int, end: int, damaged: bool) -> None:
        """``BoundedTarInfo`` read no header in ``start``-``end``; ``tarfile`` reads on after it."""
        first, _, damaged_end = self._skipping or (start, end, None)
        self._skipping = (first, end, end if damaged else damaged_end)

    def next(self):
        member = super().next()
        first, end, damaged_end = self._skipping or (0, 0, None)
        self._skipping = None
        if damaged_end is not None:
            # Before a member, the whole stretch; at the end, up to its last damaged block.
            self.gap = _Gap(first, end if member is not None else damaged_end, followed=member is not None)
        return member


# --- The headers before a member, read within bounds -----------------------------------------

# The most one member's extension headers (PAX records, GNU long name and long link) may hold
# together. Real ones hold a name, a link and a few attributes: well under 64 KiB.
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADER_CHAIN = 8  # extension headers before one member; GNU tar and tarfile write at most 3
_EXTENSION_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def header_limit(options: ReaderConfig) -> int:
    """The bound on one member's extension headers: no header may hold more than a member may."""
    return min(MAX_HEADER_BYTES, options.max_member_bytes)


@functools.cache
def _tarinfo_class(limit: int) -> type[BoundedTarInfo]:
    return type("BoundedTarInfo", (BoundedTarInfo,), {"header_limit": limit})


class BoundedTarInfo(tarfile.TarInfo):
    """``tarfile``'s member header, with the extension headers before a member read within bounds.

    Hand-written, because no library does it: Python's ``tarfile`` (which webdataset reads
    through too) reads a PAX header's or a GNU long name's payload whole, whatever size its
    header states; it recurses once per extension header, so a chain of a thousand of them
    raises ``RecursionError``; it keeps every GNU sparse map, however long; and before
    Python 3.11.10 and 3.12.6 its PAX regexes are quadratic (CVE-2024-6232: a PAX header of
    1 MiB parses for minutes). Here:

    - an extension header over ``header_limit`` (or past ``MAX_HEADER_CHAIN`` of them) is skipped
      block by block, with the rest of its chain, and the member after it gets a ``fault``;
    - PAX records are parsed in one linear pass; a malformed record is the member's fault;
    - a sparse member (GNU ``S`` or PAX ``GNU.sparse.*``) is a fault, its map skipped unread:
      a webdataset sample is never sparse.

    A member with a fault is not read, and the reader makes its sample an error. Its payload's
    extent is known from the header, so the members after it are read as usual. Only a tar
    that ends inside a skipped payload is cut short, like any truncated tar.
    """

    header_limit = MAX_HEADER_BYTES
    fault: str | None = None  # why the member cannot be read
    chain_headers = 0  # extension headers before this one, for the same member
    chain_bytes = 0  # and the bytes of their payloads

    def _over_limit(self, kind: str, held: int = 0) -> str | None:
        if self.chain_headers >= MAX_HEADER_CHAIN:
            return f"more than {MAX_HEADER_CHAIN} extension headers before one member"
        if self.chain_bytes + held + self.size > self.header_limit:
            return f"{kind} of {self.size} bytes, over the limit of {self.header_limit}"
        return None

    @classmethod
    def fromtarfile(cls, archive):
        """The next member, as ``tarfile`` reads it; where it reads no valid header (its
        ``ignore_zeros`` then reads on), ``archive`` is told, if it is a ``ResyncingTar``."""
        start = archive.fileobj.tell()
        try:
            return super().fromtarfile(archive)
        except (tarfile.EOFHeaderError, tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            if isinstance(archive, ResyncingTar):
                archive.read_past(start, archive.fileobj.tell(), not isinstance(exc, tarfile.EOFHeaderError))
            raise

    def _read_header(self, archive) -> BoundedTarInfo:
        """The header block after this extension header's payload, not processed yet. An invalid
        one is damage (``ignore_zeros`` reads on after it); none at all, a truncated tar."""
        block = archive.fileobj.read(tarfile.BLOCKSIZE)
        try:
            header = self.frombuf(block, archive.encoding, archive.errors)
        except (tarfile.EOFHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.InvalidHeaderError(f"after an extension header: {exc}") from None
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        header.offset = archive.fileobj.tell() - tarfile.BLOCKSIZE
        header.chain_headers = self.chain_headers + 1
        header.chain_bytes = self.chain_bytes + self.size
        return header

    def _skip_to_member(self, archive, fault: str) -> BoundedTarInfo:
        header = self
        while header.type in _EXTENSION_TYPES:
            _discard(archive.fileobj, header._block(header.size))
            header = header._read_header(archive)
        member = header._proc_member(archive)
        member.fault = fault
        return member

    def _proc_gnulong(self, archive):
        fault = self._over_limit("GNU long name")
        if fault:
            return self._skip_to_member(archive, fault)
        name = tarfile.nts(_read_exactly(archive.fileobj, self._block(self.size)),
                           archive.encoding, archive.errors)
        member = self._read_header(archive)._proc_member(archive)
        member.offset = self.offset
        if self.type == tarfile.GNUTYPE_LONGLINK:
            member.linkname = name
        else:
            member.name = name.removesuffix("/") if member.isdir() else name
        return member

    def _proc_pax(self, archive):
        is_global = self.type == tarfile.XGLTYPE
        fault = self._over_limit("PAX header", _pax_bytes(archive.pax_headers) if is_global else 0)
        if fault:
            return self._skip_to_member(archive, fault)
        payload = _read_exactly(archive.fileobj, self._block(self.size))[: self.size]
        pax_headers = archive.pax_headers if is_global else archive.pax_headers.copy()
        records = _pax_records(payload)
        if records is None:
            fault = "malformed PAX header"
        else:
            self._decode_pax(records, pax_headers, archive)
        sparse = [k for k in pax_headers if k.startswith("GNU.sparse.")]
        if sparse:  # its map and sizes are not applied; it is named by its own name
            fault, name = "sparse member", pax_headers.get("GNU.sparse.name")
            for k in sparse:
                del pax_headers[k]
            if name is not None and not is_global:
                pax_headers["path"] = name
        member = self._read_header(archive)._proc_member(archive)
        if not is_global:
            self._apply_to(member, pax_headers, archive)
        member.fault = member.fault or fault
        return member

    def _decode_pax(self, records: list[tuple[bytes, bytes]], pax_headers: dict, archive) -> None:
        """Into ``pax_headers``, as tarfile decodes them (names in the archive's encoding if BINARY)."""
        for keyword, value in records:
            if keyword == b"hdrcharset":
                pax_headers["hdrcharset"] = self._decode_pax_field(value, "utf-8", "utf-8", archive.errors)
        names = archive.encoding if pax_headers.get("hdrcharset") == "BINARY" else "utf-8"
        for keyword, value in records:
            keyword = self._decode_pax_field(keyword, "utf-8", "utf-8", archive.errors)
            if keyword in tarfile.PAX_NAME_FIELDS:
                value = self._decode_pax_field(value, names, archive.encoding, archive.errors)
            else:
                value = self._decode_pax_field(value, "utf-8", "utf-8", archive.errors)
            pax_headers[keyword] = value

    def _apply_to(self, member: BoundedTarInfo, pax_headers: dict, archive) -> None:
        member._apply_pax_info(pax_headers, archive.encoding, archive.errors)
        member.offset = self.offset
        if "size" in pax_headers:  # the member's data ends elsewhere than its header said
            end = member.offset_data
            if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                end += member._block(member.size)
            archive.offset = end

    def _proc_sparse(self, archive):
        _, extended, _ = self._sparse_structs
        del self._sparse_structs
        while extended:  # skip the map's extension blocks, keeping none of them
            extended = bool(_read_exactly(archive.fileobj, tarfile.BLOCKSIZE)[504])
        self.offset_data = archive.fileobj.tell()
        archive.offset = self.offset_data + self._block(self.size)
        self.fault = "sparse member"
        return self


def _pax_records(payload: bytes) -> list[tuple[bytes, bytes]] | None:
    """The ``(keyword, value)`` of each ``"LENGTH KEYWORD=VALUE\\n"`` record, in one pass; None
    if one is malformed. Stops at NUL padding, as tarfile does."""
    records, pos = [], 0
    while pos < len(payload) and payload[pos] != 0:
        space = payload.find(b" ", pos, pos + 20)
        if space < 0 or not payload[pos:space].isdigit():
            return None
        end = pos + int(payload[pos:space])
        equals = payload.find(b"=", space + 1, end)
        if equals < 0 or end > len(payload) or payload[end - 1] != 0x0A:
            return None
        records.append((payload[space + 1:equals], payload[equals + 1:end - 1]))
        pos = end
    return records


def _pax_bytes(pax_headers: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in pax_headers.items())


def _read_exactly(fileobj, size: int) -> bytes:
    data = fileobj.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _discard(fileobj, size: int, chunk: int = 1 << 16) -> None:
    while size > 0:
        _read_exactly(fileobj, min(chunk, size))
        size -= chunk
