"""Caches on disk: checksummed snapshots and file-backed (memory-mapped) arenas.

Two file formats, both little-endian, both starting with an 8-byte magic,
a uint32 format version and the uint32 length of a UTF-8 JSON header that
describes the arena (``shape``, ``dtype`` as ``numpy.dtype.str``,
``n_sink``, ``rope_theta`` and ``rope_style``, null without rotation
inside the cache).

Snapshot (``KVCache.save`` / ``KVCache.load``)::

    b"KVASNAP\\0" | version | header length | header crc32 | payload crc32 | header | payload

The header adds ``seq_lens``, ``evicted`` and ``payload_bytes``. The
payload is the committed positions only: for each layer, keys then values,
for each row ``b``, the ``(num_heads, seq_lens[b], head_dim)`` block in C
order, positions in order (a sliding window's ring is written unrolled,
and loads with its ring at 0); for an int8 arena each block is followed
by its scales, float32 ``(num_heads, seq_lens[b])``. The header has its own crc32, checked before anything is allocated;
the payload's is checked before anything is returned. The file's size must
match the header exactly.

Mapped arena (``KVCache(..., path=...)`` / ``KVCache.open``)::

    b"KVAMMAP\\0" | version | header length | header | state | arena

``state`` is the cache's bookkeeping, int64 ``[seq_lens | evicted |
written_end | ring_head]``, 8-byte aligned; the arena starts on an allocation-granularity
boundary, laid out as in memory (``kvarena.planner.arena_layout``: an int8
arena's scales follow its data from the next 64-byte boundary). Both are
mapped, so lengths and contents persist as the cache runs. A live arena
has no checksum.

Version 3 (this one) added int8 arenas (their scales), the rotary fields
and ``ring_head``; files of versions 1 and 2 are refused with a
``CacheFileError``.

Sharing rules, enforced with advisory ``flock`` locks taken without
waiting: a mapped-arena file is held exclusively by the cache that created
it or opened it ``"r+"``, and shared by caches that opened it ``"c"``; a
conflicting open raises ``BlockingIOError`` at once. The lock belongs to
the mapping and is released when the last view of the arena is gone (or
the process ends). A ``"c"`` cache reads the lengths once, at open, into
private memory. A new mapped arena reserves its disk blocks
(``posix_fallocate``) before it is mapped, so a full filesystem is an
``OSError`` at construction, never a SIGBUS at a later write.
"""

import contextlib
import errno
import json
import math
import mmap
import os
import stat
import struct
import sys
import tempfile
import zlib

import numpy as np

from kvarena.checks import DTYPE_NAMES, SUPPORTED_DTYPES, check_int
from kvarena.planner import ARENA_ALIGN, ARENA_ROOM, SCALE_DTYPE, arena_layout, available_memory

try:
    import fcntl
except ImportError:     # Windows: no flock, so no lock on mapped files
    fcntl = None
# a FIFO opened without it blocks until a writer comes (absent on Windows)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

FORMAT_VERSION = 3
SNAPSHOT_MAGIC = b"KVASNAP\0"
MAPPED_MAGIC = b"KVAMMAP\0"
SNAPSHOT_PREFIX = struct.Struct("<8sIIII")  # magic, version, header length, header and payload crc32
MAPPED_PREFIX = struct.Struct("<8sII")      # magic, version, header length
MAX_HEADER_BYTES = 1 << 20
STATE_DTYPE = np.dtype("<i8")
MAX_INTP = np.iinfo(np.intp).max


class CacheFileError(ValueError):
    """A file is not a readable kvarena cache: wrong kind, version, size or checksum,
    a number out of range, or an arena larger than the caller allows."""


# -- memory ---------------------------------------------------------------------

def arena_bytes(shape, dtype):
    """Bytes of the buffer of an arena of ``shape`` and ``dtype`` (an int8
    arena's scales included), checked to be addressable.

    Raises
    ------
    MemoryError
        The arena would be larger than this platform can address.
    """
    nbytes = arena_layout(shape, dtype)[2]
    if nbytes > MAX_INTP:
        raise MemoryError(f"an arena of shape {tuple(shape)} (num_layers, 2, batch_size, "
                          f"num_heads, max_seq_len, head_dim) and dtype {dtype.name} needs "
                          f"{nbytes} bytes, more than this platform can address ({MAX_INTP})")
    return nbytes


def arena_views(buffer, shape, dtype):
    """``(arena, scales)``: the views of ``buffer`` (uint8, ``arena_bytes``
    long) that hold an arena; ``scales`` is None for a float arena.

    An int8 arena is two views of one buffer: the data, int8 ``shape``,
    and its scales, float32 ``shape[:5]`` (one per stored D-vector).
    """
    data_bytes, offset, total = arena_layout(shape, dtype)
    arena = buffer[:data_bytes].view(dtype).reshape(shape)
    if dtype != np.int8:
        return arena, None
    return arena, buffer[offset:total].view(SCALE_DTYPE).reshape(shape[:5])


def new_arena(shape, dtype, lazy):
    """A zeroed in-memory arena ``(arena, scales)``; unless ``lazy``, with
    every page touched now.

    One allocation, ``ARENA_ROOM`` bytes longer than the arena, which
    starts in it on a multiple of ``ARENA_ALIGN``. For int8, the data and
    its scales are views of one buffer (``arena_views``); ``scales`` is
    None for a float arena.

    Raises
    ------
    MemoryError
        The arena cannot be addressed or allocated, or (eager only) is
        larger than the memory available now: committing it would end in
        swapping or in the kernel's OOM killer, not in an exception.
    """
    nbytes = arena_bytes(shape, dtype)
    room = nbytes + ARENA_ROOM
    if not lazy:
        try:
            available = available_memory()
        except OSError:
            available = None
        if available is not None and room > available:
            raise MemoryError(f"an eager arena of shape {tuple(shape)} and dtype {dtype.name} "
                              f"needs {room} bytes, more than the {available} bytes of "
                              f"memory available now; use a smaller cache or lazy=True")
    try:
        if lazy:
            buffer = np.zeros(room, dtype=np.uint8)     # calloc: pages come on first touch
        else:
            buffer = np.empty(room, dtype=np.uint8)
    except MemoryError:
        raise MemoryError(f"cannot allocate an arena of shape {tuple(shape)} and dtype "
                          f"{dtype.name} ({room} bytes)") from None
    start = -buffer.ctypes.data % ARENA_ALIGN
    buffer = buffer[start:start + nbytes]
    if not lazy:
        buffer.fill(0)                          # touch every page now
    return arena_views(buffer, shape, dtype)


def state_size(batch_size):
    """Length of a cache's bookkeeping: ``[seq_lens | evicted | written_end | ring_head]``."""
    return 3 * batch_size + 1


def new_state(batch_size):
    """Zeroed bookkeeping of a cache: intp ``[seq_lens | evicted | written_end | ring_head]``."""
    return np.zeros(state_size(batch_size), dtype=np.intp)


# -- snapshots ---------------------------------------------------------------

def save(cache, path):
    """Write ``cache``'s committed positions to ``path`` (format above).

    ``path`` (a str) may name nothing yet, a regular file, which is replaced
    whole, or a symlink, whose target is replaced (the link stays). The
    data is written to an unnamed file in the target's directory
    (``O_TMPFILE``, Linux), so a process killed midway leaves nothing
    behind; it gets a name, beside the target, only once complete and
    synced, and is then renamed over the target. Where ``O_TMPFILE`` is
    missing a named temporary is used, which a killed process leaves.

    Raises
    ------
    ValueError
        ``path`` exists and is not a regular file (a directory, FIFO, device
        or socket), or is the file of an open file-backed cache (in this
        process or another), which the snapshot would replace under it; or
        the batch is so large (tens of thousands of rows) that the header
        would pass ``MAX_HEADER_BYTES``, which load refuses.
    RuntimeError
        ``evicted`` was changed outside the cache's methods to a negative
        count.
    OSError
        The directory cannot be written, or the filesystem is full; the old
        file is unchanged and no temporary is left.
    """
    target = os.path.realpath(path)     # through symlinks: replace the target, keep the link
    _check_replaceable(path, target)
    arena, scales, seq_lens = cache._arena, cache._scales, cache._seq_lens.tolist()
    evicted = cache._evicted.tolist()
    if min(evicted) < 0:                # nothing is written that load would refuse
        raise RuntimeError(f"evicted = {evicted} were changed outside the cache's methods and "
                           f"are no longer >= 0; nothing was written")
    L = arena.shape[0]
    payload = _payload_bytes(arena.shape, arena.dtype, seq_lens)
    header = json.dumps({
        "shape": list(arena.shape), "dtype": arena.dtype.str, "n_sink": cache.n_sink,
        "seq_lens": seq_lens, "evicted": evicted, "payload_bytes": payload,
        "rope_theta": cache.rope_theta, "rope_style": cache.rope_style,
    }).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"a snapshot of batch_size {arena.shape[2]} needs a {len(header)}-byte "
                         f"header, more than the {MAX_HEADER_BYTES} bytes load reads; nothing "
                         f"was written (a file-backed cache, path=..., has no such limit)")
    directory = os.path.dirname(target)
    fd, tmp = _unnamed_file(directory, target)
    size = SNAPSHOT_PREFIX.size + len(header) + payload
    try:
        os.fchmod(fd, _new_file_mode(target))    # mkstemp's 0600 would stick after the rename
        with _naming(path, size, directory), os.fdopen(fd, "wb") as f:
            f.write(bytes(SNAPSHOT_PREFIX.size))    # filled in once the crc is known
            f.write(header)
            crc = 0
            for layer, kv, b, n in _payload_blocks(L, seq_lens):
                slots = cache._row_slots(b, n)   # positions in order, through the ring
                block = np.ascontiguousarray(arena[layer, kv, b][:, slots])
                crc = zlib.crc32(block, crc)
                f.write(block)
                if scales is not None:       # the block's scales move with it
                    block = np.ascontiguousarray(scales[layer, kv, b][:, slots])
                    crc = zlib.crc32(block, crc)
                    f.write(block)
            f.seek(0)
            f.write(SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, len(header),
                                         zlib.crc32(header), crc))
            f.flush()
            os.fsync(f.fileno())                 # the data is on disk before the name is
            if tmp is None:                      # unnamed: name it now, beside the target
                tmp = _link_unnamed(f.fileno(), target)
        os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def _naming(path, size, directory):
    """Re-raise an OSError of writing the snapshot with the path and its size."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:
            raise
        raise OSError(exc.errno, f"cannot write the {size}-byte snapshot {path} "
                                 f"({os.strerror(exc.errno)}){_free_space(directory, exc.errno)}; "
                                 f"the old file, if any, is unchanged") from None


def _check_replaceable(path, target):
    """Refuse to replace what is not a regular file, or is an open cache's arena."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"path must be a regular file or a new name; {path!r} is "
                         f"{_file_kind(st.st_mode)}, which save() would replace with a file")
    if fcntl is None:
        return
    try:   # O_NONBLOCK: it was a regular file a moment ago; never hang on a FIFO
        fd = os.open(target, os.O_RDONLY | O_NONBLOCK)
    except OSError:
        return       # unreadable to us: no lock to test; the rename decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"path {path!r} is the file of an open file-backed cache (in this "
                         f"process or another); a snapshot would replace the arena under "
                         f"it. Save to another path") from None
    finally:
        os.close(fd)     # and with it the lock, if taken


def _file_kind(mode):
    for test, kind in [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")]:
        if test(mode):
            return kind
    return "not a regular file"


def _unnamed_file(directory, target):
    """``(fd, None)`` of an unnamed file in ``directory``, or ``(fd, name)`` of a
    named temporary where this platform or filesystem has no ``O_TMPFILE``."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise            # e.g. a read-only or missing directory: the same with mkstemp
    return tempfile.mkstemp(dir=directory, prefix=os.path.basename(target) + ".",
                            suffix=".tmp")


def _link_unnamed(fd, target):
    """Give the unnamed file ``fd`` a fresh temporary name beside ``target``."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/<fd>: os.link passes the flag
    # only together with a directory fd (without one it calls link(2), which
    # does not follow the magic link)
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(100):
            name = f"{target}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            try:
                os.link(str(fd), name, src_dir_fd=proc, follow_symlinks=True)
                return name
            except FileExistsError:
                continue
    finally:
        os.close(proc)
    raise FileExistsError(errno.EEXIST, "no free temporary name beside", target)


def _unlink_quietly(name):
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def load(path, max_seq_len, lazy, max_arena_bytes):
    """Read the snapshot at ``path`` into a new arena.

    Returns ``(arena, state, n_sink, (rope_theta, rope_style))`` for
    ``KVCache._adopt`` and ``_adopt_rope``. Everything in
    the file is checked (size before allocating, checksum after reading);
    on any failure nothing is returned and the new arena is dropped.
    Nothing larger than the file's payload is allocated unless the arena
    fits in ``max_arena_bytes`` (None: the memory available now), so a
    small crafted file cannot make ``load`` reserve a huge arena.
    """
    with _open_regular(path, writable=False) as f:
        size = os.fstat(f.fileno()).st_size
        _, version, header_len, header_crc, crc = _read_prefix(f, path, size, SNAPSHOT_PREFIX,
                                                               SNAPSHOT_MAGIC, "snapshot")
        header = f.read(header_len)
        if zlib.crc32(header) != header_crc:
            raise CacheFileError(f"{path}: header checksum mismatch; the file is corrupted")
        meta = _parse_header(header, path)
        shape, dtype, n_sink = _check_arena(meta, path)
        rope = _check_rope(meta, shape[5], path)
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
        _check_arena_budget(path, (L, 2, B, H, max_seq_len, D), dtype, max_arena_bytes)
        arena, scales = new_arena((L, 2, B, H, max_seq_len, D), dtype, lazy)
        crc_seen = 0
        for layer, kv, b, n in _payload_blocks(L, seq_lens.tolist()):
            block = np.empty((H, n, D), dtype)
            f.readinto(block)
            crc_seen = zlib.crc32(block, crc_seen)
            arena[layer, kv, b, :, :n] = block
            if scales is not None:
                block = np.empty((H, n), SCALE_DTYPE)
                f.readinto(block)
                crc_seen = zlib.crc32(block, crc_seen)
                scales[layer, kv, b, :, :n] = block
    if crc_seen != crc:
        raise CacheFileError(f"{path}: payload checksum mismatch (file says {crc:#010x}, "
                             f"contents give {crc_seen:#010x}); the file is corrupted")
    state = new_state(B)
    state[:B], state[B:2 * B], state[2 * B] = seq_lens, evicted, seq_lens.max()
    return arena, scales, state, n_sink, rope


def _check_arena_budget(path, shape, dtype, max_arena_bytes):
    nbytes = arena_layout(shape, dtype)[2]
    if max_arena_bytes is None:
        try:
            max_arena_bytes, what = available_memory(), "the memory available now"
        except OSError:
            max_arena_bytes, what = MAX_INTP, "what this platform can address"
    else:
        what = "max_arena_bytes"
    if nbytes > max_arena_bytes:
        raise CacheFileError(f"{path}: loading it needs an arena of shape {shape} "
                             f"({nbytes} bytes), more than {what} ({max_arena_bytes} bytes); "
                             f"pass a larger max_arena_bytes to load it anyway")


# -- mapped arenas -------------------------------------------------------------

def create_mapped(path, shape, dtype, n_sink, lazy, rope=(None, None)):
    """Create the mapped-arena file at ``path``; return ``(arena, scales, state)``.

    The file must not exist. It is locked for this cache (see the module
    docstring) and its blocks are reserved on disk before it is mapped;
    its arena is zero. Unless ``lazy``, every page is written now, so the
    process holds the whole arena from the start as an in-memory cache
    would. On any failure the file is removed.

    Raises
    ------
    FileExistsError
        ``path`` exists.
    OSError
        The filesystem has no room for the file (``errno.ENOSPC``), the
        file would exceed ``RLIMIT_FSIZE`` (``errno.EFBIG``), or the
        directory cannot be written.
    """
    _check_state_dtype()
    header = json.dumps({"shape": list(shape), "dtype": dtype.str, "n_sink": n_sink,
                         "rope_theta": rope[0], "rope_style": rope[1]}).encode()
    state_offset, arena_offset = _mapped_offsets(len(header), shape[2])
    total = arena_offset + arena_bytes(shape, dtype)
    with open(path, "xb+") as f:   # FileExistsError rather than overwrite a cache
        try:
            _lock(f, path, "r+")
            f.write(MAPPED_PREFIX.pack(MAPPED_MAGIC, FORMAT_VERSION, len(header)))
            f.write(header)
            f.flush()
            _reserve(f, path, total)
            buffer, state = _map(f, path, "r+", shape, dtype, state_offset, arena_offset)
            if not lazy:
                buffer.fill(0)
        except BaseException:
            os.unlink(path)
            raise
    return (*arena_views(buffer, shape, dtype), state)


def open_mapped(path, mode):
    """Map the mapped-arena file at ``path``; return ``(arena, scales, state, n_sink,
    (rope_theta, rope_style))``.

    Reads the header and the lengths only: the arena's pages come from the
    file on touch. ``"c"`` gets a private copy of the lengths.

    Raises
    ------
    BlockingIOError
        The file is locked by a conflicting cache (module docstring).
    CacheFileError
        The file is not a mapped arena, or its header or lengths are out
        of range.
    """
    if mode not in ("r+", "c"):
        raise ValueError(f"mode must be 'r+' (write to the file) or 'c' (copy-on-write); "
                         f"got {mode!r}")
    _check_state_dtype()
    with _open_regular(path, writable=mode == "r+") as f:
        _lock(f, path, mode)          # before reading: no writer can be mid-way now
        size = os.fstat(f.fileno()).st_size
        _, version, header_len = _read_prefix(f, path, size, MAPPED_PREFIX, MAPPED_MAGIC,
                                              "mapped arena")
        meta = _parse_header(f.read(header_len), path)
        shape, dtype, n_sink = _check_arena(meta, path)
        rope = _check_rope(meta, shape[5], path)
        state_offset, arena_offset = _mapped_offsets(header_len, shape[2])
        expected = arena_offset + arena_bytes(shape, dtype)
        if size != expected:
            raise CacheFileError(f"{path}: file holds {size} bytes, but its header describes "
                                 f"{expected}; it is truncated or has trailing data")
        # the lengths are checked before anything is mapped: a map made first
        # would live on in the refusal's traceback, and hold the lock with it
        f.seek(state_offset)
        checked = np.frombuffer(f.read(state_size(shape[2]) * STATE_DTYPE.itemsize), STATE_DTYPE)
        _check_state(checked, shape[2], shape[4], path, n_sink)
        buffer, state = _map(f, path, mode, shape, dtype, state_offset, arena_offset)
    if mode == "c":
        # a private mapping shows the file's bytes until this process writes
        # them: the lengths just checked become memory of our own
        state = np.array(checked, dtype=np.intp)
    return (*arena_views(buffer, shape, dtype), state, n_sink, rope)


def _open_regular(path, writable):
    """``path`` opened in binary mode, if it is a regular file.

    Opened without blocking, then checked: a FIFO would otherwise hang the
    open or the first read forever, and a device would be read as a file.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | O_NONBLOCK | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CacheFileError(f"{path} is {_file_kind(mode)}, not a kvarena file")
        if O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "r+b" if writable else "rb")
    except BaseException:
        os.close(fd)
        raise


def _lock(f, path, mode):
    """Lock the open file ``f`` for ``mode`` ("r+": exclusive, "c": shared), without waiting.

    The lock is taken on ``f``'s open file description, which the memory
    maps made from ``f`` share (``mmap`` duplicates the descriptor), so it
    lasts as long as the mapping, whatever happens to ``f``. Where there is
    no ``flock`` (Windows), nothing is locked.
    """
    if fcntl is None:
        return
    op = fcntl.LOCK_EX if mode == "r+" else fcntl.LOCK_SH
    try:
        fcntl.flock(f.fileno(), op | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BlockingIOError(
            errno.EWOULDBLOCK,
            f"{path} is in use by another file-backed cache, in this process or another: "
            f"a file is held by one cache created on it or opened 'r+', or by any number "
            f"opened 'c' while none holds it 'r+'; the other cache lets go once it and "
            f"every view of its arena are gone") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise          # a filesystem without flock: go on unlocked


def _reserve(f, path, total):
    """Make ``f`` ``total`` bytes long with every block allocated on disk.

    A hole in a mapped file gets its block when a page is first written;
    on a full filesystem that write is a SIGBUS. Reserving now turns it
    into an OSError here.
    """
    if not hasattr(os, "posix_fallocate"):    # macOS, Windows: sparse, as before
        f.truncate(total)
        return
    try:
        os.posix_fallocate(f.fileno(), 0, total)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            f.truncate(total)
            return
        raise OSError(exc.errno, f"cannot reserve {total} bytes on disk for the file-backed "
                                 f"arena {path} ({os.strerror(exc.errno)})"
                                 f"{_free_space(f.fileno(), exc.errno)}") from None


def _free_space(where, error):
    """``"; N bytes are free there"`` after ENOSPC, where the filesystem tells."""
    if error != errno.ENOSPC:
        return ""
    try:
        vfs = os.statvfs(where)
    except OSError:
        return ""
    return f"; {vfs.f_bavail * vfs.f_frsize} bytes are free there"


def resident_bytes(array, nbytes=None):
    """Bytes of ``array``'s memory mappings resident in this process (Linux), else None.

    Sums ``Rss`` over the mappings in ``/proc/self/smaps`` that overlap
    the ``nbytes`` (default ``array.nbytes``) from the array's start, so the
    figure is rounded out to whole pages.
    """
    start = array.__array_interface__["data"][0]
    end = start + (array.nbytes if nbytes is None else nbytes)
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
    scale = SCALE_DTYPE.itemsize if dtype == np.int8 else 0
    return 2 * L * H * (D * dtype.itemsize + scale) * sum(seq_lens)


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
            and all(type(n) is int and 1 <= n <= MAX_INTP for n in shape)):
        raise CacheFileError(f"{path}: header shape must be 6 positive ints "
                             f"(L, 2, B, H, S, D); got {shape!r}")
    if math.prod(shape) > MAX_INTP // 8:      # 8: the widest itemsize
        raise CacheFileError(f"{path}: header shape {shape} describes more elements than "
                             f"this platform can address; the file is corrupted")
    try:   # a str: np.dtype(None) would mean float64
        dtype = np.dtype(meta["dtype"]) if isinstance(meta.get("dtype"), str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype not in SUPPORTED_DTYPES or dtype.byteorder == ">":
        raise CacheFileError(f"{path}: header dtype must be a little-endian one of "
                             f"{DTYPE_NAMES}; got {meta.get('dtype')!r}")
    n_sink = meta.get("n_sink")
    if n_sink is not None and not (type(n_sink) is int and 0 <= n_sink < shape[4]):
        raise CacheFileError(f"{path}: header n_sink must be null or in [0, {shape[4]}); "
                             f"got {n_sink!r}")
    return tuple(shape), dtype, n_sink


def _check_rope(meta, head_dim, path):
    """``(rope_theta, rope_style)`` from a header: both null, or a positive
    finite number and a known style (with an even head_dim)."""
    theta, style = meta.get("rope_theta"), meta.get("rope_style")
    if theta is None and style is None:
        return None, None
    if not (type(theta) in (int, float) and 0 < theta <= sys.float_info.max   # NaN fails too
            and style in ("half", "interleaved") and head_dim % 2 == 0):
        raise CacheFileError(f"{path}: header rope_theta and rope_style must both be null, "
                             f"or a number > 0 and 'half' or 'interleaved' (with an even "
                             f"head_dim, here {head_dim}); got {theta!r} and {style!r}")
    return float(theta), style


def _check_lengths(meta, name, B, limit, path):
    """``meta[name]`` as an intp array of ``B`` ints in ``[0, limit]`` (None: any intp)."""
    values = meta.get(name)
    top = MAX_INTP if limit is None else limit
    if not (isinstance(values, list) and len(values) == B
            and all(type(n) is int and 0 <= n <= top for n in values)):
        raise CacheFileError(f"{path}: {name} must be {B} ints in [0, {top}]; got {values!r}")
    return np.array(values, dtype=np.intp)


def _check_state(state, B, S, path, n_sink=None):
    """A mapped file's ``[seq_lens | evicted | written_end | ring_head]``, each in range.

    Vectorised, and naming only the first value out of range: a crafted
    header can make ``B`` large.
    """
    ring_top = 0 if n_sink is None else S - n_sink - 1     # in [0, window)
    for name, values, top in [("seq_lens", state[:B], S), ("evicted", state[B:2 * B], MAX_INTP),
                              ("written_end", state[2 * B:2 * B + 1], S),
                              ("ring_head", state[2 * B + 1:], ring_top)]:
        bad = np.flatnonzero((values < 0) | (values > top))
        if bad.size:
            raise CacheFileError(f"{path}: {name} must be in [0, {top}]; got "
                                 f"{name}[{bad[0]}] = {values[bad[0]]}")


def _mapped_offsets(header_len, batch_size):
    state_offset = -(-(MAPPED_PREFIX.size + header_len) // 8) * 8
    state_end = state_offset + state_size(batch_size) * STATE_DTYPE.itemsize
    granule = mmap.ALLOCATIONGRANULARITY
    return state_offset, -(-state_end // granule) * granule


def _map(f, path, mode, shape, dtype, state_offset, arena_offset):
    # plain ndarray views of the maps (which they keep alive): arithmetic on
    # np.memmap returns memmaps, which nothing here wants. The arena's whole
    # buffer (an int8 arena's scales included) is one map of uint8.
    # "c" keeps a copy of the lengths, not a map (open_mapped)
    state = None
    try:
        if mode == "r+":
            state = np.memmap(f, STATE_DTYPE, mode, state_offset, (state_size(shape[2]),))
        arena = np.memmap(f, np.uint8, mode, arena_offset, (arena_bytes(shape, dtype),))
    except OSError as exc:     # e.g. ENOMEM under RLIMIT_AS
        state = None           # no map may outlive the refusal in its traceback: it holds the lock
        raise OSError(exc.errno, f"cannot map the {arena_bytes(shape, dtype)}-byte arena of "
                                 f"{path} ({os.strerror(exc.errno)})") from None
    return arena.view(np.ndarray), None if state is None else state.view(np.ndarray)


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
