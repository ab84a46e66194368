"""Sliding-window caches with attention sinks (``KVCache(..., n_sink=k)``), against a model.

A streaming cache of capacity S keeps, of every row's history, the first k
positions (the sinks) and the latest ``window = S - k``, evicting the oldest
non-sinks when a write of T <= window positions would run a row past S. So
query t of a T-block written after n tokens sees the kept positions of the
n + T tokens up to n + t: for decoding (T = 1), min(n + 1, S) of them.

The model (``History``) records every token ever written, by absolute
position; what the cache should hold is derived from it (``kept``), never
read back from the arena. Attention is checked against the float64 oracle
``attend_reference`` over exactly the positions the model says are visible.
"""

import gc
import tracemalloc

import numpy as np
import pytest

from kvarena import KVCache, attend_reference

B, S, H, D = 2, 8, 2, 4
SINKS = [0, 3, S - 1]           # pure sliding window, some sinks, a window of 1
TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12),
             np.float32: dict(rtol=1e-5, atol=1e-5)}


# -- the model -----------------------------------------------------------------

def kept(n, n_sink, capacity=S):
    """Absolute positions a streaming cache holds after n tokens: the sinks and the latest window."""
    if n <= capacity:
        return list(range(n))
    return list(range(n_sink)) + list(range(n - (capacity - n_sink), n))


def visible(n, T, t, n_sink, capacity=S):
    """Absolute positions query t of a T-block written after n tokens attends to."""
    return [p for p in kept(n + T, n_sink, capacity) if p <= n + t]


class History:
    """Every token written to a cache: per layer and row, keys and values (H, D) by absolute position."""

    def __init__(self, num_layers, batch_size, dtype):
        self.dtype = dtype
        self.keys = [[[] for _ in range(batch_size)] for _ in range(num_layers)]
        self.values = [[[] for _ in range(batch_size)] for _ in range(num_layers)]

    def add(self, layer, k, v, counts=None):
        """Record the first ``counts[b]`` positions of the (B, H, T, D) block in row b (default all T)."""
        for b in range(k.shape[0]):
            for t in range(k.shape[2] if counts is None else counts[b]):
                self.keys[layer][b].append(k[b, :, t].astype(self.dtype))
                self.values[layer][b].append(v[b, :, t].astype(self.dtype))

    def length(self, b, layer=0):
        return len(self.keys[layer][b])

    def at(self, layer, b, positions):
        """Keys and values of row b at the given absolute positions, each (H, len(positions), D)."""
        k = np.stack([self.keys[layer][b][p] for p in positions], axis=1)
        v = np.stack([self.values[layer][b][p] for p in positions], axis=1)
        return k, v


def oracle(history, layer, b, query, positions):
    """attend_reference (float64) of one query (H, D) over row b's given positions."""
    k, v = history.at(layer, b, positions)
    return attend_reference(query[None, :, None], k[None], v[None], [len(positions) - 1])[0, :, 0]


# -- checks --------------------------------------------------------------------

def block(rng, T, batch_size=B, heads=H, head_dim=D):
    return rng.standard_normal((batch_size, heads, T, head_dim))


def check_attention(out, q, history, layer, before, n_sink, dtype):
    """``out`` of attend(layer, q, ...) for a block written after ``before[b]`` tokens in row b."""
    T = q.shape[2]
    q = q.astype(dtype)   # the kernel computes with the query in the arena's precision
    for b in range(q.shape[0]):
        for t in range(T):
            seen = visible(before[b], T, t, n_sink)
            # the docstring's count: every cached position and the new ones up to t, at most S - T + t + 1
            assert len(seen) == min(before[b] + t + 1, S - T + t + 1)
            np.testing.assert_allclose(out[b, :, t], oracle(history, layer, b, q[b, :, t], seen),
                                       **TOLERANCE[dtype], err_msg=f"row {b}, query {t}")


def check_contents(cache, history, n_sink):
    """Every layer and row holds exactly (bit for bit) the kept positions of its history."""
    ns = lengths(history)
    assert cache.evicted.tolist() == [max(0, n - S) for n in ns]
    assert cache.seq_lens.tolist() == [min(n, S) for n in ns]
    for layer in range(cache.num_layers):
        for b, n in enumerate(ns):
            want_k, want_v = history.at(layer, b, kept(n, n_sink))
            got_k, got_v = cache.get(layer, row=b)
            np.testing.assert_array_equal(got_k[0], want_k, err_msg=f"keys, layer {layer}, row {b}")
            np.testing.assert_array_equal(got_v[0], want_v, err_msg=f"values, layer {layer}, row {b}")


def lengths(history):
    return [history.length(b) for b in range(len(history.keys[0]))]


def attend_step(cache, history, rng, T, n_sink, dtype):
    """attend every layer with a fresh T-block, checking each output, then advance(T)."""
    before = lengths(history)
    for layer in range(cache.num_layers):
        q, k, v = block(rng, T), block(rng, T), block(rng, T)
        out = cache.attend(layer, q, k, v)
        history.add(layer, k, v)
        check_attention(out, q, history, layer, before, n_sink, dtype)
    cache.advance(T)


def snapshot(cache):
    return cache._arena.tobytes(), cache._state.tobytes()


# -- 1, 3. decoding, one token at a time ---------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_sink", SINKS)
def test_decode_matches_model_and_oracle(rng, n_sink, dtype):
    cache = KVCache(B, S, 2, H, D, dtype=dtype, n_sink=n_sink)
    assert cache.window == S - n_sink
    history = History(2, B, dtype)
    for _ in range(3 * S):
        attend_step(cache, history, rng, 1, n_sink, dtype)
        check_contents(cache, history, n_sink)
    assert cache.evicted.tolist() == [2 * S] * B


# -- 2. exactly what the query sees at the capacity boundary ---------------------

@pytest.mark.parametrize("n_sink", SINKS)
def test_visible_set_at_the_capacity_boundary(rng, n_sink):
    # Every query is zero, so attention is uniform over what the query sees,
    # and each token's value is the one-hot of its absolute position: the
    # output is 1/count on exactly the visible positions and 0 elsewhere.
    steps = S + 2
    cache = KVCache(1, S, 1, 1, steps, dtype=np.float64, n_sink=n_sink)
    window = S - n_sink
    # sequence length (the new token included) -> how many positions its query sees:
    # window - 1 and window non-sinks are all seen; of window + 1 and + 2, only the latest window
    count_at = {S - 1: n_sink + window - 1, S: n_sink + window, S + 1: n_sink + window, S + 2: S}
    # ... and which ones are gone: the oldest non-sinks, n_sink first
    dropped_at = {S - 1: [], S: [], S + 1: [n_sink], S + 2: [n_sink, n_sink + 1]}
    for p in range(steps):
        value = np.eye(steps)[p].reshape(1, 1, 1, steps)
        out = cache.attend(0, np.zeros((1, 1, 1, steps)), block(rng, 1, 1, 1, steps), value)[0, 0, 0]
        cache.advance(1)
        seen = np.flatnonzero(out).tolist()
        np.testing.assert_allclose(out[seen], 1 / len(seen), rtol=1e-14)
        assert seen == visible(p, 1, 0, n_sink)
        n = p + 1
        if n in count_at:
            assert len(seen) == count_at[n], f"length {n}"
            assert sorted(set(range(n)) - set(seen)) == dropped_at[n], f"length {n}"
            assert cache.evicted.tolist() == [len(dropped_at[n])]


# -- 4. blocks of T > 1 that cross capacity --------------------------------------

N_SINK = 2
WINDOW = S - N_SINK   # 6

@pytest.mark.parametrize("blocks", [
    [3] * 8,                            # crosses S mid-block: 6 + 3 > 8
    [2, 1, 3, 2, 3, 1, 2, 3, 1, 3],     # mixed, including T = 1 steps between blocks
    [WINDOW] * 5,                       # the largest block allowed: T == window
    [5, WINDOW, 1, WINDOW, 4],
], ids=["T3", "mixed", "T-window", "window-mixed"])
def test_blocks_crossing_capacity_are_causal_within_the_block(rng, blocks):
    cache = KVCache(B, S, 2, H, D, dtype=np.float64, n_sink=N_SINK)
    history = History(2, B, np.float64)
    for T in blocks:
        attend_step(cache, history, rng, T, N_SINK, np.float64)
        check_contents(cache, history, N_SINK)
    assert history.length(0) == sum(blocks) > 2 * S


@pytest.mark.parametrize("op", ["update", "attend"])
@pytest.mark.parametrize("steps", [0, 2 * S], ids=["empty", "streaming"])
def test_block_larger_than_window_is_rejected_and_changes_nothing(rng, op, steps):
    cache = KVCache(B, S, 2, H, D, dtype=np.float64, n_sink=N_SINK)
    history = History(2, B, np.float64)
    for _ in range(steps):
        attend_step(cache, history, rng, 1, N_SINK, np.float64)
    before = snapshot(cache)
    T = WINDOW + 1
    with pytest.raises(ValueError, match=rf"T = {T} .* window .* = {WINDOW}"):
        if op == "update":
            cache.update(0, block(rng, T), block(rng, T))
        else:
            cache.attend(0, block(rng, T), block(rng, T), block(rng, T))
    assert snapshot(cache) == before
    # and the cache goes on as if the call had not happened
    attend_step(cache, history, rng, WINDOW, N_SINK, np.float64)
    check_contents(cache, history, N_SINK)


# -- 5. ragged rows: each row evicts on its own -----------------------------------

def test_ragged_rows_evict_independently(rng):
    prompts = [WINDOW, 4, 1]      # a block may hold at most window positions, even into an empty row
    L = 2
    cache = KVCache(3, S, L, H, D, dtype=np.float64, n_sink=N_SINK)
    history = History(L, 3, np.float64)
    # prefill right-padded prompts, then commit each row's true length
    for layer in range(L):
        k, v = block(rng, WINDOW, 3), block(rng, WINDOW, 3)
        cache.update(layer, k, v)
        history.add(layer, k, v, counts=prompts)
    cache.advance(prompts)
    check_contents(cache, history, N_SINK)
    # rows first evict at decode steps 3, 5 and 8: after 6 steps two of them have
    for step in range(6):
        before = lengths(history)
        for layer in range(L):
            q, k, v = block(rng, 1, 3), block(rng, 1, 3), block(rng, 1, 3)
            out = cache.attend(layer, q, k, v)
            history.add(layer, k, v)
            check_attention(out, q, history, layer, before, N_SINK, np.float64)
        cache.advance([1, 1, 1])
        check_contents(cache, history, N_SINK)
    assert cache.seq_lens.tolist() == [8, 8, 7]
    assert cache.evicted.tolist() == [4, 2, 0]


# -- 6. the multi-layer protocol: update every layer, then advance ------------------

@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_every_layer_evicts_once_per_step(rng, order, T):
    L = 3
    cache = KVCache(B, S, L, H, D, dtype=np.float32, n_sink=N_SINK)
    history = History(L, B, np.float32)
    layers = range(L) if order == "forward" else range(L - 1, -1, -1)
    for _ in range(3 * S // T + 1):
        for layer in layers:     # each layer gets its own data
            k, v = block(rng, T), block(rng, T)
            cache.update(layer, k, v)
            history.add(layer, k, v)
        cache.advance(T)
        check_contents(cache, history, N_SINK)
    assert cache.evicted[0] > S


# -- 7. constant memory ---------------------------------------------------------

def test_streaming_runs_in_constant_memory(rng):
    L, D8 = 2, 8
    cache = KVCache(B, S, L, H, D8, n_sink=N_SINK)
    arena, address = cache._arena, cache._arena.ctypes.data
    total = cache.get_memory_usage()["total_bytes"]
    steps = 2000             # long enough that any per-step leak outgrows one-off allocations
    inputs = rng.standard_normal((steps, L, 3, B, H, 1, D8)).astype(np.float32)

    def run(first, last):
        for step in range(first, last):
            for layer in range(L):
                cache.attend(layer, *inputs[step, layer])
            cache.advance(1)

    run(0, S + 1)            # warm up, through the first eviction
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run(S + 1, steps)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()

    assert cache._arena is arena and cache._arena.ctypes.data == address
    assert cache.arena.ctypes.data == address
    assert cache.get_memory_usage()["total_bytes"] == total
    assert cache.evicted.tolist() == [steps - S] * B
    # Retaining what a step writes or evicts would cost one step's keys and
    # values, 2 * L * B * H * D * 4 = 512 bytes, per step: ~1 MiB over these
    # ~2000 steps, and even the smallest Python object leaked per step (16
    # bytes) would add ~32 KiB. The bound leaves room for one-off interpreter
    # allocations (0 to 256 bytes seen, 256 on the bounds-checked build).
    assert growth < 4096, growth


# -- 8. reset after streaming -----------------------------------------------------

def test_reset_after_streaming_clears_everything(rng):
    cache = KVCache(B, S, 2, H, D, dtype=np.float64, n_sink=N_SINK)
    history = History(2, B, np.float64)
    for T in [3, 1, WINDOW, 2, 3]:
        attend_step(cache, history, rng, T, N_SINK, np.float64)
    assert cache.evicted.tolist() == [15 - S] * B
    cache.reset()
    assert cache.evicted.tolist() == [0] * B
    assert cache.seq_lens.tolist() == [0] * B and cache.seq_pos == 0
    assert not cache.arena.any()
    assert not cache._state.any()
    # and it streams again like a new cache
    history = History(2, B, np.float64)
    for _ in range(S + 3):
        attend_step(cache, history, rng, 1, N_SINK, np.float64)
    check_contents(cache, history, N_SINK)


# -- 9. bad n_sink ----------------------------------------------------------------

@pytest.mark.parametrize("n_sink, exc, match", [
    (-1, ValueError, rf"^n_sink must be None or in \[0, max_seq_len = {S}\); got -1$"),
    (S, ValueError, rf"^n_sink must be None or in \[0, max_seq_len = {S}\); got {S}$"),
    (S + 1, ValueError, rf"^n_sink must be None or in \[0, max_seq_len = {S}\); got {S + 1}$"),
    (2.0, TypeError, r"^n_sink must be an int; got 2\.0 of type float$"),
    (True, TypeError, r"^n_sink must be an int; got True of type bool$"),
    ("2", TypeError, r"^n_sink must be an int"),
], ids=["negative", "S", "over-S", "float", "bool", "str"])
def test_bad_n_sink_is_rejected_by_name(n_sink, exc, match):
    with pytest.raises(exc, match=match):
        KVCache(B, S, 1, H, D, n_sink=n_sink)


def test_n_sink_accepts_numpy_ints_and_none():
    assert KVCache(B, S, 1, H, D, n_sink=np.int64(2)).window == S - 2
    assert KVCache(B, S, 1, H, D, n_sink=None).window is None
