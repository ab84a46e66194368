"""Caches on disk: checksummed snapshots and file-backed (memory-mapped) arenas.

Snapshots (``KVCache.save`` / ``KVCache.load``):

1. a round trip is bit-exact (float16/32/64; uniform, ragged, sliding-window
   and empty caches) and the loaded cache attends exactly as the original;
2. the file is the documented prefix, header and the committed positions
   only, in the documented order: unused capacity is not written;
3. ``load(max_seq_len=...)`` resizes, and refuses a capacity below the
   longest row;
4. ``save`` is atomic: it replaces an existing file whole, and a save that
   fails midway leaves the old file and no temporary behind;
5. every kind of damage is a ``CacheFileError`` naming the file and the
   problem, raised before the arena is allocated where the header or the
   size already tell.

Mapped arenas (``KVCache(..., path=...)`` / ``KVCache.open``):

6. creation refuses an existing file; a reopened ``r+`` cache has its
   contents and bookkeeping back bit-exactly, and its writes reach the file;
7. ``c`` (copy-on-write) never changes the file;
8. two processes share one file's prefix, each extending it privately;
9. opening reads nothing: residency grows only with the pages touched;
10. damaged or missing files are refused and never created.

Nothing here depends on timing. Sizes are small except the 64 MiB arena of
(9), which needs enough pages for residency figures to mean something.
"""

import gc
import hashlib
import io
import json
import mmap
import os
import re
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from kvarena import KVCache, attend_reference
from kvarena import storage
from kvarena.storage import CacheFileError
from test_int8 import dequantized

B, S, L, H, D = 3, 10, 2, 2, 4
N_SINK = 2
DTYPES = [np.float16, np.float32, np.float64, np.int8]
KINDS = ["uniform", "ragged", "window", "empty"]

# the formats, as kvarena.storage's docstring states them (not imported from it,
# so that a change to the format shows up here)
SNAPSHOT_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, payload crc32
P = SNAPSHOT_PREFIX.size
MAPPED_PREFIX = struct.Struct("<8sII")      # magic, version, header length
SNAPSHOT_MAGIC, MAPPED_MAGIC, VERSION = b"KVASNAP\0", b"KVAMMAP\0", 3
PAGE = mmap.PAGESIZE
MIB = 1024 * 1024


# -- helpers -------------------------------------------------------------------

def random_block(rng, cache, T):
    """Random (B, H, T, D) values already in the cache's dtype (so writes are
    exact; for int8, float32 values that quantize to themselves)."""
    shape = (cache.batch_size, cache.num_heads, T, cache.head_dim)
    if cache.dtype == np.int8:
        return dequantized(rng.standard_normal(shape))
    return rng.standard_normal(shape).astype(cache.dtype)


def write_step(cache, rng, T, commit=None):
    """Write T random positions to every layer, then commit ``commit`` (default T)."""
    for layer in range(cache.num_layers):
        cache.update(layer, random_block(rng, cache, T), random_block(rng, cache, T))
    if commit is not None:
        cache.advance(commit)


def fill(cache, kind, rng):
    """Bring a fresh (B, S, ...) cache into the state that ``kind`` names."""
    if kind == "uniform":
        write_step(cache, rng, 4, commit=4)
        write_step(cache, rng, 1, commit=1)
        write_step(cache, rng, 1, commit=1)                   # seq_lens [6, 6, 6]
    elif kind == "ragged":
        write_step(cache, rng, 6, commit=[6, 2, 0])           # padding past 2 and 0 stays
        write_step(cache, rng, 1, commit=1)                   # seq_lens [7, 3, 1]
    elif kind == "window":
        write_step(cache, rng, 3, commit=[3, 1, 2])
        for _ in range(10):
            write_step(cache, rng, 1, commit=1)               # seq_lens [10]*3, evicted [3, 1, 2]
    elif kind == "empty":
        write_step(cache, rng, 3)                             # written, never committed
    else:
        raise AssertionError(kind)
    return cache


def make_cache(kind, dtype, rng, **kwargs):
    n_sink = N_SINK if kind == "window" else None
    return fill(KVCache(B, S, L, H, D, dtype=dtype, n_sink=n_sink, **kwargs), kind, rng)


def committed(cache):
    """Every row's committed keys and values, per layer, as raw bytes."""
    return [[(k.tobytes(), v.tobytes()) for k, v in
             (cache.get(layer, row=b) for b in range(cache.batch_size))]
            for layer in range(cache.num_layers)]


def assert_same_cache(got, want, max_seq_len=None):
    """Same geometry, dtype, window, lengths and committed bits."""
    assert (got.num_layers, got.batch_size, got.num_heads, got.head_dim) == \
        (want.num_layers, want.batch_size, want.num_heads, want.head_dim)
    assert got.max_seq_len == (want.max_seq_len if max_seq_len is None else max_seq_len)
    assert got.dtype == want.dtype
    assert got.n_sink == want.n_sink
    assert got.seq_lens.tolist() == want.seq_lens.tolist()
    assert got.evicted.tolist() == want.evicted.tolist()
    assert got.seq_pos == want.seq_pos
    assert committed(got) == committed(want)


def expected_attention(cache, layer, q, k, v):
    """``attend_reference`` in float64 of ``q`` over ``cache``'s committed positions
    of ``layer`` and the new ``k``, ``v``, with the sliding window's eviction
    applied as ``attend`` applies it. Call before ``attend`` changes the cache."""
    T = q.shape[2]
    out = np.empty(q.shape)
    for b in range(cache.batch_size):
        keys, values = (a[0].astype(np.float64) for a in cache.get(layer, row=b))
        n = keys.shape[1]
        if cache.n_sink is not None and n + T > cache.max_seq_len:
            keep = np.r_[0:cache.n_sink, cache.n_sink + n + T - cache.max_seq_len:n]
            keys, values = keys[:, keep], values[:, keep]
        if cache.dtype == np.int8:     # what the cache will store of k, v
            k, v = dequantized(k), dequantized(v)
        keys = np.concatenate([keys, k[b].astype(np.float64)], axis=1)[None]
        values = np.concatenate([values, v[b].astype(np.float64)], axis=1)[None]
        out[b] = attend_reference(q[b:b + 1], keys, values, [keys.shape[2] - T])[0]
    return out


def tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ModuleProxy:
    """A module with some attributes replaced: installed as ``kvarena.storage.np``
    (or ``.zlib``), it changes what storage calls without touching numpy itself."""

    def __init__(self, module, **overrides):
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._module, name)


class Boom(Exception):
    pass


def fail_on_call(function, n, calls):
    """``function``, except that its ``n``-th call raises ``Boom``."""
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Boom(f"call {n} of {function.__name__}")
        return function(*args, **kwargs)
    return wrapper


@pytest.fixture
def forbid_allocation(monkeypatch):
    """Make any np.empty / np.zeros inside kvarena.storage fail the test."""
    def refuse(shape, *args, **kwargs):
        raise AssertionError(f"kvarena.storage allocated {shape} before the file was checked")
    monkeypatch.setattr(storage, "np", ModuleProxy(np, empty=refuse, zeros=refuse))


# -- 1. round trip ---------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_is_bit_exact_and_attends_identically(tmp_path, rng, dtype, kind):
    cache = make_cache(kind, dtype, rng)
    if kind == "window":
        assert cache.evicted.min() > 0, "the window must have evicted for this test to mean much"
    if kind == "empty":
        assert cache.seq_lens.tolist() == [0] * B
    path = tmp_path / "cache.kva"
    cache.save(path)
    loaded = KVCache.load(path)

    assert_same_cache(loaded, cache)
    assert loaded.path is None and loaded.window == cache.window
    for b, n in enumerate(loaded.seq_lens):
        # only committed positions travel: the rest of a loaded row is zero
        assert not loaded.arena[:, :, b, :, n:].any()

    T = 2
    q = rng.standard_normal((B, H, T, D))
    k, v = random_block(rng, cache, T), random_block(rng, cache, T)
    want = [expected_attention(cache, layer, q, k, v) for layer in range(L)]
    for layer in range(L):
        out, out_loaded = cache.attend(layer, q, k, v), loaded.attend(layer, q, k, v)
        assert out.dtype == out_loaded.dtype
        assert out.tobytes() == out_loaded.tobytes(), f"layer {layer}: loaded cache attends differently"
        np.testing.assert_allclose(out, want[layer], **tolerance(dtype))
    cache.advance(T)
    loaded.advance(T)
    assert_same_cache(loaded, cache)


# -- 2. what the file holds ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_file_holds_prefix_header_and_committed_positions_only(tmp_path, rng, dtype, kind):
    cache = make_cache(kind, dtype, rng)
    path = tmp_path / "cache.kva"
    cache.save(path)
    raw = path.read_bytes()

    magic, version, header_len, header_crc, payload_crc = SNAPSHOT_PREFIX.unpack_from(raw)
    int8 = np.dtype(dtype) == np.int8
    assert (magic, version) == (SNAPSHOT_MAGIC, VERSION)     # every dtype: one version
    scale = 4 if int8 else 0
    payload = 2 * L * H * (D * np.dtype(dtype).itemsize + scale) * int(cache.seq_lens.sum())
    assert len(raw) == P + header_len + payload
    capacity = 2 * L * B * H * S * (D * np.dtype(dtype).itemsize + scale)
    if kind != "window":                              # a full window is all capacity
        assert len(raw) < P + header_len + capacity

    header = json.loads(raw[P:P + header_len])
    assert header == {"shape": [L, 2, B, H, S, D], "dtype": np.dtype(dtype).str,
                      "n_sink": cache.n_sink, "seq_lens": cache.seq_lens.tolist(),
                      "evicted": cache.evicted.tolist(), "payload_bytes": payload,
                      "rope_theta": None, "rope_style": None}
    # payload order: layer, then keys/values, then row; each (H, n, D) in C order,
    # positions in order (get()'s, not the slots of a sliding window's ring); an
    # int8 block followed by its scales, (H, n) float32

    def block(layer, kv, b):
        if int8:
            raw = cache.get_quantized(layer, row=b)
            return raw[2 * kv][0].tobytes() + raw[2 * kv + 1][0].tobytes()
        return cache.get(layer, row=b)[kv][0].tobytes()
    blocks = [block(layer, kv, b) for layer in range(L) for kv in range(2) for b in range(B)]
    assert raw[P + header_len:] == b"".join(blocks)
    assert header_crc == zlib.crc32(raw[P:P + header_len])
    assert payload_crc == zlib.crc32(raw[P + header_len:])


# -- 3. capacity on load -----------------------------------------------------------

def test_load_with_more_capacity_keeps_decoding(tmp_path, rng):
    cache = make_cache("ragged", np.float32, rng)            # seq_lens [7, 3, 1], capacity 10
    cache.save(tmp_path / "c.kva")
    loaded = KVCache.load(tmp_path / "c.kva", max_seq_len=24)
    assert_same_cache(loaded, cache, max_seq_len=24)

    prefix = committed(cache)
    steps = []
    for _ in range(12):                                     # the longest row ends at 19 > 10
        q = rng.standard_normal((B, H, 1, D))
        k, v = random_block(rng, loaded, 1), random_block(rng, loaded, 1)
        want = expected_attention(loaded, 0, q, k, v)
        np.testing.assert_allclose(loaded.attend(0, q, k, v), want, rtol=1e-5, atol=1e-5)
        for layer in range(1, L):
            loaded.update(layer, k, v)
        loaded.advance(1)
        steps.append((k, v))
    assert loaded.seq_lens.tolist() == [19, 15, 13]
    new_k = np.concatenate([k for k, _ in steps], axis=2)
    for b, n in enumerate(cache.seq_lens):
        k, v = loaded.get(0, row=b)
        assert k[:, :, :n].tobytes() == prefix[0][b][0]
        assert k[:, :, n:].tobytes() == new_k[b:b + 1].tobytes()


def test_load_with_less_capacity(tmp_path, rng):
    cache = make_cache("ragged", np.float64, rng)            # longest row 7
    cache.save(tmp_path / "c.kva")
    assert_same_cache(KVCache.load(tmp_path / "c.kva", max_seq_len=7), cache, max_seq_len=7)
    with pytest.raises(ValueError, match="max_seq_len") as excinfo:
        KVCache.load(tmp_path / "c.kva", max_seq_len=6)
    assert "6" in str(excinfo.value) and "7" in str(excinfo.value)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.load(tmp_path / "c.kva", max_seq_len=0)


# -- 4. atomic save ------------------------------------------------------------------

def test_save_replaces_an_existing_file(tmp_path, rng):
    path = tmp_path / "c.kva"
    make_cache("uniform", np.float32, rng).save(path)
    second = make_cache("ragged", np.float16, rng)
    second.save(path)
    assert_same_cache(KVCache.load(path), second)
    assert os.listdir(tmp_path) == ["c.kva"]


def test_save_keeps_the_mode_of_the_file_it_replaces_and_the_umask_for_new_ones(tmp_path, rng):
    cache = make_cache("uniform", np.float32, rng)
    old_umask = os.umask(0o027)
    try:
        cache.save(tmp_path / "new.kva")            # not mkstemp's 0600
        assert stat.S_IMODE(os.stat(tmp_path / "new.kva").st_mode) == 0o640
        (tmp_path / "old.kva").write_bytes(b"")
        os.chmod(tmp_path / "old.kva", 0o604)
        cache.save(tmp_path / "old.kva")
        assert stat.S_IMODE(os.stat(tmp_path / "old.kva").st_mode) == 0o604
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("module, function, n", [
    ("zlib", "crc32", 5),                 # 4 payload blocks, then fail
    ("np", "ascontiguousarray", 4),       # 3 blocks written, the 4th fails
])
def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, rng, monkeypatch,
                                                          module, function, n):
    path = tmp_path / "c.kva"
    make_cache("uniform", np.float32, rng).save(path)
    before = path.read_bytes()

    original = getattr(storage, module)
    replacement = make_cache("ragged", np.float32, rng)
    for target in [path, tmp_path / "new.kva"]:       # over the old file, and to a new name
        calls = []
        monkeypatch.setattr(storage, module, ModuleProxy(
            original, **{function: fail_on_call(getattr(original, function), n, calls)}))
        with pytest.raises(Boom):
            replacement.save(target)
        assert len(calls) == n, "the save must have failed midway, where it was told to"
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.kva"], "a temporary file or a partial new file remains"
    KVCache.load(path)                     # and it still loads


# -- 5. damaged snapshots ----------------------------------------------------------------

@pytest.fixture
def snapshot(tmp_path, rng):
    """A good snapshot (float32, seq_lens [7, 3, 1], evicted 0) taken apart."""
    cache = make_cache("ragged", np.float32, rng)
    path = tmp_path / "good.kva"
    cache.save(path)
    raw = path.read_bytes()
    header_len = SNAPSHOT_PREFIX.unpack_from(raw)[2]
    header_bytes = raw[P:P + header_len]
    mapped = tmp_path / "for-its-magic.kvm"
    KVCache(1, 4, 1, 1, 4, path=mapped)
    npy = io.BytesIO()
    np.save(npy, rng.standard_normal((4, 4)))
    snap = SimpleNamespace(raw=raw, header=json.loads(header_bytes), header_bytes=header_bytes,
                           payload=raw[P + header_len:], payload_start=P + header_len,
                           mapped_raw=mapped.read_bytes(), npy_raw=npy.getvalue())
    path.unlink()
    mapped.unlink()
    return snap


def flip(raw, i, bit=0):
    out = bytearray(raw)
    out[i] ^= 1 << bit
    return bytes(out)


def flip_in_header(snap, pattern):
    """Flip bit 0 of the first byte that ``pattern``'s group 1 matches in the header."""
    start = re.search(pattern, snap.header_bytes).start(1)
    return flip(snap.raw, P + start)


def rebuild(snap, header=None, *, version=VERSION, **changes):
    """The snapshot with another header (bytes, or the good one with ``changes``)
    and crcs that match, so that only the change itself is wrong."""
    if header is None:
        header = {k: v for k, v in {**snap.header, **changes}.items() if v is not DROP}
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, version, len(header), zlib.crc32(header),
                                 zlib.crc32(snap.payload)) + header + snap.payload)


DROP = object()
HUGE = 2 ** 40

# (id, damaged bytes from the snapshot, what the message says, checked before allocating)
DAMAGE = [
    ("empty file", lambda s: b"", "too short", True),
    ("cut inside prefix", lambda s: s.raw[:11], "too short", True),
    ("cut inside header", lambda s: s.raw[:P + len(s.header_bytes) // 2], "header length", True),
    ("cut inside payload", lambda s: s.raw[:s.payload_start + len(s.payload) // 2], "truncated", True),
    ("one byte short", lambda s: s.raw[:-1], "truncated", True),
    ("one trailing byte", lambda s: s.raw + b"\0", "trailing data", True),
    ("payload first byte", lambda s: flip(s.raw, s.payload_start), "checksum", False),
    ("payload middle", lambda s: flip(s.raw, s.payload_start + len(s.payload) // 2, 7), "checksum", False),
    ("payload last byte", lambda s: flip(s.raw, -1, 4), "checksum", False),
    ("header crc", lambda s: flip(s.raw, 16, 3), "header checksum", True),
    ("payload crc", lambda s: flip(s.raw, 20, 3), "payload checksum", False),
    ("seq_lens digit", lambda s: flip_in_header(s, rb'"seq_lens": \[(7)'), "header checksum", True),
    ("evicted digit", lambda s: flip_in_header(s, rb'"evicted": \[(0)'), "header checksum", True),
    ("capacity digit", lambda s: flip_in_header(s, rb'"shape": \[2, 2, 3, 2, 1(0)'), "header checksum", True),
    ("magic of .npy", lambda s: s.npy_raw, "not a kvarena snapshot", True),
    ("magic of mapped arena", lambda s: s.mapped_raw, "not a kvarena snapshot", True),
    ("magic bit", lambda s: flip(s.raw, 3), "not a kvarena snapshot", True),
    ("future version", lambda s: rebuild(s, version=VERSION + 1), f"format version {VERSION + 1}", True),
    ("version 1", lambda s: rebuild(s, version=1), "format version 1 is not supported", True),
    ("version 2", lambda s: rebuild(s, version=2), "format version 2 is not supported", True),
    ("header length 0", lambda s: rebuild(s, b""), "header length 0", True),
    ("header not JSON", lambda s: rebuild(s, b'{"shape": [2, 2'), "not valid JSON", True),
    ("header not UTF-8", lambda s: rebuild(s, b"\xff\xfe{}"), "not valid JSON", True),
    ("header a list", lambda s: rebuild(s, b"[1, 2]"), "JSON object", True),
    ("shape missing", lambda s: rebuild(s, shape=DROP), "shape must be", True),
    ("shape 5 axes", lambda s: rebuild(s, shape=[L, 2, B, H, S]), "shape must be", True),
    ("shape axis 1 not 2", lambda s: rebuild(s, shape=[L, 3, B, H, S, D]), "shape must be", True),
    ("shape zero", lambda s: rebuild(s, shape=[L, 2, B, H, 0, D]), "shape must be", True),
    ("shape float", lambda s: rebuild(s, shape=[L, 2, B, 2.0, S, D]), "shape must be", True),
    ("shape huge", lambda s: rebuild(s, shape=[L, 2, B, HUGE, S, D]), "payload_bytes", True),
    ("shape huge, payload_bytes to match",
     lambda s: rebuild(s, shape=[L, 2, B, HUGE, S, D], payload_bytes=2 * L * HUGE * D * 4 * 11),
     "truncated", True),
    ("dtype int32", lambda s: rebuild(s, dtype="<i4"), "dtype must be", True),
    ("dtype big-endian", lambda s: rebuild(s, dtype=">f4"), "dtype must be", True),
    ("dtype nonsense", lambda s: rebuild(s, dtype="float7"), "dtype must be", True),
    ("dtype a number", lambda s: rebuild(s, dtype=4), "dtype must be", True),
    ("n_sink negative", lambda s: rebuild(s, n_sink=-1), "n_sink must be", True),
    ("n_sink = capacity", lambda s: rebuild(s, n_sink=S), "n_sink must be", True),
    ("n_sink a string", lambda s: rebuild(s, n_sink="2"), "n_sink must be", True),
    ("seq_lens missing", lambda s: rebuild(s, seq_lens=DROP), "seq_lens must be", True),
    ("seq_lens too few", lambda s: rebuild(s, seq_lens=[7, 3]), "seq_lens must be", True),
    ("seq_lens negative", lambda s: rebuild(s, seq_lens=[7, -3, 7]), "seq_lens must be", True),
    ("seq_lens past capacity", lambda s: rebuild(s, seq_lens=[S + 1, 3, 1]), "seq_lens must be", True),
    ("seq_lens float", lambda s: rebuild(s, seq_lens=[7.0, 3, 1]), "seq_lens must be", True),
    ("seq_lens bool", lambda s: rebuild(s, seq_lens=[7, 3, True]), "seq_lens must be", True),
    ("evicted negative", lambda s: rebuild(s, evicted=[0, -1, 0]), "evicted must be", True),
    ("payload_bytes off", lambda s: rebuild(s, payload_bytes=s.header["payload_bytes"] + 4),
     "payload_bytes", True),
]


@pytest.mark.parametrize("damage, message, before_allocating",
                         [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_snapshot_is_refused(tmp_path, snapshot, request, damage, message,
                                     before_allocating):
    path = tmp_path / "damaged.kva"
    path.write_bytes(damage(snapshot))
    if before_allocating:
        request.getfixturevalue("forbid_allocation")
    with pytest.raises(CacheFileError, match=message) as excinfo:
        KVCache.load(path)
    assert isinstance(excinfo.value, ValueError)
    assert str(path) in str(excinfo.value), "the message must name the file"
    assert os.listdir(tmp_path) == ["damaged.kva"]


def test_good_snapshot_from_parts_loads(tmp_path, snapshot):
    """The damage cases are built by ``rebuild``: unchanged, it must give a good file."""
    assert rebuild(snapshot) == snapshot.raw
    path = tmp_path / "rebuilt.kva"
    path.write_bytes(rebuild(snapshot))
    assert KVCache.load(path).seq_lens.tolist() == [7, 3, 1]


def test_missing_snapshot_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        KVCache.load(tmp_path / "missing.kva")
    assert os.listdir(tmp_path) == []


# -- 6. mapped arenas: create, reopen r+ ---------------------------------------------------

def mapped_layout(raw):
    """``(state, arena bytes)`` of a mapped-arena file, read by the documented layout."""
    magic, version, header_len = MAPPED_PREFIX.unpack_from(raw)
    assert (magic, version) == (MAPPED_MAGIC, VERSION)
    header = json.loads(raw[16:16 + header_len])
    batch = header["shape"][2]
    state_offset = -(-(16 + header_len) // 8) * 8
    state_end = state_offset + 8 * (3 * batch + 1)
    arena_offset = -(-state_end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
    state = np.frombuffer(raw[state_offset:state_end], dtype="<i8")
    return header, state, raw[arena_offset:]


def test_mapped_cache_reopens_bit_exact_and_r_plus_writes_persist(tmp_path, rng):
    path = tmp_path / "arena.kvm"
    cache = make_cache("window", np.float32, rng, path=path)
    assert cache.path == str(path) and cache.get_memory_usage()["path"] == str(path)
    want = SimpleNamespace(seq_lens=cache.seq_lens.copy(), evicted=cache.evicted.copy(),
                           rows=committed(cache), arena=cache.arena.tobytes())
    assert want.evicted.min() > 0
    del cache
    gc.collect()

    # the file itself holds the header, the bookkeeping and the arena
    header, state, arena = mapped_layout(path.read_bytes())
    assert header == {"shape": [L, 2, B, H, S, D], "dtype": "<f4", "n_sink": N_SINK,
                      "rope_theta": None, "rope_style": None}
    assert state[:B].tolist() == want.seq_lens.tolist()
    assert state[B:2 * B].tolist() == want.evicted.tolist()
    assert arena == want.arena

    reopened = KVCache.open(path)                            # r+ by default
    assert (reopened.n_sink, reopened.dtype, reopened.max_seq_len) == (N_SINK, np.float32, S)
    assert reopened.seq_lens.tolist() == want.seq_lens.tolist()
    assert reopened.evicted.tolist() == want.evicted.tolist()
    assert committed(reopened) == want.rows
    assert reopened.arena.tobytes() == want.arena

    # writes, eviction, reorder and crop through r+ reach the file
    write_step(reopened, rng, 1, commit=1)
    reopened.reorder([2, 0, 0])
    reopened.crop(-1)
    after = SimpleNamespace(seq_lens=reopened.seq_lens.tolist(), evicted=reopened.evicted.tolist(),
                            rows=committed(reopened))
    assert after.evicted == [want.evicted[2] + 1, want.evicted[0] + 1, want.evicted[0] + 1]
    del reopened
    gc.collect()
    again = KVCache.open(path, "c")
    assert again.seq_lens.tolist() == after.seq_lens == [S - 1] * B
    assert again.evicted.tolist() == after.evicted
    assert committed(again) == after.rows


def test_mapped_cache_refuses_an_existing_file(tmp_path, rng):
    path = tmp_path / "precious"
    path.write_bytes(b"not yours to overwrite")
    with pytest.raises(FileExistsError):
        KVCache(B, S, L, H, D, path=path)
    assert path.read_bytes() == b"not yours to overwrite"

    arena = tmp_path / "arena.kvm"
    cache = make_cache("uniform", np.float32, rng, path=arena)
    digest = sha256(arena)
    with pytest.raises(FileExistsError):
        KVCache(B, S, L, H, D, path=arena)
    assert sha256(arena) == digest
    assert cache.seq_lens.tolist() == [6] * B                # the live cache is unaffected


# -- 7. copy-on-write -------------------------------------------------------------------------

def test_copy_on_write_never_changes_the_file(tmp_path, rng):
    path = tmp_path / "arena.kvm"
    original = make_cache("ragged", np.float64, rng, path=path)
    rows = committed(original)
    del original
    gc.collect()
    digest = sha256(path)

    private = KVCache.open(path, "c")
    assert committed(private) == rows
    write_step(private, rng, 2, commit=2)
    q, k, v = rng.standard_normal((B, H, 1, D)), random_block(rng, private, 1), random_block(rng, private, 1)
    want = expected_attention(private, 0, q, k, v)
    np.testing.assert_allclose(private.attend(0, q, k, v), want, **tolerance(np.float64))
    private.advance(1)
    private.reorder([1, 1, 0])
    assert private.seq_lens.tolist() == [6, 6, 10]           # its own writes are visible to it
    private.save(tmp_path / "snap.kva")                      # and a snapshot takes them
    assert KVCache.load(tmp_path / "snap.kva").seq_lens.tolist() == [6, 6, 10]
    assert sha256(path) == digest
    del private
    gc.collect()
    assert sha256(path) == digest
    assert committed(KVCache.open(path, "c")) == rows


@pytest.mark.parametrize("mode", ["r", "w", "w+", "readonly", "C", None])
def test_open_rejects_a_bad_mode(tmp_path, rng, mode):
    path = tmp_path / "arena.kvm"
    KVCache(1, 4, 1, 1, 4, path=path)
    gc.collect()
    digest = sha256(path)
    with pytest.raises(ValueError, match="mode") as excinfo:
        KVCache.open(path, mode)
    assert repr(mode) in str(excinfo.value)
    assert sha256(path) == digest


# -- 8. two processes share a prefix ------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from kvarena import KVCache

    path, seed, out, me, other = sys.argv[1:]
    cache = KVCache.open(path, "c")
    open(me, "w").close()                       # both have the file open before either writes
    deadline = time.monotonic() + 60
    while not os.path.exists(other):
        if time.monotonic() > deadline:
            sys.exit("the other process never opened the file")
        time.sleep(0.005)
    rng = np.random.default_rng(int(seed))
    shape = (cache.batch_size, cache.num_heads, 2, cache.head_dim)
    q = rng.standard_normal(shape)
    k, v = rng.standard_normal(shape).astype(cache.dtype), rng.standard_normal(shape).astype(cache.dtype)
    outs = [cache.attend(layer, q, k, v) for layer in range(cache.num_layers)]
    cache.advance(2)
    np.savez(out, q=q, k=k, v=v, outs=np.stack(outs), seq_lens=cache.seq_lens)
""")


def test_two_processes_extend_one_shared_prefix_privately(tmp_path, rng):
    path = tmp_path / "arena.kvm"
    parent = make_cache("ragged", np.float32, rng, path=path)
    prefix = [[(k[0].copy(), v[0].copy()) for k, v in (parent.get(layer, row=b) for b in range(B))]
              for layer in range(L)]
    seq_lens = parent.seq_lens.tolist()
    del parent
    gc.collect()
    digest = sha256(path)

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    names = ["first", "second"]
    children = [subprocess.Popen([sys.executable, str(script), str(path), str(seed),
                                  str(tmp_path / f"{me}.npz"), str(tmp_path / f"{me}.ready"),
                                  str(tmp_path / f"{other}.ready")],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed, me, other in [(11, *names), (22, *names[::-1])]]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err

    results = [np.load(tmp_path / f"{me}.npz") for me in names]
    for res in results:
        assert res["seq_lens"].tolist() == [n + 2 for n in seq_lens]
        for layer in range(L):
            for b in range(B):
                keys, values = prefix[layer][b]
                keys = np.concatenate([keys, res["k"][b]], axis=1).astype(np.float64)[None]
                values = np.concatenate([values, res["v"][b]], axis=1).astype(np.float64)[None]
                want = attend_reference(res["q"][b:b + 1], keys, values, [seq_lens[b]])
                np.testing.assert_allclose(res["outs"][layer, b:b + 1], want, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(results[0]["outs"], results[1]["outs"])   # seeded differently
    assert sha256(path) == digest
    assert KVCache.open(path, "c").seq_lens.tolist() == seq_lens


# -- 9. residency ---------------------------------------------------------------------------

# 64 MiB: 4 layers x K/V x 2 rows x 4 heads x 4096 positions x 64 dims x float32,
# so each (layer, K/V, row, head) block is 1 MiB and a 32-position prefix is 8 KiB of it
BIG = dict(batch_size=2, max_seq_len=4096, num_layers=4, num_heads=4, head_dim=64)
PREFIX_LEN = 32
BLOCKS = 2 * BIG["batch_size"] * BIG["num_heads"]            # blocks of layer 0
TOUCHED = BLOCKS * PREFIX_LEN * BIG["head_dim"] * 4          # 16 x 8 KiB = 128 KiB
# Linux maps up to 64 KiB (fault_around_bytes) of already-cached neighbours on a read
# fault, so reading 8 KiB of a block can make up to 128 KiB (two 64 KiB windows) resident
FAULT_AROUND = 64 * 1024
MAX_READ_GROWTH = BLOCKS * 2 * FAULT_AROUND                  # 2 MiB, 3% of 64 MiB

PROBE = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    from kvarena import KVCache

    cache = KVCache.open(sys.argv[1], sys.argv[2])
    opened = cache.get_memory_usage()
    k, v = cache.get(0)
    digest = hashlib.sha256(np.ascontiguousarray(k).tobytes() + np.ascontiguousarray(v).tobytes())
    touched = cache.get_memory_usage()
    print(json.dumps({"total": opened["total_bytes"], "opened": opened["resident_bytes"],
                      "touched": touched["resident_bytes"], "digest": digest.hexdigest(),
                      "seq_lens": cache.seq_lens.tolist()}))
""")


def pages(n):
    return -(-n // PAGE) * PAGE


@pytest.mark.parametrize("mode", ["c", "r+"])
def test_open_reads_only_the_pages_touched(tmp_path, rng, mode):
    path = tmp_path / "big.kvm"
    cache = KVCache(**BIG, path=path)                        # eager: every page written
    usage = cache.get_memory_usage()
    assert usage["total_bytes"] == 64 * MIB
    assert usage["resident_bytes"] == pages(usage["total_bytes"])
    shape = (BIG["batch_size"], BIG["num_heads"], PREFIX_LEN, BIG["head_dim"])
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    cache.update(0, k, v)                                    # layer 0 only
    cache.advance(PREFIX_LEN)
    del cache
    gc.collect()

    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), mode], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["seq_lens"] == [PREFIX_LEN] * BIG["batch_size"]
    assert got["digest"] == hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest()
    # nothing of the arena is read on open: at most a fault-around window, far under 1%
    assert got["opened"] <= FAULT_AROUND < 0.01 * got["total"]
    growth = got["touched"] - got["opened"]
    assert TOUCHED <= growth <= MAX_READ_GROWTH < 0.05 * got["total"], got
    path.unlink()


def test_lazy_mapped_arena_is_resident_only_where_written(tmp_path, rng):
    path = tmp_path / "lazy.kvm"
    cache = KVCache(**BIG, path=path, lazy=True)
    assert cache.get_memory_usage()["resident_bytes"] == 0
    shape = (BIG["batch_size"], BIG["num_heads"], PREFIX_LEN, BIG["head_dim"])
    cache.update(0, rng.standard_normal(shape), rng.standard_normal(shape))
    cache.advance(PREFIX_LEN)
    resident = cache.get_memory_usage()["resident_bytes"]
    # a write fault maps just its page (fault-around is for reads)
    assert TOUCHED <= resident <= TOUCHED + BLOCKS * FAULT_AROUND, resident
    # lazy is about memory, not disk: the file's blocks are reserved at creation,
    # so that a full filesystem fails construction rather than a later write (SIGBUS)
    assert os.stat(path).st_blocks * 512 >= 64 * MIB
    del cache
    path.unlink()


# -- 10. damaged or missing mapped arenas ---------------------------------------------------------

@pytest.fixture
def mapped_file(tmp_path, rng):
    path = tmp_path / "arena.kvm"
    make_cache("ragged", np.float32, rng, path=path)
    gc.collect()
    return path.read_bytes()


def with_state(raw, seq_lens):
    """The mapped-arena file ``raw`` with its stored seq_lens replaced."""
    offset = -(-(16 + MAPPED_PREFIX.unpack_from(raw)[2]) // 8) * 8
    return raw[:offset] + np.asarray(seq_lens, "<i8").tobytes() + raw[offset + 8 * len(seq_lens):]


MAPPED_DAMAGE = [
    ("empty file", lambda raw, snap: b"", "too short"),
    ("cut inside header", lambda raw, snap: raw[:30], "header length"),
    ("cut inside state", lambda raw, snap: raw[:100], "truncated"),
    ("one byte short", lambda raw, snap: raw[:-1], "truncated"),
    ("one trailing byte", lambda raw, snap: raw + b"\0", "trailing data"),
    ("snapshot file", lambda raw, snap: snap, "not a kvarena mapped arena"),
    ("future version", lambda raw, snap: raw[:8] + struct.pack("<I", VERSION + 1) + raw[12:],
     f"format version {VERSION + 1}"),
    ("version 1", lambda raw, snap: raw[:8] + struct.pack("<I", 1) + raw[12:], "format version 1"),
    ("version 2", lambda raw, snap: raw[:8] + struct.pack("<I", 2) + raw[12:], "format version 2"),
    ("seq_lens past capacity", lambda raw, snap: with_state(raw, [7, S + 1, 1]), "seq_lens must be"),
    ("seq_lens negative", lambda raw, snap: with_state(raw, [-7, 3, 1]), "seq_lens must be"),
]


@pytest.mark.parametrize("mode", ["r+", "c"])
@pytest.mark.parametrize("damage, message", [d[1:] for d in MAPPED_DAMAGE],
                         ids=[d[0] for d in MAPPED_DAMAGE])
def test_damaged_mapped_arena_is_refused(tmp_path, mapped_file, snapshot, damage, message, mode):
    assert with_state(mapped_file, [7, 3, 1]) == mapped_file     # the helper changes only what it is told
    path = tmp_path / "damaged.kvm"
    path.write_bytes(damage(mapped_file, snapshot.raw))
    before = path.read_bytes()
    with pytest.raises(CacheFileError, match=message) as excinfo:
        KVCache.open(path, mode)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == before
    # the refusal, still held here, holds no map of the file and so no lock:
    # opening it to write is refused for what it holds, not for being in use
    with pytest.raises(CacheFileError, match=message):
        KVCache.open(path, "r+")


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_open_does_not_create_a_missing_file(tmp_path, mode):
    with pytest.raises(FileNotFoundError):
        KVCache.open(tmp_path / "missing.kvm", mode)
    assert os.listdir(tmp_path) == []


# -- known bugs (see the report that came with this file) ---------------------------------------------

def big_allocation_fails(monkeypatch):
    """Stand-in for a machine that cannot allocate: allocations over 1 GiB raise
    MemoryError in kvarena.storage (rather than risk a real 128 TiB request)."""
    def guarded(allocate):
        def wrapper(shape, dtype=float, *args, **kwargs):
            if int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize > 1 << 30:
                raise MemoryError(f"Unable to allocate {shape}")
            return allocate(shape, dtype, *args, **kwargs)
        return wrapper
    monkeypatch.setattr(storage, "np", ModuleProxy(np, empty=guarded(np.empty), zeros=guarded(np.zeros)))


def test_damaged_capacity_is_refused_before_allocating(tmp_path, snapshot, monkeypatch):
    header = dict(snapshot.header, shape=[L, 2, B, H, HUGE, D])
    hb = json.dumps(header).encode()
    path = tmp_path / "damaged.kva"
    path.write_bytes(SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, VERSION, len(hb),
                                          zlib.crc32(snapshot.header_bytes),   # not hb's
                                          zlib.crc32(snapshot.payload)) + hb + snapshot.payload)
    big_allocation_fails(monkeypatch)
    with pytest.raises(CacheFileError, match="header checksum"):
        KVCache.load(path)


def test_header_without_dtype_is_refused(tmp_path, rng):
    path = tmp_path / "arena.kvm"
    KVCache(1, 4, 1, 1, 4, dtype=np.float64, path=path)
    raw = path.read_bytes()
    header_len = MAPPED_PREFIX.unpack_from(raw)[2]
    header = json.dumps({"shape": [1, 2, 1, 1, 4, 4], "n_sink": None}).encode()
    header = header.ljust(header_len)              # same length: same offsets, same file size
    path.write_bytes(raw[:16] + header + raw[16 + header_len:])
    with pytest.raises(CacheFileError, match="dtype"):
        KVCache.open(path)


@pytest.mark.parametrize("header", [b"[" * 100_000, b'{"shape": ' + b"9" * 5000 + b"}"],
                         ids=["deeply nested", "5000-digit int"])
def test_pathological_header_json_is_a_cache_file_error(tmp_path, snapshot, header):
    path = tmp_path / "damaged.kva"
    path.write_bytes(rebuild(snapshot, header))
    with pytest.raises(CacheFileError):
        KVCache.load(path)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_mapped_header_whose_size_overflows_is_refused(tmp_path):
    path = tmp_path / "arena.kvm"
    KVCache(1, 4, 1, 1, 4, path=path)
    raw = path.read_bytes()
    shape = [2 ** 16, 2, 1, 2 ** 16, 2 ** 16, 2 ** 15]        # 2**64 elements: np.prod gives 0
    header = json.dumps({"shape": shape, "dtype": "<f4", "n_sink": None}).encode()
    prefix = MAPPED_PREFIX.pack(MAPPED_MAGIC, VERSION, len(header)) + header
    arena_offset = mapped_arena_offset(len(header), 1)
    path.write_bytes(prefix.ljust(arena_offset, b"\0"))       # as long as the wrapped size says
    with pytest.raises(CacheFileError, match="more elements than this platform can address"):
        KVCache.open(path)


def mapped_arena_offset(header_len, batch):
    state_end = -(-(16 + header_len) // 8) * 8 + 8 * (3 * batch + 1)
    return -(-state_end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
