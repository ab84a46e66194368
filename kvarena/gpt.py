"""A small decoder-only transformer in NumPy, laid out like TinyTorch's GPT.

Seeded random weights, learned token and position embeddings, pre-LN
blocks with a GELU MLP. It exists to exercise and measure the cache: it is
the model of the demo, the tests and the benchmarks, not a trained model
and not a training framework (no autograd).
"""

import numbers

import numpy as np

from kvarena.attention import CachedMultiHeadAttention, Linear
from kvarena.checks import check_int, check_positive
from kvarena.integration import disable_kv_cache, enable_kv_cache


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

    def __init__(self, embed_dim, num_heads, rng, dtype=np.float32):
        self.ln1 = LayerNorm(embed_dim, dtype)
        self.attention = CachedMultiHeadAttention(embed_dim, num_heads, rng, dtype)
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

    Notes
    -----
    ``enable_kv_cache(model)`` applies to it like to TinyTorch's GPT: each
    ``blocks[i].attention`` then runs through the cache. ``forward`` takes
    the position of its first token from the cache when one is enabled.
    """

    def __init__(self, vocab_size, embed_dim, num_layers, num_heads, max_seq_len,
                 seed=0, dtype=np.float32):
        self.vocab_size = check_positive("vocab_size", vocab_size)
        self.embed_dim = check_positive("embed_dim", embed_dim)
        self.num_layers = check_positive("num_layers", num_layers)
        self.num_heads = check_positive("num_heads", num_heads)
        self.max_seq_len = check_positive("max_seq_len", max_seq_len)
        rng = np.random.default_rng(seed)
        self.token_embedding = (rng.standard_normal((vocab_size, embed_dim)) * 0.5).astype(dtype)
        self.position_embedding = (rng.standard_normal((max_seq_len, embed_dim)) * 0.1).astype(dtype)
        self.blocks = [TransformerBlock(embed_dim, num_heads, rng, dtype) for _ in range(num_layers)]
        self.ln_f = LayerNorm(embed_dim, dtype)
        self.lm_head = Linear(embed_dim, vocab_size, rng, dtype)

    def forward(self, tokens, start_pos=None):
        """Logits for ``tokens`` at positions ``start_pos .. start_pos + T - 1``.

        Parameters
        ----------
        tokens : array of int, shape (batch_size, T)
        start_pos : int, optional
            Position of the first token. Default: the enabled cache's
            ``seq_pos``, or 0 without a cache.

        Returns
        -------
        ndarray, shape (batch_size, T, vocab_size)
        """
        tokens = self._check_tokens(tokens, "tokens", ndim=(2,))
        if start_pos is None:
            start_pos = self._kv_cache.seq_pos if getattr(self, "_cache_enabled", False) else 0
        start_pos = check_int("start_pos", start_pos)
        T = tokens.shape[1]
        if not 0 <= start_pos <= self.max_seq_len - T:
            raise ValueError(f"start_pos must be in [0, max_seq_len - T] = [0, {self.max_seq_len - T}]"
                             f" for T = {T}; got {start_pos}")
        x = self.token_embedding[tokens] + self.position_embedding[start_pos:start_pos + T]
        for block in self.blocks:
            x = block.forward(x)
        return self.lm_head.forward(self.ln_f.forward(x))

    def _check_tokens(self, tokens, name, ndim):
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integer token ids; got dtype {tokens.dtype}")
        if tokens.ndim not in ndim:
            raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions; "
                             f"got shape {tokens.shape}")
        if tokens.shape[-1] < 1:
            raise ValueError(f"{name} must hold at least one token; got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{name} must be ids in [0, vocab_size = {self.vocab_size}); "
                             f"got values in [{tokens.min()}, {tokens.max()}]")
        return tokens

    def generate(self, prompt_tokens, max_new_tokens, use_cache=True, temperature=0.0, seed=None):
        """Extend ``prompt_tokens`` by ``max_new_tokens`` sampled tokens.

        With the cache, the prompt is processed in one forward call
        (prefill), then one token per call. Without it, every step runs
        the whole sequence. Both give the same tokens.

        Parameters
        ----------
        prompt_tokens : array of int, shape (T,) or (batch_size, T)
        max_new_tokens : int
            ``T + max_new_tokens`` must not exceed ``max_seq_len``.
        use_cache : bool, default True
            Uses the model's enabled cache if there is one (reset first),
            otherwise a temporary one.
        temperature : float, default 0
            0 is greedy (argmax); above 0, sampling from
            ``softmax(logits / temperature)``.
        seed : int, optional
            Seed of the sampler.

        Returns
        -------
        ndarray of int64, the prompt followed by the new tokens, with the
        prompt's number of dimensions.
        """
        prompt = self._check_tokens(prompt_tokens, "prompt_tokens", ndim=(1, 2))
        max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
        if not isinstance(use_cache, (bool, np.bool_)):
            raise TypeError(f"use_cache must be a bool; got {use_cache!r}")
        if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a real number; got {temperature!r}")
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
        batch = np.atleast_2d(prompt).astype(np.int64)
        B, T = batch.shape
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
        rng = np.random.default_rng(seed)
        out = np.empty((B, T + max_new_tokens), dtype=np.int64)
        out[:, :T] = batch
        if not use_cache:
            for t in range(T, T + max_new_tokens):
                out[:, t] = _sample(self.forward(out[:, :t])[:, -1], temperature, rng)
        else:
            cache = self._kv_cache if enabled else enable_kv_cache(self, batch_size=B)
            try:
                cache.reset()
                step = batch
                for t in range(T, T + max_new_tokens):
                    logits = self.forward(step, start_pos=cache.seq_pos)
                    cache.advance(step.shape[1])
                    out[:, t] = _sample(logits[:, -1], temperature, rng)
                    step = out[:, t:t + 1]
            finally:
                if not enabled:
                    disable_kv_cache(self)
        return out if prompt.ndim == 2 else out[0]


def _sample(logits, temperature, rng):
    """One token id per row of ``logits`` (batch_size, vocab_size)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((len(logits), 1)) * cdf[:, -1:]
    return (cdf < u).sum(axis=-1)
