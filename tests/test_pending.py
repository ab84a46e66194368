"""A model that does its own attention: update(), then read the pending block with get(pending=True).

get() after update() returns the committed positions only (TinyTorch's
semantics, kept for drop-in code). Attending over that leaves the new
tokens out: TinyTorch's "new token does not attend to itself" bug.
get(pending=True) adds the block the layer's last update() wrote, as
zero-copy views, and attending over it gives the uncached result.
"""

import numpy as np
import pytest

from kvarena import KVCache, attend_reference

B, S, L, H, D = 2, 24, 2, 3, 8


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def own_attention(q, keys, values):
    """A model's own attention of q (B, H, T, D) over keys (B, H, n, D), the last T being q's own."""
    T, n = q.shape[2], keys.shape[2]
    scores = q.astype(np.float64) @ keys.swapaxes(-1, -2) / np.sqrt(D)      # (B, H, T, n)
    visible = np.arange(n) <= n - T + np.arange(T)[:, None]                  # causal in the block
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ values


def run(cache, q, k, v, blocks, pending):
    """Blocks of the sequence through ``cache`` with update + get; their outputs, concatenated."""
    outputs, start = [], 0
    for T in blocks:
        new = slice(start, start + T)
        cache.update(0, k[:, :, new], v[:, :, new])
        keys, values = cache.get(0, pending=pending)
        outputs.append(own_attention(q[:, :, new], keys, values) if keys.shape[2] else
                       np.full(q[:, :, new].shape, np.nan))        # nothing to attend to
        cache.advance(T)
        start += T
    return np.concatenate(outputs, axis=2)


BLOCKS = [5, 1, 1, 3, 1, 1]   # a prefill, decoding, a block of 3, decoding


def test_pending_block_gives_the_uncached_result(rng):
    q, k, v = (normal(rng, B, H, sum(BLOCKS), D) for _ in range(3))
    got = run(KVCache(B, S, L, H, D), q, k, v, BLOCKS, pending=True)
    want = attend_reference(q, k, v, [0] * B)      # the whole sequence, no cache
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_get_after_update_reproduces_tinytorch_bug(rng):
    # the obvious way: get() right after update() returns the committed
    # positions only, so each new token attends to the past but not to itself
    q, k, v = (normal(rng, B, H, sum(BLOCKS), D) for _ in range(3))
    got = run(KVCache(B, S, L, H, D), q, k, v, [5, 1, 1], pending=False)
    assert np.isnan(got[:, :, :5]).all(), "the prefill sees nothing at all"
    for t in (5, 6):
        tinytorch = own_attention(q[:, :, t:t + 1], k[:, :, :t], v[:, :, :t])   # positions < t
        np.testing.assert_allclose(got[:, :, t:t + 1], tinytorch, rtol=1e-5, atol=1e-6)
        uncached = attend_reference(q[:, :, t:t + 1], k, v, [t] * B)           # positions <= t
        assert not np.allclose(got[:, :, t:t + 1], uncached, atol=1e-3)


def test_pending_views_are_zero_copy_read_only_and_hold_the_block(rng):
    cache = KVCache(B, S, L, H, D)
    past, new = normal(rng, B, H, 4, D), normal(rng, B, H, 3, D)
    for layer in range(L):
        cache.update(layer, past, -past)
    cache.advance(4)
    cache.update(1, new, -new)
    keys, values = cache.get(1, pending=True)
    assert keys.shape == values.shape == (B, H, 7, D)
    for view in (keys, values):
        assert np.shares_memory(view, cache.arena) and not view.flags.writeable
    np.testing.assert_array_equal(keys, np.concatenate([past, new], axis=2))
    np.testing.assert_array_equal(values, -keys)
    # layer 0 has nothing pending; the committed view is unchanged
    assert cache.get(0, pending=True)[0].shape == (B, H, 4, D)
    assert cache.get(1)[0].shape == (B, H, 4, D)


def test_the_pending_block_is_the_last_write_until_the_lengths_change(rng):
    cache = KVCache(B, S, L, H, D)
    cache.update(0, normal(rng, B, H, 3, D), normal(rng, B, H, 3, D))
    last = normal(rng, B, H, 2, D)
    cache.update(0, last, last)                        # overwrites from the same position
    np.testing.assert_array_equal(cache.get(0, pending=True)[0], last)
    for change in (lambda c: c.advance(2), lambda c: c.crop(1), lambda c: c.reorder([1, 0]),
                   lambda c: c.advance([1, 1]), lambda c: c.copy_sequence(0, 1),
                   lambda c: setattr(c, "seq_pos", 2), lambda c: c.reset()):
        cache.update(0, last, last)
        change(cache)
        assert cache.get(0, pending=True)[0].shape == cache.get(0)[0].shape, change


def test_pending_per_row_in_a_ragged_batch(rng):
    cache = KVCache(B, S, L, H, D)
    prompt = normal(rng, B, H, 6, D)
    cache.update(0, prompt, prompt)
    cache.advance([6, 2])
    new = normal(rng, B, H, 1, D)
    cache.update(0, new, new)
    for row, length in enumerate([6, 2]):
        keys, _ = cache.get(0, row=row, pending=True)
        assert keys.shape == (1, H, length + 1, D)
        np.testing.assert_array_equal(keys[0, :, :length], prompt[row, :, :length])
        np.testing.assert_array_equal(keys[0, :, length], new[row, :, 0])
    with pytest.raises(ValueError, match="^row must be given"):
        cache.get(0, pending=True)


def test_pending_in_a_sliding_window_holds_what_attention_needs(rng):
    # 2 sinks + a window of 4; the write that evicts shows the kept positions and the new one
    cache = KVCache(1, 6, 1, H, D, n_sink=2)
    seq = normal(rng, 1, H, 9, D)
    cache.update(0, seq[:, :, :4], seq[:, :, :4])
    cache.advance(4)
    for t in range(4, 9):
        cache.update(0, seq[:, :, t:t + 1], seq[:, :, t:t + 1])
        keys, _ = cache.get(0, pending=True)
        kept = list(range(t + 1)) if t < 6 else [0, 1] + list(range(t - 3, t + 1))
        np.testing.assert_array_equal(keys, seq[:, :, kept])
        cache.advance()


@pytest.mark.parametrize("read", ["get", "get_quantized"])
def test_pending_must_be_a_bool(read):
    # a truthy string is an error, not True (as lazy and check_finite)
    cache = KVCache(B, S, L, H, D, dtype=np.int8 if read == "get_quantized" else np.float32)
    with pytest.raises(TypeError, match=r"^pending must be True or False; got 'no' of type str$"):
        getattr(cache, read)(0, pending="no")


def test_attend_leaves_nothing_pending(rng):
    cache = KVCache(B, S, L, H, D)
    block = normal(rng, B, H, 3, D)
    cache.attend(0, block, block, block)
    assert cache.get(0, pending=True)[0].shape == (B, H, 0, D)
