"""Reliability contracts: no leaks, reset hides old data, threads, untouched inputs.

(a) 10^5 update/get/attend calls and 1,000 caches created and dropped leave
    the resident set flat and the inputs' reference counts unchanged;
(b) after reset nothing written before (committed or not) is readable
    through any view the cache hands out;
(c) two threads on two caches give the bits a sequential run gives, and
    one and two kernel threads give the same bits;
(d) no public function modifies its array arguments.
(The accessor's own checks of indices and shapes: test_adversarial.py.)
"""

import gc
import sys
import threading
import weakref

import numpy as np
import psutil
import pytest

from kvarena import KVCache, attend_reference, enable_kv_cache
from kvarena.models import GPT, CachedMultiHeadAttention

MIB = 1024 * 1024


def rss():
    gc.collect()
    return psutil.Process().memory_info().rss


def normal(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- (a) leaks -----------------------------------------------------------------

def test_many_calls_leak_neither_memory_nor_references():
    B, S, L, H, D = 2, 16, 2, 2, 4
    cache = KVCache(B, S, L, H, D)
    q, k, v = (normal((B, H, 1, D), seed) for seed in range(3))
    k64 = k.astype(np.float64)          # goes through a conversion on every call
    inputs = (q, k, v, k64)

    def run(n):
        for i in range(n):
            layer = i % L
            cache.update(layer, k64, v)
            cache.get(layer)
            cache.attend(layer, q, k, v)
            if layer == L - 1:
                cache.advance(1)
                if cache.seq_pos == S:
                    cache.reset()

    run(2_000)                           # warm up allocator pools and caches
    refs = [sys.getrefcount(a) for a in inputs]
    before = rss()
    run(100_000)
    grown = rss() - before
    assert [sys.getrefcount(a) for a in inputs] == refs
    # one leaked 64-byte output per attend call would be > 10 MiB here
    assert grown < 4 * MIB, f"RSS grew by {grown / MIB:.1f} MiB over 10^5 calls"


def test_created_and_dropped_caches_free_their_arenas():
    # 2 * 2 * 4 * 64 * 64 * 4 bytes = 256 KiB per arena: 1,000 leaked would be 250 MiB
    def cycle():
        cache = KVCache(4, 64, 2, 4, 64)
        cache.update(1, normal((4, 4, 3, 64), 0), normal((4, 4, 3, 64), 1))
        cache.advance(3)
        cache.attend(0, *(normal((4, 4, 1, 64), s) for s in range(3)))
        return weakref.ref(cache), weakref.ref(cache._arena)

    for _ in range(20):
        cycle()
    before = rss()
    for _ in range(1_000):
        cache_ref, arena_ref = cycle()
        assert cache_ref() is None and arena_ref() is None
    grown = rss() - before
    assert grown < 4 * MIB, f"RSS grew by {grown / MIB:.1f} MiB over 1,000 caches"


# -- (b) reset hygiene -------------------------------------------------------

SENTINEL = 12345.678


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_reset_leaves_no_trace_of_old_data(dtype):
    B, S, L, H, D = 2, 10, 3, 2, 4
    cache = KVCache(B, S, L, H, D, dtype=dtype)
    mark = np.asarray(SENTINEL, dtype=dtype)
    block = np.full((B, H, 4, D), SENTINEL)
    for layer in range(L):                                 # positions 0..3, committed
        cache.update(layer, block, block)
    cache.advance(4)
    for layer in range(L):                                 # 4..5 by attend, 4..7 by update:
        cache.attend(layer, block[:, :, :2], block[:, :, :2], block[:, :, :2])
        cache.update(layer, block, block)                  # written, never advanced
    assert np.count_nonzero(cache.arena == mark) == L * 2 * B * H * 8 * D

    cache.reset()
    assert cache.seq_pos == 0
    cache.advance(S)                                       # make get() show every position
    views = [cache.arena] + [view for pair in cache.caches for view in pair]
    views += [view for layer in range(L) for view in cache.get(layer)]
    for view in views:
        assert not np.any(view == mark)
        assert not np.any(view)                            # nothing else left either


# -- (c) threads -------------------------------------------------------------

def decode(cache, seed, steps=24):
    """Fill most of ``cache`` in one update, then attend ``steps`` single tokens."""
    B, H, D = cache.batch_size, cache.num_heads, cache.head_dim
    n = cache.max_seq_len - steps
    cache.update(0, normal((B, H, n, D), seed), normal((B, H, n, D), seed + 1))
    cache.advance(n)
    outs = []
    for step in range(steps):
        q, k, v = (normal((B, H, 1, D), seed + 10 + 3 * step + i) for i in range(3))
        outs.append(cache.attend(0, q, k, v))
        cache.advance(1)
    return outs


def test_two_threads_on_two_caches_equal_a_sequential_run():
    shape = dict(batch_size=4, max_seq_len=1024, num_layers=1, num_heads=8, head_dim=64)
    sequential = [decode(KVCache(**shape, num_threads=2), seed) for seed in (0, 1000)]

    caches = [KVCache(**shape, num_threads=2) for _ in range(2)]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            results[i] = decode(caches[i], 1000 * i)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential, strict=True):
        assert [o.tobytes() for o in got] == [o.tobytes() for o in want]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T", [1, 16])
def test_one_and_two_kernel_threads_give_identical_bits(dtype, T):
    # B * H = 32 rows over 2048 positions: far above the kernel's threshold
    # for going parallel (2**16 multiply-adds)
    B, H, S, D = 4, 8, 2048, 64
    n = S - T
    keys, values = normal((B, H, n, D), 1, dtype), normal((B, H, n, D), 2, dtype)
    q, k, v = (normal((B, H, T, D), seed, dtype) for seed in (3, 4, 5))
    outs = []
    for threads in (1, 2):
        cache = KVCache(B, S, 1, H, D, dtype=dtype, num_threads=threads)
        cache.update(0, keys, values)
        cache.advance(n)
        outs.append(cache.attend(0, q, k, v))
    assert outs[0].tobytes() == outs[1].tobytes()
    want = attend_reference(q, cache.arena[0, 0], cache.arena[0, 1], [n] * B)
    np.testing.assert_allclose(outs[1], want, rtol=1e-4 if dtype == "float32" else 1e-10, atol=1e-6)


# -- (d) inputs are never modified ---------------------------------------------

def layouts(a):
    """``a`` as C-contiguous, float64, byte-swapped, strided and Fortran arrays."""
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    strided = big[tuple(slice(1, None, 2) for _ in a.shape)]
    strided[...] = a
    return {
        "c": a.copy(),
        "float64": a.astype(np.float64),
        "byte-swapped": a.astype(a.dtype.newbyteorder(">")),
        "strided": strided,
        "fortran": np.asfortranarray(a),
    }


class Frozen:
    """Copies of arrays, to check later that nothing changed them."""

    def __init__(self, *arrays):
        self.arrays = arrays
        self.saved = [(a.copy(), a.strides, a.dtype, a.flags.writeable) for a in arrays]

    def check(self):
        for a, (copy, strides, dtype, writeable) in zip(self.arrays, self.saved, strict=True):
            assert a.dtype == dtype and a.strides == strides and a.flags.writeable == writeable
            assert a.tobytes() == copy.tobytes(), "an input array was modified"


@pytest.mark.parametrize("layout", ["c", "float64", "byte-swapped", "strided", "fortran"])
def test_cache_methods_leave_inputs_untouched(layout):
    B, S, L, H, D = 2, 8, 2, 2, 4
    cache = KVCache(B, S, L, H, D)
    q, k, v = (layouts(normal((B, H, 3, D), seed))[layout] for seed in range(3))
    frozen = Frozen(q, k, v)
    cache.update(0, k, v)
    frozen.check()
    cache.advance(3)
    cache.attend(1, q, k, v)
    frozen.check()
    arena = cache.arena.copy()
    keys, values = cache.get(1)
    assert cache.arena.tobytes() == arena.tobytes()
    # the reference is public too
    frozen_views = Frozen(keys, values)
    attend_reference(q, keys, values, [0] * B)
    frozen.check()
    frozen_views.check()


@pytest.mark.parametrize("layout", ["c", "float64", "byte-swapped", "strided", "fortran"])
def test_attention_forward_leaves_x_untouched(layout):
    mha = CachedMultiHeadAttention(8, 2, rng=0)
    x = layouts(normal((1, 3, 8), 7))[layout]
    frozen = Frozen(x)
    mha.forward(x)
    frozen.check()
    mha.forward(x, cache=KVCache(1, 4, 1, 2, 4), layer_idx=0)
    frozen.check()


@pytest.mark.parametrize("cached", [False, True])
def test_gpt_generate_and_forward_leave_tokens_untouched(cached):
    model = GPT(11, 8, 2, 2, 12, seed=0)
    if cached:
        enable_kv_cache(model)
    prompts = [np.array([1, 2, 3]), np.array([[4, 5]], dtype=np.int32),
               np.array([[9, 8, 7, 6]])[:, ::2], np.array([3, 1], dtype=">i8")]
    frozen = Frozen(*prompts)
    for prompt in prompts:
        model.generate(prompt, 3)
        model.generate(prompt, 2, temperature=0.7, seed=1)
    frozen.check()
    tokens = np.array([[1, 2], [3, 4]])[:1]
    frozen = Frozen(tokens)
    model.forward(tokens)
    frozen.check()
