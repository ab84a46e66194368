"""attend's one-step path for common calls against its general path.

``KVCache.attend`` hands a plain call (every row at seq_pos, ndarrays in
the dtypes the kernel reads, keys and values in the arena's float type or
one it is cast from, no eviction) to
``ArenaAccessor.attend_plain``, which checks, writes and attends in one
compiled step; anything else returns None untouched and goes through the
general path. Both must leave the same bytes in the arena and return the
same bits, and a call that is not plain must touch nothing. A NumPy integer
layer index is not plain (the fast test is ``type(layer) is int``), which
is how these tests run the general path on a twin cache.
"""

import numpy as np
import pytest

from kvarena import KVCache, kernel, kernel_info
from kvarena.kernel import compute_dtype, forced_isa

ISAS = kernel_info()["isas"]
STORAGE = [np.float16, np.float32, np.float64, np.int8]

CASES = [  # B, H, G, D, S, cached (every row), T
    (1, 1, 1, 1, 5, 0, 1),
    (3, 2, 1, 7, 71, 17, 1),
    (2, 1, 3, 65, 71, 30, 4),
    (1, 12, 1, 64, 40, 16, 1),
    (2, 2, 2, 128, 99, 60, 33),
]


def twins(rng, dtype, B, H, D, S, cached, n=3, num_threads=1, **options):
    """``n`` caches holding the same random positions, every row ``cached`` long."""
    caches = [KVCache(B, S, 2, H, D, dtype=dtype, num_threads=num_threads, **options)
              for _ in range(n)]
    if cached:
        k, v = rng.standard_normal((2, B, H, cached, D))
        for cache in caches:
            cache.update(1, k, v)
            cache.advance(cached)
    return caches


def plain_inputs(rng, dtype, B, H, G, D, T, layout="model"):
    """q, k, v (B, heads, T, D): keys and values in the arena's dtype (float32
    for int8), q in the compute dtype. ``layout`` "model": views of (B, T,
    heads, D) arrays, as a model holds them; "strided": every other element
    of a wider array, heads in reverse order (negative strides)."""
    kv = np.dtype(np.float32 if dtype == np.int8 else dtype)
    q = rng.standard_normal((B, T, G * H, D)).astype(compute_dtype(np.dtype(dtype)))
    k, v = rng.standard_normal((2, B, T, H, D)).astype(kv)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if layout == "strided":
        q, k, v = (np.repeat(x, 2, axis=-1)[:, ::-1, :, ::2] for x in (q, k, v))
    if dtype == np.int8:        # int8: C-contiguous rows are plain, views (T > 1) are not
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    return q, k, v


def try_plain(cache, layer, q, k, v, out=None, check_finite=False):
    """What the one-step path returns for this call (None: not plain)."""
    return cache._accessor.attend_plain(layer, q, k, v, out, kernel.current_isa(), check_finite)


def state(cache):
    scales = None if cache._scales is None else cache._scales.tobytes()
    return cache._arena.tobytes(), cache._state.tobytes(), scales


@pytest.mark.parametrize("layout", ["model", "strided"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", STORAGE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("B,H,G,D,S,cached,T", CASES)
def test_plain_calls_equal_the_general_path(B, H, G, D, S, cached, T, dtype, isa, layout, rng):
    direct, public, general = twins(rng, dtype, B, H, D, S, cached)
    q, k, v = plain_inputs(rng, dtype, B, H, G, D, T, layout)
    with forced_isa(isa):
        taken = try_plain(direct, 1, q, k, v)
        got = public.attend(1, q, k, v)
        want = general.attend(np.intp(1), q, k, v)
    assert taken is not None, "a plain call must take the one-step path"
    assert got.dtype == want.dtype == q.dtype
    assert taken.tobytes() == got.tobytes() == want.tobytes()
    assert state(public) == state(general)
    assert direct._arena.tobytes() == general._arena.tobytes()


SPREAD = [  # B, H, G, S, cached, T: calls that read 4 MiB or more of K and V in every
    # storage type, which wake the pool's worker however far apart they come
    (2, 8, 1, 2100, 2047, 1),    # 16 (row, head) items: each stores its own new rows
    (2, 8, 2, 2100, 2044, 5),
    (1, 1, 1, 32800, 32767, 1),  # one row cut into chunks: its new rows stored first
    (1, 1, 3, 32800, 32761, 7),
]


@pytest.mark.parametrize("layout", ["model", "strided"])
@pytest.mark.parametrize("dtype", STORAGE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("B,H,G,S,cached,T", SPREAD)
def test_new_rows_are_stored_before_any_thread_reads_them(B, H, G, S, cached, T, dtype, layout,
                                                          rng):
    # the kernel stores a plain call's keys and values itself, in the item that
    # reads them or before all items: on two threads, the same bits as the
    # general path, which stores them before the kernel starts
    direct, general = twins(rng, dtype, B, H, 64, S, cached, n=2, num_threads=2)
    for _ in range(3):      # the cache's timing may run a call on either thread count
        q, k, v = plain_inputs(rng, dtype, B, H, G, 64, T, layout)
        taken = try_plain(direct, 1, q, k, v)
        want = general.attend(np.intp(1), q, k, v)
        assert taken is not None, "a plain call must take the one-step path"
        assert taken.tobytes() == want.tobytes()
        assert direct._arena.tobytes() == general._arena.tobytes()
        direct.advance(T)
        general.advance(T)


CASTS = [(np.float16, np.float32), (np.float16, np.float64), (np.float32, np.float64),
         (np.float64, np.float32)]


def edge_values(dtype, given):
    """Values of ``given`` a cast to the arena's ``dtype`` must get right:
    signed zero, the input type's smallest subnormal, the largest finite
    value both types hold (and its negation); when widening, NaN and
    infinities too."""
    widening = np.dtype(given).itemsize < np.dtype(dtype).itemsize
    top = np.finfo(given if widening else dtype).max
    values = [-0.0, np.finfo(given).smallest_subnormal, top, -top]
    if widening:
        values += [np.nan, np.inf, -np.inf]
    return np.array(values, dtype=given)


@pytest.mark.parametrize("layout", ["model", "strided"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,given", CASTS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("B,H,G,D,S,cached,T", CASES[1:])
def test_keys_and_values_of_another_float_type_are_cast_as_the_general_path_casts(
        B, H, G, D, S, cached, T, dtype, given, isa, layout, rng):
    # a float32 model on a float16 cache (or a float64 one) passes float32 keys
    # and values: the one-step path casts them as NumPy does on assignment
    direct, public, general = twins(rng, dtype, B, H, D, S, cached)
    q, k, v = plain_inputs(rng, dtype, B, H, G, D, T, layout)
    k, v = k.astype(given), v.astype(given)
    edges = edge_values(dtype, given)
    k.flat[:edges.size] = edges[:k.size]
    v.flat[-edges.size:] = edges[-v.size:]
    with forced_isa(isa):
        taken = try_plain(direct, 1, q, k, v)
        got = public.attend(1, q, k, v)
        want = general.attend(np.intp(1), q, k, v)
    assert taken is not None, "another float type must take the one-step path"
    assert taken.tobytes() == got.tobytes() == want.tobytes()
    assert state(public) == state(general)
    assert direct._arena.tobytes() == general._arena.tobytes()


class Sub(np.ndarray):
    """An ndarray subclass: not plain (a subclass may report any shape it likes)."""


def unaligned(x):
    """``x`` copied into memory one byte off its dtype's alignment."""
    raw = np.zeros(x.nbytes + 1, np.uint8)
    y = np.frombuffer(raw.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
    y[...] = x
    return y


def not_plain_cases():
    """name -> (cache options, dtype, a function of (cache, q, k, v) giving the
    call's (q, k, v, out, check_finite))."""
    f8 = lambda x: x.astype(np.float64)   # noqa: E731
    f4 = lambda x: x.astype(np.float32)   # noqa: E731
    return {
        "q a subclass": ({}, np.float32, lambda c, q, k, v: (q.view(Sub), k, v, None, False)),
        "float64 k beyond a float32 arena": ({}, np.float32,
                                             lambda c, q, k, v: (q, f8(k) * 1e300, v, None, False)),
        "float32 v beyond a float16 arena": ({}, np.float16,
                                             lambda c, q, k, v: (q, k, f4(v) * 1e5, None, False)),
        "float32 k with a NaN into float16": ({}, np.float16,
                                              lambda c, q, k, v: (q, nan(f4(k)), v, None, False)),
        "float32 k just beyond float16": ({}, np.float16,
                                          lambda c, q, k, v: (q, at(f4(k), 0, 65505), v, None,
                                                              False)),
        "float64 v just beyond float32": ({}, np.float32,
                                          lambda c, q, k, v: (q, k, at(f8(v), 0, 3.5e38), None,
                                                              False)),
        "float32 k with an infinity into float16": ({}, np.float16,
                                                    lambda c, q, k, v: (q, inf(f4(k)), v, None,
                                                                        False)),
        "float16 k with an infinity first, check_finite": (
            {}, np.float16, lambda c, q, k, v: (q, at(k, 0, np.inf), v, None, True)),
        "float16 v with a NaN, check_finite": ({}, np.float16,
                                               lambda c, q, k, v: (q, k, nan(v), None, True)),
        "v byte-swapped": ({}, np.float32,
                           lambda c, q, k, v: (q, k, v.astype(">f4"), None, False)),
        "q float16": ({}, np.float32, lambda c, q, k, v: (q.astype(np.float16), k, v, None,
                                                          False)),
        "q byte-swapped": ({}, np.float32, lambda c, q, k, v: (q.astype(">f4"), k, v, None,
                                                               False)),
        "q unaligned": ({}, np.float32, lambda c, q, k, v: (unaligned(q), k, v, None, False)),
        "k unaligned": ({}, np.float32, lambda c, q, k, v: (q, unaligned(k), v, None, False)),
        "k a view of the slots written": ({}, np.float32, view_of_the_slots_written),
        "out overlapping q": ({}, np.float32, lambda c, q, k, v: (q, k, v, q, False)),
        "out holding k's bytes": ({}, np.float32, lambda c, q, k, v: sharing_out(q, k, v, 0)),
        "out holding v's bytes": ({}, np.float32, lambda c, q, k, v: sharing_out(q, k, v, 1)),
        "q reversed, reaching back into out": ({}, np.float32, reaching_back),
        "out strided": ({}, np.float32,
                        lambda c, q, k, v: (q, k, v, np.empty(q.shape[::-1], q.dtype).T, False)),
        "out float64": ({}, np.float32,
                        lambda c, q, k, v: (q, k, v, np.empty(q.shape, np.float64), False)),
        "out read-only": ({}, np.float32,
                          lambda c, q, k, v: (q, k, v, read_only(np.empty_like(q)), False)),
        "q with a NaN, check_finite": ({}, np.float32,
                                       lambda c, q, k, v: (nan(q), k, v, None, True)),
        "k with an infinity, check_finite": ({}, np.float32,
                                             lambda c, q, k, v: (q, inf(k), v, None, True)),
        "float64 q beyond float32": ({}, np.float32,
                                     lambda c, q, k, v: (f8(q) * 1e300, k, v, None, False)),
        "int8 k with a NaN": ({}, np.int8, lambda c, q, k, v: (q, nan(k), v, None, False)),
        "int8 k float64": ({}, np.int8, lambda c, q, k, v: (q, f8(k), v, None, False)),
        "int8 v strided": ({}, np.int8,
                           lambda c, q, k, v: (q, k, np.asfortranarray(v), None, False)),
        "heads not a multiple": ({}, np.float32,
                                 lambda c, q, k, v: (q[:, :1].repeat(3, axis=1), k, v, None,
                                                     False)),
    }


def sharing_out(q, k, v, which):
    """An out whose bytes hold k (which = 0) or v (1), read backwards: the
    kernel's items store one (row, head)'s new rows while another writes
    its output, so the general path, which stores them first, takes it."""
    out = np.empty_like(q)
    out[...] = (k, v)[which][::-1]
    kv = [k, v]
    kv[which] = out[::-1]
    return q, kv[0], kv[1], out, False


def reaching_back(cache, q, k, v):
    """q in every other element of a buffer, read backwards from its end, and
    out the buffer's first half: q starts past out's end but overlaps it."""
    buffer = np.zeros(2 * q.size, q.dtype)
    out = buffer[:q.size].reshape(q.shape)
    back = buffer[::-2].reshape(q.shape)
    back[...] = q
    return back, k, v, out, False


def view_of_the_slots_written(cache, q, k, v):
    """Two positions, k a view of slots 4, 5 (cache holds 5): copied into
    slots 5, 6 in order, slot 5 would be overwritten before it is read."""
    k = np.asarray(cache.arena)[1, 0, :, :, 4:6]
    return twice(q), k, twice(v), None, False


def twice(x):
    return np.concatenate([x, x], axis=2)


def at(x, i, value):
    """A copy of ``x`` with element ``i`` (flat) set to ``value``."""
    x = x.copy()
    x.flat[i] = value
    return x


def nan(x):
    x = x.copy()
    x.flat[3] = np.nan
    return x


def inf(x):
    x = x.copy()
    x.flat[5] = -np.inf
    return x


def read_only(x):
    x.flags.writeable = False
    return x


@pytest.mark.parametrize("name", list(not_plain_cases()))
def test_calls_that_are_not_plain_touch_nothing_and_go_the_general_way(name, rng):
    options, dtype, make = not_plain_cases()[name]
    B, H, D, S, T = 2, 2, 8, 16, 1
    direct, public, general = twins(rng, dtype, B, H, D, S, 5, **options)
    q, k, v = plain_inputs(rng, dtype, B, H, 1, D, T)
    calls = [make(cache, q, k, v) for cache in (direct, public, general)]
    before = state(direct)
    qq, kk, vv, out, finite = calls[0]
    assert try_plain(direct, 1, qq, kk, vv, out, finite) is None
    assert state(direct) == before
    results = []
    for cache, (qq, kk, vv, out, finite) in zip((public, general), calls[1:]):
        cache.check_finite = finite
        try:
            results.append(cache.attend(1 if cache is public else np.intp(1), qq, kk, vv, out=out))
        except (TypeError, ValueError) as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    got, want = results
    if isinstance(want, str):
        assert got == want
    else:
        assert got.tobytes() == want.tobytes()
    assert state(public) == state(general)


def fill(cache, rng, lengths):
    """Write and commit ``lengths[b]`` random positions in row b."""
    B, H, D = cache.batch_size, cache.num_heads, cache.head_dim
    k, v = rng.standard_normal((2, B, H, max(lengths), D)).astype(np.float32)
    cache.update(1, k, v)
    cache.advance(list(lengths))


def ragged(cache, rng):
    fill(cache, rng, [5, 3])
    return 1


def turned_ring(cache, rng):
    fill(cache, rng, [cache.window] * 2)
    fill(cache, rng, [cache.n_sink] * 2)     # full
    fill(cache, rng, [1, 1])                 # evicts: the ring turns by one
    cache.crop(-3)                           # room again, the ring still turned
    assert cache._ring.any()
    return 1


def beyond_max_seq_len(cache, rng):
    fill(cache, rng, [cache.max_seq_len - 1] * 2)
    return 2


def beyond_the_window(cache, rng):
    return cache.window + 1          # fits max_seq_len, not the window


@pytest.mark.parametrize("setup", [ragged, turned_ring, beyond_max_seq_len, beyond_the_window],
                         ids=lambda f: f.__name__)
def test_positions_that_are_not_plain_go_the_general_way(setup, rng):
    B, H, D, S = 2, 2, 8, 12
    n_sink = 2 if setup in (turned_ring, beyond_the_window) else None
    caches = twins(rng, np.float32, B, H, D, S, 0, n_sink=n_sink)
    seeds = rng.integers(2**32)
    Ts = [setup(cache, np.random.default_rng(seeds)) for cache in caches]
    direct, public, general = caches
    q, k, v = plain_inputs(rng, np.float32, B, H, 1, D, Ts[0])
    before = state(direct)
    assert try_plain(direct, 1, q, k, v) is None
    assert state(direct) == before
    results = []
    for cache, layer in ((public, 1), (general, np.intp(1))):
        try:
            results.append(cache.attend(layer, q, k, v).tobytes())
        except ValueError as exc:
            results.append(str(exc))
    assert results[0] == results[1]
    assert state(public) == state(general)
