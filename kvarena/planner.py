"""Size a cache before allocating it.

A ``KVCache`` holds one NumPy buffer whose size depends on its
configuration, the arena

    (num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)

in the storage dtype (``num_heads`` counts key/value heads: a
grouped-query model's ``num_kv_heads``). An int8 arena's buffer also holds
its scales, one float32 per stored D-vector

    (num_layers, 2, batch_size, num_heads, max_seq_len)

after the int8 data, from the next 64-byte boundary (``arena_layout``). A
cache that rotates inside (``rope_theta``) adds two float32
``(max_seq_len, head_dim / 2)`` tables of cos and sin. The size is linear
in ``batch_size * max_seq_len`` (up to those 63 bytes of padding; the
tables in ``max_seq_len``), so the largest batch or context that fits a
memory budget has a closed form. The attention kernel keeps no buffer
per cache: its working memory, per thread, is the queries, accumulators
and scores of a call and room for a block of keys and one of values in
the compute type (blocks of at most 64 KiB of stored keys and 256 rows:
128 KiB of tiles at head_dim 64 in float32; touched only where rows are
converted) plus, for a long row split across threads,
``(2 + head_dim)`` numbers per query and chunk, freed after the call. This
module imports nothing from ``kvarena.cache``; the two must agree, and the
tests check it.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from kvarena.checks import check_bool, check_positive, check_storage_dtype

_MEMINFO = "/proc/meminfo"
#: int8 arenas: one scale (absmax / 127) of this dtype per stored D-vector
SCALE_DTYPE = np.dtype(np.float32)
#: where an int8 arena's scales start in its buffer: the next multiple of this
SCALE_ALIGN = 64
#: an in-memory arena starts on a multiple of this many bytes, so that rows
#: of a multiple of 64 bytes start on cache lines (NumPy's large allocations
#: start 16 bytes past a page)
ARENA_ALIGN = 64
#: how many bytes longer than the arena an in-memory arena's buffer is, to
#: find such a start in it (a file-backed arena maps the file: none)
ARENA_ROOM = ARENA_ALIGN - 1


def arena_layout(shape, dtype):
    """Byte layout of the one buffer that holds an arena of ``shape`` and ``dtype``.

    Parameters
    ----------
    shape : tuple of int
        ``(num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)``.
    dtype : numpy.dtype
        A supported storage dtype.

    Returns
    -------
    data_bytes, scale_offset, total_bytes : int
        The data's bytes, where the scales start, and the whole buffer's
        size. For a float arena there are no scales: all three are equal.
        For int8, data then scales (float32 ``shape[:5]``) at the next
        multiple of ``SCALE_ALIGN``.
    """
    elements = math.prod(shape)
    data = elements * dtype.itemsize
    if dtype != np.int8:
        return data, data, data
    offset = -(-data // SCALE_ALIGN) * SCALE_ALIGN
    return data, offset, offset + elements // shape[-1] * SCALE_DTYPE.itemsize


@dataclass(frozen=True)
class Footprint:
    """Bytes a ``KVCache`` of one configuration allocates.

    Attributes
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        The configuration.
    dtype : str
        Storage dtype name: ``"float16"``, ``"float32"``, ``"float64"`` or
        ``"int8"``.
    arena_bytes : int
        The key/value data (for int8, the int8 values alone).
    total_bytes : int
        Everything the cache holds that grows with its configuration: the
        one arena buffer (``arena_bytes``; for int8 up to 63 bytes of
        padding and ``scale_bytes``; and 63 bytes of room, ``ARENA_ROOM``,
        in which the arena moves to start on a 64-byte boundary) and
        ``rope_bytes``. A file-backed arena maps the file instead and needs
        no room: its cache holds 63 bytes fewer.
    scale_bytes : int
        int8 only: one float32 scale per stored D-vector (0 otherwise).
    rope_bytes : int
        The rotary tables of a cache that rotates inside (``rope_theta``):
        float32 cos and sin, ``(max_seq_len, head_dim / 2)`` each; else 0.
    """

    batch_size: int
    max_seq_len: int
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: str
    arena_bytes: int
    total_bytes: int
    scale_bytes: int = 0
    rope_bytes: int = 0


def _bytes_per_slot(num_layers, num_heads, head_dim, dt):
    # bytes for one (batch row, position) pair: keys and values of every layer
    # and head (and, for int8, their scales)
    scale = SCALE_DTYPE.itemsize if dt == np.int8 else 0
    return 2 * num_layers * num_heads * (head_dim * dt.itemsize + scale)


def _rope_bytes(max_seq_len, head_dim, rope):
    # float32 cos and sin tables, (max_seq_len, head_dim // 2) each
    return 2 * max_seq_len * (head_dim // 2) * 4 if rope else 0


def footprint(batch_size, max_seq_len, num_layers, num_heads, head_dim, dtype=np.float32,
              rope=False):
    """Bytes ``KVCache(batch_size, max_seq_len, num_layers, num_heads, head_dim, dtype=dtype)`` allocates.

    Parameters
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        Positive sizes, as ``KVCache`` takes them. ``num_heads`` counts
        K/V heads, what the cache stores: for a grouped-query model, its
        ``num_kv_heads``, not its query heads.
    dtype : float16, float32 (default), float64 or int8
        Storage dtype of the arena.
    rope : bool, default False
        The cache rotates inside (``KVCache(..., rope_theta=...)``): count
        its rotary tables.

    Returns
    -------
    Footprint
        Exact byte counts of the arena, an int8 arena's scales, the
        rotary tables and the total.

    Raises
    ------
    TypeError
        A size that is not an int (bools included), or an unsupported dtype.
    ValueError
        A size below 1.

    Notes
    -----
    Bookkeeping is not counted: a few integers per batch row and a few
    kilobytes of Python objects (views of each layer and the like).
    """
    batch_size = check_positive("batch_size", batch_size)
    max_seq_len = check_positive("max_seq_len", max_seq_len)
    num_layers = check_positive("num_layers", num_layers)
    num_heads = check_positive("num_heads", num_heads)
    head_dim = check_positive("head_dim", head_dim)
    dt = check_storage_dtype(dtype)
    rope = check_bool("rope", rope)
    if rope and head_dim % 2:
        raise ValueError(f"head_dim must be even with rope=True (rotary pairs); got {head_dim}")
    shape = (num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)
    data, offset, total = arena_layout(shape, dt)
    tables = _rope_bytes(max_seq_len, head_dim, rope)
    return Footprint(batch_size, max_seq_len, num_layers, num_heads, head_dim,
                     dt.name, data, total + ARENA_ROOM + tables, total - offset, tables)


def available_memory():
    """Bytes of memory the machine can give a new allocation now, without swapping.

    Returns
    -------
    int
        ``MemAvailable`` from ``/proc/meminfo``; where that is missing,
        free physical pages times the page size (``os.sysconf``).

    Raises
    ------
    OSError
        Neither source is available on this platform.
    """
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024    # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        pages = page_size = -1
    if pages > 0 and page_size > 0:
        return pages * page_size
    raise OSError("cannot tell the available memory on this platform "
                  "(no MemAvailable in /proc/meminfo, no SC_AVPHYS_PAGES); "
                  "pass available_bytes explicitly")


def plan(num_layers, num_heads, head_dim, *, dtype=np.float32,
         batch_size=None, max_seq_len=None, available_bytes=None, rope=False):
    """The largest batch or context whose cache fits in ``available_bytes``.

    Give exactly one of ``batch_size`` and ``max_seq_len``; the other is
    made as large as the budget allows.

    Parameters
    ----------
    num_layers, num_heads, head_dim : int
        Positive sizes of the model; ``num_heads`` counts K/V heads (a
        grouped-query model's ``num_kv_heads``).
    dtype : float16, float32 (default), float64 or int8
        Storage dtype of the arena.
    batch_size : int, optional
        Fixed number of rows; ``max_seq_len`` is maximised.
    max_seq_len : int, optional
        Fixed context length; ``batch_size`` is maximised.
    available_bytes : int, optional
        Memory budget. Default: ``available_memory()``.
    rope : bool, default False
        The cache rotates inside: its rotary tables count against the budget.

    Returns
    -------
    Footprint
        The chosen configuration; its ``total_bytes <= available_bytes``,
        and one more row or position would exceed it.

    Raises
    ------
    TypeError
        A size or ``available_bytes`` that is not an int, or an unsupported dtype.
    ValueError
        Both or neither of ``batch_size`` and ``max_seq_len``, a size below
        1, or a budget too small for one position (or one row).
    OSError
        ``available_bytes`` not given and ``available_memory()`` fails.

    Notes
    -----
    The budget covers the arena only; leave headroom for
    the model's weights and activations.
    """
    if (batch_size is None) == (max_seq_len is None):
        raise ValueError("give exactly one of batch_size and max_seq_len; "
                         f"got batch_size={batch_size!r}, max_seq_len={max_seq_len!r}")
    num_layers = check_positive("num_layers", num_layers)
    num_heads = check_positive("num_heads", num_heads)
    head_dim = check_positive("head_dim", head_dim)
    dt = check_storage_dtype(dtype)
    rope = check_bool("rope", rope)
    if available_bytes is None:
        available_bytes = available_memory()
    available_bytes = check_positive("available_bytes", available_bytes)

    slot = _bytes_per_slot(num_layers, num_heads, head_dim, dt)
    sizes = (num_layers, num_heads, head_dim, dt, rope)
    if batch_size is not None:
        batch_size = check_positive("batch_size", batch_size)
        # one position of every row, and its line of the rotary tables
        need = batch_size * slot + _rope_bytes(1, head_dim, rope)
        max_seq_len = available_bytes // need
        # int8: the scales' alignment may add up to 63 bytes
        while max_seq_len >= 1 and footprint(batch_size, max_seq_len, *sizes).total_bytes \
                > available_bytes:
            max_seq_len -= 1
        if max_seq_len < 1:
            need = footprint(batch_size, 1, *sizes).total_bytes
            raise ValueError(f"available_bytes={available_bytes} cannot hold one position "
                             f"for batch_size={batch_size}: that needs {need} bytes")
    else:
        max_seq_len = check_positive("max_seq_len", max_seq_len)
        need = max_seq_len * slot                       # one row of every position
        batch_size = (available_bytes - _rope_bytes(max_seq_len, head_dim, rope)) // need
        while batch_size >= 1 and footprint(batch_size, max_seq_len, *sizes).total_bytes \
                > available_bytes:
            batch_size -= 1
        if batch_size < 1:
            need = footprint(1, max_seq_len, *sizes).total_bytes
            raise ValueError(f"available_bytes={available_bytes} cannot hold one row "
                             f"for max_seq_len={max_seq_len}: that needs {need} bytes")
    return footprint(batch_size, max_seq_len, *sizes)
