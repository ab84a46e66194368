"""The KV cache: one contiguous arena and the TinyTorch-compatible façade.

The arena is a single C-contiguous ndarray

    (num_layers, 2, batch_size, num_heads, max_seq_len, head_dim)

axis 1: 0 = keys, 1 = values. Every array the cache hands out is a view of
it. This module validates all input; ``kvarena._arena`` (pyx/_arena.pyx)
trusts what it is given and computes.
"""

import numpy as np

from kvarena.checks import as_ndarray, check_int, check_positive, check_storage_dtype
from kvarena.reference import attend_reference

try:
    from kvarena import _arena
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "kvarena's compiled extension kvarena._arena is missing. Build it "
        "from the project root with `pip install .` (or `make install` for "
        "an editable development build)."
    ) from exc

MIB = 1024 * 1024


class CacheView(np.ndarray):
    """A read-only ndarray view into the arena that also passes for a TinyTorch ``Tensor``.

    TinyTorch code reads ``tensor.data`` as an ndarray (``k.data[0, 0, 0, :]``);
    a plain ndarray's ``.data`` is a memoryview, so this subclass returns a
    plain ndarray view instead. Both share memory with the arena.
    """

    @property
    def data(self):
        return self.view(np.ndarray)


class KVCache:
    """Key/value cache for autoregressive decoding, held in one contiguous arena.

    Drop-in for ``tinytorch.generation.kv_cache.KVCache``: the same
    constructor, members and call protocol (``update`` every layer, then
    ``advance``), with zero-copy reads and a typed attention kernel.

    Parameters
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        Positive sizes of the cache.
    dtype : float16, float32 (default) or float64
        Storage type of the arena. Inputs are cast to it on write.
    lazy : bool, default False
        By default every page of the arena is written at construction, so
        the process holds the whole footprint from the start. ``lazy=True``
        leaves pages to the OS until first touched.
    num_threads : int, default 1
        Threads for the attention kernel; small problems run on one thread
        regardless. More threads pay off only for attention on its own over
        long contexts: inside a model whose matmuls use a threaded BLAS,
        OpenMP's spinning workers and BLAS's fight over the same cores (on
        2 cores, decoding with 2 kernel threads was up to 12x slower).
    check_finite : bool, default False
        Reject NaN and infinity in keys, values and queries.

    Attributes
    ----------
    seq_pos : int
        Committed length: how many positions ``get`` returns.
    caches : list of (CacheView, CacheView)
        Per layer, read-only full-capacity ``(B, H, max_seq_len, D)`` views.
    arena : CacheView
        Read-only view of the whole arena.

    Notes
    -----
    One cache is not safe to drive from two threads at once: the kernel
    shares one scratch buffer per cache. Separate caches are independent,
    and the kernel releases the GIL.
    """

    def __init__(self, batch_size, max_seq_len, num_layers, num_heads, head_dim,
                 *, dtype=np.float32, lazy=False, num_threads=1, check_finite=False):
        self.batch_size = check_positive("batch_size", batch_size)
        self.max_seq_len = check_positive("max_seq_len", max_seq_len)
        self.num_layers = check_positive("num_layers", num_layers)
        self.num_heads = check_positive("num_heads", num_heads)
        self.head_dim = check_positive("head_dim", head_dim)
        self.dtype = check_storage_dtype(dtype)
        self._compute_dtype = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)
        self.num_threads = check_positive("num_threads", num_threads)
        self.check_finite = bool(check_finite)

        shape = (self.num_layers, 2, self.batch_size, self.num_heads,
                 self.max_seq_len, self.head_dim)
        if lazy:
            arena = np.zeros(shape, dtype=self.dtype)   # calloc: pages come on first touch
        else:
            arena = np.empty(shape, dtype=self.dtype)
            arena.fill(0)                                # touch every page now
        self._arena = arena
        self._accessor = _arena.ArenaAccessor(arena, self.num_threads)
        self.arena = self._read_only(arena)
        self.caches = [(self.arena[layer, 0], self.arena[layer, 1])
                       for layer in range(self.num_layers)]
        self.seq_pos = 0
        # positions written since the last reset, committed or not: reset()
        # wipes [0, _written_end) so nothing of a previous sequence survives
        self._written_end = 0
        self._starts = np.zeros(self.batch_size, dtype=np.intp)

    # -- validation ----------------------------------------------------------

    def _layer(self, layer_idx):
        layer_idx = check_int("layer_idx", layer_idx)
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}); got {layer_idx}")
        return layer_idx

    def _block(self, name, x, T=None, dtype=None):
        """``x`` checked as (B, H, T, D) and returned C-contiguous in ``dtype``."""
        a = as_ndarray(x, name)
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must hold real floating-point values; got dtype {a.dtype}")
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != (B, H, D) \
                or (T is not None and a.shape[2] != T):
            t = "T" if T is None else T
            raise ValueError(f"{name} must have shape (batch_size, num_heads, T, head_dim) "
                             f"= ({B}, {H}, {t}, {D}); got {a.shape}")
        if a.shape[2] < 1:
            raise ValueError(f"{name} must hold at least one position (T >= 1); got T = 0")
        dtype = self.dtype if dtype is None else dtype
        if self.check_finite and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinity (check_finite=True)")
        if a.dtype.itemsize > dtype.itemsize:  # narrowing: finite values may overflow
            with np.errstate(invalid="ignore"):
                big = np.abs(a[np.isfinite(a)]).max(initial=0)
            if big > np.finfo(dtype).max:
                raise ValueError(f"{name} has finite values up to {big:g}, beyond the "
                                 f"{dtype} range (max {np.finfo(dtype).max:g})")
        return np.ascontiguousarray(a, dtype=dtype)

    def _room(self, name, T):
        if self.seq_pos + T > self.max_seq_len:
            raise ValueError(f"{name} holds T = {T} positions, but seq_pos {self.seq_pos} + T "
                             f"must not exceed max_seq_len = {self.max_seq_len}")

    def _read_only(self, a):
        view = a.view(CacheView)
        view.flags.writeable = False
        return view

    # -- the TinyTorch API ---------------------------------------------------

    def update(self, layer_idx, key, value):
        """Write ``key`` and ``value`` at positions ``seq_pos .. seq_pos + T - 1``.

        Does not advance: call ``advance(T)`` once every layer is updated.

        Parameters
        ----------
        layer_idx : int
            In ``[0, num_layers)``.
        key, value : array-like or Tensor, shape (batch_size, num_heads, T, head_dim)
            Any real float dtype; cast to the arena's dtype. ``T >= 1``.

        Raises
        ------
        TypeError, ValueError
            On a bad index, type, shape or capacity; the cache is unchanged.
        """
        layer_idx = self._layer(layer_idx)
        key = self._block("key", key)
        value = self._block("value", value, T=key.shape[2])
        self._room("key", key.shape[2])
        self._accessor.write(layer_idx, self._starts, key, value)
        self._written_end = max(self._written_end, self.seq_pos + key.shape[2])

    def get(self, layer_idx):
        """Cached keys and values of one layer.

        Returns
        -------
        keys, values : CacheView, shape (batch_size, num_heads, seq_pos, head_dim)
            Read-only views of the arena (no copy), in the arena's dtype.
        """
        key_view, value_view = self.caches[self._layer(layer_idx)]
        return key_view[:, :, :self.seq_pos], value_view[:, :, :self.seq_pos]

    def advance(self, n=1):
        """Commit ``n`` more positions (after every layer has been updated)."""
        n = check_positive("n", n)
        if self.seq_pos + n > self.max_seq_len:
            raise ValueError(f"n = {n} would advance seq_pos {self.seq_pos} past "
                             f"max_seq_len = {self.max_seq_len}")
        self.seq_pos += n
        self._starts.fill(self.seq_pos)

    def reset(self):
        """Forget the sequence: ``seq_pos = 0`` and every written position zeroed.

        Only the positions written since the last reset are cleared, so the
        cost is proportional to what was used, not to the arena.
        """
        self._arena[..., :self._written_end, :] = 0
        self._written_end = 0
        self.seq_pos = 0
        self._starts.fill(0)

    def get_memory_usage(self):
        """Memory held by the arena, from its real size and dtype.

        Returns
        -------
        dict
            ``total_bytes``, ``total_mb`` (MiB), ``per_layer_mb``,
            ``cache_tensors`` (2 per layer), ``total_elements``, ``used_mb``
            (the committed ``seq_pos`` positions), ``utilization``
            (``seq_pos / max_seq_len``) and ``dtype`` (its name).
        """
        total_bytes = self._arena.nbytes
        return {
            "total_bytes": total_bytes,
            "total_mb": total_bytes / MIB,
            "per_layer_mb": total_bytes / MIB / self.num_layers,
            "cache_tensors": 2 * self.num_layers,
            "total_elements": self._arena.size,
            "used_mb": total_bytes * self.seq_pos / self.max_seq_len / MIB,
            "utilization": self.seq_pos / self.max_seq_len,
            "dtype": self.dtype.name,
        }

    # -- beyond TinyTorch ----------------------------------------------------

    def attend(self, layer_idx, q, k, v):
        """Write ``k``, ``v`` and return the attention of ``q`` over the cache.

        Query ``t`` attends to every cached position and to the new ones up
        to its own (``0 .. seq_pos + t``): causal within the new block. Like
        ``update``, this does not advance.

        Parameters
        ----------
        layer_idx : int
            In ``[0, num_layers)``.
        q, k, v : array-like or Tensor, shape (batch_size, num_heads, T, head_dim)
            Queries, and the keys and values of the same T new positions.

        Returns
        -------
        ndarray, shape (batch_size, num_heads, T, head_dim)
            A new array; float64 for a float64 arena, float32 otherwise.

        Raises
        ------
        TypeError, ValueError
            As ``update``, also for ``q``; the cache is unchanged.
        """
        layer_idx = self._layer(layer_idx)
        key = self._block("k", k)
        T = key.shape[2]
        value = self._block("v", v, T=T)
        query = self._block("q", q, T=T, dtype=self._compute_dtype)
        self._room("k", T)
        if self.dtype == np.float16:
            # no C type for float16: write through the accessor, attend in
            # NumPy, computing in float32
            self._accessor.write(layer_idx, self._starts, key, value)
            keys = self._arena[layer_idx, 0, :, :, :self.seq_pos + T]
            values = self._arena[layer_idx, 1, :, :, :self.seq_pos + T]
            out = attend_reference(query, keys, values, self._starts, dtype=np.float32)
        else:
            out = np.empty_like(query)
            self._accessor.attend(layer_idx, self._starts, query, key, value, out)
        self._written_end = max(self._written_end, self.seq_pos + T)
        return out

    def __repr__(self):
        return (f"KVCache(batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.name}, seq_pos={self.seq_pos})")
