"""The TensorBundle reader: the two official-layout fixtures, bundles from a small writer written here from the
format description (leveldb's table format, tensor_bundle.proto/.cc), corrupted copies, and prefix resolution."""
import json
import shutil
import struct
import tempfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilezoo.convert.tensorbundle import TensorBundle, checkpoint_prefix, is_tf_checkpoint, read_checkpoint
from mobilezoo.models.weights import CheckpointError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"
MOAT = FIXTURES / "deeplab2_tiny_moat_0"
MOBILEDET = FIXTURES / "tfod_ssdlite_mobiledet_cpu"
EMA = "/ExponentialMovingAverage"


# --- the two official-layout fixtures -------------------------------------------------------------------------

def test_moat_fixture_names_shapes_and_ema_copies():
    summary = json.loads((MOAT / "summary.json").read_text())
    bundle = TensorBundle(MOAT)
    assert len(bundle) == summary["n_entries"] == 636
    listed = {k: v for group in summary.values() if isinstance(group, dict) for k, v in group.items()}
    assert len(listed) == 61
    assert {k: bundle.entries[k].shape for k in listed} == {k: tuple(v) for k, v in listed.items()}
    assert {str(e.dtype) for e in bundle.entries.values()} == {"float32"}
    emas = [n for n in bundle if n.endswith(EMA)]
    assert len(emas) == summary["n_trainable"] and len(bundle) - len(emas) == summary["n_variables"]
    # README: every EMA copy was written as its variable x 1.01 (so a reader mixing up offsets, shapes or
    # names cannot pass); equal up to float32 rounding.
    tensors = bundle.read_all()
    assert list(tensors) == list(bundle.keys())
    for name in emas:
        raw = tensors[name[:-len(EMA)]]
        assert tensors[name].shape == raw.shape and np.abs(raw).max() > 0
        np.testing.assert_allclose(tensors[name], 1.01 * raw, rtol=1e-6, err_msg=name)
    stem = bundle.read("moat/stem/conv_0/kernel")
    assert stem.shape == tuple(summary["stem_and_head"]["moat/stem/conv_0/kernel"]) and stem.flags.writeable
    np.testing.assert_array_equal(stem, tensors["moat/stem/conv_0/kernel"])


def test_mobiledet_fixture_every_name_shape_and_the_value_count():
    names = json.loads((MOBILEDET / "names.json").read_text())
    tensors = read_checkpoint(MOBILEDET / "model.ckpt")
    assert len(tensors) == names["n_entries"] == 506
    assert {k: list(v.shape) for k, v in tensors.items()} == names["all"]
    step = tensors.pop("global_step")
    assert step.dtype == np.int64 and step.shape == ()
    assert {v.dtype for v in tensors.values()} == {np.dtype("float32")}
    # names.json's n_values counts the float variables; global_step is the one extra scalar.
    assert sum(v.size for v in tensors.values()) == names["n_values"] == 4_205_423
    assert all(np.isfinite(v).all() for v in tensors.values())


# --- a minimal TensorBundle writer, from the format description ----------------------------------------------

TF_ENUM = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "string": 7, "int64": 9,
           "bool": 10, "bfloat16": 14, "uint16": 17, "float16": 19}


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # protobuf writes negative ints as 64-bit two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def pb_int(field: int, n: int) -> bytes:  # proto3 leaves out fields holding their default (0)
    return varint(field << 3) + varint(n) if n else b""


def pb_bytes(field: int, b: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(b)) + b


def mask(crc: int) -> int:
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def block(items, restart_interval: int) -> bytes:
    """leveldb block: entries sharing a key prefix with the previous key except at restarts, restart array, count."""
    buf, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(buf))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        buf += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(buf) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def table(items, block_size=96, restart_interval=3, compression=0) -> tuple[bytes, int]:
    """An SSTable (data blocks, empty metaindex block, index block, footer) and its number of data blocks."""
    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        trailer = bytes([compression])
        out.extend(contents + trailer + struct.pack("<I", mask(google_crc32c.value(contents + trailer))))
        return handle

    index, pending = [], []
    for i, kv in enumerate(items):
        pending.append(kv)
        if sum(len(k) + len(v) for k, v in pending) >= block_size or i == len(items) - 1:
            index.append((kv[0], put(block(pending, restart_interval))))  # index key: the block's last key
            pending = []
    meta, idx = put(block([], 1)), put(block(index, 1))
    return bytes(out + (meta + idx).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)), len(index)


def tensor_data(tf_dtype: str, value: np.ndarray) -> tuple[bytes, int]:
    """The bytes a tensor is stored as and their masked crc32c (strings: see WriteStringTensor)."""
    if tf_dtype == "bfloat16":  # value: float32 whose low 16 bits are zero; stored: the high 16 bits
        data = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
    elif tf_dtype != "string":
        data = value.astype(np.dtype(tf_dtype).newbyteorder("<")).tobytes()
    else:
        flat = list(value.reshape(-1))
        lengths_crc = google_crc32c.value(b"".join(struct.pack("<I", len(s)) for s in flat))
        checksum = struct.pack("<I", mask(lengths_crc))
        data = b"".join(varint(len(s)) for s in flat) + checksum + b"".join(flat)
        return data, mask(google_crc32c.extend(lengths_crc, checksum + b"".join(flat)))
    return data, mask(google_crc32c.value(data))


def write_bundle(prefix: Path, tensors: dict, num_shards=2, extra=(), **table_kw) -> int:
    """Write {name: (tf_dtype, array, shard)} as PREFIX.index + shards; ``extra``: raw (key, entry) pairs.
    Returns the number of data blocks of the index."""
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", pb_int(1, num_shards) + pb_bytes(3, pb_int(1, 1)))] + list(extra)
    for name, (tf_dtype, value, shard) in tensors.items():
        data, crc = tensor_data(tf_dtype, value)
        shape = b"".join(pb_bytes(2, pb_int(1, d)) for d in value.shape)
        items.append((name.encode(), pb_int(1, TF_ENUM[tf_dtype]) + pb_bytes(2, shape) + pb_int(3, shard)
                      + pb_int(4, len(shards[shard])) + pb_int(5, len(data)) + varint(6 << 3 | 5)
                      + struct.pack("<I", crc)))
        shards[shard] += data + b"\0" * (-len(data) % 8)  # TF may align tensors; offsets are what count
    index, n_blocks = table(sorted(items), **table_kw)
    Path(f"{prefix}.index").write_bytes(index)
    for i, data in enumerate(shards):
        Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}").write_bytes(data)
    return n_blocks


def sample_tensors(rng) -> dict:
    bf16 = (rng.standard_normal((2, 3)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    return {
        "net/block_1/conv/kernel": ("float32", rng.standard_normal((3, 3, 2, 4)).astype(np.float32), 0),
        "net/block_1/conv/bias": ("float64", rng.standard_normal(4), 1),
        "net/block_1/bn/gamma": ("float16", rng.standard_normal(4).astype(np.float16), 1),
        "net/block_1/bn/beta": ("bfloat16", bf16, 0),
        "net/block_2/mask": ("bool", rng.random((5, 2)) > 0.5, 0),
        "net/block_2/lut": ("uint8", rng.integers(0, 256, 300).astype(np.uint8), 1),
        "net/block_2/ids": ("int32", rng.integers(-9, 9, (2, 2)).astype(np.int32), 0),
        "net/block_2/small": ("int8", np.array([-128, 0, 127], np.int8), 1),
        "net/block_2/wide": ("int16", np.array([-30000, 5], np.int16), 1),
        "net/block_2/codes": ("uint16", np.array([0, 65535], np.uint16), 0),
        "net/vocab": ("string", np.array([b"", b"a", "é".encode(), b"x" * 200, b"\0\xff"], dtype=object), 1),
        "net/empty": ("float32", np.zeros((0, 3), np.float32), 0),
        "global_step": ("int64", np.array(-7, np.int64), 1),
    }


def test_hand_written_bundle_reads_back_exactly(tmp_path):
    tensors = sample_tensors(np.random.default_rng(0))
    n_blocks = write_bundle(tmp_path / "m.ckpt", tensors)
    assert n_blocks >= 4  # several data blocks, each with restarts inside
    bundle = TensorBundle(tmp_path)
    assert list(bundle) == sorted(tensors) and bundle.num_shards == 2
    assert {e.shard for e in bundle.entries.values()} == {0, 1}
    got = bundle.read_all()
    for name, (tf_dtype, value, _) in tensors.items():
        assert bundle.entries[name].tf_dtype == tf_dtype and got[name].shape == value.shape, name
        if tf_dtype == "string":
            assert got[name].dtype == object and list(got[name]) == list(value)
        else:
            assert got[name].dtype == (np.float32 if tf_dtype == "bfloat16" else value.dtype), name
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert bundle.read("net/vocab")[3] == b"x" * 200  # a 2-byte varint length


def test_bfloat16_matches_ml_dtypes(tmp_path):
    import ml_dtypes  # installed with onnx, a dependency
    bits = np.arange(0, 1 << 16, 7, dtype=np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # no inf/nan, whose payloads need not compare equal
    value = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    write_bundle(tmp_path / "b", {"w": ("bfloat16", value, 0)}, num_shards=1)
    np.testing.assert_array_equal(TensorBundle(tmp_path / "b").read("w"), value)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_random_bundles_round_trip(data):
    names = data.draw(st.lists(st.text("ab/_.é0", min_size=1, max_size=14), min_size=1, max_size=25, unique=True))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for name in names:
        tf_dtype = data.draw(st.sampled_from(sorted(set(TF_ENUM) - {"bfloat16"})))
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        if tf_dtype == "string":
            value = np.empty(shape, dtype=object)
            value.reshape(-1)[:] = [rng.bytes(int(rng.choice([0, 1, 127, 128, 300]))) for _ in range(value.size)]
        elif tf_dtype == "bool":
            value = rng.random(shape) > 0.5
        elif np.dtype(tf_dtype).kind in "iu":
            info = np.iinfo(tf_dtype)
            value = rng.integers(info.min, info.max, shape, dtype=tf_dtype, endpoint=True)
        else:
            value = (rng.standard_normal(shape) * 100).astype(tf_dtype)
        tensors[name] = (tf_dtype, value, int(rng.integers(0, 3)))
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(Path(tmp) / "r", tensors, num_shards=3, block_size=data.draw(st.sampled_from([16, 64, 4096])),
                     restart_interval=data.draw(st.integers(1, 5)))
        bundle = TensorBundle(Path(tmp) / "r.index")
        assert list(bundle) == sorted(names, key=str.encode)  # the table is in byte order
        got = bundle.read_all()
    for name, (tf_dtype, value, shard) in tensors.items():
        assert (bundle.entries[name].shard, bundle.entries[name].tf_dtype) == (shard, tf_dtype)
        assert got[name].shape == value.shape
        assert got[name].tolist() == value.tolist(), name


# --- corrupt and incomplete checkpoints -----------------------------------------------------------------------

def copy_checkpoint(tmp_path: Path) -> Path:
    for f in MOBILEDET.glob("model.ckpt.*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "model.ckpt"


def error_of(fn, *args) -> str:
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message and message
    return message


def change(path: Path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def flip(at: int):
    def f(data):
        data[at] ^= 0x10
        return data
    return f


DATA = "model.ckpt.data-00000-of-00001"


@pytest.mark.parametrize("damage, expected", [
    (lambda d: d[:len(d) // 2], "bad magic number"),
    (lambda d: d[:30], "bad magic number"),
    (lambda d: d[:-1] + b"\x00", "bad magic number"),
    (flip(40), "data block at offset 0 fails its crc32c check"),
    (flip(-48 - 7), "index block at offset"),
], ids=["half", "30-bytes", "magic", "data-block", "index-block"])
def test_damaged_index(tmp_path, damage, expected):
    prefix = copy_checkpoint(tmp_path)
    change(tmp_path / "model.ckpt.index", damage)
    message = error_of(TensorBundle, prefix)
    assert message.startswith(f"{prefix}.index: ") and expected in message


def test_damaged_tensor_names_the_file_and_the_tensor(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    entry = TensorBundle(prefix).entries["FeatureExtractor/MobileDetCPU/Conv/weights"]
    change(tmp_path / DATA, flip(entry.offset + entry.size // 2))
    bundle = TensorBundle(prefix)
    assert error_of(bundle.read, entry.name) == (f"{tmp_path / DATA}: tensor '{entry.name}' fails its crc32c check "
                                                 "(file corrupt?)")
    assert "FeatureExtractor/MobileDetCPU/Conv/weights" in error_of(bundle.read_all)
    assert bundle.read("global_step") == 0  # the other tensors still read


def test_truncated_and_missing_data_file(tmp_path):
    prefix = copy_checkpoint(tmp_path)
    change(tmp_path / DATA, lambda d: d[:len(d) // 2])
    message = error_of(read_checkpoint, prefix)
    assert message.startswith(f"{tmp_path / DATA}: tensor '") and "bytes (truncated?)" in message
    (tmp_path / DATA).unlink()
    bundle = TensorBundle(prefix)  # the index alone still lists the tensors
    assert len(bundle) == 506
    message = error_of(bundle.read, "global_step")
    assert message.startswith(f"{tmp_path / DATA}: cannot open") and "'global_step'" in message


def test_damaged_strings(tmp_path):
    write_bundle(tmp_path / "s", {"v": ("string", np.array([b"abc", b"de"], dtype=object), 0)}, num_shards=1)
    shard = tmp_path / "s.data-00000-of-00001"  # [3][2][4-byte crc of the lengths]abcde
    change(shard, flip(6))
    assert "tensor 'v' fails its crc32c" in error_of(TensorBundle(tmp_path / "s").read, "v")
    change(shard, flip(6))
    change(shard, flip(3))
    assert "tensor 'v': its string lengths fail their crc32c" in error_of(TensorBundle(tmp_path / "s").read, "v")


def entry(dtype: int, *more: bytes) -> bytes:
    return pb_int(1, dtype) + pb_bytes(2, pb_bytes(2, pb_int(1, 2))) + b"".join(more)


@pytest.mark.parametrize("key, value, expected", [
    (b"res", entry(20), "tensor 'res' has TensorFlow dtype enum 20; supported: float32"),
    (b"part", entry(1, pb_bytes(7, b"")), "tensor 'part' is a partitioned variable (saved in slices)"),
    (b"bad", entry(1, pb_int(5, 3)), "tensor 'bad' has 3 bytes, expected 8 for float32 (2,)"),
    (b"far", entry(1, pb_int(3, 4), pb_int(5, 8)), "tensor 'far' is in shard 4, but the header says 1 shard(s)"),
], ids=["dtype", "slices", "size", "shard"])
def test_unsupported_entries(tmp_path, key, value, expected):
    write_bundle(tmp_path / "u", {}, num_shards=1, extra=[(key, value)])
    assert error_of(TensorBundle, tmp_path / "u").startswith(f"{tmp_path / 'u'}.index: {expected}")


def test_compressed_index_is_refused(tmp_path):
    write_bundle(tmp_path / "z", {"w": ("float32", np.ones(3, np.float32), 0)}, num_shards=1, compression=1)
    assert "is compressed (type 1)" in error_of(TensorBundle, tmp_path / "z")


# --- checkpoint_prefix --------------------------------------------------------------------------------------

@pytest.mark.parametrize("given_as", ["model.ckpt", "model.ckpt.index", DATA, ""])
def test_checkpoint_prefix_forms(given_as):
    path = MOAT / given_as if given_as else MOAT
    assert checkpoint_prefix(path) == MOAT / "model.ckpt" and is_tf_checkpoint(str(path))


def test_checkpoint_prefix_errors(tmp_path):
    for name in ("ckpt-1.index", "ckpt-2.index"):
        (tmp_path / name).touch()
    message = error_of(checkpoint_prefix, tmp_path)
    assert "found 2: ckpt-1.index, ckpt-2.index" in message and str(tmp_path) in message
    assert checkpoint_prefix(tmp_path / "ckpt-2") == tmp_path / "ckpt-2"
    (tmp_path / "empty").mkdir()
    assert "found 0" in error_of(checkpoint_prefix, tmp_path / "empty")
    missing = tmp_path / "nope" / "model.ckpt"
    assert error_of(checkpoint_prefix, missing) == f"{missing}: not a TensorFlow checkpoint (no {missing}.index)"
    assert not is_tf_checkpoint(missing) and not is_tf_checkpoint(tmp_path)
