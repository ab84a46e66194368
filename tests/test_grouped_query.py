"""Grouped-query attention in the integration: the cache stores K/V heads only.

``enable_kv_cache`` sizes the cache by ``num_kv_heads`` (or ``n_kv_heads``),
``cached_attention`` splits k and v by it, and ``footprint``, ``plan`` and
``get_memory_usage`` count K/V heads. The tests that run a grouped-query
model through ``KVCache.attend`` (marked "needs GQA attend") need ``attend``
to take q with G times the cache's heads.
"""

import numpy as np
import pytest

from conftest import Tensor
from kvarena import KVCache, disable_kv_cache, enable_kv_cache, footprint, plan
from kvarena.models import GPT, CachedMultiHeadAttention


def relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def gqa_gpt(num_kv_heads=2):
    return GPT(vocab_size=64, embed_dim=48, num_layers=2, num_heads=6, max_seq_len=128,
               seed=3, num_kv_heads=num_kv_heads)


# -- sizes -----------------------------------------------------------------------

def test_enable_kv_cache_stores_the_kv_heads():
    model = gqa_gpt(2)
    cache = enable_kv_cache(model, batch_size=3)
    try:
        assert (cache.num_heads, cache.head_dim) == (2, 8)       # head_dim = 48 / 6 query heads
        assert cache.arena.shape == (2, 2, 3, 2, 128, 8)
        fp = footprint(3, 128, 2, 2, 8)
        assert cache.get_memory_usage()["total_bytes"] == fp.total_bytes
        assert footprint(3, 128, 2, 6, 8).arena_bytes == 3 * fp.arena_bytes
    finally:
        disable_kv_cache(model)


def test_plan_counts_kv_heads():
    # a budget that holds 1000 positions of 6 heads holds 3000 of 2
    slot = footprint(1, 1, 2, 6, 8).arena_bytes
    budget = 1000 * slot + 63                   # and room to align the arena
    assert plan(2, 6, 8, batch_size=1, available_bytes=budget).max_seq_len == 1000
    assert plan(2, 2, 8, batch_size=1, available_bytes=budget).max_seq_len == 3000


class Attention:
    def __init__(self, num_heads, head_dim, **kv):
        self.num_heads, self.head_dim = num_heads, head_dim
        vars(self).update(kv)
        self.q_proj = self.k_proj = self.v_proj = self.out_proj = None


class Model:
    """The attributes enable_kv_cache reads, and K/V heads under either name."""

    def __init__(self, num_heads=4, **kv):
        self.embed_dim, self.num_layers, self.num_heads, self.max_seq_len = 32, 2, num_heads, 16
        vars(self).update(kv)
        self.blocks = [type("Block", (), {"attention": Attention(num_heads, 8, **kv)})()
                       for _ in range(2)]


@pytest.mark.parametrize("kv, heads", [
    ({}, 4),
    ({"num_kv_heads": 2}, 2),
    ({"n_kv_heads": 1}, 1),             # llama2.c / Meta's name; multi-query
    ({"num_kv_heads": None}, 4),        # None: not grouped
])
def test_enable_kv_cache_reads_either_name(kv, heads):
    model = Model(**kv)
    cache = enable_kv_cache(model)
    assert (cache.num_heads, cache.head_dim) == (heads, 8)
    disable_kv_cache(model)


@pytest.mark.parametrize("kv, match", [
    ({"num_kv_heads": 3}, r"^model.num_heads must be a multiple of model.num_kv_heads .*got model.num_heads=4, model.num_kv_heads=3"),
    ({"n_kv_heads": 8}, r"^model.num_heads must be a multiple of model.n_kv_heads"),
    ({"num_kv_heads": 0}, r"^model.num_kv_heads must be a positive int"),
])
def test_enable_kv_cache_rejects_bad_kv_heads(kv, match):
    model = Model(**kv)
    with pytest.raises(ValueError, match=match):
        enable_kv_cache(model)
    assert not getattr(model, "_cache_enabled", False)


@pytest.mark.parametrize("make, match", [
    (lambda: CachedMultiHeadAttention(48, 6, num_kv_heads=4), r"^num_heads must be a multiple of num_kv_heads"),
    (lambda: CachedMultiHeadAttention(48, 6, num_kv_heads=0), r"^num_kv_heads must be a positive int"),
    (lambda: gqa_gpt(5), r"^num_heads must be a multiple of num_kv_heads .*got num_heads=6, num_kv_heads=5"),
])
def test_constructors_reject_a_query_head_count_that_is_not_a_multiple(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- the uncached path: query head h reads K/V head h // G ------------------------

def attention_by_heads(attention, x):
    """float64, one query head at a time, K/V head h // G, causal (llama2.c's loop)."""
    B, T, _ = x.shape
    H, D = attention.num_heads, attention.head_dim
    G = H // attention.num_kv_heads
    x = x.astype(np.float64)
    q, k, v = ((x @ p.weight + p.bias).reshape(B, T, -1, D)
               for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = k[b, :t + 1, h // G] @ q[b, t, h] / np.sqrt(D)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, :t + 1, h // G] / weights.sum()
    return out.reshape(B, T, H * D) @ attention.out_proj.weight + attention.out_proj.bias


@pytest.mark.parametrize("num_kv_heads", [6, 3, 2, 1])
def test_uncached_grouped_query_attention_equals_per_head_loop(num_kv_heads, rng):
    attention = CachedMultiHeadAttention(48, 6, rng=1, num_kv_heads=num_kv_heads)
    assert attention.k_proj.weight.shape == (48, num_kv_heads * 8)
    x = rng.standard_normal((2, 9, 48)).astype(np.float32)
    assert relative_error(attention.forward(x), attention_by_heads(attention, x)) <= 1e-5


# -- through the cache (needs GQA attend) ------------------------------------------

@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_cached_grouped_query_attention_equals_uncached(num_kv_heads, rng):
    # needs GQA attend
    attention = CachedMultiHeadAttention(48, 6, rng=1, num_kv_heads=num_kv_heads)
    x = rng.standard_normal((2, 10, 48)).astype(np.float32)
    cache = KVCache(2, 16, 1, num_kv_heads, 8)
    outputs = [attention.forward(x[:, :6], cache=cache, layer_idx=0)]
    cache.advance(6)
    for t in range(6, 10):
        outputs.append(attention.forward(x[:, t:t + 1], cache=cache, layer_idx=0))
        cache.advance()
    assert relative_error(np.concatenate(outputs, axis=1), attention.forward(x)) <= 1e-5


def test_grouped_query_gpt_cached_logits_and_tokens_equal_uncached(rng):
    # needs GQA attend
    model = gqa_gpt(2)
    tokens = rng.integers(0, 64, size=(2, 24))
    cache = enable_kv_cache(model, batch_size=2)
    try:
        got = [model.forward(tokens[:, :8])]
        cache.advance(8)
        for t in range(8, 24):
            got.append(model.forward(tokens[:, t:t + 1]))
            cache.advance()
    finally:
        disable_kv_cache(model)
    got = np.concatenate(got, axis=1)
    for t in range(24):
        assert relative_error(got[:, t], model.forward(tokens[:, :t + 1])[:, -1]) <= 1e-5, t
    prompt = np.array([5, 17, 2])
    np.testing.assert_array_equal(model.generate(prompt, 100),
                                  model.generate(prompt, 100, use_cache=False))


class GroupedQueryAttention:
    """A third-party attention written with TinyTorch's tensor type and Meta's n_kv_heads."""

    def __init__(self, embed_dim, num_heads, n_kv_heads, rng):
        self.num_heads, self.n_kv_heads = num_heads, n_kv_heads
        self.head_dim = embed_dim // num_heads
        widths = (embed_dim, n_kv_heads * self.head_dim, n_kv_heads * self.head_dim, embed_dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Projection(embed_dim, width, rng) for width in widths)

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        D, G = self.head_dim, self.num_heads // self.n_kv_heads
        q, k, v = (p.forward(x).data.reshape(B, T, -1, D).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + np.triu(np.full((T, T), -1e9), k=1)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return self.out_proj.forward(Tensor((weights @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)))


class Projection:
    def __init__(self, n_in, n_out, rng):
        self.weight = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    def forward(self, x):
        return Tensor(x.data @ self.weight)


def test_third_party_grouped_query_model_through_enable_kv_cache(rng):
    # needs GQA attend
    model = Model(num_heads=4, n_kv_heads=2)
    for block in model.blocks:
        block.attention = GroupedQueryAttention(32, 4, 2, rng)
    x = Tensor(rng.standard_normal((1, 12, 32)))
    run = lambda x: [block.attention.forward(x).data for block in model.blocks]
    uncached = run(x)
    cache = enable_kv_cache(model)
    assert cache.num_heads == 2
    prefill = run(Tensor(x.data[:, :5]))
    cache.advance(5)
    steps = []
    for t in range(5, 12):
        steps.append(run(Tensor(x.data[:, t:t + 1])))
        cache.advance()
    disable_kv_cache(model)
    for layer in range(2):
        got = np.concatenate([prefill[layer]] + [s[layer] for s in steps], axis=1)
        assert relative_error(got, uncached[layer]) <= 1e-5
