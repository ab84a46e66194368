"""The KV cache: one contiguous arena and the TinyTorch-compatible façade.

The arena is a single C-contiguous ndarray

    (num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)

axis 1: 0 = keys, 1 = values. Every array the cache hands out is a view of
it, except the dequantized reads of an int8 arena. An int8 arena keeps one
float32 scale per stored D-vector beside it, in the same allocation:

    scales (num_layers, 2, batch_size, num_heads, max_seq_len)

This module validates all input and keeps the cache's meaning (lengths,
windows, pending writes); ``kvarena._arena`` (pyx/_arena.pyx) computes,
checking only what would take it outside the memory it was given.
"""

import functools
import math
import os
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from kvarena import kernel, storage
from kvarena.checks import (as_ndarray, check_bool, check_int, check_path, check_positive,
                            check_real, check_storage_dtype, check_threads)
from kvarena.planner import ARENA_ROOM

try:
    from kvarena import _arena
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "kvarena's compiled extension kvarena._arena is missing. Build it "
        "from the project root with `pip install .` (or `make install` for "
        "an editable development build)."
    ) from exc

MIB = 1024 * 1024
# the query and output dtypes the kernel reads and writes directly
_KERNEL_IO_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class CacheView(np.ndarray):
    """A read-only ndarray view into the arena that also passes for a TinyTorch ``Tensor``.

    TinyTorch code reads ``tensor.data`` as an ndarray (``k.data[0, 0, 0, :]``);
    a plain ndarray's ``.data`` is a memoryview, so this subclass returns a
    plain ndarray view instead. Both share memory with the arena.
    """

    @property
    def data(self):
        return self.view(np.ndarray)


def _take_guard(cache, name):
    """Take ``cache``'s guard for its method ``name``, or raise (see ``exclusive``)."""
    if not cache._guard.acquire(False):
        _refuse_second_thread(name)


def _refuse_second_thread(name):
    raise RuntimeError(f"KVCache.{name}: this cache is being used from two threads "
                       f"at once (or re-entered); a cache serves one thread at a "
                       f"time: give each thread its own cache, or serialise the "
                       f"calls with a lock of your own")


def exclusive(method):
    """Run a ``KVCache`` method holding the cache's guard.

    The guard is a lock taken without waiting: a call that finds it held
    (another thread is inside a guarded method of the same cache) raises
    ``RuntimeError`` at once, before touching anything, instead of letting
    two threads corrupt the arena or the lengths.
    Then the lengths and ring heads are checked (``KVCache._check_lengths``):
    no method runs on lengths changed outside the cache's methods to values
    the kernel cannot use, so the lengths a method leaves, which it set
    from checked ones, can be recorded as seen.
    """
    name = method.__name__

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        _take_guard(self, name)
        try:
            self._check_lengths()
            return method(self, *args, **kwargs)
        finally:
            self._guard.release()
    return guarded


class ForkedGuard:
    """The guard of a file-written cache in a process forked from its owner.

    Parent and child share the mapping and the file's lock (fork copies the
    descriptor), so neither the lock nor the thread guard could keep the
    child from writing under the parent: every guarded call refuses.
    """

    def __init__(self, path):
        self.path = path

    def acquire(self, blocking=True):
        raise RuntimeError(f"this cache writes the file {self.path}, which belongs to the "
                           f"process that created or opened it 'r+'; a forked child shares "
                           f"that mapping and must not write it: open the file with "
                           f"KVCache.open(path, 'c') in the child, or drop this cache and "
                           f"reopen it 'r+' once the parent has let go")


# caches that write their mapped file ("r+" or created with path=) in this process
_FILE_WRITERS = weakref.WeakSet()


def _disown_file_writers():
    for cache in list(_FILE_WRITERS):
        cache._guard = ForkedGuard(cache.path)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_file_writers)


class KVCache:
    """Key/value cache for autoregressive decoding, held in one contiguous arena.

    Drop-in for ``tinytorch.generation.kv_cache.KVCache``: the same
    constructor, members and call protocol (``update`` every layer, then
    ``advance``), with zero-copy reads and a typed attention kernel.
    Beyond TinyTorch: rows of different lengths (``seq_lens``), beam-search
    reordering and forking, cropping, a sliding window with attention
    sinks, snapshots (``save``/``load``) and file-backed arenas
    (``path=``, ``open``).

    Parameters
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        Positive sizes of the cache. ``num_heads`` counts the key/value
        heads stored (a grouped-query model's ``num_kv_heads``); ``attend``
        takes queries with any whole multiple of it.
    dtype : float16, float32 (default), float64 or int8
        Storage type of the arena. Inputs are cast to it on write; int8
        stores each D-vector as D int8 values and one float32 scale
        (absmax / 127, rounding to nearest), in the same single allocation.
        Reads of an int8 cache (``get``, ``caches``) dequantize into new
        float32 arrays; ``get_quantized`` and ``scales`` are the raw views.
    n_sink : int, optional
        Make the cache a sliding window with ``n_sink`` attention sinks
        (StreamingLLM): a write that would run past ``max_seq_len`` first
        evicts the oldest positions after the sinks, so a row keeps its
        first ``n_sink`` positions and its latest ``window = max_seq_len -
        n_sink``. See ``attend`` for what a query sees. Default: no window;
        writing past ``max_seq_len`` is an error. Eviction is O(1): the
        window is a ring whose oldest slot the new positions overwrite
        (see Notes).
    path : str, bytes or os.PathLike, optional
        Put the arena in a new memory-mapped file at ``path`` (which must
        not exist) instead of in anonymous memory; reopen it with
        ``KVCache.open``. Its disk blocks are reserved at once, and it is
        locked for this cache while the arena is mapped.
    lazy : bool, default False
        By default every page of the arena is written at construction, so
        the process holds the whole footprint from the start (and an arena
        larger than the memory available is a MemoryError). ``lazy=True``
        leaves pages to the OS until first touched.
    num_threads : int, optional
        Most threads the attention kernel uses; default every CPU this
        process may run on. Calls under 256 KiB of keys and values run on
        one thread. Above that the kernel times itself on one thread and on
        ``num_threads``, runs the count that has been faster per byte, and
        tries the other for two calls every 16, half as often each time it
        loses again (down to two in 256; a try that lost by a factor r waits
        at least 512 (r - 1) calls, up to 1,024): next to a threaded BLAS
        whose idle workers spin on the cores, or with a model's work between
        the calls (waking the kernel's workers costs time), one thread can be
        the faster. The work is cut the same way whichever count runs, so
        results do not depend on it. They may differ in the last bits
        between ``num_threads`` settings, or batches of different sizes,
        once a call splits long rows into chunks (flash-decoding): when it
        reads 4 MiB of keys and values or more and has fewer than four
        work items (a row's K/V head and up to 64 queries) per thread, or
        when it has fewer items than threads.
    check_finite : bool, default False
        Reject NaN and infinity in keys, values and queries.
    rope_theta : float, optional
        Rotary positions inside the cache (StreamingLLM for rotary
        models): callers pass ``attend`` queries and keys *before*
        rotation, the cache stores keys as given, and the kernel rotates
        each key and query by its position in the cache when attending.
        A key's position is its place in the row's kept sequence (sinks
        ``0 .. n_sink - 1``, then the window, oldest first); query ``t``
        of a block sits at the position of its own key. Without a window
        that is the absolute position, so the result equals rotating
        before caching. Pair ``i`` turns by ``position * rope_theta **
        (-2i / head_dim)``; ``head_dim`` must be even. Default: no
        rotation, keys are attended as stored.
    rope_style : {"half", "interleaved"}, optional
        Which dimensions rotate together: ``"half"`` (the default with
        ``rope_theta``) pairs ``i`` with ``i + head_dim / 2`` (GPT-NeoX, HF
        ``rotate_half``); ``"interleaved"`` pairs ``2i`` with ``2i + 1``
        (Meta's Llama, llama2.c). Only with ``rope_theta``.

    Raises
    ------
    TypeError, ValueError
        A bad argument; every argument is checked before anything is
        allocated or created, so a failed constructor leaves no file.
    MemoryError
        The arena cannot be addressed or allocated (eager: is larger than
        the memory available).
    FileExistsError, OSError
        ``path`` exists, or its filesystem has no room for the arena.

    Attributes
    ----------
    seq_lens : ndarray of intp, shape (batch_size,), read-only
        Committed length of each row.
    seq_pos : int
        The longest row's committed length; with rows of equal length (all
        TinyTorch usage), the length of every row. Assigning it sets every
        row's length.
    evicted : ndarray of intp, shape (batch_size,), read-only
        Positions a sliding window has dropped from each row: position
        ``j >= n_sink`` of row ``b`` holds the token at absolute position
        ``j + evicted[b]``.
    window : int or None
        ``max_seq_len - n_sink`` for a sliding-window cache, else None.
    ring_head : ndarray of intp, shape (batch_size,), read-only
        Per row, the slot offset of the oldest window position in its ring
        (see Notes); always 0 without a window.
    rope_theta : float or None
    rope_style : str or None
        As given; None without rotation inside the cache.
    caches : list of (CacheView, CacheView)
        Per layer, read-only full-capacity ``(B, H, max_seq_len, D)`` views,
        in slot order (see Notes). int8: a sequence whose items are
        dequantized float32 copies, made when the item is read.
    arena : CacheView
        Read-only view of the whole arena (int8: the raw int8 data).
    scales : CacheView or None
        int8: read-only view of the scales, float32 ``(L, 2, B, H, S)``,
        in the arena's allocation; stored element ``arena[..., d]`` stands
        for ``arena[..., d] * scales[...]``. None for a float cache.

    Notes
    -----
    One cache serves one thread at a time: every method that writes the
    arena or the lengths, ``attend`` and ``save`` hold a per-cache guard,
    and a second thread calling one of them meanwhile gets a RuntimeError
    (nothing is changed). ``get``, the attributes and the views are not
    guarded: read them from the thread that drives the cache. Separate
    caches are independent, and the kernel releases the GIL.
    ``copy.copy`` and ``copy.deepcopy`` give an independent in-memory
    cache (as ``ndarray.copy`` does, never one that shares the arena).
    In a process forked from the one that holds a file-backed cache
    ``"r+"``, that cache refuses every guarded call (see ``ForkedGuard``).

    A sliding window keeps row ``b``'s sinks in slots ``[0, n_sink)`` and
    its window in a ring of ``window`` slots after them: position ``j >=
    n_sink`` (in ``get()`` order) is in slot ``n_sink + (ring_head[b] + j -
    n_sink) % window``. Eviction turns the ring (``ring_head[b]`` moves on
    by the positions dropped) and the new positions overwrite the oldest
    slots, so nothing is moved, whatever the window's size. ``get()``
    returns positions in order: a view while a row's ring has not turned
    (``ring_head`` 0), a copy once it has. ``caches`` and ``arena`` show
    slots, not positions. ``crop``, ``reorder`` (a row's ring moves with
    it), ``copy_sequence`` and mapped files keep each row's ring as it is;
    a snapshot stores positions in order and loads with every ring at 0.

    The rotary tables (``rope_theta``) are per cache: cos and sin of every
    position and pair, float32 ``(max_seq_len, head_dim / 2)`` each,
    ``4 * max_seq_len * head_dim`` bytes, counted by ``get_memory_usage``
    and ``kvarena.footprint(..., rope=True)``. Being float32, they make a
    float64 cache's rotation float32-accurate (about 1e-7 relative).
    """

    def __init__(self, batch_size, max_seq_len, num_layers, num_heads, head_dim,
                 *, dtype=np.float32, n_sink=None, path=None, lazy=False,
                 num_threads=None, check_finite=False, rope_theta=None, rope_style=None):
        shape = (check_positive("num_layers", num_layers), 2,
                 check_positive("batch_size", batch_size),
                 check_positive("num_heads", num_heads),
                 check_positive("max_seq_len", max_seq_len),
                 check_positive("head_dim", head_dim))
        dtype = check_storage_dtype(dtype)
        n_sink = check_sinks(n_sink, shape[4])
        num_threads = check_threads(num_threads)
        lazy = check_bool("lazy", lazy)
        check_finite = check_bool("check_finite", check_finite)
        rope = check_rope(rope_theta, rope_style, shape[5])
        storage.arena_bytes(shape, dtype)          # addressable, before any file exists
        if path is not None:
            path = check_path("path", path)
            arena, scales, state = storage.create_mapped(path, shape, dtype, n_sink, lazy, rope)
        else:
            arena, scales = storage.new_arena(shape, dtype, lazy)
            state = storage.new_state(shape[2])
        self._adopt(arena, state, n_sink, path, num_threads, check_finite, scales)
        self._adopt_rope(*rope)
        if path is not None:
            _FILE_WRITERS.add(self)

    def _adopt(self, arena, state, n_sink, path, num_threads, check_finite, scales=None):
        """Take ``arena`` (L, 2, B, H, S, D) and ``state`` as this cache's storage.

        ``state`` is the cache's only mutable bookkeeping, one intp array
        laid out ``[seq_lens (B) | evicted (B) | written_end | ring_head
        (B)]``, so that a file-backed cache persists it beside its arena.
        ``scales``, for an int8 arena only, float32 (L, 2, B, H, S) in the
        arena's buffer. Everything passed in has been validated. Rotation
        is off until ``_adopt_rope``.
        """
        (self.num_layers, _, self.batch_size, self.num_heads,
         self.max_seq_len, self.head_dim) = arena.shape
        B = self.batch_size
        self.dtype = arena.dtype
        self._compute_dtype = kernel.compute_dtype(self.dtype)
        self.n_sink = n_sink
        self.window = None if n_sink is None else self.max_seq_len - n_sink
        self.path = None if path is None else os.fspath(path)
        self.num_threads = num_threads
        self.check_finite = bool(check_finite)
        self._arena = arena
        self._scales = scales
        self._accessor = _arena.ArenaAccessor(arena, num_threads, scales)
        self.arena = read_only(arena)
        self.caches = [(self.arena[layer, 0], self.arena[layer, 1])
                       for layer in range(self.num_layers)]
        # the writable twins of caches, made once: views cost as much as a write
        self._layers = [(arena[layer, 0], arena[layer, 1]) for layer in range(self.num_layers)]
        self._adopt_scales()
        self._state = state
        self._seq_lens = state[:B]          # also the kernel's per-row write positions
        self._evicted = state[B:2 * B]
        # positions written since the last reset, committed or not: reset()
        # wipes [0, written_end) so nothing of a previous sequence survives
        self._written = state[2 * B:2 * B + 1]
        # per row, the slot offset of the oldest window position (class Notes);
        # 0 without a window
        self._ring = state[2 * B + 1:]
        self._adopt_rope(None, None)
        self._accessor.track(self._seq_lens, self._ring, self._written)
        self._lengths_changed()
        self._guard = threading.Lock()      # see exclusive()

    def _adopt_rope(self, rope_theta, rope_style):
        """Turn rotation inside the cache on (checked ``rope_theta``,
        ``rope_style``) or off (None, None): the tables and the kernel's
        position-map arguments."""
        self.rope_theta, self.rope_style = rope_theta, rope_style
        self._rope_cos = self._rope_sin = None
        if rope_theta is not None:
            self._rope_cos, self._rope_sin = rope_tables(rope_theta, self.max_seq_len,
                                                         self.head_dim)
        # the kernel's map from positions to slots and rotations
        windowed = self.window is not None
        self._accessor.positions(self._ring if windowed else None, self.n_sink if windowed else 0,
                                 self._rope_cos, self._rope_sin, rope_style == "interleaved")

    # -- validation ----------------------------------------------------------

    def _layer(self, layer_idx):
        layer_idx = check_int("layer_idx", layer_idx)
        if not 0 <= layer_idx < self.num_layers:
            # TinyTorch's wording first: code written against it matches on "Layer index"
            tinytorch = (f"Layer index {layer_idx} < 0" if layer_idx < 0 else
                         f"Layer index {layer_idx} >= num_layers {self.num_layers}")
            raise ValueError(f"{tinytorch}: layer_idx must be in [0, {self.num_layers}); "
                             f"got {layer_idx}")
        return layer_idx

    def _row(self, name, row):
        row = check_int(name, row)
        if not 0 <= row < self.batch_size:
            raise ValueError(f"{name} must be a batch row in [0, {self.batch_size}); got {row}")
        return row

    def _per_row(self, name, values):
        """``values`` as a C-contiguous intp array of one int per batch row."""
        a = np.asarray(values)
        if a.shape != (self.batch_size,):
            raise ValueError(f"{name} must have shape (batch_size,) = ({self.batch_size},); "
                             f"got {a.shape}")
        if a.dtype.kind not in "iu":
            # ints beyond int64 become float64 or object in NumPy: show them as given
            shown = f"{values!r}, " if a.size <= 8 else ""
            raise TypeError(f"{name} must hold ints within [{np.iinfo(np.intp).min}, "
                            f"{np.iinfo(np.intp).max}], one per batch row; got {shown}dtype "
                            f"{a.dtype}")
        if a.dtype.kind == "u" and a.max() > np.iinfo(np.intp).max:
            raise ValueError(f"{name} must hold ints of at most {np.iinfo(np.intp).max}; "
                             f"got {a.tolist()}")
        return np.ascontiguousarray(a, dtype=np.intp)

    def _block(self, name, x, T=None, grouped=False):
        """``x`` checked as (B, H, T, D): keys, values, or with ``grouped``
        queries of (B, G * H, T, D). No copy: any strides are accepted (an
        int8 cache's keys and values become float32 C-contiguous rows:
        ``_to_quantize``)."""
        a = as_ndarray(x, name)
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must hold real floating-point values; got dtype {a.dtype}")
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        heads_ok = a.ndim == 4 and (a.shape[1] % H == 0 and a.shape[1] >= H if grouped
                                    else a.shape[1] == H)
        if not heads_ok or (a.shape[0], a.shape[3]) != (B, D) \
                or (T is not None and a.shape[2] != T):
            t = "T" if T is None else T
            if grouped:
                raise ValueError(f"{name} must have shape (batch_size, G * num_heads, T, "
                                 f"head_dim) = ({B}, G * {H}, {t}, {D}) for a whole G >= 1; "
                                 f"got {a.shape}")
            raise ValueError(f"{name} must have shape (batch_size, num_heads, T, head_dim) "
                             f"= ({B}, {H}, {t}, {D}); got {a.shape}")
        if a.shape[2] < 1:
            raise ValueError(f"{name} must hold at least one position (T >= 1); got T = 0")
        if self.check_finite and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinity (check_finite=True)")
        if self._scales is not None and not grouped:
            return self._to_quantize(name, a)
        # keys and values are stored in the arena's dtype, queries computed in
        # the compute dtype: narrowing to either may overflow
        narrow = self._compute_dtype if grouped else self.dtype
        if a.dtype.itemsize > narrow.itemsize:
            big = largest_beyond(a, np.finfo(narrow).max)
            if big is not None:
                raise ValueError(f"{name} has finite values up to {big:g}, beyond the "
                                 f"{narrow} range (max {np.finfo(narrow).max:g})")
        return a

    def _queries(self, q, T):
        """``q`` checked as (B, G * H, T, D), in a dtype and layout the kernel reads:
        float32 or float64 (others become the compute dtype), native byte
        order, strides whole elements (any strides otherwise: no copy)."""
        a = self._block("q", q, T=T, grouped=True)
        if a.dtype not in _KERNEL_IO_DTYPES:   # float16, or byte-swapped
            native = a.dtype.newbyteorder("=")
            a = a.astype(native if native in _KERNEL_IO_DTYPES else self._compute_dtype)
        # aligned: the data and every stride are whole elements
        return a if a.flags.aligned else np.ascontiguousarray(a)

    def _out(self, out, query):
        """``out`` checked as where attention of ``query`` may be written, or a new array."""
        if out is None:
            return np.empty(query.shape, dtype=query.dtype)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray; got {type(out).__name__}")
        if out.shape != query.shape or out.dtype != query.dtype:
            raise ValueError(f"out must have q's shape {query.shape} and dtype {query.dtype}; "
                             f"got shape {out.shape}, dtype {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out must be writable; got a read-only array")
        if not out.flags.aligned:
            raise ValueError(f"out must be aligned: its data and strides in whole elements "
                             f"of {out.itemsize} bytes; got strides {out.strides}")
        if _overlaps_itself(out):
            raise ValueError(f"out must not overlap itself; got strides {out.strides} "
                             f"for shape {out.shape}")
        if np.may_share_memory(out, query) or self._in_storage(out):
            raise ValueError("out must not overlap q or the cache's arena")
        return out

    def _in_storage(self, a):
        """Whether ``a`` may share memory with the arena (or an int8 arena's
        scales, which writing a key writes too)."""
        return np.may_share_memory(a, self._arena) or (
            self._scales is not None and np.may_share_memory(a, self._scales))

    def _write(self, layer_idx, key, value):
        """Store key and value (B, H, T, D) after each row's committed
        positions, cast to the arena's dtype. Everything is checked."""
        if self._scales is not None:
            return self._store_rows(layer_idx, key, value)
        if self.dtype == np.float16 and key.dtype == value.dtype == np.float32:
            key, value = (np.require(a, requirements="CA") for a in (key, value))
            return self._store_rows(layer_idx, key, value)
        T = key.shape[2]
        keys, values = self._layers[layer_idx]
        p = self._seq_pos if not self._turned else self._run_start(T)
        if p is None:
            # the block's slots, row by row (advanced indices around a slice
            # put (B, T) first, so the block goes in as (B, T, H, D))
            slots = self._block_slots(T)
            rows = np.arange(self.batch_size)[:, None]
            keys[rows, :, slots] = key.transpose(0, 2, 1, 3)
            values[rows, :, slots] = value.transpose(0, 2, 1, 3)
        elif self._uniform:
            keys[:, :, p:p + T] = key
            values[:, :, p:p + T] = value
        else:
            for b, p in enumerate(self._seq_lens.tolist()):
                keys[b, :, p:p + T] = key[b]
                values[b, :, p:p + T] = value[b]

    def _run_start(self, T):
        """The first slot of the block of ``T`` positions after the committed
        ones when, in every row, it is the same run of consecutive slots;
        else None."""
        if not self._uniform or self._common_head is None:
            return None
        p = self._seq_pos
        if p + T <= self.n_sink:
            return p
        if p < self.n_sink:
            return None                 # from the sinks into the ring
        slot = self.n_sink + (self._common_head + p - self.n_sink) % self.window
        return slot if slot + T <= self.max_seq_len else None

    def _block_slots(self, T):
        """Slots of the ``T`` positions after each row's committed ones.

        Returns
        -------
        ndarray of intp, shape (batch_size, T), C-contiguous
            ``[b, t]``: the slot of row ``b``'s position ``seq_lens[b] + t``
            (call after ``_make_room``).
        """
        positions = self._seq_lens[:, None] + np.arange(T)
        return self._slots(positions, self._ring[:, None])

    def _slots(self, positions, ring_head):
        """Slots of ``positions`` (ints < max_seq_len) in rows whose rings
        start at ``ring_head`` (broadcast against ``positions``)."""
        positions = np.asarray(positions, dtype=np.intp)
        if self.window is None:
            return np.ascontiguousarray(positions)
        ring = self.n_sink + (ring_head + positions - self.n_sink) % self.window
        return np.where(positions < self.n_sink, positions, ring)

    def _in_order(self, layer_idx, rows, n):
        """Copies of the first ``n`` positions of ``rows`` (an array of row
        indices) of one layer, in position order: keys and values
        ``(len(rows), H, n, D)``."""
        slots = self._slots(np.arange(n), self._ring[rows, None])[:, None, :, None]
        return tuple(np.take_along_axis(self._arena[layer_idx, kv, rows], slots, axis=2)
                     for kv in (0, 1))

    def _row_slots(self, row, n):
        """Index of row ``row``'s first ``n`` positions along the slot axis,
        in order: a slice while the row's ring has not turned."""
        if not self._ring[row]:
            return slice(0, n)
        return self._slots(np.arange(n), self._ring[row])

    def _detached(self, block):
        """``block``, copied if it may be a view of the arena.

        A sliding window's eviction hands the oldest slots to the write,
        and a view of the positions being written would overlap its
        destination: either way the block would change while it is copied
        in.
        """
        # an array that owns its memory cannot be a view of the arena
        if block.base is not None and self._in_storage(block):
            return block.copy()
        return block

    def _check_lengths(self):
        """Recheck the lengths and ring heads if they changed outside the cache's methods."""
        # the kernel writes at seq_lens as they are in memory now, not at the
        # cached seq_pos: if they changed behind this object's back, recheck
        # (the accessor compares them with the values last seen)
        if not self._accessor.lengths_unchanged():
            self._lengths_changed_outside()

    def _room(self, name, T):
        """Check that a block of ``T`` new positions can be written at the
        lengths (checked: ``_check_lengths``)."""
        if self.window is not None:
            if T > self.window:
                raise ValueError(f"{name} holds T = {T} positions, more than the window of "
                                 f"max_seq_len - n_sink = {self.window} that this "
                                 f"sliding-window cache can hold at once")
        elif self._seq_pos + T > self.max_seq_len:
            raise ValueError(f"{overflow(self._seq_pos + T - 1, self.max_seq_len)}: {name} holds "
                             f"T = {T} positions, but seq_pos {self._seq_pos} + T must not "
                             f"exceed max_seq_len = {self.max_seq_len}")

    # -- bookkeeping -----------------------------------------------------------

    def _lengths_changed_outside(self):
        """The lengths in memory are not the ones this object last set."""
        # seen as uintp, a negative length is huge
        if int(self._seq_lens.view(np.uintp).max()) > self.max_seq_len:
            raise RuntimeError(f"seq_lens = {self._seq_lens.tolist()} were changed outside "
                               f"the cache's methods and are no longer in [0, max_seq_len = "
                               f"{self.max_seq_len}]; the cache refuses to write")
        # the ring heads likewise
        if int(self._ring.view(np.uintp).max(initial=0)) >= (self.window or 1):
            raise RuntimeError(f"ring heads {self._ring.tolist()} were changed outside the "
                               f"cache's methods and are no longer in [0, window = "
                               f"{self.window or 1}); the cache refuses to write")
        self._lengths_changed()

    def _lengths_changed(self):
        # seq_pos is read per token (models take positions from it): keep it
        # as a Python int rather than reducing seq_lens on every read
        self._seq_pos = int(self._seq_lens.max())
        self._uniform = bool((self._seq_lens == self._seq_pos).all())
        # what _check_lengths compares with: lengths set or checked here
        self._accessor.see_lengths()
        # rows whose positions are no longer in slot order (a turned ring), and
        # the ring head as an int when every row has the same
        heads = self._ring.tolist()       # a few rows: cheaper in Python than in NumPy
        self._turned = any(heads)
        self._common_head = heads[0] if heads.count(heads[0]) == len(heads) else None
        self._forget_pending()

    def _forget_pending(self):
        # per layer, T of the last update() since the lengths last changed:
        # the block that get(pending=True) shows after the committed positions
        self._pending = [0] * self.num_layers

    def _make_room(self, T):
        """Sliding window: evict, in every row that needs it, enough of the
        oldest non-sink positions for ``T`` new ones (``_room`` passed)."""
        if self.window is None or self._seq_pos + T <= self.max_seq_len:
            return
        # rows of one length (decoding a batch) drop alike: a scalar is cheaper
        drop = (self._seq_pos + T - self.max_seq_len if self._uniform
                else np.maximum(self._seq_lens + T - self.max_seq_len, 0))
        # O(1): the ring turns past the dropped positions, whose slots the
        # block then overwrites; nothing moves (drop <= seq_lens - n_sink)
        self._ring += drop
        self._ring %= self.window
        self._seq_lens -= drop
        self._evicted += drop
        self._lengths_changed()

    def _wrote(self, T):
        end = self._seq_pos + T
        if end > self._written[0]:
            self._written[0] = end

    # -- the TinyTorch API ---------------------------------------------------

    @property
    def seq_pos(self):
        return self._seq_pos

    @seq_pos.setter
    @exclusive
    def seq_pos(self, value):
        value = check_int("seq_pos", value)
        if not 0 <= value <= self.max_seq_len:
            raise ValueError(f"seq_pos must be in [0, max_seq_len = {self.max_seq_len}]; "
                             f"got {value}")
        self._seq_lens.fill(value)
        self._written[0] = max(self._written[0], value)
        self._lengths_changed()

    @property
    def seq_lens(self):
        return read_only(self._seq_lens)

    @property
    def evicted(self):
        return read_only(self._evicted)

    @property
    def ring_head(self):
        return read_only(self._ring)

    @exclusive
    def update(self, layer_idx, key, value):
        """Write ``key`` and ``value`` after each row's committed positions.

        Row ``b`` gets positions ``seq_lens[b] .. seq_lens[b] + T - 1``.
        Does not advance: call ``advance(T)`` once every layer is updated.
        A sliding-window cache first evicts what the block needs (once per
        step: the first layer's write makes room for all layers). Eviction
        happens at the write: positions written and then not committed
        (a rejected draft, a finished row in a batch) have still pushed
        old positions out.

        Parameters
        ----------
        layer_idx : int
            In ``[0, num_layers)``.
        key, value : array-like or Tensor, shape (batch_size, num_heads, T, head_dim)
            Any real float dtype; cast to the arena's dtype. ``T >= 1``.
            An int8 cache converts them to float32 and stores each vector
            as int8 values and one scale, absmax / 127. With ``rope_theta``,
            keys before rotation.

        Raises
        ------
        TypeError, ValueError
            On a bad index, type, shape or capacity; for an int8 cache also
            on NaN, infinity or values beyond float32 (checked or not: it
            cannot store them). The cache is unchanged.
        """
        layer_idx = self._layer(layer_idx)
        key = self._block("key", key)
        T = key.shape[2]
        value = self._block("value", value, T=T)
        key, value = self._detached(key), self._detached(value)
        self._room("key", T)
        self._make_room(T)
        self._write(layer_idx, key, value)
        self._wrote(T)
        self._pending[layer_idx] = T

    def get(self, layer_idx, row=None, *, pending=False):
        """Cached keys and values of one layer: all rows, or one.

        Parameters
        ----------
        layer_idx : int
        row : int, optional
            One batch row. Required when rows hold different lengths.
        pending : bool, default False
            Also return the block that this layer's last ``update()`` wrote
            and ``advance()`` has not committed yet: ``T`` more positions
            per row. A model that does its own attention reads this after
            ``update()``: without it, ``get()`` returns the committed
            positions only (TinyTorch's semantics), and attending over them
            leaves out the new tokens themselves (TinyTorch's "new token
            does not attend to itself" bug). ``T`` is that of the layer's
            last ``update()`` since the lengths last changed (``advance``,
            ``reset``, ``crop``, ``reorder``, ``copy_sequence``, ``seq_pos
            =``, a sliding window's eviction); 0 when there is none.
            ``attend()`` does not leave a pending block: it has already
            attended over it.

        Returns
        -------
        keys, values : CacheView, shape (batch_size, num_heads, seq_pos, head_dim)
            Read-only, in the arena's dtype, in position order (a sliding
            window's sinks, then its window oldest first). Views of the
            arena (no copy), except for a sliding window whose ring has
            turned (``ring_head`` not 0) in a row asked for: then a copy,
            O(positions).
            With ``row``, shape ``(1, num_heads, seq_lens[row], head_dim)``.
            With ``pending=True``, ``seq_pos + T`` and ``seq_lens[row] + T``
            positions. An int8 cache returns new float32 arrays instead (a
            copy, read-only all the same): the stored values times their
            scales; ``get_quantized`` returns the raw views.
        """
        layer_idx = self._layer(layer_idx)
        pending = check_bool("pending", pending)
        key_view, value_view = self.caches[layer_idx]
        T = self._pending[layer_idx] if pending else 0
        if self._scales is not None:
            return self._dequantized_get(layer_idx, row, pending)
        if row is None:
            if not self._uniform:
                raise ValueError(f"row must be given when rows hold different lengths; "
                                 f"seq_lens = {self._seq_lens.tolist()}")
            n = self._seq_pos + T
            if self._turned:
                rows = np.arange(self.batch_size)
                return tuple(map(read_only, self._in_order(layer_idx, rows, n)))
            return key_view[:, :, :n], value_view[:, :, :n]
        row = self._row("row", row)
        n = self._seq_lens[row] + T
        if self._ring[row]:
            return tuple(map(read_only, self._in_order(layer_idx, np.array([row]), n)))
        return key_view[row:row + 1, :, :n], value_view[row:row + 1, :, :n]

    @exclusive
    def advance(self, n=1):
        """Commit written positions, in every row or per row.

        Parameters
        ----------
        n : int or sequence of int, default 1
            An int ``>= 1`` commits that many positions in every row; a
            sequence of ``batch_size`` ints ``>= 0`` commits ``n[b]`` in
            row ``b`` (prefill right-padded prompts, then commit each
            prompt's true length: the padding is never attended to).
        """
        if np.ndim(n) == 0:
            n = check_positive("n", n)
            if self._seq_pos + n > self.max_seq_len:
                raise ValueError(f"{overflow(self._seq_pos + n - 1, self.max_seq_len)}: n = {n} "
                                 f"would advance seq_pos {self._seq_pos} past max_seq_len = "
                                 f"{self.max_seq_len}")
            self._seq_lens += n
            self._seq_pos += n
            self._accessor.see_lengths()
            self._forget_pending()
            return
        n = self._per_row("n", n)
        if (n < 0).any():
            raise ValueError(f"n must hold ints >= 0; got {n.tolist()}")
        over = np.flatnonzero(n > self.max_seq_len - self._seq_lens)   # no overflow
        if over.size:
            b = over[0]
            last = int(self._seq_lens[b]) + int(n[b]) - 1
            raise ValueError(f"{overflow(last, self.max_seq_len)}: n[{b}] = {n[b]} would "
                             f"advance row {b} from {self._seq_lens[b]} past max_seq_len = "
                             f"{self.max_seq_len}")
        self._seq_lens += n
        self._lengths_changed()

    def reset(self):
        """Forget every sequence: all lengths 0 and every written position zeroed
        (an int8 cache's scales too). Also how a cache whose lengths were
        changed outside its methods, and that refuses every other call, is
        made usable again.

        Only the positions written since the last reset are looked at, so
        the cost is proportional to what was used, not to the arena; and
        they are zeroed only in the (layer, K/V, row, head) blocks that
        hold a nonzero bit. So a lazy arena's layers, rows and heads that
        were never written stay uncommitted: reading an untouched page maps
        no memory, writing zeros to it would commit it (a whole huge page
        where transparent huge pages are on).
        """
        # exclusive() without its check of the lengths, which this sets
        _take_guard(self, "reset")
        try:
            used = self._arena[..., :self._written[0], :]
            # as unsigned ints, so that -0.0 counts as data too
            bits = used.view(f"u{self.dtype.itemsize}")
            used[bits.any(axis=(-2, -1))] = 0
            if self._scales is not None:
                self._wipe_scales()
            self._state.fill(0)
            self._lengths_changed()
        finally:
            self._guard.release()

    def get_memory_usage(self):
        """Memory held by the arena, from its real size and dtype.

        Returns
        -------
        dict
            ``total_bytes``, ``total_mb`` (MiB), ``per_layer_mb``,
            ``cache_tensors`` (2 per layer), ``total_elements``, ``used_mb``
            (the committed positions of all rows), ``utilization`` (their
            share of the capacity, ``seq_pos / max_seq_len`` when rows are
            equal) and ``dtype`` (its name). ``total_bytes`` is the arena's
            whole allocation: for int8, ``scale_bytes`` of scales included
            (``scale_bytes`` is 0 for a float cache), and in memory the 63
            bytes in which the arena moves to a 64-byte boundary (see
            ``footprint``). A file-backed cache adds
            ``path`` and ``resident_bytes``: how much of the mapped arena
            this process has in memory now (None where the OS does not
            tell). ``rope_bytes``: the rotary tables (0 without
            ``rope_theta``), included in ``total_bytes`` and ``total_mb``;
            the other figures describe the arena alone.
        """
        rope_bytes = 0 if self.rope_theta is None else 2 * self._rope_cos.nbytes
        arena_bytes = storage.arena_bytes(self._arena.shape, self.dtype)   # with int8 scales
        room = 0 if self.path is not None else ARENA_ROOM     # see storage.new_arena
        total_bytes = arena_bytes + room + rope_bytes
        utilization = int(self._seq_lens.sum()) / (self.batch_size * self.max_seq_len)
        usage = {
            "total_bytes": total_bytes,
            "total_mb": total_bytes / MIB,
            "per_layer_mb": arena_bytes / MIB / self.num_layers,
            "cache_tensors": 2 * self.num_layers,
            "total_elements": self._arena.size,
            "used_mb": arena_bytes * utilization / MIB,
            "utilization": utilization,
            "dtype": self.dtype.name,
            "scale_bytes": 0 if self._scales is None else self._scales.nbytes,
            "rope_bytes": rope_bytes,
        }
        if self.path is not None:
            usage["path"] = self.path
            usage["resident_bytes"] = storage.resident_bytes(self._arena, total_bytes)
        return usage

    # -- beyond TinyTorch ----------------------------------------------------

    def attend(self, layer_idx, q, k, v, *, out=None):
        """Write ``k``, ``v`` and return the attention of ``q`` over the cache.

        Query ``t`` of row ``b`` attends to the row's cached positions and
        to the new ones up to its own: ``seq_lens[b] + t + 1`` positions,
        causal within the new block. In a sliding-window cache that is at
        most ``max_seq_len - T + t + 1``: for decoding (``T = 1``) the
        ``n_sink`` sinks and the latest ``window`` positions, the new one
        included. Like ``update``, this does not advance.

        With ``rope_theta``, ``q`` and ``k`` come before rotation: the kernel
        rotates every key by its position in the row's kept sequence and
        query ``t`` by ``seq_lens[b] + t`` (after eviction made room), the
        position of its own key; without a window, the absolute positions.

        Grouped-query and multi-query attention: ``q`` may have any whole
        multiple ``G`` of ``num_heads`` heads; query head ``h`` attends with
        key/value head ``h // G`` (llama2.c's ``kv_mul``, HF's ``repeat_kv``
        order), and every key/value row is read once for its G query heads.

        Parameters
        ----------
        layer_idx : int
            In ``[0, num_layers)``.
        q : array-like or Tensor, shape (batch_size, G * num_heads, T, head_dim)
            Queries of the T new positions. Any strides (a model's
            (B, T, H, D) activations as ``.transpose(0, 2, 1, 3)``) are
            read in place.
        k, v : array-like or Tensor, shape (batch_size, num_heads, T, head_dim)
            Keys and values of the same positions; any strides.
        out : ndarray, optional
            Where to write the result: q's shape and result dtype,
            writable, any strides in whole elements (aligned), overlapping
            neither q nor the arena.

        Returns
        -------
        ndarray, shape (batch_size, G * num_heads, T, head_dim)
            ``out``, or a new array. Its dtype is q's when q is float32 or
            float64, else the compute dtype. The kernel computes in float32
            (float64 for a float64 arena), an int8 arena included: its
            rows are dequantized in registers as they are read, and k, v
            quantized on write as by ``update``.

        Raises
        ------
        TypeError, ValueError
            As ``update``, also for ``q`` and ``out``; the cache is unchanged.
        """
        # exclusive() written out, the guard taken inline: this is the call a
        # model makes per layer and token, and at S = 16 the wrapper's frame
        # cost 0.4 of its 4.5 us, the guard's call and the length checks and
        # bookkeeping here another 0.6 (now in attend_plain)
        if not self._guard.acquire(False):
            _refuse_second_thread("attend")
        try:
            if type(layer_idx) is int and 0 <= layer_idx < self.num_layers:
                # the common call (lengths as last seen, every row at seq_pos,
                # ndarrays the kernel reads as they are or, keys and values,
                # casts as NumPy does, no eviction) is checked, written and
                # attended in one compiled step; None means it is not one,
                # with nothing touched
                plain = self._accessor.attend_plain(layer_idx, q, k, v, out,
                                                    kernel.current_isa(), self.check_finite)
                if plain is not None:
                    return plain
            self._check_lengths()
            return self._attend_general(layer_idx, q, k, v, out)
        finally:
            self._guard.release()

    def _attend_general(self, layer_idx, q, k, v, out):
        """``attend`` for every call ``attend_plain`` leaves (under the guard)."""
        layer_idx = self._layer(layer_idx)
        key = self._block("k", k)
        T = key.shape[2]
        value = self._block("v", v, T=T)
        query = self._queries(q, T)
        key, value, query = self._detached(key), self._detached(value), self._detached(query)
        out = self._out(out, query)
        self._room("k", T)
        self._make_room(T)
        self._write(layer_idx, key, value)
        self._wrote(T)   # before the kernel: reset() must wipe these even if it raises
        self._accessor.attend(layer_idx, self._seq_lens, query, out, kernel.current_isa())
        return out

    @exclusive
    def reorder(self, beam_idx):
        """Reorder the rows in place: row ``b`` becomes old row ``beam_idx[b]``.

        As ``reorder_cache`` in beam search: a row may be taken several
        times and others dropped. Whole rows move, positions written but
        not yet committed included. Rows that stay put are not copied; the
        moved ones go through one temporary the size of one layer's
        moved rows, reused for every layer.

        Parameters
        ----------
        beam_idx : sequence of int, shape (batch_size,)
            Values in ``[0, batch_size)``.
        """
        idx = self._per_row("beam_idx", beam_idx)
        bad = np.flatnonzero((idx < 0) | (idx >= self.batch_size))
        if bad.size:
            raise ValueError(f"beam_idx must hold rows in [0, {self.batch_size}); "
                             f"got beam_idx[{bad[0]}] = {idx[bad[0]]}")
        moved = np.flatnonzero(idx != np.arange(self.batch_size))
        if not moved.size:
            return
        # beyond the written end every row is zero: copying up to it moves whole rows
        end = int(self._written[0])
        gathered = np.empty((2, moved.size, self.num_heads, end, self.head_dim), self.dtype)
        for layer in range(self.num_layers):
            block = self._arena[layer, :, :, :, :end]
            # mode="clip": the indices are checked, and "raise" would buffer `out`
            np.take(block, idx[moved], axis=1, out=gathered, mode="clip")
            block[:, moved] = gathered
        if self._scales is not None:
            self._reorder_scales(idx, moved, end)
        self._seq_lens[:] = self._seq_lens[idx]
        self._evicted[:] = self._evicted[idx]
        self._ring[:] = self._ring[idx]          # a row keeps its slots, so its ring
        self._lengths_changed()

    @exclusive
    def copy_sequence(self, src, dst, length=None):
        """Fork: make row ``dst`` a copy of row ``src``'s first ``length`` positions.

        Parameters
        ----------
        src, dst : int
            Batch rows.
        length : int, optional
            In ``[0, seq_lens[src]]``; default all of ``src``.
        """
        src = self._row("src", src)
        dst = self._row("dst", dst)
        held = int(self._seq_lens[src])
        if length is None:
            length = held
        length = check_int("length", length)
        if not 0 <= length <= held:
            raise ValueError(f"length must be in [0, seq_lens[src] = {held}]; got {length}")
        # position by position, each row through its own ring: dst keeps its
        # ring, so what it holds past `length` (written, not committed) stays put
        src_slots, dst_slots = self._row_slots(src, length), self._row_slots(dst, length)
        for layer in range(self.num_layers):
            # per layer: NumPy cannot prove two rows of one array disjoint and
            # copies through a temporary, which should stay small
            moved = self._arena[layer, :, src][:, :, src_slots]
            self._arena[layer, :, dst][:, :, dst_slots] = moved
        if self._scales is not None:                # the scales move with their rows
            moved = self._scales[:, :, src][..., src_slots]
            self._scales[:, :, dst][..., dst_slots] = moved
        self._seq_lens[dst] = length
        self._evicted[dst] = self._evicted[src]
        self._lengths_changed()

    @exclusive
    def crop(self, length):
        """Drop positions from the end of every row.

        Parameters
        ----------
        length : int
            ``>= 0``: keep at most ``length`` positions per row; negative:
            drop ``-length`` positions from every row. In
            ``[-min(seq_lens), max_seq_len]``.
        """
        length = check_int("length", length)
        shortest = int(self._seq_lens.min())
        if not -shortest <= length <= self.max_seq_len:
            raise ValueError(f"length must be in [-min(seq_lens), max_seq_len] = "
                             f"[{-shortest}, {self.max_seq_len}]; got {length}")
        if length >= 0:
            np.minimum(self._seq_lens, length, out=self._seq_lens)
        else:
            self._seq_lens += length
        self._lengths_changed()

    @exclusive
    def save(self, path):
        """Write a checksummed snapshot of the committed positions to ``path``.

        See ``kvarena.storage`` for the format. The file appears complete
        or not at all (written unnamed beside ``path``, then renamed over
        it), and a process killed midway leaves no temporary (Linux).

        Parameters
        ----------
        path : str, bytes or os.PathLike
            A new name, or a regular file to replace; a symlink's target is
            replaced and the link kept.

        Raises
        ------
        TypeError
            ``path`` is not a path.
        ValueError
            ``path`` is a directory, FIFO, device or socket, or the file of
            an open file-backed cache (this one's included), or the batch is
            too large for a snapshot's header (``kvarena.storage.save``):
            nothing is written.
        RuntimeError
            The lengths were changed outside the cache's methods and are
            out of range (as for every write), or ``evicted`` was made
            negative: nothing is written.
        OSError
            The directory is not writable or the filesystem is full; the
            old file is unchanged.
        """
        storage.save(self, check_path("path", path))

    @classmethod
    def load(cls, path, *, max_seq_len=None, lazy=False, num_threads=None, check_finite=False,
             max_arena_bytes=None):
        """A new in-memory cache holding the snapshot at ``path`` (bit-exact).

        Parameters
        ----------
        path : str or os.PathLike
        max_seq_len : int, optional
            Capacity of the new cache; default the saved cache's. At least
            the longest saved row.
        lazy, num_threads, check_finite
            As for the constructor.
        max_arena_bytes : int, optional
            The largest arena (``num_layers * 2 * batch_size * num_heads *
            max_seq_len * head_dim * itemsize`` bytes) to allocate for the
            file; default the memory available now. A file's header sets the
            capacity, and a small crafted file could otherwise ask for any.

        Raises
        ------
        kvarena.storage.CacheFileError
            The file is not a kvarena snapshot, is of another format
            version, is truncated, fails its checksum, holds a number out of
            range, or needs an arena larger than ``max_arena_bytes``.
            Nothing is created.
        """
        path = check_path("path", path)
        num_threads = check_threads(num_threads)
        lazy = check_bool("lazy", lazy)
        check_finite = check_bool("check_finite", check_finite)
        if max_arena_bytes is not None:
            max_arena_bytes = check_positive("max_arena_bytes", max_arena_bytes)
        arena, scales, state, n_sink, rope = storage.load(path, max_seq_len, lazy,
                                                          max_arena_bytes)
        cache = cls.__new__(cls)
        cache._adopt(arena, state, n_sink, None, num_threads, check_finite, scales)
        cache._adopt_rope(*rope)
        return cache

    @classmethod
    def open(cls, path, mode="r+", *, num_threads=None, check_finite=False):
        """Reopen the file-backed cache at ``path`` without reading its arena.

        Pages come from the file as they are touched.

        Parameters
        ----------
        path : str or os.PathLike
            A file made by ``KVCache(..., path=path)``.
        mode : {"r+", "c"}
            ``"r+"``: writes (and lengths) go to the file. ``"c"``:
            copy-on-write, the file is opened read-only and never changed;
            this process's writes stay private to it, so several processes
            can share one cached prefix and extend it independently. The
            lengths are read once, at open.

        Raises
        ------
        BlockingIOError
            Another cache holds the file: one created on it or opened
            ``"r+"`` excludes every other; ``"c"`` caches exclude ``"r+"``.
        kvarena.storage.CacheFileError
            The file is not a kvarena mapped arena, or is damaged.
        """
        path = check_path("path", path)
        num_threads = check_threads(num_threads)
        check_finite = check_bool("check_finite", check_finite)
        arena, scales, state, n_sink, rope = storage.open_mapped(path, mode)
        cache = cls.__new__(cls)
        cache._adopt(arena, state, n_sink, path, num_threads, check_finite, scales)
        cache._adopt_rope(*rope)
        if mode == "r+":
            _FILE_WRITERS.add(cache)
        return cache

    @exclusive
    def __deepcopy__(self, memo):
        """An independent in-memory copy: its own arena, lengths and guard.

        A file-backed cache's copy lives in memory (``path`` is None): a
        file has one writer. Positions past the written end are zero in
        both, so only the written prefix is copied.
        """
        end = int(self._written[0])
        arena, scales = storage.new_arena(self._arena.shape, self.dtype, lazy=True)
        arena[..., :end, :] = self._arena[..., :end, :]
        if scales is not None:
            scales[..., :end] = self._scales[..., :end]
        clone = type(self).__new__(type(self))
        clone._adopt(arena, self._state.astype(np.intp), self.n_sink, None,
                     self.num_threads, self.check_finite, scales)
        clone._adopt_rope(self.rope_theta, self.rope_style)
        memo[id(self)] = clone
        return clone

    def __copy__(self):
        """As ``deepcopy``: a shallow copy would share the arena and the lengths."""
        return self.__deepcopy__({})

    # -- int8 storage ------------------------------------------------------------

    def get_quantized(self, layer_idx, row=None, *, pending=False):
        """The raw int8 keys and values of one layer and their scales (no copy).

        Stored element ``keys[b, h, t, d]`` stands for ``keys[b, h, t, d] *
        key_scales[b, h, t]`` (float32), which is what ``get`` returns and
        what ``attend`` computes with.

        Parameters
        ----------
        layer_idx, row, pending
            As for ``get``.

        Returns
        -------
        keys : CacheView of int8, shape (batch_size, num_heads, seq_pos, head_dim)
        key_scales : CacheView of float32, shape (batch_size, num_heads, seq_pos)
        values, value_scales : CacheView
            As ``keys`` and ``key_scales``. All four are read-only views of
            the arena's allocation; with ``row``, of one row, as for ``get``.
            As for ``get``, once a sliding window's ring has turned in a row
            asked for, they are read-only copies in position order.

        Raises
        ------
        TypeError
            The cache does not store int8.
        ValueError
            As ``get``.
        """
        if self._scales is None:
            raise TypeError(f"get_quantized needs an int8 cache; this one stores "
                            f"{self.dtype.name}: use get()")
        layer_idx = self._layer(layer_idx)
        rows, n = self._extent(layer_idx, row, pending)
        data, scales = self.arena[layer_idx], self.scales[layer_idx]
        turned = self._ring[rows]
        if turned.any():     # a sliding window's ring: positions in order, copied
            slots = self._slots(np.arange(n), turned[:, None])          # (rows, n)
            return tuple(read_only(np.take_along_axis(a[kv, rows], index, axis=2))
                         for kv in (0, 1)
                         for a, index in ((data, slots[:, None, :, None]),
                                          (scales, slots[:, None, :])))
        return (data[0, rows, :, :n], scales[0, rows, :, :n],
                data[1, rows, :, :n], scales[1, rows, :, :n])

    def _extent(self, layer_idx, row, pending):
        """``(rows, n)``: the slice of batch rows and the positions ``get`` returns."""
        T = self._pending[layer_idx] if check_bool("pending", pending) else 0
        if row is None:
            if not self._uniform:
                raise ValueError(f"row must be given when rows hold different lengths; "
                                 f"seq_lens = {self._seq_lens.tolist()}")
            return slice(None), self._seq_pos + T
        row = self._row("row", row)
        return slice(row, row + 1), int(self._seq_lens[row]) + T

    def _dequantized_get(self, layer_idx, row, pending):
        keys, key_scales, values, value_scales = self.get_quantized(layer_idx, row,
                                                                    pending=pending)
        return dequantize(keys, key_scales), dequantize(values, value_scales)

    def _adopt_scales(self):
        """The int8 parts of ``_adopt``: ``scales``, and ``caches`` that dequantize."""
        if self._scales is None:
            self.scales = None
            return
        self.scales = read_only(self._scales)
        self.caches = DequantizedLayers(self.arena, self.scales)

    def _to_quantize(self, name, a):
        """Keys or values ``a`` (checked) as the float32 C-contiguous, aligned
        rows that ``ArenaAccessor.store`` reads; every value must be finite."""
        if a.dtype == np.float32 and a.flags.c_contiguous and a.flags.aligned:   # per token
            rows = a
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                rows = np.require(a, np.float32, "CA")
        if rows is a and a.base is not None and self._in_storage(rows):
            rows = rows.copy()               # store would write what it reads
        # per token, the sum of squares first (one BLAS call, half the cost of
        # isfinite().all()): finite only if every value is; otherwise look closer
        if math.isfinite(np.vdot(rows, rows)):
            return rows
        finite = np.isfinite(rows)
        if not finite.all():
            source = a[~finite]
            if np.isfinite(source).any():    # finite, but beyond float32
                with np.errstate(invalid="ignore"):
                    big = np.abs(a[np.isfinite(a)]).max()
                raise ValueError(f"{name} has finite values up to {big:g}, beyond the "
                                 f"float32 range (max {np.finfo(np.float32).max:g}) that an "
                                 f"int8 cache quantizes from")
            raise ValueError(f"{name} contains NaN or infinity, which an int8 cache cannot "
                             f"store (each vector is kept as int8 times absmax / 127)")
        return rows

    def _store_rows(self, layer_idx, key, value):
        """int8 and float16: store key and value (B, H, T, D), float32
        C-contiguous, after each row's committed positions (int8 with their
        scales) by the kernel's row store: NumPy's float32 -> float16 cast
        took 2.8 ns an element here, the store about 0.1."""
        T = key.shape[2]
        if self._turned:     # a sliding window's ring: the slots of each row's positions
            slots = self._block_slots(T)
        elif T == 1:         # per token: the lengths themselves, as a (B, 1) view
            slots = self._seq_lens[:, np.newaxis]
        else:
            slots = self._seq_lens[:, np.newaxis] + np.arange(T, dtype=np.intp)   # (B, T)
        self._accessor.store(layer_idx, slots, key, value, kernel.current_isa())

    def _wipe_scales(self):
        # reset(): the scales of every written position, in the blocks that hold any
        used = self._scales[..., :self._written[0]]
        used[used.view(np.uint32).any(axis=-1)] = 0

    def _reorder_scales(self, idx, moved, end):
        # reorder(): as the data, one layer at a time through one temporary
        gathered = np.empty((2, moved.size, self.num_heads, end), self._scales.dtype)
        for layer in range(self.num_layers):
            block = self._scales[layer, :, :, :, :end]
            np.take(block, idx[moved], axis=1, out=gathered, mode="clip")
            block[:, moved] = gathered

    def __reduce_ex__(self, protocol):
        raise TypeError("a KVCache cannot be pickled (its arena may be large, or a mapped "
                        "file); use cache.save(path) and KVCache.load(path)")

    def __repr__(self):
        lengths = (f"seq_pos={self._seq_pos}" if self._uniform
                   else f"seq_lens={self._seq_lens.tolist()}")
        extra = "" if self.n_sink is None else f", n_sink={self.n_sink}"
        if self.rope_theta is not None:
            extra += f", rope_theta={self.rope_theta}, rope_style={self.rope_style!r}"
        extra += "" if self.path is None else f", path={self.path!r}"
        return (f"KVCache(batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.name}{extra}, {lengths})")


def largest_beyond(a, limit):
    """The largest finite magnitude in ``a`` if it exceeds ``limit``, else None.

    One compiled pass (``_arena.scan``); NumPy's reductions only when ``a``
    holds a NaN or an infinity, exceeds ``limit`` (for the error message's
    value) or is not an array the pass reads. With them every time,
    update() of one float32 token (12 heads of 64) into a float16 cache
    took 18.2 us; with the pass, 10.8 us (a float16 token: 4.6 us, no
    check needed).
    """
    if _arena.scan(a, float(limit)) == 0:
        return None
    with np.errstate(invalid="ignore"):
        big = np.abs(a[np.isfinite(a)]).max(initial=0)
    return big if big > limit else None


def overflow(position, max_seq_len):
    """TinyTorch's capacity message, which code written against TinyTorch matches on."""
    return f"Sequence position {position} >= max_seq_len {max_seq_len}"


def check_sinks(n_sink, max_seq_len):
    """``n_sink`` as None or an int in ``[0, max_seq_len)``."""
    if n_sink is None:
        return None
    n_sink = check_int("n_sink", n_sink)
    if not 0 <= n_sink < max_seq_len:
        raise ValueError(f"n_sink must be None or in [0, max_seq_len = {max_seq_len}); "
                         f"got {n_sink}")
    return n_sink


def dequantize(data, scales):
    """``data * scales[..., None]`` as a new read-only float32 ``CacheView``.

    ``data`` int8 (..., D) and ``scales`` float32 (...): the values that
    ``attend`` computes with, multiplied in float32 as the kernel does.
    """
    out = np.multiply(data, scales[..., np.newaxis], dtype=np.float32)
    return read_only(out)


class DequantizedLayers(Sequence):
    """``KVCache.caches`` of an int8 cache: per layer, ``(keys, values)`` as
    full-capacity ``(B, H, max_seq_len, D)`` float32 arrays, dequantized
    (copied) each time an item is read."""

    def __init__(self, arena, scales):
        self._arena, self._scales = arena, scales

    def __len__(self):
        return self._arena.shape[0]

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self))[layer]]
        layer = range(len(self))[layer]       # an int in range, or IndexError
        return (dequantize(self._arena[layer, 0], self._scales[layer, 0]),
                dequantize(self._arena[layer, 1], self._scales[layer, 1]))


def _overlaps_itself(a):
    """Whether two elements of ``a`` share memory (e.g. a stride of 0)."""
    axes = sorted((abs(s), n) for s, n in zip(a.strides, a.shape) if n > 1)
    extent = a.itemsize                # bytes spanned by the axes taken so far
    for stride, n in axes:
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False


ROPE_STYLES = ("half", "interleaved")


def check_rope_theta(rope_theta, also=""):
    """``rope_theta`` as a positive float: any real number (a ``Fraction``
    too) that is finite as a float; ``also`` names what else the caller
    takes, for the message."""
    theta = check_real("rope_theta", rope_theta, also)
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"rope_theta must be a finite number > 0; got {rope_theta!r:.80}")
    return theta


def check_rope(rope_theta, rope_style, head_dim):
    """``(rope_theta, rope_style)`` checked: ``(None, None)`` or a positive
    finite float and one of ``ROPE_STYLES`` (default "half")."""
    if rope_theta is None:
        if rope_style is not None:
            raise ValueError(f"rope_style needs rope_theta (rotation inside the cache); "
                             f"got rope_style={rope_style!r} with rope_theta=None")
        return None, None
    theta = check_rope_theta(rope_theta, "None or ")
    if rope_style is None:
        rope_style = "half"
    if rope_style not in ROPE_STYLES:
        raise ValueError(f"rope_style must be one of {ROPE_STYLES}; got {rope_style!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even with rope_theta (rotary pairs); "
                         f"got {head_dim}")
    return theta, rope_style


def rope_tables(rope_theta, max_seq_len, head_dim):
    """cos and sin of ``position * rope_theta ** (-2i / head_dim)``, float32
    C-contiguous ``(max_seq_len, head_dim // 2)`` each (computed in float64)."""
    freqs = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)     # (D/2,)
    angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * freqs  # (S, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def read_only(a):
    """``a`` as a read-only ``CacheView`` (no copy)."""
    view = a.view(CacheView)
    view.flags.writeable = False
    return view
