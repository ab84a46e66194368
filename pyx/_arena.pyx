"""Typed access to the kvarena arena: block writes and decode attention.

Everything here trusts its caller. ``kvarena.cache.KVCache`` validates every
index, shape, dtype and capacity before calling in; with bounds checks off
(the release build) a bad index here corrupts memory instead of raising.

Legend, used in every shape below:
    L  layers          B  batch rows      H  heads
    S  max_seq_len     D  head_dim        T  new positions in this call
The arena is (L, 2, B, H, S, D), C-contiguous; axis 1: 0 = keys, 1 = values.
"""

cimport cython
from cython.parallel cimport prange
from libc.math cimport exp, expf, sqrt
from libc.string cimport memcpy, memmove

import numpy as np

cdef extern from *:
    """
    #ifndef KVARENA_BOUNDSCHECK
    #define KVARENA_BOUNDSCHECK 0
    #endif
    """
    int KVARENA_BOUNDSCHECK

#: True when this extension was built with KVARENA_CYTHON_DEBUG=1.
BOUNDSCHECK = bool(KVARENA_BOUNDSCHECK)

# below this many multiply-adds a call runs on one thread: waking the
# OpenMP team costs more than it saves
cdef Py_ssize_t PARALLEL_MIN_WORK = 1 << 16


cdef class ArenaAccessor:
    """Typed view of one arena; owns the attention scratch buffer.

    Caller guarantees: ``arena`` is C-contiguous, 6-d, of a native-order
    float16/float32/float64 dtype, and outlives nothing it is not kept
    alive by (this object holds a reference).
    """

    cdef readonly object arena
    cdef unsigned char[:, :, :, :, :, ::1] raw   # (L, 2, B, H, S, D * itemsize)
    cdef float[:, :, :, :, :, ::1] arena32
    cdef double[:, :, :, :, :, ::1] arena64
    cdef float[:, ::1] scratch32                 # (B * H, S) softmax weights
    cdef double[:, ::1] scratch64
    cdef readonly bint is_double
    cdef readonly int num_threads

    def __cinit__(self, arena, int num_threads):
        # caller checked: arena as above, num_threads >= 1
        self.arena = arena
        self.num_threads = num_threads
        shape = arena.shape
        self.raw = arena.view(np.uint8)
        self.is_double = arena.dtype == np.float64
        scratch_shape = (shape[2] * shape[3], shape[4])
        if self.is_double:
            self.arena64 = arena
            self.scratch64 = np.empty(scratch_shape, dtype=np.float64)
        else:
            if arena.dtype == np.float32:
                self.arena32 = arena
            # float16 arenas have no typed view: attention for them runs
            # in NumPy (kvarena.reference); only writes come through here
            self.scratch32 = np.empty(scratch_shape, dtype=np.float32)

    def write(self, Py_ssize_t layer, const Py_ssize_t[::1] start,
              key, value):
        """Copy key/value blocks (B, H, T, D) into ``layer`` at ``start[b]``.

        Caller checked: 0 <= layer < L; key and value are C-contiguous, of
        the arena's dtype, shaped (B, H, T, D); start[b] + T <= S for all b.
        """
        cdef const unsigned char[:, :, :, ::1] k = _as_bytes(key)
        cdef const unsigned char[:, :, :, ::1] v = _as_bytes(value)
        with nogil:
            _write_block(self.raw, layer, 0, start, k)
            _write_block(self.raw, layer, 1, start, v)

    def move(self, const Py_ssize_t[::1] src, const Py_ssize_t[::1] dst,
             const Py_ssize_t[::1] count):
        """In row b, move positions src[b] .. src[b] + count[b] - 1 to dst[b] onwards.

        Every layer, keys and values, every head; the ranges may overlap.

        Caller checked: src, dst, count have length B; count[b] >= 0 and
        src[b] + count[b] <= S and dst[b] + count[b] <= S for all b.
        """
        with nogil:
            _move_rows(self.raw, src, dst, count)

    def attend(self, Py_ssize_t layer, const Py_ssize_t[::1] cached,
               q, key, value, out):
        """Write ``key``, ``value`` at ``cached[b]``, then attend ``q`` into ``out``.

        All four are (B, H, T, D). Query t of row b sees positions
        0 .. cached[b] + t: every cached position, then causal within the
        new block.

        Caller checked: 0 <= layer < L; the arena is float32 or float64;
        q, key, value and out are C-contiguous, (B, H, T, D), of the
        arena's dtype; cached[b] + T <= S for all b.
        """
        cdef int threads = self._threads_for(q.shape, cached)
        if self.is_double:
            _attend64(self, layer, cached, q, key, value, out, threads)
        else:
            _attend32(self, layer, cached, q, key, value, out, threads)

    cdef int _threads_for(self, tuple q_shape, const Py_ssize_t[::1] cached):
        cdef Py_ssize_t b, longest = 0
        for b in range(cached.shape[0]):
            longest = max(longest, cached[b])
        cdef Py_ssize_t rows = q_shape[0] * q_shape[1]
        cdef Py_ssize_t work = rows * q_shape[2] * (longest + q_shape[2]) * q_shape[3]
        if work < PARALLEL_MIN_WORK:
            return 1
        return <int>min(<Py_ssize_t>self.num_threads, rows)


cdef _attend32(ArenaAccessor acc, Py_ssize_t layer, const Py_ssize_t[::1] cached,
               const float[:, :, :, ::1] q, const float[:, :, :, ::1] key,
               const float[:, :, :, ::1] value, float[:, :, :, ::1] out, int threads):
    with nogil:
        _write_and_attend(acc.arena32, layer, cached, q, key, value,
                          acc.scratch32, out, threads)


cdef _attend64(ArenaAccessor acc, Py_ssize_t layer, const Py_ssize_t[::1] cached,
               const double[:, :, :, ::1] q, const double[:, :, :, ::1] key,
               const double[:, :, :, ::1] value, double[:, :, :, ::1] out, int threads):
    with nogil:
        _write_and_attend(acc.arena64, layer, cached, q, key, value,
                          acc.scratch64, out, threads)


cdef inline const unsigned char[:, :, :, ::1] _as_bytes(block):
    # a (B, H, T, D) array seen as (B, H, T, D * itemsize) bytes: zero-copy
    return block.view(np.uint8)


# the two writes index the arena first: declared ``except -1`` so that a
# checked build (KVARENA_CYTHON_DEBUG=1) raises IndexError for a bad layer
# or position instead of printing it and carrying on
cdef int _write_block(
        unsigned char[:, :, :, :, :, ::1] raw,   # OUT (L, 2, B, H, S, D * itemsize)
        Py_ssize_t layer,
        Py_ssize_t kv,                            # 0 = keys, 1 = values
        const Py_ssize_t[::1] start,              # IN  (B,)
        const unsigned char[:, :, :, ::1] block,  # IN  (B, H, T, D * itemsize)
        ) except -1 nogil:
    cdef Py_ssize_t b, h
    cdef Py_ssize_t T = block.shape[2], row_bytes = block.shape[3]
    for b in range(block.shape[0]):
        for h in range(block.shape[1]):
            # positions start[b] .. start[b] + T - 1 are adjacent in the arena
            memcpy(&raw[layer, kv, b, h, start[b], 0], &block[b, h, 0, 0],
                   T * row_bytes)
    return 0


cdef int _move_rows(
        unsigned char[:, :, :, :, :, ::1] raw,   # IN/OUT (L, 2, B, H, S, D * itemsize)
        const Py_ssize_t[::1] src,                # IN  (B,)
        const Py_ssize_t[::1] dst,                # IN  (B,)
        const Py_ssize_t[::1] count,              # IN  (B,)
        ) except -1 nogil:
    cdef Py_ssize_t layer, kv, b, h, row_bytes = raw.shape[5]
    for layer in range(raw.shape[0]):
        for kv in range(2):
            for b in range(raw.shape[2]):
                if count[b] == 0 or src[b] == dst[b]:
                    continue
                for h in range(raw.shape[3]):
                    memmove(&raw[layer, kv, b, h, dst[b], 0],
                            &raw[layer, kv, b, h, src[b], 0],
                            count[b] * row_bytes)
    return 0


cdef int _write_and_attend(
        cython.floating[:, :, :, :, :, ::1] arena,  # IN/OUT (L, 2, B, H, S, D)
        Py_ssize_t layer,
        const Py_ssize_t[::1] cached,               # IN  (B,)
        const cython.floating[:, :, :, ::1] q,      # IN  (B, H, T, D)
        const cython.floating[:, :, :, ::1] key,    # IN  (B, H, T, D)
        const cython.floating[:, :, :, ::1] value,  # IN  (B, H, T, D)
        cython.floating[:, ::1] scratch,            # SCRATCH (B * H, S)
        cython.floating[:, :, :, ::1] out,          # OUT (B, H, T, D)
        int num_threads) except -1 nogil:
    cdef Py_ssize_t b, h
    cdef Py_ssize_t T = q.shape[2], row_bytes = q.shape[3] * sizeof(cython.floating)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            memcpy(&arena[layer, 0, b, h, cached[b], 0], &key[b, h, 0, 0], T * row_bytes)
            memcpy(&arena[layer, 1, b, h, cached[b], 0], &value[b, h, 0, 0], T * row_bytes)
    _attend(arena, layer, cached, q, scratch, out, num_threads)
    return 0


cdef void _attend(
        const cython.floating[:, :, :, :, :, ::1] arena,  # IN  (L, 2, B, H, S, D)
        Py_ssize_t layer,
        const Py_ssize_t[::1] cached,                     # IN  (B,)
        const cython.floating[:, :, :, ::1] q,            # IN  (B, H, T, D)
        cython.floating[:, ::1] scratch,                  # SCRATCH (B * H, S)
        cython.floating[:, :, :, ::1] out,                # OUT (B, H, T, D)
        int num_threads) noexcept nogil:
    cdef Py_ssize_t H = q.shape[1], T = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t bh, b, h, t, j, d, n
    cdef cython.floating scale = <cython.floating>(1.0 / sqrt(<double>D))
    cdef cython.floating score, best, weight
    cdef double total
    cdef cython.floating* w
    cdef const cython.floating* key
    cdef const cython.floating* val
    cdef const cython.floating* query
    cdef cython.floating* o

    for bh in prange(q.shape[0] * H, nogil=True, schedule='static',
                     num_threads=num_threads):
        b = bh // H
        h = bh % H
        w = &scratch[bh, 0]
        for t in range(T):
            # iterate over all cached positions and the new ones up to t
            n = cached[b] + t + 1
            query = &q[b, h, t, 0]

            # 1. scores: q . k_j / sqrt(D), tracking the maximum
            best = -1.0
            for j in range(n):
                key = &arena[layer, 0, b, h, j, 0]
                score = 0
                for d in range(D):
                    score = score + query[d] * key[d]
                score = score * scale
                w[j] = score
                if j == 0 or score > best:
                    best = score

            # 2. softmax weights, max-subtracted for stability
            total = 0
            for j in range(n):
                if cython.floating is float:
                    weight = expf(w[j] - best)
                else:
                    weight = exp(w[j] - best)
                w[j] = weight
                total = total + weight

            # 3. weighted sum of values into a zeroed output row
            o = &out[b, h, t, 0]
            for d in range(D):
                o[d] = 0
            for j in range(n):
                val = &arena[layer, 1, b, h, j, 0]
                weight = w[j]
                for d in range(D):
                    o[d] = o[d] + weight * val[d]
            weight = <cython.floating>(1.0 / total)
            for d in range(D):
                o[d] = o[d] * weight
