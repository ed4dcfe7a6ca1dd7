"""Read TensorFlow checkpoints (the TensorBundle format) with numpy alone, no TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus shards ``PREFIX.data-00000-of-0000N`` (tensor_bundle.cc):

- ``.index`` is a LevelDB-style SSTable (tsl/lib/io/table*.cc): sorted key -> value pairs in blocks,
  each block followed by a 1-byte compression type and a masked crc32c; an index block points at the
  data blocks, and a 48-byte footer at the end of the file points at the index block.
- Key ``""`` holds a ``BundleHeaderProto`` (number of shards, endianness). Every other key is a tensor
  name whose value is a ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c).
- A shard holds each tensor's raw little-endian bytes at its offset (strings: see ``_strings``).

Every block and tensor is checked against its crc32c. Whatever is wrong with the files raises
:class:`CheckpointError` with a one-line message naming the file.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from ..models.weights import CheckpointError

_MAGIC = 0xDB4775248B80FB57  # leveldb's kTableMagicNumber: the last 8 bytes of every .index
_FOOTER = 48  # metaindex + index block handles (varints padded to 40 bytes), then the magic
_TRAILER = 5  # after each block: compression type (1 byte), masked crc32c (4 bytes)
# TF DataType enum (types.proto) -> (name, how the values lie on disk; None: strings, see _strings).
_DTYPES = {1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"), 4: ("uint8", "u1"), 5: ("int16", "<i2"),
           6: ("int8", "i1"), 7: ("string", None), 9: ("int64", "<i8"), 10: ("bool", "?"), 14: ("bfloat16", "<u2"),
           17: ("uint16", "<u2"), 19: ("float16", "<f2")}
_STORED = dict(_DTYPES.values())
_DATA_FILE = re.compile(r"\.data-\d{5}-of-\d{5}$")


class _Corrupt(Exception):
    """Malformed bytes; the caller prefixes the file name and raises CheckpointError."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: ``dtype`` is that of the array ``read`` returns (float32 for bfloat16, whose
    TF name stays in ``tf_dtype``) or ``'string'``; ``size`` bytes at ``offset`` in shard ``shard``; ``crc``
    is TF's masked crc32c of them."""
    name: str
    dtype: np.dtype | str
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    tf_dtype: str


def _mask(crc: int) -> int:
    """TF masks stored crcs (rotate, add a constant): the crc of bytes that embed crcs is then less degenerate."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The base-128 little-endian varint at ``buf[pos]``, and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("truncated or overlong varint")
        byte = buf[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _signed(v: int) -> int:
    """Protobuf writes negative int32/int64 as 10-byte two's-complement varints."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: values}: ints for varint/fixed, bytes for length-delimited."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):  # fixed64, fixed32
            n = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        else:
            raise _Corrupt(f"protobuf wire type {wire} in an index entry")
        if pos > len(buf):
            raise _Corrupt("truncated protobuf in an index entry")
        out.setdefault(key >> 3, []).append(value)
    return out


def _last(fields: dict, number: int, default=0):
    """A proto3 scalar: absent means the default, and the last occurrence wins."""
    return fields.get(number, [default])[-1]


def _block(data: bytes, handle: bytes, what: str) -> bytes:
    """The block a handle (varint offset, varint size) points at, once its trailer is checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _TRAILER > len(data):
        raise _Corrupt(f"{what} at offset {offset} runs past the end of the file ({len(data)} bytes; truncated?)")
    # The crc covers the block *and* its compression-type byte.
    if _mask(google_crc32c.value(data[offset:end + 1])) != struct.unpack_from("<I", data, end + 1)[0]:
        raise _Corrupt(f"{what} at offset {offset} fails its crc32c check (file corrupt?)")
    if data[end] != 0:
        raise _Corrupt(f"{what} at offset {offset} is compressed (type {data[end]}); TensorFlow writes "
                       "checkpoint indexes uncompressed and only those are supported")
    return data[offset:end]


def _entries(block: bytes):
    """Yield (key, value) from a block: entries (varint shared, non_shared, value_length, key delta, value),
    then uint32 restart offsets and their count. Restarts (keys stored whole) only speed up seeks; a full
    scan just applies each key delta to the previous key."""
    if len(block) < 4:
        raise _Corrupt("block too short for its restart count")
    limit = len(block) - 4 * (struct.unpack_from("<I", block, len(block) - 4)[0] + 1)
    if limit < 0:
        raise _Corrupt("block restart count larger than the block")
    key, pos = b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        n, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + n > limit:
            raise _Corrupt("bad entry in block")
        key, pos = key[:shared] + block[pos:pos + non_shared], pos + non_shared
        yield key, block[pos:pos + n]
        pos += n


def _table(data: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in key order."""
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != _MAGIC:
        raise _Corrupt(f"not a TensorFlow checkpoint index: bad magic number at the end of its {len(data)} bytes "
                       "(truncated?)")
    footer = data[-_FOOTER:]
    pos = _varint(footer, _varint(footer, 0)[1])[1]  # skip the metaindex handle: TF's meta block is empty
    return [kv for _, handle in _entries(_block(data, footer[pos:], "index block"))
            for kv in _entries(_block(data, handle, "data block"))]


def _entry(name: str, value: bytes, num_shards: int) -> Entry:
    """A BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6, slices=7."""
    f = _fields(value)
    if 7 in f:
        raise _Corrupt(f"tensor '{name}' is a partitioned variable (saved in slices); that is not supported")
    tf_dtype = _DTYPES.get(_last(f, 1), (None,))[0]
    if tf_dtype is None:
        raise _Corrupt(f"tensor '{name}' has TensorFlow dtype enum {_last(f, 1)}; supported: {', '.join(_STORED)}")
    shape = _fields(_last(f, 2, b""))  # TensorShapeProto: dim=2 (Dim: size=1, name=2), unknown_rank=3
    dims = tuple(_signed(_last(_fields(d), 1)) for d in shape.get(2, []))
    if _last(shape, 3) or any(d < 0 for d in dims):
        raise _Corrupt(f"tensor '{name}' has no fully known shape ({dims})")
    shard, size = _signed(_last(f, 3)), _last(f, 5)
    if not 0 <= shard < num_shards:
        raise _Corrupt(f"tensor '{name}' is in shard {shard}, but the header says {num_shards} shard(s)")
    stored = _STORED[tf_dtype]
    if stored and size != (expected := np.dtype(stored).itemsize * int(np.prod(dims))):
        raise _Corrupt(f"tensor '{name}' has {size} bytes, expected {expected} for {tf_dtype} {dims}")
    dtype = "string" if stored is None else np.dtype("float32" if tf_dtype == "bfloat16" else tf_dtype)
    return Entry(name, dtype, dims, shard, _last(f, 4), size, _last(f, 6), tf_dtype)


def _strings(e: Entry, data: bytes) -> list[bytes]:
    """DT_STRING (WriteStringTensor): a varint64 length per element, a masked crc32c of the lengths (4 bytes),
    then all the bytes. The crcs see each length as a little-endian uint32 (uint64 if it does not fit), not
    as its varint bytes; the entry's crc then continues over the 4 stored crc bytes and the string bytes."""
    lengths, pos = [], 0
    for _ in range(int(np.prod(e.shape))):
        n, pos = _varint(data, pos)
        lengths.append(n)
    crc = google_crc32c.value(b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths))
    if pos + 4 + sum(lengths) > len(data):
        raise _Corrupt(f"tensor '{e.name}': string lengths run past its {len(data)} bytes (file corrupt?)")
    if _mask(crc) != struct.unpack_from("<I", data, pos)[0]:
        raise _Corrupt(f"tensor '{e.name}': its string lengths fail their crc32c check (file corrupt?)")
    if _mask(google_crc32c.extend(crc, data[pos:pos + 4 + sum(lengths)])) != e.crc:
        raise _Corrupt(f"tensor '{e.name}' fails its crc32c check (file corrupt?)")
    starts = np.cumsum([pos + 4] + lengths)
    return [data[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _decode(e: Entry, data: bytes) -> np.ndarray:
    """The array for ``e`` from its ``e.size`` bytes."""
    if e.dtype == "string":
        out = np.empty(len(strings := _strings(e, data)), dtype=object)
        out[:] = strings
        return out.reshape(e.shape)
    if _mask(google_crc32c.value(data)) != e.crc:
        raise _Corrupt(f"tensor '{e.name}' fails its crc32c check (file corrupt?)")
    raw = np.frombuffer(data, dtype=_STORED[e.tf_dtype])
    if e.tf_dtype == "bfloat16":  # bfloat16 is the top half of a float32: shifting the bits up is exact
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(e.shape)
    return raw.astype(e.dtype).reshape(e.shape)  # astype copies: writable, native byte order


def checkpoint_prefix(path) -> Path:
    """The prefix of a TF checkpoint from the prefix itself ('dir/model.ckpt'), its '.index' or one of its
    '.data-...' files, or a folder holding exactly one '*.index'."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.index"))
        if len(found) != 1:
            names = ", ".join(f.name for f in found)
            raise CheckpointError(f"{p}: expected one TensorFlow checkpoint (*.index) in this folder, found "
                                  f"{len(found)}{': ' + names + '; pass one of their prefixes' if found else ''}")
        p = found[0]
    prefix = Path(_DATA_FILE.sub("", str(p)[:-len(".index")] if p.name.endswith(".index") else str(p)))
    if not Path(f"{prefix}.index").is_file():
        raise CheckpointError(f"{path}: not a TensorFlow checkpoint (no {prefix}.index)")
    return prefix


def is_tf_checkpoint(path) -> bool:
    """True when ``checkpoint_prefix(path)`` finds a checkpoint (its files are not read)."""
    try:
        checkpoint_prefix(path)
    except CheckpointError:
        return False
    return True


class TensorBundle:
    """A TF checkpoint: its index is parsed on creation (``prefix``, ``num_shards``, ``entries``: name ->
    :class:`Entry`, in key order); tensors are read, crc-checked and shaped on demand."""

    def __init__(self, path):
        """Open the checkpoint at ``path`` (anything ``checkpoint_prefix`` accepts) and parse its index."""
        self.prefix = checkpoint_prefix(path)
        index = Path(f"{self.prefix}.index")
        try:
            items = _table(index.read_bytes())
            if not items or items[0][0] != b"":
                raise _Corrupt("no header entry (empty key) in the index")
            header = _fields(items[0][1])  # BundleHeaderProto: num_shards=1, endianness=2, version=3
            self.num_shards = _last(header, 1)
            if _last(header, 2) != 0 or self.num_shards < 1:
                raise _Corrupt(f"unsupported header: {self.num_shards} shards, endianness {_last(header, 2)} "
                               "(only little-endian (0) is supported)")
            self.entries = {e.name: e for e in (_entry(k.decode("utf-8", "backslashreplace"), v, self.num_shards)
                                                for k, v in items[1:])}
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
        except _Corrupt as e:
            raise CheckpointError(f"{index}: {e}") from None

    def shard_path(self, shard: int) -> Path:
        """The data file of shard number ``shard``."""
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def _read_many(self, entries) -> dict[str, np.ndarray]:
        """The arrays of ``entries``, by name: each shard is opened once and read in offset order."""
        files, out = {}, {}
        try:
            for e in sorted(entries, key=lambda e: (e.shard, e.offset)):
                path = self.shard_path(e.shard)
                if e.shard not in files:
                    try:
                        files[e.shard] = open(path, "rb")
                    except OSError as err:
                        raise CheckpointError(f"{path}: cannot open this data file of checkpoint {self.prefix}, "
                                              f"needed for tensor '{e.name}' ({err.strerror})") from None
                files[e.shard].seek(e.offset)
                data = files[e.shard].read(e.size)
                if len(data) != e.size:
                    have = os.fstat(files[e.shard].fileno()).st_size
                    raise CheckpointError(f"{path}: tensor '{e.name}' needs bytes {e.offset}..{e.offset + e.size}, "
                                          f"the file has {have} bytes (truncated?)")
                try:
                    out[e.name] = _decode(e, data)
                except _Corrupt as err:
                    raise CheckpointError(f"{path}: {err}") from None
        finally:
            for f in files.values():
                f.close()
        return out

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (an object array of bytes for strings), crc-checked; KeyError
        if there is no such tensor."""
        return self._read_many([self.entries[name]])[name]

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor, by name in key order."""
        arrays = self._read_many(self.entries.values())
        return {name: arrays[name] for name in self.entries}

    def keys(self):
        """The tensor names, in key (sorted) order."""
        return self.entries.keys()

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of the TF checkpoint at ``path`` (see ``checkpoint_prefix``), by name."""
    return TensorBundle(path).read_all()
