"""Caches on disk: checksummed snapshots and file-backed (memory-mapped) arenas.

Two file formats, both little-endian, both starting with an 8-byte magic,
a uint32 format version and the uint32 length of a UTF-8 JSON header that
describes the arena (``shape``, ``dtype`` as ``numpy.dtype.str``,
``n_sink``).

Snapshot (``KVCache.save`` / ``KVCache.load``)::

    b"KVASNAP\\0" | version | header length | header crc32 | payload crc32 | header | payload

The header adds ``seq_lens``, ``evicted`` and ``payload_bytes``. The
payload is the committed positions only: for each layer, keys then values,
for each row ``b``, the ``(num_heads, seq_lens[b], head_dim)`` block in C
order. The header has its own crc32, checked before anything is allocated;
the payload's is checked before anything is returned. The file's size must
match the header exactly.

Mapped arena (``KVCache(..., path=...)`` / ``KVCache.open``)::

    b"KVAMMAP\\0" | version | header length | header | state | arena

``state`` is the cache's bookkeeping, int64 ``[seq_lens | evicted |
written_end]``, 8-byte aligned; the arena starts on an allocation-granularity
boundary. Both are mapped, so lengths and contents persist as the cache
runs. A live arena has no checksum.
"""

import json
import math
import mmap
import os
import struct
import tempfile
import zlib

import numpy as np

from kvarena.checks import SUPPORTED_DTYPES, check_int

FORMAT_VERSION = 1
SNAPSHOT_MAGIC = b"KVASNAP\0"
MAPPED_MAGIC = b"KVAMMAP\0"
SNAPSHOT_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header and payload crc32
MAPPED_PREFIX = struct.Struct("<8sII")      # magic, version, header length
MAX_HEADER_BYTES = 1 << 20
STATE_DTYPE = np.dtype("<i8")


class CacheFileError(ValueError):
    """A file is not a readable kvarena cache: wrong kind, version, size or checksum."""


# -- memory ---------------------------------------------------------------------

def new_arena(shape, dtype, lazy):
    """A zeroed in-memory arena; unless ``lazy``, with every page touched now."""
    if lazy:
        return np.zeros(shape, dtype=dtype)    # calloc: pages come on first touch
    arena = np.empty(shape, dtype=dtype)
    arena.fill(0)                               # touch every page now
    return arena


def new_state(batch_size):
    """Zeroed bookkeeping of a cache: intp ``[seq_lens | evicted | written_end]``."""
    return np.zeros(2 * batch_size + 1, dtype=np.intp)


# -- snapshots ---------------------------------------------------------------

def save(cache, path):
    """Write ``cache``'s committed positions to ``path`` (format above)."""
    path = os.fspath(path)
    arena, seq_lens = cache._arena, cache._seq_lens.tolist()
    L = arena.shape[0]
    header = json.dumps({
        "shape": list(arena.shape), "dtype": arena.dtype.str, "n_sink": cache.n_sink,
        "seq_lens": seq_lens, "evicted": cache._evicted.tolist(),
        "payload_bytes": _payload_bytes(arena.shape, arena.dtype, seq_lens),
    }).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(path))      # mkstemp's 0600 would stick after the rename
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(SNAPSHOT_PREFIX.size))    # filled in once the crc is known
            f.write(header)
            crc = 0
            for layer, kv, b, n in _payload_blocks(L, seq_lens):
                block = np.ascontiguousarray(arena[layer, kv, b, :, :n])
                crc = zlib.crc32(block, crc)
                f.write(block)
            f.seek(0)
            f.write(SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, len(header),
                                         zlib.crc32(header), crc))
            f.flush()
            os.fsync(f.fileno())                 # the data is on disk before the name is
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_directory(directory)


def load(path, max_seq_len, lazy):
    """Read the snapshot at ``path`` into a new arena.

    Returns ``(arena, state, n_sink)`` for ``KVCache._adopt``. Everything in
    the file is checked (size before allocating, checksum after reading);
    on any failure nothing is returned and the new arena is dropped.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _, _, header_len, header_crc, crc = _read_prefix(f, path, size, SNAPSHOT_PREFIX,
                                                         SNAPSHOT_MAGIC, "snapshot")
        header = f.read(header_len)
        if zlib.crc32(header) != header_crc:
            raise CacheFileError(f"{path}: header checksum mismatch; the file is corrupted")
        meta = _parse_header(header, path)
        shape, dtype, n_sink = _check_arena(meta, path)
        L, _, B, H, S, D = shape
        seq_lens = _check_lengths(meta, "seq_lens", B, S, path)
        evicted = _check_lengths(meta, "evicted", B, None, path)
        payload = _payload_bytes(shape, dtype, seq_lens.tolist())
        if meta.get("payload_bytes") != payload:
            raise CacheFileError(f"{path}: header says payload_bytes = "
                                 f"{meta.get('payload_bytes')!r}, but seq_lens give {payload}")
        expected = SNAPSHOT_PREFIX.size + header_len + payload
        if size != expected:
            raise CacheFileError(f"{path}: file holds {size} bytes, but its header describes "
                                 f"{expected}; it is truncated or has trailing data")
        if max_seq_len is None:
            max_seq_len = S
        max_seq_len = check_int("max_seq_len", max_seq_len)
        least = max(int(seq_lens.max()), 1 if n_sink is None else n_sink + 1)
        if max_seq_len < least:
            raise ValueError(f"max_seq_len must be at least {least} to hold this snapshot "
                             f"(longest row, and more than n_sink); got {max_seq_len}")
        arena = new_arena((L, 2, B, H, max_seq_len, D), dtype, lazy)
        crc_seen = 0
        for layer, kv, b, n in _payload_blocks(L, seq_lens.tolist()):
            block = np.empty((H, n, D), dtype)
            f.readinto(block)
            crc_seen = zlib.crc32(block, crc_seen)
            arena[layer, kv, b, :, :n] = block
    if crc_seen != crc:
        raise CacheFileError(f"{path}: payload checksum mismatch (file says {crc:#010x}, "
                             f"contents give {crc_seen:#010x}); the file is corrupted")
    state = new_state(B)
    state[:B], state[B:2 * B], state[2 * B] = seq_lens, evicted, seq_lens.max()
    return arena, state, n_sink


# -- mapped arenas -------------------------------------------------------------

def create_mapped(path, shape, dtype, n_sink, lazy):
    """Create the mapped-arena file at ``path``; return ``(arena, state)``.

    The file must not exist. Its arena is zero (a sparse file); unless
    ``lazy``, every page is written now, so the process holds the whole
    arena from the start as an in-memory cache would.
    """
    _check_state_dtype()
    path = os.fspath(path)
    header = json.dumps({"shape": list(shape), "dtype": dtype.str, "n_sink": n_sink}).encode()
    state_offset, arena_offset = _mapped_offsets(len(header), shape[2])
    arena_bytes = math.prod(shape) * dtype.itemsize
    with open(path, "xb") as f:   # FileExistsError rather than overwrite a cache
        try:
            f.write(MAPPED_PREFIX.pack(MAPPED_MAGIC, FORMAT_VERSION, len(header)))
            f.write(header)
            f.truncate(arena_offset + arena_bytes)
        except BaseException:
            os.unlink(path)
            raise
    try:
        arena, state = _map(path, "r+", shape, dtype, state_offset, arena_offset)
        if not lazy:
            arena.fill(0)
    except BaseException:
        os.unlink(path)
        raise
    return arena, state


def open_mapped(path, mode):
    """Map the mapped-arena file at ``path``; return ``(arena, state, n_sink)``.

    Reads the header only: the arena's pages come from the file on touch.
    """
    if mode not in ("r+", "c"):
        raise ValueError(f"mode must be 'r+' (write to the file) or 'c' (copy-on-write); "
                         f"got {mode!r}")
    _check_state_dtype()
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _, _, header_len = _read_prefix(f, path, size, MAPPED_PREFIX, MAPPED_MAGIC,
                                        "mapped arena")
        meta = _parse_header(f.read(header_len), path)
    shape, dtype, n_sink = _check_arena(meta, path)
    state_offset, arena_offset = _mapped_offsets(header_len, shape[2])
    expected = arena_offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise CacheFileError(f"{path}: file holds {size} bytes, but its header describes "
                             f"{expected}; it is truncated or has trailing data")
    arena, state = _map(path, mode, shape, dtype, state_offset, arena_offset)
    B, S = shape[2], shape[4]
    _check_lengths({"seq_lens": state[:B].tolist()}, "seq_lens", B, S, path)
    return arena, state, n_sink


def resident_bytes(array):
    """Bytes of ``array``'s memory mappings resident in this process (Linux), else None.

    Sums ``Rss`` over the mappings in ``/proc/self/smaps`` that overlap
    the array, so the figure is rounded out to whole pages.
    """
    start = array.__array_interface__["data"][0]
    end = start + array.nbytes
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, overlaps = 0, False
    for line in lines:
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):       # a mapping's first line
            lo, hi = (int(x, 16) for x in first.split("-"))
            overlaps = lo < end and start < hi
        elif overlaps and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


# -- helpers -------------------------------------------------------------------

def _payload_blocks(num_layers, seq_lens):
    """``(layer, kv, row, length)`` of each payload block, in file order."""
    for layer in range(num_layers):
        for kv in range(2):
            for b, n in enumerate(seq_lens):
                yield layer, kv, b, n


def _payload_bytes(shape, dtype, seq_lens):
    L, _, _, H, _, D = shape
    return 2 * L * H * D * dtype.itemsize * sum(seq_lens)


def _read_prefix(f, path, size, layout, magic, kind):
    raw = f.read(layout.size)
    if len(raw) < layout.size:
        raise CacheFileError(f"{path}: {size} bytes is too short for a kvarena {kind} "
                             f"(its fixed header alone is {layout.size})")
    fields = layout.unpack(raw)
    if fields[0] != magic:
        raise CacheFileError(f"{path} is not a kvarena {kind}: it starts with {fields[0]!r}, "
                             f"expected {magic!r}")
    if fields[1] != FORMAT_VERSION:
        raise CacheFileError(f"{path}: format version {fields[1]} is not supported; this "
                             f"kvarena reads version {FORMAT_VERSION}")
    if not 0 < fields[2] <= min(MAX_HEADER_BYTES, size - layout.size):
        raise CacheFileError(f"{path}: header length {fields[2]} does not fit the file "
                             f"of {size} bytes; it is truncated or corrupted")
    return fields


def _parse_header(raw, path):
    try:
        meta = json.loads(raw.decode())
    except (ValueError, RecursionError) as exc:   # bad UTF-8 or JSON, absurd nesting or digits
        raise CacheFileError(f"{path}: header is not valid JSON ({exc}); the file is "
                             f"corrupted") from None
    if not isinstance(meta, dict):
        raise CacheFileError(f"{path}: header must be a JSON object; got {type(meta).__name__}")
    return meta


def _check_arena(meta, path):
    """``(shape, dtype, n_sink)`` from a header, each checked."""
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 6 and shape[1] == 2
            and all(type(n) is int and n >= 1 for n in shape)):
        raise CacheFileError(f"{path}: header shape must be 6 positive ints "
                             f"(L, 2, B, H, S, D); got {shape!r}")
    try:   # a str: np.dtype(None) would mean float64
        dtype = np.dtype(meta["dtype"]) if isinstance(meta.get("dtype"), str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype not in SUPPORTED_DTYPES or dtype.byteorder == ">":
        raise CacheFileError(f"{path}: header dtype must be a native float16/32/64; "
                             f"got {meta.get('dtype')!r}")
    n_sink = meta.get("n_sink")
    if n_sink is not None and not (type(n_sink) is int and 0 <= n_sink < shape[4]):
        raise CacheFileError(f"{path}: header n_sink must be null or in [0, {shape[4]}); "
                             f"got {n_sink!r}")
    return tuple(shape), dtype, n_sink


def _check_lengths(meta, name, B, limit, path):
    values = meta.get(name)
    if not (isinstance(values, list) and len(values) == B
            and all(type(n) is int and 0 <= n <= (limit if limit is not None else n)
                    for n in values)):
        bound = "" if limit is None else f" <= {limit}"
        raise CacheFileError(f"{path}: {name} must be {B} ints >= 0{bound}; got {values!r}")
    return np.array(values, dtype=np.intp)


def _mapped_offsets(header_len, batch_size):
    state_offset = -(-(MAPPED_PREFIX.size + header_len) // 8) * 8
    state_end = state_offset + (2 * batch_size + 1) * STATE_DTYPE.itemsize
    granule = mmap.ALLOCATIONGRANULARITY
    return state_offset, -(-state_end // granule) * granule


def _map(path, mode, shape, dtype, state_offset, arena_offset):
    # plain ndarray views of the maps (which they keep alive): arithmetic on
    # np.memmap returns memmaps, which nothing here wants
    state = np.memmap(path, STATE_DTYPE, mode, state_offset, (2 * shape[2] + 1,))
    arena = np.memmap(path, dtype, mode, arena_offset, shape)
    return arena.view(np.ndarray), state.view(np.ndarray)


def _new_file_mode(path):
    """The mode ``path`` has, or the one a new file would get under the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory):
    # make the rename itself durable; not every platform can open a directory
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_state_dtype():
    if np.dtype(np.intp) != STATE_DTYPE:
        raise OSError("file-backed caches need a 64-bit little-endian platform "
                      f"(numpy.intp is {np.dtype(np.intp)})")
