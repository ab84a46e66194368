"""Rows of different lengths, and the operations that move, fork, cut and clear rows.

The cache is checked against ``Rows``, an independent NumPy model of what each
row holds: per layer and row, the committed keys and values, rounded to the
arena's dtype and kept in float64. Attention outputs are compared with the
float64 oracle ``attend_reference`` run over that model (never over the
arena), and arena contents are compared with the model bit-exactly.

Inputs are fresh standard-normal draws from the ``rng`` fixture; the padding
of a right-padded prefill is drawn 100x larger, so attending to it by mistake
would move the output far beyond any tolerance.
"""

import numpy as np
import pytest

from kvarena import CacheView, KVCache
from kvarena.reference import attend_reference
from test_int8 import dequantized

B, S, L, H, D = 3, 16, 2, 2, 8
PROMPTS = [5, 3, 4]              # true prompt length of each row
PAD = max(PROMPTS)               # the padded prefill block

DTYPES = [np.float64, np.float32, np.float16, np.int8]
# Output vs the float64 oracle on the same (rounded) inputs, relative to the
# largest value attended to: an output is a convex combination of values, so
# its rounding error scales with them (the 100x padding included), not with
# the output itself, which may cancel to near zero.
TOLERANCE = {np.dtype(np.float64): 1e-12,
             np.dtype(np.float32): 1e-5,
             np.dtype(np.float16): 1e-5,   # stored in float16, computed in float32
             np.dtype(np.int8): 1e-5}      # stored quantized, computed in float32


def rand(rng, T, batch=B):
    return rng.standard_normal((batch, H, T, D))


class Rows:
    """What each row of a cache must hold: keys and values per layer and row, (H, n, D)."""

    def __init__(self, dtype, batch=B):
        self.dtype = np.dtype(dtype)
        self.compute = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)
        empty = np.empty((H, 0, D))
        self.keys = [[empty] * batch for _ in range(L)]
        self.values = [[empty] * batch for _ in range(L)]

    def stored(self, x):
        """``x`` as the arena stores it, in float64."""
        if self.dtype == np.int8:
            return dequantized(x).astype(np.float64)
        return np.asarray(x).astype(self.dtype).astype(np.float64)

    def lens(self, layer=0):
        return [k.shape[1] for k in self.keys[layer]]

    def expected(self, layer, q, k, v):
        """The oracle's output for ``attend(layer, q, k, v)``: each row's prefix, then the new block."""
        T = q.shape[2]
        lens = self.lens(layer)
        keys = np.full((len(lens), H, max(lens) + T, D), np.nan)   # past each row: never read
        values = keys.copy()
        for b, n in enumerate(lens):
            keys[b, :, :n], keys[b, :, n:n + T] = self.keys[layer][b], self.stored(k[b])
            values[b, :, :n], values[b, :, n:n + T] = self.values[layer][b], self.stored(v[b])
        q = np.asarray(q).astype(self.compute).astype(np.float64)
        return attend_reference(q, keys, values, lens), np.nanmax(np.abs(values), initial=0)

    def check(self, layer, out, q, k, v):
        """Assert that ``out`` is the cache's ``attend(layer, q, k, v)`` within tolerance."""
        want, scale = self.expected(layer, q, k, v)
        # the result keeps q's dtype when q is float32 or float64 (rand gives float64)
        assert out.dtype == np.asarray(q).dtype and out.shape == want.shape
        tol = TOLERANCE[self.dtype]
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * scale)

    def append(self, layer, k, v, counts):
        """Commit the first ``counts[b]`` positions of the block to row ``b``."""
        for b, n in enumerate(counts):
            self.keys[layer][b] = np.concatenate([self.keys[layer][b], self.stored(k[b, :, :n])], axis=1)
            self.values[layer][b] = np.concatenate([self.values[layer][b], self.stored(v[b, :, :n])], axis=1)

    def gather(self, idx):
        self.keys = [[rows[i] for i in idx] for rows in self.keys]
        self.values = [[rows[i] for i in idx] for rows in self.values]

    def copy_sequence(self, src, dst, length):
        for layer in range(L):
            self.keys[layer][dst] = self.keys[layer][src][:, :length]
            self.values[layer][dst] = self.values[layer][src][:, :length]

    def truncate(self, lens):
        for layer in range(L):
            self.keys[layer] = [k[:, :n] for k, n in zip(self.keys[layer], lens)]
            self.values[layer] = [v[:, :n] for v, n in zip(self.values[layer], lens)]


def assert_holds(cache, model):
    """The cache's lengths and committed contents equal the model's, bit-exactly."""
    assert cache.seq_lens.tolist() == model.lens()
    assert cache.seq_pos == max(model.lens())
    for layer in range(L):
        for b in range(cache.batch_size):
            keys, values = cache.get(layer, row=b)
            np.testing.assert_array_equal(keys[0].astype(np.float64), model.keys[layer][b])
            np.testing.assert_array_equal(values[0].astype(np.float64), model.values[layer][b])


def attend_all(cache, model, rng, T=1, counts=None):
    """One step: ``attend`` every layer, check against the oracle, commit ``counts`` (default T) per row.

    Returns the blocks fed per layer and the outputs.
    """
    fed, outs = [], []
    for layer in range(L):
        q, k, v = rand(rng, T, cache.batch_size), rand(rng, T, cache.batch_size), rand(rng, T, cache.batch_size)
        if counts is not None:   # right padding: garbage the rows must never attend to
            for b, n in enumerate(counts):
                k[b, :, n:] *= 100
                v[b, :, n:] *= 100
        out = cache.attend(layer, q, k, v)
        model.check(layer, out, q, k, v)
        fed.append((q, k, v))
        outs.append(out)
    for layer, (_, k, v) in enumerate(fed):
        model.append(layer, k, v, [T] * cache.batch_size if counts is None else counts)
    cache.advance(T if counts is None else counts)
    assert_holds(cache, model)
    return fed, outs


def ragged_cache(rng, dtype=np.float64):
    """A cache and its model after a right-padded prefill of PROMPTS."""
    cache, model = KVCache(B, S, L, H, D, dtype=dtype), Rows(dtype)
    attend_all(cache, model, rng, T=PAD, counts=PROMPTS)
    return cache, model


# -- 1. ragged decoding --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_ragged_decode_equals_the_oracle_and_one_cache_per_row(rng, dtype):
    cache, model = KVCache(B, S, L, H, D, dtype=dtype), Rows(dtype)
    fed, outs = attend_all(cache, model, rng, T=PAD, counts=PROMPTS)
    assert cache.seq_lens.tolist() == PROMPTS and cache.seq_pos == PAD

    # each row alone in a batch-of-1 cache, fed its true prompt without padding,
    # gives the same bits: rows are computed independently, padding and all
    # (the float16 path included, whose NumPy matmul sees a shorter block here)
    alone = [KVCache(1, S, L, H, D, dtype=dtype) for _ in range(B)]
    for b, (single, n) in enumerate(zip(alone, PROMPTS)):
        for layer, (q, k, v) in enumerate(fed):
            got = single.attend(layer, q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
            assert got.tobytes() == outs[layer][b:b + 1, :, :n].tobytes(), "row differs from its own cache"
        single.advance(n)

    for _ in range(4):
        fed, outs = attend_all(cache, model, rng)
        for b, single in enumerate(alone):
            for layer, (q, k, v) in enumerate(fed):
                got = single.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                assert got.tobytes() == outs[layer][b:b + 1].tobytes(), "row differs from its own cache"
            single.advance(1)
    assert cache.seq_lens.tolist() == [n + 4 for n in PROMPTS]


def test_first_decode_overwrites_the_padding(rng):
    cache, model = ragged_cache(rng)
    padded = cache.arena.copy()
    attend_all(cache, model, rng)
    for b, n in enumerate(PROMPTS):
        if n < PAD:   # position n held padding; it now holds the new key
            assert not np.array_equal(cache.arena[:, :, b, :, n], padded[:, :, b, :, n])
            np.testing.assert_array_equal(cache.arena[:, :, b, :, n + 1:PAD], padded[:, :, b, :, n + 1:PAD])


# -- 2. per-row advance, get(row), seq_pos -------------------------------------

def test_per_row_advance_get_row_and_seq_pos(rng):
    cache = KVCache(B, S, L, H, D)
    blocks = [(rand(rng, 4), rand(rng, 4)) for _ in range(L)]
    for layer, (k, v) in enumerate(blocks):
        cache.update(layer, k, v)

    def assert_rows(lens):
        assert cache.seq_lens.tolist() == lens and cache.seq_pos == max(lens)
        for layer, (k, v) in enumerate(blocks):
            for b, n in enumerate(lens):
                got = cache.get(layer, row=b)
                for view, want in zip(got, (k, v)):
                    assert isinstance(view, CacheView) and view.shape == (1, H, n, D)
                    assert not view.flags.writeable
                    assert n == 0 or np.shares_memory(view, cache.arena)   # an empty view shares nothing
                    np.testing.assert_array_equal(view, want[b:b + 1, :, :n].astype(np.float32))

    cache.advance([0, 3, 1])
    assert cache.seq_lens.dtype == np.intp and cache.seq_lens.shape == (B,)
    assert_rows([0, 3, 1])
    with pytest.raises(ValueError, match=r"^row must be given"):
        cache.get(0)
    with pytest.raises(ValueError, match="read-only"):
        cache.seq_lens[0] = 2
    with pytest.raises(ValueError, match="read-only"):
        cache.get(1, row=1)[0][0, 0, 0, 0] = 1.0

    before = cache.arena.copy()
    cache.advance([0, 0, 0])
    assert_rows([0, 3, 1])
    cache.advance(np.array([1, 0, 2], dtype=np.int32))
    assert_rows([1, 3, 3])
    cache.advance(1)                      # an int advances every row
    assert_rows([2, 4, 4])
    np.testing.assert_array_equal(cache.arena, before)   # advancing writes nothing

    cache.seq_pos = 3                     # sets every row
    assert_rows([3, 3, 3])
    for layer, (k, v) in enumerate(blocks):   # equal rows: get without a row works
        keys, values = cache.get(layer)
        assert keys.shape == (B, H, 3, D) and np.shares_memory(keys, cache.arena)
        np.testing.assert_array_equal(keys, k[:, :, :3].astype(np.float32))
        np.testing.assert_array_equal(values, v[:, :, :3].astype(np.float32))
        np.testing.assert_array_equal(keys, np.concatenate([cache.get(layer, row=b)[0] for b in range(B)]))
    cache.seq_pos = 0
    assert cache.seq_lens.tolist() == [0] * B and cache.get(0)[0].shape == (B, H, 0, D)
    cache.seq_pos = S
    assert cache.seq_lens.tolist() == [S] * B and cache.get(1)[1].shape == (B, H, S, D)


# -- 3. reorder -------------------------------------------------------------------

REORDERS = {"identity": [0, 1, 2], "permutation": [2, 0, 1], "repeats": [0, 0, 2],
            "all-one-row": [1, 1, 1], "shorter-over-longer": [1, 2, 1]}


@pytest.mark.parametrize("name", REORDERS)
def test_reorder_gathers_rows_in_place(rng, name):
    idx = np.array(REORDERS[name])
    cache, model = ragged_cache(rng)
    attend_all(cache, model, rng)                    # rows now [6, 4, 5] long
    before, lens = cache.arena.copy(), cache.seq_lens.copy()
    arena = cache.arena
    keys0, _ = cache.caches[0]
    row1 = cache.get(0, row=1)[0]

    cache.reorder(idx)

    assert cache.arena is arena and cache.caches[0][0] is keys0
    assert cache.seq_lens.tolist() == lens[idx].tolist()
    for b, src in enumerate(idx):
        n = lens[src]
        assert cache.arena[:, :, b, :, :n].tobytes() == before[:, :, src, :, :n].tobytes()
        if src == b:   # a row that stays is not touched at all
            assert cache.arena[:, :, b].tobytes() == before[:, :, b].tobytes()
    if name == "identity":
        assert cache.arena.tobytes() == before.tobytes()
    # views taken before the reorder see the new contents
    assert np.shares_memory(keys0, cache.arena) and np.shares_memory(row1, cache.arena)
    np.testing.assert_array_equal(keys0[:, :, :min(lens)], before[0, 0, idx, :, :min(lens)])
    m = min(lens[1], lens[idx[1]])
    np.testing.assert_array_equal(row1[0, :, :m], before[0, 0, idx[1], :, :m])

    model.gather(idx)
    assert_holds(cache, model)
    attend_all(cache, model, rng)


# -- 4. copy_sequence ----------------------------------------------------------------

COPIES = {"full": (0, 1, None), "full-explicit": (2, 0, 4), "partial": (0, 2, 3),
          "length-0": (2, 1, 0), "shorter-over-longer": (1, 0, None),
          "src-is-dst": (0, 0, 2), "src-is-dst-full": (1, 1, None)}


@pytest.mark.parametrize("name", COPIES)
def test_copy_sequence_forks_a_prefix(rng, name):
    src, dst, length = COPIES[name]
    cache, model = ragged_cache(rng)
    before, lens = cache.arena.copy(), cache.seq_lens.tolist()

    if length is None:
        cache.copy_sequence(src, dst)
    else:
        cache.copy_sequence(src, dst, length)

    n = lens[src] if length is None else length
    assert cache.seq_lens.tolist() == [n if b == dst else m for b, m in enumerate(lens)]
    assert cache.arena[:, :, dst, :, :n].tobytes() == before[:, :, src, :, :n].tobytes()
    for b in range(B):
        if b != dst:   # every other row, used positions or not, keys and values, all layers
            assert cache.arena[:, :, b].tobytes() == before[:, :, b].tobytes()
    if src == dst:     # a crop of that row: nothing is written
        assert cache.arena.tobytes() == before.tobytes()

    model.copy_sequence(src, dst, n)
    assert_holds(cache, model)
    attend_all(cache, model, rng)
    attend_all(cache, model, rng)


# -- 5. crop --------------------------------------------------------------------------

CROPS = {"positive": 4, "positive-small": 1, "negative": -2, "boundary": -min(PROMPTS),
         "zero": 0, "longest": PAD, "beyond-every-row": PAD + 3, "max_seq_len": S}


@pytest.mark.parametrize("name", CROPS)
def test_crop_then_decode_overwrites(rng, name):
    length = CROPS[name]
    cache, model = ragged_cache(rng)
    before = cache.arena.copy()

    cache.crop(length)

    want = [min(n, length) if length >= 0 else n + length for n in PROMPTS]
    assert cache.seq_lens.tolist() == want
    assert cache.arena.tobytes() == before.tobytes(), "crop must only forget, not write"
    model.truncate(want)
    assert_holds(cache, model)
    for _ in range(2):   # the new positions go at each row's new length
        attend_all(cache, model, rng)


# -- 6. beam search ---------------------------------------------------------------------

def test_beam_search_steps_and_reorders_like_the_numpy_model(rng):
    cache, model = KVCache(B, S, L, H, D, dtype=np.float64), Rows(np.float64)
    prompt = []
    for layer in range(L):   # one prompt, copied to every beam
        q, k, v = (np.repeat(rand(rng, 4, batch=1), B, axis=0) for _ in range(3))
        model.check(layer, cache.attend(layer, q, k, v), q, k, v)
        prompt.append((k, v))
    for layer, (k, v) in enumerate(prompt):
        model.append(layer, k, v, [4] * B)
    cache.advance(4)

    history = [[] for _ in range(B)]        # which step values each beam descends from
    for step, beam_idx in enumerate([[0, 0, 2], [2, 1, 1], [1, 1, 1], [0, 2, 1]]):
        attend_all(cache, model, rng)
        history = [history[b] + [(step, b)] for b in range(B)]
        cache.reorder(beam_idx)
        model.gather(beam_idx)
        history = [history[i] for i in beam_idx]
        assert_holds(cache, model)
    attend_all(cache, model, rng)
    assert cache.seq_lens.tolist() == [4 + 5] * B
    # beams that share an ancestor at a step hold the same values there
    for a in range(B):
        for b in range(B):
            for pos, (ha, hb) in enumerate(zip(history[a], history[b])):
                if ha == hb:
                    np.testing.assert_array_equal(cache.arena[:, :, a, :, 4 + pos], cache.arena[:, :, b, :, 4 + pos])


# -- 7. evicted moves with the rows --------------------------------------------------------

def test_reorder_and_copy_sequence_carry_evicted(rng):
    cache = KVCache(B, 6, 1, H, D, n_sink=1)       # window of 5 after 1 sink
    cache.update(0, rand(rng, 5), rand(rng, 5))
    cache.advance([5, 2, 4])
    cache.update(0, rand(rng, 2), rand(rng, 2))   # the row of 5 evicts 1
    cache.advance(2)
    cache.update(0, rand(rng, 1), rand(rng, 1))   # rows of 6 evict 1 each
    cache.advance(1)
    assert cache.evicted.tolist() == [2, 0, 1] and cache.seq_lens.tolist() == [6, 5, 6]

    cache.reorder([1, 2, 0])
    assert cache.evicted.tolist() == [0, 1, 2] and cache.seq_lens.tolist() == [5, 6, 6]
    cache.copy_sequence(2, 0, 3)
    assert cache.evicted.tolist() == [2, 1, 2] and cache.seq_lens.tolist() == [3, 6, 6]


# -- 8. reset -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_reset_zeroes_everything_written_on_any_row(rng, dtype):
    cache, model = ragged_cache(rng, dtype)
    cache.crop(-2)                                   # written but no longer committed
    cache.reorder([2, 0, 0])
    cache.copy_sequence(1, 2, 1)
    cache.update(1, rand(rng, 3), rand(rng, 3))      # written, never committed
    assert cache.arena.any()

    cache.reset()

    assert not cache.arena.any()
    assert cache.seq_lens.tolist() == [0] * B and cache.seq_pos == 0
    assert cache.evicted.tolist() == [0] * B
    model = Rows(dtype)
    attend_all(cache, model, rng, T=PAD, counts=PROMPTS)
    attend_all(cache, model, rng)
