"""The Llama-style reference model: its parts against NumPy references, cached against uncached.

Cached generation runs through three caches: ``NumpyKVCache`` (the bench's
baseline, repeat_kv), ``KVCache`` with as many query heads as K/V heads
(G = 1), and ``KVCache`` with grouped-query attention (G > 1), which needs
``KVCache.attend`` to take q with G times the cache's heads.
"""

import numpy as np
import pytest

from kvarena import KVCache, attend_reference, footprint
from kvarena.models import Llama, NumpyKVCache, causal_attention, repeat_kv, rope

VOCAB, DIM, LAYERS, MAX_SEQ = 64, 48, 2, 160


def llama(n_heads=6, n_kv_heads=2, **options):
    return Llama(VOCAB, DIM, LAYERS, n_heads, MAX_SEQ, n_kv_heads=n_kv_heads, seed=3, **options)


def relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


# the (n_heads, n_kv_heads) under test: grouped-query, multi-query, plain multi-head
GQA, MQA, MHA = (6, 2), (6, 1), (6, 6)


def caches(model, batch_size, kinds=("numpy", "kvarena")):
    made = {"numpy": NumpyKVCache(batch_size, MAX_SEQ, model.n_layers, model.n_kv_heads,
                                  model.head_dim),
            "kvarena": model.make_cache(batch_size)}
    return [made[kind] for kind in kinds]


# -- rotary positions -------------------------------------------------------

def rope_complex(x, positions, theta, style):
    """Meta's formulation: each pair as a complex number times exp(i * position * freq)."""
    D = x.shape[-1]
    x = x.astype(np.float64)
    a, b = (x[..., 0::2], x[..., 1::2]) if style == "interleaved" else (x[..., :D // 2], x[..., D // 2:])
    freqs = 1.0 / theta ** (np.arange(D // 2) * 2 / D)
    z = (a + 1j * b) * np.exp(1j * np.asarray(positions)[..., None, None] * freqs)
    out = np.empty_like(x)
    if style == "interleaved":
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., :D // 2], out[..., D // 2:] = z.real, z.imag
    return out


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_equals_complex_rotation(style, rng):
    x = rng.standard_normal((2, 5, 3, 8))
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    np.testing.assert_allclose(rope(x, positions, 500.0, style), rope_complex(x, positions, 500.0, style),
                               rtol=0, atol=1e-12)


def test_rope_by_hand():
    # D = 4, theta = 100: pair 0 turns by p * 1, pair 1 by p * 100 ** (-1/2) = p / 10.
    # At p = 1, interleaved, x = (1, 0, 0, 2): pair (1, 0) -> (cos 1, sin 1),
    # pair (0, 2) -> (-2 sin 0.1, 2 cos 0.1)
    x = np.array([1.0, 0.0, 0.0, 2.0]).reshape(1, 1, 1, 4)
    want = [np.cos(1), np.sin(1), -2 * np.sin(0.1), 2 * np.cos(0.1)]
    np.testing.assert_allclose(rope(x, [[1]], 100.0).ravel(), want, rtol=1e-15)
    # "half" pairs 0 with 2 and 1 with 3: (1, 0) turns by 1, (0, 2) by 0.1
    want = [np.cos(1), -2 * np.sin(0.1), np.sin(1), 2 * np.cos(0.1)]
    np.testing.assert_allclose(rope(x, [[1]], 100.0, "half").ravel(), want, rtol=1e-15)


def test_rope_styles_are_one_rotation_of_reordered_dimensions(rng):
    # "half" of x with its even dimensions first equals "interleaved" of x, reordered
    x = rng.standard_normal((1, 3, 2, 8))
    order = np.r_[0:8:2, 1:8:2]
    np.testing.assert_allclose(rope(x[..., order], [[3, 4, 5]], 50.0, "half"),
                               rope(x, [[3, 4, 5]], 50.0, "interleaved")[..., order], atol=1e-12)


def test_rope_scores_depend_on_relative_position_only(rng):
    q, k = rng.standard_normal((2, 1, 1, 1, 16))
    score = lambda i, j: float((rope(q, [[i]], 1e4) * rope(k, [[j]], 1e4)).sum())
    assert score(9, 4) == pytest.approx(score(105, 100), rel=1e-9)
    assert score(9, 4) != pytest.approx(score(9, 5), rel=1e-3)


# -- attention: repeat_kv's order is llama2.c's h // G ----------------------

def attention_by_heads(attention, x, positions):
    """llama2.c's loop in float64: query head h reads K/V head h // (H / H_kv), causal."""
    B, T, _ = x.shape
    H, D = attention.n_heads, attention.head_dim
    kv_mul = attention.n_heads // attention.n_kv_heads
    x = x.astype(np.float64)
    q = rope((x @ attention.wq.weight).reshape(B, T, H, D), positions, attention.rope_theta)
    k = rope((x @ attention.wk.weight).reshape(B, T, -1, D), positions, attention.rope_theta)
    v = (x @ attention.wv.weight).reshape(B, T, -1, D)
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                # iterate over all timesteps, including the current one
                scores = k[b, :t + 1, h // kv_mul] @ q[b, t, h] / np.sqrt(D)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, :t + 1, h // kv_mul] / weights.sum()
    return out.reshape(B, T, H * D) @ attention.wo.weight


@pytest.mark.parametrize("heads", [GQA, MQA, MHA])
def test_uncached_attention_equals_per_head_loop(heads, rng):
    attention = llama(*heads).layers[0].attention
    x = rng.standard_normal((2, 7, DIM)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6]])
    got = attention.forward(x, positions)
    assert relative_error(got, attention_by_heads(attention, x, positions)) <= 1e-5


def test_repeat_kv_order():
    kv = np.arange(2).reshape(1, 2, 1, 1)       # K/V heads 0 and 1
    assert repeat_kv(kv, 3).ravel().tolist() == [0, 0, 0, 1, 1, 1]


# -- the NumPy baseline cache ---------------------------------------------------

@pytest.mark.parametrize("q_dtype", [np.float32, np.float64])
def test_numpy_cache_equals_the_reference_over_repeated_heads(q_dtype, rng):
    # ragged rows (4 and 1 cached), a block of 2, 6 query heads over 2 K/V heads
    cache = NumpyKVCache(2, 12, 1, 2, 8)
    k0, v0 = rng.standard_normal((2, 2, 2, 4, 8))
    cache.attend(0, rng.standard_normal((2, 6, 4, 8)), k0, v0)
    cache.advance([4, 1])
    q = rng.standard_normal((2, 6, 2, 8)).astype(q_dtype)
    k, v = rng.standard_normal((2, 2, 2, 2, 8))
    out = cache.attend(0, q, k, v)
    assert out.dtype == q_dtype
    keys = np.concatenate([k0, np.zeros_like(k)], axis=2)
    values = np.concatenate([v0, np.zeros_like(v)], axis=2)
    for b, n in enumerate([4, 1]):            # each row's block right after its own length
        keys[b, :, n:n + 2], values[b, :, n:n + 2] = k[b], v[b]
    want = attend_reference(q, np.repeat(keys, 3, axis=1), np.repeat(values, 3, axis=1), [4, 1])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # 4 positions held (the longest row): 9 more would write position 12 of 12
    with pytest.raises(ValueError, match=r"^Sequence position 12 >= max_seq_len 12"):
        cache.attend(0, np.zeros((2, 6, 9, 8)), np.zeros((2, 2, 9, 8)), np.zeros((2, 2, 9, 8)))


# -- cached == uncached ------------------------------------------------------

def cached_logits(model, cache, tokens, prefill):
    """Logits through ``cache``: a prefill block, then one token per call."""
    cache.reset()
    steps = ([tokens[:, :prefill]] if prefill else []) + \
        [tokens[:, t:t + 1] for t in range(prefill, tokens.shape[1])]
    logits = []
    for step in steps:
        logits.append(model.forward(step, cache=cache))
        cache.advance(step.shape[1])
    return np.concatenate(logits, axis=1)


def check_cached_logits(model, cache, rng, prefill):
    tokens = rng.integers(0, VOCAB, size=(2, 30))
    got = cached_logits(model, cache, tokens, prefill)
    for t in range(tokens.shape[1]):
        want = model.forward(tokens[:, :t + 1])[:, -1]      # the whole prefix, no cache
        assert relative_error(got[:, t], want) <= 1e-5, f"step {t}"


@pytest.mark.parametrize("prefill", [0, 1, 9])
@pytest.mark.parametrize("heads", [GQA, MQA, MHA])
def test_numpy_cache_logits_equal_full_forward(heads, prefill, rng):
    model = llama(*heads)
    check_cached_logits(model, *caches(model, 2, ["numpy"]), rng, prefill)


@pytest.mark.parametrize("prefill", [0, 9])
def test_kvcache_logits_equal_full_forward_multi_head(prefill, rng):
    model = llama(*MHA)
    check_cached_logits(model, model.make_cache(2), rng, prefill)


@pytest.mark.parametrize("prefill", [0, 9])
@pytest.mark.parametrize("heads", [GQA, MQA])
def test_kvcache_logits_equal_full_forward_grouped_query(heads, prefill, rng):
    # needs KVCache.attend with q of G x the cache's heads
    model = llama(*heads)
    check_cached_logits(model, model.make_cache(2), rng, prefill)


PROMPT = np.array([5, 17, 2, 40, 33])


@pytest.mark.parametrize("kind", ["numpy", "kvarena"])
@pytest.mark.parametrize("heads", [GQA, MHA], ids=["gqa", "mha"])
def test_greedy_tokens_identical_over_120_new_tokens(heads, kind):
    # the kvarena x gqa case needs KVCache.attend with grouped-query q
    model = llama(*heads)
    uncached = model.generate(PROMPT, 120, use_cache=False)
    cached = model.generate(PROMPT, 120, cache=caches(model, 1, [kind])[0])
    assert cached.shape == (125,)
    np.testing.assert_array_equal(cached[:5], PROMPT)
    np.testing.assert_array_equal(cached, uncached)
    assert len(np.unique(cached[5:])) > 3, "a degenerate sequence would prove little"


RAGGED = [np.array([5, 17, 2, 40, 33, 9, 1]), np.array([8]), np.array([60, 3, 3, 12])]


@pytest.mark.parametrize("kind", ["numpy", "kvarena"])
def test_ragged_batch_equals_each_prompt_alone(kind):
    # no real token attends to the prefill's padding, and each row rotates
    # at its own positions (kvarena: needs grouped-query attend)
    model = llama(*GQA)
    batch = model.generate(RAGGED, 30, cache=caches(model, 3, [kind])[0])
    assert [len(row) for row in batch] == [37, 31, 34]
    for prompt, row in zip(RAGGED, batch):
        np.testing.assert_array_equal(row, model.generate(prompt, 30, use_cache=False))


def test_ragged_batch_multi_head_on_kvcache():
    model = llama(*MHA)
    batch = model.generate(RAGGED, 30)
    for prompt, row in zip(RAGGED, batch):
        np.testing.assert_array_equal(row, model.generate(prompt, 30, use_cache=False))


def test_ragged_logits_at_per_row_positions(rng):
    # rows at positions 6, 2 and 9 decode together; each equals its own full forward
    model = llama(*GQA)
    lengths = [6, 2, 9]
    tokens = rng.integers(0, VOCAB, size=(3, 9 + 8))
    cache = caches(model, 3, ["numpy"])[0]
    model.forward(tokens[:, :9], start_pos=0, cache=cache)      # right-padded prefill
    cache.advance(lengths)
    for step in range(8):
        ends = np.array(lengths) + step
        got = model.forward(tokens[np.arange(3), ends][:, None], cache=cache)[:, -1]
        cache.advance(1)
        for b in range(3):
            want = model.forward(tokens[b:b + 1, :ends[b] + 1])[0, -1]
            assert relative_error(got[b], want) <= 1e-5, f"row {b} step {step}"


def test_sampled_tokens_identical_with_the_same_seed():
    model = llama(*MHA)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    cached = model.generate(prompt, 30, temperature=0.8, seed=11)
    uncached = model.generate(prompt, 30, use_cache=False, temperature=0.8, seed=11)
    np.testing.assert_array_equal(cached, uncached)
    assert not np.array_equal(cached, model.generate(prompt, 30, temperature=0.8, seed=12))


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_style_changes_the_model_and_caches_the_same(style):
    model = llama(*GQA, rope_style=style)
    cached = model.generate(PROMPT, 40, cache=caches(model, 1, ["numpy"])[0])
    np.testing.assert_array_equal(cached, model.generate(PROMPT, 40, use_cache=False))
    other = llama(*GQA, rope_style="half" if style == "interleaved" else "interleaved")
    assert not np.allclose(model.forward(PROMPT[None]), other.forward(PROMPT[None]))


# -- where rotation happens: a cache that rotates by itself --------------------

class RotatingNumpyCache(NumpyKVCache):
    """Stores keys unrotated and rotates q and k by position when attending (issue 13's mode)."""

    def __init__(self, *shape, rope_theta, rope_style):
        super().__init__(*shape)
        self.rope_theta, self.rope_style = rope_theta, rope_style

    def attend(self, layer_idx, q, k, v):
        T = k.shape[2]
        out = super().attend(layer_idx, q, k, v)    # writes k unrotated; its output is replaced
        keys = self.keys[layer_idx]
        end = self.seq_pos + T
        # recompute with every key rotated at its slot and each query at its own
        positions = np.arange(end)[None]
        rotated = rope(keys[:, :, :end].transpose(0, 2, 1, 3), positions, self.rope_theta,
                       self.rope_style).transpose(0, 2, 1, 3)
        q_pos = self.seq_lens[:, None] + np.arange(T)
        q_rot = rope(q.transpose(0, 2, 1, 3), q_pos, self.rope_theta,
                     self.rope_style).transpose(0, 2, 1, 3)
        groups = q.shape[1] // self.num_heads
        out[...] = causal_attention(q_rot, repeat_kv(rotated, groups),
                                    repeat_kv(self.values[layer_idx, :, :, :end], groups),
                                    self.seq_lens)
        return out


def test_a_cache_that_rotates_gets_unrotated_keys_and_the_same_tokens():
    model = llama(*GQA)
    shape = (1, MAX_SEQ, LAYERS, model.n_kv_heads, model.head_dim)
    cache = RotatingNumpyCache(*shape, rope_theta=model.rope_theta, rope_style=model.rope_style)
    tokens = model.generate(PROMPT, 40, cache=cache)
    np.testing.assert_array_equal(tokens, model.generate(PROMPT, 40, use_cache=False))
    # the cache holds what the model's wk produced, unrotated
    x = model.layers[0].attention_norm.forward(model.tok_embeddings[PROMPT])
    k = (x @ model.layers[0].attention.wk.weight).reshape(5, model.n_kv_heads, -1)
    np.testing.assert_allclose(cache.keys[0, 0, :, :5].transpose(1, 0, 2), k, rtol=1e-6)

    wrong = RotatingNumpyCache(*shape, rope_theta=500.0, rope_style=model.rope_style)
    with pytest.raises(ValueError, match="rope_theta=500.0"):
        model.generate(PROMPT, 2, cache=wrong)


# -- the cache stores K/V heads only -------------------------------------------

def test_make_cache_holds_kv_heads_only():
    model = llama(*GQA)
    cache = model.make_cache(2)
    assert cache.arena.shape == (LAYERS, 2, 2, 2, MAX_SEQ, 8)
    fp = footprint(2, MAX_SEQ, LAYERS, model.n_kv_heads, model.head_dim)
    assert cache.get_memory_usage()["total_bytes"] == fp.total_bytes
    # a third of what the same model would need with its K/V repeated to 6 heads
    assert 3 * fp.arena_bytes == footprint(2, MAX_SEQ, LAYERS, 6, 8).arena_bytes


# -- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("args, error, match", [
    (dict(n_heads=6, n_kv_heads=4), ValueError, r"^n_heads must be a multiple of n_kv_heads .*got n_heads=6, n_kv_heads=4"),
    (dict(n_heads=6, n_kv_heads=0), ValueError, r"^n_kv_heads must be a positive int"),
    (dict(n_heads=5, n_kv_heads=5), ValueError, r"^dim must be n_heads times an even head_dim"),
    (dict(n_heads=48, n_kv_heads=1), ValueError, r"^dim must be n_heads times an even head_dim"),
    (dict(n_heads=6, n_kv_heads=2, rope_style="neox"), ValueError, r"^rope_style must be one of"),
    (dict(n_heads=6, n_kv_heads=2, rope_theta=0.0), ValueError,
     r"^rope_theta must be a finite number > 0; got 0.0$"),
    (dict(n_heads=6, n_kv_heads=2, rope_theta=10**400), ValueError,
     r"^rope_theta must be a finite number > 0; got 1000"),
    # integer weights would be truncated to zeros; None would silently mean float64
    (dict(n_heads=6, n_kv_heads=2, dtype=np.int32), TypeError,
     r"^dtype must be a floating-point dtype .*got <class 'numpy.int32'>"),
    (dict(n_heads=6, n_kv_heads=2, dtype=None), TypeError,
     r"^dtype must be a floating-point dtype .*got None"),
])
def test_constructor_rejects(args, error, match):
    n_heads, n_kv_heads = args.pop("n_heads"), args.pop("n_kv_heads")
    with pytest.raises(error, match=match):
        llama(n_heads, n_kv_heads, **args)


def test_make_cache_stores_the_model_dtype():
    # a float64 model keeps float64 keys and values unless told otherwise
    model = llama(6, 2, dtype=np.float64)
    assert model.make_cache().dtype == np.float64
    assert model.make_cache(dtype=np.float16).dtype == np.float16


def test_cache_of_the_wrong_geometry_is_rejected():
    model = llama(*GQA)
    with pytest.raises(ValueError, match=r"^cache must have .* = \(1, 2, 2, 8\) .*got \(1, 2, 6, 8\)"):
        model.forward(PROMPT[None], cache=KVCache(1, MAX_SEQ, LAYERS, 6, 8))
    with pytest.raises(ValueError, match=r"max_seq_len = 16; got 5 \+ 12"):
        model.generate(PROMPT, 12, cache=model.make_cache(1, max_seq_len=16))
    with pytest.raises(ValueError, match=r"^start_pos must be"):
        model.forward(PROMPT[None], start_pos=[1, 2])
