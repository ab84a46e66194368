"""int8 storage: one scale per stored D-vector, in the arena's one allocation.

1. what is stored is exactly ``quantize`` below (absmax / 127, rounding to
   nearest, ties to even), and ``get`` returns ``data * scale``;
2. attention over an int8 cache is attention over the exactly quantized
   keys and values, on every instruction set and thread count, for decode,
   prefill, grouped-query, ragged rows and strided queries; and its error
   against the unquantized float64 reference is no worse than 1.25x the
   error of the format itself;
3. data and scales are two views of one buffer of ``footprint().total_bytes``;
4. scales move with their data through every operation (reorder, forks,
   crop, the sliding window, reset, deepcopy, save/load, mapped files).
"""

import copy
import struct
import tracemalloc

import numpy as np
import pytest

from kvarena import CacheFileError, KVCache, attend_reference, footprint, kernel
from kvarena.kernel import forced_isa
from kvarena.storage import FORMAT_VERSION

B, H, D = 2, 3, 64


def quantize(x):
    """``(data, scales)`` of float32 ``x`` (..., D) as the cache stores it."""
    x = np.asarray(x, dtype=np.float32)
    big = np.abs(x).max(axis=-1)
    scales = big / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(big > 0, np.float32(127) / big, np.float32(0)).astype(np.float32)
    data = np.rint(x * inv[..., None]).astype(np.int8)
    return data, scales.astype(np.float32)


def dequantized(x):
    data, scales = quantize(x)
    return data.astype(np.float32) * scales[..., None]


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def relative(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def filled(dtype, lengths, T_new=0, seed=0, **options):
    """A cache with rows of ``lengths`` committed and the float32 keys and
    values written (B, H, max(lengths) + T_new, D)."""
    S = max(lengths) + max(T_new, 1) + 3
    cache = KVCache(B, S, 2, H, D, dtype=dtype, **options)
    n = max(lengths)
    k, v = normal((B, H, n, D), seed), normal((B, H, n, D), seed + 1)
    for layer in range(2):
        cache.update(layer, k, v)
    cache.advance(list(lengths))
    return cache, k, v


# -- 1. what is stored -------------------------------------------------------------

def test_stored_values_are_exactly_absmax_over_127():
    cache, k, v = filled(np.int8, [7, 7])
    keys, key_scales, values, value_scales = cache.get_quantized(1)
    want_k, want_ks = quantize(k)
    want_v, want_vs = quantize(v)
    np.testing.assert_array_equal(keys, want_k)
    np.testing.assert_array_equal(key_scales, want_ks)
    np.testing.assert_array_equal(values, want_v)
    np.testing.assert_array_equal(value_scales, want_vs)
    # the absmax element of each vector is stored as +-127
    assert (np.abs(keys.astype(int)).max(axis=-1) == 127).all()


@pytest.mark.parametrize("isa", kernel.kernel_info()["isas"])
@pytest.mark.parametrize("D", [1, 7, 17, 64, 65])
def test_every_compiled_quantizer_stores_absmax_over_127(isa, D):
    # each instruction set's quantizer, vector body and scalar tail, against
    # NumPy; one vector's absmax is 127 so that its values are scaled by
    # exactly 1 and land on ties (0.5, 1.5, 2.5, ...: to even)
    x = normal((2, 3, 5, D), seed=D)
    ties = np.resize(np.float32([0.5, -1.5, 2.5, -3.5, 126.5, -0.5, 4.0]), D)
    ties[0] = 127
    x[1, 2, 4] = ties
    cache = KVCache(2, 5, 1, 3, D, dtype=np.int8)
    with forced_isa(isa):
        cache.update(0, x, x[:, :, ::-1])
    cache.advance(5)
    keys, key_scales, values, value_scales = cache.get_quantized(0)
    for got, got_scales, want in ((keys, key_scales, x), (values, value_scales, x[:, :, ::-1])):
        want_data, want_scales = quantize(want)
        np.testing.assert_array_equal(got, want_data)
        np.testing.assert_array_equal(got_scales, want_scales)
    if D > 1:
        assert keys[1, 2, 4, 1:5].tolist() == [-2, 2, -4, 126][:D - 1]


def test_worked_example():
    # one vector [0.5, -1.27, 0.01, 0 ...]: absmax 1.27, scale 0.01; 0.5 / 0.01
    # = 50, -1.27 -> -127, 0.01 -> 1
    cache = KVCache(1, 2, 1, 1, 4, dtype=np.int8)
    x = np.array([0.5, -1.27, 0.01, 0.0], dtype=np.float32).reshape(1, 1, 1, 4)
    cache.update(0, x, x)
    cache.advance()
    keys, scales, _, _ = cache.get_quantized(0)
    assert keys.ravel().tolist() == [50, -127, 1, 0]
    assert scales.ravel()[0] == np.float32(1.27) / np.float32(127)


def test_get_returns_data_times_scale_as_a_read_only_float32_copy():
    cache, _, _ = filled(np.int8, [5, 5])
    keys, values = cache.get(0)
    qk, ks, qv, vs = cache.get_quantized(0)
    assert keys.dtype == np.float32 and keys.shape == (B, H, 5, D)
    np.testing.assert_array_equal(keys, qk.astype(np.float32) * ks[..., None])
    np.testing.assert_array_equal(values, qv.astype(np.float32) * vs[..., None])
    assert not keys.flags.writeable and not np.shares_memory(keys, cache.arena)
    assert keys.data[0, 0, 0, 0] == keys[0, 0, 0, 0]         # TinyTorch's Tensor.data
    # caches: full capacity, dequantized when read
    full_k, full_v = cache.caches[0]
    assert full_k.shape == (B, H, cache.max_seq_len, D) and full_k.dtype == np.float32
    np.testing.assert_array_equal(full_k[:, :, :5], keys)
    assert len(cache.caches) == 2 and len(list(cache.caches)) == 2
    np.testing.assert_array_equal(cache.caches[-1][1], cache.caches[1][1])
    with pytest.raises(IndexError):
        cache.caches[2]


def test_raw_views_share_the_arena_and_are_read_only():
    cache, _, _ = filled(np.int8, [4, 6])
    qk, ks, qv, vs = cache.get_quantized(1, row=1)
    assert qk.shape == (1, H, 6, D) and ks.shape == (1, H, 6)
    assert qk.dtype == np.int8 and ks.dtype == np.float32
    assert np.shares_memory(qk, cache.arena) and np.shares_memory(ks, cache.scales)
    for view in (qk, ks, qv, vs, cache.arena, cache.scales):
        assert not view.flags.writeable
    assert cache.arena.dtype == np.int8 and cache.scales.shape == cache.arena.shape[:5]


def test_get_pending_and_rows():
    cache, k, v = filled(np.int8, [3, 5])
    new = normal((B, H, 2, D), 9)
    cache.update(0, new, new)
    keys, values = cache.get(0, row=0, pending=True)
    assert keys.shape == (1, H, 5, D)
    np.testing.assert_array_equal(keys[0, :, :3], dequantized(k[0, :, :3]))
    np.testing.assert_array_equal(keys[0, :, 3:], dequantized(new[0]))
    keys, _ = cache.get(0, row=1)
    assert keys.shape == (1, H, 5, D)
    with pytest.raises(ValueError, match="row must be given"):
        cache.get(0)


def test_all_zero_vectors_have_scale_zero():
    cache = KVCache(1, 4, 1, 2, D, dtype=np.int8)
    k = normal((1, 2, 2, D), 3)
    k[0, 1, 0] = 0.0                  # one zero vector
    k[0, 0, 1] = -0.0                 # and a negative-zero one
    cache.update(0, k, np.zeros_like(k))
    cache.advance(2)
    keys, key_scales, values, value_scales = cache.get_quantized(0)
    assert key_scales[0, 1, 0] == 0 and key_scales[0, 0, 1] == 0
    assert not keys[0, 1, 0].any() and not values.any() and not value_scales.any()
    out = cache.attend(0, normal((1, 2, 1, D), 4), k[:, :, :1], k[:, :, :1])
    assert np.isfinite(out).all()


def test_byte_swapped_float16_and_float64_inputs_quantize_as_float32():
    x = normal((B, H, 2, D), 5)
    stored = []
    for dtype in (np.float32, ">f4", np.float64):
        cache = KVCache(B, 4, 1, H, D, dtype=np.int8)
        cache.update(0, x.astype(dtype), x.astype(dtype)[:, :, ::-1].copy())
        cache.advance(2)
        stored.append([a.copy() for a in cache.get_quantized(0)])
    for other in stored[1:]:
        for a, b in zip(stored[0], other):
            np.testing.assert_array_equal(a, b)


def test_huge_finite_values_are_stored():
    # squares beyond float32 (the write's quick finiteness test) are not an error
    x = normal((B, H, 1, D), 8) * np.float32(1e30)
    cache = KVCache(B, 2, 1, H, D, dtype=np.int8)
    cache.update(0, x, -x)
    cache.advance()
    keys, key_scales, _, _ = cache.get_quantized(0)
    want_k, want_ks = quantize(x)
    np.testing.assert_array_equal(keys, want_k)
    np.testing.assert_array_equal(key_scales, want_ks)


def test_nonfinite_is_refused_with_or_without_check_finite():
    for check in (False, True):
        cache, _, _ = filled(np.int8, [2, 2], check_finite=check)
        before = cache.arena.tobytes(), cache.scales.tobytes()
        bad = normal((B, H, 1, D), 1)
        bad[0, 0, 0, 3] = np.nan
        with pytest.raises(ValueError, match="NaN or infinity"):
            cache.update(0, bad, bad)
        assert (cache.arena.tobytes(), cache.scales.tobytes()) == before


# -- 2. attention --------------------------------------------------------------------

def attention_case(lengths, T, G=1, strided=False, seed=0):
    """(q, k, v (B, H, n + T, D), cached) for rows of ``lengths``."""
    n = max(lengths) + T
    k, v = normal((B, H, n, D), seed), normal((B, H, n, D), seed + 1)
    if strided:      # (B, T, Hq, D) activations seen as (B, Hq, T, D)
        q = normal((B, T, G * H, D), seed + 2).transpose(0, 2, 1, 3)
    else:
        q = normal((B, G * H, T, D), seed + 2)
    return q, k, v


def run_int8(q, k, v, lengths, T, threads):
    cache = KVCache(B, max(lengths) + T, 1, H, D, dtype=np.int8, num_threads=threads)
    n = max(lengths)
    cache.update(0, k[:, :, :n], v[:, :, :n])
    cache.advance(list(lengths))
    # each row's new block follows its own cached positions
    new_k = np.stack([k[b, :, lengths[b]:lengths[b] + T] for b in range(B)])
    new_v = np.stack([v[b, :, lengths[b]:lengths[b] + T] for b in range(B)])
    return cache.attend(0, q, new_k, new_v)


CASES = {
    "decode": ([40, 40], 1, 1, False),
    "prefill": ([33, 33], 7, 1, False),
    "grouped-query": ([40, 40], 3, 2, False),
    "ragged": ([9, 70], 2, 1, False),
    "strided-q": ([20, 20], 4, 2, True),
    "long-split": ([700, 700], 1, 1, False),   # long enough for 2 threads to split rows
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", kernel.kernel_info()["isas"])
@pytest.mark.parametrize("name", list(CASES))
def test_attention_equals_the_exactly_quantized_reference(name, isa, threads):
    lengths, T, G, strided = CASES[name]
    q, k, v = attention_case(lengths, T, G, strided, seed=len(name))
    with forced_isa(isa):
        got = run_int8(q, k, v, lengths, T, threads)
    exact = attend_reference(q, dequantized(k), dequantized(v), lengths)
    truth = attend_reference(q, k, v, lengths)
    kernel_vs_quantized = relative(got, exact)
    format_error = relative(exact, truth)          # quantizing exactly, attending in float64
    kernel_error = relative(got, truth)
    assert kernel_vs_quantized < 2e-6, (name, isa, threads, kernel_vs_quantized)
    assert kernel_error <= 1.25 * format_error, (name, isa, threads, kernel_error, format_error)
    # N(0, 1) data: the format costs about 1% of the largest output
    assert 1e-4 < format_error < 0.05, format_error


def test_one_and_two_threads_agree():
    lengths, T = [700, 700], 1
    q, k, v = attention_case(lengths, T, seed=3)
    np.testing.assert_allclose(run_int8(q, k, v, lengths, T, 1),
                               run_int8(q, k, v, lengths, T, 2), rtol=0, atol=1e-5)


def test_float64_queries_give_float64_output():
    q, k, v = attention_case([10, 10], 1, seed=4)
    out = run_int8(q.astype(np.float64), k, v, [10, 10], 1, 1)
    assert out.dtype == np.float64


def test_error_distribution_next_to_float16():
    # the issue asks for int8's error next to float16's: int8 is the coarser
    lengths, T = [200, 200], 1
    q, k, v = attention_case(lengths, T, seed=6)
    truth = attend_reference(q, k, v, lengths)
    errors = {}
    for dtype in (np.float16, np.int8):
        cache = KVCache(B, 201, 1, H, D, dtype=dtype)
        cache.update(0, k[:, :, :200], v[:, :, :200])
        cache.advance(200)
        errors[np.dtype(dtype).name] = relative(cache.attend(0, q, k[:, :, 200:], v[:, :, 200:]),
                                                truth)
    assert errors["float16"] < errors["int8"] < 0.05, errors


# -- 3. one allocation ----------------------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True])
def test_data_and_scales_are_views_of_one_buffer(lazy):
    cache = KVCache(3, 100, 2, H, D, dtype=np.int8, lazy=lazy)
    buffer = cache._arena.base
    assert buffer is cache._scales.base and buffer.dtype == np.uint8
    assert np.shares_memory(buffer, cache.arena) and np.shares_memory(buffer, cache.scales)
    assert not np.shares_memory(cache.arena, cache.scales)
    fp = footprint(3, 100, 2, H, D, dtype=np.int8)
    # the buffer has 63 bytes of room, in which the arena starts on a 64-byte boundary
    assert buffer.nbytes == fp.total_bytes == cache.get_memory_usage()["total_bytes"]
    assert fp.arena_bytes == cache.arena.nbytes and fp.scale_bytes == cache.scales.nbytes
    start = cache.arena.__array_interface__["data"][0]
    assert start % 64 == 0 and 0 <= start - buffer.__array_interface__["data"][0] < 64
    # scales start on a 64-byte boundary after the data
    offset = cache.scales.__array_interface__["data"][0] - start
    assert offset % 64 == 0 and 0 <= offset - cache.arena.nbytes < 64


def test_memory_usage_worked_example():
    # (L, 2, B, H, S, D) = (5, 2, 3, 2, 17, 7): 7140 int8 values, padded to
    # 7168 (a multiple of 64), then 1020 float32 scales (4080 bytes); the
    # buffer has 63 bytes more, in which the arena starts on a 64-byte boundary
    cache = KVCache(3, 17, 5, 2, 7, dtype=np.int8)
    cache.advance(1)
    usage = cache.get_memory_usage()
    assert (usage["total_bytes"], usage["scale_bytes"]) == (7168 + 4080 + 63, 4080)
    assert usage["total_elements"] == 7140 and usage["dtype"] == "int8"
    assert usage["per_layer_mb"] == (7168 + 4080) / 2**20 / 5
    assert usage["used_mb"] == (7168 + 4080) / 17 / 2**20
    fp = footprint(3, 17, 5, 2, 7, dtype=np.int8)
    assert (fp.arena_bytes, fp.scale_bytes, fp.total_bytes) == (7140, 4080, 11311)


def test_bytes_per_element_at_head_dim_64():
    fp = footprint(4, 4096, 12, 12, 64, dtype=np.int8)
    per_element = fp.total_bytes / (fp.arena_bytes / 1)        # int8: one byte per element
    assert per_element == pytest.approx(68 / 64, abs=1e-6)      # and 63 bytes of room
    assert footprint(4, 4096, 12, 12, 64).total_bytes / fp.total_bytes == pytest.approx(64 * 4 / 68)


def test_construction_allocates_one_block_of_the_footprint():
    fp = footprint(2, 1000, 3, H, D, dtype=np.int8)
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        cache = KVCache(2, 1000, 3, H, D, dtype=np.int8)
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = [s.size_diff for s in snap1.compare_to(snap0, "traceback") if s.size_diff > 0]
    # one block the size of the whole footprint; everything else is small bookkeeping
    assert max(grown) == pytest.approx(fp.total_bytes, abs=256)
    assert sum(grown) - max(grown) < 0.01 * fp.total_bytes      # scales alone would be 6%
    assert cache.get_memory_usage()["scale_bytes"] == fp.scale_bytes


# -- 4. scales move with their data ----------------------------------------------------

def assert_mirrors(int8_cache, float_cache):
    """Every committed vector of the int8 cache is the float32 cache's, quantized."""
    for layer in range(int8_cache.num_layers):
        for b in range(int8_cache.batch_size):
            data = int8_cache.get_quantized(layer, row=b)
            want_k, want_v = float_cache.get(layer, row=b)
            for (got, got_scale), want in [(data[:2], want_k), (data[2:], want_v)]:
                q, s = quantize(want)
                np.testing.assert_array_equal(got, q)
                np.testing.assert_array_equal(got_scale, s)


def step(caches, seed, T=1):
    k, v = normal((B, H, T, D), seed), normal((B, H, T, D), seed + 1) * 3
    for cache in caches:
        for layer in range(cache.num_layers):
            cache.update(layer, k, v)
        cache.advance(T)


def twins(**options):
    return [KVCache(B, 12, 2, H, D, dtype=dtype, **options) for dtype in (np.int8, np.float32)]


def test_reorder_copy_sequence_and_crop_move_scales():
    caches = twins()
    step(caches, 0, T=5)
    for cache in caches:
        cache.copy_sequence(1, 0, length=3)
    assert_mirrors(*caches)
    step(caches, 10)
    for cache in caches:
        cache.reorder([1, 0])
    assert_mirrors(*caches)
    for cache in caches:
        cache.crop(-1)
    step(caches, 20, T=2)
    for cache in caches:
        cache.reorder([1, 1])
    assert_mirrors(*caches)


def test_sliding_window_moves_scales():
    caches = twins(n_sink=2)
    for i in range(30):
        step(caches, 100 + i, T=1 + i % 3)
        assert_mirrors(*caches)
    assert caches[0].evicted.tolist() == caches[1].evicted.tolist() != [0, 0]


def test_reset_zeroes_data_and_scales():
    cache = KVCache(B, 12, 2, H, D, dtype=np.int8, n_sink=1)
    step([cache], 0, T=8)
    cache.update(1, normal((B, H, 2, D), 5), normal((B, H, 2, D), 6))   # written, not committed
    cache.reset()
    assert not cache.arena.any() and not cache.scales.any()
    assert not cache.caches[1][0].any()


def test_deepcopy_is_independent_and_equal():
    caches = twins()
    step(caches, 0, T=4)
    clone = copy.deepcopy(caches[0])
    assert_mirrors(clone, caches[1])
    assert not np.shares_memory(clone.scales, caches[0].scales)
    step([clone], 50)
    assert_mirrors(caches[0], caches[1])          # the original is untouched
    assert caches[0].seq_pos == 4 and clone.seq_pos == 5


# -- 5. files ---------------------------------------------------------------------------

def ragged_pair():
    caches = twins()
    step(caches, 0, T=6)
    for cache in caches:
        cache.crop(5)
        cache.copy_sequence(0, 1, length=2)
    return caches


def test_snapshot_round_trip_is_bit_exact(tmp_path):
    cache, floats = ragged_pair()
    cache.save(tmp_path / "c.kvs")
    loaded = KVCache.load(tmp_path / "c.kvs")
    assert loaded.dtype == np.int8 and loaded.seq_lens.tolist() == [5, 2]
    for layer in range(2):
        for b in range(B):
            for got, want in zip(loaded.get_quantized(layer, row=b),
                                 cache.get_quantized(layer, row=b)):
                assert got.tobytes() == want.tobytes()
    assert_mirrors(loaded, floats)
    # written in the current format version, as float snapshots are
    assert struct.unpack_from("<I", (tmp_path / "c.kvs").read_bytes(), 8)[0] == FORMAT_VERSION


def test_snapshot_scales_are_checksummed(tmp_path):
    cache, _ = ragged_pair()
    cache.save(tmp_path / "c.kvs")
    raw = bytearray((tmp_path / "c.kvs").read_bytes())
    raw[-1] ^= 0x40                    # the last scale of the last block
    (tmp_path / "c.kvs").write_bytes(bytes(raw))
    with pytest.raises(CacheFileError, match="payload checksum mismatch"):
        KVCache.load(tmp_path / "c.kvs")


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_mapped_arena_holds_the_scales(tmp_path, mode):
    path = tmp_path / "c.kvm"
    cache = KVCache(B, 12, 2, H, D, dtype=np.int8, path=path)
    floats = KVCache(B, 12, 2, H, D)
    step([cache, floats], 0, T=5)
    expected = cache.arena.tobytes(), cache.scales.tobytes()
    fp = footprint(B, 12, 2, H, D, dtype=np.int8)
    assert path.stat().st_size - fp.total_bytes > 0
    del cache
    reopened = KVCache.open(path, mode)
    assert (reopened.arena.tobytes(), reopened.scales.tobytes()) == expected
    assert_mirrors(reopened, floats)
    # mapped from the file: none of the room an in-memory arena takes to align
    assert reopened.get_memory_usage()["total_bytes"] == fp.total_bytes - 63
    step([reopened, floats], 40)
    assert_mirrors(reopened, floats)


# -- 6. the reference models ---------------------------------------------------------------

def test_both_reference_models_run_on_an_int8_cache():
    from kvarena import disable_kv_cache, enable_kv_cache
    from kvarena.models import GPT, Llama

    tokens = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
    gpt = GPT(64, 64, 2, 2, 32, seed=0)
    llama = Llama(64, 64, 2, 4, 32, n_kv_heads=2, seed=0)
    uncached = gpt.forward(tokens), llama.forward(tokens)
    cache = enable_kv_cache(gpt, batch_size=2, dtype=np.int8)
    try:
        # prefill 4 tokens, then 2 one at a time: logits of the last two positions
        gpt.forward(tokens[:, :4])
        cache.advance(4)
        got_gpt = []
        for t in (4, 5):
            got_gpt.append(gpt.forward(tokens[:, t:t + 1])[:, 0])
            cache.advance()
    finally:
        disable_kv_cache(gpt)
    cache = llama.make_cache(2, dtype=np.int8)
    llama.forward(tokens[:, :4], cache=cache)
    cache.advance(4)
    got_llama = []
    for t in (4, 5):
        got_llama.append(llama.forward(tokens[:, t:t + 1], cache=cache)[:, 0])
        cache.advance()
    for got, want in [(got_gpt, uncached[0]), (got_llama, uncached[1])]:
        err = relative(np.stack(got, axis=1), want[:, 4:])
        # int8 keys and values move the logits by about 1%, not more
        assert 1e-5 < err < 0.05, err


def test_int8_sliding_window_ring_after_many_wraps(tmp_path, rng):
    # the ring (issue 13) and int8 storage together: quantized at the ring's
    # slots, scales read through them, in get, attend, copy_sequence and save;
    # a float32 window fed the dequantized values is the model
    B, S, H, D = 2, 9, 2, 8
    cache = KVCache(B, S, 1, H, D, dtype=np.int8, n_sink=2)
    model = KVCache(B, S, 1, H, D, n_sink=2)
    for step in range(40):                       # 7 window slots, wrapped 5 times
        k, v = rng.standard_normal((2, B, H, 1, D)).astype(np.float32)
        q = rng.standard_normal((B, H, 1, D))
        out = cache.attend(0, q, k, v)
        want = model.attend(0, q, dequantized(k), dequantized(v))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        cache.advance()
        model.advance()
    assert cache.ring_head.tolist() == model.ring_head.tolist() != [0, 0]
    for got, want in zip(cache.get(0), model.get(0)):
        np.testing.assert_array_equal(got, want)
    raw = cache.get_quantized(0)                 # in position order, as get()
    np.testing.assert_array_equal(raw[0] * raw[1][..., None], cache.get(0)[0])
    cache.copy_sequence(0, 1)
    model.copy_sequence(0, 1)
    np.testing.assert_array_equal(cache.get(0, row=1)[1], model.get(0, row=1)[1])
    cache.save(tmp_path / "w.kvs")
    loaded = KVCache.load(tmp_path / "w.kvs")
    for got, want in zip(loaded.get_quantized(0), cache.get_quantized(0)):
        assert got.tobytes() == want.tobytes()
