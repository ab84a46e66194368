"""Where a model's attention meets the cache.

``cached_attention`` is the one place where an attention object with
``q_proj, k_proj, v_proj, out_proj`` runs through a ``KVCache``:
``enable_kv_cache`` patches it into existing models, and
``kvarena.models.CachedMultiHeadAttention`` calls it when given a cache.
Grouped-query attention objects (``num_kv_heads`` or ``n_kv_heads`` K/V
heads under ``num_heads`` query heads) go through it unchanged: the cache
stores the K/V heads only.
"""

import numpy as np

from kvarena.checks import as_ndarray

KV_HEAD_ATTRIBUTES = ("num_kv_heads", "n_kv_heads")


def kv_head_attribute(obj):
    """The attribute that says how many K/V heads ``obj`` (a model or an
    attention) has: ``num_kv_heads`` or ``n_kv_heads`` when it has one that
    is not None (grouped-query or multi-query attention), else ``num_heads``."""
    return next((name for name in KV_HEAD_ATTRIBUTES if getattr(obj, name, None) is not None),
                "num_heads")


def kv_heads(obj):
    """How many K/V heads ``obj`` (a model or an attention) has (``kv_head_attribute``)."""
    return getattr(obj, kv_head_attribute(obj))


def check_groups(num_heads, num_kv_heads, names=("num_heads", "num_kv_heads")):
    """Raise unless ``num_kv_heads`` divides ``num_heads`` (both positive ints).

    ``names`` are the two arguments' names, for the message.
    """
    if num_heads % num_kv_heads:
        heads, kv = names
        raise ValueError(f"{heads} must be a multiple of {kv} (each K/V head serves a "
                         f"whole group of query heads); got {heads}={num_heads}, "
                         f"{kv}={num_kv_heads}")


def split_heads(x, num_heads):
    # (B, T, H * D) -> (B, H, T, D), a view
    B, T, E = x.shape
    return x.reshape(B, T, num_heads, E // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    # (B, H, T, D) -> (B, T, H * D)
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def like(template, array):
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
        ``forward``) and ``num_heads`` query heads; optionally
        ``num_kv_heads`` (or ``n_kv_heads``) K/V heads, which must equal
        ``cache.num_heads``: ``q_proj`` is then ``num_heads * head_dim``
        wide and ``k_proj``, ``v_proj`` are ``num_kv_heads * head_dim``.
    x : ndarray or Tensor, shape (batch_size, T, num_heads * head_dim)
    cache : KVCache
    layer_idx : int

    Returns
    -------
    The output projection's result, shape (batch_size, T, embed_dim), in
    the tensor type the projections return.
    """
    x_data = as_ndarray(x, "x")
    H, H_kv = attention.num_heads, kv_heads(attention)
    check_x(x_data, H * cache.head_dim, cache.batch_size)
    cache._check_lengths()
    cache._room("x", x_data.shape[1])
    q = as_ndarray(attention.q_proj.forward(x), "q")   # (B, T, H * D)
    k = as_ndarray(attention.k_proj.forward(x), "k")   # (B, T, H_kv * D)
    v = as_ndarray(attention.v_proj.forward(x), "v")
    out = cache.attend(layer_idx, split_heads(q, H), split_heads(k, H_kv), split_heads(v, H_kv))
    return attention.out_proj.forward(like(x, merge_heads(out)))


def check_x(x, embed_dim, batch_size=None):
    """Raise unless ``x`` is real floating point of shape (batch_size, T >= 1, embed_dim)."""
    if x.dtype.kind != "f":
        raise TypeError(f"x must hold real floating-point values; got dtype {x.dtype}")
    batch = "batch_size" if batch_size is None else f"batch_size={batch_size}"
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] != embed_dim \
            or batch_size not in (None, x.shape[0]):
        raise ValueError(f"x must have shape ({batch}, T >= 1, embed_dim={embed_dim}); "
                         f"got {x.shape}")
