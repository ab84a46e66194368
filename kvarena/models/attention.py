"""Building blocks of the reference models: a linear layer, textbook attention,
and a multi-head (or grouped-query) attention layer that runs through a cache.
"""

import numpy as np

from kvarena.attention import (cached_attention, check_groups, check_x, like, merge_heads,
                               split_heads)
from kvarena.checks import as_ndarray, check_float_dtype, check_positive


class Linear:
    """``y = x @ weight + bias``, with a TinyTorch-style ``forward``.

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
        Source of the initial weights (normal, std ``in_features ** -0.5``).
    dtype : dtype, default float32
    bias : bool, default True
        Without one (``bias = None``), ``y = x @ weight``, as in Llama.
    """

    def __init__(self, in_features, out_features, rng, dtype=np.float32, bias=True):
        dtype = check_float_dtype("dtype", dtype)
        scale = in_features ** -0.5
        self.weight = (rng.standard_normal((in_features, out_features)) * scale).astype(dtype)
        self.bias = (rng.standard_normal(out_features) * 0.02).astype(dtype) if bias else None

    def forward(self, x):
        return x @ self.weight if self.bias is None else x @ self.weight + self.bias

    __call__ = forward


def repeat_kv(x, groups):
    """Each K/V head repeated ``groups`` times, as grouped-query models do before attention.

    (B, H_kv, S, D) -> (B, H_kv * groups, S, D), a copy (HF's ``repeat_kv``):
    query head h then pairs with K/V head ``h // groups``.
    """
    return x if groups == 1 else np.repeat(x, groups, axis=1)


def causal_attention(q, k, v, cached=0):
    """Textbook causal attention in NumPy: matmul, max-subtracted softmax, matmul.

    Parameters
    ----------
    q : ndarray, shape (B, H, T, D)
        Queries of T new positions.
    k, v : ndarray, shape (B, H, S, D)
        Row b holds ``cached[b]`` earlier positions, then the T new ones;
        anything past ``cached[b] + T`` is masked out.
    cached : int or ndarray of int, shape (B,), default 0
        Positions before the new block, per row. 0 and S = T: the
        attention of a whole sequence.

    Returns
    -------
    ndarray, shape (B, H, T, D): query t of row b attends to keys
    ``0 .. cached[b] + t``.
    """
    T, D = q.shape[-2:]
    S = k.shape[-2]
    scores = q @ k.swapaxes(-1, -2) / np.float32(np.sqrt(D))             # (B, H, T, S)
    if T > 1 or np.ndim(cached) or cached + T != S:   # else one query that sees every key
        last = np.reshape(cached, (-1, 1, 1, 1)) + np.arange(T)[:, None]  # (B | 1, 1, T, 1)
        scores = np.where(np.arange(S) <= last, scores, -np.inf)
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
        Query heads; must divide ``embed_dim``; ``head_dim = embed_dim // num_heads``.
    rng : numpy.random.Generator or int, optional
        Source (or seed) of the initial weights.
    dtype : dtype, default float32
    num_kv_heads : int, optional
        K/V heads, dividing ``num_heads`` (grouped-query attention; 1 is
        multi-query). Default ``num_heads``. ``k_proj`` and ``v_proj`` are
        then ``num_kv_heads * head_dim`` wide, and so is what a cache stores.

    Notes
    -----
    Without a cache, ``forward`` runs the full causal attention of ``x``
    in NumPy (K/V heads repeated to ``num_heads``). With one, it goes
    through ``kvarena.cached_attention``: the keys and values of ``x`` are
    appended after ``cache.seq_pos``.
    """

    def __init__(self, embed_dim, num_heads, rng=None, dtype=np.float32, num_kv_heads=None):
        dtype = check_float_dtype("dtype", dtype)
        embed_dim = check_positive("embed_dim", embed_dim)
        num_heads = check_positive("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; "
                             f"got embed_dim={embed_dim}, num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None \
            else check_positive("num_kv_heads", num_kv_heads)
        check_groups(num_heads, num_kv_heads)
        rng = np.random.default_rng(rng)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = Linear(embed_dim, embed_dim, rng, dtype)
        self.k_proj = Linear(embed_dim, kv_dim, rng, dtype)
        self.v_proj = Linear(embed_dim, kv_dim, rng, dtype)
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
        groups = self.num_heads // self.num_kv_heads
        q = split_heads(self.q_proj.forward(x_data), self.num_heads)          # (B, H, T, D)
        k, v = (repeat_kv(split_heads(p.forward(x_data), self.num_kv_heads), groups)
                for p in (self.k_proj, self.v_proj))                          # (B, H, T, D)
        return like(x, self.out_proj.forward(merge_heads(causal_attention(q, k, v))))

    def __call__(self, *args, **kwargs):
        # forward looked up at each call, as TinyTorch's Module does:
        # enable_kv_cache patches the instance's forward
        return self.forward(*args, **kwargs)
