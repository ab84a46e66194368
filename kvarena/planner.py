"""Size a cache before allocating it.

A ``KVCache`` holds one NumPy buffer whose size depends on its
configuration, the arena

    (num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)

in the storage dtype (``num_heads`` counts key/value heads: a
grouped-query model's ``num_kv_heads``), and, for a cache that rotates
inside (``rope_theta``), two float32 ``(max_seq_len, head_dim / 2)`` tables
of cos and sin. It is linear in ``batch_size * max_seq_len`` (the tables in
``max_seq_len``), so the largest batch or context that fits a memory budget
has a closed form. The attention kernel keeps no buffer per cache: its working memory is a few kilobytes per thread (queries,
accumulators and a 32-row tile) plus, for a long row split across threads,
``(2 + head_dim)`` numbers per query and chunk, freed after the call. This
module imports nothing from ``kvarena.cache``; the two must agree, and the
tests check it.
"""

import os
from dataclasses import dataclass

import numpy as np

from kvarena.checks import check_bool, check_positive, check_storage_dtype

_MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class Footprint:
    """Bytes a ``KVCache`` of one configuration allocates.

    Attributes
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        The configuration.
    dtype : str
        Storage dtype name: ``"float16"``, ``"float32"`` or ``"float64"``.
    arena_bytes : int
        The key/value arena.
    total_bytes : int
        Everything the cache holds that grows with its configuration:
        ``arena_bytes + rope_bytes``.
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
    rope_bytes: int = 0


def _bytes_per_slot(num_layers, num_heads, head_dim, dt):
    # bytes for one (batch row, position) pair: keys and values of every layer and head
    return 2 * num_layers * num_heads * head_dim * dt.itemsize


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
    dtype : float16, float32 (default) or float64
        Storage dtype of the arena.
    rope : bool, default False
        The cache rotates inside (``KVCache(..., rope_theta=...)``): count
        its rotary tables.

    Returns
    -------
    Footprint
        Exact byte counts of the arena, the rotary tables and the total.

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
    arena = batch_size * max_seq_len * _bytes_per_slot(num_layers, num_heads, head_dim, dt)
    tables = _rope_bytes(max_seq_len, head_dim, rope)
    return Footprint(batch_size, max_seq_len, num_layers, num_heads, head_dim,
                     dt.name, arena, arena + tables, tables)


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
    dtype : float16, float32 (default) or float64
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
    if batch_size is not None:
        batch_size = check_positive("batch_size", batch_size)
        # one position of every row, and its line of the rotary tables
        need = batch_size * slot + _rope_bytes(1, head_dim, rope)
        max_seq_len = available_bytes // need
        if max_seq_len < 1:
            raise ValueError(f"available_bytes={available_bytes} cannot hold one position "
                             f"for batch_size={batch_size}: that needs {need} bytes")
    else:
        max_seq_len = check_positive("max_seq_len", max_seq_len)
        need = max_seq_len * slot                       # one row of every position
        batch_size = (available_bytes - _rope_bytes(max_seq_len, head_dim, rope)) // need
        if batch_size < 1:
            raise ValueError(f"available_bytes={available_bytes} cannot hold one row "
                             f"for max_seq_len={max_seq_len}: that needs {need} bytes")
    return footprint(batch_size, max_seq_len, num_layers, num_heads, head_dim, dt, rope)
