"""A small decoder-only transformer in NumPy, laid out like TinyTorch's GPT.

Seeded random weights, learned token and position embeddings, pre-LN
blocks with a GELU MLP. It exists to exercise and measure the cache: it is
the model of the demo, the tests and the benchmarks, not a trained model
and not a training framework (no autograd).
"""

import numpy as np

from kvarena.attention import check_groups
from kvarena.checks import check_float_dtype, check_int, check_positive
from kvarena.integration import disable_kv_cache, enable_kv_cache
from kvarena.models import decoding
from kvarena.models.attention import CachedMultiHeadAttention, Linear


class LayerNorm:
    """Normalise the last axis to zero mean and unit variance, then scale and shift."""

    def __init__(self, dim, dtype=np.float32, eps=1e-5):
        self.gamma = np.ones(dim, dtype=dtype)
        self.beta = np.zeros(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x):
        # np.add.reduce rather than ndarray.mean: the same sum without the
        # Python-level wrapper, which dominates at decode sizes (1 x E)
        n = x.shape[-1]
        out = x - np.add.reduce(x, axis=-1, keepdims=True) / n
        var = np.add.reduce(out * out, axis=-1, keepdims=True) / n
        out *= 1.0 / np.sqrt(var + self.eps)
        out *= self.gamma
        out += self.beta
        return out


class MLP:
    """``fc2(gelu(fc1(x)))`` with a 4x hidden width and tanh-approximated GELU."""

    def __init__(self, embed_dim, rng, dtype=np.float32):
        self.fc1 = Linear(embed_dim, 4 * embed_dim, rng, dtype)
        self.fc2 = Linear(4 * embed_dim, embed_dim, rng, dtype)

    def forward(self, x):
        h = self.fc1.forward(x)
        # gelu(h) = 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), in place
        inner = h * h
        inner *= 0.044715
        inner += 1.0
        inner *= h
        inner *= 0.7978846
        np.tanh(inner, out=inner)
        inner += 1.0
        inner *= h
        inner *= 0.5
        return self.fc2.forward(inner)


class TransformerBlock:
    """Pre-LN block: ``x + attention(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, embed_dim, num_heads, rng, dtype=np.float32, num_kv_heads=None):
        self.ln1 = LayerNorm(embed_dim, dtype)
        self.attention = CachedMultiHeadAttention(embed_dim, num_heads, rng, dtype, num_kv_heads)
        self.ln2 = LayerNorm(embed_dim, dtype)
        self.mlp = MLP(embed_dim, rng, dtype)

    def forward(self, x):
        x = x + self.attention.forward(self.ln1.forward(x))
        return x + self.mlp.forward(self.ln2.forward(x))


class GPT:
    """Decoder-only transformer with TinyTorch's attribute layout.

    Parameters
    ----------
    vocab_size, embed_dim, num_layers, num_heads, max_seq_len : int
        ``num_heads`` must divide ``embed_dim``; ``max_seq_len`` is the
        number of learned positions.
    seed : int, default 0
        Seed of the random weights.
    dtype : dtype, default float32
    num_kv_heads : int, optional
        K/V heads of every attention layer, dividing ``num_heads``
        (grouped-query attention). Default ``num_heads``.

    Notes
    -----
    ``enable_kv_cache(model)`` applies to it like to TinyTorch's GPT: each
    ``blocks[i].attention`` then runs through the cache. ``forward`` takes
    the position of its first token from the cache when one is enabled.
    """

    def __init__(self, vocab_size, embed_dim, num_layers, num_heads, max_seq_len,
                 seed=0, dtype=np.float32, num_kv_heads=None):
        self.vocab_size = check_positive("vocab_size", vocab_size)
        self.embed_dim = check_positive("embed_dim", embed_dim)
        self.num_layers = check_positive("num_layers", num_layers)
        self.num_heads = check_positive("num_heads", num_heads)
        self.num_kv_heads = num_heads if num_kv_heads is None \
            else check_positive("num_kv_heads", num_kv_heads)
        check_groups(self.num_heads, self.num_kv_heads)
        self.max_seq_len = check_positive("max_seq_len", max_seq_len)
        dtype = check_float_dtype("dtype", dtype)
        rng = np.random.default_rng(seed)
        self.token_embedding = (rng.standard_normal((vocab_size, embed_dim)) * 0.5).astype(dtype)
        self.position_embedding = (rng.standard_normal((max_seq_len, embed_dim)) * 0.1).astype(dtype)
        self.blocks = [TransformerBlock(embed_dim, num_heads, rng, dtype, num_kv_heads)
                       for _ in range(num_layers)]
        self.ln_f = LayerNorm(embed_dim, dtype)
        self.lm_head = Linear(embed_dim, vocab_size, rng, dtype)

    def forward(self, tokens, start_pos=None):
        """Logits for ``tokens``; row ``b`` at positions ``start_pos[b] ..``.

        Parameters
        ----------
        tokens : array of int, shape (batch_size, T)
        start_pos : int or sequence of int, optional
            Position of the first token, for all rows or per row. Default:
            the enabled cache's ``seq_lens`` (each row continues where it
            stands), or 0 without a cache.

        Returns
        -------
        ndarray, shape (batch_size, T, vocab_size)
        """
        tokens = decoding.check_tokens(tokens, "tokens", (2,), self.vocab_size)
        if start_pos is None:
            start_pos = self._kv_cache.seq_lens if getattr(self, "_cache_enabled", False) else 0
        positions = self._positions(start_pos, *tokens.shape)
        x = self.token_embedding[tokens] + self.position_embedding[positions]
        for block in self.blocks:
            x = block.forward(x)
        return self.lm_head.forward(self.ln_f.forward(x))

    def _positions(self, start_pos, B, T):
        """Index into ``position_embedding``: a slice, or (B, T) per-row positions."""
        last = self.max_seq_len - T
        if np.ndim(start_pos) == 0:
            start = check_int("start_pos", start_pos)
            if not 0 <= start <= last:
                raise ValueError(f"start_pos must be in [0, max_seq_len - T] = [0, {last}] "
                                 f"for T = {T}; got {start}")
            return slice(start, start + T)
        start = np.asarray(start_pos)
        if start.dtype.kind not in "iu" or start.shape != (B,):
            raise ValueError(f"start_pos must be an int or {B} ints, one per row; "
                             f"got {start_pos!r}")
        if start.min() < 0 or start.max() > last:
            raise ValueError(f"start_pos must be in [0, max_seq_len - T] = [0, {last}] "
                             f"for T = {T}; got {start.tolist()}")
        return start[:, None] + np.arange(T)

    def generate(self, prompt_tokens, max_new_tokens, use_cache=True, temperature=0.0, seed=None):
        """Extend each prompt by ``max_new_tokens`` sampled tokens.

        With the cache, the prompts are processed in one forward call
        (prefill), then one token per call. Without it, every step runs
        the whole sequence. Both give the same tokens.

        Prompts of different lengths decode in one batch: the prefill is
        right-padded, each row commits only its own prompt
        (``advance(lengths)``) and continues from its own position, so no
        real token ever attends to padding.

        Parameters
        ----------
        prompt_tokens : array of int, shape (T,) or (batch_size, T), or a list of 1-D prompts
            A list of prompts of different lengths is a ragged batch.
        max_new_tokens : int
            The longest prompt plus ``max_new_tokens`` must not exceed
            ``max_seq_len``.
        use_cache : bool, default True
            Uses the model's enabled cache if there is one (reset first),
            otherwise a temporary one in the model's dtype.
        temperature : float, default 0
            0 is greedy (argmax); above 0, sampling from
            ``softmax(logits / temperature)``.
        seed : int, optional
            Seed of the sampler.

        Returns
        -------
        The prompts followed by their new tokens, as int64: an array with
        the prompt's number of dimensions, or for a ragged batch a list of
        1-D arrays.
        """
        prompts, ragged = decoding.prompts(prompt_tokens, self.vocab_size)
        max_new_tokens, temperature = decoding.check_generate(max_new_tokens, use_cache,
                                                              temperature)
        B, T = len(prompts), max(len(p) for p in prompts)
        if T + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt length + max_new_tokens must be <= max_seq_len = "
                             f"{self.max_seq_len}; got {T} + {max_new_tokens}")
        enabled = getattr(self, "_cache_enabled", False)
        if enabled and not use_cache:
            raise ValueError("use_cache=False on a model with a KV cache enabled; "
                             "call disable_kv_cache(model) first")
        if enabled and self._kv_cache.batch_size != B:
            raise ValueError(f"prompt_tokens has batch size {B}; the model's enabled cache "
                             f"has batch_size {self._kv_cache.batch_size}")
        cache = None
        if use_cache:
            # in the model's own dtype: a float64 model keeps float64 keys and values
            cache = self._kv_cache if enabled else enable_kv_cache(
                self, batch_size=B, dtype=self.token_embedding.dtype)
        try:
            out, ends = decoding.decode(self.forward, prompts, ragged, max_new_tokens,
                                        temperature, seed, cache)
        finally:
            if use_cache and not enabled:
                disable_kv_cache(self)
        return decoding.result(out, ends, ragged, prompt_tokens)
