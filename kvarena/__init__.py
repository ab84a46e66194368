"""kvarena: a contiguous key/value cache for autoregressive decoding on NumPy.

``from kvarena import KVCache`` replaces
``from tinytorch.generation.kv_cache import KVCache``. The reference models
(``GPT``, ``Llama``, ...) are in ``kvarena.models``.
"""

from kvarena.attention import cached_attention
from kvarena.cache import CacheView, KVCache
from kvarena.integration import disable_kv_cache, enable_kv_cache
from kvarena.kernel import kernel_info
from kvarena.planner import Footprint, footprint, plan
from kvarena.reference import attend_reference
from kvarena.storage import CacheFileError

__all__ = [
    "CacheFileError",
    "CacheView",
    "Footprint",
    "KVCache",
    "attend_reference",
    "cached_attention",
    "disable_kv_cache",
    "enable_kv_cache",
    "footprint",
    "kernel_info",
    "plan",
]
__version__ = "0.1.0"
