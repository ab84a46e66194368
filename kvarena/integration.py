"""Attach a KVCache to an existing GPT-style model without editing its code."""

import logging
import numbers
import warnings

from kvarena.attention import cached_attention, check_groups, kv_head_attribute, kv_heads
from kvarena.cache import KVCache
from kvarena.checks import check_positive

logger = logging.getLogger(__name__)

MODEL_ATTRIBUTES = ("embed_dim", "num_layers", "num_heads", "max_seq_len", "blocks")
ATTENTION_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads")


def enable_kv_cache(*args, **kwargs):
    """Create a KVCache, and attach it to a model when given one.

    Two call forms, as TinyTorch code uses them:

    ``enable_kv_cache(model, *, batch_size=1, dtype=float32, ...)``
        Sizes a cache from ``model.embed_dim, num_layers, num_heads,
        max_seq_len``: ``head_dim = embed_dim // num_heads``, and the cache
        stores ``model.num_kv_heads`` (or ``model.n_kv_heads``) K/V heads
        when the model has that attribute (grouped-query attention; query
        heads need no room in a cache), else ``num_heads``. It stores the
        cache as ``model._kv_cache``, sets
        ``model._cache_enabled = True`` and patches each
        ``model.blocks[i].attention`` so that every call (a prompt of T
        tokens or one token) goes through the cache. The model's class is
        not touched; ``disable_kv_cache`` undoes all of it. An attention
        without ``q_proj, k_proj, v_proj, out_proj, num_heads`` is left as
        it is, with a warning naming it.

    ``enable_kv_cache(batch_size, max_seq_len, num_layers, num_heads, head_dim, **options)``
        Positionally or by keyword: returns a bare ``KVCache``.

    The caller of a patched model advances the cache once per forward
    call: ``cache.advance(T)`` after the model has processed T tokens.
    Patched attention ignores a ``mask`` argument; it is causal.

    Returns
    -------
    KVCache

    Raises
    ------
    AttributeError
        The model lacks one of ``embed_dim, num_layers, num_heads,
        max_seq_len, blocks``.
    ValueError
        Caching is already enabled on the model, or its sizes are invalid
        (``num_heads`` not dividing ``embed_dim``, or not a multiple of the
        K/V heads), or two blocks share one attention object, or an
        attention's K/V heads differ from the model's.
    TypeError
        An attention's ``forward`` cannot be set on the instance (no
        ``__dict__``, a read-only property). Nothing is left patched.
    """
    if not args and "model" in kwargs:          # enable_kv_cache(model=...)
        args = (kwargs.pop("model"),)
    if args and not isinstance(args[0], numbers.Number):
        model, *rest = args
        if rest:
            raise TypeError("enable_kv_cache(model) takes options by keyword only; "
                            f"got {len(rest)} extra positional argument(s)")
        return _attach(model, **kwargs)
    return KVCache(*args, **kwargs)


def _attach(model, *, batch_size=1, **options):
    missing = [name for name in MODEL_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise AttributeError(f"model must have {', '.join(MODEL_ATTRIBUTES)} to be cached; "
                             f"{type(model).__name__} has no {', '.join(missing)}")
    if getattr(model, "_cache_enabled", False):
        raise ValueError("model already has a KV cache enabled; "
                         "call disable_kv_cache(model) before enabling another")
    embed_dim = check_positive("model.embed_dim", model.embed_dim)
    num_heads = check_positive("model.num_heads", model.num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"model.embed_dim must be divisible by model.num_heads; "
                         f"got {embed_dim} and {num_heads}")
    kv_name = kv_head_attribute(model)
    num_kv_heads = check_positive(f"model.{kv_name}", getattr(model, kv_name))
    check_groups(num_heads, num_kv_heads, ("model.num_heads", f"model.{kv_name}"))
    blocks = list(model.blocks)
    if len(blocks) != model.num_layers:
        raise ValueError(f"model.blocks must hold model.num_layers = {model.num_layers} "
                         f"blocks; got {len(blocks)}")
    # everything is checked before anything changes; the cache (which may
    # create a file) comes last, and if it cannot be made the patches go
    attentions, uncached = [], []
    for layer_idx, block in enumerate(blocks):
        attention = getattr(block, "attention", None)
        lacking = [name for name in ATTENTION_ATTRIBUTES if not hasattr(attention, name)]
        if lacking:
            uncached.append((layer_idx, attention, lacking))
            continue
        name = f"model.blocks[{layer_idx}].attention"
        shared = next((layer for layer, other in attentions if other is attention), None)
        if shared is not None:
            raise ValueError(f"{name} is the same object as model.blocks[{shared}].attention: "
                             f"each cached layer needs an attention object of its own (one "
                             f"object cannot tell which layer of the cache it is serving)")
        heads = kv_heads(attention)                 # what cached_attention splits k and v by
        if heads != num_kv_heads:
            raise ValueError(f"{name}.{kv_head_attribute(attention)} = {heads!r} differs from "
                             f"model.{kv_name} = {num_kv_heads}, the K/V heads the cache stores")
        attentions.append((layer_idx, attention))
    if uncached:        # before any patch: a warning raised as an error changes nothing
        layer_idx, attention, lacking = uncached[0]
        others = f" (and {len(uncached) - 1} more layers)" if len(uncached) > 1 else ""
        warnings.warn(f"model.blocks[{layer_idx}].attention ({type(attention).__name__}){others} "
                      f"has no {', '.join(lacking)}: left uncached", stacklevel=3)
    patched = []                        # (attention, had a forward of its own, it, layer)
    forwards = [CachedForward(attention, None, layer_idx) for layer_idx, attention in attentions]
    try:
        for (layer_idx, attention), forward in zip(attentions, forwards):
            _patch(attention, forward, layer_idx, patched)
        cache = KVCache(batch_size, model.max_seq_len, model.num_layers, num_kv_heads,
                        embed_dim // num_heads, **options)
    except BaseException:
        _restore(patched)               # all or nothing: no layer is left patched
        raise
    for forward in forwards:            # the objects made here, not what attention.forward reads
        forward.cache = cache

    model._kv_cache = cache
    model._cache_enabled = True
    model._kv_patched = patched
    logger.info("kv cache enabled: %r, %.2f MiB", cache, cache.get_memory_usage()["total_mb"])
    return cache


class CachedForward:
    """A patched attention's ``forward``: its calls go through one layer of a cache.

    An object rather than a closure: ``copy.deepcopy`` of a patched model
    copies it with the attention and the cache it refers to (a function is
    copied by reference, and the copy would have run the original's
    weights and written the original's cache).
    """

    __slots__ = ("attention", "cache", "layer_idx")

    def __init__(self, attention, cache, layer_idx):
        self.attention, self.cache, self.layer_idx = attention, cache, layer_idx

    def __call__(self, x, mask=None):
        return cached_attention(self.attention, x, self.cache, self.layer_idx)


def _patch(attention, forward, layer_idx, patched):
    """Set ``attention.forward``, recording what disable_kv_cache restores."""
    # an instance attribute shadows the class's forward; remember whether one
    # was already there so that disable_kv_cache restores it exactly (a flag,
    # not a sentinel object, which copy.deepcopy of the model would copy)
    try:
        had_own = "forward" in vars(attention)
        own = vars(attention).get("forward")
        attention.forward = forward
    except (TypeError, AttributeError) as exc:
        raise TypeError(f"model.blocks[{layer_idx}].attention ({type(attention).__name__}) "
                        f"cannot be patched: its forward cannot be set on the instance "
                        f"({exc})") from None
    patched.append((attention, had_own, own, layer_idx))


def _restore(patched):
    """Undo ``_patch`` calls, the last first."""
    for attention, had_own, own, _ in reversed(patched):
        if had_own:
            attention.forward = own
        else:
            del attention.forward


def disable_kv_cache(model):
    """Undo ``enable_kv_cache(model)``: original attention, no cache attributes.

    Raises
    ------
    ValueError
        Caching is not enabled on ``model``.
    """
    if not getattr(model, "_cache_enabled", False):
        raise ValueError(f"model ({type(model).__name__}) has no KV cache enabled")
    _restore(model._kv_patched)
    del model._kv_cache, model._kv_patched
    model._cache_enabled = False
