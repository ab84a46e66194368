"""Cached generation equals uncached generation, on kvarena's GPT and a TinyTorch-shaped model."""

import numpy as np
import pytest

from conftest import Tensor
from kvarena import KVCache, disable_kv_cache, enable_kv_cache
from kvarena.models import GPT, CachedMultiHeadAttention


def relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.fixture(scope="module")
def gpt():
    return GPT(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, max_seq_len=260, seed=3)


def cached_logits(model, tokens, prefill):
    """Logits of ``tokens`` computed through the cache: a prefill block, then one token per call."""
    cache = enable_kv_cache(model, batch_size=tokens.shape[0])
    try:
        steps = [tokens[:, :prefill]] if prefill else []
        steps += [tokens[:, t:t + 1] for t in range(prefill, tokens.shape[1])]
        logits = []
        for step in steps:
            logits.append(model.forward(step))
            cache.advance(step.shape[1])
        return np.concatenate(logits, axis=1)
    finally:
        disable_kv_cache(model)


@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_cached_logits_equal_full_forward_at_every_step(gpt, prefill, rng):
    tokens = rng.integers(0, gpt.vocab_size, size=(2, 40))
    got = cached_logits(gpt, tokens, prefill)
    for t in range(tokens.shape[1]):
        # the uncached model sees the whole prefix at every step
        want = gpt.forward(tokens[:, :t + 1])[:, -1]
        assert relative_error(got[:, t], want) <= 1e-5, f"step {t}"


def test_greedy_tokens_identical_over_250_new_tokens(gpt):
    prompt = np.array([5, 17, 2, 40, 33])
    cached = gpt.generate(prompt, 250, use_cache=True)
    uncached = gpt.generate(prompt, 250, use_cache=False)
    assert cached.shape == (255,)
    np.testing.assert_array_equal(cached[:5], prompt)
    np.testing.assert_array_equal(cached, uncached)
    assert len(np.unique(cached[5:])) > 3, "a degenerate sequence would prove little"


RAGGED = [np.array([5, 17, 2, 40, 33, 9, 1]), np.array([8]), np.array([60, 3, 3, 12])]


def test_ragged_batch_equals_each_prompt_alone(gpt):
    # one batch of prompts of lengths 7, 1 and 4 decodes as if each ran alone:
    # no real token attends to the prefill's padding
    batch = gpt.generate(RAGGED, 40)
    assert [len(row) for row in batch] == [47, 41, 44]
    for prompt, row in zip(RAGGED, batch):
        np.testing.assert_array_equal(row[:len(prompt)], prompt)
        np.testing.assert_array_equal(row, gpt.generate(prompt, 40))


def test_ragged_batch_logits_equal_full_forward_per_row(gpt, rng):
    lengths = [6, 2, 9]
    tokens = rng.integers(0, gpt.vocab_size, size=(3, 9 + 12))
    uncached = GPT(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, max_seq_len=260, seed=3)
    cache = enable_kv_cache(gpt, batch_size=3)
    try:
        gpt.forward(tokens[:, :9], start_pos=0)           # right-padded prefill
        cache.advance(lengths)
        for step in range(12):
            ends = np.array(lengths) + step
            got = gpt.forward(tokens[np.arange(3), ends][:, None])[:, -1]
            cache.advance(1)
            for b in range(3):
                want = uncached.forward(tokens[b:b + 1, :ends[b] + 1])[0, -1]
                assert relative_error(got[b], want) <= 1e-5, f"row {b} step {step}"
    finally:
        disable_kv_cache(gpt)


def test_ragged_sampling_cached_equals_uncached(gpt):
    cached = gpt.generate(RAGGED, 25, temperature=0.9, seed=4)
    uncached = gpt.generate(RAGGED, 25, use_cache=False, temperature=0.9, seed=4)
    for got, want in zip(cached, uncached, strict=True):
        np.testing.assert_array_equal(got, want)


def test_sampled_tokens_identical_with_the_same_seed(gpt):
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    cached = gpt.generate(prompt, 30, temperature=0.8, seed=11)
    uncached = gpt.generate(prompt, 30, use_cache=False, temperature=0.8, seed=11)
    np.testing.assert_array_equal(cached, uncached)
    assert not np.array_equal(cached, gpt.generate(prompt, 30, temperature=0.8, seed=12))


def test_generate_reuses_an_enabled_cache_and_leaves_it_enabled(gpt):
    prompt = np.array([3, 1, 4])
    expected = gpt.generate(prompt, 12)
    cache = enable_kv_cache(gpt)
    try:
        np.testing.assert_array_equal(gpt.generate(prompt, 12), expected)
        np.testing.assert_array_equal(gpt.generate(prompt, 12), expected)  # reset in between
        assert gpt._kv_cache is cache and cache.seq_pos == 3 + 11
    finally:
        disable_kv_cache(gpt)


def test_disable_restores_bit_identical_uncached_outputs(gpt, rng):
    tokens = rng.integers(0, gpt.vocab_size, size=(1, 12))
    before = gpt.forward(tokens)
    forwards = [vars(block.attention).get("forward") for block in gpt.blocks]
    enable_kv_cache(gpt)
    gpt.forward(tokens)
    disable_kv_cache(gpt)
    np.testing.assert_array_equal(gpt.forward(tokens), before)
    assert [vars(block.attention).get("forward") for block in gpt.blocks] == forwards


def test_cached_multi_head_attention_with_and_without_cache(rng):
    attention = CachedMultiHeadAttention(embed_dim=24, num_heads=3, rng=5)
    x = rng.standard_normal((2, 10, 24)).astype(np.float32)
    full = attention.forward(x)
    cache = KVCache(2, 16, 1, 3, 8)
    outputs = [attention.forward(x[:, :6], cache=cache, layer_idx=0)]
    cache.advance(6)
    for t in range(6, 10):
        outputs.append(attention.forward(x[:, t:t + 1], cache=cache, layer_idx=0))
        cache.advance()
    assert relative_error(np.concatenate(outputs, axis=1), full) <= 1e-5


# -- a model with TinyTorch's attribute layout and tensor type --------------------

class Linear:
    def __init__(self, n_in, n_out, rng):
        self.weight = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
        self.bias = rng.standard_normal(n_out).astype(np.float32) * 0.1

    def forward(self, x):
        return Tensor(x.data @ self.weight + self.bias)


class MultiHeadAttention:
    """Plain full-sequence causal attention, written as TinyTorch students write it."""

    def __init__(self, embed_dim, num_heads, rng):
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Linear(embed_dim, embed_dim, rng) for _ in range(4))

    def forward(self, x, mask=None):
        B, T, E = x.shape
        heads = [p.forward(x).data.reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = heads
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(self.head_dim)
        scores = scores + mask.data * -1e9
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        merged = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, E)
        return self.out_proj.forward(Tensor(merged))


class Block:
    def __init__(self, embed_dim, num_heads, rng):
        self.attention = MultiHeadAttention(embed_dim, num_heads, rng)

    def forward(self, x, mask):
        return Tensor(x.data + self.attention.forward(x, mask).data)


class TinyGPT:
    """TinyTorch's GPT layout; positions start at ``start_pos`` (0 without a cache)."""

    def __init__(self, vocab_size=50, embed_dim=32, num_layers=3, num_heads=4, max_seq_len=64):
        rng = np.random.default_rng(7)
        self.vocab_size, self.embed_dim, self.num_layers = vocab_size, embed_dim, num_layers
        self.num_heads, self.max_seq_len = num_heads, max_seq_len
        self.embedding = rng.standard_normal((vocab_size, embed_dim)).astype(np.float32)
        self.positions = rng.standard_normal((max_seq_len, embed_dim)).astype(np.float32) * 0.1
        self.blocks = [Block(embed_dim, num_heads, rng) for _ in range(num_layers)]
        self.head = Linear(embed_dim, vocab_size, rng)

    def forward(self, tokens, start_pos=0):
        T = tokens.shape[1]
        x = Tensor(self.embedding[tokens] + self.positions[start_pos:start_pos + T])
        mask = Tensor(np.triu(np.ones((T, T)), k=1))
        for block in self.blocks:
            x = block.forward(x, mask)
        return self.head.forward(x)


def test_tinytorch_shaped_model_cached_equals_uncached(rng):
    model = TinyGPT()
    tokens = rng.integers(0, model.vocab_size, size=(1, 30))
    uncached = [model.forward(tokens[:, :t + 1]).data[:, -1] for t in range(30)]

    cache = enable_kv_cache(model)
    prefill = model.forward(tokens[:, :8], start_pos=0)
    assert isinstance(prefill, Tensor), "patched attention must keep the model's tensor type"
    cache.advance(8)
    got = list(prefill.data.transpose(1, 0, 2))
    for t in range(8, 30):
        got.append(model.forward(tokens[:, t:t + 1], start_pos=cache.seq_pos).data[:, -1])
        cache.advance()
    for t in range(30):
        assert relative_error(got[t], uncached[t]) <= 1e-5, f"step {t}"

    disable_kv_cache(model)
    np.testing.assert_array_equal(model.forward(tokens).data[:, -1], uncached[-1])


# -- what enable_kv_cache does to a model, and what it refuses ---------------------------

def test_attention_called_like_a_module_goes_through_the_patch(rng):
    # attention(x) must look forward up at the call, as TinyTorch's Module
    # does: enable_kv_cache patches the instance's forward
    attention = CachedMultiHeadAttention(embed_dim=16, num_heads=2, rng=0)
    model = type("Model", (), dict(embed_dim=16, num_layers=1, num_heads=2, max_seq_len=8,
                                   blocks=[type("Block", (), {"attention": attention})()]))()
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)
    full = attention(x)
    cache = enable_kv_cache(model)
    steps = []
    for t in range(4):
        steps.append(attention(x[:, t:t + 1]))
        cache.advance()
    assert relative_error(np.concatenate(steps, axis=1), full) <= 1e-5
    assert np.abs(cache.arena).max() > 0


def test_blocks_sharing_one_attention_are_refused_and_nothing_is_patched():
    model = GPT(vocab_size=50, embed_dim=16, num_layers=3, num_heads=2, max_seq_len=32, seed=1)
    model.blocks[2].attention = model.blocks[0].attention      # layers that share weights
    with pytest.raises(ValueError, match=r"^model.blocks\[2\].attention is the same object as "
                                         r"model.blocks\[0\].attention"):
        enable_kv_cache(model)
    assert not any("forward" in vars(block.attention) for block in model.blocks)
    assert not getattr(model, "_cache_enabled", False)


def test_an_attention_that_cannot_be_patched_leaves_no_layer_patched():
    model = GPT(vocab_size=50, embed_dim=16, num_layers=3, num_heads=2, max_seq_len=32, seed=1)
    first = model.blocks[0].attention

    class ReadOnlyForward:                  # forward is a property: it cannot be set
        q_proj, k_proj, v_proj, out_proj = (first.q_proj, first.k_proj, first.v_proj,
                                            first.out_proj)
        num_heads = 2
        forward = property(lambda self: first.forward)

    model.blocks[1].attention = ReadOnlyForward()
    with pytest.raises(TypeError, match=r"^model.blocks\[1\].attention \(ReadOnlyForward\) "
                                        r"cannot be patched"):
        enable_kv_cache(model)
    assert "forward" not in vars(first) and not getattr(model, "_cache_enabled", False)
    model.blocks[1].attention = CachedMultiHeadAttention(16, 2, rng=1)
    enable_kv_cache(model)                  # and the model can be cached afterwards
    disable_kv_cache(model)


def test_deepcopy_of_a_cached_model_runs_its_own_weights_and_cache():
    import copy
    original = GPT(vocab_size=50, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32, seed=1)
    enable_kv_cache(original)
    twin = copy.deepcopy(original)
    for block in twin.blocks:              # the twin's weights only
        block.attention.q_proj.weight[...] = 0
    tokens = np.array([[1, 2, 3]])
    got = twin.forward(tokens)
    assert np.abs(twin._kv_cache.arena).max() > 0, "the twin wrote its own cache"
    assert np.abs(original._kv_cache.arena).max() == 0, "and not the original's"
    disable_kv_cache(twin)
    np.testing.assert_allclose(got, twin.forward(tokens), rtol=1e-5, atol=1e-5)


def test_enable_kv_cache_takes_the_model_by_keyword():
    model = GPT(vocab_size=50, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32, seed=1)
    cache = enable_kv_cache(model=model, batch_size=2)
    assert model._kv_cache is cache and cache.batch_size == 2
    disable_kv_cache(model)


def test_models_refuse_dtypes_that_are_not_floating_point():
    for make in (lambda dtype: GPT(50, 16, 2, 2, 32, dtype=dtype),
                 lambda dtype: CachedMultiHeadAttention(16, 2, rng=0, dtype=dtype)):
        for dtype in (np.int32, None, "int8", np.longdouble):
            with pytest.raises(TypeError, match=r"^dtype must be a floating-point dtype"):
                make(dtype)


def test_generate_caches_in_the_model_dtype(monkeypatch):
    import kvarena.models.gpt as gpt_module
    made = []

    def spy(model, **options):
        made.append(enable_kv_cache(model, **options))
        return made[-1]
    monkeypatch.setattr(gpt_module, "enable_kv_cache", spy)
    model = GPT(50, 16, 2, 2, 32, seed=1, dtype=np.float64)
    assert (model.generate([1, 2, 3], 4) == model.generate([1, 2, 3], 4, use_cache=False)).all()
    assert made[0].dtype == np.float64


def test_sampling_gives_a_minus_inf_logit_no_weight_and_the_others_theirs():
    from kvarena.models.decoding import sample
    rng = np.random.default_rng(0)
    drawn = np.bincount([sample(np.array([[0.0, 1.0, 1.0, -np.inf]]), 1.0, rng)[0]
                         for _ in range(2000)], minlength=4)
    # weights 1 : e : e : 0
    assert drawn[3] == 0 and 200 < drawn[0] < 450 and 700 < drawn[1] < 1000, drawn


@pytest.mark.parametrize("temperature, error", [(10**400, ValueError), ("1", TypeError),
                                                (float("nan"), ValueError), (-1, ValueError)],
                         ids=["beyond-float", "str", "nan", "negative"])
def test_bad_temperatures_are_named(temperature, error):
    with pytest.raises(error, match=r"^temperature must be a"):
        GPT(50, 16, 2, 2, 32).generate([1, 2], 2, temperature=temperature)


def test_a_fraction_temperature_samples_as_its_float():
    import fractions
    model = GPT(50, 16, 2, 2, 32, seed=1)
    np.testing.assert_array_equal(
        model.generate([1, 2], 6, temperature=fractions.Fraction(1, 2), seed=3),
        model.generate([1, 2], 6, temperature=0.5, seed=3))


def test_a_temperature_too_small_for_the_logits_is_greedy():
    # logits / 1e-320 overflow: the limit of sampling as temperature -> 0 is argmax
    model = GPT(50, 16, 2, 2, 32, seed=1)
    greedy = model.generate([1, 2, 3], 5)
    np.testing.assert_array_equal(model.generate([1, 2, 3], 5, temperature=1e-320, seed=0), greedy)


@pytest.mark.parametrize("prompt, match", [
    ([np.array([1, 2]), np.array([[3]])], r"^prompt_tokens must be an array of token ids or a "
                                          r"list of 1-D prompts; got \[array"),
    ([[1, 2], 5], r"^prompt_tokens must be an array of token ids or a list of 1-D prompts"),
    ([[1, 2], [3, [4]]], r"^prompt_tokens must be an array of token ids or a list of 1-D prompts"),
    ([], r"^prompt_tokens must hold at least one token; got shape \(0,\)$"),
    ([[], [1]], r"^prompt_tokens\[0\] must hold at least one token; got shape \(0,\)$"),
], ids=["nested-deeper", "int-in-list", "list-in-a-row", "empty", "one-empty"])
def test_malformed_prompts_are_named(prompt, match):
    with pytest.raises(ValueError, match=match):
        GPT(50, 16, 2, 2, 32).generate(prompt, 2)


def test_attention_kv_heads_must_match_the_model():
    model = GPT(50, 16, 2, 4, 32, num_kv_heads=2)
    model.num_kv_heads = 1                 # the model says 1, its attentions 2
    with pytest.raises(ValueError, match=r"^model.blocks\[0\].attention.num_kv_heads = 2 differs "
                                         r"from model.num_kv_heads = 1"):
        enable_kv_cache(model)
    assert not any("forward" in vars(block.attention) for block in model.blocks)


def test_a_refused_enable_creates_no_cache_file(tmp_path):
    # every check comes before the cache, which would create (and lock) its file
    model = GPT(50, 16, 3, 2, 32, seed=1)
    model.blocks[2].attention = model.blocks[1].attention
    with pytest.raises(ValueError, match="same object"):
        enable_kv_cache(model, path=tmp_path / "arena.kvm")
    assert list(tmp_path.iterdir()) == []


def test_uncached_layers_warned_as_an_error_leave_the_model_unpatched():
    import warnings
    model = GPT(50, 16, 2, 2, 32, seed=1)
    model.blocks[1].attention = object()    # no projections: would be left uncached
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"model.blocks\[1\].attention .* left uncached"):
            enable_kv_cache(model)
    assert "forward" not in vars(model.blocks[0].attention)
    assert not getattr(model, "_cache_enabled", False)


def test_attention_without_kv_heads_on_a_grouped_model_is_refused():
    # such an attention splits k and v by its num_heads: refused at enable,
    # not a shape error at the first forward
    model = TinyGPT(num_heads=4)
    model.num_kv_heads = 1
    with pytest.raises(ValueError, match=r"^model.blocks\[0\].attention.num_heads = 4 differs "
                                         r"from model.num_kv_heads = 1"):
        enable_kv_cache(model)
    assert not any("forward" in vars(block.attention) for block in model.blocks)


def test_a_forward_read_back_as_a_wrapper_still_gets_the_cache(rng):
    # an attention whose forward is a property: what it reads back is not
    # what was set, so the cache goes to the objects enable_kv_cache made
    class Hooked(MultiHeadAttention):
        @property
        def forward(self):
            inner = self.__dict__.get("hooked") or (
                lambda x, mask=None: MultiHeadAttention.forward(self, x, mask))
            return lambda *args, **kwargs: inner(*args, **kwargs)

        @forward.setter
        def forward(self, f):
            self.__dict__["hooked"] = f

        @forward.deleter
        def forward(self):
            del self.__dict__["hooked"]

    model = TinyGPT()
    for block in model.blocks:
        block.attention.__class__ = Hooked
    tokens = rng.integers(0, model.vocab_size, size=(1, 6))
    uncached = model.forward(tokens).data
    cache = enable_kv_cache(model)
    assert all(block.attention.hooked.cache is cache for block in model.blocks)
    got = model.forward(tokens, start_pos=0).data
    assert relative_error(got, uncached) <= 1e-5
    disable_kv_cache(model)
    assert not any("hooked" in vars(block.attention) for block in model.blocks)
