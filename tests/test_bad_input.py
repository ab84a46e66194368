"""The bad-input catalogue: every public entry point rejects bad input, names it, writes nothing.

SPEC "Bad input": the exception's message names the argument, what was
expected and what was given, and the cache (and the model) are left exactly
as they were. Each case below is (subject, call, exception, message
pattern). The subject is built fresh for every case; after the exception its
state must equal its state before, and its outputs must equal those of an
untouched twin built the same way.

Message patterns are anchored at the argument name (``^key\\b``) where the
message leads with it, because a bare ``"value"`` would also match "real
floating-point values" in a message about ``key``.
"""

import contextlib
import types

import numpy as np
import pytest

from kvarena import KVCache, disable_kv_cache, enable_kv_cache
from kvarena.models import GPT, CachedMultiHeadAttention

B, S, L, H, D = 2, 8, 3, 2, 4      # the cache under test
COMMITTED = 3                       # seq_pos after prefill; layer 0 also holds one uncommitted position
ROOM = S - COMMITTED                # the largest T that still fits

VOCAB, EMBED, LAYERS, HEADS, POSITIONS = 11, 8, 2, 2, 12   # the GPT under test


# -- subjects ----------------------------------------------------------------

def block(T, dtype=np.float32, shape=None, fill=None, seed=0):
    """A (B, H, T, D) block of normal values, or of ``fill``, cast to ``dtype``."""
    shape = (B, H, T, D) if shape is None else shape
    data = np.random.default_rng(seed).standard_normal(shape)
    if fill is not None:
        data[...] = fill
    return data.astype(dtype)


def one_bad(T, value, dtype=np.float32):
    """A valid block with ``value`` at one position."""
    data = block(T, dtype=np.float64)
    data[1, 0, 0, 2] = value
    return data.astype(dtype)


def make_cache(dtype=np.float32, **options):
    """A cache with COMMITTED positions in every layer and one more written to layer 0."""
    cache = KVCache(B, S, L, H, D, dtype=dtype, **options)
    for layer in range(L):
        cache.update(layer, block(COMMITTED, seed=layer), block(COMMITTED, seed=10 + layer))
    cache.advance(COMMITTED)
    cache.update(0, block(1, seed=20), block(1, seed=21))
    return cache


RAGGED = [3, 5]                     # seq_lens of the ragged subject


def make_ragged_cache(dtype=np.float32):
    """A cache whose rows hold RAGGED positions in every layer, and one more written to layer 0."""
    cache = KVCache(B, S, L, H, D, dtype=dtype)
    T = max(RAGGED)
    for layer in range(L):
        cache.update(layer, block(T, seed=layer), block(T, seed=10 + layer))
    cache.advance(RAGGED)
    cache.update(0, block(1, seed=20), block(1, seed=21))
    return cache


def make_gpt():
    return GPT(VOCAB, EMBED, LAYERS, HEADS, POSITIONS, seed=0)


def make_gpt_enabled():
    model = make_gpt()
    cache = enable_kv_cache(model)
    model.forward(np.array([[1, 2, 3]]))
    cache.advance(3)
    return model


def make_attention():
    """A CachedMultiHeadAttention and a 2-layer cache it has filled with 2 positions."""
    mha = CachedMultiHeadAttention(EMBED, HEADS, rng=0)
    cache = KVCache(1, 6, 2, HEADS, EMBED // HEADS)
    x = np.random.default_rng(1).standard_normal((1, 2, EMBED)).astype(np.float32)
    for layer in range(2):
        mha.forward(x, cache=cache, layer_idx=layer)
    cache.advance(2)
    return types.SimpleNamespace(mha=mha, cache=cache)


SUBJECTS = {
    "none": lambda: None,
    "cache": make_cache,
    "cache_f16": lambda: make_cache(np.float16),
    "cache_i8": lambda: make_cache(np.int8),
    "cache_checked": lambda: make_cache(check_finite=True),
    "ragged": make_ragged_cache,
    "gpt": make_gpt,
    "gpt_enabled": make_gpt_enabled,
    "attention": make_attention,
}


# -- the unchanged-state check -----------------------------------------------

def cache_state(cache):
    # _state holds seq_lens, evicted and written_end: all the bookkeeping;
    # an int8 cache's scales are part of its data
    scales = None if cache._scales is None else cache._scales.tobytes()
    return cache._arena.tobytes(), cache._state.tobytes(), scales


def state(subject):
    """Everything a rejected call must leave as it was."""
    if subject is None:
        return None
    if isinstance(subject, KVCache):
        return cache_state(subject)
    if isinstance(subject, GPT):
        cache = getattr(subject, "_kv_cache", None)
        return (getattr(subject, "_cache_enabled", False),
                None if cache is None else (id(cache), cache_state(cache)),
                # a patched attention has an instance-level forward
                tuple("forward" in vars(b.attention) for b in subject.blocks))
    return cache_state(subject.cache), "forward" in vars(subject.mha)


def outputs(subject):
    """What the subject computes next (may write to its cache: call after ``state``)."""
    if subject is None:
        return []
    if isinstance(subject, KVCache):
        return [subject.attend(1, block(1, seed=30), block(1, seed=31), block(1, seed=32))]
    if isinstance(subject, GPT):
        return [subject.forward(np.array([[4, 5]]))]
    x = np.random.default_rng(2).standard_normal((1, 1, EMBED)).astype(np.float32)
    return [subject.mha.forward(x), subject.mha.forward(x, cache=subject.cache, layer_idx=1)]


@contextlib.contextmanager
def left_unchanged(subject):
    """Assert that the body leaves ``subject``'s state as it found it."""
    before = state(subject)
    yield
    assert state(subject) == before, "a rejected call changed the state"


def assert_same_outputs(subject, twin):
    for got, want in zip(outputs(subject), outputs(twin), strict=True):
        assert got.tobytes() == want.tobytes(), "a rejected call changed later outputs"


# -- the catalogue -----------------------------------------------------------

class Without:
    """``model`` seen without the attribute ``missing``, or with ``overrides``."""

    def __init__(self, model, missing=None, **overrides):
        self._model, self._missing, self._overrides = model, missing, overrides

    def __getattr__(self, name):
        if name == self._missing:
            raise AttributeError(name)
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._model, name)


def disable_twice(model):
    enable_kv_cache(model)
    disable_kv_cache(model)
    disable_kv_cache(model)


def case(subject, call, exc, match, id):
    return pytest.param(subject, call, exc, match, id=id)


CONSTRUCTOR = [
    case("none", lambda _: KVCache(1.0, S, L, H, D), TypeError, r"^batch_size must be an int", "batch_size-float"),
    case("none", lambda _: KVCache(np.float64(2), S, L, H, D), TypeError, r"^batch_size\b", "batch_size-np.float64"),
    case("none", lambda _: KVCache(B, True, L, H, D), TypeError, r"^max_seq_len must be an int", "max_seq_len-bool"),
    case("none", lambda _: KVCache(B, "8", L, H, D), TypeError, r"^max_seq_len\b", "max_seq_len-str"),
    case("none", lambda _: KVCache(B, S, -1, H, D), ValueError, r"^num_layers must be a positive int", "num_layers-negative"),
    case("none", lambda _: KVCache(B, S, L, 0, D), ValueError, r"^num_heads must be a positive int", "num_heads-zero"),
    case("none", lambda _: KVCache(B, S, L, H, None), TypeError, r"^head_dim must be an int", "head_dim-None"),
    case("none", lambda _: KVCache(B, S, L, H, D, num_threads=0), ValueError, r"^num_threads\b", "num_threads-zero"),
    *[case("none", lambda _, dt=dt: KVCache(B, S, L, H, D, dtype=dt), TypeError, r"^dtype must be one of", f"dtype-{name}")
      for name, dt in [("complex64", np.complex64), ("object", object), ("int", int),
                       ("bool", bool), ("str", str), ("bytes", "S3"), ("longdouble", np.longdouble),
                       ("not-a-dtype", "float33")]],
]


VALID = object()   # stands for a valid (B, H, 1, D) block


def write_cases(op):
    """Cases shared by update (key, value) and attend (q, k, v)."""
    def call(layer=0, k=VALID, v=VALID, q=VALID):
        k, v, q = (block(1) if x is VALID else x for x in (k, v, q))
        if op == "update":
            return lambda c: c.update(layer, k, v)
        return lambda c: c.attend(layer, q, k, v)

    k, v = ("key", "value") if op == "update" else ("k", "v")
    cases = [
        case("cache", call(layer=-1), ValueError, r"^Layer index -1 < 0: layer_idx must be in \[0, 3\); got -1", "layer_idx-negative"),
        case("cache", call(layer=L), ValueError, r"^Layer index 3 >= num_layers 3: layer_idx must be in \[0, 3\); got 3", "layer_idx-too-large"),
        case("cache", call(layer=True), TypeError, r"^layer_idx must be an int", "layer_idx-bool"),
        case("cache", call(layer=0.0), TypeError, r"^layer_idx must be an int", "layer_idx-float"),
        case("cache", call(layer="0"), TypeError, r"^layer_idx must be an int", "layer_idx-str"),
        case("cache", call(k=block(1)[0]), ValueError, rf"^{k} must have shape", f"{k}-rank-3"),
        case("cache", call(k=block(1)[None]), ValueError, rf"^{k} must have shape", f"{k}-rank-5"),
        case("cache", call(k=block(1, shape=(B + 1, H, 1, D))), ValueError, rf"^{k} must have shape .*got \(3, 2, 1, 4\)", f"{k}-wrong-batch"),
        case("cache", call(k=block(1, shape=(B, H + 1, 1, D))), ValueError, rf"^{k} must have shape", f"{k}-wrong-heads"),
        case("cache", call(k=block(1, shape=(B, H, 1, D - 1))), ValueError, rf"^{k} must have shape", f"{k}-wrong-head_dim"),
        case("cache", call(v=block(1, shape=(1, H, 1, D))), ValueError, rf"^{v} must have shape", f"{v}-wrong-batch"),
        case("cache", call(v=block(1, shape=(B, 1, 1, D))), ValueError, rf"^{v} must have shape", f"{v}-wrong-heads"),
        case("cache", call(v=block(1, shape=(B, H, 1, D + 1))), ValueError, rf"^{v} must have shape", f"{v}-wrong-head_dim"),
        case("cache", call(k=block(0), v=block(0), q=block(0)), ValueError, rf"^{k} must hold at least one position", f"{k}-T-zero"),
        case("cache", call(k=block(2), v=block(1), q=block(2)), ValueError, rf"^{v} must have shape .* = \(2, 2, 2, 4\); got \(2, 2, 1, 4\)", f"{v}-T-mismatch"),
        case("cache", call(k=block(ROOM + 1), v=block(ROOM + 1), q=block(ROOM + 1)), ValueError,
             rf"^Sequence position 8 >= max_seq_len 8: {k} holds T = 6 positions, but seq_pos 3 \+ T must not exceed max_seq_len = 8", "overflow-by-one"),
        case("cache", call(k=block(50), v=block(50), q=block(50)), ValueError, rf"^Sequence position 52 >= max_seq_len 8: {k} holds T = 50 .*max_seq_len = 8", "overflow-by-many"),
        case("cache", call(v=block(1, np.complex64)), TypeError, rf"^{v} must hold real floating-point values; got dtype complex64", f"{v}-complex"),
        case("cache", call(k=block(1, np.complex128)), TypeError, rf"^{k} must hold real floating-point", f"{k}-complex"),
        case("cache", call(k=block(1, object)), TypeError, rf"^{k} must hold real floating-point values; got dtype object", f"{k}-object"),
        case("cache", call(k=block(1, np.int32)), TypeError, rf"^{k} must hold real floating-point values; got dtype int32", f"{k}-int"),
        case("cache", call(k=block(1, bool)), TypeError, rf"^{k} must hold real floating-point values; got dtype bool", f"{k}-bool"),
        case("cache", call(k=block(1).astype(str)), TypeError, rf"^{k} must hold real floating-point", f"{k}-str"),
        case("cache", call(k="not an array"), TypeError, rf"^{k} must hold real floating-point", f"{k}-string"),
        case("cache", call(k=None), TypeError, rf"^{k} must hold real floating-point values; got dtype object", f"{k}-None"),
        case("cache", call(k=[[1.0], [1.0, 2.0]]), TypeError, rf"^{k} must be array-like", f"{k}-ragged-list"),
        case("cache_f16", call(k=one_bad(1, 1e5)), ValueError, rf"^{k} has finite values up to 100000, beyond the float16 range", f"{k}-beyond-float16"),
        case("cache_f16", call(v=one_bad(1, -7e4, np.float64)), ValueError, rf"^{v} has finite values .*float16", f"{v}-beyond-float16"),
        # int8 stores absmax / 127 per vector: nothing non-finite can be stored, checked or not
        case("cache_i8", call(k=one_bad(1, np.nan)), ValueError, rf"^{k} contains NaN or infinity, which an int8 cache cannot store", f"{k}-nan-int8"),
        case("cache_i8", call(v=one_bad(1, -np.inf, np.float16)), ValueError, rf"^{v} contains NaN or infinity, which an int8 cache", f"{v}-inf-int8"),
        case("cache_i8", call(k=one_bad(1, 1e39, np.float64)), ValueError, rf"^{k} has finite values up to 1e\+39, beyond the float32 range", f"{k}-beyond-float32-int8"),
        case("cache_i8", call(k=block(1, np.int8)), TypeError, rf"^{k} must hold real floating-point values; got dtype int8", f"{k}-int8-values"),
        case("cache_i8", call(layer=L), ValueError, r"^Layer index 3 >= num_layers 3", "layer_idx-too-large-int8"),
        case("cache_i8", call(k=block(50), v=block(50), q=block(50)), ValueError, rf"^Sequence position 52 >= max_seq_len 8: {k} holds T = 50", "overflow-int8"),
        case("cache_i8", call(v=block(1, shape=(B, H, 1, D + 1))), ValueError, rf"^{v} must have shape", f"{v}-wrong-head_dim-int8"),
        case("cache_checked", call(k=one_bad(1, np.nan)), ValueError, rf"^{k} contains NaN or infinity \(check_finite=True\)", f"{k}-nan-checked"),
        case("cache_checked", call(v=one_bad(1, -np.inf)), ValueError, rf"^{v} contains NaN or infinity", f"{v}-inf-checked"),
    ]
    if op == "attend":
        cases += [
            case("cache", call(q=block(1)[0]), ValueError, r"^q must have shape", "q-rank-3"),
            case("cache", call(q=block(1, shape=(B, H, 1, D + 1))), ValueError, r"^q must have shape", "q-wrong-head_dim"),
            case("cache", call(q=block(1, shape=(B, 1, 1, D))), ValueError, r"^q must have shape", "q-wrong-heads"),
            case("cache", call(q=block(2)), ValueError, r"^q must have shape .* = \(2, G \* 2, 1, 4\) for a whole G >= 1; got \(2, 2, 2, 4\)", "q-T-mismatch"),
            case("cache", call(q=block(1, shape=(B, 3, 1, D))), ValueError, r"^q must have shape \(batch_size, G \* num_heads.* got \(2, 3, 1, 4\)", "q-heads-not-a-multiple"),
            case("cache", call(q=block(1, np.complex64)), TypeError, r"^q must hold real floating-point", "q-complex"),
            case("cache", call(q=block(1, np.int64)), TypeError, r"^q must hold real floating-point", "q-int"),
            case("cache", call(q=one_bad(1, 1e300, np.float64)), ValueError, r"^q has finite values .*float32", "q-beyond-float32"),
            case("cache_checked", call(q=one_bad(1, np.nan)), ValueError, r"^q contains NaN or infinity", "q-nan-checked"),
        ]
    return [pytest.param(*p.values, id=f"{op}-{p.id}") for p in cases]


GET = [
    case("cache", lambda c: c.get(-1), ValueError, r"^Layer index -1 < 0: layer_idx must be in \[0, 3\); got -1", "get-layer_idx-negative"),
    case("cache", lambda c: c.get(L), ValueError, r"^Layer index 3 >= num_layers 3: layer_idx must be in", "get-layer_idx-too-large"),
    case("cache", lambda c: c.get(np.bool_(False)), TypeError, r"^layer_idx must be an int", "get-layer_idx-np.bool"),
    case("cache", lambda c: c.get(1.5), TypeError, r"^layer_idx must be an int", "get-layer_idx-float"),
    case("cache", lambda c: c.get(None), TypeError, r"^layer_idx must be an int", "get-layer_idx-None"),
    case("cache_i8", lambda c: c.get(-1), ValueError, r"^Layer index -1 < 0: layer_idx must be in", "get-layer_idx-negative-int8"),
    case("cache_i8", lambda c: c.get_quantized(L), ValueError, r"^Layer index 3 >= num_layers 3: layer_idx must be in", "get_quantized-layer_idx-too-large"),
    case("cache_i8", lambda c: c.get_quantized(0, row=B), ValueError, r"^row must be a batch row in \[0, 2\); got 2", "get_quantized-row-too-large"),
    case("cache_i8", lambda c: c.get_quantized(0.0), TypeError, r"^layer_idx must be an int", "get_quantized-layer_idx-float"),
    case("cache", lambda c: c.get_quantized(0), TypeError, r"^get_quantized needs an int8 cache; this one stores float32", "get_quantized-float-cache"),
]

ADVANCE = [
    case("cache", lambda c: c.advance(0), ValueError, r"^n must be a positive int; got 0", "advance-zero"),
    case("cache", lambda c: c.advance(-1), ValueError, r"^n must be a positive int", "advance-negative"),
    case("cache", lambda c: c.advance(True), TypeError, r"^n must be an int", "advance-bool"),
    case("cache", lambda c: c.advance(1.0), TypeError, r"^n must be an int", "advance-float"),
    case("cache", lambda c: c.advance(ROOM + 1), ValueError, r"^Sequence position 8 >= max_seq_len 8: n = 6 would advance seq_pos 3 past max_seq_len = 8", "advance-past-by-one"),
    case("cache", lambda c: c.advance(10**6), ValueError, r"^Sequence position 1000002 >= max_seq_len 8: n = 1000000 would advance .*max_seq_len", "advance-past-by-many"),
]

MODEL = [
    *[case("gpt", lambda m, a=a: enable_kv_cache(Without(m, missing=a)), AttributeError, rf"has no {a}$", f"enable-missing-{a}")
      for a in ("embed_dim", "num_layers", "num_heads", "max_seq_len", "blocks")],
    case("gpt_enabled", lambda m: enable_kv_cache(m), ValueError, r"model already has a KV cache enabled", "enable-twice"),
    case("gpt", lambda m: enable_kv_cache(Without(m, embed_dim=10, num_heads=3)), ValueError,
         r"^model.embed_dim must be divisible by model.num_heads; got 10 and 3", "enable-indivisible"),
    case("gpt", lambda m: enable_kv_cache(Without(m, embed_dim=0)), ValueError, r"^model.embed_dim must be a positive int", "enable-embed_dim-zero"),
    case("gpt", lambda m: enable_kv_cache(Without(m, num_layers=5)), ValueError, r"^model.blocks must hold model.num_layers = 5", "enable-blocks-count"),
    case("gpt", lambda m: enable_kv_cache(m, 4), TypeError, r"positional", "enable-extra-positional"),
    case("gpt", lambda m: enable_kv_cache(m, batch_size=0), ValueError, r"^batch_size must be a positive int", "enable-batch_size-zero"),
    case("gpt", lambda m: enable_kv_cache(m, dtype=np.int32), TypeError, r"^dtype must be one of", "enable-dtype-int"),
    case("none", lambda _: enable_kv_cache(1, S, 0, H, D), ValueError, r"^num_layers must be a positive int", "enable-bare-num_layers-zero"),
    # a float batch size in the bare form is taken for a model
    case("none", lambda _: enable_kv_cache(1.0, S, L, H, D), TypeError, r"batch_size", "enable-bare-batch_size-float"),
    case("gpt", lambda m: disable_kv_cache(m), ValueError, r"^model \(GPT\) has no KV cache enabled", "disable-never-enabled"),
    case("gpt", disable_twice, ValueError, r"has no KV cache enabled", "disable-twice"),
]

ATTENTION = [
    case("none", lambda _: CachedMultiHeadAttention(0, HEADS), ValueError, r"^embed_dim must be a positive int", "mha-embed_dim-zero"),
    case("none", lambda _: CachedMultiHeadAttention(8.0, HEADS), TypeError, r"^embed_dim must be an int", "mha-embed_dim-float"),
    case("none", lambda _: CachedMultiHeadAttention(EMBED, -2), ValueError, r"^num_heads must be a positive int", "mha-num_heads-negative"),
    case("none", lambda _: CachedMultiHeadAttention(10, 3), ValueError, r"^embed_dim must be divisible by num_heads", "mha-indivisible"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 1, EMBED), np.float32), np.ones((1, 1))), ValueError, r"^mask must be None", "mha-mask"),
    case("attention", lambda a: a.mha.forward(np.ones((1, EMBED), np.float32)), ValueError, r"^x must have shape .*got \(1, 8\)", "mha-x-rank-2"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 1, EMBED + 1), np.float32), cache=a.cache), ValueError, r"^x must have shape", "mha-x-wrong-embed_dim"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 1, EMBED), np.float32), cache=a.cache, layer_idx=2), ValueError, r"^Layer index 2 >= num_layers 2: layer_idx must be in \[0, 2\)", "mha-cached-layer_idx"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 5, EMBED), np.float32), cache=a.cache), ValueError, r"^Sequence position \d+ >= max_seq_len 6: x holds T = 5 .*max_seq_len = 6", "mha-cached-overflow"),
    # the user passed x; a message about the internal k names nothing they gave
    case("attention", lambda a: a.mha.forward(np.ones((2, 1, EMBED), np.float32), cache=a.cache), ValueError, r"\bx\b", "mha-cached-x-wrong-batch"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 0, EMBED), np.float32)), ValueError, r"\bx\b", "mha-x-T-zero"),
    case("attention", lambda a: a.mha.forward(np.ones((1, 2, EMBED), np.complex64)), TypeError, r"\bx\b", "mha-x-complex"),
]

PROMPT = np.array([1, 2, 3])
GENERATE = [
    (lambda m: m.generate(PROMPT.astype(np.float64), 2), TypeError, r"^prompt_tokens must be integer token ids; got dtype float64", "generate-dtype-float"),
    (lambda m: m.generate(np.array([True, False]), 2), TypeError, r"^prompt_tokens must be integer", "generate-dtype-bool"),
    (lambda m: m.generate(np.array([1, -1, 2]), 2), ValueError, r"^prompt_tokens must be ids in \[0, vocab_size = 11\); got values in \[-1, 2\]", "generate-id-negative"),
    (lambda m: m.generate(np.array([1, VOCAB]), 2), ValueError, r"^prompt_tokens must be ids in", "generate-id-too-large"),
    (lambda m: m.generate(PROMPT.reshape(1, 1, 3), 2), ValueError, r"^prompt_tokens must have 1 or 2 dimensions", "generate-rank-3"),
    (lambda m: m.generate(np.array([], dtype=np.int64), 2), ValueError, r"^prompt_tokens must hold at least one token", "generate-empty"),
    (lambda m: m.generate(PROMPT, 0), ValueError, r"^max_new_tokens must be a positive int; got 0", "generate-max_new_tokens-zero"),
    (lambda m: m.generate(PROMPT, -3), ValueError, r"^max_new_tokens must be a positive int", "generate-max_new_tokens-negative"),
    (lambda m: m.generate(PROMPT, 2.0), TypeError, r"^max_new_tokens must be an int", "generate-max_new_tokens-float"),
    (lambda m: m.generate(PROMPT, POSITIONS - 2), ValueError, r"prompt length \+ max_new_tokens must be <= max_seq_len = 12; got 3 \+ 10", "generate-too-long"),
    (lambda m: m.generate(PROMPT, 2, temperature=-0.5), ValueError, r"^temperature must be a finite number >= 0; got -0.5", "generate-temperature-negative"),
    (lambda m: m.generate(PROMPT, 2, temperature=float("nan")), ValueError, r"^temperature must be a finite number", "generate-temperature-nan"),
    (lambda m: m.generate(PROMPT, 2, temperature=np.inf), ValueError, r"^temperature must be a finite number", "generate-temperature-inf"),
    # NumPy's isfinite raises first, naming no argument
    (lambda m: m.generate(PROMPT, 2, temperature=None), TypeError, r"temperature", "generate-temperature-None"),
    (lambda m: m.forward(PROMPT[None].astype(np.float32)), TypeError, r"^tokens must be integer token ids", "forward-tokens-float"),
    (lambda m: m.forward(PROMPT[None], start_pos=POSITIONS - 2), ValueError, r"^start_pos must be in \[0, max_seq_len - T\]", "forward-start_pos"),
]
MODEL += [case(subject, call, exc, match, f"{subject}-{id}")
          for subject in ("gpt", "gpt_enabled") for call, exc, match, id in GENERATE]
MODEL += [
    case("gpt_enabled", lambda m: m.generate(PROMPT, 2, use_cache=False), ValueError,
         r"^use_cache=False on a model with a KV cache enabled", "generate-use_cache-False-on-enabled"),
    case("gpt_enabled", lambda m: m.generate(np.stack([PROMPT, PROMPT]), 2), ValueError,
         r"^prompt_tokens has batch size 2; the model's enabled cache has batch_size 1", "generate-batch-mismatch"),
]

CATALOGUE = CONSTRUCTOR + write_cases("update") + GET + ADVANCE + write_cases("attend") + MODEL + ATTENTION


# -- rows of different lengths: per-row advance, get(row), reorder, forks, crop --
# "cache" holds seq_lens [3, 3]; "ragged" holds RAGGED = [3, 5]; both have B = 2, S = 8.

def set_seq_pos(value):
    return lambda c: setattr(c, "seq_pos", value)


ROWS = [
    case("cache", lambda c: c.advance([1, 1, 1]), ValueError, r"^n must have shape \(batch_size,\) = \(2,\); got \(3,\)", "advance-rows-too-many"),
    case("cache", lambda c: c.advance([1]), ValueError, r"^n must have shape \(batch_size,\) = \(2,\); got \(1,\)", "advance-rows-too-few"),
    case("cache", lambda c: c.advance([[1, 1]]), ValueError, r"^n must have shape \(batch_size,\)", "advance-rows-rank-2"),
    case("cache", lambda c: c.advance([1.0, 1.0]), TypeError, r"^n must hold ints within \[-9223372036854775808, 9223372036854775807\], one per batch row; got \[1.0, 1.0\], dtype float64", "advance-rows-float"),
    case("cache", lambda c: c.advance(np.array([1, 2], np.float32)), TypeError, r"^n must hold ints", "advance-rows-float32"),
    case("cache", lambda c: c.advance([True, False]), TypeError, r"^n must hold ints.*got \[True, False\], dtype bool", "advance-rows-bool"),
    case("cache", lambda c: c.advance([1, -1]), ValueError, r"^n must hold ints >= 0; got \[1, -1\]", "advance-rows-negative"),
    case("cache", lambda c: c.advance([0, ROOM + 1]), ValueError,
         r"^Sequence position 8 >= max_seq_len 8: n\[1\] = 6 would advance row 1 from 3 past max_seq_len = 8", "advance-rows-one-row-past"),
    # row 0 fits (3 + 5 = 8); row 1 does not (5 + 4): the message names the row that overflows
    case("ragged", lambda c: c.advance([S - RAGGED[0], S - RAGGED[1] + 1]), ValueError,
         r"^Sequence position 8 >= max_seq_len 8: n\[1\] = 4 would advance row 1 from 5 past max_seq_len = 8", "advance-rows-ragged-past"),
    case("ragged", lambda c: c.advance(1 + S - RAGGED[1]), ValueError, r"^Sequence position 8 >= max_seq_len 8: n = 4 would advance seq_pos 5 past", "advance-ragged-int-past"),
    # seq_lens + n would wrap around in intp: the check must not compute it
    case("cache", lambda c: c.advance([2**63 - 1, 0]), ValueError, r"^Sequence position 9223372036854775809 >= max_seq_len 8: n\[0\] = 9223372036854775807 would advance row 0",
         "advance-rows-intp-wraparound"),
    case("cache", lambda c: c.advance(np.array([2**64 - 1, 0], dtype=np.uint64)), ValueError,
         r"^n must hold ints of at most 9223372036854775807; got \[18446744073709551615, 0\]", "advance-rows-uint64-huge"),
    case("cache", lambda c: c.advance([]), ValueError, r"^n must have shape \(batch_size,\) = \(2,\); got \(0,\)", "advance-rows-empty-list"),

    case("cache", lambda c: c.get(0, row=B), ValueError, r"^row must be a batch row in \[0, 2\); got 2", "get-row-too-large"),
    case("cache", lambda c: c.get(0, row=-1), ValueError, r"^row must be a batch row in \[0, 2\); got -1", "get-row-negative"),
    case("cache", lambda c: c.get(0, row=True), TypeError, r"^row must be an int", "get-row-bool"),
    case("cache", lambda c: c.get(0, row=1.0), TypeError, r"^row must be an int", "get-row-float"),
    case("cache", lambda c: c.get(0, row=np.float64(1)), TypeError, r"^row must be an int", "get-row-np.float64"),
    case("ragged", lambda c: c.get(0), ValueError, r"^row must be given when rows hold different lengths; seq_lens = \[3, 5\]", "get-ragged-without-row"),
    case("ragged", lambda c: c.get(L, row=0), ValueError, r"^Layer index 3 >= num_layers 3: layer_idx must be in", "get-ragged-layer_idx"),

    case("cache", lambda c: c.reorder([0]), ValueError, r"^beam_idx must have shape \(batch_size,\) = \(2,\); got \(1,\)", "reorder-too-few"),
    case("cache", lambda c: c.reorder([[0, 1]]), ValueError, r"^beam_idx must have shape", "reorder-rank-2"),
    case("cache", lambda c: c.reorder(0), ValueError, r"^beam_idx must have shape .*got \(\)", "reorder-scalar"),
    case("cache", lambda c: c.reorder([0.0, 1.0]), TypeError, r"^beam_idx must hold ints within .*, one per batch row; got \[0.0, 1.0\], dtype float64", "reorder-float"),
    case("cache", lambda c: c.reorder([True, False]), TypeError, r"^beam_idx must hold ints", "reorder-bool"),
    case("cache", lambda c: c.reorder([2**63, 0]), TypeError, r"^beam_idx must hold ints within .*; got \[9223372036854775808, 0\], dtype float64", "reorder-beyond-int64"),
    case("cache", lambda c: c.advance([2**64, 0]), TypeError, r"^n must hold ints within .*; got \[18446744073709551616, 0\], dtype object", "advance-rows-beyond-uint64"),
    case("cache", lambda c: c.reorder([0, 2]), ValueError, r"^beam_idx must hold rows in \[0, 2\); got beam_idx\[1\] = 2", "reorder-too-large"),
    case("cache", lambda c: c.reorder([-1, 0]), ValueError, r"^beam_idx must hold rows in \[0, 2\); got beam_idx\[0\] = -1", "reorder-negative"),
    case("ragged", lambda c: c.reorder([1, 5]), ValueError, r"^beam_idx must hold rows in .*beam_idx\[1\] = 5", "reorder-ragged-too-large"),

    case("cache", lambda c: c.copy_sequence(B, 0), ValueError, r"^src must be a batch row in \[0, 2\); got 2", "copy-src-too-large"),
    case("cache", lambda c: c.copy_sequence(-1, 0), ValueError, r"^src must be a batch row", "copy-src-negative"),
    case("cache", lambda c: c.copy_sequence(0.0, 1), TypeError, r"^src must be an int", "copy-src-float"),
    case("cache", lambda c: c.copy_sequence(0, B), ValueError, r"^dst must be a batch row in \[0, 2\); got 2", "copy-dst-too-large"),
    case("cache", lambda c: c.copy_sequence(0, -1), ValueError, r"^dst must be a batch row", "copy-dst-negative"),
    case("cache", lambda c: c.copy_sequence(0, True), TypeError, r"^dst must be an int", "copy-dst-bool"),
    case("cache", lambda c: c.copy_sequence(0, 1, COMMITTED + 1), ValueError,
         r"^length must be in \[0, seq_lens\[src\] = 3\]; got 4", "copy-length-past-src"),
    # the bound is the source row's length, not seq_pos
    case("ragged", lambda c: c.copy_sequence(0, 1, RAGGED[0] + 1), ValueError,
         r"^length must be in \[0, seq_lens\[src\] = 3\]; got 4", "copy-ragged-length-past-src"),
    case("cache", lambda c: c.copy_sequence(0, 1, -1), ValueError, r"^length must be in \[0, seq_lens\[src\] = 3\]; got -1", "copy-length-negative"),
    case("cache", lambda c: c.copy_sequence(0, 1, 2.0), TypeError, r"^length must be an int", "copy-length-float"),

    case("cache", lambda c: c.crop(-COMMITTED - 1), ValueError,
         r"^length must be in \[-min\(seq_lens\), max_seq_len\] = \[-3, 8\]; got -4", "crop-too-negative"),
    # the bound is the shortest row
    case("ragged", lambda c: c.crop(-RAGGED[0] - 1), ValueError, r"^length must be in .* = \[-3, 8\]; got -4", "crop-ragged-too-negative"),
    case("cache", lambda c: c.crop(S + 1), ValueError, r"^length must be in .* = \[-3, 8\]; got 9", "crop-past-max_seq_len"),
    case("cache", lambda c: c.crop(1.0), TypeError, r"^length must be an int", "crop-float"),
    case("cache", lambda c: c.crop(None), TypeError, r"^length must be an int", "crop-None"),

    case("cache", set_seq_pos(-1), ValueError, r"^seq_pos must be in \[0, max_seq_len = 8\]; got -1", "seq_pos-negative"),
    case("ragged", set_seq_pos(S + 1), ValueError, r"^seq_pos must be in \[0, max_seq_len = 8\]; got 9", "seq_pos-past-max_seq_len"),
    case("cache", set_seq_pos(2.0), TypeError, r"^seq_pos must be an int", "seq_pos-float"),
    case("cache", set_seq_pos(True), TypeError, r"^seq_pos must be an int", "seq_pos-bool"),
]
CATALOGUE += ROWS


@pytest.mark.parametrize("subject_name, call, exc, match", CATALOGUE)
def test_bad_input_is_rejected_and_changes_nothing(subject_name, call, exc, match):
    subject = SUBJECTS[subject_name]()
    with left_unchanged(subject), pytest.raises(exc, match=match):
        call(subject)
    assert_same_outputs(subject, SUBJECTS[subject_name]())


def test_catalogue_is_large_and_ids_are_distinct():
    ids = [p.id for p in CATALOGUE]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 25


# -- boundaries: the last valid input is accepted ----------------------------

def test_the_last_position_fits_and_one_more_does_not():
    cache = make_cache()
    cache.update(1, block(ROOM), block(ROOM))
    cache.advance(ROOM)
    assert cache.seq_pos == S
    with left_unchanged(cache), pytest.raises(ValueError, match="max_seq_len"):
        cache.update(1, block(1), block(1))
    with left_unchanged(cache), pytest.raises(ValueError, match="^Sequence position 8 >= max_seq_len 8: n = 1 would advance seq_pos 8 past"):
        cache.advance(1)


def test_largest_float16_is_accepted():
    cache = make_cache(np.float16)
    cache.update(1, one_bad(1, 65504.0), one_bad(1, -65504.0, np.float64))
    keys = cache.caches[1][0][:, :, COMMITTED]
    assert keys[1, 0, 2] == 65504.0


def test_the_compiled_scan_and_what_it_leaves_to_numpy():
    from kvarena import _arena
    from kvarena.cache import largest_beyond
    x = np.ones((1, 2, 3, 5), np.float16)
    assert _arena.scan(x, 65504.0) == 0
    x[0, 0, 0, 0] = np.inf                      # the first element of a row
    assert _arena.scan(x, 65504.0) == 1
    y = np.ones((1, 2, 3, 5), np.float32)
    y[0, 1, 2, 4] = 7e4                         # the last one
    assert _arena.scan(y, 65504.0) == 2 and _arena.scan(y, 7e4) == 0
    assert _arena.scan(y[0], 1.0) == -1         # not 4-d
    with pytest.raises(TypeError):
        _arena.scan(None, 1.0)
    # arrays the pass does not read: NumPy decides
    raw = np.zeros(y.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, y.size, offset=1).reshape(y.shape)
    unaligned[...] = y
    for other in (y.astype(">f4"), y.astype(np.longdouble), unaligned):
        assert _arena.scan(other, 1.0) == -1
        assert largest_beyond(other, 65504.0) == np.float32(7e4)
    # beyond the limit alongside a NaN: the compiled pass stops at the NaN,
    # NumPy finds the largest finite value
    y[0, 0, 0, 0] = np.nan
    assert largest_beyond(y, 65504.0) == np.float32(7e4)
    y[0, 1, 2, 4] = 1.0
    assert largest_beyond(y, 65504.0) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_is_stored_when_check_finite_is_off(bad):
    # the documented policy: checking is opt-in
    cache = make_cache()
    cache.update(2, one_bad(1, bad), one_bad(1, bad))
    stored = cache.caches[2][1][1, 0, COMMITTED, 2]
    assert np.isnan(stored) if np.isnan(bad) else stored == bad
    out = cache.attend(2, block(1), one_bad(1, bad), block(1))
    assert out.shape == (B, H, 1, D)


def test_byte_swapped_dtype_gives_a_native_arena():
    cache = KVCache(B, S, L, H, D, dtype=">f8")
    assert cache.dtype == np.float64 and cache.dtype.isnative
    assert cache.arena.dtype == np.float64 and cache.arena.dtype.isnative


# -- odd layouts are accepted and equal a native C-contiguous copy -----------

class Tensor:
    """TinyTorch-style wrapper: the array is its ``.data``."""

    def __init__(self, data):
        self.data = data


def strided(a):
    # a view into a larger array, every axis stepped, of a's shape and values
    big = np.zeros((2 * a.shape[0], 3 * a.shape[1], 2 * a.shape[2], 3 * a.shape[3]), a.dtype)
    view = big[1::2, ::3, ::2, 2::3]
    view[...] = a
    return view


LAYOUTS = {
    "strided": strided,
    "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "fortran": np.asfortranarray,
    "strided-byte-swapped": lambda a: strided(a.astype(">f4")),
    "transposed-copy-back": lambda a: np.ascontiguousarray(a.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0),
    "float64": lambda a: a.astype(np.float64),
    "list": lambda a: a.tolist(),
    "tensor": Tensor,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_layouts_are_accepted_and_equal_a_native_copy(layout):
    odd = LAYOUTS[layout]
    want, got = make_cache(), make_cache()
    T = 2
    q, k, v = (block(T, seed=s) for s in (40, 41, 42))
    want.update(1, k, v)
    got.update(1, odd(k), odd(v))
    assert got._arena.tobytes() == want._arena.tobytes()
    expected = want.attend(2, q, k, v)
    result = got.attend(2, odd(q), odd(k), odd(v))
    # the result comes in q's dtype (float64 for float64 and list input), computed
    # in float32 either way: the same float32 values
    assert result.dtype == (np.float64 if layout in ("float64", "list") else np.float32)
    assert result.astype(np.float32).tobytes() == expected.tobytes()
    assert got._arena.tobytes() == want._arena.tobytes()


@pytest.mark.parametrize("layout", ["strided", "byte-swapped", "strided-byte-swapped"])
def test_odd_layouts_with_size_one_axes(layout):
    # B = H = T = 1: NumPy calls such arrays contiguous whatever the strides of those axes
    cache, native = KVCache(1, 4, 1, 1, 3), KVCache(1, 4, 1, 1, 3)
    q, k, v = (np.random.default_rng(s).standard_normal((1, 1, 1, 3)).astype(np.float32) for s in range(3))
    odd = LAYOUTS[layout]
    assert odd(q).strides != q.strides or not odd(q).dtype.isnative
    assert cache.attend(0, odd(q), odd(k), odd(v)).tobytes() == native.attend(0, q, k, v).tobytes()
    assert cache._arena.tobytes() == native._arena.tobytes()
