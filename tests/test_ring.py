"""The sliding window as a ring, and rotary positions inside the cache (issue 13).

The model (``Rows``) keeps, per layer and row, the list of what the row
holds in order, as the docstrings define it: a write of T positions first
drops, from a row that would run past S, the oldest entries after the
``n_sink`` sinks; ``crop`` cuts the end, ``copy_sequence`` copies a prefix,
``reorder`` permutes rows. A key's rotary position is its index in that
list; query t of a block sits at the index of its own key. The oracle
rotates keys and queries at those positions (complex multiplication, not
the kernel's tables) and recomputes attention in float64. Nothing is read
back from the arena to build the expectation.
"""

import fractions
import gc
import tracemalloc

import numpy as np
import pytest

from kvarena import KVCache, footprint, plan
from kvarena.kernel import READS, forced_isa, forced_reads, kernel_info
from kvarena.models import Llama
from kvarena.models.llama import rope as model_rope
from kvarena.storage import CacheFileError

B, S, H, D = 2, 8, 2, 4
THETA = 100.0            # small, so that the low frequencies turn visibly within S positions
STYLES = [None, "half", "interleaved"]
TOLERANCE = {np.float64: dict(rtol=1e-6, atol=1e-6),   # the rotary tables are float32
             np.float32: dict(rtol=2e-5, atol=2e-5)}


# -- the model -------------------------------------------------------------------

class Rows:
    """What every (layer, row) of a cache holds, in order: lists of (key, value), each (H, D)."""

    def __init__(self, num_layers, batch_size, n_sink, capacity=S):
        self.n_sink, self.capacity = n_sink, capacity
        self.rows = [[[] for _ in range(batch_size)] for _ in range(num_layers)]
        self.evicted = [0] * batch_size

    def write(self, layer, k, v, dtype):
        """Record a (B, H, T, D) block written to ``layer``: evict (once per step, in
        every layer, as the first layer's write does), then append."""
        T = k.shape[2]
        for b in range(k.shape[0]):
            drop = len(self.rows[layer][b]) + T - self.capacity
            if self.n_sink is not None and drop > 0:
                for held in self.rows:
                    del held[b][self.n_sink:self.n_sink + drop]
                self.evicted[b] += drop
            for t in range(T):
                self.rows[layer][b].append((k[b, :, t].astype(dtype), v[b, :, t].astype(dtype)))

    def drop_pending(self, counts):
        """Forget, per row, all but ``counts[b]`` entries of the last block (advance(counts))."""
        for held in self.rows:
            for b, n in enumerate(counts):
                del held[b][n:]

    def held(self, layer, b):
        keys = np.stack([k for k, _ in self.rows[layer][b]], axis=1)     # (H, n, D)
        values = np.stack([v for _, v in self.rows[layer][b]], axis=1)
        return keys, values

    def lengths(self, layer=0):
        return [len(r) for r in self.rows[layer]]


def rotate(x, positions, theta, style):
    """x (..., n, D) rotated at ``positions`` (n,): pairs as complex numbers times e^(i angle)."""
    if style is None:
        return x
    half = x.shape[-1] // 2
    pairs = (slice(0, half), slice(half, None)) if style == "half" \
        else (slice(0, None, 2), slice(1, None, 2))
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angle = np.asarray(positions, np.float64)[:, None] * freqs
    z = (x[..., pairs[0]] + 1j * x[..., pairs[1]]) * np.exp(1j * angle)
    out = np.empty(x.shape)
    out[..., pairs[0]], out[..., pairs[1]] = z.real, z.imag
    return out


def oracle(rows, layer, q, style):
    """Attention (float64) of the (B, Hq, T, D) block ``q`` whose keys and values
    ``rows.write`` has just recorded, over what each row holds, causal in the block."""
    T = q.shape[2]
    out = np.empty(q.shape)
    for b in range(q.shape[0]):
        keys, values = rows.held(layer, b)
        n = keys.shape[1]
        keys = rotate(keys.astype(np.float64), np.arange(n), THETA, style)
        G = q.shape[1] // keys.shape[0]
        for t in range(T):
            p = n - T + t                                      # the query's own key's position
            query = rotate(q[b, :, t:t + 1].astype(np.float64), [p], THETA, style)[:, 0]
            for head in range(q.shape[1]):
                s = keys[head // G, :p + 1] @ query[head] / np.sqrt(q.shape[3])
                w = np.exp(s - s.max())
                out[b, head, t] = w @ values[head // G, :p + 1] / w.sum()
    return out


def make(style, n_sink=3, dtype=np.float32, L=2, batch_size=B, **kwargs):
    if style is not None:
        kwargs.update(rope_theta=THETA, rope_style=style)
    return KVCache(batch_size, S, L, H, D, dtype=dtype, n_sink=n_sink, **kwargs)


def step(cache, rows, rng, T, style, dtype=np.float32, G=1):
    """attend every layer with a fresh T-block, each output checked, then advance(T)."""
    for layer in range(cache.num_layers):
        q = rng.standard_normal((cache.batch_size, G * H, T, D))
        k, v = (rng.standard_normal((cache.batch_size, H, T, D)) for _ in range(2))
        out = cache.attend(layer, q, k, v)
        rows.write(layer, k, v, dtype)
        np.testing.assert_allclose(out, oracle(rows, layer, q.astype(dtype), style),
                                   **TOLERANCE[dtype], err_msg=f"layer {layer}, T={T}")
    cache.advance(T)


def check_held(cache, rows):
    """Every row's get() is, bit for bit, what the model says it holds; and the lengths."""
    assert cache.seq_lens.tolist() == rows.lengths()
    assert cache.evicted.tolist() == rows.evicted
    for layer in range(cache.num_layers):
        for b in range(cache.batch_size):
            keys, values = cache.get(layer, row=b)
            want_k, want_v = rows.held(layer, b)
            np.testing.assert_array_equal(keys[0], want_k, err_msg=f"keys, layer {layer}, row {b}")
            np.testing.assert_array_equal(values[0], want_v,
                                          err_msg=f"values, layer {layer}, row {b}")


# -- 1. decoding and blocks across the wrap-around, both styles, every ISA --------------

@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize("isa", kernel_info()["isas"])
@pytest.mark.parametrize("style", STYLES, ids=lambda s: str(s))
@pytest.mark.parametrize("n_sink", [0, 3])
def test_decoding_through_many_wraps_matches_the_model(rng, n_sink, style, isa, reads):
    cache, rows = make(style, n_sink), Rows(2, B, n_sink)
    window = S - n_sink
    with forced_isa(isa), forced_reads(reads):
        # lengths 1 .. 4S: window full minus one, full, full plus one, then 3 more wraps
        for n in range(1, 4 * S + 1):
            step(cache, rows, rng, 1, style)
            check_held(cache, rows)
            assert cache.ring_head.tolist() == [max(0, n - S) % window] * B
    assert cache.evicted.tolist() == [3 * S] * B


@pytest.mark.parametrize("style", STYLES, ids=lambda s: str(s))
@pytest.mark.parametrize("blocks", [
    [5, 3, 3, 3, 3, 3, 3, 2],       # T=3 into a window of 5: blocks that wrap the ring mid-block
    [2, 1, 4, 5, 1, 5, 2, 3, 4],    # mixed, T = window included
], ids=["T3", "mixed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_blocks_that_wrap_match_the_model(rng, blocks, style, dtype):
    cache, rows = make(style, dtype=dtype), Rows(2, B, 3)
    for T in blocks:
        step(cache, rows, rng, T, style, dtype)
        check_held(cache, rows)
    assert cache.ring_head.any()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_grouped_queries_rotate_each_by_its_position(rng, style):
    cache, rows = make(style), Rows(2, B, 3)
    for T in [4, 1, 1, 3, 1, 5, 1]:
        step(cache, rows, rng, T, style, G=3)


def test_ragged_rows_turn_their_rings_independently(rng):
    style, n_sink, L, batch = "half", 2, 2, 3
    cache, rows = make(style, n_sink, batch_size=batch), Rows(L, batch, n_sink)
    prompts = [6, 4, 1]
    for layer in range(L):                          # right-padded prefill, each row commits its own
        k, v = (rng.standard_normal((batch, H, 6, D)) for _ in range(2))
        cache.update(layer, k, v)
        rows.write(layer, k, v, np.float32)
    cache.advance(prompts)
    rows.drop_pending(prompts)
    check_held(cache, rows)
    for _ in range(12):
        step(cache, rows, rng, 1, style)
        check_held(cache, rows)
    # rows reached S after 2, 4 and 7 steps: 10, 8 and 5 evictions
    assert cache.evicted.tolist() == [10, 8, 5]
    assert cache.ring_head.tolist() == [10 % 6, 8 % 6, 5 % 6]


# -- 2. O(1): eviction moves nothing -------------------------------------------------------

def test_a_decoding_step_in_a_full_window_writes_only_the_new_slot(rng):
    cache = make(None, n_sink=2, L=1)
    rows = Rows(1, B, 2)
    for _ in range(S + 3):
        step(cache, rows, rng, 1, None)
    before = cache.arena.copy()
    # the oldest window position's slot: position 2 was absolute position 2 + evicted,
    # written at slot 2 + (evicted % window) as the ring went round
    slot = 2 + cache.evicted[0] % cache.window
    step(cache, rows, rng, 1, None)
    changed = np.flatnonzero((cache.arena != before).any(axis=(0, 1, 2, 3, 5)))
    assert changed.tolist() == [slot]                # every other slot is as it was


# -- 3. get(): order, view or copy ---------------------------------------------------------

def test_get_is_a_view_until_the_ring_turns_then_an_ordered_copy(rng):
    cache, rows = make(None, n_sink=2), Rows(2, B, 2)
    for _ in range(S):
        step(cache, rows, rng, 1, None)
    keys, values = cache.get(1)
    assert np.shares_memory(keys, cache.arena) and np.shares_memory(values, cache.arena)
    step(cache, rows, rng, 1, None)                  # the first eviction turns the ring
    keys, values = cache.get(1)
    assert not np.shares_memory(keys, cache.arena) and not np.shares_memory(values, cache.arena)
    assert not keys.flags.writeable and not values.flags.writeable
    assert keys.data[0, 0, 0].shape == (D,)         # TinyTorch's .data still an ndarray
    for b in range(B):
        np.testing.assert_array_equal(keys[b], rows.held(1, b)[0])
        np.testing.assert_array_equal(values[b], rows.held(1, b)[1])
    # window turns: after window evictions the ring is back at 0, and get() a view again
    for _ in range(S - 2 - 1):
        step(cache, rows, rng, 1, None)
    assert cache.ring_head.tolist() == [0] * B
    assert np.shares_memory(cache.get(0)[0], cache.arena)
    check_held(cache, rows)


def test_get_pending_on_a_turned_ring_shows_the_new_block_in_order(rng):
    cache, rows = make("half", n_sink=1), Rows(2, B, 1)
    for _ in range(S + 2):
        step(cache, rows, rng, 1, "half")
    k, v = (rng.standard_normal((B, H, 3, D)).astype(np.float32) for _ in range(2))
    cache.update(0, k, v)
    keys, values = cache.get(0, pending=True)
    assert keys.shape == (B, H, S, D)
    np.testing.assert_array_equal(keys[:, :, -3:], k)          # stored as given: unrotated
    np.testing.assert_array_equal(values[:, :, -3:], v)
    rows.write(0, k, v, np.float32)
    for b in range(B):
        np.testing.assert_array_equal(keys[b], rows.held(0, b)[0])


# -- 4. reorder, copy_sequence, crop after wraps ---------------------------------------------

def test_reorder_copy_and_crop_after_wraps_keep_the_model(rng):
    style, L, batch = "interleaved", 2, 3
    cache, rows = make(style, n_sink=2, batch_size=batch), Rows(L, batch, 2)
    prompts = [6, 3, 1]                              # rows of different lengths: different rings
    for layer in range(L):
        k, v = (rng.standard_normal((batch, H, 6, D)) for _ in range(2))
        cache.update(layer, k, v)
        rows.write(layer, k, v, np.float32)
    cache.advance(prompts)
    rows.drop_pending(prompts)
    for _ in range(S):
        step(cache, rows, rng, 1, style)
    step(cache, rows, rng, 2, style)
    heads = cache.ring_head.tolist()
    assert len(set(heads)) == batch and all(heads), heads

    cache.reorder([2, 0, 0])                         # beam search: rows move with their rings
    for held in rows.rows:
        held[:] = [list(held[2]), list(held[0]), list(held[0])]
    rows.evicted = [rows.evicted[i] for i in (2, 0, 0)]
    assert cache.ring_head.tolist() == [heads[2], heads[0], heads[0]]
    check_held(cache, rows)
    step(cache, rows, rng, 1, style)

    cache.crop(S - 3)                                # every row drops its newest positions
    for held in rows.rows:
        for r in held:
            del r[S - 3:]
    check_held(cache, rows)
    step(cache, rows, rng, 2, style)                 # refills the freed slots, no eviction
    step(cache, rows, rng, 3, style)                 # and wraps again

    cache.copy_sequence(0, 2, length=S - 2)          # fork a prefix into a row with another ring
    for held in rows.rows:
        held[2] = list(held[0][:S - 2])
    rows.evicted[2] = rows.evicted[0]
    check_held(cache, rows)
    for _ in range(S):
        step(cache, rows, rng, 1, style)
        check_held(cache, rows)


@pytest.mark.parametrize("style", ["half", None], ids=str)
def test_crop_into_the_sinks_of_a_turned_ring_then_refill(rng, style):
    cache, rows = make(style, n_sink=3), Rows(2, B, 3)
    for _ in range(S + 2):
        step(cache, rows, rng, 1, style)
    assert cache.ring_head.tolist() == [2, 2]
    cache.crop(1)                                    # keeps one sink; the ring stays turned
    for held in rows.rows:
        for r in held:
            del r[1:]
    for T in [4, 5, 1, 3]:                           # from the sinks into the ring, and past it
        step(cache, rows, rng, T, style)
        check_held(cache, rows)


def test_copy_sequence_keeps_what_dst_wrote_past_length(rng):
    # dst's written but uncommitted position stays where its own ring put it
    cache = make(None, n_sink=0, L=1, batch_size=1)
    rows = Rows(1, 1, 0)
    for _ in range(S + 1):
        step(cache, rows, rng, 1, None)
    k = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    cache.update(0, k, k)                           # evicts one more, then writes at S - 1
    rows.write(0, k, k, np.float32)
    cache.copy_sequence(0, 0, length=S - 1)         # to itself: nothing may move
    cache.advance(1)
    check_held(cache, rows)


# -- 5. snapshots and mapped files after wraps ---------------------------------------------

@pytest.mark.parametrize("style", STYLES, ids=lambda s: str(s))
def test_save_and_load_after_wraps(tmp_path, rng, style):
    cache, rows = make(style), Rows(2, B, 3)
    for T in [3, 1, 4, 1, 1, 5, 2]:
        step(cache, rows, rng, T, style)
    assert cache.ring_head.any()
    cache.save(tmp_path / "c.kva")
    loaded = KVCache.load(tmp_path / "c.kva")
    assert (loaded.rope_theta, loaded.rope_style) == (cache.rope_theta, cache.rope_style)
    assert loaded.ring_head.tolist() == [0] * B      # stored in order, loaded in order
    check_held(loaded, rows)
    # and it goes on as the model says, its rings turning from 0
    for T in [1, 3, 1, 5]:
        step(loaded, rows, rng, T, style)
        check_held(loaded, rows)


@pytest.mark.parametrize("mode", ["r+", "c"])
def test_mapped_file_keeps_rings_and_rope_across_open(tmp_path, rng, mode):
    path = tmp_path / "arena.kvm"
    cache, rows = make("interleaved", path=path), Rows(2, B, 3)
    for T in [4, 1, 1, 3, 1]:
        step(cache, rows, rng, T, "interleaved")
    heads = cache.ring_head.tolist()
    assert all(heads)
    del cache
    gc.collect()
    reopened = KVCache.open(path, mode)
    assert (reopened.rope_theta, reopened.rope_style) == (THETA, "interleaved")
    assert reopened.ring_head.tolist() == heads
    check_held(reopened, rows)
    for T in [1, 2, 1]:
        step(reopened, rows, rng, T, "interleaved")
    check_held(reopened, rows)


def test_mapped_ring_head_out_of_range_is_refused(tmp_path, rng):
    import struct
    path = tmp_path / "arena.kvm"
    make(None, n_sink=3, path=path)
    gc.collect()
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack_from("<8sII", raw)[2]
    # state: [seq_lens | evicted | written_end | ring_head]
    ring = -(-(16 + header_len) // 8) * 8 + 8 * (2 * B + 1)
    raw[ring + 8:ring + 16] = np.array([S - 3], "<i8").tobytes()  # row 1's head = window: too far
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheFileError,
                       match=r"ring_head must be in \[0, 4\]; got ring_head\[1\] = 5"):
        KVCache.open(path)


def test_deepcopy_keeps_rings_and_rope(rng):
    import copy
    cache, rows = make("half"), Rows(2, B, 3)
    for _ in range(S + 2):
        step(cache, rows, rng, 1, "half")
    clone = copy.deepcopy(cache)
    assert clone.ring_head.tolist() == cache.ring_head.tolist() and clone.rope_style == "half"
    check_held(clone, rows)


# -- 6. without a window: rotating inside equals rotating before caching -----------------

@pytest.mark.parametrize("isa", kernel_info()["isas"])
@pytest.mark.parametrize("head_dim", [D, 64, 70])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_in_cache_equals_rotating_before_caching(rng, style, G, head_dim, isa):
    # one query per K/V head rotates "half" keys inside the dot product;
    # three share keys rotated once in a tile. head_dim 64 and 70 reach
    # the vector body (and, 70, its tail) of every instruction set
    inside = KVCache(B, 32, 1, H, head_dim, rope_theta=THETA, rope_style=style)
    plain = KVCache(B, 32, 1, H, head_dim)
    start = 0
    for T in [5, 1, 1, 7, 1, 3]:
        q, k, v = (rng.standard_normal((B, G * H, T, head_dim)),) + tuple(
            rng.standard_normal((B, H, T, head_dim)) for _ in range(2))
        positions = start + np.arange(T)[None]
        # the model's own rope takes (B, T, heads, D)
        def turn(x):
            return model_rope(x.transpose(0, 2, 1, 3), positions, THETA,
                              style).transpose(0, 2, 1, 3)
        with forced_isa(isa):
            got = inside.attend(0, q, k, v)
            want = plain.attend(0, turn(q), turn(k), v)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        inside.advance(T)
        plain.advance(T)
        start += T
    # the cache keeps the keys as given, unrotated
    np.testing.assert_array_equal(inside.get(0)[0][:, :, -T:], k.astype(np.float32))


def test_ring_heads_changed_behind_the_cache_are_checked_live(rng):
    cache, rows = make(None, n_sink=2), Rows(2, B, 2)
    for _ in range(S + 1):
        step(cache, rows, rng, 1, None)
    heads = cache.ring_head
    heads.flags.writeable = True             # NumPy allows this on a view of writable memory
    k = rng.standard_normal((B, H, 1, D))
    for bad in ([S - 2, 0], [-1, 0]):        # the kernel would read past the ring
        heads[:] = bad
        before = cache.arena.tobytes()
        with pytest.raises(RuntimeError, match=r"ring heads \[.*\] were changed outside .*"
                                               r"window = 6"):
            cache.update(0, k, k)
        with pytest.raises(RuntimeError, match="changed outside"):
            cache.attend(0, k, k, k)
        assert cache.arena.tobytes() == before
    heads[:] = [3, 3]                        # in range: honoured
    cache.update(0, k, k)
    assert cache.ring_head.tolist() == [4, 4]


# -- 7. arguments, memory figures ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rope_theta=0.0), ValueError, r"^rope_theta must be a finite number > 0; got 0\.0$"),
    (dict(rope_theta=-1), ValueError, "rope_theta must be a finite number > 0; got -1"),
    (dict(rope_theta=float("inf")), ValueError, "rope_theta must be a finite"),
    (dict(rope_theta=10**400), ValueError, r"^rope_theta must be a finite number > 0; got 1000"),
    (dict(rope_theta="1e4"), TypeError, r"^rope_theta must be None or a real number; got '1e4'"),
    (dict(rope_theta=True), TypeError, "rope_theta must be None or a real number; got True"),
    (dict(rope_theta=1e4, rope_style="neox"), ValueError,
     r"^rope_style must be one of \('half', 'interleaved'\); got 'neox'$"),
    (dict(rope_style="half"), ValueError, "rope_style needs rope_theta"),
    (dict(rope_theta=1e4, head_dim=5), ValueError,
     r"^head_dim must be even with rope_theta .*got 5$"),
], ids=["zero", "negative", "inf", "int-beyond-float", "str", "bool", "style", "style-alone",
        "odd-D"])
def test_bad_rope_arguments_are_rejected_by_name(kwargs, exc, match):
    head_dim = kwargs.pop("head_dim", D)
    with pytest.raises(exc, match=match):
        KVCache(B, S, 1, H, head_dim, **kwargs)


def test_rope_defaults_and_attributes():
    cache = KVCache(B, S, 1, H, D, rope_theta=np.float32(500))
    assert (cache.rope_theta, cache.rope_style) == (500.0, "half")
    assert type(cache.rope_theta) is float
    assert (KVCache(B, S, 1, H, D).rope_theta, KVCache(B, S, 1, H, D).rope_style) == (None, None)
    # any real number (numbers.Real) that is a finite float
    assert KVCache(B, S, 1, H, D, rope_theta=fractions.Fraction(10000)).rope_theta == 10000.0
    assert "rope_theta=500.0, rope_style='half'" in repr(cache)


def test_rotary_tables_are_counted(rng):
    cache = KVCache(3, 100, 2, 4, 16, rope_theta=1e4, lazy=True)
    fp = footprint(3, 100, 2, 4, 16, rope=True)
    usage = cache.get_memory_usage()
    # cos and sin, float32, (100, 8) each
    assert usage["rope_bytes"] == fp.rope_bytes == 2 * 100 * 8 * 4
    # (and 63 bytes of room in which the arena starts on a 64-byte boundary)
    assert usage["total_bytes"] == fp.total_bytes == fp.arena_bytes + 63 + fp.rope_bytes
    assert usage["per_layer_mb"] == fp.arena_bytes / 2**20 / 2
    assert footprint(3, 100, 2, 4, 16).rope_bytes == 0
    assert KVCache(3, 100, 2, 4, 16).get_memory_usage()["rope_bytes"] == 0
    # plan() counts them against the budget: exactly this cache fits, one byte less does not
    budget = fp.total_bytes
    assert plan(2, 4, 16, batch_size=3, available_bytes=budget, rope=True).max_seq_len == 100
    assert plan(2, 4, 16, batch_size=3, available_bytes=budget - 1, rope=True).max_seq_len == 99
    assert plan(2, 4, 16, max_seq_len=100, available_bytes=budget, rope=True).batch_size == 3
    assert plan(2, 4, 16, max_seq_len=100, available_bytes=budget - 1, rope=True).batch_size == 2


# -- 8. the Llama-style model in both modes, and streaming far past capacity -----------------

def small_llama(style):
    return Llama(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                 rope_style=style, seed=1)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_llama_rotating_in_the_cache_generates_as_rotating_itself(style):
    model = small_llama(style)
    prompts = [np.arange(1, 9), np.arange(3, 6)]
    own = model.generate(prompts, 20, cache=model.make_cache(2))
    rotating = model.make_cache(2, rotate_in_cache=True)
    assert (rotating.rope_theta, rotating.rope_style) == (model.rope_theta, style)
    inside = model.generate(prompts, 20, cache=rotating)
    for a, b in zip(own, inside):
        np.testing.assert_array_equal(a, b)
    # and the logits agree, not only the argmax
    cache_own, cache_in = model.make_cache(1), model.make_cache(1, rotate_in_cache=True)
    tokens = np.arange(1, 13)[None]
    np.testing.assert_allclose(model.forward(tokens, cache=cache_in),
                               model.forward(tokens, cache=cache_own), rtol=1e-4, atol=1e-4)


def test_llama_refuses_a_cache_rotating_otherwise():
    model = small_llama("interleaved")
    cache = model.make_cache(1, rope_theta=model.rope_theta, rope_style="half")
    with pytest.raises(ValueError, match="rope_style='half'; the model needs .*'interleaved'"):
        model.forward(np.array([[1, 2]]), cache=cache)


def test_llama_streams_ten_times_past_capacity_in_constant_memory():
    model = small_llama("interleaved")
    cache = model.make_cache(1, max_seq_len=32, n_sink=4, rotate_in_cache=True)
    address, total = cache.arena.ctypes.data, cache.get_memory_usage()["total_bytes"]
    model.generate(np.arange(1, 9), 40, cache=cache)           # warm up, past the first eviction
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        out = model.generate(np.arange(1, 9), 10 * 32, cache=cache)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert out.shape == (8 + 320,) and ((0 <= out) & (out < 64)).all()
    assert cache.evicted.tolist() == [8 + 320 - 1 - 32]        # the last token is not written
    assert cache.arena.ctypes.data == address and cache.get_memory_usage()["total_bytes"] == total
    # generate's own output (328 int64) and its bookkeeping, nothing per step of the cache
    # (one step's K and V for both layers would be 2 * 2 * 2 * 8 * 4 = 256 bytes x 320 steps)
    assert growth < 16384, growth


def test_llama_generate_past_capacity_needs_a_rotating_window():
    model = small_llama("half")
    with pytest.raises(ValueError, match="max_seq_len = 32"):
        model.generate(np.arange(1, 9), 40, cache=model.make_cache(1, max_seq_len=32, n_sink=4))


# -- 9. the bench runs (bench/streaming.py --quick); no timing is asserted ------------------

def test_streaming_bench_quick_runs_and_streams_in_constant_memory(tmp_path):
    import json
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "bench", "streaming.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / "streaming.json") as f:
        result = json.load(f)
    ops = {row["op"] for row in result["eviction"]["rows"]}
    assert {"window S=64: update+advance", "window S=16384: update+advance"} <= ops
    assert {row["op"] for row in result["rotation"]["rows"]} == {
        "rotation off", "rotation on", "rotation on, turned ring"}
    streamed = result["stream"]
    assert streamed["tokens_generated"] == streamed["new_tokens"] == 10 * streamed["max_seq_len"]
    assert streamed["evicted"] > 8 * streamed["max_seq_len"] and not streamed["arena_moved"]
    assert "target <= 1.2x" in proc.stdout and "target <= 1.3x" in proc.stdout
