"""Multi-head attention that can run through a KVCache.

``cached_attention`` is the one place where a model's attention meets the
cache: ``enable_kv_cache`` patches it into existing models, and
``CachedMultiHeadAttention`` calls it when given a cache.
"""

import numpy as np

from kvarena.checks import as_ndarray, check_positive


class Linear:
    """``y = x @ weight + bias``, with a TinyTorch-style ``forward``.

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
        Source of the initial weights (normal, std ``in_features ** -0.5``).
    dtype : dtype, default float32
    """

    def __init__(self, in_features, out_features, rng, dtype=np.float32):
        scale = in_features ** -0.5
        self.weight = (rng.standard_normal((in_features, out_features)) * scale).astype(dtype)
        self.bias = (rng.standard_normal(out_features) * 0.02).astype(dtype)

    def forward(self, x):
        return x @ self.weight + self.bias

    __call__ = forward


def _split_heads(x, num_heads):
    # (B, T, E) -> (B, H, T, D)
    B, T, E = x.shape
    return x.reshape(B, T, num_heads, E // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x):
    # (B, H, T, D) -> (B, T, H * D)
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def _like(template, array):
    """``array`` in the tensor type of ``template`` (ndarray or a ``.data`` wrapper)."""
    return array if isinstance(template, np.ndarray) else type(template)(array)


def cached_attention(attention, x, cache, layer_idx):
    """Self-attention of ``x`` through ``cache``, with ``attention``'s own projections.

    The keys and values of ``x`` are written at ``cache.seq_pos`` onwards, and
    each position of ``x`` attends to everything cached plus the new positions
    up to itself. The caller advances the cache once every layer has run.

    Parameters
    ----------
    attention : object
        Has ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (each with
        ``forward``) and ``num_heads``.
    x : ndarray or Tensor, shape (batch_size, T, embed_dim)
    cache : KVCache
    layer_idx : int

    Returns
    -------
    The output projection's result, shape (batch_size, T, embed_dim), in
    the tensor type the projections return.
    """
    x_data = as_ndarray(x, "x")
    check_x(x_data, cache.num_heads * cache.head_dim, cache.batch_size)
    cache._room("x", x_data.shape[1])
    H = attention.num_heads
    q = as_ndarray(attention.q_proj.forward(x), "q")
    k = as_ndarray(attention.k_proj.forward(x), "k")
    v = as_ndarray(attention.v_proj.forward(x), "v")
    out = cache.attend(layer_idx, _split_heads(q, H), _split_heads(k, H), _split_heads(v, H))
    return attention.out_proj.forward(_like(x, _merge_heads(out)))


def check_x(x, embed_dim, batch_size=None):
    """Raise unless ``x`` is real floating point of shape (batch_size, T >= 1, embed_dim)."""
    if x.dtype.kind != "f":
        raise TypeError(f"x must hold real floating-point values; got dtype {x.dtype}")
    batch = "batch_size" if batch_size is None else f"batch_size={batch_size}"
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] != embed_dim \
            or batch_size not in (None, x.shape[0]):
        raise ValueError(f"x must have shape ({batch}, T >= 1, embed_dim={embed_dim}); "
                         f"got {x.shape}")


def causal_attention(q, k, v):
    """Textbook causal attention over a whole sequence, in NumPy.

    q, k, v : ndarray, shape (B, H, T, D); returns the same shape.
    """
    T, D = q.shape[-2:]
    scores = q @ k.swapaxes(-1, -2) / np.float32(np.sqrt(D))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


class CachedMultiHeadAttention:
    """Causal multi-head self-attention with its own weights and an optional cache.

    Parameters
    ----------
    embed_dim : int
    num_heads : int
        Must divide ``embed_dim``; ``head_dim = embed_dim // num_heads``.
    rng : numpy.random.Generator or int, optional
        Source (or seed) of the initial weights.
    dtype : dtype, default float32

    Notes
    -----
    Without a cache, ``forward`` runs the full causal attention of ``x``
    in NumPy. With one, it goes through ``cached_attention``: the keys and
    values of ``x`` are appended after ``cache.seq_pos``.
    """

    def __init__(self, embed_dim, num_heads, rng=None, dtype=np.float32):
        embed_dim = check_positive("embed_dim", embed_dim)
        num_heads = check_positive("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; "
                             f"got embed_dim={embed_dim}, num_heads={num_heads}")
        rng = np.random.default_rng(rng)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = Linear(embed_dim, embed_dim, rng, dtype)
        self.k_proj = Linear(embed_dim, embed_dim, rng, dtype)
        self.v_proj = Linear(embed_dim, embed_dim, rng, dtype)
        self.out_proj = Linear(embed_dim, embed_dim, rng, dtype)

    def forward(self, x, mask=None, *, cache=None, layer_idx=0):
        """Attention output for ``x`` of shape (batch_size, T, embed_dim).

        ``mask`` is accepted for TinyTorch compatibility and must be None:
        the attention is always causal.
        """
        if mask is not None:
            raise ValueError("mask must be None: CachedMultiHeadAttention is always causal")
        if cache is not None:
            return cached_attention(self, x, cache, layer_idx)
        x_data = as_ndarray(x, "x")
        check_x(x_data, self.embed_dim)
        H = self.num_heads
        q, k, v = (_split_heads(p.forward(x_data), H)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return _like(x, self.out_proj.forward(_merge_heads(causal_attention(q, k, v))))

    __call__ = forward
