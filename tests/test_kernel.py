"""The attention kernel against the float64 NumPy reference."""

import itertools

import numpy as np
import pytest

from kvarena import KVCache, attend_reference

S = 40  # capacity of the grid's caches
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def fill(cache, layer, rng, n, scale=1.0):
    """Write n random cached positions into ``layer`` and advance."""
    shape = (cache.batch_size, cache.num_heads, n, cache.head_dim)
    cache.update(layer, rng.standard_normal(shape) * scale, rng.standard_normal(shape))
    cache.advance(n)


def check_against_reference(cache, layer, rng, T, q_scale=1.0):
    B, H, D = cache.batch_size, cache.num_heads, cache.head_dim
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    q *= q_scale
    cached = cache.seq_pos
    out = cache.attend(layer, q, k, v)
    # the reference reads the arena as stored (after the cast), in float64
    arena = np.asarray(cache.arena)
    want = attend_reference(q.astype(cache.dtype), arena[layer, 0], arena[layer, 1], [cached] * B)
    err = relative_error(out, want)
    assert out.shape == (B, H, T, D) and out.dtype == cache.dtype
    assert err <= TOLERANCE[cache.dtype.type], (
        f"relative error {err:.3g} for B={B} H={H} D={D} n={cached + T} T={T} {cache.dtype}")


GRID = list(itertools.product([1, 3], [1, 4, 12], [1, 7, 64, 128], [1, 2, 17, S]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H,D,n", GRID)
def test_single_token_decode_matches_reference(B, H, D, n, dtype, rng):
    cache = KVCache(B, S, 2, H, D, dtype=dtype)
    if n > 1:
        fill(cache, 1, rng, n - 1)
    check_against_reference(cache, 1, rng, T=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cached,T", [(0, 1), (0, 5), (7, 4), (3, S - 3), (0, S)])
def test_prefill_block_is_causal_and_matches_reference(cached, T, dtype, rng):
    cache = KVCache(2, S, 1, 3, 16, dtype=dtype)
    if cached:
        fill(cache, 0, rng, cached)
    check_against_reference(cache, 0, rng, T=T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_scores_stay_finite_and_exact(dtype, rng):
    # scores in the thousands: exp() overflows without the max subtraction
    cache = KVCache(2, S, 1, 4, 64, dtype=dtype)
    fill(cache, 0, rng, 30, scale=30.0)
    check_against_reference(cache, 0, rng, T=1, q_scale=30.0)


def test_hand_worked_case():
    # D = 1, so scores are q*k / sqrt(1): keys 0 and ln 3 give weights
    # 1/4 and 3/4; values 4 and 8 then average to 1 + 6 = 7
    cache = KVCache(1, 4, 1, 1, 1, dtype=np.float64)
    cache.update(0, [[[[0.0]]]], [[[[4.0]]]])
    cache.advance()
    out = cache.attend(0, [[[[1.0]]]], [[[[np.log(3.0)]]]], [[[[8.0]]]])
    assert out[0, 0, 0, 0] == pytest.approx(7.0, rel=1e-15)


def test_float16_arena_computes_in_float32(rng):
    cache = KVCache(2, S, 1, 4, 32, dtype=np.float16)
    fill(cache, 0, rng, 10)
    q, k, v = (rng.standard_normal((2, 4, 1, 32)) for _ in range(3))
    out = cache.attend(0, q, k, v)
    arena = np.asarray(cache.arena)
    want = attend_reference(q, arena[0, 0], arena[0, 1], [10, 10])
    assert out.dtype == np.float32
    assert relative_error(out, want) <= 1e-5


def test_one_and_two_threads_give_identical_results(rng):
    shape = (4, 8, 1024, 64)   # large enough to run in parallel
    keys, values = rng.standard_normal(shape), rng.standard_normal(shape)
    q, k, v = (rng.standard_normal((4, 8, 1, 64)) for _ in range(3))
    outputs = []
    for threads in (1, 2):
        cache = KVCache(4, 1025, 1, 8, 64, num_threads=threads)
        cache.update(0, keys, values)
        cache.advance(1024)
        outputs.append(cache.attend(0, q, k, v))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_attend_leaves_inputs_unmodified_and_writes_like_update(rng):
    cache = KVCache(2, S, 2, 3, 8)
    fill(cache, 1, rng, 5)
    q, k, v = (rng.standard_normal((2, 3, 2, 8)).astype(np.float32) for _ in range(3))
    copies = [a.copy() for a in (q, k, v)]
    cache.attend(1, q, k, v)
    for original, copy in zip((q, k, v), copies):
        np.testing.assert_array_equal(original, copy)
    assert cache.seq_pos == 5, "attend must not advance"
    cache.advance(2)
    keys, values = cache.get(1)
    np.testing.assert_array_equal(keys[:, :, 5:], k)
    np.testing.assert_array_equal(values[:, :, 5:], v)
