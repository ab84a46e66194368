"""Typed access to the kvarena arena: attention and in-place moves.

Every entry point checks, in every build, what would send the kernel or a
copy outside the memory it was given: indices, lengths, shapes, dtypes,
alignment, overlaps (O(B x T) a call; called from Python, nothing here may
crash the process). Index arrays (positions, slots, ring heads, ranges) are
copied before they are checked, and the copies used: the arrays they come
from may share memory with what the call writes, or be changed by another
thread while the kernel runs without the GIL. What the values mean (lengths
as a cache keeps them, finite keys) is ``kvarena.cache.KVCache``'s to check,
before it calls in. The debug build (KVARENA_CYTHON_DEBUG=1) also
bounds-checks every typed memoryview index.

Legend, used in every shape below:
    L  layers          B  batch rows      H  key/value heads
    S  max_seq_len     D  head_dim        T  new positions in this call
    G  query heads per key/value head (Hq = G * H)
The arena is (L, 2, B, H, S, D), C-contiguous; axis 1: 0 = keys, 1 = values.
The kernel itself is C: pyx/kernel.h (and kernel_impl.h, pool.h).
"""

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.float cimport FLT_MAX
from libc.math cimport INFINITY, fabs, isfinite, ldexp
from libc.string cimport memcmp, memcpy, memmove

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
        void *data[2]
        float *scale[2]
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
        const kv_new *new_rows
    ctypedef struct kv_new:
        const void *rows[2]
        Py_ssize_t stride[2][4]
        int as_stored[2]
    int kv_attend(const kv_layer *c, const kv_query *q, int isa, int plan_threads,
                  int run_threads, int large)
    int kv_best_isa()
    long long kv_nanoseconds()
    Py_ssize_t kv_ask_from
    Py_ssize_t KV_ASK_FROM_BYTES
    Py_ssize_t kv_stream_from
    Py_ssize_t KV_STREAM_FROM_BYTES
    int kv_prefetch_helps()
    void kv_store(const kv_layer *c, int kv, const float *x, const Py_ssize_t *xs,
                  const Py_ssize_t *slots, Py_ssize_t T, int isa)

#: True when this extension was built with KVARENA_CYTHON_DEBUG=1.
BOUNDSCHECK = bool(KVARENA_BOUNDSCHECK)

#: Instruction sets the kernel is compiled for, narrowest first; the index is the code.
ISA_NAMES = ("baseline", "avx2", "avx512")

#: The widest instruction set this CPU runs (an index into ISA_NAMES).
BEST_ISA = kv_best_isa()

#: Whether the kernel asks for the next block's rows ahead on this CPU by default.
PREFETCH_HELPS = bool(kv_prefetch_helps())
#: How many bytes of K and V a call reads, by default, before it asks.
ASK_FROM_BYTES = KV_ASK_FROM_BYTES
#: How many bytes of K and V a call reads, by default, before it streams.
STREAM_FROM_BYTES = KV_STREAM_FROM_BYTES


def set_read_bounds(Py_ssize_t ask_from, Py_ssize_t stream_from):
    """Make later kernel calls that read at least ``ask_from`` bytes of K
    and V ask for each next block ahead, and those that read at least
    ``stream_from``, with at most two queries per K/V row and float32 or
    float64 storage, stream instead (kernel.h's kv_ask_from,
    kv_stream_from); -1: no call."""
    global kv_ask_from, kv_stream_from
    for name, value in (("ask_from", ask_from), ("stream_from", stream_from)):
        if value < -1:
            raise ValueError(f"{name} must be -1 or at least 0; got {value}")
    kv_ask_from, kv_stream_from = ask_from, stream_from


def read_bounds():
    """(ask_from, stream_from): the bytes of K and V from which kernel calls
    ask ahead, and stream; -1: none do."""
    return kv_ask_from, kv_stream_from


set_read_bounds(ASK_FROM_BYTES if PREFETCH_HELPS else -1,
                STREAM_FROM_BYTES if PREFETCH_HELPS else -1)

_STORAGE_CODES = {np.dtype(np.float16): KV_F16, np.dtype(np.float32): KV_F32,
                  np.dtype(np.float64): KV_F64, np.dtype(np.int8): KV_I8}

# below this many bytes of K and V a call runs on one thread: waking a
# worker costs about as much as it saves (bench/kernel.py)
cdef Py_ssize_t PARALLEL_MIN_BYTES = 1 << 18
# from this many bytes (K and V read, once per tile of queries) a call
# wakes sleeping workers even when calls are sparse (pool.h's
# kv_parallel). 1 x 8 x S decode on the Xeon VM, calls 100-1000 us apart,
# every call waking the workers, 1 thread / 2 threads (us): 2 MiB 67-93 /
# 68-96, 4 MiB 185-205 / 144-181, 6 MiB 270-309 / 190-214, 8 MiB 335-347 /
# 228-294. An earlier host, where waking cost the caller 15-100 us, had
# set 8 MiB (alternated 1- and 2-thread caches 300 us apart, 2 threads
# against 1: 0.94, 1.00, 1.15, 0.96, 0.82 at 2, 4, 8, 16, 32 MiB). Where
# waking does not pay, the cache's timing turns to one thread
cdef Py_ssize_t WAKE_MIN_BYTES = 4 << 20
# an accessor with num_threads > 1 runs the last two calls of every period
# on the thread count it does not choose, to see whether that became the
# faster; the period doubles, from EXPLORE_EVERY up to EXPLORE_MOST calls,
# each time it had not, and starts again at EXPLORE_EVERY when the timings
# switch the count (the chosen count is timed on every call but the first
# after a switch: if it becomes slower than the other was, the next call
# runs that). Exploring
# every 16th call once cost a 2-thread cache 5-6% of a small model's
# generation: each woke the sleeping workers (~20 us on this VM) between
# layers 100 us apart. Such calls no longer wake them (WAKE_MIN_BYTES), so
# there a call on num_threads runs on the caller's thread alone, and the
# timing compares one thread with one
cdef Py_ssize_t EXPLORE_EVERY = 16
cdef Py_ssize_t EXPLORE_MOST = 256
# a try that lost by a factor r (its rate over the chosen count's) cost 2 (r
# - 1) calls' time; the next comes after at least 2 EXPLORE_SHARE (r - 1)
# calls, so that tries cost at most 1/EXPLORE_SHARE of the time (where the
# cap, EXPLORE_LONGEST, allows: r <= 3). 8 x 12 x 1024 decode (2 threads
# ~0.93 ms, 1 thread ~1.8) tried 1 thread at calls 16, 48, 112, 240, 496,
# ..: 1.2% of its first 1,100 calls (a bench case) and 0.7% after; now
# every ~480 calls
cdef double EXPLORE_SHARE = 256
cdef Py_ssize_t EXPLORE_LONGEST = 1024


cdef class ArenaAccessor:
    """Typed view of one arena.

    ``arena``: writable, C-contiguous, aligned, 6-d (L, 2, B, H, S, D) with
    no size 0, of a native-order float16/float32/float64 or int8 dtype; for
    int8, ``scales`` is float32 (L, 2, B, H, S), writable, C-contiguous,
    aligned, one per stored row; ``num_threads >= 1`` (all checked:
    ValueError).
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
    # calls in the current exploring period, and how many of them are left
    cdef readonly Py_ssize_t explore_every
    cdef readonly Py_ssize_t until_explore
    # the count the last call ran on (-1: none yet). A call on the other one
    # is not timed: the workers of a count not run lately are asleep, and
    # the first call wakes them (on this VM, 2 threads seemed 2x slower than
    # one at 1 x 12 x 256 when every sample was such a call; they are 1.5x faster)
    cdef int last_many
    # the count the rates chose at the last call (-1: none yet)
    cdef int chosen
    # the position map, set by positions(): the arrays, and pointers into them
    cdef object ring_array, cos_array, sin_array
    cdef const Py_ssize_t *ring_head
    cdef Py_ssize_t n_sink
    cdef const float *rope_cos
    cdef const float *rope_sin
    cdef int rope_interleaved
    # attend_plain: the NumPy type numbers of the storage and of the compute
    # type, the largest finite value the storage holds (float arenas), and
    # the bytes of the arena and the scales, [lo, hi)
    cdef int storage_num, compute_num
    cdef double storage_max
    cdef const char *arena_lo
    cdef const char *arena_hi
    cdef const char *scales_lo
    cdef const char *scales_hi
    # the cache's lengths, set by track(): its seq_lens and ring heads, its
    # written end, and both lengths as the cache last set or checked them
    # (seq_lens then ring heads), which attend_plain compares with at each call
    cdef cnp.ndarray seq_lens_array
    cdef object tracked                     # the other three arrays, kept alive
    cdef Py_ssize_t *seq_lens
    cdef const Py_ssize_t *ring
    cdef Py_ssize_t *written
    cdef Py_ssize_t *seen

    def __cinit__(self, arena, int num_threads, scales=None):
        if not (isinstance(arena, np.ndarray) and arena.ndim == 6 and arena.shape[1] == 2
                and min(arena.shape) >= 1 and _is_writable_carray(arena)
                and arena.dtype in _STORAGE_CODES):
            raise ValueError(f"arena must be a writable, C-contiguous, aligned (L, 2, B, H, S, "
                             f"D) array, no size 0, of native float16, float32, float64 or "
                             f"int8; got {_described(arena)}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}")
        self.arena = arena
        self.scales = scales
        self.num_threads = num_threads
        self.last_many = self.chosen = -1
        self.explore_every = self.until_explore = EXPLORE_EVERY
        self.raw = arena.view(np.uint8)
        self.storage = _STORAGE_CODES[arena.dtype]
        self.L, _, self.B, self.H, self.S, self.D = arena.shape
        self.itemsize = arena.dtype.itemsize
        if (scales is not None) != (self.storage == KV_I8) or scales is not None and not (
                isinstance(scales, np.ndarray) and scales.dtype == np.float32
                and _is_writable_carray(scales) and scales.shape == arena.shape[:5]):
            raise ValueError(f"scales must be writable, C-contiguous, aligned float32 "
                             f"{arena.shape[:5]} for an int8 arena, and None otherwise; got "
                             f"{_described(scales)} for {arena.dtype}")
        if scales is not None:
            self.scale = scales
            _extent(scales, &self.scales_lo, &self.scales_hi)
        _extent(arena, &self.arena_lo, &self.arena_hi)
        self.storage_num = cnp.PyArray_TYPE(arena)
        self.compute_num = cnp.NPY_FLOAT64 if self.storage == KV_F64 else cnp.NPY_FLOAT32
        self.storage_max = INFINITY if self.storage == KV_I8 else float(np.finfo(arena.dtype).max)

    def positions(self, ring_head=None, Py_ssize_t n_sink=0, rope_cos=None, rope_sin=None,
                  bint rope_interleaved=False):
        """Set the map from logical positions to slots and rotations, for every later call.

        With ``ring_head`` (intp (B,), C-contiguous, kept and read at every
        call), row b keeps n_sink sinks in slots [0, n_sink) and a ring after
        them whose oldest position is in slot n_sink + ring_head[b]; its
        values are checked at every call. With ``rope_cos``/``rope_sin``
        (float32 (S, D / 2), C-contiguous, apart from the arena and its
        scales), keys and queries are rotated by
        their logical positions, pairs (i, i + D / 2) or, with
        ``rope_interleaved``, (2i, 2i + 1). None turns either off.
        """
        if ring_head is not None and (not isinstance(ring_head, np.ndarray)
                                      or ring_head.dtype != np.intp
                                      or ring_head.shape != (self.B,)
                                      or not ring_head.flags.c_contiguous
                                      or not 0 <= n_sink < self.S):
            raise ValueError(f"ring_head must be C-contiguous intp with {self.B} entries and "
                             f"n_sink be in [0, {self.S}); got {ring_head!r} and {n_sink}")
        if (rope_cos is None) != (rope_sin is None):
            raise ValueError("rope_cos and rope_sin go together")
        if rope_cos is not None and (self.D % 2 or any(
                not isinstance(t, np.ndarray) or t.dtype != np.float32
                or not t.flags.c_contiguous
                or t.shape != (self.S, self.D // 2) for t in (rope_cos, rope_sin))):
            raise ValueError(f"rope tables must be C-contiguous float32 ({self.S}, "
                             f"{self.D // 2}) with an even head_dim {self.D}; got "
                             f"{np.shape(rope_cos)} and {np.shape(rope_sin)}")
        # the kernel stores new rows while other threads read the tables
        if rope_cos is not None and (self._overlaps(rope_cos) or self._overlaps(rope_sin)):
            raise ValueError("rope tables must not overlap the arena or its scales")
        self.ring_array, self.cos_array, self.sin_array = ring_head, rope_cos, rope_sin
        self.ring_head = NULL if ring_head is None else \
            <const Py_ssize_t *>cnp.PyArray_DATA(<cnp.ndarray>ring_head)
        self.n_sink = n_sink if ring_head is not None else 0
        self.rope_cos = self.rope_sin = NULL
        if rope_cos is not None:
            self.rope_cos = <const float *>cnp.PyArray_DATA(<cnp.ndarray>rope_cos)
            self.rope_sin = <const float *>cnp.PyArray_DATA(<cnp.ndarray>rope_sin)
        self.rope_interleaved = rope_interleaved

    def track(self, seq_lens, ring, written):
        """Keep the cache's lengths, read and written by ``attend_plain``.

        ``seq_lens`` and ``ring`` (the ring heads, zeros without a window)
        are intp (B,), ``written`` (the end of the positions written since
        the last reset) intp (1,), each C-contiguous and writable; the
        accessor keeps them and records their values as seen (``see_lengths``).
        """
        arrays = {"seq_lens": (seq_lens, self.B), "ring": (ring, self.B), "written": (written, 1)}
        for name, (a, n) in arrays.items():
            if not (isinstance(a, np.ndarray) and a.dtype == np.intp and a.shape == (n,)
                    and a.flags.c_contiguous and a.flags.writeable):
                raise ValueError(f"{name} must be a C-contiguous, writable intp array of "
                                 f"shape ({n},); got {a!r}")
        seen = np.zeros(2 * self.B, np.intp)
        self.tracked = (ring, written, seen)
        self.seq_lens_array = seq_lens
        self.seq_lens = <Py_ssize_t *>cnp.PyArray_DATA(<cnp.ndarray>seq_lens)
        self.ring = <const Py_ssize_t *>cnp.PyArray_DATA(<cnp.ndarray>ring)
        self.written = <Py_ssize_t *>cnp.PyArray_DATA(<cnp.ndarray>written)
        self.seen = <Py_ssize_t *>cnp.PyArray_DATA(<cnp.ndarray>seen)
        self.see_lengths()

    def see_lengths(self):
        """Record the tracked lengths and ring heads as they are now (set or checked)."""
        self._need_tracked()
        memcpy(self.seen, self.seq_lens, self.B * sizeof(Py_ssize_t))
        memcpy(self.seen + self.B, self.ring, self.B * sizeof(Py_ssize_t))

    def lengths_unchanged(self):
        """Whether the tracked lengths and ring heads are as ``see_lengths`` recorded."""
        self._need_tracked()
        return self._as_seen()

    cdef _check_layer(self, str method, Py_ssize_t layer):
        if not 0 <= layer < self.L:
            raise ValueError(f"{method}: layer must be in [0, {self.L}); got {layer}")

    cdef _need_tracked(self):
        if self.seq_lens == NULL:
            raise RuntimeError("the accessor tracks no lengths: call track() first")

    cdef bint _as_seen(self):
        return memcmp(self.seen, self.seq_lens, self.B * sizeof(Py_ssize_t)) == 0 and \
            memcmp(self.seen + self.B, self.ring, self.B * sizeof(Py_ssize_t)) == 0

    def attend(self, Py_ssize_t layer, cnp.ndarray base not None, cnp.ndarray q not None,
               cnp.ndarray out not None, int isa):
        """Attention of ``q`` over ``layer`` into ``out``.

        q and out are (B, Hq, T, D), Hq = G * H; query head h attends with
        K/V head h // G. Query t of row b sees positions 0 .. base[b] + t:
        the row's cached positions, then causal within the new block (whose
        keys and values the caller has written at base[b] ..), through the
        position map set by ``positions``.

        Checked (ValueError, nothing touched): 0 <= layer < L; base is
        C-contiguous intp (B,) with 0 <= base[b] <= S - T; q is (B, Hq, T,
        D) with T >= 1 and Hq a positive multiple of H, out has q's shape
        and is writable, overlapping neither itself, q, the arena nor the
        scales; both are float32 or float64, native order, aligned (so their
        strides are whole elements).
        """
        self._check_layer("attend", layer)
        if not (cnp.PyArray_NDIM(base) == 1 and cnp.PyArray_DIMS(base)[0] == self.B
                and cnp.PyArray_TYPE(base) == cnp.NPY_INTP and cnp.PyArray_ISCARRAY_RO(base)):
            raise ValueError(f"attend: base must be C-contiguous, aligned intp ({self.B},); "
                             f"got {_described(base)}")
        if not (_is_queries(q) and _is_queries(out) and cnp.PyArray_DIMS(q)[0] == self.B
                and cnp.PyArray_DIMS(q)[1] > 0 and cnp.PyArray_DIMS(q)[1] % self.H == 0
                and cnp.PyArray_DIMS(q)[2] > 0 and cnp.PyArray_DIMS(q)[3] == self.D
                and cnp.PyArray_SAMESHAPE(q, out)):
            raise ValueError(f"attend: q must be 4-d ({self.B}, G * {self.H}, T, {self.D}), G "
                             f">= 1, T >= 1, and out of its shape; both float32 or float64, "
                             f"native order, aligned; got q {_described(q)}, out "
                             f"{_described(out)}")
        if not cnp.PyArray_ISWRITEABLE(out):
            raise ValueError("attend: out must be writable")
        if self._overlaps(out) or _overlap(out, q):
            raise ValueError("attend: out must overlap neither q nor the arena and its scales")
        # an out whose elements share bytes: besides a wrong result, a size
        # far beyond the memory it spans (zero strides) would overflow the
        # kernel's scratch sizes, which grow with G * T
        if _span(out) < cnp.PyArray_NBYTES(out):
            raise ValueError(f"attend: out must not overlap itself; got strides "
                             f"{(<object>out).strides} for shape {(<object>out).shape}")
        self._run(layer, <const Py_ssize_t *>cnp.PyArray_DATA(base), q, out, isa, NULL)

    def attend_plain(self, Py_ssize_t layer, q, k, v, out, int isa, bint check_finite):
        """The common call checked, written and attended in one step; or None.

        When the call is plain, writes keys ``k`` and values ``v`` (B, H, T,
        D) at slots start .. start + T - 1 of ``layer`` in every row, where
        start is every row's length, records the write in the tracked
        written end (``track``), and returns the attention of ``q`` (B,
        G * H, T, D) over them and the cached positions into ``out`` (a new
        array of q's dtype when None): what ``KVCache.attend`` does after its
        checks. Plain: the tracked lengths and ring heads as last seen
        (``see_lengths``), every row of the same length and no ring turned;
        ndarrays only (no subclass); k and v 4-d, native order, in the
        storage dtype or float32 or float64 (cast as NumPy casts; narrowing
        ones finite and within the storage's range), an int8 arena's
        float32, C-contiguous and finite; strides in whole elements; q
        float32 or float64, native, aligned (finite values within float32
        when computed in float32); start + T <= S, and T within a sliding
        window; nothing overlaps the arena, its scales or out; with
        ``check_finite``, no NaN or infinity; out, when given, q's shape and
        dtype, C-contiguous, aligned and writable. Anything else returns None
        with nothing touched: the caller's general path then says what is
        wrong, or handles the rest (lengths changed from outside,
        conversions, eviction).

        Checked first (ValueError): 0 <= layer < L.
        """
        cdef cnp.ndarray qa, ka, va, oa
        cdef Py_ssize_t b, T
        cdef Py_ssize_t start
        cdef int narrow, kv, d
        cdef kv_new new_rows
        self._check_layer("attend_plain", layer)
        _check_isa(isa)
        self._need_tracked()
        if not self._as_seen():
            return None
        start = self.seq_lens[0]
        if not (cnp.PyArray_CheckExact(q) and cnp.PyArray_CheckExact(k)
                and cnp.PyArray_CheckExact(v) and (out is None or cnp.PyArray_CheckExact(out))):
            return None
        qa, ka, va = q, k, v
        if not (self._plain_block(ka) and self._plain_block(va)):
            return None
        T = cnp.PyArray_DIMS(ka)[2]
        if cnp.PyArray_DIMS(va)[2] != T or not 0 <= start <= self.S - T \
                or (self.ring_head != NULL and T > self.S - self.n_sink):   # beyond the window
            return None
        if cnp.PyArray_NDIM(qa) != 4 or cnp.PyArray_DIMS(qa)[0] != self.B \
                or cnp.PyArray_DIMS(qa)[1] % self.H or cnp.PyArray_DIMS(qa)[1] == 0 \
                or cnp.PyArray_DIMS(qa)[2] != T or cnp.PyArray_DIMS(qa)[3] != self.D \
                or cnp.PyArray_TYPE(qa) not in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64) \
                or not cnp.PyArray_ISNOTSWAPPED(qa) or not cnp.PyArray_ISALIGNED(qa):
            return None
        for b in range(self.B):
            if self.seq_lens[b] != start or (self.ring_head != NULL and self.ring_head[b] != 0):
                return None
        if self._overlaps(ka) or self._overlaps(va) or self._overlaps(qa):
            return None
        if out is None:
            oa = cnp.PyArray_EMPTY(4, cnp.PyArray_DIMS(qa), cnp.PyArray_TYPE(qa), 0)
        else:
            oa = out
            if not cnp.PyArray_SAMESHAPE(oa, qa) or cnp.PyArray_TYPE(oa) != cnp.PyArray_TYPE(qa) \
                    or not cnp.PyArray_ISNOTSWAPPED(oa) or not cnp.PyArray_IS_C_CONTIGUOUS(oa) \
                    or not cnp.PyArray_ISALIGNED(oa) or not cnp.PyArray_ISWRITEABLE(oa) \
                    or self._overlaps(oa) \
                    or _overlap(oa, qa) or _overlap(oa, ka) or _overlap(oa, va):
                return None   # items write out while others read k and v
        # values: what the general path would refuse, it refuses itself
        narrow = cnp.PyArray_ITEMSIZE(qa) > (8 if self.compute_num == cnp.NPY_FLOAT64 else 4)
        if _values_need_general_path(qa, narrow, FLT_MAX, check_finite):
            return None
        if self._unsafe_block(ka, check_finite) or self._unsafe_block(va, check_finite):
            return None
        # the written end first: reset() must wipe what is stored even if a
        # store or the kernel then raises (a scratch allocation failing)
        if start + T > self.written[0]:
            self.written[0] = start + T
        # k and v as the kernel stores them (each (row, head)'s rows right
        # before it reads them, on every thread), or cast by NumPy now
        new_rows.rows[0] = new_rows.rows[1] = NULL
        for kv, x in enumerate((ka, va)):
            if self._kernel_stores(x):
                new_rows.rows[kv] = cnp.PyArray_DATA(x)
                new_rows.as_stored[kv] = cnp.PyArray_TYPE(x) == self.storage_num
                for d in range(4):
                    new_rows.stride[kv][d] = cnp.PyArray_STRIDES(x)[d] // cnp.PyArray_ITEMSIZE(x)
            else:
                cnp.PyArray_CopyInto(self.arena[layer, kv, :, :, start:start + T], x)
        self._run(layer, self.seq_lens, qa, oa, isa, &new_rows)
        return oa

    cdef bint _plain_block(self, cnp.ndarray x):
        # keys or values (B, H, T >= 1, D) that attend_plain stores as they
        # are: copied or converted by the kernel, or cast by NumPy from
        # another float type
        if cnp.PyArray_NDIM(x) != 4 or cnp.PyArray_DIMS(x)[0] != self.B \
                or cnp.PyArray_DIMS(x)[1] != self.H or cnp.PyArray_DIMS(x)[2] < 1 \
                or cnp.PyArray_DIMS(x)[3] != self.D or not cnp.PyArray_ISNOTSWAPPED(x) \
                or not cnp.PyArray_ISALIGNED(x):
            return False
        if self.storage == KV_I8:
            return cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32 and cnp.PyArray_IS_C_CONTIGUOUS(x)
        return cnp.PyArray_TYPE(x) in (self.storage_num, cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)

    cdef bint _unsafe_block(self, cnp.ndarray x, bint check_finite):
        # keys or values (_plain_block) the general path must see: narrowed to
        # a float storage, or refused when not finite (check_finite; int8 always)
        cdef bint narrowing = cnp.PyArray_ITEMSIZE(x) > self.itemsize and self.storage != KV_I8
        return _values_need_general_path(x, narrowing, self.storage_max,
                                         check_finite or self.storage == KV_I8)

    cdef bint _overlaps(self, cnp.ndarray x):
        # whether x's bytes may overlap the arena's or the scales'
        cdef const char *lo
        cdef const char *hi
        _extent(x, &lo, &hi)
        return (lo < self.arena_hi and self.arena_lo < hi) or \
            (self.scales_lo != NULL and lo < self.scales_hi and self.scales_lo < hi)

    cdef bint _kernel_stores(self, cnp.ndarray x):
        # keys or values (_plain_block) the kernel stores itself (kv_new): of
        # the storage type, into int8 (_plain_block: C-contiguous float32), or
        # float32 rows into halves (NumPy's cast took 2.8 ns an element, the
        # kernel's ~0.1); else NumPy casts them
        return cnp.PyArray_TYPE(x) == self.storage_num or self.storage == KV_I8 \
            or (self.storage == KV_F16 and cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
                and cnp.PyArray_STRIDES(x)[3] == 4)

    cdef int _layer(self, Py_ssize_t layer, kv_layer *c) except -1:
        # the arena's part of c for `layer` (checked): where its rows are
        c.dtype = self.storage
        c.B, c.H, c.S, c.D = self.B, self.H, self.S, self.D
        c.data[0] = &self.raw[layer, 0, 0, 0, 0, 0]
        c.data[1] = &self.raw[layer, 1, 0, 0, 0, 0]
        c.scale[0] = c.scale[1] = NULL
        if self.scales is not None:
            c.scale[0] = &self.scale[layer, 0, 0, 0, 0]
            c.scale[1] = &self.scale[layer, 1, 0, 0, 0]
        return 0

    cdef _run(self, Py_ssize_t layer, const Py_ssize_t *base, cnp.ndarray q, cnp.ndarray out,
              int isa, const kv_new *new_rows):
        # the kernel on q, out (as attend checks them) for rows whose new
        # positions start at base[b], with the position map. base and the
        # ring heads are copied into rows (on the stack for up to 32 rows),
        # and the copies checked and read
        cdef Py_ssize_t small[64]
        cdef Py_ssize_t *rows
        _check_isa(isa)
        if 2 * self.B <= 64:
            self._run_rows(layer, base, small, q, out, isa, new_rows)
            return
        rows = <Py_ssize_t *>PyMem_Malloc(2 * self.B * sizeof(Py_ssize_t))
        if rows == NULL:
            raise MemoryError()
        try:
            self._run_rows(layer, base, rows, q, out, isa, new_rows)
        finally:
            PyMem_Free(rows)

    cdef int _run_rows(self, Py_ssize_t layer, const Py_ssize_t *base, Py_ssize_t *rows,
                       cnp.ndarray q, cnp.ndarray out, int isa,
                       const kv_new *new_rows) except -1:
        # _run with rows (2 B entries) for the copies: rows[b] the start of
        # row b's new positions, rows[B + b] its ring head (with a ring)
        cdef kv_layer c
        cdef kv_query qq
        cdef Py_ssize_t i, b, work, tile, T = cnp.PyArray_DIMS(q)[2]
        cdef int status
        cdef const Py_ssize_t *starts = rows
        memcpy(rows, base, self.B * sizeof(Py_ssize_t))
        if self.ring_head != NULL:
            memcpy(rows + self.B, self.ring_head, self.B * sizeof(Py_ssize_t))
        for b in range(self.B):
            if not 0 <= rows[b] <= self.S - T:
                raise ValueError(f"attend: base[{b}] must be in [0, {self.S - T}] (S - T, "
                                 f"T = {T}); got {rows[b]}")
            if self.ring_head != NULL and not 0 <= rows[self.B + b] < self.S - self.n_sink:
                raise ValueError(f"ring_head[{b}] must be in [0, {self.S - self.n_sink}); "
                                 f"got {rows[self.B + b]}")
        self._layer(layer, &c)
        c.n_sink = self.n_sink
        c.ring_head = rows + self.B if self.ring_head != NULL else NULL
        c.rope_cos, c.rope_sin = self.rope_cos, self.rope_sin
        c.rope_interleaved = self.rope_interleaved
        qq.q = cnp.PyArray_DATA(q)
        qq.out = cnp.PyArray_DATA(out)
        qq.q_f64 = cnp.PyArray_ITEMSIZE(q) == 8
        qq.out_f64 = cnp.PyArray_ITEMSIZE(out) == 8
        for i in range(4):
            qq.qs[i] = cnp.PyArray_STRIDES(q)[i] // cnp.PyArray_ITEMSIZE(q)
            qq.os[i] = cnp.PyArray_STRIDES(out)[i] // cnp.PyArray_ITEMSIZE(out)
        qq.Hq, qq.T = cnp.PyArray_DIMS(q)[1], cnp.PyArray_DIMS(q)[2]
        qq.base = starts
        qq.new_rows = new_rows
        work = 0
        for b in range(c.B):
            work += starts[b] + qq.T
        work *= 2 * c.H * c.D * self.itemsize
        # each tile of queries reads K and V again (kv_attend: 64 queries a tile)
        tile = max(1, 64 // (qq.Hq // c.H))
        work *= (qq.T + tile - 1) // tile
        if work < PARALLEL_MIN_BYTES or self.num_threads == 1:
            with nogil:   # small calls are neither split nor spread
                status = kv_attend(&c, &qq, isa, 1, 1, 0)
        else:
            status = self._attend_timed(&c, &qq, isa, work)
        if status != 0:
            raise MemoryError("kvarena: no memory for the attention kernel's scratch")
        return 0

    cdef int _attend_timed(self, const kv_layer *c, const kv_query *q, int isa, Py_ssize_t work):
        # the thread count that has been faster per byte, or at the end of a
        # period the other one (see EXPLORE_EVERY)
        cdef int many = self.seconds_per_byte[1] <= self.seconds_per_byte[0]
        cdef int exploring = 0
        cdef int status
        cdef long long start
        cdef double rate, costly
        if many != self.chosen:
            # the rates changed the choice: the machine (another process, a
            # BLAS's spinning workers) or one call changed, and may change
            # back, so the other count is tried again within 16 calls,
            # whatever the period had grown to (up to 256 calls, 1.8 s of
            # prefill calls at T = 512, or 1,024 after costly tries); if the
            # change lasts, those tries lose and spread out again
            if self.chosen != -1:
                self.explore_every = EXPLORE_EVERY
                self.until_explore = min(self.until_explore, EXPLORE_EVERY)
            self.chosen = many
        self.until_explore -= 1
        if self.until_explore < 2:
            many, exploring = not many, 1
        with nogil:
            start = kv_nanoseconds()
            status = kv_attend(c, q, isa, self.num_threads, self.num_threads if many else 1,
                               work >= WAKE_MIN_BYTES)
            rate = 1e-9 * (kv_nanoseconds() - start) / work
        if many != self.last_many:
            self.last_many = many
        elif exploring or self.seconds_per_byte[many] == 0:
            self.seconds_per_byte[many] = rate      # not smoothed into a stale rate
        else:
            self.seconds_per_byte[many] = 0.75 * self.seconds_per_byte[many] + 0.25 * rate
        if exploring and self.until_explore <= 0:
            if (self.seconds_per_byte[many] > self.seconds_per_byte[not many]) \
                    and self.seconds_per_byte[not many] > 0:      # it lost again
                costly = 2 * EXPLORE_SHARE * (self.seconds_per_byte[many]
                                              / self.seconds_per_byte[not many] - 1)
                self.explore_every = max(min(2 * self.explore_every, EXPLORE_MOST),
                                         <Py_ssize_t>min(costly, EXPLORE_LONGEST))
            else:
                self.explore_every = EXPLORE_EVERY
            self.until_explore = self.explore_every
        return status

    def thread_rates(self):
        """Smoothed seconds per byte of K and V measured on (1, num_threads) threads."""
        return self.seconds_per_byte[0], self.seconds_per_byte[1]

    def store(self, Py_ssize_t layer, cnp.ndarray slots not None, cnp.ndarray key not None,
              cnp.ndarray value not None, int isa):
        """int8 and float16 arenas: store key and value (B, H, T, D) of
        ``layer``, row b's position t at slot slots[b, t], on instruction set
        ``isa`` (checked: 0 <= isa <= BEST_ISA): as halves rounded to
        nearest, ties to even (NumPy's cast; infinities kept, a NaN stored
        as a quiet NaN), or as int8 with one absmax / 127 scale per row.

        Checked (ValueError, nothing stored): an int8 or float16 arena; 0 <=
        layer < L; key and value C-contiguous, aligned, native float32 (B,
        H, T, D); slots intp (B, T), in [0, S) (copied, and the copy checked
        and used). Caller checked: key and value overlap neither the arena
        nor the scales, and for int8 are finite (what a NaN or infinity
        becomes differs between instruction sets), for float16 have no finite
        value beyond 65504.
        """
        cdef Py_ssize_t B = self.B, H = self.H, D = self.D, S = self.S, T, b, kv
        cdef Py_ssize_t xs[3]
        cdef kv_layer c
        cdef cnp.ndarray own
        cdef const Py_ssize_t *at
        cdef const float *rows[2]
        if self.storage not in (KV_I8, KV_F16):
            raise ValueError(f"store: an int8 or float16 arena is needed; this one is "
                             f"{self.arena.dtype}")
        self._check_layer("store", layer)
        T = cnp.PyArray_DIMS(key)[2] if cnp.PyArray_NDIM(key) == 4 else -1
        for name, x in (("key", key), ("value", value)):
            if not (cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32 and cnp.PyArray_ISCARRAY_RO(x)
                    and (<object>x).shape == (B, H, T, D)):
                raise ValueError(f"store: {name} must be C-contiguous, aligned, native float32 "
                                 f"({B}, {H}, T, {D}), T as key's; got {_described(x)}")
        if not (cnp.PyArray_TYPE(slots) == cnp.NPY_INTP and cnp.PyArray_ISNOTSWAPPED(slots)
                and (<object>slots).shape == (B, T)):
            raise ValueError(f"store: slots must be intp ({B}, {T}); got {_described(slots)}")
        _check_isa(isa)
        own = np.array(slots, order="C")        # the copy the checks and the store read
        at = <const Py_ssize_t *>cnp.PyArray_DATA(own)
        for b in range(B * T):
            if not 0 <= at[b] < S:
                raise ValueError(f"store: slots[{b // T}, {b % T}] must be in [0, {S}); got "
                                 f"{at[b]}")
        xs[0], xs[1], xs[2] = H * T * D, T * D, D
        rows[0] = <const float *>cnp.PyArray_DATA(key)
        rows[1] = <const float *>cnp.PyArray_DATA(value)
        self._layer(layer, &c)
        with nogil:
            for kv in range(2):
                kv_store(&c, kv, rows[kv], xs, at, T, isa)

    def move(self, src, dst, count):
        """In row b, move positions src[b] .. src[b] + count[b] - 1 to dst[b] onwards.

        Every layer, keys and values, every head; the ranges may overlap.

        Checked (ValueError, nothing moved): src, dst, count are intp arrays
        of B entries (copied, and the copies checked and used); count[b] >=
        0, src[b] >= 0, dst[b] >= 0, src[b] + count[b] <= S and dst[b] +
        count[b] <= S for all b.
        """
        cdef Py_ssize_t layer, kv, b, h, S = self.S
        cdef Py_ssize_t row_bytes = self.raw.shape[5]
        cdef Py_ssize_t[::1] at, to, n
        copies = []
        for name, x in (("src", src), ("dst", dst), ("count", count)):
            if not (isinstance(x, np.ndarray) and x.dtype == np.intp and x.shape == (self.B,)):
                raise ValueError(f"move: {name} must be an intp array of {self.B} entries; got "
                                 f"{_described(x)}")
            copies.append(np.array(x))
        at, to, n = copies
        for b in range(self.B):
            if n[b] < 0 or at[b] < 0 or to[b] < 0 \
                    or at[b] > S - n[b] or to[b] > S - n[b]:    # the sums may overflow
                raise ValueError(f"move: row {b}'s ranges [{at[b]}, {at[b]} + {n[b]}) "
                                 f"and [{to[b]}, {to[b]} + {n[b]}) must lie in [0, {S}]")
        with nogil:
            for layer in range(self.L):
                for kv in range(2):
                    for b in range(self.B):
                        if n[b] == 0 or at[b] == to[b]:
                            continue
                        for h in range(self.H):
                            memmove(&self.raw[layer, kv, b, h, to[b], 0],
                                    &self.raw[layer, kv, b, h, at[b], 0], n[b] * row_bytes)


cdef void _extent(cnp.ndarray x, const char **lo, const char **hi):
    # the bytes x may touch, [lo, hi): from its lowest to past its highest element
    cdef Py_ssize_t i, span
    lo[0] = hi[0] = <const char *>cnp.PyArray_DATA(x)
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(x)[i] == 0:
            hi[0] = lo[0]
            return
        span = (cnp.PyArray_DIMS(x)[i] - 1) * cnp.PyArray_STRIDES(x)[i]
        if span < 0:
            lo[0] += span
        else:
            hi[0] += span
    hi[0] += cnp.PyArray_ITEMSIZE(x)


cdef _check_isa(int isa):
    # the kernel's variants are indexed by it
    if not 0 <= isa <= BEST_ISA:
        raise ValueError(f"isa must be in [0, {BEST_ISA}] (kernel_info()['isas']); got {isa}")


cdef Py_ssize_t _span(cnp.ndarray x):
    # how many bytes x's elements span, first to last
    cdef const char *lo
    cdef const char *hi
    _extent(x, &lo, &hi)
    return hi - lo


cdef bint _is_writable_carray(x):
    # what the accessor keeps and writes in place: C-contiguous, aligned, writable
    return x.flags.c_contiguous and x.flags.aligned and x.flags.writeable


cdef inline bint _is_queries(cnp.ndarray x):
    # 4-d float32 or float64, native order, aligned: what the kernel reads as
    # queries and writes as outputs, with strides in whole elements
    return cnp.PyArray_NDIM(x) == 4 and cnp.PyArray_ISNOTSWAPPED(x) \
        and cnp.PyArray_ISALIGNED(x) \
        and cnp.PyArray_TYPE(x) in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)


cdef str _described(x):
    # an argument as the messages above show it
    if not isinstance(x, np.ndarray):
        return repr(x) if x is None else type(x).__name__
    layout = "C-contiguous" if x.flags.c_contiguous else "strided"
    return f"{x.dtype.str} {x.shape} {layout}{'' if x.flags.aligned else ' unaligned'}"


cdef bint _overlap(cnp.ndarray x, cnp.ndarray y):
    # whether the bytes of x and y may overlap
    cdef const char *xlo
    cdef const char *xhi
    cdef const char *ylo
    cdef const char *yhi
    _extent(x, &xlo, &xhi)
    _extent(y, &ylo, &yhi)
    return xlo < yhi and ylo < xhi


cdef bint _values_need_general_path(cnp.ndarray x, bint narrowing, double limit,
                                    bint refuse_nonfinite):
    # attend_plain's value check of q, k or v: when narrowing to a type whose
    # largest finite value is limit, any NaN, infinity or value beyond it (the
    # general path stores the first two unless check_finite, and raises for
    # the last); else a NaN or an infinity where they are refused
    if narrowing:
        return _scan(x, limit) != 0
    return refuse_nonfinite and _scan(x, INFINITY) != 0


def scan(cnp.ndarray x not None, double limit):
    """One compiled pass over ``x``: 1 if it holds a NaN or an infinity, else
    2 if a value's magnitude exceeds ``limit``, else 0; -1 when ``x`` is not
    a 4-d, native-order, aligned float16, float32 or float64 array (the
    caller then asks NumPy)."""
    if cnp.PyArray_NDIM(x) != 4 or not cnp.PyArray_ISNOTSWAPPED(x) \
            or not cnp.PyArray_ISALIGNED(x) \
            or cnp.PyArray_TYPE(x) not in (cnp.NPY_FLOAT16, cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
        return -1
    return _scan(x, limit)


cdef inline double _half(unsigned short bits) noexcept nogil:
    # an IEEE half's value (sign dropped), NaN and infinity as infinity
    cdef int exponent = (bits >> 10) & 0x1F
    cdef int mantissa = bits & 0x3FF
    if exponent == 0x1F:
        return INFINITY
    if exponent == 0:
        return ldexp(mantissa, -24)                      # subnormal
    return ldexp(mantissa + 1024, exponent - 25)


ctypedef fused float_bits:       # a float16, float32 or float64 read as its bits
    unsigned short
    unsigned int
    unsigned long long


# The magnitudes of n floats at p, step elements apart, as the largest of
# their bits with the sign cleared: for IEEE floats of one width the bits of
# magnitudes order as the magnitudes do, and a NaN's or an infinity's are the
# largest (from 0x7f800000 for float32). Integer maxima vectorise (the
# compiler does not reorder a float max, whose NaN rule depends on order):
# the scan of a float32 block took 2.2 ns an element as a loop of fabs and
# isfinite, the longest part of writing it into a float16 cache
cdef inline unsigned long long _most(const float_bits *p, Py_ssize_t n,
                                     Py_ssize_t step) noexcept nogil:
    cdef float_bits sign = <float_bits>1 << (8 * sizeof(float_bits) - 1)
    cdef float_bits most = 0, bits
    cdef Py_ssize_t i
    for i in range(n):
        bits = p[i * step] & ~sign
        most = bits if bits > most else most
    return most


cdef int _scan(cnp.ndarray x, double limit):
    # 4-d float16, float32 or float64 x: 1 if it holds a NaN or an infinity,
    # else 2 if a value's magnitude exceeds limit, else 0
    cdef const cnp.npy_intp *n = cnp.PyArray_DIMS(x)
    cdef const cnp.npy_intp *s = cnp.PyArray_STRIDES(x)
    cdef const char *p = <const char *>cnp.PyArray_DATA(x)
    cdef const char *row
    cdef Py_ssize_t i, j, k, size = cnp.PyArray_ITEMSIZE(x), step = s[3] // size
    cdef unsigned long long most = 0, bits, special
    cdef double largest
    cdef float largest32
    cdef unsigned int most32
    special = 0x7C00 if size == 2 else (0x7F800000u if size == 4 else 0x7FF0000000000000ull)
    with nogil:
        for i in range(n[0]):
            for j in range(n[1]):
                for k in range(n[2]):
                    row = p + i * s[0] + j * s[1] + k * s[2]
                    # step 1 spelled out: the compiler vectorises the inlined loop
                    if size == 2:
                        bits = _most(<const unsigned short *>row, n[3], 1) if step == 1 \
                            else _most(<const unsigned short *>row, n[3], step)
                    elif size == 4:
                        bits = _most(<const unsigned int *>row, n[3], 1) if step == 1 \
                            else _most(<const unsigned int *>row, n[3], step)
                    else:
                        bits = _most(<const unsigned long long *>row, n[3], 1) if step == 1 \
                            else _most(<const unsigned long long *>row, n[3], step)
                    if bits >= special:
                        return 1
                    most = bits if bits > most else most
    if size == 2:
        largest = _half(<unsigned short>most)
    elif size == 4:
        most32 = <unsigned int>most
        memcpy(&largest32, &most32, 4)
        largest = largest32
    else:
        memcpy(&largest, &most, 8)
    return 2 if largest > limit else 0
