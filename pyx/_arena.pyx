"""Typed access to the kvarena arena: attention and in-place moves.

Everything here trusts its caller. ``kvarena.cache.KVCache`` validates every
index, shape, dtype, stride and capacity before calling in; with bounds
checks off (the release build) a bad index here corrupts memory instead of
raising. The debug build (KVARENA_CYTHON_DEBUG=1) re-checks the full extent
of every access and raises IndexError.

Legend, used in every shape below:
    L  layers          B  batch rows      H  key/value heads
    S  max_seq_len     D  head_dim        T  new positions in this call
    G  query heads per key/value head (Hq = G * H)
The arena is (L, 2, B, H, S, D), C-contiguous; axis 1: 0 = keys, 1 = values.
The kernel itself is C: pyx/kernel.h (and kernel_impl.h, pool.h).
"""

cimport numpy as cnp
from libc.string cimport memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #ifndef KVARENA_BOUNDSCHECK
    #define KVARENA_BOUNDSCHECK 0
    #endif
    """
    int KVARENA_BOUNDSCHECK

cdef extern from "kernel.h" nogil:
    enum:
        KV_F16, KV_F32, KV_F64, KV_I8
    ctypedef struct kv_layer:
        int dtype
        const void *data[2]
        const float *scale[2]
        Py_ssize_t B, H, S, D
        Py_ssize_t n_sink
        const Py_ssize_t *ring_head
        const float *rope_cos
        const float *rope_sin
        int rope_interleaved
    ctypedef struct kv_query:
        const void *q
        void *out
        Py_ssize_t qs[4]
        Py_ssize_t os[4]
        int q_f64, out_f64
        Py_ssize_t Hq, T
        const Py_ssize_t *base
    int kv_attend(const kv_layer *c, const kv_query *q, int isa, int plan_threads,
                  int run_threads)
    int kv_best_isa()
    void kv_quantize(const float *rows, signed char *data, float *scale, const Py_ssize_t *slots,
                     Py_ssize_t B, Py_ssize_t H, Py_ssize_t S, Py_ssize_t D, Py_ssize_t T,
                     int isa)

#: True when this extension was built with KVARENA_CYTHON_DEBUG=1.
BOUNDSCHECK = bool(KVARENA_BOUNDSCHECK)

#: Instruction sets the kernel is compiled for, narrowest first; the index is the code.
ISA_NAMES = ("baseline", "avx2", "avx512")

#: The widest instruction set this CPU runs (an index into ISA_NAMES).
BEST_ISA = kv_best_isa()

_STORAGE_CODES = {np.dtype(np.float16): KV_F16, np.dtype(np.float32): KV_F32,
                  np.dtype(np.float64): KV_F64, np.dtype(np.int8): KV_I8}

# below this many bytes of K and V a call runs on one thread: waking a
# worker costs about as much as it saves (bench/kernel.py)
cdef Py_ssize_t PARALLEL_MIN_BYTES = 1 << 18
# every this many calls, an accessor with num_threads > 1 runs on the thread
# count it currently thinks slower, to follow changes in contention
cdef Py_ssize_t EXPLORE_EVERY = 16


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec


cdef class ArenaAccessor:
    """Typed view of one arena.

    Caller guarantees: ``arena`` is C-contiguous, 6-d (L, 2, B, H, S, D), of
    a native-order float16/float32/float64 or int8 dtype; for int8,
    ``scales`` is float32 (L, 2, B, H, S), C-contiguous, one per stored row;
    ``num_threads >= 1``.
    """

    cdef readonly object arena, scales
    cdef unsigned char[:, :, :, :, :, ::1] raw   # (L, 2, B, H, S, D * itemsize)
    cdef float[:, :, :, :, ::1] scale            # (L, 2, B, H, S), int8 arenas only
    cdef int storage
    cdef Py_ssize_t L, B, H, S, D, itemsize
    cdef readonly int num_threads
    # seconds per byte of K and V measured on 1 thread ([0]) and on
    # num_threads ([1]), smoothed; 0 until measured. Next to a threaded BLAS
    # whose idle workers spin, more threads can be slower than one: the
    # accessor runs the count that has been faster lately
    cdef double seconds_per_byte[2]
    cdef Py_ssize_t timed_calls
    cdef int warmed[2]            # the first call of each count starts threads: not timed

    def __cinit__(self, arena, int num_threads, scales=None):
        self.arena = arena
        self.scales = scales
        self.num_threads = num_threads
        self.raw = arena.view(np.uint8)
        self.storage = _STORAGE_CODES[arena.dtype]
        self.L, _, self.B, self.H, self.S, self.D = arena.shape
        self.itemsize = arena.dtype.itemsize
        if (scales is not None) != (self.storage == KV_I8) or \
                (scales is not None and scales.shape != arena.shape[:5]):
            raise ValueError(f"scales must be float32 {arena.shape[:5]} for an int8 arena, "
                             f"and None otherwise; got "
                             f"{None if scales is None else scales.shape} for {arena.dtype}")
        if scales is not None:
            self.scale = scales

    def attend(self, Py_ssize_t layer, cnp.ndarray base, cnp.ndarray q,
               cnp.ndarray out, int isa, const Py_ssize_t[::1] ring_head=None,
               Py_ssize_t n_sink=0, const float[:, ::1] rope_cos=None,
               const float[:, ::1] rope_sin=None, bint rope_interleaved=False):
        """Attention of ``q`` over ``layer`` into ``out``.

        q and out are (B, Hq, T, D), Hq = G * H; query head h attends with
        K/V head h // G. Query t of row b sees positions 0 .. base[b] + t:
        the row's cached positions, then causal within the new block (whose
        keys and values the caller has written at base[b] ..). Positions
        are logical: with ``ring_head``, row b keeps n_sink sinks in slots
        [0, n_sink) and a ring after them whose oldest position is in slot
        n_sink + ring_head[b]. With ``rope_cos``/``rope_sin`` (S, D / 2),
        keys and queries are rotated by their logical positions.

        Caller checked: 0 <= layer < L; base is C-contiguous intp (B,);
        q and out are float32 or float64, native order, 4-d, with strides
        that are multiples of their itemsize; out is writable and overlaps
        neither q nor the arena; Hq is a multiple of H; base[b] + T <= S;
        0 <= isa <= BEST_ISA; 0 <= ring_head[b] < S - n_sink; rope tables
        (S, D / 2), D even.
        """
        cdef kv_layer c
        cdef kv_query qq
        cdef Py_ssize_t i, b, work, tile
        cdef int status, threads
        cdef const Py_ssize_t *starts = <const Py_ssize_t *>cnp.PyArray_DATA(base)
        c.dtype = self.storage
        c.B, c.H, c.S, c.D = self.B, self.H, self.S, self.D
        c.data[0] = &self.raw[layer, 0, 0, 0, 0, 0]
        c.data[1] = &self.raw[layer, 1, 0, 0, 0, 0]
        c.scale[0] = c.scale[1] = NULL
        if self.scales is not None:
            c.scale[0] = &self.scale[layer, 0, 0, 0, 0]
            c.scale[1] = &self.scale[layer, 1, 0, 0, 0]
        # the options are checked in every build: O(B), and a wrong one
        # would send the kernel outside the arena or its tables
        self._check_options(isa, q, out, base, ring_head, n_sink, rope_cos, rope_sin)
        c.n_sink = n_sink
        c.ring_head = NULL
        if ring_head is not None:
            c.ring_head = &ring_head[0]
        c.rope_cos = c.rope_sin = NULL
        if rope_cos is not None:
            c.rope_cos, c.rope_sin = &rope_cos[0, 0], &rope_sin[0, 0]
        c.rope_interleaved = rope_interleaved
        qq.q = cnp.PyArray_DATA(q)
        qq.out = cnp.PyArray_DATA(out)
        qq.q_f64 = cnp.PyArray_ITEMSIZE(q) == 8
        qq.out_f64 = cnp.PyArray_ITEMSIZE(out) == 8
        for i in range(4):
            qq.qs[i] = cnp.PyArray_STRIDES(q)[i] // cnp.PyArray_ITEMSIZE(q)
            qq.os[i] = cnp.PyArray_STRIDES(out)[i] // cnp.PyArray_ITEMSIZE(out)
        qq.Hq, qq.T = cnp.PyArray_DIMS(q)[1], cnp.PyArray_DIMS(q)[2]
        qq.base = starts
        if KVARENA_BOUNDSCHECK:
            _check_extent(c, qq, q, out, base, layer, self.L)
        work = 0
        for b in range(c.B):
            work += starts[b] + qq.T
        work *= 2 * c.H * c.D * self.itemsize
        # each tile of queries reads K and V again (kv_attend: 64 queries a tile)
        tile = max(1, 64 // (qq.Hq // c.H))
        work *= (qq.T + tile - 1) // tile
        if work < PARALLEL_MIN_BYTES or self.num_threads == 1:
            with nogil:   # small calls are neither split nor spread
                status = kv_attend(&c, &qq, isa, 1, 1)
        else:
            status = self._attend_timed(&c, &qq, isa, work)
        if status != 0:
            raise MemoryError("kvarena: no memory for the attention kernel's scratch")

    cdef _check_options(self, int isa, cnp.ndarray q, cnp.ndarray out, cnp.ndarray base,
                        const Py_ssize_t[::1] ring_head, Py_ssize_t n_sink,
                        const float[:, ::1] rope_cos, const float[:, ::1] rope_sin):
        cdef Py_ssize_t b, window = self.S - n_sink
        if not 0 <= isa <= BEST_ISA:
            raise ValueError(f"isa must be in [0, {BEST_ISA}] (kernel_info()['isas']); got {isa}")
        if cnp.PyArray_NDIM(q) != 4 or cnp.PyArray_NDIM(out) != 4 \
                or base.shape[0] != self.B or base.dtype != np.intp:
            raise ValueError(f"q and out must be 4-d, base intp ({self.B},); got q "
                             f"{(<object>q).shape}, out {(<object>out).shape}, base "
                             f"{(<object>base).shape} {base.dtype}")
        if ring_head is not None:
            if not 0 <= n_sink < self.S or ring_head.shape[0] != self.B:
                raise ValueError(f"ring_head must have {self.B} entries and n_sink be in "
                                 f"[0, {self.S}); got {ring_head.shape[0]} and {n_sink}")
            for b in range(self.B):
                if not 0 <= ring_head[b] < window:
                    raise ValueError(f"ring_head[{b}] must be in [0, {window}); "
                                     f"got {ring_head[b]}")
        if (rope_cos is None) != (rope_sin is None):
            raise ValueError("rope_cos and rope_sin go together")
        if rope_cos is not None and (self.D % 2 or
                                     rope_cos.shape[0] != self.S or rope_sin.shape[0] != self.S or
                                     rope_cos.shape[1] != self.D // 2 or
                                     rope_sin.shape[1] != self.D // 2):
            raise ValueError(f"rope tables must be ({self.S}, {self.D // 2}) with an even "
                             f"head_dim {self.D}")

    cdef int _attend_timed(self, const kv_layer *c, const kv_query *q, int isa, Py_ssize_t work):
        # the thread count that has been faster per byte, or now and then the other
        cdef int many = self.seconds_per_byte[1] <= self.seconds_per_byte[0]
        cdef int status
        cdef double start, rate
        if self.timed_calls % EXPLORE_EVERY == EXPLORE_EVERY - 1:
            many = not many
        with nogil:
            start = _now()
            status = kv_attend(c, q, isa, self.num_threads, self.num_threads if many else 1)
            rate = (_now() - start) / work
        if not self.warmed[many]:
            self.warmed[many] = 1
        elif self.seconds_per_byte[many] == 0:
            self.seconds_per_byte[many] = rate
        else:
            self.seconds_per_byte[many] = 0.75 * self.seconds_per_byte[many] + 0.25 * rate
        self.timed_calls += 1
        return status

    def thread_rates(self):
        """Smoothed seconds per byte of K and V measured on (1, num_threads) threads."""
        return self.seconds_per_byte[0], self.seconds_per_byte[1]

    def quantize(self, Py_ssize_t layer, const Py_ssize_t[:, ::1] slots,
                 const float[:, :, :, ::1] key, const float[:, :, :, ::1] value, int isa):
        """int8 arenas: store key and value (B, H, T, D) of ``layer``, row b's
        position t at slot slots[b, t], as int8 with one absmax / 127 scale per
        row, on instruction set ``isa`` (checked: 0 <= isa <= BEST_ISA).

        Caller checked: 0 <= layer < L; the arena is int8; key and value
        are float32, C-contiguous, (B, H, T, D) and finite (what a NaN or
        infinity becomes differs between instruction sets); slots is
        (B, T), in [0, S).
        """
        cdef Py_ssize_t B = key.shape[0], H = key.shape[1], T = key.shape[2], D = key.shape[3]
        cdef Py_ssize_t S = self.raw.shape[4], b, t
        # shapes in every build (a mismatch would write outside the arena)
        if self.scales is None or B != self.B or H != self.H or D != self.D \
                or value.shape[0] != B or value.shape[1] != H or value.shape[2] != T \
                or value.shape[3] != D or slots.shape[0] != B or slots.shape[1] != T:
            raise ValueError(f"quantize: an int8 arena and key, value ({self.B}, {self.H}, T, "
                             f"{self.D}) with slots (B, T) are needed; got key "
                             f"{(<object>key).shape}, value {(<object>value).shape}, slots "
                             f"{(<object>slots).shape}, storage {self.arena.dtype}")
        if not 0 <= isa <= BEST_ISA:
            raise ValueError(f"isa must be in [0, {BEST_ISA}] (kernel_info()['isas']); got {isa}")
        if KVARENA_BOUNDSCHECK:
            if not 0 <= layer < self.raw.shape[0]:
                raise IndexError(f"quantize: layer {layer} out of [0, {self.raw.shape[0]}) "
                                 f"or not an int8 arena")
            for b in range(B):
                for t in range(T):
                    if not 0 <= slots[b, t] < S:
                        raise IndexError(f"quantize: slot {slots[b, t]} out of [0, {S})")
        with nogil:
            kv_quantize(&key[0, 0, 0, 0], <signed char *>&self.raw[layer, 0, 0, 0, 0, 0],
                        &self.scale[layer, 0, 0, 0, 0], &slots[0, 0], B, H, S, D, T, isa)
            kv_quantize(&value[0, 0, 0, 0], <signed char *>&self.raw[layer, 1, 0, 0, 0, 0],
                        &self.scale[layer, 1, 0, 0, 0], &slots[0, 0], B, H, S, D, T, isa)

    def move(self, const Py_ssize_t[::1] src, const Py_ssize_t[::1] dst,
             const Py_ssize_t[::1] count):
        """In row b, move positions src[b] .. src[b] + count[b] - 1 to dst[b] onwards.

        Every layer, keys and values, every head; the ranges may overlap.

        Caller checked: src, dst, count have length B; count[b] >= 0 and
        src[b] + count[b] <= S and dst[b] + count[b] <= S for all b.
        """
        cdef Py_ssize_t layer, kv, b, h, S = self.raw.shape[4]
        cdef Py_ssize_t row_bytes = self.raw.shape[5]
        if KVARENA_BOUNDSCHECK:
            for b in range(self.raw.shape[2]):
                if count[b] < 0 or src[b] < 0 or dst[b] < 0 \
                        or src[b] + count[b] > S or dst[b] + count[b] > S:
                    raise IndexError(f"move: row {b} range out of bounds")
        with nogil:
            for layer in range(self.raw.shape[0]):
                for kv in range(2):
                    for b in range(self.raw.shape[2]):
                        if count[b] == 0 or src[b] == dst[b]:
                            continue
                        for h in range(self.raw.shape[3]):
                            memmove(&self.raw[layer, kv, b, h, dst[b], 0],
                                    &self.raw[layer, kv, b, h, src[b], 0],
                                    count[b] * row_bytes)


cdef _check_extent(kv_layer c, kv_query qq, q, out, base, Py_ssize_t layer, Py_ssize_t L):
    # the debug build's re-check of everything the kernel will touch
    cdef Py_ssize_t b
    if not 0 <= layer < L:
        raise IndexError(f"attend: layer {layer} out of [0, {L})")
    if base.dtype != np.intp or not base.flags.c_contiguous or base.shape != (c.B,):
        raise IndexError(f"attend: base must be C-contiguous intp of shape ({c.B},)")
    if qq.Hq % c.H or q.shape[0] != c.B or q.shape[3] != c.D \
            or out.shape != q.shape:
        raise IndexError(f"attend: q {q.shape} / out {out.shape} do not fit the arena")
    for b in range(c.B):
        if base[b] < 0 or base[b] + qq.T > c.S:
            raise IndexError(f"attend: row {b} positions [0, {base[b] + qq.T}) "
                             f"out of [0, {c.S})")
    for a in (q, out):
        if any(s % a.dtype.itemsize for s in a.strides) or a.dtype.itemsize not in (4, 8):
            raise IndexError("attend: q or out has an unaligned stride or a bad dtype")
