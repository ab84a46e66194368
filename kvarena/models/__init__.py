"""Reference models in NumPy: the material of the demo, the tests and the bench.

``import kvarena`` is the cache and its integration; these models use it:

- ``GPT``: learned positions, pre-LN, GELU; cached through
  ``enable_kv_cache`` without changing its code (TinyTorch's layout).
- ``Llama``: RMSNorm, rotary positions, SwiGLU, grouped-query attention;
  it does its own attention and calls ``cache.attend`` itself.
- ``NumpyKVCache``: a preallocated NumPy cache that repeats K/V heads for
  attention, as NumPy Llama ports write it: the baseline of ``bench/llama.py``.
- ``CachedMultiHeadAttention``, ``Linear``: the attention layer and the
  linear layer of ``GPT``.

None is trained; the weights are seeded random numbers.
"""

from kvarena.models.attention import CachedMultiHeadAttention, Linear, causal_attention, repeat_kv
from kvarena.models.gpt import GPT
from kvarena.models.llama import Llama, rope
from kvarena.models.numpy_cache import NumpyKVCache

__all__ = [
    "CachedMultiHeadAttention",
    "GPT",
    "Linear",
    "Llama",
    "NumpyKVCache",
    "causal_attention",
    "repeat_kv",
    "rope",
]
